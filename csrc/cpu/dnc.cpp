// A DNC step's write half and read half on the CPU, each one op (reference/dnc.py: dnc_write_ref,
// dnc_read_ref), composed of the dense kernels (usage.cpp, allocation.cpp, content.cpp,
// memory_rw.cpp) and the few products that mix their results.
//
// Why: at the sizes the DNC trains at (N = 16-64) a step's arithmetic takes microseconds and its
// time goes to calling ops: each public op costs ~10-30 us of Python, checks and an autograd node
// around a kernel of a few. Two ops per step instead of six kernels and a dozen products between
// them leave two autograd nodes to run backwards.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "autograd.h"
#include "content.h"
#include "dense.h"
#include "dnc.h"

namespace sparsemem {

namespace {

// What the kernels composed here do not check themselves: the gates' and modes' shapes, which
// would otherwise broadcast.
void check_gate(const at::Tensor& gate, const char* name, const at::Tensor& memory) {
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == memory.size(0) && gate.size(1) == 1, name,
              " must be [B, 1] matching memory [B, N, W]; got ", gate.sizes());
  TORCH_CHECK(gate.scalar_type() == memory.scalar_type(), name, " and memory must share a dtype");
}

void check_read_inputs(const at::Tensor& memory, const at::Tensor& read_keys, const at::Tensor& read_modes,
                       const at::Tensor& backward, const at::Tensor& forward) {
  TORCH_CHECK(memory.dim() == 3 && read_keys.dim() == 3, "memory must be [B, N, W] and read_keys [B, R, W]");
  const auto B = memory.size(0), N = memory.size(1), R = read_keys.size(1);
  TORCH_CHECK(read_modes.dim() == 3 && read_modes.size(0) == B && read_modes.size(1) == R && read_modes.size(2) == 3,
              "read_modes must be [B, R, 3] matching read_keys [B, R, W]; got ", read_modes.sizes());
  for (const auto* x : {&backward, &forward}) {
    TORCH_CHECK(x->dim() == 3 && x->size(0) == B && x->size(1) == R && x->size(2) == N,
                "backward and forward must be [B, R, N] matching memory and read_keys; got ", x->sizes());
  }
  for (const auto* x : {&read_modes, &backward, &forward}) {
    TORCH_CHECK(x->scalar_type() == memory.scalar_type(), "read_modes, backward, forward and memory must share a dtype");
  }
}

}  // namespace

// u_t = usage_update(...); a = allocation(u_t); c^w = C(M, k^w, b^w); w^w = g_w (g_a a + (1 - g_a) c^w);
// M_t = memory_write(M, w^w, e, v).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_dnc_write(
    const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& write_w, const at::Tensor& read_w,
    const at::Tensor& free_gates, const at::Tensor& write_key, const at::Tensor& write_strength,
    const at::Tensor& allocation_gate, const at::Tensor& write_gate, const at::Tensor& erase, const at::Tensor& add) {
  check_gate(allocation_gate, "allocation_gate", memory);
  check_gate(write_gate, "write_gate", memory);
  auto new_usage = ext_usage_update(usage, write_w, read_w, free_gates);
  auto allocation = ext_allocation_weights(new_usage);
  auto write_content = ext_content_weights(memory, write_key, write_strength);
  auto new_write_w = write_gate * at::lerp(write_content.select(1, 0), allocation, allocation_gate);
  auto new_memory = ext_memory_write(memory, new_write_w, erase, add);
  return {new_memory, new_usage, new_write_w, allocation, write_content};
}

// The chain rule back through ext_dnc_write, each kernel's backward in reverse order; the mix
// w^w = g_w (c + g_a (a - c)) gives grad g_w = sum_n g mix, grad g_a = sum_n g g_w (a - c),
// grad a = g g_w g_a, grad c = g g_w (1 - g_a).
std::vector<at::Tensor> ext_dnc_write_backward(
    const at::Tensor& grad_memory, const at::Tensor& grad_usage, const at::Tensor& grad_write_w,
    const at::Tensor& grad_allocation, const at::Tensor& grad_write_content, const at::Tensor& memory,
    const at::Tensor& usage, const at::Tensor& write_w, const at::Tensor& read_w, const at::Tensor& free_gates,
    const at::Tensor& write_key, const at::Tensor& write_strength, const at::Tensor& allocation_gate,
    const at::Tensor& write_gate, const at::Tensor& erase, const at::Tensor& add, const at::Tensor& new_memory,
    const at::Tensor& new_usage, const at::Tensor& new_write_w, const at::Tensor& allocation,
    const at::Tensor& write_content) {
  check_gate(allocation_gate, "allocation_gate", memory);
  check_gate(write_gate, "write_gate", memory);
  const auto written = ext_memory_write_backward(grad_memory, memory, new_write_w, erase, add, new_memory);
  const auto grad_w = grad_write_w + written[1];
  const auto content = write_content.select(1, 0);
  const auto grad_mix = grad_w * write_gate;
  const auto grad_write_gate = (grad_w * at::lerp(content, allocation, allocation_gate)).sum(-1, true);
  const auto grad_allocation_gate = (grad_mix * (allocation - content)).sum(-1, true);
  const auto grad_content = grad_write_content + (grad_mix * (1 - allocation_gate)).unsqueeze(1);
  const auto addressed = ext_content_weights_backward(grad_content, memory, write_key, write_strength, write_content);
  const auto allocated = ext_allocation_weights_backward(grad_allocation + grad_mix * allocation_gate, new_usage,
                                                         allocation);
  const auto used = ext_usage_update_backward(grad_usage + allocated[0], usage, write_w, read_w, free_gates, new_usage);
  return {written[0] + addressed[0], used[0],        used[1],     used[2],    used[3],   addressed[1],
          addressed[2],              grad_allocation_gate, grad_write_gate, written[2], written[3]};
}

// c^r = C(M, k^r, b^r); w^r = pi_1 b + pi_2 c^r + pi_3 f; r = M^T w^r.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_dnc_read(const at::Tensor& memory, const at::Tensor& read_keys,
                                                            const at::Tensor& read_strengths,
                                                            const at::Tensor& read_modes, const at::Tensor& backward,
                                                            const at::Tensor& forward) {
  check_read_inputs(memory, read_keys, read_modes, backward, forward);
  auto read_content = ext_content_weights(memory, read_keys, read_strengths);
  const auto modes = read_modes.unsqueeze(-1);
  auto read_w = modes.select(2, 0) * backward + modes.select(2, 1) * read_content + modes.select(2, 2) * forward;
  auto reads = ext_memory_read(memory, read_w);
  return {reads, read_w, read_content};
}

// grad pi_m = sum_n g w_m (w_m: b, c^r, f), grad b = pi_1 g, grad f = pi_3 g, grad c^r = pi_2 g.
std::vector<at::Tensor> ext_dnc_read_backward(const at::Tensor& grad_reads, const at::Tensor& grad_read_w,
                                              const at::Tensor& grad_read_content, const at::Tensor& memory,
                                              const at::Tensor& read_keys, const at::Tensor& read_strengths,
                                              const at::Tensor& read_modes, const at::Tensor& backward,
                                              const at::Tensor& forward, const at::Tensor& reads,
                                              const at::Tensor& read_w, const at::Tensor& read_content) {
  check_read_inputs(memory, read_keys, read_modes, backward, forward);
  const auto read = ext_memory_read_backward(grad_reads, memory, read_w, reads);
  const auto grad_w = grad_read_w + read[1];
  const auto grad_modes =
      at::stack({(grad_w * backward).sum(-1), (grad_w * read_content).sum(-1), (grad_w * forward).sum(-1)}, -1);
  const auto modes = read_modes.unsqueeze(-1);
  const auto addressed = ext_content_weights_backward(grad_read_content + modes.select(2, 1) * grad_w, memory,
                                                      read_keys, read_strengths, read_content);
  return {read[0] + addressed[0], addressed[1], addressed[2], grad_modes, modes.select(2, 0) * grad_w,
          modes.select(2, 2) * grad_w};
}

namespace {

using torch::autograd::variable_list;

struct DncWrite {
  static constexpr bool kSavesOutputs = true;
  static variable_list forward(const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& write_w,
                               const at::Tensor& read_w, const at::Tensor& free_gates, const at::Tensor& write_key,
                               const at::Tensor& write_strength, const at::Tensor& allocation_gate,
                               const at::Tensor& write_gate, const at::Tensor& erase, const at::Tensor& add) {
    auto [a, b, c, d, e] = ext_dnc_write(memory, usage, write_w, read_w, free_gates, write_key, write_strength,
                                         allocation_gate, write_gate, erase, add);
    return {a, b, c, d, e};
  }
  static variable_list backward(const variable_list& g, const variable_list& s) {
    return ext_dnc_write_backward(g[0], g[1], g[2], g[3], g[4], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                                  s[9], s[10], s[11], s[12], s[13], s[14], s[15]);
  }
};

struct DncRead {
  static constexpr bool kSavesOutputs = true;
  static variable_list forward(const at::Tensor& memory, const at::Tensor& read_keys, const at::Tensor& read_strengths,
                               const at::Tensor& read_modes, const at::Tensor& backward, const at::Tensor& forward) {
    auto [reads, read_w, read_content] = ext_dnc_read(memory, read_keys, read_strengths, read_modes, backward, forward);
    return {reads, read_w, read_content};
  }
  static variable_list backward(const variable_list& g, const variable_list& s) {
    return ext_dnc_read_backward(g[0], g[1], g[2], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dnc_write_autograd(
    const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& write_w, const at::Tensor& read_w,
    const at::Tensor& free_gates, const at::Tensor& write_key, const at::Tensor& write_strength,
    const at::Tensor& allocation_gate, const at::Tensor& write_gate, const at::Tensor& erase, const at::Tensor& add) {
  const auto out = Differentiated<DncWrite>::apply(memory, usage, write_w, read_w, free_gates, write_key,
                                                   write_strength, allocation_gate, write_gate, erase, add);
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dnc_read_autograd(const at::Tensor& memory, const at::Tensor& read_keys,
                                                                 const at::Tensor& read_strengths,
                                                                 const at::Tensor& read_modes,
                                                                 const at::Tensor& backward, const at::Tensor& forward) {
  const auto out = Differentiated<DncRead>::apply(memory, read_keys, read_strengths, read_modes, backward, forward);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def(
      "ext_dnc_write(Tensor memory, Tensor usage, Tensor write_w, Tensor read_w, Tensor free_gates, "
      "Tensor write_key, Tensor write_strength, Tensor allocation_gate, Tensor write_gate, Tensor erase, "
      "Tensor add) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_dnc_write_backward(Tensor grad_memory, Tensor grad_usage, Tensor grad_write_w, Tensor grad_allocation, "
      "Tensor grad_write_content, Tensor memory, Tensor usage, Tensor write_w, Tensor read_w, Tensor free_gates, "
      "Tensor write_key, Tensor write_strength, Tensor allocation_gate, Tensor write_gate, Tensor erase, "
      "Tensor add, Tensor new_memory, Tensor new_usage, Tensor new_write_w, Tensor allocation, "
      "Tensor write_content) -> Tensor[]");
  m.def(
      "ext_dnc_read(Tensor memory, Tensor read_keys, Tensor read_strengths, Tensor read_modes, Tensor backward, "
      "Tensor forward) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_dnc_read_backward(Tensor grad_reads, Tensor grad_read_w, Tensor grad_read_content, Tensor memory, "
      "Tensor read_keys, Tensor read_strengths, Tensor read_modes, Tensor backward, Tensor forward, "
      "Tensor reads, Tensor read_w, Tensor read_content) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_dnc_write", &ext_dnc_write);
  m.impl("ext_dnc_write_backward", &ext_dnc_write_backward);
  m.impl("ext_dnc_read", &ext_dnc_read);
  m.impl("ext_dnc_read_backward", &ext_dnc_read_backward);
}

TORCH_LIBRARY_IMPL(sparsemem, Autograd, m) {
  m.impl("ext_dnc_write", &dnc_write_autograd);
  m.impl("ext_dnc_read", &dnc_read_autograd);
}

}  // namespace sparsemem
