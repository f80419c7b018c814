// Small numeric helpers shared by the CPU kernels of the sparse ops.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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
#else
#define SPARSEMEM_ALWAYS_INLINE inline
#endif

// sum_i a[i] b[i] in acc_t. Eight independent partial sums let the compiler vectorise the loop
// without reassociating one float sum (which it may not do without -ffast-math).
template <typename acc_t, typename A, typename B>
SPARSEMEM_ALWAYS_INLINE acc_t dot(const A* a, const B* b, int64_t n) {
  constexpr int64_t kLanes = 8;
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

// The grain of at::parallel_for for tasks of `work` scalar operations each: a call with less than
// kSerialWork operations in all runs on the calling thread. The sparse ops are small (tens of
// microseconds at B = 8, K = 8): waking the thread pool costs more than it saves, and on a loaded
// machine a worker that is not scheduled stalls the whole call for a scheduler tick. Measured on the
// 2 shared cores: ext_sparse_read on gathered rows (B = 8, R*K = 32 slots) 33 us on one thread and
// 750 us when split across two. 2^22 operations is ~1 ms of work on one core.
constexpr int64_t kSerialWork = int64_t(1) << 22;

inline int64_t grain(int64_t work) { return std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, work)); }

}  // namespace sparsemem
