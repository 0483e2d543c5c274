// mma.cuh -- warp-level tensor-core wrappers (mma.sync) and their fragment layouts.
//
// Each wrapper is one inline-PTX instruction written once, through CUPYNN_PTX (ptx.cuh): NVRTC
// gets it as `asm volatile`, and the emulator (g++ -DCUPYNN_EMULATE) executes the very same
// instruction text and operand list with its PTX interpreter, which checks the operands
// against the PTX ISA and computes with the per-lane fragment layouts below.  So a wrapper
// with a swapped or miscounted operand, and a kernel that puts a value in the wrong lane,
// compute the wrong product on the CPU exactly as on the GPU.
// CUPYNN_MMA_REFERENCE selects a second implementation built only from __shfl_sync (pure
// kernel dialect, same layouts), to run on a GPU and compare with the hardware instruction
// (tests/test_emulator_mma.py does this where a GPU exists).
//
// All wrappers must be called by the 32 lanes of a warp together (converged, full mask).
// "lane" below is the lane id 0..31 of the calling thread (linear thread id % 32).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m8n8k4 with .f64" and
// "Matrix Fragments for mma.m16n8k8", .tf32), with g = lane >> 2 ("groupID") and
// t = lane & 3 ("threadID_in_group"):
//
//   m8n8k4 f64      D(8x8) = A(8x4, row-major) * B(4x8, col-major) + C(8x8)
//     A: a          -> A[g][t]
//     B: b          -> B[t][g]                      (k = t, n = g)
//     C/D: c[i]     -> C[g][2t + i],  i = 0, 1
//
//   m16n8k8 tf32    D(16x8) = A(16x8, row) * B(8x8, col) + C(16x8), f32 accumulate
//     A: a[i]       -> A[g + 8*(i & 1)][t + 4*(i >> 1)],  i = 0..3
//                      (a0: (g, t), a1: (g+8, t), a2: (g, t+4), a3: (g+8, t+4))
//     B: b[i]       -> B[t + 4*i][g],  i = 0, 1
//     C/D: c[i]     -> C[g + 8*(i >> 1)][2t + (i & 1)],  i = 0..3
//                      (c0: (g, 2t), c1: (g, 2t+1), c2: (g+8, 2t), c3: (g+8, 2t+1))
//
//   m16n8k{4,8,16} f64 (sm_90; kernels/fused.cu), K = 4, 8 or 16, D(16x8) = A(16xK) * B(Kx8) + C
//     A: a[v]       -> A[g + 8*(v & 1)][t + 4*(v >> 1)],  v < K/2
//     B: b[v]       -> B[t + 4*v][g],                     v < K/4
//     C/D: c[v]     -> C[g + 8*(v >> 1)][2t + (v & 1)],   v < 4
//   ("the m16n8 layout": for K = 8 it is the tf32 m16n8k8 layout above, element for element.)
//   Every 8x8x4 block of it is an m8n8k4 fragment: rows 8r.., k 4q.. of A are a[r + 2q], k 4q..
//   of B is b[q], rows 8r.. of C are c[2r], c[2r + 1] -- so on sm_80, which has no m16n8k*.f64,
//   mma_m16n8_f64 issues K/4 x 2 mma.m8n8k4 on the same registers, and a kernel written for the
//   m16n8 layout runs unchanged on both.  sm_90 assembles m16n8k16 to one DMMA.16x8x16 (a
//   sixteenth of the matrix and fragment instructions per flop of m8n8k4); tf32 k16 steps are
//   two m16n8k8 on halves of the same registers (mma_m16n8k16_tf32).
//
// The helpers mma_*_row/col(lane[, i]) below return exactly these indices; kernels and tests
// use them instead of repeating the formulas.
//
// TF32: the tensor core reads only the top 19 bits (sign, 8 exponent, 10 mantissa) of each
// .tf32 operand register and ignores the low 13 bits (truncation).  Round explicitly with
// f32_to_tf32 (cvt.rna: round to nearest, ties away from zero) before the mma for "tf32"
// mode; split_tf32 gives hi + lo for "3xtf32" (a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi).
#pragma once

#include "ptx.cuh"

namespace cupynn {

// ---- lane -> (row, col) of every fragment element -------------------------------------
__device__ __forceinline__ int mma_f64_a_row(int lane) { return lane >> 2; }
__device__ __forceinline__ int mma_f64_a_col(int lane) { return lane & 3; }
__device__ __forceinline__ int mma_f64_b_row(int lane) { return lane & 3; }   // k
__device__ __forceinline__ int mma_f64_b_col(int lane) { return lane >> 2; }  // n
__device__ __forceinline__ int mma_f64_c_row(int lane, int i) { (void)i; return lane >> 2; }
__device__ __forceinline__ int mma_f64_c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

__device__ __forceinline__ int mma_tf32_a_row(int lane, int i) { return (lane >> 2) + 8 * (i & 1); }
__device__ __forceinline__ int mma_tf32_a_col(int lane, int i) { return (lane & 3) + 4 * (i >> 1); }
__device__ __forceinline__ int mma_tf32_b_row(int lane, int i) { return (lane & 3) + 4 * i; }  // k
__device__ __forceinline__ int mma_tf32_b_col(int lane, int i) { (void)i; return lane >> 2; }  // n
__device__ __forceinline__ int mma_tf32_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
__device__ __forceinline__ int mma_tf32_c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

__device__ __forceinline__ int mma_m16n8_a_row(int lane, int v) { return (lane >> 2) + 8 * (v & 1); }
__device__ __forceinline__ int mma_m16n8_a_col(int lane, int v) { return (lane & 3) + 4 * (v >> 1); }
__device__ __forceinline__ int mma_m16n8_b_row(int lane, int v) { return (lane & 3) + 4 * v; }  // k
__device__ __forceinline__ int mma_m16n8_b_col(int lane, int v) { (void)v; return lane >> 2; }  // n
__device__ __forceinline__ int mma_m16n8_c_row(int lane, int v) { return (lane >> 2) + 8 * (v >> 1); }
__device__ __forceinline__ int mma_m16n8_c_col(int lane, int v) { return 2 * (lane & 3) + (v & 1); }

#if defined(CUPYNN_MMA_REFERENCE)
// ---- reference implementation: shuffles only -------------------------------------------

__device__ __forceinline__ int mma_ref_lane_id() {
    return (int)((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u);
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, round half away from zero (adding half an ulp of
// tf32 to the magnitude bits and truncating does exactly that; a carry into the exponent
// rounds up to the next binade or to infinity, as the hardware does).  NaN -> canonical NaN.
__device__ __forceinline__ unsigned f32_to_tf32(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) {
        return (u & 0x007fffffu) ? 0x7fffffffu : u;  // NaN : +-inf
    }
    return (u + 0x1000u) & 0xffffe000u;
}

__device__ __forceinline__ float mma_ref_tf32_value(unsigned r) {
    return __uint_as_float(r & 0xffffe000u);  // the tensor core ignores the low 13 bits
}

// D = A * B + C for one 8x8x4 f64 tile; products accumulated with fma in k order.
__device__ __forceinline__ void mma_m8n8k4_f64(double (&d)[2], double a, double b,
                                               const double (&c)[2]) {
    const int lane = mma_ref_lane_id();
    const int g = lane >> 2, t = lane & 3;
    double acc0 = c[0], acc1 = c[1];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const double a_gk = __shfl_sync(0xffffffffu, a, g * 4 + k);            // A[g][k]
        const double b_k0 = __shfl_sync(0xffffffffu, b, (2 * t) * 4 + k);      // B[k][2t]
        const double b_k1 = __shfl_sync(0xffffffffu, b, (2 * t + 1) * 4 + k);  // B[k][2t+1]
        acc0 = fma(a_gk, b_k0, acc0);
        acc1 = fma(a_gk, b_k1, acc1);
    }
    d[0] = acc0;
    d[1] = acc1;
}

// D = A * B + C for one 16x8x8 tf32 tile with f32 accumulation.  The products of two tf32
// values are exact in float; they are summed in double and rounded once (the hardware's
// internal accumulation order is unspecified, so results agree to ~1 ulp of float).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const unsigned (&a)[4],
                                                 const unsigned (&b)[2], const float (&c)[4]) {
    const int lane = mma_ref_lane_id();
    const int g = lane >> 2, t = lane & 3;
    double acc[4] = {c[0], c[1], c[2], c[3]};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // k = j (registers a0/a1, b0) and k = j + 4 (a2/a3, b1)
        const int src_a = g * 4 + j;
        const float a_g_j = mma_ref_tf32_value(__shfl_sync(0xffffffffu, a[0], src_a));
        const float a_g8_j = mma_ref_tf32_value(__shfl_sync(0xffffffffu, a[1], src_a));
        const float a_g_j4 = mma_ref_tf32_value(__shfl_sync(0xffffffffu, a[2], src_a));
        const float a_g8_j4 = mma_ref_tf32_value(__shfl_sync(0xffffffffu, a[3], src_a));
        const int src_b0 = (2 * t) * 4 + j, src_b1 = (2 * t + 1) * 4 + j;
        const float b_j_n0 = mma_ref_tf32_value(__shfl_sync(0xffffffffu, b[0], src_b0));
        const float b_j4_n0 = mma_ref_tf32_value(__shfl_sync(0xffffffffu, b[1], src_b0));
        const float b_j_n1 = mma_ref_tf32_value(__shfl_sync(0xffffffffu, b[0], src_b1));
        const float b_j4_n1 = mma_ref_tf32_value(__shfl_sync(0xffffffffu, b[1], src_b1));
        acc[0] += (double)a_g_j * b_j_n0 + (double)a_g_j4 * b_j4_n0;     // C[g][2t]
        acc[1] += (double)a_g_j * b_j_n1 + (double)a_g_j4 * b_j4_n1;     // C[g][2t+1]
        acc[2] += (double)a_g8_j * b_j_n0 + (double)a_g8_j4 * b_j4_n0;   // C[g+8][2t]
        acc[3] += (double)a_g8_j * b_j_n1 + (double)a_g8_j4 * b_j4_n1;   // C[g+8][2t+1]
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = (float)acc[i];
}

#if __CUDA_ARCH__ >= 900
// D = A * B + C for one 16x8xK f64 tile (K = 4, 8, 16) in the m16n8 layout; products
// accumulated with fma in k order.  (On sm_80 the composition below is emulated instead, so
// the CPU runs the same m8n8k4 sequence as that GPU.)
template <int K>
__device__ __forceinline__ void mma_m16n8_f64(double (&d)[4], const double (&a)[K / 2],
                                              const double (&b)[K / 4], const double (&c)[4]) {
    static_assert(K == 4 || K == 8 || K == 16, "m16n8k4, k8 or k16");
    const int lane = mma_ref_lane_id();
    const int g = lane >> 2, t = lane & 3;
    double acc[4] = {c[0], c[1], c[2], c[3]};
#pragma unroll
    for (int k = 0; k < K; ++k) {
        // A[r][k] is register (r >> 3) + 2 * (k >> 2) of lane 4 * (r & 7) + (k & 3);
        // B[k][n] is register k >> 2 of lane 4 * n + (k & 3).
        const double a_g = __shfl_sync(0xffffffffu, a[2 * (k >> 2)], g * 4 + (k & 3));       // A[g][k]
        const double a_g8 = __shfl_sync(0xffffffffu, a[1 + 2 * (k >> 2)], g * 4 + (k & 3));  // A[g+8][k]
        const double b_0 = __shfl_sync(0xffffffffu, b[k >> 2], (2 * t) * 4 + (k & 3));       // B[k][2t]
        const double b_1 = __shfl_sync(0xffffffffu, b[k >> 2], (2 * t + 1) * 4 + (k & 3));   // B[k][2t+1]
        acc[0] = fma(a_g, b_0, acc[0]);
        acc[1] = fma(a_g, b_1, acc[1]);
        acc[2] = fma(a_g8, b_0, acc[2]);
        acc[3] = fma(a_g8, b_1, acc[3]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = acc[i];
}
#define CUPYNN_MMA_M16N8_F64_DONE 1
#endif

#else
// ---- the tensor-core instructions (GPU: asm; emulator: the PTX interpreter) ----------------

__device__ __forceinline__ unsigned f32_to_tf32(float x) {
    unsigned r;
    CUPYNN_PTX("cvt.rna.tf32.f32 %0, %1;", (CUPYNN_OUT(r, r)), (CUPYNN_IN(f, x)));
    return r;
}

__device__ __forceinline__ void mma_m8n8k4_f64(double (&d)[2], double a, double b,
                                               const double (&c)[2]) {
    CUPYNN_PTX("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %5};\n",
               (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1])),
               (CUPYNN_IN(d, a), CUPYNN_IN(d, b), CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1])));
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const unsigned (&a)[4],
                                                 const unsigned (&b)[2], const float (&c)[4]) {
    CUPYNN_PTX("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n",
               (CUPYNN_OUT(f, d[0]), CUPYNN_OUT(f, d[1]), CUPYNN_OUT(f, d[2]), CUPYNN_OUT(f, d[3])),
               (CUPYNN_IN(r, a[0]), CUPYNN_IN(r, a[1]), CUPYNN_IN(r, a[2]), CUPYNN_IN(r, a[3]),
                CUPYNN_IN(r, b[0]), CUPYNN_IN(r, b[1]),
                CUPYNN_IN(f, c[0]), CUPYNN_IN(f, c[1]), CUPYNN_IN(f, c[2]), CUPYNN_IN(f, c[3])));
}

#if __CUDA_ARCH__ >= 900
template <int K>
__device__ __forceinline__ void mma_m16n8_f64(double (&d)[4], const double (&a)[K / 2],
                                              const double (&b)[K / 4], const double (&c)[4]) {
    static_assert(K == 4 || K == 8 || K == 16, "m16n8k4, k8 or k16");
    if constexpr (K == 16) {
        CUPYNN_PTX("mma.sync.aligned.m16n8k16.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, "
                   "{%4, %5, %6, %7, %8, %9, %10, %11}, {%12, %13, %14, %15}, {%16, %17, %18, %19};\n",
                   (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1]), CUPYNN_OUT(d, d[2]), CUPYNN_OUT(d, d[3])),
                   (CUPYNN_IN(d, a[0]), CUPYNN_IN(d, a[1]), CUPYNN_IN(d, a[2]), CUPYNN_IN(d, a[3]),
                    CUPYNN_IN(d, a[4]), CUPYNN_IN(d, a[5]), CUPYNN_IN(d, a[6]), CUPYNN_IN(d, a[7]),
                    CUPYNN_IN(d, b[0]), CUPYNN_IN(d, b[1]), CUPYNN_IN(d, b[2]), CUPYNN_IN(d, b[3]),
                    CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1]), CUPYNN_IN(d, c[2]), CUPYNN_IN(d, c[3])));
    } else if constexpr (K == 8) {
        CUPYNN_PTX("mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, "
                   "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n",
                   (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1]), CUPYNN_OUT(d, d[2]), CUPYNN_OUT(d, d[3])),
                   (CUPYNN_IN(d, a[0]), CUPYNN_IN(d, a[1]), CUPYNN_IN(d, a[2]), CUPYNN_IN(d, a[3]),
                    CUPYNN_IN(d, b[0]), CUPYNN_IN(d, b[1]),
                    CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1]), CUPYNN_IN(d, c[2]), CUPYNN_IN(d, c[3])));
    } else {
        CUPYNN_PTX("mma.sync.aligned.m16n8k4.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, "
                   "{%4, %5}, {%6}, {%7, %8, %9, %10};\n",
                   (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1]), CUPYNN_OUT(d, d[2]), CUPYNN_OUT(d, d[3])),
                   (CUPYNN_IN(d, a[0]), CUPYNN_IN(d, a[1]), CUPYNN_IN(d, b[0]),
                    CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1]), CUPYNN_IN(d, c[2]), CUPYNN_IN(d, c[3])));
    }
}
#define CUPYNN_MMA_M16N8_F64_DONE 1
#endif
#endif

#ifndef CUPYNN_MMA_M16N8_F64_DONE
// sm_80 (and the emulator compiled for it): the m16n8 tile as K/4 x 2 m8n8k4 on the same
// registers (see the layout note at the top), rows 0-7 then rows 8-15, k in order.
template <int K>
__device__ __forceinline__ void mma_m16n8_f64(double (&d)[4], const double (&a)[K / 2],
                                              const double (&b)[K / 4], const double (&c)[4]) {
    static_assert(K == 4 || K == 8 || K == 16, "m16n8k4, k8 or k16");
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        double acc[2] = {c[2 * r], c[2 * r + 1]};
#pragma unroll
        for (int q = 0; q < K / 4; ++q) {
            double out[2];
            mma_m8n8k4_f64(out, a[r + 2 * q], b[q], acc);
            acc[0] = out[0];
            acc[1] = out[1];
        }
        d[2 * r] = acc[0];
        d[2 * r + 1] = acc[1];
    }
}
#endif
#undef CUPYNN_MMA_M16N8_F64_DONE

// One 16x8x16 tf32 step in the m16n8 layout: two m16n8k8 on halves of the registers
// (a[0..3], b[0..1]: k 0-7; a[4..7], b[2..3]: k 8-15).  The operands are tf32 bit patterns
// (f32_to_tf32 / split_tf32).
__device__ __forceinline__ void mma_m16n8k16_tf32(float (&d)[4], const unsigned (&a)[8],
                                                  const unsigned (&b)[4], const float (&c)[4]) {
    const unsigned a0[4] = {a[0], a[1], a[2], a[3]}, a1[4] = {a[4], a[5], a[6], a[7]};
    const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    float mid[4];
    mma_m16n8k8_tf32(mid, a0, b0, c);
    mma_m16n8k8_tf32(d, a1, b1, mid);
}

// x ~ hi + lo with both parts tf32 (for 3xtf32: A*B ~ Ahi*Bhi + Ahi*Blo + Alo*Bhi).
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
    hi = f32_to_tf32(x);
    lo = f32_to_tf32(x - __uint_as_float(hi));
}

}  // namespace cupynn
