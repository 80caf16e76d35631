/* Declarations shared by the per-ISA kernel files (not part of the public C API). */
#ifndef TERDIT_TERNARY_INTERNAL_H
#define TERDIT_TERNARY_INTERNAL_H

#include "ternary_gemm.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(_WIN32)
#include <malloc.h>
#endif

/* The SIMD files rely on GCC/Clang target attributes and builtins; other compilers get the
 * portable scalar kernels only. */
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define TD_X86 1
#else
#define TD_X86 0
#endif
#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define TD_ARM64 1
#else
#define TD_ARM64 0
#endif

/* e^x, the one exp of every kernel: Cody-Waite reduction (x = n ln2 + r, |r| <= ln2 / 2) and a
 * degree-5 polynomial for e^r, clamped to [-87, 88]. The SIMD kernels (exp_avx2, exp512, exp_neon)
 * are this function lane by lane, with the same fused steps; fmaf is a single rounding on every
 * machine (an instruction where the target has FMA, libm's correctly rounded fmaf elsewhere), so the
 * scalar tails of those kernels and the portable kernels give the SIMD lanes' bits on every CPU
 * (docs/reproducibility.md). NaN maps to e^-87, as in the vector code (max(NaN, -87) = -87). */
static inline float td_expf_poly(float x) {
    x = x > -87.0f ? x : -87.0f; /* written as the SIMD max/min: NaN fails the test and becomes -87 */
    x = x < 88.0f ? x : 88.0f;
    const float n = nearbyintf(x * 1.44269504088896341f);
    float r = fmaf(-n, 0.693359375f, x);
    r = fmaf(-n, -2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    const float y = fmaf(p * r, r, r) + 1.0f;
    union {
        int32_t i;
        float f;
    } e;
    e.i = ((int32_t)n + 127) * (1 << 23);
    return y * e.f;
}

#define TD_BLOCK_K 128
#define TD_BLOCK_BYTES 32

static inline int64_t td_padded_k(int64_t k) { return (k + TD_BLOCK_K - 1) / TD_BLOCK_K * TD_BLOCK_K; }

/* Every kernel below writes either int32 sums (acc != NULL, row stride ld) or the final float32
 * outputs y = float(acc) * (scale[m] * alpha) + bias (acc == NULL). */
typedef struct {
    float alpha;
    const float *scale; /* int8 mode: per-row activation scale; NULL in fp32 mode */
    const float *bias; /* (n,) or NULL */
    float *y; /* (m, n) with row stride ldy */
    int64_t ldy;
    int32_t *acc; /* int8 mode only: raw sums instead of y when not NULL */
} td_out_t;

/* Work split of the table GEMMs (AVX2 and portable): token blocks of `tb` first (their tables are
 * built once and shared by all rows), rows cut into ranges of at most `max_rows` (bounding the
 * per-row partial sums; longer ranges build fewer tables), and cut further when there are fewer
 * blocks than threads, keeping >= 64 rows per table build. Work item i is token block i / nsplit,
 * rows (i % nsplit) * rows_per onward. */
static inline void td_lut_split(int64_t m, int tb, int64_t n, int threads, int64_t max_rows, int64_t *ntb,
                                int64_t *nsplit, int64_t *rows_per) {
    *ntb = (m + tb - 1) / tb;
    *nsplit = (n + max_rows - 1) / max_rows;
    if (*ntb * *nsplit < threads) {
        int64_t want = (threads + *ntb - 1) / *ntb;
        if (want > (n + 63) / 64) want = (n + 63) / 64;
        if (want > *nsplit) *nsplit = want;
    }
    if (*nsplit < 1) *nsplit = 1;
    *rows_per = (n + *nsplit - 1) / *nsplit;
}

/* Set by td_set_force_parallel: 1 = split even tiny problems across threads (tests). */
extern int td_force_parallel;

/* ---------------------------------------------------------------------------------------------
 * One table of kernels per instruction set. A table may leave any entry NULL: it is then filled,
 * once, from its parent table (AVX-512 -> AVX2 -> scalar, NEON dot-product -> NEON -> scalar), so a
 * new ISA provides only the kernels it improves. Every GEMM mode has a streaming entry for few
 * tokens (gemv) and a table entry for many (lut), switched at *_lut_min_m tokens (0: the parent's
 * switch, which a table should only inherit together with both kernels of that mode).
 * Adding an ISA: an enum id in ternary_gemm.h, its table in its own file, one line in td_tables
 * (ternary_gemm.c), its name in _ternary.pyx; the tests and the C harness loop over every
 * supported id on their own. */
typedef int (*td_f32_fn)(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                         const td_out_t *o, int threads);
typedef int (*td_i8_fn)(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                        const td_out_t *o, int threads);
/* xq holds integers of |x| <= lim (lim <= 511) */
typedef int (*td_i16_fn)(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                         const td_out_t *o, int threads, int lim);
typedef void (*td_quant8_fn)(const float *x, int64_t k, int8_t *xq, int64_t kq, float *scale);
typedef void (*td_quant16_fn)(const float *x, int64_t k, int16_t *xq, int64_t kq, float *scale, int lim);
typedef void (*td_swiglu_fn)(const float *a, const float *b, float *out, int64_t count);
/* Attention rows: query rows i0..i1-1 of one head, at most TD_ATT_MAX_ROWS at a time (the rows of
 * scratch s (rows, tp) and ob (rows, hdp)); see td_attention. */
#define TD_ATT_MAX_ROWS 6
typedef void (*td_att_rows_fn)(const float *q, int64_t ldq, int64_t i0, int64_t i1, const float *kt, const float *vs,
                               int64_t t, int64_t tp, int64_t hd, int64_t hdp, float scale, float *s, float *ob,
                               float *out, int64_t ldo);
/* The key and value panels of td_attention (ternary_gemm.c) from keys and values of one (batch, kv
 * head): key j's component d at k[j * ld + d], the same for v; kt (tp / 16 panels of (hd, 16)), vs
 * (hdp / 16 panels of (t, 16)), zero-padded. */
typedef void (*td_att_pack_fn)(const float *k, const float *v, int64_t ld, int64_t t, int64_t hd, float *kt, float *vs);
/* Portable parts of the packing (ternary_gemm.c), for the ISA packers: keys jj0..jj1-1 of one key
 * panel kp, components d0..hd-1 (key jj at k[jj * ld]); all the value panels. */
void td_att_key_rows(const float *k, int64_t ld, int64_t hd, float *kp, int64_t jj0, int64_t jj1, int64_t d0);
void td_att_pack_values(const float *v, int64_t ld, int64_t t, int64_t hd, float *vs);
/* `iters` rounds of independent vector FMA chains (the ISA's widest float FMA, enough chains to hide
 * its latency); returns the floating-point operations done (2 per lane per FMA). Stores a result in
 * *sink so that the loop has an effect. For measuring a core's FMA peak (bench_attention). */
typedef double (*td_fma_fn)(int64_t iters, float *sink);

/* int8 attention (td_attention_int8): the keys and values of one (batch, kv head), quantized once by
 * the portable packer in ternary_gemm.c (the same bytes on every path).
 *   kq: keys centred over the tokens (K minus its mean over the tokens: every softmax row is
 *       unchanged), quantized per key to int8 (absmax / 127), in tp / 16 panels of hd4 / 4 groups of
 *       64 bytes: group g of panel p holds components 4g..4g+3 of keys 16p..16p+15, key by key
 *       (a 32-bit "quad" per key); zero past t and past hd;
 *   ks: per-key scale (0 past t); kcorr: 128 * the key's sum of kq (for unsigned x signed products);
 *   vq: values quantized per channel to int16 of |v| <= TD_ATT8_VLIM, in hdp / 16 panels of tp / 2
 *       key pairs of 32 int16: pair jp of panel c holds (v[2jp][c0 + cc], v[2jp + 1][c0 + cc]) for
 *       cc = 0..15 (zero past t and past hd); vsc: per-channel scale.
 * A rows kernel computes, for each query row (q quantized per row to int8, scale qs):
 *   x_j = (float)(sum_d qq_d kq_jd) * ks_j;  m = max_{j<t} x_j;  c = qs * scale;
 *   p_j = (int32)rne(td_expf_poly(fmaf(x_j, c, -(m * c))) * TD_ATT8_PMAX) for j < t, 0 past t;
 *   tot = sum_j p_j (exact); per channel, int32 sums of p_j vq_jc over blocks of TD_ATT8_KBLK keys
 *   (exact: TD_ATT8_KBLK * PMAX * VLIM < 2^31), each converted to float and added in block order from
 *   0.0f; out_c = (sum_c * vsc_c) * (1.0f / (float)tot).
 * Every step is exact or one IEEE rounding in a fixed order, so every path gives the same bits. */
#define TD_ATT8_PMAX 16383
#define TD_ATT8_VLIM 2047
#define TD_ATT8_KBLK 64
typedef struct {
    const int8_t *kq;
    const float *ks;
    const int32_t *kcorr;
    const int16_t *vq;
    const float *vsc;
    int64_t t, tp, hd, hd4, hdp;
    float scale;
} td_att8_kv_t;
/* n query rows: row r quantized at qq + r * hd4 (scale qs[r]), output at out + r * ldo; scratch
 * s (TD_ATT_MAX_ROWS, tp) floats, pp (TD_ATT_MAX_ROWS, tp) int16, ob (TD_ATT_MAX_ROWS, hdp) floats. */
typedef void (*td_att8_rows_fn)(const td_att8_kv_t *kv, const int8_t *qq, const float *qs, int64_t n, float *s,
                                int16_t *pp, float *ob, float *out, int64_t ldo);
/* Portable pieces of the int8 rows (ternary_gemm.c), for ISAs that vectorize only part of them:
 * p_j of one row from its scores x (returns tot), and the P V part of one row. */
int32_t td_att8_softmax_row(const float *x, int64_t t, int64_t tp, float c, int16_t *p);
void td_att8_pv_row(const td_att8_kv_t *kv, const int16_t *p, int32_t tot, float *ob, float *out);

typedef struct td_ops {
    int isa; /* enum td_isa id */
    const char *name; /* as td_isa_name and TERDIT_ISA spell it */
    int parent; /* id whose kernels fill this table's NULL entries; -1 for the root (scalar) */
    int rank; /* td_best_isa picks the supported table of highest rank */
    int cpu_flags; /* TD_CPU_* bits the CPU must report */
    int i8_lut_min_m, i16_lut_min_m; /* integer modes: the tables from this M, the GEMV below (exact either way) */
    td_f32_fn lut_f32; /* fp32 at every M (one summation order on every ISA) */
    td_i8_fn gemv_i8, lut_i8;
    td_i16_fn gemv_i16, lut_i16;
    td_quant8_fn quantize_row_i8;
    td_quant16_fn quantize_row_i16;
    td_swiglu_fn swiglu;
    td_att_rows_fn attention_rows;
    td_att_pack_fn attention_pack;
    td_fma_fn fma_peak;
    td_att8_rows_fn attention_rows_i8;
    td_fma_fn i8dot_peak; /* the same for the int8 dot product the int8 attention uses (2 ops per multiply-add) */
} td_ops_t;

/* The table in use (td_set_isa / the best one), every entry filled. */
const td_ops_t *td_ops(void);
/* The filled table of an ISA the build has (NULL otherwise), supported by the CPU or not. */
const td_ops_t *td_ops_for(int isa);

extern const td_ops_t td_ops_scalar; /* ternary_gemm.c */
#if TD_X86
extern const td_ops_t td_ops_avx2; /* ternary_avx2.c */
extern const td_ops_t td_ops_avx512; /* ternary_avx512.c */
#endif
#if TD_ARM64
extern const td_ops_t td_ops_neon, td_ops_neon_dot, td_ops_neon_i8mm; /* ternary_neon.c */
#endif

/* Portable C kernels (ternary_gemm.c). */
int td_gemm_f32_scalar(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                       const td_out_t *o, int threads);
int td_gemm_i8_scalar(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                      const td_out_t *o, int threads);
/* Portable table GEMMs (ternary_lut.c), for M >= TD_LUT_MIN_M on NEON and the scalar path. */
#define TD_LUT_MIN_M 8
int td_gemm_f32_lut(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                    const td_out_t *o, int threads);
/* The same with int16 tables for integer activations, int8 (xq8) or int16 (xq16) of |x| <= lim. */
int td_gemm_int_lut(const int8_t *xq8, const int16_t *xq16, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed,
                    int64_t n, const td_out_t *o, int threads, int lim);
int td_gemm_i16_scalar(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                       const td_out_t *o, int threads);

#if TD_X86
/* AVX2 kernels that other x86 tables reuse */
int td_gemm_i8_avx2_gemv(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                         const td_out_t *o, int threads);
int td_gemm_i16_avx2_gemv(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                          const td_out_t *o, int threads, int lim);
#endif
#if TD_ARM64
int td_gemm_i8_neon(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                    const td_out_t *o, int threads, int use_dot);
int td_gemm_i16_neon(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                     const td_out_t *o, int threads);
#endif

/* Store one output: the int32 sum itself, or its scaled float32 value. */
static inline void td_store(const td_out_t *o, int64_t row, int64_t col, int32_t v) {
    if (o->acc) {
        o->acc[row * o->ldy + col] = v;
    } else {
        /* two roundings, as the reference: float(acc) * (scale * alpha), then + bias */
        float s = o->scale[row] * o->alpha;
        float r = (float)v * s;
        if (o->bias) r = r + o->bias[col];
        o->y[row * o->ldy + col] = r;
    }
}

/* fp32 mode (scale NULL): v * alpha + bias. A float kernel run on integer activations (see
 * td_gemm_int) sets scale and then rounds exactly as td_store. */
static inline void td_store_f32(const td_out_t *o, int64_t row, int64_t col, float v) {
    float r = v * (o->scale ? o->scale[row] * o->alpha : o->alpha);
    if (o->bias) r = r + o->bias[col];
    o->y[row * o->ldy + col] = r;
}

/* 64-byte aligned scratch (cache lines; the AVX2 table and tile loads are aligned). */
static inline void *td_alloc(size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
#if defined(_WIN32)
    return _aligned_malloc(bytes ? bytes : 64, 64);
#else
    return aligned_alloc(64, bytes ? bytes : 64);
#endif
}

static inline void td_free(void *p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

#if defined(_OPENMP)
#include <omp.h>
#endif

#endif
