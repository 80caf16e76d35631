"""A short coverage-guided fuzzing run of every reader (benchmarks/fuzz_readers.py; the long campaign's
figures are in docs/format.md). Needs atheris (the `[fuzz]` extra, installed by CI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import child_env

atheris = pytest.importorskip("atheris", reason="atheris is not installed: pip install '.[fuzz]'")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "fuzz_readers.py")


@pytest.mark.parametrize("reader", ["tdit", "vae-tdit", "checkpoint", "vae-checkpoint", "cli"])
def test_short_fuzzing_run_finds_nothing(reader):
    if reader in ("checkpoint", "vae-checkpoint"):
        pytest.importorskip("torch", reason="the checkpoint readers need torch (test extras)")
    proc = subprocess.run([sys.executable, SCRIPT, "--reader", reader, "--inputs", "1500", "--json"],
                          capture_output=True, text=True, timeout=900, env=child_env(), cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    assert row["findings"] == [] and row["executions"] >= 1500, row
