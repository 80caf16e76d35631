"""What batch invariance costs, and what batching gains, on the TerDiT-600M config.

    python benchmarks/bench_batch.py [--threads 2] [--repeat 5] [--modes fp32,int8] [--images 8]
                                     [--steps 10] [--skip-throughput] [--json]

1. Guided step A/B: the same loaded model, one guided step (batch 2: an image and its null label),
   timed alternately with the batch-invariant forward (the default: conditioning and dense layers
   image by image, see docs/reproducibility.md) and with the previous forward (every layer one call
   over the whole batch), in the same process, so that the machine's load affects both alike.
   Prints min and median of each and their ratio, and the ratio of the median process CPU times
   (less sensitive to other processes on a shared machine; best read with --threads 1).
2. Throughput: `--images` images of random classes, `--steps` DDIM steps with guidance, sampled
   with batch_size 1 and with batch_size = images (identical latents, checked), images per second.

The model is a random checkpoint in the release layout converted by the real converter (cached as
in bench_step.py; needs the test extras for torch). Backend: cython (the default "auto").
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


def legacy_forward(model):
    """A context manager that runs `model` as before batch invariance: each layer one call."""
    import contextlib

    from terdit_edge.model import TernaryDiT

    @contextlib.contextmanager
    def patched():
        be = model.backend
        saved_ternary = TernaryDiT._ternary
        saved_dense = type(be).dense

        def one_call(self, x, w, out, rows_per_image, backend=None):
            return (backend or self.backend).ternary_matmul(x, w, out=out)

        def dense(self, x, weight, bias=None, rows_per_image=None):
            return saved_dense(self, x, weight, bias)

        TernaryDiT._ternary = one_call
        type(be).dense = dense
        try:
            yield
        finally:
            TernaryDiT._ternary = saved_ternary
            type(be).dense = saved_dense
    return patched()


def step_ab(tdit: str, mode: str, threads: int, repeat: int) -> dict:
    import numpy as np

    import terdit_edge
    from terdit_edge.diffusion import guided_model_output

    model = terdit_edge.load_model(tdit, backend="auto", activations=mode, threads=threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 32, 32), dtype=np.float32)
    y = np.array([207])
    guided_model_output(model, x, 500, y, 4.0)  # warm-up: buffers, page cache
    with legacy_forward(model):
        guided_model_output(model, x, 500, y, 4.0)
    times = {"invariant": [], "legacy": []}
    cpu = {"invariant": [], "legacy": []}
    for _ in range(repeat):
        for kind in ("invariant", "legacy"):
            t0, c0 = time.perf_counter(), time.process_time()
            if kind == "legacy":
                with legacy_forward(model):
                    guided_model_output(model, x, 500, y, 4.0)
            else:
                guided_model_output(model, x, 500, y, 4.0)
            times[kind].append(time.perf_counter() - t0)
            cpu[kind].append(time.process_time() - c0)
    row = {"mode": mode, "threads": threads, "backend": model.backend.describe()}
    for kind, ts in times.items():
        row[f"{kind}_min"] = min(ts)
        row[f"{kind}_median"] = statistics.median(ts)
        row[f"{kind}_cpu_median"] = statistics.median(cpu[kind])
    row["cost_min"] = row["invariant_min"] / row["legacy_min"] - 1
    row["cost_median"] = row["invariant_median"] / row["legacy_median"] - 1
    row["cost_cpu_median"] = row["invariant_cpu_median"] / row["legacy_cpu_median"] - 1
    return row


def throughput(tdit: str, mode: str, threads: int, images: int, steps: int) -> dict:
    import numpy as np

    import terdit_edge
    from terdit_edge.pipeline import Pipeline

    model = terdit_edge.load_model(tdit, backend="auto", activations=mode, threads=threads)
    pipe = Pipeline(model)
    labels = np.random.default_rng(1).integers(0, 1000, images).tolist()
    pipe.latents(labels[:1], steps=2, sampler="ddim", seed=0, batch_size=1)  # warm-up
    row = {"mode": mode, "threads": threads, "images": images, "steps": steps}
    outs = {}
    for bs in (1, images):
        t0, c0 = time.perf_counter(), time.process_time()
        outs[bs] = pipe.latents(labels, steps=steps, sampler="ddim", cfg_scale=4.0, seed=0, batch_size=bs)
        dt = time.perf_counter() - t0
        row[f"seconds_bs{bs}"] = dt
        row[f"cpu_seconds_bs{bs}"] = time.process_time() - c0
        row[f"images_per_s_bs{bs}"] = images / dt
    row["identical"] = bool(np.array_equal(outs[1], outs[images]))
    row["gain"] = row[f"images_per_s_bs{images}"] / row["images_per_s_bs1"]
    row["cpu_gain"] = row["cpu_seconds_bs1"] / row[f"cpu_seconds_bs{images}"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--modes", default="fp32,int8")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bench_step import prepare

    from terdit_edge.kernels import default_threads

    threads = args.threads or default_threads()
    _, tdit = prepare("600m")
    modes = args.modes.split(",")
    steps_rows = [step_ab(tdit, m, threads, args.repeat) for m in modes]
    tp_rows = [] if args.skip_throughput else [throughput(tdit, m, threads, args.images, args.steps) for m in modes]
    if args.json:
        print(json.dumps({"step": steps_rows, "throughput": tp_rows}, indent=2))
        return
    print(f"guided step, 600m config, {threads} threads, {args.repeat} alternating runs each "
          f"(invariant = this release's forward, legacy = one call per layer over the batch)")
    print(f"{'mode':6s} {'invariant min/med':>18s} {'legacy min/med':>16s} {'cost min':>9s} {'cost med':>9s} "
          f"{'cost CPU-time med':>17s}")
    for r in steps_rows:
        print(f"{r['mode']:6s} {r['invariant_min']:8.3f}/{r['invariant_median']:.3f} s "
              f"{r['legacy_min']:7.3f}/{r['legacy_median']:.3f} s {r['cost_min']:+8.1%} {r['cost_median']:+8.1%} "
              f"{r['cost_cpu_median']:+16.1%}")
    if tp_rows:
        print(f"\nthroughput: {args.images} images, {args.steps} DDIM steps, cfg 4")
        for r in tp_rows:
            print(f"{r['mode']:6s} batch_size 1: {r['images_per_s_bs1']:.3f} img/s ({r['seconds_bs1']:.1f} s); "
                  f"batch_size {args.images}: {r[f'images_per_s_bs{args.images}']:.3f} img/s "
                  f"({r[f'seconds_bs{args.images}']:.1f} s); gain {r['gain']:.2f}x wall, {r['cpu_gain']:.2f}x "
                  f"CPU time; identical latents: {r['identical']}")


if __name__ == "__main__":
    main()
