// Content addressing's kernels (content.cpp), for the ops built on it (ntm.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sparsemem {

at::Tensor ext_content_weights(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths);

std::vector<at::Tensor> ext_content_weights_backward(const at::Tensor& grad_weights, const at::Tensor& memory,
                                                     const at::Tensor& keys, const at::Tensor& strengths,
                                                     const at::Tensor& weights);

}  // namespace sparsemem
