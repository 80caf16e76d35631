"""Peak memory and time of `terdit-edge generate` on a TerDiT-600M-config pipeline file with a full-size SD-VAE.

    python benchmarks/bench_generate.py [--json] [--steps 2] [--size 256] [--vae-tile N] [--threads N]

The pipeline file (random 600M release-layout checkpoint + a random full-size diffusers AutoencoderKL,
fp16 VAE) is built once with the real converter and cached like bench_step.py's files. The command
runs in a fresh subprocess; its peak resident set (VmHWM) is read at exit, and compared with the
same process's resident set right after `import terdit_edge` (the baseline of the same run).

Activations: int8 by default here (the fastest mode); the CLI's own default is fp32, so pass
`--activations fp32` to time what a plain `terdit-edge generate` does. The mode is printed with the result.
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
import terdit_edge.cli as cli
base = status('VmRSS:')
t0 = time.perf_counter()
rc = cli.main(sys.argv[1:])
print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t0, 'peak_rss_mb': status('VmHWM:'),
                  'rss_after_import_mb': base}))
"""


def pipeline_file(size: int) -> str:
    sys.path.insert(0, HERE)
    from bench_step import _cache_dir, prepare

    ck, _ = prepare("600m")
    vae_dir = os.path.join(_cache_dir(), "sd-vae-random")
    if not os.path.exists(os.path.join(vae_dir, "config.json")):
        import diffusers
        import torch

        torch.manual_seed(0)
        diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=size).save_pretrained(vae_dir)
    out = os.path.join(_cache_dir(), f"600m-vae-{size}.tdit")
    if not os.path.exists(out):
        from terdit_edge.converters.terdit import convert
        convert(ck, out, label_map="identity", image_size=size, vae=vae_dir, log=lambda m: print(m, file=sys.stderr))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--vae-tile", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--activations", default="int8", choices=("fp32", "int8", "int10"),
                    help="activation mode passed to generate (default int8; the CLI default is fp32)")
    a = ap.parse_args()
    path = pipeline_file(a.size)
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
    res.update(size=a.size, steps=a.steps, vae_tile=a.vae_tile, file_mb=os.path.getsize(path) / 1e6)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"terdit-edge generate, 600M + SD-VAE ({res['file_mb']:.0f} MB file), {a.size}px, {a.steps} DDIM steps, "
          f"activations {a.activations}, vae_tile {a.vae_tile}: {res['seconds']:.1f} s, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB "
          f"(after import: {res['rss_after_import_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
