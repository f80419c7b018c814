// SAM write on J gathered rows, on the GPU: new = rows * (1 - erase) + w add^T, where a row is
// erased wholly or not at all (csrc/cpu/sparse_write.cpp is the same on the CPU).
//
// Forward: one thread per element, grid-stride. Backward: grad rows = g (1 - erase) and
// grad w_j = g_j . add with one warp per row (lanes over W, a warp sum), then grad add =
// sum_j w_j g_j with one thread per (b, w) walking its J rows in order (no atomics, deterministic).
//
// journaled_write is the same write in place on the memory's row store (memory/_lazy.py's
// JournaledMemory.write), in two launches so that no entry reads a row another entry of the call
// already wrote: the first gathers the old rows (the initial word where unwritten) and `fresh`,
// the second computes the new rows with the same written_value, stores them in the output and the
// store and marks them written (a repeated key's entries store identical values). Its backward
// runs in Python around sparse_write's backward kernels (sparsemem/ops/sparse.py).
#include "../sparse_checks.h"
#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace sparse_write_kernels {

constexpr int kThreads = 256;

// new = old * (1 - erase) + weight * add for one element: the write of both ops.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t written_value(scalar_t old, scalar_t weight, scalar_t add, bool erase) {
  const acc_t added = acc_t(weight) * acc_t(add);
  return scalar_t(erase ? added : acc_t(old) + added);
}

template <typename scalar_t, typename acc_t>
__global__ void sparse_write_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ weights,
                                    const scalar_t* __restrict__ add, const bool* __restrict__ erase_rows,
                                    scalar_t* __restrict__ out, int64_t total, int64_t J, int64_t W) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = index / W, b = row / J, w = index % W;
    out[index] = written_value<scalar_t, acc_t>(rows[index], weights[row], add[b * W + w], erase_rows[row]);
  }
}

// old[b, j] = store[key] where written[key], else the initial word; fresh[b, j]: the key was
// unwritten and no earlier entry of the batch row has it (checked by the row's w = 0 thread).
template <typename scalar_t>
__global__ void journaled_gather_kernel(const scalar_t* __restrict__ store, const bool* __restrict__ written,
                                        const scalar_t* __restrict__ initial, const int64_t* __restrict__ keys,
                                        scalar_t* __restrict__ old, bool* __restrict__ fresh, int64_t total,
                                        int64_t J, int64_t W) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = index / W, w = index % W, key = keys[row];
    old[index] = written[key] ? store[key * W + w] : initial[w];
    if (w == 0) {
      bool first = true;
      for (int64_t earlier = row - row % J; earlier < row; ++earlier) first = first && keys[earlier] != key;
      fresh[row] = first && !written[key];
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void journaled_store_kernel(const scalar_t* __restrict__ old, const scalar_t* __restrict__ weights,
                                       const scalar_t* __restrict__ add, const bool* __restrict__ erase_rows,
                                       const int64_t* __restrict__ keys, scalar_t* __restrict__ out,
                                       scalar_t* __restrict__ store, bool* __restrict__ written, int64_t total,
                                       int64_t J, int64_t W) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = index / W, b = row / J, w = index % W, key = keys[row];
    const scalar_t value = written_value<scalar_t, acc_t>(old[index], weights[row], add[b * W + w], erase_rows[row]);
    out[index] = value;
    store[key * W + w] = value;
    if (w == 0) written[key] = true;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sparse_write_rows_backward_kernel(const scalar_t* __restrict__ grad_new,
                                                  const scalar_t* __restrict__ add,
                                                  const bool* __restrict__ erase_rows,
                                                  scalar_t* __restrict__ grad_rows, scalar_t* __restrict__ grad_weights,
                                                  int64_t rows, int64_t J, int64_t W) {
  // One warp per row (b, j), grid-stride over rows.
  const int warps = blockDim.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t row = blockIdx.x * int64_t(warps) + threadIdx.x / kWarp; row < rows;
       row += int64_t(gridDim.x) * warps) {
    const scalar_t* grad = grad_new + row * W;
    const scalar_t* vector = add + (row / J) * W;
    const acc_t keep = erase_rows[row] ? acc_t(0) : acc_t(1);
    acc_t dot = 0;
    for (int64_t w = lane; w < W; w += kWarp) {
      const acc_t g = grad[w];
      grad_rows[row * W + w] = scalar_t(keep * g);
      dot += g * acc_t(vector[w]);
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_weights[row] = scalar_t(dot);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sparse_write_add_backward_kernel(const scalar_t* __restrict__ grad_new,
                                                 const scalar_t* __restrict__ weights,
                                                 scalar_t* __restrict__ grad_add, int64_t B, int64_t J, int64_t W) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < B * W;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = index / W, w = index % W;
    acc_t sum = 0;
    for (int64_t j = 0; j < J; ++j) sum += acc_t(weights[b * J + j]) * acc_t(grad_new[(b * J + j) * W + w]);
    grad_add[index] = scalar_t(sum);
  }
}

void check_inputs(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& add,
                  const at::Tensor& erase_rows) {
  check_sparse_write_inputs(rows, weights, add, erase_rows);
  check_cuda(rows, "rows");
  check_device(weights, rows, "weights");
  check_device(add, rows, "add");
  check_device(erase_rows, rows, "erase_rows");
}

at::Tensor sparse_write_cuda(const at::Tensor& rows_in, const at::Tensor& weights_in, const at::Tensor& add_in,
                             const at::Tensor& erase_rows_in) {
  check_inputs(rows_in, weights_in, add_in, erase_rows_in);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const auto rows = rows_in.contiguous(), weights = weights_in.contiguous(), add = add_in.contiguous();
  const auto erase_rows = erase_rows_in.contiguous();
  const int64_t J = rows.size(1), W = rows.size(2), total = rows.numel();
  auto new_rows = at::empty_like(rows);
  if (total == 0) return new_rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "sparse_write_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sparse_write_kernel<scalar_t, acc_t><<<blocks_for(total, kThreads), kThreads, 0, stream()>>>(
        rows.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), add.data_ptr<scalar_t>(),
        erase_rows.data_ptr<bool>(), new_rows.data_ptr<scalar_t>(), total, J, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return new_rows;
}

std::vector<at::Tensor> sparse_write_backward_cuda(const at::Tensor& grad_new_in, const at::Tensor& rows_in,
                                                   const at::Tensor& weights_in, const at::Tensor& add_in,
                                                   const at::Tensor& erase_rows_in, const at::Tensor& /*new_rows*/) {
  check_inputs(rows_in, weights_in, add_in, erase_rows_in);
  check_device(grad_new_in, rows_in, "grad_new_rows");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const auto weights = weights_in.contiguous(), add = add_in.contiguous(), erase_rows = erase_rows_in.contiguous();
  const auto grad_new = grad_new_in.contiguous().to(rows_in.scalar_type());
  const int64_t B = rows_in.size(0), J = rows_in.size(1), W = rows_in.size(2);
  auto grad_rows = at::empty_like(grad_new);
  auto grad_weights = at::zeros_like(weights);  // W = 0 leaves them 0
  auto grad_add = at::zeros_like(add);          // J = 0 leaves it 0
  if (B * J * W == 0) return {grad_rows, grad_weights, grad_add};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_new.scalar_type(), "sparse_write_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sparse_write_rows_backward_kernel<scalar_t, acc_t><<<blocks_for(B * J, kThreads / kWarp), kThreads, 0, stream()>>>(
        grad_new.data_ptr<scalar_t>(), add.data_ptr<scalar_t>(), erase_rows.data_ptr<bool>(),
        grad_rows.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(), B * J, J, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sparse_write_add_backward_kernel<scalar_t, acc_t><<<blocks_for(B * W, kThreads), kThreads, 0, stream()>>>(
        grad_new.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), grad_add.data_ptr<scalar_t>(), B, J, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_rows, grad_weights, grad_add};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> journaled_write_cuda(at::Tensor& rows, at::Tensor& written,
                                                                    const at::Tensor& initial_word_in,
                                                                    const at::Tensor& keys_in,
                                                                    const at::Tensor& weights_in,
                                                                    const at::Tensor& add_in,
                                                                    const at::Tensor& erase_rows_in) {
  check_journaled_write_inputs(rows, written, initial_word_in, keys_in, weights_in, add_in, erase_rows_in);
  const int64_t B = keys_in.size(0), J = keys_in.size(1), W = rows.size(1);
  check_cuda(rows, "rows");
  check_device(written, rows, "written");
  check_device(initial_word_in, rows, "initial_word");
  check_device(keys_in, rows, "keys");
  check_device(weights_in, rows, "weights");
  check_device(add_in, rows, "add");
  check_device(erase_rows_in, rows, "erase_rows");
  // Key ranges are not checked here (a host read would sync): sparsemem.ops.sparse.journaled_write
  // checks them on the host, on the GPU with SPARSEMEM_DEBUG=1.
  const c10::cuda::CUDAGuard guard(rows.device());
  const auto keys = keys_in.contiguous(), weights = weights_in.contiguous(), add = add_in.contiguous();
  const auto erase_rows = erase_rows_in.contiguous(), initial_word = initial_word_in.contiguous();
  auto old_rows = at::empty({B, J, W}, rows.options());
  auto new_rows = at::empty({B, J, W}, rows.options());
  auto fresh = at::empty({B, J}, written.options());
  const int64_t total = B * J * W;
  if (total == 0) {
    fresh.fill_(false);
    return {old_rows, new_rows, fresh};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "journaled_write_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    journaled_gather_kernel<scalar_t><<<blocks_for(total, kThreads), kThreads, 0, stream()>>>(
        rows.data_ptr<scalar_t>(), written.data_ptr<bool>(), initial_word.data_ptr<scalar_t>(),
        keys.data_ptr<int64_t>(), old_rows.data_ptr<scalar_t>(), fresh.data_ptr<bool>(), total, J, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    journaled_store_kernel<scalar_t, acc_t><<<blocks_for(total, kThreads), kThreads, 0, stream()>>>(
        old_rows.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), add.data_ptr<scalar_t>(),
        erase_rows.data_ptr<bool>(), keys.data_ptr<int64_t>(), new_rows.data_ptr<scalar_t>(),
        rows.data_ptr<scalar_t>(), written.data_ptr<bool>(), total, J, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {old_rows, new_rows, fresh};
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_sparse_write", &sparse_write_cuda);
  m.impl("ext_sparse_write_backward", &sparse_write_backward_cuda);
  m.impl("ext_journaled_write", &journaled_write_cuda);
}

}  // namespace sparse_write_kernels
}  // namespace cuda
}  // namespace sparsemem
