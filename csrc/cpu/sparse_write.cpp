// SAM write on J gathered rows, on the CPU: new = rows * (1 - erase) + w add^T, where a row is
// erased wholly or not at all. One pass over the J * W values per batch row, forward and backward.
// Its in-place form on a row store is journaled_write.cpp, around the same row arithmetic (sparse_write.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../sparse_checks.h"
#include "sparse_write.h"

namespace sparsemem {

at::Tensor ext_sparse_write(const at::Tensor& rows_in, const at::Tensor& weights_in, const at::Tensor& add_in,
                            const at::Tensor& erase_rows_in) {
  check_sparse_write_inputs(rows_in, weights_in, add_in, erase_rows_in);
  const auto rows = rows_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto add = add_in.contiguous();
  const auto erase_rows = erase_rows_in.contiguous();
  const int64_t B = rows.size(0), J = rows.size(1), W = rows.size(2);
  auto new_rows = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "ext_sparse_write", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = rows.data_ptr<scalar_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    const scalar_t* v = add.data_ptr<scalar_t>();
    const bool* erase = erase_rows.data_ptr<bool>();
    scalar_t* out = new_rows.data_ptr<scalar_t>();
    at::parallel_for(0, B * J, grain(W), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        write_row<scalar_t, acc_t>(x + row * W, acc_t(w[row]), v + (row / J) * W, erase[row], out + row * W, W);
      }
    });
  });
  return new_rows;
}

// Tasks are batch rows, so grad add (a sum over J) needs no reduction across threads.
std::vector<at::Tensor> ext_sparse_write_backward(const at::Tensor& grad_new_in, const at::Tensor& rows_in,
                                                  const at::Tensor& weights_in, const at::Tensor& add_in,
                                                  const at::Tensor& erase_rows_in, const at::Tensor& /*new_rows*/) {
  check_sparse_write_inputs(rows_in, weights_in, add_in, erase_rows_in);
  const auto weights = weights_in.contiguous();
  const auto add = add_in.contiguous();
  const auto erase_rows = erase_rows_in.contiguous();
  const auto grad_new = grad_new_in.contiguous();
  const int64_t B = rows_in.size(0), J = rows_in.size(1), W = rows_in.size(2);
  auto grad_rows = at::empty_like(grad_new);
  auto grad_weights = at::empty_like(weights);
  auto grad_add = at::empty_like(add);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_new.scalar_type(), "ext_sparse_write_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_new.data_ptr<scalar_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    const scalar_t* v = add.data_ptr<scalar_t>();
    const bool* erase = erase_rows.data_ptr<bool>();
    scalar_t* grad_x = grad_rows.data_ptr<scalar_t>();
    scalar_t* grad_w = grad_weights.data_ptr<scalar_t>();
    scalar_t* grad_v = grad_add.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(J * W), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(W);
      for (int64_t b = begin; b < end; ++b) {
        write_backward_rows<scalar_t, acc_t>(g + b * J * W, w + b * J, v + b * W, erase + b * J, grad_x + b * J * W,
                                             grad_w + b * J, grad_v + b * W, sum.data(), J, W);
      }
    });
  });
  return {grad_rows, grad_weights, grad_add};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_sparse_write(Tensor rows, Tensor weights, Tensor add, Tensor erase_rows) -> Tensor");
  m.def(
      "ext_sparse_write_backward(Tensor grad_new_rows, Tensor rows, Tensor weights, Tensor add, Tensor erase_rows, "
      "Tensor new_rows) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_sparse_write", &ext_sparse_write);
  m.impl("ext_sparse_write_backward", &ext_sparse_write_backward);
}

}  // namespace sparsemem
