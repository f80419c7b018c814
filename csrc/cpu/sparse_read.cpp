// Sparse content read on the CPU: per head, gather the K candidate rows, score them (cosine),
// softmax over the K, and read r = sum_k w_k M[idx_k], in one pass over the K rows. The rows are
// read in place from memory (no [B, R, K, W] gather), K scores live in a small buffer per task.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../sparse_checks.h"
#include "autograd.h"
#include "sparse_read.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

// The slots are read without bounds checks inside the kernels: refuse bad ones here.
void check_slots(const at::Tensor& indices, int64_t N) {
  const int64_t* slots = indices.data_ptr<int64_t>();
  const bool in_range = std::all_of(slots, slots + indices.numel(), [N](int64_t s) { return 0 <= s && s < N; });
  TORCH_CHECK(in_range, "indices must be slot ids in [0, N=", N, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ext_sparse_read(const at::Tensor& memory_in, const at::Tensor& indices_in,
                                                    const at::Tensor& keys_in, const at::Tensor& strengths_in) {
  check_sparse_read_inputs(memory_in, indices_in, keys_in, strengths_in);
  const auto memory = memory_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto keys = keys_in.contiguous();
  const auto strengths = strengths_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1), K = indices.size(2);
  check_slots(indices, N);
  auto weights = at::empty({B, R, K}, memory.options());
  auto reads = at::empty({B, R, W}, memory.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_sparse_read", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const int64_t* slots = indices.data_ptr<int64_t>();
    const scalar_t* q = keys.data_ptr<scalar_t>();
    const scalar_t* beta = strengths.data_ptr<scalar_t>();
    scalar_t* out_weights = weights.data_ptr<scalar_t>();
    scalar_t* out_reads = reads.data_ptr<scalar_t>();
    at::parallel_for(0, B * R, grain(4 * K * W), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> score(K), read(W);
      for (int64_t head = begin; head < end; ++head) {
        read_head<scalar_t, acc_t>(m + (head / R) * N * W, slots + head * K, q + head * W, acc_t(beta[head]), K, W,
                                   score.data(), read.data(), out_weights + head * K, out_reads + head * W);
      }
    });
  });
  return {weights, reads};
}

// The backward of read_head per head (sparse_read.h).
// Tasks are batch rows: a slot read by several heads (or twice by one) accumulates its grads in
// the task that owns the batch row, so no two threads touch a row of grad_memory. The task also
// zeroes its batch row of grad_memory first (dense by the op's contract), while it is about to be
// written anyway, instead of a separate at::zeros pass over [B, N, W].
std::vector<at::Tensor> ext_sparse_read_backward(const at::Tensor& grad_weights_in, const at::Tensor& grad_reads_in,
                                                 const at::Tensor& memory_in, const at::Tensor& indices_in,
                                                 const at::Tensor& keys_in, const at::Tensor& strengths_in,
                                                 const at::Tensor& weights_in, const at::Tensor& /*reads*/) {
  check_sparse_read_inputs(memory_in, indices_in, keys_in, strengths_in);
  const auto memory = memory_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto keys = keys_in.contiguous();
  const auto strengths = strengths_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto grad_weights = grad_weights_in.contiguous();
  const auto grad_reads = grad_reads_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1), K = indices.size(2);
  check_slots(indices, N);
  auto grad_memory = at::empty_like(memory);
  auto grad_keys = at::empty_like(keys);
  auto grad_strengths = at::empty_like(strengths);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_sparse_read_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const int64_t* slots = indices.data_ptr<int64_t>();
    const scalar_t* q = keys.data_ptr<scalar_t>();
    const scalar_t* beta = strengths.data_ptr<scalar_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    const scalar_t* gw = grad_weights.data_ptr<scalar_t>();
    const scalar_t* gr = grad_reads.data_ptr<scalar_t>();
    scalar_t* gm = grad_memory.data_ptr<scalar_t>();
    scalar_t* gq = grad_keys.data_ptr<scalar_t>();
    scalar_t* gb = grad_strengths.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(6 * R * K * W + N * W), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> similarity(K), upstream(K), grad_key(W);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* memory_row0 = m + b * N * W;
        scalar_t* grad_row0 = gm + b * N * W;
        std::fill(grad_row0, grad_row0 + N * W, scalar_t(0));
        for (int64_t r = 0; r < R; ++r) {
          const int64_t head = b * R + r;
          read_head_backward<scalar_t, acc_t>(memory_row0, grad_row0, slots + head * K, q + head * W,
                                              acc_t(beta[head]), w + head * K, gw + head * K, gr + head * W, K, W,
                                              similarity.data(), upstream.data(), grad_key.data(), gq + head * W,
                                              gb + head);
        }
      }
    });
  });
  return {grad_memory, grad_keys, grad_strengths};
}

namespace {

// indices (int64 slot positions) take no gradient.
struct SparseRead {
  static constexpr bool kSavesOutputs = true;
  static torch::autograd::variable_list forward(const at::Tensor& memory, const at::Tensor& indices,
                                                const at::Tensor& keys, const at::Tensor& strengths) {
    auto [weights, reads] = ext_sparse_read(memory, indices, keys, strengths);
    return {weights, reads};
  }
  static torch::autograd::variable_list backward(const torch::autograd::variable_list& g,
                                                 const torch::autograd::variable_list& s) {
    const auto d = ext_sparse_read_backward(g[0], g[1], s[0], s[1], s[2], s[3], s[4], s[5]);
    return {d[0], at::Tensor(), d[1], d[2]};
  }
};

std::tuple<at::Tensor, at::Tensor> sparse_read_autograd(const at::Tensor& memory, const at::Tensor& indices,
                                                        const at::Tensor& keys, const at::Tensor& strengths) {
  const auto out = Differentiated<SparseRead>::apply(memory, indices, keys, strengths);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_sparse_read(Tensor memory, Tensor indices, Tensor keys, Tensor strengths) -> (Tensor, Tensor)");
  m.def(
      "ext_sparse_read_backward(Tensor grad_weights, Tensor grad_reads, Tensor memory, Tensor indices, Tensor keys, "
      "Tensor strengths, Tensor weights, Tensor reads) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_sparse_read", &ext_sparse_read);
  m.impl("ext_sparse_read_backward", &ext_sparse_read_backward);
}

TORCH_LIBRARY_IMPL(sparsemem, Autograd, m) { m.impl("ext_sparse_read", &sparse_read_autograd); }

}  // namespace sparsemem
