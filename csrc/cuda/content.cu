// Content addressing on the GPU in one pass over memory: cosine similarity, strength, online
// softmax over N, and (content_read) the read vectors, with a backward that recomputes cosines.
//
// Layout: block (b, split) owns a contiguous range of slots; one warp per slot, lanes stride
// over W (coalesced rows). Per warp, shared memory holds the running max / sum per head and the
// running weighted sum of words [R][W], each lane owning the w it touches. At the end the warps
// merge, and the block writes one partial (max, sum, reads) per head; content_merge_kernel
// merges the S partials into log-sum-exp and reads, content_normalize_kernel turns the stored
// logits into weights. Memory is read once; reads never need a pass over weights x memory.
// Heads go in groups of kHeads (registers per lane), re-reading the slot's row from L1.
#include <cmath>
#include <limits>

#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace content_kernels {

constexpr int kHeads = 8;
constexpr int kMaxWarps = 8;
constexpr int64_t kMinSlotsPerSplit = 64;
constexpr size_t kMaxShared = 48 * 1024;
template <typename scalar_t, typename acc_t>
__device__ acc_t word_norm(const scalar_t* __restrict__ word, int64_t W, int lane) {
  return sqrt(squared_norm<scalar_t, acc_t>(word, W, lane));
}

template <typename scalar_t, typename acc_t>
__global__ void content_partial_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ keys,
                                       const scalar_t* __restrict__ strengths, acc_t* __restrict__ logits,
                                       acc_t* __restrict__ max_part, acc_t* __restrict__ sum_part,
                                       acc_t* __restrict__ reads_part, int64_t N, int64_t R, int64_t W,
                                       int64_t slots_per_split, bool with_reads) {
  // shared: scaled keys q_r = b_r k_r / ||k_r|| [R][W], then per warp max [R], sum [R], reads [R][W]
  extern __shared__ unsigned char shared_bytes[];
  acc_t* query = reinterpret_cast<acc_t*>(shared_bytes);
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int64_t per_warp = 2 * R + (with_reads ? R * W : 0);
  acc_t* running_max = query + R * W + warp * per_warp;
  acc_t* running_sum = running_max + R;
  acc_t* reads = running_sum + R;
  for (int64_t r = warp; r < R; r += warps) {
    const acc_t norm = word_norm<scalar_t, acc_t>(keys + (b * R + r) * W, W, lane);
    const acc_t scale = acc_t(strengths[b * R + r]) / norm;
    for (int64_t w = lane; w < W; w += kWarp) query[r * W + w] = scale * acc_t(keys[(b * R + r) * W + w]);
  }
  for (int64_t r = lane; r < R; r += kWarp) {
    running_max[r] = -std::numeric_limits<acc_t>::infinity();
    running_sum[r] = 0;
  }
  if (with_reads) {
    for (int64_t e = lane; e < R * W; e += kWarp) reads[e] = 0;
  }
  __syncthreads();
  const int64_t begin = split * slots_per_split, end = min(N, begin + slots_per_split);
  for (int64_t n = begin + warp; n < end; n += warps) {
    const scalar_t* word = memory + (b * N + n) * W;
    const acc_t norm = word_norm<scalar_t, acc_t>(word, W, lane);
    for (int64_t r0 = 0; r0 < R; r0 += kHeads) {
      acc_t dots[kHeads];
#pragma unroll
      for (int h = 0; h < kHeads; ++h) dots[h] = 0;
      for (int64_t w = lane; w < W; w += kWarp) {
        const acc_t m = word[w];
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          if (r0 + h < R) dots[h] += query[(r0 + h) * W + w] * m;
        }
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const int64_t r = r0 + h;
        const acc_t logit = warp_sum(dots[h]) / norm;  // every lane holds it
        if (r >= R) continue;
        const acc_t old_max = running_max[r], old_sum = running_sum[r];
        const acc_t new_max = max(old_max, logit);
        const acc_t correction = exp(old_max - new_max), p = exp(logit - new_max);
        if (with_reads) {
          for (int64_t w = lane; w < W; w += kWarp) reads[r * W + w] = reads[r * W + w] * correction + p * acc_t(word[w]);
        }
        __syncwarp();
        if (lane == 0) {
          running_max[r] = new_max;
          running_sum[r] = old_sum * correction + p;
          logits[(b * R + r) * N + n] = logit;
        }
        __syncwarp();
      }
    }
  }
  __syncthreads();
  // merge the warps (a warp that had no slot holds max -inf, sum 0: it adds nothing)
  acc_t* warp0 = query + R * W;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    acc_t total_max = -std::numeric_limits<acc_t>::infinity();
    for (int k = 0; k < warps; ++k) total_max = max(total_max, warp0[k * per_warp + r]);
    acc_t total = 0;
    for (int k = 0; k < warps; ++k) total += warp0[k * per_warp + R + r] * exp(warp0[k * per_warp + r] - total_max);
    max_part[(b * S + split) * R + r] = total_max;
    sum_part[(b * S + split) * R + r] = total;
  }
  if (with_reads) {
    for (int64_t e = threadIdx.x; e < R * W; e += blockDim.x) {
      const int64_t r = e / W;
      acc_t total_max = -std::numeric_limits<acc_t>::infinity();
      for (int k = 0; k < warps; ++k) total_max = max(total_max, warp0[k * per_warp + r]);
      acc_t total = 0;
      for (int k = 0; k < warps; ++k) total += warp0[k * per_warp + 2 * R + e] * exp(warp0[k * per_warp + r] - total_max);
      reads_part[(b * S + split) * R * W + e] = total;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void content_merge_kernel(const acc_t* __restrict__ max_part, const acc_t* __restrict__ sum_part,
                                     const acc_t* __restrict__ reads_part, acc_t* __restrict__ log_total,
                                     scalar_t* __restrict__ reads, int64_t R, int64_t W, int64_t S,
                                     bool with_reads) {
  // One block per (b, r): log-sum-exp of the S partials, and reads = sum_s e^(max_s - max) reads_s / sum.
  __shared__ acc_t merged[2];
  const int64_t row = blockIdx.x, b = row / R, r = row % R;
  if (threadIdx.x == 0) {
    acc_t total_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t s = 0; s < S; ++s) total_max = max(total_max, max_part[(b * S + s) * R + r]);
    acc_t total = 0;
    for (int64_t s = 0; s < S; ++s) total += sum_part[(b * S + s) * R + r] * exp(max_part[(b * S + s) * R + r] - total_max);
    merged[0] = total_max;
    merged[1] = total;
    log_total[row] = total_max + log(total);
  }
  __syncthreads();
  if (!with_reads) return;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    acc_t value = 0;
    for (int64_t s = 0; s < S; ++s) {
      value += reads_part[((b * S + s) * R + r) * W + w] * exp(max_part[(b * S + s) * R + r] - merged[0]);
    }
    reads[row * W + w] = scalar_t(value / merged[1]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void content_normalize_kernel(const acc_t* __restrict__ logits, const acc_t* __restrict__ log_total,
                                         scalar_t* __restrict__ weights, int64_t total, int64_t N) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    weights[index] = scalar_t(exp(logits[index] - log_total[index / N]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void content_backward_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ keys,
                                        const scalar_t* __restrict__ strengths, const scalar_t* __restrict__ weights,
                                        const scalar_t* __restrict__ grad_weights,
                                        const scalar_t* __restrict__ grad_reads, const acc_t* __restrict__ softmax_dot,
                                        scalar_t* __restrict__ grad_memory, acc_t* __restrict__ grad_keys_part,
                                        acc_t* __restrict__ grad_strengths_part, int64_t N, int64_t R, int64_t W,
                                        int64_t slots_per_split) {
  // Per slot n and head r, with c = cos, D_r = sum_n w_rn G_rn (host), G = grad_w + grad_reads . M_n:
  //   dlogit = w (G - D);  grad_b_r += dlogit c;  t = b dlogit / (||k|| ||M_n||);
  //   grad_M_n = sum_r t k_r - (sum_r b dlogit c) M_n / ||M_n||^2 + sum_r w_rn grad_reads_r;
  //   grad_k_r += t M_n (the -c k / ||k||^2 part is added on the host from grad_b).
  // shared: keys [R][W], key norms [R]; per warp: grad_k [R][W], grad_b [R], and the slot's
  // per-head scalars (t, weight) [2][R].
  extern __shared__ unsigned char shared_bytes[];
  acc_t* key = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* key_norm = key + R * W;
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int64_t per_warp = R * W + 3 * R;
  acc_t* grad_key = key_norm + R + warp * per_warp;
  acc_t* grad_strength = grad_key + R * W;
  acc_t* slot_t = grad_strength + R;
  acc_t* slot_weight = slot_t + R;
  for (int64_t r = warp; r < R; r += warps) {
    const acc_t norm = word_norm<scalar_t, acc_t>(keys + (b * R + r) * W, W, lane);
    if (lane == 0) key_norm[r] = norm;
    for (int64_t w = lane; w < W; w += kWarp) key[r * W + w] = keys[(b * R + r) * W + w];
  }
  for (int64_t e = lane; e < R * W; e += kWarp) grad_key[e] = 0;
  for (int64_t r = lane; r < R; r += kWarp) grad_strength[r] = 0;
  __syncthreads();
  const int64_t begin = split * slots_per_split, end = min(N, begin + slots_per_split);
  for (int64_t n = begin + warp; n < end; n += warps) {
    const scalar_t* word = memory + (b * N + n) * W;
    const acc_t norm = word_norm<scalar_t, acc_t>(word, W, lane);
    acc_t radial = 0;  // sum_r b dlogit c
    for (int64_t r0 = 0; r0 < R; r0 += kHeads) {
      acc_t dots[kHeads], read_dots[kHeads];
#pragma unroll
      for (int h = 0; h < kHeads; ++h) dots[h] = read_dots[h] = 0;
      for (int64_t w = lane; w < W; w += kWarp) {
        const acc_t m = word[w];
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          if (r0 + h < R) {
            dots[h] += key[(r0 + h) * W + w] * m;
            if (grad_reads != nullptr) read_dots[h] += acc_t(grad_reads[(b * R + r0 + h) * W + w]) * m;
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const int64_t r = r0 + h;
        const acc_t dot = warp_sum(dots[h]), read_dot = warp_sum(read_dots[h]);
        if (r >= R) continue;
        const int64_t rn = (b * R + r) * N + n;
        const acc_t weight = weights[rn], strength = strengths[b * R + r];
        const acc_t cos = dot / (key_norm[r] * norm);
        const acc_t grad_logit = weight * (acc_t(grad_weights[rn]) + read_dot - softmax_dot[b * R + r]);
        radial += strength * grad_logit * cos;
        __syncwarp();
        if (lane == 0) {
          grad_strength[r] += grad_logit * cos;
          slot_t[r] = strength * grad_logit / (key_norm[r] * norm);
          slot_weight[r] = weight;
        }
        __syncwarp();
      }
    }
    for (int64_t w = lane; w < W; w += kWarp) {
      const acc_t m = word[w];
      acc_t grad = -radial * m / (norm * norm);
      for (int64_t r = 0; r < R; ++r) {
        grad += slot_t[r] * key[r * W + w];
        if (grad_reads != nullptr) grad += slot_weight[r] * acc_t(grad_reads[(b * R + r) * W + w]);
        grad_key[r * W + w] += slot_t[r] * m;
      }
      grad_memory[(b * N + n) * W + w] = scalar_t(grad);
    }
    __syncwarp();
  }
  __syncthreads();
  acc_t* warp0 = key_norm + R;
  for (int64_t e = threadIdx.x; e < R * W; e += blockDim.x) {
    acc_t total = 0;
    for (int k = 0; k < warps; ++k) total += warp0[k * per_warp + e];
    grad_keys_part[(b * S + split) * R * W + e] = total;
  }
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    acc_t total = 0;
    for (int k = 0; k < warps; ++k) total += warp0[k * per_warp + R * W + r];
    grad_strengths_part[(b * S + split) * R + r] = total;
  }
}

struct Split {
  int64_t programs, slots_per_program;
};

// S blocks per batch row, none of them empty (an empty split would hold max = -inf); N = 0
// (the backward, which launches nothing then) gives one split, not a division by zero.
Split split_slots(int64_t N, int64_t B) {
  const int64_t S = splits(N, B, kMinSlotsPerSplit), per = std::max<int64_t>(1, (N + S - 1) / S);
  return {(N + per - 1) / per, per};
}

int warps_for(size_t fixed, size_t per_warp) {
  TORCH_CHECK(fixed + per_warp <= kMaxShared, "R * W is too large for the CUDA content kernel's shared memory");
  return static_cast<int>(std::min<size_t>(kMaxWarps, (kMaxShared - fixed) / std::max<size_t>(per_warp, 1)));
}

std::tuple<at::Tensor, at::Tensor> content_forward(const at::Tensor& memory_in, const at::Tensor& keys_in,
                                                   const at::Tensor& strengths_in, bool with_reads) {
  check_cuda(memory_in, "memory");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous(), strengths = strengths_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  TORCH_CHECK(N > 0, "memory must have N >= 1 slots");
  const auto acc_type = accumulator(memory.scalar_type());
  const Split split = split_slots(N, B);
  const int64_t S = split.programs;
  auto logits = at::empty({B, R, N}, memory.options().dtype(acc_type));
  auto max_part = at::empty({B, S, R}, logits.options());
  auto sum_part = at::empty({B, S, R}, logits.options());
  auto reads_part = at::empty({with_reads ? B * S * R * W : 0}, logits.options());
  auto log_total = at::empty({B, R}, logits.options());
  auto weights = at::empty({B, R, N}, memory.options());
  auto reads = at::empty({B, R, with_reads ? W : 0}, memory.options());
  if (B * R == 0) return {weights, reads};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "content_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t fixed = R * W * sizeof(acc_t), per_warp = (2 * R + (with_reads ? R * W : 0)) * sizeof(acc_t);
    const int warps = warps_for(fixed, per_warp);
    content_partial_kernel<scalar_t, acc_t><<<dim3(B, S), warps * kWarp, fixed + warps * per_warp, stream()>>>(
        memory.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), strengths.data_ptr<scalar_t>(),
        logits.data_ptr<acc_t>(), max_part.data_ptr<acc_t>(), sum_part.data_ptr<acc_t>(),
        reads_part.data_ptr<acc_t>(), N, R, W, split.slots_per_program, with_reads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    content_merge_kernel<scalar_t, acc_t><<<B * R, 128, 0, stream()>>>(
        max_part.data_ptr<acc_t>(), sum_part.data_ptr<acc_t>(), reads_part.data_ptr<acc_t>(),
        log_total.data_ptr<acc_t>(), reads.data_ptr<scalar_t>(), R, W, S, with_reads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = B * R * N;
    content_normalize_kernel<scalar_t, acc_t><<<std::min<int64_t>((total + 255) / 256, 65535 * 8), 256, 0, stream()>>>(
        logits.data_ptr<acc_t>(), log_total.data_ptr<acc_t>(), weights.data_ptr<scalar_t>(), total, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, reads};
}

std::vector<at::Tensor> content_backward(const at::Tensor& grad_weights_in, const c10::optional<at::Tensor>& grad_reads_in,
                                         const at::Tensor& memory_in, const at::Tensor& keys_in,
                                         const at::Tensor& strengths_in, const at::Tensor& weights_in,
                                         const c10::optional<at::Tensor>& reads_in) {
  check_cuda(memory_in, "memory");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous(), strengths = strengths_in.contiguous();
  const auto weights = weights_in.contiguous(), grad_weights = grad_weights_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  const auto acc_type = accumulator(memory.scalar_type());
  // D_r = sum_n w_rn grad_w_rn + grad_reads_r . reads_r: the softmax's row term, without memory
  auto softmax_dot = (weights.to(acc_type) * grad_weights.to(acc_type)).sum(-1);
  at::Tensor grad_reads;
  if (grad_reads_in.has_value()) {
    grad_reads = grad_reads_in->contiguous();
    softmax_dot = softmax_dot + (grad_reads.to(acc_type) * reads_in->to(acc_type)).sum(-1);
  }
  softmax_dot = softmax_dot.contiguous();
  const Split split = split_slots(N, B);
  const int64_t S = split.programs;
  auto grad_memory = at::empty_like(memory);
  auto grad_keys_part = at::empty({B, S, R, W}, memory.options().dtype(acc_type));
  auto grad_strengths_part = at::empty({B, S, R}, memory.options().dtype(acc_type));
  if (B * R * N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "content_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t fixed = (R * W + R) * sizeof(acc_t), per_warp = (R * W + 3 * R) * sizeof(acc_t);
      const int warps = warps_for(fixed, per_warp);
      content_backward_kernel<scalar_t, acc_t><<<dim3(B, S), warps * kWarp, fixed + warps * per_warp, stream()>>>(
          memory.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), strengths.data_ptr<scalar_t>(),
          weights.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(),
          grad_reads.defined() ? grad_reads.data_ptr<scalar_t>() : nullptr, softmax_dot.data_ptr<acc_t>(),
          grad_memory.data_ptr<scalar_t>(), grad_keys_part.data_ptr<acc_t>(), grad_strengths_part.data_ptr<acc_t>(), N,
          R, W, split.slots_per_program);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grad_memory.zero_();
    grad_keys_part.zero_();
    grad_strengths_part.zero_();
  }
  const auto grad_strengths = grad_strengths_part.sum(1);
  // d cos / d k_r also has -cos k_r / ||k_r||^2; summed over n that is -(b_r grad_b_r) k_r / ||k_r||^2
  const auto k = keys.to(acc_type);
  const auto key_norm_squared = (k * k).sum(-1) + kEps;
  const auto grad_keys = grad_keys_part.sum(1) - (strengths.to(acc_type) * grad_strengths / key_norm_squared).unsqueeze(-1) * k;
  return {grad_memory, grad_keys.to(keys.scalar_type()), grad_strengths.to(strengths.scalar_type())};
}

at::Tensor content_weights_cuda(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths) {
  return std::get<0>(content_forward(memory, keys, strengths, false));
}

std::vector<at::Tensor> content_weights_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& memory,
                                                      const at::Tensor& keys, const at::Tensor& strengths,
                                                      const at::Tensor& weights) {
  return content_backward(grad_weights, c10::nullopt, memory, keys, strengths, weights, c10::nullopt);
}

std::tuple<at::Tensor, at::Tensor> content_read_cuda(const at::Tensor& memory, const at::Tensor& keys,
                                                     const at::Tensor& strengths) {
  return content_forward(memory, keys, strengths, true);
}

std::vector<at::Tensor> content_read_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& grad_reads,
                                                   const at::Tensor& memory, const at::Tensor& keys,
                                                   const at::Tensor& strengths, const at::Tensor& weights,
                                                   const at::Tensor& reads) {
  return content_backward(grad_weights, grad_reads, memory, keys, strengths, weights, reads);
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_content_weights", &content_weights_cuda);
  m.impl("ext_content_weights_backward", &content_weights_backward_cuda);
  m.impl("ext_content_read", &content_read_cuda);
  m.impl("ext_content_read_backward", &content_read_backward_cuda);
}

}  // namespace content_kernels
}  // namespace cuda
}  // namespace sparsemem
