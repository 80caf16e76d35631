"""SD-VAE decode speed and memory: terdit_edge.vae against diffusers' AutoencoderKL (float32).

    python benchmarks/bench_vae.py [--json] [--threads N] [--size 32] [--repeat R] [--clock wall|cpu]
                                   [--methods winograd4,winograd2,im2col] [--no-rss] [--no-layers]

The model is the full Stable Diffusion VAE decoder shape (block_out_channels 128, 256, 512, 512,
layers_per_block 2) with random weights (diffusers' initialisation, seeded), so no download is
needed; speed does not depend on the weight values. Three measurements:

1. decode of a size x size latent (default 32 -> a 256 px image): diffusers float32 vs ours with
   float32 and float16-stored weights, for each convolution method, all under the same thread
   count, one full-size warm-up decode each (diffusers too), then R interleaved rounds. Ratio =
   median diffusers time / median ours. Max abs error vs diffusers.
2. one 3x3 convolution per decoder resolution: torch's conv2d (oneDNN direct convolution) vs
   im2col + BLAS vs Winograd F(2x2,3x3) and F(4x4,3x3).
3. peak memory of a 512 px decode (64 x 64 latent) with float16 weights memory-mapped from .npy
   files, tiled (tile 32) and untiled, each in a fresh subprocess: ru_maxrss after decoding minus
   ru_maxrss after construction and a tiny warm-up decode (so imports, Numba compilation and the
   latents are excluded; touched weight pages count). VmHWM (Linux) is reported alongside.

Decode times are the median of R runs with the range (best-worst); per-layer times are the best of R.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from terdit_edge.vae import CONV_METHODS, VAEConfig, VAEDecoder, conv3x3  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)



def build_diffusers_model(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(SD_VAE["block_out_channels"])
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         latent_channels=4, **SD_VAE).eval()


def decoder_tensors(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
            if k.startswith(("decoder.", "post_quant_conv."))}


def bench_decode(model, threads: int, size: int, repeat: int, methods, clock=time.perf_counter) -> dict:
    import torch
    torch.set_num_threads(threads)
    cfg = VAEConfig(**SD_VAE)
    f32 = decoder_tensors(model)
    f16 = {k: v.astype(np.float16) for k, v in f32.items()}
    z = np.random.default_rng(0).standard_normal((1, 4, size, size), dtype=np.float32)
    runners = {}
    for m in methods:
        runners[f"ours_fp32_{m}"] = VAEDecoder(cfg, f32, threads=threads, conv=m)
        runners[f"ours_fp16_{m}"] = VAEDecoder(cfg, f16, threads=threads, conv=m)
    for dec in runners.values():  # Numba compilation / cache load outside the timings
        dec.decode(z[:, :, :4, :4])

    def torch_decode():
        with torch.no_grad():
            return model.decode(torch.from_numpy(z) / cfg.scaling_factor).sample.numpy()

    # one full-size warm-up decode for every contender, diffusers included (its first call pays for
    # oneDNN primitive creation and allocator growth), then the timed rounds
    torch_decode()
    for dec in runners.values():
        dec.decode(z)
    times = {name: [] for name in ["diffusers_fp32", *runners]}
    errors = {}
    reference = None
    for _ in range(repeat):  # interleaved so that machine load hits every contender alike
        t0 = clock()
        reference = torch_decode()
        times["diffusers_fp32"].append(clock() - t0)
        for name, dec in runners.items():
            t0 = clock()
            out = dec.decode(z)
            times[name].append(clock() - t0)
            errors[name] = float(np.abs(out - reference).max())
    base = statistics.median(times["diffusers_fp32"])
    return {name: {"best_s": min(t), "median_s": statistics.median(t), "worst_s": max(t),
                   "speedup_vs_diffusers": base / statistics.median(t), "max_abs_err": errors.get(name, 0.0)}
            for name, t in times.items()}


def bench_layers(threads: int, size: int, repeat: int) -> list:
    """One 3x3 convolution at each decoder resolution for a size x size latent."""
    import torch
    from threadpoolctl import threadpool_limits

    from terdit_edge.kernels.conv import _Workers
    torch.set_num_threads(threads)
    workers = _Workers(threads)
    rng = np.random.default_rng(1)
    rows = []
    for scale, ch in ((1, 512), (2, 512), (4, 256), (8, 128)):
        h = size * scale
        x = rng.standard_normal((h, h, ch), dtype=np.float32)
        w = (rng.standard_normal((ch, ch, 3, 3)) * 0.02).astype(np.float32)
        b = np.zeros(ch, np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        conv = torch.nn.Conv2d(ch, ch, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias.zero_()
        fns = {"torch_direct": lambda: conv(xt)}
        for m in CONV_METHODS:
            fns[m] = (lambda m=m: conv3x3(x, w, b, method=m, workers=workers))
        times = {k: [] for k in fns}
        for _ in range(repeat + 1):  # the first round is a warm-up
            for k, fn in fns.items():
                # ours parallelise over their own workers with single-threaded BLAS (as in
                # VAEDecoder.decode); torch keeps its own thread pool at `threads`
                limit = threadpool_limits(limits=1, user_api="blas") if k != "torch_direct" else None
                with torch.no_grad():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
                if limit is not None:
                    limit.restore_original_limits()
        times = {k: t[1:] for k, t in times.items()}
        flops = 2 * h * h * ch * ch * 9
        rows.append({"shape": f"{h}x{h}x{ch}->{ch}", "gflop": flops / 1e9,
                     **{k: min(t) for k, t in times.items()}})
    workers.close()
    return rows


RSS_WRITER = r"""
import sys
import numpy as np
sys.path.insert(0, {root!r})
from terdit_edge.vae_config import VAEConfig, expected_vae_tensors
rng = np.random.default_rng(0)
for name, shape in expected_vae_tensors(VAEConfig(**{arch!r})).items():
    w = rng.standard_normal(shape, dtype=np.float32) * (0.02 if len(shape) > 1 else 0.1)
    np.save({folder!r} + '/' + name + '.npy', w.astype(np.float16))
"""

RSS_CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from terdit_edge.vae import VAEConfig, VAEDecoder, expected_vae_tensors

def hwm_mb():  # peak RSS of this process image only (ru_maxrss may carry the parent's peak)
    try:
        with open('/proc/self/status') as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith('VmHWM')) / 1024
    except (OSError, StopIteration):
        return float('nan')

cfg = VAEConfig(**{arch!r})
tensors = {{k: np.load({folder!r} + '/' + k + '.npy', mmap_mode='r') for k in expected_vae_tensors(cfg)}}
dec = VAEDecoder(cfg, tensors, threads={threads})
z = np.random.default_rng(0).standard_normal((1, 4, {size}, {size}), dtype=np.float32)
dec.decode(z[:, :, :4, :4])
before, hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm_mb()
t0 = time.perf_counter()
dec.decode(z, tile={tile})
seconds = time.perf_counter() - t0
after, hwm_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm_mb()
print(json.dumps(dict(before_mb=before / 1024, after_mb=after / 1024, added_mb=(after - before) / 1024,
                      vmhwm_added_mb=hwm_after - hwm_before, seconds=seconds)))
"""


def bench_rss(threads: int, size: int, tiles) -> dict:
    """Peak-RSS growth of one decode in a fresh process per tile setting (None = untiled).

    Run before torch is imported: a child's ru_maxrss starts at the parent's peak on Linux.
    Random float16 weights (values do not matter here) are written by a separate child.
    """
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        def run(code):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"RSS child failed: {proc.stderr[-2000:]}")
            return proc.stdout
        run(RSS_WRITER.format(root=ROOT, arch=SD_VAE, folder=folder))
        for tile in tiles:
            out = run(RSS_CHILD.format(root=ROOT, arch=SD_VAE, folder=folder, threads=threads, size=size, tile=tile))
            results["untiled" if tile is None else f"tile{tile}"] = json.loads(out.strip().splitlines()[-1])
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--size", type=int, default=32, help="latent size of the speed test (32 -> 256 px)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="decode timing: wall time (default) or process CPU time (use with --threads 1 "
                         "on a busy machine: descheduling does not count)")
    ap.add_argument("--methods", default="winograd4", help=f"comma list of {CONV_METHODS}")
    ap.add_argument("--rss-size", type=int, default=64, help="latent size of the memory test (64 -> 512 px)")
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in CONV_METHODS:
            ap.error(f"unknown method {m!r}; choose from {CONV_METHODS}")

    report = {"threads": args.threads, "size": args.size, "image_px": 8 * args.size, "repeat": args.repeat}
    if not args.no_rss:  # first, while this process is still small (see bench_rss)
        report["rss"] = bench_rss(args.threads, args.rss_size, [args.tile, None])
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED baseline: diffusers AutoencoderKL ({e.name or e} is not installed; pip install '.[bench]'): "
              "the decode comparison and the per-layer torch timings need it", file=sys.stderr)
        return 1
    model = build_diffusers_model()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    report["decode"] = bench_decode(model, args.threads, args.size, args.repeat, methods, clock)
    report["clock"] = args.clock
    if not args.no_layers:
        report["layers"] = bench_layers(args.threads, args.size, args.repeat)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"SD-VAE decode, latent {args.size}x{args.size} -> {8 * args.size}px, threads {args.threads}, "
          f"median of {args.repeat} after one warm-up decode each [best-worst], {args.clock} clock")
    for name, r in report["decode"].items():
        print(f"  {name:24s} {r['median_s']:8.3f} s  [{r['best_s']:.3f}-{r['worst_s']:.3f}]  "
              f"x{r['speedup_vs_diffusers']:.2f} vs diffusers  max|err| {r['max_abs_err']:.2e}")
    if "layers" in report:
        print("one 3x3 convolution, best seconds (GFLOP counted as direct convolution)")
        for row in report["layers"]:
            cols = "  ".join(f"{k} {row[k]:.4f}" for k in ["torch_direct", *CONV_METHODS])
            print(f"  {row['shape']:18s} {row['gflop']:6.2f} GFLOP  {cols}")
    if "rss" in report:
        print(f"peak RSS added by one {8 * args.rss_size}px decode (float16 weights, memory-mapped)")
        for name, r in report["rss"].items():
            print(f"  {name:10s} +{r['added_mb']:7.1f} MB ru_maxrss, +{r['vmhwm_added_mb']:7.1f} MB VmHWM  "
                  f"(peak {r['after_mb']:.0f} MB, {r['seconds']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
