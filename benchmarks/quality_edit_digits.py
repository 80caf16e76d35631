"""Editing on the bundled digits model: is a real digit edited toward another class seen as that class?

    python benchmarks/quality_edit_digits.py [--source 3] [--target 8] [--digits 5] [--seeds 20]
                                             [--strengths 0.3,0.5,0.7,0.9] [--runs dpm++2m:20,ddim:50,ddpm:100]

Real UCI digits of class --source (scikit-learn, brought to 16 x 16 as in quality_digits.py) are
edited toward --target with Pipeline.edit at each strength, sampler and step count, for --seeds
seeds each; the judge is quality_digits.py's classifier. Printed per run and strength: the fraction
classified as the target, as the source, and the mean absolute pixel change from the input
(0..1), which shows how much of the input an edit keeps. Needs scikit-learn.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=int, default=3)
    ap.add_argument("--target", type=int, default=8)
    ap.add_argument("--digits", type=int, default=5, help="how many real source digits")
    ap.add_argument("--seeds", type=int, default=20, help="seeds per digit")
    ap.add_argument("--strengths", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--runs", default="dpm++2m:20,ddim:50,ddpm:100")
    args = ap.parse_args(argv)

    spec = importlib.util.spec_from_file_location("quality_digits", os.path.join(ROOT, "benchmarks", "quality_digits.py"))
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    from terdit_edge import Pipeline
    from terdit_edge.images import to_uint8

    images, labels = q.real_digits(16)
    clf, heldout = q.fit_classifier(q.to_features(images), labels, seed=0)
    sources = [to_uint8((im + 1) / 2) for im in images[labels == args.source][:args.digits]]
    pipe = Pipeline.load()
    print(f"judge held-out accuracy {heldout:.3f}; {len(sources)} real {args.source}s x {args.seeds} seeds "
          f"edited toward {args.target}")
    print(f"{'run':14s} {'strength':>8s} {'-> target':>9s} {'stays':>6s} {'change':>7s} {'s':>6s}")
    for run in args.runs.split(","):
        sampler, steps = run.split(":")
        for strength in (float(s) for s in args.strengths.split(",")):
            t = time.perf_counter()
            hit = stay = change = 0.0
            for src in sources:
                out = pipe.edit(src, [args.target] * args.seeds, strength=strength, steps=int(steps),
                                sampler=sampler, seeds=list(range(args.seeds)), output="np")[..., 0]
                pred = clf.predict(q.to_features(out * 2 - 1))
                hit += (pred == args.target).mean()
                stay += (pred == args.source).mean()
                change += np.abs(out - src / 255.0).mean()
            n = len(sources)
            print(f"{run:14s} {strength:8.2f} {hit / n:9.1%} {stay / n:6.1%} {change / n:7.3f} "
                  f"{time.perf_counter() - t:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
