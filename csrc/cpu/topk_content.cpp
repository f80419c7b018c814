// Fused cosine score + top-K on the CPU: scores [B, R, K] and slots [B, R, K] of the K slots most
// similar to each key, without the [B, R, N] score tensor.
//
// Tiling: the N slots of a batch row are cut into chunks; a task scores one chunk of one batch row
// against all R keys and keeps, per head, a sorted buffer of its K best (score, slot) pairs. The
// chunk buffers of a batch row are then merged per head. Extra memory is B * chunks * R * K pairs.
// Each word is swept once for its squared norm and its dots with up to kHeadGroup = 4 keys
// (word_dots): every element is loaded and converted once, the 5 x 8 partial sums stay in
// registers and are reduced together; rows kPrefetchBytes ahead are prefetched. See
// bench/ops/bench_sparse.py for timings.
//
// Order: score descending, ties by slot ascending (a total order, so the result does not depend
// on the chunking or the thread count). torch.topk does not promise an order for ties.
//
// D(k, M_n) = k . M_n / (||k||_eps ||M_n||_eps), ||x||_eps = sqrt(sum x^2 + 1e-6), as in
// sparsemem/reference/dnc.py.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "topk.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

constexpr int64_t kChunk = 8192;  // slots per task: large enough to amortise the merge

// Rows are prefetched this far ahead of the one being scored. The hardware prefetcher alone left
// the scan waiting on DRAM (it stops at 4 KiB pages): measured at B = 8, N = 2^16, W = 64 on one
// core, 38 ms without, 27-28 ms with 2-16 KiB ahead.
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kCacheLine = 64;
// Scores slots [first, last) of one batch row (words: its [N, W] memory) against H keys and offers
// each score to the head's buffer best[h * k ..], holding count[h] entries. Most scores lose to
// the buffer's last entry: that test is inlined here, the insertion is not.
template <int64_t H, typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void scan_chunk(const scalar_t* words, int64_t first, int64_t last, int64_t W, const acc_t* key,
                                      const acc_t* key_norm, int64_t k, Candidate<acc_t>* best, int64_t* count) {
  acc_t dots[H + 1];
  const int64_t row_bytes = W * int64_t(sizeof(scalar_t));
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, row_bytes));  // W = 0: no bytes
  for (int64_t n = first; n < last; ++n) {
    if (n + ahead < last) {
      const char* row = reinterpret_cast<const char*>(words + (n + ahead) * W);
      for (int64_t byte = 0; byte < row_bytes; byte += kCacheLine) __builtin_prefetch(row + byte);
    }
    word_dots<H>(words + n * W, key, W, dots);
    const acc_t word_norm = std::sqrt(dots[H] + acc_t(kNormEps));
    for (int64_t h = 0; h < H; ++h) {
      const acc_t score = dots[h] / (key_norm[h] * word_norm);
      if (count[h] < k || score > best[h * k + k - 1].score) offer(best + h * k, count[h], k, score, n);
    }
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void scan_heads(const scalar_t* words, int64_t first, int64_t last, int64_t W, const acc_t* key,
                const acc_t* key_norm, int64_t R, int64_t k, Candidate<acc_t>* best, int64_t* count) {
  for_head_groups(R, [&](auto heads, int64_t r) {
    scan_chunk<decltype(heads)::value>(words, first, last, W, key + r * W, key_norm + r, k, best + r * k, count + r);
  });
}

template void scan_heads<float, float>(const float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t,
                                       int64_t, Candidate<float>*, int64_t*);
template void scan_heads<double, double>(const double*, int64_t, int64_t, int64_t, const double*, const double*,
                                         int64_t, int64_t, Candidate<double>*, int64_t*);

namespace {

void check_inputs(const at::Tensor& memory, const at::Tensor& keys, int64_t k) {
  TORCH_CHECK(memory.dim() == 3 && keys.dim() == 3, "memory must be [B, N, W] and keys [B, R, W]");
  TORCH_CHECK(memory.size(0) == keys.size(0) && memory.size(2) == keys.size(2),
              "keys must be [B, R, W] matching memory [B, N, W]");
  TORCH_CHECK(memory.scalar_type() == keys.scalar_type(), "memory and keys must share a dtype");
  TORCH_CHECK(1 <= k && k <= memory.size(1), "k must be in [1, N]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ext_topk_content(const at::Tensor& memory_in, const at::Tensor& keys_in,
                                                     int64_t k) {
  check_inputs(memory_in, keys_in, k);
  const auto memory = memory_in.contiguous();
  const auto keys = keys_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  auto scores = at::empty({B, R, k}, memory.options());
  auto indices = at::empty({B, R, k}, memory.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_topk_content", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const scalar_t* q = keys.data_ptr<scalar_t>();
    // Per task and head: up to k candidates and how many are filled.
    std::vector<Candidate<acc_t>> found(B * chunks * R * k);
    std::vector<int64_t> counts(B * chunks * R, 0);
    at::parallel_for(0, B * chunks, grain((R + 1) * W * std::min(N, kChunk)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> key(R * W), key_norm(R);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, first = (task % chunks) * kChunk, last = std::min(N, first + kChunk);
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t i = 0; i < W; ++i) key[r * W + i] = acc_t(q[(b * R + r) * W + i]);
          key_norm[r] = safe_norm<acc_t>(key.data() + r * W, W);
        }
        scan_heads(m + b * N * W, first, last, W, key.data(), key_norm.data(), R, k, found.data() + task * R * k,
                   counts.data() + task * R);
      }
    });
    scalar_t* out_scores = scores.data_ptr<scalar_t>();
    int64_t* out_indices = indices.data_ptr<int64_t>();
    at::parallel_for(0, B * R, grain(chunks * k), [&](int64_t begin, int64_t end) {
      std::vector<Candidate<acc_t>> merged;
      for (int64_t head = begin; head < end; ++head) {
        const int64_t b = head / R, r = head % R;
        merged.clear();
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t task = b * chunks + c;
          const auto* best = found.data() + (task * R + r) * k;
          merged.insert(merged.end(), best, best + counts[task * R + r]);
        }
        std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), better<acc_t>);
        for (int64_t j = 0; j < k; ++j) {
          out_scores[head * k + j] = scalar_t(merged[j].score);
          out_indices[head * k + j] = merged[j].slot;
        }
      }
    });
  });
  return {scores, indices};
}

// s = d / (a m) with d = k . x, a = ||k||_eps, m = ||x||_eps:
//   ds/dx = k / (a m) - s x / m^2,   ds/dk = x / (a m) - s k / a^2.
// grad_memory is dense by the op's contract but only the K rows per head are non-zero. Tasks are
// batch rows, so the rows a task accumulates into (heads may share slots) belong to it alone; each
// task zeroes its batch row of grad_memory first instead of a separate at::zeros pass.
std::vector<at::Tensor> ext_topk_content_backward(const at::Tensor& grad_scores_in,
                                                  const std::optional<at::Tensor>& /*grad_indices*/,
                                                  const at::Tensor& memory_in, const at::Tensor& keys_in, int64_t k,
                                                  const at::Tensor& scores_in, const at::Tensor& indices_in) {
  check_inputs(memory_in, keys_in, k);
  const auto memory = memory_in.contiguous();
  const auto keys = keys_in.contiguous();
  const auto grad_scores = grad_scores_in.contiguous();
  const auto scores = scores_in.contiguous();
  const auto indices = indices_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  auto grad_memory = at::empty_like(memory);
  auto grad_keys = at::empty_like(keys);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_topk_content_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const scalar_t* q = keys.data_ptr<scalar_t>();
    const scalar_t* g = grad_scores.data_ptr<scalar_t>();
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const int64_t* slots = indices.data_ptr<int64_t>();
    scalar_t* gm = grad_memory.data_ptr<scalar_t>();
    scalar_t* gq = grad_keys.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(3 * R * k * W + N * W), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> key(W), word(W), grad_key(W);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(gm + b * N * W, gm + (b + 1) * N * W, scalar_t(0));
        for (int64_t r = 0; r < R; ++r) {
          const int64_t head = b * R + r;
          for (int64_t i = 0; i < W; ++i) key[i] = acc_t(q[head * W + i]);
          const acc_t key_norm = safe_norm<acc_t>(key.data(), W);
          std::fill(grad_key.begin(), grad_key.end(), acc_t(0));
          acc_t key_scale = 0;  // sum_j g_j s_j, the coefficient of -k / a^2
          for (int64_t j = 0; j < k; ++j) {
            const int64_t slot = slots[head * k + j];
            const acc_t grad = g[head * k + j], score = s[head * k + j];
            if (grad == acc_t(0)) continue;
            const scalar_t* row = m + (b * N + slot) * W;
            for (int64_t i = 0; i < W; ++i) word[i] = acc_t(row[i]);
            const acc_t word_norm_sq = dot<acc_t>(word.data(), word.data(), W) + acc_t(kNormEps);
            const acc_t word_norm = std::sqrt(word_norm_sq);
            const acc_t cross = grad / (key_norm * word_norm), self = grad * score / word_norm_sq;
            scalar_t* grad_row = gm + (b * N + slot) * W;
            for (int64_t i = 0; i < W; ++i) {
              grad_row[i] = scalar_t(acc_t(grad_row[i]) + cross * key[i] - self * word[i]);
              grad_key[i] += cross * word[i];
            }
            key_scale += grad * score;
          }
          const acc_t self = key_scale / (key_norm * key_norm);
          for (int64_t i = 0; i < W; ++i) gq[head * W + i] = scalar_t(grad_key[i] - self * key[i]);
        }
      }
    });
  });
  return {grad_memory, grad_keys};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_topk_content(Tensor memory, Tensor keys, SymInt k) -> (Tensor, Tensor)");
  m.def(
      "ext_topk_content_backward(Tensor grad_scores, Tensor? grad_indices, Tensor memory, Tensor keys, SymInt k, "
      "Tensor scores, Tensor indices) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_topk_content", &ext_topk_content);
  m.impl("ext_topk_content_backward", &ext_topk_content_backward);
}

}  // namespace sparsemem
