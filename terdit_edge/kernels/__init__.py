"""Compute backends: a registry of ternary-GEMM implementations and the per-token ops around them.

A backend is an object with the methods of :class:`~terdit_edge.kernels.reference.NumpyBackend`.
The NumPy reference is always present; faster backends (``cython``, ``numba``, ``cuda``) register
themselves here and are trusted only because the shared test suite compares them with it.

``backend="auto"`` picks the first available of :data:`AUTO_ORDER`.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

from ..errors import BackendError, InputError
from .base import ACTIVATION_MODES, ATTENTION_MODES, TernaryWeight

# name -> (module path, factory attribute, device); modules import lazily so that a missing optional
# dependency only matters when that backend is asked for. The shared tests loop over this table:
# a CPU backend registered here is compared with the NumPy reference without editing a test.
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "numpy": ("terdit_edge.kernels.reference", "NumpyBackend", "cpu"),
    "cython": ("terdit_edge.kernels.cython_backend", "CythonBackend", "cpu"),
    "numba": ("terdit_edge.kernels.numba_backend", "NumbaBackend", "cpu"),
    "cuda": ("terdit_edge.kernels.cuda_backend", "CudaBackend", "cuda"),
}
AUTO_ORDER = ("cython", "numba", "numpy")

__all__ = ["get_backend", "available_backends", "register_backend", "backend_names", "TernaryWeight",
           "ACTIVATION_MODES", "ATTENTION_MODES", "default_threads"]


def register_backend(name: str, module: str, factory: str, device: str = "cpu") -> None:
    """Make a backend selectable by name (its module is imported on first use)."""
    _REGISTRY[name] = (module, factory, device)


def backend_names(device: str | None = None) -> tuple[str, ...]:
    """Registered backend names, in registration order; only those of `device` ("cpu", "cuda") if given."""
    return tuple(n for n, entry in _REGISTRY.items() if device is None or entry[2] == device)


def default_threads() -> int:
    """Threads used when the caller does not say: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _factory(name: str) -> Callable:
    module, attr, _ = _REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendError(f"backend {name!r} is not available here: {e}") from None
    return getattr(mod, attr)


def available_backends() -> dict[str, str]:
    """Map each registered backend name to "ok" or the reason it cannot be used."""
    status = {}
    for name in _REGISTRY:
        try:
            cls = _factory(name)
            reason = cls.unavailable_reason() if hasattr(cls, "unavailable_reason") else None
            status[name] = reason or "ok"
        except BackendError as e:
            status[name] = str(e)
    return status


def batch_invariance() -> dict[str, bool]:
    """Each registered backend -> whether it promises batch-invariant images (docs/reproducibility.md).
    Backends whose module cannot be imported here count as not promising it."""
    out = {}
    for name in _REGISTRY:
        try:
            out[name] = bool(getattr(_factory(name), "batch_invariant", False))
        except BackendError:
            out[name] = False
    return out


def get_backend(name: str = "auto", threads: int | None = None, activations: str = "fp32",
                attention: str = "fp32"):
    """Instantiate a backend by name ("auto", "numpy", "cython", "numba", "cuda"); "auto" picks the
    first available one that runs the attention mode."""
    if activations not in ACTIVATION_MODES:
        raise InputError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    if attention not in ATTENTION_MODES:
        raise InputError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if threads is not None and (type(threads) is not int or threads < 1):
        raise InputError(f"threads must be a positive integer or None, got {threads!r}")
    threads = threads or default_threads()
    if name == "auto":
        for candidate in AUTO_ORDER:
            try:
                cls = _factory(candidate)
            except BackendError:
                continue
            if hasattr(cls, "unavailable_reason") and cls.unavailable_reason():
                continue
            if attention not in getattr(cls, "attention_modes", ("fp32",)):
                continue
            return cls(threads=threads, activations=activations, attention=attention)
        if attention != "fp32":
            raise BackendError(f"no available backend runs {attention} attention (it needs the compiled cython "
                               "backend: `python3 setup.py build_ext --inplace`)")
        raise BackendError("no backend is available (even numpy failed to load)")
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of {['auto', *_REGISTRY]}")
    cls = _factory(name)
    reason = cls.unavailable_reason() if hasattr(cls, "unavailable_reason") else None
    if reason:
        raise BackendError(f"backend {name!r} is not available here: {reason}")
    return cls(threads=threads, activations=activations, attention=attention)
