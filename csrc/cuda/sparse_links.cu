// SDNC's sparse temporal links on gathered rows, on the GPU: sparse_link_update and
// sparse_temporal_reads of sparsemem/reference/sdnc.py (contract in sparsemem/ops/sparse_links.py),
// the algorithm of the C++ kernel csrc/cpu/sparse_links.cpp.
//
// A link row is K_L (slot, value) pairs, slot -1 for an empty place. The rows are short (K_L ~ 8)
// and many (hundreds per batch row), so the update works one thread per row: it builds the row's
// candidates in a global scratch row (L1-resident) and keeps the top by (value desc, slot asc) of
// the valid ones (slot >= 0, value > 0) by ranking: a candidate's place is the number of valid
// candidates better than it, O(C^2) for C candidates and no sort. Kernels, one launch each:
//   link_writes_kernel   per (b, j): the write weights summed per slot, at each slot's first place
//   link_rows_kernel     per forward row, backward row and precedence: candidates, top K_L
//   link_cut_kernel      per entry: the mutual cut (does the other store's row keep it too?)
//   link_compact_kernel  per row: drop the cut entries, pad with (0, -1)
// The temporal reads work one block per (head, store): its Q * K_L contributions summed per slot
// (each slot's first place sums the later ones in order), then ranked.
//
// Rounding: every elementwise step is rounded to the input dtype, and products and sums use the
// _rn intrinsics (never contracted into an FMA), as the reference's separate torch ops round them;
// so both stores get equal bits for one entry, and bf16 ties fall as in the reference. The
// backward accumulates in acc_t, with atomics into per-slot grads (order varies in the last bits).
#include <cmath>

#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace sparse_links_kernels {

constexpr int kThreads = 128;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// x rounded to the op dtype, as a torch op in that dtype would leave it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rounded(acc_t x) {
  return acc_t(scalar_t(x));
}

// One entry (row i, column j) of L after a write, the same expression on both stores so both get
// equal bits: v (1 - w_i - w_j) + w_i p_j.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t link_entry(acc_t value, acc_t w_row, acc_t w_column, acc_t p_column) {
  const acc_t keep = rounded<scalar_t>(sub_rn(rounded<scalar_t>(sub_rn(acc_t(1), w_row)), w_column));
  return rounded<scalar_t>(add_rn(rounded<scalar_t>(mul_rn(value, keep)), rounded<scalar_t>(mul_rn(w_row, p_column))));
}

// Candidate a ranks before candidate b: value desc, slot asc, then place (a total order even if
// a caller's row held a slot twice, so every output place is written once).
template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t value_a, int64_t slot_a, int64_t a, acc_t value_b, int64_t slot_b,
                                             int64_t b) {
  return value_a > value_b || (value_a == value_b && (slot_a < slot_b || (slot_a == slot_b && a < b)));
}

template <typename acc_t>
__device__ __forceinline__ bool valid(acc_t value, int64_t slot) {
  return slot >= 0 && value > acc_t(0);
}

// The k best valid candidates of values/slots [0, count) to out_values/out_slots [k], best first,
// then (0, -1).
template <typename scalar_t, typename acc_t>
__device__ void write_top(const acc_t* values, const int64_t* slots, int64_t count, int64_t k, scalar_t* out_values,
                          int64_t* out_slots) {
  int64_t kept = 0;
  for (int64_t c = 0; c < count; ++c) {
    if (!valid(values[c], slots[c])) continue;
    ++kept;
    int64_t rank = 0;
    for (int64_t d = 0; d < count && rank < k; ++d) {
      if (d != c && valid(values[d], slots[d]) && ranks_before(values[d], slots[d], d, values[c], slots[c], c)) ++rank;
    }
    if (rank < k) {
      out_values[rank] = scalar_t(values[c]);
      out_slots[rank] = slots[c];
    }
  }
  for (int64_t j = kept < k ? kept : k; j < k; ++j) {
    out_values[j] = scalar_t(0);
    out_slots[j] = -1;
  }
}

// The summed write weight w(s) of slot s: write_sums holds it at the slot's first place among the
// write indices wi [J] (link_writes_kernel), which find_slot returns.
template <typename acc_t>
__device__ __forceinline__ acc_t written_weight(const int64_t* wi, const acc_t* write_sums, int64_t J, int64_t slot) {
  const int64_t j = find_slot(wi, J, slot);
  return j < 0 ? acc_t(0) : write_sums[j];
}

// Whether place j of wi is the first place of a valid written slot (one place per distinct slot).
__device__ __forceinline__ bool first_write(const int64_t* wi, int64_t j) {
  return wi[j] >= 0 && find_slot(wi, j, wi[j]) < 0;
}

// The precedence p(s) of slot s (0 where s is not among the K_L precedence slots pi).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t precedence_of(const int64_t* pi, const scalar_t* pv, int64_t K_L, int64_t slot) {
  const int64_t l = find_slot(pi, K_L, slot);
  return l < 0 ? acc_t(0) : acc_t(pv[l]);
}

template <typename scalar_t, typename acc_t>
__global__ void link_writes_kernel(const int64_t* __restrict__ write_indices, const scalar_t* __restrict__ write_weights,
                                   acc_t* __restrict__ write_sums, acc_t* __restrict__ write_totals, int64_t B,
                                   int64_t J) {
  // Per (b, j): at the first place of a slot, its weights summed in place order (rounded per add,
  // as scatter_add in the dtype); elsewhere 0. Place 0 also writes sum_j w_j over valid places.
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < B * J;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = index / J, j = index % J;
    const int64_t* wi = write_indices + b * J;
    const scalar_t* ww = write_weights + b * J;
    acc_t sum = 0;
    if (first_write(wi, j)) {
      sum = acc_t(ww[j]);
      for (int64_t t = j + 1; t < J; ++t) {
        if (wi[t] == wi[j]) sum = rounded<scalar_t>(add_rn(sum, acc_t(ww[t])));
      }
    }
    write_sums[index] = sum;
    if (j == 0) {
      acc_t total = 0;
      for (int64_t t = 0; t < J; ++t) {
        if (wi[t] >= 0) total = add_rn(total, acc_t(ww[t]));
      }
      write_totals[b] = rounded<scalar_t>(total);
    }
  }
}

struct Shapes {
  int64_t B, F, G, K_L, J;
};

template <typename scalar_t, typename acc_t>
struct LinkArgs {
  const int64_t *forward_slots, *forward_indices, *backward_slots, *backward_indices, *precedence_indices,
      *write_indices;
  const scalar_t *forward_values, *backward_values, *precedence_values;
  const acc_t *write_sums, *write_totals;
};

template <typename scalar_t, typename acc_t>
__global__ void link_rows_kernel(LinkArgs<scalar_t, acc_t> in, Shapes s, acc_t* __restrict__ candidate_values,
                                 int64_t* __restrict__ candidate_slots, scalar_t* __restrict__ out_fv,
                                 int64_t* __restrict__ out_fi, scalar_t* __restrict__ out_gv,
                                 int64_t* __restrict__ out_gi, scalar_t* __restrict__ out_pv,
                                 int64_t* __restrict__ out_pi) {
  // One thread per forward row (B * F), backward row (B * G) or batch row's precedence (B), in that
  // order; each has C = K_L + max(K_L, J) candidate places of scratch.
  const int64_t K_L = s.K_L, J = s.J, C = K_L + (K_L > J ? K_L : J);
  const int64_t total = s.B * (s.F + s.G + 1);
  for (int64_t item = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    acc_t* values = candidate_values + item * C;
    int64_t* slots = candidate_slots + item * C;
    int64_t count = 0;
    if (item < s.B * s.F) {
      // Forward row i: its entries j updated, plus w_i p_j at precedence slots j not stored, j != i.
      const int64_t row = item, b = row / s.F;
      const int64_t* wi = in.write_indices + b * J;
      const acc_t* sums = in.write_sums + b * J;
      const int64_t* pi = in.precedence_indices + b * K_L;
      const scalar_t* pv = in.precedence_values + b * K_L;
      const int64_t* fi = in.forward_indices + row * K_L;
      const int64_t i = in.forward_slots[row];
      const acc_t w_i = written_weight(wi, sums, J, i);
      for (int64_t l = 0; l < K_L; ++l) {
        const int64_t j = fi[l];
        values[count] = link_entry<scalar_t>(acc_t(in.forward_values[row * K_L + l]), w_i,
                                             written_weight(wi, sums, J, j), precedence_of<acc_t>(pi, pv, K_L, j));
        slots[count++] = j;
      }
      for (int64_t l = 0; l < K_L; ++l) {
        const int64_t j = pi[l];
        if (j >= 0 && j != i && find_slot(fi, K_L, j) < 0) {
          values[count] = rounded<scalar_t>(mul_rn(w_i, acc_t(pv[l])));
          slots[count++] = j;
        }
      }
      write_top(values, slots, count, K_L, out_fv + row * K_L, out_fi + row * K_L);
    } else if (item < s.B * (s.F + s.G)) {
      // Backward row j (column j of L): its entries i updated, plus w_i p_j at written slots i not
      // stored, i != j.
      const int64_t row = item - s.B * s.F, b = row / s.G;
      const int64_t* wi = in.write_indices + b * J;
      const acc_t* sums = in.write_sums + b * J;
      const int64_t* pi = in.precedence_indices + b * K_L;
      const scalar_t* pv = in.precedence_values + b * K_L;
      const int64_t* gi = in.backward_indices + row * K_L;
      const int64_t j = in.backward_slots[row];
      const acc_t w_j = written_weight(wi, sums, J, j), p_j = precedence_of<acc_t>(pi, pv, K_L, j);
      for (int64_t l = 0; l < K_L; ++l) {
        const int64_t i = gi[l];
        values[count] = link_entry<scalar_t>(acc_t(in.backward_values[row * K_L + l]),
                                             written_weight(wi, sums, J, i), w_j, p_j);
        slots[count++] = i;
      }
      for (int64_t t = 0; t < J; ++t) {
        if (first_write(wi, t) && wi[t] != j && find_slot(gi, K_L, wi[t]) < 0) {
          values[count] = rounded<scalar_t>(mul_rn(sums[t], p_j));
          slots[count++] = wi[t];
        }
      }
      write_top(values, slots, count, K_L, out_gv + row * K_L, out_gi + row * K_L);
    } else {
      // Precedence: (1 - sum w) p + w on its slots, plus w at written slots not in it.
      const int64_t b = item - s.B * (s.F + s.G);
      const int64_t* wi = in.write_indices + b * J;
      const acc_t* sums = in.write_sums + b * J;
      const int64_t* pi = in.precedence_indices + b * K_L;
      const scalar_t* pv = in.precedence_values + b * K_L;
      const acc_t retain = rounded<scalar_t>(sub_rn(acc_t(1), in.write_totals[b]));
      for (int64_t l = 0; l < K_L; ++l) {
        const acc_t decayed = rounded<scalar_t>(mul_rn(retain, acc_t(pv[l])));
        values[count] = rounded<scalar_t>(add_rn(decayed, written_weight(wi, sums, J, pi[l])));
        slots[count++] = pi[l];
      }
      for (int64_t t = 0; t < J; ++t) {
        if (first_write(wi, t) && find_slot(pi, K_L, wi[t]) < 0) {
          values[count] = sums[t];
          slots[count++] = wi[t];
        }
      }
      write_top(values, slots, count, K_L, out_pv + b * K_L, out_pi + b * K_L);
    }
  }
}

__global__ void link_cut_kernel(const int64_t* __restrict__ forward_slots, const int64_t* __restrict__ backward_slots,
                                const int64_t* __restrict__ out_fi, const int64_t* __restrict__ out_gi,
                                bool* __restrict__ kept, Shapes s) {
  // Mutual cut, one thread per entry of the forward rows (B * F * K_L), then of the backward rows:
  // an entry (row slot, other slot) stays if the other store's row of `other` (when gathered; a
  // row not gathered did not change, so it holds at most K_L) has `slot` among its top K_L.
  // The row of `other` is found by a scan of the B's gathered slots (O(G) a thread).
  const int64_t K_L = s.K_L, forward_entries = s.B * s.F * K_L, total = forward_entries + s.B * s.G * K_L;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const bool forward = e < forward_entries;
    const int64_t entry = forward ? e : e - forward_entries;
    const int64_t rows = forward ? s.F : s.G, other_rows = forward ? s.G : s.F;
    const int64_t row = entry / K_L, b = row / rows;
    const int64_t slot = (forward ? forward_slots : backward_slots)[row];
    const int64_t other = (forward ? out_fi : out_gi)[entry];
    const int64_t* other_slots = (forward ? backward_slots : forward_slots) + b * other_rows;
    const int64_t* other_tops = forward ? out_gi : out_fi;
    const int64_t r = find_slot(other_slots, other_rows, other);
    kept[e] = r < 0 || find_slot(other_tops + (b * other_rows + r) * K_L, K_L, slot) >= 0;
  }
}

template <typename scalar_t>
__global__ void link_compact_kernel(const bool* __restrict__ kept, scalar_t* __restrict__ out_fv,
                                    int64_t* __restrict__ out_fi, scalar_t* __restrict__ out_gv,
                                    int64_t* __restrict__ out_gi, Shapes s) {
  // One thread per row: the kept valid entries move to the front in order, the rest become (0, -1).
  const int64_t K_L = s.K_L, forward_rows = s.B * s.F, total = forward_rows + s.B * s.G;
  for (int64_t item = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const bool forward = item < forward_rows;
    const int64_t row = forward ? item : item - forward_rows;
    scalar_t* values = (forward ? out_fv : out_gv) + row * K_L;
    int64_t* slots = (forward ? out_fi : out_gi) + row * K_L;
    const bool* keep = kept + (forward ? 0 : forward_rows * K_L) + row * K_L;
    int64_t out = 0;
    for (int64_t e = 0; e < K_L; ++e) {
      if (keep[e] && slots[e] >= 0) {
        values[out] = values[e];
        slots[out++] = slots[e];
      }
    }
    for (; out < K_L; ++out) {
      values[out] = scalar_t(0);
      slots[out] = -1;
    }
  }
}

Shapes check_link_update(const at::Tensor& forward_slots, const at::Tensor& forward_indices,
                         const at::Tensor& forward_values, const at::Tensor& backward_slots,
                         const at::Tensor& backward_indices, const at::Tensor& backward_values,
                         const at::Tensor& precedence_indices, const at::Tensor& precedence_values,
                         const at::Tensor& write_indices, const at::Tensor& write_weights) {
  TORCH_CHECK(forward_slots.dim() == 2 && forward_indices.dim() == 3 && backward_slots.dim() == 2 &&
                  backward_indices.dim() == 3 && precedence_indices.dim() == 2 && write_indices.dim() == 2,
              "sparse_link_update: forward rows [B, F, K_L], backward rows [B, G, K_L], precedence [B, K_L], "
              "writes [B, J]");
  const Shapes s{forward_indices.size(0), forward_indices.size(1), backward_indices.size(1), forward_indices.size(2),
                 write_indices.size(1)};
  TORCH_CHECK(forward_values.sizes() == forward_indices.sizes() && forward_slots.size(1) == s.F &&
                  backward_values.sizes() == backward_indices.sizes() && backward_slots.size(1) == s.G &&
                  backward_indices.size(2) == s.K_L && precedence_indices.size(1) == s.K_L &&
                  precedence_values.sizes() == precedence_indices.sizes() &&
                  write_weights.sizes() == write_indices.sizes(),
              "sparse_link_update: inconsistent shapes");
  for (const auto* t : {&forward_slots, &forward_indices, &backward_slots, &backward_indices, &precedence_indices,
                        &write_indices}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->size(0) == s.B, "sparse_link_update: slots must be int64 [B, ...]");
    check_device(*t, forward_values, "sparse_link_update: every input");
  }
  for (const auto* t : {&backward_values, &precedence_values, &write_weights}) {
    TORCH_CHECK(t->scalar_type() == forward_values.scalar_type() && t->size(0) == s.B,
                "sparse_link_update: values must share a dtype");
    check_device(*t, forward_values, "sparse_link_update: every input");
  }
  return s;
}

// The inputs, contiguous, and the summed write weights, shared by the forward and the backward.
struct LinkInputs {
  at::Tensor forward_slots, forward_indices, forward_values, backward_slots, backward_indices, backward_values,
      precedence_indices, precedence_values, write_indices, write_weights, write_sums, write_totals;

  template <typename scalar_t, typename acc_t>
  LinkArgs<scalar_t, acc_t> args() const {
    return {forward_slots.data_ptr<int64_t>(),      forward_indices.data_ptr<int64_t>(),
            backward_slots.data_ptr<int64_t>(),     backward_indices.data_ptr<int64_t>(),
            precedence_indices.data_ptr<int64_t>(), write_indices.data_ptr<int64_t>(),
            forward_values.data_ptr<scalar_t>(),    backward_values.data_ptr<scalar_t>(),
            precedence_values.data_ptr<scalar_t>(), write_sums.data_ptr<acc_t>(),
            write_totals.data_ptr<acc_t>()};
  }
};

LinkInputs link_inputs(const Shapes& s, const at::Tensor& forward_slots, const at::Tensor& forward_indices,
                       const at::Tensor& forward_values, const at::Tensor& backward_slots,
                       const at::Tensor& backward_indices, const at::Tensor& backward_values,
                       const at::Tensor& precedence_indices, const at::Tensor& precedence_values,
                       const at::Tensor& write_indices, const at::Tensor& write_weights) {
  LinkInputs in{forward_slots.contiguous(),      forward_indices.contiguous(),    forward_values.contiguous(),
                backward_slots.contiguous(),     backward_indices.contiguous(),   backward_values.contiguous(),
                precedence_indices.contiguous(), precedence_values.contiguous(),  write_indices.contiguous(),
                write_weights.contiguous(),      at::Tensor(),                    at::Tensor()};
  const auto acc_options = forward_values.options().dtype(accumulator(forward_values.scalar_type()));
  in.write_sums = at::empty({s.B, s.J}, acc_options);
  in.write_totals = at::zeros({s.B}, acc_options);  // J = 0: nothing written
  if (s.B * s.J > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, forward_values.scalar_type(), "link_writes_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      link_writes_kernel<scalar_t, acc_t><<<blocks_for(s.B * s.J, kThreads), kThreads, 0, stream()>>>(
          in.write_indices.data_ptr<int64_t>(), in.write_weights.data_ptr<scalar_t>(), in.write_sums.data_ptr<acc_t>(),
          in.write_totals.data_ptr<acc_t>(), s.B, s.J);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_link_update_cuda(
    const at::Tensor& forward_slots, const at::Tensor& forward_indices, const at::Tensor& forward_values,
    const at::Tensor& backward_slots, const at::Tensor& backward_indices, const at::Tensor& backward_values,
    const at::Tensor& precedence_indices, const at::Tensor& precedence_values, const at::Tensor& write_indices,
    const at::Tensor& write_weights) {
  check_cuda(forward_values, "forward_values");
  const Shapes s = check_link_update(forward_slots, forward_indices, forward_values, backward_slots, backward_indices,
                                     backward_values, precedence_indices, precedence_values, write_indices,
                                     write_weights);
  const c10::cuda::CUDAGuard guard(forward_values.device());
  const LinkInputs in = link_inputs(s, forward_slots, forward_indices, forward_values, backward_slots,
                                    backward_indices, backward_values, precedence_indices, precedence_values,
                                    write_indices, write_weights);
  auto new_forward_values = at::empty_like(in.forward_values), new_forward_indices = at::empty_like(in.forward_indices);
  auto new_backward_values = at::empty_like(in.backward_values);
  auto new_backward_indices = at::empty_like(in.backward_indices);
  auto new_precedence_values = at::empty_like(in.precedence_values);
  auto new_precedence_indices = at::empty_like(in.precedence_indices);
  const int64_t items = s.B * (s.F + s.G + 1), C = s.K_L + std::max(s.K_L, s.J);
  const int64_t entries = s.B * (s.F + s.G) * s.K_L;
  if (s.B == 0 || s.K_L == 0) {
    return {new_forward_values,   new_forward_indices,   new_backward_values,
            new_backward_indices, new_precedence_values, new_precedence_indices};
  }
  auto candidate_values = at::empty({items, C}, in.write_sums.options());
  auto candidate_slots = at::empty({items, C}, in.forward_indices.options());
  auto kept = at::empty({std::max<int64_t>(entries, 1)}, in.forward_indices.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.forward_values.scalar_type(), "sparse_link_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    link_rows_kernel<scalar_t, acc_t><<<blocks_for(items, kThreads), kThreads, 0, stream()>>>(
        in.args<scalar_t, acc_t>(), s, candidate_values.data_ptr<acc_t>(), candidate_slots.data_ptr<int64_t>(),
        new_forward_values.data_ptr<scalar_t>(), new_forward_indices.data_ptr<int64_t>(),
        new_backward_values.data_ptr<scalar_t>(), new_backward_indices.data_ptr<int64_t>(),
        new_precedence_values.data_ptr<scalar_t>(), new_precedence_indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (entries > 0) {
      link_cut_kernel<<<blocks_for(entries, kThreads), kThreads, 0, stream()>>>(
          in.forward_slots.data_ptr<int64_t>(), in.backward_slots.data_ptr<int64_t>(),
          new_forward_indices.data_ptr<int64_t>(), new_backward_indices.data_ptr<int64_t>(), kept.data_ptr<bool>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      link_compact_kernel<scalar_t><<<blocks_for(s.B * (s.F + s.G), kThreads), kThreads, 0, stream()>>>(
          kept.data_ptr<bool>(), new_forward_values.data_ptr<scalar_t>(), new_forward_indices.data_ptr<int64_t>(),
          new_backward_values.data_ptr<scalar_t>(), new_backward_indices.data_ptr<int64_t>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {new_forward_values,   new_forward_indices,   new_backward_values,
          new_backward_indices, new_precedence_values, new_precedence_indices};
}

template <typename scalar_t, typename acc_t>
__global__ void link_update_backward_kernel(LinkArgs<scalar_t, acc_t> in, Shapes s,
                                            const int64_t* __restrict__ new_fi, const int64_t* __restrict__ new_gi,
                                            const int64_t* __restrict__ new_pi, const scalar_t* __restrict__ grad_new_fv,
                                            const scalar_t* __restrict__ grad_new_gv,
                                            const scalar_t* __restrict__ grad_new_pv, scalar_t* __restrict__ grad_fv,
                                            scalar_t* __restrict__ grad_gv, acc_t* __restrict__ grad_w,
                                            acc_t* __restrict__ grad_p, acc_t* __restrict__ grad_total) {
  // One thread per kept output entry: forward (B * F * K_L), backward (B * G * K_L), precedence
  // (B * K_L). An updated entry v (1 - w_i - w_j) + w_i p_j (its slot is in the input row) sends
  // g (1 - w_i - w_j) to v (written directly by one thread per input place), g (p_j - v) to
  // w_i, -g v to w_j and g w_i to p_j; a new entry w_i p_j sends g p_j to w_i and g w_i to p_j.
  // The precedence (1 - sum w) p_l + w(s_l) sends g (1 - sum w) to p_l, -g p_l to sum w and g to
  // w(s_l); a new one w(s) sends g to w(s). Grads into w(s) go to the slot's first write place.
  const int64_t K_L = s.K_L, J = s.J, forward_entries = s.B * s.F * K_L, backward_entries = s.B * s.G * K_L;
  const int64_t total = forward_entries + backward_entries + s.B * K_L;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const bool forward = e < forward_entries, backward = !forward && e < forward_entries + backward_entries;
    const int64_t b = forward ? e / (s.F * K_L) : backward ? (e - forward_entries) / (s.G * K_L)
                                                           : (e - forward_entries - backward_entries) / K_L;
    const int64_t* wi = in.write_indices + b * J;
    const acc_t* sums = in.write_sums + b * J;
    const int64_t* pi = in.precedence_indices + b * K_L;
    const scalar_t* pv = in.precedence_values + b * K_L;
    const auto add_w = [&](int64_t slot, acc_t grad) {
      const int64_t t = find_slot(wi, J, slot);
      if (t >= 0) atomicAdd(grad_w + b * J + t, grad);
    };
    if (!forward && !backward) {
      const int64_t m = e - forward_entries - backward_entries;  // b * K_L + place
      const int64_t slot = new_pi[m];
      if (slot < 0) continue;
      const acc_t g = grad_new_pv[m];
      const int64_t l = find_slot(pi, K_L, slot);
      if (l >= 0) {
        atomicAdd(grad_p + b * K_L + l, g * (acc_t(1) - in.write_totals[b]));
        atomicAdd(grad_total + b, -g * acc_t(pv[l]));
      }
      add_w(slot, g);
      continue;
    }
    // entry (row slot i, column slot j) of L; `stored` its place in the input row, or -1
    const int64_t entry = forward ? e : e - forward_entries, row = entry / K_L;
    const int64_t other = (forward ? new_fi : new_gi)[entry];
    if (other < 0) continue;
    const int64_t row_slot = (forward ? in.forward_slots : in.backward_slots)[row];
    const int64_t i = forward ? row_slot : other, j = forward ? other : row_slot;
    const int64_t l = find_slot((forward ? in.forward_indices : in.backward_indices) + row * K_L, K_L, other);
    const acc_t g = (forward ? grad_new_fv : grad_new_gv)[entry];
    const acc_t w_i = written_weight(wi, sums, J, i), w_j = written_weight(wi, sums, J, j);
    const acc_t p_j = precedence_of<acc_t>(pi, pv, K_L, j);
    if (l >= 0) {
      const acc_t v = (forward ? in.forward_values : in.backward_values)[row * K_L + l];
      // An input row that holds a slot twice can keep it twice: its output places all map to the
      // slot's first input place l. The first of them writes their grads summed in place order (the
      // C++ kernel's += into l), the others nothing: one writer per place, no race.
      const int64_t* outs = (forward ? new_fi : new_gi) + row * K_L;
      const scalar_t* grads = (forward ? grad_new_fv : grad_new_gv) + row * K_L;
      const int64_t place = entry - row * K_L;
      if (find_slot(outs, place, other) < 0) {
        const acc_t keep = acc_t(1) - w_i - w_j;
        acc_t sum = 0;
        for (int64_t n = place; n < K_L; ++n) {
          if (outs[n] == other) sum = acc_t(scalar_t(sum + acc_t(grads[n]) * keep));
        }
        (forward ? grad_fv : grad_gv)[row * K_L + l] = scalar_t(sum);
      }
      add_w(i, g * (p_j - v));
      add_w(j, -g * v);
    } else {
      add_w(i, g * p_j);
    }
    const int64_t lp = find_slot(pi, K_L, j);
    if (lp >= 0) atomicAdd(grad_p + b * K_L + lp, g * w_i);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void link_update_grads_kernel(const int64_t* __restrict__ write_indices, const acc_t* __restrict__ grad_w,
                                         const acc_t* __restrict__ grad_p, const acc_t* __restrict__ grad_total,
                                         scalar_t* __restrict__ grad_ww, scalar_t* __restrict__ grad_pv, Shapes s) {
  // grad of write weight j: the grad of its slot's w(s) (at the first place) plus d/d(sum w).
  const int64_t writes = s.B * s.J, total = writes + s.B * s.K_L;
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    if (index < writes) {
      const int64_t b = index / s.J;
      const int64_t* wi = write_indices + b * s.J;
      const int64_t slot = wi[index % s.J];
      grad_ww[index] = slot < 0 ? scalar_t(0) : scalar_t(grad_w[b * s.J + find_slot(wi, s.J, slot)] + grad_total[b]);
    } else {
      grad_pv[index - writes] = scalar_t(grad_p[index - writes]);
    }
  }
}

std::vector<at::Tensor> sparse_link_update_backward_cuda(
    const at::Tensor& grad_forward_values, const c10::optional<at::Tensor>& /*grad_forward_indices*/,
    const at::Tensor& grad_backward_values, const c10::optional<at::Tensor>& /*grad_backward_indices*/,
    const at::Tensor& grad_precedence_values, const c10::optional<at::Tensor>& /*grad_precedence_indices*/,
    const at::Tensor& forward_slots, const at::Tensor& forward_indices, const at::Tensor& forward_values,
    const at::Tensor& backward_slots, const at::Tensor& backward_indices, const at::Tensor& backward_values,
    const at::Tensor& precedence_indices, const at::Tensor& precedence_values, const at::Tensor& write_indices,
    const at::Tensor& write_weights, const at::Tensor& /*new_forward_values*/, const at::Tensor& new_forward_indices,
    const at::Tensor& /*new_backward_values*/, const at::Tensor& new_backward_indices,
    const at::Tensor& /*new_precedence_values*/, const at::Tensor& new_precedence_indices) {
  check_cuda(forward_values, "forward_values");
  const Shapes s = check_link_update(forward_slots, forward_indices, forward_values, backward_slots, backward_indices,
                                     backward_values, precedence_indices, precedence_values, write_indices,
                                     write_weights);
  for (const auto* t : {&grad_forward_values, &grad_backward_values, &grad_precedence_values, &new_forward_indices,
                        &new_backward_indices, &new_precedence_indices}) {
    check_device(*t, forward_values, "sparse_link_update backward: every input");
  }
  const c10::cuda::CUDAGuard guard(forward_values.device());
  const LinkInputs in = link_inputs(s, forward_slots, forward_indices, forward_values, backward_slots,
                                    backward_indices, backward_values, precedence_indices, precedence_values,
                                    write_indices, write_weights);
  const auto dtype = forward_values.scalar_type();
  const auto new_fi = new_forward_indices.contiguous(), new_gi = new_backward_indices.contiguous();
  const auto new_pi = new_precedence_indices.contiguous();
  const auto grad_new_fv = grad_forward_values.contiguous().to(dtype);
  const auto grad_new_gv = grad_backward_values.contiguous().to(dtype);
  const auto grad_new_pv = grad_precedence_values.contiguous().to(dtype);
  auto grad_fv = at::zeros_like(in.forward_values), grad_gv = at::zeros_like(in.backward_values);
  auto grad_pv = at::zeros_like(in.precedence_values), grad_ww = at::zeros_like(in.write_weights);
  const int64_t entries = s.B * (s.F + s.G + 1) * s.K_L;
  if (entries == 0) return {grad_fv, grad_gv, grad_pv, grad_ww};
  auto grad_w = at::zeros({s.B, s.J}, in.write_sums.options()), grad_p = at::zeros({s.B, s.K_L}, grad_w.options());
  auto grad_total = at::zeros({s.B}, grad_w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_link_update_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    link_update_backward_kernel<scalar_t, acc_t><<<blocks_for(entries, kThreads), kThreads, 0, stream()>>>(
        in.args<scalar_t, acc_t>(), s, new_fi.data_ptr<int64_t>(), new_gi.data_ptr<int64_t>(),
        new_pi.data_ptr<int64_t>(), grad_new_fv.data_ptr<scalar_t>(), grad_new_gv.data_ptr<scalar_t>(),
        grad_new_pv.data_ptr<scalar_t>(), grad_fv.data_ptr<scalar_t>(), grad_gv.data_ptr<scalar_t>(),
        grad_w.data_ptr<acc_t>(), grad_p.data_ptr<acc_t>(), grad_total.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    link_update_grads_kernel<scalar_t, acc_t><<<blocks_for(s.B * (s.J + s.K_L), kThreads), kThreads, 0, stream()>>>(
        in.write_indices.data_ptr<int64_t>(), grad_w.data_ptr<acc_t>(), grad_p.data_ptr<acc_t>(),
        grad_total.data_ptr<acc_t>(), grad_ww.data_ptr<scalar_t>(), grad_pv.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_fv, grad_gv, grad_pv, grad_ww};
}

template <typename scalar_t, typename acc_t>
__global__ void temporal_reads_kernel(const scalar_t* __restrict__ read_weights,
                                      const int64_t* __restrict__ forward_indices,
                                      const scalar_t* __restrict__ forward_values,
                                      const int64_t* __restrict__ backward_indices,
                                      const scalar_t* __restrict__ backward_values, acc_t* __restrict__ sums,
                                      scalar_t* __restrict__ forward_weights, int64_t* __restrict__ forward_slots,
                                      scalar_t* __restrict__ backward_weights, int64_t* __restrict__ backward_slots,
                                      int64_t heads, int64_t Q, int64_t K_L, int64_t k) {
  // Block (head, store): store 0 reads f = L w through the backward store (column q of L is row q
  // of L^T), store 1 b = L^T w through the forward store. The E = Q * K_L contributions w_q v_ql
  // are summed per slot at the slot's first place (in place order: the C++ kernel's order), into
  // the scratch sums [2][heads][E] (0 elsewhere); then each valid sum is ranked against the others.
  __shared__ int valid_count;
  const int64_t head = blockIdx.x, store = blockIdx.y, E = Q * K_L;
  const int64_t* slots = (store == 0 ? backward_indices : forward_indices) + head * E;
  const scalar_t* values = (store == 0 ? backward_values : forward_values) + head * E;
  const scalar_t* w = read_weights + head * Q;
  acc_t* sum = sums + (store * heads + head) * E;
  scalar_t* out_weights = (store == 0 ? forward_weights : backward_weights) + head * k;
  int64_t* out_slots = (store == 0 ? forward_slots : backward_slots) + head * k;
  if (threadIdx.x == 0) valid_count = 0;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    acc_t total = 0;
    const int64_t slot = slots[e];
    if (slot >= 0 && find_slot(slots, e, slot) < 0) {
      total = rounded<scalar_t>(mul_rn(acc_t(w[e / K_L]), acc_t(values[e])));
      for (int64_t f = e + 1; f < E; ++f) {
        if (slots[f] == slot) {
          total = rounded<scalar_t>(add_rn(total, rounded<scalar_t>(mul_rn(acc_t(w[f / K_L]), acc_t(values[f])))));
        }
      }
      if (total > acc_t(0)) atomicAdd(&valid_count, 1);
    }
    sum[e] = total;  // > 0 only at the first place of a slot with a positive sum: the valid ones
  }
  __syncthreads();  // also orders the global scratch writes before the reads below (one block)
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    if (!(sum[e] > acc_t(0))) continue;
    int64_t rank = 0;
    for (int64_t f = 0; f < E && rank < k; ++f) {
      if (f != e && sum[f] > acc_t(0) && ranks_before(sum[f], slots[f], f, sum[e], slots[e], e)) ++rank;
    }
    if (rank < k) {
      out_weights[rank] = scalar_t(sum[e]);
      out_slots[rank] = slots[e];
    }
  }
  for (int64_t j = min(int64_t(valid_count), k) + threadIdx.x; j < k; j += blockDim.x) {
    out_weights[j] = scalar_t(0);
    out_slots[j] = -1;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void temporal_reads_backward_kernel(
    const scalar_t* __restrict__ read_weights, const int64_t* __restrict__ forward_indices,
    const scalar_t* __restrict__ forward_values, const int64_t* __restrict__ backward_indices,
    const scalar_t* __restrict__ backward_values, const int64_t* __restrict__ forward_slots,
    const int64_t* __restrict__ backward_slots, const scalar_t* __restrict__ grad_forward,
    const scalar_t* __restrict__ grad_backward, scalar_t* __restrict__ grad_read_weights,
    scalar_t* __restrict__ grad_forward_values, scalar_t* __restrict__ grad_backward_values, int64_t heads, int64_t Q,
    int64_t K_L, int64_t k) {
  // One thread per (head, q): a contribution w_q v_ql at a kept output slot with grad g gets g w_q
  // into v_ql and g v_ql into w_q; a slot not kept gets nothing.
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < heads * Q;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t head = index / Q;
    const acc_t w = read_weights[index];
    acc_t grad_w = 0;
    for (int store = 0; store < 2; ++store) {
      const int64_t* slots = store == 0 ? backward_indices : forward_indices;
      const scalar_t* values = store == 0 ? backward_values : forward_values;
      const int64_t* kept = (store == 0 ? forward_slots : backward_slots) + head * k;
      const scalar_t* grad = (store == 0 ? grad_forward : grad_backward) + head * k;
      scalar_t* grad_values = store == 0 ? grad_backward_values : grad_forward_values;
      for (int64_t l = 0; l < K_L; ++l) {
        const int64_t e = index * K_L + l;
        const int64_t m = find_slot(kept, k, slots[e]);
        const acc_t g = m < 0 ? acc_t(0) : acc_t(grad[m]);
        grad_values[e] = scalar_t(g * w);
        grad_w += g * acc_t(values[e]);
      }
    }
    grad_read_weights[index] = scalar_t(grad_w);
  }
}

void check_temporal_reads(const at::Tensor& read_weights, const at::Tensor& forward_indices,
                          const at::Tensor& forward_values, const at::Tensor& backward_indices,
                          const at::Tensor& backward_values, int64_t k) {
  TORCH_CHECK(read_weights.dim() == 3 && forward_indices.dim() == 4 &&
                  forward_values.sizes() == forward_indices.sizes() &&
                  backward_indices.sizes() == forward_indices.sizes() &&
                  backward_values.sizes() == forward_indices.sizes() &&
                  forward_indices.size(0) == read_weights.size(0) && forward_indices.size(1) == read_weights.size(1) &&
                  forward_indices.size(2) == read_weights.size(2),
              "sparse_temporal_reads: read_weights [B, R, Q], link rows [B, R, Q, K_L]");
  TORCH_CHECK(k >= 1, "sparse_temporal_reads: k must be positive");
  TORCH_CHECK(forward_indices.scalar_type() == at::kLong && backward_indices.scalar_type() == at::kLong,
              "sparse_temporal_reads: link indices must be int64");
  TORCH_CHECK(forward_values.scalar_type() == read_weights.scalar_type() &&
                  backward_values.scalar_type() == read_weights.scalar_type(),
              "sparse_temporal_reads: read weights and link values must share a dtype");
  check_cuda(read_weights, "read_weights");
  for (const auto* t : {&forward_indices, &forward_values, &backward_indices, &backward_values}) {
    check_device(*t, read_weights, "sparse_temporal_reads: every input");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_temporal_reads_cuda(
    const at::Tensor& read_weights_in, const at::Tensor& forward_indices_in, const at::Tensor& forward_values_in,
    const at::Tensor& backward_indices_in, const at::Tensor& backward_values_in, int64_t k) {
  check_temporal_reads(read_weights_in, forward_indices_in, forward_values_in, backward_indices_in,
                       backward_values_in, k);
  const c10::cuda::CUDAGuard guard(read_weights_in.device());
  const auto read_weights = read_weights_in.contiguous();
  const auto forward_indices = forward_indices_in.contiguous(), forward_values = forward_values_in.contiguous();
  const auto backward_indices = backward_indices_in.contiguous(), backward_values = backward_values_in.contiguous();
  const int64_t B = read_weights.size(0), R = read_weights.size(1), Q = read_weights.size(2);
  const int64_t K_L = forward_indices.size(3), heads = B * R;
  auto forward_weights = at::empty({B, R, k}, read_weights.options());
  auto forward_slots = at::empty({B, R, k}, forward_indices.options());
  auto backward_weights = at::empty_like(forward_weights), backward_slots = at::empty_like(forward_slots);
  if (heads == 0) return {forward_weights, forward_slots, backward_weights, backward_slots};
  auto sums = at::empty({2, heads, Q * K_L}, read_weights.options().dtype(accumulator(read_weights.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, read_weights.scalar_type(), "sparse_temporal_reads_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    temporal_reads_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned int>(heads), 2), kThreads, 0, stream()>>>(
        read_weights.data_ptr<scalar_t>(), forward_indices.data_ptr<int64_t>(), forward_values.data_ptr<scalar_t>(),
        backward_indices.data_ptr<int64_t>(), backward_values.data_ptr<scalar_t>(), sums.data_ptr<acc_t>(),
        forward_weights.data_ptr<scalar_t>(), forward_slots.data_ptr<int64_t>(), backward_weights.data_ptr<scalar_t>(),
        backward_slots.data_ptr<int64_t>(), heads, Q, K_L, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {forward_weights, forward_slots, backward_weights, backward_slots};
}

std::vector<at::Tensor> sparse_temporal_reads_backward_cuda(
    const at::Tensor& grad_forward_weights, const c10::optional<at::Tensor>& /*grad_forward_slots*/,
    const at::Tensor& grad_backward_weights, const c10::optional<at::Tensor>& /*grad_backward_slots*/,
    const at::Tensor& read_weights_in, const at::Tensor& forward_indices_in, const at::Tensor& forward_values_in,
    const at::Tensor& backward_indices_in, const at::Tensor& backward_values_in, int64_t k,
    const at::Tensor& /*forward_weights*/, const at::Tensor& forward_slots_in, const at::Tensor& /*backward_weights*/,
    const at::Tensor& backward_slots_in) {
  check_temporal_reads(read_weights_in, forward_indices_in, forward_values_in, backward_indices_in,
                       backward_values_in, k);
  for (const auto* t : {&grad_forward_weights, &grad_backward_weights, &forward_slots_in, &backward_slots_in}) {
    check_device(*t, read_weights_in, "sparse_temporal_reads backward: every input");
  }
  const c10::cuda::CUDAGuard guard(read_weights_in.device());
  const auto dtype = read_weights_in.scalar_type();
  const auto read_weights = read_weights_in.contiguous();
  const auto forward_indices = forward_indices_in.contiguous(), forward_values = forward_values_in.contiguous();
  const auto backward_indices = backward_indices_in.contiguous(), backward_values = backward_values_in.contiguous();
  const auto forward_slots = forward_slots_in.contiguous(), backward_slots = backward_slots_in.contiguous();
  const auto grad_forward = grad_forward_weights.contiguous().to(dtype);
  const auto grad_backward = grad_backward_weights.contiguous().to(dtype);
  const int64_t B = read_weights.size(0), R = read_weights.size(1), Q = read_weights.size(2);
  const int64_t K_L = forward_indices.size(3), heads = B * R;
  auto grad_read_weights = at::zeros_like(read_weights);  // K_L = 0 leaves it 0
  auto grad_forward_values = at::empty_like(forward_values), grad_backward_values = at::empty_like(backward_values);
  if (heads * Q == 0) return {grad_read_weights, grad_forward_values, grad_backward_values};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_temporal_reads_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    temporal_reads_backward_kernel<scalar_t, acc_t><<<blocks_for(heads * Q, kThreads), kThreads, 0, stream()>>>(
        read_weights.data_ptr<scalar_t>(), forward_indices.data_ptr<int64_t>(), forward_values.data_ptr<scalar_t>(),
        backward_indices.data_ptr<int64_t>(), backward_values.data_ptr<scalar_t>(), forward_slots.data_ptr<int64_t>(),
        backward_slots.data_ptr<int64_t>(), grad_forward.data_ptr<scalar_t>(), grad_backward.data_ptr<scalar_t>(),
        grad_read_weights.data_ptr<scalar_t>(), grad_forward_values.data_ptr<scalar_t>(),
        grad_backward_values.data_ptr<scalar_t>(), heads, Q, K_L, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_read_weights, grad_forward_values, grad_backward_values};
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_sparse_link_update", &sparse_link_update_cuda);
  m.impl("ext_sparse_link_update_backward", &sparse_link_update_backward_cuda);
  m.impl("ext_sparse_temporal_reads", &sparse_temporal_reads_cuda);
  m.impl("ext_sparse_temporal_reads_backward", &sparse_temporal_reads_backward_cuda);
}

}  // namespace sparse_links_kernels
}  // namespace cuda
}  // namespace sparsemem
