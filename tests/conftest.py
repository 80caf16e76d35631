"""Shared fixtures: small random .tdit model files built in code (no torch, no downloads).

``build_model_file(directory, **overrides)`` writes a valid model file with random weights and
returns its path; the ``make_model_file`` fixture exposes it as ``make_model_file(tmp_path, **overrides)``.
Overrides are ModelConfig fields (``dim=96``, ``qk_norm=True``...) plus three file options:
``float_dtype`` ("F32" or "F16"), ``seed`` (the weights' RNG seed) and ``name`` (the file name).

Fast backends that must not be skipped: ``TERDIT_REQUIRE_BACKENDS=cython,numba`` (comma list; .ci/run
sets it) turns every "backend unavailable" skip of those backends into a failure, through
``skip_unavailable_backend``, and tests/test_required_backends.py checks each of them is usable.

Child processes run the installed package, like the tests themselves: ``child_env()`` is the
environment with the source tree taken off PYTHONPATH, and children start in a directory outside the
repository (``python -c`` puts its working directory first on sys.path), so in a fresh clone, where
the source tree has no compiled extension, a child cannot silently import that tree instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from terdit_edge.config import ModelConfig
from terdit_edge.format import DIT_PREFIX, expected_model_tensors, ternary_layer_shapes, write_tdit
from terdit_edge.packing import PACKING_NAME, pack_ternary_2bit

# Tiny but not degenerate: two blocks, GQA-free 4 heads of width 16, an FFN width (96) and a
# conditioning width (64) that are not multiples of the 128-wide packing block, so padding is exercised.
SMALL_CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=96, cond_dim=64,
                    patch_size=2, in_channels=4, input_size=8, num_classes=10)
_FILE_OPTIONS = ("float_dtype", "seed", "name")

REPO = Path(__file__).resolve().parents[1]
# How close every fast backend's forward must be to the NumPy reference's (tests/test_parity.py, and
# tests/test_cuda_sim.py for CUDA): fp32, max |got - want| / std(want); integer modes, relative L2.
FORWARD_TOL = 1e-4
INTEGER_FORWARD_L2_TOL = 2e-3
REQUIRE_BACKENDS_ENV = "TERDIT_REQUIRE_BACKENDS"


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python process, without the repository on PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() not in (REPO, REPO / "terdit_edge")]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _restore_kernel_path():
    """Tests that force a kernel path (``set_isa``) leave the process on the one the run started with:
    TERDIT_ISA when set (e.g. CI's AVX2-kind leg), else the CPU's best."""
    yield
    from terdit_edge.kernels import cython_backend

    ext = cython_backend._ternary
    if ext is not None:
        want = os.environ.get("TERDIT_ISA") or ext.cpu_features()["best_isa"]
        if ext.get_isa() != want:
            ext.set_isa(want)


@pytest.fixture
def child_cwd(tmp_path) -> Path:
    """An empty working directory outside the repository for child processes."""
    d = tmp_path / "child-cwd"
    d.mkdir()
    return d


def required_backends() -> list[str]:
    """Backend names listed in $TERDIT_REQUIRE_BACKENDS (comma or space separated), in order."""
    raw = os.environ.get(REQUIRE_BACKENDS_ENV, "")
    return [name for name in raw.replace(",", " ").split() if name]


def skip_unavailable_backend(name: str, reason, allow_module_level: bool = False):
    """Skip because backend ``name`` cannot be used here, or fail if it is a required backend."""
    if name in required_backends():
        pytest.fail(f"backend {name!r} is required ({REQUIRE_BACKENDS_ENV}="
                    f"{os.environ[REQUIRE_BACKENDS_ENV]}) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"backend {name!r} unavailable: {reason}", allow_module_level=allow_module_level)


def small_config(**overrides) -> ModelConfig:
    """A validated tiny ModelConfig; keyword arguments replace SMALL_CONFIG fields."""
    return ModelConfig(**{**SMALL_CONFIG, **overrides}).validate()


def random_model_tensors(cfg: ModelConfig, float_dtype: str = "F32", seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor a model section of ``cfg`` needs, with random but well-scaled values.

    Norm weights are near 1 and other float params small, so a forward pass stays finite.
    """
    rng = np.random.default_rng(seed)
    ternary = {DIT_PREFIX + name: (n, k) for name, (n, k) in ternary_layer_shapes(cfg).items()}
    np_float = {"F32": np.float32, "F16": np.float16}[float_dtype]
    out = {}
    for name, (_, shape) in expected_model_tensors(cfg, float_dtype).items():
        if name.endswith(".qweight"):
            n, k = ternary[name[: -len(".qweight")]]
            out[name] = pack_ternary_2bit(rng.integers(-1, 2, size=(n, k)))
        elif name.endswith(".alpha"):
            out[name] = np.array([rng.uniform(0.02, 0.1)], dtype=np.float32)
        elif "norm.weight" in name or name.endswith("adaLN_modulation.2.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np_float)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np_float)
        assert out[name].shape == tuple(shape) and out[name].dtype.str[1:] in ("f4", "f2", "u1"), name
    return out


def model_metadata(cfg: ModelConfig, float_dtype: str = "F32") -> dict[str, str]:
    """The metadata keys a model file carries (the writer adds format, version and checksums)."""
    return {"config": cfg.to_json(), "float_dtype": float_dtype, "packing": PACKING_NAME,
            "label_map": json.dumps({"name": "identity", "map": list(range(cfg.num_classes))}),
            "source": "{}"}


def build_model_file(directory, **overrides) -> Path:
    """Write a valid random model file into ``directory`` and return its path."""
    opts = {k: overrides.pop(k) for k in _FILE_OPTIONS if k in overrides}
    float_dtype = opts.get("float_dtype", "F32")
    cfg = small_config(**overrides)
    path = Path(directory) / opts.get("name", "model.tdit")
    write_tdit(path, random_model_tensors(cfg, float_dtype, opts.get("seed", 0)), model_metadata(cfg, float_dtype))
    return path


@pytest.fixture
def make_model_file():
    """``make_model_file(tmp_path, **overrides) -> Path`` (see :func:`build_model_file`)."""
    return build_model_file


@pytest.fixture
def model_file(tmp_path) -> Path:
    """A valid small model file with default settings."""
    return build_model_file(tmp_path)
