// cuda_emu.h -- the CUDA kernel dialect of kernels/README.md, on the CPU.
//
// Force-included (g++ -include cuda_emu.h -DCUPYNN_EMULATE) in front of kernels/*.cu.
// Every CUDA thread of a block is a fiber; the fibers of a block run on one OS thread and
// switch only inside __syncthreads / warp collectives / mma.sync, in the order of the launch's
// schedule (default, reversed, rotated, seeded random: cupynn.emulator.schedule), so the
// execution is deterministic for a given schedule.
//   * __shared__ variables are `static thread_local`: one copy per OS thread, and an OS
//     thread runs one block at a time (blocks run in parallel on several OS threads); the
//     runtime fills them with 0xff bytes (NaN) before every block.
//   * Inline PTX written with CUPYNN_PTX (kernels/ptx.cuh) reaches the runtime's PTX
//     interpreter (cupynn_emu_ptx) as the instruction text plus its operands (ptx_in/ptx_out).
//   * CUPYNN_DYNAMIC_SHARED(T, name) points at a fresh exact-size heap buffer per block,
//     filled with 0xff bytes (NaN / -1) so that reading it before writing shows.
//   * __syncthreads is a barrier of the block's fibers (threads that returned count as
//     arrived, as on the hardware); warp shuffles / votes / __syncwarp exchange values among
//     the lanes named in the mask and check that every one of them takes part.
//   * Errors (deadlock, a lane missing from a collective, bad mask/width) abort the launch
//     with a message; Python raises cupynn.emulator.EmulatorError.
// The runtime lives in cuda_emu_runtime.cpp (compiled without ThreadSanitizer
// instrumentation in "thread" mode, so only kernel code is race-checked).
#pragma once
#ifndef CUPYNN_EMU_H_
#define CUPYNN_EMU_H_

#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------
// Part 1: types and the runtime interface (shared with cuda_emu_runtime.cpp)
// ---------------------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

namespace cupynn_emu {

// What the kernel sees as its built-in variables; one per fiber.
struct ThreadRegs {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

enum ParamKind : int { KIND_NONE = 0, KIND_PTR = 1, KIND_SINT = 2, KIND_UINT = 3, KIND_FLOAT = 4,
                       KIND_OTHER = 5 };

// One kernel parameter as Python needs it to check an argument.
struct ParamInfo {
    int kind;          // ParamKind of the parameter itself
    int size;          // sizeof(parameter)
    int pointee_kind;  // for pointers: ParamKind of *p (KIND_NONE for void)
    int pointee_size;  // for pointers: sizeof(*p) (0 for void)
    int pointee_const; // for pointers: 1 if *p is const
};

typedef void (*LaunchShim)(void** argv);

// One operand of an inline-PTX statement run by the emulator's interpreter (CUPYNN_PTX in
// kernels/ptx.cuh): the asm constraint letter, and the C++ expression's type and value (for
// an output: where the result goes).
struct PtxOperand {
    char constraint;          // 'd' (.f64), 'f' (.f32), 'r' (32-bit), 'l' (64-bit), 'h', 'n' (immediate)
    char is_output;
    signed char cxx_kind;     // ParamKind of the C++ expression
    signed char cxx_size;     // its sizeof
    void* out;                // outputs: the lvalue
    unsigned long long bits;  // inputs: the value's bytes
};

struct KernelDesc {
    const char* name;          // the name expression
    LaunchShim run;            // calls the kernel with argv unpacked into typed parameters
    int nparams;
    const ParamInfo* params;
};

}  // namespace cupynn_emu

extern "C" {
extern __thread cupynn_emu::ThreadRegs* cupynn_emu_regs;  // the running fiber's registers
void cupynn_emu_syncthreads(void);
void cupynn_emu_syncwarp(unsigned mask);
unsigned long long cupynn_emu_shfl(unsigned mask, unsigned long long value, int mode, int b,
                                   int c);
unsigned cupynn_emu_vote(unsigned mask, int pred, int mode);
void* cupynn_emu_dynamic_smem(void);
void cupynn_emu_fail(const char* message);
unsigned long long cupynn_emu_cvta_shared(const void* p);
void cupynn_emu_ptx(const char* text, int arch, const cupynn_emu::PtxOperand* ops, int nout, int nin);
int cupynn_emu_launch(const cupynn_emu::KernelDesc* kernel, const unsigned* grid,
                      const unsigned* block, unsigned long long shared_mem, void** argv,
                      const long long* arg_nbytes, int nargs, char* err, unsigned long long errlen,
                      const long long* config);
}

namespace cupynn_emu {
enum ShflMode : int { SHFL_IDX = 0, SHFL_UP = 1, SHFL_DOWN = 2, SHFL_BFLY = 3 };
enum VoteMode : int { VOTE_BALLOT = 0, VOTE_ANY = 1, VOTE_ALL = 2 };
}  // namespace cupynn_emu

#ifndef CUPYNN_EMU_RUNTIME
// ---------------------------------------------------------------------------------------
// Part 2: the dialect (kernel translation units only)
// ---------------------------------------------------------------------------------------
#ifndef CUPYNN_EMULATE
#define CUPYNN_EMULATE 1
#endif
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800  // everything here is "device code"; -arch=sm_XY sets XY0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __constant__ static

#define threadIdx (::cupynn_emu_regs->thread_idx)
#define blockIdx (::cupynn_emu_regs->block_idx)
#define blockDim (::cupynn_emu_regs->block_dim)
#define gridDim (::cupynn_emu_regs->grid_dim)
#define warpSize 32

#define CUPYNN_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::cupynn_emu_dynamic_smem())

inline void __syncthreads() { cupynn_emu_syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cupynn_emu_syncwarp(mask); }
inline void __trap() { cupynn_emu_fail("__trap() called"); }

namespace cupynn_emu {
template <class T>
struct is_shuffle_type
    : std::integral_constant<bool, std::is_same<T, int>::value || std::is_same<T, unsigned>::value ||
                                       std::is_same<T, long>::value ||
                                       std::is_same<T, unsigned long>::value ||
                                       std::is_same<T, long long>::value ||
                                       std::is_same<T, unsigned long long>::value ||
                                       std::is_same<T, float>::value ||
                                       std::is_same<T, double>::value> {};

template <class T>
inline T shfl(unsigned mask, T var, int mode, int b, int c) {
    static_assert(is_shuffle_type<T>::value,
                  "CUDA shuffles take int, unsigned, long long, unsigned long long, float, double");
    unsigned long long bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = cupynn_emu_shfl(mask, bits, mode, b, c);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace cupynn_emu

// The `c` operand is built as the CUDA headers do: (32 - width) << 8 is the segment mask,
// the low bits the clamp lane (0x1f, or 0 for shfl.up).
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    return cupynn_emu::shfl(mask, var, cupynn_emu::SHFL_IDX, srcLane, ((32 - width) << 8) | 0x1f);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return cupynn_emu::shfl(mask, var, cupynn_emu::SHFL_UP, (int)delta, (32 - width) << 8);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return cupynn_emu::shfl(mask, var, cupynn_emu::SHFL_DOWN, (int)delta,
                            ((32 - width) << 8) | 0x1f);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    return cupynn_emu::shfl(mask, var, cupynn_emu::SHFL_BFLY, laneMask, ((32 - width) << 8) | 0x1f);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return cupynn_emu_vote(mask, pred, cupynn_emu::VOTE_BALLOT);
}
inline int __any_sync(unsigned mask, int pred) {
    return (int)cupynn_emu_vote(mask, pred, cupynn_emu::VOTE_ANY);
}
inline int __all_sync(unsigned mask, int pred) {
    return (int)cupynn_emu_vote(mask, pred, cupynn_emu::VOTE_ALL);
}

template <class T>
inline T __ldg(const T* p) { return *p; }

// A 32-bit shared-window address, as on the GPU; under the emulator a handle that the PTX
// interpreter maps back to the pointer (and a pointer outside shared memory is an error).
inline unsigned long long __cvta_generic_to_shared(const void* p) { return cupynn_emu_cvta_shared(p); }

// ---- inline PTX: the operands of CUPYNN_PTX (kernels/ptx.cuh) ---------------------------
namespace cupynn_emu {
template <class T>
constexpr int expr_kind() {
    using U = typename std::remove_cv<typename std::remove_reference<T>::type>::type;
    if constexpr (std::is_pointer<U>::value) return KIND_PTR;
    else if constexpr (std::is_floating_point<U>::value) return KIND_FLOAT;
    else if constexpr (std::is_same<U, bool>::value) return KIND_OTHER;
    else if constexpr (std::is_integral<U>::value) return std::is_signed<U>::value ? KIND_SINT : KIND_UINT;
    else return KIND_OTHER;
}
template <class T>
inline PtxOperand ptx_in(char c, const T& x) {
    static_assert(sizeof(T) <= 8, "an inline-PTX operand is at most 64 bits");
    PtxOperand o{c, 0, (signed char)expr_kind<T>(), (signed char)sizeof(T), nullptr, 0};
    memcpy(&o.bits, &x, sizeof(T));
    return o;
}
template <class T>
inline PtxOperand ptx_out(char c, T& x) {
    static_assert(sizeof(T) <= 8, "an inline-PTX operand is at most 64 bits");
    static_assert(!std::is_const<T>::value, "an inline-PTX output must be a modifiable lvalue");
    return PtxOperand{c, 1, (signed char)expr_kind<T>(), (signed char)sizeof(T), (void*)&x, 0};
}
// Outputs are %0.., inputs follow (GCC extended-asm numbering).
inline void ptx_exec(const char* text, std::initializer_list<PtxOperand> outs,
                     std::initializer_list<PtxOperand> ins) {
    PtxOperand ops[32];
    int n = 0;
    for (const PtxOperand& o : outs) if (n < 32) ops[n++] = o;
    const int nout = n;
    for (const PtxOperand& o : ins) if (n < 32) ops[n++] = o;
    cupynn_emu_ptx(text, __CUDA_ARCH__, ops, nout, n - nout);
}
}  // namespace cupynn_emu

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }

// CUDA's global min/max overloads (device code may call them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }

// ---------------------------------------------------------------------------------------
// Part 3: launch shims and parameter tables, used by the generated module source
// ---------------------------------------------------------------------------------------
namespace cupynn_emu {

template <class T>
constexpr int kind_of() {
    if constexpr (std::is_void<T>::value) return KIND_NONE;
    else if constexpr (std::is_pointer<T>::value) return KIND_PTR;
    else if constexpr (std::is_floating_point<T>::value) return KIND_FLOAT;
    else if constexpr (std::is_same<T, bool>::value) return KIND_UINT;
    else if constexpr (std::is_integral<T>::value) return std::is_signed<T>::value ? KIND_SINT : KIND_UINT;
    else if constexpr (std::is_enum<T>::value) return kind_of<typename std::underlying_type<T>::type>();
    else return KIND_OTHER;
}
template <class T>
constexpr int size_of() {
    if constexpr (std::is_void<T>::value) return 0;
    else return (int)sizeof(T);
}

template <class T>
constexpr ParamInfo param_info() {
    if constexpr (std::is_pointer<T>::value) {
        using P = typename std::remove_pointer<T>::type;
        using PB = typename std::remove_cv<P>::type;
        return ParamInfo{KIND_PTR, (int)sizeof(T), kind_of<PB>(), size_of<PB>(),
                         std::is_const<P>::value ? 1 : 0};
    } else {
        return ParamInfo{kind_of<T>(), (int)sizeof(T), KIND_NONE, 0, 0};
    }
}

template <class... A, size_t... I>
inline void call_unpacked(void (*f)(A...), void** argv, std::index_sequence<I...>) {
    (void)argv;
    f(*static_cast<typename std::decay<A>::type*>(argv[I])...);
}

template <class F>
struct Sig;
template <class... A>
struct Sig<void (*)(A...)> {
    static constexpr int n = (int)sizeof...(A);
    static constexpr ParamInfo params[sizeof...(A) + 1] = {param_info<typename std::decay<A>::type>()...,
                                                           ParamInfo{KIND_NONE, 0, KIND_NONE, 0, 0}};
    template <auto F>
    static void run(void** argv) { call_unpacked(F, argv, std::index_sequence_for<A...>{}); }
};

template <auto F>
constexpr KernelDesc describe(const char* name) {
    using S = Sig<decltype(F)>;
    return KernelDesc{name, &S::template run<F>, S::n, S::params};
}

}  // namespace cupynn_emu

#endif  // CUPYNN_EMU_RUNTIME
#endif  // CUPYNN_EMU_H_
