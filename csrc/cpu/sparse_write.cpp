// SAM write on J gathered rows, on the CPU: new = rows * (1 - erase) + w add^T, where a row is
// erased wholly or not at all. One pass over the J * W values per batch row, forward and backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "vector_math.h"

namespace sparsemem {

namespace {

void check_inputs(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& add,
                  const at::Tensor& erase_rows) {
  TORCH_CHECK(rows.dim() == 3 && weights.dim() == 2 && add.dim() == 2 && erase_rows.dim() == 2,
              "rows must be [B, J, W], weights [B, J], add [B, W] and erase_rows [B, J]");
  const int64_t B = rows.size(0), J = rows.size(1), W = rows.size(2);
  TORCH_CHECK(weights.size(0) == B && weights.size(1) == J, "weights must be [B, J] matching rows");
  TORCH_CHECK(add.size(0) == B && add.size(1) == W, "add must be [B, W] matching rows");
  TORCH_CHECK(erase_rows.size(0) == B && erase_rows.size(1) == J, "erase_rows must be [B, J] matching rows");
  TORCH_CHECK(erase_rows.scalar_type() == at::kBool, "erase_rows must be bool");
  TORCH_CHECK(rows.scalar_type() == weights.scalar_type() && rows.scalar_type() == add.scalar_type(),
              "rows, weights and add must share a dtype");
}

}  // namespace

at::Tensor ext_sparse_write(const at::Tensor& rows_in, const at::Tensor& weights_in, const at::Tensor& add_in,
                            const at::Tensor& erase_rows_in) {
  check_inputs(rows_in, weights_in, add_in, erase_rows_in);
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
        const acc_t weight = w[row];
        const scalar_t* vector = v + (row / J) * W;
        const scalar_t* old = x + row * W;
        scalar_t* updated = out + row * W;
        if (erase[row]) {
          for (int64_t i = 0; i < W; ++i) updated[i] = scalar_t(weight * acc_t(vector[i]));
        } else {
          for (int64_t i = 0; i < W; ++i) updated[i] = scalar_t(acc_t(old[i]) + weight * acc_t(vector[i]));
        }
      }
    });
  });
  return new_rows;
}

// grad rows = g * (1 - erase);  grad w_j = g_j . add;  grad add = sum_j w_j g_j.
// Tasks are batch rows, so grad add (a sum over J) needs no reduction across threads.
std::vector<at::Tensor> ext_sparse_write_backward(const at::Tensor& grad_new_in, const at::Tensor& rows_in,
                                                  const at::Tensor& weights_in, const at::Tensor& add_in,
                                                  const at::Tensor& erase_rows_in, const at::Tensor& /*new_rows*/) {
  check_inputs(rows_in, weights_in, add_in, erase_rows_in);
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
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t j = 0; j < J; ++j) {
          const int64_t row = b * J + j;
          const scalar_t* grad = g + row * W;
          const acc_t weight = w[row];
          const acc_t keep = erase[row] ? acc_t(0) : acc_t(1);
          for (int64_t i = 0; i < W; ++i) {
            grad_x[row * W + i] = scalar_t(keep * acc_t(grad[i]));
            sum[i] += weight * acc_t(grad[i]);
          }
          grad_w[row] = scalar_t(dot<acc_t>(grad, v + b * W, W));
        }
        for (int64_t i = 0; i < W; ++i) grad_v[b * W + i] = scalar_t(sum[i]);
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
