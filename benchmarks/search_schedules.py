"""Search few-step timestep schedules offline (the data of ``--schedule NAME``, terdit_edge/data/schedules.json).

    python benchmarks/search_schedules.py [--model FILE] [--steps 5,8,10,15] [--sampler dpm++2m]
                                          [--n 40] [--cfg 4] [--ref-steps 200] [--ref-sampler S] [--write]
    python benchmarks/search_schedules.py --sampler unipc --evaluate uniform5,dpm++2m-5,unipc-5 [--ref-sampler S]

For each step count N the schedule is N distinct timesteps in 0..999 with the largest fixed at 999
(sampling starts from pure noise). The objective is the mean squared error between the N-step sample
and a reference sample of the same noise and class: the same deterministic solver at ``--ref-steps``
uniform steps (an accurate solution of the probability-flow ODE, which every exact sampler
approximates), over ``--n`` images (classes i mod 10, seeds 10**6 + i, guided at ``--cfg``). Search:
coordinate descent from the uniform respacing (move one timestep by +-delta, keep a move that lowers
the error, delta 64 -> 1), the spirit of DS-Solver (arXiv 2505.21114) / Align Your Steps (2404.14507)
without a learned model. The error on a held-out set of seeds (2 * 10**6 + i) is printed beside the
training error, against the uniform schedule. ``--write`` adds or replaces the entries
``SAMPLER-N`` of terdit_edge/data/schedules.json. ``--ref-sampler`` solves the reference with another
solver (default: the searched one). ``--evaluate`` searches nothing: it prints the training and
held-out error of ``--sampler`` on shipped schedules (names of schedules.json, or ``uniformN``).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "terdit_edge", "data", "schedules.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=".tdit (default: the bundled digits model)")
    ap.add_argument("--steps", default="5,8,10,15")
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--ref-steps", type=int, default=200)
    ap.add_argument("--ref-sampler", default=None, help="solver of the reference (default: --sampler)")
    ap.add_argument("--evaluate", default=None, metavar="NAME[,NAME]",
                    help="no search: the error of --sampler on these schedules (schedules.json names or uniformN)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from terdit_edge import Pipeline
    from terdit_edge.diffusion import respaced_timesteps, sample, schedule_timesteps

    pipe = Pipeline.load(args.model, threads=args.threads)
    labels = [i % 10 for i in range(args.n)]
    sets = {"train": [10**6 + i for i in range(args.n)], "held-out": [2 * 10**6 + i for i in range(args.n)]}

    def run(ts, seeds, sampler=args.sampler):
        return sample(pipe.model, labels, steps=list(ts), sampler=sampler, cfg_scale=args.cfg, seeds=seeds)

    ref_sampler = args.ref_sampler or args.sampler
    refs = {k: run(respaced_timesteps(args.ref_steps), s, ref_sampler) for k, s in sets.items()}

    def err(ts, which="train"):
        return float(np.mean((run(ts, sets[which]) - refs[which]) ** 2))

    if args.evaluate:
        for name in args.evaluate.split(","):
            ts = respaced_timesteps(int(name[len("uniform"):])) if name.startswith("uniform") else \
                schedule_timesteps(name)
            print(f"{args.sampler} on {name} {ts}: MSE to {ref_sampler} {args.ref_steps} steps, train "
                  f"{err(ts):.5f}, held-out {err(ts, 'held-out'):.5f}", flush=True)
        return

    found = {}
    for n in [int(s) for s in args.steps.split(",")]:
        t0 = time.perf_counter()
        ts = respaced_timesteps(n)
        uniform = {k: err(ts, k) for k in sets}
        best = uniform["train"]
        evals = 0
        for delta in (64, 32, 16, 8, 4, 2, 1):
            improved = True
            while improved:
                improved = False
                for i in range(n - 1):  # the last one (999) stays
                    for move in (-delta, delta):
                        cand = list(ts)
                        cand[i] += move
                        lo = cand[i - 1] if i > 0 else -1
                        if not lo < cand[i] < cand[i + 1]:
                            continue
                        e = err(cand)
                        evals += 1
                        if e < best:
                            best, ts, improved = e, cand, True
        held = err(ts, "held-out")
        print(f"{args.sampler} {n} steps: train MSE {uniform['train']:.5f} -> {best:.5f}, held-out "
              f"{uniform['held-out']:.5f} -> {held:.5f} ({evals} evaluations, {time.perf_counter() - t0:.0f} s): "
              f"{ts}", flush=True)
        found[f"{args.sampler}-{n}"] = {
            "sampler": args.sampler, "timesteps": ts,
            "searched_on": f"{os.path.basename(args.model or 'digits.tdit')}, cfg {args.cfg:g}, {args.n} images, "
                           f"MSE to {ref_sampler} {args.ref_steps} steps",
            "mse_uniform": round(uniform["held-out"], 6), "mse": round(held, 6)}
    if args.write:
        with open(DATA) as f:
            table = json.load(f)
        table.update(found)
        with open(DATA, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        print(f"wrote {len(found)} schedule(s) to {os.path.normpath(DATA)}")


if __name__ == "__main__":
    main()
