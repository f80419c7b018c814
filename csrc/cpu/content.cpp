// Content addressing on the CPU: w[b, r, :] = softmax_n(s_r * D(k_r, M_n)), with the cosine
// similarity D(k, M_n) = k . M_n / (||k||_eps ||M_n||_eps), ||x||_eps = sqrt(sum x^2 + 1e-6),
// and (content_read) the read vectors reads[b, r, :] = sum_n w[b, r, n] M_n.
//
// Tiling: the slots of each batch row are cut into pieces of kPiece slots, and the (b, piece)
// pieces run in parallel (at::parallel_for), so a single batch row still uses every thread.
// A piece walks its slots in sub-tiles of kSub: it sweeps each word M_n once per group of up to
// four heads for its norm and their logits z (word_dots), then per head turns the sub-tile's
// logits into exp(z - sub-tile max) in place and keeps the sub-tile's max and sum (one exp per
// slot). content_read also folds the sub-tile into an online softmax state per head -- running
// max and running sum of exp(z - max) M_n, rescaled by exp(old max - new max) when the max grows
// -- looking again at the sub-tile's words while they are still in cache. The sub-tiles of a row
// are merged afterwards, and one multiply per slot turns exp(z - sub-tile max) into weights.
// Memory [B, N, W] is read from DRAM once; the reads need no second pass over memory or over
// [B, R, N].
//
// The backward recomputes norms and similarities instead of saving them, sweeping each word once
// per group of up to four heads for them (word_backward); content_read's first reads memory once
// more for the read gradients' dots g_reads . M_n, so that the softmax's c_r sums exactly the
// terms dz subtracts it from (see content_backward).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "content.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

constexpr int64_t kPiece = 2048;  // slots per parallel piece
constexpr int64_t kSub = 128;     // slots per sub-tile (kPiece is a multiple): 32 KiB of words at W=64, float32

void check_inputs(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths) {
  TORCH_CHECK(memory.dim() == 3 && keys.dim() == 3 && strengths.dim() == 2,
              "memory must be [B, N, W], keys [B, R, W], strengths [B, R]");
  TORCH_CHECK(keys.size(0) == memory.size(0) && keys.size(2) == memory.size(2),
              "keys must be [B, R, W] matching memory [B, N, W]");
  TORCH_CHECK(strengths.size(0) == keys.size(0) && strengths.size(1) == keys.size(1),
              "strengths must be [B, R] matching keys [B, R, W]");
  TORCH_CHECK(memory.size(1) >= 1, "memory needs at least one slot (N >= 1)");
  TORCH_CHECK(memory.scalar_type() == keys.scalar_type() && keys.scalar_type() == strengths.scalar_type(),
              "memory, keys and strengths must share a dtype");
}

// exp(x) for the x = z - max <= 0 of the softmax, in a form the compiler vectorises (std::exp is a
// scalar libm call, and one exp per slot is most of the forward's time at W = 64):
// exp(x) = 2^k e^r, k = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7, within float rounding of the float32 tolerance). x is clamped at -87,
// where exp is 1.6e-38: a weight that small is 0 next to the row's largest, which is 1.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // x - k ln 2, ln 2 split for accuracy
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// float64 keeps libm's exp: the float64 tolerance (1e-10) is tighter than a short polynomial.
inline double exp_nonpositive(double x) { return std::exp(x); }

// The pointers and sizes a forward piece works on (see content_forward).
template <typename scalar_t, typename acc_t>
struct ForwardPieces {
  int64_t N, W, R, pieces, subs;
  const scalar_t* memory;    // [B, N, W]
  const acc_t* scaled_keys;  // [B, R, W]: s_r k_r / ||k_r||
  acc_t* exps;               // [B, R, N]: exp(z - sub-tile max)
  acc_t* sub_max;            // [B, R, subs]
  acc_t* sub_sum;            // [B, R, subs]
  acc_t* piece_max;          // [B, pieces, R], content_read only (else null)
  acc_t* piece_acc;          // [B, pieces, R, W], content_read only (else null)
};

// Logits z[h, n] = scaled_key_h . M_n / ||M_n||_eps of H heads for slots [first, last) of one batch
// row (words: its [N, W] memory; z: the heads' rows of [R, N]), each word swept once for its norm
// and its H dots (word_dots).
template <int64_t H, typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void sub_tile_logits(const scalar_t* words, int64_t first, int64_t last, int64_t N,
                                             int64_t W, const acc_t* scaled_keys, acc_t* z) {
  acc_t dots[H + 1];
  for (int64_t n = first; n < last; ++n) {
    word_dots<H>(words + n * W, scaled_keys, W, dots);
    const acc_t inv_norm = acc_t(1) / std::sqrt(dots[H] + acc_t(kNormEps));
    for (int64_t h = 0; h < H; ++h) z[h * N + n] = dots[h] * inv_norm;
  }
}

// One (b, piece): logits, exp per sub-tile, and with reads the online softmax state of its sub-tiles.
template <typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void forward_piece(const ForwardPieces<scalar_t, acc_t>& c, int64_t piece) {
  const int64_t N = c.N, W = c.W, R = c.R;
  const int64_t b = piece / c.pieces, first = (piece % c.pieces) * kPiece, last = std::min(N, first + kPiece);
  const bool with_reads = c.piece_acc != nullptr;
  acc_t* run_max = with_reads ? c.piece_max + piece * R : nullptr;
  acc_t* run_acc = with_reads ? c.piece_acc + piece * R * W : nullptr;
  if (with_reads) {
    std::fill(run_max, run_max + R, -std::numeric_limits<acc_t>::infinity());
    std::fill(run_acc, run_acc + R * W, acc_t(0));
  }
  for (int64_t sub_first = first; sub_first < last; sub_first += kSub) {
    const int64_t sub_last = std::min(last, sub_first + kSub), sub = sub_first / kSub;
    for_head_groups(R, [&](auto heads, int64_t r) {
      sub_tile_logits<decltype(heads)::value>(c.memory + b * N * W, sub_first, sub_last, N, W, c.scaled_keys + (b * R + r) * W,
                             c.exps + (b * R + r) * N);
    });
    for (int64_t r = 0; r < R; ++r) {
      acc_t* z = c.exps + (b * R + r) * N;
      acc_t max = z[sub_first];
#pragma omp simd reduction(max : max)
      for (int64_t n = sub_first + 1; n < sub_last; ++n) max = max > z[n] ? max : z[n];
      acc_t sum = 0;
      for (int64_t n = sub_first; n < sub_last; ++n) z[n] = exp_nonpositive(z[n] - max);
#pragma omp simd reduction(+ : sum)
      for (int64_t n = sub_first; n < sub_last; ++n) sum += z[n];
      c.sub_max[(b * R + r) * c.subs + sub] = max;
      c.sub_sum[(b * R + r) * c.subs + sub] = sum;
      if (!with_reads) continue;
      // Online softmax across sub-tiles: rescale the running sum when the max grows; the
      // sub-tile's words are still in cache from the logits above.
      if (max > run_max[r]) {
        const acc_t rescale = std::exp(run_max[r] - max);
        for (int64_t i = 0; i < W; ++i) run_acc[r * W + i] *= rescale;
        run_max[r] = max;
      }
      const acc_t to_run = std::exp(max - run_max[r]);
      acc_t* acc = run_acc + r * W;
      for (int64_t n = sub_first; n < sub_last; ++n) {
        const acc_t e = to_run * z[n];
        const scalar_t* word = c.memory + (b * N + n) * W;
        for (int64_t i = 0; i < W; ++i) acc[i] += e * acc_t(word[i]);
      }
    }
  }
}

// Forward of content_weights (with_reads = false) and content_read (with_reads = true).
template <typename scalar_t>
void content_forward(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                     at::Tensor& weights, at::Tensor* reads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  const int64_t pieces = (N + kPiece - 1) / kPiece, subs = (N + kSub - 1) / kSub;
  const bool with_reads = reads != nullptr;
  // exp(z - sub-tile max) per slot, kept in acc_t: written straight into the output when it has that type.
  constexpr bool kInOutput = std::is_same_v<scalar_t, acc_t>;
  at::Tensor exps_buffer =
      kInOutput ? weights : at::empty({B, R, N}, weights.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* exps = exps_buffer.data_ptr<acc_t>();
  const scalar_t* m = memory.data_ptr<scalar_t>();
  // Keys pre-scaled by s_r / ||k_r||: the logit is then scaled_key . M_n / ||M_n||.
  std::vector<acc_t> scaled_keys(B * R * W);
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t* s = strengths.data_ptr<scalar_t>();
  for (int64_t row = 0; row < B * R; ++row) {
    const acc_t scale = acc_t(s[row]) / safe_norm<acc_t>(k + row * W, W);
    for (int64_t i = 0; i < W; ++i) scaled_keys[row * W + i] = scale * acc_t(k[row * W + i]);
  }
  // Per (b, r, sub-tile): max and sum of exp(z - max). Per (b, piece, r) with reads: the running
  // max and running sum of exp(z - max) M_n over the piece's sub-tiles.
  std::vector<acc_t> sub_max(B * R * subs), sub_sum(B * R * subs);
  std::vector<acc_t> piece_max(with_reads ? B * pieces * R : 0), piece_acc(with_reads ? B * pieces * R * W : 0);

  const ForwardPieces<scalar_t, acc_t> work{
      N, W, R, pieces, subs, m, scaled_keys.data(), exps, sub_max.data(), sub_sum.data(),
      with_reads ? piece_max.data() : nullptr, with_reads ? piece_acc.data() : nullptr};
  at::parallel_for(0, B * pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end; ++piece) forward_piece(work, piece);
  });

  // Merge the sub-tiles of each (b, r) into its max and sum, and the pieces into its read vector.
  std::vector<acc_t> row_max(B * R), row_inv_sum(B * R);
  scalar_t* out_reads = with_reads ? reads->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / R, r = row % R;
      const acc_t* maxes = &sub_max[row * subs];
      const acc_t* sums = &sub_sum[row * subs];
      const acc_t max = *std::max_element(maxes, maxes + subs);
      acc_t sum = 0;
      for (int64_t sub = 0; sub < subs; ++sub) sum += sums[sub] * std::exp(maxes[sub] - max);
      row_max[row] = max;
      row_inv_sum[row] = acc_t(1) / sum;
      if (!with_reads) continue;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t piece = 0; piece < pieces; ++piece) {
        const int64_t at = (b * pieces + piece) * R + r;
        const acc_t rescale = std::exp(piece_max[at] - max);
        for (int64_t i = 0; i < W; ++i) acc[i] += piece_acc[at * W + i] * rescale;
      }
      for (int64_t i = 0; i < W; ++i) out_reads[row * W + i] = scalar_t(acc[i] * row_inv_sum[row]);
    }
  });
  // w_n = exp(z_n - sub max) * exp(sub max - row max) / row sum: one multiply per slot.
  scalar_t* w = weights.data_ptr<scalar_t>();
  at::parallel_for(0, B * R * subs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t at = begin; at < end; ++at) {
      const int64_t row = at / subs, sub_first = (at % subs) * kSub, sub_last = std::min(N, sub_first + kSub);
      const acc_t factor = std::exp(sub_max[at] - row_max[row]) * row_inv_sum[row];
      const acc_t* e = exps + row * N;
      scalar_t* out = w + row * N;
      for (int64_t n = sub_first; n < sub_last; ++n) out[n] = scalar_t(e[n] * factor);
    }
  });
}

// The pointers and sizes a backward piece works on (see content_backward).
template <typename scalar_t, typename acc_t>
struct BackwardPieces {
  int64_t N, W, R, pieces;
  const scalar_t* memory;        // [B, N, W]
  const scalar_t* strengths;     // [B, R]
  const scalar_t* weights;       // [B, R, N]
  const scalar_t* grad_weights;  // [B, R, N]
  const acc_t* unit_keys;        // [B, R, W]: k_r / ||k_r||
  const acc_t* grad_read;        // [B, R, W], content_read only (else null)
  const acc_t* read_dots;        // [B, R, N]: g_reads_r . M_n, content_read only (else null)
  const acc_t* c;                // [B, R]
  scalar_t* grad_memory;         // [B, N, W]
  acc_t* part_strength;          // [B, pieces, R]
  acc_t* part_key_scalar;        // [B, pieces, R]
  acc_t* part_key;               // [B, pieces, R, W]
};

// One word M_n against H heads [r, r + H) of batch row b: one sweep for its norm and the heads'
// similarities (word_dots), another with the read gradients for content_read, then each head's
// share of grad M_n (word_grad) and of its partial grad k.
template <int64_t H, typename scalar_t, typename acc_t>
SPARSEMEM_ALWAYS_INLINE void word_backward(const BackwardPieces<scalar_t, acc_t>& x, int64_t b, int64_t r, int64_t n,
                                           acc_t& inv_norm, acc_t& word_scalar, acc_t* word_grad, acc_t* p_strength,
                                           acc_t* p_key_scalar, acc_t* p_key) {
  const int64_t N = x.N, W = x.W, first_row = b * x.R + r;
  const scalar_t* word = x.memory + (b * N + n) * W;
  const acc_t* unit_keys = x.unit_keys + first_row * W;
  acc_t similarity[H + 1], read_dot[H + 1] = {}, to_key[H], weight[H];
  word_dots<H>(word, unit_keys, W, similarity);
  inv_norm = acc_t(1) / std::sqrt(similarity[H] + acc_t(kNormEps));
  if (x.read_dots != nullptr) {
    for (int64_t h = 0; h < H; ++h) read_dot[h] = x.read_dots[(first_row + h) * N + n];
  }
  for (int64_t h = 0; h < H; ++h) {
    const int64_t row = first_row + h;
    const acc_t D = similarity[h] * inv_norm;
    weight[h] = acc_t(x.weights[row * N + n]);
    const acc_t dz = weight[h] * (acc_t(x.grad_weights[row * N + n]) + read_dot[h] - x.c[row]);
    const acc_t dD = acc_t(x.strengths[row]) * dz;
    p_strength[r + h] += dz * D;
    p_key_scalar[r + h] += dD * D;
    word_scalar += dD * D;
    to_key[h] = dD * inv_norm;
  }
  for (int64_t h = 0; h < H; ++h) {
    acc_t* key_part = p_key + (r + h) * W;
    const acc_t* unit_key = unit_keys + h * W;
    for (int64_t i = 0; i < W; ++i) {
      key_part[i] += to_key[h] * acc_t(word[i]);
      word_grad[i] += to_key[h] * unit_key[i];
    }
    if (x.grad_read == nullptr) continue;
    const acc_t* grad_read = x.grad_read + (first_row + h) * W;
    for (int64_t i = 0; i < W; ++i) word_grad[i] += weight[h] * grad_read[i];
  }
}

// One (b, piece): grad M for its slots, and its partial sums for grad k and grad s.
template <typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void backward_piece(const BackwardPieces<scalar_t, acc_t>& x, int64_t piece,
                                            acc_t* word_grad) {
  const int64_t N = x.N, W = x.W, R = x.R;
  const int64_t b = piece / x.pieces, first = (piece % x.pieces) * kPiece, last = std::min(N, first + kPiece);
  acc_t* p_strength = x.part_strength + piece * R;
  acc_t* p_key_scalar = x.part_key_scalar + piece * R;
  acc_t* p_key = x.part_key + piece * R * W;
  std::fill(p_strength, p_strength + R, acc_t(0));
  std::fill(p_key_scalar, p_key_scalar + R, acc_t(0));
  std::fill(p_key, p_key + R * W, acc_t(0));
  for (int64_t n = first; n < last; ++n) {
    std::fill(word_grad, word_grad + W, acc_t(0));
    acc_t inv_norm = 0, word_scalar = 0;  // word_scalar: sum_r dD_rn D_rn
    for_head_groups(R, [&](auto heads, int64_t r) SPARSEMEM_INLINE_LAMBDA {
      word_backward<decltype(heads)::value>(x, b, r, n, inv_norm, word_scalar, word_grad, p_strength, p_key_scalar,
                                            p_key);
    });
    const acc_t to_word = word_scalar * inv_norm * inv_norm;
    const scalar_t* word = x.memory + (b * N + n) * W;
    scalar_t* out = x.grad_memory + (b * N + n) * W;
    for (int64_t i = 0; i < W; ++i) out[i] = scalar_t(word_grad[i] - to_word * acc_t(word[i]));
  }
}

// content_read's g_reads_r . M_n for the slots of one (b, piece) into read_dots, and the piece's
// share of c_r = sum_n w_rn (g_w[r, n] + g_reads_r . M_n) into part_c [B, pieces, R].
template <typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void read_dots_piece(const scalar_t* memory, const scalar_t* weights, const scalar_t* grad_weights,
                     const acc_t* grad_read, int64_t N, int64_t W, int64_t R, int64_t pieces, int64_t piece,
                     acc_t* read_dots, acc_t* part_c) {
  const int64_t b = piece / pieces, first = (piece % pieces) * kPiece, last = std::min(N, first + kPiece);
  acc_t* c = part_c + piece * R;
  std::fill(c, c + R, acc_t(0));
  for (int64_t n = first; n < last; ++n) {
    const scalar_t* word = memory + (b * N + n) * W;
    for_head_groups(R, [&](auto heads, int64_t r) SPARSEMEM_INLINE_LAMBDA {
      constexpr int64_t H = decltype(heads)::value;
      acc_t dots[H + 1];
      word_dots<H>(word, grad_read + (b * R + r) * W, W, dots);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = b * R + r + h;
        read_dots[row * N + n] = dots[h];
        c[r + h] += acc_t(weights[row * N + n]) * (acc_t(grad_weights[row * N + n]) + dots[h]);
      }
    });
  }
}

// Backward of both ops; grad_reads (content_read) may be null.
//   g'_rn = g_w[r, n] + g_reads_r . M_n          (the read adds a path from M_n to w_rn)
//   dz_rn = w_rn (g'_rn - c_r),  c_r = sum_n w_rn g'_rn
// c_r is summed from the very g'_rn that dz uses (content_read: a first pass over memory for
// g_reads_r . M_n), never as sum_n w_rn g_w[r, n] + g_reads_r . reads_r: with the forward's rounded
// reads the two parts miss each other by ~eps |g_reads| |M|, and a peaked softmax (large s_r, w_r
// nearly one-hot, true dz ~ 0) turns that into an error ~eps s_r in every gradient.
//   dD_rn = s_r dz_rn;  ds_r = sum_n dz_rn D_rn
//   dk_r = (sum_n dD_rn M_n / ||M_n||) / ||k_r|| - k_r (sum_n dD_rn D_rn) / ||k_r||^2
//   dM_n = sum_r dD_rn k_r / (||k_r|| ||M_n||) - (sum_r dD_rn D_rn) M_n / ||M_n||^2 + sum_r w_rn g_reads_r
template <typename scalar_t>
std::vector<at::Tensor> content_backward(const at::Tensor& grad_weights, const at::Tensor* grad_reads,
                                         const at::Tensor& memory, const at::Tensor& keys,
                                         const at::Tensor& strengths, const at::Tensor& weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  const int64_t pieces = (N + kPiece - 1) / kPiece;
  const bool with_reads = grad_reads != nullptr;
  const scalar_t* m = memory.data_ptr<scalar_t>();
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t* s = strengths.data_ptr<scalar_t>();
  const scalar_t* w = weights.data_ptr<scalar_t>();
  const scalar_t* gw = grad_weights.data_ptr<scalar_t>();
  const scalar_t* gr = with_reads ? grad_reads->data_ptr<scalar_t>() : nullptr;

  // Per (b, r): unit key k_r / ||k_r||, 1 / ||k_r||, read gradient in acc_t, and c_r.
  std::vector<acc_t> unit_keys(B * R * W), inv_key_norm(B * R), grad_read(with_reads ? B * R * W : 0), c(B * R);
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      inv_key_norm[row] = acc_t(1) / safe_norm<acc_t>(k + row * W, W);
      for (int64_t i = 0; i < W; ++i) unit_keys[row * W + i] = acc_t(k[row * W + i]) * inv_key_norm[row];
      if (with_reads) {
        for (int64_t i = 0; i < W; ++i) grad_read[row * W + i] = acc_t(gr[row * W + i]);
        continue;  // c_r comes with the read dots below
      }
      acc_t total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t n = 0; n < N; ++n) total += acc_t(w[row * N + n]) * acc_t(gw[row * N + n]);
      c[row] = total;
    }
  });
  std::vector<acc_t> read_dots(with_reads ? B * R * N : 0);
  if (with_reads) {
    std::vector<acc_t> part_c(B * pieces * R);
    at::parallel_for(0, B * pieces, 1, [&](int64_t begin, int64_t end) {
      for (int64_t piece = begin; piece < end; ++piece) {
        read_dots_piece(m, w, gw, grad_read.data(), N, W, R, pieces, piece, read_dots.data(), part_c.data());
      }
    });
    for (int64_t row = 0; row < B * R; ++row) {
      const int64_t b = row / R, r = row % R;
      acc_t total = 0;
      for (int64_t t = 0; t < pieces; ++t) total += part_c[(b * pieces + t) * R + r];
      c[row] = total;
    }
  }

  auto grad_memory = at::empty_like(memory);
  scalar_t* gm = grad_memory.data_ptr<scalar_t>();
  // Per (b, tile, r): partial sums of dz D (strength), dD D (key, scalar part), dD M / ||M|| (key).
  std::vector<acc_t> part_strength(B * pieces * R), part_key_scalar(B * pieces * R), part_key(B * pieces * R * W);
  const BackwardPieces<scalar_t, acc_t> work{N,
                                             W,
                                             R,
                                             pieces,
                                             m,
                                             s,
                                             w,
                                             gw,
                                             unit_keys.data(),
                                             with_reads ? grad_read.data() : nullptr,
                                             with_reads ? read_dots.data() : nullptr,
                                             c.data(),
                                             gm,
                                             part_strength.data(),
                                             part_key_scalar.data(),
                                             part_key.data()};
  at::parallel_for(0, B * pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> word_grad(W);
    for (int64_t piece = begin; piece < end; ++piece) backward_piece(work, piece, word_grad.data());
  });

  auto grad_keys = at::empty_like(keys);
  auto grad_strengths = at::empty_like(strengths);
  scalar_t* gk = grad_keys.data_ptr<scalar_t>();
  scalar_t* gs = grad_strengths.data_ptr<scalar_t>();
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> key_sum(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / R, r = row % R;
      acc_t strength = 0, key_scalar = 0;
      std::fill(key_sum.begin(), key_sum.end(), acc_t(0));
      for (int64_t t = 0; t < pieces; ++t) {
        const int64_t at = (b * pieces + t) * R + r;
        strength += part_strength[at];
        key_scalar += part_key_scalar[at];
        for (int64_t i = 0; i < W; ++i) key_sum[i] += part_key[at * W + i];
      }
      gs[row] = scalar_t(strength);
      const acc_t inv = inv_key_norm[row];
      for (int64_t i = 0; i < W; ++i) {
        gk[row * W + i] = scalar_t(key_sum[i] * inv - unit_keys[row * W + i] * key_scalar * inv);
      }
    }
  });
  return {grad_memory, grad_keys, grad_strengths};
}

}  // namespace

at::Tensor ext_content_weights(const at::Tensor& memory_in, const at::Tensor& keys_in,
                               const at::Tensor& strengths_in) {
  check_inputs(memory_in, keys_in, strengths_in);
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous(), strengths = strengths_in.contiguous();
  auto weights = at::empty({keys.size(0), keys.size(1), memory.size(1)}, memory.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_weights", [&] {
    content_forward<scalar_t>(memory, keys, strengths, weights, nullptr);
  });
  return weights;
}

std::tuple<at::Tensor, at::Tensor> ext_content_read(const at::Tensor& memory_in, const at::Tensor& keys_in,
                                                    const at::Tensor& strengths_in) {
  check_inputs(memory_in, keys_in, strengths_in);
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous(), strengths = strengths_in.contiguous();
  auto weights = at::empty({keys.size(0), keys.size(1), memory.size(1)}, memory.options());
  auto reads = at::empty_like(keys);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_read", [&] {
    content_forward<scalar_t>(memory, keys, strengths, weights, &reads);
  });
  return {weights, reads};
}

std::vector<at::Tensor> ext_content_weights_backward(const at::Tensor& grad_weights, const at::Tensor& memory,
                                                     const at::Tensor& keys, const at::Tensor& strengths,
                                                     const at::Tensor& weights) {
  check_inputs(memory, keys, strengths);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_weights_backward", [&] {
    grads = content_backward<scalar_t>(grad_weights.contiguous(), nullptr, memory.contiguous(), keys.contiguous(),
                                       strengths.contiguous(), weights.contiguous());
  });
  return grads;
}

std::vector<at::Tensor> ext_content_read_backward(const at::Tensor& grad_weights, const at::Tensor& grad_reads,
                                                  const at::Tensor& memory, const at::Tensor& keys,
                                                  const at::Tensor& strengths, const at::Tensor& weights,
                                                  const at::Tensor& /*reads*/) {
  check_inputs(memory, keys, strengths);
  const auto grad_reads_c = grad_reads.contiguous();
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_read_backward", [&] {
    grads = content_backward<scalar_t>(grad_weights.contiguous(), &grad_reads_c, memory.contiguous(),
                                       keys.contiguous(), strengths.contiguous(), weights.contiguous());
  });
  return grads;
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_content_weights(Tensor memory, Tensor keys, Tensor strengths) -> Tensor");
  m.def(
      "ext_content_weights_backward(Tensor grad_weights, Tensor memory, Tensor keys, Tensor strengths, "
      "Tensor weights) -> Tensor[]");
  m.def("ext_content_read(Tensor memory, Tensor keys, Tensor strengths) -> (Tensor, Tensor)");
  m.def(
      "ext_content_read_backward(Tensor grad_weights, Tensor grad_reads, Tensor memory, Tensor keys, "
      "Tensor strengths, Tensor weights, Tensor reads) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_content_weights", &ext_content_weights);
  m.impl("ext_content_weights_backward", &ext_content_weights_backward);
  m.impl("ext_content_read", &ext_content_read);
  m.impl("ext_content_read_backward", &ext_content_read_backward);
}

}  // namespace sparsemem
