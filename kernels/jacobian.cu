// jacobian.cu -- per-sample Jacobian rows of a dense layer (cupynn/jacobian.py).
//
// For a sample b, an output o (row r = b*m + o of the Jacobian) and a layer with input
// blocks h (k wide) and pre-activation cotangents dz (n wide), the layer's columns of the
// row are the outer products, summed over the nb blocks of a forward-Laplacian stack
// (nb = 1 for the model's own outputs), then the bias columns:
//
//   out[r, col + i*k + j] = sum_{s = 0 .. nb-1} dz[s, b, o, i] * h[s, b, j]
//   out[r, col + n*k + i] = dz[0, b, o, i]                      (has_b)
//
// Host side: cupynn/backends/cuda_jacobian.py; reference: Backend.jacobian_rows in
// cupynn/backends/base.py (NumPy). The Gramian J^T J of the rows goes through the dense
// kernels' weight-gradient GEMM (kernels/gemm.cuh), chunk by chunk, in a fixed order.
#include "common.cuh"

namespace cupynn {

constexpr int JAC_THREADS = 256;  // cupynn/backends/cuda_launch.py THREADS

// One layer's columns of a chunk of Jacobian rows.
//   dz  (nb, B, m, n) C-contiguous: d(row value)/d(pre-activation block s) per sample, output
//   h   (nb, B, k)    C-contiguous: the layer's input blocks per sample
//   out (B*m, ld)     C-contiguous: columns [col, col + n*k + has_b*n) of every row written
// A thread owns one element (r, c) of the R x W block written (R = B*m, W = n*k + has_b*n);
// consecutive threads take consecutive columns, so the writes of a warp are contiguous and
// its reads of h are too. The sum over s runs in order 0 .. nb-1 (no atomics). 64-bit
// offsets throughout: R * ld passes 2^31 for the seed network at batch 100,000.
template <typename T>
__global__ void __launch_bounds__(JAC_THREADS)
jacobian_rows(const T* __restrict__ dz, const T* __restrict__ h, int nb, i64 B, i64 m, i64 n,
              i64 k, int has_b, i64 ld, i64 col, T* __restrict__ out) {
    const i64 W = n * k + (has_b ? n : 0);
    const i64 R = B * m;
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= R * W) return;
    const i64 r = e / W;
    const i64 c = e - r * W;
    const i64 b = r / m;
    const i64 o = r - b * m;
    const i64 dz_block = B * m * n;  // elements per block s of dz
    const i64 h_block = B * k;       // elements per block s of h
    T v;
    if (c < n * k) {
        const i64 i = c / k;
        const i64 j = c - i * k;
        const i64 dz0 = (b * m + o) * n + i;
        const i64 h0 = b * k + j;
        v = T(0);
        for (int s = 0; s < nb; ++s) v = m_fma(dz[s * dz_block + dz0], h[s * h_block + h0], v);
    } else {
        v = dz[(b * m + o) * n + (c - n * k)];
    }
    out[r * ld + col + c] = v;
}

}  // namespace cupynn
