// Small numeric helpers shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sparsemem {

// Added to squared norms before the square root: ||x||_eps = sqrt(sum x^2 + 1e-6), the EPS of
// sparsemem/reference/dnc.py, so a zero word has cosine 0 with a finite gradient.
constexpr double kNormEps = 1e-6;

// Compiles the function it marks twice, for x86-64-v3 (AVX2 + FMA + F16C) and for the baseline,
// picked at load time by the CPU (GCC function multi-versioning): the extension stays portable and
// the hot loops get 256-bit vectors where the machine has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPARSEMEM_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPARSEMEM_VECTOR_CLONES
#endif

// Inlined wherever it is called, so a SPARSEMEM_VECTOR_CLONES caller runs it with its own
// instruction set (an out-of-line copy is compiled for the baseline only).
#if defined(__GNUC__)
#define SPARSEMEM_ALWAYS_INLINE __attribute__((always_inline)) inline
#define SPARSEMEM_INLINE_LAMBDA __attribute__((always_inline))
#else
#define SPARSEMEM_ALWAYS_INLINE inline
#define SPARSEMEM_INLINE_LAMBDA
#endif

constexpr int64_t kLanes = 8;  // partial sums per dot: one 256-bit register in float

// sum_i a[i] b[i] in acc_t. Eight independent partial sums let the compiler vectorise the loop
// without reassociating one float sum (which it may not do without -ffast-math).
template <typename acc_t, typename A, typename B>
SPARSEMEM_ALWAYS_INLINE acc_t dot(const A* a, const B* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += acc_t(a[i + l]) * acc_t(b[i + l]);
  }
  acc_t total = 0;
  for (; i < n; ++i) total += acc_t(a[i]) * acc_t(b[i]);
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// ||x||_eps = sqrt(x . x + 1e-6) in acc_t.
template <typename acc_t, typename A>
SPARSEMEM_ALWAYS_INLINE acc_t safe_norm(const A* x, int64_t n) {
  return std::sqrt(dot<acc_t>(x, x, n) + acc_t(kNormEps));
}

constexpr int64_t kHeadGroup = 4;  // keys swept with a word at once: 5 x 8 float sums fit 16 ymm registers


// Each sum of lanes s[0..8) is ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)). For four at once,
// horizontal-add steps: pair_sums(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7],
// and pair_sums(pair_sums(a, b), pair_sums(c, d)) holds the two halves of each sum: 7 vector
// operations, where the compiler's own reduction of four scalar sums takes ~50 shuffles.
template <typename acc_t>
struct LaneVectorOf;
template <>
struct LaneVectorOf<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LaneVectorOf<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename acc_t>
using LaneVector = typename LaneVectorOf<acc_t>::type;

// (Vectors by reference, not value: GCC warns of the calling convention of the baseline clone.)
template <typename Vector>
SPARSEMEM_ALWAYS_INLINE void pair_sums(const Vector& a, const Vector& b, Vector& sums) {
  sums = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// dots[h] = keys[h] . word for h < H <= 4 and dots[H] = word . word, in one sweep over the word:
// each element is loaded and converted once, into H + 1 lane vectors kept in registers. The W % 8
// tail elements are added after the lanes.
template <int64_t H, typename scalar_t, typename acc_t>
SPARSEMEM_ALWAYS_INLINE void word_dots(const scalar_t* word, const acc_t* keys, int64_t W,
                                                     acc_t* dots) {
  static_assert(1 <= H && H <= 4, "word_dots reduces up to four keys at once");
  using Vector = LaneVector<acc_t>;
  Vector sums[4] = {}, norm = {};
  int64_t i = 0;
  for (; i + kLanes <= W; i += kLanes) {
    acc_t converted[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) converted[l] = acc_t(word[i + l]);
    Vector x, key;
    std::memcpy(&x, converted, sizeof x);
    norm += x * x;
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(&key, keys + h * W + i, sizeof key);
      sums[h] += key * x;
    }
  }
  Vector pairs01, pairs23, halves, norm_pairs, norm_halves;
  pair_sums(sums[0], sums[1], pairs01);
  pair_sums(sums[2], sums[3], pairs23);
  pair_sums(pairs01, pairs23, halves);
  pair_sums(norm, norm, norm_pairs);
  pair_sums(norm_pairs, norm_pairs, norm_halves);
  const auto totals =
      __builtin_shufflevector(halves, halves, 0, 1, 2, 3) + __builtin_shufflevector(halves, halves, 4, 5, 6, 7);
  for (int64_t h = 0; h < H; ++h) dots[h] = totals[h];
  dots[H] = norm_halves[0] + norm_halves[4];
  for (; i < W; ++i) {
    const acc_t x = acc_t(word[i]);
    dots[H] += x * x;
    for (int64_t h = 0; h < H; ++h) dots[h] += keys[h * W + i] * x;
  }
}

// Calls body(heads, r) for the groups of heads [r, r + heads) that cover [0, R), kHeadGroup at a
// time; heads is a std::integral_constant, so the body can pass it on as a template argument (the
// one-sweep kernels are compiled per group size, with their sums in registers). Inside a
// SPARSEMEM_VECTOR_CLONES function, mark the body SPARSEMEM_INLINE_LAMBDA: a lambda is a function
// of its own, compiled for the baseline unless it is inlined into the clone.
template <typename Body>
SPARSEMEM_ALWAYS_INLINE void for_head_groups(int64_t R, const Body& body) {
  for (int64_t r = 0; r < R; r += kHeadGroup) {
    switch (std::min(kHeadGroup, R - r)) {
      case 1: body(std::integral_constant<int64_t, 1>{}, r); break;
      case 2: body(std::integral_constant<int64_t, 2>{}, r); break;
      case 3: body(std::integral_constant<int64_t, 3>{}, r); break;
      default: body(std::integral_constant<int64_t, 4>{}, r); break;
    }
  }
}

// The grain of at::parallel_for for tasks of `work` scalar operations each: a call with less than
// kSerialWork operations in all runs on the calling thread. The sparse ops are small (tens of
// microseconds at B = 8, K = 8): waking the thread pool costs more than it saves, and on a loaded
// machine a worker that is not scheduled stalls the whole call for a scheduler tick. Measured on the
// 2 shared cores: ext_sparse_read on gathered rows (B = 8, R*K = 32 slots) 33 us on one thread and
// 750 us when split across two. 2^22 operations is ~1 ms of work on one core.
constexpr int64_t kSerialWork = int64_t(1) << 22;

inline int64_t grain(int64_t work) { return std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, work)); }

}  // namespace sparsemem
