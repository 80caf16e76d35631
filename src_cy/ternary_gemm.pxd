# Declarations of the C kernels (src_cy/ternary_gemm.h), cimported by _ternary.pyx.
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t

cdef extern from "ternary_gemm.h" nogil:
    int TD_ISA_SCALAR
    int TD_ISA_AVX2
    int TD_ISA_NEON
    int TD_ISA_NEON_DOT
    int TD_ISA_AVX512
    int TD_ISA_NEON_I8MM
    int TD_ISA_COUNT
    int TD_OK
    int TD_ENOMEM
    int TD_EINVAL
    int TD_CPU_AVX2
    int TD_CPU_FMA
    int TD_CPU_NEON
    int TD_CPU_DOTPROD
    int TD_CPU_AVX512
    int TD_CPU_AVX512_VBMI
    int TD_CPU_I8MM

    int td_cpu_flags()
    int td_best_isa()
    int td_get_isa()
    int td_set_isa(int isa)
    int td_isa_supported(int isa)
    const char *td_isa_name(int isa)
    int td_openmp_enabled()
    int td_max_threads()
    void td_set_force_parallel(int on)

    void td_quantize_rows_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                             int8_t *xq, int64_t ldq, float *scale, int threads)
    int td_gemm_f32(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                    float alpha, const float *bias, float *y, int64_t ldy, int threads)
    int td_gemm_i8(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                   float alpha, const float *bias, float *y, int64_t ldy, int threads)
    void td_quantize_rows_i16(const float *x, int64_t m, int64_t k, int64_t ldx, int16_t *xq,
                              int64_t ldq, float *scale, int lim, int threads)
    int td_gemm_int(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                    float alpha, const float *bias, float *y, int64_t ldy, int threads, int bits)
    int td_gemm_i8_acc(const int8_t *xq, int64_t m, int64_t k, int64_t ldq, const uint8_t *packed,
                       int64_t n, int32_t *acc, int threads)

    void td_rmsnorm_modulate(const float *x, const float *weight, const float *shift, const float *scale,
                             float *out, int64_t rows, int64_t rows_per_group, int64_t d, float eps,
                             int threads)
    void td_layernorm(const float *x, const float *weight, const float *bias, float *out,
                      int64_t rows, int64_t d, float eps, int threads)
    void td_dense_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias,
                      float *y, int threads)
    void td_swiglu(const float *a, const float *b, float *out, int64_t count, int threads)
    void td_add_gated(float *x, const float *gate, const float *y, int64_t rows, int64_t rows_per_group,
                      int64_t d, int threads)
    void td_rope(float *x, const float *cos_t, const float *sin_t, int64_t b, int64_t t, int64_t h,
                 int64_t hd, int threads)
    int td_attention(const float *q, const float *k, const float *v, float *out, int64_t b, int64_t t,
                     int64_t h, int64_t hkv, int64_t hd, int threads)
    int td_attention_int8(const float *q, const float *k, const float *v, float *out, int64_t b, int64_t t,
                          int64_t h, int64_t hkv, int64_t hd, int threads)
    double td_fma_peak(int64_t iters, int threads)
    double td_i8dot_peak(int64_t iters, int threads)
