"""Write a random TerDiT checkpoint directory in the official release layout (needs torch).

    python benchmarks/make_checkpoint.py OUT_DIR [--config 600m|4.2B|small] [--image-size 256|512] [--seed 0]

Ternary weights are random codes in the released packed uint8 layout (out/4, in), with a realistic
~1/3 zeros; float parameters are small random values. Used by the benchmarks and the load-time check.
"""
from __future__ import annotations

import argparse
import os

CONFIGS = {
    "600m": dict(dim=1536, n_layers=16, image_size=256, model="DiT_Llama_600M_patch2"),
    "3b": dict(dim=3072, n_layers=32, image_size=256, model="DiT_Llama_3B_patch2"),
    "small": dict(dim=256, n_layers=2, image_size=64, model="DiT_Llama_small_patch2"),
}
# The paper calls the D 3072, 32-block configuration "4.2B" (docs/model.md); the authors' code "3B".
CONFIGS["4.2B"] = CONFIGS["3b"]


def make_release_checkpoint(out_dir: str, config: str = "600m", seed: int = 0, num_classes: int = 1000,
                            image_size: int | None = None, n_layers: int | None = None) -> str:
    """image_size: the model's image size (default the config's); the weights do not depend on it,
    only model_args (and so the converted model's input_size). n_layers: keep only that many blocks
    (default all): the same block shapes in a smaller file, for per-block comparisons."""
    import torch

    c = CONFIGS[config]
    d, n_layers = c["dim"], n_layers or c["n_layers"]
    td, p, ch = min(d, 1024), 2, 4
    ffn = 256 * ((int(2 * 4 * d / 3) + 255) // 256)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def packed(out, inp):
        codes = torch.randint(0, 3, (4, out // 4, inp), generator=g, dtype=torch.uint8)
        return (codes[0] << 6) | (codes[1] << 4) | (codes[2] << 2) | codes[3]

    sd = {"x_embedder.weight": randn(d, p * p * ch), "x_embedder.bias": randn(d),
          "t_embedder.mlp.0.weight": randn(td, 256), "t_embedder.mlp.0.bias": randn(td),
          "t_embedder.mlp.2.weight": randn(td, td), "t_embedder.mlp.2.bias": randn(td),
          "y_embedder.embedding_table.weight": randn(num_classes + 1, td, std=1.0),
          "final_layer.adaLN_modulation.1.weight": randn(2 * d, td),
          "final_layer.adaLN_modulation.1.bias": randn(2 * d),
          "final_layer.linear.weight": randn(p * p * 2 * ch, d), "final_layer.linear.bias": randn(p * p * 2 * ch)}
    shapes = {"attention.wq": (d, d), "attention.wk": (d, d), "attention.wv": (d, d), "attention.wo": (d, d),
              "feed_forward.w1": (ffn, d), "feed_forward.w2": (d, ffn), "feed_forward.w3": (ffn, d),
              "adaLN_modulation.1": (6 * d, td)}
    for i in range(n_layers):
        b = f"layers.{i}."
        for name, (o, k) in shapes.items():
            sd[b + name + ".weight"] = packed(o, k)
            sd[b + name + ".alphas"] = torch.tensor([1.0 / (k ** 0.5)])
        sd[b + "adaLN_modulation.1.bias"] = randn(6 * d)
        sd[b + "adaLN_modulation.2.weight"] = 1 + randn(6 * d, std=0.1)
        sd[b + "attention_norm.weight"] = 1 + randn(d, std=0.1)
        sd[b + "ffn_norm.weight"] = 1 + randn(d, std=0.1)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(argparse.Namespace(model=c["model"], image_size=image_size or c["image_size"], num_classes=num_classes,
                                  qk_norm=False, vae="ema"), os.path.join(out_dir, "model_args.pth"))
    path = os.path.join(out_dir, "consolidated_ema_ternary.00-of-01.pth")
    torch.save(sd, path)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="600m")
    ap.add_argument("--image-size", type=int, default=None, help="default: the config's (256 or 64)")
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks (default all)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_release_checkpoint(a.out_dir, a.config, a.seed, image_size=a.image_size, n_layers=a.blocks))
