"""Ternary matmul throughput: every available backend x activation mode against NumPy float32.

    python benchmarks/bench_matmul.py [--json] [--threads N] [--repeat R] [--backends cython,numba]
                                      [--shapes 512x1536x1536,1x1536x4096] [--attention 2x256x32x32x48]
                                      [--modes fp32,int8,int10]

Shapes are M x K x N (tokens x input features x output features); the defaults are the
TerDiT-600M projections at batch 2 x 256 tokens (M = 512) and the per-step conditioning GEMVs
(M = 1, 2). The baseline is `x @ W.T` with W = alpha * Q dense float32, timed in the same run
under the same thread limit; ops are counted as 2 M N K for every method. When onnxruntime and
onnx are importable, onnxruntime's MatMulNBits (com.microsoft, bits=2, block_size=32,
accuracy_level=4) runs the same ternary weights as a third reference; when torch is importable,
PyTorch float32 and, on CPUs with native bf16 (AVX512_BF16, AMX), bfloat16 on the dense weights (the
bf16 row's rel err is against PyTorch float32). `pip install ".[bench]"` installs every baseline; a
skipped baseline is printed. The fused C attention is timed against the NumPy/BLAS reference attention
on one shape (B x T x H x Hkv x hd, TerDiT-600M by default).

Same treatment for every method: NumPy and terdit-edge write into an output buffer allocated once
(`np.matmul(x, W.T, out=buf)` / `ternary_matmul(x, w, out=buf)`); onnxruntime returns a new array
per call (its session API). The error column compares the output of the last timed call (all M rows)
with the NumPy reference of the mode (fp32: float64-exact sums; int8/int10: the same integers).

Times and ratios are medians of R runs; the best and worst run are in --json output (best_s,
worst_s). `--clock cpu` measures process CPU time instead of wall time; with `--threads 1` that is
the one figure a busy shared machine cannot inflate by descheduling the process (with more threads
it is the CPU time summed over threads).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from terdit_edge.kernels import available_backends, default_threads, get_backend
from terdit_edge.kernels.base import TernaryWeight, activation_bits
from terdit_edge.kernels.reference import quantize_rows
from terdit_edge.packing import pack_ternary_2bit

DEFAULT_SHAPES = [(512, 1536, 1536), (512, 1536, 4096), (512, 4096, 1536), (2, 1024, 9216), (1, 1536, 4096)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


CLOCK = time.perf_counter


# Pause before each method: the thread pools of the method timed before (OpenBLAS workers spin for
# about 2^28 cycles, ~0.1 s, after a call; onnxruntime's spin too) would otherwise compete for the
# cores with the next method's threads, which at M = 1 (0.1 ms per call) is the whole measurement.
IDLE_GAP_S = 0.3


def timeit(fn, repeat: int) -> dict:
    """median_s, best_s, worst_s of `repeat` calls after an idle gap and one warm-up call, on CLOCK."""
    time.sleep(IDLE_GAP_S)
    fn()
    times = []
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return dict(median_s=statistics.median(times), best_s=min(times), worst_s=max(times))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-30))


_SKIPPED = set()


def skipped_baseline(message: str) -> None:
    """Say once, on stderr, that a baseline is not measured and why."""
    if message not in _SKIPPED:
        _SKIPPED.add(message)
        print(f"SKIPPED baseline: {message}", file=sys.stderr)


def ort_matmulnbits(q: np.ndarray, alpha: float, threads: int):
    """A callable x -> y running onnxruntime's 2-bit MatMulNBits on Q (N, K), or None."""
    try:
        import onnx  # noqa: F401 - MatMulNBits models are built with onnx.helper below
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError as e:
        skipped_baseline(f"onnxruntime MatMulNBits: {e.name or e} is not installed (pip install '.[bench]')")
        return None
    n, k = q.shape
    block = 32
    if k % block:
        skipped_baseline(f"onnxruntime MatMulNBits at K = {k}: K is not a multiple of the block ({block})")
        return None
    nblk = k // block
    codes = (q + 2).astype(np.uint8)  # default zero point of 2-bit MatMulNBits is 2
    codes = codes.reshape(n, nblk, block // 4, 4)
    packed = (codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)).astype(np.uint8)
    scales = np.full(n * nblk, alpha, dtype=np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=2, block_size=block, accuracy_level=4)
    graph = helper.make_graph(
        [node], "ternary", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
                     helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - an older onnxruntime without 2-bit support
        skipped_baseline(f"onnxruntime MatMulNBits unavailable: {e}")
        return None
    return lambda x: sess.run(None, {"A": x})[0]


def blas_reference(x: np.ndarray, q: np.ndarray, alpha: float, mode: str) -> np.ndarray:
    """The expected output of every row, by float64 BLAS (the gather-based reference is too slow at
    M = 512): fp32 mode, the float64 sums alpha * x Q^T rounded once; integer modes, the reference's
    quantized rows, whose integer sums float64 holds exactly, scaled as ternary_matmul_reference does
    (bit-equal to it)."""
    q64 = q.astype(np.float64)
    bits = activation_bits(mode)
    if not bits:
        return (x.astype(np.float64) @ q64.T * alpha).astype(np.float32)
    xq, scale = quantize_rows(x, bits)
    sums = xq.astype(np.float64) @ q64.T
    return sums.astype(np.float32) * (scale[:, None] * np.float32(alpha))


def torch_matmul_rows(q: np.ndarray, alpha: float, x: np.ndarray, threads: int, repeat: int, reference) -> list[dict]:
    """PyTorch on the same dense weights in float32 and, where the CPU has native bf16 (AVX512_BF16 or
    AMX-BF16), in bfloat16 (inputs and weights converted beforehand, as a bf16 model holds them), same
    threads, each writing into a preallocated output (`torch.mm(x, W.t(), out=buf)`, what F.linear
    computes). The float32 row's rel err is against the reference, the bf16 row's against PyTorch
    float32's output; both from the timed calls' output. [] without torch."""
    try:
        import torch
    except ImportError:
        skipped_baseline("PyTorch float32 / bfloat16: torch is not installed (pip install '.[bench]')")
        return []
    from terdit_edge.kernels.cpu import _proc_flags
    torch.set_num_threads(threads)
    version = torch.__version__.split("+")[0]
    w32, x32 = torch.from_numpy(q.astype(np.float32) * np.float32(alpha)), torch.from_numpy(x)
    y32 = torch.empty((x.shape[0], q.shape[0]), dtype=torch.float32)
    with torch.no_grad():
        w32t = w32.t()
        t = timeit(lambda: torch.mm(x32, w32t, out=y32), repeat)
        rows = [dict(method=f"torch {version} float32", mode="fp32", **t,
                     rel_err=rel_err(y32.numpy(), reference("fp32")))]
        if {"avx512_bf16", "amx_bf16"} & _proc_flags():
            xb, wbt = x32.to(torch.bfloat16), w32.to(torch.bfloat16).t()
            yb = torch.empty(y32.shape, dtype=torch.bfloat16)
            t = timeit(lambda: torch.mm(xb, wbt, out=yb), repeat)
            rows.append(dict(method=f"torch {version} bfloat16", mode="bf16", **t,
                             rel_err=rel_err(yb.float().numpy(), y32.numpy())))
        else:
            skipped_baseline("PyTorch bfloat16: this CPU has no native bf16 (AVX512_BF16 / AMX-BF16)")
    return rows


def bench_shape(m, k, n, threads, repeat, backends, rng, modes=("fp32", "int8", "int10")):
    q = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    alpha = 0.05
    w = TernaryWeight(pack_ternary_2bit(q), n, k, alpha, None, name="bench")
    x = rng.standard_normal((m, k)).astype(np.float32)
    dense = (q.astype(np.float32) * np.float32(alpha))
    ops = 2.0 * m * n * k
    rows = []
    refs = {}

    def reference(mode):
        if mode not in refs:
            refs[mode] = blas_reference(x, q, alpha, mode)
        return refs[mode]

    from threadpoolctl import threadpool_limits
    buf = np.empty((m, n), np.float32)
    with threadpool_limits(limits=threads):
        t = timeit(lambda: np.matmul(x, dense.T, out=buf), repeat)
    rows.append(dict(method="numpy float32 matmul", mode="fp32", **t, rel_err=rel_err(buf, reference("fp32"))))
    for name in backends:
        for mode in modes:
            b = get_backend(name, threads=threads, activations=mode)
            out = np.empty((m, n), np.float32)
            r = repeat if name != "numba" or m < 64 else max(1, min(repeat, 2))
            t = timeit(lambda b=b, out=out: b.ternary_matmul(x, w, out=out), r)
            rows.append(dict(method=f"{name}", mode=mode, **t, rel_err=rel_err(out, reference(mode))))
    run = ort_matmulnbits(q, alpha, threads)
    if run is not None:
        last = {}

        def call():
            last["y"] = run(x)

        t = timeit(call, repeat)
        rows.append(dict(method="onnxruntime MatMulNBits 2-bit", mode="acc4", **t,
                         rel_err=rel_err(last["y"], reference("fp32"))))
    rows.extend(torch_matmul_rows(q, alpha, x, threads, repeat, reference))  # PyTorch float32 and native bf16
    base = rows[0]["median_s"]
    for row in rows:
        row.update(M=m, K=k, N=n, gops=ops / row["median_s"] / 1e9, speedup_vs_numpy=base / row["median_s"])
    return rows


def bench_attention(shape, threads, repeat, rng):
    """Softmax attention of the C backend against the NumPy/BLAS reference on q (B, T, H, hd),
    k and v (B, T, Hkv, hd); ops counted as 4 B H T^2 hd (the two products)."""
    from terdit_edge.kernels.reference import NumpyBackend
    b, t, h, hkv, hd = shape
    q = rng.standard_normal((b, t, h, hd)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    ref_be = NumpyBackend(threads=threads)
    out = np.empty_like(q)
    rows = [dict(method="numpy reference attention", **timeit(lambda: ref_be.attention(q, k, v, out=out), repeat))]
    ref = out.copy()
    if available_backends().get("cython") == "ok":
        be = get_backend("cython", threads=threads)
        timed = timeit(lambda: be.attention(q, k, v, out=out), repeat)
        rows.append(dict(method="cython fused attention", **timed, abs_err=float(np.abs(out - ref).max())))
    else:
        skipped_baseline(f"cython fused attention: backend unavailable ({available_backends().get('cython')})")
    ops = 4.0 * b * h * t * t * hd
    for row in rows:
        row.update(shape="x".join(map(str, shape)), gops=ops / row["median_s"] / 1e9,
                   speedup_vs_numpy=rows[0]["median_s"] / row["median_s"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", default=None, help="comma-separated (default: cython and numba if available)")
    ap.add_argument("--shapes", default=None, help="comma-separated MxKxN list")
    ap.add_argument("--modes", default="fp32,int8,int10", help="activation modes (comma list)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time (see the module docstring)")
    ap.add_argument("--attention", default="2x256x32x32x48",
                    help="BxTxHxHkvxhd attention shape to time as well ('' to skip; default: TerDiT-600M)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    status = available_backends()
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in ("cython", "numba") if status.get(b) == "ok"]
        for b in ("cython", "numba"):
            if status.get(b) != "ok":
                skipped_baseline(f"terdit-edge {b} backend: {status.get(b)}")
    shapes = DEFAULT_SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rng = np.random.default_rng(0)
    info = dict(cpu=cpu_model(), threads=args.threads, repeat=args.repeat, clock=args.clock,
                numpy=np.__version__, load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                backends={b: status.get(b) for b in ("cython", "numba")})
    try:
        from terdit_edge.kernels.cpu import cpu_features
        info["cpu_features"] = cpu_features()
    except Exception:  # noqa: BLE001 - informational only
        pass
    results = []
    for m, k, n in shapes:
        results.extend(bench_shape(m, k, n, args.threads, args.repeat, backends, rng,
                                   tuple(args.modes.split(","))))
        if not args.json:
            print(f"... {m}x{k}x{n} done", file=sys.stderr)
    att = []
    if args.attention:
        att = bench_attention(tuple(int(v) for v in args.attention.split("x")), args.threads, args.repeat, rng)
    if args.json:
        print(json.dumps(dict(info=info, results=results, attention=att), indent=1))
        return 0
    load = info["load_average"]
    print(f"# {info['cpu']}, {args.threads} threads, median of {args.repeat} ({args.clock} clock); "
          f"kernel path: {info.get('cpu_features', {}).get('isa')}"
          + (f"; load average at start {load[0]:.1f}" if load else ""))
    print(f"{'M x K x N':>18} | {'method':<30} | {'mode':<5} | {'median ms':>9} | {'best-worst ms':>17} | "
          f"{'GOP/s':>7} | {'x numpy':>7} | {'rel err':>8}")
    for r in results:
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        spread = f"{r['best_s'] * 1e3:.3f}-{r['worst_s'] * 1e3:.3f}"
        print(f"{r['M']:>5} x{r['K']:>5} x{r['N']:>5} | {r['method']:<30} | {r['mode']:<5} | "
              f"{r['median_s'] * 1e3:9.3f} | {spread:>17} | {r['gops']:7.1f} | {r['speedup_vs_numpy']:7.2f} | {err:>8}")
    for r in att:
        err = f"{r['abs_err']:.1e}" if "abs_err" in r else ""
        spread = f"{r['best_s'] * 1e3:.3f}-{r['worst_s'] * 1e3:.3f}"
        print(f"attention {r['shape']:>16} | {r['method']:<30} | fp32  | {r['median_s'] * 1e3:9.3f} | "
              f"{spread:>17} | {r['gops']:7.1f} | {r['speedup_vs_numpy']:7.2f} | {err:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
