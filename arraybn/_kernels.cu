// Per-channel arithmetic of arraybn's forward, one CUDA kernel for all of it.
//
// A training call works on per-channel vectors (length P, the number of
// channels) between its passes over the input: it finishes the statistics
// (mean = sum / n, variance = sum of squares / n), forms the output's
// multiply-add coefficients (scale, shift) and the new moving statistics. As
// separate Array API operations these are about a dozen tiny kernel launches,
// each costing more host time on a GPU than the whole pass over the input.
// Here they are one launch, with every operation rounded as the separate
// operation it stands for (__f*_rn / __d*_rn: round to nearest, no contraction
// to fused multiply-adds), so the results are bit-identical to the Array API
// code in arraybn/_functional.py:
//
//   fused rule (the FusedBatchNormV3 kernel, float32):
//     scale = gamma / sqrt(variance + epsilon)
//     shift = beta - mean * scale
//     moving_mean     = keep * moving_mean     + mean_factor * mean
//     moving_variance = keep * moving_variance + variance_factor * variance
//   non-fused rule (tf.nn.batch_normalization, _assign_moving_average):
//     scale = (1 / sqrt(variance + epsilon)) * gamma
//     shift = beta - mean * scale          (-mean * scale without beta)
//     moving = moving - (moving - batch) * decay
//
// A missing gamma is 1 and a missing beta 0 in the fused rule, as the fused
// kernel's defaults; the non-fused rule skips the operation, as
// tf.nn.batch_normalization does. mean = mean_sum / count and variance =
// var_sum / count: count is n for raw sums and 1 for statistics already divided
// (x / 1 is x exactly).
//
// The same source builds for the host with a C++ compiler (the section below):
// arraybn's tests run the kernels there, one thread doing every element, and
// compare them bit for bit with the Array API code on NumPy.

#if !defined(__CUDACC__) && !defined(__HIPCC__) && !defined(__HIPCC_RTC__)
#include <cmath>
#define __device__
#define __global__
#define __forceinline__ inline
struct arraybn_dim { unsigned int x; };
static const arraybn_dim threadIdx = {0}, blockIdx = {0}, blockDim = {1}, gridDim = {1};
// IEEE single and double operations of the host's SSE unit (compiled without contraction)
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return std::sqrt(a); }
#endif

#define ARRAYBN_HAS_GAMMA 1
#define ARRAYBN_HAS_BETA 2
#define ARRAYBN_UPDATE 4

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

template <typename T>
__device__ __forceinline__ void fused_coefficients(
    long long i, int flags, const T* mean_sum, const T* var_sum, T count, const T* gamma, const T* beta,
    const T* moving_mean, const T* moving_variance, T epsilon, T keep, T mean_factor, T variance_factor,
    T* scale, T* shift, T* new_mean, T* new_variance) {
    const T mean = div_rn(mean_sum[i], count);
    const T variance = div_rn(var_sum[i], count);
    const T g = (flags & ARRAYBN_HAS_GAMMA) ? gamma[i] : T(1);
    const T b = (flags & ARRAYBN_HAS_BETA) ? beta[i] : T(0);
    const T s = div_rn(g, sqrt_rn(add_rn(variance, epsilon)));
    scale[i] = s;
    shift[i] = sub_rn(b, mul_rn(mean, s));
    if (flags & ARRAYBN_UPDATE) {
        new_mean[i] = add_rn(mul_rn(keep, moving_mean[i]), mul_rn(mean_factor, mean));
        new_variance[i] = add_rn(mul_rn(keep, moving_variance[i]), mul_rn(variance_factor, variance));
    }
}

template <typename T>
__device__ __forceinline__ void coefficients(
    long long i, int flags, const T* mean_sum, const T* var_sum, T count, const T* gamma, const T* beta,
    const T* moving_mean, const T* moving_variance, T epsilon, T decay,
    T* scale, T* shift, T* new_mean, T* new_variance) {
    const T mean = div_rn(mean_sum[i], count);
    const T variance = div_rn(var_sum[i], count);
    T s = div_rn(T(1), sqrt_rn(add_rn(variance, epsilon)));
    if (flags & ARRAYBN_HAS_GAMMA) s = mul_rn(s, gamma[i]);
    scale[i] = s;
    shift[i] = (flags & ARRAYBN_HAS_BETA) ? sub_rn(beta[i], mul_rn(mean, s)) : mul_rn(-mean, s);
    if (flags & ARRAYBN_UPDATE) {
        new_mean[i] = sub_rn(moving_mean[i], mul_rn(sub_rn(moving_mean[i], mean), decay));
        new_variance[i] = sub_rn(moving_variance[i], mul_rn(sub_rn(moving_variance[i], variance), decay));
    }
}

#define ARRAYBN_KERNELS(T, SUFFIX)                                                                          \
    extern "C" __global__ void arraybn_fused_coefficients_##SUFFIX(                                          \
        long long p, int flags, const T* mean_sum, const T* var_sum, T count, const T* gamma, const T* beta, \
        const T* moving_mean, const T* moving_variance, T epsilon, T keep, T mean_factor, T variance_factor, \
        T* scale, T* shift, T* new_mean, T* new_variance) {                                                 \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p;                         \
             i += (long long)blockDim.x * gridDim.x) {                                                      \
            fused_coefficients<T>(i, flags, mean_sum, var_sum, count, gamma, beta, moving_mean,             \
                                  moving_variance, epsilon, keep, mean_factor, variance_factor, scale,      \
                                  shift, new_mean, new_variance);                                           \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void arraybn_coefficients_##SUFFIX(                                                \
        long long p, int flags, const T* mean_sum, const T* var_sum, T count, const T* gamma, const T* beta, \
        const T* moving_mean, const T* moving_variance, T epsilon, T decay, T* scale, T* shift,             \
        T* new_mean, T* new_variance) {                                                                     \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p;                         \
             i += (long long)blockDim.x * gridDim.x) {                                                      \
            coefficients<T>(i, flags, mean_sum, var_sum, count, gamma, beta, moving_mean, moving_variance,  \
                            epsilon, decay, scale, shift, new_mean, new_variance);                          \
        }                                                                                                   \
    }

ARRAYBN_KERNELS(float, f32)
ARRAYBN_KERNELS(double, f64)
