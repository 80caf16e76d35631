/* Ternary GEMM and fused per-token ops of terdit-edge (plain C11, no Python).
 *
 * Weights are in the "tdit2-k128" layout (terdit_edge/packing.py): uint8 (N, KB) with
 * KB = padded_k(K) / 4; a row is cut into blocks of 128 weights stored in 32 bytes, byte j of a
 * block holding the 2-bit codes f = Q + 1 of weights j, j+32, j+64, j+96 in bits 1-0, 3-2, 5-4, 7-6.
 *
 * y (M, N) = alpha * x (M, K) Q^T + bias, in one of these activation modes:
 *   td_gemm_f32: float32 accumulation;
 *   td_gemm_i8:  x quantized per row to int8 (absmax / 127), exact int32 accumulation,
 *                y = float(acc) * (scale_m * alpha) + bias;
 *   td_gemm_int: the same with `bits` (2..10) bit signed integers (absmax / (2^(bits-1) - 1));
 *                bits = 8 is td_gemm_i8.
 * No kernel multiplies by a weight value: weights select, negate or drop activations.
 *
 * Each instruction set is one table of kernels (td_ops_t in ternary_internal.h); the best table the
 * CPU supports is chosen once at run time (td_best_isa), and td_set_isa selects any other one the CPU
 * supports, which is how the tests run every path (scalar, AVX2, AVX-512, NEON, NEON dot-product, NEON i8mm).
 */
#ifndef TERDIT_TERNARY_GEMM_H
#define TERDIT_TERNARY_GEMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum td_isa {
    TD_ISA_SCALAR = 0,
    TD_ISA_AVX2 = 1, /* x86-64 AVX2 + FMA */
    TD_ISA_NEON = 2, /* aarch64 ARMv8 Advanced SIMD */
    TD_ISA_NEON_DOT = 3, /* aarch64 with the dot-product extension (SDOT) */
    TD_ISA_AVX512 = 4, /* x86-64 AVX-512 F/BW/VL/DQ + VNNI (and AVX2 + FMA), OS-enabled ZMM state */
    TD_ISA_NEON_I8MM = 5, /* aarch64 with dot product and the int8 matrix multiply extension (SMMLA) */
    TD_ISA_COUNT = 6 /* number of ISA ids (not an ISA) */
};

/* Return codes of the entry points. */
#define TD_OK 0
#define TD_ENOMEM 1
#define TD_EINVAL 2

/* CPU feature bits reported by td_cpu_flags. */
#define TD_CPU_AVX2 1
#define TD_CPU_FMA 2
#define TD_CPU_NEON 4
#define TD_CPU_DOTPROD 8
#define TD_CPU_AVX512 16 /* F, BW, VL, DQ and VNNI, with XCR0 enabling opmask/ZMM state */
#define TD_CPU_AVX512_VBMI 32 /* AVX512_VBMI (reported; not required by any table) */
#define TD_CPU_I8MM 64 /* aarch64 FEAT_I8MM (HWCAP2_I8MM) */

int td_cpu_flags(void);
int td_best_isa(void); /* best path this CPU can run */
int td_get_isa(void); /* path the kernels use now */
int td_set_isa(int isa); /* 0 on success, -1 if this CPU/build cannot run it */
int td_isa_supported(int isa); /* 1 if this CPU and build can run it (any id; unknown ids: 0) */
const char *td_isa_name(int isa);
int td_openmp_enabled(void); /* 1 when built with OpenMP */
int td_max_threads(void);
/* 1: use every requested thread even on problems too small to gain from it (for tests). */
void td_set_force_parallel(int on);

/* Per-row absmax int8 quantization, bit-exact with quantize_rows_int8 of the NumPy reference.
 * x float32 (m, k) with row stride ldx; xq int8 (m, ldq) with ldq >= k; columns k..ldq-1 are
 * zeroed; scale float32 (m,). */
void td_quantize_rows_i8(const float *x, int64_t m, int64_t k, int64_t ldx, int8_t *xq, int64_t ldq, float *scale,
                         int threads);

/* The same with lim = 2^(bits-1) - 1 levels into int16 (bit-exact with quantize_rows(x, bits)). */
void td_quantize_rows_i16(const float *x, int64_t m, int64_t k, int64_t ldx, int16_t *xq, int64_t ldq, float *scale,
                          int lim, int threads);

/* y float32 (m, n) row stride ldy; x float32 (m, k) row stride ldx; packed uint8 (n, padded_k(k)/4);
 * bias float32 (n,) or NULL. Returns TD_OK or TD_ENOMEM. */
int td_gemm_f32(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n, float alpha,
                const float *bias, float *y, int64_t ldy, int threads);
int td_gemm_i8(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n, float alpha,
               const float *bias, float *y, int64_t ldy, int threads);
/* Returns TD_EINVAL for bits outside 2..10. */
int td_gemm_int(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n, float alpha,
                const float *bias, float *y, int64_t ldy, int threads, int bits);

/* The int8 core on pre-quantized rows: xq int8 (m, ldq), ldq >= padded_k(k), zero beyond k;
 * acc int32 (m, n) = xq Q^T exactly. Exposed for the C harness. */
int td_gemm_i8_acc(const int8_t *xq, int64_t m, int64_t k, int64_t ldq, const uint8_t *packed, int64_t n, int32_t *acc,
                   int threads);

/* Full-precision linear layer y (m, n) = x (m, k) w (n, k)^T [+ bias (n)], float32, C-contiguous, in a
 * summation order fixed by k alone (the same bits on every CPU, any m, any thread count). */
void td_dense_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias, float *y,
                  int threads);

/* Fused per-token ops; rows are independent and split across threads.
 * out (rows, d) = rmsnorm(x) * weight * (1 + scale[g]) + shift[g] with g = row / rows_per_group. */
void td_rmsnorm_modulate(const float *x, const float *weight, const float *shift, const float *scale, float *out,
                         int64_t rows, int64_t rows_per_group, int64_t d, float eps, int threads);
/* out (rows, d) = layernorm(x) [* weight + bias]; weight/bias may be NULL (no affine). */
void td_layernorm(const float *x, const float *weight, const float *bias, float *out, int64_t rows, int64_t d,
                  float eps, int threads);
/* out = silu(a) * b over `count` elements. */
void td_swiglu(const float *a, const float *b, float *out, int64_t count, int threads);
/* x (rows, d) += gate[g] * y, g = row / rows_per_group. */
void td_add_gated(float *x, const float *gate, const float *y, int64_t rows, int64_t rows_per_group, int64_t d,
                  int threads);
/* In-place rotary embedding of x (b, t, h, hd) contiguous; cos/sin (t, hd/2). */
void td_rope(float *x, const float *cos_t, const float *sin_t, int64_t b, int64_t t, int64_t h, int64_t hd,
             int threads);

/* Softmax attention, not causal: out (b, t, h, hd) = softmax(q k^T / sqrt(hd)) v per (batch, head),
 * query head hh reading key/value head hh / (h / hkv) (grouped-query attention). q, out (b, t, h, hd)
 * and k, v (b, t, hkv, hd) float32, C-contiguous; out must not overlap q, k or v.
 * Returns TD_OK, TD_ENOMEM, or TD_EINVAL when h is not a multiple of hkv. */
int td_attention(const float *q, const float *k, const float *v, float *out, int64_t b, int64_t t, int64_t h,
                 int64_t hkv, int64_t hd, int threads);

/* The same with int8 Q K^T (SageAttention-style): K centred over the tokens (its mean over the tokens
 * subtracted per kv head: softmax rows unchanged), Q and K quantized per row to int8, exact integer
 * dot products, scores rescaled to float32, softmax numerators quantized to 14 bits and values per
 * channel to 12 bits for an exact integer P V (docs/kernels.md). The same bits on every path. */
int td_attention_int8(const float *q, const float *k, const float *v, float *out, int64_t b, int64_t t, int64_t h,
                      int64_t hkv, int64_t hd, int threads);

/* Floating-point operations of `iters` rounds of the current ISA's FMA loop on each of `threads`
 * threads (at once): time the call to measure the machine's FMA peak. */
double td_fma_peak(int64_t iters, int threads);
/* The same for the int8 dot product of the current ISA's int8 attention (2 operations per
 * multiply-add: vpdpbusd on AVX-512, the maddubs sequence on AVX2, SDOT on NEON dot product,
 * SMULL + SADALP on plain NEON). */
double td_i8dot_peak(int64_t iters, int threads);

#ifdef __cplusplus
}
#endif
#endif
