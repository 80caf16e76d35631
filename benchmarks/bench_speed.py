"""Work and time per image of the speed settings (step cache, guidance reuse, schedules, presets) against
the exact sampler, on the release configs.

    python benchmarks/bench_speed.py [--configs 600m@256,4.2B@512] [--mode int8] [--threads 2]
                                     [--settings exact20,interval20,balanced,fast,...] [--e2e 600m@256]

For every setting, the network evaluations of one image are counted by running the sampler on the
bundled digits model with that setting (for fixed policies the count does not depend on the model;
for adaptive ones it is the digits model's, said in the row): ``per_step`` gives each step's full
rows (the image's conditional and unconditional evaluations) and forecast rows. Then, per config,
the times of a full step of 1 and 2 rows and of a forecast row (embedding and final layer only)
are MEASURED (median of --repeat after a warm-up) on the random release-layout weights of
bench_step.py, and one image's time is EXTRAPOLATED as the sum over its steps (the same method as
time_to_image.py; the VAE decode is added with --decode). ``--assume`` takes the step times instead
(e.g. a quiet machine's, from time_to_image.py). TFLOP per image counts
the ternary and attention multiply-adds (2 per MAC) of the full rows. ``--e2e CONFIG`` also runs
whole samplings of one image, exact and each setting alternately, and reports measured wall and
CPU seconds.
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

INTERVAL = (100, 500)
SETTINGS = {
    "exact20": dict(sampler="dpm++2m", steps=20),
    "ddpm250": dict(sampler="ddpm", steps=250),
    "dpm10": dict(sampler="dpm++2m", steps=10),
    "dpm15": dict(sampler="dpm++2m", steps=15),
    "interval20": dict(sampler="dpm++2m", steps=20, guidance_interval=INTERVAL),
    "sched10": dict(sampler="dpm++2m", schedule="dpm++2m-10"),
    "sched8": dict(sampler="dpm++2m", schedule="dpm++2m-8"),
    "sched15": dict(sampler="dpm++2m", schedule="dpm++2m-15"),
    "sched7": dict(sampler="dpm++2m", schedule="dpm++2m-7"),
    "sched6": dict(sampler="dpm++2m", schedule="dpm++2m-6"),
    "sched5": dict(sampler="dpm++2m", schedule="dpm++2m-5"),
    "cache20-fixed2": dict(sampler="dpm++2m", steps=20, cache="fixed:2"),
    "cache20-fixed2-reuse": dict(sampler="dpm++2m", steps=20, cache="fixed:2,reuse"),
    "cache20-adaptive0.05": dict(sampler="dpm++2m", steps=20, cache="adaptive:0.05"),
    "cache20-adaptive0.1-reuse": dict(sampler="dpm++2m", steps=20, cache="adaptive:0.1,reuse"),
    "cache20-fixed2-order2": dict(sampler="dpm++2m", steps=20, cache="fixed:2,order=2"),
    "cache20-adaptive0.1": dict(sampler="dpm++2m", steps=20, cache="adaptive:0.1"),
    "cache20-adaptive0.2": dict(sampler="dpm++2m", steps=20, cache="adaptive:0.2"),
    "reuse20-fixed2": dict(sampler="dpm++2m", steps=20, guidance_reuse="fixed:2"),
    "reuse20-fixed3": dict(sampler="dpm++2m", steps=20, guidance_reuse="fixed:3"),
    "s10-r3": dict(sampler="dpm++2m", schedule="dpm++2m-10", guidance_reuse="fixed:3"),
    "s8-r2": dict(sampler="dpm++2m", schedule="dpm++2m-8", guidance_reuse="fixed:2"),
    "s8-r3": dict(sampler="dpm++2m", schedule="dpm++2m-8", guidance_reuse="fixed:3"),
    "s10-a0.2-r3": dict(sampler="dpm++2m", schedule="dpm++2m-10", cache="adaptive:0.2", guidance_reuse="fixed:3"),
    "s8-a0.2-r3": dict(sampler="dpm++2m", schedule="dpm++2m-8", cache="adaptive:0.2", guidance_reuse="fixed:3"),
    "s8-r3f1": dict(sampler="dpm++2m", schedule="dpm++2m-8", guidance_reuse="fixed:3,first=1,last=0"),
    "s8-a0.2-r3f1": dict(sampler="dpm++2m", schedule="dpm++2m-8", cache="adaptive:0.2",
                         guidance_reuse="fixed:3,first=1,last=0"),
    "s8-a0.2-r5": dict(sampler="dpm++2m", schedule="dpm++2m-8", cache="adaptive:0.2", guidance_reuse="fixed:5"),
    "s8-a0.2-r3first1": dict(sampler="dpm++2m", schedule="dpm++2m-8", cache="adaptive:0.2",
                             guidance_reuse="fixed:3,first=1"),
    "s8-a0.25-r3": dict(sampler="dpm++2m", schedule="dpm++2m-8", cache="adaptive:0.25", guidance_reuse="fixed:3"),
    "s7-a0.2-r3": dict(sampler="dpm++2m", schedule="dpm++2m-7", cache="adaptive:0.2", guidance_reuse="fixed:3"),
    "s6-r3": dict(sampler="dpm++2m", schedule="dpm++2m-6", guidance_reuse="fixed:3"),
    "s6-a0.2-r3": dict(sampler="dpm++2m", schedule="dpm++2m-6", cache="adaptive:0.2", guidance_reuse="fixed:3"),
    "s6-a0.2-r4f1": dict(sampler="dpm++2m", schedule="dpm++2m-6", cache="adaptive:0.2",
                         guidance_reuse="fixed:4,first=1,last=0"),
    "s5-r3": dict(sampler="dpm++2m", schedule="dpm++2m-5", guidance_reuse="fixed:3"),
    "s5-r3-f1": dict(sampler="dpm++2m", schedule="dpm++2m-5", guidance_reuse="fixed:3,first=1,last=0"),
    # issue 24, UniPC and 4 steps (8 evaluations guided)
    "sched4": dict(sampler="dpm++2m", schedule="dpm++2m-4"),
    "unipc4": dict(sampler="unipc", schedule="unipc-4"),
    "unipc5": dict(sampler="unipc", schedule="unipc-5"),
    "unipc8": dict(sampler="unipc", schedule="unipc-8"),
    "unipc10": dict(sampler="unipc", schedule="unipc-10"),
    "unipc15": dict(sampler="unipc", schedule="unipc-15"),
    "unipc20": dict(sampler="unipc", steps=20),
    "unipc-on-sched5": dict(sampler="unipc", schedule="dpm++2m-5"),
    "unipc-on-sched4": dict(sampler="unipc", schedule="dpm++2m-4"),
    "balanced": dict(speed="balanced"),
    "fast": dict(speed="fast"),
}


def row_flops(cfg) -> float:
    """Multiply-adds x 2 of one image row's full forward (ternary layers, attention, adaLN)."""
    t, d, kv, f = cfg.n_tokens, cfg.dim, cfg.kv_dim, cfg.ffn_dim
    per_block = 2 * t * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * t * t * d + 2 * cfg.cond_dim * 6 * d
    return cfg.n_layers * per_block


def count(settings: dict) -> dict:
    from terdit_edge.diffusion import sample
    from terdit_edge.pipeline import Pipeline

    pipe = Pipeline.load(threads=1)
    st = {}
    sample(pipe.model, [3], seeds=[0], stats=st, **settings)
    return st


def median_time(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(name, size, mode, threads, repeat):
    import numpy as np
    from bench_step import prepare

    import terdit_edge

    _, tdit = prepare(name, None if size == 256 else size)
    model = terdit_edge.load_model(tdit, backend="cython", activations=mode, threads=threads)
    lat = size // 8
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 4, lat, lat), dtype=np.float32)
    x2 = np.concatenate([x1, x1])
    t1, t2 = np.array([500]), np.array([500, 500])
    y1, y2 = np.array([207]), np.array([207, 1000])
    model(x2, t2, y2)  # warm-up
    full2 = median_time(lambda: model(x2, t2, y2), repeat)
    full1 = median_time(lambda: model(x1, t1, y1), repeat)

    def cheap():
        h, c = model.embed(x1, t1, y1)
        model.head(h, c)
    cheap()
    fc = median_time(cheap, max(repeat, 3))
    return model, {"config": name, "image_size": size, "mode": mode, "threads": threads, "full_step_2rows_s": full2,
                   "full_step_1row_s": full1, "forecast_row_s": fc, "row_tflop": row_flops(model.config) / 1e12}


def extrapolate(m: dict, st: dict) -> dict:
    secs = 0.0
    for full, fc in st["per_step"]:
        secs += {0: 0.0, 1: m["full_step_1row_s"], 2: m["full_step_2rows_s"]}[full] + fc * m["forecast_row_s"]
    return {"network_evals": st["network_evals"], "forecast_evals": st["forecast_evals"],
            "steps": len(st["per_step"]), "tflop": st["network_evals"] * m["row_tflop"], "seconds": secs}


def alternated(runs: dict, repeat: int) -> dict:
    """Wall and process CPU seconds of each callable, ``repeat`` rounds running every one once in turn
    (so that machine load falls on each alike): medians, and every (wall, cpu) pair."""
    out = {n: [] for n in runs}
    for _ in range(repeat):
        for n, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[n].append((time.perf_counter() - t0, time.process_time() - c0))
    return {n: {"wall_s": statistics.median(v[0] for v in times), "cpu_s": statistics.median(v[1] for v in times),
                "runs": times} for n, times in out.items()}


def e2e(model, settings: dict, repeat: int):
    """Measured sampling of one image per setting (no decode)."""
    from terdit_edge.diffusion import sample

    return alternated({n: (lambda st=st: sample(model, [207], seeds=[0], **st)) for n, st in settings.items()},
                      repeat)


def images(spec: str, mode: str, threads: int, settings: dict, repeat: int) -> dict:
    """Measured time to one image: the pipeline file of bench_generate.py (random release-layout DiT and
    a random full-size SD-VAE, fp16, converted), loaded once; each repeat runs every setting once
    (alternated), class 207, seed 0, sampling and VAE decode (the pipeline's default tiling) to a float
    array. Load time is not included; one warm-up image (1 step) first."""
    from bench_generate import pipeline_file

    from terdit_edge.pipeline import Pipeline

    name, _, size = spec.partition("@")
    pipe = Pipeline.load(pipeline_file(int(size), name), backend="cython", activations=mode, threads=threads)
    pipe([207], seeds=[0], steps=1, sampler="ddim", output="np", progress=False)  # warm-up (Numba, page-in)
    return alternated({n: (lambda st=st: pipe([207], seeds=[0], output="np", progress=False, **st))
                       for n, st in settings.items()}, repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="600m@256,4.2B@512")
    ap.add_argument("--mode", default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--e2e", default="", help="configs (NAME@SIZE) also sampled end to end")
    ap.add_argument("--e2e-settings", default="exact20,balanced,fast")
    ap.add_argument("--images", default="", metavar="CFG[,CFG]",
                    help="only measure time to image (sampling + VAE decode, Pipeline, wall and CPU seconds) of "
                         "--e2e-settings on these configs, e.g. 600m@256,4.2B@512; nothing extrapolated")
    ap.add_argument("--assume", default="", metavar="CFG=G,C,F[;CFG=...]",
                    help="use these step times (s) instead of measuring: guided 2-row step G, conditional 1-row "
                         "step C, forecast row F, e.g. from a quiet machine's time_to_image.py run")
    ap.add_argument("--decode", default="", metavar="CFG=S[;...]", help="VAE decode seconds added to every row")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assume = {k: [float(v) for v in vals.split(",")] for k, _, vals in
              (a.partition("=") for a in args.assume.split(";") if a)}
    decode = {k: float(v) for k, _, v in (a.partition("=") for a in args.decode.split(";") if a)}
    if args.images:
        chosen = {n: SETTINGS[n] for n in args.e2e_settings.split(",")}
        report = {}
        for spec in args.images.split(","):
            res = report[spec] = images(spec, args.mode, args.threads, chosen, args.repeat)
            ref = res.get("exact20")
            print(f"{spec} {args.mode}, {args.threads} threads, time to image (sampling + decode), median of "
                  f"{args.repeat}:", flush=True)
            for n, r in res.items():
                sp = f", {ref['wall_s'] / r['wall_s']:.2f}x wall / {ref['cpu_s'] / r['cpu_s']:.2f}x CPU vs exact20" \
                    if ref else ""
                print(f"  {n:>12s} wall {r['wall_s']:6.2f} s, cpu {r['cpu_s']:6.2f} s{sp}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return
    names = args.settings.split(",")
    counts = {n: count(SETTINGS[n]) for n in names}
    base = counts["exact20"]["network_evals"] if "exact20" in counts else None
    report = {"counts": {n: {k: v for k, v in c.items() if k != "per_step"} for n, c in counts.items()}, "configs": []}
    for spec in args.configs.split(","):
        name, _, size = spec.partition("@")
        if spec in assume:
            from bench_step import prepare

            import terdit_edge

            g, c, f = assume[spec]
            model = terdit_edge.load_model(prepare(name, None if size == "256" else int(size))[1], backend="cython",
                                           activations=args.mode, threads=args.threads)
            m = {"config": name, "image_size": int(size), "mode": args.mode, "threads": args.threads,
                 "full_step_2rows_s": g, "full_step_1row_s": c, "forecast_row_s": f, "assumed": True,
                 "row_tflop": row_flops(model.config) / 1e12}
        else:
            model, m = measure(name, int(size), args.mode, args.threads, args.repeat)
        m["decode_s"] = decode.get(spec, 0.0)
        print(f"{name} @{size} {args.mode}, {args.threads} threads: full step 2 rows {m['full_step_2rows_s']:.2f} s, "
              f"1 row {m['full_step_1row_s']:.2f} s, forecast row {m['forecast_row_s'] * 1000:.1f} ms; "
              f"{m['row_tflop']:.3f} TFLOP per row", flush=True)
        rows = {n: extrapolate(m, counts[n]) for n in names}
        for r in rows.values():
            r["seconds"] += m["decode_s"]
        ref = rows.get("exact20")
        print(f"{'setting':>22s} {'steps':>5s} {'evals':>6s} {'TFLOP':>7s} {'x fewer':>7s} {'seconds':>8s} {'x':>5s}")
        for n, r in rows.items():
            ratio = base / r["network_evals"] if base else float("nan")
            sp = ref["seconds"] / r["seconds"] if ref else float("nan")
            print(f"{n:>22s} {r['steps']:5d} {r['network_evals']:6d} {r['tflop']:7.2f} {ratio:7.2f} "
                  f"{r['seconds']:8.1f} {sp:5.2f}", flush=True)
        entry = {**m, "rows": rows}
        if spec in args.e2e.split(","):
            entry["e2e"] = e2e(model, {n: SETTINGS[n] for n in args.e2e_settings.split(",")}, args.repeat)
            for n, r in entry["e2e"].items():
                print(f"  measured end to end: {n:>12s} wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s", flush=True)
        report["configs"].append(entry)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
