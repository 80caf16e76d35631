"""Train the small ternary DiT that ships with terdit-edge, on scikit-learn's handwritten digits.

The model is a class-conditional TerDiT ("DiT-LLaMA") in pixel space: the 1,797 8x8 UCI digits
(values 0..16) are upscaled bilinearly to 16x16, scaled to [-1, 1] and denoised as 1-channel images.
Every linear layer inside the transformer blocks is ternary and trained with quantization-aware
training (QAT): the optimizer updates a float latent weight, the forward pass uses
``alphas * clip(round(w / (mean|w| + 1e-6)), -1, 1)`` and the gradient passes the rounding straight
through. The diffusion recipe is the ADM / DiT one: 1000-step linear beta schedule, eps prediction
with a learned-range variance, loss = MSE(eps) + the variational bound term (stop-gradient on the mean).

The output directory uses the TerDiT QAT checkpoint layout, so ``terdit-edge convert`` reads it
like the authors' checkpoints:

    OUT/model_args.pth                 argparse.Namespace (model, image_size, dim, n_layers, ...)
    OUT/consolidated_ema.00-of-01.pth  EMA weights (what gets converted and shipped)
    OUT/consolidated.00-of-01.pth      raw (non-EMA) weights

Runs on CPU with 2 threads. Reproducible: the seed (default 0) fixes the data order, noise,
timesteps, label dropout and initialisation; torch runs in deterministic mode. Bit-identical
results need the same torch build and thread count (float summation order depends on both).

    PYTHONPATH=. python3 examples/train_digits.py --out runs/digits            # the shipped model
    PYTHONPATH=. python3 examples/train_digits.py --out /tmp/x --steps 20 --eval-samples 0   # smoke run

Only torch, numpy and scikit-learn are needed; the evaluation (``--eval-samples``) samples with a
small DDIM / DDPM sampler written here and scores the samples with a classifier fit on real digits.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_NAME = "DiT_Llama_digits"
NUM_CLASSES = 10
IMAGE_SIZE = 16
IN_CHANNELS = 1
NUM_TIMESTEPS = 1000
TIMESTEP_FREQ_DIM = 256
MULTIPLE_OF = 256  # the converter infers the FFN width from shapes with this rule; keep it fixed


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_digit_images(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The UCI digits as training images.

    Returns (images, labels): images float32 (1797, 1, image_size, image_size) in [-1, 1]
    (bilinear upscale of the 8x8 originals, values 0..16 mapped linearly), labels int64 (1797,).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    big = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return big.clamp(0, 1) * 2 - 1, torch.from_numpy(digits.target.astype(np.int64))


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """Map images (B, 1, S, S) in [-1, 1] back to the sklearn digits space: (B, 64) in 0..16."""
    small = F.interpolate(images.float(), size=(8, 8), mode="area")
    return ((small.clamp(-1, 1) + 1) * 8).reshape(len(images), 64).numpy()


# ----------------------------------------------------------------------------------------------
# Model: the TerDiT "DiT-LLaMA" layout (docs/model.md §2)
# ----------------------------------------------------------------------------------------------

class TernaryLinear(nn.Linear):
    """Linear layer whose forward weight is ``alphas * Q``, Q in {-1, 0, 1} (out, in).

    ``weight`` (out, in) float32 is the latent weight the optimizer updates. Q rounds it by the
    whole-tensor mean magnitude gamma; the straight-through estimator passes dL/dQ to the latent
    weight unchanged, so rounding never blocks learning. ``alphas`` (1,) is a learned scale, which
    is what the checkpoint stores (the converter uses alphas, not gamma).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.alphas = nn.Parameter(self.weight.detach().abs().mean().reshape(1).clone())

    def ternary_weight(self) -> torch.Tensor:
        w = self.weight
        gamma = w.abs().mean()
        q = torch.clamp(torch.round(w / (gamma + 1e-6)), -1, 1)
        return w + (q - w).detach()  # value q, gradient identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.ternary_weight() * self.alphas, self.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; weight (dim,)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) * (1 + scale) + shift, with shift/scale (B, D) broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rope_tables(n_tokens: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n_tokens, head_dim / 2) of the 1-D rotary angles pos * theta^(-2i / head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_tokens, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (2i, 2i+1) of x (B, T, H, hd) as complex numbers by the angles."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = TernaryLinear(dim, dim)
        self.wk = TernaryLinear(dim, dim)
        self.wv = TernaryLinear(dim, dim)
        self.wo = TernaryLinear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


def ffn_hidden_dim(dim: int, multiple_of: int = MULTIPLE_OF) -> int:
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), all three ternary, hidden width ffn_hidden_dim(dim)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = ffn_hidden_dim(dim)
        self.w1 = TernaryLinear(dim, hidden)
        self.w2 = TernaryLinear(hidden, dim)
        self.w3 = TernaryLinear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        # keys adaLN_modulation.1 (ternary, with bias) and adaLN_modulation.2 (RMSNorm over 6D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), TernaryLinear(cond_dim, 6 * dim, bias=True),
                                              RMSNorm(6 * dim, norm_eps))

    def forward(self, x, c, cos, sin):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa), cos, sin)
        x = x + gate_mlp.unsqueeze(1) * self.feed_forward(modulate(self.ffn_norm(x), shift_mlp, scale_mlp))
        return x


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (256 wide, cos first) -> Linear -> SiLU -> Linear, out (B, cond_dim)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def features(t: torch.Tensor) -> torch.Tensor:
        half = TIMESTEP_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t))


class LabelEmbedder(nn.Module):
    """Class label -> (B, cond_dim); row num_classes is the null label used for guidance."""

    def __init__(self, num_classes: int, cond_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, cond_dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class FinalLayer(nn.Module):
    """Full precision: LayerNorm (no affine, eps 1e-6) + adaLN shift/scale, Linear(D -> p*p*2C)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTLlama(nn.Module):
    """Class-conditional ternary DiT. forward(x (B, C, S, S), t (B,) int, y (B,) int) -> (B, 2C, S, S).

    Output channels [0, C) predict eps, [C, 2C) the variance interpolation value v in [-1, 1].
    """

    def __init__(self, dim: int, n_layers: int, n_heads: int, patch_size: int = 2,
                 in_channels: int = IN_CHANNELS, input_size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # learn_sigma
        self.input_size = input_size
        cond_dim = min(dim, 1024)
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(num_classes, cond_dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads, cond_dim) for _ in range(n_layers))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels, cond_dim)
        n_tokens = (input_size // patch_size) ** 2
        cos, sin = rope_tables(n_tokens, dim // n_heads)
        # not parameters: rebuilt from the config, so they stay out of the checkpoint
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # DiT-style: xavier for linears, normal(0.02) for the embeddings, and every residual branch
        # and the output layer start at zero, so the untrained network is the identity plus zeros.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, TernaryLinear):
                    m.alphas.data.copy_(m.weight.detach().abs().mean().reshape(1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.layers:
            # the gates come out of the adaLN RMSNorm; a zero norm weight is adaLN-Zero for this layout
            nn.init.zeros_(block.adaLN_modulation[2].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, T, C*p*p): row-major tokens, each flattened in (C, p_row, p_col) order."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C') -> (B, C', S, S); each token vector is ordered (p_row, p_col, channel)."""
        b = x.shape[0]
        p, c = self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(self.patchify(x))
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.layers:
            h = block(h, c, self.rope_cos, self.rope_sin)
        return self.unpatchify(self.final_layer(h, c))


# ----------------------------------------------------------------------------------------------
# Diffusion: ADM / DiT GaussianDiffusion with learned-range variance (docs: section 4)
# ----------------------------------------------------------------------------------------------

class Schedule:
    """1000-step linear beta schedule; every table float64 (T,), cast to float32 where used."""

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS):
        self.betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.post_var = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.post_log_var_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.post_c1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.post_c2 = (1 - self.alphas_cumprod_prev) * np.sqrt(1 - self.betas) / (1 - self.alphas_cumprod)

    @staticmethod
    def gather(table: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        """table[t] as float32 (B, 1, 1, 1), ready to broadcast against images."""
        return torch.from_numpy(table).float()[t].reshape(-1, 1, 1, 1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) for x in [-1, 1] on a 256-level grid under N(mean, e^(2 log_scale)), elementwise.

    The edge bins extend to +-infinity. The normal CDF uses the tanh approximation, as ADM does.
    """
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    inv_std = torch.exp(-log_scale)
    upper = cdf(inv_std * (x - mean + 1.0 / 255))
    lower = cdf(inv_std * (x - mean - 1.0 / 255))
    log_upper = torch.log(upper.clamp(min=1e-12))
    log_one_minus_lower = torch.log((1.0 - lower).clamp(min=1e-12))
    log_mid = torch.log((upper - lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_upper, torch.where(x > 0.999, log_one_minus_lower, log_mid))


def training_loss(model: nn.Module, sched: Schedule, x0, t, y, noise) -> tuple[torch.Tensor, dict]:
    """DiT's hybrid loss for one batch: mean over the batch of MSE(eps) + vb (bits per dim).

    The vb term sees the predicted eps through a stop-gradient, so it trains only the variance
    channels, and the MSE alone trains the mean (Nichol & Dhariwal 2021).
    """
    abar = Schedule.gather(sched.alphas_cumprod, t)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = model(x_t, t, y)
    c = x0.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))

    # the model's p(x_{t-1} | x_t) with a frozen mean
    pred_x0 = Schedule.gather(np.sqrt(1 / sched.alphas_cumprod), t) * x_t \
        - Schedule.gather(np.sqrt(1 / sched.alphas_cumprod - 1), t) * eps.detach()
    c1, c2 = Schedule.gather(sched.post_c1, t), Schedule.gather(sched.post_c2, t)
    model_mean = c1 * pred_x0 + c2 * x_t
    frac = (v + 1) / 2
    model_log_var = frac * Schedule.gather(np.log(sched.betas), t) \
        + (1 - frac) * Schedule.gather(sched.post_log_var_clipped, t)
    # the true posterior q(x_{t-1} | x_t, x0)
    true_mean = c1 * x0 + c2 * x_t
    true_log_var = Schedule.gather(sched.post_log_var_clipped, t)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return (mse + vb).mean(), {"mse": mse.mean().item(), "vb": vb.mean().item()}


def respaced_timesteps(n_steps: int) -> list[int]:
    """The kept original timesteps for an "N" respacing: round(i * 999 / (N - 1)), ascending."""
    if n_steps == 1:
        return [0]
    stride = (NUM_TIMESTEPS - 1) / (n_steps - 1)
    return sorted({round(i * stride) for i in range(n_steps)})


@torch.no_grad()
def guided_output(model, x, t, y, cfg_scale: float) -> torch.Tensor:
    """Model output with classifier-free guidance on every eps channel (variance from the cond half)."""
    tt = torch.full((len(x),), t, dtype=torch.long)
    if cfg_scale == 1.0:
        return model(x, tt, y)
    both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, NUM_CLASSES)]))
    cond, uncond = both.chunk(2)
    c = x.shape[1]
    eps = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([eps, cond[:, c:]], dim=1)


@torch.no_grad()
def sample(model, sched: Schedule, y: torch.Tensor, n_steps: int = 50, cfg_scale: float = 4.0,
           method: str = "ddim", generator: torch.Generator | None = None, clip_x0: bool = True) -> torch.Tensor:
    """Draw images (B, C, S, S) in [-1, 1] for labels y (B,), DDIM (eta 0) or DDPM with learned variance.

    clip_x0 clamps each step's predicted x0 to [-1, 1] (ADM's clip_denoised, right for pixels).
    """
    c, s = model.in_channels, model.input_size
    x = torch.randn(len(y), c, s, s, generator=generator)
    kept = respaced_timesteps(n_steps)
    abar_all = sched.alphas_cumprod
    for j in reversed(range(len(kept))):
        t = kept[j]
        abar = abar_all[t]
        abar_prev = abar_all[kept[j - 1]] if j > 0 else 1.0
        out = guided_output(model, x, t, y, cfg_scale)
        eps, v = out[:, :c], out[:, c:]
        pred_x0 = math.sqrt(1 / abar) * x - math.sqrt(1 / abar - 1) * eps
        if clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
        if method == "ddim":
            eps = (math.sqrt(1 / abar) * x - pred_x0) / math.sqrt(1 / abar - 1)
            x = pred_x0 * math.sqrt(abar_prev) + math.sqrt(1 - abar_prev) * eps
        else:
            beta = 1 - abar / abar_prev
            post_var = beta * (1 - abar_prev) / (1 - abar)
            if j == 0:  # clipped log: the first entry takes the second's value
                abar_next_prev = abar
                abar_next = abar_all[kept[1]]
                beta1 = 1 - abar_next / abar_next_prev
                post_var = beta1 * (1 - abar_next_prev) / (1 - abar_next)
            c1 = beta * math.sqrt(abar_prev) / (1 - abar)
            c2 = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)
            frac = (v + 1) / 2
            log_var = frac * math.log(beta) + (1 - frac) * math.log(post_var)
            x = c1 * pred_x0 + c2 * x
            if j > 0:
                x = x + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Evaluation: does a classifier fit on real digits recognise the samples, and are they diverse?
# ----------------------------------------------------------------------------------------------

def fit_digit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int):
    """SVM on the real digits after the same upscale/downscale round trip the samples go through.

    Returns (classifier, held-out accuracy on a 25% split it was not fit on).
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    feats, y = to_digit_features(images), labels.numpy()
    f_tr, f_te, y_tr, y_te = train_test_split(feats, y, test_size=0.25, random_state=seed, stratify=y)
    clf = SVC(gamma=0.001, C=10.0).fit(f_tr, y_tr)
    return clf, float((clf.predict(f_te) == y_te).mean())


def mean_pairwise_distance(feats: np.ndarray) -> float:
    """Mean L2 distance over all distinct pairs of rows of feats (N, F)."""
    d = np.sqrt(np.maximum(((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1), 0))
    n = len(feats)
    return float(d.sum() / (n * (n - 1)))


def evaluate(model, sched, images, labels, n_per_class: int, n_steps: int, cfg_scale: float,
             method: str, seed: int, clip_x0: bool = True) -> dict:
    """Sample n_per_class images of every class and score them; returns a dict of metrics."""
    clf, clf_acc = fit_digit_classifier(images, labels, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = torch.cat([sample(model, sched, y[i:i + 200], n_steps, cfg_scale, method, gen, clip_x0)
                   for i in range(0, len(y), 200)])
    feats = to_digit_features(x)
    pred = clf.predict(feats)
    real_feats, real_y = to_digit_features(images), labels.numpy()
    ratios = []
    for k in range(NUM_CLASSES):
        ratios.append(mean_pairwise_distance(feats[y.numpy() == k]) / mean_pairwise_distance(real_feats[real_y == k]))
    return {"method": method, "steps": n_steps, "cfg": cfg_scale, "clip_x0": clip_x0, "n": len(y),
            "accuracy": float((pred == y.numpy()).mean()),
            "per_class_accuracy": [float((pred[y.numpy() == k] == k).mean()) for k in range(NUM_CLASSES)],
            "diversity_ratio": float(np.mean(ratios)), "min_class_diversity_ratio": float(np.min(ratios)),
            "classifier_heldout_accuracy": clf_acc, "_samples": x}


def save_grid(images: torch.Tensor, path: str, n_cols: int) -> None:
    """Write images (N, 1, S, S) in [-1, 1] as one 8-bit PGM grid (no imaging library needed)."""
    n, _, s, _ = images.shape
    rows = (n + n_cols - 1) // n_cols
    grid = np.zeros((rows * (s + 1) + 1, n_cols * (s + 1) + 1), dtype=np.uint8)
    pix = (((images[:, 0].clamp(-1, 1) + 1) / 2) * 255 + 0.5).to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, n_cols)
        grid[1 + r * (s + 1):1 + r * (s + 1) + s, 1 + c * (s + 1):1 + c * (s + 1) + s] = pix[i]
    with open(path, "wb") as f:
        f.write(b"P5\n%d %d\n255\n" % (grid.shape[1], grid.shape[0]))
        f.write(grid.tobytes())


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def checkpoint_state(model: nn.Module) -> dict:
    """The state dict as the converter expects it: parameters only, contiguous float32, no prefixes."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(out: str, model: nn.Module, ema: nn.Module, args: argparse.Namespace) -> None:
    os.makedirs(out, exist_ok=True)
    model_args = argparse.Namespace(
        model=MODEL_NAME, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES, qk_norm=False, vae="none",
        in_channels=IN_CHANNELS, n_heads=args.n_heads, patch_size=args.patch_size, dim=args.dim,
        n_layers=args.n_layers, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        ema_decay=args.ema_decay, class_dropout_prob=args.class_dropout)
    torch.save(model_args, os.path.join(out, "model_args.pth"))
    torch.save(checkpoint_state(ema), os.path.join(out, "consolidated_ema.00-of-01.pth"))
    torch.save(checkpoint_state(model), os.path.join(out, "consolidated.00-of-01.pth"))


def load_checkpoint(out: str, filename: str = "consolidated_ema.00-of-01.pth") -> DiTLlama:
    """Rebuild the model from OUT/model_args.pth and load OUT/filename (both read with weights_only)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        margs = torch.load(os.path.join(out, "model_args.pth"), weights_only=True)
    model = DiTLlama(margs.dim, margs.n_layers, margs.n_heads, margs.patch_size, margs.in_channels,
                     margs.image_size, margs.num_classes)
    model.load_state_dict(torch.load(os.path.join(out, filename), weights_only=True))
    return model.eval()


def run_evaluation(model, images, labels, args) -> dict:
    """Sample, score and print; also writes OUT/samples.pgm (10 samples per class, one class per column)."""
    t0 = time.perf_counter()
    metrics = evaluate(model, Schedule(), images, labels, args.eval_samples, args.eval_steps, args.eval_cfg,
                       args.eval_method, args.seed, clip_x0=not args.no_eval_clip)
    samples = metrics.pop("_samples")
    per_class = samples.reshape(NUM_CLASSES, args.eval_samples, *samples.shape[1:])[:, :10]
    save_grid(per_class.transpose(0, 1).reshape(-1, *samples.shape[1:]), os.path.join(args.out, "samples.pgm"),
              n_cols=NUM_CLASSES)
    metrics["eval_seconds"] = time.perf_counter() - t0
    print(f"eval ({metrics['method']} {metrics['steps']} steps, cfg {metrics['cfg']}, clip_x0 {metrics['clip_x0']}, "
          f"{metrics['n']} samples): accuracy {metrics['accuracy']:.3f}, diversity ratio "
          f"{metrics['diversity_ratio']:.2f} (min class {metrics['min_class_diversity_ratio']:.2f}); "
          f"classifier held-out accuracy {metrics['classifier_heldout_accuracy']:.3f}", flush=True)
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/digits", help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--class-dropout", type=float, default=0.1, help="label -> null probability (for CFG)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the weights depend on it (summation order), so keep it fixed to reproduce")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=50, help="samples per class for the final check (0: skip)")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-cfg", type=float, default=4.0)
    p.add_argument("--eval-method", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--no-eval-clip", action="store_true", help="do not clamp the predicted x0 while sampling")
    p.add_argument("--eval-only", action="store_true",
                   help="skip training: load OUT's EMA checkpoint and run the evaluation")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    images, labels = load_digit_images()
    sched = Schedule()
    model = DiTLlama(args.dim, args.n_layers, args.n_heads, args.patch_size)
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    n_ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, TernaryLinear))
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, ffn {ffn_hidden_dim(args.dim)}, "
          f"{n_params / 1e6:.2f}M parameters ({n_ternary / 1e6:.2f}M ternary)", flush=True)

    opt = make_optimizer(model, args.lr, args.weight_decay)
    lr_at = cosine_lr(args.lr, args.warmup, args.steps)

    gen = torch.Generator().manual_seed(args.seed)
    n = len(images)
    order, cursor = torch.randperm(n, generator=gen), 0
    start, cpu_start = time.perf_counter(), time.process_time()
    log = {"mse": 0.0, "vb": 0.0, "loss": 0.0, "n": 0}
    history = []
    for step in range(args.steps):
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.class_dropout] = NUM_CLASSES
        t = torch.randint(0, NUM_TIMESTEPS, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)

        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, parts = training_loss(model, sched, x0, t, y, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA with a warm-up ramp: short runs would otherwise keep too much of the random init
        decay_now = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay_now)

        log["loss"] += loss.item()
        log["mse"] += parts["mse"]
        log["vb"] += parts["vb"]
        log["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = log["n"]
            row = {"step": step + 1, "loss": log["loss"] / k, "mse": log["mse"] / k, "vb": log["vb"] / k,
                   "lr": lr_at(step), "elapsed_s": time.perf_counter() - start,
                   "cpu_s": time.process_time() - cpu_start}
            history.append(row)
            print(f"step {row['step']:6d}  loss {row['loss']:.4f}  mse {row['mse']:.4f}  vb {row['vb']:.4f}  "
                  f"lr {row['lr']:.2e}  elapsed {row['elapsed_s']:.0f}s (cpu {row['cpu_s']:.0f}s)", flush=True)
            log = {"mse": 0.0, "vb": 0.0, "loss": 0.0, "n": 0}

    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    save_checkpoint(args.out, model, ema, args)
    print(f"trained {args.steps} steps in {train_s:.0f}s (cpu {train_cpu_s:.0f}s); wrote {args.out}", flush=True)
    report = {"train_seconds": train_s, "train_cpu_seconds": train_cpu_s, "history": history, "args": vars(args)}

    if args.eval_samples > 0:
        report["eval"] = run_evaluation(ema, images, labels, args)
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW with weight decay on the matrices only (not on alphas, norms, biases and embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))


def cosine_lr(peak: float, warmup: int, steps: int):
    """step -> learning rate: linear warmup, then cosine down to 10% of the peak."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr_at


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.eval_only:
        train(args)
        return
    torch.set_num_threads(args.threads)
    images, labels = load_digit_images()
    metrics = run_evaluation(load_checkpoint(args.out), images, labels, args)
    clip = "" if metrics["clip_x0"] else "_noclip"
    name = f"eval_{metrics['method']}{metrics['steps']}_cfg{metrics['cfg']:g}{clip}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
