"""`terdit-edge serve`: a resident HTTP server (job queue, progress events, cancel, OpenAI-compatible
endpoint, a web page). Needs the ``[server]`` extra (Starlette + uvicorn); see docs/server.md.

Modules: ``jobs`` (queue, worker thread, batching; no web framework), ``validate`` (request bodies),
``app`` (the Starlette routes), ``main`` (the command). Importing this package imports neither.
"""
