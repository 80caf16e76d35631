/* x86-64 AVX-512 kernels (F, BW, VL, DQ, VNNI). Compiled for the baseline ISA like ternary_avx2.c:
 * every function here carries a target attribute and is reached only through the AVX-512 table,
 * which td_set_isa / td_best_isa accept only when the CPU reports the features and the OS enables
 * the opmask and ZMM state (XCR0, see x86_avx512_flags in ternary_gemm.c). Entries not set here
 * (float32 GEMMs, swiglu, attention) come from the AVX2 table.
 *
 * Integer GEMMs, many tokens (M >= 8): a dense integer GEMM on VNNI dot products instead of the
 * AVX2 tables of partial sums. The four weights of one packed byte (k, k+32, k+64, k+96) form one
 * 32-bit "quad"; the activations of a block of 16 tokens are packed quad by quad into one 512-bit
 * vector (token t in lane t), so one `vpdpbusd` adds 4 weights x 16 tokens of products into int32
 * lanes and one broadcast quad of weights serves 16 tokens.
 *   int8: vpdpbusd multiplies unsigned by signed bytes; the activations are stored as x + 128 (the
 *         byte x ^ 0x80, in 1..255) and the weights as signed -1/0/+1 bytes, so each lane adds
 *         sum w (x + 128) = sum w x + 128 sum w; 128 sum w of each weight row is subtracted at the end.
 *   int10: vpdpwssd on int16 pairs (k, k+32) and (k+64, k+96), weights as int16 -1/0/+1.
 * Every sum is an exact int32 (|sum| <= 255 K or 511 K), and outputs go through td_store: results are
 * bit-identical to the scalar path, for any M, token position and thread split.
 * Here weights do get multiplied, by -1, 0 or +1 (the only way VNNI adds bytes four at a time); the
 * AVX2 and portable kernels keep select-and-add. Design notes and measurements: docs/kernels.md. */
#include "ternary_internal.h"

#if TD_X86
#include <float.h>
#include <immintrin.h>
#include <string.h>

#define TD512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))

#define NR 8           /* weight rows per micro-tile */
#define TOK 32         /* tokens per block: two 16-lane vectors */
#define ROW_CHUNK 128  /* rows per work item (a multiple of NR) */
#define GEMV_MAX_M 7   /* up to this many tokens stream the weights */
#define PARALLEL_MIN (td_force_parallel ? 0 : (1 << 20)) /* as the AVX2 kernels: below, one thread */

/* quad of a packed byte: its four codes as signed weight bytes (code 3, invalid, reads as 0) */
static void build_quads(uint32_t q8[256], uint64_t q16[256]) {
    for (int v = 0; v < 256; v++) {
        uint32_t a = 0;
        uint64_t b = 0;
        for (int q = 0; q < 4; q++) {
            int c = (v >> (2 * q)) & 3;
            const int w = c == 3 ? 0 : c - 1;
            a |= (uint32_t)(uint8_t)(int8_t)w << (8 * q);
            b |= (uint64_t)(uint16_t)(int16_t)w << (16 * q);
        }
        q8[v] = a;
        q16[v] = b;
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Packing. Weights: panel of NR rows, quad p of row r at wq[p * NR + r] (int8: one dword per quad)
 * or wq[(2 p + h) * NR + r] (int10: dword h holds weights h*2, h*2+1 of the quad as int16).
 * Activations of a 32-token block: xp[(p * D + h) * 32 + t], D = 1 (int8) or 2 (int10). */

/* One panel of weights (rows r0.. r0+NR-1; rows past n are zero weights). Returns nothing;
 * corr[r] = 128 * sum of the row's weights (int8 only). */
static void pack_panel(const uint8_t *packed, int64_t n, int64_t kb, int64_t r0, int wide, const uint32_t *q8,
                       const uint64_t *q16, uint32_t *wq, int32_t *corr) {
    for (int r = 0; r < NR; r++) {
        const int64_t row = r0 + r;
        int32_t s = 0;
        if (row >= n) {
            for (int64_t p = 0; p < kb; p++) {
                if (wide) { wq[(2 * p) * NR + r] = 0; wq[(2 * p + 1) * NR + r] = 0; }
                else wq[p * NR + r] = 0;
            }
        } else {
            const uint8_t *w = packed + row * kb;
            for (int64_t p = 0; p < kb; p++) {
                if (wide) {
                    const uint64_t v = q16[w[p]];
                    wq[(2 * p) * NR + r] = (uint32_t)v;
                    wq[(2 * p + 1) * NR + r] = (uint32_t)(v >> 32);
                } else {
                    const uint32_t v = q8[w[p]];
                    wq[p * NR + r] = v;
                    s += (int8_t)v + (int8_t)(v >> 8) + (int8_t)(v >> 16) + (int8_t)(v >> 24);
                }
            }
        }
        if (corr) corr[r] = 128 * s;
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

/* Row of int16 activations -> out[2 p + h] = pair (x[k + 64 h], x[k + 32 + 64 h]) of quad p. */
TD512 static void quads_i16(const int16_t *x, int64_t kp, uint32_t *out) {
    for (int64_t b = 0; b < kp / TD_BLOCK_K; b++) {
        const int16_t *xb = x + b * TD_BLOCK_K;
        uint32_t *o = out + 2 * b * TD_BLOCK_BYTES;
        for (int j0 = 0; j0 < 32; j0 += 16) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(xb + j0));
            const __m256i c1 = _mm256_loadu_si256((const __m256i *)(xb + 32 + j0));
            const __m256i c2 = _mm256_loadu_si256((const __m256i *)(xb + 64 + j0));
            const __m256i c3 = _mm256_loadu_si256((const __m256i *)(xb + 96 + j0));
            /* lane 0: j0 + 0-3 (lo), 4-7 (hi); lane 1: j0 + 8-11, 12-15 */
            const __m256i ab_lo = _mm256_unpacklo_epi16(a, c1), ab_hi = _mm256_unpackhi_epi16(a, c1);
            const __m256i cd_lo = _mm256_unpacklo_epi16(c2, c3), cd_hi = _mm256_unpackhi_epi16(c2, c3);
            const __m256i h0a = _mm256_permute2x128_si256(ab_lo, ab_hi, 0x20); /* j0 + 0..7 */
            const __m256i h0b = _mm256_permute2x128_si256(ab_lo, ab_hi, 0x31); /* j0 + 8..15 */
            const __m256i h1a = _mm256_permute2x128_si256(cd_lo, cd_hi, 0x20);
            const __m256i h1b = _mm256_permute2x128_si256(cd_lo, cd_hi, 0x31);
            /* interleave h = 0 and h = 1 dwords, out[2 (j0 + i) + h]: unpack gives qwords of
             * i = (0, 1, 4, 5) (lo) and (2, 3, 6, 7) (hi) */
            __m256i lo = _mm256_unpacklo_epi32(h0a, h1a), hi = _mm256_unpackhi_epi32(h0a, h1a);
            _mm256_storeu_si256((__m256i *)(o + 2 * j0), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i *)(o + 2 * j0 + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
            lo = _mm256_unpacklo_epi32(h0b, h1b);
            hi = _mm256_unpackhi_epi32(h0b, h1b);
            _mm256_storeu_si256((__m256i *)(o + 2 * j0 + 16), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i *)(o + 2 * j0 + 24), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
    }
}

/* Tokens m0..m0+mt-1 (mt <= 32) into xp ((kb * D) x 32 dwords): each token's quads in p order
 * (tmp, row-major), then 16 tokens at a time gathered per quad. Tokens mt..31 read as x = 0. */
TD512 static void pack_tokens(const int8_t *xq8, const int16_t *xq16, int64_t ldq, int64_t m0, int mt,
                              int64_t kp, uint32_t *tmp, uint32_t *xp) {
    const int D = xq16 ? 2 : 1;
    const int64_t nq = kp / 4 * D; /* dwords per token */
    for (int t = 0; t < TOK; t++) {
        uint32_t *o = tmp + t * nq;
        if (t >= mt) {
            memset(o, xq16 ? 0 : 0x80, (size_t)nq * 4);
            continue;
        }
        if (xq16) quads_i16(xq16 + (m0 + t) * ldq, kp, o);
        else quads_i8(xq8 + (m0 + t) * ldq, kp, o);
    }
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)nq));
    const int hv = (mt + 15) / 16; /* vectors with real tokens; the other stays as set above */
    for (int h = 0; h < 2; h++) {
        const uint32_t *base = tmp + h * 16 * nq;
        if (h >= hv) {
            const __m512i fill = _mm512_set1_epi32(xq16 ? 0 : (int)0x80808080u);
            for (int64_t p = 0; p < nq; p++) _mm512_store_si512((void *)(xp + p * TOK + 16 * h), fill);
            continue;
        }
        for (int64_t p = 0; p < nq; p++)
            _mm512_store_si512((void *)(xp + p * TOK + 16 * h), _mm512_i32gather_epi32(idx, (const void *)(base + p), 4));
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Micro-kernels: NR rows x 32 tokens (HV = 2 vectors) or 16 (HV = 1), int32 sums into c. */

#define MK_STORE(c, HV)                                                                            \
    for (int r = 0; r < NR; r++)                                                                   \
        for (int h = 0; h < (HV); h++) _mm512_store_si512((void *)(out + (r * 2 + h) * 16), c[r][h]);

TD512 static inline __attribute__((always_inline)) void mk_i8(const uint32_t *xp, const uint32_t *wq, int64_t kb,
                                                              int32_t *out, const int HV) {
    __m512i c[NR][2];
    for (int r = 0; r < NR; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
    for (int64_t p = 0; p < kb; p++) {
        const __m512i a0 = _mm512_load_si512((const void *)(xp + p * TOK));
        const __m512i a1 = HV > 1 ? _mm512_load_si512((const void *)(xp + p * TOK + 16)) : a0;
        const uint32_t *w = wq + p * NR;
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) {
            const __m512i b = _mm512_set1_epi32((int)w[r]);
            c[r][0] = _mm512_dpbusd_epi32(c[r][0], a0, b);
            if (HV > 1) c[r][1] = _mm512_dpbusd_epi32(c[r][1], a1, b);
        }
    }
    MK_STORE(c, HV)
}

TD512 static inline __attribute__((always_inline)) void mk_i16(const uint32_t *xp, const uint32_t *wq, int64_t kb,
                                                               int32_t *out, const int HV) {
    __m512i c[NR][2];
    for (int r = 0; r < NR; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
    for (int64_t p = 0; p < kb; p++) {
        const uint32_t *xa = xp + 2 * p * TOK, *w = wq + 2 * p * NR;
        const __m512i a00 = _mm512_load_si512((const void *)xa);
        const __m512i a10 = _mm512_load_si512((const void *)(xa + TOK));
        const __m512i a01 = HV > 1 ? _mm512_load_si512((const void *)(xa + 16)) : a00;
        const __m512i a11 = HV > 1 ? _mm512_load_si512((const void *)(xa + TOK + 16)) : a10;
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) {
            const __m512i b0 = _mm512_set1_epi32((int)w[r]), b1 = _mm512_set1_epi32((int)w[NR + r]);
            c[r][0] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(c[r][0], a00, b0), a10, b1);
            if (HV > 1) c[r][1] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(c[r][1], a01, b0), a11, b1);
        }
    }
    MK_STORE(c, HV)
}

TD512 static void mk_i8_32(const uint32_t *xp, const uint32_t *wq, int64_t kb, int32_t *out) { mk_i8(xp, wq, kb, out, 2); }
TD512 static void mk_i8_16(const uint32_t *xp, const uint32_t *wq, int64_t kb, int32_t *out) { mk_i8(xp, wq, kb, out, 1); }
TD512 static void mk_i16_32(const uint32_t *xp, const uint32_t *wq, int64_t kb, int32_t *out) { mk_i16(xp, wq, kb, out, 2); }
TD512 static void mk_i16_16(const uint32_t *xp, const uint32_t *wq, int64_t kb, int32_t *out) { mk_i16(xp, wq, kb, out, 1); }

/* ------------------------------------------------------------------------------------------- */
/* Driver of the int8/int10 VNNI GEMM: pack the weights (all panels) and the tokens (all blocks)
 * in parallel, then work items of (row chunk, token block). */
static int vnni_gemm(const int8_t *xq8, const int16_t *xq16, int64_t m, int64_t kp, int64_t ldq,
                     const uint8_t *packed, int64_t n, const td_out_t *o, int threads) {
    const int wide = xq16 != NULL, D = wide ? 2 : 1;
    const int64_t kb = kp / 4, nq = kb * D;
    const int64_t npan = (n + NR - 1) / NR, ntb = (m + TOK - 1) / TOK;
    const int64_t nchunk = (n + ROW_CHUNK - 1) / ROW_CHUNK, items = nchunk * ntb;
    if (ntb * n * kb < PARALLEL_MIN) threads = 1;
    uint32_t q8[256];
    uint64_t q16[256];
    build_quads(q8, q16);
    uint32_t *wq = td_alloc((size_t)npan * (size_t)nq * NR * 4);
    int32_t *corr = wide ? NULL : td_alloc((size_t)npan * NR * 4);
    uint32_t *xp = td_alloc((size_t)ntb * (size_t)nq * TOK * 4);
    if (!wq || !xp || (!wide && !corr)) {
        td_free(wq); td_free(corr); td_free(xp);
        return TD_ENOMEM;
    }
    int err = 0;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
        uint32_t *tmp = td_alloc((size_t)TOK * (size_t)nq * 4);
        int32_t *res = td_alloc((size_t)NR * TOK * 4);
        const int ok = tmp && res;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 4) nowait
#endif
        for (int64_t pn = 0; pn < npan; pn++)
            pack_panel(packed, n, kb, pn * NR, wide, q8, q16, wq + pn * nq * NR, corr ? corr + pn * NR : NULL);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t tb = 0; tb < ntb; tb++) {
            if (!ok) continue;
            const int mt = (int)(m - tb * TOK < TOK ? m - tb * TOK : TOK);
            pack_tokens(xq8, xq16, ldq, tb * TOK, mt, kp, tmp, xp + tb * nq * TOK);
        }
        /* the closing barrier of the loop above: every panel and block is packed */
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t it = 0; it < items; it++) {
            if (!ok) { err = 1; continue; }
            const int64_t ch = it / ntb, tb = it % ntb;
            const int64_t m0 = tb * TOK, r0 = ch * ROW_CHUNK, r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;
            const int mt = (int)(m - m0 < TOK ? m - m0 : TOK);
            const uint32_t *xb = xp + tb * nq * TOK;
            for (int64_t rp = r0; rp < r1; rp += NR) {
                const int64_t pn = rp / NR;
                const uint32_t *wp = wq + pn * nq * NR;
                if (wide) {
                    if (mt > 16) mk_i16_32(xb, wp, kb, res);
                    else mk_i16_16(xb, wp, kb, res);
                } else {
                    if (mt > 16) mk_i8_32(xb, wp, kb, res);
                    else mk_i8_16(xb, wp, kb, res);
                }
                const int nr = (int)(n - rp < NR ? n - rp : NR);
                for (int t = 0; t < mt; t++)
                    for (int r = 0; r < nr; r++) {
                        const int32_t v = res[(r * 2 + t / 16) * 16 + t % 16];
                        td_store(o, m0 + t, rp + r, wide ? v : v - corr[pn * NR + r]);
                    }
            }
        }
        td_free(tmp); td_free(res);
    }
    td_free(wq); td_free(corr); td_free(xp);
    return err ? TD_ENOMEM : TD_OK;
}

static int lut_i8_avx512(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed,
                         int64_t n, const td_out_t *o, int threads) {
    return vnni_gemm(xq, NULL, m, kp, ldq, packed, n, o, threads);
}

static int lut_i16_avx512(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed,
                          int64_t n, const td_out_t *o, int threads, int lim) {
    (void)lim; /* int32 sums: exact for any lim <= 511 */
    return vnni_gemm(NULL, xq, m, kp, ldq, packed, n, o, threads);
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
    const __m512i s01 = _mm512_setr_epi64(0, 0, 0, 0, 0x0002000200020002ll, 0x0002000200020002ll,
                                          0x0002000200020002ll, 0x0002000200020002ll);
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

#define GEMV_CASES(F, ...)                                                                          \
    switch (mt) {                                                                                   \
    case 1: F(__VA_ARGS__, 1); break;                                                               \
    case 2: F(__VA_ARGS__, 2); break;                                                               \
    case 3: F(__VA_ARGS__, 3); break;                                                               \
    default: F(__VA_ARGS__, 4); break;                                                              \
    }

#define CALL8(r0, r1, m0, mt_) gemv8_rows(xq, ldq, m0, mt_, kb, packed, r0, r1, sx + (m0), o)
#define CALL16(r0, r1, m0, mt_) gemv16_rows(xq, ldq, m0, mt_, kb, packed, r0, r1, o)

TD512 static void gemv8_part(const int8_t *xq, int64_t ldq, int64_t m, int64_t kb, const uint8_t *packed,
                             int64_t r0, int64_t r1, const int32_t *sx, const td_out_t *o) {
    for (int64_t m0 = 0; m0 < m; m0 += 4) {
        const int mt = (int)(m - m0 < 4 ? m - m0 : 4);
        GEMV_CASES(CALL8, r0, r1, m0)
    }
}

TD512 static void gemv16_part(const int16_t *xq, int64_t ldq, int64_t m, int64_t kb, const uint8_t *packed,
                              int64_t r0, int64_t r1, const td_out_t *o) {
    for (int64_t m0 = 0; m0 < m; m0 += 4) {
        const int mt = (int)(m - m0 < 4 ? m - m0 : 4);
        GEMV_CASES(CALL16, r0, r1, m0)
    }
}

static int gemv_i8_avx512(const int8_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed,
                          int64_t n, const td_out_t *o, int threads) {
    const int64_t kb = kp / 4, chunk = 32;
    int32_t sx[GEMV_MAX_M + 1];
    if (m > GEMV_MAX_M + 1) return vnni_gemm(xq, NULL, m, kp, ldq, packed, n, o, threads);
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

static int gemv_i16_avx512(const int16_t *xq, int64_t m, int64_t kp, int64_t ldq, const uint8_t *packed,
                           int64_t n, const td_out_t *o, int threads, int lim) {
    const int64_t kb = kp / 4, chunk = 32;
    (void)threads; (void)lim; /* int32 sums */
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (2 * n * kb * m >= PARALLEL_MIN)
#endif
    for (int64_t r0 = 0; r0 < n; r0 += chunk)
        gemv16_part(xq, ldq, m, kb, packed, r0, r0 + chunk < n ? r0 + chunk : n, o);
    return TD_OK;
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

/* ------------------------------------------------------------------------------------------- */
const td_ops_t td_ops_avx512 = {
    .isa = TD_ISA_AVX512, .name = "avx512", .parent = TD_ISA_AVX2, .rank = 20,
    .cpu_flags = TD_CPU_AVX512 | TD_CPU_AVX2 | TD_CPU_FMA,
    .i8_lut_min_m = GEMV_MAX_M + 1, .i16_lut_min_m = GEMV_MAX_M + 1,
    .gemv_i8 = gemv_i8_avx512, .lut_i8 = lut_i8_avx512,
    .gemv_i16 = gemv_i16_avx512, .lut_i16 = lut_i16_avx512,
    .quantize_row_i8 = quantize_row8_avx512, .quantize_row_i16 = quantize_row16_avx512,
};

#endif /* TD_X86 */
