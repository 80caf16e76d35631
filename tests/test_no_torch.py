"""Inference needs no PyTorch: load a model and sample in a process where ``import torch`` fails."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import build_model_file, child_env

# Runs in the child. A meta-path finder placed first refuses torch and every torch submodule and
# records each attempt, so an import hidden behind ``try: import torch except ImportError`` is seen too.
CHILD = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        attempts = []

        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                self.attempts.append(name)
                raise ImportError(f"torch is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
        raise SystemExit("the torch block does not work")
    except ImportError:
        pass
    NoTorch.attempts.clear()

    import numpy as np
    import terdit_edge

    model = terdit_edge.load_model(sys.argv[1])
    results = {}
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        z = terdit_edge.sample(model, [1, 7], steps=3, sampler=sampler, cfg_scale=4.0, seed=0)
        results[sampler] = [list(z.shape), str(z.dtype), bool(np.isfinite(z).all())]
    print(json.dumps({"results": results, "backend": model.backend.name,
                      "torch_modules": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                      "attempts": NoTorch.attempts}))
""")


def test_load_and_sample_without_torch(tmp_path):
    path = build_model_file(tmp_path)
    res = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                         env=child_env(), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for sampler, (shape, dtype, finite) in report["results"].items():
        assert shape == [2, 4, 8, 8] and dtype == "float32" and finite, (sampler, report)
    assert report["torch_modules"] == [], report
    assert report["attempts"] == [], f"terdit_edge tried to import torch: {report['attempts']}"
