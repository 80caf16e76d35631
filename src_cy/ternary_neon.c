/* aarch64 NEON kernels: weights are streamed row by row and decoded 16 at a time into
 * select masks (code 2 -> +x, code 0 -> -x, code 1 -> dropped); up to four tokens share each
 * decoded block. The int8 path sums the selected bytes with SDOT against a vector of ones where
 * the CPU has the dot-product extension (checked at run time via HWCAP_ASIMDDP), and with
 * pairwise add-accumulate (SADALP) otherwise. 10-bit activations (int10) select int16 lanes with the
 * same masks, widened to 16 bits. The attention rows (fp32 and int8) are near the end of the file. */
#include "ternary_internal.h"

#if TD_ARM64
#include <arm_neon.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ROW_CHUNK 16

/* Masks of one 16-byte half of a block for quarter q: pos (code 2), neg (code 0). */
static inline void decode_masks(uint8x16_t v, int q, uint8x16_t *pos, uint8x16_t *neg) {
    const uint8x16_t c = vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)(-2 * q))), vdupq_n_u8(3));
    *pos = vceqq_u8(c, vdupq_n_u8(2));
    *neg = vceqq_u8(c, vdupq_n_u8(0));
}

static inline int8x16_t select_i8(int8x16_t x, uint8x16_t pos, uint8x16_t neg) {
    return vsubq_s8(vandq_s8(x, vreinterpretq_s8_u8(pos)), vandq_s8(x, vreinterpretq_s8_u8(neg)));
}

/* ----------------------------------------------------------------------------------------- */
/* ----------------------------------------------------------------------------------------- */
/* int8, plain ARMv8: SADALP adds neighbouring bytes into int16 lanes (|.| <= 254 per step);
 * 16 blocks give 128 steps per lane, below the int16 limit, before widening to int32. */

static void i8_rows_plain(const int8_t *xq, int64_t ldq, int64_t m0, int mt, int64_t kb, const uint8_t *packed,
                          int64_t r0, int64_t r1, const td_out_t *o) {
    const int64_t nblk = kb / TD_BLOCK_BYTES;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w = packed + row * kb;
        int32x4_t acc[4];
        for (int t = 0; t < 4; t++) acc[t] = vdupq_n_s32(0);
        for (int64_t sb = 0; sb < nblk; sb += 16) {
            const int64_t e = sb + 16 < nblk ? sb + 16 : nblk;
            int16x8_t a16[4];
            for (int t = 0; t < 4; t++) a16[t] = vdupq_n_s16(0);
            for (int64_t b = sb; b < e; b++) {
                for (int h = 0; h < 2; h++) {
                    const uint8x16_t v = vld1q_u8(w + b * TD_BLOCK_BYTES + 16 * h);
                    for (int q = 0; q < 4; q++) {
                        uint8x16_t pos, neg;
                        decode_masks(v, q, &pos, &neg);
                        const int64_t kk = b * TD_BLOCK_K + 32 * q + 16 * h;
                        for (int t = 0; t < mt; t++)
                            a16[t] = vpadalq_s8(a16[t], select_i8(vld1q_s8(xq + (m0 + t) * ldq + kk), pos, neg));
                    }
                }
            }
            for (int t = 0; t < mt; t++) acc[t] = vpadalq_s16(acc[t], a16[t]);
        }
        for (int t = 0; t < mt; t++) td_store(o, m0 + t, row, vaddvq_s32(acc[t]));
    }
}

/* int8 with the dot-product extension: SDOT against ones sums four selected bytes per lane. */
__attribute__((target("arch=armv8.2-a+dotprod"))) static void i8_rows_dot(const int8_t *xq, int64_t ldq, int64_t m0,
                                                                          int mt, int64_t kb, const uint8_t *packed,
                                                                          int64_t r0, int64_t r1, const td_out_t *o) {
    const int64_t nblk = kb / TD_BLOCK_BYTES;
    const int8x16_t ones = vdupq_n_s8(1);
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w = packed + row * kb;
        int32x4_t acc[4];
        for (int t = 0; t < 4; t++) acc[t] = vdupq_n_s32(0);
        for (int64_t b = 0; b < nblk; b++) {
            for (int h = 0; h < 2; h++) {
                const uint8x16_t v = vld1q_u8(w + b * TD_BLOCK_BYTES + 16 * h);
                for (int q = 0; q < 4; q++) {
                    uint8x16_t pos, neg;
                    decode_masks(v, q, &pos, &neg);
                    const int64_t kk = b * TD_BLOCK_K + 32 * q + 16 * h;
                    for (int t = 0; t < mt; t++)
                        acc[t] = vdotq_s32(acc[t], select_i8(vld1q_s8(xq + (m0 + t) * ldq + kk), pos, neg), ones);
                }
            }
        }
        for (int t = 0; t < mt; t++) td_store(o, m0 + t, row, vaddvq_s32(acc[t]));
    }
}

int td_gemm_i8_neon(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                    const td_out_t *o, int threads, int use_dot) {
    const int64_t kb = kp / 4;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) if (td_force_parallel || n * kb * m > 65536)
#endif
    for (int64_t r0 = 0; r0 < n; r0 += ROW_CHUNK) {
        const int64_t r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;
        for (int64_t m0 = 0; m0 < m; m0 += 4) {
            const int mt = (int)(m - m0 < 4 ? m - m0 : 4);
            if (use_dot) i8_rows_dot(xq, ldq, m0, mt, kb, packed, r0, r1, o);
            else i8_rows_plain(xq, ldq, m0, mt, kb, packed, r0, r1, o);
        }
    }
    return TD_OK;
}

/* ----------------------------------------------------------------------------------------- */
/* int16 activations (10-bit mode): the byte masks are sign-extended to 16-bit lanes and each
 * selects 8 activations, added or subtracted in int16 lanes. A block adds at most 16 values of
 * |.| <= 511 per lane; 4 blocks (32704) stay inside int16 before SADALP widens to int32. */

static void i16_rows(const int16_t *xq, int64_t ldq, int64_t m0, int mt, int64_t kb, const uint8_t *packed, int64_t r0,
                     int64_t r1, const td_out_t *o) {
    const int64_t nblk = kb / TD_BLOCK_BYTES;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w = packed + row * kb;
        int32x4_t acc[4];
        for (int t = 0; t < 4; t++) acc[t] = vdupq_n_s32(0);
        for (int64_t sb = 0; sb < nblk; sb += 4) {
            const int64_t e = sb + 4 < nblk ? sb + 4 : nblk;
            int16x8_t a16[4];
            for (int t = 0; t < 4; t++) a16[t] = vdupq_n_s16(0);
            for (int64_t b = sb; b < e; b++) {
                for (int h = 0; h < 2; h++) {
                    const uint8x16_t v = vld1q_u8(w + b * TD_BLOCK_BYTES + 16 * h);
                    for (int q = 0; q < 4; q++) {
                        uint8x16_t pos, neg;
                        decode_masks(v, q, &pos, &neg);
                        const int16x8_t pm[2] = {vmovl_s8(vget_low_s8(vreinterpretq_s8_u8(pos))),
                                                 vmovl_s8(vget_high_s8(vreinterpretq_s8_u8(pos)))};
                        const int16x8_t nm[2] = {vmovl_s8(vget_low_s8(vreinterpretq_s8_u8(neg))),
                                                 vmovl_s8(vget_high_s8(vreinterpretq_s8_u8(neg)))};
                        const int64_t kk = b * TD_BLOCK_K + 32 * q + 16 * h;
                        for (int t = 0; t < mt; t++) {
                            const int16_t *xp = xq + (m0 + t) * ldq + kk;
                            for (int i = 0; i < 2; i++) {
                                const int16x8_t xv = vld1q_s16(xp + 8 * i);
                                a16[t] = vaddq_s16(a16[t], vandq_s16(xv, pm[i]));
                                a16[t] = vsubq_s16(a16[t], vandq_s16(xv, nm[i]));
                            }
                        }
                    }
                }
            }
            for (int t = 0; t < mt; t++) acc[t] = vpadalq_s16(acc[t], a16[t]);
        }
        for (int t = 0; t < mt; t++) td_store(o, m0 + t, row, vaddvq_s32(acc[t]));
    }
}

int td_gemm_i16_neon(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                     const td_out_t *o, int threads) {
    const int64_t kb = kp / 4;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) if (td_force_parallel || n * kb * m > 65536)
#endif
    for (int64_t r0 = 0; r0 < n; r0 += ROW_CHUNK) {
        const int64_t r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;
        for (int64_t m0 = 0; m0 < m; m0 += 4)
            i16_rows(xq, ldq, m0, (int)(m - m0 < 4 ? m - m0 : 4), kb, packed, r0, r1, o);
    }
    return TD_OK;
}

/* ----------------------------------------------------------------------------------------- */
/* The NEON tables: streaming kernels for few tokens and attention (below); the portable table GEMMs
 * (M >= 8), the quantizers and swiglu come from the scalar table (the compiler vectorizes them). */

static int gemv_i8_neon_plain(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                              const td_out_t *o, int threads) {
    return td_gemm_i8_neon(xq, m, kp, ldq, packed, n, o, threads, 0);
}

static int gemv_i8_neon_dot(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                            const td_out_t *o, int threads) {
    return td_gemm_i8_neon(xq, m, kp, ldq, packed, n, o, threads, 1);
}

static int gemv_i16_neon(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                         const td_out_t *o, int threads, int lim) {
    (void)lim; /* lim <= 511: 4 blocks stay inside int16 (above) */
    return td_gemm_i16_neon(xq, m, kp, ldq, packed, n, o, threads);
}

/* ----------------------------------------------------------------------------------------- */
/* int8, M >= 8, on CPUs with the int8 matrix multiply extension: SMMLA (vmmlaq_s32) multiplies a
 * 2 x 8 int8 matrix by the transpose of another 2 x 8 into a 2 x 2 int32 tile, 32 products per
 * instruction. Here weights are multiplied, by -1, 0 or +1 (as with VNNI on x86): each weight row is
 * decoded once per call to signed bytes in "quad" order (the four weights of a packed byte, k, k+32,
 * k+64, k+96, side by side), the activations of every token are permuted the same way (an exact
 * integer dot product does not depend on the order of k), and both are interleaved in pairs of 8
 * bytes: a pair of tokens (or rows) for 8 values of k is one 16-byte register. A micro-tile is 4
 * token pairs x 2 row pairs (8 accumulators, 6 loads per 8 SMMLA). Sums are exact int32 and outputs
 * go through td_store: the same bits as the scalar path. Checked under qemu (-cpu max); not timed on
 * hardware. */

#define MM_TP 4 /* token pairs per micro-tile */
#define MM_RP 2 /* row pairs per micro-tile */

static void mm_quads(uint32_t q8[256]) {
    for (int v = 0; v < 256; v++) {
        uint32_t a = 0;
        for (int q = 0; q < 4; q++) {
            const int c = (v >> (2 * q)) & 3;
            a |= (uint32_t)(uint8_t)(int8_t)(c == 3 ? 0 : c - 1) << (8 * q);
        }
        q8[v] = a;
    }
}

/* Pair buffer of two byte rows a, b (kp bytes each, quad order): out[kc][0..7] = a[8kc..], [8..15] = b[8kc..] */
static void mm_interleave(const uint8_t *a, const uint8_t *b, int64_t kp, uint8_t *out) {
    for (int64_t kc = 0; kc < kp / 8; kc++) {
        memcpy(out + 16 * kc, a + 8 * kc, 8);
        memcpy(out + 16 * kc + 8, b + 8 * kc, 8);
    }
}

__attribute__((target("arch=armv8.2-a+i8mm"))) static void mm_tile(const int8_t *ap, const int8_t *bp, int64_t kc_n,
                                                                   int64_t pair_bytes, int32_t out[MM_TP][MM_RP][4]) {
    int32x4_t c[MM_TP][MM_RP];
    for (int i = 0; i < MM_TP; i++)
        for (int j = 0; j < MM_RP; j++) c[i][j] = vdupq_n_s32(0);
    for (int64_t kc = 0; kc < kc_n; kc++) {
        int8x16_t a[MM_TP], b[MM_RP];
        for (int i = 0; i < MM_TP; i++) a[i] = vld1q_s8(ap + i * pair_bytes + 16 * kc);
        for (int j = 0; j < MM_RP; j++) b[j] = vld1q_s8(bp + j * pair_bytes + 16 * kc);
        for (int i = 0; i < MM_TP; i++)
            for (int j = 0; j < MM_RP; j++) c[i][j] = vmmlaq_s32(c[i][j], a[i], b[j]);
    }
    for (int i = 0; i < MM_TP; i++)
        for (int j = 0; j < MM_RP; j++) vst1q_s32(out[i][j], c[i][j]);
}

static int lut_i8_i8mm(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                       const td_out_t *o, int threads) {
    const int64_t kb = kp / 4, pair_bytes = 2 * kp;
    const int64_t ntp = (m + 2 * MM_TP - 1) / (2 * MM_TP) * MM_TP, nrp = (n + 2 * MM_RP - 1) / (2 * MM_RP) * MM_RP;
    uint8_t *ap = malloc((size_t)ntp * (size_t)pair_bytes + 1);
    uint8_t *bp = malloc((size_t)nrp * (size_t)pair_bytes + 1);
    uint8_t *rows = malloc((size_t)(2 > threads ? 2 : threads) * 2 * (size_t)kp + 1);
    if (!ap || !bp || !rows) {
        free(ap);
        free(bp);
        free(rows);
        return TD_ENOMEM;
    }
    uint32_t q8[256];
    mm_quads(q8);
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
        int tid = 0;
#if defined(_OPENMP)
        tid = omp_get_thread_num();
#endif
        uint8_t *r0b = rows + (size_t)tid * 2 * (size_t)kp, *r1b = r0b + kp;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 8) nowait
#endif
        for (int64_t rp = 0; rp < nrp; rp++) { /* weight row pairs, decoded to quads */
            for (int h = 0; h < 2; h++) {
                const int64_t row = 2 * rp + h;
                uint32_t *d = (uint32_t *)(void *)(h ? r1b : r0b);
                for (int64_t p = 0; p < kb; p++) {
                    const uint32_t v = row < n ? q8[packed[row * kb + p]] : 0;
                    memcpy(d + p, &v, 4);
                }
            }
            mm_interleave(r0b, r1b, kp, bp + rp * pair_bytes);
        }
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 8)
#endif
        for (int64_t tp = 0; tp < ntp; tp++) { /* token pairs, permuted to quad order */
            for (int h = 0; h < 2; h++) {
                const int64_t t = 2 * tp + h;
                uint8_t *d = h ? r1b : r0b;
                for (int64_t p = 0; p < kb; p++)
                    for (int q = 0; q < 4; q++) {
                        const int64_t k = (p / TD_BLOCK_BYTES) * TD_BLOCK_K + p % TD_BLOCK_BYTES + 32 * q;
                        d[4 * p + q] = t < m ? (uint8_t)xq[t * ldq + k] : 0;
                    }
            }
            mm_interleave(r0b, r1b, kp, ap + tp * pair_bytes);
        }
        /* the barrier above: both buffers complete */
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t rb = 0; rb < nrp / MM_RP; rb++) {
            for (int64_t tb = 0; tb < ntp / MM_TP; tb++) {
                int32_t c[MM_TP][MM_RP][4];
                mm_tile((const int8_t *)ap + tb * MM_TP * pair_bytes, (const int8_t *)bp + rb * MM_RP * pair_bytes,
                        kp / 8, pair_bytes, c);
                for (int i = 0; i < MM_TP; i++)
                    for (int j = 0; j < MM_RP; j++)
                        for (int e = 0; e < 4; e++) { /* tile element (token e / 2, row e % 2) */
                            const int64_t t = 2 * (tb * MM_TP + i) + e / 2, row = 2 * (rb * MM_RP + j) + e % 2;
                            if (t < m && row < n) td_store(o, t, row, c[i][j][e]);
                        }
            }
        }
    }
    free(ap);
    free(bp);
    free(rows);
    return TD_OK;
}

/* ----------------------------------------------------------------------------------------- */
/* Softmax attention rows (see td_attention in ternary_gemm.c for the driver and the panel layout):
 * as on AVX2, both products are one register tile C (6 x 16) = A (6 x L, one element broadcast at a
 * time) B (L x 16, a 16-wide panel): 24 accumulators of 4 lanes, 4 loads and 6 broadcasts per 24
 * FMAs. Every score sums over d in order and every output over keys in order with fused
 * multiply-adds, and the softmax does the AVX2 kernel's operations in its order (exp polynomial,
 * 8-lane sum, td_expf_poly for the tail): the outputs are the AVX2 (and AVX-512) attention's bits,
 * which the C harness checks across architectures (.ci/neon.sh). */

#define ATT_MR 6

static inline void att_tile_neon(const float *const a[ATT_MR], int64_t L, const float *b, float *c, int64_t ldc) {
    float32x4_t acc[ATT_MR][4];
    for (int r = 0; r < ATT_MR; r++)
        for (int x = 0; x < 4; x++) acc[r][x] = vdupq_n_f32(0.0f);
    for (int64_t l = 0; l < L; l++) {
        const float32x4_t b0 = vld1q_f32(b + l * 16), b1 = vld1q_f32(b + l * 16 + 4);
        const float32x4_t b2 = vld1q_f32(b + l * 16 + 8), b3 = vld1q_f32(b + l * 16 + 12);
        for (int r = 0; r < ATT_MR; r++) {
            const float ar = a[r][l];
            acc[r][0] = vfmaq_n_f32(acc[r][0], b0, ar);
            acc[r][1] = vfmaq_n_f32(acc[r][1], b1, ar);
            acc[r][2] = vfmaq_n_f32(acc[r][2], b2, ar);
            acc[r][3] = vfmaq_n_f32(acc[r][3], b3, ar);
        }
    }
    for (int r = 0; r < ATT_MR; r++)
        for (int x = 0; x < 4; x++) vst1q_f32(c + r * ldc + 4 * x, acc[r][x]);
}

/* e^x: the x86 kernels' Cody-Waite reduction and degree-5 polynomial, operation for operation
 * (the same fused steps), 4 lanes */
static inline float32x4_t exp_neon(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_n_f32(x, n, 0.693359375f);
    r = vfmsq_n_f32(r, n, -2.12194440e-4f);
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    const float32x4_t y = vaddq_f32(vfmaq_f32(r, vmulq_f32(p, r), r), vdupq_n_f32(1.0f));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

/* the largest of a row's t scores (exact: the order does not matter) */
static inline float att_row_max_neon(const float *sr, int64_t t) {
    int64_t j = 0;
    float32x4_t mx = vdupq_n_f32(-FLT_MAX);
    for (; j + 4 <= t; j += 4) mx = vmaxq_f32(mx, vld1q_f32(sr + j));
    float m = vmaxvq_f32(mx);
    for (; j < t; j++) m = sr[j] > m ? sr[j] : m;
    return m;
}

static void attention_rows_neon(const float *q, int64_t ldq, int64_t i0, int64_t i1, const float *kt, const float *vs,
                                int64_t t, int64_t tp, int64_t hd, int64_t hdp, float scale, float *s, float *ob,
                                float *out, int64_t ldo) {
    for (int64_t ib = i0; ib < i1; ib += ATT_MR) {
        const int nr = (int)(i1 - ib < ATT_MR ? i1 - ib : ATT_MR);
        const float *qa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) qa[r] = q + (ib + (r < nr ? r : nr - 1)) * ldq;
        for (int64_t j0 = 0; j0 < tp; j0 += 16) att_tile_neon(qa, hd, kt + j0 * hd, s + j0, tp);
        float inv[ATT_MR];
        for (int r = 0; r < nr; r++) {
            float *sr = s + r * tp;
            const float m = att_row_max_neon(sr, t);
            /* the AVX2 kernel's arithmetic: scale s - scale m in one rounding (fused, scale > 0 so
             * max(scale s) = scale max(s)), exp of 8 scores per step summed in 8 lanes (two q
             * registers), its horizontal sum order, then td_expf_poly for the last t % 8 */
            const float32x4_t vnm = vdupq_n_f32(-(m * scale)), vscale = vdupq_n_f32(scale);
            float32x4_t sum_lo = vdupq_n_f32(0.0f), sum_hi = sum_lo;
            int64_t j = 0;
            for (; j + 8 <= t; j += 8) {
                const float32x4_t e0 = exp_neon(vfmaq_f32(vnm, vld1q_f32(sr + j), vscale));
                const float32x4_t e1 = exp_neon(vfmaq_f32(vnm, vld1q_f32(sr + j + 4), vscale));
                vst1q_f32(sr + j, e0);
                vst1q_f32(sr + j + 4, e1);
                sum_lo = vaddq_f32(sum_lo, e0);
                sum_hi = vaddq_f32(sum_hi, e1);
            }
            const float32x4_t h4 = vaddq_f32(sum_lo, sum_hi);
            float tot = (vgetq_lane_f32(h4, 0) + vgetq_lane_f32(h4, 2)) +
                        (vgetq_lane_f32(h4, 1) + vgetq_lane_f32(h4, 3));
            for (; j < t; j++) {
                sr[j] = td_expf_poly(fmaf(sr[j], scale, -(m * scale)));
                tot += sr[j];
            }
            inv[r] = 1.0f / tot;
        }
        /* rows past the real ones: keep them finite (they read row nr - 1's numerators) */
        const float *pa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) pa[r] = s + (r < nr ? r : nr - 1) * tp;
        for (int64_t c0 = 0; c0 < hdp; c0 += 16) att_tile_neon(pa, t, vs + c0 * t, ob + c0, hdp);
        for (int r = 0; r < nr; r++) {
            float *o = out + (ib + r) * ldo;
            const float *src = ob + r * hdp;
            for (int64_t c = 0; c < hd; c++) o[c] = src[c] * inv[r];
        }
    }
}

/* FMA peak: 16 chains of 4-lane FMAs */
static double fma_peak_neon(int64_t iters, float *sink) {
    float32x4_t a[16];
    const float32x4_t x = vdupq_n_f32(0.999f), y = vdupq_n_f32(0.001f);
    for (int i = 0; i < 16; i++) a[i] = vdupq_n_f32((float)i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 16; i++) a[i] = vfmaq_f32(y, a[i], x);
    for (int i = 1; i < 16; i++) a[0] = vaddq_f32(a[0], a[i]);
    *sink = vaddvq_f32(a[0]);
    return 16.0 * 8.0 * (double)iters;
}

/* ----------------------------------------------------------------------------------------- */
/* int8 attention rows (td_att8_rows_fn; the arithmetic is defined at td_att8_kv_t): 6 query rows
 * at a time. Scores over 16 keys per step from the shared key panels (16 keys x 4-byte quads per
 * group): with the dot-product extension SDOT of a key register (4 keys x 4 components) against the
 * row's quad broadcast, 6 rows x 16 keys in 24 accumulators (4 loads and 6 broadcasts per 24 SDOT);
 * on plain ARMv8 SMULL/SMULL2 of the same registers (8 products in int16, |.| <= 127 x 127) and
 * SADALP into half sums, added pairwise (ADDP) at the end, 2 rows at a time. Q K^T is signed x
 * signed here, so kcorr (the x86 unsigned-operand correction) is not needed. The softmax numerators
 * are the portable ones lane by lane (fused c x - m c, exp_neon = td_expf_poly, FCVTNS rounds half
 * to even). P V multiplies int16 numerators (14 bits) by int16 values (12 bits), which no int8 dot
 * product can do exactly: SMLAL/SMLAL2 by element on the values de-interleaved with LD2, 6 rows x 16
 * channels in 24 accumulators, int32 sums per block of TD_ATT8_KBLK keys added to float sums in ob in
 * block order. Every step is exact or the portable reference's rounding, so the outputs are its bits
 * (the C harness compares them with the scalar and x86 paths, .ci/neon.sh). */
typedef void (*att8_scores_fn)(const int8_t *const qa[ATT_MR], int64_t ng, const int8_t *bp, const float *ks, float *c,
                               int64_t ldc);

static inline int8x16_t att8_quad(const int8_t *q) { /* one 4-byte quad in every 32-bit lane */
    int32_t w;
    memcpy(&w, q, 4);
    return vreinterpretq_s8_s32(vdupq_n_s32(w));
}

/* s[r][j0 + 0..15] = float(sum q_r k_j) * ks_j for the 6 rows qa; plain ARMv8 */
static void att8_scores_plain(const int8_t *const qa[ATT_MR], int64_t ng, const int8_t *bp, const float *ks, float *c,
                              int64_t ldc) {
    for (int r = 0; r < ATT_MR; r += 2) {
        int32x4_t h0[8], h1[8]; /* half sums: [k0 d0+d1, k0 d2+d3, k1 d0+d1, k1 d2+d3] per 2 keys */
        for (int x = 0; x < 8; x++) h0[x] = h1[x] = vdupq_n_s32(0);
        for (int64_t g = 0; g < ng; g++) {
            const int8x16_t a0 = att8_quad(qa[r] + 4 * g), a1 = att8_quad(qa[r + 1] + 4 * g);
            for (int x = 0; x < 4; x++) {
                const int8x16_t b = vld1q_s8(bp + g * 64 + 16 * x);
                h0[2 * x] = vpadalq_s16(h0[2 * x], vmull_s8(vget_low_s8(b), vget_low_s8(a0)));
                h0[2 * x + 1] = vpadalq_s16(h0[2 * x + 1], vmull_high_s8(b, a0));
                h1[2 * x] = vpadalq_s16(h1[2 * x], vmull_s8(vget_low_s8(b), vget_low_s8(a1)));
                h1[2 * x + 1] = vpadalq_s16(h1[2 * x + 1], vmull_high_s8(b, a1));
            }
        }
        for (int x = 0; x < 4; x++) {
            const float32x4_t kx = vld1q_f32(ks + 4 * x);
            vst1q_f32(c + r * ldc + 4 * x, vmulq_f32(vcvtq_f32_s32(vpaddq_s32(h0[2 * x], h0[2 * x + 1])), kx));
            vst1q_f32(c + (r + 1) * ldc + 4 * x, vmulq_f32(vcvtq_f32_s32(vpaddq_s32(h1[2 * x], h1[2 * x + 1])), kx));
        }
    }
}

/* the same with SDOT: lane i of vdotq_s32(acc, b, quad) adds key i's 4 products. 3 rows at a time
 * (12 accumulators, 4 key registers, 3 query registers: 6 rows would need 34 registers and spill).
 * Four groups per step take the row's quads from one 16-byte load by element (SDOT by element: no
 * broadcast instructions); the last ng % 4 groups broadcast the quad. */
#define ATT8_SDOT_LANE(acc, b, q, l)                                                                                   \
    do {                                                                                                               \
        (acc)[0] = vdotq_laneq_s32((acc)[0], (b)[0], (q), (l));                                                        \
        (acc)[1] = vdotq_laneq_s32((acc)[1], (b)[1], (q), (l));                                                        \
        (acc)[2] = vdotq_laneq_s32((acc)[2], (b)[2], (q), (l));                                                        \
        (acc)[3] = vdotq_laneq_s32((acc)[3], (b)[3], (q), (l));                                                        \
    } while (0)
__attribute__((target("arch=armv8.2-a+dotprod"))) static void
att8_scores_dot(const int8_t *const qa[ATT_MR], int64_t ng, const int8_t *bp, const float *ks, float *c, int64_t ldc) {
    for (int r0 = 0; r0 < ATT_MR; r0 += 3) {
        int32x4_t acc[3][4];
        for (int r = 0; r < 3; r++)
            for (int x = 0; x < 4; x++) acc[r][x] = vdupq_n_s32(0);
        int64_t g = 0;
        for (; g + 4 <= ng; g += 4) {
            const int8x16_t q0 = vld1q_s8(qa[r0] + 4 * g), q1 = vld1q_s8(qa[r0 + 1] + 4 * g);
            const int8x16_t q2 = vld1q_s8(qa[r0 + 2] + 4 * g);
            int8x16_t b[4];
#define ATT8_GROUP(l)                                                                                                  \
    for (int x = 0; x < 4; x++) b[x] = vld1q_s8(bp + (g + (l)) * 64 + 16 * x);                                         \
    ATT8_SDOT_LANE(acc[0], b, q0, l);                                                                                  \
    ATT8_SDOT_LANE(acc[1], b, q1, l);                                                                                  \
    ATT8_SDOT_LANE(acc[2], b, q2, l)
            ATT8_GROUP(0);
            ATT8_GROUP(1);
            ATT8_GROUP(2);
            ATT8_GROUP(3);
#undef ATT8_GROUP
        }
        for (; g < ng; g++) {
            int8x16_t b[4];
            for (int x = 0; x < 4; x++) b[x] = vld1q_s8(bp + g * 64 + 16 * x);
            for (int r = 0; r < 3; r++) {
                const int8x16_t a = att8_quad(qa[r0 + r] + 4 * g);
                for (int x = 0; x < 4; x++) acc[r][x] = vdotq_s32(acc[r][x], b[x], a);
            }
        }
        for (int x = 0; x < 4; x++) {
            const float32x4_t kx = vld1q_f32(ks + 4 * x);
            for (int r = 0; r < 3; r++) vst1q_f32(c + (r0 + r) * ldc + 4 * x, vmulq_f32(vcvtq_f32_s32(acc[r][x]), kx));
        }
    }
}
#undef ATT8_SDOT_LANE

/* ob rows 0..2 (16 channels, stride ldo) += float(int32 sums of p v over keys j0..j1-1); 3 rows (12
 * accumulators, 4 value registers, 3 numerator pairs: 6 rows would spill) */
static inline void att8_pv3_neon(const int16_t *const pa[3], const int16_t *vp, int64_t j0, int64_t j1, float *ob,
                                 int64_t ldo) {
    int32x4_t acc[3][4];
    for (int r = 0; r < 3; r++)
        for (int x = 0; x < 4; x++) acc[r][x] = vdupq_n_s32(0);
    for (int64_t jp = j0 / 2; jp < j1 / 2; jp++) {
        /* val[0]: key 2jp, val[1]: key 2jp + 1; lo: channels 0..7, hi: 8..15 */
        const int16x8x2_t lo = vld2q_s16(vp + jp * 32), hi = vld2q_s16(vp + jp * 32 + 16);
        for (int r = 0; r < 3; r++) {
            int32_t w;
            memcpy(&w, pa[r] + 2 * jp, 4);
            const int16x4_t p = vreinterpret_s16_s32(vdup_n_s32(w)); /* p_2jp, p_2jp+1, (again) */
            acc[r][0] = vmlal_lane_s16(acc[r][0], vget_low_s16(lo.val[0]), p, 0);
            acc[r][0] = vmlal_lane_s16(acc[r][0], vget_low_s16(lo.val[1]), p, 1);
            acc[r][1] = vmlal_high_lane_s16(acc[r][1], lo.val[0], p, 0);
            acc[r][1] = vmlal_high_lane_s16(acc[r][1], lo.val[1], p, 1);
            acc[r][2] = vmlal_lane_s16(acc[r][2], vget_low_s16(hi.val[0]), p, 0);
            acc[r][2] = vmlal_lane_s16(acc[r][2], vget_low_s16(hi.val[1]), p, 1);
            acc[r][3] = vmlal_high_lane_s16(acc[r][3], hi.val[0], p, 0);
            acc[r][3] = vmlal_high_lane_s16(acc[r][3], hi.val[1], p, 1);
        }
    }
    for (int r = 0; r < 3; r++)
        for (int x = 0; x < 4; x++) {
            float *o = ob + r * ldo + 4 * x;
            vst1q_f32(o, vaddq_f32(vld1q_f32(o), vcvtq_f32_s32(acc[r][x])));
        }
}

static void att8_rows_neon(const td_att8_kv_t *kv, const int8_t *qq, const float *qs, int64_t n, float *s, int16_t *pp,
                           float *ob, float *out, int64_t ldo, att8_scores_fn scores) {
    const int64_t t = kv->t, tp = kv->tp, hd4 = kv->hd4, ng = hd4 / 4, hdp = kv->hdp, hd = kv->hd;
    const float32x4_t pmax = vdupq_n_f32((float)TD_ATT8_PMAX);
    const int32x4_t lane = {0, 1, 2, 3};
    for (int64_t ib = 0; ib < n; ib += ATT_MR) {
        const int nr = (int)(n - ib < ATT_MR ? n - ib : ATT_MR);
        const int8_t *qa[ATT_MR]; /* missing rows repeat the last */
        for (int r = 0; r < ATT_MR; r++) qa[r] = qq + (ib + (r < nr ? r : nr - 1)) * hd4;
        for (int64_t j0 = 0; j0 < tp; j0 += 16) scores(qa, ng, kv->kq + j0 * hd4, kv->ks + j0, s + j0, tp);
        float inv[ATT_MR];
        for (int r = 0; r < nr; r++) {
            const float *sr = s + r * tp;
            int16_t *pr = pp + r * tp;
            const float m = att_row_max_neon(sr, t);
            const float c = qs[ib + r] * kv->scale;
            const float32x4_t vc = vdupq_n_f32(c), vnmc = vdupq_n_f32(-(m * c));
            int32x4_t tot = vdupq_n_s32(0);
            for (int64_t j = 0; j < tp; j += 4) { /* tp is a multiple of 16 */
                const float32x4_t e = exp_neon(vfmaq_f32(vnmc, vld1q_f32(sr + j), vc));
                int32x4_t pi = vcvtnq_s32_f32(vmulq_f32(e, pmax)); /* round half to even */
                if (j + 4 > t)
                    pi = vandq_s32(pi, vreinterpretq_s32_u32(vcgtq_s32(vdupq_n_s32((int32_t)(t - j)), lane)));
                tot = vaddq_s32(tot, pi);
                vst1_s16(pr + j, vmovn_s32(pi));
            }
            inv[r] = 1.0f / (float)vaddvq_s32(tot);
        }
        const int16_t *pa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) pa[r] = pp + (r < nr ? r : nr - 1) * tp;
        for (int64_t c0 = 0; c0 < hdp; c0 += 16) {
            const int16_t *vp = kv->vq + c0 * tp;
            for (int r = 0; r < ATT_MR; r++)
                for (int x = 0; x < 4; x++) vst1q_f32(ob + r * hdp + c0 + 4 * x, vdupq_n_f32(0.0f));
            for (int64_t j0 = 0; j0 < tp; j0 += TD_ATT8_KBLK) {
                const int64_t j1 = j0 + TD_ATT8_KBLK < tp ? j0 + TD_ATT8_KBLK : tp;
                att8_pv3_neon(pa, vp, j0, j1, ob + c0, hdp);
                att8_pv3_neon(pa + 3, vp, j0, j1, ob + 3 * hdp + c0, hdp);
            }
        }
        for (int r = 0; r < nr; r++) {
            float *o = out + (ib + r) * ldo;
            const float *src = ob + r * hdp;
            const float32x4_t vi = vdupq_n_f32(inv[r]);
            int64_t c = 0;
            for (; c + 4 <= hd; c += 4)
                vst1q_f32(o + c, vmulq_f32(vmulq_f32(vld1q_f32(src + c), vld1q_f32(kv->vsc + c)), vi));
            for (; c < hd; c++) o[c] = (src[c] * kv->vsc[c]) * inv[r];
        }
    }
}

static void attention_rows_i8_neon(const td_att8_kv_t *kv, const int8_t *qq, const float *qs, int64_t n, float *s,
                                   int16_t *pp, float *ob, float *out, int64_t ldo) {
    att8_rows_neon(kv, qq, qs, n, s, pp, ob, out, ldo, att8_scores_plain);
}

static void attention_rows_i8_neon_dot(const td_att8_kv_t *kv, const int8_t *qq, const float *qs, int64_t n, float *s,
                                       int16_t *pp, float *ob, float *out, int64_t ldo) {
    att8_rows_neon(kv, qq, qs, n, s, pp, ob, out, ldo, att8_scores_dot);
}

/* int8 dot-product peaks: 16 chains of the scores' step (plain: SMULL + SADALP, 8 multiply-adds per
 * pair; dot product: SDOT, 16 multiply-adds), 2 operations per multiply-add */
static double i8dot_peak_neon(int64_t iters, float *sink) {
    int32x4_t a[16];
    const int8x8_t x = vdup_n_s8(3);
    for (int i = 0; i < 16; i++) a[i] = vdupq_n_s32(i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 16; i++) a[i] = vpadalq_s16(a[i], vmull_s8(x, vreinterpret_s8_s32(vget_low_s32(a[i]))));
    for (int i = 1; i < 16; i++) a[0] = vaddq_s32(a[0], a[i]);
    *sink = (float)vaddvq_s32(a[0]);
    return 16.0 * 16.0 * (double)iters;
}

__attribute__((target("arch=armv8.2-a+dotprod"))) static double i8dot_peak_neon_dot(int64_t iters, float *sink) {
    int32x4_t a[16];
    const int8x16_t x = vdupq_n_s8(3), y = vdupq_n_s8(-2);
    for (int i = 0; i < 16; i++) a[i] = vdupq_n_s32(i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 16; i++) a[i] = vdotq_s32(a[i], x, y);
    for (int i = 1; i < 16; i++) a[0] = vaddq_s32(a[0], a[i]);
    *sink = (float)vaddvq_s32(a[0]);
    return 16.0 * 32.0 * (double)iters;
}

const td_ops_t td_ops_neon = {
    .isa = TD_ISA_NEON,
    .name = "neon",
    .parent = TD_ISA_SCALAR,
    .rank = 10,
    .cpu_flags = TD_CPU_NEON,
    .i8_lut_min_m = TD_LUT_MIN_M,
    .i16_lut_min_m = TD_LUT_MIN_M,
    .gemv_i8 = gemv_i8_neon_plain,
    .gemv_i16 = gemv_i16_neon,
    .attention_rows = attention_rows_neon,
    .fma_peak = fma_peak_neon,
    .attention_rows_i8 = attention_rows_i8_neon,
    .i8dot_peak = i8dot_peak_neon,
};

const td_ops_t td_ops_neon_dot = {
    .isa = TD_ISA_NEON_DOT,
    .name = "neon-dotprod",
    .parent = TD_ISA_NEON,
    .rank = 15,
    .cpu_flags = TD_CPU_NEON | TD_CPU_DOTPROD,
    .gemv_i8 = gemv_i8_neon_dot,
    .attention_rows_i8 = attention_rows_i8_neon_dot,
    .i8dot_peak = i8dot_peak_neon_dot,
};

const td_ops_t td_ops_neon_i8mm = {
    .isa = TD_ISA_NEON_I8MM,
    .name = "neon-i8mm",
    .parent = TD_ISA_NEON_DOT,
    .rank = 20,
    .cpu_flags = TD_CPU_NEON | TD_CPU_DOTPROD | TD_CPU_I8MM,
    .lut_i8 = lut_i8_i8mm,
};

#endif /* TD_ARM64 */
