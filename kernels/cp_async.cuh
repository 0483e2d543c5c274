// cp_async.cuh -- asynchronous global -> shared memory copies (cp.async, sm_80+).
//
// One text for the GPU and the emulator (CUPYNN_PTX, ptx.cuh).  cp_async_elem issues one
// cp.async.ca per element: the data lands in shared memory while the issuing thread goes on
// computing; cp_async_commit() closes the thread's current commit group, cp_async_wait<N>()
// waits until at most N of its most recent committed groups are still in flight, and
// cp_async_wait_all() is commit + wait<0> (a __syncthreads() after the wait publishes the data
// to the block).  An element that is not `valid` is zero-filled (src-size 0: nothing is read).
// The emulator runs the same instructions as the hardware behaves: the destination is
// poisoned (0xff bytes, NaN) at issue and the copy lands at the wait that covers its group.
#pragma once

#include "ptx.cuh"

namespace cupynn {

template <typename T>
__device__ __forceinline__ void cp_async_elem(T* dst_shared, const T* src_global, bool valid) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "cp.async of a 4- or 8-byte element");
    const unsigned dst = (unsigned)__cvta_generic_to_shared(dst_shared);
    const int src_size = valid ? (int)sizeof(T) : 0;
    CUPYNN_PTX_MEM("cp.async.ca.shared.global [%0], [%1], %2, %3;\n", (),
                   (CUPYNN_IN(r, dst), CUPYNN_IN(l, src_global), CUPYNN_IN(n, (int)sizeof(T)),
                    CUPYNN_IN(r, src_size)));
}

__device__ __forceinline__ void cp_async_commit() {
    CUPYNN_PTX_MEM("cp.async.commit_group;\n", (), ());
}

// N: the number of most recent groups that may stay in flight (the same constant reaches the
// GPU's instruction and the emulator).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0 && N <= 8, "cp.async.wait_group N");
    CUPYNN_PTX_MEM("cp.async.wait_group %0;\n", (), (CUPYNN_IN(n, N)));
}

__device__ __forceinline__ void cp_async_wait_all() {
    CUPYNN_PTX_MEM("cp.async.wait_all;\n", (), ());
}

}  // namespace cupynn
