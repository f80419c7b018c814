// SDNC's sparse temporal links on gathered rows, on the CPU: sparse_link_update and
// sparse_temporal_reads of sparsemem/reference/sdnc.py (the contract is in ops/sparse_links.py).
//
// A link row is K_L (slot, value) pairs, slot -1 for an empty place. A task (a batch row for the
// update, a head for the reads) builds each row's candidates in a small buffer, sums equal slots
// in their original order (a hash table of slots, SlotMap), and keeps the top by (value desc, slot
// asc) of the valid ones (slot >= 0, value > 0), padding with (-1, 0): the order of the reference's _top.
//
// Rounding: every elementwise step is rounded to the input dtype as the reference's torch ops
// round it, so the bf16 results (and the ties they make) are the reference's; the backward
// accumulates in acc_t.
//
// Backward: each kept output entry is either an entry of its input row (the same slot) or a new
// one (a precedence slot, a written slot, or a sum of read contributions); the output slots say
// which, so the backward needs no record of the forward's choices: it walks the outputs and sends
// each grad to the terms of that entry's value.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "sparse_links.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

template <typename acc_t>
struct Entry {
  acc_t value;
  int64_t slot;
};

// x rounded to the op dtype, as a torch op in that dtype would leave it.
template <typename scalar_t, typename acc_t>
inline acc_t rounded(acc_t x) {
  return acc_t(scalar_t(x));
}

// Writes the k best valid entries to values/slots [k], best first, then (0, -1); best is scratch
// space (a task's own, reused from row to row). Each entry is inserted into the best so far: most
// lose to the k-th best at once (a link row has K_L to 2 K_L candidates, a read head a few dozen).
template <typename scalar_t, typename acc_t>
void write_top(const std::vector<Entry<acc_t>>& entries, int64_t k, std::vector<Entry<acc_t>>& best, scalar_t* values,
               int64_t* slots) {
  const auto better = [](const Entry<acc_t>& a, const Entry<acc_t>& b) {
    return a.value > b.value || (a.value == b.value && a.slot < b.slot);
  };
  if (k <= 0) return;  // K_L = 0: no places (and no k-th best to compare with)
  best.clear();
  for (const Entry<acc_t>& entry : entries) {
    if (entry.slot < 0 || !(entry.value > acc_t(0))) continue;
    if (int64_t(best.size()) == k && !better(entry, best.back())) continue;
    if (int64_t(best.size()) < k) best.push_back(entry);
    size_t at = best.size() - 1;
    for (; at > 0 && better(entry, best[at - 1]); --at) best[at] = best[at - 1];
    best[at] = entry;
  }
  for (int64_t j = 0; j < k; ++j) {
    values[j] = j < int64_t(best.size()) ? scalar_t(best[j].value) : scalar_t(0);
    slots[j] = j < int64_t(best.size()) ? best[j].slot : -1;
  }
}

// Slot -> position for the few hundred distinct slots of one task: open addressing in a table of
// at least twice the slots, so a lookup is a probe or two where a binary search or a sort took
// most of these kernels (a step's rows are small, but each entry looks up several slots).
class SlotMap {
 public:
  explicit SlotMap(size_t count) {
    while ((size_t(1) << (64 - shift_)) < 2 * count) --shift_;
    keys_.assign(size_t(1) << (64 - shift_), -1);
    positions_.assign(keys_.size(), -1);
  }

  // The position stored for slot >= 0 (-1 when none yet), as a reference to set it.
  int64_t& operator[](int64_t slot) {
    const size_t place = probe(slot);
    keys_[place] = slot;
    return positions_[place];
  }

  // The position of slot, or -1 (slot -1 is never found).
  int64_t find(int64_t slot) const { return slot < 0 ? -1 : positions_[probe(slot)]; }

 private:
  // slot's place, or the empty place where it would go.
  size_t probe(int64_t slot) const {
    const size_t mask = keys_.size() - 1;
    size_t place = (uint64_t(slot) * 0x9E3779B97F4A7C15ull) >> shift_;
    while (keys_[place] >= 0 && keys_[place] != slot) place = (place + 1) & mask;
    return place;
  }

  int shift_ = 60;  // 16 places at least; the hash's top 64 - shift_ bits pick a place
  std::vector<int64_t> keys_, positions_;
};

// Sums entries of equal slot, each slot's values in their original order (as scatter_add adds
// them), slot -1 dropped; the distinct slots stay in the order they first appear. sums: an empty
// SlotMap made for at least entries.size() slots; it ends holding each distinct slot's place.
template <typename scalar_t, typename acc_t>
void sum_equal_slots(std::vector<Entry<acc_t>>& entries, SlotMap& sums) {
  size_t out = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry<acc_t> entry = entries[i];
    if (entry.slot < 0) continue;
    int64_t& at = sums[entry.slot];
    if (at >= 0) {
      entries[at].value = rounded<scalar_t>(entries[at].value + entry.value);
    } else {
      at = int64_t(out);
      entries[out++] = entry;  // out <= i: only entries already read are overwritten
    }
  }
  entries.resize(out);
}

// Position of `slot` among slots[0..n), or -1 (slot -1 is never found).
inline int64_t find(const int64_t* slots, int64_t n, int64_t slot) {
  if (slot < 0) return -1;
  for (int64_t j = 0; j < n; ++j) {
    if (slots[j] == slot) return j;
  }
  return -1;
}

// The write weights of one batch row summed per slot: w(s), and sum_j w_j over valid entries.
template <typename scalar_t, typename acc_t>
struct Writes {
  std::vector<Entry<acc_t>> slots;  // distinct written slots with summed weights
  SlotMap positions;                // slot -> its place in slots
  acc_t total = 0;

  Writes(const int64_t* indices, const scalar_t* weights, int64_t J) : positions(J) {
    acc_t sum = 0;
    for (int64_t j = 0; j < J; ++j) {
      if (indices[j] < 0) continue;
      slots.push_back({acc_t(weights[j]), indices[j]});
      sum += acc_t(weights[j]);
    }
    total = rounded<scalar_t>(sum);
    sum_equal_slots<scalar_t>(slots, positions);
  }

  // Position of slot in `slots`, or -1.
  int64_t position(int64_t slot) const { return positions.find(slot); }

  acc_t weight(int64_t slot) const {
    const int64_t j = position(slot);
    return j < 0 ? acc_t(0) : slots[j].value;
  }
};

// One entry (row i, column j) of L after a write, the same expression on both stores so both get
// equal bits: v (1 - w_i - w_j) + w_i p_j.
template <typename scalar_t, typename acc_t>
inline acc_t link_entry(acc_t value, acc_t w_row, acc_t w_column, acc_t p_column) {
  const acc_t keep = rounded<scalar_t>(rounded<scalar_t>(acc_t(1) - w_row) - w_column);
  return rounded<scalar_t>(rounded<scalar_t>(value * keep) + rounded<scalar_t>(w_row * p_column));
}

// The row of each slot among gathered rows, for the mutual cut (-1: not gathered).
SlotMap rows_of(const int64_t* slots, int64_t n) {
  SlotMap rows(n);
  for (int64_t r = n - 1; r >= 0; --r) {  // the first row of a slot wins
    if (slots[r] >= 0) rows[slots[r]] = r;
  }
  return rows;
}

struct LinkShapes {
  int64_t B, F, G, K_L, J;
};

LinkShapes check_link_update(const at::Tensor& forward_slots, const at::Tensor& forward_indices,
                             const at::Tensor& forward_values, const at::Tensor& backward_slots,
                             const at::Tensor& backward_indices, const at::Tensor& backward_values,
                             const at::Tensor& precedence_indices, const at::Tensor& precedence_values,
                             const at::Tensor& write_indices, const at::Tensor& write_weights) {
  TORCH_CHECK(forward_slots.dim() == 2 && forward_indices.dim() == 3 && backward_slots.dim() == 2 &&
                  backward_indices.dim() == 3 && precedence_indices.dim() == 2 && write_indices.dim() == 2,
              "sparse_link_update: forward rows [B, F, K_L], backward rows [B, G, K_L], precedence [B, K_L], "
              "writes [B, J]");
  const LinkShapes s{forward_indices.size(0), forward_indices.size(1), backward_indices.size(1),
                     forward_indices.size(2), write_indices.size(1)};
  TORCH_CHECK(forward_values.sizes() == forward_indices.sizes() && forward_slots.size(1) == s.F &&
                  backward_values.sizes() == backward_indices.sizes() && backward_slots.size(1) == s.G &&
                  backward_indices.size(2) == s.K_L && precedence_indices.size(1) == s.K_L &&
                  precedence_values.sizes() == precedence_indices.sizes() &&
                  write_weights.sizes() == write_indices.sizes(),
              "sparse_link_update: inconsistent shapes");
  for (const auto* t : {&forward_slots, &forward_indices, &backward_slots, &backward_indices, &precedence_indices,
                        &write_indices}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->size(0) == s.B, "sparse_link_update: slots must be int64 [B, ...]");
  }
  for (const auto* t : {&backward_values, &precedence_values, &write_weights}) {
    TORCH_CHECK(t->scalar_type() == forward_values.scalar_type() && t->size(0) == s.B,
                "sparse_link_update: values must share a dtype");
  }
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_sparse_link_update(
    const at::Tensor& forward_slots_in, const at::Tensor& forward_indices_in, const at::Tensor& forward_values_in,
    const at::Tensor& backward_slots_in, const at::Tensor& backward_indices_in, const at::Tensor& backward_values_in,
    const at::Tensor& precedence_indices_in, const at::Tensor& precedence_values_in,
    const at::Tensor& write_indices_in, const at::Tensor& write_weights_in) {
  const auto [B, F, G, K_L, J] =
      check_link_update(forward_slots_in, forward_indices_in, forward_values_in, backward_slots_in,
                        backward_indices_in, backward_values_in, precedence_indices_in, precedence_values_in,
                        write_indices_in, write_weights_in);
  const auto forward_slots = forward_slots_in.contiguous(), forward_indices = forward_indices_in.contiguous();
  const auto forward_values = forward_values_in.contiguous(), backward_slots = backward_slots_in.contiguous();
  const auto backward_indices = backward_indices_in.contiguous();
  const auto backward_values = backward_values_in.contiguous();
  const auto precedence_indices = precedence_indices_in.contiguous();
  const auto precedence_values = precedence_values_in.contiguous();
  const auto write_indices = write_indices_in.contiguous(), write_weights = write_weights_in.contiguous();
  auto new_forward_values = at::empty_like(forward_values), new_forward_indices = at::empty_like(forward_indices);
  auto new_backward_values = at::empty_like(backward_values);
  auto new_backward_indices = at::empty_like(backward_indices);
  auto new_precedence_values = at::empty_like(precedence_values);
  auto new_precedence_indices = at::empty_like(precedence_indices);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, forward_values.scalar_type(), "ext_sparse_link_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, B, grain(16 * (F + G + 1) * K_L + J), [&](int64_t begin, int64_t end) {
      std::vector<Entry<acc_t>> candidates, best;
      std::vector<uint8_t> kept_forward(F * K_L), kept_backward(G * K_L);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* fs = forward_slots.data_ptr<int64_t>() + b * F;
        const int64_t* fi = forward_indices.data_ptr<int64_t>() + b * F * K_L;
        const scalar_t* fv = forward_values.data_ptr<scalar_t>() + b * F * K_L;
        const int64_t* gs = backward_slots.data_ptr<int64_t>() + b * G;
        const int64_t* gi = backward_indices.data_ptr<int64_t>() + b * G * K_L;
        const scalar_t* gv = backward_values.data_ptr<scalar_t>() + b * G * K_L;
        const int64_t* pi = precedence_indices.data_ptr<int64_t>() + b * K_L;
        const scalar_t* pv = precedence_values.data_ptr<scalar_t>() + b * K_L;
        int64_t* out_fi = new_forward_indices.data_ptr<int64_t>() + b * F * K_L;
        scalar_t* out_fv = new_forward_values.data_ptr<scalar_t>() + b * F * K_L;
        int64_t* out_gi = new_backward_indices.data_ptr<int64_t>() + b * G * K_L;
        scalar_t* out_gv = new_backward_values.data_ptr<scalar_t>() + b * G * K_L;
        const Writes<scalar_t, acc_t> writes(write_indices.data_ptr<int64_t>() + b * J,
                                             write_weights.data_ptr<scalar_t>() + b * J, J);
        const auto p = [&](int64_t slot) {
          const int64_t l = find(pi, K_L, slot);
          return l < 0 ? acc_t(0) : acc_t(pv[l]);
        };
        // Forward row i: its entries j updated, plus w_i p_j at precedence slots j not stored, j != i.
        for (int64_t f = 0; f < F; ++f) {
          const int64_t i = fs[f];
          const acc_t w_i = writes.weight(i);
          candidates.clear();
          for (int64_t l = 0; l < K_L; ++l) {
            const int64_t j = fi[f * K_L + l];
            candidates.push_back({link_entry<scalar_t>(acc_t(fv[f * K_L + l]), w_i, writes.weight(j), p(j)), j});
          }
          for (int64_t l = 0; l < K_L; ++l) {
            const int64_t j = pi[l];
            if (j >= 0 && j != i && find(fi + f * K_L, K_L, j) < 0) {
              candidates.push_back({rounded<scalar_t>(w_i * acc_t(pv[l])), j});
            }
          }
          write_top(candidates, K_L, best, out_fv + f * K_L, out_fi + f * K_L);
        }
        // Backward row j (column j of L): its entries i updated, plus w_i p_j at written slots i not stored, i != j.
        for (int64_t g = 0; g < G; ++g) {
          const int64_t j = gs[g];
          const acc_t w_j = writes.weight(j), p_j = p(j);
          candidates.clear();
          for (int64_t l = 0; l < K_L; ++l) {
            const int64_t i = gi[g * K_L + l];
            candidates.push_back({link_entry<scalar_t>(acc_t(gv[g * K_L + l]), writes.weight(i), w_j, p_j), i});
          }
          // w_i p_j is 0 (or NaN: never > 0 either) unless p_j is: write_top would drop every one.
          // Only the K_L precedence slots have p_j != 0, so most rows skip the J written slots.
          for (const auto& written : writes.slots) {
            if (p_j == acc_t(0)) break;
            if (written.slot != j && find(gi + g * K_L, K_L, written.slot) < 0) {
              candidates.push_back({rounded<scalar_t>(written.value * p_j), written.slot});
            }
          }
          write_top(candidates, K_L, best, out_gv + g * K_L, out_gi + g * K_L);
        }
        // Mutual cut: an entry stays if the other store's row of its slot (when gathered; a row not
        // gathered did not change, so it holds at most K_L) has it among its top K_L.
        const SlotMap backward_rows = rows_of(gs, G), forward_rows = rows_of(fs, F);
        const auto passes = [&](int64_t slot, int64_t other, const SlotMap& rows, const int64_t* tops) {
          const int64_t r = rows.find(other);
          return r < 0 || find(tops + r * K_L, K_L, slot) >= 0;
        };
        for (int64_t e = 0; e < F * K_L; ++e) kept_forward[e] = passes(fs[e / K_L], out_fi[e], backward_rows, out_gi);
        for (int64_t e = 0; e < G * K_L; ++e) kept_backward[e] = passes(gs[e / K_L], out_gi[e], forward_rows, out_fi);
        const auto compact = [&](int64_t rows, const std::vector<uint8_t>& kept, scalar_t* values, int64_t* slots) {
          for (int64_t r = 0; r < rows; ++r) {
            int64_t out = r * K_L;
            for (int64_t e = r * K_L; e < (r + 1) * K_L; ++e) {
              if (kept[e] && slots[e] >= 0) {
                values[out] = values[e];
                slots[out++] = slots[e];
              }
            }
            for (; out < (r + 1) * K_L; ++out) {
              values[out] = scalar_t(0);
              slots[out] = -1;
            }
          }
        };
        compact(F, kept_forward, out_fv, out_fi);
        compact(G, kept_backward, out_gv, out_gi);
        // Precedence: (1 - sum w) p + w on its slots, plus w at written slots not in it.
        candidates.clear();
        const acc_t retain = rounded<scalar_t>(acc_t(1) - writes.total);
        for (int64_t l = 0; l < K_L; ++l) {
          const acc_t decayed = rounded<scalar_t>(retain * acc_t(pv[l]));
          candidates.push_back({rounded<scalar_t>(decayed + writes.weight(pi[l])), pi[l]});
        }
        for (const auto& written : writes.slots) {
          if (find(pi, K_L, written.slot) < 0) candidates.push_back(written);
        }
        write_top(candidates, K_L, best, new_precedence_values.data_ptr<scalar_t>() + b * K_L,
                  new_precedence_indices.data_ptr<int64_t>() + b * K_L);
      }
    });
  });
  return {new_forward_values, new_forward_indices,    new_backward_values,
          new_backward_indices, new_precedence_values, new_precedence_indices};
}

// With v the stored value, w_i, w_j the written weights of the row and column slots and p_j the
// precedence of the column: an updated entry v (1 - w_i - w_j) + w_i p_j sends g (1 - w_i - w_j) to v,
// g (p_j - v) to w_i, -g v to w_j and g w_i to p_j; a new entry w_i p_j sends g p_j and g w_i. The
// precedence (1 - sum w) p_l + w(s_l) sends g (1 - sum w) to p_l, -g p_l to every valid write weight
// and g to w(s_l); a new one w(s) sends g to w(s). w(s) is the sum of the write weights at slot s.
std::vector<at::Tensor> ext_sparse_link_update_backward(
    const at::Tensor& grad_forward_values_in, const std::optional<at::Tensor>& /*grad_forward_indices*/,
    const at::Tensor& grad_backward_values_in, const std::optional<at::Tensor>& /*grad_backward_indices*/,
    const at::Tensor& grad_precedence_values_in, const std::optional<at::Tensor>& /*grad_precedence_indices*/,
    const at::Tensor& forward_slots_in, const at::Tensor& forward_indices_in, const at::Tensor& forward_values_in,
    const at::Tensor& backward_slots_in, const at::Tensor& backward_indices_in, const at::Tensor& backward_values_in,
    const at::Tensor& precedence_indices_in, const at::Tensor& precedence_values_in,
    const at::Tensor& write_indices_in, const at::Tensor& write_weights_in, const at::Tensor& /*new_forward_values*/,
    const at::Tensor& new_forward_indices_in, const at::Tensor& /*new_backward_values*/,
    const at::Tensor& new_backward_indices_in, const at::Tensor& /*new_precedence_values*/,
    const at::Tensor& new_precedence_indices_in) {
  const auto [B, F, G, K_L, J] =
      check_link_update(forward_slots_in, forward_indices_in, forward_values_in, backward_slots_in,
                        backward_indices_in, backward_values_in, precedence_indices_in, precedence_values_in,
                        write_indices_in, write_weights_in);
  const auto forward_slots = forward_slots_in.contiguous(), forward_indices = forward_indices_in.contiguous();
  const auto forward_values = forward_values_in.contiguous(), backward_slots = backward_slots_in.contiguous();
  const auto backward_indices = backward_indices_in.contiguous();
  const auto backward_values = backward_values_in.contiguous();
  const auto precedence_indices = precedence_indices_in.contiguous();
  const auto precedence_values = precedence_values_in.contiguous();
  const auto write_indices = write_indices_in.contiguous(), write_weights = write_weights_in.contiguous();
  const auto new_forward_indices = new_forward_indices_in.contiguous();
  const auto new_backward_indices = new_backward_indices_in.contiguous();
  const auto new_precedence_indices = new_precedence_indices_in.contiguous();
  const auto grad_forward_values = grad_forward_values_in.contiguous();
  const auto grad_backward_values = grad_backward_values_in.contiguous();
  const auto grad_precedence_values = grad_precedence_values_in.contiguous();
  auto grad_fv = at::zeros_like(forward_values), grad_gv = at::zeros_like(backward_values);
  auto grad_pv = at::empty_like(precedence_values), grad_ww = at::empty_like(write_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, forward_values.scalar_type(), "ext_sparse_link_update_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, B, grain(16 * (F + G + 1) * K_L + J), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> grad_w, grad_p(K_L);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* fs = forward_slots.data_ptr<int64_t>() + b * F;
        const int64_t* fi = forward_indices.data_ptr<int64_t>() + b * F * K_L;
        const scalar_t* fv = forward_values.data_ptr<scalar_t>() + b * F * K_L;
        const int64_t* gs = backward_slots.data_ptr<int64_t>() + b * G;
        const int64_t* gi = backward_indices.data_ptr<int64_t>() + b * G * K_L;
        const scalar_t* gv = backward_values.data_ptr<scalar_t>() + b * G * K_L;
        const int64_t* pi = precedence_indices.data_ptr<int64_t>() + b * K_L;
        const scalar_t* pv = precedence_values.data_ptr<scalar_t>() + b * K_L;
        const int64_t* wi = write_indices.data_ptr<int64_t>() + b * J;
        const Writes<scalar_t, acc_t> writes(wi, write_weights.data_ptr<scalar_t>() + b * J, J);
        grad_w.assign(writes.slots.size(), acc_t(0));
        std::fill(grad_p.begin(), grad_p.end(), acc_t(0));
        acc_t grad_total = 0;
        // Grads into w(s) and p(s) land only where s is written, resp. in the precedence.
        const auto add_w = [&](int64_t slot, acc_t grad) {
          const int64_t j = writes.position(slot);
          if (j >= 0) grad_w[j] += grad;
        };
        const auto add_p = [&](int64_t slot, acc_t grad) {
          const int64_t l = find(pi, K_L, slot);
          if (l >= 0) grad_p[l] += grad;
        };
        const auto p = [&](int64_t slot) {
          const int64_t l = find(pi, K_L, slot);
          return l < 0 ? acc_t(0) : acc_t(pv[l]);
        };
        // An entry (row slot i, column slot j) of L with grad g; `stored` its place in the input row or -1.
        const auto entry_grad = [&](int64_t i, int64_t j, int64_t stored, const scalar_t* values,
                                    scalar_t* grad_values, acc_t g) {
          const acc_t w_i = writes.weight(i), w_j = writes.weight(j), p_j = p(j);
          if (stored >= 0) {
            const acc_t v = values[stored];
            grad_values[stored] = scalar_t(acc_t(grad_values[stored]) + g * (acc_t(1) - w_i - w_j));
            add_w(i, g * (p_j - v));
            add_w(j, -g * v);
          } else {
            add_w(i, g * p_j);
          }
          add_p(j, g * w_i);
        };
        const int64_t* out_fi = new_forward_indices.data_ptr<int64_t>() + b * F * K_L;
        const scalar_t* g_fv = grad_forward_values.data_ptr<scalar_t>() + b * F * K_L;
        scalar_t* grad_f = grad_fv.data_ptr<scalar_t>() + b * F * K_L;
        for (int64_t f = 0; f < F; ++f) {
          for (int64_t m = 0; m < K_L; ++m) {
            const int64_t j = out_fi[f * K_L + m];
            if (j < 0) continue;
            const int64_t l = find(fi + f * K_L, K_L, j);
            entry_grad(fs[f], j, l < 0 ? -1 : f * K_L + l, fv, grad_f, acc_t(g_fv[f * K_L + m]));
          }
        }
        const int64_t* out_gi = new_backward_indices.data_ptr<int64_t>() + b * G * K_L;
        const scalar_t* g_gv = grad_backward_values.data_ptr<scalar_t>() + b * G * K_L;
        scalar_t* grad_g = grad_gv.data_ptr<scalar_t>() + b * G * K_L;
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t m = 0; m < K_L; ++m) {
            const int64_t i = out_gi[g * K_L + m];
            if (i < 0) continue;
            const int64_t l = find(gi + g * K_L, K_L, i);
            entry_grad(i, gs[g], l < 0 ? -1 : g * K_L + l, gv, grad_g, acc_t(g_gv[g * K_L + m]));
          }
        }
        const int64_t* out_pi = new_precedence_indices.data_ptr<int64_t>() + b * K_L;
        const scalar_t* g_pv = grad_precedence_values.data_ptr<scalar_t>() + b * K_L;
        const acc_t retain = acc_t(1) - writes.total;
        for (int64_t m = 0; m < K_L; ++m) {
          const int64_t s = out_pi[m];
          if (s < 0) continue;
          const acc_t g = g_pv[m];
          const int64_t l = find(pi, K_L, s);
          if (l >= 0) {
            grad_p[l] += g * retain;
            grad_total -= g * acc_t(pv[l]);
          }
          add_w(s, g);
        }
        scalar_t* out_pv = grad_pv.data_ptr<scalar_t>() + b * K_L;
        for (int64_t l = 0; l < K_L; ++l) out_pv[l] = scalar_t(grad_p[l]);
        scalar_t* out_ww = grad_ww.data_ptr<scalar_t>() + b * J;
        for (int64_t j = 0; j < J; ++j) {
          out_ww[j] = wi[j] < 0 ? scalar_t(0) : scalar_t(grad_w[writes.position(wi[j])] + grad_total);
        }
      }
    });
  });
  return {grad_fv, grad_gv, grad_pv, grad_ww};
}

// f = L w^R through the backward store (column q of L is row q of L^T), b = L^T w^R through the
// forward store: per head, the Q * K_L contributions w_q v_ql summed per slot, then the top K.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_sparse_temporal_reads(
    const at::Tensor& read_weights_in, const at::Tensor& forward_indices_in, const at::Tensor& forward_values_in,
    const at::Tensor& backward_indices_in, const at::Tensor& backward_values_in, int64_t k) {
  TORCH_CHECK(read_weights_in.dim() == 3 && forward_indices_in.dim() == 4 &&
                  forward_values_in.sizes() == forward_indices_in.sizes() &&
                  backward_indices_in.sizes() == forward_indices_in.sizes() &&
                  backward_values_in.sizes() == forward_indices_in.sizes(),
              "sparse_temporal_reads: read_weights [B, R, Q], link rows [B, R, Q, K_L]");
  TORCH_CHECK(k >= 1, "sparse_temporal_reads: k must be positive");
  const auto read_weights = read_weights_in.contiguous();
  const auto forward_indices = forward_indices_in.contiguous(), forward_values = forward_values_in.contiguous();
  const auto backward_indices = backward_indices_in.contiguous(), backward_values = backward_values_in.contiguous();
  const int64_t B = read_weights.size(0), R = read_weights.size(1), Q = read_weights.size(2);
  const int64_t K_L = forward_indices.size(3);
  auto forward_weights = at::empty({B, R, k}, read_weights.options());
  auto forward_slots = at::empty({B, R, k}, forward_indices.options());
  auto backward_weights = at::empty_like(forward_weights), backward_slots = at::empty_like(forward_slots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, read_weights.scalar_type(), "ext_sparse_temporal_reads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w = read_weights.data_ptr<scalar_t>();
    at::parallel_for(0, B * R, grain(32 * Q * K_L), [&](int64_t begin, int64_t end) {
      std::vector<Entry<acc_t>> entries, best;
      const auto through = [&](int64_t head, const at::Tensor& indices, const at::Tensor& values, at::Tensor& out_w,
                               at::Tensor& out_s) {
        const int64_t* slots = indices.data_ptr<int64_t>() + head * Q * K_L;
        const scalar_t* v = values.data_ptr<scalar_t>() + head * Q * K_L;
        entries.clear();
        for (int64_t e = 0; e < Q * K_L; ++e) {
          const acc_t contribution = rounded<scalar_t>(acc_t(w[head * Q + e / K_L]) * acc_t(v[e]));
          // An empty place, or a zero that adds nothing to its slot's sum (x + 0 rounds to x) and
          // alone is never kept: dropped before the sort, which is most of a step's entries.
          if (slots[e] < 0 || contribution == acc_t(0)) continue;
          entries.push_back({contribution, slots[e]});
        }
        SlotMap sums(entries.size());
        sum_equal_slots<scalar_t>(entries, sums);
        write_top(entries, k, best, out_w.data_ptr<scalar_t>() + head * k, out_s.data_ptr<int64_t>() + head * k);
      };
      for (int64_t head = begin; head < end; ++head) {
        through(head, backward_indices, backward_values, forward_weights, forward_slots);
        through(head, forward_indices, forward_values, backward_weights, backward_slots);
      }
    });
  });
  return {forward_weights, forward_slots, backward_weights, backward_slots};
}

// A kept output slot s with grad g: every contribution w_q v_ql at slot s gets g w_q into v_ql and
// g v_ql into w_q. Tasks are heads, which own their rows of every grad.
std::vector<at::Tensor> ext_sparse_temporal_reads_backward(
    const at::Tensor& grad_forward_weights_in, const std::optional<at::Tensor>& /*grad_forward_slots*/,
    const at::Tensor& grad_backward_weights_in, const std::optional<at::Tensor>& /*grad_backward_slots*/,
    const at::Tensor& read_weights_in, const at::Tensor& forward_indices_in, const at::Tensor& forward_values_in,
    const at::Tensor& backward_indices_in, const at::Tensor& backward_values_in, int64_t k,
    const at::Tensor& /*forward_weights*/, const at::Tensor& forward_slots_in, const at::Tensor& /*backward_weights*/,
    const at::Tensor& backward_slots_in) {
  const auto read_weights = read_weights_in.contiguous();
  const auto forward_indices = forward_indices_in.contiguous(), forward_values = forward_values_in.contiguous();
  const auto backward_indices = backward_indices_in.contiguous(), backward_values = backward_values_in.contiguous();
  const auto forward_slots = forward_slots_in.contiguous(), backward_slots = backward_slots_in.contiguous();
  const auto grad_forward = grad_forward_weights_in.contiguous();
  const auto grad_backward = grad_backward_weights_in.contiguous();
  const int64_t B = read_weights.size(0), R = read_weights.size(1), Q = read_weights.size(2);
  const int64_t K_L = forward_indices.size(3);
  auto grad_read_weights = at::empty_like(read_weights);
  auto grad_forward_values = at::empty_like(forward_values), grad_backward_values = at::empty_like(backward_values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, read_weights.scalar_type(), "ext_sparse_temporal_reads_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w = read_weights.data_ptr<scalar_t>();
    scalar_t* grad_w = grad_read_weights.data_ptr<scalar_t>();
    at::parallel_for(0, B * R, grain(8 * Q * K_L * k), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> grad_head(Q);
      const auto through = [&](int64_t head, const at::Tensor& indices, const at::Tensor& values,
                               const at::Tensor& kept, const at::Tensor& grad_out, at::Tensor& grad_values) {
        const int64_t* slots = indices.data_ptr<int64_t>() + head * Q * K_L;
        const scalar_t* v = values.data_ptr<scalar_t>() + head * Q * K_L;
        const int64_t* kept_slots = kept.data_ptr<int64_t>() + head * k;
        const scalar_t* g = grad_out.data_ptr<scalar_t>() + head * k;
        scalar_t* grad_v = grad_values.data_ptr<scalar_t>() + head * Q * K_L;
        for (int64_t e = 0; e < Q * K_L; ++e) {
          const int64_t m = find(kept_slots, k, slots[e]);
          const acc_t grad = m < 0 ? acc_t(0) : acc_t(g[m]);
          grad_v[e] = scalar_t(grad * acc_t(w[head * Q + e / K_L]));
          grad_head[e / K_L] += grad * acc_t(v[e]);
        }
      };
      for (int64_t head = begin; head < end; ++head) {
        std::fill(grad_head.begin(), grad_head.end(), acc_t(0));
        through(head, backward_indices, backward_values, forward_slots, grad_forward, grad_backward_values);
        through(head, forward_indices, forward_values, backward_slots, grad_backward, grad_forward_values);
        for (int64_t q = 0; q < Q; ++q) grad_w[head * Q + q] = scalar_t(grad_head[q]);
      }
    });
  });
  return {grad_read_weights, grad_forward_values, grad_backward_values};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def(
      "ext_sparse_link_update(Tensor forward_slots, Tensor forward_indices, Tensor forward_values, "
      "Tensor backward_slots, Tensor backward_indices, Tensor backward_values, Tensor precedence_indices, "
      "Tensor precedence_values, Tensor write_indices, Tensor write_weights) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_sparse_link_update_backward(Tensor grad_forward_values, Tensor? grad_forward_indices, "
      "Tensor grad_backward_values, Tensor? grad_backward_indices, Tensor grad_precedence_values, "
      "Tensor? grad_precedence_indices, Tensor forward_slots, Tensor forward_indices, Tensor forward_values, "
      "Tensor backward_slots, Tensor backward_indices, Tensor backward_values, Tensor precedence_indices, "
      "Tensor precedence_values, Tensor write_indices, Tensor write_weights, Tensor new_forward_values, "
      "Tensor new_forward_indices, Tensor new_backward_values, Tensor new_backward_indices, "
      "Tensor new_precedence_values, Tensor new_precedence_indices) -> Tensor[]");
  m.def(
      "ext_sparse_temporal_reads(Tensor read_weights, Tensor forward_indices, Tensor forward_values, "
      "Tensor backward_indices, Tensor backward_values, SymInt k) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_sparse_temporal_reads_backward(Tensor grad_forward_weights, Tensor? grad_forward_slots, "
      "Tensor grad_backward_weights, Tensor? grad_backward_slots, Tensor read_weights, Tensor forward_indices, "
      "Tensor forward_values, Tensor backward_indices, Tensor backward_values, SymInt k, Tensor forward_weights, "
      "Tensor forward_slots, Tensor backward_weights, Tensor backward_slots) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_sparse_link_update", &ext_sparse_link_update);
  m.impl("ext_sparse_link_update_backward", &ext_sparse_link_update_backward);
  m.impl("ext_sparse_temporal_reads", &ext_sparse_temporal_reads);
  m.impl("ext_sparse_temporal_reads_backward", &ext_sparse_temporal_reads_backward);
}

}  // namespace sparsemem
