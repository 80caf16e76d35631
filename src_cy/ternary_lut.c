/* Portable table GEMM (float32, many tokens), in plain C for the compiler to vectorize: the same
 * algorithm as the AVX2 table kernel (ternary_avx2.c, docs/kernels.md), with each table entry an
 * array of LUT_TOK floats (one per token of the block) instead of an AVX2 register. At -O2/-O3 GCC
 * and Clang turn the fixed-length loops over those arrays into NEON on aarch64 (part of ARMv8-A)
 * and SSE on x86-64, so the NEON build and the portable (scalar-ISA) build get the table
 * algorithm too. fp32: used at every M on NEON and on the scalar path (the same bits as the AVX2
 * tables); the integer tables below: for M >= 8.
 *
 * For a block of LUT_TOK tokens and one packed byte position (weights k, k+32, k+64, k+96) the
 * table holds the 81 signed sums of those four activations, entry c0 + 3 c1 + 9 c2 + 27 c3 for
 * codes c (0: -1, 1: 0, 2: +1; the invalid code 3 reads as 1, so a corrupted byte cannot index
 * outside the table). A row then costs one table look-up and one LUT_TOK-wide add per packed
 * byte. Table sets cover LUT_G byte positions (8 x 81 x 32 B = 20.7 KB, in L1); every row of the
 * work item passes each set and adds into its running sums. */
#include "ternary_internal.h"

#include <string.h>

#define LUT_TOK 8 /* tokens per table entry */
#define LUT_G 8 /* byte positions per table set; divides TD_BLOCK_BYTES */
#define LUT_ENT 81 /* 3^4 sign patterns of a byte */
#define LUT_ROWS 2048 /* rows per work item at most (bounds the running sums) */

/* One table entry's LUT_TOK floats as a GCC/Clang vector (lowered to two 128-bit NEON or SSE
 * registers): left to itself, GCC 12 keeps the accumulator of the row loop in eight scalar
 * registers on aarch64. Other compilers get the plain loops. */
#if defined(__GNUC__) || defined(__clang__)
#define LUT_VEC 1
typedef float lutv __attribute__((vector_size(LUT_TOK * sizeof(float)), aligned(LUT_TOK * sizeof(float))));
#else
#define LUT_VEC 0
#endif

/* byte -> entry index, code 3 read as 1 */
static void entry_index(uint8_t idx[256]) {
    for (int v = 0; v < 256; v++) {
        int e = 0, place = 1;
        for (int q = 0; q < 4; q++) {
            int c = (v >> (2 * q)) & 3;
            if (c == 3) c = 1;
            for (int i = 0; i < c; i++) e += place; /* base-3 digit c of the entry index */
            place *= 3;
        }
        idx[v] = (uint8_t)e;
    }
}

/* Tables of one set: the byte positions whose first weight is kbase .. kbase + LUT_G - 1.
 * xT (kp, LUT_TOK); T (LUT_G, LUT_ENT, LUT_TOK). Entry c0 + 3 c1 + 9 c2 + 27 c3 is
 * lo[c0 + 3 c1] + hi[c2 + 3 c3], the two 9-entry halves being the signed sums of two activations. */
static void build_tables(const float *xT, int64_t kbase, float *T) {
    for (int g = 0; g < LUT_G; g++) {
        const float *xk = xT + (kbase + g) * LUT_TOK;
        float lo[9][LUT_TOK], hi[9][LUT_TOK];
        for (int l = 0; l < LUT_TOK; l++) {
            const float a = xk[l], b = xk[32 * LUT_TOK + l];
            const float c = xk[64 * LUT_TOK + l], d = xk[96 * LUT_TOK + l];
            lo[0][l] = -a - b;
            lo[1][l] = -b;
            lo[2][l] = a - b;
            lo[3][l] = -a;
            lo[4][l] = 0;
            lo[5][l] = a;
            lo[6][l] = -a + b;
            lo[7][l] = b;
            lo[8][l] = a + b;
            hi[0][l] = -c - d;
            hi[1][l] = -d;
            hi[2][l] = c - d;
            hi[3][l] = -c;
            hi[4][l] = 0;
            hi[5][l] = c;
            hi[6][l] = -c + d;
            hi[7][l] = d;
            hi[8][l] = c + d;
        }
        float *e = T + (int64_t)g * LUT_ENT * LUT_TOK;
        for (int j = 0; j < 9; j++)
            for (int i = 0; i < 9; i++)
                for (int l = 0; l < LUT_TOK; l++) e[(9 * j + i) * LUT_TOK + l] = lo[i][l] + hi[j][l];
    }
}

/* Tokens m0 .. m0 + mt - 1 (mt <= LUT_TOK) times rows r0 .. r1 - 1. */
static void lut_block(const float *x, int64_t ldx, int64_t m0, int mt, int64_t k, int64_t kb, const uint8_t *packed,
                      int64_t r0, int64_t r1, const uint8_t idx[256], float *xT, float *T, float *res,
                      const td_out_t *o) {
    const int64_t kp = kb * 4;
    memset(xT, 0, (size_t)kp * LUT_TOK * sizeof(float));
    for (int t = 0; t < mt; t++)
        for (int64_t kk = 0; kk < k; kk++) xT[kk * LUT_TOK + t] = x[(m0 + t) * ldx + kk];
    memset(res, 0, (size_t)(r1 - r0) * LUT_TOK * sizeof(float));
    const int64_t nset = kb / LUT_G;
    for (int64_t s = 0; s < nset; s++) {
        /* set s covers bytes LUT_G s .. LUT_G s + LUT_G - 1 of each row */
        const int64_t byte0 = s * LUT_G;
        build_tables(xT, (byte0 / TD_BLOCK_BYTES) * TD_BLOCK_K + byte0 % TD_BLOCK_BYTES, T);
        for (int64_t row = r0; row < r1; row++) {
            const uint8_t *w = packed + row * kb + byte0;
#if LUT_VEC
            /* two chains hide the add latency */
            const lutv *tv = (const lutv *)T;
            lutv a = tv[idx[w[0]]], b = tv[LUT_ENT + idx[w[1]]];
            for (int g = 2; g < LUT_G; g += 2) {
                a += tv[g * LUT_ENT + idx[w[g]]];
                b += tv[(g + 1) * LUT_ENT + idx[w[g + 1]]];
            }
            lutv *rp = (lutv *)(res + (row - r0) * LUT_TOK);
            *rp += a + b;
#else
            float acc[LUT_TOK];
            for (int l = 0; l < LUT_TOK; l++) acc[l] = 0.0f;
            for (int g = 0; g < LUT_G; g++) {
                const float *e = T + ((int64_t)g * LUT_ENT + idx[w[g]]) * LUT_TOK;
                for (int l = 0; l < LUT_TOK; l++) acc[l] += e[l];
            }
            float *rp = res + (row - r0) * LUT_TOK;
            for (int l = 0; l < LUT_TOK; l++) rp[l] += acc[l];
#endif
        }
    }
    for (int t = 0; t < mt; t++)
        for (int64_t row = r0; row < r1; row++) td_store_f32(o, m0 + t, row, res[(row - r0) * LUT_TOK + t]);
}

int td_gemm_f32_lut(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                    const td_out_t *o, int threads) {
    const int64_t kb = td_padded_k(k) / 4, kp = kb * 4;
    uint8_t idx[256];
    entry_index(idx);
    int64_t ntb, nsplit, rows_per;
    td_lut_split(m, LUT_TOK, n, threads, LUT_ROWS, &ntb, &nsplit, &rows_per);
    int err = 0;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (td_force_parallel || ntb * n * kb >= (1 << 20))
#endif
    {
        float *xT = td_alloc((size_t)kp * LUT_TOK * sizeof(float));
        float *T = td_alloc((size_t)LUT_G * LUT_ENT * LUT_TOK * sizeof(float));
        float *res = td_alloc((size_t)rows_per * LUT_TOK * sizeof(float));
        const int ok = xT && T && res;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < ntb * nsplit; item++) {
            if (!ok) {
                err = 1;
                continue;
            }
            const int64_t tb = item / nsplit, r0 = (item % nsplit) * rows_per;
            const int64_t r1 = r0 + rows_per < n ? r0 + rows_per : n;
            const int mt = (int)(m - tb * LUT_TOK < LUT_TOK ? m - tb * LUT_TOK : LUT_TOK);
            if (r0 < r1) lut_block(x, ldx, tb * LUT_TOK, mt, k, kb, packed, r0, r1, idx, xT, T, res, o);
        }
        td_free(xT);
        td_free(T);
        td_free(res);
    }
    return err ? TD_ENOMEM : TD_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* Integer activations (int8, or 10-bit in int16): int16 tables of 16 tokens per entry. An entry is
 * a sum of four |x| <= lim, so |entry| <= 4 lim; `super` table sets of LUT_G look-ups stay within
 * int16 (super * LUT_G * 4 lim <= 32767) before the sums are widened into int32. */

#define LUT_ITOK 16

#if LUT_VEC
typedef int16_t lutiv __attribute__((vector_size(LUT_ITOK * sizeof(int16_t)), aligned(LUT_ITOK * sizeof(int16_t))));
#endif

static void build_tables_i16(const int16_t *xT, int64_t kbase, int16_t *T) {
    for (int g = 0; g < LUT_G; g++) {
        const int16_t *xk = xT + (kbase + g) * LUT_ITOK;
        int16_t lo[9][LUT_ITOK], hi[9][LUT_ITOK];
        for (int l = 0; l < LUT_ITOK; l++) {
            const int16_t a = xk[l], b = xk[32 * LUT_ITOK + l];
            const int16_t c = xk[64 * LUT_ITOK + l], d = xk[96 * LUT_ITOK + l];
            lo[0][l] = (int16_t)(-a - b);
            lo[1][l] = (int16_t)-b;
            lo[2][l] = (int16_t)(a - b);
            lo[3][l] = (int16_t)-a;
            lo[4][l] = 0;
            lo[5][l] = a;
            lo[6][l] = (int16_t)(b - a);
            lo[7][l] = b;
            lo[8][l] = (int16_t)(a + b);
            hi[0][l] = (int16_t)(-c - d);
            hi[1][l] = (int16_t)-d;
            hi[2][l] = (int16_t)(c - d);
            hi[3][l] = (int16_t)-c;
            hi[4][l] = 0;
            hi[5][l] = c;
            hi[6][l] = (int16_t)(d - c);
            hi[7][l] = d;
            hi[8][l] = (int16_t)(c + d);
        }
        int16_t *e = T + (int64_t)g * LUT_ENT * LUT_ITOK;
        for (int j = 0; j < 9; j++)
            for (int i = 0; i < 9; i++)
                for (int l = 0; l < LUT_ITOK; l++) e[(9 * j + i) * LUT_ITOK + l] = (int16_t)(lo[i][l] + hi[j][l]);
    }
}

static void lut_block_i16(const int8_t *xq8, const int16_t *xq16, int64_t ldq, int64_t m0, int mt, int64_t kb,
                          int super, const uint8_t *packed, int64_t r0, int64_t r1, const uint8_t idx[256], int16_t *xT,
                          int16_t *T, int16_t *res16, int32_t *res32, const td_out_t *o) {
    const int64_t kp = kb * 4;
    memset(xT, 0, (size_t)kp * LUT_ITOK * sizeof(int16_t));
    for (int t = 0; t < mt; t++)
        for (int64_t kk = 0; kk < kp; kk++)
            xT[kk * LUT_ITOK + t] = xq16 ? xq16[(m0 + t) * ldq + kk] : xq8[(m0 + t) * ldq + kk];
    memset(res32, 0, (size_t)(r1 - r0) * LUT_ITOK * sizeof(int32_t));
    const int64_t nset = kb / LUT_G;
    for (int64_t s = 0; s < nset; s++) {
        const int64_t byte0 = s * LUT_G;
        build_tables_i16(xT, (byte0 / TD_BLOCK_BYTES) * TD_BLOCK_K + byte0 % TD_BLOCK_BYTES, T);
        const int first = s % super == 0, last = s % super == super - 1 || s == nset - 1;
        for (int64_t row = r0; row < r1; row++) {
            const uint8_t *w = packed + row * kb + byte0;
            int16_t *rp = res16 + (row - r0) * LUT_ITOK;
#if LUT_VEC
            const lutiv *tv = (const lutiv *)T;
            lutiv a = tv[idx[w[0]]], b = tv[LUT_ENT + idx[w[1]]];
            for (int g = 2; g < LUT_G; g += 2) {
                a += tv[g * LUT_ENT + idx[w[g]]];
                b += tv[(g + 1) * LUT_ENT + idx[w[g + 1]]];
            }
            a += b;
            if (!first) a += *(const lutiv *)rp;
            *(lutiv *)rp = a;
#else
            int16_t acc[LUT_ITOK];
            for (int l = 0; l < LUT_ITOK; l++) acc[l] = first ? 0 : rp[l];
            for (int g = 0; g < LUT_G; g++) {
                const int16_t *e = T + ((int64_t)g * LUT_ENT + idx[w[g]]) * LUT_ITOK;
                for (int l = 0; l < LUT_ITOK; l++) acc[l] = (int16_t)(acc[l] + e[l]);
            }
            for (int l = 0; l < LUT_ITOK; l++) rp[l] = acc[l];
#endif
            if (last) {
                int32_t *qp = res32 + (row - r0) * LUT_ITOK;
                for (int l = 0; l < LUT_ITOK; l++) qp[l] += rp[l];
            }
        }
    }
    for (int t = 0; t < mt; t++)
        for (int64_t row = r0; row < r1; row++) td_store(o, m0 + t, row, res32[(row - r0) * LUT_ITOK + t]);
}

int td_gemm_int_lut(const int8_t *xq8, const int16_t *xq16, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed,
                    int64_t n, const td_out_t *o, int threads, int lim) {
    const int64_t kb = kp / 4;
    int super = 32767 / (LUT_G * 4 * lim);
    if (super < 1) return TD_EINVAL;
    uint8_t idx[256];
    entry_index(idx);
    int64_t ntb, nsplit, rows_per;
    td_lut_split(m, LUT_ITOK, n, threads, LUT_ROWS, &ntb, &nsplit, &rows_per);
    int err = 0;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (td_force_parallel || ntb * n * kb >= (1 << 20))
#endif
    {
        int16_t *xT = td_alloc((size_t)kp * LUT_ITOK * sizeof(int16_t));
        int16_t *T = td_alloc((size_t)LUT_G * LUT_ENT * LUT_ITOK * sizeof(int16_t));
        int16_t *res16 = td_alloc((size_t)rows_per * LUT_ITOK * sizeof(int16_t));
        int32_t *res32 = td_alloc((size_t)rows_per * LUT_ITOK * sizeof(int32_t));
        const int ok = xT && T && res16 && res32;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < ntb * nsplit; item++) {
            if (!ok) {
                err = 1;
                continue;
            }
            const int64_t tb = item / nsplit, r0 = (item % nsplit) * rows_per;
            const int64_t r1 = r0 + rows_per < n ? r0 + rows_per : n;
            const int mt = (int)(m - tb * LUT_ITOK < LUT_ITOK ? m - tb * LUT_ITOK : LUT_ITOK);
            if (r0 < r1)
                lut_block_i16(xq8, xq16, ldq, tb * LUT_ITOK, mt, kb, super, packed, r0, r1, idx, xT, T, res16, res32,
                              o);
        }
        td_free(xT);
        td_free(T);
        td_free(res16);
        td_free(res32);
    }
    return err ? TD_ENOMEM : TD_OK;
}
