"""How far the integer activation modes move the model output from fp32, and the alternatives to them.

    python benchmarks/quant_error.py [--json] [--threads 2] [--backend cython]
                                     [--skip-bundled] [--skip-600m] [--config 600m]

Two measurements, each the relative L2 error ||out - out_fp32|| / ||out_fp32|| of the guided model
output (classifier-free guidance with scale 4, as the samplers use it):

1. The trained bundled digits model (terdit_edge/data/digits.tdit): one standard-normal noise image
   per digit (seed 0), labels 0..9, at t = 999, 500, 100 and 10; the real int8 and int10 modes of the
   backend against its fp32 mode. This is the source of "int10 within 0.3% and int8 within 1.2% of
   fp32 on the trained bundled model" (the largest error over the four timesteps).
2. One guided step of the random TerDiT-600M-config model of bench_step.py (same file, same inputs:
   batch 1 + null label, t = 500, class 207): the real int8 and int10 modes, and simulated
   alternatives to per-token int8. A simulation quantizes each ternary layer's input and dequantizes
   it (float32), then runs the fp32 kernel, in exactly the layers the integer modes quantize (every
   token GEMM; the adaLN conditioning layers stay fp32):

   - per-token int8 / 9 / 10 bits: one absmax scale per token row, L = 2^(bits-1) - 1
   - int8 with one scale per 128- or 32-wide block of each row
   - per-token int8 except the inputs of `attention.wo` and `feed_forward.w2`, kept in fp32
   - per-token int8 with a clipped scale: each row's scale is c * absmax / 127 with the c in
     {1.0, 0.9, ..., 0.3} that minimizes the row's squared quantization error

   The simulated per-token int8 row is a check of the simulation: it should agree with the real
   int8 mode to about a tenth of a percent (the real mode sums integers exactly, the simulation
   rounds float32 sums, and a last-bit difference before a quantizer can flip a rounding that the
   following layers carry on).

The 600M file is written on first use (needs torch: pip install ".[bench]") and cached like
bench_step.py's; it has random weights, so its figures describe activations of a random model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import terdit_edge
from terdit_edge.kernels.reference import quantize_rows

HERE = os.path.dirname(os.path.abspath(__file__))
CFG_SCALE = 4.0
BUNDLED_TIMESTEPS = (999, 500, 100, 10)


def guided(model, x: np.ndarray, t: int, labels: np.ndarray, cfg_scale: float = CFG_SCALE) -> np.ndarray:
    """The authors' guidance: [x, x] with labels [y, null]; the first guided_channels eps channels mixed."""
    b = x.shape[0]
    g = model.config.guided_channels
    out = model(np.concatenate([x, x]), np.full(2 * b, t, dtype=np.int64),
                np.concatenate([labels, np.full(b, model.null_label, dtype=np.int64)]))
    cond, uncond = out[:b], out[b:]
    res = cond.copy()
    res[:, :g] = uncond[:, :g] + np.float32(cfg_scale) * (cond[:, :g] - uncond[:, :g])
    return res


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).astype(np.float64)) / np.linalg.norm(ref.astype(np.float64)))


# --- simulated activation quantizers: x (M, K) float32 -> dequantized float32 of the same shape ---


def per_token(bits: int):
    def q(x):
        xq, scale = quantize_rows(x, bits)
        return xq.astype(np.float32) * scale[:, None]
    return q


def per_block(block: int, bits: int = 8):
    lim = np.float32((1 << (bits - 1)) - 1)

    def q(x):
        m, k = x.shape
        pad = (-k) % block
        xb = np.pad(x, ((0, 0), (0, pad))).reshape(m, -1, block)
        absmax = np.abs(xb).max(axis=2, keepdims=True)
        scale = np.where(absmax > 0, absmax / lim, np.float32(1)).astype(np.float32)
        deq = np.clip(np.rint(xb / scale), -lim, lim) * scale
        return deq.reshape(m, -1)[:, :k].astype(np.float32)
    return q


CLIP_CANDIDATES = tuple(c / 10 for c in range(10, 2, -1))  # 1.0, 0.9, ..., 0.3


def clipped_per_token(bits: int = 8, candidates=CLIP_CANDIDATES):
    lim = np.float32((1 << (bits - 1)) - 1)

    def q(x):
        absmax = np.abs(x).max(axis=1, keepdims=True)
        best, best_err = None, None
        for c in candidates:
            scale = np.where(absmax > 0, np.float32(c) * absmax / lim, np.float32(1)).astype(np.float32)
            deq = (np.clip(np.rint(x / scale), -lim, lim) * scale).astype(np.float32)
            err = np.square(deq - x, dtype=np.float64).sum(axis=1)
            if best is None:
                best, best_err = deq, err
            else:
                better = err < best_err
                best[better], best_err[better] = deq[better], err[better]
        return best
    return q


class SimulatedQuantBackend:
    """Delegates to an fp32 backend; quantizes and dequantizes the input of each token GEMM first."""

    def __init__(self, real, quantizer, keep_fp32=()):
        self._real, self._quantizer, self._keep = real, quantizer, tuple(keep_fp32)

    def ternary_matmul(self, x, w, out=None):
        if not (self._keep and w.name.endswith(self._keep)):
            x = self._quantizer(np.ascontiguousarray(x, dtype=np.float32))
        return self._real.ternary_matmul(x, w, out=out)

    def __getattr__(self, name):
        return getattr(self._real, name)


SIMULATIONS = {
    "sim int8 per token": dict(quantizer=per_token(8)),
    "sim int8 per 128-wide block": dict(quantizer=per_block(128)),
    "sim int8 per 32-wide block": dict(quantizer=per_block(32)),
    "sim 9 bits per token": dict(quantizer=per_token(9)),
    "sim 10 bits per token": dict(quantizer=per_token(10)),
    "sim int8, wo and w2 inputs fp32": dict(quantizer=per_token(8),
                                            keep_fp32=("attention.wo", "feed_forward.w2")),
    "sim int8, clipped scale (best c in 1.0-0.3)": dict(quantizer=clipped_per_token(8)),
}


def bundled(backend: str, threads: int) -> dict:
    from terdit_edge.pipeline import default_model_path

    path = default_model_path()
    models = {mode: terdit_edge.load_model(path, backend=backend, activations=mode, threads=threads)
              for mode in ("fp32", "int8", "int10")}
    cfg = models["fp32"].config
    x = np.random.default_rng(0).standard_normal((cfg.num_classes, cfg.in_channels, cfg.input_size,
                                                  cfg.input_size), dtype=np.float32)
    labels = models["fp32"].map_labels(list(range(cfg.num_classes)))
    per_t = {}
    for t in BUNDLED_TIMESTEPS:
        ref = guided(models["fp32"], x, t, labels)
        per_t[t] = {mode: rel_l2(guided(models[mode], x, t, labels), ref) for mode in ("int8", "int10")}
    return {"model": path, "backend": models["fp32"].backend.describe(), "timesteps": list(BUNDLED_TIMESTEPS),
            "rel_l2_vs_fp32": per_t,
            "max": {mode: max(v[mode] for v in per_t.values()) for mode in ("int8", "int10")},
            "min": {mode: min(v[mode] for v in per_t.values()) for mode in ("int8", "int10")}}


def step_600m(config: str, backend: str, threads: int) -> dict:
    sys.path.insert(0, HERE)
    from bench_step import _inputs, prepare

    _, tdit = prepare(config)
    x, t, y = _inputs(config)
    rows = {}
    fp32 = terdit_edge.load_model(tdit, backend=backend, activations="fp32", threads=threads)
    t0 = time.perf_counter()
    ref = guided(fp32, x, t, y)
    seconds = time.perf_counter() - t0
    for mode in ("int8", "int10"):
        m = terdit_edge.load_model(tdit, backend=backend, activations=mode, threads=threads)
        rows[f"real {mode} mode"] = rel_l2(guided(m, x, t, y), ref)
        del m
    real_backend = fp32.backend
    for name, spec in SIMULATIONS.items():
        fp32.backend = SimulatedQuantBackend(real_backend, **spec)
        try:
            rows[name] = rel_l2(guided(fp32, x, t, y), ref)
        finally:
            fp32.backend = real_backend
    return {"model": tdit, "config": config, "backend": real_backend.describe(), "t": t, "class": int(y[0]),
            "fp32_step_seconds": seconds, "rel_l2_vs_fp32": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", default="cython")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--config", default="600m", choices=("600m", "3b", "small"))
    ap.add_argument("--skip-bundled", action="store_true")
    ap.add_argument("--skip-600m", action="store_true")
    a = ap.parse_args()
    report = {}
    if not a.skip_bundled:
        report["bundled"] = bundled(a.backend, a.threads)
    if not a.skip_600m:
        report["step"] = step_600m(a.config, a.backend, a.threads)
    if a.json:
        print(json.dumps(report, indent=2))
        return
    if "bundled" in report:
        r = report["bundled"]
        print(f"bundled digits model, guided output (cfg {CFG_SCALE}, one noise image per digit), {r['backend']}")
        print("      t   int8 vs fp32   int10 vs fp32")
        for t, v in r["rel_l2_vs_fp32"].items():
            print(f"  {t:5d}   {v['int8']:11.2%}   {v['int10']:12.2%}")
        lo, hi = r["min"], r["max"]
        print(f"  range   {lo['int8']:.2%}-{hi['int8']:.2%}   {lo['int10']:.2%}-{hi['int10']:.2%}")
    if "step" in report:
        r = report["step"]
        print(f"\n{r['config']} config (random weights), one guided step at t = {r['t']}, class {r['class']}, "
              f"{r['backend']}; relative L2 vs fp32")
        for name, v in r["rel_l2_vs_fp32"].items():
            print(f"  {name:46s} {v:7.2%}")


if __name__ == "__main__":
    main()
