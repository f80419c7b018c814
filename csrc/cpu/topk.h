// Top-K by cosine score over a batch row's words, shared by ext_topk_content (topk_content.cpp) and
// the SAM sequence op (sam_sequence.cpp), which scans only the rows written so far.
// Order: score descending, ties by slot ascending.
#pragma once

#include <cstdint>

namespace sparsemem {

template <typename acc_t>
struct Candidate {
  acc_t score;
  int64_t slot;
};

template <typename acc_t>
inline bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.slot < b.slot);
}

// Inserts (score, slot) into best[0..count), sorted by `better`, holding at most k. Slots arrive in
// ascending order, so an equal score never displaces an earlier slot: strict comparisons suffice.
template <typename acc_t>
inline void offer(Candidate<acc_t>* best, int64_t& count, int64_t k, acc_t score, int64_t slot) {
  if (count == k && !(score > best[k - 1].score)) return;
  int64_t position = count < k ? count++ : k - 1;
  while (position > 0 && score > best[position - 1].score) {
    best[position] = best[position - 1];
    --position;
  }
  best[position] = {score, slot};
}

// Scores slots [first, last) of one batch row (words: its [N, W] memory) against R keys [R, W] (in
// acc_t, with their norms ||key||_eps) and offers each score D(key, word) to the head's buffer
// best[r * k ..], holding count[r] entries, kHeadGroup heads per sweep over the words. Calls must
// come in ascending slot order. Instantiated for float and double (topk_content.cpp).
template <typename scalar_t, typename acc_t>
void scan_heads(const scalar_t* words, int64_t first, int64_t last, int64_t W, const acc_t* key,
                const acc_t* key_norm, int64_t R, int64_t k, Candidate<acc_t>* best, int64_t* count);

}  // namespace sparsemem
