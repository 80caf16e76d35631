"""The tests and the processes they start exercise one and the same terdit_edge: the installed one.

In a fresh clone the source tree has no compiled extension, so a child that imported the tree instead
of the installed package would run on numba and still pass. Children get ``child_env()`` and a working
directory outside the repository (tests/conftest.py); these checks hold them to it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import terdit_edge
from terdit_edge.kernels import available_backends
from tests.conftest import REPO, child_env

PROBE = ("import json, terdit_edge; from terdit_edge.kernels import available_backends; "
         "print(json.dumps({'file': terdit_edge.__file__, 'backends': available_backends()}))")


def test_a_child_process_imports_the_package_under_test(child_cwd):
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env=child_env(), cwd=child_cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    child = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(child["file"]).resolve() == Path(terdit_edge.__file__).resolve(), child["file"]
    assert child["backends"] == available_backends()


def test_child_env_drops_the_source_tree_from_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), "/elsewhere", str(REPO / "terdit_edge")]))
    assert child_env()["PYTHONPATH"] == "/elsewhere"
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert "PYTHONPATH" not in child_env()


def test_ci_runs_the_installed_package_not_the_source_tree():
    if os.environ.get("TERDIT_TEST_INSTALLED") != "1":
        pytest.skip("TERDIT_TEST_INSTALLED is not 1 (set by .ci/run, which installs with `pip install .`); "
                    "a development checkout may use an editable install")
    where = Path(terdit_edge.__file__).resolve().parent
    assert where != (REPO / "terdit_edge").resolve(), f"the tests imported terdit_edge from the source tree: {where}"
    assert "site-packages" in where.parts, where
