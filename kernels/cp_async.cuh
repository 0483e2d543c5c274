// cp_async.cuh -- asynchronous global -> shared memory copies (cp.async, sm_80+).
//
// GPU: one cp.async.ca per element; the data lands in shared memory while the issuing thread
// goes on computing, and cp_async_wait_all() waits for all of the thread's copies (a
// __syncthreads() after it publishes them to the block).  An element that is not `valid` is
// zero-filled (src-size 0: nothing is read from global memory).
// Emulator (-DCUPYNN_EMULATE): a plain copy at the call, so every later read sees it.
#pragma once

namespace cupynn {

template <typename T>
__device__ __forceinline__ void cp_async_elem(T* dst_shared, const T* src_global, bool valid) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "cp.async of a 4- or 8-byte element");
#ifdef CUPYNN_EMULATE
    *dst_shared = valid ? *src_global : T(0);
#else
    const unsigned dst = (unsigned)__cvta_generic_to_shared(dst_shared);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :
                 : "r"(dst), "l"(src_global), "n"((int)sizeof(T)), "r"(valid ? (int)sizeof(T) : 0)
                 : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#ifndef CUPYNN_EMULATE
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace cupynn
