"""Convolution kernels of the SD-VAE decoder: Winograd F(2x2, 3x3) / F(4x4, 3x3) and im2col on
BLAS with Numba transforms, 1x1 convolutions, GroupNorm, and the small thread pool they run on.

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
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

__all__ = ["CONV_METHODS", "choose_conv_method", "prepare_conv3x3", "conv3x3", "conv1x1", "group_norm",
           "linear"]

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


def prepare_conv3x3(weight: np.ndarray, method: str, workers: _Workers = _SERIAL) -> np.ndarray:
    """The float32 form of a 3x3 weight (K, C, 3, 3) that :func:`conv3x3` multiplies with for
    ``method`` ("winograd2", "winograd4" or "im2col", not "auto"): (a*a, C, K) Winograd planes
    (a view of a (a*a, K, C) array) or the (9*C, K) im2col matrix. Preparing once and passing it
    to every call with the same weight (the tiles of a tiled decode) gives the same bits as
    preparing per call."""
    if method == "im2col":
        k_n, c_n = weight.shape[:2]
        return np.ascontiguousarray(weight.transpose(2, 3, 1, 0), dtype=np.float32).reshape(9 * c_n, k_n)
    if method not in ("winograd2", "winograd4"):
        raise ValueError(f"method must be winograd2, winograd4 or im2col, found {method!r}")
    return _winograd_weights(weight, _WINOGRAD[2 if method == "winograd2" else 4][1], workers).transpose(0, 2, 1)


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, up: int = 1,
            residual: np.ndarray | None = None, method: str = "winograd2",
            workers: _Workers = _SERIAL, prepared: np.ndarray | None = None) -> np.ndarray:
    """3x3 convolution, stride 1, zero padding 1, of channels-last ``x`` optionally upsampled first.

    x: float32 (h, w, C) contiguous; weight: (K, C, 3, 3) float16/float32; bias: (K,); up: nearest
    upsampling factor applied to x before the convolution (1 or 2); residual: float32
    (h*up, w*up, K) added to the result; prepared: ``prepare_conv3x3(weight, method)`` made
    earlier (method must then not be "auto"), else prepared here. Returns float32 (h*up, w*up, K).
    """
    h, w, c_n = x.shape
    k_n = weight.shape[0]
    hh, ww = h * up, w * up
    bias32 = _f32(bias)
    if method == "auto":
        if prepared is not None:
            raise ValueError("prepared weights need a concrete method, not 'auto'")
        method = choose_conv_method(hh * ww)
    if prepared is None:
        prepared = prepare_conv3x3(weight, method, workers)
    if method == "im2col":
        xu = x if up == 1 else np.repeat(np.repeat(x, up, axis=0), up, axis=1)
        pad = np.zeros((hh + 2, ww + 2, c_n), np.float32)
        pad[1:-1, 1:-1] = xu
        cols = np.empty((hh, ww, 3, 3, c_n), np.float32)
        for r in range(3):
            for s in range(3):
                cols[:, :, r, s] = pad[r:r + hh, s:s + ww]
        wmat = prepared
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
    bt, _, at = _WINOGRAD[m]
    a = m + 2
    u_t = prepared  # (a*a, C, K) view
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




def conv3x3_down2(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, workers: _Workers = _SERIAL,
                  prepared: np.ndarray | None = None) -> np.ndarray:
    """3x3 convolution with stride 2 as diffusers' ``Downsample2D(padding=0)`` (the SD-VAE encoder's
    downsamplers): one zero row and column appended after the bottom and right edges, none before.

    x: float32 (h, w, C) contiguous, h, w >= 2; weight (K, C, 3, 3) float16/float32; bias (K,);
    prepared: ``prepare_conv3x3(weight, "im2col")``, else made here. Returns float32
    (h // 2, w // 2, K) ((h - 2) // 2 + 1 rows). Output rows are cut into bands; each band gathers its
    9 * C columns (im2col) into a per-thread buffer and multiplies with BLAS.
    """
    h, w, c_n = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"the stride-2 convolution needs at least 2 x 2 pixels, found {h} x {w}")
    k_n = weight.shape[0]
    ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1
    wmat = prepare_conv3x3(weight, "im2col") if prepared is None else prepared
    bias32 = _f32(bias)
    out = np.empty((ho, wo, k_n), np.float32)
    band = max(1, _BAND_BYTES // (wo * 9 * c_n * 4))
    band = min(band, -(-ho // workers.n))

    def rows(lo, hi):
        for r0 in range(lo, hi, band):
            r1 = min(r0 + band, hi)
            n = r1 - r0
            # the input rows 2*r0 .. 2*r1 (the last one may be the zero padding row)
            buf = _scratch("down2_in", (2 * n + 1, w + 1, c_n))
            top = 2 * r0
            avail = min(2 * n + 1, h - top)
            buf[:avail, :w] = x[top:top + avail]
            buf[avail:] = 0.0
            buf[:, w] = 0.0
            cols = _scratch("down2_cols", (n, wo, 3, 3, c_n))
            for r in range(3):
                for s in range(3):
                    cols[:, :, r, s] = buf[r:r + 2 * n - 1:2, s:s + 2 * wo - 1:2]
            dst = out[r0:r1].reshape(n * wo, k_n)
            np.matmul(cols.reshape(n * wo, 9 * c_n), wmat, out=dst)
            dst += bias32

    workers.run(rows, [(r, min(r + band, ho)) for r in range(0, ho, band)] if workers.n > 1 else [(0, ho)])
    return out
