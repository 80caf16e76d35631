"""The Stable Diffusion VAE decoder (diffusers ``AutoencoderKL`` decoder) without PyTorch.

Latents (B, C_lat, h, w) float32 -> images (B, 3, 8h, 8w) float32 in about [-1, 1].

Layout and arithmetic
---------------------
Activations are kept channels-last, (H, W, C) float32 per image, so that every channel loop is
contiguous and a 1x1 convolution is one matrix product. 3x3 convolutions use Winograd's minimal
filtering (Lavin & Gray 2015): each input tile is transformed (B^T d B), the transform-domain
planes are multiplied by the transformed weights (G g G^T) as a batch of BLAS matrix products,
and the products are transformed back (A^T m A). F(4x4, 3x3) needs 36 multiplies per 4x4 output
block where a direct convolution needs 144 (F(2x2, 3x3): 16 per 2x2 block, 2.25x fewer), and the
multiplies run at BLAS speed. im2col + BLAS is kept too; ``conv="auto"`` picks per layer (small
images favour the methods with less per-call weight preparation). The nearest 2x upsampling
before each upsampler convolution is folded into the Winograd input transform (it reads the
low-resolution tensor with halved coordinates), so the 4x larger upsampled tensor is never stored.

Threads: the decoder owns a small pool; each worker takes a band of tile rows (transform, BLAS
matmul, inverse transform) with BLAS itself limited to one thread, so no two thread pools spin
against each other (OpenMP-parallel Numba next to threaded OpenBLAS was 20x slower on 2 cores).

Weights stay as the caller gave them (float16 or float32, possibly memory-mapped); each layer's
weights are converted to float32 / Winograd form just before the layer runs and dropped after,
which keeps the resident memory at one layer's transformed weights plus the activations.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from .errors import FormatError, InputError

__all__ = ["VAEConfig", "expected_vae_tensors", "VAEDecoder", "to_uint8", "CONV_METHODS", "choose_conv_method",
           "conv3x3", "conv1x1", "group_norm", "linear"]

CONV_METHODS = ("auto", "winograd2", "winograd4", "im2col")


def choose_conv_method(out_pixels: int) -> str:
    """The 3x3 method "auto" uses for an output of ``out_pixels`` (h*w) pixels.

    Per-call weight preparation (G g G^T: 16 or 36 planes of K x C) does not shrink with the
    image, so small images favour F(2x2, 3x3), which has less of it; measured with
    benchmarks/bench_vae.py (one convolution per resolution, 2 AVX2 cores).
    """
    if out_pixels <= 32 * 32:
        return "winograd2"
    return "winograd4"


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
def _winograd_weight_transform(w, g, k0, u):  # pragma: no cover - compiled
    """u[i*a + j, k0 + kk, :] = sum_rs g[i, r] w[kk, 3r + s, :] g[j, s] for each kk of w.

    w: float32 (nk, 9, C) (kernel taps first, channels contiguous); g: float32 (a, 3);
    u: float32 (a*a, K, C).
    """
    a = g.shape[0]
    c_n = w.shape[2]
    tmp = np.empty((a, 3, c_n), np.float32)
    for kk in range(w.shape[0]):
        for i in range(a):
            for s in range(3):
                for c in range(c_n):
                    tmp[i, s, c] = g[i, 0] * w[kk, s, c] + g[i, 1] * w[kk, 3 + s, c] + g[i, 2] * w[kk, 6 + s, c]
        for i in range(a):
            for j in range(a):
                g0 = g[j, 0]
                g1 = g[j, 1]
                g2 = g[j, 2]
                for c in range(c_n):
                    u[i * a + j, k0 + kk, c] = tmp[i, 0, c] * g0 + tmp[i, 1, c] * g1 + tmp[i, 2, c] * g2


@njit(nogil=True, cache=True)
def _channel_sums(x, lo, hi, sums):  # pragma: no cover - compiled
    """sums[0, c] += sum x[lo:hi, c]; sums[1, c] += sum x[lo:hi, c]^2 (float64). x: float32 (N, C)."""
    c_n = x.shape[1]
    for p in range(lo, hi):
        for c in range(c_n):
            v = np.float64(x[p, c])
            sums[0, c] += v
            sums[1, c] += v * v


@njit(nogil=True, cache=True, error_model="numpy")
def _scale_shift(x, lo, hi, scale, shift, silu, out):  # pragma: no cover - compiled
    """out[p] = x[p] * scale + shift, then SiLU if ``silu``, for rows p in [lo, hi).

    x, out: float32 (N, C) (out may be x). SiLU y / (1 + exp(-y)) uses its own exp so that the
    loops vectorise (a libm call per element does not): exp(t) = 2^n exp(r), |r| <= ln2 / 2,
    exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n assembled from its
    float32 exponent bits.
    """
    c_n = x.shape[1]
    y = np.empty(c_n, np.float32)
    poly = np.empty(c_n, np.float32)
    bits = np.empty(c_n, np.int32)
    pow2 = bits.view(np.float32)
    log2e = np.float32(1.4426950408889634)
    ln2_hi = np.float32(0.693359375)  # ln 2 split so that n * ln2_hi is exact in float32
    ln2_lo = np.float32(-2.12194440e-4)
    one = np.float32(1.0)
    for p in range(lo, hi):
        if not silu:
            for c in range(c_n):
                out[p, c] = x[p, c] * scale[c] + shift[c]
            continue
        for c in range(c_n):
            v = x[p, c] * scale[c] + shift[c]
            y[c] = v
            t = min(max(-v, np.float32(-87.0)), np.float32(88.0))  # keeps 2^n a normal float
            n = np.floor(t * log2e + np.float32(0.5))
            r = (t - n * ln2_hi) - n * ln2_lo
            poly[c] = one + r * (one + r * (np.float32(1 / 2) + r * (np.float32(1 / 6) + r * (
                np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720))))))
            bits[c] = np.int32(n) + 127
        for c in range(c_n):
            bits[c] = bits[c] << 23
        # local buffers only: the division loop vectorises (out may alias x)
        for c in range(c_n):
            poly[c] = y[c] / (one + poly[c] * pow2[c])
        for c in range(c_n):
            out[p, c] = poly[c]


# --------------------------------------------------------------------------------------------
# Layer helpers
# --------------------------------------------------------------------------------------------

def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _pieces(n: int, workers: "_Workers") -> list:
    """Row ranges for ``workers``: a few per thread so that a slowed thread can hand work off."""
    return _splits(n, 1 if workers.n == 1 else 4 * workers.n)


def _splits(n: int, parts: int) -> list:
    """[lo, hi) ranges cutting range(n) into at most ``parts`` nearly equal non-empty pieces."""
    parts = max(1, min(parts, n))
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


class _Workers:
    """Runs a function over row ranges on ``n`` threads (the caller's thread included).

    Ranges are handed out one at a time to whichever thread is free, so on a shared machine a
    thread that gets less CPU simply takes fewer ranges.
    """

    def __init__(self, n: int):
        self.n = n
        self._pool = ThreadPoolExecutor(max_workers=n - 1) if n > 1 else None

    def run(self, fn, ranges) -> list:
        """Call fn(lo, hi) for each (lo, hi) in ranges, in parallel; return the results in order."""
        if self._pool is None or len(ranges) == 1:
            return [fn(lo, hi) for lo, hi in ranges]
        results = [None] * len(ranges)
        order = iter(range(len(ranges)))
        lock = threading.Lock()

        def drain():
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                results[i] = fn(*ranges[i])

        helpers = [self._pool.submit(drain) for _ in range(min(self.n, len(ranges)) - 1)]
        drain()
        for h in helpers:
            h.result()  # re-raises a worker's exception
        return results

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple) -> np.ndarray:
    """A float32 array of ``shape`` owned by the calling thread, reused across calls (no fresh
    pages to fault in for every band). Contents are undefined."""
    size = int(np.prod(shape))
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.size < size:
        buf = buffers[slot] = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


_SERIAL = _Workers(1)


def _winograd_weights(weight: np.ndarray, g: np.ndarray, workers: "_Workers" = None) -> np.ndarray:
    """(K, C, 3, 3) float16/32 -> float32 (a*a, K, C): U = G g G^T per (k, c).

    The (K, C) planes are used transposed (V @ U[i].T): BLAS takes the transpose for free.
    """
    k_n, c_n = weight.shape[:2]
    a = g.shape[0]
    u = np.empty((a * a, k_n, c_n), np.float32)
    w = weight.reshape(k_n, c_n, 9)

    def rows(lo, hi):
        # (k, 9, C) float32 block: channel loops in the kernel are then contiguous
        for k0 in range(lo, hi, 32):
            k1 = min(k0 + 32, hi)
            block = np.ascontiguousarray(w[k0:k1].transpose(0, 2, 1), dtype=np.float32)
            _winograd_weight_transform(block, g, k0, u)

    workers = workers or _SERIAL
    workers.run(rows, _pieces(k_n, workers))
    return u


# Largest transform-domain band (V or M) one worker holds, in bytes: big enough for BLAS to run
# at full speed, small enough to stay near the caches and keep the peak memory low.
_BAND_BYTES = 8 << 20
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
    if method == "auto":
        method = choose_conv_method(hh * ww)
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

        workers.run(rows, _pieces(hh * ww, workers))
        out = out.reshape(hh, ww, k_n)
        out += bias32
        if residual is not None:
            out += residual
        return out
    m = 2 if method == "winograd2" else 4
    bt, g, at = _WINOGRAD[m]
    a = m + 2
    u_t = _winograd_weights(weight, g, workers).transpose(0, 2, 1)  # (a*a, C, K) view
    tiles_h = -(-hh // m)
    tiles_w = -(-ww // m)
    out = np.empty((hh, ww, k_n), np.float32)
    has_res = residual is not None
    res = residual if has_res else out
    band_rows = max(1, _BAND_BYTES // (a * a * tiles_w * max(c_n, k_n) * 4))
    band_rows = min(band_rows, -(-tiles_h // workers.n))  # at least one band per thread

    def tile_rows(lo, hi):
        # one worker's share of tile rows, in bands that keep V and M small
        rows = min(band_rows, hi - lo)
        v = _scratch("winograd_v", (a * a, rows * tiles_w, c_n))
        mm = _scratch("winograd_m", (a * a, rows * tiles_w, k_n))
        for row0 in range(lo, hi, rows):
            nrows = min(rows, hi - row0)
            p = nrows * tiles_w
            _winograd_input(x, up, bt, m, row0, nrows, tiles_w, v)
            np.matmul(v[:, :p], u_t, out=mm[:, :p])
            _winograd_output(mm, at, bias32, m, row0, nrows, tiles_w, out, res, has_res)

    # one band per piece: free threads pick up the next band (see _Workers)
    workers.run(tile_rows, [(r, min(r + band_rows, tiles_h)) for r in range(0, tiles_h, band_rows)]
                if workers.n > 1 else [(0, tiles_h)])
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

    workers.run(rows, _pieces(x.shape[0], workers))
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
    ranges = _pieces(x2.shape[0], workers)

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

        workers.run(queries, _pieces(q.shape[0], workers))
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
    def decode(self, latents: np.ndarray, tile: int | None = None, overlap: int | None = None) -> np.ndarray:
        """Decode latents float32 (B, C_lat, h, w) -> images float32 (B, out_channels, f*h, f*w).

        f = cfg.upsample_factor (8). The latents are divided by ``scaling_factor`` (and shifted by
        ``shift_factor``) here. Output is not clamped (as diffusers). ``tile`` (latent pixels)
        decodes overlapping tiles of that size independently and blends them with linear ramps
        over ``overlap`` latent pixels (default tile // 4, i.e. 8 for tile 32): memory then depends
        on the tile, not the image.
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
            if overlap is None:
                overlap = tile // 4
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
            # fewest tiles that overlap by at least `overlap`, spread evenly, the last flush
            # with the edge
            if n <= tile:
                return [0]
            count = 1 + -(-(n - tile) // stride)
            return [round(i * (n - tile) / (count - 1)) for i in range(count)]

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
