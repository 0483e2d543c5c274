// gemm.cuh -- the block-tiled GEMM main loop shared by every dense kernel.
//
//   C[r, c] = sum_{k in [k_begin, k_end)} A(r, k) * B(k, c)     for one BM x BN tile
//
// A and B are *loaders*: small structs that produce operand elements on the fly (a
// strided load, the upstream gradient times act'(.), an input recomputed from a tiny
// previous layer, a column of ones...).  That is how the fusions of docs/design.md
// enter the GEMM: in the operand loads.  A loader works on a thread's whole fragment
// of a K-slice (N elements; a Frag: element q at (i0 + q*d0, i1 + q*d1), so addresses
// advance by one stride instead of being recomputed in 64-bit math per element) in
// two steps:
//
//   using Raw = ...;   what one element's global loads produce
//   unsigned load(const Frag& f, unsigned valid, Raw (&raw)[N])
//                      global loads only, for the elements whose bit is set in `valid`
//                      (the others get a zero Raw); returns a mask of its own for finish
//   void finish(const Raw (&raw)[N], unsigned valid, unsigned mine, T (&out)[N])
//                      the arithmetic (activations, loss gradient): out[q] = 0 where
//                      bit q of `valid` is clear
//
// The GEMM issues `load` for the next K-slice before multiplying the current one and
// calls `finish` after, so load latency hides behind the multiply; a runtime choice
// (which activation, a loss or not) is taken once per fragment, not per element, so
// the loads of a fragment issue together.  Out-of-range elements are 0 in shared
// memory (both operands are zero past k_end, so padding never meets a NaN).
//
// Each loader says which of its two indices is contiguous in memory (C_FAST: the
// second), and the tile loads map consecutive threads to that index (coalescing).
//
// Math modes: MATH_FMA (register-blocked FMA, TM x TN per thread, strided so that a
// warp's shared-memory reads are conflict-free and its stores coalesce), MATH_DMMA
// (float64 mma.sync m8n8k4), MATH_TF32 / MATH_3XTF32 (mma.sync m16n8k8.tf32; 3xtf32
// splits each operand into hi + lo and adds lo*hi + hi*lo + hi*hi).  Every mode holds
// BM*BN/256 accumulators per thread; `visit` hands each to the caller's epilogue
// with its tile-local (row, col).
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace cupynn {

constexpr int GEMM_THREADS = 256;

// A thread's fragment of an operand tile: element q at (i0 + q * d0, i1 + q * d1).
struct Frag {
    i64 i0, i1, d0, d1;
};

// Tile ids, shared with cuda_backend._TILES.  Fields: block tile BM x BN, K step BK,
// FMA thread tile TM x TN, MMA warp grid WM x WN (0: no MMA for this tile).
template <int TILE> struct TileShape;
template <> struct TileShape<0> {  // GEMV (N = 1): one output row per thread
    static constexpr int BM = 256, BN = 1, BK = 8, TM = 1, TN = 1, WM = 0, WN = 0; };
template <> struct TileShape<1> {  // N <= 8
    static constexpr int BM = 128, BN = 8, BK = 16, TM = 4, TN = 1, WM = 8, WN = 1; };
template <> struct TileShape<2> {  // N <= 32 (the seed's 1000 -> 20)
    static constexpr int BM = 128, BN = 32, BK = 16, TM = 8, TN = 2, WM = 4, WN = 2; };
template <> struct TileShape<3> {  // general, moderate sizes
    static constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4, WM = 2, WN = 4; };
template <> struct TileShape<4> {  // large GEMMs (the wide workload); BK 16 for float
    static constexpr int BM = 128, BN = 128, BK = 8, TM = 8, TN = 8, WM = 2, WN = 4; };
template <> struct TileShape<5> {  // the fused chain backward: K = a narrow layer's width
    static constexpr int BM = 64, BN = 64, BK = 8, TM = 4, TN = 4, WM = 2, WN = 4; };

// Resident blocks per SM a kernel is compiled for (__launch_bounds__'s second
// argument): plain-FMA float on the 64 x 64 tiles, and the forward on the N <= 32 tile
// (the seed's 1000 -> 20 at batch 1M: thousands of blocks), keep to 128 registers so
// that two blocks share an SM -- they do without spilling (python -m cupynn.sass_stats);
// everything else may use up to 255 registers at one block per SM.
template <typename T, int TILE, int MATH, bool FORWARD = false> struct MinBlocks {
    static constexpr int value =
        ((sizeof(T) == 4 && MATH == MATH_FMA && (TILE == 3 || TILE == 5)) ||
         (FORWARD && TILE == 2)) ? 2 : 1;
};

template <typename T, int TILE, int MATH> struct Gemm {
    using S = TileShape<TILE>;
    static constexpr int BM = S::BM, BN = S::BN, TM = S::TM, TN = S::TN;
    // FMA float on the big tile: a 16-deep K step (half the barriers; 35 KB for two
    // stages).  The tensor-core modes keep 8: their fragments need the registers.
    static constexpr int BK = (TILE == 4 && sizeof(T) == 4 && MATH == MATH_FMA) ? 16 : S::BK;
    static constexpr int TX = BN / TN, TY = BM / TM;  // FMA thread grid
    static constexpr int NACC = TM * TN;               // = BM * BN / 256 in every mode
    static constexpr bool MMA = (MATH != MATH_FMA) && (S::WM > 0);
    static constexpr int WM = S::WM > 0 ? S::WM : 1, WN = S::WN > 0 ? S::WN : 1;
    static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
    static constexpr int MROWS = (MATH == MATH_DMMA) ? 8 : 16;  // mma rows
    static constexpr int MI = WTM / MROWS, NI = WTN / 8;
    // Row padding of the shared tiles: keeps every row 16-byte aligned (vector reads)
    // and makes the mma fragment reads conflict-free (row stride = 8 banks mod 32).
    static constexpr int PAD = (sizeof(T) == 8) ? 4 : 8;
    // FMA: a thread's TM rows are groups of VM consecutive rows (one vector read from
    // shared memory each), the groups TY * VM apart; likewise TN columns in VN groups.
    static constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte read
    static constexpr int VM = (TM % VEC == 0) ? VEC : 1, VN = (TN % VEC == 0) ? VEC : 1;
    static_assert(VM == 1 || ((BM + PAD) * sizeof(T)) % 16 == 0, "A rows 16-byte aligned");
    static_assert(VN == 1 || (((BN + PAD) * sizeof(T)) % 16 == 0 &&
                              (2 * BK * (BM + PAD) * sizeof(T)) % 16 == 0),
                  "B rows 16-byte aligned");
    static_assert(TX * TY == GEMM_THREADS, "FMA thread grid must be 256 threads");
    static_assert(!MMA || WM * WN * 32 == GEMM_THREADS, "MMA warp grid must be 8 warps");
    static_assert(!MMA || (MI * MROWS == WTM && NI * 8 == WTN), "warp tile / mma shape");
    static_assert(!MMA || (BK % (MATH == MATH_DMMA ? 4 : 8) == 0), "BK / mma k");
    static_assert(!(MATH == MATH_DMMA) || sizeof(T) == 8, "DMMA is float64 only");
    static_assert(!(MATH == MATH_TF32 || MATH == MATH_3XTF32) || sizeof(T) == 4,
                  "tf32 modes are float32 only");

    // Two stages: the next K-slice is loaded (global -> registers) while the current
    // one is multiplied, then stored into the other stage: one barrier per K-step.
    // 16-byte aligned: the FMA path reads 16-byte vectors (a misaligned vector load
    // faults on the GPU and goes unnoticed on the CPU emulator).
    struct __align__(16) Smem {
        T a[2][BK][BM + PAD];  // A tile, k-major: a[stage][k][row]
        T b[2][BK][BN + PAD];  // B tile, k-major: b[stage][k][col]
    };
    static constexpr int NA = (BM * BK + GEMM_THREADS - 1) / GEMM_THREADS;  // per thread
    static constexpr int NB = (BK * BN + GEMM_THREADS - 1) / GEMM_THREADS;

    struct __align__(16) Vec { T v[VEC]; };

    // Row skew of the shared tiles: element (k, i) of a tile lives at column i + skew<G>(k) of
    // row k (inside the row's padding: skew <= PAD).  Why: a loader whose k index is the fast
    // one (x, dz, W^T: most of them) stores a warp's 32 elements down 16 (or 8) k rows; with
    // the row stride at 8 banks mod 32 those rows fall on 4 banks, a 4-way (BK = 8: 2-way)
    // conflict on every stash store.  The skew moves every group of four rows by a few banks;
    // since it is constant within the k quad an mma fragment reads (and along a row), the
    // fragment reads keep their banks and the skew is an immediate offset in their addresses
    // (no register).  G: elements a read keeps contiguous (1 for mma fragments; the FMA path's
    // vector width, so a 16-byte vector stays aligned).  tests/test_gpu_hardening.py's bank
    // model counts, per warp access: mma modes conflict-free everywhere; the FMA path's
    // 16-byte vectors leave its BK = 16 stores 2-way (4-way before) and make BK = 8
    // conflict-free.
    static constexpr int WAVE = 128 / (int)sizeof(T);  // lanes of one shared-memory wavefront
    template <int G> static __device__ __forceinline__ int skew(int k) {
        if constexpr (G == 1) return (k >> 2) * (WAVE / BK);
        else return ((k >> 2) & 1) * G;
    }
    static constexpr int GA = MMA ? 1 : VM, GB = MMA ? 1 : VN;  // skew granules of A, B
    // The N <= 32 tile skews A only: its forward is held to 128 registers (two blocks per SM,
    // MinBlocks) and skewing B too spills there (float64, 3xtf32); B is a fifth of its stores.
    static constexpr bool SKEW_B = TILE != 2;
    // The GEMV tile (N = 1: one output row per thread) keeps its plain layout: its loads are
    // row-fast, and skewing it cost 30 registers (3 -> 2 blocks per SM).
    static constexpr bool SKEW_A = TILE != 0;
    static_assert((BK / 4 - 1) * (WAVE / BK) <= PAD && VEC <= PAD, "the skew stays in the padding");
    static __device__ __forceinline__ int skew_a(int k) { return SKEW_A ? skew<GA>(k) : 0; }
    static __device__ __forceinline__ int skew_b(int k) { return SKEW_A && SKEW_B ? skew<GB>(k) : 0; }

    T acc[NACC];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[i] = T(0);
    }

    // Tile-local index of fragment element i of thread t, along a dimension whose
    // elements a thread holds in groups of V consecutive ones, the groups NT * V apart.
    template <int V, int NT> static __device__ __forceinline__ int frag_index(int t, int i) {
        return (i / V) * (NT * V) + t * V + (i % V);
    }
    // Tile-local row of the FMA accumulator row i (and column of j) for this thread.
    static __device__ __forceinline__ int fma_row(int ty, int i) { return frag_index<VM, TY>(ty, i); }
    static __device__ __forceinline__ int fma_col(int tx, int j) { return frag_index<VN, TX>(tx, j); }

    // dst[i] = line[frag_index<V, NT>(t, i)], with 16-byte vector reads when V > 1.
    template <int N, int V, int NT>
    static __device__ __forceinline__ void load_fragment(T (&dst)[N], const T* line, int t) {
        if constexpr (V > 1) {
#pragma unroll
            for (int i = 0; i < N; i += V) {
                const Vec v = *reinterpret_cast<const Vec*>(&line[frag_index<V, NT>(t, i)]);
#pragma unroll
                for (int u = 0; u < V; ++u) dst[i + u] = v.v[u];
            }
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) dst[i] = line[frag_index<1, NT>(t, i)];
        }
    }

    // Element e of an N0 x N1 operand tile as (i0, i1), consecutive e along the index
    // that is contiguous in memory (the second when SECOND_FAST), so loads coalesce.
    template <bool SECOND_FAST, int N0, int N1>
    static __device__ __forceinline__ void tile_coord(int e, int& i0, int& i1) {
        if constexpr (SECOND_FAST) { i1 = e % N1; i0 = e / N1; } else { i0 = e % N0; i1 = e / N0; }
    }

    // One K-slice of both operands in flight: each loader's raw loads (see the loader
    // contract at the top) and the masks of the elements in bounds (bit q: element q).
    template <class LA, class LB> struct Staged {
        typename LA::Raw a[NA];
        typename LB::Raw b[NB];
        unsigned va, vb, xa, xb;  // in bounds; the loaders' own masks
    };
    static_assert(NA <= 32 && NB <= 32, "one mask bit per fragment element");

    // The fragment of an N0 x N1 tile at (o0, o1) that thread tid loads: elements
    // e = tid + q * GEMM_THREADS split by tile_coord along the fast index, whose extent
    // divides GEMM_THREADS, so one coordinate is the same for every q and the other
    // steps by GEMM_THREADS / extent.
    template <bool SECOND_FAST, int N0, int N1>
    static __device__ __forceinline__ Frag frag_of(int tid, i64 o0, i64 o1) {
        static_assert(GEMM_THREADS % (SECOND_FAST ? N1 : N0) == 0, "fast extent divides 256");
        int a, b;
        tile_coord<SECOND_FAST, N0, N1>(tid, a, b);
        if constexpr (SECOND_FAST) return Frag{o0 + a, o1 + b, GEMM_THREADS / N1, 0};
        else return Frag{o0 + a, o1 + b, 0, GEMM_THREADS / N0};
    }

    // Bits q (of NQ) with c + q * d < lim, for d >= 0: a prefix of the fragment, so a
    // count instead of NQ 64-bit compares (d is a power of two known at compile time).
    template <int NQ>
    static __device__ __forceinline__ unsigned below(i64 c, i64 d, i64 lim) {
        constexpr unsigned ALL = NQ >= 32 ? ~0u : (1u << NQ) - 1u;
        if (d == 0) return c < lim ? ALL : 0u;
        const i64 rem = lim - c;
        const i64 n = rem <= 0 ? 0 : (rem + d - 1) / d;
        return n >= NQ ? ALL : (1u << n) - 1u;
    }

    // Bit q set where element q of fragment f is in the tile (TILE_ELEMS elements) and
    // below (lim0, lim1).
    template <int NQ, int TILE_ELEMS>
    static __device__ __forceinline__ unsigned in_bounds(const Frag& f, i64 lim0, i64 lim1) {
        return below<NQ>((int)threadIdx.x, GEMM_THREADS, TILE_ELEMS) & below<NQ>(f.i0, f.d0, lim0) &
               below<NQ>(f.i1, f.d1, lim1);
    }

    // Issue the global loads of the K-slice [kt, kt + BK): nothing waits for them here.
    template <class LA, class LB>
    __device__ __forceinline__ void load(const LA& la, const LB& lb, i64 R, i64 C, i64 r0, i64 c0,
                                         i64 kt, i64 k_end, Staged<LA, LB>& st) const {
        const int tid = threadIdx.x;
        const Frag fa = frag_of<LA::C_FAST, BM, BK>(tid, r0, kt);   // (row, k)
        const Frag fb = frag_of<LB::C_FAST, BK, BN>(tid, kt, c0);   // (k, col)
        st.va = in_bounds<NA, BM * BK>(fa, R, k_end);
        st.vb = in_bounds<NB, BK * BN>(fb, k_end, C);
        st.xa = la.load(fa, st.va, st.a);
        st.xb = lb.load(fb, st.vb, st.b);
    }

    // Turn the loaded K-slice into operand values (the loaders' finish: activations,
    // the loss gradient, ...; 0 out of bounds) and store it into shared-memory stage
    // `stage`, k-major.
    template <class LA, class LB>
    __device__ __forceinline__ void stash(const LA& la, const LB& lb, Smem& sm, int stage,
                                          Staged<LA, LB>& st) const {
        T ra[NA], rb[NB];
        la.finish(st.a, st.va, st.xa, ra);
        lb.finish(st.b, st.vb, st.xb, rb);
        const int tid = threadIdx.x;
#pragma unroll
        for (int q = 0; q < NA; ++q) {
            const int e = tid + q * GEMM_THREADS;
            int rr, kk;
            tile_coord<LA::C_FAST, BM, BK>(e, rr, kk);
            if (e < BM * BK) sm.a[stage][kk][rr + skew_a(kk)] = ra[q];
        }
#pragma unroll
        for (int q = 0; q < NB; ++q) {
            const int e = tid + q * GEMM_THREADS;
            int kk, cc;
            tile_coord<LB::C_FAST, BK, BN>(e, kk, cc);
            if (e < BK * BN) sm.b[stage][kk][cc + skew_b(kk)] = rb[q];
        }
    }

    // Accumulate rows [r0, r0+BM) x cols [c0, c0+BN) of A*B over k in [k_begin, k_end).
    // Rows >= R and cols >= C are computed from zeros and never visited.  The loads of
    // the next K-slice are issued before the current one is multiplied and finished
    // after it, so their latency hides behind the multiply.  Ends with a barrier, so
    // the caller may reuse the shared memory right after.
    template <class LA, class LB>
    __device__ __forceinline__ void run(Smem& sm, const LA& la, const LB& lb, i64 R, i64 C,
                                        i64 r0, i64 c0, i64 k_begin, i64 k_end) {
        if (k_begin >= k_end) return;
        Staged<LA, LB> st;
        load(la, lb, R, C, r0, c0, k_begin, k_end, st);
        stash(la, lb, sm, 0, st);
        __syncthreads();
        int stage = 0;
        for (i64 kt = k_begin; kt < k_end; kt += BK) {
            // Unconditional, so the loads and the multiply share one basic block: past
            // the last slice every mask is empty (no load issues) and the spare stage
            // gets zeros.
            load(la, lb, R, C, r0, c0, kt + BK, k_end, st);
            compute(sm, stage);
            stash(la, lb, sm, stage ^ 1, st);
            __syncthreads();
            stage ^= 1;
        }
    }

    __device__ __forceinline__ void compute(const Smem& sm, int stage) {
        if constexpr (!MMA) {
            const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                T a[TM], b[TN];
                load_fragment<TM, VM, TY>(a, sm.a[stage][kk] + skew_a(kk), ty);
                load_fragment<TN, VN, TX>(b, sm.b[stage][kk] + skew_b(kk), tx);
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i * TN + j] = m_fma(a[i], b[j], acc[i * TN + j]);
            }
        } else {
            compute_mma(sm, stage);
        }
    }

    __device__ __forceinline__ void compute_mma(const Smem& sm, int stage) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int wr = (warp % WM) * WTM, wc = (warp / WM) * WTN;
        const int g = lane >> 2, t = lane & 3;
        if constexpr (MATH == MATH_DMMA) {
#pragma unroll
            for (int kk = 0; kk < BK; kk += 4) {
                double a[MI], b[NI];
                // A fragment (8x4, row): lane holds A(g, t); B (4x8, col): B(t, g).  Rows
                // kk..kk+3 share one skew (kk % 4 == 0): a constant offset.
                const int ga = g + skew_a(kk), gb = g + skew_b(kk);
#pragma unroll
                for (int i = 0; i < MI; ++i) a[i] = sm.a[stage][kk + t][wr + i * 8 + ga];
#pragma unroll
                for (int j = 0; j < NI; ++j) b[j] = sm.b[stage][kk + t][wc + j * 8 + gb];
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NI; ++j) {
                        double* c = &acc[(i * NI + j) * 2];
                        double d[2];
                        const double cin[2] = {c[0], c[1]};
                        mma_m8n8k4_f64(d, a[i], b[j], cin);
                        c[0] = d[0];
                        c[1] = d[1];
                    }
            }
        } else {  // tf32 / 3xtf32, m16n8k8
#pragma unroll
            for (int kk = 0; kk < BK; kk += 8) {
                unsigned ah[MI][4], al[MI][4], bh[NI][2], bl[NI][2];
                // rows kk..kk+3 and kk+4..kk+7 each share one skew (constant offsets)
                const int g0 = g + skew_a(kk), g4 = g + skew_a(kk + 4);
                const int h0 = g + skew_b(kk), h4 = g + skew_b(kk + 4);
#pragma unroll
                for (int i = 0; i < MI; ++i) {
                    // A fragment (16x8, row): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
                    const float v[4] = {sm.a[stage][kk + t][wr + i * 16 + g0],
                                        sm.a[stage][kk + t][wr + i * 16 + g0 + 8],
                                        sm.a[stage][kk + t + 4][wr + i * 16 + g4],
                                        sm.a[stage][kk + t + 4][wr + i * 16 + g4 + 8]};
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        if constexpr (MATH == MATH_3XTF32) split_tf32(v[q], ah[i][q], al[i][q]);
                        else ah[i][q] = f32_to_tf32(v[q]);
                    }
                }
#pragma unroll
                for (int j = 0; j < NI; ++j) {
                    // B fragment (8x8, col): b0 (k = t, n = g), b1 (k = t+4, n = g)
                    const float v[2] = {sm.b[stage][kk + t][wc + j * 8 + h0], sm.b[stage][kk + t + 4][wc + j * 8 + h4]};
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                        if constexpr (MATH == MATH_3XTF32) split_tf32(v[q], bh[j][q], bl[j][q]);
                        else bh[j][q] = f32_to_tf32(v[q]);
                    }
                }
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NI; ++j) {
                        float* c = &acc[(i * NI + j) * 4];
                        float d[4];
                        float cin[4] = {c[0], c[1], c[2], c[3]};
                        if constexpr (MATH == MATH_3XTF32) {
                            // small terms first: lo*hi + hi*lo, then hi*hi
                            mma_m16n8k8_tf32(d, al[i], bh[j], cin);
                            cin[0] = d[0]; cin[1] = d[1]; cin[2] = d[2]; cin[3] = d[3];
                            mma_m16n8k8_tf32(d, ah[i], bl[j], cin);
                            cin[0] = d[0]; cin[1] = d[1]; cin[2] = d[2]; cin[3] = d[3];
                        }
                        mma_m16n8k8_tf32(d, ah[i], bh[j], cin);
                        c[0] = d[0]; c[1] = d[1]; c[2] = d[2]; c[3] = d[3];
                    }
            }
        }
    }

    // Call f(row, col, value) for every accumulator this thread holds (tile-local
    // coordinates; the caller checks them against the problem bounds).
    template <class F> __device__ __forceinline__ void visit(F&& f) const {
        if constexpr (!MMA) {
            const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) f(fma_row(ty, i), fma_col(tx, j), acc[i * TN + j]);
        } else {
            const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
            const int wr = (warp % WM) * WTM, wc = (warp / WM) * WTN;
            const int g = lane >> 2, t = lane & 3;
            if constexpr (MATH == MATH_DMMA) {
                // C fragment (8x8): lane holds C(g, 2t) and C(g, 2t+1)
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NI; ++j)
#pragma unroll
                        for (int q = 0; q < 2; ++q)
                            f(wr + i * 8 + g, wc + j * 8 + 2 * t + q, acc[(i * NI + j) * 2 + q]);
            } else {
                // C fragment (16x8): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NI; ++j)
#pragma unroll
                        for (int q = 0; q < 4; ++q)
                            f(wr + i * 16 + g + 8 * (q >> 1), wc + j * 8 + 2 * t + (q & 1),
                              acc[(i * NI + j) * 4 + q]);
            }
        }
    }
};

}  // namespace cupynn
