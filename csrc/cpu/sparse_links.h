// SDNC's sparse link kernels (sparse_links.cpp), declared for the SDNC sequence op (sam_sequence.cpp),
// which calls them on the rows it gathers from its dense copy of the link store each step.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace sparsemem {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_sparse_link_update(
    const at::Tensor& forward_slots, const at::Tensor& forward_indices, const at::Tensor& forward_values,
    const at::Tensor& backward_slots, const at::Tensor& backward_indices, const at::Tensor& backward_values,
    const at::Tensor& precedence_indices, const at::Tensor& precedence_values, const at::Tensor& write_indices,
    const at::Tensor& write_weights);

std::vector<at::Tensor> ext_sparse_link_update_backward(
    const at::Tensor& grad_forward_values, const std::optional<at::Tensor>& grad_forward_indices,
    const at::Tensor& grad_backward_values, const std::optional<at::Tensor>& grad_backward_indices,
    const at::Tensor& grad_precedence_values, const std::optional<at::Tensor>& grad_precedence_indices,
    const at::Tensor& forward_slots, const at::Tensor& forward_indices, const at::Tensor& forward_values,
    const at::Tensor& backward_slots, const at::Tensor& backward_indices, const at::Tensor& backward_values,
    const at::Tensor& precedence_indices, const at::Tensor& precedence_values, const at::Tensor& write_indices,
    const at::Tensor& write_weights, const at::Tensor& new_forward_values, const at::Tensor& new_forward_indices,
    const at::Tensor& new_backward_values, const at::Tensor& new_backward_indices,
    const at::Tensor& new_precedence_values, const at::Tensor& new_precedence_indices);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_sparse_temporal_reads(
    const at::Tensor& read_weights, const at::Tensor& forward_indices, const at::Tensor& forward_values,
    const at::Tensor& backward_indices, const at::Tensor& backward_values, int64_t k);

std::vector<at::Tensor> ext_sparse_temporal_reads_backward(
    const at::Tensor& grad_forward_weights, const std::optional<at::Tensor>& grad_forward_slots,
    const at::Tensor& grad_backward_weights, const std::optional<at::Tensor>& grad_backward_slots,
    const at::Tensor& read_weights, const at::Tensor& forward_indices, const at::Tensor& forward_values,
    const at::Tensor& backward_indices, const at::Tensor& backward_values, int64_t k,
    const at::Tensor& forward_weights, const at::Tensor& forward_slots, const at::Tensor& backward_weights,
    const at::Tensor& backward_slots);

}  // namespace sparsemem
