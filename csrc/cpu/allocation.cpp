// DNC allocation on the CPU: with phi = argsort(u) ascending (ties by slot index) and s = u[phi],
//   a[phi_j] = (1 - s_j) P_j,   P_j = prod_{i<j} s_i   (exclusive cumulative product),
// parallel over the B batch rows; each row is sorted with an LSD radix sort on the order-preserving
// bit pattern of its usages (a short row by insertion): O(N), and stable, so equal usages keep their
// index order (the reference's torch.sort(stable=True)). -0.0 is folded into +0.0 so it ties with 0
// like torch's compare.
//
// Backward in O(N) without dividing by usage (so usages of exactly 0 and 1 are fine): with
// c_m = g_m (1 - s_m), g_m = grad[phi_m],
//   dL/ds_j = -g_j P_j + P_j Q_j,   Q_j = sum_{m>j} c_m prod_{j<i<m} s_i = c_{j+1} + s_{j+1} Q_{j+1},  Q_{N-1} = 0.
// The backward sorts again rather than saving the permutation (the op's outputs are fixed by its
// schema, and the sort is O(N) like the rest).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dense.h"

namespace sparsemem {

namespace {

// Unsigned keys whose integer order is the float order of x (finite x; -0.0 as +0.0).
inline uint32_t ordered_bits(float x) {
  x += 0.0f;  // -0.0 + 0.0 = +0.0
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

inline uint64_t ordered_bits(double x) {
  x += 0.0;
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x8000000000000000ull) ? ~bits : bits | 0x8000000000000000ull;
}

// Up to this N a row is sorted by insertion: the radix sort's 256-entry digit counts per pass cost
// more than N^2 / 4 moves (allocation at B = 32, N = 16: 15 us, forward or backward, by radix).
constexpr int64_t kInsertionSortSlots = 64;

// Sorts slot indices 0..N-1 by usage, ascending and stable. key_t: uint32_t for float (half and
// bfloat16 widen to float exactly), uint64_t for double. Scratch vectors are the caller's, reused per row.
template <typename key_t, typename scalar_t>
void sort_slots(const scalar_t* usage, int64_t N, std::vector<key_t>& keys, std::vector<key_t>& keys_tmp,
                std::vector<int32_t>& order, std::vector<int32_t>& order_tmp) {
  using float_t = std::conditional_t<std::is_same_v<key_t, uint64_t>, double, float>;
  if (N <= kInsertionSortSlots) {
    // Insertion: a strict compare moves a key only past greater ones, so it is stable too.
    for (int64_t n = 0; n < N; ++n) {
      const key_t key = ordered_bits(float_t(usage[n]));
      int64_t j = n;
      for (; j > 0 && keys[j - 1] > key; --j) {
        keys[j] = keys[j - 1];
        order[j] = order[j - 1];
      }
      keys[j] = key;
      order[j] = int32_t(n);
    }
    return;
  }
  constexpr int kPasses = sizeof(key_t);  // 8-bit digits
  std::array<std::array<int64_t, 256>, kPasses> counts{};
  for (int64_t n = 0; n < N; ++n) {
    const key_t key = ordered_bits(float_t(usage[n]));
    keys[n] = key;
    order[n] = int32_t(n);
    for (int pass = 0; pass < kPasses; ++pass) ++counts[pass][(key >> (8 * pass)) & 0xFF];
  }
  for (int pass = 0; pass < kPasses; ++pass) {
    auto& count = counts[pass];
    // A digit shared by every key leaves the order as it is: skip the pass (usages in [0, 1]
    // share their top bits).
    if (count[(keys[0] >> (8 * pass)) & 0xFF] == N) continue;
    int64_t offset = 0;
    for (auto& c : count) {
      const int64_t size = c;
      c = offset;
      offset += size;
    }
    for (int64_t n = 0; n < N; ++n) {
      const int64_t to = count[(keys[n] >> (8 * pass)) & 0xFF]++;
      keys_tmp[to] = keys[n];
      order_tmp[to] = order[n];
    }
    keys.swap(keys_tmp);
    order.swap(order_tmp);
  }
}

template <typename scalar_t>
using key_type = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;

void check_usage(const at::Tensor& usage) {
  TORCH_CHECK(usage.dim() == 2, "usage must be [B, N]; got ", usage.sizes());
  TORCH_CHECK(usage.size(1) < (int64_t(1) << 31), "allocation supports N < 2^31 slots; got N=", usage.size(1));
}

}  // namespace

at::Tensor ext_allocation_weights(const at::Tensor& usage_in) {
  check_usage(usage_in);
  const auto usage = usage_in.contiguous();
  const int64_t B = usage.size(0), N = usage.size(1);
  auto allocation = at::empty_like(usage);
  if (N == 0) return allocation;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "ext_allocation_weights", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using key_t = key_type<scalar_t>;
    const scalar_t* u = usage.data_ptr<scalar_t>();
    scalar_t* a = allocation.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<key_t> keys(N), keys_tmp(N);
      std::vector<int32_t> order(N), order_tmp(N);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = u + b * N;
        sort_slots(row, N, keys, keys_tmp, order, order_tmp);
        acc_t product = 1;  // P_j
        for (int64_t j = 0; j < N; ++j) {
          const acc_t s = acc_t(row[order[j]]);
          a[b * N + order[j]] = scalar_t((1 - s) * product);
          product *= s;
        }
      }
    });
  });
  return allocation;
}

std::vector<at::Tensor> ext_allocation_weights_backward(const at::Tensor& grad_in, const at::Tensor& usage_in,
                                                        const at::Tensor& /*allocation*/) {
  check_usage(usage_in);
  const auto usage = usage_in.contiguous();
  const auto grad = grad_in.contiguous();
  const int64_t B = usage.size(0), N = usage.size(1);
  auto grad_usage = at::empty_like(usage);
  if (N == 0) return {grad_usage};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "ext_allocation_weights_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using key_t = key_type<scalar_t>;
    const scalar_t* u = usage.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gu = grad_usage.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<key_t> keys(N), keys_tmp(N);
      std::vector<int32_t> order(N), order_tmp(N);
      std::vector<acc_t> sorted(N), product(N);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = u + b * N;
        sort_slots(row, N, keys, keys_tmp, order, order_tmp);
        acc_t running = 1;
        for (int64_t j = 0; j < N; ++j) {
          sorted[j] = acc_t(row[order[j]]);
          product[j] = running;
          running *= sorted[j];
        }
        acc_t q = 0;  // Q_j, walking j down from N - 1
        for (int64_t j = N - 1; j >= 0; --j) {
          const acc_t g_j = acc_t(g[b * N + order[j]]);
          gu[b * N + order[j]] = scalar_t(product[j] * (q - g_j));
          q = g_j * (1 - sorted[j]) + sorted[j] * q;
        }
      }
    });
  });
  return {grad_usage};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_allocation_weights(Tensor usage) -> Tensor");
  m.def("ext_allocation_weights_backward(Tensor grad_allocation, Tensor usage, Tensor allocation) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_allocation_weights", &ext_allocation_weights);
  m.impl("ext_allocation_weights_backward", &ext_allocation_weights_backward);
}

}  // namespace sparsemem
