// dense.cu -- the kernels of a dense layer: forward with bias + activation (+ loss)
// in the epilogue, backward dx, backward [dW | db] with split-batch partials, the
// fused first-layer backward of a recomputed tiny-fan-in layer, and the
// deterministic reductions.  Host side: cupynn/backends/cuda_backend.py.
//
// Layouts (row-major, batch first): x (M, K) with element strides (sxm, sxk);
// W (N, K) and b (N) C-contiguous; y, z, g, target (M, N) C-contiguous.
// Offsets are 64-bit (i64): M x N passes 2^31 at batch 1M.
//
// Null pointers are never passed: every optional array comes with an int flag
// (has_b, store_y, ...) and the host passes a 1-element dummy when the flag is 0.
#include "common.cuh"
#include "activations.cuh"
#include "gemm.cuh"

namespace cupynn {

// ---------------------------------------------------------------------------
// Device building blocks
// ---------------------------------------------------------------------------

// Operand loaders (the contract is at the top of gemm.cuh): `load` issues the global
// loads of a thread's fragment, `finish` does the arithmetic.  A runtime activation is
// resolved once per fragment (with_activation), never per element.

constexpr int CHAIN_MAX_K0 = 4;  // widest first layer that is recomputed (RECOMPUTE_MAX_FANIN)

// Fan-in 1 (a scalar input, like the seed's) as a compile-time constant, f(FanIn<1>{});
// other fan-ins f(FanIn<0>{}): k0 at run time.  (Specializing 2..4 as well costs the
// K-step loop ~50 registers for cases no public workload has.)
template <int K0> struct FanIn { static constexpr int value = K0; };

template <class F> __device__ __forceinline__ void with_fanin(int k0, F&& f) {
    if (k0 == 1) f(FanIn<1>{});
    else f(FanIn<0>{});
}

// out[q] = f(raw[q]) where bit q of `valid` is set, else 0.
template <typename T, int N, class Raw, class F>
__device__ __forceinline__ void finish_each(const Raw (&raw)[N], unsigned valid, T (&out)[N],
                                            F&& f) {
#pragma unroll
    for (int q = 0; q < N; ++q) out[q] = ((valid >> q) & 1u) ? f(raw[q]) : T(0);
}

// The input of a layer, X(m, k): either a strided load of x, or -- when k0 > 0 --
// recomputed from a tiny previous layer: act0(x0[m, :] . w0[k, :] + b0[k]) with
// x0 (M, k0) strided.  Recomputing costs k0 multiply-adds per element and saves
// writing and reading the whole (M, K) hidden layer (docs/design.md, section 3).  Raw: x, or the
// pre-activation z0 (its k0 <= 4 loads are L1-resident); act0 is applied in finish.
template <typename T> struct InputLoad {
    static constexpr bool C_FAST = true;
    using Raw = T;
    const T* x;
    i64 sm, sk;
    const T* w0;
    const T* b0;
    int k0, act0, has_b0;
    // z0 from row xr of x0, a row wr of w0 (pointer or registers) and its bias bv;
    // K0: k0 when known at compile time, else 0 (k0 at run time, up to CHAIN_MAX_K0)
    template <int K0 = 0, class W>
    __device__ __forceinline__ T z0_at(const T* xr, const W& wr, T bv) const {
        T s = T(0);
#pragma unroll
        for (int j = 0; j < (K0 ? K0 : CHAIN_MAX_K0); ++j)
            if (K0 || j < k0) s = m_fma(xr[j * sk], wr[j], s);
        return has_b0 ? s + bv : s;
    }
    __device__ __forceinline__ T pre(i64 m, i64 k) const {  // z0(m, k)
        return z0_at(x + m * sm, w0 + k * k0, has_b0 ? b0[k] : T(0));
    }
    template <int N>
    __device__ __forceinline__ unsigned load(const Frag& f, unsigned valid, T (&raw)[N]) const {
        if (k0 == 0) {
            const T* p = x + f.i0 * sm + f.i1 * sk;
            const i64 step = f.d0 * sm + f.d1 * sk;
#pragma unroll
            for (int q = 0; q < N; ++q) raw[q] = ((valid >> q) & 1u) ? p[q * step] : T(0);
        } else {
            with_fanin(k0, [&](auto fan) {  // no predicated-off multiply-adds per element
                constexpr int K0 = decltype(fan)::value;
                const i64 kw = K0 ? K0 : k0;  // row length of w0
                const T* xr = x + f.i0 * sm;
                const T* wr = w0 + f.i1 * kw;
                const T* br = b0 + f.i1;
                const i64 xstep = f.d0 * sm, wstep = f.d1 * kw;
                if (K0 > 0 && f.d1 == 0) {
                    // one feature k for the whole fragment (k is the fast index, so
                    // always, once inlined): its w0 row and bias loaded once, not per element
                    T wv[K0 > 0 ? K0 : 1];
                    T bv = T(0);
                    if (valid) {
#pragma unroll
                        for (int j = 0; j < K0; ++j) wv[j] = wr[j];
                        if (has_b0) bv = *br;
                    }
#pragma unroll
                    for (int q = 0; q < N; ++q)
                        raw[q] = ((valid >> q) & 1u) ? z0_at<K0>(xr + q * xstep, wv, bv) : T(0);
                } else {
#pragma unroll
                    for (int q = 0; q < N; ++q)
                        raw[q] = ((valid >> q) & 1u)
                                     ? z0_at<K0>(xr + q * xstep, wr + q * wstep,
                                                 has_b0 ? br[q * f.d1] : T(0))
                                     : T(0);
                }
            });
        }
        return 0u;
    }
    template <int N>
    __device__ __forceinline__ void finish(const T (&raw)[N], unsigned valid, unsigned,
                                           T (&out)[N]) const {
        if (k0 == 0) {
#pragma unroll
            for (int q = 0; q < N; ++q) out[q] = raw[q];  // already 0 out of bounds
            return;
        }
        with_activation(act0, [&](auto a) {
            finish_each(raw, valid, out, [&](T z) { return act_forward<decltype(a)::id>(z); });
        });
    }
};

// [X | 1]: the input with a column of ones appended (bias as the weight of a
// constant input, so db comes out of the dW reduction).  Its own mask: the ones.
template <typename T, class L> struct WithOnes {
    static constexpr bool C_FAST = L::C_FAST;
    using Raw = typename L::Raw;
    L in;
    i64 kin;
    template <int N>
    __device__ __forceinline__ unsigned load(const Frag& f, unsigned valid, Raw (&raw)[N]) const {
        unsigned ones = 0;
#pragma unroll
        for (int q = 0; q < N; ++q) ones |= (f.i1 + q * f.d1 >= kin ? 1u : 0u) << q;
        in.load(f, valid & ~ones, raw);
        return ones & valid;
    }
    template <int N>
    __device__ __forceinline__ void finish(const Raw (&raw)[N], unsigned valid, unsigned ones,
                                           T (&out)[N]) const {
        in.finish(raw, valid & ~ones, 0u, out);
#pragma unroll
        for (int q = 0; q < N; ++q)
            if ((ones >> q) & 1u) out[q] = T(1);
    }
};

// dz(m, j) = g(m, j) * act'(s(m, j)) with s the saved y or z, all (M, n) contiguous.
// With `loss` set, g is the fused loss gradient 2 * scale * (y - t), y = s or act(s)
// (t = 0 without a target: y - 0 is y, bit for bit).  Raw: {g or t, s}.
template <typename T> struct DzPair { T a, v; };

template <typename T> struct DzLoad {
    static constexpr bool C_FAST = true;
    using Raw = DzPair<T>;
    const T* g;
    const T* s;
    const T* t;
    i64 n;
    int act, loss, has_t;
    T two_scale;
    template <int N>
    __device__ __forceinline__ unsigned load(const Frag& f, unsigned valid, Raw (&raw)[N]) const {
        const i64 o = f.i0 * n + f.i1, step = f.d0 * n + f.d1;
        const T* sp = s + o;
        const T* ap = (loss ? t : g) + o;  // read only where (loss ? has_t : 1)
        const bool read_a = !loss || has_t;
#pragma unroll
        for (int q = 0; q < N; ++q) {
            const bool in = (valid >> q) & 1u;
            raw[q].v = in ? sp[q * step] : T(0);
            raw[q].a = (in && read_a) ? ap[q * step] : T(0);
        }
        return 0u;
    }
    template <int N>
    __device__ __forceinline__ void finish(const Raw (&raw)[N], unsigned valid, unsigned,
                                           T (&out)[N]) const {
        with_activation(act, [&](auto a) {
            constexpr int A = decltype(a)::id;
            if (loss) {
                finish_each(raw, valid, out, [&](const Raw& r) {
                    const T y = ActFromOutput<A>::value ? r.v : act_forward<A>(r.v);
                    return (y - r.a) * two_scale * act_derivative<A>(r.v);
                });
            } else {
                finish_each(raw, valid, out,
                            [&](const Raw& r) { return r.a * act_derivative<A>(r.v); });
            }
        });
    }
};

// A row-major matrix w (rows, ld): f(r, c) = w[r * ld + c].
template <typename T> struct RowMajor {
    static constexpr bool C_FAST = true;
    using Raw = T;
    const T* w;
    i64 ld;
    template <int N>
    __device__ __forceinline__ unsigned load(const Frag& f, unsigned valid, T (&raw)[N]) const {
        const T* p = w + f.i0 * ld + f.i1;
        const i64 step = f.d0 * ld + f.d1;
#pragma unroll
        for (int q = 0; q < N; ++q) raw[q] = ((valid >> q) & 1u) ? p[q * step] : T(0);
        return 0u;
    }
    template <int N>
    __device__ __forceinline__ void finish(const T (&raw)[N], unsigned, unsigned,
                                           T (&out)[N]) const {
#pragma unroll
        for (int q = 0; q < N; ++q) out[q] = raw[q];  // already 0 out of bounds
    }
};

// f(r, c) = in(c, r)
template <typename T, class L> struct Transposed {
    static constexpr bool C_FAST = !L::C_FAST;
    using Raw = typename L::Raw;
    L in;
    template <int N>
    __device__ __forceinline__ unsigned load(const Frag& f, unsigned valid, Raw (&raw)[N]) const {
        return in.load(Frag{f.i1, f.i0, f.d1, f.d0}, valid, raw);
    }
    template <int N>
    __device__ __forceinline__ void finish(const Raw (&raw)[N], unsigned valid, unsigned mine,
                                           T (&out)[N]) const {
        in.finish(raw, valid, mine, out);
    }
};

// Fixed-order tree sum of one value per thread over a 256-thread block; the result
// is valid in thread 0.  Deterministic: the same inputs give the same bits.
template <typename T> __device__ __forceinline__ T block_sum(T v, T* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = GEMM_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    return red[0];
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// Forward of one layer: y = act(x @ W.T + b), optionally saving z, optionally
// writing a per-block partial of the loss sum((y - t)^2).
//   x (M, K) strided (sxm, sxk) -- or x0 (M, k0) when k0 > 0, the input then being
//     recomputed as act0(x0 @ w0.T + b0) (w0 (K, k0), b0 (K) if has_b0)
//   w (N, K), b (N) if has_b
//   y (M, N) written if store_y; zsave (M, N) written if store_z
//   target (M, N) if has_t; loss_partials[gridDim.x * gridDim.y] written if loss
//   act: the activation id when ACT == ACT_RUNTIME (act_forward_runtime, out of line, per
//     element), else ignored (ACT itself: the activations with instantiations of their own)
// A block owns the output tile rows [BM * blockIdx.x, +BM) x cols [BN * blockIdx.y, +BN).
template <typename T, int ACT, int TILE, int MATH>
__global__ void __launch_bounds__(GEMM_THREADS, (MinBlocks<T, TILE, MATH, true>::value))
dense_forward(const T* __restrict__ x, i64 sxm, i64 sxk,
              const T* __restrict__ w0, const T* __restrict__ b0, int k0, int act0, int has_b0,
              const T* __restrict__ w, const T* __restrict__ b, int has_b,
              i64 M, i64 N, i64 K,
              T* __restrict__ y, int store_y, T* __restrict__ zsave, int store_z,
              const T* __restrict__ target, int has_t, int loss, T* __restrict__ loss_partials,
              int act) {
    using G = Gemm<T, TILE, MATH>;
    __shared__ typename G::Smem sm;
    __shared__ T red[GEMM_THREADS];
    const i64 r0 = (i64)blockIdx.x * G::BM, c0 = (i64)blockIdx.y * G::BN;
    InputLoad<T> la{x, sxm, sxk, w0, b0, k0, act0, has_b0};
    Transposed<T, RowMajor<T>> lb{RowMajor<T>{w, K}};
    G gemm;
    gemm.zero();
    gemm.run(sm, la, lb, M, N, r0, c0, 0, K);
    T local = T(0);
    auto epilogue = [&](auto f) {
        gemm.visit([&](int rr, int cc, T v) {
            const i64 m = r0 + rr, n = c0 + cc;
            if (m < M && n < N) {
                const T z = has_b ? v + b[n] : v;
                const T out = f(z);
                const i64 o = m * N + n;
                if (store_y) y[o] = out;
                if (store_z) zsave[o] = z;
                if (loss) {
                    const T r = has_t ? out - target[o] : out;
                    local += r * r;
                }
            }
        });
    };
    if constexpr (ACT == ACT_RUNTIME) epilogue([&](T z) { return act_forward_runtime(act, z); });
    else epilogue([](T z) { return act_forward<ACT>(z); });
    if (loss) {  // uniform branch: every thread takes part in the block sum
        const T s = block_sum(local, red);
        if (threadIdx.x == 0) loss_partials[blockIdx.x + (i64)gridDim.x * blockIdx.y] = s;
    }
}

// Backward dx of one layer: dx (M, K) = dz (M, N) @ W (N, K), dz = g * act'(s)
// fused into the A loads (see DzLoad; `loss` replaces g by the loss gradient).
//   g, s, t (M, N): upstream gradient, saved y or z, target (flags: loss, has_t)
//   w (N, K); dx (M, K) written.
// A block owns dx rows [BM * blockIdx.x, +BM) x cols [BN * blockIdx.y, +BN).
template <typename T, int TILE, int MATH>
__global__ void __launch_bounds__(GEMM_THREADS, (MinBlocks<T, TILE, MATH>::value))
dense_backward_dx(const T* __restrict__ g, const T* __restrict__ s, const T* __restrict__ t,
                  int act, int loss, int has_t, T two_scale,
                  const T* __restrict__ w, i64 M, i64 N, i64 K, T* __restrict__ dx) {
    using G = Gemm<T, TILE, MATH>;
    __shared__ typename G::Smem sm;
    const i64 r0 = (i64)blockIdx.x * G::BM, c0 = (i64)blockIdx.y * G::BN;
    DzLoad<T> la{g, s, t, N, act, loss, has_t, two_scale};
    RowMajor<T> lb{w, K};
    G gemm;
    gemm.zero();
    gemm.run(sm, la, lb, M, K, r0, c0, 0, N);
    gemm.visit([&](int rr, int cc, T v) {
        const i64 m = r0 + rr, k = c0 + cc;
        if (m < M && k < K) dx[m * K + k] = v;
    });
}

// Backward [dW | db] (N, K + has_bias) = dz.T @ [x | 1], reduced over the batch.
//   g, s, t (M, N) and flags: as in dense_backward_dx (dz = g * act'(s))
//   x (M, K) strided, or recomputed from x0 (M, k0), w0, b0 when k0 > 0 (see InputLoad)
//   gridDim.z == 1: dw (N, K) and db (N, if has_bias) written directly;
//   gridDim.z > 1: split z sums batch rows [z * rows_per_split, +rows_per_split) into
//     partials[z][N][K + has_bias]; reduce_partials adds them in a fixed order.
// DZ_ROWS: the GEMM's rows are the N output features (else the K + 1 inputs); the
// host puts the narrower side on the tile's columns.
// A block owns a BM x BN tile of [dW | db] (or its transpose) for one batch split.
template <typename T, int TILE, int MATH, int DZ_ROWS>
__global__ void __launch_bounds__(GEMM_THREADS, (MinBlocks<T, TILE, MATH>::value))
dense_backward_dw(const T* __restrict__ g, const T* __restrict__ s, const T* __restrict__ t,
                  int act, int loss, int has_t, T two_scale,
                  const T* __restrict__ x, i64 sxm, i64 sxk,
                  const T* __restrict__ w0, const T* __restrict__ b0, int k0, int act0, int has_b0,
                  i64 M, i64 N, i64 K, int has_bias,
                  T* __restrict__ dw, T* __restrict__ db, T* __restrict__ partials, i64 rows_per_split) {
    using G = Gemm<T, TILE, MATH>;
    __shared__ typename G::Smem sm;
    const i64 K1 = K + has_bias;
    const i64 R = DZ_ROWS ? N : K1, C = DZ_ROWS ? K1 : N;
    const i64 r0 = (i64)blockIdx.x * G::BM, c0 = (i64)blockIdx.y * G::BN;
    const i64 kb = (i64)blockIdx.z * rows_per_split;
    const i64 ke = kb + rows_per_split < M ? kb + rows_per_split : M;
    DzLoad<T> dz{g, s, t, N, act, loss, has_t, two_scale};
    WithOnes<T, InputLoad<T>> xe{InputLoad<T>{x, sxm, sxk, w0, b0, k0, act0, has_b0}, K};
    G gemm;
    gemm.zero();
    if constexpr (DZ_ROWS) {
        gemm.run(sm, Transposed<T, DzLoad<T>>{dz}, xe, R, C, r0, c0, kb, ke);
    } else {
        gemm.run(sm, Transposed<T, WithOnes<T, InputLoad<T>>>{xe}, dz, R, C, r0, c0, kb, ke);
    }
    const bool direct = gridDim.z == 1;
    T* part = partials + (i64)blockIdx.z * N * K1;
    gemm.visit([&](int rr, int cc, T v) {
        const i64 r = r0 + rr, c = c0 + cc;
        if (r < R && c < C) {
            const i64 i = DZ_ROWS ? r : c, j = DZ_ROWS ? c : r;  // output feature, input
            if (!direct) part[i * K1 + j] = v;
            else if (j < K) dw[i * K + j] = v;
            else db[i] = v;
        }
    });
}

constexpr int CHAIN_TILE = 5;  // 64 x 64, BK 8: K is layer 1's (narrow) width

// Backward of a first layer whose output was never stored (fan-in k0 <= 4):
//   dz0 (M, N0) = (dz1 @ W1) * act0'(.)   dz1 = g1 * act1'(s1) (DzLoad, layer 1)
//   [dW0 | db0] (N0, k0 + has_bias) = dz0.T @ [x0 | 1]
// dz1 @ W1 (the dx of layer 1) is a GEMM tile in registers, multiplied by act0' of
// the recomputed z0 = x0 @ w0.T + b0, staged in shared memory and reduced against
// [x0 | 1] in a fixed order; the (M, N0) hidden gradient never reaches memory.
//   g1, s1, t1 (M, N1) and flags: layer 1's upstream gradient / saved / target
//   w1 (N1, N0); x0 (M, k0) strided; w0 (N0, k0); b0 (N0) if has_b0
//   gridDim.y == 1: dw0 (N0, k0), db0 (N0 if has_b0) written directly;
//   else partials[y][N0][k0 + has_b0] for reduce_partials.
// A block owns columns [BN * blockIdx.x, +BN) of dz0 for batch rows
// [blockIdx.y * rows_per_split, +rows_per_split), walked in chunks of BM rows.
template <typename T, int MATH>
__global__ void __launch_bounds__(GEMM_THREADS, (MinBlocks<T, CHAIN_TILE, MATH>::value))
dense_backward_chain(const T* __restrict__ g1, const T* __restrict__ s1, const T* __restrict__ t1,
                     int act1, int loss1, int has_t1, T two_scale1,
                     const T* __restrict__ w1, i64 N1,
                     const T* __restrict__ x0, i64 sxm, i64 sxk,
                     const T* __restrict__ w0, const T* __restrict__ b0, int k0, int act0, int has_b0,
                     i64 M, i64 N0,
                     T* __restrict__ dw0, T* __restrict__ db0, T* __restrict__ partials,
                     i64 rows_per_split) {
    using G = Gemm<T, CHAIN_TILE, MATH>;
    constexpr int BM = G::BM, BN = G::BN;
    constexpr int PAIRS = (BN * (CHAIN_MAX_K0 + 1) + GEMM_THREADS - 1) / GEMM_THREADS;
    __shared__ union {
        typename G::Smem gemm;
        T dz[BM][BN + 1];
    } sm;
    __shared__ T xs[BM][CHAIN_MAX_K0 + 1];
    const i64 c0 = (i64)blockIdx.x * BN;
    const i64 kb = (i64)blockIdx.y * rows_per_split;
    const i64 ke = kb + rows_per_split < M ? kb + rows_per_split : M;
    const int K1 = k0 + has_b0;
    DzLoad<T> la{g1, s1, t1, N1, act1, loss1, has_t1, two_scale1};
    RowMajor<T> lb{w1, N0};
    InputLoad<T> z0{x0, sxm, sxk, w0, b0, k0, act0, has_b0};
    T pacc[PAIRS];
#pragma unroll
    for (int q = 0; q < PAIRS; ++q) pacc[q] = T(0);
    G gemm;
    for (i64 m0 = kb; m0 < ke; m0 += BM) {
        gemm.zero();
        gemm.run(sm.gemm, la, lb, ke, N0, m0, c0, 0, N1);  // ends with __syncthreads
        // z0 of every accumulator first (loads only), then act0' with one switch
        static_assert(G::NACC <= 32, "one mask bit per accumulator");
        T zs[G::NACC];
        unsigned in = 0;
        int q = 0;
        gemm.visit([&](int rr, int cc, T) {
            const i64 m = m0 + rr, i = c0 + cc;
            const bool ok = m < ke && i < N0;
            in |= (ok ? 1u : 0u) << q;
            zs[q++] = ok ? z0.pre(m, i) : T(0);
        });
        with_activation(act0, [&](auto a) {
            constexpr int A = decltype(a)::id;
            int p = 0;
            gemm.visit([&](int rr, int cc, T v) {
                const T z = zs[p];
                const T sv = ActFromOutput<A>::value ? act_forward<A>(z) : z;
                sm.dz[rr][cc] = ((in >> p) & 1u) ? v * act_derivative<A>(sv) : T(0);
                ++p;
            });
        });
        for (int e = threadIdx.x; e < BM * (CHAIN_MAX_K0 + 1); e += GEMM_THREADS) {
            const int rr = e / (CHAIN_MAX_K0 + 1), j = e % (CHAIN_MAX_K0 + 1);
            const i64 m = m0 + rr;
            xs[rr][j] = (m < ke && j < K1) ? (j < k0 ? x0[m * sxm + j * sxk] : T(1)) : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < PAIRS; ++q) {
            const int p = threadIdx.x + q * GEMM_THREADS;
            if (p < BN * K1) {
                const int i = p % BN, j = p / BN;
                T a = pacc[q];
                for (int rr = 0; rr < BM; ++rr) a = m_fma(sm.dz[rr][i], xs[rr][j], a);
                pacc[q] = a;
            }
        }
        __syncthreads();
    }
    const bool direct = gridDim.y == 1;
    T* part = partials + (i64)blockIdx.y * N0 * K1;
#pragma unroll
    for (int q = 0; q < PAIRS; ++q) {
        const int p = threadIdx.x + q * GEMM_THREADS;
        if (p < BN * K1) {
            const int j = p / BN;
            const i64 i = c0 + p % BN;
            if (i < N0) {
                if (!direct) part[i * K1 + j] = pacc[q];
                else if (j < k0) dw0[i * k0 + j] = pacc[q];
                else db0[i] = pacc[q];
            }
        }
    }
}

// Element e of [dW | db] (N, K + hb): the sum of partials p[S][N][K + hb] in split order.
template <typename T>
__device__ __forceinline__ void reduce_one(const T* __restrict__ p, i64 S, i64 N, i64 K, int hb,
                                           T* __restrict__ dw, T* __restrict__ db, i64 e) {
    const i64 K1 = K + hb, total = N * K1;
    if (e >= total) return;
    T acc = T(0);
    for (i64 z = 0; z < S; ++z) acc += p[z * total + e];
    const i64 i = e / K1, j = e % K1;
    if (j < K) dw[i * K + j] = acc;
    else db[i] = acc;
}

// [dW | db] = sum over splits of partials[S][N][K + has_bias], in split order.
// A thread owns one element of [dW | db].
template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS, 1)
reduce_partials(const T* __restrict__ partials, i64 S, i64 N, i64 K, int has_bias,
                T* __restrict__ dw, T* __restrict__ db) {
    reduce_one(partials, S, N, K, has_bias, dw, db, (i64)blockIdx.x * blockDim.x + threadIdx.x);
}

// Up to REDUCE_JOBS reductions like reduce_partials in one launch (the end of a
// backward pass): job j has partials pj[Sj][Nj][Kj + hbj] -> dwj (Nj, Kj), dbj (Nj).
// Blocks are dealt to the jobs in order, ceil(Nj * (Kj + hbj) / 256) each; a thread
// owns one element of one job's [dW | db].
constexpr int REDUCE_JOBS = 4;

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS, 1)
reduce_partials_multi(int njobs,
                      const T* __restrict__ p0, i64 S0, i64 N0, i64 K0, int hb0, T* dw0, T* db0,
                      const T* __restrict__ p1, i64 S1, i64 N1, i64 K1, int hb1, T* dw1, T* db1,
                      const T* __restrict__ p2, i64 S2, i64 N2, i64 K2, int hb2, T* dw2, T* db2,
                      const T* __restrict__ p3, i64 S3, i64 N3, i64 K3, int hb3, T* dw3, T* db3) {
    i64 b = blockIdx.x;
    const i64 n0 = (N0 * (K0 + hb0) + GEMM_THREADS - 1) / GEMM_THREADS;
    if (b < n0) { reduce_one(p0, S0, N0, K0, hb0, dw0, db0, b * GEMM_THREADS + threadIdx.x); return; }
    b -= n0;
    if (njobs < 2) return;
    const i64 n1 = (N1 * (K1 + hb1) + GEMM_THREADS - 1) / GEMM_THREADS;
    if (b < n1) { reduce_one(p1, S1, N1, K1, hb1, dw1, db1, b * GEMM_THREADS + threadIdx.x); return; }
    b -= n1;
    if (njobs < 3) return;
    const i64 n2 = (N2 * (K2 + hb2) + GEMM_THREADS - 1) / GEMM_THREADS;
    if (b < n2) { reduce_one(p2, S2, N2, K2, hb2, dw2, db2, b * GEMM_THREADS + threadIdx.x); return; }
    b -= n2;
    if (njobs < 4) return;
    reduce_one(p3, S3, N3, K3, hb3, dw3, db3, b * GEMM_THREADS + threadIdx.x);
}

// value[0] = scale * sum(partials[0:P]), one 256-thread block, fixed order.
template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS, 1)
loss_reduce(const T* __restrict__ partials, i64 P, T scale, T* __restrict__ value) {
    __shared__ T red[GEMM_THREADS];
    T acc = T(0);
    for (i64 p = threadIdx.x; p < P; p += GEMM_THREADS) acc += partials[p];
    const T s = block_sum(acc, red);
    if (threadIdx.x == 0) value[0] = s * scale;
}

}  // namespace cupynn
