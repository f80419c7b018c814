// The dense DNC kernels of usage.cpp, allocation.cpp and memory_rw.cpp, for the ops built on them
// (dnc.cpp). content.h declares content.cpp's.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sparsemem {

at::Tensor ext_usage_update(const at::Tensor& usage, const at::Tensor& write_w, const at::Tensor& read_w,
                            const at::Tensor& free_gates);
std::vector<at::Tensor> ext_usage_update_backward(const at::Tensor& grad, const at::Tensor& usage,
                                                  const at::Tensor& write_w, const at::Tensor& read_w,
                                                  const at::Tensor& free_gates, const at::Tensor& new_usage);

at::Tensor ext_allocation_weights(const at::Tensor& usage);
std::vector<at::Tensor> ext_allocation_weights_backward(const at::Tensor& grad, const at::Tensor& usage,
                                                        const at::Tensor& allocation);

at::Tensor ext_memory_write(const at::Tensor& memory, const at::Tensor& write_w, const at::Tensor& erase,
                            const at::Tensor& add);
std::vector<at::Tensor> ext_memory_write_backward(const at::Tensor& grad, const at::Tensor& memory,
                                                  const at::Tensor& write_w, const at::Tensor& erase,
                                                  const at::Tensor& add, const at::Tensor& new_memory);

at::Tensor ext_memory_read(const at::Tensor& memory, const at::Tensor& read_w);
std::vector<at::Tensor> ext_memory_read_backward(const at::Tensor& grad_reads, const at::Tensor& memory,
                                                 const at::Tensor& read_w, const at::Tensor& reads);

}  // namespace sparsemem
