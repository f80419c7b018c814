// The element arithmetic of SAM's write on the GPU, shared by sparse_write.cu (gathered rows) and
// journaled_write.cu (in place on a row store). Device code; included by .cu files only.
#pragma once

#include "common.cuh"

namespace sparsemem {
namespace cuda {

// new = old * (1 - erase) + weight * add for one element: the write of both ops.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t written_value(scalar_t old, scalar_t weight, scalar_t add, bool erase) {
  const acc_t added = acc_t(weight) * acc_t(add);
  return scalar_t(erase ? added : acc_t(old) + added);
}

}  // namespace cuda
}  // namespace sparsemem
