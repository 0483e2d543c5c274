// common.cuh -- types, shared-memory macro and small helpers for cupynn kernels.
//
// Compiled by NVRTC (-std=c++17, -I<kernels dir>) on the GPU, and by g++ with
// -DCUPYNN_EMULATE and the emulator's header force-included on the CPU.  Only the
// kernel dialect of kernels/README.md is used here.
#pragma once

#ifndef CUPYNN_EMULATE
// Dynamic shared memory: one byte array shared by every instantiation (declaring
// `extern __shared__ T name[]` with different T in one module is an error).
#define CUPYNN_DYNAMIC_SHARED(T, name)                                   \
    extern __shared__ __align__(16) unsigned char cupynn_dynamic_smem_[]; \
    T* name = reinterpret_cast<T*>(cupynn_dynamic_smem_)
#endif

namespace cupynn {

typedef long long i64;  // 64-bit offsets: batch x width passes 2^31 at batch 1M

// Math modes of the GEMM main loop (kept in sync with _MATH in cuda_backend.py).
enum : int { MATH_FMA = 0, MATH_DMMA = 1, MATH_TF32 = 2, MATH_3XTF32 = 3 };

// Loss kinds fused into the last layer (sum_squares and mse differ only by the
// host-side scale, so one flag suffices).
enum : int { LOSS_NONE = 0, LOSS_SQUARES = 1 };

template <typename T> __device__ __forceinline__ T ceil_div(T a, T b) { return (a + b - 1) / b; }

// Type-generic wrappers over the float/double math functions of the dialect.
__device__ __forceinline__ float  m_exp(float x)    { return expf(x); }
__device__ __forceinline__ double m_exp(double x)   { return exp(x); }
__device__ __forceinline__ float  m_expm1(float x)  { return expm1f(x); }
__device__ __forceinline__ double m_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float  m_log1p(float x)  { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float  m_tanh(float x)   { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x)  { return tanh(x); }
__device__ __forceinline__ float  m_erf(float x)    { return erff(x); }
__device__ __forceinline__ double m_erf(double x)   { return erf(x); }
__device__ __forceinline__ float  m_fabs(float x)   { return fabsf(x); }
__device__ __forceinline__ double m_fabs(double x)  { return fabs(x); }
__device__ __forceinline__ float  m_fma(float a, float b, float c)    { return fmaf(a, b, c); }
__device__ __forceinline__ double m_fma(double a, double b, double c) { return fma(a, b, c); }

}  // namespace cupynn
