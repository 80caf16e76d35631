"""Numba backend: the same packed tdit2-k128 weights, compiled by Numba when the C extension is
not built. Each row of Q is decoded once into the lists of positions holding +1 and -1; the
activations (transposed, tokens contiguous) at the first list are added and those at the second
subtracted, for all tokens at once, so no weight is ever multiplied. Rows run in parallel
(``prange``); ``threads`` bounds Numba's thread count.

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


_ROWS = 64  # rows of Q per parallel work item

if numba is not None:
    @njit(cache=True, nogil=True)
    def _row_signs(packed_row, k, pos, neg):
        """Fill pos/neg with the k indices whose weight is +1 / -1; return their counts."""
        npos = 0
        nneg = 0
        kb_full = min(packed_row.shape[0], (k // 128) * 32)  # bytes whose weights all lie below k
        for byte in range(packed_row.shape[0]):
            v = np.int64(packed_row[byte])
            k0 = (byte // 32) * 128 + byte % 32
            for q in range(4):
                code = (v >> (2 * q)) & 3
                kk = k0 + 32 * q
                if byte >= kb_full and kk >= k:
                    continue
                # branch-free: random codes would make a branch mispredict every other weight
                pos[npos] = kk
                neg[nneg] = kk
                npos += code == 2
                nneg += code == 0
        return npos, nneg

    @njit(parallel=True, cache=True)
    def _signed_sums(xt, packed, k, acc_out):
        """acc_out (N, M) = for each row of Q: sum of xt[k] where Q = +1 minus where Q = -1.

        xt is x transposed, (K, M): the inner loop runs over tokens, contiguous, so LLVM
        vectorizes it; float32 or int32 sums follow xt's dtype."""
        n = packed.shape[0]
        m = xt.shape[1]
        nchunk = (n + _ROWS - 1) // _ROWS
        for c in prange(nchunk):
            pos = np.empty(k + 1, np.int64)  # scratch reused by the chunk's rows
            neg = np.empty(k + 1, np.int64)
            for row in range(c * _ROWS, min(n, (c + 1) * _ROWS)):
                npos, nneg = _row_signs(packed[row], k, pos, neg)
                for t in range(m):
                    acc_out[row, t] = 0
                for i in range(npos):
                    kk = pos[i]
                    for t in range(m):
                        acc_out[row, t] += xt[kk, t]
                for i in range(nneg):
                    kk = neg[i]
                    for t in range(m):
                        acc_out[row, t] -= xt[kk, t]


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
            raise InputError(f"ternary layer {w.name or '(unnamed)'} expects x of shape (M, {w.k}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = x.shape[0]
        if out is None:
            out = np.empty((m, w.n), dtype=np.float32)
        elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (m, w.n)
              or not out.flags.writeable):
            raise InputError(f"out must be a writable float32 array of shape {(m, w.n)}")
        if m == 0 or w.n == 0:
            return out
        self._set_threads()
        if self.activations == "int8":
            xq, scale = quantize_rows_int8(x)
            acc = np.empty((w.n, m), dtype=np.int32)
            _signed_sums(np.ascontiguousarray(xq.T, dtype=np.int32), w.packed, w.k, acc)
            # the reference's two float32 roundings: float(acc) * (scale * alpha), then + bias
            np.multiply(acc.T.astype(np.float32), scale[:, None] * np.float32(w.alpha), out=out)
        else:
            acc = np.empty((w.n, m), dtype=np.float32)
            _signed_sums(np.ascontiguousarray(x.T), w.packed, w.k, acc)
            np.multiply(acc.T, np.float32(w.alpha), out=out)
        if w.bias is not None:
            out += w.bias
        return out
