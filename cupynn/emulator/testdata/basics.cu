// basics.cu -- small kernels exercising every built-in of the kernel dialect on the emulator.
#include "common.cuh"

template <typename T>
__global__ void axpy(T alpha, const T* __restrict__ x, T* __restrict__ y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = alpha * x[i] + y[i];
}

// One block per row: sum of x[row, :] through shared memory, __syncthreads and shuffles.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) row_sum(const T* __restrict__ x, T* __restrict__ out,
                                                 int ncols) {
    __shared__ T partial[BLOCK / 32];
    const int row = blockIdx.x;
    T acc = T(0);
    for (int c = threadIdx.x; c < ncols; c += BLOCK) acc += x[(long long)row * ncols + c];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        T v = threadIdx.x < BLOCK / 32 ? partial[threadIdx.x] : T(0);
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (threadIdx.x == 0) out[row] = v;
    }
}

// Dynamic shared memory: reverse each block's chunk of x.
extern "C" __global__ void reverse_chunks(const float* __restrict__ x, float* __restrict__ y,
                                          int n) {
    CUPYNN_DYNAMIC_SHARED(float, buf);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    buf[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
    if (j < n) y[j] = buf[threadIdx.x];
}

// Votes, shuffle variants with width, 2-D/3-D indices and the bit casts.
extern "C" __global__ void warp_ops(const int* __restrict__ x, unsigned* __restrict__ ballot,
                                    int* __restrict__ any_all, int* __restrict__ up,
                                    int* __restrict__ idx8, long long* __restrict__ ll,
                                    float* __restrict__ casts) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int lane = t & 31, w = t >> 5;
    const int v = x[t];
    const unsigned b = __ballot_sync(0xffffffffu, v > 0);
    if (lane == 0) {
        ballot[w] = b;
    }
    const int any = __any_sync(0xffffffffu, v > 100);
    const int all = __all_sync(0xffffffffu, v > -100);
    if (lane == 0) { any_all[2 * w] = any; any_all[2 * w + 1] = all; }
    up[t] = __shfl_up_sync(0xffffffffu, v, 3, 16);
    idx8[t] = __shfl_sync(0xffffffffu, v, 5, 8);
    ll[t] = __shfl_xor_sync(0xffffffffu, (long long)v << 33, 1);
    __syncwarp();
    casts[t] = __int_as_float(__float_as_int((float)v)) + __uint_as_float(__float_as_uint(0.5f)) +
               (float)__longlong_as_double(__double_as_longlong((double)lane));
}

// A kernel whose warp-0 lanes leave before a shuffle that names them: an emulator error.
extern "C" __global__ void bad_shuffle(int* __restrict__ out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

// Lane 0 waits in a shuffle for lane 1, which waits at __syncthreads for lane 0: a deadlock
// (a hang or undefined behaviour on the GPU).
extern "C" __global__ void deadlock(int* __restrict__ out) {
    if (threadIdx.x == 0) {
        out[0] = __shfl_sync(0x3u, 1, 1);
    } else {
        __syncthreads();
    }
}
