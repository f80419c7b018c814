// Weighted read r[b, r, :] = sum_n w[b, r, n] M[b, n, :] and its backward, on the CPU.
// OpenMP over (B, R) rows; the inner loop over W is contiguous so it vectorises.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <vector>

namespace sparsemem {

namespace {

void check_read_inputs(const at::Tensor& memory, const at::Tensor& read_w) {
  TORCH_CHECK(memory.dim() == 3 && read_w.dim() == 3, "memory must be [B, N, W] and read_w [B, R, N]");
  TORCH_CHECK(memory.size(0) == read_w.size(0) && memory.size(1) == read_w.size(2),
              "read_w must be [B, R, N] matching memory [B, N, W]");
  TORCH_CHECK(memory.scalar_type() == read_w.scalar_type(), "memory and read_w must share a dtype");
}

}  // namespace

at::Tensor ext_memory_read(const at::Tensor& memory_in, const at::Tensor& read_w_in) {
  check_read_inputs(memory_in, read_w_in);
  const auto memory = memory_in.contiguous();
  const auto read_w = read_w_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = read_w.size(1);
  auto reads = at::zeros({B, R, W}, memory.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_memory_read", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const scalar_t* w = read_w.data_ptr<scalar_t>();
    scalar_t* out = reads.data_ptr<scalar_t>();
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(W);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / R;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t n = 0; n < N; ++n) {
          const acc_t weight = w[row * N + n];
          const scalar_t* word = m + (b * N + n) * W;
          for (int64_t i = 0; i < W; ++i) acc[i] += weight * acc_t(word[i]);
        }
        for (int64_t i = 0; i < W; ++i) out[row * W + i] = scalar_t(acc[i]);
      }
    });
  });
  return reads;
}

// grad_memory[b, n, :] = sum_r w[b, r, n] g[b, r, :];  grad_w[b, r, n] = g[b, r, :] . M[b, n, :].
// Parallel over (B, N) so each thread owns the memory rows it writes: no atomics.
std::vector<at::Tensor> ext_memory_read_backward(const at::Tensor& grad_reads_in, const at::Tensor& memory_in,
                                                 const at::Tensor& read_w_in, const at::Tensor& /*reads*/) {
  check_read_inputs(memory_in, read_w_in);
  const auto memory = memory_in.contiguous();
  const auto read_w = read_w_in.contiguous();
  const auto grad_reads = grad_reads_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = read_w.size(1);
  auto grad_memory = at::empty_like(memory);
  auto grad_read_w = at::empty_like(read_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_memory_read_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const scalar_t* w = read_w.data_ptr<scalar_t>();
    const scalar_t* g = grad_reads.data_ptr<scalar_t>();
    scalar_t* gm = grad_memory.data_ptr<scalar_t>();
    scalar_t* gw = grad_read_w.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) {
        const int64_t b = slot / N, n = slot % N;
        const scalar_t* word = m + slot * W;
        scalar_t* grad_word = gm + slot * W;
        for (int64_t i = 0; i < W; ++i) grad_word[i] = scalar_t(0);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = b * R + r;
          const acc_t weight = w[row * N + n];
          const scalar_t* grad_read = g + row * W;
          acc_t dot = 0;
          for (int64_t i = 0; i < W; ++i) {
            grad_word[i] = scalar_t(acc_t(grad_word[i]) + weight * acc_t(grad_read[i]));
            dot += acc_t(grad_read[i]) * acc_t(word[i]);
          }
          gw[row * N + n] = scalar_t(dot);
        }
      }
    });
  });
  return {grad_memory, grad_read_w};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_memory_read(Tensor memory, Tensor read_w) -> Tensor");
  m.def("ext_memory_read_backward(Tensor grad_reads, Tensor memory, Tensor read_w, Tensor reads) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_memory_read", &ext_memory_read);
  m.impl("ext_memory_read_backward", &ext_memory_read_backward);
}

}  // namespace sparsemem
