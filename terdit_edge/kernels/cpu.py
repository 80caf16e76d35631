"""What the CPU offers and what the compiled kernels detected (for ``terdit-edge info``)."""
from __future__ import annotations

import platform

from . import default_threads


def _proc_flags() -> set[str]:
    """CPU feature words from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_features() -> dict:
    """dict with avx2, fma, avx512, neon, dotprod, i8mm, openmp (bools), threads (int), isa (kernel
    path in use, or None without the extension), isas (every path this CPU can run), machine, and
    extension (whether terdit_edge._ternary is built). With the extension the flags are what its
    run-time detection saw."""
    # through the backend module: it loads the extension with the OpenMP wait policy it wants
    from .cython_backend import _ternary
    if _ternary is not None:
        info = _ternary.cpu_features()
        info["extension"] = True
    else:
        flags = _proc_flags()
        arm = platform.machine().lower() in ("aarch64", "arm64")
        info = {"avx2": "avx2" in flags, "fma": "fma" in flags, "avx512": False, "isas": [], "neon": arm,
                "dotprod": "asimddp" in flags, "i8mm": "i8mm" in flags, "openmp": False, "threads": default_threads(),
                "best_isa": None, "isa": None, "extension": False}
    info["machine"] = platform.machine()
    return info
