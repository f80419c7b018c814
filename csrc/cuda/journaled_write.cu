// SAM's write in place on the memory's row store, on the GPU (sparsemem.ops.journaled_write; the
// CPU kernel is csrc/cpu/journaled_write.cpp), in two launches so that no entry reads a row another
// entry of the call already wrote: the first gathers the old rows (the initial word where
// unwritten) and `fresh`, the second computes the new rows with sparse_write's written_value,
// stores them in the output and the store and marks them written (a repeated key's entries store
// identical values). Its backward is composed in Python around sparse_write's backward kernels
// (sparsemem/ops/journaled_write.py).
#include "../sparse_checks.h"
#include "common.cuh"
#include "sparse_write.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace journaled_write_kernels {

constexpr int kThreads = 256;

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
  // Key ranges are not checked here (a host read would sync): sparsemem.ops.journaled_write
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
  m.impl("ext_journaled_write", &journaled_write_cuda);
}

}  // namespace journaled_write_kernels
}  // namespace cuda
}  // namespace sparsemem
