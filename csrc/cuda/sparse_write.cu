// SAM write on J gathered rows, on the GPU: new = rows * (1 - erase) + w add^T, where a row is
// erased wholly or not at all (csrc/cpu/sparse_write.cpp is the same on the CPU; journaled_write.cu
// is the same write in place on a row store).
//
// Forward: one thread per element, grid-stride. Backward: grad rows = g (1 - erase) and
// grad w_j = g_j . add with one warp per row (lanes over W, a warp sum), then grad add =
// sum_j w_j g_j with one thread per (b, w) walking its J rows in order (no atomics, deterministic).
#include "../sparse_checks.h"
#include "common.cuh"
#include "sparse_write.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace sparse_write_kernels {

constexpr int kThreads = 256;

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

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_sparse_write", &sparse_write_cuda);
  m.impl("ext_sparse_write_backward", &sparse_write_backward_cuda);
}

}  // namespace sparse_write_kernels
}  // namespace cuda
}  // namespace sparsemem
