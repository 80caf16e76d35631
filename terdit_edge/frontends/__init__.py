"""The front-ends: clients above the library (the command line, the HTTP server, the sampling-job
commands). The library (format, model, kernels, diffusion, vae, pipeline, settings) never imports them."""
