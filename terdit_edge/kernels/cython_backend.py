"""The compiled CPU backend: ternary GEMM and fused per-token ops in C (one table of kernels per
instruction set, ``td_tables[]`` in src_cy/ternary_gemm.c: AVX-512, AVX2, NEON dot product, NEON,
portable; chosen at run time), reached through the Cython module ``terdit_edge._ternary``.

Inputs are checked here (shapes, dtypes, contiguity) so that a wrong call raises
:class:`~terdit_edge.errors.InputError`; arrays that are float32 and C-contiguous already are used
in place, anything else is converted once. The environment variable ``TERDIT_ISA`` (a name of
``_ternary.supported_isas()``: ``scalar``, ``avx2``, ``avx512``, ``neon``, ``neon-dotprod``) forces a
kernel path, e.g. to compare paths.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .base import TernaryWeight, activation_bits, check_matmul_args
from .reference import NumpyBackend

# OpenMP threads that finish a kernel early, or wait for the next one, spin only briefly (1000
# iterations, tens of microseconds) before they sleep; libgomp's default spins for milliseconds. On a
# machine whose cores are shared with other processes a spinning thread takes CPU time from the thread
# everyone is waiting for: one guided 600M step with 2 threads took 5.4-6.4 s with the default spin,
# 2.8-3.1 s with GOMP_SPINCOUNT=20000, 2.4 s passive (OMP_WAIT_POLICY=PASSIVE). Fully passive threads,
# though, are woken by the kernel's scheduler for every parallel region and, after other libraries'
# thread pools had run (OpenBLAS), were often woken on the core of the calling thread: a 0.08 ms GEMV
# then took 0.15 ms, its two halves run one after the other. A 1000-iteration spin keeps the worker
# on its core between back-to-back kernels: 0.078 ms in both cases, and the loaded 600M step is as
# fast as passive (1.73 vs 1.74 s with a busy loop on the other core; 10000 iterations: 1.88 s).
# See docs/kernels.md. libgomp reads the variable once, when it is loaded with the extension, so it
# is set only around that import (child processes, e.g. a PyTorch baseline, keep the environment
# they were given); an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins.
_SPIN = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if _SPIN:
    os.environ["GOMP_SPINCOUNT"] = "1000"
try:
    from .. import _ternary
    _IMPORT_ERROR = None
except ImportError as e:  # extension not built
    _ternary = None
    _IMPORT_ERROR = str(e)
finally:
    if _SPIN:
        del os.environ["GOMP_SPINCOUNT"]

if _ternary is not None and os.environ.get("TERDIT_ISA"):
    _ternary.set_isa(os.environ["TERDIT_ISA"])


def _f32(a: np.ndarray, what: str) -> np.ndarray:
    """a as a C-contiguous float32 array (no copy when it already is one)."""
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":
        raise InputError(f"{what} must hold real numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _writable_f32(out: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise InputError(f"{what} must be a writable C-contiguous float32 array")
    if out.shape != tuple(shape):
        raise InputError(f"{what} has shape {out.shape}, expected {tuple(shape)}")
    return out


def _in_place_ok(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable


class CythonBackend(NumpyBackend):
    """C kernels: ternary matmul in fp32 or int8 activation mode, fused per-token ops."""

    name = "cython"
    # Every row is computed alone at any row count: fp32 always runs the table GEMMs, whose summation
    # order is fixed by K on every ISA (scalar, AVX2, AVX-512, NEON), and the integer modes sum exactly
    # whatever the kernel. So the model may run any layer on the whole batch at once.
    invariant_min_rows = 1
    attention_modes = ("fp32", "int8")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if _ternary is None:
            return (f"the compiled extension terdit_edge._ternary is not built ({_IMPORT_ERROR}); "
                    "run `python3 setup.py build_ext --inplace`")
        return None

    def describe(self) -> str:
        return f"{self.name} [{_ternary.get_isa()}] ({self._mode_text()}, {self.threads} threads)"

    # --- ternary linear -------------------------------------------------------------------
    def ternary_matmul(self, x: np.ndarray, w: TernaryWeight, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 (M, K) -> float32 (M, N) = alpha * x Q^T + bias; into `out` when given."""
        x = check_matmul_args(x, w, out)
        m = x.shape[0]
        if out is None:
            out = np.empty((m, w.n), dtype=np.float32)
        else:
            _writable_f32(out, (m, w.n), "out")
        packed = w.packed if w.packed.flags.c_contiguous else np.ascontiguousarray(w.packed)
        bias = None if w.bias is None else np.ascontiguousarray(w.bias, dtype=np.float32)
        _ternary.gemm(x, packed, w.k, w.alpha, bias, out, self.threads, activation_bits(self.activations))
        return out

    def dense(self, x, weight, bias=None, rows_per_image=None):
        """Full-precision linear x (M, K) @ weight (N, K)^T + bias in C, float32 (M, N).

        Not BLAS: each output sums in an order fixed by K alone (eight partial sums over k mod 8, no
        FMA), so the embedders and the final layer give the same bits on every CPU, with any batch
        and thread count (``rows_per_image`` needs no special handling; docs/reproducibility.md).
        """
        x = _f32(x, "x")
        weight = _f32(weight, "weight")
        if x.ndim != 2 or weight.ndim != 2:
            raise InputError(f"dense expects x (M, K) and weight (N, K), got {x.shape} and {weight.shape}")
        out = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
        _ternary.dense(x, weight, None if bias is None else _f32(bias, "bias"), out, self.threads)
        return out

    # --- fused per-token ops ----------------------------------------------------------------
    def rmsnorm_modulate(self, x, weight, shift, scale, eps, out=None):
        """RMSNorm(x) * weight * (1 + scale) + shift in one pass. x (B, T, D); weight (D,);
        shift, scale (B, D); float32 (B, T, D)."""
        x = _f32(x, "x")
        if x.ndim != 3:
            raise InputError(f"rmsnorm_modulate expects x of shape (B, T, D), got {x.shape}")
        if out is None:
            out = np.empty_like(x)
        else:
            _writable_f32(out, x.shape, "out")
        _ternary.rmsnorm_modulate(x, _f32(weight, "weight"), _f32(shift, "shift"), _f32(scale, "scale"),
                                  float(eps), out, self.threads)
        return out

    def layernorm(self, x, weight, bias, eps):
        """LayerNorm over the last axis (biased variance); weight/bias None for no affine."""
        x = _f32(x, "x")
        if x.ndim == 0 or x.shape[-1] == 0:
            return super().layernorm(x, weight, bias, eps)
        out = np.empty_like(x)
        d = x.shape[-1]
        _ternary.layernorm(x.reshape(-1, d), None if weight is None else _f32(weight, "weight"),
                           None if bias is None else _f32(bias, "bias"), float(eps),
                           out.reshape(-1, d), self.threads)
        return out

    def swiglu(self, a, b, out=None):
        """silu(a) * b elementwise (a, b of one shape), float32."""
        a = _f32(a, "a")
        b = _f32(b, "b")
        if a.shape != b.shape:
            raise InputError(f"swiglu needs a and b of one shape, got {a.shape} and {b.shape}")
        if out is None:
            out = np.empty_like(a)
        else:
            _writable_f32(out, a.shape, "out")
        _ternary.swiglu(a.reshape(-1), b.reshape(-1), out.reshape(-1), self.threads)
        return out

    def add_gated(self, x, gate, y):
        """x += gate[:, None, :] * y in place. x, y (B, T, D); gate (B, D)."""
        if not _in_place_ok(x) or x.ndim != 3:
            return super().add_gated(x, gate, y)  # only a float32 C-contiguous x can be updated in C
        _ternary.add_gated(x, _f32(gate, "gate"), _f32(y, "y"), self.threads)
        return x

    def rope(self, x, cos, sin):
        """Rotate consecutive pairs of each head in place. x (B, T, H, hd); cos, sin (T, hd/2)."""
        if not _in_place_ok(x) or x.ndim != 4:
            return super().rope(x, cos, sin)
        _ternary.rope(x, _f32(cos, "cos"), _f32(sin, "sin"), self.threads)
        return x

    # --- attention --------------------------------------------------------------------------
    def attention(self, q, k, v, out=None):
        """Softmax attention, not causal, fused in C (no (T, T) matrix is stored).
        q (B, T, H, hd); k, v (B, T, Hkv, hd) with H a multiple of Hkv (grouped-query attention:
        head h reads kv head h // (H // Hkv)); returns float32 (B, T, H, hd), into `out` when given.
        With attention="int8" the products are int8 Q K^T and integer P V (td_attention_int8)."""
        q, k, v = _f32(q, "q"), _f32(k, "k"), _f32(v, "v")
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise InputError(f"attention expects q, k, v of shape (B, T, H, hd), got {q.shape}, {k.shape}, "
                             f"{v.shape}")
        if out is None:
            out = np.empty_like(q)
        else:
            _writable_f32(out, q.shape, "out")
        # the kernel reads k and v while it writes out: an overlapping out goes through a copy
        target = out
        if any(np.may_share_memory(out, a) for a in (q, k, v)):
            target = np.empty_like(q)
        _ternary.attention(q, k, v, target, self.threads, mode=self.attention_mode)
        if target is not out:
            out[...] = target
        return out
