// A DNC step's write half and read half on the CPU, each one op (reference/dnc.py: dnc_write_ref,
// dnc_read_ref), composed of the dense kernels (usage.cpp, allocation.cpp, content.cpp,
// memory_rw.cpp) and the few products that mix their results, each mix one loop over (b, n)
// (forward and backward) where a dozen small torch ops had cost more than the kernels around them.
//
// Why: at the sizes the DNC trains at (N = 16-64) a step's arithmetic takes microseconds and its
// time goes to calling ops: each public op costs ~10-30 us of Python, checks and an autograd node
// around a kernel of a few. Two ops per step instead of six kernels and a dozen products between
// them leave two autograd nodes to run backwards.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
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

// w^w = g_w (c + g_a (a - c)) per (b, n): content c [B, N], allocation a [B, N], gates [B, 1].
at::Tensor write_mix(const at::Tensor& content, const at::Tensor& allocation, const at::Tensor& allocation_gate,
                     const at::Tensor& write_gate) {
  const auto c = content.contiguous(), a = allocation.contiguous(), ga = allocation_gate.contiguous();
  const auto gw = write_gate.contiguous();
  auto out = at::empty_like(a);
  const int64_t B = a.size(0), N = a.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dnc_write_mix", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pc = c.data_ptr<scalar_t>(), *pa = a.data_ptr<scalar_t>();
    const scalar_t *pga = ga.data_ptr<scalar_t>(), *pgw = gw.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const acc_t g_a = pga[b], g_w = pgw[b];
      for (int64_t n = b * N; n < (b + 1) * N; ++n) {
        const acc_t cn = pc[n];
        po[n] = scalar_t(g_w * (cn + g_a * (acc_t(pa[n]) - cn)));
      }
    }
  });
  return out;
}

// The mix's backward, g = grad_w [B, N] (all of w^w's gradient): grad g_w = sum_n g (c + g_a (a - c)),
// grad g_a = sum_n g g_w (a - c), grad a = grad_a + g g_w g_a, grad c = grad_c + g g_w (1 - g_a).
// -> (grad a, grad c [B, N], grad g_a, grad g_w [B, 1]).
std::vector<at::Tensor> write_mix_backward(const at::Tensor& grad_w, const at::Tensor& grad_allocation,
                                           const at::Tensor& grad_content, const at::Tensor& content,
                                           const at::Tensor& allocation, const at::Tensor& allocation_gate,
                                           const at::Tensor& write_gate) {
  const auto g = grad_w.contiguous(), g_alloc = grad_allocation.contiguous(), g_c = grad_content.contiguous();
  const auto c = content.contiguous(), a = allocation.contiguous(), ga = allocation_gate.contiguous();
  const auto gw = write_gate.contiguous();
  auto d_a = at::empty_like(a), d_c = at::empty_like(a), d_ga = at::empty_like(ga), d_gw = at::empty_like(gw);
  const int64_t B = a.size(0), N = a.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dnc_write_mix_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pg = g.data_ptr<scalar_t>(), *pga_in = g_alloc.data_ptr<scalar_t>();
    const scalar_t *pgc_in = g_c.data_ptr<scalar_t>(), *pc = c.data_ptr<scalar_t>(), *pa = a.data_ptr<scalar_t>();
    const scalar_t *pga = ga.data_ptr<scalar_t>(), *pgw = gw.data_ptr<scalar_t>();
    scalar_t *pda = d_a.data_ptr<scalar_t>(), *pdc = d_c.data_ptr<scalar_t>();
    scalar_t *pdga = d_ga.data_ptr<scalar_t>(), *pdgw = d_gw.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const acc_t g_a = pga[b], g_w = pgw[b];
      acc_t to_write_gate = 0, to_allocation_gate = 0;
      for (int64_t n = b * N; n < (b + 1) * N; ++n) {
        const acc_t gn = pg[n], cn = pc[n], an = pa[n], mixed = gn * g_w;
        to_write_gate += gn * (cn + g_a * (an - cn));
        to_allocation_gate += mixed * (an - cn);
        pda[n] = scalar_t(acc_t(pga_in[n]) + mixed * g_a);
        pdc[n] = scalar_t(acc_t(pgc_in[n]) + mixed * (acc_t(1) - g_a));
      }
      pdga[b] = scalar_t(to_allocation_gate);
      pdgw[b] = scalar_t(to_write_gate);
    }
  });
  return {d_a, d_c, d_ga, d_gw};
}

// w^r = pi_1 b + pi_2 c^r + pi_3 f per (b, r, n): modes [B, R, 3], the weightings [B, R, N].
at::Tensor read_mix(const at::Tensor& read_modes, const at::Tensor& backward, const at::Tensor& content,
                    const at::Tensor& forward) {
  const auto m = read_modes.contiguous(), bw = backward.contiguous(), c = content.contiguous();
  const auto fw = forward.contiguous();
  auto out = at::empty_like(c);
  const int64_t rows = c.size(0) * c.size(1), N = c.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "dnc_read_mix", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pm = m.data_ptr<scalar_t>(), *pb = bw.data_ptr<scalar_t>(), *pc = c.data_ptr<scalar_t>();
    const scalar_t* pf = fw.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t row = 0; row < rows; ++row) {
      const acc_t m0 = pm[row * 3], m1 = pm[row * 3 + 1], m2 = pm[row * 3 + 2];
      for (int64_t n = row * N; n < (row + 1) * N; ++n) {
        po[n] = scalar_t(m0 * acc_t(pb[n]) + m1 * acc_t(pc[n]) + m2 * acc_t(pf[n]));
      }
    }
  });
  return out;
}

// The mix's backward, g = grad_w [B, R, N] (all of w^r's gradient): grad pi_m = sum_n g w_m (w_m: b,
// c^r, f), grad b = pi_1 g, grad c^r = grad_c + pi_2 g, grad f = pi_3 g.
// -> (grad modes [B, R, 3], grad b, grad c^r, grad f).
std::vector<at::Tensor> read_mix_backward(const at::Tensor& grad_w, const at::Tensor& grad_content,
                                          const at::Tensor& read_modes, const at::Tensor& backward,
                                          const at::Tensor& content, const at::Tensor& forward) {
  const auto g = grad_w.contiguous(), g_c = grad_content.contiguous(), m = read_modes.contiguous();
  const auto bw = backward.contiguous(), c = content.contiguous(), fw = forward.contiguous();
  auto d_m = at::empty_like(m), d_b = at::empty_like(c), d_c = at::empty_like(c), d_f = at::empty_like(c);
  const int64_t rows = c.size(0) * c.size(1), N = c.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "dnc_read_mix_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pg = g.data_ptr<scalar_t>(), *pgc = g_c.data_ptr<scalar_t>(), *pm = m.data_ptr<scalar_t>();
    const scalar_t *pb = bw.data_ptr<scalar_t>(), *pc = c.data_ptr<scalar_t>(), *pf = fw.data_ptr<scalar_t>();
    scalar_t *pdm = d_m.data_ptr<scalar_t>(), *pdb = d_b.data_ptr<scalar_t>(), *pdc = d_c.data_ptr<scalar_t>();
    scalar_t* pdf = d_f.data_ptr<scalar_t>();
    for (int64_t row = 0; row < rows; ++row) {
      const acc_t m0 = pm[row * 3], m1 = pm[row * 3 + 1], m2 = pm[row * 3 + 2];
      acc_t to_m0 = 0, to_m1 = 0, to_m2 = 0;
      for (int64_t n = row * N; n < (row + 1) * N; ++n) {
        const acc_t gn = pg[n];
        to_m0 += gn * acc_t(pb[n]);
        to_m1 += gn * acc_t(pc[n]);
        to_m2 += gn * acc_t(pf[n]);
        pdb[n] = scalar_t(m0 * gn);
        pdc[n] = scalar_t(acc_t(pgc[n]) + m1 * gn);
        pdf[n] = scalar_t(m2 * gn);
      }
      pdm[row * 3] = scalar_t(to_m0);
      pdm[row * 3 + 1] = scalar_t(to_m1);
      pdm[row * 3 + 2] = scalar_t(to_m2);
    }
  });
  return {d_m, d_b, d_c, d_f};
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
  auto new_write_w = write_mix(write_content.select(1, 0), allocation, allocation_gate, write_gate);
  auto new_memory = ext_memory_write(memory, new_write_w, erase, add);
  return {new_memory, new_usage, new_write_w, allocation, write_content};
}

// The chain rule back through ext_dnc_write, each kernel's backward in reverse order (the mix's:
// write_mix_backward).
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
  const auto mixed = write_mix_backward(grad_write_w + written[1], grad_allocation, grad_write_content.select(1, 0),
                                        write_content.select(1, 0), allocation, allocation_gate, write_gate);
  const auto addressed =
      ext_content_weights_backward(mixed[1].unsqueeze(1), memory, write_key, write_strength, write_content);
  const auto allocated = ext_allocation_weights_backward(mixed[0], new_usage, allocation);
  const auto used = ext_usage_update_backward(grad_usage + allocated[0], usage, write_w, read_w, free_gates, new_usage);
  return {written[0] + addressed[0], used[0], used[1], used[2], used[3], addressed[1], addressed[2],
          mixed[2],                  mixed[3], written[2], written[3]};
}

// c^r = C(M, k^r, b^r); w^r = pi_1 b + pi_2 c^r + pi_3 f; r = M^T w^r.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_dnc_read(const at::Tensor& memory, const at::Tensor& read_keys,
                                                            const at::Tensor& read_strengths,
                                                            const at::Tensor& read_modes, const at::Tensor& backward,
                                                            const at::Tensor& forward) {
  check_read_inputs(memory, read_keys, read_modes, backward, forward);
  auto read_content = ext_content_weights(memory, read_keys, read_strengths);
  auto read_w = read_mix(read_modes, backward, read_content, forward);
  auto reads = ext_memory_read(memory, read_w);
  return {reads, read_w, read_content};
}

// The read, the mix (read_mix_backward) and the content weights, backwards.
std::vector<at::Tensor> ext_dnc_read_backward(const at::Tensor& grad_reads, const at::Tensor& grad_read_w,
                                              const at::Tensor& grad_read_content, const at::Tensor& memory,
                                              const at::Tensor& read_keys, const at::Tensor& read_strengths,
                                              const at::Tensor& read_modes, const at::Tensor& backward,
                                              const at::Tensor& forward, const at::Tensor& reads,
                                              const at::Tensor& read_w, const at::Tensor& read_content) {
  check_read_inputs(memory, read_keys, read_modes, backward, forward);
  const auto read = ext_memory_read_backward(grad_reads, memory, read_w, reads);
  const auto mixed = read_mix_backward(grad_read_w + read[1], grad_read_content, read_modes, backward, read_content,
                                       forward);
  const auto addressed = ext_content_weights_backward(mixed[2], memory, read_keys, read_strengths, read_content);
  return {read[0] + addressed[0], addressed[1], addressed[2], mixed[0], mixed[1], mixed[3]};
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
