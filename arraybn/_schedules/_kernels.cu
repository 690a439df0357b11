// Per-channel arithmetic of arraybn's forward, one CUDA kernel for all of it.
//
// A training call works on per-channel vectors (length P, the number of
// channels) between its passes over the input: it forms the output's
// coefficients (center, scale, shift) and the new moving statistics. As
// separate Array API operations these are about a dozen tiny kernel launches,
// each costing more host time on a GPU than the whole pass over the input.
// Here they are one launch, with every operation rounded as the separate
// operation it stands for (__f*_rn / __d*_rn: round to nearest, no contraction
// to fused multiply-adds), so the results are bit-identical to the Array API
// code of Ops.coefficients in arraybn/_reference.py:
//
//   fused rule (the FusedBatchNormV3 kernel, float32; output (x - center) * scale + shift):
//     center = mean
//     scale  = gamma / sqrt(variance + epsilon)     (in double for float32, rounded once)
//     shift  = beta
//     moving_mean     = keep * moving_mean     + mean_factor * mean
//     moving_variance = keep * moving_variance + variance_factor * variance
//     (exponential_avg_factor 1, the REPLACE flag: mean_factor * mean and
//      variance_factor * variance alone, the old values not read)
//   non-fused rule (tf.nn.batch_normalization, _assign_moving_average; output x * scale + shift):
//     scale = gamma / sqrt(variance + epsilon)    (gamma 1 without one; in double for float32)
//     shift = beta - mean * scale          (-mean * scale without beta)
//     moving = moving - (moving - batch) * decay
//
// The fused rule always has gamma and beta (the caller passes ones and zeros
// where the layer has none, as the fused kernel gets); the non-fused rule
// skips the operation of a missing one, as tf.nn.batch_normalization does.
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
#define ARRAYBN_REPLACE 8

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

// gamma / sqrt(t) rounded once: float32 vectors go through double (Ops.coefficients' inverse_stddev)
__device__ __forceinline__ float inverse_stddev(float t, float gamma) {
    return (float)div_rn((double)gamma, sqrt_rn((double)t));
}
__device__ __forceinline__ double inverse_stddev(double t, double gamma) { return div_rn(gamma, sqrt_rn(t)); }

template <typename T>
__device__ __forceinline__ void fused_coefficients(
    long long i, int flags, const T* means, const T* variances, const T* gamma, const T* beta,
    const T* moving_mean, const T* moving_variance, T epsilon, T keep, T mean_factor, T variance_factor,
    T* center, T* scale, T* shift, T* new_mean, T* new_variance) {
    const T mean = means[i];
    const T variance = variances[i];
    center[i] = mean;
    scale[i] = inverse_stddev(add_rn(variance, epsilon), gamma[i]);
    shift[i] = beta[i];
    if (flags & ARRAYBN_REPLACE) {
        new_mean[i] = mul_rn(mean_factor, mean);
        new_variance[i] = mul_rn(variance_factor, variance);
    } else if (flags & ARRAYBN_UPDATE) {
        new_mean[i] = add_rn(mul_rn(keep, moving_mean[i]), mul_rn(mean_factor, mean));
        new_variance[i] = add_rn(mul_rn(keep, moving_variance[i]), mul_rn(variance_factor, variance));
    }
}

template <typename T>
__device__ __forceinline__ void coefficients(
    long long i, int flags, const T* means, const T* variances, const T* gamma, const T* beta,
    const T* moving_mean, const T* moving_variance, T epsilon, T decay,
    T* scale, T* shift, T* new_mean, T* new_variance) {
    const T mean = means[i];
    const T variance = variances[i];
    const T s = inverse_stddev(add_rn(variance, epsilon), (flags & ARRAYBN_HAS_GAMMA) ? gamma[i] : T(1));
    scale[i] = s;
    shift[i] = (flags & ARRAYBN_HAS_BETA) ? sub_rn(beta[i], mul_rn(mean, s)) : mul_rn(-mean, s);
    if (flags & ARRAYBN_UPDATE) {
        new_mean[i] = sub_rn(moving_mean[i], mul_rn(sub_rn(moving_mean[i], mean), decay));
        new_variance[i] = sub_rn(moving_variance[i], mul_rn(sub_rn(moving_variance[i], variance), decay));
    }
}

#define ARRAYBN_KERNELS(T, SUFFIX)                                                                          \
    extern "C" __global__ void arraybn_fused_coefficients_##SUFFIX(                                          \
        long long p, int flags, const T* means, const T* variances, const T* gamma, const T* beta,           \
        const T* moving_mean, const T* moving_variance, T epsilon, T keep, T mean_factor, T variance_factor, \
        T* center, T* scale, T* shift, T* new_mean, T* new_variance) {                                      \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p;                         \
             i += (long long)blockDim.x * gridDim.x) {                                                      \
            fused_coefficients<T>(i, flags, means, variances, gamma, beta, moving_mean, moving_variance,    \
                                  epsilon, keep, mean_factor, variance_factor, center, scale, shift,        \
                                  new_mean, new_variance);                                                  \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void arraybn_coefficients_##SUFFIX(                                                \
        long long p, int flags, const T* means, const T* variances, const T* gamma, const T* beta,           \
        const T* moving_mean, const T* moving_variance, T epsilon, T decay, T* scale, T* shift,             \
        T* new_mean, T* new_variance) {                                                                     \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p;                         \
             i += (long long)blockDim.x * gridDim.x) {                                                      \
            coefficients<T>(i, flags, means, variances, gamma, beta, moving_mean, moving_variance,          \
                            epsilon, decay, scale, shift, new_mean, new_variance);                          \
        }                                                                                                   \
    }

ARRAYBN_KERNELS(float, f32)
ARRAYBN_KERNELS(double, f64)
