// One head of SAM's sparse content read and its backward, shared by ext_sparse_read
// (sparse_read.cpp) and the SAM sequence op (sam_sequence.cpp): the K rows are read in place
// from a batch row's memory, memory_row0 [N, W], at slots [K].
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vector_math.h"

namespace sparsemem {

// similarity_k = D(key, M[slots_k]) for the K candidates of one head; returns ||key||_eps.
template <typename scalar_t, typename acc_t>
SPARSEMEM_ALWAYS_INLINE acc_t similarities(const scalar_t* memory_row0, const int64_t* slots, const scalar_t* key,
                                           int64_t K, int64_t W, acc_t* similarity) {
  const acc_t key_norm = safe_norm<acc_t>(key, W);
  for (int64_t j = 0; j < K; ++j) {
    const scalar_t* word = memory_row0 + slots[j] * W;
    const acc_t word_norm = safe_norm<acc_t>(word, W);
    similarity[j] = dot<acc_t>(key, word, W) / (key_norm * word_norm);
  }
  return key_norm;
}

// w = softmax_k(strength * D(key, M[slots_k])), r = sum_k w_k M[slots_k] -> weights [K], read [W].
// score [K] and sum [W]: scratch.
template <typename scalar_t, typename acc_t>
SPARSEMEM_ALWAYS_INLINE void read_head(const scalar_t* memory_row0, const int64_t* slots, const scalar_t* key,
                                       acc_t strength, int64_t K, int64_t W, acc_t* score, acc_t* sum,
                                       scalar_t* weights, scalar_t* read) {
  similarities(memory_row0, slots, key, K, W, score);
  // shifted by the max for range
  acc_t top = -INFINITY, total = 0;
  for (int64_t j = 0; j < K; ++j) top = std::max(top, score[j] *= strength);
  for (int64_t j = 0; j < K; ++j) total += (score[j] = std::exp(score[j] - top));
  std::fill(sum, sum + W, acc_t(0));
  for (int64_t j = 0; j < K; ++j) {
    const acc_t weight = score[j] / total;
    weights[j] = scalar_t(weight);
    const scalar_t* word = memory_row0 + slots[j] * W;
    for (int64_t i = 0; i < W; ++i) sum[i] += weight * acc_t(word[i]);
  }
  for (int64_t i = 0; i < W; ++i) read[i] = scalar_t(sum[i]);
}

// The backward of read_head. With x_k the K rows, s_k = D(key, x_k), w = softmax(b s), r = sum_k w_k x_k:
//   u_k = gw_k + gr . x_k          (everything that reaches w_k)
//   gz_k = w_k (u_k - sum_j w_j u_j),  grad_strength = sum_k gz_k s_k,  gs_k = b gz_k
//   grad x_k = w_k gr + gs_k (key / (a m_k) - s_k x_k / m_k^2)
//   grad key = sum_k gs_k (x_k / (a m_k) - s_k key / a^2)
// grad x_k is added into grad_row0 [N, W] at slots_k; grad key [W] and grad strength [1] are
// written. similarity, upstream [K] and grad_key [W]: scratch.
template <typename scalar_t, typename acc_t>
SPARSEMEM_ALWAYS_INLINE void read_head_backward(const scalar_t* memory_row0, scalar_t* grad_row0,
                                                const int64_t* slots, const scalar_t* key, acc_t strength,
                                                const scalar_t* w, const scalar_t* gw, const scalar_t* grad_read,
                                                int64_t K, int64_t W, acc_t* similarity, acc_t* upstream,
                                                acc_t* grad_key, scalar_t* gq, scalar_t* gb) {
  const acc_t key_norm = similarities(memory_row0, slots, key, K, W, similarity);
  acc_t expected = 0;  // sum_j w_j u_j
  for (int64_t j = 0; j < K; ++j) {
    upstream[j] = acc_t(gw[j]) + dot<acc_t>(grad_read, memory_row0 + slots[j] * W, W);
    expected += acc_t(w[j]) * upstream[j];
  }
  acc_t grad_strength = 0, key_scale = 0;  // key_scale: sum_k gs_k s_k, the coefficient of -key / a^2
  std::fill(grad_key, grad_key + W, acc_t(0));
  for (int64_t j = 0; j < K; ++j) {
    const acc_t weight = w[j];
    const acc_t grad_logit = weight * (upstream[j] - expected);
    grad_strength += grad_logit * similarity[j];
    const acc_t grad_similarity = strength * grad_logit;
    key_scale += grad_similarity * similarity[j];
    const scalar_t* word = memory_row0 + slots[j] * W;
    const acc_t word_norm_sq = dot<acc_t>(word, word, W) + acc_t(kNormEps);
    const acc_t cross = grad_similarity / (key_norm * std::sqrt(word_norm_sq));
    const acc_t self = grad_similarity * similarity[j] / word_norm_sq;
    scalar_t* grad_word = grad_row0 + slots[j] * W;
    for (int64_t i = 0; i < W; ++i) {
      const acc_t x = word[i];
      grad_word[i] =
          scalar_t(acc_t(grad_word[i]) + weight * acc_t(grad_read[i]) + cross * acc_t(key[i]) - self * x);
      grad_key[i] += cross * x;
    }
  }
  const acc_t self = key_scale / (key_norm * key_norm);
  for (int64_t i = 0; i < W; ++i) gq[i] = scalar_t(grad_key[i] - self * acc_t(key[i]));
  *gb = scalar_t(grad_strength);
}

}  // namespace sparsemem
