// planted_bugs.cu -- kernels with one planted bug each, for the sanitizer tests.

// y[i] = 2 x[i] for i < n + overrun: with overrun = 1 the last thread writes one element past
// the end of y (and reads one past x) -- AddressSanitizer must report it.
extern "C" __global__ void scale_overrun(const double* __restrict__ x, double* __restrict__ y,
                                         int n, int overrun) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n + overrun) y[i] = 2.0 * x[i];
}

// Same, reading one element past a dynamic shared-memory buffer of blockDim.x floats.
extern "C" __global__ void smem_overrun(float* __restrict__ y, int overrun) {
    CUPYNN_DYNAMIC_SHARED(float, buf);
    buf[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    y[threadIdx.x] = buf[threadIdx.x + (threadIdx.x == blockDim.x - 1 ? overrun : 0)];
}

// Neighbour sum through shared memory.  With sync = 0 the barrier between the write and the
// read of tile[] is missing -- ThreadSanitizer must report the race.
extern "C" __global__ void neighbour_sum(const float* __restrict__ x, float* __restrict__ y,
                                         int sync) {
    __shared__ float tile[256];
    const int t = threadIdx.x;
    tile[t] = x[blockIdx.x * blockDim.x + t];
    if (sync) __syncthreads();
    const int nb = (t + 1) % blockDim.x;
    y[blockIdx.x * blockDim.x + t] = tile[t] + tile[nb];
}

// Warp-level version: lanes exchange through shared memory; with sync = 0 the __syncwarp is
// missing (a shuffle elsewhere does not order memory) -- also a race.
extern "C" __global__ void warp_exchange(const float* __restrict__ x, float* __restrict__ y,
                                         int sync) {
    __shared__ float buf[32];
    const int lane = threadIdx.x & 31;
    buf[lane] = x[lane];
    if (sync) __syncwarp();
    y[lane] = buf[31 - lane];
}

// Reads shared memory as 16-byte vectors, like the FMA GEMM's fragment loads.  With shift = 1
// the vectors start one float past a 16-byte boundary: the GPU faults ("misaligned address");
// the address mode's alignment check must report it too.
struct __align__(16) Float4 { float v[4]; };
extern "C" __global__ void vector_read(const float* __restrict__ x, float* __restrict__ y,
                                       int shift) {
    __shared__ __align__(16) float tile[4 * 64 + 4];
    const int t = threadIdx.x;
    for (int i = t; i < 4 * 64 + 4; i += blockDim.x) tile[i] = x[i];
    __syncthreads();
    const Float4 v = *reinterpret_cast<const Float4*>(&tile[4 * t + shift]);
    y[t] = v.v[0] + v.v[1] + v.v[2] + v.v[3];
}
