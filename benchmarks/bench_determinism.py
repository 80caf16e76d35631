"""What owning every float operation costs (issue 22): one guided TerDiT-600M step, A/B in one process.

    python benchmarks/bench_determinism.py [--threads 2] [--repeat 7] [--modes fp32,int8] [--baseline REV]

"same bits" is this release's forward: the fp32 ternary GEMMs always in the table order (also for the
adaLN rows, now one call over the batch), the C dense layer, detmath's timestep features and SiLU,
td_expf_poly tails. "before" is the forward of git revision REV (default 0c10ca1, the last one without
it) rebuilt in this process: that revision's C extension (its GEMVs for few rows and libm tails,
loaded under another name, built once as in bench_attention.py), BLAS for the dense layers, NumPy's
exp/cos/sin, and the adaLN rows image by image. Both run the same loaded model on the same input,
alternately, so that the machine's load affects both alike; the outputs are compared too (they differ
by float rounding only). Prints min and median wall time and the median process CPU time.

The model is the random release-layout checkpoint of bench_step.py (needs torch for the first run).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

DEFAULT_BASELINE = "0c10ca1"


def np_timestep_embedding(t, dim=256, max_period=10000.0):
    half = dim // 2
    freqs = np.exp(np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half))
    args = t.astype(np.float32)[:, None] * freqs[None].astype(np.float32)
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1).astype(np.float32)


def np_silu(x):
    return x / (np.float32(1) + np.exp(-x))


class _OldExtension:
    """The baseline extension as the current backend calls it: the same functions, and attention
    without this release's ``mode`` argument (the baseline has fp32 attention only)."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def attention(self, q, k, v, out, threads, mode=0):
        return self._ext.attention(q, k, v, out, threads)


@contextlib.contextmanager
def before(model, old_ext):
    """Run `model` as the baseline revision did (see the module docstring)."""
    from terdit_edge import model as model_mod
    from terdit_edge.kernels import cython_backend
    from terdit_edge.kernels.reference import NumpyBackend

    be_types = {type(model.backend), type(model.cond_backend)}
    saved = (cython_backend._ternary, model_mod.timestep_embedding,
             {t: (t.__dict__.get("dense"), t.__dict__.get("silu"), t.invariant_min_rows) for t in be_types})
    cython_backend._ternary = _OldExtension(old_ext)
    model_mod.timestep_embedding = np_timestep_embedding
    for t in be_types:
        t.dense = NumpyBackend.dense
        t.silu = lambda self, x: np_silu(x)
        t.invariant_min_rows = 8
    try:
        yield
    finally:
        cython_backend._ternary, model_mod.timestep_embedding = saved[:2]
        for t, (dense, silu, rows) in saved[2].items():
            for name, value in (("dense", dense), ("silu", silu)):
                if value is None:
                    delattr(t, name)
                else:
                    setattr(t, name, value)
            t.invariant_min_rows = rows


def step_ab(tdit: str, mode: str, threads: int, repeat: int, old_ext) -> dict:
    import terdit_edge
    from terdit_edge.diffusion import guided_model_output

    model = terdit_edge.load_model(tdit, backend="cython", activations=mode, threads=threads)
    x = np.random.default_rng(0).standard_normal((1, 4, 32, 32), dtype=np.float32)
    y = np.array([207])
    outs = {"same bits": guided_model_output(model, x, 500, y, 4.0)}
    with before(model, old_ext):
        outs["before"] = guided_model_output(model, x, 500, y, 4.0)
    wall = {k: [] for k in outs}
    cpu = {k: [] for k in outs}
    for _ in range(repeat):
        for kind in outs:
            ctx = before(model, old_ext) if kind == "before" else contextlib.nullcontext()
            with ctx:
                t0, c0 = time.perf_counter(), time.process_time()
                guided_model_output(model, x, 500, y, 4.0)
                wall[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
    a, b = outs["same bits"], outs["before"]
    return {"mode": mode, "threads": threads,
            **{f"{k}_min": min(v) for k, v in wall.items()},
            **{f"{k}_median": statistics.median(v) for k, v in wall.items()},
            **{f"{k}_cpu": statistics.median(v) for k, v in cpu.items()},
            "rel_diff": float(np.abs(a - b).max() / np.abs(b).max())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--modes", default="fp32,int8")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the 'before' extension")
    args = ap.parse_args()

    from bench_attention import baseline_module
    from bench_step import prepare

    from terdit_edge import _ternary
    from terdit_edge.kernels import default_threads

    old_ext, desc = baseline_module(args.baseline)
    if old_ext is None:
        sys.exit(f"bench_determinism: no baseline: {desc}")
    threads = args.threads or default_threads()
    _, tdit = prepare("600m")
    print(f"guided 600M step (batch 2), {threads} threads, isa {_ternary.get_isa()}, {args.repeat} alternating runs; "
          f"before = {desc}")
    print(f"{'mode':6s} {'same bits min/med':>18s} {'before min/med':>16s} {'ratio min':>9s} {'ratio med':>9s} "
          f"{'ratio CPU med':>13s} {'max |diff| / max |out|':>22s}")
    for mode in args.modes.split(","):
        r = step_ab(tdit, mode, threads, args.repeat, old_ext)
        print(f"{mode:6s} {r['same bits_min']:8.3f}/{r['same bits_median']:.3f} s "
              f"{r['before_min']:7.3f}/{r['before_median']:.3f} s {r['same bits_min'] / r['before_min']:9.3f} "
              f"{r['same bits_median'] / r['before_median']:9.3f} {r['same bits_cpu'] / r['before_cpu']:13.3f} "
              f"{r['rel_diff']:22.2e}")


if __name__ == "__main__":
    main()
