// Sparse content read on the GPU: per head, score the K candidate rows (cosine), softmax over the
// K, and read r = sum_k w_k M[idx_k], reading the rows in place from memory (no [B, R, K, W] gather).
//
// Tiling: one warp per head (b, r), lanes stride over W (coalesced rows). The K scaled scores go
// to a small global scratch [B, R, K] in acc_t (L1-resident; no shared-memory limit on K); each
// lane owns the candidates j = lane, lane + 32, ... for the softmax and writes their weights
// back there, then every lane reads all K weights for its columns w of the read vector.
//
// Backward (the C++ kernel's formulas, csrc/cpu/sparse_read.cpp), with x_k the K rows,
// s_k = D(key, x_k), w = softmax(b s), r = sum_k w_k x_k:
//   u_k = gw_k + gr . x_k,  gz_k = w_k (u_k - sum_j w_j u_j),  grad_strength = sum_k gz_k s_k
//   grad x_k = w_k gr + b gz_k (key / (a m_k) - s_k x_k / m_k^2)
//   grad key = sum_k b gz_k (x_k / (a m_k) - s_k key / a^2)
// sparse_read_coefficients_kernel (a warp per head) reduces over W for the per-candidate scalars;
// sparse_read_rows_kernel (a thread per (b, w)) walks the R * K candidates of its batch row in
// order and adds into column w of their rows: heads may share slots, and the thread that owns w
// owns every add to it, so there are no atomics and the result is deterministic.
#include <cmath>
#include <limits>

#include "../sparse_checks.h"
#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace sparse_read_kernels {

constexpr int kThreads = 128;

// The candidate's slot; an out-of-range one (only possible when the host-side check is off, on
// the GPU without SPARSEMEM_DEBUG) stops the kernel with a device assert instead of reading
// outside memory.
__device__ __forceinline__ int64_t checked_slot(const int64_t* __restrict__ indices, int64_t e, int64_t N) {
  const int64_t slot = indices[e];
  CUDA_KERNEL_ASSERT(0 <= slot && slot < N);
  return slot < 0 ? 0 : (slot >= N ? N - 1 : slot);
}

template <typename scalar_t, typename acc_t>
__global__ void sparse_read_kernel(const scalar_t* __restrict__ memory, const int64_t* __restrict__ indices,
                                   const scalar_t* __restrict__ keys, const scalar_t* __restrict__ strengths,
                                   acc_t* __restrict__ scratch, scalar_t* __restrict__ weights,
                                   scalar_t* __restrict__ reads, int64_t heads, int64_t R, int64_t N, int64_t W,
                                   int64_t K) {
  const int warps = blockDim.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t head = blockIdx.x * int64_t(warps) + threadIdx.x / kWarp;
  if (head >= heads) return;  // the whole warp: no block-wide sync below
  const scalar_t* memory_row0 = memory + (head / R) * N * W;
  const scalar_t* key = keys + head * W;
  acc_t* score = scratch + head * K;
  acc_t key_squares = 0;
  for (int64_t w = lane; w < W; w += kWarp) key_squares += acc_t(key[w]) * acc_t(key[w]);
  const acc_t key_norm = sqrt(warp_sum(key_squares) + acc_t(kEps)), strength = strengths[head];
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < K; ++j) {
    const scalar_t* word = memory_row0 + checked_slot(indices, head * K + j, N) * W;
    acc_t dot = 0, squares = 0;
    for (int64_t w = lane; w < W; w += kWarp) {
      const acc_t x = word[w];
      dot += acc_t(key[w]) * x;
      squares += x * x;
    }
    dot = warp_sum(dot);
    const acc_t similarity = dot / (key_norm * sqrt(warp_sum(squares) + acc_t(kEps)));
    const acc_t logit = similarity * strength;  // every lane holds it
    if (lane == 0) score[j] = logit;
    top = max(top, logit);
  }
  __syncwarp();
  // w = softmax(logits), shifted by the max; lane l owns j = l, l + 32, ...
  acc_t total = 0;
  for (int64_t j = lane; j < K; j += kWarp) total += exp(score[j] - top);
  total = warp_sum(total);
  for (int64_t j = lane; j < K; j += kWarp) {
    const acc_t weight = exp(score[j] - top) / total;
    score[j] = weight;  // only this lane reads score[j] before the __syncwarp
    weights[head * K + j] = scalar_t(weight);
  }
  __syncwarp();
  for (int64_t w = lane; w < W; w += kWarp) {
    acc_t read = 0;
    for (int64_t j = 0; j < K; ++j) read += score[j] * acc_t(memory_row0[checked_slot(indices, head * K + j, N) * W + w]);
    reads[head * W + w] = scalar_t(read);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sparse_read_coefficients_kernel(const scalar_t* __restrict__ memory,
                                                const int64_t* __restrict__ indices,
                                                const scalar_t* __restrict__ keys,
                                                const scalar_t* __restrict__ strengths,
                                                const scalar_t* __restrict__ weights,
                                                const scalar_t* __restrict__ grad_weights,
                                                const scalar_t* __restrict__ grad_reads,
                                                acc_t* __restrict__ scratch, acc_t* __restrict__ cross,
                                                acc_t* __restrict__ self, acc_t* __restrict__ key_self,
                                                scalar_t* __restrict__ grad_strengths, int64_t heads, int64_t R,
                                                int64_t N, int64_t W, int64_t K) {
  // One warp per head. Pass 1 (over j, reductions over W): s_j, m_j^2 and u_j into scratch
  // [3][heads][K] (lane 0 writes). Pass 2 (lane l owns j = l, l + 32, ...): gz_j, and the
  // coefficients cross_j = gs_j / (a m_j), self_j = gs_j s_j / m_j^2 with gs_j = b gz_j; per head
  // grad_strength and key_self = sum_j gs_j s_j / a^2.
  const int warps = blockDim.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t head = blockIdx.x * int64_t(warps) + threadIdx.x / kWarp;
  if (head >= heads) return;  // the whole warp: no block-wide sync below
  const scalar_t* memory_row0 = memory + (head / R) * N * W;
  const scalar_t* key = keys + head * W;
  const scalar_t* grad_read = grad_reads + head * W;
  acc_t* similarity = scratch + head * K;
  acc_t* norm_sq = scratch + (heads + head) * K;
  acc_t* upstream = scratch + (2 * heads + head) * K;
  acc_t key_squares = 0;
  for (int64_t w = lane; w < W; w += kWarp) key_squares += acc_t(key[w]) * acc_t(key[w]);
  const acc_t key_norm = sqrt(warp_sum(key_squares) + acc_t(kEps)), strength = strengths[head];
  acc_t expected = 0;  // sum_j w_j u_j, the same on every lane
  for (int64_t j = 0; j < K; ++j) {
    const scalar_t* word = memory_row0 + checked_slot(indices, head * K + j, N) * W;
    acc_t dot = 0, squares = 0, read_dot = 0;
    for (int64_t w = lane; w < W; w += kWarp) {
      const acc_t x = word[w];
      dot += acc_t(key[w]) * x;
      squares += x * x;
      read_dot += acc_t(grad_read[w]) * x;
    }
    const acc_t m2 = warp_sum(squares) + acc_t(kEps);
    const acc_t s = warp_sum(dot) / (key_norm * sqrt(m2));
    const acc_t u = acc_t(grad_weights[head * K + j]) + warp_sum(read_dot);
    expected += acc_t(weights[head * K + j]) * u;
    if (lane == 0) {
      similarity[j] = s;
      norm_sq[j] = m2;
      upstream[j] = u;
    }
  }
  __syncwarp();
  acc_t grad_strength = 0, key_scale = 0;
  for (int64_t j = lane; j < K; j += kWarp) {
    const acc_t grad_logit = acc_t(weights[head * K + j]) * (upstream[j] - expected);
    const acc_t grad_similarity = strength * grad_logit;
    grad_strength += grad_logit * similarity[j];
    key_scale += grad_similarity * similarity[j];
    cross[head * K + j] = grad_similarity / (key_norm * sqrt(norm_sq[j]));
    self[head * K + j] = grad_similarity * similarity[j] / norm_sq[j];
  }
  grad_strength = warp_sum(grad_strength);
  key_scale = warp_sum(key_scale);
  if (lane == 0) {
    grad_strengths[head] = scalar_t(grad_strength);
    key_self[head] = key_scale / (key_norm * key_norm);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sparse_read_rows_kernel(const scalar_t* __restrict__ memory, const int64_t* __restrict__ indices,
                                        const scalar_t* __restrict__ keys, const scalar_t* __restrict__ weights,
                                        const scalar_t* __restrict__ grad_reads, const acc_t* __restrict__ cross,
                                        const acc_t* __restrict__ self, const acc_t* __restrict__ key_self,
                                        scalar_t* __restrict__ grad_memory, scalar_t* __restrict__ grad_keys,
                                        int64_t B, int64_t N, int64_t R, int64_t W, int64_t K) {
  // One thread per (b, w), grid-stride: grad x_k[w] += w_k gr[w] + cross_k key[w] - self_k x_k[w]
  // for the R * K candidates of batch row b in order; grad key[w] = sum_k cross_k x_k[w] - key_self key[w].
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < B * W;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = index / W, w = index % W;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t head = b * R + r;
      const acc_t q = keys[head * W + w], g = grad_reads[head * W + w];
      acc_t grad_key = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t e = head * K + j, at = (b * N + checked_slot(indices, e, N)) * W + w;
        const acc_t x = memory[at];
        grad_memory[at] = scalar_t(acc_t(grad_memory[at]) + acc_t(weights[e]) * g + cross[e] * q - self[e] * x);
        grad_key += cross[e] * x;
      }
      grad_keys[head * W + w] = scalar_t(grad_key - key_self[head] * q);
    }
  }
}

void check_inputs(const at::Tensor& memory, const at::Tensor& indices, const at::Tensor& keys,
                  const at::Tensor& strengths) {
  check_sparse_read_inputs(memory, indices, keys, strengths);
  TORCH_CHECK(memory.size(1) > 0 || indices.numel() == 0, "memory must have N >= 1 slots to read from");
  check_cuda(memory, "memory");
  check_device(indices, memory, "indices");
  check_device(keys, memory, "keys");
  check_device(strengths, memory, "strengths");
}

std::tuple<at::Tensor, at::Tensor> sparse_read_cuda(const at::Tensor& memory_in, const at::Tensor& indices_in,
                                                    const at::Tensor& keys_in, const at::Tensor& strengths_in) {
  check_inputs(memory_in, indices_in, keys_in, strengths_in);
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), indices = indices_in.contiguous();
  const auto keys = keys_in.contiguous(), strengths = strengths_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1), K = indices.size(2);
  auto weights = at::empty({B, R, K}, memory.options());
  auto reads = at::empty({B, R, W}, memory.options());
  if (B * R == 0) return {weights, reads};
  auto scratch = at::empty({B, R, K}, memory.options().dtype(accumulator(memory.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "sparse_read_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sparse_read_kernel<scalar_t, acc_t><<<blocks_for(B * R, kThreads / kWarp), kThreads, 0, stream()>>>(
        memory.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), keys.data_ptr<scalar_t>(),
        strengths.data_ptr<scalar_t>(), scratch.data_ptr<acc_t>(), weights.data_ptr<scalar_t>(),
        reads.data_ptr<scalar_t>(), B * R, R, N, W, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, reads};
}

// grad_memory is dense [B, N, W] by the op's contract, non-zero on the R * K candidate rows only.
std::vector<at::Tensor> sparse_read_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& grad_reads_in,
                                                  const at::Tensor& memory_in, const at::Tensor& indices_in,
                                                  const at::Tensor& keys_in, const at::Tensor& strengths_in,
                                                  const at::Tensor& weights_in, const at::Tensor& /*reads*/) {
  check_inputs(memory_in, indices_in, keys_in, strengths_in);
  check_device(grad_weights_in, memory_in, "grad_weights");
  check_device(grad_reads_in, memory_in, "grad_reads");
  check_device(weights_in, memory_in, "weights");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), indices = indices_in.contiguous();
  const auto keys = keys_in.contiguous(), strengths = strengths_in.contiguous(), weights = weights_in.contiguous();
  const auto grad_weights = grad_weights_in.contiguous().to(memory.scalar_type());
  const auto grad_reads = grad_reads_in.contiguous().to(memory.scalar_type());
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1), K = indices.size(2);
  auto grad_memory = at::zeros_like(memory);
  auto grad_keys = at::zeros_like(keys);
  auto grad_strengths = at::zeros_like(strengths);
  if (B * R == 0 || K == 0) return {grad_memory, grad_keys, grad_strengths};
  const auto acc_type = accumulator(memory.scalar_type());
  auto scratch = at::empty({3, B * R * K}, memory.options().dtype(acc_type));
  auto cross = at::empty({B, R, K}, scratch.options()), self = at::empty({B, R, K}, scratch.options());
  auto key_self = at::empty({B, R}, scratch.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "sparse_read_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sparse_read_coefficients_kernel<scalar_t, acc_t><<<blocks_for(B * R, kThreads / kWarp), kThreads, 0, stream()>>>(
        memory.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), keys.data_ptr<scalar_t>(),
        strengths.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(),
        grad_reads.data_ptr<scalar_t>(), scratch.data_ptr<acc_t>(), cross.data_ptr<acc_t>(), self.data_ptr<acc_t>(),
        key_self.data_ptr<acc_t>(), grad_strengths.data_ptr<scalar_t>(), B * R, R, N, W, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (W > 0) {
      sparse_read_rows_kernel<scalar_t, acc_t><<<blocks_for(B * W, kThreads), kThreads, 0, stream()>>>(
          memory.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), keys.data_ptr<scalar_t>(),
          weights.data_ptr<scalar_t>(), grad_reads.data_ptr<scalar_t>(), cross.data_ptr<acc_t>(),
          self.data_ptr<acc_t>(), key_self.data_ptr<acc_t>(), grad_memory.data_ptr<scalar_t>(),
          grad_keys.data_ptr<scalar_t>(), B, N, R, W, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_memory, grad_keys, grad_strengths};
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_sparse_read", &sparse_read_cuda);
  m.impl("ext_sparse_read_backward", &sparse_read_backward_cuda);
}

}  // namespace sparse_read_kernels
}  // namespace cuda
}  // namespace sparsemem
