"""Memory between phases: mapped weight pages given back, and no Numba import where it is not used."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from terdit_edge.format import read_tdit, release_pages
from tests.conftest import build_model_file, child_env

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"),
                                reason="reads RssFile from /proc/self/status (Linux)")


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile line")


@linux_only
def test_release_pages_drops_the_resident_pages_and_keeps_the_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    arr = np.frombuffer(mm, dtype=np.uint8).reshape(-1, 1024)[1:]  # a view of a view, off the first page
    total = int(arr.sum(dtype=np.uint64))  # touches every page
    before = _rss_file_mb()
    assert release_pages([arr]) >= arr.nbytes
    after = _rss_file_mb()
    assert before - after >= 24, (before, after)
    assert int(arr.sum(dtype=np.uint64)) == total  # mapped again, same bytes
    del arr
    mm.close()


def test_release_pages_ignores_arrays_in_ordinary_memory():
    assert release_pages([np.ones(1 << 16, np.float32), np.empty(0, np.float32)]) == 0


@linux_only
def test_loading_leaves_no_checked_page_resident(tmp_path):
    """read_tdit checks every byte (checksums, ternary codes, finite floats), then gives the pages
    back: the model maps in what it reads when it runs."""
    path = build_model_file(tmp_path, num_classes=3000, cond_dim=1024)  # a 12 MB label table
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 8, size_mb
    before = _rss_file_mb()
    tf = read_tdit(path)
    assert _rss_file_mb() - before < size_mb / 4, (before, _rss_file_mb(), size_mb)
    assert tf.release_pages() > 0


# Runs in the child: a whole `terdit-edge generate` of the bundled model with the cython backend.
NO_NUMBA = textwrap.dedent("""
    import json, sys
    from terdit_edge.kernels.cython_backend import CythonBackend  # not available_backends(): it imports all
    if CythonBackend.unavailable_reason():
        print(json.dumps({"skip": CythonBackend.unavailable_reason()}))
        raise SystemExit(0)
    from terdit_edge.frontends.cli import main
    rc = main(["generate", "--backend", "cython", "--steps", "3", "--sampler", "ddim", "--no-progress",
               "--out", sys.argv[1]])
    print(json.dumps({"rc": rc, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("numba", "llvmlite"))}))
""")


def test_a_cython_generation_imports_no_numba(tmp_path):
    """Numba and llvmlite cost ~70 MB of resident memory: a generation on the cython backend whose
    file holds no VAE (the VAE's convolution kernels are Numba) must not import them."""
    res = subprocess.run([sys.executable, "-c", NO_NUMBA, str(tmp_path / "out.png")], capture_output=True,
                         text=True, env=child_env(), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(f"cython backend not available: {report['skip']}")
    assert report["rc"] == 0 and report["loaded"] == [], report
