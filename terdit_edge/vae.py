"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) decoder, and its encoder, without PyTorch.

Latents (B, C_lat, h, w) float32 -> images (B, 3, 8h, 8w) float32 in about [-1, 1]. This module
is the decoder graph (docs/model.md §6) and, for files converted with ``--vae-encoder``, the
encoder graph (images -> the latent distribution's mean, :meth:`VAEDecoder.encode`) on the same
kernels plus a stride-2 convolution for the downsamplers; the configuration and tensor list are in
:mod:`terdit_edge.vae_config`, the convolution kernels (Winograd on BLAS, GroupNorm, the worker
pool) in :mod:`terdit_edge.kernels.conv`.

Weights stay as the caller gave them (float16 or float32, possibly memory-mapped); each layer's
weights are converted to float32 / Winograd form just before the layer runs and dropped after, and
the pages of memory-mapped weights are given back once their layer has run, which keeps the
resident memory at one layer's weights plus the activations. A tiled decode prepares each weight
of the trunk (the layers at the latent's resolution, about half of the 512-channel weights) once
for all tiles.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np
from threadpoolctl import threadpool_limits

from .errors import FormatError, InputError
from .format import release_pages
from .kernels.conv import (
    CONV_METHODS,
    _f32,
    _pieces,
    _Workers,
    choose_conv_method,
    conv1x1,
    conv3x3,
    conv3x3_down2,
    group_norm,
    linear,
    prepare_conv3x3,
)
from .vae_config import VAEConfig, expected_vae_tensors

__all__ = ["VAEConfig", "expected_vae_tensors", "VAEDecoder", "VAE", "CONV_METHODS", "conv3x3"]


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------

def _check_tiling(tile, overlap):
    """The overlap to use for ``tile`` (default tile // 4); InputError for bad values."""
    if tile is None:
        return overlap
    if type(tile) is not int or tile < 2:
        raise InputError(f"tile must be an integer >= 2 or None, found {tile!r}")
    if overlap is None:
        overlap = tile // 4
    if type(overlap) is not int or not (0 <= overlap < tile):
        raise InputError(f"overlap must be an integer in [0, tile), found {overlap!r}")
    return overlap


class VAEDecoder:
    """AutoencoderKL decoder on NumPy + BLAS + Numba.

    cfg: the decoder shape; tensors: name -> array for every name of ``expected_vae_tensors(cfg)``
    (float16 or float32, may be read-only memory maps; they are never copied as a whole: each
    layer's weights are converted when the layer runs); threads: worker threads (None: the CPUs
    this process may use); conv: one of CONV_METHODS; "auto" (default) picks per layer with
    :func:`choose_conv_method` (Winograd F(4x4,3x3) above 32 x 32 output pixels, F(2x2,3x3) below).
    """

    def __init__(self, cfg: VAEConfig, tensors: Mapping[str, np.ndarray], threads: int | None = None,
                 conv: str = "auto"):
        self.cfg = cfg.validate()
        expected = expected_vae_tensors(cfg)
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise FormatError(f"VAE tensors missing {len(missing)} names, e.g. {missing[:3]}; "
                              "the file does not match its vae_config")
        for name, shape in expected.items():
            arr = tensors[name]
            if tuple(arr.shape) != shape:
                raise FormatError(f"VAE tensor {name} has shape {tuple(arr.shape)}, expected {shape}")
            if arr.dtype not in (np.float16, np.float32):
                raise FormatError(f"VAE tensor {name} has dtype {arr.dtype}, expected float16 or float32")
        if threads is not None and (type(threads) is not int or threads < 1):
            raise InputError(f"threads must be a positive integer or None, found {threads!r}")
        if conv not in CONV_METHODS:
            raise InputError(f"conv must be one of {CONV_METHODS}, found {conv!r}")
        self.tensors = {k: tensors[k] for k in expected}
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = threads
        self.conv = conv
        self._workers = _Workers(threads)

    def close(self) -> None:
        """Stop the worker threads (also done when the decoder is garbage collected)."""
        self._workers.close()

    def __del__(self):
        workers = getattr(self, "_workers", None)
        if workers is not None:
            workers.close()

    # -- layers --------------------------------------------------------------------------------
    # Every layer maps a list of activations (one per tile; one in an untiled decode) to the next
    # list and prepares its weights once for the whole list. A layer owns the list it is given:
    # it drops each input as soon as it is used, so the caller must hold no other reference (and
    # loops over such lists use indices: enumerate() keeps the last item alive in its result tuple).

    def _method(self, x, up=1):
        """The 3x3 method for input x (h, w, C) upsampled by ``up``."""
        return self.conv if self.conv != "auto" else choose_conv_method(x.shape[0] * up * x.shape[1] * up)

    def _prepare(self, name, xs, up=1):
        """{method: prepared weight} of 3x3 layer ``name`` for every method the inputs xs need."""
        prepared = {}
        for x in xs:
            method = self._method(x, up)
            if method not in prepared:
                prepared[method] = prepare_conv3x3(self.tensors[name + ".weight"], method, self._workers)
        return prepared

    def _apply3(self, x, name, prepared, up=1, residual=None):
        method = self._method(x, up)
        return conv3x3(x, self.tensors[name + ".weight"], self.tensors[name + ".bias"], up=up, residual=residual,
                       method=method, workers=self._workers, prepared=prepared[method])

    def _conv3(self, xs, name, up=1):
        prepared = self._prepare(name, xs, up)
        outs = []
        for i in range(len(xs)):  # not enumerate(): its cached (i, x) tuple would keep x alive
            x, xs[i] = xs[i], None
            outs.append(self._apply3(x, name, prepared, up))
            x = None
        return outs

    def _norm(self, x, name, silu, out=None):
        return group_norm(x, self.tensors[name + ".weight"], self.tensors[name + ".bias"],
                          self.cfg.norm_num_groups, self.cfg.norm_eps, silu, out, self._workers)

    def _resnet(self, xs, prefix):
        """Resnet block on each activation in turn (one tile's temporaries at a time). With several
        tiles both convolutions' weights are prepared up front, once; with one, each just before
        its convolution, so that only one prepared weight is alive."""
        t = self.tensors
        shortcut = prefix + "conv_shortcut"
        conv1, conv2 = prefix + "conv1", prefix + "conv2"
        many = len(xs) > 1
        p1 = self._prepare(conv1, xs)
        p2 = self._prepare(conv2, xs) if many else None  # conv2 sees conv1's (h, w): the same methods
        outs = []
        for i in range(len(xs)):  # not enumerate(): its cached (i, x) tuple would keep x alive
            x, xs[i] = xs[i], None  # the caller's list: from here the block holds the only reference
            if shortcut + ".weight" in t:
                # the shortcut first: the input is then normalized in place, so the block never
                # holds the input, its normalized copy and conv1's output at once
                res = conv1x1(x, t[shortcut + ".weight"], t[shortcut + ".bias"], self._workers)
                h = self._norm(x, prefix + "norm1", True, out=x)
            else:
                res = x
                h = self._norm(x, prefix + "norm1", True)
            x = None
            h = self._apply3(h, conv1, p1)
            if not many:
                p1 = None
                p2 = self._prepare(conv2, [h])
            self._norm(h, prefix + "norm2", True, out=h)
            outs.append(self._apply3(h, conv2, p2, residual=res))
            h = res = None
        return outs

    def _attention(self, xs, prefix):
        """Single-head self-attention over the h*w positions with GroupNorm first and a residual."""
        t = self.tensors
        weights = {n: (_f32(t[prefix + n + ".weight"]), _f32(t[prefix + n + ".bias"]))
                   for n in ("to_q", "to_k", "to_v", "to_out.0")}
        outs = []
        for i in range(len(xs)):
            x, xs[i] = xs[i], None
            outs.append(self._attention_one(x, prefix, weights))
            x = None
        return outs

    def _attention_one(self, x, prefix, weights):
        hgt, wid, c_n = x.shape
        workers = self._workers
        h = self._norm(x, prefix + "group_norm", False).reshape(hgt * wid, c_n)

        def proj(inp, name):
            return linear(inp, *weights[name], workers)

        q = proj(h, "to_q")
        q *= np.float32(1.0 / math.sqrt(c_n))
        k = proj(h, "to_k")
        v = proj(h, "to_v")
        del h
        o = np.empty_like(q)
        step = 512  # query rows per block: bounds each score matrix at 512 x (h*w)

        def queries(lo, hi):
            for s in range(lo, hi, step):
                e = min(s + step, hi)
                scores = q[s:e] @ k.T
                scores -= scores.max(axis=1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=1, keepdims=True)
                np.matmul(scores, v, out=o[s:e])

        workers.run(queries, _pieces(q.shape[0], workers))
        q = k = v = None  # free the projections before the output one is allocated
        out = proj(o, "to_out.0")
        out += x.reshape(hgt * wid, c_n)
        return out.reshape(hgt, wid, c_n)

    def _layers(self) -> tuple[list, int]:
        """The decoder graph as a list of layers (weight-name prefix, function: list of activations
        -> list), and how many of them form the trunk: the layers at the latent's resolution
        (conv_in, the mid block, the first up block's resnets), which hold about half of the
        512-channel convolutions (the weights that cost most to prepare) while their activations
        are small. A tiled decode runs the trunk on all tiles together (each weight prepared once
        per decode) and the rest tile by tile (_decode_tiled). Ending the trunk one up block later
        saved 7% more time at 512 px but held every tile's 4x larger features at once: +60 MB of
        peak memory for nine 32-latent tiles, and tiling is for small memory."""
        cfg = self.cfg
        layers = []
        if cfg.use_post_quant_conv:
            layers.append(("post_quant_conv.", lambda xs: [conv1x1(z, self.tensors["post_quant_conv.weight"],
                                                                   self.tensors["post_quant_conv.bias"]) for z in xs]))
        layers.append(("decoder.conv_in.", lambda xs: self._conv3(xs, "decoder.conv_in")))
        mid = "decoder.mid_block."
        layers.append((mid + "resnets.0.", lambda xs: self._resnet(xs, mid + "resnets.0.")))
        if cfg.mid_block_attention:
            layers.append((mid + "attentions.0.", lambda xs: self._attention(xs, mid + "attentions.0.")))
        layers.append((mid + "resnets.1.", lambda xs: self._resnet(xs, mid + "resnets.1.")))
        n_up = len(cfg.block_out_channels)
        trunk = None
        for i in range(n_up):
            for j in range(cfg.layers_per_block + 1):
                p = f"decoder.up_blocks.{i}.resnets.{j}."
                layers.append((p, lambda xs, p=p: self._resnet(xs, p)))
            if i < n_up - 1:
                if i == 0:
                    trunk = len(layers)  # before the first upsampler
                p = f"decoder.up_blocks.{i}.upsamplers.0.conv"
                layers.append((p + ".", lambda xs, p=p: self._conv3(xs, p, up=2)))

        def conv_out(xs):
            for x in xs:
                self._norm(x, "decoder.conv_norm_out", True, out=x)
            return self._conv3(xs, "decoder.conv_out")

        layers.append(("decoder.conv_", conv_out))  # conv_norm_out and conv_out
        return layers, len(layers) if trunk is None else trunk

    def _run(self, layers, xs):
        """Apply ``layers`` to the list ``xs``. After each layer its weights' mapped pages are given
        back (format.release_pages; a no-op for weights in ordinary memory): every layer reads its
        own, so the resident set holds one layer's weights, not the whole decoder's."""
        for prefix, layer in layers:
            xs = layer(xs)
            release_pages(arr for name, arr in self.tensors.items() if name.startswith(prefix))
        return xs

    def _decode_one(self, z):
        """z: float32 (h, w, C_lat), already unscaled -> float32 (8h, 8w, out_channels)."""
        layers, _ = self._layers()
        return self._run(layers, [np.ascontiguousarray(z)])[0]

    # -- public ----------------------------------------------------------------------------------
    def decode(self, latents: np.ndarray, tile: int | None = None, overlap: int | None = None) -> np.ndarray:
        """Decode latents float32 (B, C_lat, h, w) -> images float32 (B, out_channels, f*h, f*w).

        f = cfg.upsample_factor (8). The latents are divided by ``scaling_factor`` (and shifted by
        ``shift_factor``) here. Output is not clamped (as diffusers). ``tile`` (latent pixels)
        decodes overlapping tiles of that size independently and blends them with linear ramps
        over ``overlap`` latent pixels (default tile // 4, i.e. 8 for tile 32). The trunk (the
        layers at the latent's resolution, small activations) runs on all tiles together, so its
        weights are prepared once per decode; the larger activations of the later layers are one
        tile's at a time, so memory depends on the tile, hardly on the image. Each tile gets the
        same bits as when decoded alone.
        """
        cfg = self.cfg
        z = np.asarray(latents)
        if z.ndim != 4 or z.shape[1] != cfg.in_latent_channels:
            raise InputError(f"latents must have shape (B, {cfg.in_latent_channels}, h, w), "
                             f"found {z.shape}")
        if z.shape[0] < 1 or z.shape[2] < 1 or z.shape[3] < 1:
            raise InputError(f"latents must not be empty, found shape {z.shape}")
        if not np.issubdtype(z.dtype, np.floating):
            raise InputError(f"latents must be floating point, found {z.dtype}")
        overlap = _check_tiling(tile, overlap)
        z = z.astype(np.float32) / np.float32(cfg.scaling_factor) + np.float32(cfg.shift_factor)
        z = np.ascontiguousarray(z.transpose(0, 2, 3, 1))  # channels-last
        # Parallelism comes from the decoder's own workers, each running single-threaded BLAS on
        # its band: nested BLAS threads would only oversubscribe the cores.
        with threadpool_limits(limits=1, user_api="blas"):
            outs = [self._decode_tiled(zi, tile, overlap) if tile is not None
                    and (zi.shape[0] > tile or zi.shape[1] > tile) else self._decode_one(zi)
                    for zi in z]
        return np.stack([o.transpose(2, 0, 1) for o in outs])

    # -- the encoder ---------------------------------------------------------------------------
    @property
    def has_encoder(self) -> bool:
        """Whether the weights include the encoder (files converted with ``--vae-encoder``)."""
        return self.cfg.encoder

    def _down(self, xs, name):
        """The stride-2 downsampler convolution (diffusers Downsample2D, padding 0) on each input."""
        t = self.tensors
        prepared = prepare_conv3x3(t[name + ".weight"], "im2col")
        outs = []
        for i in range(len(xs)):
            x, xs[i] = xs[i], None
            outs.append(conv3x3_down2(x, t[name + ".weight"], t[name + ".bias"], self._workers, prepared))
            x = None
        return outs

    def _encoder_layers(self) -> list:
        """The encoder graph as a list of layers (weight-name prefix, function), as _layers."""
        cfg = self.cfg
        layers = [("encoder.conv_in.", lambda xs: self._conv3(xs, "encoder.conv_in"))]
        n = len(cfg.block_out_channels)
        for i in range(n):
            for j in range(cfg.layers_per_block):
                p = f"encoder.down_blocks.{i}.resnets.{j}."
                layers.append((p, lambda xs, p=p: self._resnet(xs, p)))
            if i < n - 1:
                p = f"encoder.down_blocks.{i}.downsamplers.0.conv"
                layers.append((p + ".", lambda xs, p=p: self._down(xs, p)))
        mid = "encoder.mid_block."
        layers.append((mid + "resnets.0.", lambda xs: self._resnet(xs, mid + "resnets.0.")))
        if cfg.mid_block_attention:
            layers.append((mid + "attentions.0.", lambda xs: self._attention(xs, mid + "attentions.0.")))
        layers.append((mid + "resnets.1.", lambda xs: self._resnet(xs, mid + "resnets.1.")))

        def conv_out(xs):
            for x in xs:
                self._norm(x, "encoder.conv_norm_out", True, out=x)
            return self._conv3(xs, "encoder.conv_out")

        layers.append(("encoder.conv_", conv_out))
        if cfg.use_post_quant_conv:
            layers.append(("quant_conv.", lambda xs: [conv1x1(h, self.tensors["quant_conv.weight"],
                                                              self.tensors["quant_conv.bias"]) for h in xs]))
        return layers

    def _encode_one(self, x):
        """x: float32 (H, W, C_img) -> moments float32 (H/f, W/f, 2 * C_lat)."""
        return self._run(self._encoder_layers(), [np.ascontiguousarray(x)])[0]

    def _encode_tiled(self, x, tile, overlap):
        """Encode overlapping pixel tiles of x (H, W, C) independently (tile * f pixels, overlapping
        by overlap * f) and blend their moments with linear ramps of ``overlap`` latent pixels.

        The layers above the latent's resolution run tile by tile (their activations are the large
        ones); the tail at the latent's resolution (the last down block, the mid block, conv_out,
        quant_conv: about half of the 512-channel weights) runs on all tiles together, so its
        weights are prepared once. Each tile gets the same bits as when encoded alone."""
        f = self.cfg.upsample_factor
        h, w = x.shape[0] // f, x.shape[1] // f
        acc = np.zeros((h, w, 2 * self.cfg.in_latent_channels), np.float32)
        wsum = np.zeros((h, w, 1), np.float32)
        layers = self._encoder_layers()
        last = f"encoder.down_blocks.{len(self.cfg.block_out_channels) - 1}."
        tail = next(i for i, (prefix, _) in enumerate(layers) if prefix.startswith(last))
        boxes = [(y0, x0, min(tile, h - y0), min(tile, w - x0))
                 for y0 in _tile_starts(h, tile, overlap) for x0 in _tile_starts(w, tile, overlap)]
        feats = [self._run(layers[:tail], [np.ascontiguousarray(x[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f])])[0]
                 for y0, x0, th, tw in boxes]
        moments = self._run(layers[tail:], feats)
        for i, (y0, x0, th, tw) in enumerate(boxes):
            m, moments[i] = moments[i], None
            wy = _ramp(th, overlap, y0 > 0, y0 + th < h)
            wx = _ramp(tw, overlap, x0 > 0, x0 + tw < w)
            wgt = (wy[:, None] * wx[None, :])[:, :, None]
            acc[y0:y0 + th, x0:x0 + tw] += m * wgt
            wsum[y0:y0 + th, x0:x0 + tw] += wgt
        return acc / wsum

    def encode_moments(self, images: np.ndarray, tile: int | None = None,
                       overlap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, logvar) of the latent distribution, each float32 (B, C_lat, H/f, W/f), unscaled
        (multiply by ``scaling_factor`` for the DiT's latents); logvar clamped to [-30, 20] as in
        diffusers' DiagonalGaussianDistribution. See :meth:`encode` for the arguments."""
        cfg = self.cfg
        if not cfg.encoder:
            raise InputError("this VAE file holds no encoder; convert it again with --vae-encoder "
                             "(`terdit-edge convert-vae SRC OUT --vae-encoder`, or `terdit-edge pull NAME --force`)")
        x = np.asarray(images)
        f = cfg.upsample_factor
        if x.ndim != 4 or x.shape[1] != cfg.out_channels:
            raise InputError(f"images must have shape (B, {cfg.out_channels}, H, W), found {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"images must be floating point in [-1, 1], found {x.dtype}")
        if x.shape[0] < 1 or x.shape[2] < f or x.shape[3] < f or x.shape[2] % f or x.shape[3] % f:
            raise InputError(f"image height and width must be positive multiples of {f}, found shape {x.shape}")
        if not np.isfinite(x).all():
            raise InputError("images must be finite")
        overlap = _check_tiling(tile, overlap)
        x = np.ascontiguousarray(x.astype(np.float32, copy=False).transpose(0, 2, 3, 1))
        with threadpool_limits(limits=1, user_api="blas"):
            outs = [self._encode_tiled(xi, tile, overlap) if tile is not None
                    and (xi.shape[0] > tile * f or xi.shape[1] > tile * f) else self._encode_one(xi)
                    for xi in x]
        moments = np.stack([o.transpose(2, 0, 1) for o in outs])
        c = cfg.in_latent_channels
        return (np.ascontiguousarray(moments[:, :c]),
                np.ascontiguousarray(np.clip(moments[:, c:], -30.0, 20.0)))

    def encode(self, images: np.ndarray, tile: int | None = None, overlap: int | None = None,
               generators=None) -> np.ndarray:
        """Encode images float32 (B, out_channels, H, W) in [-1, 1] -> latents float32
        (B, C_lat, H/f, W/f): the latent distribution's mean, unscaled, as diffusers'
        ``encode(x).latent_dist.mean`` (multiply by ``cfg.scaling_factor`` for what the DiT samples).

        H and W must be multiples of f = cfg.upsample_factor (8). ``tile`` (latent pixels) encodes
        overlapping tiles of tile * f pixels independently and blends their results with linear
        ramps over ``overlap`` latent pixels (default tile // 4), as :meth:`decode`; memory then
        depends on the tile, not the image. ``generators``: one ``numpy.random.Generator`` per
        image to return a sample ``mean + exp(logvar / 2) * g.standard_normal(...)`` instead of
        the mean (one draw of the latent's shape from each image's own generator).
        """
        mean, logvar = self.encode_moments(images, tile=tile, overlap=overlap)
        if generators is None:
            return mean
        generators = list(generators)
        if len(generators) != mean.shape[0]:
            raise InputError(f"give one generator per image: {len(generators)} for {mean.shape[0]} images")
        std = np.exp(np.float32(0.5) * logvar)
        noise = np.stack([g.standard_normal(mean.shape[1:], dtype=np.float32) for g in generators])
        return (mean + std * noise).astype(np.float32)

    def _decode_tiled(self, z, tile, overlap):
        """Decode overlapping latent tiles of z (h, w, C) and blend them -> (f*h, f*w, out)."""
        f = self.cfg.upsample_factor
        h, w, _ = z.shape
        stride = tile - overlap

        def starts(n):
            # fewest tiles that overlap by at least `overlap`, spread evenly, the last flush
            # with the edge
            if n <= tile:
                return [0]
            count = 1 + -(-(n - tile) // stride)
            return [round(i * (n - tile) / (count - 1)) for i in range(count)]

        acc = np.zeros((h * f, w * f, self.cfg.out_channels), np.float32)
        wsum = np.zeros((h * f, w * f, 1), np.float32)
        boxes = [(y0, x0, min(tile, h - y0), min(tile, w - x0)) for y0 in starts(h) for x0 in starts(w)]
        layers, trunk = self._layers()
        # every tile through the trunk together (its weights prepared once), then tile by tile;
        # each tile meets the same operations as when decoded alone
        feats = self._run(layers[:trunk], [np.ascontiguousarray(z[y0:y0 + th, x0:x0 + tw])
                                           for y0, x0, th, tw in boxes])
        for i, (y0, x0, th, tw) in enumerate(boxes):
            xs = [feats[i]]
            feats[i] = None
            img = self._run(layers[trunk:], xs)[0]
            wy = _ramp(th * f, overlap * f, y0 > 0, y0 + th < h)
            wx = _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w)
            wgt = (wy[:, None] * wx[None, :])[:, :, None]
            acc[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += img * wgt
            wsum[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += wgt
        return acc / wsum


VAE = VAEDecoder  # the decoder object also encodes when the file holds the encoder


def _tile_starts(n: int, tile: int, overlap: int) -> list:
    """Tile starts along an axis of n: the fewest tiles that overlap by at least ``overlap``,
    spread evenly, the last flush with the edge (as the tiled decode)."""
    if n <= tile:
        return [0]
    count = 1 + -(-(n - tile) // (tile - overlap))
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramp(n: int, width: int, rise: bool, fall: bool) -> np.ndarray:
    """Blend weights float32 (n,): linear ramps of ``width`` pixels at the sides shared with a
    neighbouring tile, 1 elsewhere; strictly positive so every pixel has weight."""
    wgt = np.ones(n, np.float32)
    if width > 0:
        ramp = (np.arange(width, dtype=np.float32) + 0.5) / width
        if rise:
            wgt[:width] = np.minimum(wgt[:width], ramp)
        if fall:
            wgt[n - width:] = np.minimum(wgt[n - width:], ramp[::-1])
    return wgt
