"""The golden outputs of tests/data/golden.json on this machine (the x86-64 native leg; .ci/run also
checks them on an emulated AVX2-only CPU and .ci/arm64.sh on arm64). See tests/golden.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import child_env

HERE = Path(__file__).resolve().parent


def test_golden_list_covers_what_the_promise_names():
    """Every sampler, every activation mode, guided and unguided, a batch: the golden file is the
    list in tests/golden.py, with two 64-hex hashes per case."""
    cases = json.loads((HERE / "data" / "golden.json").read_text())
    args = [" ".join(c["args"]) for c in cases]
    for needle in ("ddpm", "ddim", "dpm++2m", "int8", "int10", "--cfg 1 ", "--batch-size", "--guidance-interval"):
        assert any(needle in a + " " for a in args), needle
    assert any("--activations" not in a for a in args)  # fp32 by default
    for c in cases:
        for key in ("latents_sha256", "png_sha256"):
            assert len(c[key]) == 64 and int(c[key], 16) >= 0


def test_generate_reproduces_the_golden_hashes(tmp_path):
    """`terdit-edge generate` on this CPU gives the golden latents and PNG bytes, every case.
    A fresh process (the script imports the installed package; no ISA forced by other tests)."""
    r = subprocess.run([sys.executable, str(HERE / "golden.py")], capture_output=True, text=True, env=child_env(),
                       cwd=tmp_path, timeout=600)
    report = "\n".join(line for line in r.stdout.splitlines() if line.startswith(("golden", "MISMATCH")))
    assert r.returncode == 0, report + r.stderr[-2000:]
    assert "0 mismatch(es)" in report
