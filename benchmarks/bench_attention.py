"""Fused softmax attention of the C kernels: GFLOP/s, the fraction of the machine's FMA peak, and the
speed-up over an earlier version of the kernel, all measured in one process.

    python benchmarks/bench_attention.py [--shapes 2x1024x32x96,2x256x32x48,...] [--threads 1,2]
                                         [--isas avx2,avx512] [--baseline REV | --no-baseline]
                                         [--rounds 7] [--no-int8] [--json]

A shape is B x T x H x hd (batch, tokens, heads, head dim); the default list covers the TerDiT
models: 600M at 256 px (2 x 256 x 32 x 48), 4.2B at 256 px (2 x 256 x 32 x 96) and at 512 px
(2 x 1024 x 32 x 96), plus head dims 64 and 128. An attention call does 4 B H T^2 hd floating-point
operations (q k^T and the weighted sum of values; the softmax is not counted).

FMA peak: the same process runs the ISA's FMA loop (`_ternary.fma_peak`: independent chains of the
widest vector FMA) on the same number of threads, right before the shape's timing, and reports the
best of five; "of peak" is the kernel's GFLOP/s over it.

Baseline: the C extension of git revision REV (default: 18338ea, the attention kernel before its
blocked version) is built once from `git archive` into $TERDIT_BENCH_CACHE (default
~/.cache/terdit-edge-bench/ext-REV, needs Cython and a C compiler) and loaded beside the current one
(the two modules have their own ISA switches). Each round times one call of the baseline and one of
the current kernel, alternating, so that a slow period of a shared machine hits both; the ratio is
the median of the per-round ratios. Outputs are checked against the NumPy reference first (maximum
error relative to the largest output value; the bound the tests hold is 1e-5).

int8 attention (`_ternary.attention(..., mode="int8")`, unless --no-int8): timed in the same rounds,
alternating with the fp32 kernel of this build; "int8" is the median of the per-round ratios
fp32 time / int8 time, "rel L2" the relative L2 distance of its output from the fp32 kernel's, and
"of int8 peak" the same 4 B H T^2 hd operations per int8 second over the ISA's int8 dot-product loop
(`_ternary.i8dot_peak`: vpdpbusd on AVX-512, the sign/maddubs/madd/add sequence on AVX2, SDOT on NEON
dot product, SMULL + SADALP on plain NEON), measured in
the same run (Q K^T runs on those instructions, P V on int16 multiply-adds at half their rate).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from terdit_edge import _ternary  # noqa: E402
from terdit_edge.kernels.reference import NumpyBackend  # noqa: E402

DEFAULT_SHAPES = ["2x256x32x48", "2x256x32x96", "2x1024x32x96", "2x1024x32x48", "2x1024x24x64", "2x1024x24x128"]
DEFAULT_BASELINE = "18338ea"


def _cache_dir() -> str:
    d = os.environ.get("TERDIT_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "terdit-edge-bench"))
    os.makedirs(d, exist_ok=True)
    return d


def baseline_module(rev: str):
    """The `_ternary` extension of git revision `rev`, built once into the cache and loaded under
    another module name. Returns (module, description) or (None, why not)."""
    try:
        full = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, f"git revision {rev!r} not found (run from a git clone, or pass --no-baseline)"
    dest = os.path.join(_cache_dir(), f"ext-{full[:12]}")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    so = os.path.join(dest, "terdit_edge", f"_ternary{suffix}")
    if not os.path.exists(so):
        print(f"building the extension of {full[:12]} in {dest} (once) ...", file=sys.stderr)
        tmp = tempfile.mkdtemp(prefix="ext-", dir=_cache_dir())
        archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", full], capture_output=True, check=True)
        tar_path = os.path.join(tmp, "src.tar")
        with open(tar_path, "wb") as f:
            f.write(archive.stdout)
        with tarfile.open(tar_path) as tf:
            tf.extractall(tmp, filter="data")
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp, capture_output=True,
                           text=True)
        if r.returncode != 0:
            return None, "build failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        os.replace(tmp, dest)
    loader = importlib.machinery.ExtensionFileLoader("_ternary", so)
    spec = importlib.util.spec_from_file_location("_ternary", so, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod, f"git {full[:12]}"


def loop_peak(loop, threads: int, seconds: float = 0.2) -> float:
    """G operations/s of one of the extension's peak loops (``loop(iters, threads)`` returns the
    operations it did, 2 per multiply-add), sized to ~`seconds`, best of five runs."""
    iters = 1 << 16
    while True:  # size the loop to ~`seconds`
        t0 = time.perf_counter()
        loop(iters, threads)
        dt = time.perf_counter() - t0
        if dt > seconds / 4:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / dt))
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        ops = loop(iters, threads)
        best = max(best, ops / (time.perf_counter() - t0) / 1e9)
    return best


def fma_peak(threads: int, seconds: float = 0.2) -> float:
    """GFLOP/s of the current ISA's FMA loop on `threads` threads."""
    return loop_peak(_ternary.fma_peak, threads, seconds)


def i8dot_peak(threads: int, seconds: float = 0.2) -> float:
    """G operations/s of the current ISA's int8 dot-product loop on `threads` threads."""
    return loop_peak(_ternary.i8dot_peak, threads, seconds)


def parse_shape(s: str) -> tuple[int, int, int, int]:
    try:
        b, t, h, hd = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r} is not BxTxHxhd (four integers)") from None
    if min(b, t, h, hd) < 1:
        raise argparse.ArgumentTypeError(f"shape {s!r}: every dimension must be >= 1")
    return b, t, h, hd


def run_shape(shape, threads: int, isa: str, base, rounds: int, int8: bool = False) -> dict:
    b, t, h, hd = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, h, hd), dtype=np.float32) for _ in range(3))
    out = np.empty_like(q)
    _ternary.attention(q, k, v, out, threads)
    ref = NumpyBackend().attention(q, k, v)
    err = float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())
    row = {"shape": "x".join(map(str, shape)), "isa": isa, "threads": threads, "max_rel_err_vs_numpy": err}
    flops = 4.0 * b * h * t * t * hd
    base_out = np.empty_like(q) if base is not None else None
    if base is not None:
        base.attention(q, k, v, base_out, threads)  # warm-up
        row["baseline_max_rel_diff"] = float(np.abs(base_out - out).max() / np.abs(out).max())
    ours, theirs, ratios = [], [], []
    out8, t8, r8 = (np.empty_like(q), [], []) if int8 else (None, None, None)
    if int8:
        _ternary.attention(q, k, v, out8, threads, mode="int8")  # warm-up
        row["int8_rel_l2_vs_fp32"] = float(np.linalg.norm(out8 - out) / np.linalg.norm(out))
    for _ in range(rounds):
        t0 = time.perf_counter()
        _ternary.attention(q, k, v, out, threads)
        ours.append(time.perf_counter() - t0)
        if int8:
            t0 = time.perf_counter()
            _ternary.attention(q, k, v, out8, threads, mode="int8")
            t8.append(time.perf_counter() - t0)
            r8.append(ours[-1] / t8[-1])
        if base is not None:
            t0 = time.perf_counter()
            base.attention(q, k, v, base_out, threads)
            theirs.append(time.perf_counter() - t0)
            ratios.append(theirs[-1] / ours[-1])
    row["ms"] = statistics.median(ours) * 1e3
    row["gflops"] = flops / statistics.median(ours) / 1e9
    if base is not None:
        row["baseline_ms"] = statistics.median(theirs) * 1e3
        row["baseline_gflops"] = flops / statistics.median(theirs) / 1e9
        row["speedup"] = statistics.median(ratios)
    if int8:
        row["int8_ms"] = statistics.median(t8) * 1e3
        row["int8_gops"] = flops / statistics.median(t8) / 1e9
        row["int8_speedup"] = statistics.median(r8)
        row["int8_speedup_range"] = [min(r8), max(r8)]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma list of BxTxHxhd")
    ap.add_argument("--threads", default=None, help="comma list (default: 1 and all CPUs)")
    ap.add_argument("--isas", default=None, help="comma list of ISA paths (default: the best one)")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with")
    ap.add_argument("--no-baseline", action="store_true", help="no comparison with an earlier version")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-int8", action="store_true", help="do not time the int8 attention beside fp32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    from terdit_edge.kernels import default_threads

    threads = [int(x) for x in args.threads.split(",")] if args.threads else sorted({1, default_threads()})
    supported = list(_ternary.supported_isas())
    isas = args.isas.split(",") if args.isas else [_ternary.get_isa()]
    for isa in isas:
        if isa not in supported:
            ap.error(f"ISA {isa!r} is not supported here (supported: {', '.join(supported)})")
    base, base_desc = (None, "none (--no-baseline)") if args.no_baseline else baseline_module(args.baseline)
    if base is None and not args.no_baseline:
        print(f"SKIPPED baseline: {base_desc}", file=sys.stderr)
    rows = []
    for isa in isas:
        _ternary.set_isa(isa)
        if base is not None:
            base.set_isa(isa)
        for th in threads:
            peak = fma_peak(th)
            peak8 = None if args.no_int8 else i8dot_peak(th)
            for shape in shapes:
                row = run_shape(shape, th, isa, base, args.rounds, int8=not args.no_int8)
                row["fma_peak_gflops"] = peak
                row["of_peak"] = row["gflops"] / peak
                if peak8:
                    row["i8dot_peak_gops"] = peak8
                    row["int8_of_i8dot_peak"] = row["int8_gops"] / peak8
                rows.append(row)
                if not args.json:
                    print(_line(row), flush=True)
    if args.json:
        print(json.dumps({"baseline": base_desc, "rows": rows}, indent=2))
    else:
        print(f"baseline: {base_desc}; GFLOP/s = 4 B H T^2 hd / median time of {args.rounds} rounds; "
              "peak = the same ISA's FMA loop, same threads, this run")


def _line(r: dict) -> str:
    s = (f"{r['shape']:>14s} {r['isa']:>7s} thr {r['threads']}: {r['ms']:8.2f} ms {r['gflops']:7.1f} GFLOP/s "
         f"= {r['of_peak']:5.1%} of peak {r['fma_peak_gflops']:6.1f}; err vs numpy {r['max_rel_err_vs_numpy']:.1e}")
    if "speedup" in r:
        s += f"; baseline {r['baseline_ms']:8.2f} ms ({r['baseline_gflops']:6.1f}): {r['speedup']:.2f}x"
    if "int8_ms" in r:
        lo, hi = r["int8_speedup_range"]
        s += (f"\n{'':>14s} int8 {r['int8_ms']:8.2f} ms {r['int8_gops']:7.1f} Gop/s = "
              f"{r['int8_of_i8dot_peak']:5.1%} of int8 peak {r['i8dot_peak_gops']:6.1f}; "
              f"{r['int8_speedup']:.2f}x fp32 [{lo:.2f}-{hi:.2f}]; rel L2 vs fp32 {r['int8_rel_l2_vs_fp32']:.2e}")
    return s


if __name__ == "__main__":
    main()
