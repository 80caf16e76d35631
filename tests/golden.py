"""Golden outputs: the same latents and PNG bytes on every CPU kind (docs/reproducibility.md).

Each case of ``tests/data/golden.json`` is a list of ``terdit-edge generate`` arguments on the bundled
digits model with the default backend; ``latents_sha256`` hashes the raw float32 bytes (C order) of
what ``--save-latents`` writes, ``png_sha256`` the PNG file. The hashes were made once and are checked
by every CI leg: x86-64 native (tests/test_golden.py), an AVX2-only x86-64 emulated with
``qemu-x86_64 -cpu Haswell`` on any CI machine, and arm64 under qemu (.ci/run, .ci/arm64.sh). A change
that moves a hash must say why in its commit (e.g. the version in the PNG metadata).

Run as a script, so that it imports the installed package (not a source tree beside it)::

    python tests/golden.py                 # check every case, print the kernel path; exit 1 on a mismatch
    python tests/golden.py --expect-isa avx2
    python tests/golden.py --write         # rewrite the hashes (say why in the commit)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "data" / "golden.json"

# Several seeds, every sampler, fp32 / int10 / int8, guided and unguided, a guidance interval, a batch
# split over batch_size 2, 1 and 2 threads. The bundled model is small (16 tokens, 4 blocks), so the
# whole list runs in seconds natively and in a few minutes under qemu.
CASES: list[list[str]] = [
    ["--steps", "25", "--seed", "3", "--threads", "1"],  # every class, DDPM, fp32, cfg 4, a grid
    ["--class", "4", "--sampler", "ddpm", "--steps", "12", "--activations", "int8", "--seed", "7"],
    ["--class", "0", "--class", "9", "--grid", "--sampler", "ddim", "--steps", "10", "--eta", "0.5",
     "--activations", "int10", "--seed", "5", "--threads", "2"],
    ["--class", "6", "--sampler", "dpm++2m", "--steps", "20", "--cfg", "1", "--seed", "123"],  # unguided
    ["--class", "2", "--sampler", "dpm++2m", "--steps", "8", "--activations", "int10",
     "--guidance-interval", "100,600", "--seed", "9"],
    ["--class", "3", "--class", "7", "--class", "7", "--grid", "--seeds", "11,12,40", "--batch-size", "2",
     "--sampler", "ddim", "--steps", "15", "--activations", "int8", "--cfg", "2.5"],
    ["--class", "8", "--sampler", "ddim", "--steps", "20", "--activations", "fp32", "--seed", "18446744073709551615"],
]


def run_case(args: list[str], workdir: str) -> dict:
    """Run `terdit-edge generate ARGS` in this process; the two hashes of what it wrote."""
    from terdit_edge.frontends.cli import main

    png = os.path.join(workdir, "out.png")
    npy = os.path.join(workdir, "latents.npy")
    for p in (png, npy):
        if os.path.exists(p):
            os.remove(p)
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        rc = main(["generate", *args, "--out", png, "--save-latents", npy, "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"terdit-edge generate {' '.join(args)} exited with {rc}:\n{log.getvalue()}")
    import numpy as np

    lat = np.load(npy)
    if lat.dtype != np.float32:
        raise RuntimeError(f"--save-latents wrote {lat.dtype}, expected float32")
    return {"latents_sha256": hashlib.sha256(np.ascontiguousarray(lat).tobytes()).hexdigest(),
            "png_sha256": hashlib.sha256(Path(png).read_bytes()).hexdigest()}


def describe_machine() -> str:
    """The kernel path, NumPy's dispatch target and BLAS core: what this leg really ran on."""
    import numpy as np

    from terdit_edge import _ternary
    from terdit_edge.kernels import get_backend

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    simd = [f for f in ("AVX2", "AVX512F", "AVX512_SKX", "ASIMD", "ASIMDDP") if feats.get(f)]
    return (f"backend {get_backend('auto').describe()}, kernel isa {_ternary.get_isa()}, "
            f"numpy {np.__version__} sees {'/'.join(simd) or 'baseline'}")


def check(write: bool = False, expect_isa: str | None = None, golden: Path = GOLDEN) -> list[str]:
    """Run every case; return the mismatches (or rewrite the file when write is true)."""
    from terdit_edge import _ternary

    if expect_isa is not None and _ternary.get_isa() != expect_isa:
        raise RuntimeError(f"expected the {expect_isa} kernels, this leg runs {_ternary.get_isa()}")
    stored = {json.dumps(c["args"]): c for c in json.loads(golden.read_text())} if golden.exists() else {}
    results, bad = [], []
    with tempfile.TemporaryDirectory() as d:
        for args in CASES:
            got = run_case(args, d)
            results.append({"args": args, **got})
            want = stored.get(json.dumps(args))
            if not write and (want is None or any(want[k] != got[k] for k in got)):
                bad.append(f"{' '.join(args)}: got {got}, golden {want}")
    if write:
        golden.write_text(json.dumps(results, indent=1) + "\n")
    elif len(stored) != len(CASES):
        bad.append(f"{golden.name} has {len(stored)} cases, the list here {len(CASES)}: rewrite it (--write)")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite tests/data/golden.json")
    ap.add_argument("--expect-isa", default=None, help="fail unless the kernels run this path (e.g. avx2)")
    ap.add_argument("--golden", type=Path, default=GOLDEN, help="the hash file (default tests/data/golden.json)")
    args = ap.parse_args(argv)
    print("golden:", describe_machine(), flush=True)
    bad = check(write=args.write, expect_isa=args.expect_isa, golden=args.golden)
    for line in bad:
        print("MISMATCH", line)
    print(f"golden: {len(CASES)} case(s), {len(bad)} mismatch(es)" + (" (written)" if args.write else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
