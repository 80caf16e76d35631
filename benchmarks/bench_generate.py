"""Peak memory and time of `terdit-edge generate` on a TerDiT-600M-config pipeline file with a full-size SD-VAE.

    python benchmarks/bench_generate.py [--json] [--config 600m|4.2B] [--steps 2] [--size 256] [--vae-tile N]
                                        [--threads N] [--activations int8|int10|fp32]
    python benchmarks/bench_generate.py --vae-ratio 16,18 [--size 256] [--threads 1] [--repeat 3]

The pipeline file (random 600M release-layout checkpoint, or 4.2B with --config 4.2B --size 512, + a
random full-size diffusers AutoencoderKL, fp16 VAE) is built once with the real converter and cached
like bench_step.py's files. The command runs in a fresh subprocess; its peak resident set (VmHWM)
is read at exit, and compared with the same process's resident set right after `import terdit_edge`
(the baseline of the same run).

Activations: int8 by default here (the fastest mode); the CLI's own default is fp32, so pass
`--activations fp32` to time what a plain `terdit-edge generate` does. The mode is printed with the result.

--vae-ratio TILES times, in this process with process CPU time, an untiled decode of one size/8 latent
against tiled decodes (overlap tile // 4) and against decoding each tile's crop alone (the cost of the
tiled decode when every weight was prepared again per tile).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, sys
def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
import time
import terdit_edge.frontends.cli as cli
base = status('VmRSS:')
t0, c0 = time.perf_counter(), time.process_time()
rc = cli.main(sys.argv[1:])
print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t0, 'cpu_seconds': time.process_time() - c0,
                  'peak_rss_mb': status('VmHWM:'),
                  'rss_after_import_mb': base}))
"""


def pipeline_file(size: int, config: str = "600m") -> str:
    sys.path.insert(0, HERE)
    from bench_step import _cache_dir, prepare

    ck, _ = prepare(config, image_size=None if config == "600m" else size)
    vae_dir = os.path.join(_cache_dir(), "sd-vae-random")
    if not os.path.exists(os.path.join(vae_dir, "config.json")):
        import diffusers
        import torch

        torch.manual_seed(0)
        diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=size).save_pretrained(vae_dir)
    out = os.path.join(_cache_dir(), f"{'600m' if config == '600m' else config.lower()}-vae-{size}.tdit")
    if not os.path.exists(out):
        from terdit_edge.converters.terdit import convert
        convert(ck, out, label_map="identity", image_size=size, vae=vae_dir, log=lambda m: print(m, file=sys.stderr))
    return out


def vae_tiling_ratio(path: str, latent: int, tiles, threads: int, repeat: int) -> dict:
    """CPU seconds of untiled and tiled decodes of one latent (the file's fp16 VAE, mapped), measured
    in this process, interleaved over ``repeat`` rounds; medians. "per_tile" decodes each tile's
    crop alone through the whole decoder (every weight prepared again per tile, as the tiled decode
    did before issue 14): same tiles, no blending."""
    import statistics
    import time

    import numpy as np

    from terdit_edge.pipeline import load_vae

    dec = load_vae(path, threads=threads)
    z = np.random.default_rng(0).standard_normal((1, 4, latent, latent), dtype=np.float32)
    dec.decode(z[:, :, :8, :8])  # Numba's first calls (cache loading) outside the timings

    def crops(tile, overlap):
        stride = tile - overlap
        count = 1 + -(-(latent - tile) // stride)
        starts = [round(i * (latent - tile) / (count - 1)) for i in range(count)] if latent > tile else [0]
        return [z[:, :, y:y + tile, x:x + tile] for y in starts for x in starts]

    runs = {"untiled": lambda: dec.decode(z)}
    for tile in tiles:
        overlap = tile // 4
        runs[f"tile{tile}"] = lambda t=tile, o=overlap: dec.decode(z, tile=t, overlap=o)
        runs[f"tile{tile}_per_tile"] = lambda t=tile, o=overlap: [dec.decode(c) for c in crops(t, o)]
    times = {k: [] for k in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"latent": latent, "threads": threads, "repeat": repeat, "cpu_seconds": med}
    for tile in tiles:
        n = len(crops(tile, tile // 4))
        out[f"tile{tile}"] = {"tiles": n, "overlap": tile // 4,
                              "decoded_area_vs_image": n * min(tile, latent) ** 2 / latent ** 2,
                              "ratio_vs_untiled": med[f"tile{tile}"] / med["untiled"],
                              "per_tile_ratio_vs_untiled": med[f"tile{tile}_per_tile"] / med["untiled"]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--config", default="600m", choices=("600m", "4.2B"),
                    help="DiT of the pipeline file (random release-layout weights, converted; 4.2B: pass "
                         "--size 512, the checkpoint is ~1.1 GB and takes minutes to write and convert)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--vae-tile", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--activations", default="int8", choices=("fp32", "int8", "int10"),
                    help="activation mode passed to generate (default int8; the CLI default is fp32)")
    ap.add_argument("--vae-ratio", default=None, metavar="TILES",
                    help="instead of generate: time untiled vs tiled decodes of one size/8 latent in this "
                         "process (process CPU time, --threads, default 1), e.g. --vae-ratio 16,18")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of --vae-ratio (median)")
    a = ap.parse_args()
    path = pipeline_file(a.size, a.config)
    if a.vae_ratio:
        res = vae_tiling_ratio(path, a.size // 8, [int(t) for t in a.vae_ratio.split(",")], a.threads or 1,
                               a.repeat)
        if a.json:
            print(json.dumps(res, indent=2))
            return
        print(f"SD-VAE decode of a {res['latent']}x{res['latent']} latent, fp16 weights mapped, {res['threads']} "
              f"thread(s), process CPU seconds, median of {a.repeat} interleaved rounds:")
        print(f"  untiled {res['cpu_seconds']['untiled']:.2f} s")
        for t in a.vae_ratio.split(","):
            r = res[f"tile{t}"]
            print(f"  tile {t} (overlap {r['overlap']}, {r['tiles']} tiles, {r['decoded_area_vs_image']:.2f}x the "
                  f"latent area): {res['cpu_seconds'][f'tile{t}']:.2f} s = {r['ratio_vs_untiled']:.2f}x untiled; "
                  f"each tile decoded alone: {r['per_tile_ratio_vs_untiled']:.2f}x")
        return
    out = os.path.join(tempfile.mkdtemp(), "bench.png")
    args = [path, "--class", "207", "--steps", str(a.steps), "--sampler", "ddim", "--out", out, "--no-progress",
            "--activations", a.activations]
    if a.vae_tile:
        args += ["--vae-tile", str(a.vae_tile)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    r = subprocess.run([sys.executable, "-c", _CHILD, "generate", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"generate failed: {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(config=a.config, size=a.size, steps=a.steps, vae_tile=a.vae_tile, threads=a.threads,
               activations=a.activations, file_mb=os.path.getsize(path) / 1e6)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"terdit-edge generate, {a.config} + SD-VAE ({res['file_mb']:.0f} MB file), {a.size}px, {a.steps} DDIM steps, "
          f"activations {a.activations}, vae_tile {a.vae_tile}: {res['seconds']:.1f} s "
          f"({res['cpu_seconds']:.1f} s CPU), "
          f"peak RSS {res['peak_rss_mb']:.0f} MB "
          f"(after import: {res['rss_after_import_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
