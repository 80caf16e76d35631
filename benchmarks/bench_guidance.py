"""Time saved by a guidance interval on the TerDiT-600M config.

    python benchmarks/bench_guidance.py [--threads 1] [--steps 20] [--sampler ddim]
                                        [--intervals 100-500,0-600,200-800] [--modes int8] [--json]

Samples one image (class 207) with plain guided sampling and with each guidance interval, on the
same loaded model, and prints wall and process CPU time and the ratio to plain sampling. Outside
the interval a step runs the conditional half alone (batch 1 instead of 2), so the expected ratio
is (steps + guided steps) / (2 steps), printed beside it. The model is the random release-layout
checkpoint of bench_step.py (cached; needs the test extras for torch to write it once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--intervals", default="100-500,0-600,200-800")
    ap.add_argument("--modes", default="int8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bench_step import prepare

    import terdit_edge
    from terdit_edge.diffusion import respaced_timesteps

    _, tdit = prepare("600m")
    intervals = [None] + [tuple(int(v) for v in spec.split("-")) for spec in args.intervals.split(",")]
    ts = respaced_timesteps(args.steps)
    rows = []
    for mode in args.modes.split(","):
        model = terdit_edge.load_model(tdit, activations=mode, threads=args.threads)
        terdit_edge.sample(model, [207], steps=2, sampler=args.sampler)  # warm-up
        base = None
        for iv in intervals:
            t0, c0 = time.perf_counter(), time.process_time()
            terdit_edge.sample(model, [207], steps=args.steps, sampler=args.sampler, seed=0, guidance_interval=iv)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            guided = len(ts) if iv is None else sum(iv[0] <= t <= iv[1] for t in ts)
            row = {"mode": mode, "interval": "all" if iv is None else f"{iv[0]}-{iv[1]}", "guided_steps": guided,
                   "steps": len(ts), "wall": wall, "cpu": cpu, "expected_ratio": (len(ts) + guided) / (2 * len(ts))}
            if base is None:
                base = row
            row["wall_ratio"] = wall / base["wall"]
            row["cpu_ratio"] = cpu / base["cpu"]
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"600m config, one image, {args.sampler} {args.steps} steps, cfg 4, {args.threads} thread(s)")
    print(f"{'mode':5s} {'interval':>9s} {'guided':>7s} {'wall s':>7s} {'CPU s':>7s} {'wall ratio':>10s} "
          f"{'CPU ratio':>9s} {'expected':>8s}")
    for r in rows:
        print(f"{r['mode']:5s} {r['interval']:>9s} {r['guided_steps']:4d}/{r['steps']:<2d} {r['wall']:7.1f} "
              f"{r['cpu']:7.1f} {r['wall_ratio']:10.2f} {r['cpu_ratio']:9.2f} {r['expected_ratio']:8.2f}")


if __name__ == "__main__":
    main()
