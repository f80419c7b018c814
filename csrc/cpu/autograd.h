// Autograd in C++ for ops that follow csrc's convention (ext_<name> and ext_<name>_backward taking
// (*grads, *inputs, *outputs)). Registered under the Autograd key, an op records one CppNode whose
// backward calls the kernel directly: sparsemem/ops/_define.py sends eager CPU calls of such an op
// straight to it, skipping the Python autograd.Function (~100 us a call at a small DNC's sizes).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace sparsemem {

// Op: static variable_list forward(inputs...) (the kernel's outputs) and
// static variable_list backward(grads, saved) (one grad per input); saved holds the inputs and,
// if Op::kSavesOutputs, the outputs after them.
template <typename Op>
struct Differentiated : public torch::autograd::Function<Differentiated<Op>> {
  template <typename... Inputs>
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Inputs&... inputs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto outputs = Op::forward(inputs...);
    torch::autograd::variable_list saved{inputs...};
    if (Op::kSavesOutputs) saved.insert(saved.end(), outputs.begin(), outputs.end());
    ctx->save_for_backward(saved);
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list& grads) {
    return Op::backward(grads, ctx->get_saved_variables());
  }
};

}  // namespace sparsemem
