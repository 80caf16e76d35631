"""`terdit-edge generate` with every CPU backend: time, and whether the PNG bytes are identical.

    python benchmarks/generate_backends.py [--repeat 3] [--backends numpy,numba,cython]
                                           [--activations fp32] [-- EXTRA GENERATE ARGS]

Runs the installed CLI (`terdit-edge generate --out FILE --backend B --activations A --no-progress`,
by default the bundled model, every class, DDPM 250 steps) in a fresh process per run, `repeat` times
per backend, and prints the median and range of the wall time and each PNG's SHA-256. Exits 1 if the
PNG bytes differ between backends (in fp32 mode they must not; in int8/int10 the backends agree to
rounding only). The first run of a backend includes Numba's cache load or compilation.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def cli() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "terdit-edge")
    if os.path.exists(script):
        return [script]
    found = shutil.which("terdit-edge")
    return [found] if found else [sys.executable, "-m", "terdit_edge.frontends.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="numpy,numba,cython")
    ap.add_argument("--activations", default="fp32")
    ap.add_argument("extra", nargs="*", help="more arguments for generate (after --)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="generate-backends-")
    rows = {}
    for be in a.backends.split(","):
        times, digests = [], set()
        for i in range(a.repeat):
            out = os.path.join(work, f"{be}-{i}.png")
            cmd = [*cli(), "generate", "--out", out, "--backend", be, "--activations", a.activations,
                   "--no-progress", *a.extra]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
            times.append(time.perf_counter() - t0)
            if r.returncode != 0:
                print(f"{be}: generate failed (exit {r.returncode}): {r.stderr.strip()[-500:]}", file=sys.stderr)
                return 2
            with open(out, "rb") as f:
                digests.add(hashlib.sha256(f.read()).hexdigest())
        rows[be] = (times, digests)
    print(f"terdit-edge generate {' '.join(a.extra) or '(defaults)'}, activations {a.activations}, "
          f"{a.repeat} runs per backend, fresh process each")
    for be, (times, digests) in rows.items():
        print(f"  {be:7s} median {statistics.median(times):6.2f} s  [{min(times):.2f}-{max(times):.2f}]  "
              f"png sha256 {', '.join(d[:16] for d in sorted(digests))}")
    all_digests = set().union(*(d for _, d in rows.values()))
    same = len(all_digests) == 1
    print("PNG bytes identical across backends and runs" if same else "PNG bytes DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
