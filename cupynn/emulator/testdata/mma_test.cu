// mma_test.cu -- one warp computes D = A*B + C through the kernels/mma.cuh wrappers.
//
// Runs unchanged on the emulator (EmulatedModule) and on a GPU (cupy.RawModule with
// -I<kernels dir>); tests/test_emulator_mma.py compares both with NumPy.  Each lane loads
// exactly the fragment elements that the layout helpers say it owns, so a wrong layout
// helper or a wrong emulated gather fails the comparison.
#include "mma.cuh"

using namespace cupynn;

// A: 8x4 row-major, B: 4x8 row-major (B[k][n]), C, D: 8x8 row-major.  One warp.
extern "C" __global__ void mma_f64_tile(const double* __restrict__ A, const double* __restrict__ B,
                                        const double* __restrict__ C, double* __restrict__ D) {
    const int lane = threadIdx.x & 31;
    const double a = A[mma_f64_a_row(lane) * 4 + mma_f64_a_col(lane)];
    const double b = B[mma_f64_b_row(lane) * 8 + mma_f64_b_col(lane)];
    double c[2], d[2];
    for (int i = 0; i < 2; ++i) c[i] = C[mma_f64_c_row(lane, i) * 8 + mma_f64_c_col(lane, i)];
    mma_m8n8k4_f64(d, a, b, c);
    for (int i = 0; i < 2; ++i) D[mma_f64_c_row(lane, i) * 8 + mma_f64_c_col(lane, i)] = d[i];
}

// A: 16x8 row-major, B: 8x8 row-major (B[k][n]), C, D: 16x8 row-major.  One warp.
// round_inputs != 0: cvt.rna to tf32 first (the "tf32" mode); 0: pass raw float bits
// (the tensor core then truncates them).
extern "C" __global__ void mma_tf32_tile(const float* __restrict__ A, const float* __restrict__ B,
                                         const float* __restrict__ C, float* __restrict__ D,
                                         int round_inputs) {
    const int lane = threadIdx.x & 31;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) {
        const float x = A[mma_tf32_a_row(lane, i) * 8 + mma_tf32_a_col(lane, i)];
        a[i] = round_inputs ? f32_to_tf32(x) : __float_as_uint(x);
        c[i] = C[mma_tf32_c_row(lane, i) * 8 + mma_tf32_c_col(lane, i)];
    }
    for (int i = 0; i < 2; ++i) {
        const float x = B[mma_tf32_b_row(lane, i) * 8 + mma_tf32_b_col(lane, i)];
        b[i] = round_inputs ? f32_to_tf32(x) : __float_as_uint(x);
    }
    mma_m16n8k8_tf32(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[mma_tf32_c_row(lane, i) * 8 + mma_tf32_c_col(lane, i)] = d[i];
}

// 3xtf32 product of the same tile: Ahi*Bhi + Ahi*Blo + Alo*Bhi (FP32-level accuracy).
extern "C" __global__ void mma_3xtf32_tile(const float* __restrict__ A, const float* __restrict__ B,
                                           const float* __restrict__ C, float* __restrict__ D) {
    const int lane = threadIdx.x & 31;
    unsigned ah[4], al[4], bh[2], bl[2];
    float c[4], d[4], zero[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < 4; ++i) {
        split_tf32(A[mma_tf32_a_row(lane, i) * 8 + mma_tf32_a_col(lane, i)], ah[i], al[i]);
        c[i] = C[mma_tf32_c_row(lane, i) * 8 + mma_tf32_c_col(lane, i)];
    }
    for (int i = 0; i < 2; ++i)
        split_tf32(B[mma_tf32_b_row(lane, i) * 8 + mma_tf32_b_col(lane, i)], bh[i], bl[i]);
    float small[4];
    mma_m16n8k8_tf32(small, al, bh, zero);
    mma_m16n8k8_tf32(small, ah, bl, small);
    mma_m16n8k8_tf32(d, ah, bh, small);
    for (int i = 0; i < 4; ++i) D[mma_tf32_c_row(lane, i) * 8 + mma_tf32_c_col(lane, i)] = d[i] + c[i];
}

// out[i] = bits of cvt.rna.tf32.f32(x[i]), many threads.
extern "C" __global__ void to_tf32(const float* __restrict__ x, unsigned* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_tf32(x[i]);
}

// A: 16xK row-major, B: Kx8 row-major (B[k][n]), C, D: 16x8 row-major; K = 4, 8, 16.  One warp.
// Each lane loads its m16n8-layout elements through the mma_m16n8_* helpers.
template <int K>
__device__ void mma_f64_m16n8(const double* __restrict__ A, const double* __restrict__ B,
                              const double* __restrict__ C, double* __restrict__ D) {
    const int lane = threadIdx.x & 31;
    double a[K / 2], b[K / 4], c[4], d[4];
    for (int v = 0; v < K / 2; ++v) a[v] = A[mma_m16n8_a_row(lane, v) * K + mma_m16n8_a_col(lane, v)];
    for (int v = 0; v < K / 4; ++v) b[v] = B[mma_m16n8_b_row(lane, v) * 8 + mma_m16n8_b_col(lane, v)];
    for (int v = 0; v < 4; ++v) c[v] = C[mma_m16n8_c_row(lane, v) * 8 + mma_m16n8_c_col(lane, v)];
    mma_m16n8_f64<K>(d, a, b, c);
    for (int v = 0; v < 4; ++v) D[mma_m16n8_c_row(lane, v) * 8 + mma_m16n8_c_col(lane, v)] = d[v];
}

extern "C" __global__ void mma_f64_m16n8k16_tile(const double* A, const double* B, const double* C,
                                                 double* D) { mma_f64_m16n8<16>(A, B, C, D); }
extern "C" __global__ void mma_f64_m16n8k8_tile(const double* A, const double* B, const double* C,
                                                double* D) { mma_f64_m16n8<8>(A, B, C, D); }
extern "C" __global__ void mma_f64_m16n8k4_tile(const double* A, const double* B, const double* C,
                                                double* D) { mma_f64_m16n8<4>(A, B, C, D); }

// The tf32 k16 pair in the m16n8 layout (A 16x16, B 16x8 row-major), inputs rounded first.
extern "C" __global__ void mma_tf32_m16n8k16_tile(const float* __restrict__ A,
                                                  const float* __restrict__ B,
                                                  const float* __restrict__ C, float* __restrict__ D) {
    const int lane = threadIdx.x & 31;
    unsigned a[8], b[4];
    float c[4], d[4];
    for (int v = 0; v < 8; ++v) a[v] = f32_to_tf32(A[mma_m16n8_a_row(lane, v) * 16 + mma_m16n8_a_col(lane, v)]);
    for (int v = 0; v < 4; ++v) b[v] = f32_to_tf32(B[mma_m16n8_b_row(lane, v) * 8 + mma_m16n8_b_col(lane, v)]);
    for (int v = 0; v < 4; ++v) c[v] = C[mma_m16n8_c_row(lane, v) * 8 + mma_m16n8_c_col(lane, v)];
    mma_m16n8k16_tf32(d, a, b, c);
    for (int v = 0; v < 4; ++v) D[mma_m16n8_c_row(lane, v) * 8 + mma_m16n8_c_col(lane, v)] = d[v];
}
