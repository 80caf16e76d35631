"""An independent PyTorch TerDiT, written from the model's specification (docs/model.md), for parity tests.

This is the yardstick terdit-edge is measured against, so it is written the way the authors' PyTorch
code is organised (nn.Modules named like the checkpoint keys, a BitLinear-style ternary layer holding
``weight`` and ``alphas``, ADM's GaussianDiffusion for sampling) and shares no code with the runtime.

Contents
- :class:`TernaryLinear`, :class:`DiTLlama`: the model, ``forward(x, t, y)`` and the authors'
  ``forward_with_cfg`` on a doubled batch.
- :func:`space_timesteps`, :class:`SpacedDiffusion`: linear betas, respacing, ``p_sample`` with the
  learned-range variance and ``ddim_sample`` with eta; :func:`sample_latents` drives them with noise
  drawn by the runtime's RNG contract so that trajectories can be compared step for step.
- :func:`random_model`, :func:`save_checkpoint`, :func:`pack_released`: small random models saved as
  checkpoint directories in the QAT-float and released-packed layouts.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# One thread: the reference is tiny, and the test machine's cores are shared.
torch.set_num_threads(1)

QAT_FILE = "consolidated_ema.00-of-01.pth"
RELEASED_FILE = "consolidated_ema_ternary.00-of-01.pth"


# --------------------------------------------------------------------------------------------------
# Ternary weights
# --------------------------------------------------------------------------------------------------
def absmean_ternary(weight: torch.Tensor) -> torch.Tensor:
    """Float weight (out, in) -> Q in {-1, 0, 1} as float32; one gamma = mean|w| for the whole tensor,
    torch.round (half to even)."""
    w = weight.float()
    gamma = w.abs().mean()
    return torch.clamp(torch.round(w / (gamma + 1e-6)), -1, 1)


def pack_released(q: torch.Tensor) -> torch.Tensor:
    """Q (out, in) int in {-1, 0, 1} -> released layout uint8 (out/4, in).

    Byte row r holds Q rows r, r + out/4, r + 2 out/4, r + 3 out/4 in bits 7-6, 5-4, 3-2, 1-0 as f = Q + 1.
    """
    out = q.shape[0]
    assert out % 4 == 0
    f = (q.to(torch.int32) + 1)
    quarter = out // 4
    parts = [f[i * quarter:(i + 1) * quarter] for i in range(4)]
    packed = (parts[0] << 6) | (parts[1] << 4) | (parts[2] << 2) | parts[3]
    return packed.to(torch.uint8)


def unpack_released(packed: torch.Tensor) -> torch.Tensor:
    """Released layout uint8 (out/4, in) -> Q (out, in) float32 (inverse of :func:`pack_released`)."""
    p = packed.to(torch.int32)
    rows = [((p >> shift) & 3) - 1 for shift in (6, 4, 2, 0)]
    return torch.cat(rows, dim=0).float()


class TernaryLinear(nn.Module):
    """BitLinear-style layer: y = x (alphas * Q)^T + bias.

    ``weight`` is the float latent weight of QAT training (Q from the absmean rule); after
    :meth:`load_ternary` it holds Q itself (the released checkpoints' values) and is used as is.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.alphas = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_is_ternary = False

    def load_ternary(self, q: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(q)
        self.weight_is_ternary = True

    def ternary(self) -> torch.Tensor:
        return self.weight if self.weight_is_ternary else absmean_ternary(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.alphas * self.ternary(), self.bias)


# --------------------------------------------------------------------------------------------------
# DiT-LLaMA
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def modulate(x, shift, scale):
    """x (B, T, D); shift, scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """t (B,) -> (B, dim): [cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # last row: null label

    def forward(self, y):
        return self.embedding_table(y)


def rope_freqs(head_dim: int, n_tokens: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex (n_tokens, head_dim/2): exp(i pos theta^(-2i/head_dim))."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    angles = torch.outer(torch.arange(n_tokens, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd): consecutive pairs rotate as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        kv = self.n_kv_heads * self.head_dim
        self.wq = TernaryLinear(dim, dim)
        self.wk = TernaryLinear(dim, kv)
        self.wv = TernaryLinear(dim, kv)
        self.wo = TernaryLinear(dim, dim)
        if qk_norm:
            self.q_norm = nn.LayerNorm(dim, eps=1e-5)
            self.k_norm = nn.LayerNorm(kv, eps=1e-5)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x, freqs):
        b, t, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # GQA: query head h reads kv head h // rep
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, t, -1)
        return self.wo(out)


def ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = TernaryLinear(dim, hidden)
        self.w2 = TernaryLinear(hidden, dim)
        self.w3 = TernaryLinear(dim, hidden)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, qk_norm, cond_dim, eps=1e-5):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads, qk_norm)
        self.feed_forward = FeedForward(dim, ffn_hidden(dim))
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), TernaryLinear(cond_dim, 6 * dim, bias=True),
                                              RMSNorm(6 * dim, eps))

    def forward(self, x, c, freqs):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa), freqs)
        x = x + gate_mlp.unsqueeze(1) * self.feed_forward(modulate(self.ffn_norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels, cond_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTLlama(nn.Module):
    """DiT-LLaMA with TerDiT ternary layers. forward(x (B,C,H,W) float, t (B,) int, y (B,) int) ->
    (B, 2C, H, W): eps then the variance interpolation value."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, dim=64, n_layers=2, n_heads=4,
                 n_kv_heads=None, num_classes=10, qk_norm=False, learn_sigma=True):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        cond = min(dim, 1024)
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.t_embedder = TimestepEmbedder(cond)
        self.y_embedder = LabelEmbedder(num_classes, cond)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads, n_kv_heads, qk_norm, cond)
                                    for _ in range(n_layers))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels, cond)
        n_tokens = (input_size // patch_size) ** 2
        self.register_buffer("freqs_cis", rope_freqs(dim // n_heads, n_tokens), persistent=False)

    def patchify(self, x):
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x):
        b = x.shape[0]
        p, c = self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x, t, y):
        h = self.x_embedder(self.patchify(x))
        c = self.t_embedder(t) + self.y_embedder(y)
        for layer in self.layers:
            h = layer(h, c, self.freqs_cis)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """The authors' guidance on a doubled batch: uses the first half of x for both halves, y is
        [labels, null]; guides eps channels 0..2, the rest per half."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# --------------------------------------------------------------------------------------------------
# Diffusion (ADM GaussianDiffusion + SpacedDiffusion)
# --------------------------------------------------------------------------------------------------
def space_timesteps(num_timesteps: int, section) -> list[int]:
    """Kept timesteps, ascending. ``section`` N (int or "N"): one section, repeated addition of the
    fractional stride (Python round); "ddimN": the integer stride whose range(0, T, s) has N entries."""
    if isinstance(section, str) and section.startswith("ddim"):
        desired = int(section[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    section = int(section)
    if section == 1:
        return [0]
    frac_stride = (num_timesteps - 1) / (section - 1)
    cur, taken = 0.0, []
    for _ in range(section):
        taken.append(round(cur))
        cur += frac_stride
    return sorted(set(taken))


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """float64 schedule value at integer step t (B,) -> float32 (B, 1, 1, 1), as ADM does."""
    res = torch.from_numpy(arr)[t].float()
    return res.view(-1, *([1] * (ndim - 1)))


class SpacedDiffusion:
    def __init__(self, steps):
        base_betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        base_abar = np.cumprod(1.0 - base_betas)
        self.timestep_map = space_timesteps(1000, steps)
        kept = set(self.timestep_map)
        betas, last = [], 1.0
        for i, ab in enumerate(base_abar):
            if i in kept:
                betas.append(1 - ab / last)
                last = ab
        b = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(b)
        self.betas = b
        alphas = 1.0 - b
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def wrap(self, model_fn):
        """The model sees the original timestep, never the respaced index."""
        tmap = torch.tensor(self.timestep_map, dtype=torch.int64)
        return lambda x, t: model_fn(x, tmap[t])

    def p_mean_variance(self, model, x, t):
        c = x.shape[1]
        out = model(x, t)
        eps, var_values = torch.split(out, c, dim=1)
        min_log = _extract(self.posterior_log_variance_clipped, t, x.ndim)
        max_log = _extract(np.log(self.betas), t, x.ndim)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = _extract(self.sqrt_recip_alphas_cumprod, t, x.ndim) * x \
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x.ndim) * eps
        mean = _extract(self.posterior_mean_coef1, t, x.ndim) * pred_x0 \
            + _extract(self.posterior_mean_coef2, t, x.ndim) * x
        return mean, log_var, pred_x0

    def p_sample(self, model, x, t, noise):
        mean, log_var, _ = self.p_mean_variance(model, x, t)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise

    def ddim_sample(self, model, x, t, noise, eta=0.0):
        _, _, pred_x0 = self.p_mean_variance(model, x, t)
        eps = (_extract(self.sqrt_recip_alphas_cumprod, t, x.ndim) * x - pred_x0) \
            / _extract(self.sqrt_recipm1_alphas_cumprod, t, x.ndim)
        abar = _extract(self.alphas_cumprod, t, x.ndim)
        abar_prev = _extract(self.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = pred_x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * noise


@torch.no_grad()
def sample_latents(model: DiTLlama, labels, steps, sampler: str = "ddpm", cfg_scale: float = 4.0,
                   seed: int = 0, eta: float = 0.0, seeds=None) -> np.ndarray:
    """The authors' sampling loop (sample.py) for raw model labels; noise from the runtime's contract:
    image k has its own generator numpy default_rng(seeds[k]) (seeds[k] = seed + k by default),
    which draws its initial (C, H, W) float32 noise, then one such draw per step.
    Returns the final latents (B, C, H, W) float32 for the requested labels."""
    diffusion = SpacedDiffusion(steps)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n = len(labels)
    image_shape = (model.in_channels, model.input_size, model.input_size)
    rngs = [np.random.default_rng(s) for s in (seeds if seeds is not None else [seed + k for k in range(n)])]

    def draw():
        return torch.from_numpy(np.stack([r.standard_normal(image_shape, dtype=np.float32) for r in rngs]))

    z = draw()
    guided = cfg_scale > 1.0
    if guided:
        z = torch.cat([z, z], dim=0)
        y = torch.cat([labels, torch.full((n,), model.num_classes, dtype=torch.int64)])
        model_fn = diffusion.wrap(lambda x, ts: model.forward_with_cfg(x, ts, y, cfg_scale))
    else:
        model_fn = diffusion.wrap(lambda x, ts: model(x, ts, labels))
    for i in reversed(range(diffusion.num_timesteps)):
        noise = draw()
        if guided:  # the second half is discarded by forward_with_cfg and by the caller
            noise = torch.cat([noise, noise], dim=0)
        t = torch.full((z.shape[0],), i, dtype=torch.int64)
        if sampler == "ddpm":
            z = diffusion.p_sample(model_fn, z, t, noise)
        elif sampler == "ddim":
            z = diffusion.ddim_sample(model_fn, z, t, noise, eta)
        else:
            raise ValueError(sampler)
    return z[:n].numpy()


# --------------------------------------------------------------------------------------------------
# Small random models and checkpoint directories
# --------------------------------------------------------------------------------------------------
def random_model(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, num_classes=10, input_size=8,
                 qk_norm=False, seed=0) -> DiTLlama:
    """A DiTLlama with random weights scaled so that activations stay O(1).

    Float parameters are random (norm weights near 1); the latent ternary weights are random with
    about 31% of them ternarizing to 0 (normal weights); alphas ~ 1/sqrt(fan_in) so that ternary layer
    outputs are O(1).
    """
    torch.manual_seed(seed)
    m = DiTLlama(input_size=input_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                 num_classes=num_classes, qk_norm=qk_norm)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".alphas"):
                continue
            if name.endswith("norm.weight") or name.endswith("adaLN_modulation.2.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, TernaryLinear):
                mod.alphas.fill_(float(1.2 / math.sqrt(mod.in_features) * (0.7 + 0.6 * torch.rand(()).item())))
        # adaLN gates and the final projection smaller, so deep residual sums stay moderate
        for layer in m.layers:
            layer.adaLN_modulation[2].weight.mul_(0.5)
        m.final_layer.linear.weight.mul_(0.5)
    m.eval()
    return m


def released_state_dict(model: DiTLlama) -> dict:
    """The model's state dict in the released layout: every ternary ``weight`` packed to uint8."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, TernaryLinear):
            state[name + ".weight"] = pack_released(mod.ternary().detach())
    return state


def load_released_state_dict(model: DiTLlama, state: dict) -> DiTLlama:
    """Load a released-layout state dict (uint8 ternary weights) into ``model`` in place."""
    packed = {name + ".weight" for name, mod in model.named_modules() if isinstance(mod, TernaryLinear)}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in packed}, strict=False)
    assert set(missing) == packed and not unexpected, (missing, unexpected)
    for name, mod in model.named_modules():
        if isinstance(mod, TernaryLinear):
            mod.load_ternary(unpack_released(state[name + ".weight"]))
    return model


def model_args(model: DiTLlama, qk_norm: bool, name="DiT_Llama_tiny_patch2") -> argparse.Namespace:
    return argparse.Namespace(model=name, image_size=8 * model.input_size, num_classes=model.num_classes,
                              qk_norm=qk_norm, vae="ema", global_seed=0, precision="fp32")


def save_checkpoint(model: DiTLlama, directory: str, layout: str = "qat", qk_norm: bool | None = None,
                    state: dict | None = None) -> str:
    """Write ``directory/model_args.pth`` and the weights file of ``layout`` ("qat" float or
    "released" packed); ``state`` overrides the state dict written. Returns the weights path."""
    os.makedirs(directory, exist_ok=True)
    if qk_norm is None:
        qk_norm = not isinstance(model.layers[0].attention.q_norm, nn.Identity)
    torch.save(model_args(model, qk_norm), os.path.join(directory, "model_args.pth"))
    if state is None:
        state = released_state_dict(model) if layout == "released" else model.state_dict()
    path = os.path.join(directory, RELEASED_FILE if layout == "released" else QAT_FILE)
    torch.save(state, path)
    return path


def ternary_stats(model: DiTLlama) -> tuple[int, int]:
    """(number of ternary weights, number of them that are 0)."""
    total = zeros = 0
    for mod in model.modules():
        if isinstance(mod, TernaryLinear):
            q = mod.ternary()
            total += q.numel()
            zeros += int((q == 0).sum())
    return total, zeros
