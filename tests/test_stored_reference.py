"""Parity without torch: converted models and PyTorch reference outputs stored in tests/data
(written by tests/make_stored_reference.py), checked with the same bounds as tests/test_parity.py.
This is the parity check that runs where torch and the converter are absent (arm64 CI, a board)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import terdit_edge
from terdit_edge.kernels import available_backends

DATA = Path(__file__).parent / "data"
FORWARD_TOL = 1e-4   # x std of the reference output (as in test_parity.py)
SAMPLE_TOL = 1e-3    # x std of the reference latents
NAMES = ("mha", "qk_norm_mqa")
CASES = {  # as in test_parity.SAMPLING_CASES; labels [1, 7], seed 5
    "ddim10-eta0-cfg4": dict(sampler="ddim", steps=10, eta=0.0, cfg_scale=4.0),
    "ddpm8-cfg4": dict(sampler="ddpm", steps=8, eta=0.0, cfg_scale=4.0),
}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / want.std())


def stored(name: str):
    return str(DATA / f"parity_{name}.tdit"), np.load(DATA / f"parity_{name}.npz")


def backends():
    status = available_backends()
    return [pytest.param(b, marks=pytest.mark.skipif(status.get(b) != "ok",
                                                     reason=f"backend {b!r}: {status.get(b, 'not registered')}"))
            for b in ("numpy", "cython")]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_stored_torch_output(name, backend):
    path, ref = stored(name)
    got = terdit_edge.load_model(path, backend=backend, threads=2)(ref["x"], ref["t"], ref["y"])
    assert got.shape == ref["forward"].shape and got.dtype == np.float32
    assert rel_err(got, ref["forward"]) <= FORWARD_TOL


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", list(CASES))
def test_sampled_latents_match_stored_torch_latents(case, backend):
    path, ref = stored("qk_norm_mqa")
    kw = CASES[case]
    model = terdit_edge.load_model(path, backend=backend, threads=2)
    got = terdit_edge.sample(model, [1, 7], steps=kw["steps"], sampler=kw["sampler"],
                             cfg_scale=kw["cfg_scale"], seed=5, eta=kw["eta"])
    want = ref[f"sample:{case}"]
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert rel_err(got, want) <= SAMPLE_TOL
