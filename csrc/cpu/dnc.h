// A DNC step's kernels (dnc.cpp's write and read halves, links.cpp's link_update and link_update_reads), for
// the op that runs many steps (dnc_sequence.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace sparsemem {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_dnc_write(
    const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& write_w, const at::Tensor& read_w,
    const at::Tensor& free_gates, const at::Tensor& write_key, const at::Tensor& write_strength,
    const at::Tensor& allocation_gate, const at::Tensor& write_gate, const at::Tensor& erase, const at::Tensor& add);
std::vector<at::Tensor> ext_dnc_write_backward(
    const at::Tensor& grad_memory, const at::Tensor& grad_usage, const at::Tensor& grad_write_w,
    const at::Tensor& grad_allocation, const at::Tensor& grad_write_content, const at::Tensor& memory,
    const at::Tensor& usage, const at::Tensor& write_w, const at::Tensor& read_w, const at::Tensor& free_gates,
    const at::Tensor& write_key, const at::Tensor& write_strength, const at::Tensor& allocation_gate,
    const at::Tensor& write_gate, const at::Tensor& erase, const at::Tensor& add, const at::Tensor& new_memory,
    const at::Tensor& new_usage, const at::Tensor& new_write_w, const at::Tensor& allocation,
    const at::Tensor& write_content);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_dnc_read(const at::Tensor& memory, const at::Tensor& read_keys,
                                                            const at::Tensor& read_strengths,
                                                            const at::Tensor& read_modes, const at::Tensor& backward,
                                                            const at::Tensor& forward);
std::vector<at::Tensor> ext_dnc_read_backward(const at::Tensor& grad_reads, const at::Tensor& grad_read_w,
                                              const at::Tensor& grad_read_content, const at::Tensor& memory,
                                              const at::Tensor& read_keys, const at::Tensor& read_strengths,
                                              const at::Tensor& read_modes, const at::Tensor& backward,
                                              const at::Tensor& forward, const at::Tensor& reads,
                                              const at::Tensor& read_w, const at::Tensor& read_content);

std::tuple<at::Tensor, at::Tensor> ext_link_update(const at::Tensor& link, const at::Tensor& precedence,
                                                   const at::Tensor& write_w);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_link_update_reads(const at::Tensor& link,
                                                                                 const at::Tensor& precedence,
                                                                                 const at::Tensor& write_w,
                                                                                 const at::Tensor& read_w);
std::vector<at::Tensor> ext_link_update_reads_backward(
    const at::Tensor& grad_link, const at::Tensor& grad_precedence, const at::Tensor& grad_forward,
    const at::Tensor& grad_backward, const at::Tensor& link, const at::Tensor& precedence, const at::Tensor& write_w,
    const at::Tensor& read_w, const at::Tensor& new_link, const at::Tensor& new_precedence, const at::Tensor& forward,
    const at::Tensor& backward);

}  // namespace sparsemem
