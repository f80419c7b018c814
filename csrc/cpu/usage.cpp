// DNC usage on the CPU: u' = (u + ww - u ww) psi, with retention psi = prod_r (1 - f_r wr[r]).
//
// A step's usage is O(B N R), a few microseconds of arithmetic at the sizes the DNC trains at;
// the torch backend differentiates the reference with torch.func.vjp, which costs ~1 ms a
// backward call in Python and dispatch alone. One pass per batch row, in parallel over B when
// the work is worth waking the thread pool (vector_math.h's grain).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dense.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

void check_usage_inputs(const at::Tensor& usage, const at::Tensor& write_w, const at::Tensor& read_w,
                        const at::Tensor& free_gates) {
  TORCH_CHECK(usage.dim() == 2, "usage must be [B, N]; got ", usage.sizes());
  const int64_t B = usage.size(0), N = usage.size(1);
  TORCH_CHECK(write_w.dim() == 2 && write_w.size(0) == B && write_w.size(1) == N,
              "write_w must be [B, N] matching usage [B, N]; got ", write_w.sizes());
  TORCH_CHECK(read_w.dim() == 3 && read_w.size(0) == B && read_w.size(2) == N,
              "read_w must be [B, R, N] matching usage [B, N]; got ", read_w.sizes());
  TORCH_CHECK(free_gates.dim() == 2 && free_gates.size(0) == B && free_gates.size(1) == read_w.size(1),
              "free_gates must be [B, R] matching read_w [B, R, N]; got ", free_gates.sizes());
  for (const auto* x : {&write_w, &read_w, &free_gates}) {
    TORCH_CHECK(x->scalar_type() == usage.scalar_type(), "usage, write_w, read_w and free_gates must share a dtype");
  }
}

}  // namespace

at::Tensor ext_usage_update(const at::Tensor& usage_in, const at::Tensor& write_w_in, const at::Tensor& read_w_in,
                            const at::Tensor& free_gates_in) {
  check_usage_inputs(usage_in, write_w_in, read_w_in, free_gates_in);
  const auto usage = usage_in.contiguous(), write_w = write_w_in.contiguous();
  const auto read_w = read_w_in.contiguous(), free_gates = free_gates_in.contiguous();
  const int64_t B = usage.size(0), N = usage.size(1), R = read_w.size(1);
  auto new_usage = at::empty_like(usage);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "ext_usage_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* u = usage.data_ptr<scalar_t>();
    const scalar_t* ww = write_w.data_ptr<scalar_t>();
    const scalar_t* wr = read_w.data_ptr<scalar_t>();
    const scalar_t* f = free_gates.data_ptr<scalar_t>();
    scalar_t* out = new_usage.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(N * (R + 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> retention(N);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(retention.begin(), retention.end(), acc_t(1));
        for (int64_t r = 0; r < R; ++r) {
          const acc_t gate = acc_t(f[b * R + r]);
          const scalar_t* weights = wr + (b * R + r) * N;
          for (int64_t n = 0; n < N; ++n) retention[n] *= 1 - gate * acc_t(weights[n]);
        }
        for (int64_t n = 0; n < N; ++n) {
          const acc_t old = acc_t(u[b * N + n]), written = acc_t(ww[b * N + n]);
          out[b * N + n] = scalar_t((old + written - old * written) * retention[n]);
        }
      }
    });
  });
  return new_usage;
}

// With g = grad u', a = u + ww - u ww and t_r = 1 - f_r wr[r] (psi = prod_r t_r):
//   grad u = g psi (1 - ww),   grad ww = g psi (1 - u),
//   grad wr[r] = -f_r g a prod_{s != r} t_s,   grad f_r = -sum_n wr[r, n] g_n a_n prod_{s != r} t_s[n].
// The products leaving one factor out come from prefix and suffix products (no division: t may be 0).
std::vector<at::Tensor> ext_usage_update_backward(const at::Tensor& grad_in, const at::Tensor& usage_in,
                                                  const at::Tensor& write_w_in, const at::Tensor& read_w_in,
                                                  const at::Tensor& free_gates_in, const at::Tensor& /*new_usage*/) {
  check_usage_inputs(usage_in, write_w_in, read_w_in, free_gates_in);
  const auto grad = grad_in.contiguous(), usage = usage_in.contiguous(), write_w = write_w_in.contiguous();
  const auto read_w = read_w_in.contiguous(), free_gates = free_gates_in.contiguous();
  const int64_t B = usage.size(0), N = usage.size(1), R = read_w.size(1);
  auto d_usage = at::empty_like(usage), d_write_w = at::empty_like(write_w);
  auto d_read_w = at::empty_like(read_w), d_free_gates = at::empty_like(free_gates);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "ext_usage_update_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* u = usage.data_ptr<scalar_t>();
    const scalar_t* ww = write_w.data_ptr<scalar_t>();
    const scalar_t* wr = read_w.data_ptr<scalar_t>();
    const scalar_t* f = free_gates.data_ptr<scalar_t>();
    scalar_t* du = d_usage.data_ptr<scalar_t>();
    scalar_t* dww = d_write_w.data_ptr<scalar_t>();
    scalar_t* dwr = d_read_w.data_ptr<scalar_t>();
    scalar_t* df = d_free_gates.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(N * (3 * R + 2)), [&](int64_t begin, int64_t end) {
      // per slot: t_r, then the prefix products prod_{s < r} t_s (R + 1 of them)
      std::vector<acc_t> factors(R), prefix(R + 1), gate_sums(R);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(gate_sums.begin(), gate_sums.end(), acc_t(0));
        for (int64_t n = 0; n < N; ++n) {
          prefix[0] = 1;
          for (int64_t r = 0; r < R; ++r) {
            factors[r] = 1 - acc_t(f[b * R + r]) * acc_t(wr[(b * R + r) * N + n]);
            prefix[r + 1] = prefix[r] * factors[r];
          }
          const acc_t retention = prefix[R], gn = acc_t(g[b * N + n]);
          const acc_t old = acc_t(u[b * N + n]), written = acc_t(ww[b * N + n]);
          du[b * N + n] = scalar_t(gn * retention * (1 - written));
          dww[b * N + n] = scalar_t(gn * retention * (1 - old));
          const acc_t grad_retention = gn * (old + written - old * written);
          acc_t suffix = 1;  // prod_{s > r} t_s
          for (int64_t r = R - 1; r >= 0; --r) {
            const acc_t grad_factor = grad_retention * prefix[r] * suffix;
            const int64_t at = (b * R + r) * N + n;
            dwr[at] = scalar_t(-acc_t(f[b * R + r]) * grad_factor);
            gate_sums[r] -= acc_t(wr[at]) * grad_factor;
            suffix *= factors[r];
          }
        }
        for (int64_t r = 0; r < R; ++r) df[b * R + r] = scalar_t(gate_sums[r]);
      }
    });
  });
  return {d_usage, d_write_w, d_read_w, d_free_gates};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_usage_update(Tensor usage, Tensor write_w, Tensor read_w, Tensor free_gates) -> Tensor");
  m.def(
      "ext_usage_update_backward(Tensor grad_usage, Tensor usage, Tensor write_w, Tensor read_w, "
      "Tensor free_gates, Tensor new_usage) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_usage_update", &ext_usage_update);
  m.impl("ext_usage_update_backward", &ext_usage_update_backward);
}

}  // namespace sparsemem
