// The row arithmetic of SAM's write, shared by ext_sparse_write (sparse_write.cpp, on gathered
// rows) and ext_journaled_write (journaled_write.cpp, in place on a row store).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "vector_math.h"

namespace sparsemem {

// new = old * (1 - erase) + weight * vector over one row of W: the write of both ops.
template <typename scalar_t, typename acc_t>
SPARSEMEM_ALWAYS_INLINE void write_row(const scalar_t* old, acc_t weight, const scalar_t* vector, bool erase,
                                       scalar_t* updated, int64_t W) {
  if (erase) {
    for (int64_t i = 0; i < W; ++i) updated[i] = scalar_t(weight * acc_t(vector[i]));
  } else {
    for (int64_t i = 0; i < W; ++i) updated[i] = scalar_t(acc_t(old[i]) + weight * acc_t(vector[i]));
  }
}

// The backward of one batch row's write, g = d new [J, W]:
//   grad rows = g (1 - erase);  grad w_j = g_j . add;  grad add = sum_j w_j g_j  (sum: [W] scratch).
template <typename scalar_t, typename acc_t>
SPARSEMEM_ALWAYS_INLINE void write_backward_rows(const scalar_t* g, const scalar_t* w, const scalar_t* vector,
                                                 const bool* erase, scalar_t* grad_x, scalar_t* grad_w,
                                                 scalar_t* grad_v, acc_t* sum, int64_t J, int64_t W) {
  std::fill(sum, sum + W, acc_t(0));
  for (int64_t j = 0; j < J; ++j) {
    const scalar_t* grad = g + j * W;
    const acc_t weight = w[j];
    const acc_t keep = erase[j] ? acc_t(0) : acc_t(1);
    for (int64_t i = 0; i < W; ++i) {
      grad_x[j * W + i] = scalar_t(keep * acc_t(grad[i]));
      sum[i] += weight * acc_t(grad[i]);
    }
    grad_w[j] = scalar_t(dot<acc_t>(grad, vector, W));
  }
  for (int64_t i = 0; i < W; ++i) grad_v[i] = scalar_t(sum[i]);
}

}  // namespace sparsemem
