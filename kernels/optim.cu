// optim.cu -- the optimizers' update (cupynn/optim.py): SGD (momentum, dampening,
// Nesterov, L2 weight decay), Adam (L2 weight decay) and AdamW (decoupled weight decay),
// for up to OPT_SLOTS parameter arrays in ONE launch.  Host side:
// cupynn/backends/cuda_optim.py.  The formulas are torch.optim's (see the docstrings of
// cupynn/optim.py), in the same order of operations.
//
// Passing many arrays to one launch: fixed argument slots.  Parameter s and its gradient
// are the pointer arguments p<s> and g<s> (unused slots get a 1-element dummy); the
// optimizer's own state is one flat array per kind (s0: SGD's momentum buffer or Adam's
// first moment, s1: Adam's second moment), of which parameter s owns the elements
// [off[s], off[s + 1]).  There is no table of pointers in device memory: new gradient
// arrays on every call need nothing rebuilt, and every array is a kernel argument, so the
// emulator's address mode bounds-checks every access.  A model with more parameter arrays
// than OPT_SLOTS takes one launch per OPT_SLOTS of them.
//
// The step count lives on the device, so a captured CUDA graph counts its own steps: each
// block b keeps its copy steps[b] (all equal), reads it and writes it back incremented.
// No block reads a counter another block writes during the launch: no atomics, no second
// launch, no host round trip.
#include "common.cuh"

namespace cupynn {

enum : int { OPT_SGD = 0, OPT_ADAM = 1, OPT_ADAMW = 2 };  // kind (cuda_optim.KINDS)
constexpr int OPT_SLOTS = 16;                               // cuda_optim.SLOTS
constexpr int OPT_THREADS = 256;                            // = GEMM_THREADS, the launcher's
constexpr int OPT_PER_THREAD = 2;
constexpr int OPT_CHUNK = OPT_THREADS * OPT_PER_THREAD;     // elements per block (cuda_optim.CHUNK)

// hyper[]: the hyperparameters as float64, in this order (OptimizerState in
// cupynn/backends/base.py; cuda_optim.sync writes them)
enum : int { HYP_LR = 0, HYP_B1 = 1, HYP_B2 = 2, HYP_EPS = 3, HYP_WD = 4, HYP_NESTEROV = 5 };
// SGD reads HYP_B1 as its momentum and HYP_B2 as its dampening.

__device__ __forceinline__ float  opt_sqrt(float x)  { return sqrtf(x); }
__device__ __forceinline__ double opt_sqrt(double x) { return sqrt(x); }

// SGD on elements [base, base + OPT_CHUNK) of one parameter (n elements):
//   g' = g + wd p;  b = g' (first step) or mu b + (1 - dampening) g';
//   d = g' + mu b (Nesterov) or b (momentum) or g' (mu = 0);  p = p - lr d
template <typename T>
__device__ __forceinline__ void sgd_chunk(T* p, const T* g, T* buf, i64 n, i64 base,
                                          const double* hyper, i64 t) {
    const double mu = hyper[HYP_B1], wd = hyper[HYP_WD];
    const T lr = T(hyper[HYP_LR]), muT = T(mu), damp1 = T(1.0 - hyper[HYP_B2]), wdT = T(wd);
    const bool nesterov = hyper[HYP_NESTEROV] != 0.0, first = t == 1;
#pragma unroll
    for (int q = 0; q < OPT_PER_THREAD; ++q) {
        const i64 i = base + q * OPT_THREADS + threadIdx.x;
        if (i >= n) break;
        const T pi = p[i];
        T gi = g[i];
        if (wd != 0.0) gi = gi + wdT * pi;
        if (mu != 0.0) {
            const T bi = first ? gi : muT * buf[i] + damp1 * gi;
            buf[i] = bi;
            gi = nesterov ? gi + muT * bi : bi;
        }
        p[i] = pi - lr * gi;
    }
}

// Adam / AdamW on elements [base, base + OPT_CHUNK) of one parameter, step t >= 1:
//   AdamW: p = p (1 - lr wd);  Adam: g' = g + wd p
//   m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p = p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// (step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) come from the block's thread 0)
template <typename T>
__device__ __forceinline__ void adam_chunk(T* p, const T* g, T* m, T* v, i64 n, i64 base,
                                           const double* hyper, double step_size_d,
                                           double bc2_sqrt_d, bool decoupled) {
    const double lr = hyper[HYP_LR], b1 = hyper[HYP_B1], b2 = hyper[HYP_B2], wd = hyper[HYP_WD];
    const T step_size = T(step_size_d);
    const T bc2_sqrt = T(bc2_sqrt_d);
    const T b1T = T(b1), omb1 = T(1.0 - b1), b2T = T(b2), omb2 = T(1.0 - b2);
    const T eps = T(hyper[HYP_EPS]), wdT = T(wd), decay = T(1.0 - lr * wd);
#pragma unroll
    for (int q = 0; q < OPT_PER_THREAD; ++q) {
        const i64 i = base + q * OPT_THREADS + threadIdx.x;
        if (i >= n) break;
        T pi = p[i];
        T gi = g[i];
        if (wd != 0.0) {
            if (decoupled) pi = pi * decay;
            else gi = gi + wdT * pi;
        }
        const T mi = b1T * m[i] + omb1 * gi;
        const T vi = b2T * v[i] + omb2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const T denom = opt_sqrt(vi) / bc2_sqrt + eps;
        p[i] = pi - (step_size * mi) / denom;
    }
}

// One optimizer step for ntensors <= OPT_SLOTS parameter arrays.
//   kind      OPT_SGD / OPT_ADAM / OPT_ADAMW (block-uniform runtime switch)
//   layout    i64[2 * ntensors + 2]: off[0..ntensors] (element offsets of each parameter in
//             the flat state), then blk[0..ntensors] (its first block; blk[ntensors] = grid)
//   hyper     double[8], see HYP_*
//   steps     i64[gridDim.x]: block b's copy of the step count (read, incremented, written)
//   s0, s1    flat state (SGD: s0 = momentum buffer; Adam: s0 = m, s1 = v); unused: dummies
//   p<s>, g<s>  parameter s (updated in place) and its gradient, C-contiguous, n[s] elements
// A block owns OPT_CHUNK consecutive elements of one parameter (blocks blk[s] .. blk[s+1]-1
// cover parameter s); thread x handles elements x, x + 256, ... of that chunk (coalesced).
template <typename T>
__global__ void __launch_bounds__(OPT_THREADS)
multi_tensor_step(int kind, int ntensors, const i64* __restrict__ layout,
                  const double* __restrict__ hyper, i64* __restrict__ steps,
                  T* __restrict__ s0, T* __restrict__ s1,
                  T* p0, const T* g0, T* p1, const T* g1, T* p2, const T* g2, T* p3, const T* g3,
                  T* p4, const T* g4, T* p5, const T* g5, T* p6, const T* g6, T* p7, const T* g7,
                  T* p8, const T* g8, T* p9, const T* g9, T* p10, const T* g10,
                  T* p11, const T* g11, T* p12, const T* g12, T* p13, const T* g13,
                  T* p14, const T* g14, T* p15, const T* g15) {
    const i64* off = layout;
    const i64* blk = layout + ntensors + 1;
    const i64 b = blockIdx.x;
    int s = 0;
    while (s + 1 < ntensors && b >= blk[s + 1]) ++s;  // block-uniform, at most 15 steps

    // The bias corrections once per block (two double pow), not once per thread.
    __shared__ double corr[2];
    const i64 t = steps[b] + 1;
    if (threadIdx.x == 0 && kind != OPT_SGD) {
        corr[0] = hyper[HYP_LR] / (1.0 - pow(hyper[HYP_B1], double(t)));
        corr[1] = sqrt(1.0 - pow(hyper[HYP_B2], double(t)));
    }
    __syncthreads();  // corr is written, and every thread has read steps[b] ...
    if (threadIdx.x == 0) steps[b] = t;  // ... before thread 0 overwrites it

    T* const ps[OPT_SLOTS] = {p0, p1, p2, p3, p4, p5, p6, p7,
                              p8, p9, p10, p11, p12, p13, p14, p15};
    const T* const gs[OPT_SLOTS] = {g0, g1, g2, g3, g4, g5, g6, g7,
                                    g8, g9, g10, g11, g12, g13, g14, g15};
    T* p = ps[0];
    const T* g = gs[0];
#pragma unroll
    for (int k = 1; k < OPT_SLOTS; ++k) {  // constant indices: no local-memory array
        if (k == s) {
            p = ps[k];
            g = gs[k];
        }
    }
    const i64 n = off[s + 1] - off[s];
    const i64 base = (b - blk[s]) * OPT_CHUNK;
    if (kind == OPT_SGD) sgd_chunk(p, g, s0 + off[s], n, base, hyper, t);
    else adam_chunk(p, g, s0 + off[s], s1 + off[s], n, base, hyper, corr[0], corr[1],
                    kind == OPT_ADAMW);
}

}  // namespace cupynn
