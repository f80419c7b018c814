// NTM addressing on the CPU: content weights c (content.cpp's kernel), then per head row of [N]
//   g = gate c + (1 - gate) w_prev                       interpolation
//   s[i] = sum_j g[(i - o_j) mod N] shift[j]             circular shift, offsets o_j = j - S / 2
//   w = (s / max s)^gamma / sum (s / max s)^gamma         sharpening (the max keeps a large gamma
//                                                         from underflowing every entry to 0)
// The torch backend differentiates the reference with torch.func.vjp, ~4 ms a backward call in
// Python and dispatch at the NTM paper's sizes (N = 128, S = 3), most of an NTM training step;
// here a row is a few passes over N numbers. The backward recomputes c, g and s (cheap) rather
// than saving them, and ends in content's backward for the memory, key and strength. Sums over
// a row are kept in double: each is subtracted from, or divides, every entry of the row, so a
// float sum's rounding over N = 4097 terms (~1e-5) would reach every gradient.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "autograd.h"
#include "content.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

void check_ntm_inputs(const at::Tensor& memory, const at::Tensor& key, const at::Tensor& strength,
                      const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& sharpen,
                      const at::Tensor& prev_w) {
  TORCH_CHECK(memory.dim() == 3 && key.dim() == 3 && shift.dim() == 3 && prev_w.dim() == 3,
              "memory must be [B, N, W], key [B, R, W], shift [B, R, S], prev_w [B, R, N]");
  const int64_t B = memory.size(0), N = memory.size(1), R = key.size(1);
  TORCH_CHECK(key.size(0) == B && key.size(2) == memory.size(2), "key must be [B, R, W] matching memory [B, N, W]");
  TORCH_CHECK(shift.size(0) == B && shift.size(1) == R && shift.size(2) % 2 == 1,
              "shift must be [B, R, S] with S odd, matching key [B, R, W]");
  TORCH_CHECK(prev_w.size(0) == B && prev_w.size(1) == R && prev_w.size(2) == N,
              "prev_w must be [B, R, N] matching memory [B, N, W] and key [B, R, W]");
  for (const auto* x : {&strength, &gate, &sharpen}) {
    TORCH_CHECK(x->dim() == 2 && x->size(0) == B && x->size(1) == R, "strength, gate, sharpen must be [B, R]");
  }
  for (const auto* x : {&key, &strength, &gate, &shift, &sharpen, &prev_w}) {
    TORCH_CHECK(x->scalar_type() == memory.scalar_type(), "the inputs of ntm_address must share a dtype");
  }
}

// Shift j's offset o_j = j - S / 2 taken mod N, in [0, N).
inline int64_t wrapped_offset(int64_t j, int64_t S, int64_t N) { return ((j - S / 2) % N + N) % N; }

// One head row's interpolation and shift: g and s, [N] each.
template <typename scalar_t, typename acc_t>
void gate_and_shift(const scalar_t* content, const scalar_t* prev, acc_t gate, const scalar_t* shift, int64_t N,
                    int64_t S, acc_t* g, acc_t* s) {
  for (int64_t i = 0; i < N; ++i) g[i] = gate * acc_t(content[i]) + (1 - gate) * acc_t(prev[i]);
  std::fill(s, s + N, acc_t(0));
  for (int64_t j = 0; j < S; ++j) {
    const acc_t weight = acc_t(shift[j]);
    // s[i + o] += g[i] (mod N): g shifted right by o = o_j mod N, in two runs so no index wraps
    const int64_t offset = wrapped_offset(j, S, N);
    for (int64_t i = 0; i < N - offset; ++i) s[i + offset] += weight * g[i];
    for (int64_t i = N - offset; i < N; ++i) s[i + offset - N] += weight * g[i];
  }
}

}  // namespace

at::Tensor ext_ntm_address(const at::Tensor& memory, const at::Tensor& key_in, const at::Tensor& strength,
                           const at::Tensor& gate_in, const at::Tensor& shift_in, const at::Tensor& sharpen_in,
                           const at::Tensor& prev_w_in) {
  check_ntm_inputs(memory, key_in, strength, gate_in, shift_in, sharpen_in, prev_w_in);
  const auto content = ext_content_weights(memory, key_in, strength);  // [B, R, N], contiguous
  const auto gate = gate_in.contiguous(), shift = shift_in.contiguous(), sharpen = sharpen_in.contiguous();
  const auto prev_w = prev_w_in.contiguous();
  const int64_t rows = content.size(0) * content.size(1), N = content.size(2), S = shift.size(2);
  auto weights = at::empty_like(content);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_ntm_address", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *c = content.data_ptr<scalar_t>(), *p = prev_w.data_ptr<scalar_t>();
    const scalar_t *gates = gate.data_ptr<scalar_t>(), *shifts = shift.data_ptr<scalar_t>();
    const scalar_t* gammas = sharpen.data_ptr<scalar_t>();
    scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(N * (S + 4)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> g(N), s(N);
      for (int64_t row = begin; row < end; ++row) {
        gate_and_shift(c + row * N, p + row * N, acc_t(gates[row]), shifts + row * S, N, S, g.data(), s.data());
        const acc_t peak = *std::max_element(s.begin(), s.end()), gamma = acc_t(gammas[row]);
        double total = 0;
        for (int64_t i = 0; i < N; ++i) total += s[i] = std::pow(s[i] / peak, gamma);
        const acc_t inv_total = acc_t(1 / total);
        for (int64_t i = 0; i < N; ++i) w[row * N + i] = scalar_t(s[i] * inv_total);
      }
    });
  });
  return weights;
}

// With gw = grad w, r = s / max s, Q = sum r^gamma (w = r^gamma / Q) and d = sum gw w:
//   grad s[i] = gamma r[i]^(gamma - 1) / (max s Q) (gw[i] - d)      (max s cancels out of w)
//   grad gamma = sum_i (gw[i] - d) w[i] ln r[i]                      (0 where w[i] = 0)
//   grad g[i] = sum_j grad s[i + o_j] shift[j],   grad shift[j] = sum_i grad s[i] g[i - o_j]
//   grad c = gate grad g,  grad w_prev = (1 - gate) grad g,  grad gate = sum_i grad g[i] (c[i] - w_prev[i])
// then content's backward turns grad c into the memory's, key's and strength's.
std::vector<at::Tensor> ext_ntm_address_backward(const at::Tensor& grad_w_in, const at::Tensor& memory,
                                                 const at::Tensor& key, const at::Tensor& strength,
                                                 const at::Tensor& gate_in, const at::Tensor& shift_in,
                                                 const at::Tensor& sharpen_in, const at::Tensor& prev_w_in,
                                                 const at::Tensor& weights_in) {
  check_ntm_inputs(memory, key, strength, gate_in, shift_in, sharpen_in, prev_w_in);
  const auto content = ext_content_weights(memory, key, strength);
  const auto grad_w = grad_w_in.contiguous(), gate = gate_in.contiguous(), shift = shift_in.contiguous();
  const auto sharpen = sharpen_in.contiguous(), prev_w = prev_w_in.contiguous(), weights = weights_in.contiguous();
  const int64_t rows = content.size(0) * content.size(1), N = content.size(2), S = shift.size(2);
  auto grad_content = at::empty_like(content), grad_prev = at::empty_like(prev_w);
  auto grad_gate = at::empty_like(gate), grad_shift = at::empty_like(shift), grad_sharpen = at::empty_like(sharpen);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_ntm_address_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *c = content.data_ptr<scalar_t>(), *p = prev_w.data_ptr<scalar_t>();
    const scalar_t *gates = gate.data_ptr<scalar_t>(), *shifts = shift.data_ptr<scalar_t>();
    const scalar_t *gammas = sharpen.data_ptr<scalar_t>(), *w = weights.data_ptr<scalar_t>();
    const scalar_t* gw = grad_w.data_ptr<scalar_t>();
    scalar_t *gc = grad_content.data_ptr<scalar_t>(), *gp = grad_prev.data_ptr<scalar_t>();
    scalar_t *ggate = grad_gate.data_ptr<scalar_t>(), *gshift = grad_shift.data_ptr<scalar_t>();
    scalar_t* gsharpen = grad_sharpen.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(N * (2 * S + 8)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> g(N), s(N), grad_s(N), grad_g(N);
      for (int64_t row = begin; row < end; ++row) {
        const acc_t gate_r = acc_t(gates[row]), gamma = acc_t(gammas[row]);
        gate_and_shift(c + row * N, p + row * N, gate_r, shifts + row * S, N, S, g.data(), s.data());
        const acc_t peak = *std::max_element(s.begin(), s.end());
        const scalar_t *gw_r = gw + row * N, *w_r = w + row * N;
        double d = 0, total = 0;
        for (int64_t i = 0; i < N; ++i) {
          d += acc_t(gw_r[i]) * acc_t(w_r[i]);
          total += grad_s[i] = std::pow(s[i] / peak, gamma);  // r^gamma, as the forward sums it
        }
        double grad_gamma = 0;
        const acc_t scale = acc_t(gamma / (peak * total));
        for (int64_t i = 0; i < N; ++i) {
          const acc_t ratio = s[i] / peak, centred = acc_t(double(gw_r[i]) - d);
          // r^(gamma - 1) = r^gamma / r: one pow a slot, not two (r = 0: 0^(gamma - 1), 1 at gamma = 1)
          const acc_t slope = ratio > 0 ? grad_s[i] / ratio : std::pow(ratio, gamma - 1);
          grad_s[i] = scale * slope * centred;
          if (acc_t(w_r[i]) != 0) grad_gamma += centred * acc_t(w_r[i]) * std::log(ratio);
        }
        gsharpen[row] = scalar_t(grad_gamma);
        std::fill(grad_g.begin(), grad_g.end(), acc_t(0));
        for (int64_t j = 0; j < S; ++j) {
          const acc_t weight = acc_t(shifts[row * S + j]);
          const int64_t offset = wrapped_offset(j, S, N);
          double total_j = 0;
          for (int64_t i = 0; i < N; ++i) {
            const acc_t from = grad_s[i < N - offset ? i + offset : i + offset - N];
            total_j += from * g[i];
            grad_g[i] += weight * from;
          }
          gshift[row * S + j] = scalar_t(total_j);
        }
        double grad_gate_r = 0;
        for (int64_t i = 0; i < N; ++i) {
          const acc_t content_i = acc_t(c[row * N + i]), prev_i = acc_t(p[row * N + i]);
          gc[row * N + i] = scalar_t(gate_r * grad_g[i]);
          gp[row * N + i] = scalar_t((1 - gate_r) * grad_g[i]);
          grad_gate_r += grad_g[i] * (content_i - prev_i);
        }
        ggate[row] = scalar_t(grad_gate_r);
      }
    });
  });
  auto content_grads = ext_content_weights_backward(grad_content, memory, key, strength, content);
  return {content_grads[0], content_grads[1], content_grads[2], grad_gate, grad_shift, grad_sharpen, grad_prev};
}

namespace {

struct NtmAddress {
  static constexpr bool kSavesOutputs = true;
  static torch::autograd::variable_list forward(const at::Tensor& memory, const at::Tensor& key,
                                                const at::Tensor& strength, const at::Tensor& gate,
                                                const at::Tensor& shift, const at::Tensor& sharpen,
                                                const at::Tensor& prev_w) {
    return {ext_ntm_address(memory, key, strength, gate, shift, sharpen, prev_w)};
  }
  static torch::autograd::variable_list backward(const torch::autograd::variable_list& g,
                                                 const torch::autograd::variable_list& s) {
    return ext_ntm_address_backward(g[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
  }
};

at::Tensor ntm_address_autograd(const at::Tensor& memory, const at::Tensor& key, const at::Tensor& strength,
                                const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& sharpen,
                                const at::Tensor& prev_w) {
  return Differentiated<NtmAddress>::apply(memory, key, strength, gate, shift, sharpen, prev_w)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def(
      "ext_ntm_address(Tensor memory, Tensor key, Tensor strength, Tensor gate, Tensor shift, Tensor sharpen, "
      "Tensor prev_w) -> Tensor");
  m.def(
      "ext_ntm_address_backward(Tensor grad_weights, Tensor memory, Tensor key, Tensor strength, Tensor gate, "
      "Tensor shift, Tensor sharpen, Tensor prev_w, Tensor weights) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_ntm_address", &ext_ntm_address);
  m.impl("ext_ntm_address_backward", &ext_ntm_address_backward);
}

TORCH_LIBRARY_IMPL(sparsemem, Autograd, m) { m.impl("ext_ntm_address", &ntm_address_autograd); }

}  // namespace sparsemem
