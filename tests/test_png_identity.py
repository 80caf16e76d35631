"""`terdit-edge generate` with --backend numpy, numba and cython (fp32): the same images to a stated bound.

The backends are not promised to agree bit for bit: the NumPy and Numba backends sum in other orders
and use NumPy's own exp and BLAS (docs/kernels.md), so their fp32 latents differ from the cython
backend's by float rounding (measured: at most 1.4e-5 of the latents' largest magnitude over 20 images
and three samplers). The bound here is 1e-4 of max |latents|, and a PNG pixel may differ by one level
where a value lands on a uint8 rounding edge; no seed is lucky or unlucky for these bounds. What is
promised bit for bit is the cython backend on every CPU kind: tests/test_golden.py.
Each backend runs the installed CLI in its own process: the default sampler (DDPM) with 25 steps,
every class, two seeds.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from terdit_edge.kernels import available_backends
from tests.conftest import child_env, skip_unavailable_backend

BACKENDS = ("numpy", "numba", "cython")
REL_BOUND = 1e-4  # of max |latents|


def cli_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "terdit-edge")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "terdit_edge.frontends.cli"]


def start(backend: str, seed: int, out, lat, cwd) -> subprocess.Popen:
    cmd = [*cli_command(), "generate", "--backend", backend, "--activations", "fp32", "--threads", "1",
           "--steps", "25", "--seed", str(seed), "--out", str(out), "--save-latents", str(lat), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=cwd)


@pytest.mark.parametrize("seed", [3, 4])
def test_generate_agrees_across_backends_within_the_bound(tmp_path, child_cwd, seed):
    status = available_backends()
    present = [be for be in BACKENDS if status[be] == "ok"]
    if "cython" not in present:
        skip_unavailable_backend("cython", status["cython"])
    files = {be: (tmp_path / f"{be}.png", tmp_path / f"{be}.npy") for be in present}
    procs = {be: start(be, seed, *files[be], child_cwd) for be in present}  # one thread each, all at once
    for be, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{be}: {err[-2000:]}"
    ref = np.load(files["cython"][1])
    ref_px = np.asarray(Image.open(files["cython"][0]), dtype=np.int16)
    for be in present:
        lat = np.load(files[be][1])
        assert lat.shape == ref.shape and lat.dtype == np.float32
        rel = float(np.abs(lat - ref).max() / np.abs(ref).max())
        assert rel <= REL_BOUND, f"{be}: latents {rel:.2e} of max |latents| from cython's (bound {REL_BOUND})"
        px = np.asarray(Image.open(files[be][0]), dtype=np.int16)
        assert px.shape == ref_px.shape and int(np.abs(px - ref_px).max()) <= 1, be
    for be in BACKENDS:
        if be not in present:  # after the comparison of those present: a required one fails, others skip
            skip_unavailable_backend(be, status[be])
