"""Throughput of sampling jobs on the bundled digits model: plain Pipeline calls vs `terdit-edge sample`
with the local engine (1 and 2 workers) and the Ray engine (2 actors), on this machine.

    python benchmarks/bench_sample_job.py [--n 400] [--steps 20] [--sampler ddim] [--repeat 3]
                                          [--configs plain,local1,local2,ray2] [--json]

Every row samples the same N images (uniform labels, global seed 0) and its merged bytes are checked
against the plain Pipeline's. Times are wall-clock seconds for the whole call, start-up included (a
local pool spawns its processes and loads the model in each; a Ray row reuses one `ray.init`, whose
start-up is printed separately). Rows run interleaved, `--repeat` rounds; the median and the range
are reported. Overhead = job time / plain time - 1 at the same total thread count (the cores).
Needs the ray extra for the ray row (skipped with a note otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--steps", default="20")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configs", default="plain,local1,local2,ray2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    steps = int(args.steps) if args.steps.isdigit() else args.steps

    from terdit_edge import Pipeline
    from terdit_edge.scale import JobSpec, LocalEngine, RayEngine, merge, run_job
    from terdit_edge.scale.job import to_rgb_uint8

    ncores = cores()
    configs = args.configs.split(",")
    spec_kw = dict(model_path=None, n=args.n, steps=steps, sampler=args.sampler, cfg_scale=args.cfg,
                   shard_size=args.shard_size, batch_size=args.batch_size)
    spec0 = JobSpec(**spec_kw).prepare()
    labels = [int(v) for v in spec0.labels_of(range(args.n))]
    seeds = [int(v) for v in spec0.seeds_of(range(args.n))]

    ray_note = None
    if any(c.startswith("ray") for c in configs):
        try:
            import ray
            t = time.perf_counter()
            ray.init(num_cpus=ncores, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
            ray_note = f"ray.init(num_cpus={ncores}) {time.perf_counter() - t:.1f} s (not in the ray rows)"
        except ImportError:
            configs = [c for c in configs if not c.startswith("ray")]
            ray_note = "ray is not installed: ray rows skipped (pip install '.[ray]')"
        print(ray_note, file=sys.stderr)

    reference = None
    times = {c: [] for c in configs}
    cpu = {c: [] for c in configs}
    tmp = tempfile.mkdtemp(prefix="bench-sample-job-")
    try:
        for rnd in range(args.repeat):
            for c in configs:
                ru0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                if c == "plain":
                    pipe = Pipeline.load(threads=ncores)
                    images = to_rgb_uint8(pipe(labels, steps=steps, sampler=args.sampler, cfg_scale=args.cfg,
                                               seeds=seeds, output="np", progress=False, batch_size=args.batch_size))
                    elapsed = time.perf_counter() - t
                    del pipe
                else:
                    workers = int(c[-1])
                    if c.startswith("local"):
                        engine = LocalEngine(workers=workers, threads=max(1, ncores // workers))
                    else:
                        engine = RayEngine(workers=workers, threads=max(1, ncores // workers))
                    out = os.path.join(tmp, f"{c}-{rnd}")
                    run_job(JobSpec(**spec_kw).prepare(), out, engine, progress=False, quiet=True)
                    elapsed = time.perf_counter() - t
                    merge([out], out + ".npz", progress=False, quiet=True)
                    images = np.load(out + ".npz", allow_pickle=False)["arr_0"]
                    shutil.rmtree(out)
                    os.remove(out + ".npz")
                if reference is None:
                    reference = images
                elif not np.array_equal(images, reference):
                    raise SystemExit(f"{c}: the images differ from the first row's; determinism is broken")
                times[c].append(elapsed)
                ru1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                # CPU seconds of this process and of its exited children (local pool workers; Ray
                # workers belong to the raylet and are not counted)
                cpu[c].append(sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(ru0, ru1)))
                print(f"round {rnd + 1} {c}: {elapsed:.2f} s ({args.n / elapsed:.1f} samples/s)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    base = statistics.median(times["plain"]) if "plain" in times else None
    for c in configs:
        med = statistics.median(times[c])
        rows.append({"config": c, "median_s": med, "min_s": min(times[c]), "max_s": max(times[c]),
                     "samples_per_s": args.n / med,
                     "overhead_vs_plain": (med / base - 1) if base and c != "plain" else None,
                     "cpu_s_median": statistics.median(cpu[c]) if not c.startswith("ray") else None})
    ray_vs_local = None
    if "ray2" in times and "local2" in times:
        ray_vs_local = statistics.median(times["ray2"]) / statistics.median(times["local2"]) - 1
    result = {"n": args.n, "steps": steps, "sampler": args.sampler, "batch_size": args.batch_size,
              "shard_size": args.shard_size, "repeat": args.repeat, "cores": ncores,
              "cpu": platform.processor() or platform.machine(), "rows": rows, "ray_vs_local2": ray_vs_local,
              "ray_note": ray_note, "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.n} samples of the bundled digits model, {args.sampler} {steps} steps, batch {args.batch_size}, "
          f"shards of {args.shard_size}; {ncores} cores; median of {args.repeat} (range)")
    print("| config | seconds | samples/s | overhead vs plain (wall) | CPU seconds (driver + local workers) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ov = "" if r["overhead_vs_plain"] is None else f"{100 * r['overhead_vs_plain']:+.1f}%"
        cs = "n/a (Ray workers)" if r["cpu_s_median"] is None else f"{r['cpu_s_median']:.1f}"
        print(f"| {r['config']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['samples_per_s']:.1f} "
              f"| {ov} | {cs} |")
    if ray_vs_local is not None:
        print(f"ray (2 actors) vs local (2 workers): {100 * ray_vs_local:+.1f}%")
    if ray_note:
        print(ray_note)


if __name__ == "__main__":
    main()
