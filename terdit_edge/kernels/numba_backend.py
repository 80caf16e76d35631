"""Numba backend: the same packed tdit2-k128 weights, compiled by Numba when the C extension is
not built. Each row of Q is decoded once into the lists of positions holding +1 and -1; every
token then adds the activations at the first list and subtracts those at the second, so no weight
is ever multiplied. Rows run in parallel (``prange``); ``threads`` bounds Numba's thread count.

int8 mode quantizes with :func:`~terdit_edge.kernels.reference.quantize_rows_int8` itself, so the
integer sums equal the reference's exactly.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import TernaryWeight
from .reference import NumpyBackend, quantize_rows_int8

try:
    import numba
    from numba import njit, prange
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - numba is a declared dependency
    numba = None
    _IMPORT_ERROR = str(e)


if numba is not None:
    @njit(cache=True, nogil=True)
    def _row_signs(packed_row, k, pos, neg):
        """Fill pos/neg with the k indices whose weight is +1 / -1; return their counts."""
        npos = 0
        nneg = 0
        for byte in range(packed_row.shape[0]):
            v = packed_row[byte]
            k0 = (byte // 32) * 128 + byte % 32
            for q in range(4):
                code = (v >> (2 * q)) & 3
                kk = k0 + 32 * q
                if kk < k:
                    if code == 2:
                        pos[npos] = kk
                        npos += 1
                    elif code == 0:
                        neg[nneg] = kk
                        nneg += 1
        return npos, nneg

    @njit(parallel=True, cache=True)
    def _ternary_f32(x, packed, k, alpha, bias, has_bias, out):
        m = x.shape[0]
        for row in prange(packed.shape[0]):
            pos = np.empty(k, np.int64)
            neg = np.empty(k, np.int64)
            npos, nneg = _row_signs(packed[row], k, pos, neg)
            for t in range(m):
                acc = np.float32(0.0)
                for i in range(npos):
                    acc += x[t, pos[i]]
                for i in range(nneg):
                    acc -= x[t, neg[i]]
                r = acc * alpha
                if has_bias:
                    r = r + bias[row]
                out[t, row] = r

    @njit(parallel=True, cache=True)
    def _ternary_i8(xq, scale, packed, k, alpha, bias, has_bias, out):
        m = xq.shape[0]
        for row in prange(packed.shape[0]):
            pos = np.empty(k, np.int64)
            neg = np.empty(k, np.int64)
            npos, nneg = _row_signs(packed[row], k, pos, neg)
            for t in range(m):
                acc = 0
                for i in range(npos):
                    acc += np.int32(xq[t, pos[i]])
                for i in range(nneg):
                    acc -= np.int32(xq[t, neg[i]])
                # the reference's two float32 roundings: float(acc) * (scale * alpha), then + bias
                s = scale[t] * alpha
                r = np.float32(acc) * s
                if has_bias:
                    r = r + bias[row]
                out[t, row] = r


class NumbaBackend(NumpyBackend):
    """Ternary matmul compiled by Numba (fp32 and int8 modes); other ops from the reference."""

    name = "numba"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if numba is None:
            return f"numba is not installed ({_IMPORT_ERROR})"
        return None

    def _set_threads(self) -> None:
        numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))

    def ternary_matmul(self, x: np.ndarray, w: TernaryWeight, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 (M, K) -> float32 (M, N) = alpha * x Q^T + bias; into `out` when given."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != w.k:
            raise InputError(f"ternary layer {w.name or ''!r} expects x of shape (M, {w.k}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = x.shape[0]
        if out is None:
            out = np.empty((m, w.n), dtype=np.float32)
        elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (m, w.n)
              or not out.flags.writeable):
            raise InputError(f"out must be a writable float32 array of shape {(m, w.n)}")
        if m == 0 or w.n == 0:
            return out
        has_bias = w.bias is not None
        bias = np.ascontiguousarray(w.bias, dtype=np.float32) if has_bias else np.zeros(1, np.float32)
        alpha = np.float32(w.alpha)
        self._set_threads()
        if self.activations == "int8":
            xq, scale = quantize_rows_int8(x)
            _ternary_i8(xq, scale, w.packed, w.k, alpha, bias, has_bias, out)
        else:
            _ternary_f32(x, w.packed, w.k, alpha, bias, has_bias, out)
        return out
