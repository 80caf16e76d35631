"""Coverage-guided fuzzing of every reader terdit-edge has, with atheris (libFuzzer for Python).

    python benchmarks/fuzz_readers.py [--reader tdit|vae-tdit|checkpoint|vae-checkpoint|cli|all]
                                      [--inputs 100000] [--timeout 30] [--json]

Readers and what counts as a failure:

* ``tdit``: `read_tdit` + `load_model` + one forward pass of a small model file. Input: the bytes of a
  .tdit file (seed corpus: a valid small model file, from the same builder as the tests). A file must
  be refused with a terdit_edge error, or load and compute **exactly** what the undamaged file computes
  (anything else is a silently different output).
* ``vae-tdit``: the same for a VAE-only .tdit file through `load_vae` + a decode.
* ``checkpoint``: the converter's reader of TerDiT checkpoints (`torch.load` with `weights_only=True`
  and an allow-list, then config inference and the tensor build). Input: a .pth file's bytes. Must be
  refused with a terdit_edge error or convert.
* ``vae-checkpoint``: the converter's reader of VAE files (safetensors with diffusers names).
* ``cli``: the CLI's argument parsing. Input: NUL-separated arguments. Must parse, or exit with
  argparse's usage error (SystemExit 2) or after --help / --version (SystemExit 0).

Any other exception, a crash of the process, or an input running longer than `--timeout` seconds is a
finding: libFuzzer stops, prints the input and writes it as crash-*/timeout-* under the run's
directory. Each reader runs in its own process for `--inputs` executions (libFuzzer `-runs`),
instrumented with atheris so that mutations follow new coverage. The checkpoint readers need torch
(the test extras); atheris comes with the `[fuzz]` extra. Prints one line per reader:
executions, seconds, findings.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
READERS = ("tdit", "vae-tdit", "checkpoint", "vae-checkpoint", "cli")


# --- seed inputs --------------------------------------------------------------------------------

def _small_model_bytes(tmp: str) -> bytes:
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # not ROOT: terdit_edge must stay the installed package
    from conftest import build_model_file
    return build_model_file(tmp, name="seed.tdit", dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                            cond_dim=32, input_size=4).read_bytes()


def _small_vae_tensors():
    import numpy as np

    from terdit_edge.vae_config import VAEConfig, expected_vae_tensors
    cfg = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, mid_block_attention=True)
    rng = np.random.default_rng(0)
    return cfg, {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in expected_vae_tensors(cfg).items()}


def _small_vae_tdit_bytes(tmp: str) -> bytes:
    from terdit_edge.format import VAE_PREFIX, write_tdit
    cfg, tensors = _small_vae_tensors()
    path = os.path.join(tmp, "vae.tdit")
    write_tdit(path, {VAE_PREFIX + k: v for k, v in tensors.items()},
               {"vae_config": cfg.to_json(), "vae_dtype": "F32"})
    with open(path, "rb") as f:
        return f.read()


def _small_checkpoint_bytes() -> bytes:
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_reference as ref
    model = ref.random_model(dim=32, n_layers=1, n_heads=2, num_classes=4, input_size=4, seed=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _small_vae_safetensors_bytes() -> bytes:
    from safetensors.numpy import save
    _, tensors = _small_vae_tensors()
    return save(tensors)


# --- one reader per process -----------------------------------------------------------------------

def run_reader(reader: str, inputs: int, timeout: int, workdir: str) -> int:
    import atheris

    with atheris.instrument_imports(include=["terdit_edge"]):
        import numpy as np

        import terdit_edge
        from terdit_edge.errors import TerditError
        from terdit_edge.frontends.cli import build_parser
        from terdit_edge.pipeline import load_vae
        if reader in ("checkpoint", "vae-checkpoint"):
            from terdit_edge.converters.terdit import build_tensors, infer_config, read_checkpoint
            from terdit_edge.converters.vae import load_vae_checkpoint

    corpus = os.path.join(workdir, "corpus")
    os.makedirs(corpus, exist_ok=True)
    path = os.path.join(workdir, {"tdit": "in.tdit", "vae-tdit": "in.tdit", "checkpoint": "in.pth",
                                  "vae-checkpoint": "in.safetensors", "cli": "argv"}[reader])
    if reader == "tdit":
        seed = _small_model_bytes(workdir)
        x = np.random.default_rng(3).standard_normal((2, 4, 4, 4), dtype=np.float32)
        t, y = np.array([999, 10]), np.array([2, 10])

        def run(p):
            return terdit_edge.load_model(p, backend="numpy", threads=1)(x, t, y)
    elif reader == "vae-tdit":
        seed = _small_vae_tdit_bytes(workdir)
        z = np.random.default_rng(3).standard_normal((1, 4, 3, 3), dtype=np.float32)

        def run(p):
            return load_vae(p, threads=1).decode(z)
    elif reader == "checkpoint":
        seed = _small_checkpoint_bytes()

        def run(p):
            ck = read_checkpoint(p)
            cfg, layout = infer_config(ck, n_heads=2, image_size=4)
            build_tensors(ck, cfg, layout, "fp32", log=None)
    elif reader == "vae-checkpoint":
        seed = _small_vae_safetensors_bytes()

        def run(p):
            load_vae_checkpoint(p)
    else:
        seed = b"\0".join([b"generate", b"--class", b"3", b"--steps", b"ddim20", b"--seeds", b"1,2",
                           b"--guidance-interval", b"100,500", b"--cfg", b"1.5"])
        parser = build_parser()

        def run(_p):
            return None

    with open(os.path.join(corpus, "seed"), "wb") as f:
        f.write(seed)
    reference = None
    if reader in ("tdit", "vae-tdit"):
        with open(path, "wb") as f:
            f.write(seed)
        reference = run(path)

    def one_input(data: bytes):
        if reader == "cli":
            argv = [a.decode("utf-8", "replace") for a in data.split(b"\0")]
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                if e.code not in (0, 2):  # 0: --help / --version; 2: a usage error
                    raise
            return
        with open(path, "wb") as f:
            f.write(data)
        try:
            out = run(path)
        except TerditError:
            return
        if reference is not None and not np.array_equal(out, reference):
            raise AssertionError("a damaged file loaded and computes something else")

    sys.stdout.flush()
    argv = [sys.argv[0], corpus, f"-runs={inputs}", f"-timeout={timeout}", "-max_len=1048576",
            f"-artifact_prefix={workdir}/", "-print_final_stats=1", "-rss_limit_mb=4096"]
    # the CLI reader never prints usage for every input
    if reader == "cli":
        sys.stderr = open(os.devnull, "w")
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reader", default="all", choices=(*READERS, "all"))
    ap.add_argument("--inputs", type=int, default=100000, help="executions per reader (libFuzzer -runs)")
    ap.add_argument("--timeout", type=int, default=30, help="seconds per input before it counts as a hang")
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        sys.exit(run_reader(args.reader, args.inputs, args.timeout, args.workdir))

    readers = READERS if args.reader == "all" else (args.reader,)
    rows = []
    for reader in readers:
        work = tempfile.mkdtemp(prefix=f"fuzz-{reader}-")
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", "--reader", reader, "--inputs",
                               str(args.inputs), "--timeout", str(args.timeout), "--workdir", work],
                              capture_output=True, text=True)
        seconds = time.time() - t0
        log = proc.stdout + proc.stderr
        findings = sorted(f for f in os.listdir(work) if f.startswith(("crash-", "timeout-", "oom-", "leak-")))
        execs = None
        for line in log.splitlines():
            if "stat::number_of_executed_units:" in line:
                execs = int(line.split(":")[-1])
        row = {"reader": reader, "executions": execs, "seconds": round(seconds, 1), "returncode": proc.returncode,
               "findings": findings, "workdir": work}
        rows.append(row)
        if proc.returncode != 0 or findings:
            print(log[-4000:], file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            status = "ok" if r["returncode"] == 0 and not r["findings"] else f"FAILED (rc {r['returncode']})"
            print(f"{r['reader']:15s} {r['executions']} executions in {r['seconds']} s: {len(r['findings'])} "
                  f"findings {r['findings']} {status}")
    sys.exit(0 if all(r["returncode"] == 0 and not r["findings"] for r in rows) else 1)


if __name__ == "__main__":
    main()
