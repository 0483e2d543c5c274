// derivatives.cu -- the elementwise step of the forward Laplacian, and its reverse.
//
// A dense layer carries the stack S = [h; J_1 .. J_d; second-order blocks], nb blocks
// of (B, N), block-major and C-contiguous (block k, row m, column j at k*B*N + m*N + j).
// After the GEMM Z = S @ W.T (cupynn's dense kernels, no bias), with zh = Z_0 + b and
// p, q, r = f', f'', f''' evaluated from y or zh (kernels/activations.cuh act_higher):
//
//   h'   = f(zh)
//   J'_i = p Z_i                                 (i = 1 .. d)
//   mode 0 (order 1):   no further blocks         nb = 1 + d
//   mode 1 (laplacian): L'   = p Z_L + q sum_i Z_i^2          nb = 2 + d
//   mode 2 (diagonal):  D'_i = p Z_{D_i} + q Z_i^2            nb = 1 + 2 d
//
// taylor_backward is the reverse: given G = dloss/dS' it writes dloss/dZ (block 0 is
// also dloss/dzh, whose column sums are the bias gradient):
//   dZ_second = p G_second;  dZ_i = p G_i + 2 q G_sec(i) Z_i  (G_sec(i) = G_L or G_{D_i});
//   dZ_0 = p G_0 + q sum_{k >= 1} G_k Z_k + r sum_i G_sec(i) Z_i^2.
//
// Host side: cupynn/backends/cuda_taylor.py; reference: cupynn/backends/numpy_taylor.py.
// The activation is a runtime argument (one switch per thread, with_activation), so there
// is one instantiation per dtype and direction.
#include "activations.cuh"

namespace cupynn {

constexpr int TAYLOR_THREADS = 256;  // cupynn/backends/cuda_launch.py THREADS

// Forward step of one layer.
//   z (nb, B, N): the GEMM output S @ W.T;  b (N) if has_b;  out (nb, B, N) written.
//   act: activation id; d: input dimension; mode: 0, 1 or 2 as above.
// A thread owns one element e = m*N + j of a (B, N) block, in every block of the stack.
template <typename T>
__global__ void __launch_bounds__(TAYLOR_THREADS)
taylor_forward(const T* __restrict__ z, const T* __restrict__ b, int has_b, int act, int d,
               int mode, i64 B, i64 N, T* __restrict__ out) {
    const i64 BN = B * N;
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= BN) return;
    const T zh = has_b ? z[e] + b[e % N] : z[e];
    T y, p, q, r;
    with_activation(act, [&](auto a) {  // the activation-specific part: y, p, q
        constexpr int A = decltype(a)::id;
        y = act_forward<A>(zh);
        act_higher<A, 2>(act_saved<A>(zh, y), p, q, r);
    });
    out[e] = y;
    T sq = T(0);
    for (int i = 1; i <= d; ++i) {
        const T jz = z[i * BN + e];
        out[i * BN + e] = p * jz;
        if (mode == 2) {
            const i64 k = (i64)(d + i) * BN + e;
            out[k] = p * z[k] + q * (jz * jz);
        } else {
            sq += jz * jz;
        }
    }
    if (mode == 1) {
        const i64 k = (i64)(d + 1) * BN + e;
        out[k] = p * z[k] + q * sq;
    }
}

// Reverse of taylor_forward for one layer.
//   g (nb, B, N): dloss/dout;  z (nb, B, N): the forward's GEMM output;
//   y (B, N): the forward's out block 0 (read for activations differentiated from y);
//   b (N) if has_b;  gz (nb, B, N) written: dloss/dz.
// A thread owns one element e = m*N + j of a (B, N) block, in every block of the stack.
template <typename T>
__global__ void __launch_bounds__(TAYLOR_THREADS)
taylor_backward(const T* __restrict__ g, const T* __restrict__ z, const T* __restrict__ y,
                const T* __restrict__ b, int has_b, int act, int d, int mode, i64 B, i64 N,
                T* __restrict__ gz) {
    const i64 BN = B * N;
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= BN) return;
    T p, q, r;
    with_activation(act, [&](auto a) {  // the activation-specific part: p, q, r
        constexpr int A = decltype(a)::id;
        T v;
        if constexpr (ActFromOutput<A>::value) {
            v = y[e];
        } else {
            v = has_b ? z[e] + b[e % N] : z[e];
        }
        act_higher<A, 3>(v, p, q, r);
    });
    const T gl = mode == 1 ? g[(i64)(d + 1) * BN + e] : T(0);
    T s1 = T(0), s2 = T(0);
    for (int i = 1; i <= d; ++i) {
        const T jz = z[i * BN + e];
        const T gj = g[i * BN + e];
        const T gs = mode == 2 ? g[(i64)(d + i) * BN + e] : gl;
        gz[i * BN + e] = p * gj + T(2) * q * gs * jz;
        s1 += gj * jz;
        s2 += gs * (jz * jz);
    }
    const int second = mode == 0 ? 0 : (mode == 1 ? 1 : d);
    for (int k = 1; k <= second; ++k) {
        const i64 o = (i64)(d + k) * BN + e;
        gz[o] = p * g[o];
        s1 += g[o] * z[o];
    }
    T acc = p * g[e] + q * s1;
    if (mode != 0) acc += r * s2;
    gz[e] = acc;
}

}  // namespace cupynn
