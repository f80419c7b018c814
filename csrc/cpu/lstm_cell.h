// The pieces shared by the ops that run a memory model's steps with an LSTM-cell controller in C++
// (dnc_sequence.cpp, sam_sequence.cpp): the cell's forward and backward, the interface's
// squashing functions, and the padded rows' where over the batch.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace sparsemem {

template <typename scalar_t>
scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-x));
}

// torch's softplus (threshold 20: the identity above it), plus one.
template <typename scalar_t>
scalar_t oneplus(scalar_t x) {
  return x > scalar_t(20) ? scalar_t(1) + x : scalar_t(1) + std::log1p(std::exp(x));
}

// oneplus' backward: g sigmoid(x), g itself above the threshold.
template <typename scalar_t>
scalar_t oneplus_backward(scalar_t x, scalar_t g) {
  return x > scalar_t(20) ? g : g * sigmoid(x);
}

// The cell's transcendentals run as torch's vectorised sigmoid and tanh: a scalar std::exp per
// element took most of a step's forward (B H = 4096 of each five a step at B = 32, H = 128).
// gates [B, 4H] (i, f, g, o) -> act [B, 4H] = (sigmoid, sigmoid, tanh, sigmoid) of them.
inline void squash_gates(const at::Tensor& gates, at::Tensor& act) {
  const auto H = gates.size(1) / 4;
  at::sigmoid_out(act, gates);
  auto cell_gate = act.narrow(1, 2 * H, H);
  at::tanh_out(cell_gate, gates.narrow(1, 2 * H, H));
}

// c = f c_prev + i g.
template <typename scalar_t>
void cell_forward(int64_t B, int64_t H, const scalar_t* act, const scalar_t* c_prev, scalar_t* c) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* a = act + b * 4 * H;
    for (int64_t j = 0; j < H; ++j) c[b * H + j] = a[H + j] * c_prev[b * H + j] + a[j] * a[2 * H + j];
  }
}

// grad_h [B, H] (all of h_t = o tanh(c_t)'s gradient), grad_c [B, H] (c_t's from the step after;
// becomes c_{t-1}'s) -> grad_gates [B, 4H].
template <typename scalar_t>
void cell_backward(int64_t B, int64_t H, const scalar_t* act, const scalar_t* c_prev, const scalar_t* tanh_c,
                   const scalar_t* grad_h, scalar_t* grad_c, scalar_t* grad_gates) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* a = act + b * 4 * H;
    scalar_t* d = grad_gates + b * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
      const scalar_t tc = tanh_c[b * H + j], dh = grad_h[b * H + j];
      const scalar_t dc = grad_c[b * H + j] + dh * o * (scalar_t(1) - tc * tc);
      d[j] = dc * g * i * (scalar_t(1) - i);
      d[H + j] = dc * c_prev[b * H + j] * f * (scalar_t(1) - f);
      d[2 * H + j] = dc * i * (scalar_t(1) - g * g);
      d[3 * H + j] = dh * tc * o * (scalar_t(1) - o);
      grad_c[b * H + j] = dc * f;
    }
  }
}

// One step of the cell in a sequence op: input = [r_{t-1} ; h_{t-1}] (reads [B, R, W], h [B, H]),
// gates = gates_x + input weight_rh^T, their squashing act, the new cell new_c = f c + i g, its
// tanh, and new_h = o tanh(new_c), each written into the given [B, ...] slice of the op's tape.
inline void cell_step(const at::Tensor& gates_x, const at::Tensor& reads, const at::Tensor& h, const at::Tensor& c,
                      const at::Tensor& weight_rh_t, at::Tensor input, at::Tensor act, at::Tensor new_c,
                      at::Tensor tanh_c, at::Tensor new_h) {
  const auto B = h.size(0), H = h.size(1);
  at::cat_out(input, {reads.view({B, -1}), h}, 1);
  squash_gates(at::addmm(gates_x, input, weight_rh_t), act);
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "cell_step", [&] {
    cell_forward<scalar_t>(B, H, act.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), new_c.data_ptr<scalar_t>());
  });
  at::tanh_out(tanh_c, new_c);
  at::mul_out(new_h, act.narrow(1, 3 * H, H), tanh_c);  // h = o tanh(c)
}

// cell_step's backward: grad_h [B, H] (all of h_t's gradient), grad_c [B, H] (c_t's; becomes
// c_{t-1}'s) -> grad_gates [B, 4H] (written) and the gradients of r_{t-1} [B, R, W] and h_{t-1}.
inline std::pair<at::Tensor, at::Tensor> cell_step_backward(const at::Tensor& act, const at::Tensor& c_prev,
                                                            const at::Tensor& tanh_c, const at::Tensor& grad_h,
                                                            at::Tensor& grad_c, at::Tensor grad_gates,
                                                            const at::Tensor& weight_rh, int64_t R, int64_t W) {
  const auto B = grad_h.size(0), H = grad_h.size(1);
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "cell_step_backward", [&] {
    cell_backward<scalar_t>(B, H, act.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
                            tanh_c.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
                            grad_gates.data_ptr<scalar_t>());
  });
  const auto grad_input = at::mm(grad_gates, weight_rh);  // [B, R*W + H]: [r_{t-1} ; h_{t-1}]
  return {grad_input.narrow(1, 0, R * W).reshape({B, R, W}), grad_input.narrow(1, R * W, H).contiguous()};
}

// A padded step (some rows' active false) keeps those rows' state: where(active, new, old) over the
// batch, which the backward splits into the gradient through the step (active rows) and the one
// straight to the state before it (the others).
inline bool every_row(const at::Tensor& active_t) {
  const bool* a = active_t.data_ptr<bool>();
  return std::all_of(a, a + active_t.numel(), [](bool x) { return x; });
}

// where(active, x, y) over the batch dimension; x or y may be a 0-dim zero.
inline at::Tensor rows_where(const at::Tensor& active_t, const at::Tensor& x, const at::Tensor& y) {
  std::vector<int64_t> shape(std::max(x.dim(), y.dim()), 1);
  shape[0] = active_t.numel();
  return at::where(active_t.view(shape), x, y);
}

// g -> (g where active, 0 elsewhere), and g's other rows returned; zero: a 0-dim zero of g's dtype.
inline at::Tensor split_rows(const at::Tensor& active_t, at::Tensor& g, const at::Tensor& zero) {
  auto direct = rows_where(active_t, zero, g);
  g = rows_where(active_t, g, zero);
  return direct;
}

}  // namespace sparsemem
