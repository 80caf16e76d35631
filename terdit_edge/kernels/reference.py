"""The NumPy reference backend: the yardstick every fast backend is tested against.

The ternary matmul forms no product with a weight: for each output it adds the activations whose
weight is +1, subtracts those whose weight is -1, and scales the difference once by alpha.
It is written for clarity, not speed.
"""
from __future__ import annotations

import numpy as np

from .. import detmath
from ..errors import InputError
from ..packing import unpack_ternary_2bit
from .base import TernaryWeight, activation_bits, check_matmul_args

try:  # threadpoolctl bounds BLAS threads so that `threads=` holds for the dense matmuls too
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - threadpoolctl is a declared dependency
    ThreadpoolController = None

_controller = None


def _blas_controller():
    """One ThreadpoolController per process: finding the BLAS libraries costs ~1 ms, limiting is cheap."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller

# Gathered activations per chunk (elements); bounds the reference's temporary memory.
_GATHER_ELEMENTS = 1 << 22
# Dense layers below this many multiply-adds run on one BLAS thread.
_SMALL_DENSE_FLOPS = 1 << 22


def quantize_rows(x: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax quantization to signed `bits`-bit integers, shared by every integer backend.

    Returns (xq (M, K), scale float32 (M,)) with x ~= xq * scale[:, None], L = 2^(bits-1) - 1:
    scale = absmax / L, xq = clip(rint(x * (L / absmax)), -L, L), all in float32; an all-zero row
    has scale 0 and xq 0. xq is int8 for bits <= 8, int16 above.
    """
    if not 2 <= bits <= 10:
        raise ValueError(f"bits must be in 2..10, got {bits}")
    lim = np.float32((1 << (bits - 1)) - 1)
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    safe = np.where(absmax > 0, absmax, np.float32(1))
    inv = (lim / safe).astype(np.float32)
    xq = np.clip(np.rint(x * inv[:, None]), -lim, lim).astype(np.int8 if bits <= 8 else np.int16)
    scale = np.where(absmax > 0, absmax / lim, np.float32(0)).astype(np.float32)
    return xq, scale


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_rows` with 8 bits: (xq int8 (M, K), scale float32 (M,)), scale = absmax / 127."""
    return quantize_rows(x, 8)


def _signed_sums(x: np.ndarray, q: np.ndarray, sign: int, acc_dtype) -> np.ndarray:
    """For each row n of q: sum over k with q[n, k] == sign of x[:, k]. Shape (M, N)."""
    m = x.shape[0]
    n = q.shape[0]
    rows, cols = np.nonzero(q == sign)  # row-major, so cols are grouped by row
    counts = np.bincount(rows, minlength=n)
    out = np.zeros((m, n), dtype=acc_dtype)
    if cols.size == 0:
        return out
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    nonempty = counts > 0
    gathered = x[:, cols].astype(acc_dtype, copy=False)
    sums = np.add.reduceat(gathered, np.minimum(starts, cols.size - 1), axis=1)
    out[:, nonempty] = sums[:, nonempty]
    return out


def ternary_matmul_reference(x: np.ndarray, w: TernaryWeight, activations: str = "fp32") -> np.ndarray:
    """y (M, N) float32 = alpha * x Q^T + bias, by selected additions and subtractions only."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m = x.shape[0]
    bits = activation_bits(activations)
    if bits:
        xq, scale = quantize_rows(x, bits)
        src, acc_dtype = xq, np.int32
    else:
        src, acc_dtype = x, np.float32
    y = np.empty((m, w.n), dtype=np.float32)
    rows_per_chunk = max(1, _GATHER_ELEMENTS // max(1, m * w.k))
    for n0 in range(0, w.n, rows_per_chunk):
        q = unpack_ternary_2bit(w.packed[n0:n0 + rows_per_chunk], w.k)
        diff = _signed_sums(src, q, 1, acc_dtype) - _signed_sums(src, q, -1, acc_dtype)
        if bits:
            y[:, n0:n0 + q.shape[0]] = diff.astype(np.float32) * (scale[:, None] * np.float32(w.alpha))
        else:
            y[:, n0:n0 + q.shape[0]] = diff * np.float32(w.alpha)
    if w.bias is not None:
        y += w.bias
    return y


class NumpyBackend:
    """Reference implementations of every op the model needs. Fast backends subclass it and
    override what they accelerate; shapes and dtypes below are the contract.
    """

    name = "numpy"
    # ternary_matmul computes every row by itself (same summation order whatever the row count) in
    # calls of at least this many rows; below it a backend may switch to a small-batch kernel that
    # sums in another order. The model runs layers with fewer rows per image image by image.
    invariant_min_rows = 1
    # whether an image's numbers are promised (and tested) to be the same in every batch and with
    # any thread count (docs/reproducibility.md); `terdit-edge info` shows it
    batch_invariant = True

    # attention modes this backend runs (ATTENTION_MODES); int8 attention is a C kernel
    attention_modes = ("fp32",)

    def __init__(self, threads: int = 1, activations: str = "fp32", attention: str = "fp32"):
        if attention not in type(self).attention_modes:
            raise InputError(f"the {self.name} backend has no {attention!r} attention (it runs "
                             f"{', '.join(type(self).attention_modes)}); int8 attention needs the cython backend")
        self.threads = threads
        self.activations = activations
        self.attention_mode = attention

    def _mode_text(self) -> str:
        return self.activations + (f", {self.attention_mode} attention" if self.attention_mode != "fp32" else "")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def describe(self) -> str:
        return f"{self.name} ({self._mode_text()}, {self.threads} threads)"

    def thread_limit(self, threads: int | None = None):
        """Context manager bounding BLAS threads to `threads` (default self.threads)."""
        if ThreadpoolController is None:  # pragma: no cover
            import contextlib
            return contextlib.nullcontext()
        return _blas_controller().limit(limits=threads or self.threads, user_api="blas")

    # --- ternary linear -------------------------------------------------------------------
    def ternary_matmul(self, x: np.ndarray, w: TernaryWeight, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 (M, K) -> float32 (M, N); written into `out` when given."""
        y = ternary_matmul_reference(check_matmul_args(x, w, out), w, self.activations)
        if out is None:
            return y
        out[...] = y
        return out

    def prepare(self, w: TernaryWeight) -> TernaryWeight:
        """Hook for backends that want a weight in another form (e.g. uploaded to a GPU)."""
        return w

    def quantize(self, x):
        """x (M, K) prepared for several ternary_matmul calls that read it (q, k and v; w1 and w3):
        what ternary_matmul takes in place of x, row slices [r0:r1] included. A backend whose GEMM
        quantizes inside (every CPU backend: the C kernels take float rows; the result is the same
        bits, the per-token scales being a function of the row) returns x; CUDA quantizes once."""
        return x

    # --- the backend's arrays -----------------------------------------------------------------
    # The model keeps its parameters, workspaces and activations in the backend's arrays: NumPy
    # arrays here, device arrays for CUDA. Only the model's input and output cross to the host.
    def asarray(self, a) -> np.ndarray:
        """A host array as this backend's float32 array (here: the array itself when it is float32 and
        C-contiguous already, e.g. a parameter mapped from the file; else a contiguous copy)."""
        if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous:
            return a
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_host(self, a) -> np.ndarray:
        """One of this backend's arrays as a host NumPy array."""
        return np.asarray(a)

    def empty(self, shape) -> np.ndarray:
        """An uninitialised float32 workspace of this backend."""
        return np.empty(shape, dtype=np.float32)

    # --- conditioning ----------------------------------------------------------------------
    def silu(self, x):
        """x * sigmoid(x) elementwise, as x / (1 + exp(-x)) in float32 with detmath's exp (not NumPy's
        CPU-dispatched one: the same bits on every CPU, docs/reproducibility.md)."""
        return detmath.silu32(x)

    def condition(self, t_emb, table, y):
        """silu(t_emb + table[y]): the conditioning vector of each image. t_emb (B, C); table
        (classes + 1, C); y (B,) host integer labels. Returns float32 (B, C)."""
        return np.ascontiguousarray(self.silu(t_emb + table[y]), dtype=np.float32)

    def modulation(self, mod, n: int) -> list:
        """The n (B, D) column blocks of an adaLN output mod (B, n D), in order (shift, scale, gate, ...):
        arrays the per-token ops accept as shift, scale and gate."""
        return [np.ascontiguousarray(m) for m in np.split(mod, n, axis=1)]

    # --- per-token ops ----------------------------------------------------------------------
    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight."""
        ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
        return (x * (np.float32(1) / np.sqrt(ms + np.float32(eps)))) * weight

    def rmsnorm_modulate(self, x, weight, shift, scale, eps, out=None):
        """RMSNorm(x) * (1 + scale) + shift. x (B, T, D); weight (D,); shift, scale (B, D)."""
        h = self.rmsnorm(x, weight, eps) * (np.float32(1) + scale[:, None, :]) + shift[:, None, :]
        if out is None:
            return h
        out[...] = h
        return out

    def layernorm_modulate(self, x, shift, scale, eps):
        """LayerNorm(x) without affine, then * (1 + scale) + shift. x (B, T, D); shift, scale (B, D)."""
        return self.layernorm(x, None, None, eps) * (np.float32(1) + scale[:, None, :]) + shift[:, None, :]

    def layernorm(self, x, weight, bias, eps):
        """LayerNorm over the last axis (biased variance); weight/bias None for no affine."""
        mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
        xc = x - mean
        var = np.mean(np.square(xc), axis=-1, keepdims=True)
        h = xc / np.sqrt(var + np.float32(eps))
        if weight is not None:
            h = h * weight + bias
        return h.astype(np.float32, copy=False)

    def rope(self, x, cos, sin):
        """Rotate consecutive pairs of each head in place. x (B, T, H, hd); cos, sin (T, hd/2)."""
        x0 = x[..., 0::2].copy()
        x1 = x[..., 1::2].copy()
        c = cos[None, :, None, :]
        s = sin[None, :, None, :]
        x[..., 0::2] = x0 * c - x1 * s
        x[..., 1::2] = x0 * s + x1 * c
        return x

    def attention(self, q, k, v, out=None):
        """Softmax attention, not causal. q (B, T, H, hd); k, v (B, T, Hkv, hd) -> (B, T, H, hd)."""
        b, t, h, hd = q.shape
        rep = h // k.shape[2]
        scale = np.float32(1.0 / np.sqrt(hd))
        if out is None:
            out = np.empty_like(q)
        with self.thread_limit():
            for bi in range(b):
                qb = q[bi].transpose(1, 0, 2)                      # (H, T, hd)
                kb = np.repeat(k[bi].transpose(1, 0, 2), rep, 0)   # (H, T, hd)
                vb = np.repeat(v[bi].transpose(1, 0, 2), rep, 0)
                s = np.matmul(qb, kb.transpose(0, 2, 1)) * scale   # (H, T, T)
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=-1, keepdims=True)
                out[bi] = np.matmul(s, vb).transpose(1, 0, 2)
        return out

    def swiglu(self, a, b, out=None):
        """silu(a) * b elementwise."""
        r = a / (np.float32(1) + np.exp(-a)) * b
        if out is None:
            return r
        out[...] = r
        return out

    def add_gated(self, x, gate, y):
        """x += gate[:, None, :] * y in place. x, y (B, T, D); gate (B, D)."""
        x += gate[:, None, :] * y
        return x

    def dense(self, x, weight, bias=None, rows_per_image=None):
        """Full-precision linear: x (M, K) @ weight(N, K)^T + bias.

        With ``rows_per_image`` (batch invariance): the rows of each image are multiplied in a BLAS
        call of their own, on one thread, so an image's result depends neither on the other images
        of the batch (BLAS kernels and thread splits change with the row count) nor on ``threads``.
        The model's dense layers are small (the embedders and the final layer) next to its ternary
        layers, so this costs little.
        """
        if rows_per_image is not None:
            y = np.empty((x.shape[0], weight.shape[0]), dtype=np.result_type(x, weight))
            wt = weight.T
            with self.thread_limit(1):
                for r0 in range(0, x.shape[0], rows_per_image):
                    np.matmul(x[r0:r0 + rows_per_image], wt, out=y[r0:r0 + rows_per_image])
        else:
            # the conditioning layers are tiny (M = batch): waking BLAS threads costs more than they save
            small = x.shape[0] * weight.shape[0] * weight.shape[1] < _SMALL_DENSE_FLOPS
            with self.thread_limit(1 if small else None):
                y = x @ weight.T
        if bias is not None:
            y += bias
        return y
