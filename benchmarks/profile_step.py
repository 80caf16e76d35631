"""Where the time of one guided step goes: wall time per backend operation.

    python benchmarks/profile_step.py [--config 600m|4.2B] [--image-size 256|512] [--mode int8]
                                      [--attention fp32|int8]
                                      [--threads N] [--repeat 1] [--json]

Loads the cached random release-layout model of bench_step.py, wraps every compute operation of
its backend (ternary GEMMs, attention, dense layers, norms, RoPE, SwiGLU, gated adds) with a timer,
runs one warm-up and `--repeat` timed guided steps (batch 2, cfg 4) and prints each operation's
share of the step, its calls and, for the ternary GEMMs and attention, the throughput
(GOP/s equivalent: 2 M N K for a GEMM; 4 B H T^2 hd for attention). "other" is the step time no
wrapped operation accounts for (NumPy glue: reshapes, splits, concatenation, the guidance mix).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

OPS = ("ternary_matmul", "attention", "dense", "rmsnorm", "rmsnorm_modulate", "layernorm", "rope", "add_gated",
       "swiglu")


def wrap(backend, totals, calls, flops):
    for name in OPS:
        fn = getattr(backend, name, None)
        if fn is None:
            continue

        def timed(*a, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            r = _fn(*a, **kw)
            totals[_name] += time.perf_counter() - t0
            calls[_name] += 1
            if _name == "ternary_matmul":
                x, w = a[0], a[1]
                flops[_name] += 2.0 * x.shape[0] * x.shape[1] * w.n
            elif _name == "attention":
                q = a[0]
                flops[_name] += 4.0 * q.shape[0] * q.shape[2] * q.shape[1] ** 2 * q.shape[3]
            return r

        setattr(backend, name, timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="600m", choices=("600m", "4.2B"))
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--mode", default="int8", choices=("fp32", "int8", "int10"))
    ap.add_argument("--attention", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    from bench_step import _inputs, prepare

    import terdit_edge
    from terdit_edge.diffusion import guided_model_output
    from terdit_edge.kernels import default_threads

    _, tdit = prepare(args.config, args.image_size)
    threads = args.threads or default_threads()
    model = terdit_edge.load_model(tdit, backend="cython", activations=args.mode, threads=threads,
                                   attention=args.attention)
    x, t, y = _inputs(args.config, args.image_size)
    guided_model_output(model, x, t, y, 4.0)  # warm-up
    totals, calls, flops = defaultdict(float), defaultdict(int), defaultdict(float)
    for be in {id(model.backend): model.backend, id(model.cond_backend): model.cond_backend}.values():
        wrap(be, totals, calls, flops)
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        guided_model_output(model, x, t, y, 4.0)
    step = (time.perf_counter() - t0) / args.repeat
    rows = [{"op": k, "seconds": v / args.repeat, "calls": calls[k] // args.repeat,
             "gops": flops[k] / v / 1e9 if flops[k] else None} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    rows.append({"op": "other", "seconds": step - sum(r["seconds"] for r in rows), "calls": 0, "gops": None})
    if args.json:
        print(json.dumps({"step_seconds": step, "threads": threads, "rows": rows}, indent=2))
        return
    size = args.image_size or 256
    print(f"guided step, {args.config} at {size} px, {args.mode}, attention {args.attention}, {threads} thread(s): "
          f"{step:.3f} s")
    for r in rows:
        g = f"{r['gops']:8.1f} GOP/s" if r["gops"] else ""
        print(f"  {r['op']:18s} {r['seconds']:8.3f} s {r['seconds'] / step:6.1%} {r['calls']:6d} calls {g}")


if __name__ == "__main__":
    main()
