"""Error of int8 attention where it matters: per layer and on the whole step, alone and combined with
int8 / int10 activations.

    python benchmarks/attention_error.py [--configs 600m@256,4.2B@512,digits,deep] [--t 900,500,100]
                                         [--threads 2] [--json out.json]

Configs: ``600m@256`` and ``4.2B@512`` are the random release-layout models of bench_step.py (the
shapes of the real checkpoints, weights random: no trained checkpoint of that size is available
here); ``digits`` is the bundled trained model, ``deep`` the trained tests/data/digits_deep.tdit.
Inputs: one image (class 207, or 3 for the digits models), latent noise of seed 0 brought to
timestep t by the forward process from a fixed random "clean" latent, guided (batch 2: the image and
the null label, cfg 4), as sampling runs it.

1. Per layer: the fp32-attention forward runs; at every layer the kernel's int8 attention is also
   run on the very same q, k, v and its output compared with fp32 attention's (relative L2, over the
   batch); the forward goes on with the fp32 output, so the figures are each layer's own error.
2. Whole step: the guided model output (eps and variance channels, after the guidance mix) of every
   pairing of activations {fp32, int10, int8} x attention {fp32, int8} against fp32 / fp32; and of
   int8 attention against fp32 attention at the same activations (the error attention adds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)

from quant_error import rel_l2  # noqa: E402  (benchmarks/ is on the path above)


def model_path(spec: str) -> tuple[str | None, int]:
    """(.tdit path, label) of a config name."""
    if spec == "digits":
        return None, 3
    if spec == "deep":
        return os.path.join(ROOT, "tests", "data", "digits_deep.tdit"), 3
    from bench_step import prepare

    name, _, size = spec.partition("@")
    return prepare(name, None if size in ("", "256") else int(size))[1], 207


def load(path, activations, attention, threads):
    import terdit_edge
    from terdit_edge.pipeline import default_model_path

    return terdit_edge.load_model(path or default_model_path(), backend="cython", activations=activations,
                                  threads=threads, attention=attention)


def inputs(model, t: int, label: int):
    from terdit_edge.diffusion import linear_betas

    cfg = model.config
    rng = np.random.default_rng(0)
    shape = (1, cfg.in_channels, cfg.input_size, cfg.input_size)
    x0 = rng.standard_normal(shape).astype(np.float32) * 0.5
    noise = rng.standard_normal(shape).astype(np.float32)
    abar = np.cumprod(1.0 - linear_betas())[t]
    x = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32)
    return x, t, np.array([label])


def per_layer(model, x, t, y) -> list[float]:
    from terdit_edge import _ternary
    from terdit_edge.diffusion import guided_model_output

    be = model.backend
    errs = []
    orig = be.attention

    def both(q, k, v, out=None):
        res = orig(q, k, v, out=out)
        q8, k8, v8 = (np.ascontiguousarray(a, np.float32) for a in (q, k, v))
        alt = np.empty_like(q8)
        _ternary.attention(q8, k8, v8, alt, be.threads, mode="int8")
        errs.append(rel_l2(alt, res))
        return res

    be.attention = both
    try:
        guided_model_output(model, x, t, y, 4.0)
    finally:
        del be.attention
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="600m@256,4.2B@512,digits,deep")
    ap.add_argument("--t", default="900,500,100", help="timesteps (0..999) of the inputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from terdit_edge.diffusion import guided_model_output

    ts = [int(v) for v in args.t.split(",")]
    report = {}
    for spec in args.configs.split(","):
        path, label = model_path(spec)
        rep = report[spec] = {"per_layer": {}, "step": {}}
        outs = {}
        for act in ("fp32", "int10", "int8"):
            for att in ("fp32", "int8"):
                m = load(path, act, att, args.threads)
                for t in ts:
                    x, tt, y = inputs(m, t, label)
                    if act == "fp32" and att == "fp32":
                        rep["per_layer"][t] = errs = per_layer(m, x, tt, y)
                        print(f"{spec} t={t}: per-layer int8-attention rel L2 over {len(errs)} layers: median "
                              f"{np.median(errs):.2e}, max {max(errs):.2e} (layer {int(np.argmax(errs))})", flush=True)
                    outs[act, att, t] = guided_model_output(m, x, tt, y, 4.0)
                del m
        for t in ts:
            ref = outs["fp32", "fp32", t]
            row = {}
            for act in ("fp32", "int10", "int8"):
                for att in ("fp32", "int8"):
                    row[f"{act}/{att}"] = rel_l2(outs[act, att, t], ref)
                row[f"{act}: int8 vs fp32 attention"] = rel_l2(outs[act, "int8", t], outs[act, "fp32", t])
            rep["step"][t] = row
            print(f"{spec} t={t}: whole guided step vs fp32/fp32: " +
                  ", ".join(f"{k} {v:.2e}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
