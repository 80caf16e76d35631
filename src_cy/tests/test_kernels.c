/* C harness for the ternary kernels: every ISA path this CPU and build can run (td_isa_supported:
 * scalar, AVX2, AVX-512, NEON plain, NEON dot-product) against a naive reference written here from
 * the layout's definition; an ISA the CPU lacks is reported as skipped.
 * int8 and 10-bit sums must match exactly, float32 outputs to float rounding. Exit status 1 on a mismatch.
 *
 *   cc -O2 -std=c11 -Isrc_cy src_cy/ternary_*.c src_cy/tests/test_kernels.c -lm -o test_kernels
 *   ./test_kernels            (or: ./test_kernels scalar   to test only the scalar path)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ternary_gemm.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) { /* xorshift64*: reproducible everywhere */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}
static float rndf(void) { return (float)(rnd() / 4294967296.0) * 2.0f - 1.0f; }

static int64_t padk(int64_t k) { return (k + 127) / 128 * 128; }

/* The fingerprints' inputs: a uniform float in [-0.5, 0.5) from the generator state *s (their own
 * sequences, independent of rnd(), so that a fingerprint does not move when other checks are added) */
static float lcg_unit(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)(*s >> 8) / 16777216.0f - 0.5f;
}

/* Pack Q (n, k) in {-1,0,1} by the layout's definition: byte j of block b holds weight
 * 128 b + 32 q + j in bits 2q+1..2q, as code Q + 1; padding code 1. */
static void pack(const int8_t *q, int64_t n, int64_t k, uint8_t *out) {
    const int64_t kb = padk(k) / 4;
    for (int64_t r = 0; r < n; r++)
        for (int64_t byte = 0; byte < kb; byte++) {
            uint8_t v = 0;
            for (int qq = 0; qq < 4; qq++) {
                const int64_t kk = (byte / 32) * 128 + 32 * qq + byte % 32;
                const int code = kk < k ? q[r * k + kk] + 1 : 1;
                v |= (uint8_t)(code << (2 * qq));
            }
            out[r * kb + byte] = v;
        }
}

/* Reference int8 quantization, written from the NumPy definition with libm rintf. */
static void quantize_ref(const float *x, int64_t m, int64_t k, int8_t *xq, int64_t ldq, float *scale) {
    for (int64_t r = 0; r < m; r++) {
        float amax = 0;
        for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[r * k + i]));
        memset(xq + r * ldq, 0, (size_t)ldq);
        scale[r] = amax > 0 ? amax / 127.0f : 0.0f;
        if (!(amax > 0)) continue;
        const float inv = 127.0f / amax;
        for (int64_t i = 0; i < k; i++) {
            float v = rintf(x[r * k + i] * inv);
            xq[r * ldq + i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        }
    }
}

/* 10-bit activations (lim 511): the same rounding into int32 here. */
static void quantize10_ref(const float *x, int64_t m, int64_t k, int32_t *xq, float *scale) {
    for (int64_t r = 0; r < m; r++) {
        float amax = 0;
        for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[r * k + i]));
        scale[r] = amax > 0 ? amax / 511.0f : 0.0f;
        for (int64_t i = 0; i < k; i++) {
            float v = amax > 0 ? rintf(x[r * k + i] * (511.0f / amax)) : 0.0f;
            xq[r * k + i] = (int32_t)(v > 511 ? 511 : v < -511 ? -511 : v);
        }
    }
}

static int failures = 0;

/* y must equal float(acc) * (scale * alpha) + bias exactly (the documented two roundings). */
static void check_int_outputs(const char *mode, int isa, int64_t m, int64_t k, int64_t n, const float *y,
                              const int32_t *acc, const float *scale, float alpha, const float *bias) {
    for (int64_t t = 0; t < m; t++)
        for (int64_t r = 0; r < n; r++) {
            const float want = (float)acc[t * n + r] * (scale[t] * alpha) + bias[r];
            if (y[t * n + r] != want) {
                printf("FAIL %s y isa=%s m=%lld k=%lld n=%lld at (%lld,%lld): %g != %g\n", mode, td_isa_name(isa),
                       (long long)m, (long long)k, (long long)n, (long long)t, (long long)r, y[t * n + r], want);
                failures++;
                return;
            }
        }
}

static void check_shape(int64_t m, int64_t k, int64_t n, int wkind, const int *isas, int nisa) {
    const int64_t kp = padk(k), kb = kp / 4;
    int8_t *q = malloc((size_t)(n * k));
    uint8_t *w = malloc((size_t)(n * kb) + 1);
    float *x = malloc(sizeof(float) * (size_t)(m * k + 1));
    float *bias = malloc(sizeof(float) * (size_t)n);
    int8_t *xq = malloc((size_t)(m * kp) + 1), *xq2 = malloc((size_t)(m * kp) + 1);
    float *scale = malloc(sizeof(float) * (size_t)(m + 1)), *scale2 = malloc(sizeof(float) * (size_t)(m + 1));
    int32_t *acc_ref = malloc(sizeof(int32_t) * (size_t)(m * n + 1)),
            *acc = malloc(sizeof(int32_t) * (size_t)(m * n + 1));
    double *f_ref = malloc(sizeof(double) * (size_t)(m * n + 1)), *f_abs = malloc(sizeof(double) * (size_t)(m + 1));
    float *y = malloc(sizeof(float) * (size_t)(m * n + 1));
    for (int64_t i = 0; i < n * k; i++)
        q[i] = (int8_t)(wkind == 0 ? (int)(rnd() % 3) - 1 : wkind == 1 ? 1 : wkind == 2 ? -1 : 0);
    for (int64_t i = 0; i < m * k; i++) x[i] = rndf() * (i % 7 == 0 ? 100.0f : 1.0f);
    if (m > 1)
        for (int64_t i = 0; i < k; i++) x[k + i] = 0.0f; /* a zero row */
    /* all +1 weights on a constant row: every int8 activation is 127, the int16 worst case */
    if (wkind == 1)
        for (int64_t i = 0; i < k; i++) x[i] = 0.5f;
    for (int64_t i = 0; i < n; i++) bias[i] = rndf();
    pack(q, n, k, w);
    quantize_ref(x, m, k, xq, kp, scale);
    int32_t *xq10 = malloc(sizeof(int32_t) * (size_t)(m * k + 1)),
            *acc10 = malloc(sizeof(int32_t) * (size_t)(m * n + 1));
    float *scale10 = malloc(sizeof(float) * (size_t)(m + 1));
    quantize10_ref(x, m, k, xq10, scale10);
    for (int64_t t = 0; t < m; t++)
        for (int64_t r = 0; r < n; r++) {
            int32_t s = 0;
            for (int64_t i = 0; i < k; i++) s += q[r * k + i] * xq10[t * k + i]; /* reference only */
            acc10[t * n + r] = s;
        }
    for (int64_t t = 0; t < m; t++) {
        f_abs[t] = 0;
        for (int64_t i = 0; i < k; i++) f_abs[t] += fabs((double)x[t * k + i]);
        for (int64_t r = 0; r < n; r++) {
            int32_t s = 0;
            double f = 0;
            for (int64_t i = 0; i < k; i++) {
                if (q[r * k + i] > 0) {
                    s += xq[t * kp + i];
                    f += x[t * k + i];
                } else if (q[r * k + i] < 0) {
                    s -= xq[t * kp + i];
                    f -= x[t * k + i];
                }
            }
            acc_ref[t * n + r] = s;
            f_ref[t * n + r] = f;
        }
    }
    const float alpha = 0.37f;
    for (int ii = 0; ii < nisa; ii++) {
        const int isa = isas[ii];
        if (td_set_isa(isa) != 0) continue;
        for (int threads = 1; threads <= 2; threads++) {
            /* quantizer */
            td_quantize_rows_i8(x, m, k, k, xq2, kp, scale2, threads);
            if (memcmp(xq, xq2, (size_t)(m * kp)) || memcmp(scale, scale2, sizeof(float) * (size_t)m)) {
                printf("FAIL quantize isa=%s m=%lld k=%lld\n", td_isa_name(isa), (long long)m, (long long)k);
                failures++;
            }
            /* int8 sums: exact */
            memset(acc, 0x55, sizeof(int32_t) * (size_t)(m * n));
            if (td_gemm_i8_acc(xq, m, k, kp, w, n, acc, threads) != 0) {
                printf("FAIL alloc\n");
                failures++;
            }
            for (int64_t i = 0; i < m * n; i++)
                if (acc[i] != acc_ref[i]) {
                    printf("FAIL int8 isa=%s m=%lld k=%lld n=%lld wkind=%d thr=%d at %lld: %d != %d\n",
                           td_isa_name(isa), (long long)m, (long long)k, (long long)n, wkind, threads, (long long)i,
                           acc[i], acc_ref[i]);
                    failures++;
                    break;
                }
            /* int8 outputs: the documented two roundings; NaN-prefilled, every output must be written */
            memset(y, 0xff, sizeof(float) * (size_t)(m * n));
            td_gemm_i8(x, m, k, k, w, n, alpha, bias, y, n, threads);
            check_int_outputs("int8", isa, m, k, n, y, acc_ref, scale, alpha, bias);
            /* 10-bit integers: the same two roundings on exact sums */
            memset(y, 0xff, sizeof(float) * (size_t)(m * n));
            if (td_gemm_int(x, m, k, k, w, n, alpha, bias, y, n, threads, 10) != 0) {
                printf("FAIL int10 rc\n");
                failures++;
            }
            check_int_outputs("int10", isa, m, k, n, y, acc10, scale10, alpha, bias);
            /* float32: within float rounding of the sum of |x| */
            memset(y, 0xff, sizeof(float) * (size_t)(m * n));
            td_gemm_f32(x, m, k, k, w, n, alpha, bias, y, n, threads);
            for (int64_t t = 0; t < m; t++)
                for (int64_t r = 0; r < n; r++) {
                    const double want = f_ref[t * n + r] * alpha + bias[r];
                    const double tol = 1e-5 * (f_abs[t] * alpha + fabs(bias[r])) + 1e-30;
                    if (!(fabs(y[t * n + r] - want) <= tol)) {
                        printf("FAIL f32 isa=%s m=%lld k=%lld n=%lld at (%lld,%lld): %g != %g\n", td_isa_name(isa),
                               (long long)m, (long long)k, (long long)n, (long long)t, (long long)r, y[t * n + r],
                               want);
                        failures++;
                        t = m;
                        break;
                    }
                }
        }
    }
    free(q);
    free(w);
    free(x);
    free(bias);
    free(xq);
    free(xq2);
    free(scale);
    free(scale2);
    free(acc_ref);
    free(acc);
    free(f_ref);
    free(f_abs);
    free(y);
    free(xq10);
    free(acc10);
    free(scale10);
}

/* Attention against a naive double-precision reference (scores, max-subtracted softmax, weighted
 * sum of values), on every ISA path and 1 or 2 threads. */
static void check_attention(int64_t b, int64_t t, int64_t h, int64_t hkv, int64_t hd, const int *isas, int nisa) {
    const int64_t nq = b * t * h * hd, nk = b * t * hkv * hd;
    float *q = malloc(sizeof(float) * (size_t)nq), *out = malloc(sizeof(float) * (size_t)nq);
    float *k = malloc(sizeof(float) * (size_t)nk), *v = malloc(sizeof(float) * (size_t)nk);
    double *ref = malloc(sizeof(double) * (size_t)nq), *p = malloc(sizeof(double) * (size_t)t);
    for (int64_t i = 0; i < nq; i++) q[i] = 3.0f * rndf();
    for (int64_t i = 0; i < nk; i++) {
        k[i] = 3.0f * rndf();
        v[i] = rndf();
    }
    const double scale = 1.0 / sqrt((double)hd);
    for (int64_t bb = 0; bb < b; bb++)
        for (int64_t hh = 0; hh < h; hh++)
            for (int64_t i = 0; i < t; i++) {
                const float *qi = q + ((bb * t + i) * h + hh) * hd;
                double mx = -1e300, tot = 0;
                for (int64_t j = 0; j < t; j++) {
                    const float *kj = k + ((bb * t + j) * hkv + hh / (h / hkv)) * hd;
                    double s = 0;
                    for (int64_t d = 0; d < hd; d++) s += (double)qi[d] * kj[d];
                    p[j] = s * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int64_t j = 0; j < t; j++) {
                    p[j] = exp(p[j] - mx);
                    tot += p[j];
                }
                for (int64_t d = 0; d < hd; d++) {
                    double o = 0;
                    for (int64_t j = 0; j < t; j++) o += p[j] * v[((bb * t + j) * hkv + hh / (h / hkv)) * hd + d];
                    ref[((bb * t + i) * h + hh) * hd + d] = o / tot;
                }
            }
    for (int ii = 0; ii < nisa; ii++) {
        if (td_set_isa(isas[ii]) != 0) continue;
        for (int threads = 1; threads <= 2; threads++) {
            memset(out, 0xff, sizeof(float) * (size_t)nq); /* NaN: every output must be written */
            if (td_attention(q, k, v, out, b, t, h, hkv, hd, threads) != 0) {
                printf("FAIL attention rc\n");
                failures++;
            }
            for (int64_t i = 0; i < nq; i++)
                if (!(fabs(out[i] - ref[i]) <= 2e-5)) {
                    printf("FAIL attention isa=%s b=%lld t=%lld h=%lld hkv=%lld hd=%lld thr=%d at %lld: %g != %g\n",
                           td_isa_name(isas[ii]), (long long)b, (long long)t, (long long)h, (long long)hkv,
                           (long long)hd, threads, (long long)i, out[i], ref[i]);
                    failures++;
                    break;
                }
        }
    }
    /* int8 attention: within 2% relative L2 of the reference on these small random shapes (1% on the
     * model's shapes, tests/test_kernels.py), and the scalar path's bits on every path and thread count */
    float *first = malloc(sizeof(float) * (size_t)nq);
    int have_first = 0;
    for (int ii = 0; ii < nisa; ii++) {
        if (td_set_isa(isas[ii]) != 0) continue;
        for (int threads = 1; threads <= 2; threads++) {
            memset(out, 0xff, sizeof(float) * (size_t)nq);
            if (td_attention_int8(q, k, v, out, b, t, h, hkv, hd, threads) != 0) {
                printf("FAIL attention int8 rc\n");
                failures++;
            }
            double num = 0, den = 0;
            for (int64_t i = 0; i < nq; i++) {
                num += (out[i] - ref[i]) * (out[i] - ref[i]);
                den += ref[i] * ref[i];
            }
            if (!(sqrt(num) <= 0.02 * sqrt(den) + 1e-6)) {
                printf("FAIL attention int8 isa=%s b=%lld t=%lld h=%lld hkv=%lld hd=%lld thr=%d: rel L2 %g\n",
                       td_isa_name(isas[ii]), (long long)b, (long long)t, (long long)h, (long long)hkv, (long long)hd,
                       threads, sqrt(num / (den + 1e-300)));
                failures++;
            }
            if (!have_first) {
                memcpy(first, out, sizeof(float) * (size_t)nq);
                have_first = 1;
            } else if (memcmp(first, out, sizeof(float) * (size_t)nq) != 0) {
                printf("FAIL attention int8 isa=%s thr=%d t=%lld hd=%lld: bits differ from the first path\n",
                       td_isa_name(isas[ii]), threads, (long long)t, (long long)hd);
                failures++;
            }
        }
    }
    free(first);
    if (td_attention_int8(q, k, v, out, b, t, 3, 2, hd, 1) != TD_EINVAL) {
        printf("FAIL attention int8 hkv check\n");
        failures++;
    }
    if (td_attention(q, k, v, out, b, t, 3, 2, hd, 1) != TD_EINVAL) {
        printf("FAIL attention hkv check\n");
        failures++;
    }
    free(q);
    free(out);
    free(k);
    free(v);
    free(ref);
    free(p);
}

static uint64_t fnv1a(uint64_t f, const void *data, size_t bytes) {
    const unsigned char *p = (const unsigned char *)data;
    for (size_t i = 0; i < bytes; i++) f = (f ^ p[i]) * 1099511628211ull;
    return f;
}

/* The attention of the SIMD paths (AVX2, AVX-512, NEON) does the same float operations in the same
 * order, so its output bits must not depend on the ISA or the architecture: print a hash of the
 * output of a fixed input per SIMD path (T = 43: the last 43 % 8 scores go through td_expf_poly, the
 * vector exp's scalar twin); .ci/neon.sh compares the hashes of the x86-64 and the aarch64 runs. 1 and
 * 2 threads must give the same bits. */
static void attention_fingerprint(const int *isas, int nisa) {
    const int64_t b = 2, t = 43, h = 4, hkv = 2, hd = 24, nq = b * t * h * hd, nk = b * t * hkv * hd;
    float *q = malloc(sizeof(float) * (size_t)nq), *out = malloc(sizeof(float) * (size_t)nq);
    float *k = malloc(sizeof(float) * (size_t)nk), *v = malloc(sizeof(float) * (size_t)nk);
    uint32_t x = 12345;
    float *arrays[3] = {q, k, v};
    const int64_t sizes[3] = {nq, nk, nk};
    for (int a = 0; a < 3; a++)
        for (int64_t i = 0; i < sizes[a]; i++) arrays[a][i] = lcg_unit(&x) * 6.0f;
    for (int ii = 0; ii < nisa; ii++) {
        if (isas[ii] == TD_ISA_SCALAR || td_set_isa(isas[ii]) != 0) continue;
        uint64_t hash[2];
        for (int threads = 1; threads <= 2; threads++) {
            td_attention(q, k, v, out, b, t, h, hkv, hd, threads);
            hash[threads - 1] = fnv1a(1469598103934665603ull, out, sizeof(float) * (size_t)nq);
        }
        if (hash[0] != hash[1]) {
            printf("FAIL attention isa=%s: 1 and 2 threads give different bits\n", td_isa_name(isas[ii]));
            failures++;
        }
        printf("attention fingerprint %s %016llx\n", td_isa_name(isas[ii]), (unsigned long long)hash[0]);
    }
    /* int8 attention: exact integer sums and one fixed float order, so every path, scalar included.
     * One hash over awkward shapes: T not a multiple of 16 (the key panels), 4 (the NEON softmax) or
     * 64 (the P V key blocks), head dims that are not multiples of 16 or 32 (channel panels) and
     * odd ones (hd 5, 37: quads padded with zeros). */
    static const int64_t shapes8[][5] = {
        /* b, t, h, hkv, hd */
        {2, 43, 4, 2, 24},  {1, 77, 2, 1, 32}, {1, 50, 3, 3, 48}, {2, 33, 2, 1, 72}, {1, 130, 2, 2, 96},
        {1, 67, 2, 1, 128}, {1, 21, 1, 1, 5},  {1, 97, 4, 2, 37}, {1, 7, 2, 1, 64},
    };
    for (int ii = 0; ii < nisa; ii++) {
        if (td_set_isa(isas[ii]) != 0) continue;
        uint64_t hash[2];
        for (int threads = 1; threads <= 2; threads++) {
            uint64_t f = 1469598103934665603ull;
            for (int sh = 0; sh < (int)(sizeof shapes8 / sizeof shapes8[0]); sh++) {
                const int64_t b8 = shapes8[sh][0], t8 = shapes8[sh][1], h8 = shapes8[sh][2], hkv8 = shapes8[sh][3];
                const int64_t hd8 = shapes8[sh][4], n8 = b8 * t8 * h8 * hd8;
                float *q8 = malloc(sizeof(float) * (size_t)n8), *o8 = malloc(sizeof(float) * (size_t)n8);
                float *k8 = malloc(sizeof(float) * (size_t)(b8 * t8 * hkv8 * hd8));
                float *v8 = malloc(sizeof(float) * (size_t)(b8 * t8 * hkv8 * hd8));
                float *arr8[3] = {q8, k8, v8};
                const int64_t sz8[3] = {n8, b8 * t8 * hkv8 * hd8, b8 * t8 * hkv8 * hd8};
                uint32_t y = 777u + (uint32_t)sh;
                for (int a = 0; a < 3; a++)
                    for (int64_t i = 0; i < sz8[a]; i++)
                        arr8[a][i] = lcg_unit(&y) * (a == 1 ? 6.0f : 3.0f) + (a == 1 ? 0.5f : 0.0f);
                if (td_attention_int8(q8, k8, v8, o8, b8, t8, h8, hkv8, hd8, threads) != TD_OK) {
                    printf("FAIL attention int8 rc (fingerprint)\n");
                    failures++;
                }
                f = fnv1a(f, o8, sizeof(float) * (size_t)n8);
                free(q8);
                free(k8);
                free(v8);
                free(o8);
            }
            hash[threads - 1] = f;
        }
        if (hash[0] != hash[1]) {
            printf("FAIL attention int8 isa=%s: 1 and 2 threads give different bits\n", td_isa_name(isas[ii]));
            failures++;
        }
        printf("attention-int8 fingerprint %s %016llx\n", td_isa_name(isas[ii]), (unsigned long long)hash[0]);
    }
    free(q);
    free(k);
    free(v);
    free(out);
}

/* The other float kernels of the sampling path promise one result on every path, the portable scalar
 * one included (docs/reproducibility.md): the fp32 ternary GEMM at every M (always the table order),
 * SwiGLU (td_expf_poly lane by lane, tails included) and the dense layer. One hash per path, with 1
 * and 2 threads; .ci/neon.sh requires a single value over every path of both architectures. */
static void float_fingerprint(const int *isas, int nisa) {
    const int64_t k = 300, n = 37, kb = (k + 127) / 128 * 32, cnt = 1003, dk = 37, dn = 21;
    static const int64_t ms[] = {1, 3, 8, 21};
    float *x = malloc(sizeof(float) * 21 * (size_t)k), *bias = malloc(sizeof(float) * (size_t)n);
    float *y = malloc(sizeof(float) * 21 * (size_t)n), *w = malloc(sizeof(float) * (size_t)(dn * dk));
    float *a = malloc(sizeof(float) * (size_t)cnt), *bb = malloc(sizeof(float) * (size_t)cnt);
    float *o = malloc(sizeof(float) * (size_t)cnt);
    uint8_t *packed = malloc((size_t)(n * kb));
    uint32_t s = 777;
#define NEXT() lcg_unit(&s)
    for (int64_t i = 0; i < 21 * k; i++) x[i] = NEXT() * 4.0f;
    for (int64_t i = 0; i < n; i++) bias[i] = NEXT();
    for (int64_t i = 0; i < dn * dk; i++) w[i] = NEXT();
    for (int64_t i = 0; i < cnt; i++) {
        a[i] = NEXT() * 60.0f; /* past the clamps at -87 / 88 of exp(-a) too */
        bb[i] = NEXT();
    }
    int8_t *q = malloc((size_t)(n * k));
    for (int64_t i = 0; i < n * k; i++) q[i] = (int8_t)((s = s * 1664525u + 1013904223u, s >> 24) % 3) - 1;
    pack(q, n, k, packed);
    free(q);
#undef NEXT
    for (int ii = 0; ii < nisa; ii++) {
        if (td_set_isa(isas[ii]) != 0) continue;
        uint64_t hash[2];
        for (int threads = 1; threads <= 2; threads++) {
            uint64_t f = 1469598103934665603ull;
            for (int mi = 0; mi < 4; mi++) {
                td_gemm_f32(x, ms[mi], k, k, packed, n, 0.37f, bias, y, n, threads);
                f = fnv1a(f, y, sizeof(float) * (size_t)(ms[mi] * n));
            }
            td_swiglu(a, bb, o, cnt, threads);
            f = fnv1a(f, o, sizeof(float) * (size_t)cnt);
            td_dense_f32(x, 3, dk, w, dn, bias, y, threads);
            hash[threads - 1] = fnv1a(f, y, sizeof(float) * 3 * (size_t)dn);
        }
        if (hash[0] != hash[1]) {
            printf("FAIL float kernels isa=%s: 1 and 2 threads give different bits\n", td_isa_name(isas[ii]));
            failures++;
        }
        printf("float fingerprint %s %016llx\n", td_isa_name(isas[ii]), (unsigned long long)hash[0]);
    }
    free(x);
    free(bias);
    free(y);
    free(w);
    free(a);
    free(bb);
    free(o);
    free(packed);
}

int main(int argc, char **argv) {
    int isas[TD_ISA_COUNT], nisa = 0;
    const int best = td_best_isa();
    const int only_scalar = argc > 1 && strcmp(argv[1], "scalar") == 0;
    for (int i = 0; i < TD_ISA_COUNT; i++) {
        if (i != TD_ISA_SCALAR && only_scalar) continue;
        if (td_isa_supported(i)) isas[nisa++] = i;
        else printf("isa %s: skipped (not supported by this CPU or build)\n", td_isa_name(i));
    }
    td_set_force_parallel(1); /* the 2-thread runs below must really split the work */
    printf("cpu flags 0x%x, best isa %s, testing:", td_cpu_flags(), td_isa_name(best));
    for (int i = 0; i < nisa; i++) printf(" %s", td_isa_name(isas[i]));
    printf("\n");
    if (td_set_isa(TD_ISA_COUNT) == 0 || td_set_isa(-1) == 0) {
        printf("FAIL bad isa id accepted\n");
        failures++;
    }
    static const int64_t shapes[][3] = {
        {1, 1, 1},
        {1, 33, 7},
        {2, 127, 31},
        {3, 129, 5},
        {4, 300, 17},
        {7, 256, 9},
        {8, 128, 64},
        {9, 1000, 33},
        {16, 260, 70},
        {17, 513, 31},
        {33, 4100, 3},
        {40, 384, 130},
        {2, 8200, 4},
        /* every M from 1 to 17 on K and N tails (the AVX-512 GEMV / 16- and 32-token tiles, 8-row
         * panels), and token blocks past 32 */
        {5, 200, 13},
        {6, 129, 9},
        {8, 131, 17},
        {10, 250, 11},
        {11, 383, 8},
        {12, 140, 23},
        {13, 257, 15},
        {14, 100, 7},
        {15, 385, 25},
        {31, 300, 9},
        {32, 129, 16},
        {47, 520, 19},
        {65, 700, 41},
    };
    const int nshape = (int)(sizeof shapes / sizeof shapes[0]);
    for (int s = 0; s < nshape; s++)
        for (int wkind = 0; wkind < 4; wkind++) {
            if (wkind && s % 3) continue; /* constant weights on a few shapes */
            check_shape(shapes[s][0], shapes[s][1], shapes[s][2], wkind, isas, nisa);
        }
    static const int64_t att_shapes[][5] = {
        /* b, t, h, hkv, hd */
        {1, 1, 1, 1, 16},  {2, 7, 4, 2, 48},  {1, 13, 6, 3, 64},  {2, 40, 3, 1, 5},   {1, 70, 2, 2, 33},
        {1, 24, 2, 1, 37}, {2, 48, 2, 2, 96}, {1, 200, 2, 1, 72}, {1, 67, 2, 1, 128}, {1, 131, 2, 1, 32},
    };
    for (int s = 0; s < (int)(sizeof att_shapes / sizeof att_shapes[0]); s++)
        check_attention(att_shapes[s][0], att_shapes[s][1], att_shapes[s][2], att_shapes[s][3], att_shapes[s][4], isas,
                        nisa);
    attention_fingerprint(isas, nisa);
    float_fingerprint(isas, nisa);
    if (failures) {
        printf("%d FAILURES\n", failures);
        return 1;
    }
    printf("all kernel checks passed\n");
    return 0;
}
