// fused.cu -- the whole value-and-gradient step of a narrow network in one kernel per batch
// range, plus one fixed-order reduction.  Host side: cupynn/backends/cuda_fused.py (launch,
// workspaces) and cuda_fused_layout.py (which networks, tile sizes, the shared-memory layout
// and the configuration table read here).
//
// What a block owns: the batch is cut into a fixed number of slices (the host's FUSED_BLOCKS,
// 132, whatever the card); the grid has min(slices, SM count) persistent blocks and block b
// walks slices b, b + gridDim.x, ... .  A slice is a contiguous range of batch rows
// [slice * rows_per_block, +rows), walked in tiles of BT rows (16..128).  For one tile, every layer's activations stay in shared
// memory: forward (each product's raw result to shared memory, then an elementwise pass adds
// the bias and applies the activation -- in the last layer the loss and its dz), then
// backward (dz = dh * act'(saved), written over the saved y it is computed from), and the
// tile's [dW | db] added into the slice's own part of `partials` (no other block touches it:
// no atomics; the first tile writes, later tiles add, in order).  fused_reduce then sums the
// slices' partials in slice order.  Same inputs, same card type: same bits, for any SM count.
//
// Two network classes (cuda_fused_layout.fused_layout decides):
//   narrow: every layer <= 256 wide, the input x staged per tile, every W staged in shared
//     memory once per block;
//   wide first layer (fan-in k0 <= 4, width H <= 4096, the seed's 1 -> 1000): layer 0 is never
//     stored.  z1 = act0(x W0^T + b0) W1^T runs in rounds of 128 hidden units: h0 of the
//     tile's rows for the round is computed into shared memory, W1's slice copied there by
//     cp.async meanwhile, and K = H is split over the 8 warps (summed in a fixed tree).  After
//     R >= BT rows of dz1 have been collected ("super-tile"), each warp takes groups of 32
//     hidden units and computes dW1 = h0^T dz1 (h0 recomputed) and dh0 = dz1 W1, whose
//     elementwise pass forms dz0 = dh0 * act0'(z0) and adds it against [x | 1] into dW0, db0
//     in registers.  W0, b0 and W1 are read from global memory (L2): W1 once per 64 rows.
//
// Every matrix product works on 16 x 8 output fragments in the m16n8 layout of mma.cuh
// (lane: rows g, g + 8, columns 2t, 2t + 1) with 16-deep K steps and an 8-deep tail: one
// DMMA.16x8x16 (16x8x8) on sm_90, 8 (4) DMMA.8x8x4 on sm_80, two (one) or six (three)
// HMMA.16x8x8 for tf32 (3xtf32), or FMA steps in which each lane loads the operand elements
// of its own accumulators (MATH_FMA).  Shared-memory operands are zero-padded to multiples of
// 16, so padding contributes exact zeros.
//
// Layouts: x (M, K0) strided (sxm, sxk); W_l (N_l, K_l) and b_l (N_l) C-contiguous; target,
// y_out (M, N_out) and dx_out (M, K0) C-contiguous.  Offsets into global memory are 64-bit.
#include "common.cuh"
#include "activations.cuh"
#include "mma.cuh"
#include "cp_async.cuh"

namespace cupynn {
namespace fz {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_LAYERS = 8;
constexpr int MAX_K0 = 4;  // widest fan-in of a recomputed wide first layer
constexpr int FMW = 4;     // wide forward: m16 tiles per warp (64 rows) ...
constexpr int FNW = 3;     // ... and n8 tiles (24 columns) per pass

// Kept in sync with cupynn/backends/cuda_fused_layout.py (tests/test_fused.py checks it).
enum : int { MODE_FORWARD = 0, MODE_VALUE = 1, MODE_GRAD = 2 };
// Configuration table: HEADER words, then LAYER_WORDS per layer.  Buffer offsets are in
// elements of T from the start of dynamic shared memory; -1: absent.
enum : int {
    H_L = 0, H_WIDE, H_BT, H_R, H_RPB, H_P, H_SMEM, H_MODE, H_HAS_T, H_NEED_DX, H_XS, H_XS_LD,
    H_DL, H_DL_LD, H_SCR, H_DZ1, H_DZ1_LD, H_XR, H_DXW, H_K0, H_NOUT, H_VSLOT, H_S, H_S_LD,
    HEADER = 24
};
enum : int {
    F_K = 0, F_N, F_ACT, F_HAS_B, F_Y, F_Y_LD, F_Z, F_W, F_W_LD, F_DW, F_DB, LAYER_WORDS = 16
};
constexpr int CFG_WORDS = HEADER + LAYER_WORDS * MAX_LAYERS;

__device__ __forceinline__ int pad16(int n) { return (n + 15) & ~15; }
__device__ __forceinline__ int pad8(int n) { return (n + 7) & ~7; }

// Global loads in flight per thread in the staging loops (W, x, targets): the loads of
// STAGE_U iterations issue before any of their uses, instead of one load per round trip.
constexpr int STAGE_U = 4;

// for e in [0, n) (thread-strided): store(e, load(e)), with STAGE_U loads in flight.
template <typename T, class Ld, class St>
__device__ __forceinline__ void copy_in_flight(int n, Ld&& load, St&& store) {
    #pragma unroll 1
    for (int e0 = threadIdx.x; e0 < n; e0 += STAGE_U * THREADS) {
        T v[STAGE_U];
        #pragma unroll
        for (int u = 0; u < STAGE_U; ++u) {
            const int e = e0 + u * THREADS;
            v[u] = e < n ? load(e) : T(0);
        }
        #pragma unroll
        for (int u = 0; u < STAGE_U; ++u) {
            const int e = e0 + u * THREADS;
            if (e < n) store(e, v[u]);
        }
    }
}

// The fan-in of a recomputed first layer: 1 (the seed's) as a compile-time constant,
// f(Fan<1>{}), else f(Fan<0>{}) with k0 <= MAX_K0 at run time (predicated).
template <int K> struct Fan { static constexpr int value = K; };
template <class F> __device__ __forceinline__ void with_fanin(int k0, F&& f) {
    if (k0 == 1) f(Fan<1>{});
    else f(Fan<0>{});
}

// z = b + sum_j x[j] w[j] over the fan-in (K0C: 1, or 0 for k0 at run time)
template <int K0C, typename T>
__device__ __forceinline__ T z_of(const T (&x)[MAX_K0], const T (&w)[MAX_K0], T b, int k0) {
    T s = b;
#pragma unroll
    for (int j = 0; j < (K0C ? K0C : MAX_K0); ++j)
        if (K0C || j < k0) s = m_fma(x[j], w[j], s);
    return s;
}

// ---- operand sources: element (r, c) of a matrix ------------------------------------------
template <typename T> struct Rows {  // p[r][c], row stride ld (shared memory, zero-padded)
    const T* p;
    int ld;
    __device__ __forceinline__ T at(int r, int c) const { return p[r * ld + c]; }
};
template <typename T> struct Cols {  // p[c][r]: the transpose of a Rows
    const T* p;
    int ld;
    __device__ __forceinline__ T at(int r, int c) const { return p[c * ld + r]; }
};
template <typename T> struct GlobalCols {  // p[c][r] in global memory, zero outside r_lim x c_lim
    const T* p;
    i64 ld;
    int r_lim, c_lim;
    __device__ __forceinline__ T at(int r, int c) const {
        return (r < r_lim && c < c_lim) ? p[(i64)c * ld + r] : T(0);
    }
};

// ---- one 16 x 8 x K step on m16n8 fragments (K = 16, or 8 for a tail) -------------------------
// Op<N>: a fragment of N elements as the instruction takes it (prep: float64 as is, tf32 bits
// rounded once, 3xtf32 hi + lo), so a fragment used by several steps is converted once.
template <typename T, int MATH> struct Mma;
template <> struct Mma<double, MATH_DMMA> {
    template <int N> struct Op { double v[N]; };
    template <int N>
    static __device__ __forceinline__ Op<N> prep(const double (&x)[N]) {
        Op<N> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = x[i];
        return o;
    }
    template <int K>
    static __device__ __forceinline__ void step(double (&c)[4], const Op<K / 2>& a,
                                                const Op<K / 4>& b) {
        mma_m16n8_f64<K>(c, a.v, b.v, c);
    }
};
template <> struct Mma<float, MATH_TF32> {
    template <int N> struct Op { unsigned v[N]; };
    template <int N>
    static __device__ __forceinline__ Op<N> prep(const float (&x)[N]) {
        Op<N> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = f32_to_tf32(x[i]);
        return o;
    }
    template <int K>
    static __device__ __forceinline__ void step(float (&c)[4], const Op<K / 2>& a,
                                                const Op<K / 4>& b) {
        if constexpr (K == 16) mma_m16n8k16_tf32(c, a.v, b.v, c);
        else mma_m16n8k8_tf32(c, a.v, b.v, c);
    }
};
template <> struct Mma<float, MATH_3XTF32> {
    template <int N> struct Op { unsigned h[N], l[N]; };
    template <int N>
    static __device__ __forceinline__ Op<N> prep(const float (&x)[N]) {
        Op<N> o;
#pragma unroll
        for (int i = 0; i < N; ++i) split_tf32(x[i], o.h[i], o.l[i]);
        return o;
    }
    template <int K>
    static __device__ __forceinline__ void step(float (&c)[4], const Op<K / 2>& a,
                                                const Op<K / 4>& b) {
        if constexpr (K == 16) {
            mma_m16n8k16_tf32(c, a.l, b.h, c);  // small terms first
            mma_m16n8k16_tf32(c, a.h, b.l, c);
            mma_m16n8k16_tf32(c, a.h, b.h, c);
        } else {
            mma_m16n8k8_tf32(c, a.l, b.h, c);
            mma_m16n8k8_tf32(c, a.h, b.l, c);
            mma_m16n8k8_tf32(c, a.h, b.h, c);
        }
    }
};

// One KS-deep step (16, or 8) of warp_mma at k0.
template <int KS, typename T, int MATH, int FM, int FN, class SA, class SB>
__device__ __forceinline__ void warp_kstep(T (&acc)[FM][FN][4], const SA& A, const SB& B, int r0,
                                           int c0, int mt, int nt, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (MATH != MATH_FMA) {
        using M = Mma<T, MATH>;
        // every B fragment of the step, then one A fragment at a time (fewer live registers)
        typename M::template Op<KS / 4> bo[FN];
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            T b[KS / 4];
#pragma unroll
            for (int v = 0; v < KS / 4; ++v) b[v] = j < nt ? B.at(k0 + t + 4 * v, c0 + 8 * j + g) : T(0);
            bo[j] = M::prep(b);
        }
#pragma unroll
        for (int i = 0; i < FM; ++i) {
            if (i >= mt) break;  // warp-uniform
            T a[KS / 2];
#pragma unroll
            for (int v = 0; v < KS / 2; ++v) a[v] = A.at(r0 + 16 * i + g + 8 * (v & 1), k0 + t + 4 * (v >> 1));
            const auto ao = M::prep(a);
            // all FN columns (B is 0 past nt): a predicated mma.sync costs a WARPSYNC and
            // four NOPs on sm_90, an idle one a few cycles of the tensor pipe
#pragma unroll
            for (int j = 0; j < FN; ++j) M::template step<KS>(acc[i][j], ao, bo[j]);
        }
    } else {
#pragma unroll 4
        for (int kk = 0; kk < KS; ++kk) {
            const int k = k0 + kk;
            T a[FM][2], b[FN][2];
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) a[i][h] = i < mt ? A.at(r0 + 16 * i + g + 8 * h, k) : T(0);
#pragma unroll
            for (int j = 0; j < FN; ++j)
#pragma unroll
                for (int q = 0; q < 2; ++q) b[j][q] = j < nt ? B.at(k, c0 + 8 * j + 2 * t + q) : T(0);
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j)
#pragma unroll
                    for (int v = 0; v < 4; ++v)
                        acc[i][j][v] = m_fma(a[i][v >> 1], b[j][v & 1], acc[i][j][v]);
        }
    }
}

// acc[i][j] += A[r0 + 16i.., 0:kend] * B[0:kend, c0 + 8j..] for the i < mt, j < nt fragments
// of a warp (mt, nt warp-uniform).  kend: a multiple of 8 (16-deep steps, then an 8-deep one:
// a 20-wide K costs 24, not 32); the sources are zero past K.
template <typename T, int MATH, int FM, int FN, class SA, class SB>
__device__ __forceinline__ void warp_mma(T (&acc)[FM][FN][4], const SA& A, const SB& B, int r0,
                                         int c0, int mt, int nt, int kend) {
    int k0 = 0;
    for (; k0 + 16 <= kend; k0 += 16) warp_kstep<16, T, MATH, FM, FN>(acc, A, B, r0, c0, mt, nt, k0);
    if (k0 < kend) warp_kstep<8, T, MATH, FM, FN>(acc, A, B, r0, c0, mt, nt, k0);
}

// f(row, col, value) for every accumulator of the fragments i < mt, j < nt.
template <typename T, int FM, int FN, class F>
__device__ __forceinline__ void visit(const T (&acc)[FM][FN][4], int r0, int c0, int mt, int nt,
                                      F&& f) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
#pragma unroll
            for (int v = 0; v < 4; ++v)
                if (i < mt && j < nt)
                    f(r0 + 16 * i + g + 8 * (v >> 1), c0 + 8 * j + 2 * t + (v & 1), acc[i][j][v]);
}

// C (M x N) = A (M x kend) * B (kend x N), kend a multiple of 8: the FM x FN fragment groups dealt to the warps in
// order; epi(acc, r0, c0, mt, nt) per group.  No barrier inside.
template <typename T, int MATH, int FM, int FN, class SA, class SB, class Epi>
__device__ __forceinline__ void block_gemm(int M, int N, int kend, const SA& A, const SB& B,
                                           Epi&& epi) {
    const int MT = (M + 15) >> 4, NT = (N + 7) >> 3;
    const int GM = (MT + FM - 1) / FM, GN = (NT + FN - 1) / FN;
    for (int gi = threadIdx.x >> 5; gi < GM * GN; gi += WARPS) {
        const int gm = gi % GM, gn = gi / GM;
        const int mt = min(FM, MT - gm * FM), nt = min(FN, NT - gn * FN);
        T acc[FM][FN][4];
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[i][j][v] = T(0);
        warp_mma<T, MATH, FM, FN>(acc, A, B, gm * FM * 16, gn * FN * 8, mt, nt, kend);
        epi(acc, gm * FM * 16, gn * FN * 8, mt, nt);
    }
}

// Fixed-order sum over a warp (every lane gets it).
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T> __device__ __forceinline__ void put(T* p, T v, bool first) {
    *p = first ? v : *p + v;
}

// Everything a block's phases share: the configuration (a shared-memory copy), the buffers,
// the arguments.
template <typename T> struct Ctx {
    const volatile i64* cfg;  // volatile: re-read where used, not held in registers
    T* sm;
    const T* const* W;  // W[l], b[l]: shared-memory copies of the pointer arguments
    const T* const* B;
    const T* x;
    i64 sxm, sxk;
    const T* target;
    T two_scale;
    T* y_out;
    T* dx_out;
    T* part;  // this block's slice of the partials
    int L, wide, BT, mode, has_t, need_dx, K0;
    __device__ __forceinline__ int f(int l, int field) const {
        return (int)cfg[HEADER + l * LAYER_WORDS + field];
    }
    __device__ __forceinline__ int h(int field) const { return (int)cfg[field]; }
    __device__ __forceinline__ T* buf(int off) const { return sm + off; }
    // where the product of layer l lands: Y[l] for hidden layers, DL for the last
    __device__ __forceinline__ T* out_buf(int l, int& ld) const {
        if (l == L - 1) {
            ld = h(H_DL_LD);
            return buf(h(H_DL));
        }
        ld = f(l, F_Y_LD);
        return buf(f(l, F_Y));
    }
    // where layer l's dz goes: DL for the last layer, Y[l] (over the saved y) for the others,
    // and for layer 1 of a wide network the tile's rows of the super-tile's DZ1
    __device__ __forceinline__ T* dz_buf(int l, int xr_off, int& ld) const {
        if (wide && l == 1) {
            ld = h(H_DZ1_LD);
            return buf(h(H_DZ1)) + xr_off * ld;
        }
        return out_buf(l, ld);
    }
};

// Store every accumulator the visit hands over into p[row][col] (row stride ld).
template <typename T, int FM, int FN>
__device__ __forceinline__ void store_frags(const T (&acc)[FM][FN][4], int r0, int c0, int mt,
                                            int nt, T* p, int ld) {
    visit(acc, r0, c0, mt, nt, [&](int r, int col, T v) { p[r * ld + col] = v; });
}

// Layer l's epilogue over its raw product in out_buf(l), rows [0, rp) x the layer's width:
// hidden layers y = act(raw + b) in place (and z = raw + b into Z[l] when the backward needs
// it); the last layer y into y_out (forward), or the loss value into `loss` and
// dz = 2 scale (y - t) act'(.) into dz_buf(l) (0 on rows past `rows`).  Ends with a barrier.
// Not inlined: one copy of the ten activations serves every layer (a call per layer and tile).
template <typename T>
__device__ __noinline__ void layer_epilogue(const Ctx<T>& c, int l, i64 t0, int rows, int xr_off,
                                            T& loss) {
    const int N = c.f(l, F_N), rp = pad16(rows);
    const T* b = c.f(l, F_HAS_B) ? c.B[l] : nullptr;
    int ld = 0;
    T* o = c.out_buf(l, ld);
    const bool last = l == c.L - 1;
    const bool fwd = last && c.mode == MODE_FORWARD, grad = c.mode == MODE_GRAD;
    const int zo = last ? -1 : c.f(l, F_Z);
    T* z = zo >= 0 ? c.buf(zo) : nullptr;
    int dld = 0;
    T* dz = (last && grad) ? c.dz_buf(l, xr_off, dld) : nullptr;
    const T* tg = c.has_t ? c.target : nullptr;
    const int nrows = fwd ? rows : rp;
    T acc = T(0);
    const int n_el = nrows * N;
    with_activation(c.f(l, F_ACT), [&](auto a) {
        constexpr int A = decltype(a)::id;
        // STAGE_U elements per round: their bias and target loads issue first
#pragma unroll 1
        for (int e0 = threadIdx.x; e0 < n_el; e0 += STAGE_U * THREADS) {
            T bv[STAGE_U], tv[STAGE_U];
#pragma unroll
            for (int u = 0; u < STAGE_U; ++u) {
                const int e = e0 + u * THREADS, m = e / N, n = e % N;
                bv[u] = (b && e < n_el) ? b[n] : T(0);
                tv[u] = (tg && last && e < n_el && m < rows) ? tg[(t0 + m) * N + n] : T(0);
            }
#pragma unroll
            for (int u = 0; u < STAGE_U; ++u) {
                const int e = e0 + u * THREADS;
                if (e >= n_el) break;
                const int m = e / N, n = e % N;
                const T zz = b ? o[m * ld + n] + bv[u] : o[m * ld + n];
                const T yy = act_forward<A>(zz);
                if (!last) {
                    o[m * ld + n] = yy;
                    if (z) z[m * ld + n] = zz;
                } else if (fwd) {
                    c.y_out[(t0 + m) * N + n] = yy;
                } else {
                    T d = T(0);
                    if (m < rows) {
                        const T r = tg ? yy - tv[u] : yy;
                        acc += r * r;
                        if (dz) d = r * c.two_scale * act_derivative<A>(act_saved<A>(zz, yy));
                    }
                    if (dz) dz[m * dld + n] = d;
                }
            }
        }
    });
    loss += acc;
    __syncthreads();
}

// Forward product of a narrow layer l for the tile (A: its input in shared memory, B: W_l
// staged) into out_buf(l); then its epilogue.
template <typename T, int MATH>
__device__ void narrow_forward(const Ctx<T>& c, int l, i64 t0, int rows, int xr_off, T& loss) {
    constexpr int FM = 2, FN = MATH == MATH_FMA ? 4 : 2;
    const int K = c.f(l, F_K), N = c.f(l, F_N);
    const Rows<T> A = l == 0 ? Rows<T>{c.buf(c.h(H_XS)), c.h(H_XS_LD)}
                             : Rows<T>{c.buf(c.f(l - 1, F_Y)), c.f(l - 1, F_Y_LD)};
    const Cols<T> Bw{c.buf(c.f(l, F_W)), c.f(l, F_W_LD)};  // B(k, n) = W[n][k]
    int ld = 0;
    T* o = c.out_buf(l, ld);
    block_gemm<T, MATH, FM, FN>(rows, N, pad8(K), A, Bw, [&](auto& acc, int r0, int c0, int mt, int nt) {
        store_frags(acc, r0, c0, mt, nt, o, ld);
    });
    __syncthreads();
    layer_epilogue(c, l, t0, rows, xr_off, loss);
}

// z1 = act0(x W0^T + b0) W1^T for the tile into out_buf(1), then layer 1's epilogue.  Per
// 64-row group and 24-column pass, the hidden units go in rounds of 128: the round's slice of
// W1 is copied into STW (cp.async) while all threads write h0 of the group's rows for the
// round's units into ST (shared), then warp w multiplies units [16 w, 16 w + 16) of the round
// into its FMW x FNW fragments.  The eight warps' partial
// products are added in the fixed order ((w0 + w4) + (w2 + w6)) + ((w1 + w5) + (w3 + w7)).
template <typename T, int MATH>
__device__ void wide_forward(const Ctx<T>& c, i64 t0, int rows, int xr_off, T& loss) {
    constexpr int ROUND = 16 * WARPS, ST_LD = ROUND + 4, SLOT = FMW * FNW * 4 * 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int H = c.f(0, F_N), k0 = c.K0, N1 = c.f(1, F_N), act0 = c.f(0, F_ACT);
    const T* __restrict__ w0 = c.W[0];
    const T* __restrict__ b0 = c.f(0, F_HAS_B) ? c.B[0] : nullptr;
    const T* __restrict__ w1 = c.W[1];
    const T* xr = c.buf(c.h(H_XR)) + xr_off * MAX_K0;
    T* scr = c.buf(c.h(H_SCR));  // ST: h0 [64][ST_LD], then STW: W1 slice [24][ST_LD]
    T* stw = scr + FMW * 16 * ST_LD;
    int ld = 0;
    T* o = c.out_buf(1, ld);
    const int MT = (rows + 15) >> 4, NT = (N1 + 7) >> 3;
    for (int gn = 0; gn * FNW < NT; ++gn) {
        for (int gm = 0; gm * FMW < MT; ++gm) {
            const int r0 = gm * FMW * 16, c0 = gn * FNW * 8;
            const int mt = min(FMW, MT - gm * FMW), nt = min(FNW, NT - gn * FNW);
            const int gr = mt * 16;  // rows of this group
            T acc[FMW][FNW][4];
#pragma unroll
            for (int i = 0; i < FMW; ++i)
#pragma unroll
                for (int j = 0; j < FNW; ++j)
#pragma unroll
                    for (int v = 0; v < 4; ++v) acc[i][j][v] = T(0);
            for (int u0 = 0; u0 < H; u0 += ROUND) {
                // W1[c0 .., u0 .. u0 + ROUND) into STW, in flight while h0 is computed (the
                // copies do not block: a rolled loop issues them as fast)
                {
                    constexpr int NSTEP = THREADS / ROUND;  // rows of STW per pass
                    const int u = threadIdx.x % ROUND, n0 = threadIdx.x / ROUND;
                    const bool uok = u0 + u < H;
                    const T* src = w1 + (i64)(c0 + n0) * H + u0 + u;
                    T* dst = stw + n0 * ST_LD + u;
#pragma unroll 1
                    for (int n = n0; n < FNW * 8; n += NSTEP) {
                        const bool ok = uok && c0 + n < N1;
                        cp_async_elem(dst, ok ? src : w1, ok);
                        src += (i64)NSTEP * H;
                        dst += NSTEP * ST_LD;
                    }
                }
                // thread: units u0 + UQ (tid % (ROUND / UQ)) + 0..UQ-1 (their W0 rows and biases
                // in registers) for rows tid / (ROUND / UQ), + THREADS / (ROUND / UQ), ...
                constexpr int UQ = 2, TPR = ROUND / UQ;
                const int uq = UQ * (threadIdx.x % TPR);
                T wq[UQ][MAX_K0], bq[UQ];
#pragma unroll
                for (int q = 0; q < UQ; ++q) {
                    const int k = u0 + uq + q;
                    const bool ok = k < H;
#pragma unroll
                    for (int j = 0; j < MAX_K0; ++j) wq[q][j] = (ok && j < k0) ? w0[(i64)k * k0 + j] : T(0);
                    bq[q] = (ok && b0) ? b0[k] : T(0);
                }
                const int qn = min(UQ, H - u0 - uq);  // units of this thread below H
                with_activation(act0, [&](auto a) {
                    constexpr int A = decltype(a)::id;
                    with_fanin(k0, [&](auto fan) {
                        constexpr int K0C = decltype(fan)::value;
#pragma unroll 1
                        for (int m = threadIdx.x / TPR; m < gr; m += THREADS / TPR) {
                            T xm[MAX_K0];
#pragma unroll
                            for (int j = 0; j < MAX_K0; ++j)
                                xm[j] = (K0C == 0 || j < K0C) ? xr[(r0 + m) * MAX_K0 + j] : T(0);
#pragma unroll
                            for (int q = 0; q < UQ; ++q) {
                                const T zz = z_of<K0C>(xm, wq[q], bq[q], k0);
                                // 0 past H (W1 is 0 there too)
                                scr[m * ST_LD + uq + q] = q < qn ? act_forward<A>(zz) : T(0);
                            }
                        }
                    });
                });
                cp_async_wait_all();
                __syncthreads();
                if (u0 + 16 * warp < H) {
                    const Rows<T> As{scr + 16 * warp, ST_LD};  // A(m, k) = h0(r0 + m, u0 + 16 w + k)
                    const Cols<T> Bs{stw + 16 * warp, ST_LD};  // B(k, n) = W1[c0 + n][u0 + 16 w + k]
                    warp_mma<T, MATH, FMW, FNW>(acc, As, Bs, 0, 0, mt, nt, 16);
                }
                __syncthreads();
            }
            auto store = [&](int slot) {
#pragma unroll
                for (int i = 0; i < FMW; ++i)
#pragma unroll
                    for (int j = 0; j < FNW; ++j)
#pragma unroll
                        for (int v = 0; v < 4; ++v)
                            scr[slot * SLOT + ((i * FNW + j) * 4 + v) * 32 + lane] = acc[i][j][v];
            };
            auto add = [&](int slot) {
#pragma unroll
                for (int i = 0; i < FMW; ++i)
#pragma unroll
                    for (int j = 0; j < FNW; ++j)
#pragma unroll
                        for (int v = 0; v < 4; ++v)
                            acc[i][j][v] += scr[slot * SLOT + ((i * FNW + j) * 4 + v) * 32 + lane];
            };
            if (warp >= 4) store(warp - 4);
            __syncthreads();
            if (warp < 4) add(warp);
            __syncthreads();
            if (warp == 2 || warp == 3) store(warp - 2);
            __syncthreads();
            if (warp < 2) add(warp);
            __syncthreads();
            if (warp == 1) store(0);
            __syncthreads();
            if (warp == 0) {
                add(0);
                store_frags(acc, r0, c0, mt, nt, o, ld);
            }
            __syncthreads();
        }
    }
    layer_epilogue(c, 1, t0, rows, xr_off, loss);
}

// Stage the tile's x rows: narrow -> XS [BT][K0] (ld XS_LD), wide -> XR rows xr_off.. (ld 4).
template <typename T>
__device__ __forceinline__ void stage_x(const Ctx<T>& c, i64 t0, int rows, int xr_off) {
    const int K0 = c.K0, BT = c.BT;
    if (!c.wide) {
        T* xs = c.buf(c.h(H_XS));
        const int ld = c.h(H_XS_LD);
        copy_in_flight<T>(BT * K0, [&](int e) {
            const int r = e / K0, k = e % K0;
            return r < rows ? c.x[(t0 + r) * c.sxm + (i64)k * c.sxk] : T(0);
        }, [&](int e, T v) { xs[(e / K0) * ld + e % K0] = v; });
    } else {
        T* xr = c.buf(c.h(H_XR)) + xr_off * MAX_K0;
        copy_in_flight<T>(BT * MAX_K0, [&](int e) {
            const int r = e / MAX_K0, k = e % MAX_K0;
            return (r < rows && k < K0) ? c.x[(t0 + r) * c.sxm + (i64)k * c.sxk] : T(0);
        }, [&](int e, T v) { xr[e] = v; });
    }
}

// Backward of the narrow layers for the tile, last layer first: [dW_l | db_l] into the partial
// (first: write, else add); dz_{l-1} = (dz_l W_l) * act'_{l-1}(saved) through S, written over
// the saved y_{l-1} (or into DZ1 for a wide network's layer 1); dx = dz_0 W_0 for wrt_input.
template <typename T, int MATH>
__device__ void narrow_backward(const Ctx<T>& c, i64 t0, int rows, int xr_off, bool first) {
    constexpr int FM = 2, FN = MATH == MATH_FMA ? 4 : 2;
    const int lo = c.wide ? 2 : 0;
    const int rp = pad16(rows);
    for (int l = c.L - 1; l >= lo; --l) {
        const int K = c.f(l, F_K), N = c.f(l, F_N);
        int dld = 0;
        const T* dz = c.dz_buf(l, xr_off, dld);
        const Rows<T> in = l == 0 ? Rows<T>{c.buf(c.h(H_XS)), c.h(H_XS_LD)}
                                  : Rows<T>{c.buf(c.f(l - 1, F_Y)), c.f(l - 1, F_Y_LD)};
        // dW_l (N x K) += dz^T (N x rows) in (rows x K)
        T* dw = c.part + c.f(l, F_DW);
        block_gemm<T, MATH, FM, FN>(N, K, rp, Cols<T>{dz, dld}, in,
                                    [&](auto& acc, int r0, int c0, int mt, int nt) {
            visit(acc, r0, c0, mt, nt, [&](int n, int k, T v) {
                if (n < N && k < K) put(dw + (i64)n * K + k, v, first);
            });
        });
        if (c.f(l, F_HAS_B)) {
            T* db = c.part + c.f(l, F_DB);
            #pragma unroll 1
            for (int n = threadIdx.x; n < N; n += THREADS) {
                T s = T(0);
                #pragma unroll 1
                for (int m = 0; m < rows; ++m) s += dz[m * dld + n];
                put(db + n, s, first);
            }
        }
        const Rows<T> w{c.buf(c.f(l, F_W)), c.f(l, F_W_LD)};  // B(n, k) = W[n][k]
        if (l > 0) {
            T* S = c.buf(c.h(H_S));
            const int sld = c.h(H_S_LD);
            block_gemm<T, MATH, FM, FN>(rows, K, pad8(N), Rows<T>{dz, dld}, w,
                                        [&](auto& acc, int r0, int c0, int mt, int nt) {
                store_frags(acc, r0, c0, mt, nt, S, sld);
            });
            __syncthreads();  // the dW product has read y_{l-1}; S is complete
            const int lp = l - 1;
            const int yld = c.f(lp, F_Y_LD), zo = c.f(lp, F_Z);
            const T* sv = c.buf(zo >= 0 ? zo : c.f(lp, F_Y));
            int old = 0;
            T* out = c.dz_buf(lp, xr_off, old);
            with_activation(c.f(lp, F_ACT), [&](auto a) {
                constexpr int A = decltype(a)::id;
                #pragma unroll 1
                for (int e = threadIdx.x; e < rp * K; e += THREADS) {
                    const int m = e / K, k = e % K;
                    out[m * old + k] = m < rows ? S[m * sld + k] * act_derivative<A>(sv[m * yld + k]) : T(0);
                }
            });
        } else if (c.need_dx) {
            block_gemm<T, MATH, FM, FN>(rows, K, pad8(N), Rows<T>{dz, dld}, w,
                                        [&](auto& acc, int r0, int c0, int mt, int nt) {
                visit(acc, r0, c0, mt, nt, [&](int m, int k, T v) {
                    if (m < rows && k < K) c.dx_out[(t0 + m) * K + k] = v;
                });
            });
        }
        __syncthreads();
    }
}

// Backward of a wide first layer over a super-tile of Rv rows (dz1 in DZ1, x in XR).  Warp w
// takes the groups of 32 hidden units w, w + 8, ... (lane u: unit i0 + u) and, per group,
//   (i)  dW1^T[group] += h0^T dz1: per 16 rows the lanes write h0 of their unit into the
//        warp's scratch PW, which is the A operand of one 16-deep step;
//   (ii) dh0 = dz1 W1[:, group] (16 rows at a time) into PW, then lane u forms
//        dz0 = dh0 * act0'(z0) for its unit and adds dz0 x and dz0 to its [dW0 | db0] in
//        registers; wrt_input: lane m then sums dz0 W0 over the group's units into DXW[w].
template <typename T, int MATH>
__device__ void wide_backward(const Ctx<T>& c, i64 s0, int Rv, bool first) {
    constexpr int PW_LD = 20, PWA_LD = 28, PW_SIZE = 32 * (PW_LD + PWA_LD);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int H = c.f(0, F_N), k0 = c.K0, N1 = c.f(1, F_N), act0 = c.f(0, F_ACT);
    const T* __restrict__ w0 = c.W[0];
    const T* __restrict__ b0 = c.f(0, F_HAS_B) ? c.B[0] : nullptr;
    const T* __restrict__ w1 = c.W[1];
    const T* dz1 = c.buf(c.h(H_DZ1));
    const int ld1 = c.h(H_DZ1_LD);
    const T* xr = c.buf(c.h(H_XR));
    T* pw = c.buf(c.h(H_SCR)) + warp * PW_SIZE;  // [32][PW_LD]: h0 or dh0 of 16 rows
    T* pwa = pw + 32 * PW_LD;                     // [32][PWA_LD]: the group's W1 columns
    T* dxw = c.need_dx ? c.buf(c.h(H_DXW)) + warp * c.h(H_R) * MAX_K0 : nullptr;
    T* dw1 = c.part + c.f(1, F_DW);
    T* dw0 = c.part + c.f(0, F_DW);
    T* db0 = b0 ? c.part + c.f(0, F_DB) : nullptr;
    const int rp = pad16(Rv);
    if (c.f(1, F_HAS_B)) {
        T* db1 = c.part + c.f(1, F_DB);
        #pragma unroll 1
        for (int n = threadIdx.x; n < N1; n += THREADS) {
            T s = T(0);
            #pragma unroll 1
            for (int m = 0; m < Rv; ++m) s += dz1[m * ld1 + n];
            put(db1 + n, s, first);
        }
    }
    const int MTH = (H + 15) >> 4, NT1 = (N1 + 7) >> 3;
    for (int gi = warp; gi * 32 < H; gi += WARPS) {
        const int i0 = gi * 32, mt = min(2, MTH - gi * 2);
        const int unit = i0 + lane;
        const bool own = unit < H;
        T wu[MAX_K0];
#pragma unroll
        for (int j = 0; j < MAX_K0; ++j) wu[j] = (own && j < k0) ? w0[(i64)unit * k0 + j] : T(0);
        const T bu = (own && b0) ? b0[unit] : T(0);
        // (i)
        for (int gn = 0; gn * FNW < NT1; ++gn) {
            const int c0 = gn * FNW * 8, nt = min(FNW, NT1 - gn * FNW);
            T acc[2][FNW][4];
#pragma unroll
            for (int ii = 0; ii < 2; ++ii)
#pragma unroll
                for (int j = 0; j < FNW; ++j)
#pragma unroll
                    for (int v = 0; v < 4; ++v) acc[ii][j][v] = T(0);
            for (int kb = 0; kb < rp; kb += 16) {
                with_activation(act0, [&](auto a) {
                    constexpr int A = decltype(a)::id;
                    with_fanin(k0, [&](auto fan) {
                        constexpr int K0C = decltype(fan)::value;
#pragma unroll 1
                        for (int m = 0; m < 16; ++m) {
                            T xm[MAX_K0];
#pragma unroll
                            for (int j = 0; j < MAX_K0; ++j)
                                xm[j] = (K0C == 0 || j < K0C) ? xr[(kb + m) * MAX_K0 + j] : T(0);
                            pw[lane * PW_LD + m] = own ? act_forward<A>(z_of<K0C>(xm, wu, bu, k0)) : T(0);
                        }
                    });
                });
                __syncwarp();
                warp_mma<T, MATH, 2, FNW>(acc, Rows<T>{pw, PW_LD}, Rows<T>{dz1 + kb * ld1, ld1}, 0, c0,
                                          mt, nt, 16);
                __syncwarp();
            }
            visit(acc, i0, c0, mt, nt, [&](int i, int n, T v) {
                if (i < H && n < N1) put(dw1 + (i64)n * H + i, v, first);
            });
        }
        // (ii)
        T du[MAX_K0 + 1];
#pragma unroll
        for (int j = 0; j <= MAX_K0; ++j) du[j] = T(0);
        const GlobalCols<T> aw{w1, H, H, N1};  // A(i, n) = W1[n][i]
        const Cols<T> bz{dz1, ld1};             // B(n, m) = dz1[m][n]
        const int kend1 = pad8(N1);
        // N1 <= 24 (the seed's 20): the group's W1 columns (the A operand of every row step)
        // once into the warp's PWA; wider: read from global memory (L1) at every step
        const bool keep_a = kend1 <= PWA_LD - 4;
        if (keep_a) {
#pragma unroll 1
            for (int n = 0; n < kend1; ++n)
                pwa[lane * PWA_LD + n] = (own && n < N1) ? w1[(i64)n * H + unit] : T(0);
            __syncwarp();
        }
        for (int m0 = 0; m0 < rp; m0 += 16) {
            T acc[2][2][4];
#pragma unroll
            for (int ii = 0; ii < 2; ++ii)
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int v = 0; v < 4; ++v) acc[ii][j][v] = T(0);
            if (keep_a) warp_mma<T, MATH, 2, 2>(acc, Rows<T>{pwa, PWA_LD}, bz, 0, m0, mt, 2, kend1);
            else warp_mma<T, MATH, 2, 2>(acc, aw, bz, i0, m0, mt, 2, kend1);
            store_frags(acc, 0, 0, mt, 2, pw, PW_LD);
            __syncwarp();
            with_activation(act0, [&](auto a) {
                constexpr int A = decltype(a)::id;
                with_fanin(k0, [&](auto fan) {
                    constexpr int K0C = decltype(fan)::value;
#pragma unroll 1
                    for (int m = 0; m < 16; ++m) {  // rows past Rv: dz1 and x are 0 there
                        T xm[MAX_K0];
#pragma unroll
                        for (int j = 0; j < MAX_K0; ++j)
                            xm[j] = (K0C == 0 || j < K0C) ? xr[(m0 + m) * MAX_K0 + j] : T(0);
                        const T z = z_of<K0C>(xm, wu, bu, k0);
                        const T d = own ? pw[lane * PW_LD + m] *
                                              act_derivative<A>(act_saved<A>(z, act_forward<A>(z)))
                                        : T(0);
#pragma unroll
                        for (int j = 0; j < (K0C ? K0C : MAX_K0); ++j)
                            if (K0C || j < k0) du[j] = m_fma(d, xm[j], du[j]);
                        du[MAX_K0] += d;
                        if (dxw) pw[lane * PW_LD + m] = d;
                    }
                });
            });
            if (dxw) {
                __syncwarp();
                if (lane < 16 && m0 + lane < Rv) {
                    for (int j = 0; j < k0; ++j) {
                        T s = T(0);
                        for (int u = 0; u < 32 && i0 + u < H; ++u)
                            s = m_fma(pw[u * PW_LD + lane], w0[(i64)(i0 + u) * k0 + j], s);
                        dxw[(m0 + lane) * MAX_K0 + j] += s;
                    }
                }
            }
            __syncwarp();
        }
        if (own) {
#pragma unroll
            for (int j = 0; j < MAX_K0; ++j)
                if (j < k0) put(dw0 + (i64)unit * k0 + j, du[j], first);
            if (db0) put(db0 + unit, du[MAX_K0], first);
        }
    }
    __syncthreads();
    if (dxw) {
        const T* all = c.buf(c.h(H_DXW));
        const int R = c.h(H_R);
        #pragma unroll 1
        for (int e = threadIdx.x; e < Rv * k0; e += THREADS) {
            const int m = e / k0, j = e % k0;
            T s = T(0);
            #pragma unroll 1
            for (int w = 0; w < WARPS; ++w) s += all[(w * R + m) * MAX_K0 + j];
            c.dx_out[(s0 + m) * k0 + j] = s;
        }
        __syncthreads();
    }
}

}  // namespace fz

// One value-and-gradient step (or forward, or value) of a whole network.
//   cfg: the configuration table (cuda_fused_layout: widths, activations, buffer offsets,
//     tile rows BT, super-tile rows R, rows per block, partial stride P, mode, flags)
//   x (M, K0) strided; target (M, N_out) if cfg has_t; two_scale: 2 * the loss scale
//   w0..w7, b0..b7: the layers' W (N, K) and b (N) (a 1-element dummy when absent)
//   y_out (M, N_out): the output (forward mode); dx_out (M, K0): dL/dx (wrt_input)
//   partials [slices][P]: slice s's [dW_0 | db_0 | dW_1 | ... | loss]
//   slices: how many fixed batch slices the batch is cut into (the host's FUSED_BLOCKS, 132,
//     or fewer for a small batch), independent of the card
// Persistent blocks: the grid has min(slices, SM count) blocks and block b walks the slices
// b, b + gridDim.x, ... in that order.  Slice s owns batch rows [s * rows_per_block,
// +rows_per_block) and its own partial; every slice starts from the same state (shared memory
// zero-filled, W staged again), so its bits do not depend on which block ran it or after
// which slice, i.e. not on the card's SM count.  Dynamic shared memory: cfg H_SMEM elements of T.
template <typename T, int MATH>
__global__ void __launch_bounds__(fz::THREADS, 1)
fused_mlp(const i64* __restrict__ cfg_g, const T* __restrict__ x, i64 sxm, i64 sxk, i64 M,
          const T* __restrict__ target, T two_scale,
          const T* __restrict__ w0, const T* __restrict__ w1, const T* __restrict__ w2,
          const T* __restrict__ w3, const T* __restrict__ w4, const T* __restrict__ w5,
          const T* __restrict__ w6, const T* __restrict__ w7,
          const T* __restrict__ b0, const T* __restrict__ b1, const T* __restrict__ b2,
          const T* __restrict__ b3, const T* __restrict__ b4, const T* __restrict__ b5,
          const T* __restrict__ b6, const T* __restrict__ b7,
          T* __restrict__ y_out, T* __restrict__ dx_out, T* __restrict__ partials, i64 slices) {
    using namespace fz;
    __shared__ i64 cfg[CFG_WORDS];
    __shared__ const T* ptrs[2 * MAX_LAYERS];
    __shared__ T red[WARPS];
    #pragma unroll 1
    for (int i = threadIdx.x; i < CFG_WORDS; i += THREADS) cfg[i] = cfg_g[i];
    if (threadIdx.x == 0) {
        ptrs[0] = w0; ptrs[1] = w1; ptrs[2] = w2; ptrs[3] = w3;
        ptrs[4] = w4; ptrs[5] = w5; ptrs[6] = w6; ptrs[7] = w7;
        ptrs[8] = b0; ptrs[9] = b1; ptrs[10] = b2; ptrs[11] = b3;
        ptrs[12] = b4; ptrs[13] = b5; ptrs[14] = b6; ptrs[15] = b7;
    }
    CUPYNN_DYNAMIC_SHARED(T, sm);
    __syncthreads();
    Ctx<T> c;
    c.cfg = cfg;
    c.sm = sm;
    c.W = ptrs;
    c.B = ptrs + MAX_LAYERS;
    c.x = x;
    c.sxm = sxm;
    c.sxk = sxk;
    c.target = target;
    c.two_scale = two_scale;
    c.y_out = y_out;
    c.dx_out = dx_out;
    c.L = (int)cfg[H_L];
    c.wide = (int)cfg[H_WIDE];
    c.BT = (int)cfg[H_BT];
    c.mode = (int)cfg[H_MODE];
    c.has_t = (int)cfg[H_HAS_T];
    c.need_dx = (int)cfg[H_NEED_DX];
    c.K0 = (int)cfg[H_K0];
    // Only the slice index lives across a slice: everything else is read from the shared
    // table again in each one (volatile: not hoisted into registers kept for the whole body,
    // which would push this 248-register kernel into spills).
    const volatile i64* vcfg = cfg;
    #pragma unroll 1
    for (int slice = blockIdx.x; slice < (int)slices; slice += gridDim.x) {
        c.part = partials + (i64)slice * vcfg[H_P];
        // zero-filled buffers: every padding element reads as an exact 0
        const int smem = (int)vcfg[H_SMEM];
        #pragma unroll 1
        for (int i = threadIdx.x; i < smem; i += THREADS) sm[i] = T(0);
        __syncthreads();
        // every staged W into its [ceil16(N)][W_LD] buffer
        for (int l = 0; l < c.L; ++l) {
            const int wo = c.f(l, F_W);
            if (wo < 0) continue;
            const int K = c.f(l, F_K), N = c.f(l, F_N), ld = c.f(l, F_W_LD);
            const T* w = c.W[l];
            T* dst = sm + wo;
            copy_in_flight<T>(N * K, [&](int e) { return w[e]; },
                              [&](int e, T v) { dst[(e / K) * ld + e % K] = v; });
        }
        __syncthreads();
        const i64 rpb = vcfg[H_RPB], R = vcfg[H_R];
        const bool grad = c.mode == MODE_GRAD;
        const i64 rb = (i64)slice * rpb;
        const i64 re = rb + rpb < M ? rb + rpb : M;
        T loss = T(0);
        for (i64 s0 = rb; s0 < re; s0 += R) {
            const i64 s1 = s0 + R < re ? s0 + R : re;
            if (c.wide && grad && c.need_dx) {
                T* dxw = c.buf(c.h(H_DXW));
                #pragma unroll 1
                for (int i = threadIdx.x; i < WARPS * (int)R * MAX_K0; i += THREADS) dxw[i] = T(0);
            }
            for (i64 t0 = s0; t0 < s1; t0 += c.BT) {
                const int rows = (int)(s1 - t0 < c.BT ? s1 - t0 : c.BT);
                const int xr_off = (int)(t0 - s0);
                stage_x(c, t0, rows, xr_off);
                __syncthreads();
                for (int l = c.wide ? 1 : 0; l < c.L; ++l) {
                    if (c.wide && l == 1) wide_forward<T, MATH>(c, t0, rows, xr_off, loss);
                    else narrow_forward<T, MATH>(c, l, t0, rows, xr_off, loss);
                    __syncthreads();
                }
                if (grad) narrow_backward<T, MATH>(c, t0, rows, xr_off, t0 == rb);
            }
            if (grad && c.wide) wide_backward<T, MATH>(c, s0, (int)(s1 - s0), s0 == rb);
        }
        if (c.mode != MODE_FORWARD) {  // block-uniform: every thread takes part
            const T s = warp_sum(loss);
            if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
            __syncthreads();
            if (threadIdx.x == 0) {
                T v = T(0);
                for (int w = 0; w < WARPS; ++w) v += red[w];
                c.part[cfg[H_VSLOT]] = v;
            }
        }
        __syncthreads();  // the next slice zero-fills what this one's last readers read
    }
}

// p_l without an array of pointers (which would live in local memory)
template <typename T>
__device__ __forceinline__ T* pick(int l, T* p0, T* p1, T* p2, T* p3, T* p4, T* p5, T* p6, T* p7) {
    switch (l) {
        case 0: return p0;
        case 1: return p1;
        case 2: return p2;
        case 3: return p3;
        case 4: return p4;
        case 5: return p5;
        case 6: return p6;
        default: return p7;
    }
}

// out[e] = sum over blocks b in order of partials[b][e], for e in [e0, e1): the value slot
// (times vscale) into value[0], every [dW_l | db_l] slot into dw_l / db_l (cfg offsets).
//   cfg: fused_mlp's table; partials [G][P]; value (0-d), dw0..dw7 (N_l, K_l), db0..db7 (N_l)
//   (a 1-element dummy where absent).  A thread owns one element e.
template <typename T>
__global__ void __launch_bounds__(fz::THREADS, 1)
fused_reduce(const i64* __restrict__ cfg, const T* __restrict__ partials, i64 G, i64 e0, i64 e1,
             T vscale, T* __restrict__ value,
             T* __restrict__ dw0, T* __restrict__ dw1, T* __restrict__ dw2, T* __restrict__ dw3,
             T* __restrict__ dw4, T* __restrict__ dw5, T* __restrict__ dw6, T* __restrict__ dw7,
             T* __restrict__ db0, T* __restrict__ db1, T* __restrict__ db2, T* __restrict__ db3,
             T* __restrict__ db4, T* __restrict__ db5, T* __restrict__ db6, T* __restrict__ db7) {
    using namespace fz;
    const i64 e = e0 + (i64)blockIdx.x * THREADS + threadIdx.x;
    if (e >= e1) return;
    const i64 P = cfg[H_P];
    T s = T(0);
    for (i64 b = 0; b < G; ++b) s += partials[b * P + e];
    if (e == cfg[H_VSLOT]) {
        value[0] = s * vscale;
        return;
    }
    const int L = (int)cfg[H_L];
    for (int l = 0; l < L; ++l) {
        const i64* f = cfg + HEADER + l * LAYER_WORDS;
        const i64 dw = f[F_DW], n = f[F_N], k = f[F_K], db = f[F_DB];
        if (e >= dw && e < dw + n * k) {
            pick(l, dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7)[e - dw] = s;
            return;
        }
        if (db >= 0 && e >= db && e < db + n) {
            pick(l, db0, db1, db2, db3, db4, db5, db6, db7)[e - db] = s;
            return;
        }
    }
}

}  // namespace cupynn
