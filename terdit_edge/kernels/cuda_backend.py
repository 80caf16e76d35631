"""The CUDA backend: Numba CUDA kernels (terdit_edge.cuda), optional (``pip install "terdit-edge[cuda]"``).

Two ways in:

* ``backend.build_model(...)`` returns a :class:`~terdit_edge.cuda.model.CudaDiT`, whose whole
  forward stays on the GPU (weights uploaded once, 2 bits per ternary weight). ``model_from_file``
  uses it when the backend has it.
* The ops of the NumPy backend's contract (``ternary_matmul``, ``rmsnorm_modulate``, ...) on host
  arrays, each a copy up, a kernel and a copy down. They exist so that every kernel is tested against
  the reference with the reference's own calls; they are slow and not how a model should run.

This module imports no CUDA code until the backend is instantiated, so that asking which backends
are available never fails for want of numba-cuda. With NUMBA_ENABLE_CUDASIM=1 set before Numba is
first imported, everything runs in Numba's CUDA simulator on the CPU (for tests; very slow).
"""
from __future__ import annotations

import numpy as np

from ..errors import BackendError, InputError
from .base import TernaryWeight
from .reference import NumpyBackend

INSTALL_HINT = 'pip install "terdit-edge[cuda]"'
MIN_COMPUTE_CAPABILITY = (6, 1)  # dp4a, used by the int8 path


def _simulator_enabled() -> bool:
    try:
        from numba.core import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)


class CudaBackend(NumpyBackend):
    """Numba CUDA kernels. ``threads`` is accepted for a uniform signature and ignored."""

    name = "cuda"
    # its own forward (build_model) and kernels; not checked for batch invariance (CI has no GPU)
    batch_invariant = False

    def __init__(self, threads: int = 1, activations: str = "fp32"):
        super().__init__(threads=threads, activations=activations)
        if activations not in ("fp32", "int8"):
            raise BackendError(f"backend 'cuda' runs activations 'fp32' or 'int8' (dp4a), not {activations!r}")
        reason = self.unavailable_reason()
        if reason:
            raise BackendError(f"backend 'cuda' is not available here: {reason}")
        from numba import cuda

        from ..cuda import kernels
        from ..cuda import model as device_model

        self._cuda = cuda
        self._k = kernels
        self._dm = device_model
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

    # --- the model --------------------------------------------------------------------------------
    def build_model(self, config, params, ternary, label_map, label_map_name, source):
        """A CudaDiT: the hook ``model_from_file`` calls instead of constructing a TernaryDiT."""
        return self._dm.CudaDiT(config, params, ternary, self, label_map=label_map,
                                label_map_name=label_map_name, source=source)

    def from_host_model(self, host):
        """A CudaDiT from a host TernaryDiT's pieces (config, params, ternary weights, label map).

        For callers that built a model with another backend, and for ``load_model`` until
        ``model_from_file`` calls :meth:`build_model` itself.
        """
        return self.build_model(host.config, host.params, host.ternary, host.label_map, host.label_map_name,
                                host.file)

    def prepare(self, w):
        """Upload a TernaryWeight (packed bytes as they are); device weights pass through."""
        if isinstance(w, self._dm.DeviceTernaryWeight):
            return w
        return self._dm.DeviceTernaryWeight.upload(w)

    # --- host-array ops (the reference's contract) ---------------------------------------------------
    def _up(self, a):
        return self._cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))

    def _empty(self, shape):
        return self._cuda.device_array(shape, dtype=np.float32)

    @staticmethod
    def _deliver(result: np.ndarray, out):
        if out is None:
            return result
        out[...] = result.reshape(out.shape)
        return out

    def ternary_matmul(self, x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 (M, K) -> float32 (M, N); w a TernaryWeight or a prepared device weight."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != w.k:
            raise InputError(f"ternary_matmul: x must be (M, {w.k}) for layer {w.name!r}, got {x.shape}")
        dw = self.prepare(w) if isinstance(w, TernaryWeight) else w
        y = self._empty((x.shape[0], dw.n))
        if x.shape[0]:
            self._dm.ternary_linear(self._up(x), dw, y, self.activations)
        return self._deliver(y.copy_to_host(), out)

    def rmsnorm(self, x, weight, eps):
        shape = x.shape
        x2 = self._up(x.reshape(-1, shape[-1]))
        y = self._empty(x2.shape)
        self._k.rmsnorm(x2, self._up(weight), eps, y)
        return y.copy_to_host().reshape(shape)

    def rmsnorm_modulate(self, x, weight, shift, scale, eps, out=None):
        b, t, d = x.shape
        mod = self._up(np.concatenate([shift, scale], axis=1))
        x2 = self._up(x.reshape(b * t, d))
        y = self._empty((b * t, d))
        self._k.rmsnorm(x2, self._up(weight), eps, y, mod=mod, shift_off=0, scale_off=d, rows_per_batch=t)
        return self._deliver(y.copy_to_host().reshape(b, t, d), out)

    def layernorm(self, x, weight, bias, eps):
        shape = x.shape
        x2 = self._up(x.reshape(-1, shape[-1]))
        y = self._empty(x2.shape)
        w = None if weight is None else self._up(weight)
        bb = None if bias is None else self._up(bias)
        self._k.layernorm(x2, w, bb, eps, y)
        return y.copy_to_host().reshape(shape)

    def rope(self, x, cos, sin):
        b, t, h, hd = x.shape
        x2 = self._up(x.reshape(b * t, h * hd))
        self._k.rope(x2, self._up(cos), self._up(sin), t, hd)
        x[...] = x2.copy_to_host().reshape(x.shape)
        return x

    def attention(self, q, k, v, out=None):
        b, t, h, hd = q.shape
        hkv = k.shape[2]
        o = self._empty((b * t, h * hd))
        self._k.attention(self._up(q.reshape(b * t, h * hd)), self._up(k.reshape(b * t, hkv * hd)),
                          self._up(v.reshape(b * t, hkv * hd)), o, b, t, h, hkv, hd)
        return self._deliver(o.copy_to_host().reshape(b, t, h, hd), out)

    def swiglu(self, a, b, out=None):
        shape = a.shape
        a2 = self._up(a.reshape(-1, shape[-1]))
        y = self._empty(a2.shape)
        self._k.swiglu(a2, self._up(b.reshape(-1, shape[-1])), y)
        return self._deliver(y.copy_to_host().reshape(shape), out)

    def add_gated(self, x, gate, y):
        b, t, d = x.shape
        x2 = self._up(x.reshape(b * t, d))
        self._k.add_gated(x2, self._up(gate), 0, self._up(y.reshape(b * t, d)), t)
        x[...] = x2.copy_to_host().reshape(x.shape)
        return x

    def dense(self, x, weight, bias=None, rows_per_image=None):
        # one GPU thread per output: each row's sums do not depend on the batch (rows_per_image unused)
        y = self._empty((x.shape[0], weight.shape[0]))
        self._k.dense(self._up(x), self._up(weight), None if bias is None else self._up(bias), y)
        return y.copy_to_host()
