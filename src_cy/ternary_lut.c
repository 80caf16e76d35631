/* Portable table GEMM (float32, many tokens), in plain C for the compiler to vectorize: the same
 * algorithm as the AVX2 table kernel (ternary_avx2.c, docs/kernels.md), with each table entry an
 * array of LUT_TOK floats (one per token of the block) instead of an AVX2 register. At -O2/-O3 GCC
 * and Clang turn the fixed-length loops over those arrays into NEON on aarch64 (part of ARMv8-A)
 * and SSE on x86-64, so the NEON build and the portable (scalar-ISA) build get the table
 * algorithm too. Used for M >= 8 tokens on NEON and on the scalar path.
 *
 * For a block of LUT_TOK tokens and one packed byte position (weights k, k+32, k+64, k+96) the
 * table holds the 81 signed sums of those four activations, entry c0 + 3 c1 + 9 c2 + 27 c3 for
 * codes c (0: -1, 1: 0, 2: +1; the invalid code 3 reads as 1, so a corrupted byte cannot index
 * outside the table). A row then costs one table look-up and one LUT_TOK-wide add per packed
 * byte. Table sets cover LUT_G byte positions (8 x 81 x 32 B = 20.7 KB, in L1); every row of the
 * work item passes each set and adds into its running sums. */
#include "ternary_internal.h"

#include <string.h>

#define LUT_TOK 8      /* tokens per table entry */
#define LUT_G 8        /* byte positions per table set; divides TD_BLOCK_BYTES */
#define LUT_ENT 81     /* 3^4 sign patterns of a byte */
#define LUT_ROWS 2048  /* rows per work item at most (bounds the running sums) */

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
            lo[0][l] = -a - b; lo[1][l] = -b; lo[2][l] = a - b;
            lo[3][l] = -a;     lo[4][l] = 0;  lo[5][l] = a;
            lo[6][l] = -a + b; lo[7][l] = b;  lo[8][l] = a + b;
            hi[0][l] = -c - d; hi[1][l] = -d; hi[2][l] = c - d;
            hi[3][l] = -c;     hi[4][l] = 0;  hi[5][l] = c;
            hi[6][l] = -c + d; hi[7][l] = d;  hi[8][l] = c + d;
        }
        float *e = T + (int64_t)g * LUT_ENT * LUT_TOK;
        for (int j = 0; j < 9; j++)
            for (int i = 0; i < 9; i++)
                for (int l = 0; l < LUT_TOK; l++) e[(9 * j + i) * LUT_TOK + l] = lo[i][l] + hi[j][l];
    }
}

/* Tokens m0 .. m0 + mt - 1 (mt <= LUT_TOK) times rows r0 .. r1 - 1. */
static void lut_block(const float *x, int64_t ldx, int64_t m0, int mt, int64_t k, int64_t kb,
                      const uint8_t *packed, int64_t r0, int64_t r1, const uint8_t idx[256], float *xT,
                      float *T, float *res, const td_out_t *o) {
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
    const int64_t ntb = (m + LUT_TOK - 1) / LUT_TOK;
    int64_t nsplit = (n + LUT_ROWS - 1) / LUT_ROWS;
    if (ntb * nsplit < threads) {
        int64_t want = (threads + ntb - 1) / ntb;
        if (want > (n + 63) / 64) want = (n + 63) / 64;
        if (want > nsplit) nsplit = want;
    }
    if (nsplit < 1) nsplit = 1;
    const int64_t rows_per = (n + nsplit - 1) / nsplit;
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
            if (!ok) { err = 1; continue; }
            const int64_t tb = item / nsplit, r0 = (item % nsplit) * rows_per;
            const int64_t r1 = r0 + rows_per < n ? r0 + rows_per : n;
            const int mt = (int)(m - tb * LUT_TOK < LUT_TOK ? m - tb * LUT_TOK : LUT_TOK);
            if (r0 < r1) lut_block(x, ldx, tb * LUT_TOK, mt, k, kb, packed, r0, r1, idx, xT, T, res, o);
        }
        td_free(xT); td_free(T); td_free(res);
    }
    return err ? TD_ENOMEM : TD_OK;
}
