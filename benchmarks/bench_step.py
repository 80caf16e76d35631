"""One guided denoising step of a TerDiT-600M-config model: terdit-edge vs PyTorch float32 (and
bfloat16 where the CPU has native bf16: AVX512_BF16 or AMX).

    python benchmarks/bench_step.py [--json] [--threads 1,2] [--repeat 3] [--config 600m|4.2B|small]
                                    [--image-size 256|512] [--blocks N]
                                    [--backends cython,numba] [--modes fp32,int8,int10] [--skip-torch]
                                    [--clock wall|cpu]

A random checkpoint in the official release layout is written once (cached under
$TERDIT_BENCH_CACHE, default ~/.cache/terdit-edge-bench) and converted with the real converter.
The step is the model forward on batch 2 (one image: the conditional and the null label, 256 tokens
at 256 px, 1024 at 512 px) plus the guidance mix. `--config 4.2B` is the paper's 4.2B model (D 3072,
32 blocks; "3b" in the authors' code). `--blocks N` keeps only the first N transformer blocks of the
config (same block shapes, a smaller file): use it where PyTorch float32 of the whole model does not
fit in memory (4.2B dequantized is ~17 GB) and compare per block; the title says so. PyTorch runs
the same weights dequantized (alpha * Q as float32 nn.Linear) in the independent reference
implementation from tests/torch_reference.py.

Where the CPU has native bf16, PyTorch bfloat16 (nn.Linear weights in bf16, run under CPU autocast)
runs beside float32 with the same threads; its row shows its time against float32 ("vs torch") and
the relative L2 error of its output against PyTorch float32.

Each measurement runs in its own subprocess so that its peak RSS (VmHWM) is its own. Ratios
are against PyTorch float32 measured in the same run; the integer rows (int8, int10) also report the
relative L2 error of the guided model output against the fp32 mode of the same backend.

Times are the median of the timed repeats (the range is printed beside it). `--clock cpu` times
process CPU time instead of wall time: with `--threads 1` that is the figure a busy shared machine
cannot inflate by descheduling the process (with more threads it sums the threads' CPU time,
spin-waiting included, so use it with 1 thread).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cache_dir() -> str:
    d = os.environ.get("TERDIT_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "terdit-edge-bench"))
    os.makedirs(d, exist_ok=True)
    return d


def prepare(config: str, image_size: int | None = None, blocks: int | None = None) -> tuple[str, str]:
    """(checkpoint dir, .tdit path), created on first use. The default names (ck-600m, 600m.tdit) are
    those of earlier versions; another image size or a block count adds a suffix."""
    sys.path.insert(0, HERE)
    from make_checkpoint import CONFIGS, make_release_checkpoint

    config = "3b" if config == "4.2B" else config
    name = config
    if image_size and image_size != CONFIGS[config]["image_size"]:
        name += f"-{image_size}px"
    if blocks:
        name += f"-{blocks}blk"
    ck = os.path.join(_cache_dir(), f"ck-{name}")
    tdit = os.path.join(_cache_dir(), f"{name}.tdit")
    if not os.path.exists(os.path.join(ck, "consolidated_ema_ternary.00-of-01.pth")):
        print(f"writing a random {name} release-layout checkpoint to {ck} ...", file=sys.stderr)
        make_release_checkpoint(ck, config, image_size=image_size, n_layers=blocks)
    if not os.path.exists(tdit):
        print(f"converting to {tdit} ...", file=sys.stderr)
        from terdit_edge.converters.terdit import convert
        convert(ck, tdit, label_map="identity", log=lambda m: print(m, file=sys.stderr))
    return ck, tdit


def _inputs(config, image_size=None):
    import numpy as np

    rng = np.random.default_rng(0)
    size = image_size // 8 if image_size else {"600m": 32, "3b": 32, "4.2B": 32, "small": 8}[config]
    x = rng.standard_normal((1, 4, size, size), dtype=np.float32)
    return x, 500, np.array([207])


def _common_args(args) -> list[str]:
    """The worker arguments every measurement shares."""
    size = ["--image-size", str(args.image_size)] if args.image_size else []
    return ["--repeat", str(args.repeat), "--clock", args.clock, "--config", args.config, *size]


def _clock(args):
    return time.process_time if args.clock == "cpu" else time.perf_counter


def _time_stats(times: list[float]) -> dict:
    """seconds: the median of the timed repeats (what the ratios use); best and worst beside it."""
    import statistics

    return {"seconds": statistics.median(times), "best": min(times), "worst": max(times), "times": times}


def worker_ours(args) -> dict:
    import numpy as np

    import terdit_edge
    from terdit_edge.diffusion import guided_model_output

    model = terdit_edge.load_model(args.tdit, backend=args.backend, activations=args.activations,
                                   threads=args.threads, attention=args.attention)
    x, t, y = _inputs(args.config, args.image_size)
    out = guided_model_output(model, x, t, y, 4.0)  # warm-up: JIT, buffers, page cache
    times = []
    for _ in range(args.repeat):
        t0 = _clock(args)()
        out = guided_model_output(model, x, t, y, 4.0)
        times.append(_clock(args)() - t0)
    np.save(args.save, out)
    return {**_time_stats(times), "backend": model.backend.describe()}


def dequantize_in_place(torch, ref, model) -> None:
    """Turn every TernaryLinear into a plain float32 nn.Linear holding alpha * Q, reusing the layer's
    own weight tensor (scaled in place), so that the model holds one float32 copy of the weights, as
    a user's PyTorch model would. (Collecting new layers while the old ones stay referenced would
    hold two copies at the peak.)"""
    sites = [(parent_name, name) for parent_name, parent in model.named_modules()
             for name, child in parent.named_children() if isinstance(child, ref.TernaryLinear)]
    for parent_name, name in sites:
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        with torch.no_grad():
            weight = child.ternary().detach()
            weight.mul_(child.alphas.detach())
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        if child.bias is not None:
            lin.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
        setattr(parent, name, lin)
        del child, weight


def native_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16; on Linux from
    /proc/cpuinfo): only there is PyTorch bfloat16 a baseline a user would pick (issue 16)."""
    from terdit_edge.kernels.cpu import _proc_flags
    return bool({"avx512_bf16", "amx_bf16"} & _proc_flags())


def worker_torch(args, bf16: bool = False) -> dict:
    import contextlib

    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_reference as ref

    torch.set_num_threads(args.threads)
    sd = torch.load(os.path.join(args.ck, "consolidated_ema_ternary.00-of-01.pth"), weights_only=True)
    with open(args.tdit_config) as f:
        cfg = json.load(f)
    model = ref.DiTLlama(input_size=cfg["input_size"], dim=cfg["dim"], n_layers=cfg["n_layers"],
                         n_heads=cfg["n_heads"], num_classes=cfg["num_classes"], qk_norm=cfg["qk_norm"])
    ref.load_released_state_dict(model, sd)
    del sd
    dequantize_in_place(torch, ref, model)
    model.eval()
    if bf16:  # linear weights held in bfloat16, run under autocast; norms, embeddings and the rest in fp32
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.to(torch.bfloat16)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    x, t, y = _inputs(args.config, args.image_size)
    xx = torch.from_numpy(np.concatenate([x, x]))
    tt = torch.full((2,), t, dtype=torch.int64)
    yy = torch.tensor([int(y[0]), cfg["num_classes"]])
    times = []
    with torch.inference_mode(), ctx:
        out = model.forward_with_cfg(xx, tt, yy, 4.0)
        for _ in range(args.repeat):
            t0 = _clock(args)()
            out = model.forward_with_cfg(xx, tt, yy, 4.0)
            times.append(_clock(args)() - t0)
    np.save(args.save, out[:1].float().numpy())
    return {**_time_stats(times), "backend": f"torch {torch.__version__} {'bfloat16' if bf16 else 'float32'}"}


def torch_bf16_row(ck, tdit, cfg_path, th, args, tmp, f32_save, f32_seconds) -> dict:
    """PyTorch bfloat16 (native bf16 CPUs only): the same step, its time relative to float32 and the
    relative L2 error of its guided output against PyTorch float32."""
    import numpy as np
    save = os.path.join(tmp, f"torch-bf16-{th}.npy")
    r = run_worker("torch-bf16", ["--ck", ck, "--tdit", tdit, "--tdit-config", cfg_path, "--threads", str(th),
                                  *_common_args(args),
                                  "--save", save])
    r.update(name="pytorch bfloat16", threads=th)
    if "seconds" in r and f32_seconds:
        r["speedup_vs_torch"] = f32_seconds / r["seconds"]
    if os.path.exists(save) and os.path.exists(f32_save):
        a, b = np.load(f32_save), np.load(save)
        r["rel_l2_vs_fp32"] = float(np.linalg.norm(b - a) / np.linalg.norm(a))
    return r


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss, which Linux carries over from the
    parent across fork + exec, VmHWM belongs to the process image."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # not Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(kind: str, extra: list[str], script: str = __file__) -> dict:
    """Run `script --worker kind ...` in a fresh process; its last stdout line is a JSON result."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", kind, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ratio(row: dict, key: str, width: int) -> str:
    """A ratio column: "1.23x", or "-" where the row has no such ratio (a baseline row)."""
    return f"{row[key]:{width - 1}.2f}x" if key in row else "-".rjust(width)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", default=None, help="comma list (default: 1 and all CPUs)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time (see above)")
    ap.add_argument("--config", default="600m", choices=("600m", "4.2B", "3b", "small"),
                    help="model config (3b is the authors' name of 4.2B)")
    ap.add_argument("--image-size", type=int, default=None, help="256 or 512 (default: the config's, 256)")
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first N transformer blocks")
    ap.add_argument("--backends", default="cython,numba")
    ap.add_argument("--modes", default="fp32,int8,int10",
                    help="activation modes to run (comma list); a mode ending in -att8 runs int8 attention "
                         "(e.g. fp32-att8, int8-att8; cython only)")
    ap.add_argument("--skip-torch", action="store_true")
    # worker mode
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tdit", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tdit-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ck", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--activations", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--attention", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        args.threads = int(args.threads)
        res = worker_ours(args) if args.worker == "ours" else worker_torch(args, bf16=args.worker == "torch-bf16")
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return

    from terdit_edge.format import read_tdit
    from terdit_edge.kernels import available_backends, default_threads

    if args.image_size is not None and (args.image_size <= 0 or args.image_size % 16):
        ap.error("--image-size must be a positive multiple of 16")
    if args.blocks is not None and args.blocks < 1:
        ap.error("--blocks must be >= 1")
    ck, tdit = prepare(args.config, args.image_size, args.blocks)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, default_threads()})
    tmp = tempfile.mkdtemp(prefix="bench-step-")
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path, "w") as f:
        f.write(read_tdit(tdit, verify=False).config.to_json())
    status = available_backends()
    rows = []
    import numpy as np
    for th in threads:
        base = base_bf16 = None
        if not args.skip_torch:
            try:
                import torch  # noqa: F401
                save = os.path.join(tmp, f"torch-{th}.npy")
                r = run_worker("torch", ["--ck", ck, "--tdit", tdit, "--tdit-config", cfg_path, "--threads", str(th),
                                         *_common_args(args),
                                         "--save", save])
                r.update(name="pytorch float32", threads=th)
                rows.append(r)
                base = r.get("seconds")
                if native_bf16():  # beside float32, same threads, with its error vs float32
                    rows.append(torch_bf16_row(ck, tdit, cfg_path, th, args, tmp, save, base))
                    base_bf16 = rows[-1].get("seconds")
                elif th == threads[0]:
                    print("SKIPPED baseline: PyTorch bfloat16 (this CPU has no native bf16: AVX512_BF16 / AMX-BF16)",
                          file=sys.stderr)
            except ImportError:
                print("SKIPPED baseline: torch is not installed (pip install '.[bench]'); "
                      "no PyTorch row and no ratios", file=sys.stderr)
        else:
            print("SKIPPED baseline: PyTorch (--skip-torch); no ratios", file=sys.stderr)
        for be in args.backends.split(","):
            if status.get(be) != "ok":
                rows.append({"name": f"{be}", "threads": th, "error": status.get(be, "unknown backend")})
                continue
            outs = {}
            fp32_row = None
            for act in args.modes.split(","):
                save = os.path.join(tmp, f"{be}-{act}-{th}.npy")
                r = run_worker("ours", ["--tdit", tdit, "--backend", be, "--activations", act.removesuffix("-att8"),
                                        "--attention", "int8" if act.endswith("-att8") else "fp32", "--threads", str(th),
                                        *_common_args(args),
                                        "--save", save])
                r.update(name=f"terdit-edge {be} {act}", threads=th)
                if base and "seconds" in r:
                    r["speedup_vs_torch"] = base / r["seconds"]
                if base_bf16 and "seconds" in r:
                    r["speedup_vs_torch_bf16"] = base_bf16 / r["seconds"]
                if os.path.exists(save):
                    outs[act] = np.load(save)
                if act != "fp32" and "fp32" in outs and act in outs:
                    a, b = outs["fp32"], outs[act]
                    r["rel_l2_vs_fp32"] = float(np.linalg.norm(b - a) / np.linalg.norm(a))
                if act == "fp32":
                    fp32_row = r
                rows.append(r)
            tpath = os.path.join(tmp, f"torch-{th}.npy")
            if fp32_row is not None and "fp32" in outs and os.path.exists(tpath):
                t_out = np.load(tpath)
                fp32_row["max_abs_vs_torch_over_std"] = float(np.abs(outs["fp32"] - t_out).max() / t_out.std())
    # thread scaling of each configuration
    by = {(r["name"], r["threads"]): r for r in rows if "seconds" in r}
    for (name, th), r in by.items():
        one = by.get((name, 1))
        if th != 1 and one:
            r["speedup_vs_1_thread"] = one["seconds"] / r["seconds"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    what = args.config + (f" at {args.image_size} px" if args.image_size else "")
    what += f", first {args.blocks} blocks only" if args.blocks else ""
    print(f"guided denoising step, {what} config, batch 2 (one image + null label), "
          f"median of {args.repeat} timed runs after one warm-up (range in brackets), {args.clock} clock")
    print(f"{'implementation':28s} {'thr':>3s} {'seconds':>8s} {'vs torch':>8s} {'vs 1thr':>7s} {'peak RSS':>9s}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:28s} {r['threads']:3d}  unavailable: {r['error']}")
            continue
        notes = [f"[{r['best']:.3f}-{r['worst']:.3f}]"]
        if "rel_l2_vs_fp32" in r:
            notes.append(f"rel L2 vs fp32 {r['rel_l2_vs_fp32']:.2%}")
        if "speedup_vs_torch_bf16" in r:
            notes.append(f"{r['speedup_vs_torch_bf16']:.2f}x vs torch bf16")
        if "max_abs_vs_torch_over_std" in r:
            notes.append(f"max|diff| vs torch / std {r['max_abs_vs_torch_over_std']:.1e}")
        print(f"{r['name']:28s} {r['threads']:3d} {r['seconds']:8.3f} "
              f"{_ratio(r, 'speedup_vs_torch', 7)} {_ratio(r, 'speedup_vs_1_thread', 6)} "
              f"{r['peak_rss_mb']:7.0f}MB  {'; '.join(notes)}")


if __name__ == "__main__":
    main()
