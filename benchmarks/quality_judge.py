"""The digits quality judge's table: sampler x steps x guidance, every metric with its standard error.

    python benchmarks/quality_judge.py                                  # the bundled digits model
    python benchmarks/quality_judge.py --model tests/data/digits_deep.tdit
    python benchmarks/quality_judge.py --runs dpm++2m:20,dpm++2m:5 --cfg 4 --n 600 --seed 0 --json out.json

Each run samples ``--n`` images with labels i mod 10 and seeds seed * 1,000,000 + i through the public
pipeline, scores them with terdit_edge.judge against the 1,797 real digits, and prints one markdown row
per run (value +- one standard error). ``--exact RUN`` also samples RUN with the same seeds and labels
at each guidance scale and reports every run's PSNR/SSIM against it (fidelity to the exact sample).
A run is ``sampler:steps`` or ``sampler:steps@cfg``.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def sample_u8(pipe, n: int, sampler: str, steps: int, cfg: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from terdit_edge.scale.job import to_rgb_uint8

    labels = np.arange(n) % 10
    seeds = [seed * 1_000_000 + i for i in range(n)]
    images = pipe(labels.tolist(), steps=steps, sampler=sampler, cfg_scale=cfg, seeds=seeds, output="np",
                  progress=False)
    return to_rgb_uint8(images), labels


def fmt(m, scale=1.0, digits=2):
    return f"{m['value'] * scale:.{digits}f} ± {m['se'] * scale:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=".tdit (default: the bundled digits model)")
    ap.add_argument("--runs", default="ddpm:250,dpm++2m:20,dpm++2m:10,dpm++2m:5,dpm++2m:3,ddim:50,ddim:20")
    ap.add_argument("--cfg", default="4", help="comma-separated guidance scales (each run without @cfg gets each)")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact", default=None, help="run whose images are the exact reference for PSNR/SSIM, "
                                                  "e.g. dpm++2m:20 (compared only with runs of the same cfg)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    from terdit_edge import Pipeline
    from terdit_edge.judge import DigitsJudge, real_digits_uint8

    pipe = Pipeline.load(args.model, threads=args.threads)
    judge = DigitsJudge(threads=args.threads)
    runs = []
    for r in args.runs.split(","):
        spec, _, cfg = r.partition("@")
        sampler, steps = spec.split(":")
        for c in ([float(cfg)] if cfg else [float(x) for x in args.cfg.split(",")]):
            runs.append((sampler, int(steps), c))
    rows, exact = [], {}

    real, real_labels = real_digits_uint8()
    idx = np.random.default_rng(args.seed).choice(len(real), size=min(args.n, len(real)), replace=False)
    res = judge.evaluate(real[idx], labels=real_labels[idx])
    rows.append({"run": f"real digits ({len(idx)} of the reference)", **res})
    print("| run | cfg | FID | KID x 1000 | precision | recall | accuracy | PSNR (dB) | SSIM | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def row(r, name, cfg, secs):
        fid_s = fmt(r["fid"])
        line = (f"| {name} | {cfg} | {fid_s} | {fmt(r['kid'], 1000)} | {fmt(r['precision'], 1, 3)} | "
                f"{fmt(r['recall'], 1, 3)} | {fmt(r['accuracy'], 1, 3)} | "
                f"{fmt(r['psnr']) if 'psnr' in r else ''} | {fmt(r['ssim'], 1, 3) if 'ssim' in r else ''} | "
                f"{secs:.0f} s |")
        print(line, flush=True)

    row(res, rows[0]["run"], "", 0)
    exact_secs = {}
    if args.exact:
        sampler, steps = args.exact.split(":")
        for c in sorted({c for _, _, c in runs}):
            t0 = time.perf_counter()
            exact[c] = sample_u8(pipe, args.n, sampler, int(steps), c, args.seed)[0]
            exact_secs[c] = time.perf_counter() - t0
    for sampler, steps, cfg in runs:
        t0 = time.perf_counter()
        if args.exact == f"{sampler}:{steps}":
            images, labels = exact[cfg], np.arange(args.n) % 10
            secs = exact_secs[cfg]
        else:
            images, labels = sample_u8(pipe, args.n, sampler, steps, cfg, args.seed)
            secs = time.perf_counter() - t0
        r = judge.evaluate(images, labels=labels, exact_u8=exact.get(cfg), seed=args.seed)
        rows.append({"run": f"{sampler}:{steps}", "cfg": cfg, "seconds": secs, **r})
        row(r, f"{sampler} {steps}", cfg, secs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model or "bundled", "n": args.n, "seed": args.seed, "exact": args.exact,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
