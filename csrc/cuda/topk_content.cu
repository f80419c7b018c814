// Fused cosine score + top-K on the GPU: scores [B, R, K] and slots [B, R, K] of the K slots most
// similar to each key, in one pass over memory and without the [B, R, N] score tensor.
//
// Tiling: block (b, split) owns a contiguous range of slots of batch row b; one warp per slot
// (lanes stride over W, coalesced rows), which computes the word's norm and its R dots. Shared
// memory holds the keys [R][W] and their norms, and per warp and head a sorted list of its K best
// (score, slot) pairs, filled by lane 0 (an insertion sort: after the first K slots most scores
// fall below the list's last and cost one compare). At the end one thread per head merges the
// warps' lists into the block's partial top-K; topk_merge_kernel merges the S partials per head.
// Extra memory is B * S * R * K pairs. When R * K is too large for shared memory the scores go
// to a [B, R, N] buffer and a stable sort picks the top K (same result, more memory).
//
// Order: score descending, ties by slot ascending, like the C++ kernel (csrc/cpu/topk_content.cpp):
// a warp visits its slots in ascending order, so a strict compare keeps the lower slot first, and
// the merges compare (score, slot). The result does not depend on the split.
//
// D(k, M_n) = k . M_n / (||k||_eps ||M_n||_eps), ||x||_eps = sqrt(sum x^2 + 1e-6), as in
// sparsemem/reference/dnc.py. Backward (s = d / (a m), a = ||k||_eps, m = ||M_n||_eps):
//   ds/dM_n = k / (a m) - s M_n / m^2,   ds/dk = M_n / (a m) - s k / a^2.
#include <cmath>
#include <limits>

#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace topk_content_kernels {

constexpr int kHeads = 8;  // heads whose dots a lane keeps in registers at once
constexpr int kMaxWarps = 8;
constexpr int64_t kMinSlotsPerSplit = 256;
constexpr size_t kMaxShared = 48 * 1024;
constexpr int kThreads = 128;

template <typename acc_t>
__device__ __forceinline__ bool better(acc_t score_a, int64_t slot_a, acc_t score_b, int64_t slot_b) {
  return score_a > score_b || (score_a == score_b && slot_a < slot_b);
}

// Inserts (score, slot) into the sorted list scores/slots [0, count), holding at most k. Slots
// arrive in ascending order, so an equal score never displaces an earlier slot.
template <typename acc_t>
__device__ void offer(acc_t* scores, int64_t* slots, int& count, int64_t k, acc_t score, int64_t slot) {
  if (count == k && !(score > scores[k - 1])) return;
  int64_t position = count < k ? count++ : k - 1;
  while (position > 0 && score > scores[position - 1]) {
    scores[position] = scores[position - 1];
    slots[position] = slots[position - 1];
    --position;
  }
  scores[position] = score;
  slots[position] = slot;
}

// Shared memory of topk_partial_kernel: int64 slots first (alignment), then acc_t, then int.
template <typename acc_t>
size_t partial_shared_bytes(int warps, int64_t R, int64_t W, int64_t k) {
  return warps * (R * k * (sizeof(int64_t) + sizeof(acc_t)) + R * sizeof(int)) + (R * W + R) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t>
__global__ void topk_partial_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ keys,
                                    acc_t* __restrict__ part_scores, int64_t* __restrict__ part_slots,
                                    int* __restrict__ part_counts, int64_t N, int64_t R, int64_t W, int64_t k,
                                    int64_t slots_per_split) {
  extern __shared__ __align__(16) unsigned char topk_shared[];
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  int64_t* best_slots = reinterpret_cast<int64_t*>(topk_shared);  // [warps][R][k]
  acc_t* best_scores = reinterpret_cast<acc_t*>(best_slots + warps * R * k);  // [warps][R][k]
  acc_t* key = best_scores + warps * R * k;  // [R][W]
  acc_t* key_norm = key + R * W;  // [R]
  int* counts = reinterpret_cast<int*>(key_norm + R);  // [warps][R]
  for (int64_t r = warp; r < R; r += warps) {
    const scalar_t* q = keys + (b * R + r) * W;
    for (int64_t w = lane; w < W; w += kWarp) key[r * W + w] = acc_t(q[w]);
    const acc_t norm = sqrt(squared_norm<scalar_t, acc_t>(q, W, lane));
    if (lane == 0) key_norm[r] = norm;
  }
  for (int64_t e = threadIdx.x; e < warps * R; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  acc_t* my_scores = best_scores + warp * R * k;
  int64_t* my_slots = best_slots + warp * R * k;
  int* my_counts = counts + warp * R;
  const int64_t begin = split * slots_per_split, end = min(N, begin + slots_per_split);
  for (int64_t n = begin + warp; n < end; n += warps) {
    const scalar_t* word = memory + (b * N + n) * W;
    const acc_t norm = sqrt(squared_norm<scalar_t, acc_t>(word, W, lane));
    for (int64_t r0 = 0; r0 < R; r0 += kHeads) {
      acc_t dots[kHeads];
#pragma unroll
      for (int h = 0; h < kHeads; ++h) dots[h] = 0;
      for (int64_t w = lane; w < W; w += kWarp) {
        const acc_t m = word[w];
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          if (r0 + h < R) dots[h] += key[(r0 + h) * W + w] * m;
        }
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const int64_t r = r0 + h;
        const acc_t dot = warp_sum(dots[h]);  // every lane holds it; r is the same on all lanes
        if (r < R && lane == 0) {
          offer(my_scores + r * k, my_slots + r * k, my_counts[r], k, dot / (key_norm[r] * norm), n);
        }
      }
    }
  }
  __syncthreads();
  // One thread per head merges the warps' sorted lists into the block's partial [k].
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    int cursor[kMaxWarps];
    for (int v = 0; v < warps; ++v) cursor[v] = 0;
    const int64_t out = ((b * S + split) * R + r) * k;
    int filled = 0;
    for (; filled < k; ++filled) {
      int pick = -1;
      acc_t pick_score = 0;
      int64_t pick_slot = 0;
      for (int v = 0; v < warps; ++v) {
        if (cursor[v] >= counts[v * R + r]) continue;
        const int64_t at = (v * R + r) * k + cursor[v];
        if (pick < 0 || better(best_scores[at], best_slots[at], pick_score, pick_slot)) {
          pick = v;
          pick_score = best_scores[at];
          pick_slot = best_slots[at];
        }
      }
      if (pick < 0) break;
      ++cursor[pick];
      part_scores[out + filled] = pick_score;
      part_slots[out + filled] = pick_slot;
    }
    part_counts[(b * S + split) * R + r] = filled;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void topk_merge_kernel(const acc_t* __restrict__ part_scores, const int64_t* __restrict__ part_slots,
                                  const int* __restrict__ part_counts, int* __restrict__ cursors,
                                  scalar_t* __restrict__ scores, int64_t* __restrict__ indices, int64_t heads,
                                  int64_t R, int64_t S, int64_t k) {
  // One thread per head (b, r): k rounds, each taking the best head of the S sorted partials.
  // cursors [heads][S] (zeroed) is global scratch: S is up to ~4 blocks per multiprocessor.
  const int64_t head = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (head >= heads) return;
  const int64_t b = head / R, r = head % R;
  int* cursor = cursors + head * S;
  for (int64_t j = 0; j < k; ++j) {
    int64_t pick = -1, pick_slot = -1;
    acc_t pick_score = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t part = (b * S + s) * R + r;
      if (cursor[s] >= part_counts[part]) continue;
      const int64_t at = part * k + cursor[s];
      if (pick < 0 || better(part_scores[at], part_slots[at], pick_score, pick_slot)) {
        pick = s;
        pick_score = part_scores[at];
        pick_slot = part_slots[at];
      }
    }
    if (pick >= 0) ++cursor[pick];  // always found: the partials hold min(k, slots) each, N >= k in all
    scores[head * k + j] = scalar_t(pick_score);
    indices[head * k + j] = pick_slot;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void topk_scores_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ keys,
                                   acc_t* __restrict__ scores, int64_t B, int64_t N, int64_t R, int64_t W) {
  // The fallback's scores [B, R, N]: one warp per (b, n), grid-stride; keys re-read from L1/L2.
  const int warps = blockDim.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t row = blockIdx.x * int64_t(warps) + threadIdx.x / kWarp; row < B * N;
       row += int64_t(gridDim.x) * warps) {
    const int64_t b = row / N, n = row % N;
    const scalar_t* word = memory + row * W;
    const acc_t norm = sqrt(squared_norm<scalar_t, acc_t>(word, W, lane));
    for (int64_t r = 0; r < R; ++r) {
      const scalar_t* q = keys + (b * R + r) * W;
      acc_t dot = 0;
      for (int64_t w = lane; w < W; w += kWarp) dot += acc_t(q[w]) * acc_t(word[w]);
      dot = warp_sum(dot);
      const acc_t key_norm = sqrt(squared_norm<scalar_t, acc_t>(q, W, lane));
      if (lane == 0) scores[(b * R + r) * N + n] = dot / (key_norm * norm);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void topk_backward_coefficients_kernel(const scalar_t* __restrict__ memory,
                                                  const scalar_t* __restrict__ keys,
                                                  const scalar_t* __restrict__ grad_scores,
                                                  const scalar_t* __restrict__ scores,
                                                  const int64_t* __restrict__ indices, acc_t* __restrict__ cross,
                                                  acc_t* __restrict__ self, acc_t* __restrict__ key_self,
                                                  int64_t heads, int64_t R, int64_t N, int64_t W, int64_t k) {
  // One warp per head: per candidate j, cross_j = g_j / (a m_j) and self_j = g_j s_j / m_j^2 (the
  // coefficients of k and M_j in ds/dM_j), and per head key_self = sum_j g_j s_j / a^2.
  const int warps = blockDim.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t head = blockIdx.x * int64_t(warps) + threadIdx.x / kWarp;
  if (head >= heads) return;  // the whole warp: no block-wide sync below
  const int64_t b = head / R;
  const acc_t key_norm = sqrt(squared_norm<scalar_t, acc_t>(keys + head * W, W, lane));
  acc_t key_scale = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = head * k + j;
    const acc_t grad = grad_scores[e], score = scores[e];
    acc_t c = 0, s = 0;
    if (grad != acc_t(0)) {
      const int64_t slot = indices[e];
      CUDA_KERNEL_ASSERT(0 <= slot && slot < N);
      const acc_t word_norm_sq = squared_norm<scalar_t, acc_t>(memory + (b * N + slot) * W, W, lane);
      c = grad / (key_norm * sqrt(word_norm_sq));
      s = grad * score / word_norm_sq;
      key_scale += grad * score;
    }
    if (lane == 0) {
      cross[e] = c;
      self[e] = s;
    }
  }
  if (lane == 0) key_self[head] = key_scale / (key_norm * key_norm);
}

template <typename scalar_t, typename acc_t>
__global__ void topk_backward_rows_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ keys,
                                          const scalar_t* __restrict__ grad_scores,
                                          const int64_t* __restrict__ indices, const acc_t* __restrict__ cross,
                                          const acc_t* __restrict__ self, const acc_t* __restrict__ key_self,
                                          scalar_t* __restrict__ grad_memory, scalar_t* __restrict__ grad_keys,
                                          int64_t B, int64_t N, int64_t R, int64_t W, int64_t k) {
  // One thread per (b, w), grid-stride: it walks the R * K candidates of batch row b in order and
  // adds into column w of their rows. Heads may share slots; the thread that owns w owns every
  // add to it, so there are no atomics and the sum order is fixed (deterministic).
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < B * W;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = index / W, w = index % W;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t head = b * R + r;
      const acc_t q = keys[head * W + w];
      acc_t grad_key = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = head * k + j;
        if (acc_t(grad_scores[e]) == acc_t(0)) continue;
        const int64_t slot = indices[e];
        const acc_t x = memory[(b * N + slot) * W + w];
        scalar_t& grad_row = grad_memory[(b * N + slot) * W + w];
        grad_row = scalar_t(acc_t(grad_row) + cross[e] * q - self[e] * x);
        grad_key += cross[e] * x;
      }
      grad_keys[head * W + w] = scalar_t(grad_key - key_self[head] * q);
    }
  }
}

void check_inputs(const at::Tensor& memory, const at::Tensor& keys, int64_t k) {
  TORCH_CHECK(memory.dim() == 3 && keys.dim() == 3, "memory must be [B, N, W] and keys [B, R, W]");
  TORCH_CHECK(memory.size(0) == keys.size(0) && memory.size(2) == keys.size(2),
              "keys must be [B, R, W] matching memory [B, N, W]");
  TORCH_CHECK(memory.scalar_type() == keys.scalar_type(), "memory and keys must share a dtype");
  TORCH_CHECK(1 <= k && k <= memory.size(1), "k must be in [1, N]");
  check_cuda(memory, "memory");
  check_device(keys, memory, "keys");
}

std::tuple<at::Tensor, at::Tensor> topk_content_cuda(const at::Tensor& memory_in, const at::Tensor& keys_in,
                                                     int64_t k) {
  check_inputs(memory_in, keys_in, k);
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  auto scores = at::empty({B, R, k}, memory.options());
  auto indices = at::empty({B, R, k}, memory.options().dtype(at::kLong));
  if (B * R == 0) return {scores, indices};
  const auto acc_type = accumulator(memory.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "topk_content_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int warps = kMaxWarps;
    while (warps > 0 && partial_shared_bytes<acc_t>(warps, R, W, k) > kMaxShared) --warps;
    if (warps == 0) {
      // R * K (or R * W) too large for shared memory: scores [B, R, N], then a stable sort
      // (descending; equal scores keep slot order, the lower slot first).
      auto all_scores = at::empty({B, R, N}, memory.options().dtype(acc_type));
      topk_scores_kernel<scalar_t, acc_t><<<blocks_for(B * N, kThreads / kWarp), kThreads, 0, stream()>>>(
          memory.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), all_scores.data_ptr<acc_t>(), B, N, R, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto [sorted, order] = at::sort(all_scores, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
      scores.copy_(sorted.narrow(-1, 0, k));
      indices.copy_(order.narrow(-1, 0, k));
      return;
    }
    // S blocks per batch row, none of them empty.
    const int64_t wanted = splits(N, B, kMinSlotsPerSplit), per_split = (N + wanted - 1) / wanted;
    const int64_t S = (N + per_split - 1) / per_split;
    auto part_scores = at::empty({B, S, R, k}, memory.options().dtype(acc_type));
    auto part_slots = at::empty({B, S, R, k}, memory.options().dtype(at::kLong));
    auto part_counts = at::empty({B, S, R}, memory.options().dtype(at::kInt));
    auto cursors = at::zeros({B * R, S}, memory.options().dtype(at::kInt));
    topk_partial_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned int>(B), static_cast<unsigned int>(S)), warps * kWarp,
           partial_shared_bytes<acc_t>(warps, R, W, k), stream()>>>(
            memory.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), part_scores.data_ptr<acc_t>(),
            part_slots.data_ptr<int64_t>(), part_counts.data_ptr<int>(), N, R, W, k, per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    topk_merge_kernel<scalar_t, acc_t><<<blocks_for(B * R, kThreads), kThreads, 0, stream()>>>(
        part_scores.data_ptr<acc_t>(), part_slots.data_ptr<int64_t>(), part_counts.data_ptr<int>(),
        cursors.data_ptr<int>(), scores.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), B * R, R, S, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, indices};
}

// grad_memory is dense by the op's contract but only the K rows per head are non-zero.
std::vector<at::Tensor> topk_content_backward_cuda(const at::Tensor& grad_scores_in,
                                                   const c10::optional<at::Tensor>& /*grad_indices*/,
                                                   const at::Tensor& memory_in, const at::Tensor& keys_in, int64_t k,
                                                   const at::Tensor& scores_in, const at::Tensor& indices_in) {
  check_inputs(memory_in, keys_in, k);
  for (const auto* t : {&grad_scores_in, &scores_in, &indices_in}) check_device(*t, memory_in, "topk grads");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous();
  const auto grad_scores = grad_scores_in.contiguous().to(memory.scalar_type());
  const auto scores = scores_in.contiguous(), indices = indices_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  auto grad_memory = at::zeros_like(memory);
  auto grad_keys = at::empty_like(keys);
  if (B * R * W == 0) return {grad_memory, grad_keys.zero_()};
  const auto acc_type = accumulator(memory.scalar_type());
  auto cross = at::empty({B, R, k}, memory.options().dtype(acc_type));
  auto self = at::empty({B, R, k}, cross.options());
  auto key_self = at::empty({B, R}, cross.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "topk_content_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    topk_backward_coefficients_kernel<scalar_t, acc_t><<<blocks_for(B * R, kThreads / kWarp), kThreads, 0, stream()>>>(
        memory.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), grad_scores.data_ptr<scalar_t>(),
        scores.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), cross.data_ptr<acc_t>(), self.data_ptr<acc_t>(),
        key_self.data_ptr<acc_t>(), B * R, R, N, W, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    topk_backward_rows_kernel<scalar_t, acc_t><<<blocks_for(B * W, kThreads), kThreads, 0, stream()>>>(
        memory.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), grad_scores.data_ptr<scalar_t>(),
        indices.data_ptr<int64_t>(), cross.data_ptr<acc_t>(), self.data_ptr<acc_t>(), key_self.data_ptr<acc_t>(),
        grad_memory.data_ptr<scalar_t>(), grad_keys.data_ptr<scalar_t>(), B, N, R, W, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_memory, grad_keys};
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_topk_content", &topk_content_cuda);
  m.impl("ext_topk_content_backward", &topk_content_backward_cuda);
}

}  // namespace topk_content_kernels
}  // namespace cuda
}  // namespace sparsemem
