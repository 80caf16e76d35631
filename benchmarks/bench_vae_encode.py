"""SD-VAE encode speed and parity: terdit_edge's encoder against diffusers' AutoencoderKL.encode (float32).

    python benchmarks/bench_vae_encode.py [--json] [--threads N] [--size 256] [--repeat R] [--tile T]

The model is the full Stable Diffusion VAE shape (block_out_channels 128, 256, 512, 512,
layers_per_block 2) with random weights (diffusers' initialisation, seeded): no download, and
speed does not depend on the weight values. In one run, under the same thread count:

1. parity: max abs error / std of diffusers' latent mean, for ours with float32 weights and with
   float16-stored weights (the converter's default), and the encode + decode round trip PSNR of a
   real photo (scikit-learn's china.jpg, centre crop) for both implementations (random weights:
   the PSNR is low; the point is the difference);
2. speed: encode of a size x size picture (default 256), one warm-up each, then R interleaved
   rounds; ratio = median diffusers time / median ours (> 1: ours is faster). With --tile T also
   our tiled encode (T latent pixels per tile).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from terdit_edge.vae import VAEConfig, VAEDecoder  # noqa: E402
from terdit_edge.vae_config import expected_vae_tensors  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vae import SD_VAE, build_diffusers_model, default_threads  # noqa: E402  (one definition of each)


def photo(size: int) -> np.ndarray:
    """(1, 3, size, size) float32 in [-1, 1]: a crop of scikit-learn's sample photo (else a synthetic one)."""
    try:
        from sklearn.datasets import load_sample_image
        img = load_sample_image("china.jpg")  # 427 x 640
        side = min(img.shape[:2])
        y0, x0 = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        from PIL import Image
        img = np.asarray(Image.fromarray(img[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.BICUBIC))
    except ImportError:
        yy, xx = np.mgrid[0:size, 0:size] / size
        img = (np.stack([yy, xx, (yy + xx) / 2], -1) * 255).astype(np.uint8)
    return (img.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None].copy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--size", type=int, default=256, help="picture size of the speed test (pixels)")
    ap.add_argument("--parity-size", type=int, default=128, help="picture size of the parity and PSNR checks")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tile", type=int, default=None, help="also time a tiled encode with tiles of T latent pixels")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    model = build_diffusers_model()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = VAEConfig(**SD_VAE, encoder=True)
    names = expected_vae_tensors(cfg)
    ours32 = VAEDecoder(cfg, {k: state[k] for k in names}, threads=args.threads)
    ours16 = VAEDecoder(cfg, {k: state[k].astype(np.float16) for k in names}, threads=args.threads)

    def theirs_encode(x):
        with torch.no_grad():
            return model.encode(torch.from_numpy(x)).latent_dist.mean.numpy()

    def theirs_decode(z):
        with torch.no_grad():
            return model.decode(torch.from_numpy(z)).sample.numpy()

    # 1. parity and round trip
    x = photo(args.parity_size)
    want = theirs_encode(x)
    res = {"threads": args.threads, "parity_size": args.parity_size,
           "rel_err_fp32": float(np.abs(ours32.encode(x) - want).max() / want.std()),
           "rel_err_fp16_weights": float(np.abs(ours16.encode(x) - want).max() / want.std())}

    def psnr(y):
        return float(10 * np.log10(4.0 / np.mean((np.clip(y, -1, 1) - x) ** 2)))

    sf = np.float32(cfg.scaling_factor)
    res["psnr_ours"] = psnr(ours32.decode(ours32.encode(x) * sf))
    res["psnr_diffusers"] = psnr(theirs_decode(want))

    # 2. speed
    xs = photo(args.size)
    runs = {"diffusers": lambda: theirs_encode(xs), "ours fp32": lambda: ours32.encode(xs),
            "ours fp16 weights": lambda: ours16.encode(xs)}
    if args.tile:
        runs[f"ours fp16 tile {args.tile}"] = lambda: ours16.encode(xs, tile=args.tile)
    times: dict = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up (Numba compilation, oneDNN primitives)
    for _ in range(args.repeat):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["size"] = args.size
    res["seconds"] = med
    res["speedup_vs_diffusers"] = {k: med["diffusers"] / v for k, v in med.items() if k != "diffusers"}
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"SD-VAE encoder (full size, random weights), {args.threads} threads")
    print(f"parity at {args.parity_size} px: max abs err / std = {res['rel_err_fp32']:.2e} (fp32 weights), "
          f"{res['rel_err_fp16_weights']:.2e} (fp16 weights)")
    print(f"round trip PSNR of a photo: ours {res['psnr_ours']:.3f} dB, diffusers {res['psnr_diffusers']:.3f} dB "
          f"(difference {res['psnr_ours'] - res['psnr_diffusers']:+.3f} dB)")
    print(f"encode of a {args.size} x {args.size} picture, median of {args.repeat} (range):")
    for k, v in times.items():
        ratio = "" if k == "diffusers" else f"   {med['diffusers'] / med[k]:.2f}x diffusers"
        print(f"  {k:24s} {med[k]:7.3f} s ({min(v):.3f}-{max(v):.3f}){ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
