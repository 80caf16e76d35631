"""TERDIT_REQUIRE_BACKENDS: fast backends that must be present (CI sets cython,numba).

Without the variable a missing compiled extension or numba only turns the tests of that backend into
skips; with it, those skips become failures (tests/conftest.py: skip_unavailable_backend) and the
check below fails at once, naming the reason the backend cannot load.
"""
from __future__ import annotations

import pytest

from terdit_edge.kernels import available_backends
from tests.conftest import REQUIRE_BACKENDS_ENV, required_backends, skip_unavailable_backend


def test_required_backends_are_available():
    required = required_backends()
    if not required:
        pytest.skip(f"{REQUIRE_BACKENDS_ENV} is not set: no backend is required in this run")
    status = available_backends()
    unknown = [name for name in required if name not in status]
    assert not unknown, f"{REQUIRE_BACKENDS_ENV} names unknown backends {unknown}; registered: {sorted(status)}"
    missing = {name: status[name] for name in required if status[name] != "ok"}
    assert not missing, f"required backends unavailable: {missing}"


def test_a_required_backend_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setenv(REQUIRE_BACKENDS_ENV, "cython, numba")
    assert required_backends() == ["cython", "numba"]
    with pytest.raises(pytest.fail.Exception, match="'numba' is required .* unavailable: no module"):
        skip_unavailable_backend("numba", "no module")
    with pytest.raises(pytest.skip.Exception, match="'cuda' unavailable"):
        skip_unavailable_backend("cuda", "no GPU")


def test_without_the_variable_an_unavailable_backend_is_a_skip(monkeypatch):
    monkeypatch.delenv(REQUIRE_BACKENDS_ENV, raising=False)
    assert required_backends() == []
    with pytest.raises(pytest.skip.Exception, match="'cython' unavailable: extension not built"):
        skip_unavailable_backend("cython", "extension not built")
