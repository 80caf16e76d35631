/* Run-time dispatch, the portable scalar kernels, int8 quantization and the fused per-token ops.
 * The SIMD kernels live in ternary_avx2.c and ternary_neon.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(_WIN32)
#include <malloc.h>
#endif

#include "ternary_internal.h"

#if TD_ARM64 && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef AT_HWCAP2
#define AT_HWCAP2 26
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#endif

/* ---------------------------------------------------------------------------------------------
 * CPU detection */

#if TD_X86
#include <cpuid.h>
/* AVX-512 needs the CPU features and the OS saving the opmask and ZMM state: CPUID.1:ECX.OSXSAVE,
 * then XCR0 bits 1, 2 (SSE, AVX) and 5, 6, 7 (opmask, ZMM0-15 upper halves, ZMM16-31). */
static int x86_avx512_flags(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 0xe6u) != 0xe6u) return 0;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    const int vnni = (c >> 11) & 1, vbmi = (c >> 1) & 1;
    int r = 0;
    if (f && dq && bw && vl && vnni) r |= TD_CPU_AVX512;
    if (f && vbmi) r |= TD_CPU_AVX512_VBMI;
    return r;
}
#endif

int td_cpu_flags(void) {
    int f = 0;
#if TD_X86 && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= TD_CPU_AVX2;
    if (__builtin_cpu_supports("fma")) f |= TD_CPU_FMA;
    f |= x86_avx512_flags();
#endif
#if TD_ARM64
    f |= TD_CPU_NEON; /* Advanced SIMD is mandatory in ARMv8-A */
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) f |= TD_CPU_DOTPROD;
    if (getauxval(AT_HWCAP2) & HWCAP2_I8MM) f |= TD_CPU_I8MM;
#endif
#endif
    return f;
}

/* ---------------------------------------------------------------------------------------------
 * The ISA tables: the registry, filling of missing entries from the parent, selection */

/* Every table this build has, by id (NULL: not in this build). */
static const td_ops_t *const td_tables[TD_ISA_COUNT] = {
    [TD_ISA_SCALAR] = &td_ops_scalar,
#if TD_X86
    [TD_ISA_AVX2] = &td_ops_avx2,     [TD_ISA_AVX512] = &td_ops_avx512,
#endif
#if TD_ARM64
    [TD_ISA_NEON] = &td_ops_neon,     [TD_ISA_NEON_DOT] = &td_ops_neon_dot, [TD_ISA_NEON_I8MM] = &td_ops_neon_i8mm,
#endif
};

static td_ops_t g_filled[TD_ISA_COUNT];
static int g_filled_ok = 0;

#define TD_FILL(field)                                                                                                 \
    if (!t->field) t->field = p->field
static void fill_tables(void) {
    /* parents first: a parent's id is not necessarily smaller, so repeat until nothing changes */
    int done[TD_ISA_COUNT] = {0};
    for (int pass = 0; pass < TD_ISA_COUNT; pass++)
        for (int i = 0; i < TD_ISA_COUNT; i++) {
            if (done[i] || !td_tables[i]) continue;
            const int par = td_tables[i]->parent;
            if (par >= 0 && (par >= TD_ISA_COUNT || !td_tables[par] || !done[par])) continue;
            td_ops_t *t = &g_filled[i];
            *t = *td_tables[i];
            if (par >= 0) {
                const td_ops_t *p = &g_filled[par];
                if (!t->i8_lut_min_m) t->i8_lut_min_m = p->i8_lut_min_m;
                if (!t->i16_lut_min_m) t->i16_lut_min_m = p->i16_lut_min_m;
                TD_FILL(lut_f32);
                TD_FILL(gemv_i8);
                TD_FILL(lut_i8);
                TD_FILL(gemv_i16);
                TD_FILL(lut_i16);
                TD_FILL(quantize_row_i8);
                TD_FILL(quantize_row_i16);
                TD_FILL(swiglu);
                TD_FILL(attention_rows);
                TD_FILL(attention_pack);
                TD_FILL(fma_peak);
                TD_FILL(attention_rows_i8);
                TD_FILL(i8dot_peak);
            }
            done[i] = 1;
        }
    g_filled_ok = 1; /* every caller writes the same values: a race here is benign */
}
#undef TD_FILL

const td_ops_t *td_ops_for(int isa) {
    if (isa < 0 || isa >= TD_ISA_COUNT || !td_tables[isa]) return NULL;
    if (!g_filled_ok) fill_tables();
    return &g_filled[isa];
}

int td_isa_supported(int isa) {
    const td_ops_t *t = td_ops_for(isa);
    if (!t) return 0;
    const int f = td_cpu_flags();
    return (f & t->cpu_flags) == t->cpu_flags;
}

int td_best_isa(void) {
    int best = TD_ISA_SCALAR;
    for (int i = 0; i < TD_ISA_COUNT; i++)
        if (td_isa_supported(i) && td_tables[i]->rank > td_tables[best]->rank) best = i;
    return best;
}

static int g_isa = -1; /* -1: not chosen yet */
static const td_ops_t *g_ops = NULL;

int td_get_isa(void) {
    if (g_isa < 0) {
        const int b = td_best_isa();
        g_ops = td_ops_for(b);
        g_isa = b;
    }
    return g_isa;
}

const td_ops_t *td_ops(void) {
    if (g_isa < 0) td_get_isa();
    return g_ops;
}

int td_set_isa(int isa) {
    if (!td_isa_supported(isa)) return -1;
    g_ops = td_ops_for(isa);
    g_isa = isa;
    return 0;
}

const char *td_isa_name(int isa) {
    const td_ops_t *t = isa >= 0 && isa < TD_ISA_COUNT ? td_tables[isa] : NULL;
    if (t) return t->name;
    switch (isa) { /* ids of other architectures' builds */
    case TD_ISA_SCALAR: return "scalar";
    case TD_ISA_AVX2: return "avx2";
    case TD_ISA_AVX512: return "avx512";
    case TD_ISA_NEON: return "neon";
    case TD_ISA_NEON_DOT: return "neon-dotprod";
    case TD_ISA_NEON_I8MM: return "neon-i8mm";
    default: return "unknown";
    }
}

int td_openmp_enabled(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

int td_force_parallel = 0;

void td_set_force_parallel(int on) { td_force_parallel = on ? 1 : 0; }

int td_max_threads(void) {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * int8 quantization (bit-exact with quantize_rows_int8 in terdit_edge/kernels/reference.py) */

/* Round half to even for |v| < 2^22 under the default rounding mode, without libm: adding
 * 1.5 * 2^23 pushes the fraction out of the mantissa. */
static inline float td_rint_small(float v) {
    /* strict IEEE evaluation (no -ffast-math) keeps (v + c) - c from being folded */
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

/* One row to integers of lim levels (127: int8 into xq8; 511: 10 bits into xq16). */
static void quantize_row_scalar(const float *x, int64_t k, int8_t *xq8, int16_t *xq16, int64_t kq, float *scale,
                                int lim) {
    float amax = 0.0f;
    const float flim = (float)lim;
    for (int64_t i = 0; i < k; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    const int ok = amax > 0.0f && isfinite(amax);
    /* zero row -> 0 (reference); a non-finite row has no meaningful integer form: zero too */
    const float inv = ok ? flim / amax : 0.0f;
    for (int64_t i = 0; i < kq; i++) {
        int v = 0;
        if (ok && i < k) {
            float r = td_rint_small(x[i] * inv);
            r = r < flim ? r : flim; /* NaN ends at lim, never at an undefined conversion */
            r = r > -flim ? r : -flim;
            v = (int)r;
        }
        if (xq16) xq16[i] = (int16_t)v;
        else xq8[i] = (int8_t)v;
    }
    *scale = (amax > 0.0f) ? amax / flim : 0.0f;
}

static void quantize_row8_scalar(const float *x, int64_t k, int8_t *xq, int64_t kq, float *scale) {
    quantize_row_scalar(x, k, xq, NULL, kq, scale, 127);
}

static void quantize_row16_scalar(const float *x, int64_t k, int16_t *xq, int64_t kq, float *scale, int lim) {
    quantize_row_scalar(x, k, NULL, xq, kq, scale, lim);
}

/* Rows to int8 (xq8, lim 127) or int16 (xq16, lim up to 511), split across threads. */
static void quantize_rows(const float *x, int64_t m, int64_t k, int64_t ldx, int8_t *xq8, int16_t *xq16, int64_t ldq,
                          float *scale, int lim, int threads) {
    const td_ops_t *ops = td_ops();
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads) if (td_force_parallel || m * k > 65536)
#endif
    for (int64_t r = 0; r < m; r++) {
        if (xq16) ops->quantize_row_i16(x + r * ldx, k, xq16 + r * ldq, ldq, scale + r, lim);
        else ops->quantize_row_i8(x + r * ldx, k, xq8 + r * ldq, ldq, scale + r);
    }
}

void td_quantize_rows_i8(const float *x, int64_t m, int64_t k, int64_t ldx, int8_t *xq, int64_t ldq, float *scale,
                         int threads) {
    quantize_rows(x, m, k, ldx, xq, NULL, ldq, scale, 127, threads);
}

void td_quantize_rows_i16(const float *x, int64_t m, int64_t k, int64_t ldx, int16_t *xq, int64_t ldq, float *scale,
                          int lim, int threads) {
    quantize_rows(x, m, k, ldx, NULL, xq, ldq, scale, lim, threads);
}

/* ---------------------------------------------------------------------------------------------
 * Portable scalar kernels: one row of Q at a time, decoded byte by byte into its four weights;
 * each weight adds, subtracts or skips its activation. */

int td_gemm_f32_scalar(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                       const td_out_t *o, int threads) {
    const int64_t kb = td_padded_k(k) / 4;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) if (td_force_parallel || m * n * k > 100000)
#endif
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *w = packed + row * kb;
        for (int64_t t = 0; t < m; t++) {
            const float *xt = x + t * ldx;
            float acc = 0.0f;
            for (int64_t byte = 0; byte < kb; byte++) {
                const uint8_t v = w[byte];
                const int64_t k0 = (byte / TD_BLOCK_BYTES) * TD_BLOCK_K + byte % TD_BLOCK_BYTES;
                for (int q = 0; q < 4; q++) {
                    const int code = (v >> (2 * q)) & 3;
                    const int64_t kk = k0 + 32 * q;
                    if (kk >= k) continue; /* padding (code 1 in a valid matrix): x ends at k */
                    if (code == 2) acc += xt[kk];
                    else if (code == 0) acc -= xt[kk];
                }
            }
            td_store_f32(o, t, row, acc);
        }
    }
    return TD_OK;
}

/* int8 (xq8) or int16 (xq16) activations, exact int32 sums. */
static int gemm_int_scalar(const int8_t *xq8, const int16_t *xq16, int64_t m, int64_t kp, int64_t ldq,
                           const uint8_t *packed, int64_t n, const td_out_t *o, int threads) {
    const int64_t kb = kp / 4;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) if (td_force_parallel || m * n * kp > 100000)
#endif
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *w = packed + row * kb;
        for (int64_t t = 0; t < m; t++) {
            int32_t acc = 0;
            for (int64_t byte = 0; byte < kb; byte++) {
                const uint8_t v = w[byte];
                const int64_t k0 = (byte / TD_BLOCK_BYTES) * TD_BLOCK_K + byte % TD_BLOCK_BYTES;
                for (int q = 0; q < 4; q++) {
                    const int code = (v >> (2 * q)) & 3;
                    if (code != 0 && code != 2) continue;
                    const int64_t i = t * ldq + k0 + 32 * q;
                    const int32_t xv = xq16 ? xq16[i] : xq8[i];
                    acc += code == 2 ? xv : -xv;
                }
            }
            td_store(o, t, row, acc);
        }
    }
    return TD_OK;
}

int td_gemm_i8_scalar(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                      const td_out_t *o, int threads) {
    return gemm_int_scalar(xq, NULL, m, kp, ldq, packed, n, o, threads);
}

int td_gemm_i16_scalar(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                       const td_out_t *o, int threads) {
    return gemm_int_scalar(NULL, xq, m, kp, ldq, packed, n, o, threads);
}

/* ---------------------------------------------------------------------------------------------
 * Public GEMM entry points */

int td_gemm_f32(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n, float alpha,
                const float *bias, float *y, int64_t ldy, int threads) {
    if (m <= 0 || n <= 0) return TD_OK;
    if (threads < 1) threads = 1;
    td_out_t o = {alpha, NULL, bias, y, ldy, NULL};
    /* fp32 has one kernel per ISA, the tables, at every M: their summation order is fixed by K and the
     * same on every ISA (docs/reproducibility.md) */
    return td_ops()->lut_f32(x, m, k, ldx, packed, n, &o, threads);
}

static int dispatch_i8(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                       const td_out_t *o, int threads) {
    const td_ops_t *ops = td_ops();
    return (m >= ops->i8_lut_min_m ? ops->lut_i8 : ops->gemv_i8)(xq, m, kp, ldq, packed, n, o, threads);
}

int td_gemm_i8(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n, float alpha,
               const float *bias, float *y, int64_t ldy, int threads) {
    if (m <= 0 || n <= 0) return TD_OK;
    if (threads < 1) threads = 1;
    const int64_t kp = td_padded_k(k);
    /* rows padded with zeros to the packing block so the kernels never test for K's end;
     * 64-byte alignment keeps the SIMD loads of a row within as few cache lines as possible */
    const int64_t ldq = kp > 0 ? kp : TD_BLOCK_K;
    size_t bytes = (size_t)m * (size_t)ldq + (size_t)m * sizeof(float) + 64;
    void *buf = malloc(bytes + 64);
    if (!buf) return TD_ENOMEM;
    int8_t *xq = (int8_t *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    float *scale = (float *)(xq + (size_t)m * (size_t)ldq);
    td_quantize_rows_i8(x, m, k, ldx, xq, ldq, scale, threads);
    td_out_t o = {alpha, scale, bias, y, ldy, NULL};
    int rc = dispatch_i8(xq, m, kp, ldq, packed, n, &o, threads);
    free(buf);
    return rc;
}

/* The scalar table's int16 GEMV (few tokens): the integers converted to float32 and run through the
 * float kernel: every partial sum is an integer of magnitude <= lim * K, exact in float32 while that
 * is below 2^24, so the result equals the integer sum; past that bound the scalar integer kernel
 * runs. */
static int gemv_i16_scalar(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                           const td_out_t *o, int threads, int lim) {
    if ((double)lim * (double)kp >= 16777216.0) return td_gemm_i16_scalar(xq, m, kp, ldq, packed, n, o, threads);
    float *xf = td_alloc((size_t)m * (size_t)ldq * sizeof(float));
    if (!xf) return TD_ENOMEM;
    for (int64_t i = 0; i < m * ldq; i++) xf[i] = (float)xq[i];
    const int rc = td_gemm_f32_scalar(xf, m, kp, ldq, packed, n, o, threads);
    td_free(xf);
    return rc;
}

static int lut_i8_portable(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                           const td_out_t *o, int threads) {
    return td_gemm_int_lut(xq, NULL, m, kp, ldq, packed, n, o, threads, 127);
}

static int lut_i16_portable(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                            const td_out_t *o, int threads, int lim) {
    return td_gemm_int_lut(NULL, xq, m, kp, ldq, packed, n, o, threads, lim);
}

/* 9..10-bit activations: quantized into int16, then the table's int16 GEMV or table kernel. */
int td_gemm_int(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n, float alpha,
                const float *bias, float *y, int64_t ldy, int threads, int bits) {
    if (bits < 2 || bits > 10) return TD_EINVAL;
    if (bits == 8) return td_gemm_i8(x, m, k, ldx, packed, n, alpha, bias, y, ldy, threads);
    if (m <= 0 || n <= 0) return TD_OK;
    if (threads < 1) threads = 1;
    const int lim = (1 << (bits - 1)) - 1;
    const int64_t kp = td_padded_k(k);
    const int64_t ldq = kp > 0 ? kp : TD_BLOCK_K;
    int16_t *xq = td_alloc((size_t)m * (size_t)ldq * sizeof(int16_t));
    float *scale = td_alloc((size_t)m * sizeof(float));
    if (!xq || !scale) {
        td_free(xq);
        td_free(scale);
        return TD_ENOMEM;
    }
    td_quantize_rows_i16(x, m, k, ldx, xq, ldq, scale, lim, threads);
    td_out_t o = {alpha, scale, bias, y, ldy, NULL};
    const td_ops_t *ops = td_ops();
    const int rc = (m >= ops->i16_lut_min_m ? ops->lut_i16 : ops->gemv_i16)(xq, m, kp, ldq, packed, n, &o, threads,
                                                                            lim);
    td_free(xq);
    td_free(scale);
    return rc;
}

int td_gemm_i8_acc(const int8_t *xq, int64_t m, int64_t k, int64_t ldq, const uint8_t *packed, int64_t n, int32_t *acc,
                   int threads) {
    if (m <= 0 || n <= 0) return TD_OK;
    if (threads < 1) threads = 1;
    td_out_t o = {1.0f, NULL, NULL, NULL, n, acc};
    return dispatch_i8(xq, m, td_padded_k(k), ldq, packed, n, &o, threads);
}

/* ---------------------------------------------------------------------------------------------
 * Fused per-token ops. Sums run in double so that their error stays below float32 rounding of
 * the result, whatever order the reference sums in. Each row is summed in one fixed order (four
 * running sums over i % 4, then the tail), which no vectorizer may change and which does not depend
 * on where the row sits in memory: a token's result is the same in every batch (batch invariance;
 * a vectorized reduction could peel a different number of elements for another alignment). */

static inline double sum_f64(const float *x, int64_t d) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) {
        s0 += (double)x[i];
        s1 += (double)x[i + 1];
        s2 += (double)x[i + 2];
        s3 += (double)x[i + 3];
    }
    for (; i < d; i++) s0 += (double)x[i];
    return (s0 + s1) + (s2 + s3);
}

/* sum of (x[i] - c)^2 in double */
static inline double sum_sq_f64(const float *x, int64_t d, float c) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) {
        const double a0 = (double)(x[i] - c), a1 = (double)(x[i + 1] - c);
        const double a2 = (double)(x[i + 2] - c), a3 = (double)(x[i + 3] - c);
        s0 += a0 * a0;
        s1 += a1 * a1;
        s2 += a2 * a2;
        s3 += a3 * a3;
    }
    for (; i < d; i++) {
        const double a = (double)(x[i] - c);
        s0 += a * a;
    }
    return (s0 + s1) + (s2 + s3);
}

void td_rmsnorm_modulate(const float *x, const float *weight, const float *shift, const float *scale, float *out,
                         int64_t rows, int64_t rows_per_group, int64_t d, float eps, int threads) {
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads) if (td_force_parallel || rows * d > 32768)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        const int64_t g = r / rows_per_group;
        const float *sh = shift + g * d, *sc = scale + g * d;
        const float ms = (float)(sum_sq_f64(xr, d, 0.0f) / (double)d);
        const float inv = 1.0f / sqrtf(ms + eps);
        float *o = out + r * d;
        for (int64_t i = 0; i < d; i++) o[i] = ((xr[i] * inv) * weight[i]) * (1.0f + sc[i]) + sh[i];
    }
}

void td_layernorm(const float *x, const float *weight, const float *bias, float *out, int64_t rows, int64_t d,
                  float eps, int threads) {
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads) if (td_force_parallel || rows * d > 32768)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        const float mean = (float)(sum_f64(xr, d) / (double)d);
        const float var = (float)(sum_sq_f64(xr, d, mean) / (double)d);
        const float den = sqrtf(var + eps);
        float *o = out + r * d;
        if (weight) {
            for (int64_t i = 0; i < d; i++) o[i] = ((xr[i] - mean) / den) * weight[i] + bias[i];
        } else {
            for (int64_t i = 0; i < d; i++) o[i] = (xr[i] - mean) / den;
        }
    }
}

/* Full-precision linear layer (the embedders and the final layer): one summation order on every CPU.
 * Each output is eight partial sums over k mod 8 (each product rounded, then added: no FMA), combined
 * as ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), then + bias. The eight sums are one GCC/Clang
 * vector (two SSE or NEON registers, one AVX2 register in the AVX2 clone below; plain loops for other
 * compilers): lanes never mix, so the instruction set changes nothing. Tiles of DENSE_MR rows x
 * DENSE_NR outputs share their loads. Every output depends only on its row of x and of w, never on m,
 * the row's position or the thread split (batch invariance). */
#define DENSE_MR 4 /* rows of x per tile */
#define DENSE_NR 2 /* outputs per tile */
#if defined(__GNUC__) || defined(__clang__)
typedef float dense_v8 __attribute__((vector_size(8 * sizeof(float))));
#define DENSE_INLINE static inline __attribute__((always_inline))
#define DENSE_VEC 1
#else
#define DENSE_INLINE static inline
#define DENSE_VEC 0
#endif

static inline float dense_finish(const float s[8], const float *bias, int64_t j) {
    const float v = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    return bias ? v + bias[j] : v;
}

/* Outputs n0..n1-1 of rows r0..r1-1 (r1 - r0 <= DENSE_MR). */
DENSE_INLINE void dense_block(const float *x, int64_t r0, int64_t r1, int64_t k, const float *w, int64_t n0, int64_t n1,
                              const float *bias, float *y, int64_t n) {
    const int64_t k8 = k / 8 * 8;
    const int mr = (int)(r1 - r0);
    for (int64_t j = n0; j < n1; j += DENSE_NR) {
        const int nr = (int)(n1 - j < DENSE_NR ? n1 - j : DENSE_NR);
        float s[DENSE_MR][DENSE_NR][8];
#if DENSE_VEC
        dense_v8 acc[DENSE_MR][DENSE_NR];
        for (int r = 0; r < DENSE_MR; r++)
            for (int c = 0; c < DENSE_NR; c++) acc[r][c] = (dense_v8){0};
        for (int64_t i = 0; i < k8; i += 8) {
            dense_v8 wv[DENSE_NR];
            for (int c = 0; c < DENSE_NR; c++) memcpy(&wv[c], w + (j + (c < nr ? c : 0)) * k + i, sizeof(dense_v8));
            for (int r = 0; r < DENSE_MR; r++) {
                dense_v8 xv;
                memcpy(&xv, x + (r0 + (r < mr ? r : 0)) * k + i, sizeof xv);
                for (int c = 0; c < DENSE_NR; c++) acc[r][c] += xv * wv[c];
            }
        }
        for (int r = 0; r < DENSE_MR; r++)
            for (int c = 0; c < DENSE_NR; c++) memcpy(s[r][c], &acc[r][c], sizeof acc[r][c]);
#else
        for (int r = 0; r < DENSE_MR; r++)
            for (int c = 0; c < DENSE_NR; c++)
                for (int l = 0; l < 8; l++) s[r][c][l] = 0.0f;
        for (int64_t i = 0; i < k8; i += 8)
            for (int r = 0; r < mr; r++)
                for (int c = 0; c < nr; c++)
                    for (int l = 0; l < 8; l++) s[r][c][l] += x[(r0 + r) * k + i + l] * w[(j + c) * k + i + l];
#endif
        for (int r = 0; r < mr; r++)
            for (int c = 0; c < nr; c++) {
                const float *xr = x + (r0 + r) * k, *wj = w + (j + c) * k;
                for (int64_t i = k8; i < k; i++) s[r][c][i - k8] += xr[i] * wj[i];
                y[(r0 + r) * n + j + c] = dense_finish(s[r][c], bias, j + c);
            }
    }
}

static void dense_block_base(const float *x, int64_t r0, int64_t r1, int64_t k, const float *w, int64_t n0, int64_t n1,
                             const float *bias, float *y, int64_t n) {
    dense_block(x, r0, r1, k, w, n0, n1, bias, y, n);
}

#if TD_X86
/* The same source with 256-bit registers: the same operations per lane, so the same bits. */
__attribute__((target("avx2"))) static void dense_block_avx2(const float *x, int64_t r0, int64_t r1, int64_t k,
                                                             const float *w, int64_t n0, int64_t n1, const float *bias,
                                                             float *y, int64_t n) {
    dense_block(x, r0, r1, k, w, n0, n1, bias, y, n);
}
#endif

void td_dense_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias, float *y,
                  int threads) {
    if (m <= 0 || n <= 0) return;
    void (*block)(const float *, int64_t, int64_t, int64_t, const float *, int64_t, int64_t, const float *, float *,
                  int64_t) = dense_block_base;
#if TD_X86
    if (td_get_isa() != TD_ISA_SCALAR && (td_cpu_flags() & TD_CPU_AVX2)) block = dense_block_avx2;
#endif
    const int64_t chunk = 64; /* outputs per work item: a multiple of DENSE_NR */
    const int64_t nchunks = (n + chunk - 1) / chunk, mtiles = (m + DENSE_MR - 1) / DENSE_MR;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (td_force_parallel || m * n * k > 1 << 20)
#endif
    for (int64_t item = 0; item < mtiles * nchunks; item++) {
        const int64_t r0 = (item / nchunks) * DENSE_MR, n0 = (item % nchunks) * chunk;
        const int64_t r1 = r0 + DENSE_MR < m ? r0 + DENSE_MR : m, n1 = n0 + chunk < n ? n0 + chunk : n;
        block(x, r0, r1, k, w, n0, n1, bias, y, n);
    }
}

static void swiglu_scalar(const float *a, const float *b, float *out, int64_t count) {
    for (int64_t i = 0; i < count; i++) out[i] = a[i] / (1.0f + td_expf_poly(0.0f - a[i])) * b[i];
}

void td_swiglu(const float *a, const float *b, float *out, int64_t count, int threads) {
    const int64_t chunk = 4096;
    const td_ops_t *ops = td_ops();
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if (td_force_parallel || count > 32768)
#endif
    for (int64_t c0 = 0; c0 < count; c0 += chunk) {
        const int64_t c1 = c0 + chunk < count ? c0 + chunk : count;
        ops->swiglu(a + c0, b + c0, out + c0, c1 - c0);
    }
}

void td_add_gated(float *x, const float *gate, const float *y, int64_t rows, int64_t rows_per_group, int64_t d,
                  int threads) {
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads) if (td_force_parallel || rows * d > 32768)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + (r / rows_per_group) * d;
        float *xr = x + r * d;
        const float *yr = y + r * d;
        for (int64_t i = 0; i < d; i++) xr[i] = xr[i] + g[i] * yr[i];
    }
}

void td_rope(float *x, const float *cos_t, const float *sin_t, int64_t b, int64_t t, int64_t h, int64_t hd,
             int threads) {
    const int64_t half = hd / 2;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads) if (td_force_parallel || b * t * h * hd > 32768)
#endif
    for (int64_t bt = 0; bt < b * t; bt++) {
        const int64_t pos = bt % t;
        const float *c = cos_t + pos * half, *s = sin_t + pos * half;
        for (int64_t hh = 0; hh < h; hh++) {
            float *v = x + (bt * h + hh) * hd;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * c[i] - x1 * s[i];
                v[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Softmax attention (not causal), fused: scores, softmax and the weighted sum of values for a
 * block of query rows at a time, so no (T, T) matrix is ever stored; scratch is O(T * hd) per
 * thread. Work items are (batch, head, query chunk); a thread rebuilds its key and value panels
 * only when the (batch, kv head) changes.
 *
 * Panels: the keys are stored as tp / 16 panels of (hd, 16) floats (panel p holds keys 16p..16p+15,
 * row d their d-th components; keys t..tp-1 are zero), the values as hdp / 16 panels of (t, 16)
 * floats (panel p holds components 16p..16p+15 of every value; components hd..hdp-1 are zero). A
 * register tile then reads one contiguous stream per panel instead of one cache line per row of a
 * (hd, tp) matrix 4 tp bytes apart (at T = 1024 every load touched a new page and the same L1 set).
 * The layout changes no arithmetic: every score and output sums in the same order as before. */

/* Keys jj0..jj1-1 of a 16-key panel kp (hd, 16), components d0..hd-1; key jj at k[jj * ld]. */
void td_att_key_rows(const float *k, int64_t ld, int64_t hd, float *kp, int64_t jj0, int64_t jj1, int64_t d0) {
    for (int64_t jj = jj0; jj < jj1; jj++) {
        const float *kj = k + jj * ld;
        for (int64_t d = d0; d < hd; d++) kp[d * 16 + jj] = kj[d];
    }
}

/* Value panels: hd rounded up to 16 / 16 panels of (t, 16), zero beyond hd. */
void td_att_pack_values(const float *v, int64_t ld, int64_t t, int64_t hd, float *vs) {
    const int64_t hdp = (hd + 15) / 16 * 16;
    for (int64_t c0 = 0; c0 < hdp; c0 += 16) {
        float *vp = vs + c0 * t;
        if (c0 + 16 <= hd) {
            for (int64_t j = 0; j < t; j++)
                for (int cc = 0; cc < 16; cc++) vp[j * 16 + cc] = v[j * ld + c0 + cc];
        } else {
            for (int64_t j = 0; j < t; j++)
                for (int cc = 0; cc < 16; cc++) vp[j * 16 + cc] = c0 + cc < hd ? v[j * ld + c0 + cc] : 0.0f;
        }
    }
}

/* Key and value panels of one (batch, kv head): key j, component d at k[j * ld + d] (same for v). */
static void attention_pack_scalar(const float *k, const float *v, int64_t ld, int64_t t, int64_t hd, float *kt,
                                  float *vs) {
    for (int64_t j0 = 0; j0 < t; j0 += 16) { /* keys: blocks of 16 keys x hd, transposed */
        float *kp = kt + j0 * hd;
        const int64_t nj = t - j0 < 16 ? t - j0 : 16;
        if (nj < 16) memset(kp, 0, sizeof(float) * (size_t)(16 * hd));
        td_att_key_rows(k + j0 * ld, ld, hd, kp, 0, nj, 0);
    }
    td_att_pack_values(v, ld, t, hd, vs);
}

/* Portable path, one query row at a time; the inner loops run over the 16 contiguous floats of a
 * panel (see td_attention) so that the compiler makes them SIMD (NEON at -O2/-O3, SSE on x86).
 * Every score sums over d in order and every output over keys in order, as the SIMD paths do. */
/* GCC's loop vectorizer would vectorize the d (and key) loops below across iterations with
 * shuffles, 5x slower than letting the 16-wide accumulator loops become plain SIMD adds. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-vectorize")))
#endif
static void
attention_rows_scalar(const float *q, int64_t ldq, int64_t i0, int64_t i1, const float *kt, const float *vs, int64_t t,
                      int64_t tp, int64_t hd, int64_t hdp, float scale, float *s, float *ob, float *out, int64_t ldo) {
    for (int64_t i = i0; i < i1; i++) {
        const float *qi = q + i * ldq;
        for (int64_t j0 = 0; j0 < tp; j0 += 16) {
            float acc[16];
            for (int jj = 0; jj < 16; jj++) acc[jj] = 0.0f;
            const float *kp = kt + j0 * hd;
            for (int64_t d = 0; d < hd; d++) {
                const float qd = qi[d], *kr = kp + d * 16;
                for (int jj = 0; jj < 16; jj++) acc[jj] += qd * kr[jj];
            }
            for (int jj = 0; jj < 16; jj++) s[j0 + jj] = acc[jj];
        }
        float m = s[0];
        for (int64_t j = 1; j < t; j++) m = s[j] > m ? s[j] : m;
        const float ms = m * scale; /* scale > 0: max(scale s) = scale max(s) */
        float tot = 0.0f;
        for (int64_t j = 0; j < t; j++) {
            s[j] = td_expf_poly(fmaf(s[j], scale, -ms));
            tot += s[j];
        }
        for (int64_t c0 = 0; c0 < hdp; c0 += 16) {
            float acc[16];
            for (int cc = 0; cc < 16; cc++) acc[cc] = 0.0f;
            const float *vp = vs + c0 * t;
            for (int64_t j = 0; j < t; j++) {
                const float p = s[j], *vr = vp + j * 16;
                for (int cc = 0; cc < 16; cc++) acc[cc] += p * vr[cc];
            }
            for (int cc = 0; cc < 16; cc++) ob[c0 + cc] = acc[cc];
        }
        const float inv = 1.0f / tot;
        float *o = out + i * ldo;
        for (int64_t c = 0; c < hd; c++) o[c] = ob[c] * inv;
    }
}


/* How the attention drivers split their work: returns the threads to use and the query chunk (a
 * multiple of the row tiles) and chunk count per (batch, head): enough items for the threads to balance.
 * Below ~0.5 ms of work one thread is faster than waking another (see docs/kernels.md). */
static int att_work_split(int64_t b, int64_t t, int64_t h, int64_t hd, int threads, int64_t *chunk, int64_t *nq) {
    if (!td_force_parallel && (double)b * h * t * t * hd < 4e6) threads = 1;
    int64_t n = threads == 1 ? 1 : (4 * (int64_t)threads + b * h - 1) / (b * h);
    int64_t c = (t + n - 1) / n;
    c = (c + TD_ATT_MAX_ROWS - 1) / TD_ATT_MAX_ROWS * TD_ATT_MAX_ROWS;
    *chunk = c;
    *nq = (t + c - 1) / c;
    return threads;
}

int td_attention(const float *q, const float *k, const float *v, float *out, int64_t b, int64_t t, int64_t h,
                 int64_t hkv, int64_t hd, int threads) {
    if (b <= 0 || t <= 0 || h <= 0 || hd <= 0) return TD_OK;
    if (hkv <= 0 || h % hkv) return TD_EINVAL;
    if (threads < 1) threads = 1;
    const int64_t rep = h / hkv, tp = (t + 15) / 16 * 16, hdp = (hd + 15) / 16 * 16;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const td_ops_t *ops = td_ops();
    const td_att_rows_fn rows_fn = ops->attention_rows;
    int64_t chunk, nq;
    threads = att_work_split(b, t, h, hd, threads, &chunk, &nq);
    const int64_t items = b * h * nq;
    int err = 0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
        float *kt = td_alloc(sizeof(float) * (size_t)(hd * tp));
        float *vs = td_alloc(sizeof(float) * (size_t)(t * hdp));
        float *s = td_alloc(sizeof(float) * (size_t)(TD_ATT_MAX_ROWS * tp));
        float *ob = td_alloc(sizeof(float) * (size_t)(TD_ATT_MAX_ROWS * hdp));
        const int ok = kt && vs && s && ob;
        int64_t built = -1; /* batch * hkv + kv head whose keys/values are in kt/vs */
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t it = 0; it < items; it++) {
            if (!ok) {
                err = 1;
                continue;
            }
            const int64_t bh = it / nq, qc = it % nq, bb = bh / h, hh = bh % h, kvh = hh / rep;
            if (built != bb * hkv + kvh) {
                built = bb * hkv + kvh;
                ops->attention_pack(k + (bb * t * hkv + kvh) * hd, v + (bb * t * hkv + kvh) * hd, hkv * hd, t, hd, kt,
                                    vs);
            }
            const int64_t i0 = qc * chunk, i1 = i0 + chunk < t ? i0 + chunk : t;
            const float *qh = q + (bb * t * h + hh) * hd;
            float *oh = out + (bb * t * h + hh) * hd;
            rows_fn(qh, h * hd, i0, i1, kt, vs, t, tp, hd, hdp, scale, s, ob, oh, h * hd);
        }
        td_free(kt);
        td_free(vs);
        td_free(s);
        td_free(ob);
    }
    return err ? TD_ENOMEM : TD_OK;
}

/* ---------------------------------------------------------------------------------------------
 * int8 attention (td_attention_int8; the arithmetic is spelled out at td_att8_kv_t in
 * ternary_internal.h). The keys and values of one (batch, kv head) are quantized here, by portable
 * code shared by every path, so that every path multiplies the same integers. */

/* kq/ks/kcorr/vq/vsc of one (batch, kv head); key j, component d at k[j * ld + d] (same for v).
 * mean (hd doubles), row (hd floats) and rq (hd4 bytes) are scratch. */
static void att8_pack(const td_ops_t *ops, const float *k, const float *v, int64_t ld, int64_t t, int64_t hd,
                      int64_t hd4, int64_t tp, int64_t hdp, int8_t *kq, float *ks, int32_t *kcorr, int16_t *vq,
                      float *vsc, double *mean, float *meanf, float *row, int8_t *rq) {
    /* K's mean over the tokens, per component (double sums in token order) */
    for (int64_t d = 0; d < hd; d++) mean[d] = 0.0;
    for (int64_t j = 0; j < t; j++)
        for (int64_t d = 0; d < hd; d++) mean[d] += (double)k[j * ld + d];
    for (int64_t d = 0; d < hd; d++) meanf[d] = (float)(mean[d] / (double)t);
    const int64_t ng = hd4 / 4;
    memset(kq, 0, (size_t)(tp * hd4));
    for (int64_t j = 0; j < tp; j++) {
        if (j >= t) {
            ks[j] = 0.0f;
            kcorr[j] = 0;
            continue;
        }
        for (int64_t d = 0; d < hd; d++) row[d] = k[j * ld + d] - meanf[d];
        ops->quantize_row_i8(row, hd, rq, hd4, ks + j);
        int32_t sum = 0;
        int8_t *dst = kq + (j / 16) * ng * 64 + (j % 16) * 4;
        for (int64_t g = 0; g < ng; g++)
            for (int dd = 0; dd < 4; dd++) {
                dst[g * 64 + dd] = rq[4 * g + dd];
                sum += rq[4 * g + dd];
            }
        kcorr[j] = 128 * sum;
    }
    /* values: per channel absmax / TD_ATT8_VLIM, round half to even; row = absmax, then 1 / step */
    const float flim = (float)TD_ATT8_VLIM;
    memset(vq, 0, sizeof(int16_t) * (size_t)(tp * hdp));
    for (int64_t c = 0; c < hdp; c++) vsc[c] = 0.0f;
    for (int64_t c = 0; c < hd; c++) row[c] = 0.0f;
    for (int64_t j = 0; j < t; j++)
        for (int64_t c = 0; c < hd; c++) {
            const float a = fabsf(v[j * ld + c]);
            row[c] = a > row[c] ? a : row[c];
        }
    for (int64_t c = 0; c < hd; c++) {
        const float amax = row[c];
        const int ok = amax > 0.0f && isfinite(amax);
        vsc[c] = ok ? amax / flim : 0.0f;
        row[c] = ok ? flim / amax : 0.0f;
    }
    for (int64_t j = 0; j < t; j++) {
        int16_t *dst = vq + (j / 2) * 32 + (j & 1);
        const float *vj = v + j * ld;
        for (int64_t c0 = 0; c0 < hd; c0 += 16) {
            const int64_t nc = hd - c0 < 16 ? hd - c0 : 16;
            int16_t tmp[16];
            for (int64_t cc = 0; cc < nc; cc++) {
                float r = td_rint_small(vj[c0 + cc] * row[c0 + cc]);
                r = r < flim ? r : flim;
                r = r > -flim ? r : -flim;
                tmp[cc] = (int16_t)r;
            }
            int16_t *dp = dst + c0 * tp;
            for (int64_t cc = 0; cc < nc; cc++) dp[cc * 2] = tmp[cc];
        }
    }
}

/* p_j = rne(exp(c x_j - c m) * PMAX) for j < t, 0 up to tp; returns their (exact) sum. */
int32_t td_att8_softmax_row(const float *x, int64_t t, int64_t tp, float c, int16_t *p) {
    float m = x[0];
    for (int64_t j = 1; j < t; j++) m = x[j] > m ? x[j] : m;
    const float mc = m * c;
    int32_t tot = 0;
    for (int64_t j = 0; j < t; j++) {
        const float e = td_expf_poly(fmaf(x[j], c, -mc));
        const int32_t pj = (int32_t)td_rint_small(e * (float)TD_ATT8_PMAX);
        p[j] = (int16_t)pj;
        tot += pj;
    }
    for (int64_t j = t; j < tp; j++) p[j] = 0;
    return tot;
}

/* out_c = (sum over key blocks of float(int32 block sum of p_j vq_jc)) * vsc_c * (1 / tot) */
void td_att8_pv_row(const td_att8_kv_t *kv, const int16_t *p, int32_t tot, float *ob, float *out) {
    const int64_t tp = kv->tp;
    for (int64_t c0 = 0; c0 < kv->hdp; c0 += 16) {
        float facc[16];
        for (int cc = 0; cc < 16; cc++) facc[cc] = 0.0f;
        const int16_t *vp = kv->vq + c0 * tp;
        for (int64_t j0 = 0; j0 < tp; j0 += TD_ATT8_KBLK) {
            const int64_t j1 = j0 + TD_ATT8_KBLK < tp ? j0 + TD_ATT8_KBLK : tp;
            int32_t acc[16];
            for (int cc = 0; cc < 16; cc++) acc[cc] = 0;
            for (int64_t j = j0; j < j1; j += 2) {
                const int32_t p0 = p[j], p1 = p[j + 1];
                const int16_t *vr = vp + (j / 2) * 32;
                for (int cc = 0; cc < 16; cc++) acc[cc] += p0 * vr[2 * cc] + p1 * vr[2 * cc + 1];
            }
            for (int cc = 0; cc < 16; cc++) facc[cc] += (float)acc[cc];
        }
        for (int cc = 0; cc < 16; cc++) ob[c0 + cc] = facc[cc];
    }
    const float inv = 1.0f / (float)tot;
    for (int64_t c = 0; c < kv->hd; c++) out[c] = (ob[c] * kv->vsc[c]) * inv;
}

static void attention_rows_i8_scalar(const td_att8_kv_t *kv, const int8_t *qq, const float *qs, int64_t n, float *s,
                                     int16_t *pp, float *ob, float *out, int64_t ldo) {
    const int64_t ng = kv->hd4 / 4;
    for (int64_t r = 0; r < n; r++) {
        const int8_t *qi = qq + r * kv->hd4;
        for (int64_t j = 0; j < kv->tp; j++) {
            const int8_t *kp = kv->kq + (j / 16) * ng * 64 + (j % 16) * 4;
            int32_t acc = 0;
            for (int64_t g = 0; g < ng; g++)
                for (int dd = 0; dd < 4; dd++) acc += (int32_t)qi[4 * g + dd] * kp[g * 64 + dd];
            s[j] = (float)acc * kv->ks[j];
        }
        const int32_t tot = td_att8_softmax_row(s, kv->t, kv->tp, qs[r] * kv->scale, pp);
        td_att8_pv_row(kv, pp, tot, ob, out + r * ldo);
    }
}

int td_attention_int8(const float *q, const float *k, const float *v, float *out, int64_t b, int64_t t, int64_t h,
                      int64_t hkv, int64_t hd, int threads) {
    if (b <= 0 || t <= 0 || h <= 0 || hd <= 0) return TD_OK;
    if (hkv <= 0 || h % hkv) return TD_EINVAL;
    if (threads < 1) threads = 1;
    const int64_t rep = h / hkv, tp = (t + 15) / 16 * 16, hdp = (hd + 15) / 16 * 16, hd4 = (hd + 3) / 4 * 4;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const td_ops_t *ops = td_ops();
    const td_att8_rows_fn rows_fn = ops->attention_rows_i8;
    int64_t chunk, nq;
    threads = att_work_split(b, t, h, hd, threads, &chunk, &nq);
    const int64_t items = b * h * nq;
    int err = 0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
        int8_t *kq = td_alloc((size_t)(tp * hd4));
        float *ks = td_alloc(sizeof(float) * (size_t)tp);
        int32_t *kcorr = td_alloc(sizeof(int32_t) * (size_t)tp);
        int16_t *vq = td_alloc(sizeof(int16_t) * (size_t)(tp * hdp));
        float *vsc = td_alloc(sizeof(float) * (size_t)hdp);
        double *mean = td_alloc(sizeof(double) * (size_t)hd);
        float *row = td_alloc(sizeof(float) * (size_t)hd), *meanf = td_alloc(sizeof(float) * (size_t)hd);
        int8_t *rq = td_alloc((size_t)hd4);
        int8_t *qq = td_alloc((size_t)(chunk * hd4));
        float *qs = td_alloc(sizeof(float) * (size_t)chunk);
        float *s = td_alloc(sizeof(float) * (size_t)(TD_ATT_MAX_ROWS * tp));
        int16_t *pp = td_alloc(sizeof(int16_t) * (size_t)(TD_ATT_MAX_ROWS * tp));
        float *ob = td_alloc(sizeof(float) * (size_t)(TD_ATT_MAX_ROWS * hdp));
        const int ok = kq && ks && kcorr && vq && vsc && mean && row && meanf && rq && qq && qs && s && pp && ob;
        const td_att8_kv_t kv = {kq, ks, kcorr, vq, vsc, t, tp, hd, hd4, hdp, scale};
        int64_t built = -1;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t it = 0; it < items; it++) {
            if (!ok) {
                err = 1;
                continue;
            }
            const int64_t bh = it / nq, qc = it % nq, bb = bh / h, hh = bh % h, kvh = hh / rep;
            if (built != bb * hkv + kvh) {
                built = bb * hkv + kvh;
                att8_pack(ops, k + (bb * t * hkv + kvh) * hd, v + (bb * t * hkv + kvh) * hd, hkv * hd, t, hd, hd4, tp,
                          hdp, kq, ks, kcorr, vq, vsc, mean, meanf, row, rq);
            }
            const int64_t i0 = qc * chunk, i1 = i0 + chunk < t ? i0 + chunk : t;
            const float *qh = q + (bb * t * h + hh) * hd;
            for (int64_t i = i0; i < i1; i++)
                ops->quantize_row_i8(qh + i * h * hd, hd, qq + (i - i0) * hd4, hd4, qs + (i - i0));
            float *oh = out + (bb * t * h + hh) * hd;
            rows_fn(&kv, qq, qs, i1 - i0, s, pp, ob, oh + i0 * h * hd, h * hd);
        }
        td_free(kq);
        td_free(ks);
        td_free(kcorr);
        td_free(vq);
        td_free(vsc);
        td_free(mean);
        td_free(row);
        td_free(meanf);
        td_free(rq);
        td_free(qq);
        td_free(qs);
        td_free(s);
        td_free(pp);
        td_free(ob);
    }
    return err ? TD_ENOMEM : TD_OK;
}

/* ---------------------------------------------------------------------------------------------
 * FMA peak: 32 independent multiply-add chains the compiler turns into SIMD (without FMA
 * instructions on a plain x86-64 build: a multiply and an add, still 2 operations per lane). */
static double fma_peak_scalar(int64_t iters, float *sink) {
    float a[32];
    for (int i = 0; i < 32; i++) a[i] = (float)i;
    const float x = 0.999f, y = 0.001f;
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 32; i++) a[i] = a[i] * x + y;
    float tot = 0.0f;
    for (int i = 0; i < 32; i++) tot += a[i];
    *sink = tot;
    return 64.0 * (double)iters;
}

/* int8 dot products: 32 independent int32 chains of 4 byte products each (8 operations per step) */
static double i8dot_peak_scalar(int64_t iters, float *sink) {
    int32_t a[32];
    int8_t x[4] = {3, -1, 2, 5}, y[4] = {-2, 7, 1, 3};
    for (int i = 0; i < 32; i++) a[i] = i;
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 32; i++) a[i] += x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3] + (a[i] >> 30);
    int32_t tot = 0;
    for (int i = 0; i < 32; i++) tot += a[i];
    *sink = (float)tot;
    return 256.0 * (double)iters;
}

double td_i8dot_peak(int64_t iters, int threads) {
    if (threads < 1) threads = 1;
    const td_fma_fn fn = td_ops()->i8dot_peak;
    double ops = 0.0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(+ : ops)
#endif
    {
        float sink;
        ops += fn(iters, &sink);
    }
    return ops;
}

double td_fma_peak(int64_t iters, int threads) {
    if (threads < 1) threads = 1;
    const td_fma_fn fn = td_ops()->fma_peak; /* called through a pointer: its loop cannot be dropped */
    double flops = 0.0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(+ : flops)
#endif
    {
        float sink;
        flops += fn(iters, &sink);
    }
    return flops;
}

/* ---------------------------------------------------------------------------------------------
 * The root table: every entry portable C. */
const td_ops_t td_ops_scalar = {
    .isa = TD_ISA_SCALAR,
    .name = "scalar",
    .parent = -1,
    .rank = 0,
    .cpu_flags = 0,
    .i8_lut_min_m = TD_LUT_MIN_M,
    .i16_lut_min_m = TD_LUT_MIN_M,
    .lut_f32 = td_gemm_f32_lut,
    .gemv_i8 = td_gemm_i8_scalar,
    .lut_i8 = lut_i8_portable,
    .gemv_i16 = gemv_i16_scalar,
    .lut_i16 = lut_i16_portable,
    .quantize_row_i8 = quantize_row8_scalar,
    .quantize_row_i16 = quantize_row16_scalar,
    .swiglu = swiglu_scalar,
    .attention_rows = attention_rows_scalar,
    .attention_pack = attention_pack_scalar,
    .fma_peak = fma_peak_scalar,
    .attention_rows_i8 = attention_rows_i8_scalar,
    .i8dot_peak = i8dot_peak_scalar,
};
