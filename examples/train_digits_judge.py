"""Train the digits quality judge: a small CNN whose features see image quality as well as class,
and a separate digit classifier, both exported to ONNX for ``terdit-edge fid ... digits``.

    pip install ".[examples,fid]"
    python examples/train_digits_judge.py      # writes terdit_edge/data/digits_judge.onnx,
                                               #   digits_classifier.onnx and digits_real.npz

Why a new network: the earlier digits FID used the second hidden layer of an MLP classifier. A
classifier's features are built to ignore everything but the class, so a recognisable digit under
noise scores like a clean one (5% salt-and-pepper pixels even scored *better*). The judge here is
trained with two objectives on one 64-d feature layer:

* class: cross-entropy of the 10 digit classes (weighted by how much of the digit a corruption left);
* quality: every other training image is corrupted by one of six damages (Gaussian noise,
  salt-and-pepper, low-frequency blotches, blur, a ghost of another digit, fog/contrast loss) at a
  random severity s in (0, 1] (each damage starts where a person begins to see it: noise sigma 0.015,
  blur sigma 0.5 px); linear heads on the features regress s and classify the damage type. The other
  images get changes a person does not see (noise sigma < 0.01, blur sigma < 0.35 px, gain +-5%) and
  the target "no damage", so the features learn to ignore them.

Both heads are linear on the features, so class, damage type and damage severity are all linearly
readable from them: the feature distribution of damaged images moves away from the real digits'
in proportion to the damage, which is what FID, KID and precision/recall measure. Training images
(the 1,797 UCI digits, 75% split for training) are augmented by small random affine maps while
upscaling 8 -> 16 px (one bilinear interpolation, as the generators' training images), so shifts,
small rotations and scale changes of a good digit are not read as damage.

Network (input uint8 (N, 16, 16, 3), R = G = B gray): gray in [0, 1], Conv3x3 1->16, ReLU, Conv3x3
16->32, ReLU, AvgPool 2, Conv3x3 32->64, ReLU, AvgPool 2, Conv3x3 64->64, ReLU, flatten (1024),
Linear -> 64 features (linear: no dead dimensions, full-rank covariance). The classifier is a
different, smaller CNN trained on classes alone (with the same augmentation, no damage), so class
accuracy does not come from the judge's own features.

The ONNX graphs are written with onnx.helper (no exporter), the channel mean and 1/255 folded into the
first convolution. The script checks onnxruntime against torch, and prints the held-out accuracies
and the judge's FID of one real half against the other.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
N_DAMAGES = 6  # noise, salt-and-pepper, blotches, blur, ghost, fog


def digits_8x8():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def upscale(small: torch.Tensor, gen: torch.Generator | None, prob: float) -> torch.Tensor:
    """(B, 8, 8) in [0, 1] -> (B, 1, 16, 16) in [0, 1] through a random small affine map with probability prob."""
    b = len(small)
    if gen is None or prob == 0:
        return F.interpolate(small[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    use = (torch.rand(b, generator=gen) < prob).float()
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(10) * use
    scl = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.1 * use
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * 0.75 / 8) * use[:, None]
    cos, sin = torch.cos(ang) / scl, torch.sin(ang) / scl
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, SIZE, SIZE), align_corners=False)
    return F.grid_sample(small[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of (B, 1, S, S) with sigma (B,) pixels (7-tap kernel, zero padding)."""
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-0.5 * (r[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 7)
    b = len(x)
    xx = x.reshape(1, b, SIZE, SIZE)
    xx = F.conv2d(F.pad(xx, (3, 3, 0, 0)), k[:, None, None, :], groups=b)
    xx = F.conv2d(F.pad(xx, (0, 0, 3, 3)), k[:, None, :, None], groups=b)
    return xx.reshape(b, 1, SIZE, SIZE)


def damage(x: torch.Tensor, kind: torch.Tensor, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply damage kind[i] at severity s[i] in (0, 1] to image x[i] (B, 1, 16, 16) in [0, 1]."""
    b = len(x)
    sv = s[:, None, None, None]
    out = x.clone()
    noise = torch.randn(x.shape, generator=gen)
    # 0: Gaussian noise, sigma 0.015 .. 0.4
    d0 = x + (0.015 + 0.385 * sv) * noise
    # 1: salt and pepper, up to 25% of the pixels
    u = torch.rand(x.shape, generator=gen)
    sp = (torch.rand(x.shape, generator=gen) < 0.5).float()
    d1 = torch.where(u < 0.25 * sv, sp, x)
    # 2: low-frequency blotches: 4x4 or 8x8 noise upscaled, amplitude up to 0.7
    low4 = F.interpolate(torch.randn(b, 1, 4, 4, generator=gen), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    low8 = F.interpolate(torch.randn(b, 1, 8, 8, generator=gen), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    d2 = x + 0.7 * sv * (pick * low4 + (1 - pick) * low8)
    # 3: blur, sigma 0.5 .. 2 px (below about 0.5 px a person sees no blur on these soft digits)
    d3 = gaussian_blur(x, 0.5 + 1.5 * s)
    # 4: ghost of another image of the batch, up to 50%
    other = x[torch.randperm(b, generator=gen)]
    d4 = (1 - 0.5 * sv) * x + 0.5 * sv * other
    # 5: fog: contrast loss towards a gray level, up to 60%
    level = torch.rand(b, 1, 1, 1, generator=gen) * 0.6
    d5 = (1 - 0.6 * sv) * x + 0.6 * sv * level
    for k, d in enumerate((d0, d1, d2, d3, d4, d5)):
        m = (kind == k)[:, None, None, None]
        out = torch.where(m, d, out)
    return out.clamp(0, 1)


def nuisance(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a person does not see, applied to clean images so the features learn to ignore it: noise of
    sigma up to 0.01 (2.5 gray levels), a blur of sigma up to 0.35 px on 30% of the images, gain 0.95..1.05."""
    b = len(x)
    sig = torch.rand(b, 1, 1, 1, generator=gen) * 0.01
    x = x + sig * torch.randn(x.shape, generator=gen)
    blur = torch.rand(b, generator=gen) < 0.3
    x = torch.where(blur[:, None, None, None], gaussian_blur(x, torch.rand(b, generator=gen) * 0.35), x)
    return (x * (0.95 + 0.1 * torch.rand(b, 1, 1, 1, generator=gen))).clamp(0, 1)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the uint8 grid the samples are stored on (x * 255 + 0.5)."""
    return torch.floor(x * 255 + 0.5) / 255


class Judge(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.c4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, dim)
        self.cls = nn.Linear(dim, 10)
        self.sev = nn.Linear(dim, 1)
        self.kind = nn.Linear(dim, N_DAMAGES + 1)

    def features(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        h = F.relu(self.c3(F.avg_pool2d(h, 2)))
        h = F.relu(self.c4(F.avg_pool2d(h, 2)))
        return self.fc(h.flatten(1))

    def forward(self, x):
        f = self.features(x)
        return f, self.cls(f), self.sev(f)[:, 0], self.kind(f)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 5, padding=2)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        h = F.avg_pool2d(F.relu(self.c1(x)), 2)
        h = F.avg_pool2d(F.relu(self.c2(h)), 2)
        return self.fc2(F.dropout(F.relu(self.fc1(h.flatten(1))), 0.2, self.training))


def train_judge(small, labels, steps, seed, batch=128, lr=2e-3):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Judge()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = len(small)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = upscale(small[idx], gen, 0.7)
        y = labels[idx]
        damaged = torch.rand(batch, generator=gen) < 0.5
        kind = torch.randint(0, N_DAMAGES, (batch,), generator=gen)
        s = torch.rand(batch, generator=gen) * 0.98 + 0.02
        x = quantize(torch.where(damaged[:, None, None, None], damage(x, kind, s, gen), nuisance(x, gen)))
        s_target = torch.where(damaged, s, torch.zeros_like(s))
        k_target = torch.where(damaged, kind, torch.full_like(kind, N_DAMAGES))
        _, logits, sev, kind_logits = net(x)
        w_cls = 1 - 0.8 * s_target  # heavily damaged digits need not be recognisable
        loss = (w_cls * F.cross_entropy(logits, y, reduction="none")).mean() \
            + 4.0 * F.mse_loss(sev, s_target) + 0.5 * F.cross_entropy(kind_logits, k_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0:
            print(f"judge step {step + 1}: loss {loss.item():.4f}", flush=True)
    return net.eval()


def train_classifier(small, labels, steps, seed, batch=128, lr=2e-3):
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    net = Classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = len(small)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = quantize(upscale(small[idx], gen, 0.7))
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------

def _init(arr, name):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.ascontiguousarray(arr, dtype=arr.dtype), name)


def onnx_graph(layers, out_name, out_dim, doc):
    """layers: list of (op, params); the first must be a conv. Input uint8 (N, 16, 16, 3)."""
    import onnx
    from onnx import TensorProto, helper

    inits, nodes = [], []
    nodes.append(helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Transpose", ["xf"], ["x"], perm=[0, 3, 1, 2]))
    cur, first = "x", True
    for i, (op, p) in enumerate(layers):
        o = f"h{i}"
        if op == "conv":
            w, b = p["w"].astype(np.float32), p["b"].astype(np.float32)
            if first:  # mean over R, G, B and / 255 folded in
                w = np.repeat(w, 3, axis=1) / np.float32(3 * 255)
                first = False
            inits += [_init(w, f"w{i}"), _init(b, f"b{i}")]
            k = w.shape[-1]
            nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [o], pads=[k // 2] * 4))
        elif op == "relu":
            nodes.append(helper.make_node("Relu", [cur], [o]))
        elif op == "pool":
            nodes.append(helper.make_node("AveragePool", [cur], [o], kernel_shape=[2, 2], strides=[2, 2]))
        elif op == "flatten":
            nodes.append(helper.make_node("Flatten", [cur], [o], axis=1))
        elif op == "linear":
            inits += [_init(p["w"].T.astype(np.float32).copy(), f"w{i}"), _init(p["b"].astype(np.float32), f"b{i}")]
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [o + "m"]))
            nodes.append(helper.make_node("Add", [o + "m", f"b{i}"], [o]))
        cur = o
    nodes.append(helper.make_node("Identity", [cur], [out_name]))
    graph = helper.make_graph(nodes, "terdit_edge_" + out_name,
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="terdit-edge")
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model.SerializeToString()


def p(m):
    return {"w": m.weight.detach().numpy(), "b": m.bias.detach().numpy()}


def judge_layers(net: Judge):
    return [("conv", p(net.c1)), ("relu", None), ("conv", p(net.c2)), ("relu", None), ("pool", None),
            ("conv", p(net.c3)), ("relu", None), ("pool", None), ("conv", p(net.c4)), ("relu", None),
            ("flatten", None), ("linear", p(net.fc))]


def classifier_layers(net: Classifier):
    return [("conv", p(net.c1)), ("relu", None), ("pool", None), ("conv", p(net.c2)), ("relu", None),
            ("pool", None), ("flatten", None), ("linear", p(net.fc1)), ("relu", None), ("linear", p(net.fc2))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "terdit_edge", "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-steps", type=int, default=3000)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    from sklearn.model_selection import train_test_split

    small_np, labels_np = digits_8x8()
    tr, te = train_test_split(np.arange(len(labels_np)), test_size=0.25, random_state=args.seed, stratify=labels_np)
    small, labels = torch.from_numpy(small_np), torch.from_numpy(labels_np)
    judge = train_judge(small[tr], labels[tr], args.judge_steps, args.seed)
    clf = train_classifier(small[tr], labels[tr], args.classifier_steps, args.seed)

    os.makedirs(args.out_dir, exist_ok=True)
    # the real digits as 8x8 originals (0..16): the package rebuilds the 16 px images (fid.real_digits_uint8)
    real_path = os.path.join(args.out_dir, "digits_real.npz")
    np.savez_compressed(real_path, images8=(small_np * 16).round().astype(np.uint8), labels=labels_np,
                        train_split=np.isin(np.arange(len(labels_np)), tr))
    judge_bytes = onnx_graph(judge_layers(judge), "features", 64,
                             "digits quality judge of terdit-edge (examples/train_digits_judge.py): 64 features that "
                             "see class and damage")
    clf_bytes = onnx_graph(classifier_layers(clf), "logits", 10,
                           "digits classifier of terdit-edge (examples/train_digits_judge.py)")
    for name, data in (("digits_judge.onnx", judge_bytes), ("digits_classifier.onnx", clf_bytes)):
        with open(os.path.join(args.out_dir, name), "wb") as f:
            f.write(data)

    from terdit_edge.fid import OnnxFeatures, frechet_distance, statistics
    from terdit_edge.judge import real_digits_uint8

    u8, lab = real_digits_uint8()
    x = torch.from_numpy(u8[..., 0].astype(np.float32) / 255)[:, None]
    jn = OnnxFeatures(os.path.join(args.out_dir, "digits_judge.onnx"))
    cn = OnnxFeatures(os.path.join(args.out_dir, "digits_classifier.onnx"))
    feats = jn.features(u8)
    with torch.no_grad():
        np.testing.assert_allclose(feats, judge.features(x).numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(cn.features(u8), clf(x).numpy(), rtol=1e-3, atol=1e-3)
        jacc = float((judge(x)[1].argmax(1).numpy()[te] == lab[te]).mean())
    cacc = float((cn.features(u8).argmax(1)[te] == lab[te]).mean())
    print(f"held-out accuracy ({len(te)} real digits): classifier {cacc:.4f}, judge's class head {jacc:.4f}")
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(feats))
    a, b = feats[perm[: len(perm) // 2]], feats[perm[len(perm) // 2:]]
    print(f"judge FID, real half vs real half: {frechet_distance(*statistics(a), *statistics(b)):.3f}")
    print(f"wrote {args.out_dir}/digits_judge.onnx ({len(judge_bytes)} bytes), digits_classifier.onnx "
          f"({len(clf_bytes)} bytes), digits_real.npz")


if __name__ == "__main__":
    main()
