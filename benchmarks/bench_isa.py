"""Instruction-set paths of the C kernels against each other, in one process, alternating.

    python benchmarks/bench_isa.py [--isas avx2,avx512] [--shapes 512x1536x1536,...] [--modes int8,int10]
                                   [--threads 1] [--rounds 15] [--json]

For every shape and activation mode, each round times one call of every ISA path in turn
(`_ternary.set_isa`), so that a slow period of a shared machine hits all paths alike. Reported per
path: the median and range of wall time and of process CPU time over the rounds (with --threads 1
CPU time is the figure other processes on the machine cannot inflate), and the median ratio of the
first path's time to each other path's, taken round by round. Outputs are checked equal across the
integer paths (exact sums) before timing.

    python benchmarks/bench_isa.py --step [--config 600m] [--threads 1] [--rounds 3] [--torch]

times the guided denoising step of bench_step.py (same cached random release-layout checkpoint,
same inputs) per activation mode and ISA path, alternating in one process, by wall and process CPU
time; --torch adds PyTorch float32 and (where the CPU has native bf16) bfloat16, built by
bench_step.worker_torch and timed on the process CPU clock as well.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from terdit_edge import _ternary  # noqa: E402
from terdit_edge.kernels import get_backend  # noqa: E402
from terdit_edge.kernels.base import TernaryWeight  # noqa: E402
from terdit_edge.packing import pack_ternary_2bit  # noqa: E402

DEFAULT_SHAPES = [(512, 1536, 1536), (512, 1536, 4096), (512, 4096, 1536), (8, 1536, 1536), (2, 1024, 9216),
                  (1, 1536, 4096)]


def _one(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def step_rows(config: str, isas: list[str], threads: int, rounds: int, modes: list[str], with_torch: bool):
    """Median wall / CPU seconds of one guided step per (mode, ISA), alternating ISAs each round."""
    import types

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_step

    import terdit_edge
    from terdit_edge.diffusion import guided_model_output

    ck, tdit = bench_step.prepare(config)
    x, t, y = bench_step._inputs(config)
    rows = []
    for mode in modes:
        model = terdit_edge.load_model(tdit, backend="cython", activations=mode, threads=threads)
        outs = {}
        for isa in isas:  # warm-up, and the integer modes' outputs must agree bit for bit
            _ternary.set_isa(isa)
            outs[isa] = guided_model_output(model, x, t, y, 4.0)
        if mode != "fp32":
            for isa in isas[1:]:
                assert np.array_equal(outs[isa], outs[isas[0]]), (mode, isa)
        wall = {i: [] for i in isas}
        cpu = {i: [] for i in isas}
        for _ in range(rounds):
            for isa in isas:
                _ternary.set_isa(isa)
                tw, tc = _one(lambda: guided_model_output(model, x, t, y, 4.0))
                wall[isa].append(tw)
                cpu[isa].append(tc)
        _ternary.set_isa("best")
        for isa in isas:
            rows.append({"name": f"terdit-edge {mode} [{isa}]", "wall_s": statistics.median(wall[isa]),
                         "wall_range": [min(wall[isa]), max(wall[isa])], "cpu_s": statistics.median(cpu[isa]),
                         "cpu_range": [min(cpu[isa]), max(cpu[isa])]})
        model = None  # free it before the next mode loads
    if with_torch:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = os.path.join(tmp, "config.json")
            from terdit_edge.format import read_tdit
            with open(cfg_path, "w") as f:
                f.write(read_tdit(tdit, verify=False).config.to_json())
            kinds = [False] + ([True] if bench_step.native_bf16() else [])
            for bf16 in kinds:
                res = {}
                for clock in ("wall", "cpu"):  # worker_torch times with time.perf_counter: swap the clock
                    bench_step.time = types.SimpleNamespace(
                        perf_counter=time.perf_counter if clock == "wall" else time.process_time)
                    args = types.SimpleNamespace(ck=ck, tdit_config=cfg_path, config=config, threads=threads,
                                                 repeat=rounds, save=os.path.join(tmp, "t.npy"))
                    res[clock] = bench_step.worker_torch(args, bf16=bf16)["seconds"]
                bench_step.time = time
                rows.append({"name": f"pytorch {'bfloat16' if bf16 else 'float32'}", "wall_s": res["wall"],
                             "cpu_s": res["cpu"], "note": "best of rounds (bench_step.worker_torch)"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isas", default=None, help="comma-separated paths (default: every supported SIMD path)")
    ap.add_argument("--shapes", default=None, help="comma-separated MxKxN list")
    ap.add_argument("--modes", default="int8,int10,fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--step", action="store_true", help="time the guided step instead of GEMMs")
    ap.add_argument("--config", default="600m", choices=("600m", "3b", "small"))
    ap.add_argument("--torch", action="store_true", help="with --step: PyTorch float32 and bf16 too")
    args = ap.parse_args(argv)
    if args.step:
        isas_s = args.isas.split(",") if args.isas else [i for i in _ternary.supported_isas() if i != "scalar"]
        rows = step_rows(args.config, isas_s, args.threads, args.rounds, args.modes.split(","), args.torch)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"guided step, {args.config}, {args.threads} thread(s), {args.rounds} rounds; seconds")
            for r in rows:
                rng_s = (f" [{r['wall_range'][0]:.3f}-{r['wall_range'][1]:.3f}] cpu [{r['cpu_range'][0]:.3f}-"
                         f"{r['cpu_range'][1]:.3f}]" if "wall_range" in r else f" ({r['note']})")
                print(f"{r['name']:34s} wall {r['wall_s']:.3f} cpu {r['cpu_s']:.3f}{rng_s}")
        return 0
    isas = args.isas.split(",") if args.isas else [i for i in _ternary.supported_isas() if i != "scalar"]
    shapes = (DEFAULT_SHAPES if not args.shapes
              else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")])
    rng = np.random.default_rng(0)
    results = []
    for m, k, n in shapes:
        q = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
        w = TernaryWeight(pack_ternary_2bit(q), n, k, 0.01, None)
        x = rng.standard_normal((m, k)).astype(np.float32)
        for mode in args.modes.split(","):
            be = get_backend("cython", threads=args.threads, activations=mode)
            out = np.empty((m, n), np.float32)
            ys = {}
            for isa in isas:  # warm-up and equality check
                _ternary.set_isa(isa)
                ys[isa] = be.ternary_matmul(x, w).copy()
            if mode != "fp32":
                for isa in isas[1:]:
                    assert np.array_equal(ys[isa], ys[isas[0]]), (isa, mode, m, k, n)
            wall = {i: [] for i in isas}
            cpu = {i: [] for i in isas}
            for _ in range(args.rounds):
                for isa in isas:
                    _ternary.set_isa(isa)
                    tw, tc = _one(lambda: be.ternary_matmul(x, w, out=out))
                    wall[isa].append(tw)
                    cpu[isa].append(tc)
            _ternary.set_isa("best")
            row = {"shape": [m, k, n], "mode": mode, "threads": args.threads}
            for isa in isas:
                row[isa] = {"wall_ms_median": 1e3 * statistics.median(wall[isa]),
                            "wall_ms_range": [1e3 * min(wall[isa]), 1e3 * max(wall[isa])],
                            "cpu_ms_median": 1e3 * statistics.median(cpu[isa]),
                            "cpu_ms_range": [1e3 * min(cpu[isa]), 1e3 * max(cpu[isa])],
                            "gops_median_wall": 2 * m * n * k / statistics.median(wall[isa]) / 1e9}
                if isa != isas[0]:
                    r = [a / b for a, b in zip(wall[isas[0]], wall[isa])]
                    rc = [a / b for a, b in zip(cpu[isas[0]], cpu[isa]) if b > 0]
                    row[isa]["speedup_vs_" + isas[0]] = {"wall_median": statistics.median(r),
                                                         "wall_range": [min(r), max(r)],
                                                         "cpu_median": statistics.median(rc) if rc else None}
            results.append(row)
            if not args.json:
                parts = []
                for isa in isas:
                    d = row[isa]
                    s = (f"{isa} {d['wall_ms_median']:.3f} ms [{d['wall_ms_range'][0]:.3f}-{d['wall_ms_range'][1]:.3f}]"
                         f" cpu {d['cpu_ms_median']:.3f} ms")
                    if "speedup_vs_" + isas[0] in d:
                        sp = d["speedup_vs_" + isas[0]]
                        s += f" x{sp['wall_median']:.2f} [{sp['wall_range'][0]:.2f}-{sp['wall_range'][1]:.2f}]"
                        if sp["cpu_median"]:
                            s += f" (cpu x{sp['cpu_median']:.2f})"
                    parts.append(s)
                print(f"{m}x{k}x{n} {mode:5s} thr={args.threads}: " + " | ".join(parts), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
