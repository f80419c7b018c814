// What the CUDA kernels share: the current stream, launch checks, warp sums, split sizes.
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h): that one pulls in cuBLAS and
// cuSPARSE headers, which the syntax check on a machine with only nvcc and a CPU torch lacks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace sparsemem {
namespace cuda {

constexpr int kWarp = 32;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// float64 stays float64; every other float accumulates in float32 (at::opmath_type).
inline at::ScalarType accumulator(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

constexpr double kEps = 1e-6;  // sparsemem.reference.dnc.EPS, added to squared norms

// |x|^2 + kEps of a W-vector, summed by one warp (lane w, w + 32, ...); every lane gets it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t squared_norm(const scalar_t* __restrict__ x, int64_t W, int lane) {
  acc_t squares = 0;
  for (int64_t w = lane; w < W; w += kWarp) squares += acc_t(x[w]) * acc_t(x[w]);
  return warp_sum(squares) + acc_t(kEps);
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Programs per batch row when a reduction over N is split: about 4 blocks per multiprocessor
// in all, never more than there are chunks of `chunk` slots. B = 0 counts as one row (no
// division by zero on the host; the callers launch nothing for an empty batch).
inline int64_t splits(int64_t N, int64_t B, int64_t chunk) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  const int64_t rows = std::max<int64_t>(B, 1);
  const int64_t target = std::max<int64_t>(1, (4 * multiprocessors + rows - 1) / rows);
  return std::max<int64_t>(1, std::min<int64_t>(target, (N + chunk - 1) / chunk));
}

inline void check_cuda(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor");
}

// `tensor` on the same CUDA device as `first` (the op's first input).
inline void check_device(const at::Tensor& tensor, const at::Tensor& first, const char* name) {
  TORCH_CHECK(tensor.is_cuda() && tensor.device() == first.device(), name, " must be on ", first.device(),
              "; got ", tensor.device());
}

// Blocks of `threads` for a grid-stride loop over `total` items (at least one block).
inline unsigned int blocks_for(int64_t total, int threads) {
  return static_cast<unsigned int>(std::clamp<int64_t>((total + threads - 1) / threads, 1, int64_t(1) << 20));
}

// Position of `slot` among slots[0, n), or -1; slot -1 (an empty place) is never found.
__device__ __forceinline__ int64_t find_slot(const int64_t* slots, int64_t n, int64_t slot) {
  if (slot < 0) return -1;
  for (int64_t j = 0; j < n; ++j) {
    if (slots[j] == slot) return j;
  }
  return -1;
}

}  // namespace cuda
}  // namespace sparsemem
