"""Time to one image: measured step and decode times, extrapolated to whole samplers.

    python benchmarks/time_to_image.py [--configs 600m@256,4.2B@256,4.2B@512] [--modes int8]
                                       [--threads N] [--interval 100-500] [--repeat 1] [--json]

For each model config (random release-layout weights, converted and cached as in bench_step.py) and
activation mode, one process measures, after a warm-up step:
- a guided step (batch 2: the image and the null label, cfg 4, as bench_step.py),
- a conditional step (batch 1: what a step outside a guidance interval runs),
- the VAE decode of one latent of the config's size (the random full-size SD-VAE of
  bench_generate.py, fp16 weights, the pipeline's default tiling).
The table then EXTRAPOLATES one image's time for DDPM 250, DDIM 50 and DPM-Solver++ 20 steps, with
every step guided and with guidance only at the timesteps inside --interval (Kynkäänniemi et al.
2024; the steps outside it cost one conditional step): steps x step time + decode. The sampler's own
per-step arithmetic (a few array operations on one latent) is not included; it is well under 1% of a
step. Times are wall clock of the configured threads: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SAMPLERS = [("ddpm", 250), ("ddim", 50), ("dpm++", 20)]


def parse_config(spec: str) -> tuple[str, int]:
    name, _, size = spec.partition("@")
    if name not in ("600m", "4.2B", "small") or not size.isdigit() or int(size) % 16:
        raise argparse.ArgumentTypeError(f"config {spec!r}: expected NAME@SIZE with NAME 600m, 4.2B or small and "
                                         "SIZE a multiple of 16 (e.g. 4.2B@512)")
    return name, int(size)


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, size: int, mode: str, threads: int, repeat: int, vae) -> dict:
    import numpy as np
    from bench_step import prepare

    import terdit_edge
    from terdit_edge.diffusion import guided_model_output

    default_size = 64 if name == "small" else 256
    _, tdit = prepare(name, None if size == default_size else size)
    model = terdit_edge.load_model(tdit, backend="cython", activations=mode, threads=threads)
    rng = np.random.default_rng(0)
    lat = size // 8
    x = rng.standard_normal((1, 4, lat, lat), dtype=np.float32)
    y = np.array([207])
    guided_model_output(model, x, 500, y, 4.0)  # warm-up
    guided = _median_time(lambda: guided_model_output(model, x, 500, y, 4.0), repeat)
    cond = _median_time(lambda: guided_model_output(model, x, 500, y, 1.0), repeat)
    latent = rng.standard_normal((1, 4, lat, lat), dtype=np.float32)
    vae.decode(latent)  # warm-up (JIT, buffers)
    decode = _median_time(lambda: vae.decode(latent), max(1, min(repeat, 2)))
    return {"config": name, "image_size": size, "mode": mode, "threads": threads, "guided_step_s": guided,
            "cond_step_s": cond, "decode_s": decode}


def extrapolate(row: dict, interval: tuple[int, int]) -> list[dict]:
    from terdit_edge.diffusion import Schedule

    out = []
    for sampler, steps in SAMPLERS:
        ts = [int(t) for t in Schedule.create(steps).timesteps]
        n_guided = sum(interval[0] <= t <= interval[1] for t in ts)
        plain = len(ts) * row["guided_step_s"] + row["decode_s"]
        inside = n_guided * row["guided_step_s"] + (len(ts) - n_guided) * row["cond_step_s"] + row["decode_s"]
        out.append({"sampler": sampler, "steps": len(ts), "guided_steps_in_interval": n_guided,
                    "seconds_all_guided": plain, "seconds_with_interval": inside})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="600m@256,4.2B@256,4.2B@512")
    ap.add_argument("--modes", default="int8")
    ap.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    ap.add_argument("--interval", default="100-500", help="guidance interval LO-HI in timesteps 0..999")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each step (median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        configs = [parse_config(s) for s in args.configs.split(",")]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    try:
        lo, hi = (int(v) for v in args.interval.split("-"))
    except ValueError:
        ap.error(f"--interval {args.interval!r} is not LO-HI")
    if not 0 <= lo <= hi <= 999:
        ap.error("--interval needs 0 <= LO <= HI <= 999")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    from bench_generate import pipeline_file

    from terdit_edge.kernels import default_threads
    from terdit_edge.pipeline import load_vae

    threads = args.threads or default_threads()
    vae = load_vae(pipeline_file(256), threads=threads)  # the random SD-VAE; it decodes latents of any size
    rows = []
    for name, size in configs:
        for mode in args.modes.split(","):
            r = measure(name, size, mode, threads, args.repeat, vae)
            r["samplers"] = extrapolate(r, (lo, hi))
            rows.append(r)
            if not args.json:
                print(f"{name} at {size} px, {mode}, {threads} thread(s): guided step {r['guided_step_s']:.2f} s, "
                      f"conditional step {r['cond_step_s']:.2f} s, VAE decode {r['decode_s']:.2f} s", flush=True)
    if args.json:
        print(json.dumps({"interval": [lo, hi], "rows": rows}, indent=2))
        return
    print(f"\ntime to one image (EXTRAPOLATED: steps x measured step time + measured decode), guidance interval "
          f"{lo}-{hi}")
    print(f"{'model':>14s} {'mode':>5s} {'sampler':>12s} {'all guided':>11s} {'in interval':>11s}")
    for r in rows:
        for s in r["samplers"]:
            model = f"{r['config']} @{r['image_size']}"
            sampler = f"{s['sampler']} {s['steps']}"
            print(f"{model:>14s} {r['mode']:>5s} {sampler:>12s} "
                  f"{_hms(s['seconds_all_guided']):>11s} {_hms(s['seconds_with_interval']):>11s} "
                  f"({s['guided_steps_in_interval']}/{s['steps']} guided)")


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


if __name__ == "__main__":
    main()
