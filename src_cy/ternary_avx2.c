/* x86-64 AVX2 kernels. Compiled for the baseline ISA: every function that uses AVX2 carries a
 * target attribute and is reached only after td_get_isa() saw AVX2 + FMA at run time.
 *
 * GEMM (many tokens) uses tables of partial sums: one packed byte holds four weights
 * (k, k+32, k+64, k+96); for a block of tokens we tabulate, per byte position, all 81 signed
 * sums of those four activations (one 8 x float32 or 16 x int16 vector per entry, the token
 * block running across the lanes). Every row of Q then costs one table look-up and one vector
 * add per packed byte, for all tokens of the block at once: no weight is ever multiplied.
 * GEMV (few tokens, int8) streams the weights instead: 32 weights are unpacked to -1/0/+1 bytes,
 * `sign` selects/negates/drops the activations and `maddubs` with a vector of ones widens pairs
 * to int16 partial sums. fp32 with one token uses scalar tables indexed by the packed byte itself.
 * Design notes and measurements: docs/kernels.md. */
#include "ternary_internal.h"

#if TD_X86
#include <float.h>
#include <math.h>
#if defined(_WIN32)
#include <malloc.h>
#endif
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define TD_TARGET __attribute__((target("avx2,fma")))

#ifndef G_TILE
#define G_TILE 8
#endif
/* G_TILE: packed bytes (groups of 4 weights) per table set; divides 32 */
#define TILES_PER_BLOCK (TD_BLOCK_BYTES / G_TILE)
#define N_ENT 81 /* 3^4 sign patterns of a group */
#define ENT_BYTES 32 /* one AVX2 vector per entry (fill_panel shifts by 5) */
#define GROUP_BYTES (N_ENT * ENT_BYTES)
#ifndef I16_SUPER
#define I16_SUPER (64 / G_TILE) /* table sets summed in int16 before widening (see below) */
#endif
#define GEMV_MAX_M 7 /* int8: up to this many tokens stream the weights (GEMV) */
/* Work below these sizes (~0.1 ms on one core for the GEMV, ~0.5 ms for the tables) runs on the
 * calling thread alone: waking a second OpenMP thread, and waiting for it at the closing barrier,
 * costs more than it saves, and far more when the cores are shared with other processes. Units:
 * packed bytes x tokens (GEMV), packed bytes x token blocks (tables). The GEMV bound was 8 M until
 * the 1 x 1536 x 4096 GEMV (1.5 M) was measured at 139 us on one thread and 86 us on two (quiet
 * machine). */
#define GEMV_PARALLEL_MIN (td_force_parallel ? 0 : (1 << 20))
#define LUT_PARALLEL_MIN (td_force_parallel ? 0 : (1 << 20))

/* byte -> byte offset of its entry inside a group's table: entry index c0 + 3 c1 + 9 c2 + 27 c3
 * for codes c_q of bits 2q+1..2q. The invalid code 3 reads as 1 (zero) so that a corrupted
 * weight cannot index outside the table. */
static void build_offsets(uint16_t off[256]) {
    for (int v = 0; v < 256; v++) {
        int idx = 0, place = 1;
        for (int q = 0; q < 4; q++) {
            int c = (v >> (2 * q)) & 3;
            if (c == 3) c = 1;
            for (int i = 0; i < c; i++) idx += place;
            place = place * 3;
        }
        off[v] = (uint16_t)(idx * ENT_BYTES);
    }
}

/* ------------------------------------------------------------------------------------------- */
/* float32 tables: 8 tokens per entry */

/* The 9 signed sums of two activations, index c0 + 3 c1 for codes c (0: -1, 1: 0, 2: +1). */
TD_TARGET static inline void pair_sums_f32(__m256 x0, __m256 x1, __m256 s[9]) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 n0 = _mm256_sub_ps(zero, x0);
    s[0] = _mm256_sub_ps(n0, x1);
    s[1] = _mm256_sub_ps(zero, x1);
    s[2] = _mm256_sub_ps(x0, x1);
    s[3] = n0;
    s[4] = zero;
    s[5] = x0;
    s[6] = _mm256_add_ps(n0, x1);
    s[7] = x1;
    s[8] = _mm256_add_ps(x0, x1);
}

/* Tables for the G_TILE groups whose first weight is kbase..kbase+G_TILE-1. xT (kp, 8).
 * Entry c0 + 3 c1 + 9 c2 + 27 c3 = lo[c0 + 3 c1] + hi[c2 + 3 c3]: 81 adds and stores per group,
 * with both 9-entry halves in registers. */
TD_TARGET static void build_tables_f32(const float *xT, int64_t kbase, float *T) {
    for (int g = 0; g < G_TILE; g++) {
        const float *xk = xT + (kbase + g) * 8;
        float *e = T + g * N_ENT * 8;
        __m256 lo[9], hi[9];
        pair_sums_f32(_mm256_load_ps(xk), _mm256_load_ps(xk + 32 * 8), lo);
        pair_sums_f32(_mm256_load_ps(xk + 64 * 8), _mm256_load_ps(xk + 96 * 8), hi);
        for (int j = 0; j < 9; j++)
            for (int i = 0; i < 9; i++) _mm256_store_ps(e + 8 * (9 * j + i), _mm256_add_ps(lo[i], hi[j]));
    }
}

#define LOADI(p) _mm256_load_si256((const __m256i *)(p))
#define LOOKUP(T, g, wb) ((const void *)((const char *)(T) + (g)*GROUP_BYTES + off[(wb)[g]]))
#define PANEL(T, g, p) ((const void *)((const char *)(T) + (g)*GROUP_BYTES + (p)[g]))

/* With many token blocks the byte -> offset translation is done once per call into a panel
 * offs[kt][row][G_TILE] (uint16), so the inner loop is only loads and adds and streams through
 * memory in order. */
#define PANEL_MIN_BLOCKS 2
#ifndef PANEL_WORDS
#define PANEL_WORDS 1
#endif
#ifndef LUT_MAX_ROWS
#define LUT_MAX_ROWS 4096 /* rows per work item at most: 4096 measured faster than 256..2048 here */
#endif

/* Fill the panel; called by every thread of the GEMM's parallel region (an orphaned `omp for`,
 * so the panel costs no parallel region of its own); the loop's closing barrier makes it complete
 * before any thread reads it. */
TD_TARGET static void fill_panel(const uint8_t *packed, int64_t n, int64_t kb, const uint16_t *off, uint16_t *offs) {
    const int64_t ntile = kb / G_TILE;
#if G_TILE == 8
    /* 32 packed bytes (4 table sets) at a time: entry index = lo[low nibble] + hi[high nibble] with
     * lo = c0 + 3 c1 and hi = 9 (c2 + 3 c3) looked up by pshufb (code 3 reads as 1, as in
     * build_offsets), widened to uint16 and scaled by the entry size */
    int8_t lo_t[16], hi_t[16];
    for (int v = 0; v < 16; v++) {
        const int a = (v & 3) == 3 ? 1 : (v & 3), b = (v >> 2) == 3 ? 1 : (v >> 2);
        lo_t[v] = (int8_t)(a + 3 * b);
        hi_t[v] = (int8_t)(9 * (a + 3 * b));
    }
    const __m256i lo_v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lo_t));
    const __m256i hi_v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)hi_t));
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    (void)off;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 64)
#endif
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *w = packed + row * kb;
        for (int64_t kt = 0; kt < ntile; kt += 4) { /* kb is a multiple of 32: ntile of 4 */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + kt * G_TILE));
            const __m256i idx = _mm256_add_epi8(
                _mm256_shuffle_epi8(lo_v, _mm256_and_si256(v, low4)),
                _mm256_shuffle_epi8(hi_v, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)));
            const __m256i o0 = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(idx)), 5);
            const __m256i o1 = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(idx, 1)), 5);
            _mm_storeu_si128((__m128i *)(offs + (kt * n + row) * G_TILE), _mm256_castsi256_si128(o0));
            _mm_storeu_si128((__m128i *)(offs + ((kt + 1) * n + row) * G_TILE), _mm256_extracti128_si256(o0, 1));
            _mm_storeu_si128((__m128i *)(offs + ((kt + 2) * n + row) * G_TILE), _mm256_castsi256_si128(o1));
            _mm_storeu_si128((__m128i *)(offs + ((kt + 3) * n + row) * G_TILE), _mm256_extracti128_si256(o1, 1));
        }
    }
#else
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 64)
#endif
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *w = packed + row * kb;
        for (int64_t kt = 0; kt < ntile; kt++)
            for (int g = 0; g < G_TILE; g++) offs[(kt * n + row) * G_TILE + g] = off[w[kt * G_TILE + g]];
    }
#endif
}

/* xT (kp, 8) = the first mt rows of x (row stride ldx, k columns) transposed, zero beyond k and
 * for tokens mt..7: 8 x 8 tiles transposed in registers, the last k % 8 columns one by one. */
TD_TARGET static void transpose8_f32(const float *x, int64_t ldx, int mt, int64_t k, int64_t kp, float *xT) {
    int64_t k0 = 0;
    for (; k0 + 8 <= k; k0 += 8) {
        __m256 r[8], u[8];
        for (int t = 0; t < 8; t++) r[t] = t < mt ? _mm256_loadu_ps(x + t * ldx + k0) : _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            u[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            u[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; i++) {
            r[4 * i] = _mm256_shuffle_ps(u[4 * i], u[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
            r[4 * i + 1] = _mm256_shuffle_ps(u[4 * i], u[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
            r[4 * i + 2] = _mm256_shuffle_ps(u[4 * i + 1], u[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
            r[4 * i + 3] = _mm256_shuffle_ps(u[4 * i + 1], u[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        /* r[j] (j < 4) holds columns j (low lane) and j + 4 (high lane) of rows 0-3; r[4 + j] of rows 4-7 */
        for (int j = 0; j < 4; j++) {
            _mm256_store_ps(xT + (k0 + j) * 8, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
            _mm256_store_ps(xT + (k0 + j + 4) * 8, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
        }
    }
    memset(xT + k0 * 8, 0, (size_t)(kp - k0) * 8 * sizeof(float));
    for (int t = 0; t < mt; t++)
        for (int64_t kk = k0; kk < k; kk++) xT[kk * 8 + t] = x[t * ldx + kk];
}

/* Tokens m0..m0+mt-1 (mt <= 8) times rows r0..r1-1. Buffers: xT (kp, 8), T (G_TILE tables),
 * res (r1 - r0, 8). */
TD_TARGET static void lut_f32_block(const float *x, int64_t ldx, int64_t m0, int mt, int64_t k, int64_t kb,
                                    const uint8_t *packed, int64_t r0, int64_t r1, int64_t n, const uint16_t *off,
                                    const uint16_t *offs, float *xT, float *T, float *res, const td_out_t *o) {
    const int64_t kp = kb * 4;
    transpose8_f32(x + m0 * ldx, ldx, mt, k, kp, xT);
    const int64_t ntile = kb / G_TILE;
    for (int64_t kt = 0; kt < ntile; kt++) {
        /* table set kt covers bytes G_TILE kt .. G_TILE (kt + 1) - 1 of each row */
        build_tables_f32(xT, (kt / TILES_PER_BLOCK) * TD_BLOCK_K + (kt % TILES_PER_BLOCK) * G_TILE, T);
        const uint8_t *wp = packed + kt * G_TILE;
        const uint16_t *op = offs ? offs + kt * n * G_TILE : NULL;
        for (int64_t row = r0; row < r1; row++) {
            /* two independent chains hide the add latency */
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            if (op) {
#if PANEL_WORDS
                uint64_t wv[G_TILE / 4]; /* four offsets per load, see lut_i16_block */
                memcpy(wv, op + row * G_TILE, sizeof wv);
#pragma GCC unroll 16
                for (int g = 0; g < G_TILE; g += 2) {
                    const uint64_t w = wv[g >> 2];
                    const int sh = 16 * (g & 3);
                    a = _mm256_add_ps(
                        a, _mm256_load_ps((const float *)((const char *)T + g * GROUP_BYTES + ((w >> sh) & 0xffff))));
                    b = _mm256_add_ps(b, _mm256_load_ps((const float *)((const char *)T + (g + 1) * GROUP_BYTES +
                                                                        ((w >> (sh + 16)) & 0xffff))));
                }
#else
                const uint16_t *p = op + row * G_TILE;
#pragma GCC unroll 16
                for (int g = 0; g < G_TILE; g += 2) {
                    a = _mm256_add_ps(a, _mm256_load_ps(PANEL(T, g, p)));
                    b = _mm256_add_ps(b, _mm256_load_ps(PANEL(T, g + 1, p)));
                }
#endif
            } else {
                const uint8_t *wb = wp + row * kb;
#pragma GCC unroll 16
                for (int g = 0; g < G_TILE; g += 2) {
                    a = _mm256_add_ps(a, _mm256_load_ps(LOOKUP(T, g, wb)));
                    b = _mm256_add_ps(b, _mm256_load_ps(LOOKUP(T, g + 1, wb)));
                }
            }
            a = _mm256_add_ps(a, b);
            float *rp = res + (row - r0) * 8;
            if (kt) a = _mm256_add_ps(_mm256_load_ps(rp), a);
            _mm256_store_ps(rp, a);
        }
    }
    /* token by token over 64-row strips (see lut_i16_block) */
    for (int64_t s0 = r0; s0 < r1; s0 += 64) {
        const int64_t s1 = s0 + 64 < r1 ? s0 + 64 : r1;
        for (int t = 0; t < mt; t++)
            for (int64_t row = s0; row < s1; row++)
                td_store_f32(o, m0 + t, row, ntile ? res[(row - r0) * 8 + t] : 0.0f);
    }
}


/* float32 at every token count (one token included): 8-token tables, whose per-token sums are those of
 * the portable tables (ternary_lut.c), so every ISA gives the same bits (docs/reproducibility.md). */
static int lut_f32_avx2(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                        const td_out_t *o, int threads) {
    const int64_t kb = td_padded_k(k) / 4, kp = kb * 4;
    uint16_t off[256];
    build_offsets(off);
    int64_t ntb, nsplit, rows_per;
    if (((m + 7) / 8) * n * kb < LUT_PARALLEL_MIN) threads = 1;
    td_lut_split(m, 8, n, threads, LUT_MAX_ROWS, &ntb, &nsplit, &rows_per);
    uint16_t *offs = NULL;
    if (ntb >= PANEL_MIN_BLOCKS) {
        offs = td_alloc((size_t)n * (size_t)kb * sizeof(uint16_t));
        if (!offs) return TD_ENOMEM;
    }
    int err = 0;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
        float *xT = td_alloc((size_t)(kp + 1) * 8 * sizeof(float));
        float *T = td_alloc((size_t)G_TILE * GROUP_BYTES);
        float *res = td_alloc((size_t)rows_per * 8 * sizeof(float));
        const int ok = xT && T && res;
        if (offs) fill_panel(packed, n, kb, off, offs);
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
            const int mt = (int)(m - tb * 8 < 8 ? m - tb * 8 : 8);
            if (r0 < r1) lut_f32_block(x, ldx, tb * 8, mt, k, kb, packed, r0, r1, n, off, offs, xT, T, res, o);
        }
        td_free(xT);
        td_free(T);
        td_free(res);
    }
    td_free(offs);
    return err ? TD_ENOMEM : TD_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* int16 tables of int8 activations: 16 tokens per entry */

TD_TARGET static inline void pair_sums_i16(__m256i x0, __m256i x1, __m256i s[9]) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i n0 = _mm256_sub_epi16(zero, x0);
    s[0] = _mm256_sub_epi16(n0, x1);
    s[1] = _mm256_sub_epi16(zero, x1);
    s[2] = _mm256_sub_epi16(x0, x1);
    s[3] = n0;
    s[4] = zero;
    s[5] = x0;
    s[6] = _mm256_add_epi16(n0, x1);
    s[7] = x1;
    s[8] = _mm256_add_epi16(x0, x1);
}

TD_TARGET static void build_tables_i16(const int16_t *xT, int64_t kbase, int16_t *T) {
    for (int g = 0; g < G_TILE; g++) {
        const int16_t *xk = xT + (kbase + g) * 16;
        int16_t *e = T + g * N_ENT * 16;
        __m256i lo[9], hi[9];
        pair_sums_i16(LOADI(xk), LOADI(xk + 32 * 16), lo);
        pair_sums_i16(LOADI(xk + 64 * 16), LOADI(xk + 96 * 16), hi);
        for (int j = 0; j < 9; j++)
            for (int i = 0; i < 9; i++)
                _mm256_store_si256((__m256i *)(e + 16 * (9 * j + i)), _mm256_add_epi16(lo[i], hi[j]));
    }
}


/* xT (kp, 16) int16 = the first mt rows of x (row stride ldq, kp columns; kp a multiple of 16)
 * transposed, tokens mt..15 zero: 16 x 16 byte tiles transposed in registers (four unpack
 * rounds), then sign-extended. */
TD_TARGET static void transpose16_i8(const int8_t *x, int64_t ldq, int mt, int64_t kp, int16_t *xT) {
    for (int64_t k0 = 0; k0 < kp; k0 += 16) {
        __m128i r[16], u[16];
        for (int t = 0; t < 16; t++)
            r[t] = t < mt ? _mm_loadu_si128((const __m128i *)(x + t * ldq + k0)) : _mm_setzero_si128();
        for (int i = 0; i < 8; i++) {
            u[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
            u[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 2; j++) {
                r[4 * i + j] = _mm_unpacklo_epi16(u[4 * i + j], u[4 * i + 2 + j]);
                r[4 * i + 2 + j] = _mm_unpackhi_epi16(u[4 * i + j], u[4 * i + 2 + j]);
            }
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 4; j++) {
                u[8 * i + j] = _mm_unpacklo_epi32(r[8 * i + j], r[8 * i + 4 + j]);
                u[8 * i + 4 + j] = _mm_unpackhi_epi32(r[8 * i + j], r[8 * i + 4 + j]);
            }
        for (int j = 0; j < 8; j++) {
            r[j] = _mm_unpacklo_epi64(u[j], u[8 + j]);
            r[8 + j] = _mm_unpackhi_epi64(u[j], u[8 + j]);
        }
        /* r[c] now holds column k0 + perm(c) of the 16 rows */
        static const int col[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
        for (int c = 0; c < 16; c++)
            _mm256_store_si256((__m256i *)(xT + (k0 + col[c]) * 16), _mm256_cvtepi8_epi16(r[c]));
    }
}

/* The same for int16 rows: two 8 x 8 tiles of int16 per 8 columns. */
TD_TARGET static void transpose16_i16(const int16_t *x, int64_t ldq, int mt, int64_t kp, int16_t *xT) {
    for (int64_t k0 = 0; k0 < kp; k0 += 8) {
        __m128i half[2][8];
        for (int h = 0; h < 2; h++) {
            __m128i r[8], u[8];
            for (int t = 0; t < 8; t++)
                r[t] = 8 * h + t < mt ? _mm_loadu_si128((const __m128i *)(x + (8 * h + t) * ldq + k0))
                                      : _mm_setzero_si128();
            for (int i = 0; i < 4; i++) {
                u[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
                u[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
            }
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) {
                    r[4 * i + j] = _mm_unpacklo_epi32(u[4 * i + j], u[4 * i + 2 + j]);
                    r[4 * i + 2 + j] = _mm_unpackhi_epi32(u[4 * i + j], u[4 * i + 2 + j]);
                }
            for (int j = 0; j < 4; j++) {
                half[h][j] = _mm_unpacklo_epi64(r[j], r[4 + j]);
                half[h][4 + j] = _mm_unpackhi_epi64(r[j], r[4 + j]);
            }
        }
        static const int col[8] = {0, 4, 2, 6, 1, 5, 3, 7};
        for (int c = 0; c < 8; c++)
            _mm256_store_si256((__m256i *)(xT + (k0 + col[c]) * 16), _mm256_set_m128i(half[1][c], half[0][c]));
    }
}

/* Entries are sums of four |xq| <= lim, so |entry| <= 4 lim; `super` table sets of G_TILE look-ups
 * add at most super * G_TILE * 4 lim <= 32767 per lane before the int16 sums are widened to int32:
 * int8 (lim 127): 8 * 8 * 508 = 32512; 10 bits (lim 511): 2 * 8 * 2044 = 32704 (i16_super). */
TD_TARGET static void lut_i16_block(const int8_t *xq, const int16_t *xq16, int64_t ldq, int64_t m0, int mt, int64_t kb,
                                    int super, const uint8_t *packed, int64_t r0, int64_t r1, int64_t n,
                                    const uint16_t *off, const uint16_t *offs, int16_t *xT, int16_t *T, int16_t *res16,
                                    int32_t *res32, const td_out_t *o) {
    const int64_t kp = kb * 4;
    if (xq16) transpose16_i16(xq16 + m0 * ldq, ldq, mt, kp, xT);
    else transpose16_i8(xq + m0 * ldq, ldq, mt, kp, xT);
    const int64_t ntile = kb / G_TILE;
    for (int64_t kt = 0; kt < ntile; kt++) {
        build_tables_i16(xT, (kt / TILES_PER_BLOCK) * TD_BLOCK_K + (kt % TILES_PER_BLOCK) * G_TILE, T);
        const uint8_t *wp = packed + kt * G_TILE;
        const uint16_t *op = offs ? offs + kt * n * G_TILE : NULL;
        const int first = kt % super == 0;
        const int last = kt % super == super - 1 || kt == ntile - 1;
        const int widen_add = kt >= super;
        for (int64_t row = r0; row < r1; row++) {
            __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
            if (op) {
#if PANEL_WORDS
                /* four offsets per 64-bit load, split with shifts: fewer loads in a loop that is
                 * mostly loads (3-10% faster measured; PANEL_WORDS=0 restores one load each) */
                uint64_t wv[G_TILE / 4];
                memcpy(wv, op + row * G_TILE, sizeof wv);
#pragma GCC unroll 16
                for (int g = 0; g < G_TILE; g += 2) {
                    const uint64_t w = wv[g >> 2];
                    const int sh = 16 * (g & 3);
                    a = _mm256_add_epi16(a, LOADI((const char *)T + g * GROUP_BYTES + ((w >> sh) & 0xffff)));
                    b = _mm256_add_epi16(b,
                                         LOADI((const char *)T + (g + 1) * GROUP_BYTES + ((w >> (sh + 16)) & 0xffff)));
                }
#else
                const uint16_t *p = op + row * G_TILE;
#pragma GCC unroll 16
                for (int g = 0; g < G_TILE; g += 2) {
                    a = _mm256_add_epi16(a, LOADI(PANEL(T, g, p)));
                    b = _mm256_add_epi16(b, LOADI(PANEL(T, g + 1, p)));
                }
#endif
            } else {
                const uint8_t *wb = wp + row * kb;
#pragma GCC unroll 16
                for (int g = 0; g < G_TILE; g += 2) {
                    a = _mm256_add_epi16(a, LOADI(LOOKUP(T, g, wb)));
                    b = _mm256_add_epi16(b, LOADI(LOOKUP(T, g + 1, wb)));
                }
            }
            a = _mm256_add_epi16(a, b);
            int16_t *rp = res16 + (row - r0) * 16;
            if (!first) a = _mm256_add_epi16(LOADI(rp), a);
            if (last) {
                int32_t *qp = res32 + (row - r0) * 16;
                __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a));
                __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1));
                if (widen_add) {
                    lo = _mm256_add_epi32(lo, LOADI(qp));
                    hi = _mm256_add_epi32(hi, LOADI(qp + 8));
                }
                _mm256_store_si256((__m256i *)qp, lo);
                _mm256_store_si256((__m256i *)(qp + 8), hi);
            } else {
                _mm256_store_si256((__m256i *)rp, a);
            }
        }
    }
    /* outputs token by token over 64-row strips: 16 interleaved output rows 4 * ldy bytes apart
     * would alias in the L1 sets when ldy is a multiple of 1024 (27-29 ms against 20-23 ms for
     * 512 x 1536 x 4096 here) */
    for (int64_t s0 = r0; s0 < r1; s0 += 64) {
        const int64_t s1 = s0 + 64 < r1 ? s0 + 64 : r1;
        for (int t = 0; t < mt; t++)
            for (int64_t row = s0; row < s1; row++) td_store(o, m0 + t, row, ntile ? res32[(row - r0) * 16 + t] : 0);
    }
}

/* ------------------------------------------------------------------------------------------- */
/* int8 GEMV: stream the packed weights once for up to 4 tokens */

TD_TARGET static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* The 128 weights of a 32-byte block as -1/0/+1 bytes: q[j] holds k = 32 j .. 32 j + 31. Each
 * byte's low nibble (codes of k and k + 32) and high nibble (k + 64, k + 96) are looked up twice
 * with pshufb: nibble c0 + 4 c1 -> c0 - 1 or c1 - 1; the invalid code 3 reads as 0. */
TD_TARGET static inline void decode_signs(__m256i v, __m256i q[4]) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i sign_lo = _mm256_setr_epi8(-1, 0, 1, 0, -1, 0, 1, 0, -1, 0, 1, 0, -1, 0, 1, 0, -1, 0, 1, 0, -1, 0, 1,
                                             0, -1, 0, 1, 0, -1, 0, 1, 0);
    const __m256i sign_hi = _mm256_setr_epi8(-1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, -1, -1, -1, -1, 0, 0,
                                             0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    q[0] = _mm256_shuffle_epi8(sign_lo, lo);
    q[1] = _mm256_shuffle_epi8(sign_hi, lo);
    q[2] = _mm256_shuffle_epi8(sign_lo, hi);
    q[3] = _mm256_shuffle_epi8(sign_hi, hi);
}

/* sign(x, w) selects, negates or drops each activation; maddubs(1, .) adds neighbouring pairs. */
#define SEL_ADD(acc, xp, w)                                                                                            \
    acc = _mm256_add_epi16(acc,                                                                                        \
                           _mm256_maddubs_epi16(one8, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xp)), w)))

TD_TARGET static void gemv_i8_rows(const int8_t *xq, int64_t ldq, int64_t m0, int mt, int64_t kb, const uint8_t *packed,
                                   int64_t r0, int64_t r1, const td_out_t *o) {
    const __m256i one8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const int64_t nblk = kb / TD_BLOCK_BYTES;
    const int8_t *x0 = xq + m0 * ldq;
    const int8_t *x1 = x0 + (mt > 1 ? ldq : 0), *x2 = x0 + (mt > 2 ? 2 * ldq : 0), *x3 = x0 + (mt > 3 ? 3 * ldq : 0);
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w = packed + row * kb;
        __m256i t0 = _mm256_setzero_si256(), t1 = t0, t2 = t0, t3 = t0;
        /* 32 blocks = 128 maddubs results of |.| <= 254 per int16 lane: no overflow */
        for (int64_t sb = 0; sb < nblk; sb += 32) {
            const int64_t e = sb + 32 < nblk ? sb + 32 : nblk;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t bk = sb; bk < e; bk++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + bk * TD_BLOCK_BYTES));
                __m256i q[4];
                decode_signs(v, q);
                const __m256i q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
                const int64_t kk = bk * TD_BLOCK_K;
                SEL_ADD(a0, x0 + kk, q0);
                SEL_ADD(a0, x0 + kk + 32, q1);
                SEL_ADD(a0, x0 + kk + 64, q2);
                SEL_ADD(a0, x0 + kk + 96, q3);
                if (mt > 1) {
                    SEL_ADD(a1, x1 + kk, q0);
                    SEL_ADD(a1, x1 + kk + 32, q1);
                    SEL_ADD(a1, x1 + kk + 64, q2);
                    SEL_ADD(a1, x1 + kk + 96, q3);
                }
                if (mt > 2) {
                    SEL_ADD(a2, x2 + kk, q0);
                    SEL_ADD(a2, x2 + kk + 32, q1);
                    SEL_ADD(a2, x2 + kk + 64, q2);
                    SEL_ADD(a2, x2 + kk + 96, q3);
                }
                if (mt > 3) {
                    SEL_ADD(a3, x3 + kk, q0);
                    SEL_ADD(a3, x3 + kk + 32, q1);
                    SEL_ADD(a3, x3 + kk + 64, q2);
                    SEL_ADD(a3, x3 + kk + 96, q3);
                }
            }
            /* madd with ones widens the int16 pair sums to int32 */
            t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(a0, ones16));
            t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(a1, ones16));
            t2 = _mm256_add_epi32(t2, _mm256_madd_epi16(a2, ones16));
            t3 = _mm256_add_epi32(t3, _mm256_madd_epi16(a3, ones16));
        }
        td_store(o, m0, row, hsum_epi32(t0));
        if (mt > 1) td_store(o, m0 + 1, row, hsum_epi32(t1));
        if (mt > 2) td_store(o, m0 + 2, row, hsum_epi32(t2));
        if (mt > 3) td_store(o, m0 + 3, row, hsum_epi32(t3));
    }
}

/* The int16-table GEMM over token blocks of 16, on int8 (xq) or int16 (xq16) activations. */
static int lut_i16_driver(const int8_t *xq, const int16_t *xq16, int64_t m, int64_t kp, int64_t ldq,
                          const uint8_t *packed, int64_t n, const td_out_t *o, int threads, int super) {
    const int64_t kb = kp / 4;
    uint16_t off[256];
    build_offsets(off);
    int64_t ntb, nsplit, rows_per;
    if (((m + 15) / 16) * n * kb < LUT_PARALLEL_MIN) threads = 1;
    td_lut_split(m, 16, n, threads, LUT_MAX_ROWS, &ntb, &nsplit, &rows_per);
    uint16_t *offs = NULL;
    if (ntb >= PANEL_MIN_BLOCKS) {
        offs = td_alloc((size_t)n * (size_t)kb * sizeof(uint16_t));
        if (!offs) return TD_ENOMEM;
    }
    int err = 0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
        int16_t *xT = td_alloc((size_t)(kp + 1) * 16 * sizeof(int16_t));
        int16_t *T = td_alloc((size_t)G_TILE * GROUP_BYTES);
        int16_t *res16 = td_alloc((size_t)rows_per * 16 * sizeof(int16_t));
        int32_t *res32 = td_alloc((size_t)rows_per * 16 * sizeof(int32_t));
        const int ok = xT && T && res16 && res32;
        if (offs) fill_panel(packed, n, kb, off, offs);
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
            const int mt = (int)(m - tb * 16 < 16 ? m - tb * 16 : 16);
            if (r0 < r1)
                lut_i16_block(xq, xq16, ldq, tb * 16, mt, kb, super, packed, r0, r1, n, off, offs, xT, T, res16, res32,
                              o);
        }
        td_free(xT);
        td_free(T);
        td_free(res16);
        td_free(res32);
    }
    td_free(offs);
    return err ? TD_ENOMEM : TD_OK;
}


int td_gemm_i8_avx2_gemv(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                         const td_out_t *o, int threads) {
    const int64_t kb = kp / 4;
    const int64_t chunk = 32; /* rows per work item */
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n * kb * m >= GEMV_PARALLEL_MIN)
#endif
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        const int64_t r1 = r0 + chunk < n ? r0 + chunk : n;
        for (int64_t m0 = 0; m0 < m; m0 += 4)
            gemv_i8_rows(xq, ldq, m0, (int)(m - m0 < 4 ? m - m0 : 4), kb, packed, r0, r1, o);
    }
    return TD_OK;
}

static int lut_i8_avx2(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                       const td_out_t *o, int threads) {
    return lut_i16_driver(xq, NULL, m, kp, ldq, packed, n, o, threads, I16_SUPER);
}

/* Table sets per int16 run for activations bounded by lim (see lut_i16_block). */
static int i16_super(int lim) {
    int s = 32767 / (4 * lim * G_TILE);
    return s < 1 ? 1 : s;
}

/* int16 GEMV (10-bit activations, up to 2 tokens per pass): the weights are decoded as in
 * gemv_i8_rows, each 32-weight vector is sign-extended to two 16-weight halves, and
 * `_mm256_sign_epi16` selects, negates or drops 16 activations at a time. Per int16 lane a block
 * adds 8 values of |.| <= lim; GEMV16_WIDEN blocks stay below 32767 (lim <= 511: 8 x 8 x 511 =
 * 32704) before `madd(., ones)` widens to int32. */
#define GEMV16_WIDEN 8

TD_TARGET static void gemv_i16_rows(const int16_t *xq, int64_t ldq, int64_t m0, int mt, int64_t kb,
                                    const uint8_t *packed, int64_t r0, int64_t r1, const td_out_t *o) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    const int64_t nblk = kb / TD_BLOCK_BYTES;
    const int16_t *x0 = xq + m0 * ldq, *x1 = x0 + (mt > 1 ? ldq : 0);
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w = packed + row * kb;
        __m256i t0 = _mm256_setzero_si256(), t1 = t0;
        for (int64_t sb = 0; sb < nblk; sb += GEMV16_WIDEN) {
            const int64_t e = sb + GEMV16_WIDEN < nblk ? sb + GEMV16_WIDEN : nblk;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0;
            for (int64_t bk = sb; bk < e; bk++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + bk * TD_BLOCK_BYTES));
                __m256i q[4];
                decode_signs(v, q);
                const int64_t kk = bk * TD_BLOCK_K;
                for (int j = 0; j < 4; j++) {
                    const __m256i wl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q[j]));
                    const __m256i wh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q[j], 1));
                    const int64_t c = kk + 32 * j;
                    a0 = _mm256_add_epi16(a0, _mm256_sign_epi16(_mm256_loadu_si256((const __m256i *)(x0 + c)), wl));
                    a0 = _mm256_add_epi16(a0,
                                          _mm256_sign_epi16(_mm256_loadu_si256((const __m256i *)(x0 + c + 16)), wh));
                    if (mt > 1) {
                        a1 = _mm256_add_epi16(a1, _mm256_sign_epi16(_mm256_loadu_si256((const __m256i *)(x1 + c)), wl));
                        a1 = _mm256_add_epi16(
                            a1, _mm256_sign_epi16(_mm256_loadu_si256((const __m256i *)(x1 + c + 16)), wh));
                    }
                }
            }
            t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(a0, ones16));
            t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(a1, ones16));
        }
        td_store(o, m0, row, hsum_epi32(t0));
        if (mt > 1) td_store(o, m0 + 1, row, hsum_epi32(t1));
    }
}

static int lut_i16_avx2(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                        const td_out_t *o, int threads, int lim) {
    return lut_i16_driver(NULL, xq, m, kp, ldq, packed, n, o, threads, i16_super(lim));
}

int td_gemm_i16_avx2_gemv(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                          const td_out_t *o, int threads, int lim) {
    const int64_t kb = kp / 4;
    (void)threads;
    if (lim > 511) return lut_i16_avx2(xq, m, kp, ldq, packed, n, o, threads, lim);
    const int64_t chunk = 32;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (2 * n * kb * m >= GEMV_PARALLEL_MIN)
#endif
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        const int64_t r1 = r0 + chunk < n ? r0 + chunk : n;
        for (int64_t m0 = 0; m0 < m; m0 += 2)
            gemv_i16_rows(xq, ldq, m0, (int)(m - m0 < 2 ? m - m0 : 2), kb, packed, r0, r1, o);
    }
    return TD_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* int8 quantization of one row, bit-exact with the scalar path: round-half-even of x * (127/absmax)
 * in float32, clamped to [-127, 127]. */

/* max of the lanes of mx and of |x[i..k-1]| */
TD_TARGET static inline float hmax_abs_tail(__m256 mx, const float *x, int64_t i, int64_t k) {
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    float amax = _mm_cvtss_f32(m4);
    for (; i < k; i++) {
        float a = x[i] < 0 ? -x[i] : x[i];
        amax = a > amax ? a : amax;
    }
    return amax;
}

TD_TARGET static void td_quantize_row_avx2(const float *x, int64_t k, int8_t *xq, int64_t kq, float *scale) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), mx);
    float amax = hmax_abs_tail(mx, x, i, k);
    if (!(amax > 0.0f) || amax > FLT_MAX) {
        memset(xq, 0, (size_t)kq);
        *scale = (amax > 0.0f) ? amax / 127.0f : 0.0f;
        return;
    }
    const float inv = 127.0f / amax;
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    i = 0;
    for (; i + 32 <= k; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; j++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vinv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm256_max_ps(_mm256_min_ps(r, hi), lo);
            v[j] = _mm256_cvtps_epi32(r);
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(xq + i), _mm256_permutevar8x32_epi32(p, perm));
    }
    const float magic = 12582912.0f; /* 1.5 * 2^23: round half to even for |v| < 2^22 */
    for (; i < k; i++) {
        float r = (x[i] * inv + magic) - magic;
        r = r < 127.0f ? r : 127.0f;
        r = r > -127.0f ? r : -127.0f;
        xq[i] = (int8_t)(int)r;
    }
    if (kq > k) memset(xq + k, 0, (size_t)(kq - k));
    *scale = amax / 127.0f;
}

/* The same for lim = 2^(bits-1) - 1 levels into int16 (9..10-bit activations). */
TD_TARGET static void td_quantize_row16_avx2(const float *x, int64_t k, int16_t *xq, int64_t kq, float *scale,
                                             int lim) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const float flim = (float)lim;
    __m256 mx = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), mx);
    float amax = hmax_abs_tail(mx, x, i, k);
    if (!(amax > 0.0f) || amax > FLT_MAX) {
        memset(xq, 0, (size_t)kq * sizeof(int16_t));
        *scale = (amax > 0.0f) ? amax / flim : 0.0f;
        return;
    }
    const float inv = flim / amax;
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(flim), lo = _mm256_set1_ps(-flim);
    i = 0;
    for (; i + 16 <= k; i += 16) {
        __m256i v[2];
        for (int j = 0; j < 2; j++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vinv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm256_max_ps(_mm256_min_ps(r, hi), lo);
            v[j] = _mm256_cvtps_epi32(r);
        }
        /* packs interleaves the 128-bit lanes: 0-3 8-11 4-7 12-15; permute puts them in order */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256((__m256i *)(xq + i), p);
    }
    const float magic = 12582912.0f;
    for (; i < k; i++) {
        float r = (x[i] * inv + magic) - magic;
        r = r < flim ? r : flim;
        r = r > -flim ? r : -flim;
        xq[i] = (int16_t)(int)r;
    }
    for (; i < kq; i++) xq[i] = 0;
    *scale = amax / flim;
}

/* ------------------------------------------------------------------------------------------- */
/* silu(a) * b with a vectorized exp: Cody-Waite range reduction (x = n ln2 + r, |r| <= ln2 / 2) and
 * a degree-6 polynomial for e^r; within 2 ulp of expf over the range, which keeps silu within float
 * rounding of the reference. Below -88 the reference's exp(-a) overflows to inf and silu is -0; here
 * it is a tiny number of at most |a| * 1e-38. */

TD_TARGET static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

TD_TARGET static inline __m256 swiglu8(__m256 av, __m256 bv) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), av));
    return _mm256_mul_ps(_mm256_div_ps(av, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), bv);
}

/* The last count % 8 elements go through the same vector code (copied into a padded vector), so
 * that an element's result does not depend on its position in the array (batch invariance). */
TD_TARGET static void td_swiglu_avx2(const float *a, const float *b, float *out, int64_t count) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, swiglu8(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    if (i < count) {
        float ta[8] = {0}, tb[8] = {0}, to[8];
        memcpy(ta, a + i, (size_t)(count - i) * sizeof(float));
        memcpy(tb, b + i, (size_t)(count - i) * sizeof(float));
        _mm256_storeu_ps(to, swiglu8(_mm256_loadu_ps(ta), _mm256_loadu_ps(tb)));
        memcpy(out + i, to, (size_t)(count - i) * sizeof(float));
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Softmax attention for one (batch, head) and a range of query rows; see td_attention in
 * ternary_gemm.c for the driver and the scratch layout. Both products are the same register tile:
 * C (6 x 16) = A (6 x L, one element broadcast at a time) B (L x 16): 12 accumulators, 2 loads and
 * 6 broadcasts per 12 FMAs, so the FMA units, not the loads, set the pace. */

#define ATT_MR 6

/* c[r][0..15] = sum_l a[r][l] * b[l * ldb + 0..15] for r < 6 (rows past the real ones point at
 * a valid row and their results are dropped by the caller). */
TD_TARGET static inline void att_tile(const float *const a[ATT_MR], int64_t lda_step, int64_t L, const float *b,
                                      int64_t ldb, float *c, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (int64_t l = 0; l < L; l++) {
        const __m256 b0 = _mm256_load_ps(b + l * ldb), b1 = _mm256_load_ps(b + l * ldb + 8);
        const int64_t o = l * lda_step;
        __m256 t = _mm256_broadcast_ss(a0 + o);
        c00 = _mm256_fmadd_ps(t, b0, c00);
        c01 = _mm256_fmadd_ps(t, b1, c01);
        t = _mm256_broadcast_ss(a1 + o);
        c10 = _mm256_fmadd_ps(t, b0, c10);
        c11 = _mm256_fmadd_ps(t, b1, c11);
        t = _mm256_broadcast_ss(a2 + o);
        c20 = _mm256_fmadd_ps(t, b0, c20);
        c21 = _mm256_fmadd_ps(t, b1, c21);
        t = _mm256_broadcast_ss(a3 + o);
        c30 = _mm256_fmadd_ps(t, b0, c30);
        c31 = _mm256_fmadd_ps(t, b1, c31);
        t = _mm256_broadcast_ss(a4 + o);
        c40 = _mm256_fmadd_ps(t, b0, c40);
        c41 = _mm256_fmadd_ps(t, b1, c41);
        t = _mm256_broadcast_ss(a5 + o);
        c50 = _mm256_fmadd_ps(t, b0, c50);
        c51 = _mm256_fmadd_ps(t, b1, c51);
    }
    _mm256_store_ps(c, c00);
    _mm256_store_ps(c + 8, c01);
    _mm256_store_ps(c + ldc, c10);
    _mm256_store_ps(c + ldc + 8, c11);
    _mm256_store_ps(c + 2 * ldc, c20);
    _mm256_store_ps(c + 2 * ldc + 8, c21);
    _mm256_store_ps(c + 3 * ldc, c30);
    _mm256_store_ps(c + 3 * ldc + 8, c31);
    _mm256_store_ps(c + 4 * ldc, c40);
    _mm256_store_ps(c + 4 * ldc + 8, c41);
    _mm256_store_ps(c + 5 * ldc, c50);
    _mm256_store_ps(c + 5 * ldc + 8, c51);
}

TD_TARGET static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

TD_TARGET static inline float hsum_ps(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* Query rows i0..i1-1 of one head. q: first query row of the head (row i at q + i * ldq);
 * kt: the keys in tp / 16 panels of (hd, 16), tp = t rounded up to 16; vs: the values in hdp / 16
 * panels of (t, 16), hdp = hd rounded up to 16, zero beyond hd (see td_attention); s (6, tp) and
 * ob (6, hdp) scratch; out row i at out + i * ldo. */
TD_TARGET static void td_attention_rows_avx2(const float *q, int64_t ldq, int64_t i0, int64_t i1, const float *kt,
                                             const float *vs, int64_t t, int64_t tp, int64_t hd, int64_t hdp,
                                             float scale, float *s, float *ob, float *out, int64_t ldo) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t ib = i0; ib < i1; ib += ATT_MR) {
        const int nr = (int)(i1 - ib < ATT_MR ? i1 - ib : ATT_MR);
        const float *qa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) qa[r] = q + (ib + (r < nr ? r : nr - 1)) * ldq;
        /* scores s[r][j] = q_r . k_j over all keys, 16 at a time */
        for (int64_t j0 = 0; j0 < tp; j0 += 16) att_tile(qa, 1, hd, kt + j0 * hd, 16, s + j0, tp);
        /* softmax numerators exp(scale s - max) in place; the 1 / sum is applied to the output */
        float inv[ATT_MR];
        for (int r = 0; r < nr; r++) {
            float *sr = s + r * tp;
            int64_t j = 0;
            __m256 mx = _mm256_set1_ps(-FLT_MAX);
            for (; j + 8 <= t; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(sr + j));
            float m = hmax_ps(mx);
            for (; j < t; j++) m = sr[j] > m ? sr[j] : m;
            const __m256 vm = _mm256_set1_ps(m * scale);
            __m256 sum = _mm256_setzero_ps();
            for (j = 0; j + 8 <= t; j += 8) {
                /* scale > 0, so max(scale s) = scale max(s) */
                const __m256 e = exp_avx2(_mm256_fmsub_ps(_mm256_load_ps(sr + j), vscale, vm));
                _mm256_store_ps(sr + j, e);
                sum = _mm256_add_ps(sum, e);
            }
            float tot = hsum_ps(sum);
            for (; j < t; j++) {
                sr[j] = td_expf_poly(fmaf(sr[j], scale, -(m * scale)));
                tot += sr[j];
            }
            inv[r] = 1.0f / tot;
        }
        /* rows past the real ones: keep them finite (they read row nr - 1's numerators) */
        const float *pa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) pa[r] = s + (r < nr ? r : nr - 1) * tp;
        for (int64_t c0 = 0; c0 < hdp; c0 += 16) att_tile(pa, 1, t, vs + c0 * t, 16, ob + c0, hdp);
        for (int r = 0; r < nr; r++) {
            float *o = out + (ib + r) * ldo;
            const float *src = ob + r * hdp;
            const __m256 vi = _mm256_set1_ps(inv[r]);
            int64_t c = 0;
            for (; c + 8 <= hd; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_load_ps(src + c), vi));
            for (; c < hd; c++) o[c] = src[c] * inv[r];
        }
    }
}

/* Key and value panels (td_att_pack_fn): keys in 8 x 8 blocks through registers (an 8 x 8
 * transpose of 24 shuffles instead of 64 scalar stores 64 bytes apart); the tails and the values
 * as on the portable path. */
TD_TARGET static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

TD_TARGET static void attention_pack_avx2(const float *k, const float *v, int64_t ld, int64_t t, int64_t hd, float *kt,
                                          float *vs) {
    const int64_t hd8 = hd / 8 * 8;
    for (int64_t j0 = 0; j0 < t; j0 += 16) {
        const float *kb = k + j0 * ld;
        float *kp = kt + j0 * hd;
        const int64_t nj = t - j0 < 16 ? t - j0 : 16;
        if (nj < 16) memset(kp, 0, sizeof(float) * (size_t)(16 * hd));
        for (int64_t jh = 0; jh + 8 <= nj; jh += 8) { /* 8 keys x 8 components at a time */
            for (int64_t d0 = 0; d0 < hd8; d0 += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(kb + (jh + i) * ld + d0);
                transpose8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(kp + (d0 + i) * 16 + jh, r[i]);
            }
            td_att_key_rows(kb, ld, hd, kp, jh, jh + 8, hd8);
        }
        td_att_key_rows(kb, ld, hd, kp, nj / 8 * 8, nj, 0);
    }
    td_att_pack_values(v, ld, t, hd, vs);
}

/* int8 attention rows (td_att8_rows_fn; arithmetic at td_att8_kv_t): scores over 3 query rows x 16
 * keys at a time, sum q k = maddubs(|q|, sign(k, q)) (pairs of <= 2 * 127 * 127, no saturation)
 * widened by madd(., 1); softmax numerators with exp_avx2 (td_expf_poly lane by lane) rounded to
 * integers; P V with madd_epi16 on int16 key pairs over 6 rows x 16 channels, int32 sums per block of
 * TD_ATT8_KBLK keys added to float sums in ob in block order. The portable reference's bits. */
#define ATT8_MAXG 64

TD_TARGET static inline void att8_scores3(const uint32_t *qa0, const uint32_t *qa1, const uint32_t *qa2,
                                          const uint32_t *qs0, const uint32_t *qs1, const uint32_t *qs2, int64_t ng,
                                          const int8_t *bp, const float *ks, float *c, int64_t ldc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    for (int64_t g = 0; g < ng; g++) {
        const __m256i b0 = _mm256_load_si256((const __m256i *)(bp + g * 64));
        const __m256i b1 = _mm256_load_si256((const __m256i *)(bp + g * 64 + 32));
        __m256i a = _mm256_set1_epi32((int)qa0[g]), sg = _mm256_set1_epi32((int)qs0[g]);
        c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(b0, sg)), ones));
        c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(b1, sg)), ones));
        a = _mm256_set1_epi32((int)qa1[g]);
        sg = _mm256_set1_epi32((int)qs1[g]);
        c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(b0, sg)), ones));
        c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(b1, sg)), ones));
        a = _mm256_set1_epi32((int)qa2[g]);
        sg = _mm256_set1_epi32((int)qs2[g]);
        c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(b0, sg)), ones));
        c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(b1, sg)), ones));
    }
    const __m256 k0 = _mm256_loadu_ps(ks), k1 = _mm256_loadu_ps(ks + 8);
    _mm256_store_ps(c, _mm256_mul_ps(_mm256_cvtepi32_ps(c00), k0));
    _mm256_store_ps(c + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(c01), k1));
    _mm256_store_ps(c + ldc, _mm256_mul_ps(_mm256_cvtepi32_ps(c10), k0));
    _mm256_store_ps(c + ldc + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(c11), k1));
    _mm256_store_ps(c + 2 * ldc, _mm256_mul_ps(_mm256_cvtepi32_ps(c20), k0));
    _mm256_store_ps(c + 2 * ldc + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(c21), k1));
}

/* ob rows 0..2 (16 channels from ob, stride ldo) += float(int32 sums of p v over keys j0..j1-1) */
TD_TARGET static inline void att8_pv3(const int16_t *p0, const int16_t *p1, const int16_t *p2, const int16_t *vp,
                                      int64_t j0, int64_t j1, float *ob, int64_t ldo) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    for (int64_t jp = j0 / 2; jp < j1 / 2; jp++) {
        const __m256i b0 = _mm256_load_si256((const __m256i *)(vp + jp * 32));
        const __m256i b1 = _mm256_load_si256((const __m256i *)(vp + jp * 32 + 16));
        int32_t w;
        memcpy(&w, p0 + 2 * jp, 4);
        __m256i a = _mm256_set1_epi32(w);
        c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(a, b0));
        c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(a, b1));
        memcpy(&w, p1 + 2 * jp, 4);
        a = _mm256_set1_epi32(w);
        c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(a, b0));
        c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(a, b1));
        memcpy(&w, p2 + 2 * jp, 4);
        a = _mm256_set1_epi32(w);
        c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(a, b0));
        c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(a, b1));
    }
    _mm256_store_ps(ob, _mm256_add_ps(_mm256_load_ps(ob), _mm256_cvtepi32_ps(c00)));
    _mm256_store_ps(ob + 8, _mm256_add_ps(_mm256_load_ps(ob + 8), _mm256_cvtepi32_ps(c01)));
    _mm256_store_ps(ob + ldo, _mm256_add_ps(_mm256_load_ps(ob + ldo), _mm256_cvtepi32_ps(c10)));
    _mm256_store_ps(ob + ldo + 8, _mm256_add_ps(_mm256_load_ps(ob + ldo + 8), _mm256_cvtepi32_ps(c11)));
    _mm256_store_ps(ob + 2 * ldo, _mm256_add_ps(_mm256_load_ps(ob + 2 * ldo), _mm256_cvtepi32_ps(c20)));
    _mm256_store_ps(ob + 2 * ldo + 8, _mm256_add_ps(_mm256_load_ps(ob + 2 * ldo + 8), _mm256_cvtepi32_ps(c21)));
}

TD_TARGET static void attention_rows_i8_avx2(const td_att8_kv_t *kv, const int8_t *qq, const float *qs, int64_t n,
                                             float *s, int16_t *pp, float *ob, float *out, int64_t ldo) {
    const int64_t t = kv->t, tp = kv->tp, hd4 = kv->hd4, ng = hd4 / 4, hdp = kv->hdp, hd = kv->hd;
    if (ng > ATT8_MAXG) {
        td_ops_for(TD_ISA_SCALAR)->attention_rows_i8(kv, qq, qs, n, s, pp, ob, out, ldo);
        return;
    }
    uint32_t qa[ATT_MR][ATT8_MAXG], qsg[ATT_MR][ATT8_MAXG];
    const __m256 pmax = _mm256_set1_ps((float)TD_ATT8_PMAX);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t ib = 0; ib < n; ib += ATT_MR) {
        const int nr = (int)(n - ib < ATT_MR ? n - ib : ATT_MR);
        for (int r = 0; r < ATT_MR; r++) { /* |q| and q per quad; missing rows repeat the last */
            const int8_t *qr = qq + (ib + (r < nr ? r : nr - 1)) * hd4;
            for (int64_t g = 0; g < ng; g++) {
                uint8_t ab[4];
                for (int dd = 0; dd < 4; dd++)
                    ab[dd] = (uint8_t)(qr[4 * g + dd] < 0 ? -qr[4 * g + dd] : qr[4 * g + dd]);
                memcpy(&qa[r][g], ab, 4);
                memcpy(&qsg[r][g], qr + 4 * g, 4);
            }
        }
        for (int64_t j0 = 0; j0 < tp; j0 += 16) {
            const int8_t *bp = kv->kq + j0 * hd4;
            att8_scores3(qa[0], qa[1], qa[2], qsg[0], qsg[1], qsg[2], ng, bp, kv->ks + j0, s + j0, tp);
            att8_scores3(qa[3], qa[4], qa[5], qsg[3], qsg[4], qsg[5], ng, bp, kv->ks + j0, s + 3 * tp + j0, tp);
        }
        float inv[ATT_MR];
        for (int r = 0; r < nr; r++) {
            const float *sr = s + r * tp;
            int16_t *pr = pp + r * tp;
            __m256 mx = _mm256_set1_ps(-FLT_MAX);
            int64_t j = 0;
            for (; j + 8 <= t; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(sr + j));
            float m = hmax_ps(mx);
            for (; j < t; j++) m = sr[j] > m ? sr[j] : m;
            const float c = qs[ib + r] * kv->scale;
            const __m256 vc = _mm256_set1_ps(c), vmc = _mm256_set1_ps(m * c);
            __m256i tot = _mm256_setzero_si256();
            for (j = 0; j < tp; j += 8) {
                const __m256 e = exp_avx2(_mm256_fmsub_ps(_mm256_load_ps(sr + j), vc, vmc));
                __m256i pi = _mm256_cvtps_epi32(_mm256_mul_ps(e, pmax)); /* round half to even */
                if (j + 8 > t) pi = _mm256_and_si256(pi, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(t - j)), lane));
                tot = _mm256_add_epi32(tot, pi);
                _mm_store_si128((__m128i *)(pr + j),
                                _mm_packs_epi32(_mm256_castsi256_si128(pi), _mm256_extracti128_si256(pi, 1)));
            }
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
            inv[r] = 1.0f / (float)_mm_cvtsi128_si32(t4);
        }
        const int16_t *pa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) pa[r] = pp + (r < nr ? r : nr - 1) * tp;
        for (int64_t c0 = 0; c0 < hdp; c0 += 16) {
            const int16_t *vp = kv->vq + c0 * tp;
            for (int r = 0; r < ATT_MR; r++) {
                _mm256_store_ps(ob + r * hdp + c0, _mm256_setzero_ps());
                _mm256_store_ps(ob + r * hdp + c0 + 8, _mm256_setzero_ps());
            }
            for (int64_t j0 = 0; j0 < tp; j0 += TD_ATT8_KBLK) {
                const int64_t j1 = j0 + TD_ATT8_KBLK < tp ? j0 + TD_ATT8_KBLK : tp;
                att8_pv3(pa[0], pa[1], pa[2], vp, j0, j1, ob + c0, hdp);
                att8_pv3(pa[3], pa[4], pa[5], vp, j0, j1, ob + 3 * hdp + c0, hdp);
            }
        }
        for (int r = 0; r < nr; r++) {
            float *o = out + (ib + r) * ldo;
            const float *src = ob + r * hdp;
            const __m256 vi = _mm256_set1_ps(inv[r]);
            int64_t c = 0;
            for (; c + 8 <= hd; c += 8)
                _mm256_storeu_ps(
                    o + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_load_ps(src + c), _mm256_load_ps(kv->vsc + c)), vi));
            for (; c < hd; c++) o[c] = (src[c] * kv->vsc[c]) * inv[r];
        }
    }
}

/* int8 dot-product peak: 12 chains of the scores' step (sign, maddubs, madd, add: 32 multiply-adds) */
TD_TARGET static double i8dot_peak_avx2(int64_t iters, float *sink) {
    __m256i a[12];
    const __m256i x = _mm256_set1_epi8(3), y = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_epi32(i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++)
            a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_sign_epi8(y, a[i])), ones));
    for (int i = 1; i < 12; i++) a[0] = _mm256_add_epi32(a[0], a[i]);
    *sink = (float)_mm256_extract_epi32(a[0], 0);
    return 12.0 * 64.0 * (double)iters;
}

/* FMA peak: 12 chains of 8-lane FMAs (latency 4-5 cycles x 2 pipes needs at least 10) */
TD_TARGET static double fma_peak_avx2(int64_t iters, float *sink) {
    __m256 a[12];
    const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(0.001f);
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], x, y);
    for (int i = 1; i < 12; i++) a[0] = _mm256_add_ps(a[0], a[i]);
    *sink = hsum_ps(a[0]);
    return 12.0 * 16.0 * (double)iters;
}

/* ------------------------------------------------------------------------------------------- */
const td_ops_t td_ops_avx2 = {
    .isa = TD_ISA_AVX2,
    .name = "avx2",
    .parent = TD_ISA_SCALAR,
    .rank = 10,
    .cpu_flags = TD_CPU_AVX2 | TD_CPU_FMA,
    .i8_lut_min_m = GEMV_MAX_M + 1,
    .i16_lut_min_m = GEMV_MAX_M + 1,
    .lut_f32 = lut_f32_avx2,
    .gemv_i8 = td_gemm_i8_avx2_gemv,
    .lut_i8 = lut_i8_avx2,
    .gemv_i16 = td_gemm_i16_avx2_gemv,
    .lut_i16 = lut_i16_avx2,
    .quantize_row_i8 = td_quantize_row_avx2,
    .quantize_row_i16 = td_quantize_row16_avx2,
    .swiglu = td_swiglu_avx2,
    .attention_rows = td_attention_rows_avx2,
    .attention_pack = attention_pack_avx2,
    .fma_peak = fma_peak_avx2,
    .attention_rows_i8 = attention_rows_i8_avx2,
    .i8dot_peak = i8dot_peak_avx2,
};

#endif /* TD_X86 */
