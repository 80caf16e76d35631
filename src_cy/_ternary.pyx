# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Python face of the C ternary kernels (src_cy/ternary_gemm.c): typed memoryviews in, GIL released
around every kernel call. Shapes are checked here too, so a wrong call raises InputError instead of
reading out of bounds; the friendlier checks (dtype conversion, messages in model terms) live in
terdit_edge/kernels/cython_backend.py.
"""
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t

from ternary_gemm cimport *

import numpy as np

from terdit_edge.errors import InputError

_ISA_BY_NAME = {td_isa_name(i).decode(): i for i in range(TD_ISA_COUNT)}


def cpu_features():
    """What the extension detected: dict of avx2, fma, avx512 (F/BW/VL/DQ/VNNI with OS-enabled
    ZMM state), avx512vbmi, neon, dotprod, openmp (bools), threads, best_isa, isa (the path in use)
    and isas (every path this CPU and build can run)."""
    cdef int f = td_cpu_flags()
    return {
        "avx2": bool(f & TD_CPU_AVX2), "fma": bool(f & TD_CPU_FMA),
        "avx512": bool(f & TD_CPU_AVX512), "avx512vbmi": bool(f & TD_CPU_AVX512_VBMI),
        "neon": bool(f & TD_CPU_NEON), "dotprod": bool(f & TD_CPU_DOTPROD), "i8mm": bool(f & TD_CPU_I8MM),
        "openmp": bool(td_openmp_enabled()), "threads": td_max_threads(),
        "best_isa": td_isa_name(td_best_isa()).decode(), "isa": td_isa_name(td_get_isa()).decode(),
        "isas": supported_isas(),
    }


def supported_isas():
    """Names of every instruction-set path this CPU and build can run, scalar first, in id order
    (each one a valid argument of set_isa)."""
    return [td_isa_name(i).decode() for i in range(TD_ISA_COUNT) if td_isa_supported(i)]


def get_isa():
    """Name of the instruction-set path the kernels use now."""
    return td_isa_name(td_get_isa()).decode()


def set_isa(name):
    """Force a path: any name in supported_isas() ("scalar", "avx2", "avx512", "neon",
    "neon-dotprod", "neon-i8mm"); "best" restores the default. Process-wide; meant for tests and benchmarks."""
    if name == "best":
        name = td_isa_name(td_best_isa()).decode()
    if name not in _ISA_BY_NAME:
        raise InputError(f"unknown ISA {name!r}; choose one of {sorted(_ISA_BY_NAME)} or 'best'")
    if td_set_isa(_ISA_BY_NAME[name]) != 0:
        raise InputError(f"this CPU or build cannot run the {name!r} kernels "
                         f"(supported here: {supported_isas()})")


def set_force_parallel(bint on):
    """Split even tiny problems across the requested threads (normally they run on one thread
    because waking a second costs more than it saves). For tests of the threaded code."""
    td_set_force_parallel(on)


cdef int64_t _kb(int64_t k):
    return (k + 127) // 128 * 32


cdef _check_gemm(const float[:, ::1] x, const uint8_t[:, ::1] packed, int64_t k, const float[::1] bias,
                 float[:, ::1] out):
    if x.shape[1] != k:
        raise InputError(f"activations have {x.shape[1]} features, the ternary weight expects K = {k}")
    if k < 0 or packed.shape[1] != _kb(k):
        raise InputError(f"packed weight has {packed.shape[1]} bytes per row; K = {k} needs {_kb(k)}")
    if bias is not None and bias.shape[0] != packed.shape[0]:
        raise InputError(f"bias has {bias.shape[0]} entries, expected N = {packed.shape[0]}")
    if out.shape[0] != x.shape[0] or out.shape[1] != packed.shape[0]:
        raise InputError(f"out has shape ({out.shape[0]}, {out.shape[1]}), expected "
                         f"({x.shape[0]}, {packed.shape[0]})")


def gemm(const float[:, ::1] x, const uint8_t[:, ::1] packed, int64_t k, float alpha,
         const float[::1] bias, float[:, ::1] out, int threads=1, int bits=0):
    """out (M, N) float32 = alpha * x (M, K) Q^T + bias: float32 activations (bits 0) or per-row
    absmax integers of `bits` bits (8: int8, 10: int10)."""
    _check_gemm(x, packed, k, bias, out)
    cdef int64_t m = x.shape[0], n = packed.shape[0]
    cdef const float *xp = &x[0, 0] if m > 0 and k > 0 else NULL
    cdef const float *bp = &bias[0] if bias is not None and n > 0 else NULL
    cdef float *yp = &out[0, 0] if m > 0 and n > 0 else NULL
    cdef const uint8_t *wp = &packed[0, 0] if n > 0 and packed.shape[1] > 0 else NULL
    cdef int rc
    if threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    if bits != 0 and not 2 <= bits <= 10:
        raise InputError(f"integer activations need 2..10 bits, got {bits}")
    if m == 0 or n == 0:
        return out
    if k == 0:  # empty sum: y = bias
        out[...] = 0
        if bias is not None:
            np.asarray(out)[...] += np.asarray(bias)
        return out
    with nogil:
        if bits:
            rc = td_gemm_int(xp, m, k, k, wp, n, alpha, bp, yp, n, threads, bits)
        else:
            rc = td_gemm_f32(xp, m, k, k, wp, n, alpha, bp, yp, n, threads)
    if rc != TD_OK:
        raise MemoryError("ternary GEMM could not allocate its work buffers")
    return out


def quantize_rows_int8(const float[:, ::1] x, int threads=1):
    """(xq int8 (M, K), scale float32 (M,)) exactly as reference.quantize_rows_int8."""
    cdef int64_t m = x.shape[0], k = x.shape[1]
    xq = np.zeros((m, k), dtype=np.int8)
    scale = np.zeros(m, dtype=np.float32)
    cdef int8_t[:, ::1] xqv = xq
    cdef float[::1] sv = scale
    if m and k:
        with nogil:
            td_quantize_rows_i8(&x[0, 0], m, k, k, &xqv[0, 0], k, &sv[0], threads)
    return xq, scale


def quantize_rows(const float[:, ::1] x, int bits, int threads=1):
    """(xq int16 (M, K), scale float32 (M,)) exactly as reference.quantize_rows(x, bits), bits 2..10."""
    if not 2 <= bits <= 10:
        raise InputError(f"integer activations need 2..10 bits, got {bits}")
    cdef int64_t m = x.shape[0], k = x.shape[1]
    xq = np.zeros((m, k), dtype=np.int16)
    scale = np.zeros(m, dtype=np.float32)
    cdef int16_t[:, ::1] xqv = xq
    cdef float[::1] sv = scale
    cdef int lim = (1 << (bits - 1)) - 1
    if m and k:
        with nogil:
            td_quantize_rows_i16(&x[0, 0], m, k, k, &xqv[0, 0], k, &sv[0], lim, threads)
    return xq, scale


def int8_sums(const int8_t[:, ::1] xq, const uint8_t[:, ::1] packed, int64_t k, int threads=1):
    """Exact int32 (M, N) = xq Q^T for xq int8 (M, padded_k(K)) zero beyond K (test hook)."""
    cdef int64_t m = xq.shape[0], n = packed.shape[0], kp = _kb(k) * 4
    if packed.shape[1] != _kb(k) or xq.shape[1] != kp:
        raise InputError("int8_sums needs xq (M, padded_k(K)) and packed (N, padded_k(K)/4)")
    acc = np.zeros((m, n), dtype=np.int32)
    cdef int32_t[:, ::1] av = acc
    cdef int rc = TD_OK
    if m and n and kp:
        with nogil:
            rc = td_gemm_i8_acc(&xq[0, 0], m, k, kp, &packed[0, 0], n, &av[0, 0], threads)
    if rc != TD_OK:
        raise MemoryError("ternary GEMM could not allocate its work buffers")
    return acc


def rmsnorm_modulate(const float[:, :, ::1] x, const float[::1] weight, const float[:, ::1] shift,
                     const float[:, ::1] scale, float eps, float[:, :, ::1] out, int threads=1):
    """out (B, T, D) = RMSNorm(x) * weight * (1 + scale[:, None]) + shift[:, None]."""
    cdef int64_t b = x.shape[0], t = x.shape[1], d = x.shape[2]
    if (weight.shape[0] != d or shift.shape[0] != b or shift.shape[1] != d or scale.shape[0] != b
            or scale.shape[1] != d or out.shape[0] != b or out.shape[1] != t or out.shape[2] != d):
        raise InputError(f"rmsnorm_modulate: x (B, T, D) = ({b}, {t}, {d}) needs weight (D,), "
                         "shift/scale (B, D) and out (B, T, D)")
    if b * t * d == 0:
        return out
    with nogil:
        td_rmsnorm_modulate(&x[0, 0, 0], &weight[0], &shift[0, 0], &scale[0, 0], &out[0, 0, 0],
                            b * t, t, d, eps, threads)
    return out


def layernorm(const float[:, ::1] x, const float[::1] weight, const float[::1] bias, float eps,
              float[:, ::1] out, int threads=1):
    """out (R, D) = LayerNorm(x) over D (biased variance); weight/bias both None or both (D,)."""
    cdef int64_t r = x.shape[0], d = x.shape[1]
    if (weight is None) != (bias is None):
        raise InputError("layernorm needs both weight and bias, or neither")
    if (weight is not None and (weight.shape[0] != d or bias.shape[0] != d)) or \
            out.shape[0] != r or out.shape[1] != d:
        raise InputError(f"layernorm: x ({r}, {d}) needs weight/bias ({d},) and out of the same shape")
    if r * d == 0:
        return out
    with nogil:
        td_layernorm(&x[0, 0], &weight[0] if weight is not None else NULL,
                     &bias[0] if bias is not None else NULL, &out[0, 0], r, d, eps, threads)
    return out


def dense(const float[:, ::1] x, const float[:, ::1] w, const float[::1] bias, float[:, ::1] out, int threads=1):
    """out (M, N) = x (M, K) @ w (N, K)^T [+ bias (N,)] in float32, in one summation order on every CPU."""
    cdef int64_t m = x.shape[0], k = x.shape[1], n = w.shape[0]
    if w.shape[1] != k:
        raise InputError(f"dense: x has {k} features, the weight expects {w.shape[1]}")
    if bias is not None and bias.shape[0] != n:
        raise InputError(f"dense: bias has {bias.shape[0]} entries, expected {n}")
    if out.shape[0] != m or out.shape[1] != n:
        raise InputError(f"dense: out has shape ({out.shape[0]}, {out.shape[1]}), expected ({m}, {n})")
    if m == 0 or n == 0:
        return out
    if k == 0:
        for i in range(m):
            for j in range(n):
                out[i, j] = 0.0 if bias is None else bias[j]
        return out
    cdef const float *bp = NULL
    if bias is not None:
        bp = &bias[0]
    with nogil:
        td_dense_f32(&x[0, 0], m, k, &w[0, 0], n, bp, &out[0, 0], threads)
    return out


def swiglu(const float[::1] a, const float[::1] b, float[::1] out, int threads=1):
    """out = silu(a) * b over flat float32 arrays of one length."""
    cdef int64_t c = a.shape[0]
    if b.shape[0] != c or out.shape[0] != c:
        raise InputError("swiglu: a, b and out must have the same size")
    if c == 0:
        return out
    with nogil:
        td_swiglu(&a[0], &b[0], &out[0], c, threads)
    return out


def add_gated(float[:, :, ::1] x, const float[:, ::1] gate, const float[:, :, ::1] y, int threads=1):
    """x (B, T, D) += gate[:, None, :] * y in place."""
    cdef int64_t b = x.shape[0], t = x.shape[1], d = x.shape[2]
    if gate.shape[0] != b or gate.shape[1] != d or y.shape[0] != b or y.shape[1] != t or y.shape[2] != d:
        raise InputError(f"add_gated: x ({b}, {t}, {d}) needs gate (B, D) and y of x's shape")
    if b * t * d == 0:
        return x
    with nogil:
        td_add_gated(&x[0, 0, 0], &gate[0, 0], &y[0, 0, 0], b * t, t, d, threads)
    return x


def rope(float[:, :, :, ::1] x, const float[:, ::1] cos, const float[:, ::1] sin, int threads=1):
    """Rotate consecutive pairs of each head of x (B, T, H, hd) in place; cos, sin (T, hd / 2)."""
    cdef int64_t b = x.shape[0], t = x.shape[1], h = x.shape[2], hd = x.shape[3]
    if hd % 2 or cos.shape[0] != t or cos.shape[1] != hd // 2 or sin.shape[0] != t or sin.shape[1] != hd // 2:
        raise InputError(f"rope: x (B, T, H, hd) = ({b}, {t}, {h}, {hd}) needs even hd and cos/sin (T, hd/2)")
    if b * t * h * hd == 0:
        return x
    with nogil:
        td_rope(&x[0, 0, 0, 0], &cos[0, 0], &sin[0, 0], b, t, h, hd, threads)
    return x


def attention(const float[:, :, :, ::1] q, const float[:, :, :, ::1] k, const float[:, :, :, ::1] v,
              float[:, :, :, ::1] out, int threads=1, mode="fp32"):
    """out (B, T, H, hd) = softmax(q k^T / sqrt(hd)) v per batch and head, not causal; q (B, T, H, hd),
    k and v (B, T, Hkv, hd) with H a multiple of Hkv (head h reads kv head h // (H // Hkv)).
    mode "fp32" (float32 products) or "int8" (K centred over the tokens, int8 Q K^T, integer P V;
    td_attention_int8). out must not overlap q, k or v (the caller checks)."""
    if mode not in ("fp32", "int8"):
        raise InputError(f"attention: mode must be 'fp32' or 'int8', got {mode!r}")
    cdef bint int8 = mode == "int8"
    cdef int64_t b = q.shape[0], t = q.shape[1], h = q.shape[2], hd = q.shape[3], hkv = k.shape[2]
    if (k.shape[0] != b or k.shape[1] != t or k.shape[3] != hd or v.shape[0] != b or v.shape[1] != t
            or v.shape[2] != hkv or v.shape[3] != hd):
        raise InputError(f"attention: q (B, T, H, hd) = ({b}, {t}, {h}, {hd}) needs k and v of shape "
                         f"(B, T, Hkv, hd); got k {np.shape(k)}, v {np.shape(v)}")
    if hkv < 1 or h % hkv:
        raise InputError(f"attention: {h} query heads are not a multiple of {hkv} key/value heads")
    if out.shape[0] != b or out.shape[1] != t or out.shape[2] != h or out.shape[3] != hd:
        raise InputError(f"attention: out has shape {np.shape(out)}, expected ({b}, {t}, {h}, {hd})")
    if threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    if b * t * h * hd == 0:
        return out
    cdef int rc
    with nogil:
        if int8:
            rc = td_attention_int8(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0], &out[0, 0, 0, 0], b, t, h,
                                   hkv, hd, threads)
        else:
            rc = td_attention(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0], &out[0, 0, 0, 0], b, t, h, hkv,
                              hd, threads)
    if rc == TD_ENOMEM:
        raise MemoryError("attention could not allocate its scratch buffers")
    if rc != TD_OK:
        raise InputError("attention: bad head counts")
    return out


def fma_peak(int64_t iters, int threads=1):
    """Run `iters` rounds of the current ISA's FMA loop on `threads` threads at once and return the
    floating-point operations done (time the call for the machine's FMA peak; bench_attention.py)."""
    if iters < 0 or threads < 1:
        raise InputError(f"fma_peak: iters must be >= 0 and threads >= 1, got {iters}, {threads}")
    cdef double flops
    with nogil:
        flops = td_fma_peak(iters, threads)
    return flops


def i8dot_peak(int64_t iters, int threads=1):
    """Run `iters` rounds of the current ISA's int8 dot-product loop (the instructions of the int8
    attention) on `threads` threads and return the operations done (2 per multiply-add)."""
    if iters < 0 or threads < 1:
        raise InputError(f"i8dot_peak: iters must be >= 0 and threads >= 1, got {iters}, {threads}")
    cdef double ops
    with nogil:
        ops = td_i8dot_peak(iters, threads)
    return ops
