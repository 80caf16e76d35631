"""The SD-VAE decoder's configuration and tensor list: light (no numba), read by the format reader.

The decoder graph is in :mod:`terdit_edge.vae`, its convolution kernels in
:mod:`terdit_edge.kernels.conv`; docs/model.md §6 describes the architecture.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .config import strict_config_from_json
from .errors import FormatError

__all__ = ["VAEConfig", "expected_vae_tensors", "expected_vae_encoder_tensors"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    """Shape of an AutoencoderKL decoder, and optionally its encoder.

    ``block_out_channels`` is in the diffusers (encoder) order, e.g. (128, 256, 512, 512); the decoder
    walks it reversed. ``layers_per_block`` + 1 resnets per up block. Decoding computes
    ``decoder(post_quant_conv(z / scaling_factor + shift_factor))``.

    ``encoder`` (default False): the file also holds the encoder (``layers_per_block`` resnets per
    down block, ``out_channels`` image channels in, 2 * ``in_latent_channels`` moments out) and,
    when ``use_post_quant_conv``, its ``quant_conv``. Encoding computes the latent distribution's
    mean ``quant_conv(encoder(x))[:, :in_latent_channels]``, unscaled. The key is written to JSON
    only when true, so decoder-only files stay what older readers accept.
    """

    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    mid_block_attention: bool = True
    use_post_quant_conv: bool = True
    encoder: bool = False

    @property
    def upsample_factor(self) -> int:
        """Image pixels per latent pixel along one axis (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> "VAEConfig":
        """Check types and values; raise FormatError naming the first problem."""
        boc = self.block_out_channels
        if not isinstance(boc, tuple) or not (1 <= len(boc) <= 8):
            raise FormatError(f"vae_config.block_out_channels must be a tuple of 1..8 integers, found {boc!r}")
        for v in boc:
            if type(v) is not int or not (1 <= v <= 1 << 14):
                raise FormatError(f"vae_config.block_out_channels entries must be integers in 1..16384, found {v!r}")
        for name in ("layers_per_block", "in_latent_channels", "out_channels", "norm_num_groups"):
            v = getattr(self, name)
            if type(v) is not int or not (1 <= v <= 1 << 14):
                raise FormatError(f"vae_config.{name} must be a positive integer, found {v!r}")
        for name in ("mid_block_attention", "use_post_quant_conv", "encoder"):
            if type(getattr(self, name)) is not bool:
                raise FormatError(f"vae_config.{name} must be a boolean, found {getattr(self, name)!r}")
        for name, lo, hi in (("norm_eps", 0.0, 1.0), ("scaling_factor", 0.0, 1e6)):
            v = getattr(self, name)
            if type(v) not in (int, float) or not (lo < v < hi):
                raise FormatError(f"vae_config.{name} must be a number in ({lo}, {hi}), found {v!r}")
        v = self.shift_factor
        if type(v) not in (int, float) or not math.isfinite(v):
            raise FormatError(f"vae_config.shift_factor must be a finite number, found {v!r}")
        for c in boc:
            if c % self.norm_num_groups:
                raise FormatError(f"vae_config: channel count {c} is not divisible by "
                                  f"norm_num_groups {self.norm_num_groups}")
        return self

    def to_json(self) -> str:
        """Serialise to the JSON string stored as the ``vae_config`` metadata of a .tdit file."""
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        if not self.encoder:
            del d["encoder"]  # decoder-only files: the JSON older readers know
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VAEConfig":
        """Parse and validate a ``vae_config`` string; raise FormatError on anything unexpected."""
        def lists_to_tuples(raw):
            if not isinstance(raw["block_out_channels"], list):
                raise FormatError("vae_config.block_out_channels must be a list of integers, "
                                  f"found {raw['block_out_channels']!r}")
            raw["block_out_channels"] = tuple(raw["block_out_channels"])
        try:
            raw = json.loads(text)
        except (ValueError, TypeError, RecursionError):
            raw = None
        if isinstance(raw, dict) and "encoder" not in raw:  # every other key stays required
            raw["encoder"] = False
            text = json.dumps(raw)
        return strict_config_from_json(cls, text, "vae_config", require_all=True, convert=lists_to_tuples)


def _resnet_tensors(prefix: str, cin: int, cout: int, out: dict) -> None:
    out[prefix + "norm1.weight"] = (cin,)
    out[prefix + "norm1.bias"] = (cin,)
    out[prefix + "conv1.weight"] = (cout, cin, 3, 3)
    out[prefix + "conv1.bias"] = (cout,)
    out[prefix + "norm2.weight"] = (cout,)
    out[prefix + "norm2.bias"] = (cout,)
    out[prefix + "conv2.weight"] = (cout, cout, 3, 3)
    out[prefix + "conv2.bias"] = (cout,)
    if cin != cout:
        out[prefix + "conv_shortcut.weight"] = (cout, cin, 1, 1)
        out[prefix + "conv_shortcut.bias"] = (cout,)


def expected_vae_tensors(cfg: VAEConfig) -> dict:
    """Canonical tensor names (diffusers naming, new attention names) -> shapes, for ``cfg``.

    Names cover ``post_quant_conv`` and ``decoder.*``, and with ``cfg.encoder`` also ``quant_conv``
    and ``encoder.*`` (:func:`expected_vae_encoder_tensors`), without any file prefix. Attention
    projections are stored as linear weights (C, C).
    """
    t: dict = {}
    lat = cfg.in_latent_channels
    rev = tuple(reversed(cfg.block_out_channels))
    top = rev[0]
    if cfg.use_post_quant_conv:
        t["post_quant_conv.weight"] = (lat, lat, 1, 1)
        t["post_quant_conv.bias"] = (lat,)
    t["decoder.conv_in.weight"] = (top, lat, 3, 3)
    t["decoder.conv_in.bias"] = (top,)
    _resnet_tensors("decoder.mid_block.resnets.0.", top, top, t)
    if cfg.mid_block_attention:
        a = "decoder.mid_block.attentions.0."
        t[a + "group_norm.weight"] = (top,)
        t[a + "group_norm.bias"] = (top,)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            t[a + proj + ".weight"] = (top, top)
            t[a + proj + ".bias"] = (top,)
    _resnet_tensors("decoder.mid_block.resnets.1.", top, top, t)
    prev = top
    for i, ch in enumerate(rev):
        for j in range(cfg.layers_per_block + 1):
            _resnet_tensors(f"decoder.up_blocks.{i}.resnets.{j}.", prev if j == 0 else ch, ch, t)
        prev = ch
        if i < len(rev) - 1:
            t[f"decoder.up_blocks.{i}.upsamplers.0.conv.weight"] = (ch, ch, 3, 3)
            t[f"decoder.up_blocks.{i}.upsamplers.0.conv.bias"] = (ch,)
    t["decoder.conv_norm_out.weight"] = (rev[-1],)
    t["decoder.conv_norm_out.bias"] = (rev[-1],)
    t["decoder.conv_out.weight"] = (cfg.out_channels, rev[-1], 3, 3)
    t["decoder.conv_out.bias"] = (cfg.out_channels,)
    if cfg.encoder:
        t.update(expected_vae_encoder_tensors(cfg))
    return t


def _attention_tensors(prefix: str, c: int, out: dict) -> None:
    out[prefix + "group_norm.weight"] = (c,)
    out[prefix + "group_norm.bias"] = (c,)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        out[prefix + proj + ".weight"] = (c, c)
        out[prefix + proj + ".bias"] = (c,)


def expected_vae_encoder_tensors(cfg: VAEConfig) -> dict:
    """The encoder's tensors (``encoder.*`` and, with ``use_post_quant_conv``, ``quant_conv``):
    diffusers' Encoder with DownEncoderBlock2D blocks and double_z (2 * latent channels out)."""
    t: dict = {}
    lat2 = 2 * cfg.in_latent_channels
    boc = cfg.block_out_channels
    t["encoder.conv_in.weight"] = (boc[0], cfg.out_channels, 3, 3)
    t["encoder.conv_in.bias"] = (boc[0],)
    prev = boc[0]
    for i, ch in enumerate(boc):
        for j in range(cfg.layers_per_block):
            _resnet_tensors(f"encoder.down_blocks.{i}.resnets.{j}.", prev if j == 0 else ch, ch, t)
        prev = ch
        if i < len(boc) - 1:
            t[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"] = (ch, ch, 3, 3)
            t[f"encoder.down_blocks.{i}.downsamplers.0.conv.bias"] = (ch,)
    top = boc[-1]
    _resnet_tensors("encoder.mid_block.resnets.0.", top, top, t)
    if cfg.mid_block_attention:
        _attention_tensors("encoder.mid_block.attentions.0.", top, t)
    _resnet_tensors("encoder.mid_block.resnets.1.", top, top, t)
    t["encoder.conv_norm_out.weight"] = (top,)
    t["encoder.conv_norm_out.bias"] = (top,)
    t["encoder.conv_out.weight"] = (lat2, top, 3, 3)
    t["encoder.conv_out.bias"] = (lat2,)
    if cfg.use_post_quant_conv:
        t["quant_conv.weight"] = (lat2, lat2, 1, 1)
        t["quant_conv.bias"] = (lat2,)
    return t


