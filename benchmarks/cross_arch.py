"""Same images on every architecture? Dump outputs on each machine, then compare them in a table.

    python benchmarks/cross_arch.py dump OUT_DIR [--tag NAME]     # on each machine / emulated CPU
    python benchmarks/cross_arch.py table REF_DIR DIR [DIR ...]   # anywhere, e.g. after CI

`dump` writes, for fp32 and int10 activations, with the auto backend (cython: AVX2 on x86-64, NEON
with or without dotprod on aarch64, or the scalar path under TERDIT_ISA=scalar):
  - the bundled digits model through `terdit-edge generate` (ten classes, seeds 0..9, cfg 4; by
    default DPM++2M 20 steps, which takes ~20 s under qemu; --full: the CLI's default DDPM 250,
    ~4 min per run under qemu): the PNG and the sampled latents (--save-latents);
  - a small random TerDiT in the latent layout (tests/data/parity_qk_norm_mqa.tdit: 4 x 8 x 8
    latents, qk_norm + MQA), guided (cfg 4), DDIM 10 steps, labels [1, 7], seed 5: the latents.
`table` prints, for every run against REF_DIR's: the max relative latent difference
max|a - b| / max|b| (b: the reference latents), and for the PNG: bytes identical or not, how many
pixels (x, y) differ in any channel, and the largest difference of one channel value.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RANDOM_MODEL = REPO / "tests" / "data" / "parity_qk_norm_mqa.tdit"
MODES = ("fp32", "int10")


def dump(out: Path, tag: str | None, full: bool = False) -> None:
    import terdit_edge
    from terdit_edge.kernels.cpu import cpu_features

    out.mkdir(parents=True, exist_ok=True)
    feats = cpu_features()
    info = {"tag": tag or f"{platform.machine()}-{feats.get('isa', '?')}", "machine": platform.machine(),
            "generate": "ddpm 250 (CLI default)" if full else "dpm++2m 20 steps",
            "cpu": {k: v for k, v in feats.items()}}
    for mode in MODES:
        png, lat = out / f"digits-{mode}.png", out / f"digits-{mode}.npy"
        subprocess.run([sys.executable, "-m", "terdit_edge.frontends.cli", "generate", "--out", str(png),
                        "--save-latents", str(lat), "--activations", mode, "--no-progress",
                        *([] if full else ["--sampler", "dpm++2m", "--steps", "20"])],
                       check=True, cwd=out)
        model = terdit_edge.load_model(str(RANDOM_MODEL), activations=mode)
        x = terdit_edge.sample(model, [1, 7], steps=10, sampler="ddim", cfg_scale=4.0, seed=5)
        np.save(out / f"random-ddim10-cfg4-{mode}.npy", x)
    (out / "info.json").write_text(json.dumps(info, indent=1, default=str))
    print("dumped", info["tag"], "to", out)


def png_diff(a: Path, b: Path) -> tuple[bool, int, int]:
    from PIL import Image

    if a.read_bytes() == b.read_bytes():
        return True, 0, 0
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    d = np.abs(x - y)
    return False, int((d.max(axis=-1) > 0).sum()), int(d.max())


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def table(ref: Path, dirs: list[Path]) -> int:
    rtag = json.loads((ref / "info.json").read_text())["tag"]
    print(f"reference: {rtag}\n")
    print("| run | mode | digits: max rel. latent diff | digits PNG "
          "| random TerDiT (DDIM 10, cfg 4): max rel. latent diff |")
    print("|---|---|---|---|---|")
    worst = 0.0
    bad = 0
    for d in dirs:
        tag = json.loads((d / "info.json").read_text())["tag"]
        for mode in MODES:
            r1 = rel(np.load(d / f"digits-{mode}.npy"), np.load(ref / f"digits-{mode}.npy"))
            same, npix, dmax = png_diff(d / f"digits-{mode}.png", ref / f"digits-{mode}.png")
            r2 = rel(np.load(d / f"random-ddim10-cfg4-{mode}.npy"), np.load(ref / f"random-ddim10-cfg4-{mode}.npy"))
            pngs = "identical bytes" if same else f"{npix} pixels differ, max {dmax}"
            print(f"| {tag} | {mode} | {r1:.2e} | {pngs} | {r2:.2e} |")
            worst = max(worst, r1, r2)
            bad += dmax > 1
    print(f"\nworst max relative latent difference: {worst:.2e}; runs with a pixel off by more than 1: {bad}")
    return 0 if worst <= 1e-5 and bad == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--tag")
    d.add_argument("--full", action="store_true", help="the CLI's default sampler (DDPM 250 steps)")
    t = sub.add_parser("table")
    t.add_argument("ref")
    t.add_argument("dirs", nargs="+")
    a = p.parse_args()
    if a.cmd == "dump":
        dump(Path(a.out), a.tag, a.full)
        return 0
    return table(Path(a.ref), [Path(x) for x in a.dirs])


if __name__ == "__main__":
    sys.exit(main())
