// Writing to and reading from a dense memory on the CPU.
//   write: M'[n, :] = M[n, :] * (1 - w_n e) + w_n v      (erase and add in one pass over memory)
//   read:  r[b, r, :] = sum_n w[b, r, n] M[b, n, :]
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dense.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

void check_memory(const at::Tensor& memory) {
  TORCH_CHECK(memory.dim() == 3, "memory must be [B, N, W]; got ", memory.sizes());
}

void check_read_inputs(const at::Tensor& memory, const at::Tensor& read_w) {
  check_memory(memory);
  TORCH_CHECK(read_w.dim() == 3 && memory.size(0) == read_w.size(0) && memory.size(1) == read_w.size(2),
              "read_w must be [B, R, N] matching memory [B, N, W]; got ", read_w.sizes());
  TORCH_CHECK(memory.scalar_type() == read_w.scalar_type(), "memory and read_w must share a dtype");
}

void check_write_inputs(const at::Tensor& memory, const at::Tensor& write_w, const at::Tensor& erase,
                        const at::Tensor& add) {
  check_memory(memory);
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2);
  TORCH_CHECK(write_w.dim() == 2 && write_w.size(0) == B && write_w.size(1) == N,
              "write_w must be [B, N] matching memory [B, N, W]; got ", write_w.sizes());
  TORCH_CHECK(erase.dim() == 2 && erase.size(0) == B && erase.size(1) == W,
              "erase must be [B, W] matching memory [B, N, W]; got ", erase.sizes());
  TORCH_CHECK(add.dim() == 2 && add.size(0) == B && add.size(1) == W,
              "add must be [B, W] matching memory [B, N, W]; got ", add.sizes());
  for (const auto* x : {&write_w, &erase, &add}) {
    TORCH_CHECK(x->scalar_type() == memory.scalar_type(), "memory, write_w, erase and add must share a dtype");
  }
}

// Up to this many values per batch row (N W) the read's backward is a loop of its own, above it two bmm's.
constexpr int64_t kLoopReadValues = 1024;

// Slots per piece of the write's backward: the erase and add gradients are sums over N, kept per
// piece and added up after the parallel loop so no two threads write the same element.
constexpr int64_t kSlotBlock = 1024;

}  // namespace

at::Tensor ext_memory_write(const at::Tensor& memory_in, const at::Tensor& write_w_in, const at::Tensor& erase_in,
                            const at::Tensor& add_in) {
  check_write_inputs(memory_in, write_w_in, erase_in, add_in);
  const auto memory = memory_in.contiguous(), write_w = write_w_in.contiguous();
  const auto erase = erase_in.contiguous(), add = add_in.contiguous();
  const int64_t N = memory.size(1), W = memory.size(2);
  auto new_memory = at::empty_like(memory);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_memory_write", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const scalar_t* w = write_w.data_ptr<scalar_t>();
    const scalar_t* e = erase.data_ptr<scalar_t>();
    const scalar_t* v = add.data_ptr<scalar_t>();
    scalar_t* out = new_memory.data_ptr<scalar_t>();
    at::parallel_for(0, memory.size(0) * N, 256, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) {
        const int64_t b = slot / N;
        const acc_t weight = acc_t(w[slot]);
        const scalar_t* word = m + slot * W;
        for (int64_t i = 0; i < W; ++i) {
          out[slot * W + i] =
              scalar_t(acc_t(word[i]) * (1 - weight * acc_t(e[b * W + i])) + weight * acc_t(v[b * W + i]));
        }
      }
    });
  });
  return new_memory;
}

namespace {

// grad M[n, i] = g[n, i] (1 - w_n e_i);  grad w_n = sum_i g[n, i] (v_i - M[n, i] e_i);
// grad e_i = -sum_n g[n, i] M[n, i] w_n;  grad v_i = sum_n g[n, i] w_n.
template <typename scalar_t>
void memory_write_backward(const at::Tensor& grad, const at::Tensor& memory, const at::Tensor& write_w,
                           const at::Tensor& erase, const at::Tensor& add, at::Tensor& grad_memory,
                           at::Tensor& grad_write_w, at::Tensor& grad_erase, at::Tensor& grad_add) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2);
  const int64_t blocks = (N + kSlotBlock - 1) / kSlotBlock;
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* m = memory.data_ptr<scalar_t>();
  const scalar_t* w = write_w.data_ptr<scalar_t>();
  const scalar_t* e = erase.data_ptr<scalar_t>();
  const scalar_t* v = add.data_ptr<scalar_t>();
  scalar_t* gm = grad_memory.data_ptr<scalar_t>();
  scalar_t* gw = grad_write_w.data_ptr<scalar_t>();
  // Per piece: partial grad e (first W) and grad v (next W).
  std::vector<acc_t> partial(B * blocks * 2 * W);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t b = piece / blocks, first = (piece % blocks) * kSlotBlock;
      const int64_t last = std::min(N, first + kSlotBlock);
      acc_t* part_erase = &partial[piece * 2 * W];
      acc_t* part_add = part_erase + W;
      std::fill(part_erase, part_erase + 2 * W, acc_t(0));
      const scalar_t* eb = e + b * W;
      const scalar_t* vb = v + b * W;
      for (int64_t n = first; n < last; ++n) {
        const int64_t slot = b * N + n;
        const acc_t weight = acc_t(w[slot]);
        // restrict: the stores through gm and the partial sums alias nothing read here, so the
        // loop vectorises (without it 2-3x slower: B = 32, N = 16, W = 16 to B = 8, N = 1024, W = 64)
        const scalar_t* __restrict__ g_n = g + slot * W;
        const scalar_t* __restrict__ m_n = m + slot * W;
        scalar_t* __restrict__ gm_n = gm + slot * W;
        acc_t* __restrict__ to_erase = part_erase;
        acc_t* __restrict__ to_add = part_add;
        acc_t to_weight = 0;
        // Lets the compiler vectorise the sum, which it may not otherwise reorder.
#pragma omp simd reduction(+ : to_weight)
        for (int64_t i = 0; i < W; ++i) {
          const acc_t gi = acc_t(g_n[i]), mi = acc_t(m_n[i]), ei = acc_t(eb[i]);
          gm_n[i] = scalar_t(gi * (1 - weight * ei));
          to_weight += gi * (acc_t(vb[i]) - mi * ei);
          to_erase[i] -= gi * mi * weight;
          to_add[i] += gi * weight;
        }
        gw[slot] = scalar_t(to_weight);
      }
    }
  });
  scalar_t* ge = grad_erase.data_ptr<scalar_t>();
  scalar_t* gv = grad_add.data_ptr<scalar_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < W; ++i) {
      acc_t to_erase = 0, to_add = 0;
      for (int64_t block = 0; block < blocks; ++block) {
        to_erase += partial[(b * blocks + block) * 2 * W + i];
        to_add += partial[(b * blocks + block) * 2 * W + W + i];
      }
      ge[b * W + i] = scalar_t(to_erase);
      gv[b * W + i] = scalar_t(to_add);
    }
  }
}

}  // namespace

std::vector<at::Tensor> ext_memory_write_backward(const at::Tensor& grad_in, const at::Tensor& memory_in,
                                                  const at::Tensor& write_w_in, const at::Tensor& erase_in,
                                                  const at::Tensor& add_in, const at::Tensor& /*new_memory*/) {
  check_write_inputs(memory_in, write_w_in, erase_in, add_in);
  const auto grad = grad_in.contiguous(), memory = memory_in.contiguous(), write_w = write_w_in.contiguous();
  const auto erase = erase_in.contiguous(), add = add_in.contiguous();
  auto grad_memory = at::empty_like(memory), grad_write_w = at::empty_like(write_w);
  auto grad_erase = at::empty_like(erase), grad_add = at::empty_like(add);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_memory_write_backward", [&] {
    memory_write_backward<scalar_t>(grad, memory, write_w, erase, add, grad_memory, grad_write_w, grad_erase,
                                    grad_add);
  });
  return {grad_memory, grad_write_w, grad_erase, grad_add};
}

// The read is a batched [R, N] x [N, W] matrix product: BLAS (at::bmm) reads memory once with a
// blocked, vectorised kernel that a hand loop over (B, R) rows did not match (0.60 ms vs 0.38 ms
// at B=8, N=2048, W=64, R=4, because each row re-read all of memory). Registering it still pays
// off: the torch backend's backward re-runs the forward inside torch.func.vjp, this one does not.
at::Tensor ext_memory_read(const at::Tensor& memory, const at::Tensor& read_w) {
  check_read_inputs(memory, read_w);
  return at::bmm(read_w, memory);
}

namespace {

// grad M[n, :] = sum_r w[r, n] g[r, :],  grad w[r, n] = g[r, :] . M[n, :], slot by slot: for a small
// memory (N W <= kLoopReadValues), where the two bmm's (w^T g and g M^T) cost mostly their per-matrix
// overhead: 27 us against 6 us at B = 32, N = 16, W = 16, R = 1 (even at N W = 1024; BLAS 2x faster at 2^16).
template <typename scalar_t>
void memory_read_backward(const at::Tensor& grad_reads, const at::Tensor& memory, const at::Tensor& read_w,
                          at::Tensor& grad_memory, at::Tensor& grad_read_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = read_w.size(1);
  const scalar_t* m = memory.data_ptr<scalar_t>();
  const scalar_t* w = read_w.data_ptr<scalar_t>();
  const scalar_t* g = grad_reads.data_ptr<scalar_t>();
  scalar_t* gm = grad_memory.data_ptr<scalar_t>();
  scalar_t* gw = grad_read_w.data_ptr<scalar_t>();
  at::parallel_for(0, B * N, grain(2 * R * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(W);
    acc_t* __restrict__ row = buffer.data();
    for (int64_t slot = begin; slot < end; ++slot) {
      const int64_t b = slot / N, n = slot % N;
      const scalar_t* __restrict__ word = m + slot * W;
      std::fill(row, row + W, acc_t(0));
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* __restrict__ g_r = g + (b * R + r) * W;
        const acc_t weight = acc_t(w[(b * R + r) * N + n]);
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < W; ++i) {
          dot += acc_t(g_r[i]) * acc_t(word[i]);
          row[i] += weight * acc_t(g_r[i]);
        }
        gw[(b * R + r) * N + n] = scalar_t(dot);
      }
      scalar_t* __restrict__ out = gm + slot * W;
      for (int64_t i = 0; i < W; ++i) out[i] = scalar_t(row[i]);
    }
  });
}

}  // namespace

std::vector<at::Tensor> ext_memory_read_backward(const at::Tensor& grad_reads_in, const at::Tensor& memory_in,
                                                 const at::Tensor& read_w_in, const at::Tensor& /*reads*/) {
  check_read_inputs(memory_in, read_w_in);
  if (memory_in.size(1) * memory_in.size(2) > kLoopReadValues) {
    return {at::bmm(read_w_in.transpose(1, 2), grad_reads_in), at::bmm(grad_reads_in, memory_in.transpose(1, 2))};
  }
  const auto memory = memory_in.contiguous(), read_w = read_w_in.contiguous();
  const auto grad_reads = grad_reads_in.contiguous();
  auto grad_memory = at::empty_like(memory), grad_read_w = at::empty_like(read_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_memory_read_backward", [&] {
    memory_read_backward<scalar_t>(grad_reads, memory, read_w, grad_memory, grad_read_w);
  });
  return {grad_memory, grad_read_w};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_memory_write(Tensor memory, Tensor write_w, Tensor erase, Tensor add) -> Tensor");
  m.def(
      "ext_memory_write_backward(Tensor grad_memory, Tensor memory, Tensor write_w, Tensor erase, Tensor add, "
      "Tensor new_memory) -> Tensor[]");
  m.def("ext_memory_read(Tensor memory, Tensor read_w) -> Tensor");
  m.def("ext_memory_read_backward(Tensor grad_reads, Tensor memory, Tensor read_w, Tensor reads) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_memory_write", &ext_memory_write);
  m.impl("ext_memory_write_backward", &ext_memory_write_backward);
  m.impl("ext_memory_read", &ext_memory_read);
  m.impl("ext_memory_read_backward", &ext_memory_read_backward);
}

}  // namespace sparsemem
