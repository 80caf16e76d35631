"""`terdit-edge generate` writes the same PNG bytes with --backend numpy, numba and cython (fp32 mode).

The claim of docs/performance.md ("PNG bytes identical with cython, numba and numpy") for the
bundled model, every class, the default sampler (DDPM) with 25 steps instead of the default 250 to
keep the NumPy run short (benchmarks/generate_backends.py checks the default command in full). Each
backend runs the installed CLI in its own process; the files are compared bit for bit. (In int8 and
int10 modes the backends agree to rounding, not bit for bit: see tests/test_parity.py.)
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from terdit_edge.kernels import available_backends
from tests.conftest import child_env, skip_unavailable_backend

BACKENDS = ("numpy", "numba", "cython")


def cli_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "terdit-edge")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "terdit_edge.frontends.cli"]


def start(backend: str, out, cwd) -> subprocess.Popen:
    cmd = [*cli_command(), "generate", "--backend", backend, "--activations", "fp32", "--threads", "1",
           "--steps", "25", "--seed", "3", "--out", str(out), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=cwd)


def test_generate_png_bytes_identical_across_backends(tmp_path, child_cwd):
    status = available_backends()
    present = [be for be in BACKENDS if status[be] == "ok"]
    procs = {be: start(be, tmp_path / f"{be}.png", child_cwd) for be in present}  # one thread each, all at once
    pngs = {}
    for be, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{be}: {err[-2000:]}"
        pngs[be] = (tmp_path / f"{be}.png").read_bytes()
    missing = [be for be in BACKENDS if be not in pngs]
    digests = {be: hashlib.sha256(data).hexdigest()[:16] for be, data in pngs.items()}
    assert pngs["numpy"][:8] == b"\x89PNG\r\n\x1a\n" and len(pngs["numpy"]) > 1000
    assert len(set(pngs.values())) == 1, f"PNG bytes differ between backends: {digests}"
    for be in missing:  # after the comparison of those present: a required one fails, others skip
        skip_unavailable_backend(be, status[be])
