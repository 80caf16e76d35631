/* x86-64 AVX-512 kernels (F, BW, VL, DQ, VNNI). Compiled for the baseline ISA like ternary_avx2.c:
 * every function here carries a target attribute and is reached only through the AVX-512 table,
 * which td_set_isa / td_best_isa accept only when the CPU reports the features and the OS enables
 * the opmask and ZMM state (XCR0, see x86_avx512_flags in ternary_gemm.c). Entries not set here
 * (the one-token fp32 GEMV) come from the AVX2 table.
 *
 * int8 GEMM, many tokens (M >= 8): a dense integer GEMM on VNNI dot products instead of the AVX2
 * tables of partial sums. The four weights of one packed byte (k, k+32, k+64, k+96) form one 32-bit
 * "quad"; the activations of a block of 16 tokens are packed quad by quad into one 512-bit vector
 * (token t in lane t), so one `vpdpbusd` adds 4 weights x 16 tokens of products into int32 lanes
 * and one broadcast quad of weights serves 16 tokens. vpdpbusd multiplies unsigned by signed
 * bytes: the activations are stored as x + 128 (the byte x ^ 0x80, in 1..255) and the weights as
 * signed -1/0/+1 bytes, so each lane adds sum w (x + 128) = sum w x + 128 sum w, and 128 sum w of
 * each weight row is subtracted at the end. Micro-tile: 12 rows x 32 tokens, 24 accumulators.
 * int10 (int16 activations), M >= 17: the AVX2 int16 tables widened to 32 tokens per 64-byte entry
 * (below); vpdpwssd, which adds only 2 int16 products per lane, measured 0.86x the AVX2 tables.
 * fp32, M >= 16: the AVX2 float tables with 16 tokens per entry and the AVX2 arithmetic per lane
 * (the same bits). M = 8..16 int10 and fp32 below 16 tokens call the AVX2 kernels.
 * Every sum is an exact int32 (|sum| <= 255 K for int8, <= 511 K for int10), and outputs get the
 * two roundings of td_store: results are bit-identical to the scalar path, for any M, token
 * position and thread split.
 * Here weights do get multiplied, by -1, 0 or +1 (the only way VNNI adds bytes four at a time); the
 * AVX2 and portable kernels keep select-and-add. Design notes and measurements: docs/kernels.md. */
#include "ternary_internal.h"

#if TD_X86
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TD512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))

#define NR 12 /* weight rows per micro-tile (MK_ALL lists them) */
#define TOK 32 /* tokens per block: two 16-lane vectors */
#define ROW_CHUNK 120 /* rows per work item (a multiple of NR) */
#define GEMV_MAX_M 7 /* up to this many tokens stream the weights */
#define PARALLEL_MIN (td_force_parallel ? 0 : (1 << 20)) /* as the AVX2 kernels: below, one thread */

/* ------------------------------------------------------------------------------------------- */
/* Packing. Weights: row r's quads in p order at wd[r * kb + p], each the four weights of packed
 * byte p as signed bytes (code 3, invalid, reads as 0), and corr[r] = 128 * (sum of the row's
 * weights). Activations of a 32-token block: xp[p * 32 + t] = quad p of token t, as x + 128. */

/* Rows r0..r1-1 (rows past n: zero weights). 16 packed bytes at a time: each byte zero-extended to
 * a dword, its 2-bit codes moved to bits 0, 8, 16, 24, and mapped by vpshufb to -1, 0, +1, 0. */
TD512 static void decode_rows(const uint8_t *packed, int64_t n, int64_t kb, int64_t r0, int64_t r1, uint32_t *wd,
                              int32_t *corr) {
    const __m512i m2 = _mm512_set1_epi32(3),
                  map = _mm512_broadcast_i32x4(_mm_setr_epi8(-1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t row = r0; row < r1; row++) {
        uint32_t *o = wd + row * kb;
        if (row >= n) {
            memset(o, 0, (size_t)kb * 4);
            corr[row] = 0;
            continue;
        }
        const uint8_t *w = packed + row * kb;
        __m512i sum = _mm512_setzero_si512();
        for (int64_t p = 0; p < kb; p += 16) { /* kb is a multiple of 32 */
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + p)));
            const __m512i c = _mm512_or_si512(
                _mm512_or_si512(_mm512_and_si512(v, m2),
                                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 2), m2), 8)),
                _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 4), m2), 16),
                                _mm512_slli_epi32(_mm512_srli_epi32(v, 6), 24)));
            const __m512i q = _mm512_shuffle_epi8(map, c);
            _mm512_storeu_si512((void *)(o + p), q);
            sum = _mm512_dpbusd_epi32(sum, ones, q); /* 1 x w, four at a time: the row's sum */
        }
        corr[row] = 128 * _mm512_reduce_add_epi32(sum);
    }
}

/* Row t of int8 activations -> its quads in p order, as x ^ 0x80 (= x + 128 unsigned): for each
 * 128-weight block the four 32-byte quarters are interleaved byte by byte. */
TD512 static void quads_i8(const int8_t *x, int64_t kp, uint32_t *out) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int64_t b = 0; b < kp / TD_BLOCK_K; b++) {
        const int8_t *xb = x + b * TD_BLOCK_K;
        const __m256i a = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xb), flip);
        const __m256i c1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xb + 32)), flip);
        const __m256i c2 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xb + 64)), flip);
        const __m256i c3 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xb + 96)), flip);
        const __m256i ab_lo = _mm256_unpacklo_epi8(a, c1), ab_hi = _mm256_unpackhi_epi8(a, c1);
        const __m256i cd_lo = _mm256_unpacklo_epi8(c2, c3), cd_hi = _mm256_unpackhi_epi8(c2, c3);
        /* lane 0 of w0..w3: j 0-3, 4-7, 8-11, 12-15; lane 1: j 16-19, ..., 28-31 */
        const __m256i w0 = _mm256_unpacklo_epi16(ab_lo, cd_lo), w1 = _mm256_unpackhi_epi16(ab_lo, cd_lo);
        const __m256i w2 = _mm256_unpacklo_epi16(ab_hi, cd_hi), w3 = _mm256_unpackhi_epi16(ab_hi, cd_hi);
        uint32_t *o = out + b * TD_BLOCK_BYTES;
        _mm256_storeu_si256((__m256i *)o, _mm256_permute2x128_si256(w0, w1, 0x20));
        _mm256_storeu_si256((__m256i *)(o + 8), _mm256_permute2x128_si256(w2, w3, 0x20));
        _mm256_storeu_si256((__m256i *)(o + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
        _mm256_storeu_si256((__m256i *)(o + 24), _mm256_permute2x128_si256(w2, w3, 0x31));
    }
}

/* Tokens m0..m0+mt-1 (mt <= 32) into xp (kb x 32 dwords): each token's quads in p order (tmp,
 * row-major), then 16 tokens at a time gathered per quad. Tokens mt..31 read as x = 0. */
TD512 static void pack_tokens(const int8_t *xq, int64_t ldq, int64_t m0, int mt, int64_t kp, uint32_t *tmp,
                              uint32_t *xp) {
    const int64_t kb = kp / 4;
    const int hv = (mt + 15) / 16; /* vectors holding real tokens; the micro-kernel reads only these */
    for (int t = 0; t < 16 * hv; t++) {
        if (t < mt) quads_i8(xq + (m0 + t) * ldq, kp, tmp + t * kb);
        else memset(tmp + t * kb, 0x80, (size_t)kb * 4);
    }
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)kb));
    for (int h = 0; h < hv; h++) {
        const uint32_t *base = tmp + h * 16 * kb;
        for (int64_t p = 0; p < kb; p++)
            _mm512_store_si512((void *)(xp + p * TOK + 16 * h),
                               _mm512_i32gather_epi32(idx, (const void *)(base + p), 4));
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Micro-kernel: NR rows x 32 tokens (HV = 2 vectors) or 16 (HV = 1), int32 sums into
 * out[(2 r + h) * 16 + lane]. Accumulators are named variables, not an array: GCC keeps an array
 * of vectors in registers but copied every one of them each iteration (measured 2x slower). */
#define MK_DECL(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = _mm512_setzero_si512();
#define MK_OUT(r)                                                                                                      \
    _mm512_store_si512((void *)(out + (2 * (r)) * 16), c##r##0);                                                       \
    if (HV > 1) _mm512_store_si512((void *)(out + (2 * (r) + 1) * 16), c##r##1);
#define MK_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define MK_ROW(r)                                                                                                      \
    {                                                                                                                  \
        const __m512i b = _mm512_set1_epi32((int)w[(r)*kb + p]);                                                       \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, a0, b);                                                                 \
        if (HV > 1) c##r##1 = _mm512_dpbusd_epi32(c##r##1, a1, b);                                                     \
    }

TD512 static inline __attribute__((always_inline)) void mk_i8(const uint32_t *xp, const uint32_t *w, int64_t kb,
                                                              int32_t *out, const int HV) {
    MK_ALL(MK_DECL)
    for (int64_t p = 0; p < kb; p++) {
        const __m512i a0 = _mm512_load_si512((const void *)(xp + p * TOK));
        const __m512i a1 = HV > 1 ? _mm512_load_si512((const void *)(xp + p * TOK + 16)) : a0;
        MK_ALL(MK_ROW)
    }
    MK_ALL(MK_OUT)
}

TD512 static void mk_i8_32(const uint32_t *xp, const uint32_t *w, int64_t kb, int32_t *out) {
    mk_i8(xp, w, kb, out, 2);
}
TD512 static void mk_i8_16(const uint32_t *xp, const uint32_t *w, int64_t kb, int32_t *out) {
    mk_i8(xp, w, kb, out, 1);
}

/* Outputs of one micro-tile: res[(2 r + t / 16) * 16 + t % 16] - corr[r] is the sum of row rp + r
 * and token m0 + t; per token, the nr <= NR rows are gathered into one vector and stored with the
 * two roundings of td_store, float(acc) * (scale * alpha), then + bias (no FMA). */
TD512 static void store_tile(const td_out_t *o, int64_t m0, int mt, int64_t rp, int nr, const int32_t *res,
                             const int32_t *corr) {
    const __mmask16 mk = (__mmask16)((1u << nr) - 1);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(32));
    const __m512i cv = _mm512_maskz_loadu_epi32(mk, corr);
    const __m512 bv = o->bias ? _mm512_maskz_loadu_ps(mk, o->bias + rp) : _mm512_setzero_ps();
    for (int t = 0; t < mt; t++) {
        const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, idx,
                                                      (const void *)(res + (t / 16) * 16 + t % 16), 4);
        const __m512i v = _mm512_sub_epi32(g, cv);
        if (o->acc) {
            _mm512_mask_storeu_epi32(o->acc + (m0 + t) * o->ldy + rp, mk, v);
            continue;
        }
        __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(o->scale[m0 + t] * o->alpha));
        if (o->bias) r = _mm512_add_ps(r, bv);
        _mm512_mask_storeu_ps(o->y + (m0 + t) * o->ldy + rp, mk, r);
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Driver of the int8 VNNI GEMM: decode the weights (all rows) and pack the tokens (all blocks) in
 * parallel, then work items of (row chunk, token block). */
static int vnni_gemm_i8(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                        const td_out_t *o, int threads) {
    const int64_t kb = kp / 4, npad = (n + NR - 1) / NR * NR, ntb = (m + TOK - 1) / TOK;
    const int64_t nchunk = (n + ROW_CHUNK - 1) / ROW_CHUNK, items = nchunk * ntb;
    if (ntb * n * kb < PARALLEL_MIN) threads = 1;
    uint32_t *wd = td_alloc((size_t)npad * (size_t)kb * 4);
    int32_t *corr = td_alloc((size_t)npad * 4);
    uint32_t *xp = td_alloc((size_t)ntb * (size_t)kb * TOK * 4);
    if (!wd || !xp || !corr) {
        td_free(wd);
        td_free(corr);
        td_free(xp);
        return TD_ENOMEM;
    }
    int err = 0;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
        uint32_t *tmp = td_alloc((size_t)TOK * (size_t)kb * 4);
        int32_t *res = td_alloc((size_t)NR * TOK * 4);
        const int ok = tmp && res;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1) nowait
#endif
        for (int64_t pn = 0; pn < npad / NR; pn++) decode_rows(packed, n, kb, pn * NR, pn * NR + NR, wd, corr);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t tb = 0; tb < ntb; tb++) {
            if (!ok) continue;
            const int mt = (int)(m - tb * TOK < TOK ? m - tb * TOK : TOK);
            pack_tokens(xq, ldq, tb * TOK, mt, kp, tmp, xp + tb * kb * TOK);
        }
        /* the closing barrier of the loop above: every row and block is packed */
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t it = 0; it < items; it++) {
            if (!ok) {
                err = 1;
                continue;
            }
            const int64_t ch = it / ntb, tb = it % ntb;
            const int64_t m0 = tb * TOK, r0 = ch * ROW_CHUNK, r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;
            const int mt = (int)(m - m0 < TOK ? m - m0 : TOK);
            const uint32_t *xb = xp + tb * kb * TOK;
            for (int64_t rp = r0; rp < r1; rp += NR) {
                if (mt > 16) mk_i8_32(xb, wd + rp * kb, kb, res);
                else mk_i8_16(xb, wd + rp * kb, kb, res);
                store_tile(o, m0, mt, rp, (int)(n - rp < NR ? n - rp : NR), res, corr + rp);
            }
        }
        td_free(tmp);
        td_free(res);
    }
    td_free(wd);
    td_free(corr);
    td_free(xp);
    return err ? TD_ENOMEM : TD_OK;
}

static int lut_i8_avx512(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                         const td_out_t *o, int threads) {
    return vnni_gemm_i8(xq, m, kp, ldq, packed, n, o, threads);
}

/* ------------------------------------------------------------------------------------------- */
/* int10 GEMM, many tokens (M >= 8): the AVX2 scheme of int16 tables of partial sums (ternary_avx2.c,
 * docs/kernels.md) with 32 tokens per 64-byte entry, so one vpaddw adds 4 weights x 32 tokens.
 * Tokens are first interleaved in pairs, P[j][k] = (x[2j][k], x[2j+1][k]) as one dword, so that the
 * 32 tokens of column k are one 16-dword gather. Table sets of TG byte positions
 * (TG x 81 x 64 B = 41.5 KB); entry sums |.| <= 4 lim, so `super` sets of TG look-ups stay inside
 * int16 before widening to int32 (as i16_super in ternary_avx2.c). */

#ifndef TG
#define TG 8
#endif
#define TENT_BYTES 64
#define TGROUP_BYTES (81 * TENT_BYTES)
#define T_MAX_ROWS 4096

/* Row stride of P in dwords: kp plus one cache line, so that the 16 lines a gather touches never
 * sit a multiple of 4 KB apart (with K = 4096 they did: one L1 set, more lines than ways). */
static inline int64_t p_stride(int64_t kp) { return kp + 16; }

/* P (16, p_stride(kp)) dwords for tokens m0..m0+mt-1 (mt <= 32; missing tokens are 0) */
TD512 static void pair_tokens(const int16_t *x16, int64_t ldq, int64_t m0, int mt, int64_t kp, uint32_t *P) {
    const __m512i i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int j = 0; j < 16; j++) {
        const int t0 = 2 * j, t1 = 2 * j + 1;
        uint32_t *o = P + j * p_stride(kp);
        if (t0 >= mt) {
            memset(o, 0, (size_t)kp * 4);
            continue;
        }
        for (int64_t k = 0; k < kp; k += 32) {
            const __m512i a = _mm512_loadu_si512((const void *)(x16 + (m0 + t0) * ldq + k));
            const __m512i b = t1 < mt ? _mm512_loadu_si512((const void *)(x16 + (m0 + t1) * ldq + k))
                                      : _mm512_setzero_si512();
            /* per 128-bit lane l: lo = columns 8l..8l+3, hi = 8l+4..8l+7 */
            const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
            _mm512_storeu_si512((void *)(o + k), _mm512_permutex2var_epi64(lo, i0, hi));
            _mm512_storeu_si512((void *)(o + k + 16), _mm512_permutex2var_epi64(lo, i1, hi));
        }
    }
}

TD512 static inline void pair_sums16(__m512i x0, __m512i x1, __m512i s[9]) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i n0 = _mm512_sub_epi16(zero, x0);
    s[0] = _mm512_sub_epi16(n0, x1);
    s[1] = _mm512_sub_epi16(zero, x1);
    s[2] = _mm512_sub_epi16(x0, x1);
    s[3] = n0;
    s[4] = zero;
    s[5] = x0;
    s[6] = _mm512_add_epi16(n0, x1);
    s[7] = x1;
    s[8] = _mm512_add_epi16(x0, x1);
}

/* Tables of the TG byte positions from kbase: entry c0 + 3 c1 + 9 c2 + 27 c3 = lo[c0 + 3 c1] + hi[c2 + 3 c3] */
TD512 static void build_tables16(const uint32_t *P, __m512i gidx, int64_t kbase, int16_t *T) {
    for (int g = 0; g < TG; g++) {
        const uint32_t *pk = P + kbase + g;
        __m512i lo[9], hi[9];
        pair_sums16(_mm512_i32gather_epi32(gidx, (const void *)pk, 4),
                    _mm512_i32gather_epi32(gidx, (const void *)(pk + 32), 4), lo);
        pair_sums16(_mm512_i32gather_epi32(gidx, (const void *)(pk + 64), 4),
                    _mm512_i32gather_epi32(gidx, (const void *)(pk + 96), 4), hi);
        int16_t *e = T + g * 81 * 32;
        for (int j = 0; j < 9; j++)
            for (int i = 0; i < 9; i++)
                _mm512_store_si512((void *)(e + 32 * (9 * j + i)), _mm512_add_epi16(lo[i], hi[j]));
    }
}

/* offs[(kt * n + row) * TG + g] = byte offset of the entry of packed byte kt * TG + g of the row
 * inside its group's table (code 3 reads as 1, a zero weight). Orphaned `omp for`: called by every
 * thread of the GEMM's region; its closing barrier completes the panel before any use. */
TD512 static void fill_offsets(const uint8_t *packed, int64_t n, int64_t kb, uint16_t *offs) {
    int8_t lo_t[16], hi_t[16];
    for (int v = 0; v < 16; v++) {
        const int a = (v & 3) == 3 ? 1 : (v & 3), b = (v >> 2) == 3 ? 1 : (v >> 2);
        lo_t[v] = (int8_t)(a + 3 * b);
        hi_t[v] = (int8_t)(9 * (a + 3 * b));
    }
    const __m512i lo_v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)lo_t));
    const __m512i hi_v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)hi_t));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 64)
#endif
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *w = packed + row * kb;
        for (int64_t p = 0; p < kb; p += 32) { /* kb is a multiple of 32: 4 table sets */
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + p)));
            const __m512i idx = _mm512_add_epi16(
                _mm512_shuffle_epi8(lo_v, _mm512_and_si512(v, low4)),
                _mm512_shuffle_epi8(hi_v, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4)));
            /* shuffle_epi8 on words: the high byte of each word indexes with 0 -> lo_t[0] = 0 or
             * hi_t[0] = 0, so each word holds its index; times 64 bytes per entry */
            const __m512i off = _mm512_slli_epi16(idx, 6);
            uint16_t tmp[32];
            _mm512_storeu_si512((void *)tmp, off);
            for (int s = 0; s < 32 / TG; s++)
                memcpy(offs + ((p / TG + s) * n + row) * TG, tmp + s * TG, TG * sizeof(uint16_t));
        }
    }
}

/* Outputs of rows r0..r1-1, tokens m0..m0+mt-1 from res32[(row - r0) * 32 + t]: per token, 16 rows
 * gathered, then the two roundings of td_store. */
TD512 static void store_rows32(const td_out_t *o, int64_t m0, int mt, int64_t r0, int64_t r1, const int32_t *res32) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(32));
    for (int64_t s0 = r0; s0 < r1; s0 += 16) {
        const int nr = (int)(r1 - s0 < 16 ? r1 - s0 : 16);
        const __mmask16 mk = (__mmask16)((1u << nr) - 1);
        const __m512 bv = o->bias ? _mm512_maskz_loadu_ps(mk, o->bias + s0) : _mm512_setzero_ps();
        for (int t = 0; t < mt; t++) {
            const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, idx,
                                                          (const void *)(res32 + (s0 - r0) * 32 + t), 4);
            if (o->acc) {
                _mm512_mask_storeu_epi32(o->acc + (m0 + t) * o->ldy + s0, mk, v);
                continue;
            }
            __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(o->scale[m0 + t] * o->alpha));
            if (o->bias) r = _mm512_add_ps(r, bv);
            _mm512_mask_storeu_ps(o->y + (m0 + t) * o->ldy + s0, mk, r);
        }
    }
}

TD512 static void lut16_block(const uint32_t *P, int64_t kb, int super, int64_t r0, int64_t r1, int64_t n,
                              const uint16_t *offs, int16_t *T, int16_t *res16, int32_t *res32) {
    const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)p_stride(kb * 4)));
    const int64_t ntile = kb / TG;
    if (ntile == 0) memset(res32, 0, (size_t)(r1 - r0) * 32 * sizeof(int32_t)); /* K = 0 */
    for (int64_t kt = 0; kt < ntile; kt++) {
        build_tables16(P, gidx, (kt / (TD_BLOCK_BYTES / TG)) * TD_BLOCK_K + (kt % (TD_BLOCK_BYTES / TG)) * TG, T);
        const uint16_t *op = offs + kt * n * TG;
        const int first = kt % super == 0;
        const int last = kt % super == super - 1 || kt == ntile - 1;
        const int widen_add = kt >= super;
        for (int64_t row = r0; row < r1; row++) {
            uint64_t wv[TG / 4]; /* four offsets per 64-bit word */
            memcpy(wv, op + row * TG, sizeof wv);
            __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int g = 0; g < TG; g += 2) {
                const uint64_t w = wv[g >> 2];
                const int sh = 16 * (g & 3);
                a = _mm512_add_epi16(
                    a, _mm512_load_si512((const void *)((const char *)T + g * TGROUP_BYTES + ((w >> sh) & 0xffff))));
                b = _mm512_add_epi16(b, _mm512_load_si512((const void *)((const char *)T + (g + 1) * TGROUP_BYTES +
                                                                         ((w >> (sh + 16)) & 0xffff))));
            }
            a = _mm512_add_epi16(a, b);
            int16_t *rp = res16 + (row - r0) * 32;
            if (!first) a = _mm512_add_epi16(_mm512_load_si512((const void *)rp), a);
            if (last) {
                int32_t *qp = res32 + (row - r0) * 32;
                __m512i lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a));
                __m512i hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a, 1));
                if (widen_add) {
                    lo = _mm512_add_epi32(lo, _mm512_load_si512((const void *)qp));
                    hi = _mm512_add_epi32(hi, _mm512_load_si512((const void *)(qp + 16)));
                }
                _mm512_store_si512((void *)qp, lo);
                _mm512_store_si512((void *)(qp + 16), hi);
            } else {
                _mm512_store_si512((void *)rp, a);
            }
        }
    }
}

static int lut16_driver(const int16_t *x16, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                        const td_out_t *o, int threads, int lim) {
    const int64_t kb = kp / 4;
    int super = 32767 / (4 * lim * TG);
    if (super < 1) super = 1;
    int64_t ntb, nsplit, rows_per;
    if (((m + 31) / 32) * n * kb < PARALLEL_MIN) threads = 1;
    td_lut_split(m, 32, n, threads, T_MAX_ROWS, &ntb, &nsplit, &rows_per);
    uint16_t *offs = td_alloc((size_t)n * (size_t)kb * sizeof(uint16_t));
    if (!offs) return TD_ENOMEM;
    int err = 0;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
        uint32_t *P = td_alloc((size_t)16 * (size_t)p_stride(kp) * 4);
        int16_t *T = td_alloc((size_t)TG * TGROUP_BYTES);
        int16_t *res16 = td_alloc((size_t)rows_per * 32 * sizeof(int16_t));
        int32_t *res32 = td_alloc((size_t)rows_per * 32 * sizeof(int32_t));
        const int ok = P && T && res16 && res32;
        fill_offsets(packed, n, kb, offs);
        int64_t have = -1; /* token block whose pairs are in P */
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
            const int mt = (int)(m - tb * 32 < 32 ? m - tb * 32 : 32);
            if (r0 >= r1) continue;
            if (have != tb) {
                pair_tokens(x16, ldq, tb * 32, mt, kp, P);
                have = tb;
            }
            lut16_block(P, kb, super, r0, r1, n, offs, T, res16, res32);
            store_rows32(o, tb * 32, mt, r0, r1, res32);
        }
        td_free(P);
        td_free(T);
        td_free(res16);
        td_free(res32);
    }
    td_free(offs);
    return err ? TD_ENOMEM : TD_OK;
}

/* Up to 16 tokens the AVX2 tables (16 tokens per entry, no offset panel) are faster: 0.23 ms
 * against 0.68 ms for 8 x 1536 x 1536 here; from 32 tokens these win. Integer sums are exact, so
 * the switch changes no result. */
#define LUT16_MIN_M 17

static int lut_i16_avx512(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                          const td_out_t *o, int threads, int lim) {
    if (m < LUT16_MIN_M) return td_ops_for(TD_ISA_AVX2)->lut_i16(xq, m, kp, ldq, packed, n, o, threads, lim);
    return lut16_driver(xq, m, kp, ldq, packed, n, o, threads, lim);
}


/* ------------------------------------------------------------------------------------------- */
/* fp32, M >= F32_MIN_M: the AVX2 float tables (ternary_avx2.c) with 16 tokens per 64-byte entry and
 * the same arithmetic in every lane: the same pair sums, entry = lo + hi, per table set two chains
 * from +0 over the even and the odd positions, their sum, then running sum + set sum. Each output
 * is therefore the AVX2 kernel's bits (tests compare them), which keeps fp32 results independent of
 * the ISA between AVX2 and AVX-512 machines, and batch-invariant like the AVX2 tables. The 16
 * tokens of column k are one masked gather from a padded copy of the block's rows (zero past K and
 * for missing tokens). */

#define F32_MIN_M 16

TD512 static void build_tables_f32x16(const float *x, __m512i gidx, __mmask16 tm, int64_t k, int64_t kbase, float *T) {
    const __m512 zero = _mm512_setzero_ps();
    for (int g = 0; g < TG; g++) {
        __m512 v[4];
        for (int q = 0; q < 4; q++) {
            const int64_t kk = kbase + g + 32 * q;
            v[q] = kk < k ? _mm512_mask_i32gather_ps(zero, tm, gidx, x + kk, 4) : zero;
        }
        __m512 lo[9], hi[9];
        for (int h = 0; h < 2; h++) {
            const __m512 x0 = v[2 * h], x1 = v[2 * h + 1];
            __m512 *sp = h ? hi : lo;
            const __m512 n0 = _mm512_sub_ps(zero, x0);
            sp[0] = _mm512_sub_ps(n0, x1);
            sp[1] = _mm512_sub_ps(zero, x1);
            sp[2] = _mm512_sub_ps(x0, x1);
            sp[3] = n0;
            sp[4] = zero;
            sp[5] = x0;
            sp[6] = _mm512_add_ps(n0, x1);
            sp[7] = x1;
            sp[8] = _mm512_add_ps(x0, x1);
        }
        float *e = T + g * 81 * 16;
        for (int j = 0; j < 9; j++)
            for (int i = 0; i < 9; i++) _mm512_store_ps(e + 16 * (9 * j + i), _mm512_add_ps(lo[i], hi[j]));
    }
}

/* Tokens m0..m0+mt-1 (mt <= 16) x rows r0..r1-1, then their outputs (td_store_f32's roundings). */
TD512 static void lut_f32x16_block(const float *x, int64_t ldx, int64_t m0, int mt, int64_t k, int64_t kb, int64_t r0,
                                   int64_t r1, int64_t n, const uint16_t *offs, float *T, float *res, float *xs,
                                   const td_out_t *o) {
    /* the block's rows copied at a stride of k + 16 floats: gathers from rows a multiple of 4 KB
     * apart (K = 1024, 4096, ...) would all fall in one L1 set */
    const int64_t lds = k + 16;
    for (int t = 0; t < mt; t++) memcpy(xs + t * lds, x + (m0 + t) * ldx, (size_t)k * sizeof(float));
    const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)lds));
    const __mmask16 tm = (__mmask16)((1u << mt) - 1);
    const float *xb = xs;
    const int64_t ntile = kb / TG;
    if (ntile == 0) memset(res, 0, (size_t)(r1 - r0) * 16 * sizeof(float)); /* K = 0 */
    for (int64_t kt = 0; kt < ntile; kt++) {
        build_tables_f32x16(xb, gidx, tm, k,
                            (kt / (TD_BLOCK_BYTES / TG)) * TD_BLOCK_K + (kt % (TD_BLOCK_BYTES / TG)) * TG, T);
        const uint16_t *op = offs + kt * n * TG;
        for (int64_t row = r0; row < r1; row++) {
            uint64_t wv[TG / 4];
            memcpy(wv, op + row * TG, sizeof wv);
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
#pragma GCC unroll 8
            for (int g = 0; g < TG; g += 2) {
                const uint64_t w = wv[g >> 2];
                const int sh = 16 * (g & 3);
                a = _mm512_add_ps(
                    a, _mm512_load_ps((const float *)((const char *)T + g * TGROUP_BYTES + ((w >> sh) & 0xffff))));
                b = _mm512_add_ps(b, _mm512_load_ps((const float *)((const char *)T + (g + 1) * TGROUP_BYTES +
                                                                    ((w >> (sh + 16)) & 0xffff))));
            }
            a = _mm512_add_ps(a, b);
            float *rp = res + (row - r0) * 16;
            if (kt) a = _mm512_add_ps(_mm512_load_ps(rp), a);
            _mm512_store_ps(rp, a);
        }
    }
    const __m512i ridx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
    for (int64_t s0 = r0; s0 < r1; s0 += 16) {
        const int nr = (int)(r1 - s0 < 16 ? r1 - s0 : 16);
        const __mmask16 mk = (__mmask16)((1u << nr) - 1);
        const __m512 bv = o->bias ? _mm512_maskz_loadu_ps(mk, o->bias + s0) : _mm512_setzero_ps();
        for (int t = 0; t < mt; t++) {
            const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, ridx, res + (s0 - r0) * 16 + t, 4);
            const float sc = o->scale ? o->scale[m0 + t] * o->alpha : o->alpha;
            __m512 r = _mm512_mul_ps(v, _mm512_set1_ps(sc));
            if (o->bias) r = _mm512_add_ps(r, bv);
            _mm512_mask_storeu_ps(o->y + (m0 + t) * o->ldy + s0, mk, r);
        }
    }
}

static int lut_f32_avx512(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                          const td_out_t *o, int threads) {
    /* below 16 tokens (and for row strides a 32-bit gather index cannot hold) the AVX2 tables,
     * which give the same bits */
    if (m < F32_MIN_M || k + 16 > INT32_MAX / 16)
        return td_ops_for(TD_ISA_AVX2)->lut_f32(x, m, k, ldx, packed, n, o, threads);
    const int64_t kb = td_padded_k(k) / 4;
    int64_t ntb, nsplit, rows_per;
    if (((m + 15) / 16) * n * kb < PARALLEL_MIN) threads = 1;
    td_lut_split(m, 16, n, threads, T_MAX_ROWS, &ntb, &nsplit, &rows_per);
    uint16_t *offs = td_alloc((size_t)n * (size_t)kb * sizeof(uint16_t));
    if (!offs) return TD_ENOMEM;
    int err = 0;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
        float *T = td_alloc((size_t)TG * TGROUP_BYTES);
        float *res = td_alloc((size_t)rows_per * 16 * sizeof(float));
        float *xs = td_alloc((size_t)16 * (size_t)(k + 16) * sizeof(float));
        const int ok = T && res && xs;
        fill_offsets(packed, n, kb, offs);
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
            if (r0 < r1) lut_f32x16_block(x, ldx, tb * 16, mt, k, kb, r0, r1, n, offs, T, res, xs, o);
        }
        td_free(T);
        td_free(res);
        td_free(xs);
    }
    td_free(offs);
    return err ? TD_ENOMEM : TD_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* Few tokens: stream the weights. A 32-byte block is broadcast to both halves of a vector and
 * shifted by 0 / 2 (codes of k..k+31, k+32..k+63) and 4 / 6 (k+64.., k+96..), masked to 2 bits
 * and mapped by vpshufb to unsigned w + 1 in {0, 1, 2} (code 3 -> 1, a zero weight): the vector is
 * then in the activations' own order, and vpdpbusd (unsigned codes x signed int8) adds
 * sum (w + 1) x, from which the token's sum of x is subtracted. int10: the codes minus 1 are
 * widened to int16 and vpdpwssd adds 32 products of int16 at a time. */

TD512 static inline void decode_codes(const uint8_t *wb, __m512i *c01, __m512i *c23) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)wb));
    const __m512i s01 = _mm512_setr_epi64(0, 0, 0, 0, 0x0002000200020002ll, 0x0002000200020002ll, 0x0002000200020002ll,
                                          0x0002000200020002ll);
    const __m512i s23 = _mm512_add_epi16(s01, _mm512_set1_epi16(4));
    const __m512i three = _mm512_set1_epi8(3);
    const __m512i fix = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
    *c01 = _mm512_shuffle_epi8(fix, _mm512_and_si512(_mm512_srlv_epi16(v, s01), three));
    *c23 = _mm512_shuffle_epi8(fix, _mm512_and_si512(_mm512_srlv_epi16(v, s23), three));
}

TD512 static inline __attribute__((always_inline)) void gemv8_rows(const int8_t *xq, int64_t ldq, int64_t m0,
                                                                   const int MT, int64_t kb, const uint8_t *packed,
                                                                   int64_t r0, int64_t r1, const int32_t *sx,
                                                                   const td_out_t *o) {
    const int64_t nblk = kb / TD_BLOCK_BYTES;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w = packed + row * kb;
        __m512i acc[8];
        for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_si512();
        for (int64_t b = 0; b < nblk; b++) {
            __m512i c01, c23;
            decode_codes(w + b * TD_BLOCK_BYTES, &c01, &c23);
            for (int t = 0; t < MT; t++) {
                const int8_t *xp = xq + (m0 + t) * ldq + b * TD_BLOCK_K;
                acc[t] = _mm512_dpbusd_epi32(acc[t], c01, _mm512_loadu_si512((const void *)xp));
                acc[t] = _mm512_dpbusd_epi32(acc[t], c23, _mm512_loadu_si512((const void *)(xp + 64)));
            }
        }
        for (int t = 0; t < MT; t++) td_store(o, m0 + t, row, _mm512_reduce_add_epi32(acc[t]) - sx[t]);
    }
}

TD512 static inline __attribute__((always_inline)) void gemv16_rows(const int16_t *xq, int64_t ldq, int64_t m0,
                                                                    const int MT, int64_t kb, const uint8_t *packed,
                                                                    int64_t r0, int64_t r1, const td_out_t *o) {
    const int64_t nblk = kb / TD_BLOCK_BYTES;
    const __m512i one = _mm512_set1_epi8(1);
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w = packed + row * kb;
        __m512i acc[4];
        for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_si512();
        for (int64_t b = 0; b < nblk; b++) {
            __m512i c01, c23;
            decode_codes(w + b * TD_BLOCK_BYTES, &c01, &c23);
            c01 = _mm512_sub_epi8(c01, one);
            c23 = _mm512_sub_epi8(c23, one);
            const __m512i w0 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(c01));
            const __m512i w1 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(c01, 1));
            const __m512i w2 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(c23));
            const __m512i w3 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(c23, 1));
            for (int t = 0; t < MT; t++) {
                const int16_t *xp = xq + (m0 + t) * ldq + b * TD_BLOCK_K;
                acc[t] = _mm512_dpwssd_epi32(acc[t], w0, _mm512_loadu_si512((const void *)xp));
                acc[t] = _mm512_dpwssd_epi32(acc[t], w1, _mm512_loadu_si512((const void *)(xp + 32)));
                acc[t] = _mm512_dpwssd_epi32(acc[t], w2, _mm512_loadu_si512((const void *)(xp + 64)));
                acc[t] = _mm512_dpwssd_epi32(acc[t], w3, _mm512_loadu_si512((const void *)(xp + 96)));
            }
        }
        for (int t = 0; t < MT; t++) td_store(o, m0 + t, row, _mm512_reduce_add_epi32(acc[t]));
    }
}

#define GEMV_CASES(F, ...)                                                                                             \
    switch (mt) {                                                                                                      \
    case 1: F(__VA_ARGS__, 1); break;                                                                                  \
    case 2: F(__VA_ARGS__, 2); break;                                                                                  \
    case 3: F(__VA_ARGS__, 3); break;                                                                                  \
    default: F(__VA_ARGS__, 4); break;                                                                                 \
    }

#define CALL8(r0, r1, m0, mt_) gemv8_rows(xq, ldq, m0, mt_, kb, packed, r0, r1, sx + (m0), o)
#define CALL16(r0, r1, m0, mt_) gemv16_rows(xq, ldq, m0, mt_, kb, packed, r0, r1, o)

TD512 static void gemv8_part(const int8_t *xq, int64_t ldq, int64_t m, int64_t kb, const uint8_t *packed, int64_t r0,
                             int64_t r1, const int32_t *sx, const td_out_t *o) {
    for (int64_t m0 = 0; m0 < m; m0 += 4) {
        const int mt = (int)(m - m0 < 4 ? m - m0 : 4);
        GEMV_CASES(CALL8, r0, r1, m0)
    }
}

TD512 static void gemv16_part(const int16_t *xq, int64_t ldq, int64_t m, int64_t kb, const uint8_t *packed, int64_t r0,
                              int64_t r1, const td_out_t *o) {
    for (int64_t m0 = 0; m0 < m; m0 += 4) {
        const int mt = (int)(m - m0 < 4 ? m - m0 : 4);
        GEMV_CASES(CALL16, r0, r1, m0)
    }
}

static int gemv_i8_avx512(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                          const td_out_t *o, int threads) {
    const int64_t kb = kp / 4, chunk = 32;
    int32_t sx[GEMV_MAX_M + 1];
    if (m > GEMV_MAX_M + 1) return vnni_gemm_i8(xq, m, kp, ldq, packed, n, o, threads);
    for (int64_t t = 0; t < m; t++) { /* sum of the token's activations (zero past k) */
        int32_t s = 0;
        for (int64_t i = 0; i < kp; i++) s += xq[t * ldq + i];
        sx[t] = s;
    }
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n * kb * m >= PARALLEL_MIN)
#endif
    for (int64_t r0 = 0; r0 < n; r0 += chunk)
        gemv8_part(xq, ldq, m, kb, packed, r0, r0 + chunk < n ? r0 + chunk : n, sx, o);
    return TD_OK;
}

static int gemv_i16_avx512(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed, int64_t n,
                           const td_out_t *o, int threads, int lim) {
    const int64_t kb = kp / 4, chunk = 32;
    (void)threads;
    (void)lim; /* int32 sums */
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (2 * n * kb * m >= PARALLEL_MIN)
#endif
    for (int64_t r0 = 0; r0 < n; r0 += chunk)
        gemv16_part(xq, ldq, m, kb, packed, r0, r0 + chunk < n ? r0 + chunk : n, o);
    return TD_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* Attention rows (see td_attention in ternary_gemm.c and td_attention_rows_avx2): the same
 * algorithm with 512-bit FMA tiles of 6 query rows, C (6 x 32) = A (6 x L) B (L x 32) in 12
 * accumulators (a 6 x 16 tile for the last 16 columns: tp and hdp are multiples of 16), B read from two 16-wide panels, and a 16-lane exp. Every lane does
 * the AVX2 kernel's arithmetic (the same FMA chains over l, the same exp polynomial, the softmax sum
 * in its order), so the outputs are the AVX2 kernel's bits (tested), and every query row is computed
 * alone, in an order fixed by t and hd: batch-invariant. */

#define ATT_MR 6

/* c[r][0..16 NC - 1] = sum_l a[r][l] * b panels, for r < ATT_MR: ATT_MR * NC accumulators,
 * ATT_MR broadcasts and NC loads per ATT_MR * NC FMAs (12 rows, 24 accumulators, measured no faster
 * than 6 on Zen 5). */
TD512 static inline __attribute__((always_inline)) void att_tile512(const float *const a[ATT_MR], int64_t L,
                                                                    const float *b, const float *bn, float *c,
                                                                    int64_t ldc, const int NC) {
    __m512 acc[ATT_MR][2];
    for (int r = 0; r < ATT_MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l++) {
        const __m512 b0 = _mm512_load_ps(b + l * 16);
        const __m512 b1 = NC > 1 ? _mm512_load_ps(bn + l * 16) : b0;
        for (int r = 0; r < ATT_MR; r++) {
            const __m512 t = _mm512_set1_ps(a[r][l]);
            acc[r][0] = _mm512_fmadd_ps(t, b0, acc[r][0]);
            if (NC > 1) acc[r][1] = _mm512_fmadd_ps(t, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < ATT_MR; r++) {
        _mm512_store_ps(c + r * ldc, acc[r][0]);
        if (NC > 1) _mm512_store_ps(c + r * ldc + 16, acc[r][1]);
    }
}

/* c (ATT_MR, n16) = a b over L for n16 (a multiple of 16) columns; b in n16 / 16 panels of (L, 16) */
TD512 static void att_gemm512(const float *const a[ATT_MR], int64_t L, const float *b, int64_t n16, float *c,
                              int64_t ldc) {
    int64_t j0 = 0;
    for (; j0 + 32 <= n16; j0 += 32) att_tile512(a, L, b + j0 * L, b + (j0 + 16) * L, c + j0, ldc, 2);
    if (j0 < n16) att_tile512(a, L, b + j0 * L, NULL, c + j0, ldc, 1);
}

/* e^x, the AVX2 kernel's Cody-Waite reduction and polynomial in 16 lanes */
TD512 static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

TD512 static void attention_rows_avx512(const float *q, int64_t ldq, int64_t i0, int64_t i1, const float *kt,
                                        const float *vs, int64_t t, int64_t tp, int64_t hd, int64_t hdp, float scale,
                                        float *s, float *ob, float *out, int64_t ldo) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t ib = i0; ib < i1; ib += ATT_MR) {
        const int nr = (int)(i1 - ib < ATT_MR ? i1 - ib : ATT_MR);
        const float *qa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) qa[r] = q + (ib + (r < nr ? r : nr - 1)) * ldq;
        att_gemm512(qa, hd, kt, tp, s, tp); /* scores over all keys */
        float inv[ATT_MR];
        for (int r = 0; r < nr; r++) {
            float *sr = s + r * tp;
            int64_t j = 0;
            __m512 mx = _mm512_set1_ps(-FLT_MAX);
            for (; j + 16 <= t; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(sr + j));
            float m = _mm512_reduce_max_ps(mx);
            for (; j < t; j++) m = sr[j] > m ? sr[j] : m;
            const __m512 vm = _mm512_set1_ps(m * scale);
            /* the AVX2 kernel's arithmetic: vector exp for the first t - t % 8 scores, their sum in
             * 8 lanes added block by block, the same horizontal sum, then td_expf_poly for the rest */
            const int64_t t8 = t / 8 * 8;
            __m256 sum8 = _mm256_setzero_ps();
            for (j = 0; j + 16 <= t8; j += 16) {
                const __m512 e = exp512(_mm512_fmsub_ps(_mm512_load_ps(sr + j), vscale, vm));
                _mm512_store_ps(sr + j, e);
                sum8 = _mm256_add_ps(sum8, _mm512_castps512_ps256(e));
                sum8 = _mm256_add_ps(sum8, _mm512_extractf32x8_ps(e, 1));
            }
            if (j < t8) {
                const __m512 e = exp512(_mm512_fmsub_ps(_mm512_maskz_load_ps(0xff, sr + j), vscale, vm));
                _mm512_mask_store_ps(sr + j, 0xff, e);
                sum8 = _mm256_add_ps(sum8, _mm512_castps512_ps256(e));
                j += 8;
            }
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            float tot = _mm_cvtss_f32(h);
            for (; j < t; j++) {
                sr[j] = td_expf_poly(fmaf(sr[j], scale, -(m * scale)));
                tot += sr[j];
            }
            inv[r] = 1.0f / tot;
        }
        const float *pa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) pa[r] = s + (r < nr ? r : nr - 1) * tp;
        att_gemm512(pa, t, vs, hdp, ob, hdp);
        for (int r = 0; r < nr; r++) {
            float *o = out + (ib + r) * ldo;
            const float *src = ob + r * hdp;
            const __m512 vi = _mm512_set1_ps(inv[r]);
            int64_t c = 0;
            for (; c + 16 <= hd; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_load_ps(src + c), vi));
            if (c < hd) {
                const __mmask16 mk = (__mmask16)((1u << (hd - c)) - 1);
                _mm512_mask_storeu_ps(o + c, mk, _mm512_mul_ps(_mm512_maskz_load_ps(mk, src + c), vi));
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------- */
/* int8 attention rows (td_att8_rows_fn; the arithmetic is defined at td_att8_kv_t): scores with
 * vpdpbusd over 6 query rows x 32 keys (12 zmm accumulators, unsigned q + 128 times signed k, minus
 * kcorr = 128 sum k), the softmax numerators with exp512 (td_expf_poly lane by lane) rounded to
 * integers, and P V with vpdpwssd (int16 pairs of keys) over 6 rows x 32 channels, int32 sums per
 * block of TD_ATT8_KBLK keys converted and added in block order. Every step is the portable
 * reference's, so the outputs are its bits. */
#define ATT8_MAXG 64 /* quads per row handled here (hd <= 256); larger heads run the portable rows */

TD512 static inline __attribute__((always_inline)) void att8_scores512(const uint32_t qu[ATT_MR][ATT8_MAXG], int64_t ng,
                                                                       const int8_t *b0p, const int8_t *b1p,
                                                                       const int32_t *corr, const float *ks, float *c,
                                                                       int64_t ldc, const int NC) {
    __m512i acc[ATT_MR][2];
    for (int r = 0; r < ATT_MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int64_t g = 0; g < ng; g++) {
        const __m512i b0 = _mm512_load_si512((const void *)(b0p + g * 64));
        const __m512i b1 = NC > 1 ? _mm512_load_si512((const void *)(b1p + g * 64)) : b0;
        for (int r = 0; r < ATT_MR; r++) {
            const __m512i a = _mm512_set1_epi32((int)qu[r][g]);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, b0);
            if (NC > 1) acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, b1);
        }
    }
    for (int h = 0; h < NC; h++) {
        const __m512i cr = _mm512_loadu_si512((const void *)(corr + 16 * h));
        const __m512 kv = _mm512_loadu_ps(ks + 16 * h);
        for (int r = 0; r < ATT_MR; r++)
            _mm512_store_ps(c + r * ldc + 16 * h,
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][h], cr)), kv));
    }
}

TD512 static inline __attribute__((always_inline)) void att8_pv512(const int16_t *const pa[ATT_MR], int64_t tp,
                                                                   const int16_t *v0, const int16_t *v1,
                                                                   __m512 facc[ATT_MR][2], const int NC) {
    for (int r = 0; r < ATT_MR; r++) facc[r][0] = facc[r][1] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < tp; j0 += TD_ATT8_KBLK) {
        const int64_t j1 = j0 + TD_ATT8_KBLK < tp ? j0 + TD_ATT8_KBLK : tp;
        __m512i acc[ATT_MR][2];
        for (int r = 0; r < ATT_MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        for (int64_t jp = j0 / 2; jp < j1 / 2; jp++) {
            const __m512i b0 = _mm512_load_si512((const void *)(v0 + jp * 32));
            const __m512i b1 = NC > 1 ? _mm512_load_si512((const void *)(v1 + jp * 32)) : b0;
            for (int r = 0; r < ATT_MR; r++) {
                int32_t pr;
                memcpy(&pr, pa[r] + 2 * jp, 4);
                const __m512i a = _mm512_set1_epi32(pr);
                acc[r][0] = _mm512_dpwssd_epi32(acc[r][0], a, b0);
                if (NC > 1) acc[r][1] = _mm512_dpwssd_epi32(acc[r][1], a, b1);
            }
        }
        for (int r = 0; r < ATT_MR; r++) {
            facc[r][0] = _mm512_add_ps(facc[r][0], _mm512_cvtepi32_ps(acc[r][0]));
            if (NC > 1) facc[r][1] = _mm512_add_ps(facc[r][1], _mm512_cvtepi32_ps(acc[r][1]));
        }
    }
}

TD512 static void attention_rows_i8_avx512(const td_att8_kv_t *kv, const int8_t *qq, const float *qs, int64_t n,
                                           float *s, int16_t *pp, float *ob, float *out, int64_t ldo) {
    const int64_t t = kv->t, tp = kv->tp, hd4 = kv->hd4, ng = hd4 / 4, hdp = kv->hdp, hd = kv->hd;
    if (ng > ATT8_MAXG) {
        td_ops_for(TD_ISA_SCALAR)->attention_rows_i8(kv, qq, qs, n, s, pp, ob, out, ldo);
        return;
    }
    uint32_t qu[ATT_MR][ATT8_MAXG];
    const __m512 pmax = _mm512_set1_ps((float)TD_ATT8_PMAX);
    for (int64_t ib = 0; ib < n; ib += ATT_MR) {
        const int nr = (int)(n - ib < ATT_MR ? n - ib : ATT_MR);
        for (int r = 0; r < ATT_MR; r++) { /* q + 128 as unsigned bytes; missing rows repeat the last */
            const int8_t *qr = qq + (ib + (r < nr ? r : nr - 1)) * hd4;
            for (int64_t g = 0; g < ng; g++) {
                uint32_t w;
                memcpy(&w, qr + 4 * g, 4);
                qu[r][g] = w ^ 0x80808080u;
            }
        }
        int64_t j0 = 0;
        for (; j0 + 32 <= tp; j0 += 32)
            att8_scores512(qu, ng, kv->kq + j0 * hd4, kv->kq + (j0 + 16) * hd4, kv->kcorr + j0, kv->ks + j0, s + j0, tp,
                           2);
        if (j0 < tp) att8_scores512(qu, ng, kv->kq + j0 * hd4, NULL, kv->kcorr + j0, kv->ks + j0, s + j0, tp, 1);
        float inv[ATT_MR];
        for (int r = 0; r < nr; r++) {
            const float *sr = s + r * tp;
            int16_t *pr = pp + r * tp;
            __m512 mx = _mm512_set1_ps(-FLT_MAX);
            int64_t j = 0;
            for (; j + 16 <= t; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(sr + j));
            if (j < t) {
                const __mmask16 mk = (__mmask16)((1u << (t - j)) - 1);
                mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_load_ps(sr + j));
            }
            const float m = _mm512_reduce_max_ps(mx), c = qs[ib + r] * kv->scale;
            const __m512 vc = _mm512_set1_ps(c), vmc = _mm512_set1_ps(m * c);
            __m512i tot = _mm512_setzero_si512();
            for (j = 0; j < tp; j += 16) {
                const __m512 e = exp512(_mm512_fmsub_ps(_mm512_load_ps(sr + j), vc, vmc));
                __m512i pi = _mm512_cvtps_epi32(_mm512_mul_ps(e, pmax)); /* round half to even */
                if (j + 16 > t) pi = _mm512_maskz_mov_epi32((__mmask16)((1u << (t - j)) - 1), pi);
                tot = _mm512_add_epi32(tot, pi);
                _mm256_store_si256((__m256i *)(pr + j), _mm512_cvtepi32_epi16(pi));
            }
            inv[r] = 1.0f / (float)_mm512_reduce_add_epi32(tot);
        }
        const int16_t *pa[ATT_MR];
        for (int r = 0; r < ATT_MR; r++) pa[r] = pp + (r < nr ? r : nr - 1) * tp;
        for (int64_t c0 = 0; c0 < hdp; c0 += 32) {
            const int NC = c0 + 32 <= hdp ? 2 : 1;
            __m512 facc[ATT_MR][2];
            if (NC == 2) att8_pv512(pa, tp, kv->vq + c0 * tp, kv->vq + (c0 + 16) * tp, facc, 2);
            else att8_pv512(pa, tp, kv->vq + c0 * tp, NULL, facc, 1);
            for (int h = 0; h < NC; h++) {
                const int64_t cc = c0 + 16 * h;
                if (cc >= hd) break;
                const __mmask16 mk = hd - cc >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (hd - cc)) - 1);
                const __m512 vsc = _mm512_load_ps(kv->vsc + cc);
                for (int r = 0; r < nr; r++)
                    _mm512_mask_storeu_ps(out + (ib + r) * ldo + cc, mk,
                                          _mm512_mul_ps(_mm512_mul_ps(facc[r][h], vsc), _mm512_set1_ps(inv[r])));
            }
        }
    }
    (void)ob;
}

/* int8 dot-product peak: 12 chains of vpdpbusd (64 multiply-adds each, counted as 2 operations) */
TD512 static double i8dot_peak_avx512(int64_t iters, float *sink) {
    __m512i a[12];
    const __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(-2);
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_epi32(i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++) a[i] = _mm512_dpbusd_epi32(a[i], x, y);
    for (int i = 1; i < 12; i++) a[0] = _mm512_add_epi32(a[0], a[i]);
    *sink = (float)_mm512_reduce_add_epi32(a[0]);
    return 12.0 * 128.0 * (double)iters;
}

/* ------------------------------------------------------------------------------------------- */
/* Quantizers, bit-exact with the scalar path (see td_quantize_row_avx2): 16 lanes, masked tails
 * (a masked load reads 0, which never changes the absmax and quantizes to the zero padding). */

TD512 static float absmax512(const float *x, int64_t k) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 mx = _mm512_setzero_ps();
    int64_t i = 0;
    /* max(new, mx): a NaN in new yields mx, so NaN is skipped as in the scalar loop */
    for (; i + 16 <= k; i += 16) mx = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i), absmask), mx);
    if (i < k) {
        const __mmask16 mk = (__mmask16)((1u << (k - i)) - 1);
        mx = _mm512_max_ps(_mm512_and_ps(_mm512_maskz_loadu_ps(mk, x + i), absmask), mx);
    }
    return _mm512_reduce_max_ps(mx);
}

TD512 static inline __m512i quant16(__m512 xv, __m512 vinv, __m512 hi, __m512 lo) {
    __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(xv, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_max_ps(_mm512_min_ps(r, hi), lo); /* min(NaN, hi) = hi, as the scalar clamp */
    return _mm512_cvtps_epi32(r);
}

TD512 static void quantize_row8_avx512(const float *x, int64_t k, int8_t *xq, int64_t kq, float *scale) {
    const float amax = absmax512(x, k);
    if (!(amax > 0.0f) || amax > FLT_MAX) {
        memset(xq, 0, (size_t)kq);
        *scale = (amax > 0.0f) ? amax / 127.0f : 0.0f;
        return;
    }
    const float inv = 127.0f / amax;
    const __m512 vinv = _mm512_set1_ps(inv), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        _mm_storeu_si128((__m128i *)(xq + i), _mm512_cvtepi32_epi8(quant16(_mm512_loadu_ps(x + i), vinv, hi, lo)));
    if (i < k) {
        const __mmask16 mk = (__mmask16)((1u << (k - i)) - 1);
        _mm512_mask_cvtepi32_storeu_epi8(xq + i, mk, quant16(_mm512_maskz_loadu_ps(mk, x + i), vinv, hi, lo));
    }
    if (kq > k) memset(xq + k, 0, (size_t)(kq - k));
    *scale = amax / 127.0f;
}

TD512 static void quantize_row16_avx512(const float *x, int64_t k, int16_t *xq, int64_t kq, float *scale, int lim) {
    const float flim = (float)lim;
    const float amax = absmax512(x, k);
    if (!(amax > 0.0f) || amax > FLT_MAX) {
        memset(xq, 0, (size_t)kq * sizeof(int16_t));
        *scale = (amax > 0.0f) ? amax / flim : 0.0f;
        return;
    }
    const float inv = flim / amax;
    const __m512 vinv = _mm512_set1_ps(inv), hi = _mm512_set1_ps(flim), lo = _mm512_set1_ps(-flim);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        _mm256_storeu_si256((__m256i *)(xq + i), _mm512_cvtepi32_epi16(quant16(_mm512_loadu_ps(x + i), vinv, hi, lo)));
    if (i < k) {
        const __mmask16 mk = (__mmask16)((1u << (k - i)) - 1);
        _mm512_mask_cvtepi32_storeu_epi16(xq + i, mk, quant16(_mm512_maskz_loadu_ps(mk, x + i), vinv, hi, lo));
    }
    for (i = k; i < kq; i++) xq[i] = 0;
    *scale = amax / flim;
}

/* SwiGLU in 16 lanes: silu(a) * b = a / (1 + e^-a) * b with the AVX2 kernel's operations per element
 * (its exp polynomial, a division, a product), so every element gets the AVX2 bits, whatever its
 * position; the tail goes through the same code under a mask (batch invariance). */
TD512 static inline __m512 swiglu16(__m512 av, __m512 bv) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), av));
    return _mm512_mul_ps(_mm512_div_ps(av, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), bv);
}

TD512 static void swiglu_avx512(const float *a, const float *b, float *out, int64_t count) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16)
        _mm512_storeu_ps(out + i, swiglu16(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
    if (i < count) {
        const __mmask16 mk = (__mmask16)((1u << (count - i)) - 1);
        _mm512_mask_storeu_ps(out + i, mk,
                              swiglu16(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i)));
    }
}

/* FMA peak: 12 chains of 16-lane FMAs */
TD512 static double fma_peak_avx512(int64_t iters, float *sink) {
    __m512 a[12];
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(0.001f);
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], x, y);
    for (int i = 1; i < 12; i++) a[0] = _mm512_add_ps(a[0], a[i]);
    *sink = _mm512_reduce_add_ps(a[0]);
    return 12.0 * 32.0 * (double)iters;
}

/* ------------------------------------------------------------------------------------------- */
const td_ops_t td_ops_avx512 = {
    .isa = TD_ISA_AVX512,
    .name = "avx512",
    .parent = TD_ISA_AVX2,
    .rank = 20,
    .cpu_flags = TD_CPU_AVX512 | TD_CPU_AVX2 | TD_CPU_FMA,
    .i8_lut_min_m = GEMV_MAX_M + 1,
    .i16_lut_min_m = GEMV_MAX_M + 1,
    .gemv_i8 = gemv_i8_avx512,
    .lut_i8 = lut_i8_avx512,
    .gemv_i16 = gemv_i16_avx512,
    .lut_i16 = lut_i16_avx512,
    .quantize_row_i8 = quantize_row8_avx512,
    .quantize_row_i16 = quantize_row16_avx512,
    .lut_f32 = lut_f32_avx512,
    .attention_rows = attention_rows_avx512,
    .swiglu = swiglu_avx512,
    .fma_peak = fma_peak_avx512,
    .attention_rows_i8 = attention_rows_i8_avx512,
    .i8dot_peak = i8dot_peak_avx512,
};

#endif /* TD_X86 */
