"""The quality judge on the speed settings: every metric with its standard error, and fidelity to the exact sample.

    python benchmarks/quality_speed.py [--model FILE] [--settings exact20,balanced,fast,...] [--n 600]
                                       [--seed 0] [--json out.json]

Each setting (the names of bench_speed.py's SETTINGS) samples ``--n`` images (labels i mod 10, seeds
seed * 10**6 + i, cfg 4) through the public pipeline; terdit_edge.judge scores them against the
real digits, and PSNR / SSIM against the images of ``exact20`` (DPM-Solver++ 20 steps, every step
guided: the baseline the speed goals are stated against) with the same seeds and labels. Network
evaluations per image are counted by the sampler. ``diff`` columns: the setting minus exact20 in
units of their combined standard error (|z| < 2: equal within the noise).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main():
    from bench_speed import SETTINGS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--settings", default="exact20,interval20,sched10,sched8,sched5,cache20-fixed2,"
                                          "cache20-adaptive0.2,reuse20-fixed2,balanced,fast")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from terdit_edge import Pipeline
    from terdit_edge.diffusion import sample
    from terdit_edge.judge import DigitsJudge, difference
    from terdit_edge.scale.job import to_rgb_uint8

    pipes = {}

    def pipeline(act="fp32", att="fp32"):
        if (act, att) not in pipes:
            pipes[act, att] = Pipeline.load(args.model, threads=args.threads, activations=act, attention=att)
        return pipes[act, att]

    def parse(name):
        base, *mods = name.split("+")
        modes = {"att8": ("attention", "int8"), "act8": ("activations", "int8"), "act10": ("activations", "int10")}
        bad = [m for m in mods if m not in modes]
        if base not in SETTINGS or bad:
            ap.error(f"setting {name!r}: unknown {base if base not in SETTINGS else bad}; settings: {list(SETTINGS)}, "
                     f"modes: {['+' + m for m in modes]}")
        kw = {"activations": "fp32", "attention": "fp32"}
        kw.update(modes[m] for m in mods)
        return SETTINGS[base], kw["activations"], kw["attention"]

    settings = {name: parse(name) for name in args.settings.split(",")}  # checked before any sampling
    judge = DigitsJudge(threads=args.threads)
    labels = np.arange(args.n) % 10
    seeds = [args.seed * 10**6 + i for i in range(args.n)]

    def images(kw, act="fp32", att="fp32"):
        st = {}
        p = pipeline(act, att)
        x = sample(p.model, labels.tolist(), seeds=seeds, cfg_scale=4.0, stats=st, **kw)
        return to_rgb_uint8(p.decode(x)), st["network_evals"] / args.n

    exact, exact_evals = images(SETTINGS["exact20"])
    ref = judge.evaluate(exact, labels=labels, seed=args.seed)
    rows = []
    print(f"model {args.model or 'bundled digits.tdit'}, n {args.n}, seed {args.seed}")
    print("| setting | evals/img | x fewer | FID | KID x1000 | precision | recall | accuracy | PSNR dB | SSIM | "
          "z FID | z KID |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (kw, act, att) in settings.items():
        u8, evals = (exact, exact_evals) if name == "exact20" else images(kw, act, att)
        r = judge.evaluate(u8, labels=labels, exact_u8=exact, seed=args.seed)
        z = {}
        for m in ("fid", "kid"):
            d, se = difference(r, ref, m)
            z[m] = d / se if se > 0 else 0.0
        rows.append({"setting": name, "evals": evals, **r, "z": z})

        def f(m, s=1.0, dg=2):
            return f"{r[m]['value'] * s:.{dg}f} ± {r[m]['se'] * s:.{dg}f}"
        print(f"| {name} | {evals:.1f} | {exact_evals / evals:.2f} | {f('fid')} | {f('kid', 1000)} | "
              f"{f('precision', 1, 3)} | {f('recall', 1, 3)} | {f('accuracy', 1, 3)} | {f('psnr')} | "
              f"{f('ssim', 1, 3)} | {z['fid']:+.1f} | {z['kid']:+.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model or "bundled", "n": args.n, "seed": args.seed, "rows": rows}, fh, indent=1,
                      default=float)


if __name__ == "__main__":
    main()
