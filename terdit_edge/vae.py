"""The Stable Diffusion VAE decoder (diffusers ``AutoencoderKL`` decoder) without PyTorch.

Latents (B, C_lat, h, w) float32 -> images (B, 3, 8h, 8w) float32 in about [-1, 1].

Layout and arithmetic
---------------------
Activations are kept channels-last, (H, W, C) float32 per image, so that every channel loop is
contiguous and a 1x1 convolution is one matrix product. 3x3 convolutions use Winograd
F(2x2, 3x3) by default: each 4x4 input tile is transformed (B^T d B), the 16 transform-domain
planes are multiplied by the transformed weights (G g G^T) as 16 batched BLAS matrix products, and
the products are transformed back (A^T m A). That is 16 multiplies per 2x2 output block instead of
36, and the products run at BLAS speed. F(4x4, 3x3) (36 multiplies per 4x4 block) and im2col + BLAS
are kept as alternatives (``conv="winograd4"`` / ``"im2col"``) for measurement and as references.
The nearest 2x upsampling that precedes each upsampler convolution is folded into the Winograd
input transform (it reads the low-resolution tensor with halved coordinates), so the 4x larger
upsampled tensor is never stored.

Weights stay as the caller gave them (float16 or float32, possibly memory-mapped); each layer's
weights are converted to float32 / Winograd form just before the layer runs and dropped after,
which keeps the resident memory at one layer's transformed weights plus the activations.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from .errors import FormatError, InputError

__all__ = ["VAEConfig", "expected_vae_tensors", "VAEDecoder", "to_uint8", "CONV_METHODS"]

CONV_METHODS = ("winograd2", "winograd4", "im2col")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    """Shape of an AutoencoderKL decoder (the encoder is never stored).

    ``block_out_channels`` is in the diffusers (encoder) order, e.g. (128, 256, 512, 512); the decoder
    walks it reversed. ``layers_per_block`` + 1 resnets per up block. Decoding computes
    ``decoder(post_quant_conv(z / scaling_factor + shift_factor))``.
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
        for name in ("mid_block_attention", "use_post_quant_conv"):
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
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VAEConfig":
        """Parse and validate a ``vae_config`` string; raise FormatError on anything unexpected."""
        try:
            raw = json.loads(text)
        except (ValueError, TypeError) as e:
            raise FormatError(f"vae_config metadata is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise FormatError(f"vae_config must be a JSON object, found {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise FormatError(f"vae_config has unknown keys {sorted(unknown)}; "
                              "was the file written by a newer terdit-edge?")
        missing = names - set(raw)
        if missing:
            raise FormatError(f"vae_config is missing keys {sorted(missing)}")
        if not isinstance(raw["block_out_channels"], list):
            raise FormatError("vae_config.block_out_channels must be a list of integers, "
                              f"found {raw['block_out_channels']!r}")
        raw["block_out_channels"] = tuple(raw["block_out_channels"])
        return cls(**raw).validate()


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

    Names cover ``post_quant_conv`` and ``decoder.*`` only, without any file prefix. Attention
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
    return t


# --------------------------------------------------------------------------------------------
# Winograd matrices (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015)
# --------------------------------------------------------------------------------------------

def _winograd_matrices(m: int):
    """(B^T, G, A^T) float64 for F(m x m, 3 x 3); alpha = m + 2 is the input tile size."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        # interpolation points 0, +-1, +-2 and infinity
        bt = [[4, 0, -5, 0, 1, 0],
              [0, -4, -4, 1, 1, 0],
              [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0],
              [0, 2, -1, -2, 1, 0],
              [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0],
             [-1 / 6, -1 / 6, -1 / 6],
             [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6],
             [1 / 24, -1 / 12, 1 / 6],
             [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0],
              [0, 1, -1, 2, -2, 0],
              [0, 1, 1, 4, 4, 0],
              [0, 1, -1, 8, -8, 1]]
    else:  # pragma: no cover - guarded by callers
        raise ValueError(m)
    return np.array(bt, np.float64), np.array(g, np.float64), np.array(at, np.float64)


# --------------------------------------------------------------------------------------------
# Numba kernels (channels-last, one image). They are serial and release the GIL: the decoder
# runs them on its own worker threads, one band of rows per call, with BLAS limited to one
# thread, so OpenMP and BLAS thread pools never spin against each other on a small machine.
# --------------------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _winograd_input(x, up, bt, m, row0, nrows, tiles_w, v):  # pragma: no cover - compiled
    """Input transform of tile rows [row0, row0 + nrows) of the zero-padded (pad 1) input.

    x: float32 (h, w, C), read as if upsampled by ``up`` (nearest); bt: float32 (a, a);
    v: float32 (a*a, >= nrows*tiles_w, C) receives B^T d B for each tile, tile index r*tiles_w + tx.
    """
    a = bt.shape[0]
    hv = x.shape[0] * up
    wv = x.shape[1] * up
    c_n = x.shape[2]
    tmp = np.empty((a, a, c_n), np.float32)
    for r in range(nrows):
        y0 = (row0 + r) * m - 1
        for tx in range(tiles_w):
            x0 = tx * m - 1
            t = r * tiles_w + tx
            # tmp[i, j] = sum_k bt[i, k] * d[k, j] (rows first); zeros of bt and padding skipped
            for i in range(a):
                for j in range(a):
                    for c in range(c_n):
                        tmp[i, j, c] = 0.0
                    xx = x0 + j
                    if xx < 0 or xx >= wv:
                        continue
                    for k in range(a):
                        b = bt[i, k]
                        yy = y0 + k
                        if b == 0.0 or yy < 0 or yy >= hv:
                            continue
                        ys = yy // up
                        xs = xx // up
                        for c in range(c_n):
                            tmp[i, j, c] += b * x[ys, xs, c]
            for i in range(a):
                for j in range(a):
                    ij = i * a + j
                    for c in range(c_n):
                        v[ij, t, c] = 0.0
                    for k in range(a):
                        b = bt[j, k]
                        if b == 0.0:
                            continue
                        for c in range(c_n):
                            v[ij, t, c] += tmp[i, k, c] * b


@njit(nogil=True, cache=True)
def _winograd_output(mm, at, bias, m, row0, nrows, tiles_w, out, residual, has_residual):  # pragma: no cover
    """Output transform: out[tile] = A^T M A + bias (+ residual) for tile rows [row0, row0+nrows).

    mm: float32 (a*a, >= nrows*tiles_w, K), tile index r*tiles_w + tx; at: float32 (m, a);
    out, residual: float32 (H, W, K).
    """
    a = at.shape[1]
    h = out.shape[0]
    w = out.shape[1]
    k_n = out.shape[2]
    tmp = np.empty((m, a, k_n), np.float32)
    acc = np.empty(k_n, np.float32)
    for r in range(nrows):
        oy = (row0 + r) * m
        for tx in range(tiles_w):
            t = r * tiles_w + tx
            ox = tx * m
            for i in range(m):
                for j in range(a):
                    for c in range(k_n):
                        tmp[i, j, c] = 0.0
                    for k in range(a):
                        b = at[i, k]
                        if b == 0.0:
                            continue
                        kj = k * a + j
                        for c in range(k_n):
                            tmp[i, j, c] += b * mm[kj, t, c]
            for i in range(m):
                if oy + i >= h:
                    break
                for j in range(m):
                    if ox + j >= w:
                        break
                    for c in range(k_n):
                        acc[c] = bias[c]
                    for k in range(a):
                        b = at[j, k]
                        if b == 0.0:
                            continue
                        for c in range(k_n):
                            acc[c] += tmp[i, k, c] * b
                    if has_residual:
                        for c in range(k_n):
                            out[oy + i, ox + j, c] = acc[c] + residual[oy + i, ox + j, c]
                    else:
                        for c in range(k_n):
                            out[oy + i, ox + j, c] = acc[c]


@njit(nogil=True, cache=True)
def _channel_sums(x, lo, hi, sums):  # pragma: no cover - compiled
    """sums[0, c] += sum x[lo:hi, c]; sums[1, c] += sum x[lo:hi, c]^2 (float64). x: float32 (N, C)."""
    c_n = x.shape[1]
    for p in range(lo, hi):
        for c in range(c_n):
            v = np.float64(x[p, c])
            sums[0, c] += v
            sums[1, c] += v * v


@njit(nogil=True, cache=True)
def _scale_shift(x, lo, hi, scale, shift, silu, out):  # pragma: no cover - compiled
    """out[p] = x[p] * scale + shift (then SiLU) for rows p in [lo, hi). x, out: float32 (N, C)."""
    c_n = x.shape[1]
    one = np.float32(1.0)
    for p in range(lo, hi):
        for c in range(c_n):
            y = x[p, c] * scale[c] + shift[c]
            if silu:
                y = y / (one + np.exp(-y))
            out[p, c] = y


# --------------------------------------------------------------------------------------------
# Layer helpers
# --------------------------------------------------------------------------------------------

def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _splits(n: int, parts: int) -> list:
    """[lo, hi) ranges cutting range(n) into at most ``parts`` nearly equal non-empty pieces."""
    parts = max(1, min(parts, n))
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


class _Workers:
    """Runs a function over row ranges on ``n`` threads (the caller's thread included)."""

    def __init__(self, n: int):
        self.n = n
        self._pool = ThreadPoolExecutor(max_workers=n - 1) if n > 1 else None

    def run(self, fn, ranges) -> list:
        """Call fn(lo, hi) for each (lo, hi) in ranges, in parallel; return the results in order."""
        if self._pool is None or len(ranges) == 1:
            return [fn(lo, hi) for lo, hi in ranges]
        futures = [self._pool.submit(fn, lo, hi) for lo, hi in ranges[1:]]
        first = fn(*ranges[0])
        return [first] + [f.result() for f in futures]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


_SERIAL = _Workers(1)


def _winograd_weights(weight: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(K, C, 3, 3) float16/32 -> float32 (a*a, C, K): U = G g G^T per (k, c), ready for V @ U."""
    k_n, c_n = weight.shape[:2]
    a = g.shape[0]
    w9 = np.ascontiguousarray(weight.transpose(2, 3, 1, 0), dtype=np.float32).reshape(9, c_n * k_n)
    gg = np.kron(g, g).astype(np.float32)  # (a*a, 9): row (i, j) holds G[i, r] G[j, s]
    return (gg @ w9).reshape(a * a, c_n, k_n)


# Largest transform-domain band (V or M) one worker holds, in bytes: big enough for BLAS to run
# at full speed, small enough to stay near the caches and keep the peak memory low.
_BAND_BYTES = 4 << 20
_WINOGRAD = {m: tuple(mat.astype(np.float32) for mat in _winograd_matrices(m)) for m in (2, 4)}


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, up: int = 1,
            residual: np.ndarray | None = None, method: str = "winograd2",
            workers: _Workers = _SERIAL) -> np.ndarray:
    """3x3 convolution, stride 1, zero padding 1, of channels-last ``x`` optionally upsampled first.

    x: float32 (h, w, C) contiguous; weight: (K, C, 3, 3) float16/float32; bias: (K,); up: nearest
    upsampling factor applied to x before the convolution (1 or 2); residual: float32
    (h*up, w*up, K) added to the result. Returns float32 (h*up, w*up, K).
    """
    h, w, c_n = x.shape
    k_n = weight.shape[0]
    hh, ww = h * up, w * up
    bias32 = _f32(bias)
    if method == "im2col":
        xu = x if up == 1 else np.repeat(np.repeat(x, up, axis=0), up, axis=1)
        pad = np.zeros((hh + 2, ww + 2, c_n), np.float32)
        pad[1:-1, 1:-1] = xu
        cols = np.empty((hh, ww, 3, 3, c_n), np.float32)
        for r in range(3):
            for s in range(3):
                cols[:, :, r, s] = pad[r:r + hh, s:s + ww]
        wmat = np.ascontiguousarray(weight.transpose(2, 3, 1, 0), dtype=np.float32).reshape(9 * c_n, k_n)
        out = np.empty((hh * ww, k_n), np.float32)
        cols2 = cols.reshape(hh * ww, 9 * c_n)

        def rows(lo, hi):
            np.matmul(cols2[lo:hi], wmat, out=out[lo:hi])

        workers.run(rows, _splits(hh * ww, workers.n))
        out = out.reshape(hh, ww, k_n)
        out += bias32
        if residual is not None:
            out += residual
        return out
    m = 2 if method == "winograd2" else 4
    bt, g, at = _WINOGRAD[m]
    a = m + 2
    u = _winograd_weights(weight, g)
    tiles_h = -(-hh // m)
    tiles_w = -(-ww // m)
    out = np.empty((hh, ww, k_n), np.float32)
    has_res = residual is not None
    res = residual if has_res else out
    band_rows = max(1, _BAND_BYTES // (a * a * tiles_w * max(c_n, k_n) * 4))

    def tile_rows(lo, hi):
        # one worker's share of tile rows, in bands that keep V and M small
        rows = min(band_rows, hi - lo)
        v = np.empty((a * a, rows * tiles_w, c_n), np.float32)
        mm = np.empty((a * a, rows * tiles_w, k_n), np.float32)
        for row0 in range(lo, hi, rows):
            nrows = min(rows, hi - row0)
            p = nrows * tiles_w
            _winograd_input(x, up, bt, m, row0, nrows, tiles_w, v)
            np.matmul(v[:, :p], u, out=mm[:, :p])
            _winograd_output(mm, at, bias32, m, row0, nrows, tiles_w, out, res, has_res)

    # more pieces than workers only when there are many rows: evens out uneven thread speeds
    parts = workers.n if tiles_h < 8 * workers.n else 2 * workers.n
    workers.run(tile_rows, _splits(tiles_h, parts))
    return out


def conv1x1(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, workers: _Workers = _SERIAL) -> np.ndarray:
    """1x1 convolution of channels-last float32 (h, w, C) with weight (K, C, 1, 1) -> (h, w, K)."""
    h, w, c_n = x.shape
    k_n = weight.shape[0]
    return linear(x.reshape(h * w, c_n), weight.reshape(k_n, c_n), bias, workers).reshape(h, w, k_n)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, workers: _Workers = _SERIAL) -> np.ndarray:
    """x float32 (N, C) @ weight (K, C)^T + bias (K,) -> float32 (N, K), rows split over workers."""
    wmat = _f32(weight).T
    b = _f32(bias)
    out = np.empty((x.shape[0], wmat.shape[1]), np.float32)

    def rows(lo, hi):
        np.matmul(x[lo:hi], wmat, out=out[lo:hi])
        out[lo:hi] += b

    workers.run(rows, _splits(x.shape[0], workers.n))
    return out


def group_norm(x: np.ndarray, gamma, beta, groups: int, eps: float, silu: bool,
               out: np.ndarray | None = None, workers: _Workers = _SERIAL) -> np.ndarray:
    """GroupNorm (+ SiLU) of channels-last float32 (h, w, C) -> float32 (h, w, C); out may be x.

    Per-channel sums and squares are accumulated in float64, so the one-pass variance keeps
    float32 accuracy even for activations with a large mean.
    """
    if out is None:
        out = np.empty_like(x)
    c_n = x.shape[-1]
    x2 = x.reshape(-1, c_n)
    o2 = out.reshape(-1, c_n)
    ranges = _splits(x2.shape[0], workers.n)

    def sums(lo, hi):
        s = np.zeros((2, c_n), np.float64)
        _channel_sums(x2, lo, hi, s)
        return s

    total = sum(workers.run(sums, ranges))
    count = x2.shape[0] * (c_n // groups)
    per_group = total.reshape(2, groups, c_n // groups).sum(axis=2) / count
    mean = per_group[0]
    var = np.maximum(per_group[1] - mean * mean, 0.0)
    inv = 1.0 / np.sqrt(var + eps)
    scale64 = np.repeat(inv, c_n // groups) * np.asarray(gamma, np.float64)
    shift64 = np.asarray(beta, np.float64) - np.repeat(mean, c_n // groups) * scale64
    scale, shift = scale64.astype(np.float32), shift64.astype(np.float32)
    workers.run(lambda lo, hi: _scale_shift(x2, lo, hi, scale, shift, silu, o2), ranges)
    return out


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------

class VAEDecoder:
    """AutoencoderKL decoder on NumPy + BLAS + Numba.

    cfg: the decoder shape; tensors: name -> array for every name of ``expected_vae_tensors(cfg)``
    (float16 or float32, may be read-only memory maps; they are never copied as a whole: each
    layer's weights are converted when the layer runs); threads: worker threads (None: the CPUs
    this process may use); conv: one of CONV_METHODS (Winograd F(2x2,3x3) by default).
    """

    def __init__(self, cfg: VAEConfig, tensors: Mapping[str, np.ndarray], threads: int | None = None,
                 conv: str = "winograd2"):
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
    def _conv3(self, x, name, up=1, residual=None):
        return conv3x3(x, self.tensors[name + ".weight"], self.tensors[name + ".bias"], up=up,
                       residual=residual, method=self.conv, workers=self._workers)

    def _norm(self, x, name, silu, out=None):
        return group_norm(x, self.tensors[name + ".weight"], self.tensors[name + ".bias"],
                          self.cfg.norm_num_groups, self.cfg.norm_eps, silu, out, self._workers)

    def _resnet(self, x, prefix):
        h = self._norm(x, prefix + "norm1", True)
        h = self._conv3(h, prefix + "conv1")
        self._norm(h, prefix + "norm2", True, out=h)
        if prefix + "conv_shortcut.weight" in self.tensors:
            shortcut = conv1x1(x, self.tensors[prefix + "conv_shortcut.weight"],
                               self.tensors[prefix + "conv_shortcut.bias"], self._workers)
        else:
            shortcut = x
        del x
        return self._conv3(h, prefix + "conv2", residual=shortcut)

    def _attention(self, x, prefix):
        """Single-head self-attention over the h*w positions with GroupNorm first and a residual."""
        hgt, wid, c_n = x.shape
        t, workers = self.tensors, self._workers
        h = self._norm(x, prefix + "group_norm", False).reshape(hgt * wid, c_n)

        def proj(inp, name):
            return linear(inp, t[prefix + name + ".weight"], t[prefix + name + ".bias"], workers)

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

        workers.run(queries, _splits(q.shape[0], workers.n))
        del q, k, v
        out = proj(o, "to_out.0")
        out += x.reshape(hgt * wid, c_n)
        return out.reshape(hgt, wid, c_n)

    def _decode_one(self, z):
        """z: float32 (h, w, C_lat), already unscaled -> float32 (8h, 8w, out_channels)."""
        cfg, t = self.cfg, self.tensors
        if cfg.use_post_quant_conv:
            z = conv1x1(z, t["post_quant_conv.weight"], t["post_quant_conv.bias"])
        x = self._conv3(np.ascontiguousarray(z), "decoder.conv_in")
        x = self._resnet(x, "decoder.mid_block.resnets.0.")
        if cfg.mid_block_attention:
            x = self._attention(x, "decoder.mid_block.attentions.0.")
        x = self._resnet(x, "decoder.mid_block.resnets.1.")
        n_up = len(cfg.block_out_channels)
        for i in range(n_up):
            for j in range(cfg.layers_per_block + 1):
                x = self._resnet(x, f"decoder.up_blocks.{i}.resnets.{j}.")
            if i < n_up - 1:
                x = self._conv3(x, f"decoder.up_blocks.{i}.upsamplers.0.conv", up=2)
        self._norm(x, "decoder.conv_norm_out", True, out=x)
        return self._conv3(x, "decoder.conv_out")

    # -- public ----------------------------------------------------------------------------------
    def decode(self, latents: np.ndarray, tile: int | None = None, overlap: int = 8) -> np.ndarray:
        """Decode latents float32 (B, C_lat, h, w) -> images float32 (B, out_channels, f*h, f*w).

        f = cfg.upsample_factor (8). The latents are divided by ``scaling_factor`` (and shifted by
        ``shift_factor``) here. Output is not clamped (as diffusers). ``tile`` (latent pixels)
        decodes overlapping tiles of that size independently and blends them with linear ramps
        over ``overlap`` latent pixels: memory then depends on the tile, not the image.
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
        if tile is not None:
            if type(tile) is not int or tile < 2:
                raise InputError(f"tile must be an integer >= 2 or None, found {tile!r}")
            if type(overlap) is not int or not (0 <= overlap < tile):
                raise InputError(f"overlap must be an integer in [0, tile), found {overlap!r}")
        z = z.astype(np.float32) / np.float32(cfg.scaling_factor) + np.float32(cfg.shift_factor)
        z = np.ascontiguousarray(z.transpose(0, 2, 3, 1))  # channels-last
        # Parallelism comes from the decoder's own workers, each running single-threaded BLAS on
        # its band: nested BLAS threads would only oversubscribe the cores.
        with threadpool_limits(limits=1, user_api="blas"):
            outs = [self._decode_tiled(zi, tile, overlap) if tile is not None
                    and (zi.shape[0] > tile or zi.shape[1] > tile) else self._decode_one(zi)
                    for zi in z]
        return np.stack([o.transpose(2, 0, 1) for o in outs])

    def _decode_tiled(self, z, tile, overlap):
        """Decode overlapping latent tiles of z (h, w, C) and blend them -> (f*h, f*w, out)."""
        f = self.cfg.upsample_factor
        h, w, _ = z.shape
        stride = tile - overlap

        def starts(n):
            if n <= tile:
                return [0]
            s = list(range(0, n - tile, stride))
            return s + [n - tile]  # last tile flush with the edge

        acc = np.zeros((h * f, w * f, self.cfg.out_channels), np.float32)
        wsum = np.zeros((h * f, w * f, 1), np.float32)
        for y0 in starts(h):
            for x0 in starts(w):
                th, tw = min(tile, h - y0), min(tile, w - x0)
                img = self._decode_one(np.ascontiguousarray(z[y0:y0 + th, x0:x0 + tw]))
                wy = _ramp(th * f, overlap * f, y0 > 0, y0 + th < h)
                wx = _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w)
                wgt = (wy[:, None] * wx[None, :])[:, :, None]
                acc[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += img * wgt
                wsum[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += wgt
        return acc / wsum


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


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3): clamp((x+1)/2, 0, 1) * 255 + 0.5, truncated."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise InputError(f"images must have shape (B, C, H, W), found {x.shape}")
    x = np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0 + 0.5
    return x.astype(np.uint8).transpose(0, 2, 3, 1).copy()
