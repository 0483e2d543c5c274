// emulator_bugs.cu -- one planted GPU bug per emulator capability (tests/test_emulator_capabilities.py).
// Each kernel takes a flag that selects the correct version (bug = 0) or the bug (bug = 1).
#include "cp_async.cuh"
#include "mma.cuh"

using namespace cupynn;

// Schedules.  x -> tile -> y[t] = tile[t] + tile[t - 1]: the barrier between the write and the
// read is missing with bug = 1.  The default order runs thread t - 1 before thread t, so it
// hides the bug; reversed / random orders read tile[t - 1] before it is written (NaN).
// A block owns blockDim.x elements.
extern "C" __global__ void left_neighbour(const float* __restrict__ x, float* __restrict__ y, int bug) {
    __shared__ float tile[256];
    const int t = threadIdx.x;
    const long long i = (long long)blockIdx.x * blockDim.x + t;
    tile[t] = x[i];
    if (!bug) __syncthreads();
    y[i] = tile[t] + (t > 0 ? tile[t - 1] : 0.0f);
}

// Block order.  Block b > 0 reads the value block b - 1 wrote (a race between blocks: nothing
// orders blocks on the GPU).  bug = 0 reads its own input instead.  Ascending block order
// hides the race; reversed / random orders expose it.  One thread per block.
extern "C" __global__ void chain_blocks(const double* __restrict__ x, double* __restrict__ y, int bug) {
    const int b = blockIdx.x;
    const double prev = b == 0 ? 0.0 : (bug ? y[b - 1] - x[b - 1] : 0.0);
    y[b] = x[b] + prev;
}

// Poisoned static shared memory: block 0 fills tile[], every block reads it.  bug = 1: blocks
// other than 0 read a tile they never wrote (the previous block's values, on the old emulator).
extern "C" __global__ void stale_shared(const double* __restrict__ x, double* __restrict__ y, int bug) {
    __shared__ double tile[64];
    const int t = threadIdx.x;
    if (!bug || blockIdx.x == 0) tile[t] = x[t];
    __syncthreads();
    y[blockIdx.x * 64 + t] = tile[63 - t];
}

// Guarded arrays: y[i] = x[i + shift] for i < n (shift = 1 reads one element past x), and
// y[i + wshift] = 1 (wshift = n: one past the end of y; a large wshift: far past it).
extern "C" __global__ void overrun(const double* __restrict__ x, double* __restrict__ y, int n, int shift,
                                   long long wshift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + shift];
    if (wshift && i == 0) y[wshift] = 1.0;
}

// cp.async.  Two commit groups of blockDim.x floats each: group 0 <- x[0:n], group 1 <-
// x[n:2n].  mode 0: wait_all; 1: no wait at all; 2: wait_group 1, then read group 0 only
// (correct: one group may stay in flight); 3: wait_group 1, then read group 1 (wrong); 4: no
// commit before wait_group 0 (the copies are in no group: not waited for).
extern "C" __global__ void cp_async_groups(const float* __restrict__ x, float* __restrict__ y, int mode) {
    __shared__ float buf[2 * 128];
    const int t = threadIdx.x, n = blockDim.x;
    cp_async_elem(&buf[t], &x[t], true);
    if (mode != 4) cp_async_commit();
    cp_async_elem(&buf[n + t], &x[n + t], true);
    if (mode != 4) cp_async_commit();
    if (mode == 0) cp_async_wait_all();
    if (mode == 2 || mode == 3) cp_async_wait<1>();
    if (mode == 4) cp_async_wait<0>();
    __syncthreads();
    const float a = buf[(t + 1) % n];           // group 0, written by another thread
    const float b = buf[n + (t + 1) % n];       // group 1
    y[t] = mode == 2 ? a : a + b;
}

// PTX text: the m8n8k4 wrapper of mma.cuh with its operand list written three ways.
//   variant 0: as mma.cuh has it; 1: A and B swapped in the operand list (compiles under
//   NVRTC, computes B^T-ish products); 2: C passed with the "r" constraint; 3: one operand
//   missing from the text.
template <int V>
__device__ __forceinline__ void mma_variant(double (&d)[2], double a, double b, const double (&c)[2]) {
    if constexpr (V == 0) {
        CUPYNN_PTX("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %5};\n",
                   (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1])),
                   (CUPYNN_IN(d, a), CUPYNN_IN(d, b), CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1])));
    } else if constexpr (V == 1) {
        CUPYNN_PTX("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %5};\n",
                   (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1])),
                   (CUPYNN_IN(d, b), CUPYNN_IN(d, a), CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1])));
    } else if constexpr (V == 2) {
        const long long c1 = (long long)c[1];
        CUPYNN_PTX("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %5};\n",
                   (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1])),
                   (CUPYNN_IN(d, a), CUPYNN_IN(d, b), CUPYNN_IN(d, c[0]), CUPYNN_IN(l, c1)));
    } else {
        CUPYNN_PTX("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %4};\n",
                   (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1])),
                   (CUPYNN_IN(d, a), CUPYNN_IN(d, b), CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1])));
    }
}

// D = A B + C for one 8x8x4 tile (A row-major 8x4, B 4x8, C/D 8x8), one warp.
template <int V>
__global__ void mma_wrapper(const double* __restrict__ A, const double* __restrict__ B,
                            const double* __restrict__ C, double* __restrict__ D) {
    const int lane = threadIdx.x & 31;
    const double a = A[mma_f64_a_row(lane) * 4 + mma_f64_a_col(lane)];
    const double b = B[mma_f64_b_row(lane) * 8 + mma_f64_b_col(lane)];
    double c[2], d[2];
    for (int i = 0; i < 2; ++i) c[i] = C[mma_f64_c_row(lane, i) * 8 + mma_f64_c_col(lane, i)];
    mma_variant<V>(d, a, b, c);
    for (int i = 0; i < 2; ++i) D[mma_f64_c_row(lane, i) * 8 + mma_f64_c_col(lane, i)] = d[i];
}

// No ordering from collectives: lanes write buf[], run an mma (which synchronises nothing on
// the GPU), then read another lane's slot.  sync = 0 leaves out the __syncwarp: a race that
// ThreadSanitizer must report.
extern "C" __global__ void exchange_across_mma(const double* __restrict__ x, double* __restrict__ y, int sync) {
    __shared__ double buf[32];
    const int lane = threadIdx.x & 31;
    buf[lane] = x[lane];
    double d[2];
    const double c[2] = {0.0, 0.0};
    mma_m8n8k4_f64(d, x[lane], x[31 - lane], c);
    if (sync) __syncwarp();
    y[lane] = buf[31 - lane] + 0.0 * d[0];
}
