"""One guided denoising step on a GPU: terdit-edge's CUDA backend vs PyTorch CUDA float16.

    python benchmarks/bench_step_cuda.py [--json] [--config 600m|3b|small] [--repeat 10]
                                         [--activations fp32,int8] [--skip-torch] [--tdit PATH]

The model is the random release-layout checkpoint of bench_step.py (written once, converted with the
real converter), or any .tdit given with --tdit. The step is the model forward on batch 2 (one image:
its label and the null label) plus the guidance mix, from a host latent to a host result, as a
sampler calls it. PyTorch runs the same weights dequantized (alpha * Q) as float16 matrices in a
functional DiT-LLaMA forward written here (F.linear, F.scaled_dot_product_attention; norms in float32).

Reported per row: step time (best of --repeat, after one warm-up), device memory held by the weights,
and peak device memory of the step (terdit-edge: used memory from cuMemGetInfo, as Numba has no
caching allocator and the forward allocates nothing after its first call; PyTorch:
torch.cuda.max_memory_allocated). Ratios are against PyTorch float16 measured in the same run, and the
relative L2 difference of each output from PyTorch's is printed (float16 rounding is ~1e-3).

Each measurement runs in its own subprocess so that memory figures are its own. Needs a CUDA GPU;
under NUMBA_ENABLE_CUDASIM=1 with --torch-device cpu --torch-dtype float32 and a tiny --tdit it runs
as a (very slow) smoke test of the script itself, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CFG_SCALE = 4.0


def _inputs(cfg):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32)
    return x, 500, np.array([min(207, cfg.num_classes - 1)])


def _host_model(tdit: str):
    from terdit_edge.format import read_tdit
    from terdit_edge.model import model_from_file

    return model_from_file(read_tdit(tdit), backend="numpy")


# --- terdit-edge -------------------------------------------------------------------------------------------
def worker_ours(args) -> dict:
    import numpy as np
    from numba import cuda

    from terdit_edge.diffusion import guided_model_output
    from terdit_edge.kernels import get_backend

    def used_bytes():
        free, total = cuda.current_context().get_memory_info()
        return total - free if math.isfinite(total) else 0.0  # the simulator reports inf

    be = get_backend("cuda", activations=args.activations)
    host = _host_model(args.tdit)
    base = used_bytes()  # the context's own memory
    model = be.from_host_model(host)
    cuda.synchronize()
    after_load = used_bytes()
    x, t, y = _inputs(model.config)
    out = guided_model_output(model, x, t, y, CFG_SCALE)  # warm-up: JIT compilation, workspaces
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = guided_model_output(model, x, t, y, CFG_SCALE)  # ends with a copy to the host: synchronous
        times.append(time.perf_counter() - t0)
    peak = used_bytes()
    np.save(args.save, out)
    return {"seconds": min(times), "backend": be.describe(), "weights_mb": model.weight_bytes() / 2**20,
            "weights_mb_measured": (after_load - base) / 2**20, "peak_mb": (peak - base) / 2**20}


# --- PyTorch baseline -----------------------------------------------------------------------------------------
def torch_dit(host, device: str, dtype):
    """A functional DiT-LLaMA forward(x, t, y) in PyTorch on `device`, weights alpha * Q in `dtype`."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from terdit_edge.model import rope_tables
    from terdit_edge.packing import unpack_ternary_2bit

    cfg = host.config
    P = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(device, dtype) for k, v in host.params.items()}
    W, B = {}, {}
    for name, w in host.ternary.items():  # one layer at a time: the unpacked int8 copy is transient
        W[name] = torch.from_numpy(unpack_ternary_2bit(w.packed, w.k)).to(device, dtype) * w.alpha
        B[name] = None if w.bias is None else torch.from_numpy(np.array(w.bias)).to(device, dtype)
    cos, sin = (torch.from_numpy(a).to(device, torch.float32) for a in rope_tables(cfg.n_tokens, cfg.head_dim,
                                                                                   cfg.rope_theta))
    d, p, hd = cfg.dim, cfg.patch_size, cfg.head_dim

    def rmsnorm(v, weight, eps):
        v32 = v.float()
        return (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * weight

    def rope(v):  # (B, T, H, hd): consecutive pairs rotate
        v32 = v.float()
        a, b = v32[..., 0::2], v32[..., 1::2]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(dtype)

    def lin(v, name):
        return F.linear(v, W[name], B[name])

    def forward(x, t, y):
        bsz, ch, hh, ww = x.shape
        gh, gw = hh // p, ww // p
        tok = x.reshape(bsz, ch, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(bsz, gh * gw, ch * p * p)
        h = F.linear(tok, P["x_embedder.weight"], P["x_embedder.bias"])
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        tf = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        temb = F.linear(F.silu(F.linear(tf, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"])),
                        P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
        c_act = F.silu(temb + P["y_embedder.embedding_table.weight"][y])
        n_tok = gh * gw
        for i in range(cfg.n_layers):
            pre = f"layers.{i}."
            mod = rmsnorm(lin(c_act, pre + "adaLN_modulation.1"), P[pre + "adaLN_modulation.2.weight"], cfg.norm_eps)
            sh_a, sc_a, g_a, sh_m, sc_m, g_m = (m[:, None, :] for m in mod.chunk(6, dim=1))
            hn = rmsnorm(h, P[pre + "attention_norm.weight"], cfg.norm_eps) * (1 + sc_a) + sh_a
            q, k, v = (lin(hn, pre + "attention." + n) for n in ("wq", "wk", "wv"))
            if cfg.qk_norm:
                q = F.layer_norm(q.float(), (d,), P[pre + "attention.q_norm.weight"].float(),
                                 P[pre + "attention.q_norm.bias"].float(), 1e-5).to(dtype)
                k = F.layer_norm(k.float(), (cfg.kv_dim,), P[pre + "attention.k_norm.weight"].float(),
                                 P[pre + "attention.k_norm.bias"].float(), 1e-5).to(dtype)
            q = rope(q.view(bsz, n_tok, cfg.n_heads, hd)).transpose(1, 2)
            k = rope(k.view(bsz, n_tok, cfg.n_kv_heads, hd)).transpose(1, 2)
            v = v.view(bsz, n_tok, cfg.n_kv_heads, hd).transpose(1, 2)
            if cfg.n_kv_heads != cfg.n_heads:
                rep = cfg.n_heads // cfg.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bsz, n_tok, d)
            h = h + g_a * lin(att, pre + "attention.wo")
            hn = rmsnorm(h, P[pre + "ffn_norm.weight"], cfg.norm_eps) * (1 + sc_m) + sh_m
            ff = F.silu(lin(hn, pre + "feed_forward.w1")) * lin(hn, pre + "feed_forward.w3")
            h = h + g_m * lin(ff, pre + "feed_forward.w2")
        shift, scale = F.linear(c_act, P["final_layer.adaLN_modulation.1.weight"],
                                P["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
        hn = F.layer_norm(h.float(), (d,), eps=1e-6).to(dtype) * (1 + scale[:, None]) + shift[:, None]
        out = F.linear(hn, P["final_layer.linear.weight"], P["final_layer.linear.bias"])
        c2 = cfg.out_channels
        return out.reshape(bsz, gh, gw, p, p, c2).permute(0, 5, 1, 3, 2, 4).reshape(bsz, c2, hh, ww)

    weight_bytes = sum(a.numel() * a.element_size() for a in [*P.values(), *W.values()])
    weight_bytes += sum(b.numel() * b.element_size() for b in B.values() if b is not None)
    return forward, weight_bytes


def worker_torch(args) -> dict:
    import numpy as np
    import torch

    dtype = getattr(torch, args.torch_dtype)
    dev = args.torch_device
    cuda_dev = dev.startswith("cuda")
    host = _host_model(args.tdit)
    cfg = host.config
    if cuda_dev:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    forward, weight_bytes = torch_dit(host, dev, dtype)
    x, t, y = _inputs(cfg)
    g = cfg.guided_channels

    def step():
        # the same guidance as terdit_edge.diffusion.guided_model_output, from host to host
        xx = torch.from_numpy(np.concatenate([x, x])).to(dev, dtype)
        tt = torch.full((2,), t, dtype=torch.int64, device=dev)
        yy = torch.tensor([int(y[0]), cfg.num_classes], device=dev)
        out = forward(xx, tt, yy).float()
        cond, uncond = out[:1], out[1:]
        guided = cond.clone()
        guided[:, :g] = uncond[:, :g] + CFG_SCALE * (cond[:, :g] - uncond[:, :g])
        return guided.cpu().numpy()

    with torch.inference_mode():
        out = step()
        if cuda_dev:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = step()  # .cpu() synchronises
            times.append(time.perf_counter() - t0)
    np.save(args.save, out)
    res = {"seconds": min(times), "backend": f"torch {torch.__version__} {args.torch_dtype} on {dev}",
           "weights_mb": weight_bytes / 2**20}
    if cuda_dev:
        res["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res["device"] = torch.cuda.get_device_name()
    return res


# --- driver ---------------------------------------------------------------------------------------------------
def run_worker(kind: str, extra: list[str]) -> dict:
    sys.path.insert(0, HERE)
    from bench_step import run_worker as run_script_worker

    return run_script_worker(kind, extra, script=__file__)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--config", default="600m", choices=("600m", "3b", "small"))
    ap.add_argument("--tdit", default=None, help="benchmark this model file instead of a random --config one")
    ap.add_argument("--activations", default="fp32,int8")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--torch-device", default="cuda")
    ap.add_argument("--torch-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker_ours(args) if args.worker == "ours" else worker_torch(args)
        print(json.dumps(res))
        return

    import numpy as np

    from terdit_edge.kernels import available_backends

    if args.tdit is None:
        sys.path.insert(0, HERE)
        from bench_step import prepare

        _, args.tdit = prepare(args.config)
    tmp = tempfile.mkdtemp(prefix="bench-step-cuda-")
    common = ["--tdit", args.tdit, "--repeat", str(args.repeat)]
    rows, base, base_out = [], None, None
    if not args.skip_torch:
        save = os.path.join(tmp, "torch.npy")
        r = run_worker("torch", [*common, "--torch-device", args.torch_device, "--torch-dtype", args.torch_dtype,
                                 "--save", save])
        r["name"] = f"pytorch {args.torch_dtype}"
        rows.append(r)
        base = r.get("seconds")
        base_out = np.load(save) if os.path.exists(save) else None
    status = available_backends().get("cuda")
    for act in args.activations.split(","):
        if status != "ok":
            rows.append({"name": f"terdit-edge cuda {act}", "error": status})
            continue
        save = os.path.join(tmp, f"cuda-{act}.npy")
        r = run_worker("ours", [*common, "--activations", act, "--save", save])
        r["name"] = f"terdit-edge cuda {act}"
        if base and "seconds" in r:
            r["speedup_vs_torch"] = base / r["seconds"]
        if base_out is not None and os.path.exists(save):
            out = np.load(save)
            r["rel_l2_vs_torch"] = float(np.linalg.norm(out - base_out) / np.linalg.norm(base_out))
        rows.append(r)

    if args.json:
        print(json.dumps({"model": args.tdit, "rows": rows}, indent=2))
        return
    print(f"guided step (batch 2, cfg {CFG_SCALE}) of {args.tdit}")
    for r in rows:
        if "error" in r:
            print(f"  {r['name']:28s} unavailable: {r['error']}")
            continue
        line = f"  {r['name']:28s} {r['seconds'] * 1e3:9.2f} ms  weights {r['weights_mb']:8.1f} MB"
        if "peak_mb" in r:
            line += f"  peak {r['peak_mb']:8.1f} MB"
        if "speedup_vs_torch" in r:
            line += f"  x{r['speedup_vs_torch']:.2f} vs torch"
        if "rel_l2_vs_torch" in r:
            line += f"  rel-L2 vs torch {r['rel_l2_vs_torch']:.1e}"
        print(line + f"  [{r['backend']}]")


if __name__ == "__main__":
    main()
