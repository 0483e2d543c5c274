// spill.cu -- compile-check test kernels: `spills` keeps 64 doubles live; compiled with
// --maxrregcount=32 ptxas must spill them.  `small` does not spill.
extern "C" __global__ void spills(const double* __restrict__ x, double* __restrict__ y, int n) {
    double acc[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = x[(threadIdx.x + j * 37) % n];
    for (int it = 0; it < n; ++it) {
#pragma unroll
        for (int j = 0; j < 64; ++j) acc[j] = acc[j] * acc[(j + 1) & 63] + x[(it + j) % n];
    }
    double s = 0;
#pragma unroll
    for (int j = 0; j < 64; ++j) s += acc[j];
    y[threadIdx.x] = s;
}

extern "C" __global__ void small(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float tile[128];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = tile[127 - threadIdx.x];
}
