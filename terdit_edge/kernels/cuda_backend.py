"""The CUDA backend: Numba CUDA kernels (terdit_edge.cuda), optional (``pip install "terdit-edge[cuda]"``).

The model's one forward (:class:`~terdit_edge.model.TernaryDiT`) runs on it as on any backend: its
ops take and return device arrays, its parameters are uploaded once (``asarray``; ternary weights by
``prepare``, 2 bits per weight), its workspaces are device buffers (``empty``), and per call only
the patchified input, the timestep features and the labels go up and the model output comes back.
Every op also accepts host arrays and then returns host arrays (one copy each way), so that the
shared tests compare each kernel with the reference through the reference's own calls.

This module imports no CUDA code until the backend is instantiated, so that asking which backends
are available never fails for want of numba-cuda. With NUMBA_ENABLE_CUDASIM=1 set before Numba is
first imported, everything runs in Numba's CUDA simulator on the CPU (for tests; very slow).
"""
from __future__ import annotations

import numpy as np

from ..errors import BackendError, InputError
from ..packing import padded_k
from .reference import NumpyBackend

INSTALL_HINT = 'pip install "terdit-edge[cuda]"'
MIN_COMPUTE_CAPABILITY = (6, 1)  # dp4a, used by the int8 path


def _simulator_enabled() -> bool:
    try:
        from numba.core import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)


def _is_device(a) -> bool:
    return hasattr(a, "copy_to_host")  # a Numba device array (also the simulator's)


class DeviceTernaryWeight:
    """One ternary linear layer on the device: y = alpha * x Q^T + bias.

    words: device uint32 (N, K_pad / 16), the tdit2-k128 codes (2 bits per weight, not widened);
    bias: device float32 (N,) or None; alpha: float32 value.
    """

    __slots__ = ("words", "n", "k", "alpha", "bias", "name")

    def __init__(self, words, n: int, k: int, alpha: float, bias, name: str = ""):
        self.words, self.n, self.k, self.alpha, self.bias, self.name = words, n, k, alpha, bias, name

    @property
    def nbytes(self) -> int:
        return self.words.size * 4 + (self.bias.size * 4 if self.bias is not None else 0)


class QuantizedRows:
    """int8 activations of ``rows`` rows of width k on the device (``CudaBackend.quantize``): packed
    words (rows, K_pad / 4) uint32, per-row sums int32 and scales float32. Row slices share the buffers."""

    __slots__ = ("words", "row_sums", "scales", "k")

    def __init__(self, words, row_sums, scales, k: int):
        self.words, self.row_sums, self.scales, self.k = words, row_sums, scales, k

    @property
    def shape(self) -> tuple[int, int]:
        return (self.words.shape[0], self.k)

    def __getitem__(self, rows: slice) -> "QuantizedRows":
        return QuantizedRows(self.words[rows], self.row_sums[rows], self.scales[rows], self.k)


class ModulationBlock:
    """Columns [offset, offset + width) of a device adaLN output mod (B, n D): what ``modulation``
    gives the per-token ops as shift, scale or gate, read by the kernels in place (no copy)."""

    __slots__ = ("mod", "offset", "width")

    def __init__(self, mod, offset: int, width: int):
        self.mod, self.offset, self.width = mod, offset, width


class CudaBackend(NumpyBackend):
    """Numba CUDA kernels. ``threads`` is accepted for a uniform signature and ignored."""

    name = "cuda"
    # not checked for batch invariance (CI has no GPU): its attention and GEMM sum in another order than the CPU's
    batch_invariant = False

    def __init__(self, threads: int = 1, activations: str = "fp32", attention: str = "fp32"):
        super().__init__(threads=threads, activations=activations, attention=attention)
        if activations not in ("fp32", "int8"):
            raise BackendError(f"backend 'cuda' runs activations 'fp32' or 'int8' (dp4a), not {activations!r}")
        reason = self.unavailable_reason()
        if reason:
            raise BackendError(f"backend 'cuda' is not available here: {reason}")
        from numba import cuda

        from ..cuda import kernels

        self._cuda = cuda
        self._k = kernels
        self._quant_buffers: dict[tuple[int, int], QuantizedRows] = {}
        self.simulator = kernels.SIMULATOR

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when kernels can run (a usable GPU and driver, or the simulator); else what is missing."""
        try:
            import numba  # noqa: F401
        except ImportError:
            return f"numba is not installed; {INSTALL_HINT}"
        if _simulator_enabled():
            return None
        try:
            from numba import cuda
        except ImportError as e:
            return f"Numba's CUDA target is not installed ({e}); {INSTALL_HINT}"
        try:
            n_gpus = len(cuda.gpus)
        except Exception as e:  # CudaSupportError: no driver library, or the driver found no device
            text = " ".join(str(e).split())
            if "driver library cannot be found" in text or "libcuda" in text:
                return ("no NVIDIA CUDA driver found (libcuda.so); install the NVIDIA driver, or set "
                        "NUMBA_ENABLE_CUDASIM=1 to run the kernels in Numba's simulator")
            return f"no usable CUDA GPU: {text}"
        if n_gpus == 0:
            return "the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES)"
        cc = tuple(cuda.get_current_device().compute_capability)
        if cc < MIN_COMPUTE_CAPABILITY:
            return (f"the GPU has compute capability {cc[0]}.{cc[1]}; the cuda backend needs "
                    f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer")
        return None

    def describe(self) -> str:
        if self.simulator:
            where = "Numba CUDA simulator"
        else:
            where = self._cuda.get_current_device().name
            where = where.decode() if isinstance(where, bytes) else str(where)
        return f"{self.name} ({self.activations}, {where})"

    # --- arrays and weights ----------------------------------------------------------------------
    def asarray(self, a):
        """A host array uploaded as a float32 device array; device arrays pass through."""
        if _is_device(a):
            return a
        return self._cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))

    def to_host(self, a) -> np.ndarray:
        return a.copy_to_host() if _is_device(a) else np.asarray(a)

    def empty(self, shape):
        return self._cuda.device_array(shape, dtype=np.float32)

    def prepare(self, w):
        """Upload a TernaryWeight (packed bytes as they are); device weights pass through."""
        if isinstance(w, DeviceTernaryWeight):
            return w
        bias = None if w.bias is None else self.asarray(w.bias)
        return DeviceTernaryWeight(self._cuda.to_device(self._k.words_view(w.packed)), w.n, w.k,
                                   np.float32(w.alpha), bias, w.name)

    def quantize(self, x):
        """In int8 mode: x (M, K) quantized once per row (absmax / 127, as the reference) into a device
        buffer kept for that shape, valid until the next quantize of the same shape; fp32: x."""
        if self.activations != "int8" or isinstance(x, QuantizedRows):
            return x
        x = self.asarray(x)
        rows, k = tuple(x.shape)
        buf = self._quant_buffers.get((rows, k))
        if buf is None:
            e = self._cuda.device_array
            buf = QuantizedRows(e((rows, padded_k(k) // 4), np.uint32), e(rows, np.int32), e(rows, np.float32), k)
            self._quant_buffers[(rows, k)] = buf
        self._k.quantize_rows(x, buf.words, buf.row_sums, buf.scales)
        return buf

    # --- helpers: device in, device out; host in, host out -------------------------------------------
    def _result(self, y, like, out=None):
        """Deliver the device result y: into ``out`` when given, else as device array when ``like`` is
        one, else copied to the host."""
        if out is not None:
            if _is_device(out):
                return out  # the kernel wrote into it (every op with out= writes through _target)
            out[...] = y.copy_to_host().reshape(out.shape)
            return out
        return y if _is_device(like) else y.copy_to_host()

    def _target(self, shape2d, out):
        """Where a kernel writes: the device ``out`` itself (2-D view) when it is one, else a new buffer."""
        if out is not None and _is_device(out):
            return out.reshape(shape2d)
        return self.empty(shape2d)

    def _mod(self, *blocks):
        """(mod, offsets) for the kernels from ModulationBlocks of one mod, or from (B, D) arrays."""
        if all(isinstance(b, ModulationBlock) for b in blocks) and len({id(b.mod) for b in blocks}) == 1:
            return blocks[0].mod, [b.offset for b in blocks]
        host = [self.to_host(b.mod[:, b.offset:b.offset + b.width]) if isinstance(b, ModulationBlock)
                else self.to_host(b) for b in blocks]
        d = host[0].shape[1]
        return self.asarray(np.concatenate(host, axis=1)), [i * d for i in range(len(blocks))]

    # --- ternary linear -------------------------------------------------------------------------------
    def ternary_matmul(self, x, w, out=None):
        """x float32 (M, K) (or ``quantize(x)``) -> float32 (M, N); w a TernaryWeight or a prepared one."""
        dw = self.prepare(w)
        xs = tuple(x.shape)
        if len(xs) != 2 or xs[1] != dw.k:
            raise InputError(f"ternary_matmul: x must be (M, {dw.k}) for layer {dw.name!r}, got {xs}")
        m = xs[0]
        y = self._target((m, dw.n), out)
        if m:
            if self.activations == "int8":
                q = self.quantize(x)
                self._k.ternary_gemm_i8(q.words, q.row_sums, q.scales, dw.words, dw.k, dw.alpha, dw.bias, y)
            else:
                self._k.ternary_gemm_f32(self.asarray(x), dw.words, dw.alpha, dw.bias, y)
        like = x.words if isinstance(x, QuantizedRows) else x
        return self._result(y, like, out)

    # --- conditioning ----------------------------------------------------------------------------------
    def silu(self, x):
        xd = self.asarray(x)
        y = self.empty(xd.shape)
        self._k.silu(xd, y)
        return self._result(y, x)

    def condition(self, t_emb, table, y):
        td = self.asarray(t_emb)
        c = self.empty(td.shape)
        self._k.condition(td, self.asarray(table), self._cuda.to_device(np.ascontiguousarray(y, dtype=np.int64)), c)
        return self._result(c, t_emb)

    def modulation(self, mod, n: int) -> list:
        if not _is_device(mod):
            return super().modulation(mod, n)
        d = tuple(mod.shape)[1] // n
        return [ModulationBlock(mod, i * d, d) for i in range(n)]

    # --- per-token ops -----------------------------------------------------------------------------------
    def rmsnorm(self, x, weight, eps):
        shape = tuple(x.shape)
        x2 = self.asarray(x).reshape(int(np.prod(shape[:-1])), shape[-1])
        y = self.empty(x2.shape)
        self._k.rmsnorm(x2, self.asarray(weight), eps, y)
        return self._result(y.reshape(shape), x)

    def rmsnorm_modulate(self, x, weight, shift, scale, eps, out=None):
        b, t, d = tuple(x.shape)
        mod, (shift_off, scale_off) = self._mod(shift, scale)
        y = self._target((b * t, d), out)
        self._k.rmsnorm(self.asarray(x).reshape(b * t, d), self.asarray(weight), eps, y, mod=mod,
                        shift_off=shift_off, scale_off=scale_off, rows_per_batch=t)
        return self._result(y.reshape(b, t, d), x, out)

    def layernorm(self, x, weight, bias, eps):
        shape = tuple(x.shape)
        x2 = self.asarray(x).reshape(int(np.prod(shape[:-1])), shape[-1])
        y = self.empty(x2.shape)
        w = None if weight is None else self.asarray(weight)
        bb = None if bias is None else self.asarray(bias)
        self._k.layernorm(x2, w, bb, eps, y)
        return self._result(y.reshape(shape), x)

    def layernorm_modulate(self, x, shift, scale, eps):
        b, t, d = tuple(x.shape)
        mod, (shift_off, scale_off) = self._mod(shift, scale)
        y = self.empty((b * t, d))
        self._k.layernorm(self.asarray(x).reshape(b * t, d), None, None, eps, y, mod=mod, shift_off=shift_off,
                          scale_off=scale_off, rows_per_batch=t)
        return self._result(y.reshape(b, t, d), x)

    def rope(self, x, cos, sin):
        """In place: a device x is rotated where it is; a host x gets the result copied back."""
        b, t, h, hd = tuple(x.shape)
        x2 = self.asarray(x).reshape(b * t, h * hd)
        self._k.rope(x2, self.asarray(cos), self.asarray(sin), t, hd)
        if not _is_device(x):
            x[...] = x2.copy_to_host().reshape(x.shape)
        return x

    def attention(self, q, k, v, out=None):
        b, t, h, hd = tuple(q.shape)
        hkv = tuple(k.shape)[2]
        o = self._target((b * t, h * hd), out)
        self._k.attention(self.asarray(q).reshape(b * t, h * hd), self.asarray(k).reshape(b * t, hkv * hd),
                          self.asarray(v).reshape(b * t, hkv * hd), o, b, t, h, hkv, hd)
        return self._result(o.reshape(b, t, h, hd), q, out)

    def swiglu(self, a, b, out=None):
        shape = tuple(a.shape)
        a2 = self.asarray(a).reshape(int(np.prod(shape[:-1])), shape[-1])
        y = self._target(a2.shape, out)
        self._k.swiglu(a2, self.asarray(b).reshape(int(np.prod(shape[:-1])), shape[-1]), y)
        return self._result(y.reshape(shape), a, out)

    def add_gated(self, x, gate, y):
        """x += gate[:, None, :] * y in place (device x where it is; host x copied back)."""
        b, t, d = tuple(x.shape)
        x2 = self.asarray(x).reshape(b * t, d)
        mod, (off,) = self._mod(gate)
        self._k.add_gated(x2, mod, off, self.asarray(y).reshape(b * t, d), t)
        if not _is_device(x):
            x[...] = x2.copy_to_host().reshape(x.shape)
        return x

    def dense(self, x, weight, bias=None, rows_per_image=None):
        # one GPU thread per output: each row's sums do not depend on the batch (rows_per_image unused)
        y = self.empty((tuple(x.shape)[0], tuple(weight.shape)[0]))
        self._k.dense(self.asarray(x), self.asarray(weight), None if bias is None else self.asarray(bias), y)
        return self._result(y, x)
