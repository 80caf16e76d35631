"""Numba CUDA kernels for the ternary DiT forward, and the launchers that size their grids.

Every launcher takes and returns device arrays (C-contiguous; float32 unless a docstring says
otherwise) and launches on the default stream, so consecutive launches run in order without a
host synchronisation; only a copy back to the host waits.

Ternary weights stay in the tdit2-k128 layout of :mod:`terdit_edge.packing`, read as little-endian
uint32 words: a row of N_pad / 4 bytes becomes N_pad / 16 words, 8 words per 128-wide block.
Byte j of a block holds the codes of k = j, j + 32, j + 64, j + 96 in bit pairs 0, 2, 4, 6, so word w
(bytes 4w..4w+3) shifted right by 2q and masked with 0x03030303 gives the codes of the four
CONSECUTIVE k = 32q + 4w .. 32q + 4w + 3, one per byte: exactly the operand of a 4-way int8 dot
product (dp4a) against a word of four consecutive int8 activations.

The int8 path uses sum_k xq_k * (code_k - 1) = sum_k xq_k * code_k - sum_k xq_k: the dot product runs
on the unsigned codes (dp4a.s32.u32) and the row sum of xq, computed once by the quantizer, is
subtracted at the end. Padding weights have code 1 and padding activations are 0, so padding adds 0.

Under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the same Python functions run on the CPU, one
Python thread per CUDA thread, and its cost grows with threads x barriers. So there the launch
shapes shrink (8 x 8 GEMM threads with one output each instead of 16 x 16 with a 4 x 4 register tile;
at most 8 threads per row kernel; 8 x 8 dense tiles) and dp4a becomes a byte-by-byte Python dot
product. The simulator reads these module constants at run time, so a test may set the GPU values
back (THREADS_X = THREADS_Y = 16, ROWS_PER_THREAD = COLS_PER_THREAD = 4) to check the GPU tiling.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32, int64, uint32
from numba.core import config as _numba_config

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

BLOCK_K = 128                 # the packing block (terdit_edge.packing.BLOCK_K)
WORDS_PER_BLOCK = 8           # uint32 weight words per 128-wide block of one row
XWORDS_PER_BLOCK = 32         # uint32 words of int8 activations per 128-wide block
ZERO_WORD = 0x55555555        # sixteen codes of 1, i.e. sixteen zero weights
LANE_MASK = 0x03030303        # the low bit pair of each byte

# GEMM tiling: a THREADS_Y x THREADS_X block; each thread owns ROWS_PER_THREAD x COLS_PER_THREAD
# outputs, rows ty + THREADS_Y * i and columns tx + THREADS_X * j (so a warp's stores are contiguous).
THREADS_Y = 8 if SIMULATOR else 16
THREADS_X = 8 if SIMULATOR else 16
ROWS_PER_THREAD = 1 if SIMULATOR else 4
COLS_PER_THREAD = 1 if SIMULATOR else 4
# Shared-memory tiles are sized for the largest tiling; the kernels use the top-left part.
_MAX_TILE = 64
_WS_STRIDE = WORDS_PER_BLOCK + 1      # +1 word: columns of a warp fall in different banks
_XS_STRIDE = XWORDS_PER_BLOCK + 1

# Row kernels (norms, quantisation, attention) use one block per row of a power-of-two number of
# threads between ROW_THREADS_MIN and ROW_THREADS_MAX, near the row width; MAX_ROW_THREADS sizes their
# reduction scratch. The simulator gets fewer threads: its cost grows with threads x barriers.
MAX_ROW_THREADS = 256
ROW_THREADS_MIN = 4 if SIMULATOR else 32
ROW_THREADS_MAX = 8 if SIMULATOR else MAX_ROW_THREADS
ELEMENTWISE_THREADS = 64 if SIMULATOR else 256
DENSE_TILE = 8 if SIMULATOR else 16
_MAX_DENSE_TILE = 16
_DENSE_STRIDE = _MAX_DENSE_TILE + 1  # +1: a column walk touches different banks

NEG_BIG = -3.0e38  # the running maximum's start: below any float32 score, finite for fast-math safety


# --- small device helpers ----------------------------------------------------------------------------
@cuda.jit(device=True)
def _block_sum_f32(red, value):
    """Sum of `value` over the block (blockDim.x a power of two); every thread gets the total."""
    tid = cuda.threadIdx.x
    red[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            red[tid] += red[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = red[0]
    cuda.syncthreads()  # red is reused by the next reduction
    return total


@cuda.jit(device=True)
def _block_max_f32(red, value):
    """Maximum of `value` over the block (blockDim.x a power of two)."""
    tid = cuda.threadIdx.x
    red[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            other = red[tid + stride]
            if other > red[tid]:
                red[tid] = other
        cuda.syncthreads()
        stride //= 2
    total = red[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _block_sum_i32(red, value):
    """Integer sum of `value` over the block (blockDim.x a power of two)."""
    tid = cuda.threadIdx.x
    red[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            red[tid] += red[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = red[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _rint_clip127(v):
    """round-half-to-even(v) clipped to [-127, 127], as np.clip(np.rint(v), -127, 127)."""
    f = math.floor(v)
    d = v - f
    if d > 0.5 or (d == 0.5 and f % 2 != 0):
        f += 1
    if f > 127:
        f = 127
    if f < -127:
        f = -127
    return int32(f)


@cuda.jit(device=True)
def _silu(v):
    return v / (float32(1) + math.exp(-v))


def _dot4_software(xword, codes, acc):
    """acc + sum over the 4 bytes of int8(xword byte) * uint8(codes byte): dp4a.s32.u32 in Python.

    A plain function, not a device function: the simulator calls it directly, which is several
    times cheaper than its emulated device-function call.
    """
    total = int(acc)
    xword = int(xword)
    codes = int(codes)
    for b in range(4):
        xb = (xword >> (8 * b)) & 255
        total += (xb - 256 if xb > 127 else xb) * ((codes >> (8 * b)) & 255)
    return total


def _mul_python(a, b):
    return a * b


if SIMULATOR:
    dot4 = _dot4_software
    mul_rn = _mul_python  # the simulator's libdevice functions are stubs
else:  # pragma: no cover - needs the real CUDA target (GPU or NVVM for compile_ptx)
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    # A float32 product rounded on its own, never fused into a following add (the compiler may
    # otherwise form an FMA): where the int8 path must equal the reference bit for bit.
    mul_rn = libdevice.fmul_rn

    @intrinsic
    def _dp4a_s32_u32(typingctx, a, b, c):
        """PTX dp4a.s32.u32 (sm_61+): c + dot(signed bytes of a, unsigned bytes of b)."""
        sig = types.int32(types.uint32, types.uint32, types.int32)

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "dp4a.s32.u32 $0, $1, $2, $3;",
                               "=r,r,r,r")
            return builder.call(asm, args)

        return sig, codegen

    @cuda.jit(device=True)
    def dot4(xword, codes, acc):
        return _dp4a_s32_u32(uint32(xword), uint32(codes), int32(acc))


# --- ternary GEMM ------------------------------------------------------------------------------------
@cuda.jit
def ternary_gemm_f32_kernel(x, wq, alpha, bias, has_bias, y):
    """y (M, N) = alpha * x (M, K) Q^T (+ bias); wq uint32 (N, K_pad / 16) packed codes."""
    m_total = x.shape[0]
    k_total = x.shape[1]
    n_total = wq.shape[0]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * THREADS_X + tx
    n_threads = THREADS_X * THREADS_Y
    tile_m = THREADS_Y * ROWS_PER_THREAD
    tile_n = THREADS_X * COLS_PER_THREAD
    m0 = cuda.blockIdx.y * tile_m
    n0 = cuda.blockIdx.x * tile_n
    xs = cuda.shared.array((_MAX_TILE, BLOCK_K), float32)
    ws = cuda.shared.array((_MAX_TILE, _WS_STRIDE), uint32)
    acc = cuda.local.array((ROWS_PER_THREAD, COLS_PER_THREAD), float32)
    wreg = cuda.local.array(COLS_PER_THREAD, uint32)
    wval = cuda.local.array(COLS_PER_THREAD, float32)
    for i in range(ROWS_PER_THREAD):
        for j in range(COLS_PER_THREAD):
            acc[i, j] = float32(0)
    # a thread whose first row or column is outside the matrix has nothing to compute
    active = m0 + ty < m_total and n0 + tx < n_total
    for kb in range(wq.shape[1] // WORDS_PER_BLOCK):
        k_base = kb * BLOCK_K
        for e in range(tid, tile_m * BLOCK_K, n_threads):
            r = e // BLOCK_K
            kk = e - r * BLOCK_K
            v = float32(0)
            if m0 + r < m_total and k_base + kk < k_total:
                v = x[m0 + r, k_base + kk]
            xs[r, kk] = v
        for e in range(tid, tile_n * WORDS_PER_BLOCK, n_threads):
            r = e // WORDS_PER_BLOCK
            w = e - r * WORDS_PER_BLOCK
            word = uint32(ZERO_WORD)
            if n0 + r < n_total:
                word = wq[n0 + r, kb * WORDS_PER_BLOCK + w]
            ws[r, w] = word
        cuda.syncthreads()
        if active:
            for w in range(WORDS_PER_BLOCK):
                for j in range(COLS_PER_THREAD):
                    wreg[j] = ws[tx + THREADS_X * j, w]
                for q in range(4):
                    if k_base + 32 * q >= k_total:
                        break  # the rest of this block is padding (zero weights): skip it
                    for b in range(4):
                        shift = 8 * b + 2 * q
                        for j in range(COLS_PER_THREAD):
                            wval[j] = float32((wreg[j] >> shift) & 3) - float32(1)
                        kk = 32 * q + 4 * w + b
                        for i in range(ROWS_PER_THREAD):
                            xv = xs[ty + THREADS_Y * i, kk]
                            for j in range(COLS_PER_THREAD):
                                # the weight is -1, 0 or +1, so this fused multiply-add is an exact
                                # selected addition or subtraction
                                acc[i, j] += xv * wval[j]
        cuda.syncthreads()
    a = float32(alpha)
    for i in range(ROWS_PER_THREAD):
        gm = m0 + ty + THREADS_Y * i
        for j in range(COLS_PER_THREAD):
            gn = n0 + tx + THREADS_X * j
            if gm < m_total and gn < n_total:
                v = acc[i, j] * a
                if has_bias:
                    v += bias[gn]
                y[gm, gn] = v


@cuda.jit
def quantize_rows_kernel(x, xw, xsum, xscale):
    """Per-row absmax int8 quantisation of x (M, K), as reference.quantize_rows_int8.

    One block per row. Writes xw uint32 (M, K_pad / 4) (four int8 per word, little-endian, zero
    beyond K), xsum int32 (M,) = sum of the row's int8 values, xscale float32 (M,) = absmax / 127.
    """
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    k_total = x.shape[1]
    red = cuda.shared.array(MAX_ROW_THREADS, float32)
    red_i = cuda.shared.array(MAX_ROW_THREADS, int32)
    local_max = float32(0)
    for k in range(tid, k_total, nt):
        a = abs(x[row, k])
        if a > local_max:
            local_max = a
    absmax = _block_max_f32(red, local_max)
    inv = float32(1)
    if absmax > float32(0):
        inv = float32(127) / absmax
    row_sum = 0
    for wi in range(tid, xw.shape[1], nt):
        word = 0
        for b in range(4):
            k = 4 * wi + b
            qv = 0
            if k < k_total:
                qv = _rint_clip127(mul_rn(x[row, k], inv))
            row_sum += qv
            word |= (int64(qv) & 255) << (8 * b)
        xw[row, wi] = word
    total = _block_sum_i32(red_i, row_sum)
    if tid == 0:
        xsum[row] = total
        xscale[row] = absmax / float32(127) if absmax > float32(0) else float32(0)


@cuda.jit
def ternary_gemm_i8_kernel(xw, xsum, xscale, k_true, wq, alpha, bias, has_bias, y):
    """y (M, N) = (xq Q^T) * xscale * alpha (+ bias) with integer dot products.

    xw uint32 (M, K_pad / 4), xsum int32 (M,), xscale float32 (M,) from quantize_rows_kernel;
    k_true the unpadded K; wq uint32 (N, K_pad / 16).
    """
    m_total = xw.shape[0]
    n_total = wq.shape[0]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * THREADS_X + tx
    n_threads = THREADS_X * THREADS_Y
    tile_m = THREADS_Y * ROWS_PER_THREAD
    tile_n = THREADS_X * COLS_PER_THREAD
    m0 = cuda.blockIdx.y * tile_m
    n0 = cuda.blockIdx.x * tile_n
    xs = cuda.shared.array((_MAX_TILE, _XS_STRIDE), uint32)
    ws = cuda.shared.array((_MAX_TILE, _WS_STRIDE), uint32)
    acc = cuda.local.array((ROWS_PER_THREAD, COLS_PER_THREAD), int32)
    wreg = cuda.local.array(COLS_PER_THREAD, uint32)
    codes = cuda.local.array(COLS_PER_THREAD, uint32)
    for i in range(ROWS_PER_THREAD):
        for j in range(COLS_PER_THREAD):
            acc[i, j] = 0
    active = m0 + ty < m_total and n0 + tx < n_total
    k_total = k_true
    for kb in range(wq.shape[1] // WORDS_PER_BLOCK):
        k_base = kb * BLOCK_K
        for e in range(tid, tile_m * XWORDS_PER_BLOCK, n_threads):
            r = e // XWORDS_PER_BLOCK
            c = e - r * XWORDS_PER_BLOCK
            word = uint32(0)
            if m0 + r < m_total:
                word = xw[m0 + r, kb * XWORDS_PER_BLOCK + c]
            xs[r, c] = word
        for e in range(tid, tile_n * WORDS_PER_BLOCK, n_threads):
            r = e // WORDS_PER_BLOCK
            w = e - r * WORDS_PER_BLOCK
            word = uint32(ZERO_WORD)
            if n0 + r < n_total:
                word = wq[n0 + r, kb * WORDS_PER_BLOCK + w]
            ws[r, w] = word
        cuda.syncthreads()
        if active:
            for w in range(WORDS_PER_BLOCK):
                for j in range(COLS_PER_THREAD):
                    wreg[j] = ws[tx + THREADS_X * j, w]
                for q in range(4):
                    if k_base + 32 * q >= k_total:
                        break  # the rest of this block is padding: zero activations and weights
                    for j in range(COLS_PER_THREAD):
                        codes[j] = (wreg[j] >> (2 * q)) & LANE_MASK
                    for i in range(ROWS_PER_THREAD):
                        # activations k = 32q + 4w .. +3 of this row: word 8q + w of the block
                        xword = xs[ty + THREADS_Y * i, 8 * q + w]
                        for j in range(COLS_PER_THREAD):
                            acc[i, j] = dot4(xword, codes[j], acc[i, j])
        cuda.syncthreads()
    a = float32(alpha)
    for i in range(ROWS_PER_THREAD):
        gm = m0 + ty + THREADS_Y * i
        for j in range(COLS_PER_THREAD):
            gn = n0 + tx + THREADS_X * j
            if gm < m_total and gn < n_total:
                # two roundings, as the reference: scale * alpha, then the product
                v = mul_rn(float32(acc[i, j] - xsum[gm]), mul_rn(xscale[gm], a))
                if has_bias:
                    v += bias[gn]
                y[gm, gn] = v


# --- dense float GEMM ----------------------------------------------------------------------------------
@cuda.jit
def dense_kernel(x, w, bias, has_bias, y):
    """y (M, N) = x (M, K) @ w (N, K)^T (+ bias): 16 x 16 shared-memory tiles."""
    m_total = x.shape[0]
    k_total = x.shape[1]
    n_total = w.shape[0]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row = cuda.blockIdx.y * DENSE_TILE + ty
    col = cuda.blockIdx.x * DENSE_TILE + tx
    xs = cuda.shared.array((_MAX_DENSE_TILE, _DENSE_STRIDE), float32)
    ws = cuda.shared.array((_MAX_DENSE_TILE, _DENSE_STRIDE), float32)
    acc = float32(0)
    for k0 in range(0, k_total, DENSE_TILE):
        v = float32(0)
        if row < m_total and k0 + tx < k_total:
            v = x[row, k0 + tx]
        xs[ty, tx] = v
        wrow = cuda.blockIdx.x * DENSE_TILE + ty
        v = float32(0)
        if wrow < n_total and k0 + tx < k_total:
            v = w[wrow, k0 + tx]
        ws[ty, tx] = v
        cuda.syncthreads()
        if row < m_total and col < n_total:
            for kk in range(DENSE_TILE):
                acc += xs[ty, kk] * ws[tx, kk]
        cuda.syncthreads()
    if row < m_total and col < n_total:
        if has_bias:
            acc += bias[col]
        y[row, col] = acc


# --- per-row normalisations ------------------------------------------------------------------------------
@cuda.jit
def rmsnorm_kernel(x, weight, eps, mod, shift_off, scale_off, rows_per_batch, has_mod, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, then * (1 + scale) + shift if has_mod.

    x, out (R, D) (may alias); weight (D,); mod (B, *) holds shift at columns shift_off..+D and
    scale at scale_off..+D for batch b = r // rows_per_batch. One block per row.
    """
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    d = x.shape[1]
    red = cuda.shared.array(MAX_ROW_THREADS, float32)
    s = float32(0)
    for c in range(tid, d, nt):
        v = x[row, c]
        s += v * v
    ms = _block_sum_f32(red, s) / float32(d)
    inv = float32(1) / math.sqrt(ms + float32(eps))
    b = row // rows_per_batch
    for c in range(tid, d, nt):
        h = (x[row, c] * inv) * weight[c]
        if has_mod:
            h = h * (float32(1) + mod[b, scale_off + c]) + mod[b, shift_off + c]
        out[row, c] = h


@cuda.jit
def layernorm_kernel(x, weight, bias, has_affine, eps, mod, shift_off, scale_off, rows_per_batch, has_mod, out):
    """LayerNorm over each row (biased variance), optional affine, optional adaLN modulation.

    x, out (R, D) (may alias); weight, bias (D,) used if has_affine; mod as in rmsnorm_kernel.
    """
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    d = x.shape[1]
    red = cuda.shared.array(MAX_ROW_THREADS, float32)
    s = float32(0)
    for c in range(tid, d, nt):
        s += x[row, c]
    mean = _block_sum_f32(red, s) / float32(d)
    s = float32(0)
    for c in range(tid, d, nt):
        v = x[row, c] - mean
        s += v * v
    var = _block_sum_f32(red, s) / float32(d)
    denom = math.sqrt(var + float32(eps))
    b = row // rows_per_batch
    for c in range(tid, d, nt):
        h = (x[row, c] - mean) / denom
        if has_affine:
            h = h * weight[c] + bias[c]
        if has_mod:
            h = h * (float32(1) + mod[b, scale_off + c]) + mod[b, shift_off + c]
        out[row, c] = h


# --- attention -------------------------------------------------------------------------------------------
@cuda.jit
def rope_kernel(x, cos, sin, rows_per_batch, head_dim):
    """Rotate consecutive pairs of every head in place. x (R, heads * head_dim); cos, sin (T, head_dim / 2)."""
    idx = cuda.grid(1)
    half_cols = x.shape[1] // 2
    if idx >= x.shape[0] * half_cols:
        return
    r = idx // half_cols
    p = idx - r * half_cols
    i = p % (head_dim // 2)
    t = r % rows_per_batch
    c = cos[t, i]
    s = sin[t, i]
    x0 = x[r, 2 * p]
    x1 = x[r, 2 * p + 1]
    x[r, 2 * p] = x0 * c - x1 * s
    x[r, 2 * p + 1] = x0 * s + x1 * c


@cuda.jit
def attention_kernel(q, k, v, out, n_tok, n_heads, n_kv_heads, head_dim, scale):
    """softmax(q k^T * scale) v for one (query token, head, batch) per block; not causal.

    q, out (B * T, H * hd); k, v (B * T, Hkv * hd); query head h reads kv head h // (H / Hkv).
    Dynamic shared memory: T + hd float32 (the scores, then the query vector).
    """
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    b = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sm = cuda.shared.array(0, float32)
    red = cuda.shared.array(MAX_ROW_THREADS, float32)
    kvh = h // (n_heads // n_kv_heads)
    row = b * n_tok + t
    base = b * n_tok
    for d in range(tid, head_dim, nt):
        sm[n_tok + d] = q[row, h * head_dim + d]
    cuda.syncthreads()
    sc = float32(scale)
    local_max = float32(NEG_BIG)
    for j in range(tid, n_tok, nt):
        s = float32(0)
        for d in range(head_dim):
            s += sm[n_tok + d] * k[base + j, kvh * head_dim + d]
        s = s * sc
        sm[j] = s
        if s > local_max:
            local_max = s
    mx = _block_max_f32(red, local_max)
    local_sum = float32(0)
    for j in range(tid, n_tok, nt):
        e = math.exp(sm[j] - mx)
        sm[j] = e
        local_sum += e
    total = _block_sum_f32(red, local_sum)
    for j in range(tid, n_tok, nt):
        sm[j] = sm[j] / total
    cuda.syncthreads()
    for d in range(tid, head_dim, nt):
        acc = float32(0)
        for j in range(n_tok):
            acc += sm[j] * v[base + j, kvh * head_dim + d]
        out[row, h * head_dim + d] = acc


# --- elementwise -----------------------------------------------------------------------------------------
@cuda.jit
def swiglu_kernel(a, g, out):
    """out = silu(a) * g elementwise, all (R, F) (out may alias a)."""
    idx = cuda.grid(1)
    if idx >= a.shape[0] * a.shape[1]:
        return
    r = idx // a.shape[1]
    c = idx - r * a.shape[1]
    out[r, c] = _silu(a[r, c]) * g[r, c]


@cuda.jit
def silu_kernel(x, out):
    """out = silu(x) elementwise, (R, D) (may alias)."""
    idx = cuda.grid(1)
    if idx >= x.shape[0] * x.shape[1]:
        return
    r = idx // x.shape[1]
    c = idx - r * x.shape[1]
    out[r, c] = _silu(x[r, c])


@cuda.jit
def add_gated_kernel(h, mod, gate_off, o, rows_per_batch):
    """h[r, c] += mod[r // rows_per_batch, gate_off + c] * o[r, c]; h, o (R, D)."""
    idx = cuda.grid(1)
    if idx >= h.shape[0] * h.shape[1]:
        return
    r = idx // h.shape[1]
    c = idx - r * h.shape[1]
    h[r, c] += mod[r // rows_per_batch, gate_off + c] * o[r, c]


@cuda.jit
def timestep_features_kernel(t, out, neg_log_period):
    """out (B, F) float32 = [cos(t f), sin(t f)], f_i = exp(-ln(period) * i / (F/2)); t float32 (B,)."""
    idx = cuda.grid(1)
    half = out.shape[1] // 2
    if idx >= out.shape[0] * half:
        return
    b = idx // half
    i = idx - b * half
    f = math.exp(float32(neg_log_period) * float32(i) / float32(half))
    arg = t[b] * f
    out[b, i] = math.cos(arg)
    out[b, half + i] = math.sin(arg)


@cuda.jit
def condition_kernel(t_emb, table, labels, c_act):
    """c_act (B, Td) = silu(t_emb + table[labels]); labels int64 (B,)."""
    idx = cuda.grid(1)
    if idx >= t_emb.shape[0] * t_emb.shape[1]:
        return
    b = idx // t_emb.shape[1]
    j = idx - b * t_emb.shape[1]
    c_act[b, j] = _silu(t_emb[b, j] + table[labels[b], j])


@cuda.jit
def patchify_kernel(x, p, tokens):
    """x (B, C, H, W) -> tokens (B * T, C * p * p), row-major grid, vectors ordered (C, p_row, p_col)."""
    idx = cuda.grid(1)
    cols = tokens.shape[1]
    if idx >= tokens.shape[0] * cols:
        return
    row = idx // cols
    col = idx - row * cols
    grid_w = x.shape[3] // p
    n_tok = (x.shape[2] // p) * grid_w
    b = row // n_tok
    t = row - b * n_tok
    gh = t // grid_w
    gw = t - gh * grid_w
    c = col // (p * p)
    rem = col - c * p * p
    pr = rem // p
    pc = rem - pr * p
    tokens[row, col] = x[b, c, gh * p + pr, gw * p + pc]


@cuda.jit
def unpatchify_kernel(tokens, p, img):
    """tokens (B * T, p * p * C) with vectors ordered (p_row, p_col, C) -> img (B, C, H, W)."""
    idx = cuda.grid(1)
    bsz = img.shape[0]
    ch = img.shape[1]
    hh = img.shape[2]
    ww = img.shape[3]
    if idx >= bsz * ch * hh * ww:
        return
    xw = idx % ww
    rest = idx // ww
    yh = rest % hh
    rest = rest // hh
    c = rest % ch
    b = rest // ch
    grid_w = ww // p
    n_tok = (hh // p) * grid_w
    t = (yh // p) * grid_w + xw // p
    col = ((yh % p) * p + xw % p) * ch + c
    img[b, c, yh, xw] = tokens[b * n_tok + t, col]


# --- launchers -------------------------------------------------------------------------------------------
def _row_threads(width: int) -> int:
    """Threads of a one-block-per-row kernel: a power of two in [ROW_THREADS_MIN, ROW_THREADS_MAX]."""
    n = ROW_THREADS_MIN
    while n < width and n < ROW_THREADS_MAX:
        n *= 2
    return n


def _elementwise(kernel, count: int, *args) -> None:
    if count:
        kernel[(count + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS, ELEMENTWISE_THREADS](*args)


def words_view(packed: np.ndarray) -> np.ndarray:
    """Host uint8 (N, K_pad / 4) packed codes -> uint32 (N, K_pad / 16) little-endian words (a view)."""
    return np.ascontiguousarray(packed).view("<u4")


def ternary_gemm_f32(x, wq, alpha: float, bias, y) -> None:
    """y (M, N) = alpha * x (M, K) Q^T (+ bias), fp32 activations. bias None or (N,)."""
    m, n = y.shape
    grid = (-(-n // (THREADS_X * COLS_PER_THREAD)), -(-m // (THREADS_Y * ROWS_PER_THREAD)))
    b = bias if bias is not None else y[0]
    ternary_gemm_f32_kernel[grid, (THREADS_X, THREADS_Y)](x, wq, np.float32(alpha), b, bias is not None, y)


def quantize_rows(x, xw, xsum, xscale) -> None:
    """Per-row int8 quantisation of x (M, K) into xw uint32 (M, K_pad/4), xsum int32 (M,), xscale (M,)."""
    quantize_rows_kernel[x.shape[0], _row_threads(x.shape[1])](x, xw, xsum, xscale)


def ternary_gemm_i8(xw, xsum, xscale, wq, k: int, alpha: float, bias, y) -> None:
    """y (M, N) from activations quantised by quantize_rows; k is the layer's true input width."""
    m, n = y.shape
    grid = (-(-n // (THREADS_X * COLS_PER_THREAD)), -(-m // (THREADS_Y * ROWS_PER_THREAD)))
    b = bias if bias is not None else y[0]
    ternary_gemm_i8_kernel[grid, (THREADS_X, THREADS_Y)](xw, xsum, xscale, k, wq, np.float32(alpha), b,
                                                          bias is not None, y)


def dense(x, w, bias, y) -> None:
    """y (M, N) = x (M, K) @ w (N, K)^T (+ bias)."""
    m, n = y.shape
    grid = (-(-n // DENSE_TILE), -(-m // DENSE_TILE))
    b = bias if bias is not None else y[0]
    dense_kernel[grid, (DENSE_TILE, DENSE_TILE)](x, w, b, bias is not None, y)


def rmsnorm(x, weight, eps: float, out, mod=None, shift_off: int = 0, scale_off: int = 0,
            rows_per_batch: int = 1) -> None:
    """out = RMSNorm(x) * weight, modulated by mod's shift/scale columns when mod is given."""
    m = mod if mod is not None else x
    rmsnorm_kernel[x.shape[0], _row_threads(x.shape[1])](x, weight, np.float32(eps), m, shift_off, scale_off,
                                                         rows_per_batch, mod is not None, out)


def layernorm(x, weight, bias, eps: float, out, mod=None, shift_off: int = 0, scale_off: int = 0,
              rows_per_batch: int = 1) -> None:
    """out = LayerNorm(x) (affine if weight is given), modulated when mod is given."""
    dummy = x[0]
    w = weight if weight is not None else dummy
    b = bias if bias is not None else dummy
    m = mod if mod is not None else x
    layernorm_kernel[x.shape[0], _row_threads(x.shape[1])](x, w, b, weight is not None, np.float32(eps), m,
                                                           shift_off, scale_off, rows_per_batch, mod is not None,
                                                           out)


def rope(x, cos, sin, rows_per_batch: int, head_dim: int) -> None:
    """Rotary embedding in place on x (B * T, heads * head_dim)."""
    _elementwise(rope_kernel, x.shape[0] * (x.shape[1] // 2), x, cos, sin, rows_per_batch, head_dim)


def attention(q, k, v, out, bsz: int, n_tok: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    """out (B * T, H * hd) = softmax attention of q over k, v (see attention_kernel)."""
    threads = _row_threads(max(n_tok, head_dim))
    shared_bytes = 4 * (n_tok + head_dim)
    attention_kernel[(n_tok, n_heads, bsz), threads, 0, shared_bytes](
        q, k, v, out, n_tok, n_heads, n_kv_heads, head_dim, np.float32(1.0 / math.sqrt(head_dim)))


def swiglu(a, g, out) -> None:
    _elementwise(swiglu_kernel, a.shape[0] * a.shape[1], a, g, out)


def silu(x, out) -> None:
    _elementwise(silu_kernel, x.shape[0] * x.shape[1], x, out)


def add_gated(h, mod, gate_off: int, o, rows_per_batch: int) -> None:
    _elementwise(add_gated_kernel, h.shape[0] * h.shape[1], h, mod, gate_off, o, rows_per_batch)


def timestep_features(t, out, max_period: float = 10000.0) -> None:
    _elementwise(timestep_features_kernel, out.shape[0] * (out.shape[1] // 2), t, out,
                 np.float32(-math.log(max_period)))


def condition(t_emb, table, labels, c_act) -> None:
    _elementwise(condition_kernel, t_emb.shape[0] * t_emb.shape[1], t_emb, table, labels, c_act)


def patchify(x, p: int, tokens) -> None:
    _elementwise(patchify_kernel, tokens.shape[0] * tokens.shape[1], x, p, tokens)


def unpatchify(tokens, p: int, img) -> None:
    _elementwise(unpatchify_kernel, img.size, tokens, p, img)


# --- ahead-of-time checks ----------------------------------------------------------------------------------
_F1, _F2, _F4 = "float32[::1]", "float32[:, ::1]", "float32[:, :, :, ::1]"
_U2, _I1 = "uint32[:, ::1]", "int32[::1]"
KERNEL_SIGNATURES = {
    # the argument types the launchers above pass (Python int -> int64, np.float32 -> float32)
    "ternary_gemm_f32_kernel": f"void({_F2}, {_U2}, float32, {_F1}, boolean, {_F2})",
    "quantize_rows_kernel": f"void({_F2}, {_U2}, {_I1}, {_F1})",
    "ternary_gemm_i8_kernel": f"void({_U2}, {_I1}, {_F1}, int64, {_U2}, float32, {_F1}, boolean, {_F2})",
    "dense_kernel": f"void({_F2}, {_F2}, {_F1}, boolean, {_F2})",
    "rmsnorm_kernel": f"void({_F2}, {_F1}, float32, {_F2}, int64, int64, int64, boolean, {_F2})",
    "layernorm_kernel": f"void({_F2}, {_F1}, {_F1}, boolean, float32, {_F2}, int64, int64, int64, boolean, {_F2})",
    "rope_kernel": f"void({_F2}, {_F2}, {_F2}, int64, int64)",
    "attention_kernel": f"void({_F2}, {_F2}, {_F2}, {_F2}, int64, int64, int64, int64, float32)",
    "swiglu_kernel": f"void({_F2}, {_F2}, {_F2})",
    "silu_kernel": f"void({_F2}, {_F2})",
    "add_gated_kernel": f"void({_F2}, {_F2}, int64, {_F2}, int64)",
    "timestep_features_kernel": f"void({_F1}, {_F2}, float32)",
    "condition_kernel": f"void({_F2}, {_F2}, int64[::1], {_F2})",
    "patchify_kernel": f"void({_F4}, int64, {_F2})",
    "unpatchify_kernel": f"void({_F2}, int64, {_F4})",
}


def compile_all_ptx(cc: tuple[int, int] = (8, 0)) -> dict[str, str]:
    """PTX of every kernel for compute capability `cc`, compiled with NVVM and no GPU.

    Needs the real CUDA target (not the simulator) and NVVM (``pip install "numba-cuda[cu12]"``
    ships it). Raises whatever Numba raises when a kernel does not compile.
    """
    if SIMULATOR:
        raise RuntimeError("compile_all_ptx needs the real CUDA target; unset NUMBA_ENABLE_CUDASIM")
    import contextlib
    import types as pytypes
    from unittest import mock

    patch = contextlib.nullcontext()
    if not cuda.is_available():
        # numba-cuda compiles a kernel's device functions for the *current* device's compute
        # capability even under compile_ptx; with no GPU, answer that question with `cc`.
        from numba.cuda import dispatcher
        if hasattr(dispatcher, "get_current_device"):
            fake = pytypes.SimpleNamespace(compute_capability=tuple(cc))
            patch = mock.patch.object(dispatcher, "get_current_device", lambda: fake)
    out = {}
    with patch:
        for name, sig in KERNEL_SIGNATURES.items():
            ptx, _ = cuda.compile_ptx(globals()[name].py_func, sig, cc=cc)
            out[name] = ptx
    return out
