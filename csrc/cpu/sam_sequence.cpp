// T steps of a SAM, or of an SDNC, whose controller is an LSTM cell, forward and backward through time,
// in one op (reference/sam.py: sam_sequence_ref, reference/sdnc.py: sdnc_sequence_ref), over a dense
// copy of a small memory (and of an SDNC's link store).
//
// Why: at the sizes most training happens (N <= a few thousand slots) a SAM step run from Python
// is a few hundred small calls (the cell, the interface Linear and its split, the LRU, the write
// through the journal, the index search, the read, their autograd nodes): 2-3 ms a step where the
// arithmetic is well under one. Here a step is the cell's two addmm's and, per batch row, the
// LRU's argmin, the J = R Q + 1 rows written in place, a top-K scan of the rows written so far
// (an unwritten slot holds the zero word: cosine 0), the K rows read per head, and the accessed
// slots stamped; the backward walks the steps in reverse, putting back the rows each step
// overwrote, and the weights' gradients are one matrix product each over all T steps.
// An SDNC's step adds, between the write and the content read, the link update and the temporal
// reads: sparse_links.cpp's kernels on the rows gathered from the dense link store (the rows the
// update can change, and those at the last step's read slots); a head reads Q = 3K places, the
// (backward, content, forward) reads mixed by its read modes.
//
// The memory's state travels as dense tensors: memory [B, N, W], last_access [B, N] int64 (the
// step a slot was last accessed, 0 = never), written [B, N] bool, the read weights (slots and
// weights [B, R, Q]) and the write weights (slots and weights [B, J]); an SDNC's links as
// link_idx, link_w [B, 2N, K_L] (rows of L, then rows of L^T) and the precedence [B, K_L].
// sparsemem.models gathers them from the state and stores back the rows this op wrote.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "lstm_cell.h"
#include "sparse_links.h"
#include "sparse_read.h"
#include "sparse_write.h"
#include "topk.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

constexpr double kDelta = 0.005;  // sparsemem/_constants.py: DELTA, the access threshold

// The interface [B, I]: read keys, read strengths (oneplus), add, write gate alpha and interpolation
// gate gamma (sigmoid) (SAMMemory.split_interface), I = R W + R + W + 2; an SDNC's adds read modes
// (softmax over 3 per head), 3R more (SDNCMemory.split_interface). A head reads Q = width K places.
struct Layout {
  int64_t R, W, K, width, Q, strengths, add, gates, modes, total, J;
  Layout(int64_t R, int64_t W, int64_t K, int64_t width)
      : R(R), W(W), K(K), width(width), Q(width * K), strengths(R * W), add(R * W + R), gates(R * W + R + W),
        modes(R * W + R + W + 2), total(modes + (width == 3 ? 3 * R : 0)), J(R * width * K + 1) {}
  bool links() const { return width == 3; }
};

// The op's inputs, in schema order (the link store's four only for an SDNC).
struct Inputs {
  at::Tensor gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w,
      link_idx, link_w, precedence_idx, precedence_w, weight_rh, weight_if, bias_if, active;
  int64_t clock;

  bool links() const { return link_w.defined(); }
  Layout layout() const {
    const int64_t width = links() ? 3 : 1;
    return Layout(reads.size(1), reads.size(2), read_idx.size(2) / width, width);
  }
  std::vector<at::Tensor*> tensors() {
    std::vector<at::Tensor*> all{&gates_x, &hidden, &cell,      &reads,    &memory, &last_access, &written,
                                 &read_idx, &read_w, &write_idx, &write_w};
    if (links()) all.insert(all.end(), {&link_idx, &link_w, &precedence_idx, &precedence_w});
    all.insert(all.end(), {&weight_rh, &weight_if, &bias_if, &active});
    return all;
  }
};

constexpr size_t kSamInputs = 15, kSdncInputs = 19;

// args: the op's tensors in schema order, 15 for a SAM, 19 for an SDNC.
Inputs inputs_of(at::TensorList args, int64_t clock) {
  TORCH_CHECK(args.size() == kSamInputs || args.size() == kSdncInputs, "sam_sequence: ", args.size(), " tensors");
  Inputs in;
  in.clock = clock;
  if (args.size() == kSdncInputs) in.link_w = args[12];  // in.tensors() lists the links' places
  const auto places = in.tensors();
  for (size_t i = 0; i < args.size(); ++i) *places[i] = args[i];
  return in;
}

Inputs checked(at::TensorList args, int64_t clock) {
  Inputs in = inputs_of(args, clock);
  TORCH_CHECK(in.gates_x.dim() == 3 && in.gates_x.size(0) >= 1 && in.gates_x.size(2) % 4 == 0,
              "gates_x must be [T, B, 4H] with T >= 1; got ", in.gates_x.sizes());
  TORCH_CHECK(in.reads.dim() == 3 && in.memory.dim() == 3 && in.read_idx.dim() == 3,
              "reads must be [B, R, W], memory [B, N, W] and read_idx [B, R, Q]");
  const auto T = in.gates_x.size(0), B = in.gates_x.size(1), H = in.gates_x.size(2) / 4;
  const auto R = in.reads.size(1), W = in.reads.size(2), N = in.memory.size(1);
  const Layout l = in.layout();
  TORCH_CHECK(l.K >= 1 && l.K <= N && in.read_idx.size(2) == l.Q,
              "read_idx must be [B, R, Q] with Q = K (SAM) or 3K (SDNC), 1 <= K <= N=", N, "; got ",
              in.read_idx.sizes());
  const auto expect = [](const at::Tensor& x, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
    TORCH_CHECK(x.sizes() == shape, name, " must be ", shape, "; got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, "; got ", x.scalar_type());
  };
  const auto dtype = in.gates_x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "sam_sequence runs float32 and float64; got ", dtype);
  expect(in.hidden, "hidden", {B, H}, dtype);
  expect(in.cell, "cell", {B, H}, dtype);
  expect(in.reads, "reads", {B, R, W}, dtype);
  expect(in.memory, "memory", {B, N, W}, dtype);
  expect(in.last_access, "last_access", {B, N}, at::kLong);
  expect(in.written, "written", {B, N}, at::kBool);
  expect(in.read_idx, "read_idx", {B, R, l.Q}, at::kLong);
  expect(in.read_w, "read_w", {B, R, l.Q}, dtype);
  expect(in.write_idx, "write_idx", {B, l.J}, at::kLong);
  expect(in.write_w, "write_w", {B, l.J}, dtype);
  expect(in.weight_rh, "weight_rh", {4 * H, R * W + H}, dtype);
  expect(in.weight_if, "weight_if", {l.total, H}, dtype);
  expect(in.bias_if, "bias_if", {l.total}, dtype);
  expect(in.active, "active", {T, B}, at::kBool);
  const auto in_range = [](const at::Tensor& slots, int64_t low, int64_t high) {
    return slots.numel() == 0 || (slots.min().item<int64_t>() >= low && slots.max().item<int64_t>() < high);
  };
  TORCH_CHECK(in_range(in.read_idx, 0, N) && in_range(in.write_idx, 0, N),
              "read_idx and write_idx must be slots in [0, N=", N, ")");
  if (in.links()) {
    const auto K_L = in.link_idx.dim() == 3 ? in.link_idx.size(2) : 0;
    TORCH_CHECK(K_L >= 1, "link_idx must be [B, 2N, K_L] with K_L >= 1; got ", in.link_idx.sizes());
    expect(in.link_idx, "link_idx", {B, 2 * N, K_L}, at::kLong);
    expect(in.link_w, "link_w", {B, 2 * N, K_L}, dtype);
    expect(in.precedence_idx, "precedence_idx", {B, K_L}, at::kLong);
    expect(in.precedence_w, "precedence_w", {B, K_L}, dtype);
    TORCH_CHECK(in_range(in.link_idx, -1, N) && in_range(in.precedence_idx, -1, N),
                "link_idx and precedence_idx must be slots in [0, N=", N, ") or -1");
  }
  for (auto* x : in.tensors()) *x = x->contiguous();
  return in;
}

// What the backward reads, stacked over T: the controller input [r_{t-1} ; h_{t-1}], the squashed
// gates, the cell and its tanh, the interface before and after squashing; per batch row the write's
// J entries (slots, weights, their slot's total), the read weights they were made from, the rows
// the write overwrote, and the new read weights (slots, weights). An SDNC's adds the content reads
// (slots, weights [T, B, R, K]) and per step the links' kLinkTape tensors (LinkStep).
struct Tape {
  at::Tensor inputs, act, cells, tanh_cells, interface, squashed;
  at::Tensor write_idx, write_w, totals, previous_w, old_rows, read_idx, read_w;
  at::Tensor content_idx, content_w;
  std::vector<at::Tensor> links;
};

constexpr int64_t kTapeTensors = 13, kSdncTapeTensors = 2, kLinkTape = 20;

// One step's links on the tape: the update's gathered rows (forward slots, their indices and values;
// the same for the backward rows), the new rows' indices, the write entries it took (-1 in a padded
// row), the precedence before and the new one's indices; the temporal reads' rows at the last read
// slots ([B, R, Q, K_L], forward and backward stores) and their results ([B, R, K] weights, slots).
struct LinkStep {
  at::Tensor fs, fi, fv, gs, gi, gv, new_fi, new_gi, write_idx, precedence_idx, precedence_w, new_precedence_idx;
  at::Tensor ri, rv, bi, bv, forward_w, forward_s, backward_w, backward_s;

  explicit LinkStep(const at::Tensor* s)
      : fs(s[0]), fi(s[1]), fv(s[2]), gs(s[3]), gi(s[4]), gv(s[5]), new_fi(s[6]), new_gi(s[7]), write_idx(s[8]),
        precedence_idx(s[9]), precedence_w(s[10]), new_precedence_idx(s[11]), ri(s[12]), rv(s[13]), bi(s[14]),
        bv(s[15]), forward_w(s[16]), forward_s(s[17]), backward_w(s[18]), backward_s(s[19]) {}
};

// The interface row x squashed into y: keys and add as they are, oneplus strengths, an SDNC's read
// modes' softmax (the gates' sigmoid is torch's, over the whole interface).
template <typename scalar_t>
void squash_row(const Layout& l, const scalar_t* x, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  std::copy_n(x, l.strengths, y);  // keys
  for (int64_t r = 0; r < l.R; ++r) y[l.strengths + r] = oneplus(x[l.strengths + r]);
  std::copy_n(x + l.add, l.W, y + l.add);
  if (!l.links()) return;
  for (int64_t r = 0; r < l.R; ++r) {
    const scalar_t* logits = x + l.modes + 3 * r;
    const acc_t top = std::max({acc_t(logits[0]), acc_t(logits[1]), acc_t(logits[2])});
    acc_t e[3], total = 0;
    for (int i = 0; i < 3; ++i) total += (e[i] = std::exp(acc_t(logits[i]) - top));
    for (int i = 0; i < 3; ++i) y[l.modes + 3 * r + i] = scalar_t(e[i] / total);
  }
}

// Per-slot scratch over a batch row's N slots for a step's entries (the J write entries, then the
// read entries): each slot's first entry and the sum of its entries' weights in entry order, which
// a scan of every entry for each one added up in O(entries^2) (J = 97 for an SDNC at R = 4, K = 8).
// add() fills it, clear() leaves it all clear again for the next row.
template <typename scalar_t>
struct SlotScratch {
  std::vector<scalar_t> sums;
  std::vector<int64_t> first;

  explicit SlotScratch(int64_t N) : sums(N, scalar_t(0)), first(N, -1) {}

  template <typename Slot, typename Weight>
  void add(int64_t E, const Slot& slot_of, const Weight& weight_of) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t slot = slot_of(e);
      if (first[slot] < 0) first[slot] = e;
      sums[slot] += weight_of(e);
    }
  }

  template <typename Slot>
  void clear(int64_t E, const Slot& slot_of) {
    for (int64_t e = 0; e < E; ++e) sums[slot_of(e)] = scalar_t(0), first[slot_of(e)] = -1;
  }
};

// One step's write for one batch row's memory, in place (memory [N, W], stamps [N], written [N]): the
// LRU slot, the write weights' J entries (into write_idx / write_w / totals) and, where active, the
// rows written (the overwritten ones into old_rows).
template <typename scalar_t>
void write_step(const Layout& l, int64_t N, bool active, const scalar_t* squashed, const int64_t* previous_idx,
                const scalar_t* previous_w, scalar_t* memory, const int64_t* stamps, bool* written, bool* written_now,
                int64_t* write_idx, scalar_t* write_w, scalar_t* totals, scalar_t* old_rows,
                SlotScratch<scalar_t>& scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = l.R, W = l.W, J = l.J, RQ = R * l.Q;
  const scalar_t* add = squashed + l.add;
  const scalar_t alpha = squashed[l.gates], gamma = squashed[l.gates + 1];
  // w^W = alpha (gamma mean_r w^R_{t-1} + (1 - gamma) I^U): one entry per (head, place) and the LRU
  const int64_t lru = std::min_element(stamps, stamps + N) - stamps;  // the first minimum
  for (int64_t j = 0; j < RQ; ++j) {
    write_idx[j] = previous_idx[j];
    write_w[j] = alpha * gamma * previous_w[j] / scalar_t(R);
  }
  write_idx[RQ] = lru;
  write_w[RQ] = alpha * (scalar_t(1) - gamma);
  const auto slot_of = [&](int64_t j) { return write_idx[j]; };
  scratch.add(J, slot_of, [&](int64_t j) { return write_w[j]; });
  for (int64_t j = 0; j < J; ++j) totals[j] = scratch.sums[write_idx[j]];
  if (active) {
    for (int64_t j = 0; j < J; ++j) std::copy_n(memory + write_idx[j] * W, W, old_rows + j * W);
    for (int64_t j = 0; j < J; ++j) {
      if (scratch.first[write_idx[j]] != j) continue;  // stored by its slot's first entry
      scalar_t* row = memory + write_idx[j] * W;
      write_row<scalar_t, acc_t>(row, acc_t(totals[j]), add, write_idx[j] == lru, row, W);
      written[write_idx[j]] = written_now[write_idx[j]] = true;
    }
  }
  scratch.clear(J, slot_of);
}

// The content read of one batch row: the top K per head over the written rows (an unwritten slot
// scores D(key, 0) = 0, and only the K lowest of them can place; ties go to the lowest slot), read
// into idx, w [R, K] and reads [R, W].
template <typename scalar_t>
void content_step(const Layout& l, int64_t N, const scalar_t* squashed, const scalar_t* memory, const bool* written,
                  int64_t* idx, scalar_t* w, scalar_t* reads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = l.R, W = l.W, K = l.K;
  std::vector<acc_t> key(R * W), key_norm(R), score(K), sum(W);
  std::vector<Candidate<acc_t>> best(R * K);
  std::vector<int64_t> count(R, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < W; ++i) key[r * W + i] = acc_t(squashed[r * W + i]);
    key_norm[r] = safe_norm<acc_t>(key.data() + r * W, W);
  }
  int64_t unwritten_offered = 0;
  for (int64_t n = 0; n < N;) {
    if (!written[n]) {
      if (unwritten_offered++ < K) {
        for (int64_t r = 0; r < R; ++r) offer(best.data() + r * K, count[r], K, acc_t(0), n);
      }
      ++n;
      continue;
    }
    int64_t last = n;
    while (last < N && written[last]) ++last;
    scan_heads<scalar_t, acc_t>(memory, n, last, W, key.data(), key_norm.data(), R, K, best.data(), count.data());
    n = last;
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < K; ++j) idx[r * K + j] = best[r * K + j].slot;
    read_head<scalar_t, acc_t>(memory, idx + r * K, squashed + r * W, acc_t(squashed[l.strengths + r]), K, W,
                               score.data(), sum.data(), w + r * K, reads + r * W);
  }
}

// An SDNC's read weights on each head's 3K places, w^R = (pi_0 b, pi_1 c, pi_2 f) (an empty temporal
// place: slot 0, weight 0), and its reads r = sum_q w_q M[slot_q] -> read_idx, read_w [R, 3K], reads [R, W].
template <typename scalar_t>
void mix_step(const Layout& l, const scalar_t* squashed, const scalar_t* memory, const int64_t* content_idx,
              const scalar_t* content_w, const int64_t* forward_s, const scalar_t* forward_w,
              const int64_t* backward_s, const scalar_t* backward_w, int64_t* read_idx, scalar_t* read_w,
              scalar_t* reads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = l.K, W = l.W, Q = l.Q;
  std::vector<acc_t> sum(W);
  for (int64_t r = 0; r < l.R; ++r) {
    const scalar_t* modes = squashed + l.modes + 3 * r;
    const int64_t h = r * K;
    for (int64_t k = 0; k < K; ++k) {
      read_idx[r * Q + k] = std::max<int64_t>(backward_s[h + k], 0);
      read_w[r * Q + k] = modes[0] * backward_w[h + k];
      read_idx[r * Q + K + k] = content_idx[h + k];
      read_w[r * Q + K + k] = modes[1] * content_w[h + k];
      read_idx[r * Q + 2 * K + k] = std::max<int64_t>(forward_s[h + k], 0);
      read_w[r * Q + 2 * K + k] = modes[2] * forward_w[h + k];
    }
    std::fill(sum.begin(), sum.end(), acc_t(0));
    for (int64_t q = 0; q < Q; ++q) {
      const scalar_t* word = memory + read_idx[r * Q + q] * W;
      const acc_t weight = read_w[r * Q + q];
      for (int64_t i = 0; i < W; ++i) sum[i] += weight * acc_t(word[i]);
    }
    for (int64_t i = 0; i < W; ++i) reads[r * W + i] = scalar_t(sum[i]);
  }
}

// A slot is accessed when its write plus read weight exceeds DELTA (over all its entries): stamped now.
template <typename scalar_t>
void stamp_step(const Layout& l, int64_t now, const int64_t* write_idx, const scalar_t* write_w,
                const int64_t* read_idx, const scalar_t* read_w, int64_t* stamps, SlotScratch<scalar_t>& scratch) {
  const int64_t J = l.J, E = J + l.R * l.Q;
  const auto slot_of = [&](int64_t e) { return e < J ? write_idx[e] : read_idx[e - J]; };
  scratch.add(E, slot_of, [&](int64_t e) { return e < J ? write_w[e] : read_w[e - J]; });
  for (int64_t e = 0; e < E; ++e) {
    const int64_t slot = slot_of(e);
    if (scratch.first[slot] == e && scratch.sums[slot] > scalar_t(kDelta)) stamps[slot] = now;
  }
  scratch.clear(E, slot_of);
}

// The rows of store [B, 2N, K_L] (a dense link store: rows of L, then of L^T) at slots [B, S] (+ offset:
// 0 for rows of L, N for rows of L^T) -> [B, S, K_L]; fill where a slot is -1. slots' rows may be strided.
at::Tensor gather_rows(const at::Tensor& store, const at::Tensor& slots, int64_t offset, int64_t fill) {
  const int64_t B = store.size(0), rows = store.size(1), K_L = store.size(2), S = slots.size(1);
  const int64_t stride = slots.stride(0);
  TORCH_INTERNAL_ASSERT(slots.stride(1) == 1 && store.is_contiguous());
  auto out = at::empty({B, S, K_L}, store.options());
  const int64_t* s = slots.data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES(store.scalar_type(), "gather_rows", [&] {
    const scalar_t* from = store.data_ptr<scalar_t>();
    scalar_t* to = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t slot = s[b * stride + i];
        scalar_t* row = to + (b * S + i) * K_L;
        if (slot < 0) {
          std::fill_n(row, K_L, scalar_t(fill));
        } else {
          std::copy_n(from + (b * rows + slot + offset) * K_L, K_L, row);
        }
      }
    }
  });
  return out;
}

// rows [B, S, K_L] into store at slots [B, S] (+ offset), or added to it (add: slots may repeat);
// rows at slot -1 are dropped. marks [B, 2N] bool, if given, gets the rows stored.
void scatter_rows(at::Tensor& store, const at::Tensor& slots, int64_t offset, const at::Tensor& rows_in, bool add,
                  at::Tensor* marks = nullptr) {
  const int64_t B = store.size(0), rows = store.size(1), K_L = store.size(2), S = slots.size(1);
  const int64_t stride = slots.stride(0);
  TORCH_INTERNAL_ASSERT(slots.stride(1) == 1 && store.is_contiguous());
  const auto values = rows_in.contiguous();
  const int64_t* s = slots.data_ptr<int64_t>();
  bool* marked = marks == nullptr ? nullptr : marks->data_ptr<bool>();
  AT_DISPATCH_ALL_TYPES(store.scalar_type(), "scatter_rows", [&] {
    const scalar_t* from = values.data_ptr<scalar_t>();
    scalar_t* to = store.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t slot = s[b * stride + i];
        if (slot < 0) continue;
        const scalar_t* row = from + (b * S + i) * K_L;
        scalar_t* place = to + (b * rows + slot + offset) * K_L;
        for (int64_t e = 0; e < K_L; ++e) place[e] = add ? place[e] + row[e] : row[e];
        if (marked != nullptr) marked[b * rows + slot + offset] = true;
      }
    }
  });
}

// The slots of sets[b] (repeats allowed, in [0, N)) each once, ascending, as [B, max(1, most)] int64, -1
// after each row's. The row sets are kept distinct through a mark per slot (a set has up to ~1,000
// entries with many repeats: sorting only the distinct ones halves the work).
at::Tensor packed(std::vector<std::vector<int64_t>>& sets, int64_t N) {
  std::vector<uint8_t> seen(N, 0);
  size_t width = 1;
  for (auto& set : sets) {
    size_t count = 0;
    for (const int64_t slot : set) {
      if (!seen[slot]) seen[slot] = 1, set[count++] = slot;
    }
    set.resize(count);
    for (const int64_t slot : set) seen[slot] = 0;
    std::sort(set.begin(), set.end());
    width = std::max(width, set.size());
  }
  auto out = at::full({int64_t(sets.size()), int64_t(width)}, -1, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t b = 0; b < sets.size(); ++b) std::copy(sets[b].begin(), sets[b].end(), o + b * width);
  return out;
}

// An SDNC's links at one step, on the dense store in place: the update from the step's write weights
// (write_idx, write_w [B, J]) on the rows it can change (ops/sparse_links.py's contract: forward rows
// at the written slots W and the entries of the backward rows of W and of the precedence slots P;
// backward rows at W, P and the entries of the forward rows of W), gathered, run through
// ext_sparse_link_update and stored back; then the temporal reads through the rows at the last
// step's read slots (previous_idx, previous_w [B, R Q]). A padded row's links stay as they are.
// Appends the step's kLinkTape tensors (LinkStep) to tape.
void link_step(const Layout& l, const at::Tensor& active_t, const at::Tensor& write_idx, const at::Tensor& write_w,
               const at::Tensor& previous_w, at::Tensor& link_idx, at::Tensor& link_w, at::Tensor& precedence_idx,
               at::Tensor& precedence_w, at::Tensor& linked_now, std::vector<at::Tensor>& tape) {
  const auto B = link_idx.size(0), N = link_idx.size(1) / 2, K_L = link_idx.size(2), J = l.J;
  const auto update_idx = at::where(active_t.view({B, 1}), write_idx, at::full({}, -1, at::kLong));
  std::vector<std::vector<int64_t>> forward(B), backward(B);
  const int64_t *w = update_idx.data_ptr<int64_t>(), *p = precedence_idx.data_ptr<int64_t>();
  const int64_t* rows = link_idx.data_ptr<int64_t>();
  const bool* is_active = active_t.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    if (!is_active[b]) continue;
    const auto entries = [&](int64_t id, std::vector<int64_t>& into) {
      const int64_t* row = rows + (b * 2 * N + id) * K_L;
      for (int64_t e = 0; e < K_L; ++e) {
        if (row[e] >= 0) into.push_back(row[e]);
      }
    };
    for (int64_t j = 0; j < J; ++j) {
      const int64_t slot = w[b * J + j];
      forward[b].push_back(slot), backward[b].push_back(slot);
      entries(N + slot, forward[b]), entries(slot, backward[b]);
    }
    for (int64_t e = 0; e < K_L; ++e) {
      const int64_t slot = p[b * K_L + e];
      if (slot < 0) continue;
      backward[b].push_back(slot);
      entries(N + slot, forward[b]);
    }
  }
  const auto fs = packed(forward, N), gs = packed(backward, N);
  const auto fi = gather_rows(link_idx, fs, 0, -1), fv = gather_rows(link_w, fs, 0, 0);
  const auto gi = gather_rows(link_idx, gs, N, -1), gv = gather_rows(link_w, gs, N, 0);
  auto [new_fv, new_fi, new_gv, new_gi, new_pw, new_pi] =
      ext_sparse_link_update(fs, fi, fv, gs, gi, gv, precedence_idx, precedence_w, update_idx, write_w);
  scatter_rows(link_idx, fs, 0, new_fi, false, &linked_now), scatter_rows(link_w, fs, 0, new_fv, false);
  scatter_rows(link_idx, gs, N, new_gi, false, &linked_now), scatter_rows(link_w, gs, N, new_gv, false);
  tape.insert(tape.end(), {fs, fi, fv, gs, gi, gv, new_fi, new_gi, update_idx, precedence_idx, precedence_w, new_pi});
  precedence_idx = rows_where(active_t, new_pi, precedence_idx), precedence_w = rows_where(active_t, new_pw, precedence_w);
  // the temporal reads: f = L w^R_{t-1} through the rows of L^T, b = L^T w^R_{t-1} through the rows of L
  const auto previous_idx = write_idx.narrow(1, 0, l.R * l.Q);
  const std::vector<int64_t> shape{B, l.R, l.Q, K_L};
  const auto ri = gather_rows(link_idx, previous_idx, 0, -1).view(shape);
  const auto rv = gather_rows(link_w, previous_idx, 0, 0).view(shape);
  const auto bi = gather_rows(link_idx, previous_idx, N, -1).view(shape);
  const auto bv = gather_rows(link_w, previous_idx, N, 0).view(shape);
  auto [forward_w, forward_s, backward_w, backward_s] =
      ext_sparse_temporal_reads(previous_w.view({B, l.R, l.Q}), ri, rv, bi, bv, l.K);
  tape.insert(tape.end(), {ri, rv, bi, bv, forward_w, forward_s, backward_w, backward_s});
}

// The outputs: (hidden [T, B, H], reads [T, B, R, W], cell, memory, last_access, read_idx, read_w,
// write_idx, write_w, written_now [B, N]: the slots this call wrote), and an SDNC's (link_idx, link_w,
// precedence_idx, precedence_w, linked_now [B, 2N]: the link rows this call's updates could change).
std::vector<at::Tensor> run_forward(const Inputs& in, Tape& tape) {
  const auto T = in.gates_x.size(0), B = in.gates_x.size(1), H = in.gates_x.size(2) / 4;
  const auto R = in.reads.size(1), W = in.reads.size(2), N = in.memory.size(1);
  const Layout l = in.layout();
  const auto K = l.K, Q = l.Q;
  const auto opts = in.gates_x.options();
  const auto longs = opts.dtype(at::kLong);
  tape.inputs = at::empty({T, B, R * W + H}, opts);
  tape.act = at::empty({T, B, 4 * H}, opts);
  tape.cells = at::empty({T, B, H}, opts);
  tape.tanh_cells = at::empty({T, B, H}, opts);
  tape.interface = at::empty({T, B, l.total}, opts);
  tape.squashed = at::empty({T, B, l.total}, opts);
  tape.write_idx = at::empty({T, B, l.J}, longs);
  tape.write_w = at::empty({T, B, l.J}, opts);
  tape.totals = at::empty({T, B, l.J}, opts);
  tape.previous_w = at::empty({T, B, R * Q}, opts);
  tape.old_rows = at::empty({T, B, l.J, W}, opts);
  tape.read_idx = at::empty({T, B, R, Q}, longs);
  tape.read_w = at::empty({T, B, R, Q}, opts);
  if (l.links()) {
    tape.content_idx = at::empty({T, B, R, K}, longs);
    tape.content_w = at::empty({T, B, R, K}, opts);
  }
  auto hidden = at::empty({T, B, H}, opts), every_reads = at::empty({T, B, R, W}, opts);
  auto memory = in.memory.clone(), stamps = in.last_access.clone(), written = in.written.clone();
  auto written_now = at::zeros({B, N}, opts.dtype(at::kBool));
  auto read_idx = in.read_idx.clone(), read_w = in.read_w.clone();
  auto write_idx = in.write_idx.clone(), write_w = in.write_w.clone();
  at::Tensor link_idx, link_w, precedence_idx = in.precedence_idx, precedence_w = in.precedence_w, linked_now;
  if (l.links()) {
    link_idx = in.link_idx.clone(), link_w = in.link_w.clone();
    linked_now = at::zeros({B, 2 * N}, opts.dtype(at::kBool));
  }
  auto new_reads = at::empty({B, R, W}, opts);
  const auto weight_rh_t = in.weight_rh.t(), weight_if_t = in.weight_if.t();
  at::Tensor h = in.hidden, c = in.cell, reads = in.reads;
  for (int64_t t = 0; t < T; ++t) {
    const auto active_t = in.active[t];
    auto new_c = tape.cells[t], new_h = hidden[t];
    cell_step(in.gates_x[t], reads, h, c, weight_rh_t, tape.inputs[t], tape.act[t], new_c, tape.tanh_cells[t], new_h);
    auto interface = tape.interface[t], squashed = tape.squashed[t];
    at::addmm_out(interface, in.bias_if, new_h, weight_if_t);
    at::sigmoid_out(squashed, interface);  // the gates' (torch's sigmoid); the other parts below
    tape.previous_w[t].copy_(read_w.view({B, R * Q}));
    const int64_t I = l.total, J = l.J, RQ = R * Q, RK = R * K;
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "sam_sequence_write", [&] {
      const bool* is_active = active_t.data_ptr<bool>();
      const scalar_t* x = interface.data_ptr<scalar_t>();
      scalar_t* y = squashed.data_ptr<scalar_t>();
      const int64_t* previous_idx = read_idx.data_ptr<int64_t>();
      const scalar_t* previous_w = tape.previous_w[t].data_ptr<scalar_t>();
      scalar_t* m = memory.data_ptr<scalar_t>();
      const int64_t* stamp = stamps.data_ptr<int64_t>();
      bool *mark = written.data_ptr<bool>(), *mark_now = written_now.data_ptr<bool>();
      int64_t* write_slots = tape.write_idx[t].data_ptr<int64_t>();
      scalar_t* write_weights = tape.write_w[t].data_ptr<scalar_t>();
      scalar_t* totals = tape.totals[t].data_ptr<scalar_t>();
      scalar_t* old_rows = tape.old_rows[t].data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(N + J * W), [&](int64_t begin, int64_t end) {
        SlotScratch<scalar_t> scratch(N);
        for (int64_t b = begin; b < end; ++b) {
          squash_row<scalar_t>(l, x + b * I, y + b * I);
          write_step<scalar_t>(l, N, is_active[b], y + b * I, previous_idx + b * RQ, previous_w + b * RQ,
                               m + b * N * W, stamp + b * N, mark + b * N, mark_now + b * N, write_slots + b * J,
                               write_weights + b * J, totals + b * J, old_rows + b * J * W, scratch);
        }
      });
    });
    std::optional<LinkStep> links;
    if (l.links()) {
      link_step(l, active_t, tape.write_idx[t], tape.write_w[t], tape.previous_w[t], link_idx, link_w,
                precedence_idx, precedence_w, linked_now, tape.links);
      links.emplace(&tape.links[t * kLinkTape]);
    }
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "sam_sequence_read", [&] {
      const bool* is_active = active_t.data_ptr<bool>();
      const scalar_t* y = squashed.data_ptr<scalar_t>();
      const scalar_t* m = memory.data_ptr<scalar_t>();
      const bool* mark = written.data_ptr<bool>();
      int64_t* stamp = stamps.data_ptr<int64_t>();
      const int64_t* write_slots = tape.write_idx[t].data_ptr<int64_t>();
      const scalar_t* write_weights = tape.write_w[t].data_ptr<scalar_t>();
      int64_t* read_slots = tape.read_idx[t].data_ptr<int64_t>();
      scalar_t* read_weights = tape.read_w[t].data_ptr<scalar_t>();
      // a SAM's content read is its read; an SDNC's goes to the tape, then into the mix
      int64_t* content_slots = l.links() ? tape.content_idx[t].data_ptr<int64_t>() : read_slots;
      scalar_t* content_weights = l.links() ? tape.content_w[t].data_ptr<scalar_t>() : read_weights;
      scalar_t* r_out = new_reads.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain((R + 1) * N * W), [&](int64_t begin, int64_t end) {
        SlotScratch<scalar_t> scratch(N);
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* memory_b = m + b * N * W;
          content_step<scalar_t>(l, N, y + b * I, memory_b, mark + b * N, content_slots + b * RK,
                                 content_weights + b * RK, r_out + b * R * W);
          if (links) {
            mix_step<scalar_t>(l, y + b * I, memory_b, content_slots + b * RK, content_weights + b * RK,
                               links->forward_s.data_ptr<int64_t>() + b * RK,
                               links->forward_w.data_ptr<scalar_t>() + b * RK,
                               links->backward_s.data_ptr<int64_t>() + b * RK,
                               links->backward_w.data_ptr<scalar_t>() + b * RK, read_slots + b * RQ,
                               read_weights + b * RQ, r_out + b * R * W);
          }
          if (is_active[b]) {
            stamp_step<scalar_t>(l, in.clock + t + 1, write_slots + b * J, write_weights + b * J,
                                 read_slots + b * RQ, read_weights + b * RQ, stamp + b * N, scratch);
          }
        }
      });
    });
    // A padded row (active false) keeps its state: controller, reads and weights.
    if (every_row(active_t)) {
      every_reads[t].copy_(new_reads);
      read_idx.copy_(tape.read_idx[t]), read_w.copy_(tape.read_w[t]);
      write_idx.copy_(tape.write_idx[t]), write_w.copy_(tape.write_w[t]);
    } else {
      every_reads[t].copy_(rows_where(active_t, new_reads, reads));
      new_h.copy_(rows_where(active_t, new_h, h));
      new_c.copy_(rows_where(active_t, new_c, c));
      read_idx.copy_(rows_where(active_t, tape.read_idx[t], read_idx));
      read_w.copy_(rows_where(active_t, tape.read_w[t], read_w));
      write_idx.copy_(rows_where(active_t, tape.write_idx[t], write_idx));
      write_w.copy_(rows_where(active_t, tape.write_w[t], write_w));
    }
    h = new_h, c = new_c, reads = every_reads[t];
  }
  std::vector<at::Tensor> out{hidden, every_reads, c.clone(), memory, stamps, read_idx, read_w, write_idx, write_w,
                              written_now};
  if (l.links()) out.insert(out.end(), {link_idx, link_w, precedence_idx, precedence_w, linked_now});
  return out;
}

// The backward of one step's write for one batch row (active): grad_memory [N, W] holds the
// gradient of the rows after the write and leaves with the rows' before it; the entries' weights
// get their slot's total's gradient (plus grad_write_w, the gradient of the write weights from
// later steps and an SDNC's links), which goes to alpha, gamma and the read weights the entries
// came from (grad_previous_w, added).
template <typename scalar_t>
void write_backward(const Layout& l, const scalar_t* squashed, const int64_t* write_idx, const scalar_t* totals,
                    const scalar_t* previous_w, const scalar_t* grad_write_w, scalar_t* grad_memory,
                    scalar_t* grad_previous_w, scalar_t* grad_interface, SlotScratch<scalar_t>& scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = l.R, W = l.W, J = l.J, RQ = R * l.Q;
  const scalar_t* add = squashed + l.add;
  const acc_t alpha = squashed[l.gates], gamma = squashed[l.gates + 1];
  const int64_t lru = write_idx[RQ];
  std::vector<acc_t> grad_total(J, acc_t(0)), grad_add(W, acc_t(0));
  const auto slot_of = [&](int64_t j) { return write_idx[j]; };
  scratch.add(J, slot_of, [](int64_t) { return scalar_t(0); });
  for (int64_t j = 0; j < J; ++j) {
    const int64_t first = scratch.first[write_idx[j]];
    if (first < j) {
      grad_total[j] = grad_total[first];
      continue;
    }
    scalar_t* grad_row = grad_memory + write_idx[j] * W;
    grad_total[j] = dot<acc_t>(grad_row, add, W);
    for (int64_t i = 0; i < W; ++i) grad_add[i] += acc_t(totals[j]) * acc_t(grad_row[i]);
    if (write_idx[j] == lru) std::fill_n(grad_row, W, scalar_t(0));  // erased: the old row reached nothing
  }
  acc_t grad_alpha_gamma = 0;
  for (int64_t j = 0; j < RQ; ++j) {  // w_j = alpha gamma w^R_{t-1, j} / R
    const acc_t grad_w = grad_total[j] + acc_t(grad_write_w[j]);
    grad_alpha_gamma += grad_w * acc_t(previous_w[j]) / acc_t(R);
    grad_previous_w[j] += scalar_t(grad_w * alpha * gamma / acc_t(R));
  }
  const acc_t grad_lru_w = grad_total[RQ] + acc_t(grad_write_w[RQ]);  // alpha (1 - gamma)
  const acc_t grad_alpha = grad_alpha_gamma * gamma + grad_lru_w * (acc_t(1) - gamma);
  const acc_t grad_gamma = grad_alpha_gamma * alpha - grad_lru_w * alpha;
  for (int64_t i = 0; i < W; ++i) grad_interface[l.add + i] = scalar_t(grad_add[i]);
  grad_interface[l.gates] = scalar_t(grad_alpha);
  grad_interface[l.gates + 1] = scalar_t(grad_gamma);
  scratch.clear(J, slot_of);
}

// The backward of one batch row's SDNC read (mix_step after content_step), on the memory after the
// write: grad_memory [N, W] gets the reads' gradient and the content similarities'; the temporal
// reads' weights get theirs (grad_forward_w, grad_backward_w [R, K]); grad_interface the keys',
// strengths' and read modes'.
template <typename scalar_t>
void mix_backward(const Layout& l, const scalar_t* squashed, const scalar_t* interface, const scalar_t* memory,
                  scalar_t* grad_memory, const int64_t* read_idx, const scalar_t* read_w, const int64_t* content_idx,
                  const scalar_t* content_w, const scalar_t* forward_w, const scalar_t* backward_w,
                  const scalar_t* grad_read_w, const scalar_t* grad_reads, scalar_t* grad_forward_w,
                  scalar_t* grad_backward_w, scalar_t* grad_interface) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = l.K, W = l.W, Q = l.Q;
  std::vector<acc_t> grad_w(Q), similarity(K), upstream(K), grad_key(W);
  std::vector<scalar_t> grad_content(K), no_read(W, scalar_t(0));
  for (int64_t r = 0; r < l.R; ++r) {
    const scalar_t* grad_read = grad_reads + r * W;
    for (int64_t q = 0; q < Q; ++q) {  // r = sum_q w_q M[slot_q]
      const int64_t slot = read_idx[r * Q + q];
      grad_w[q] = acc_t(grad_read_w[r * Q + q]) + dot<acc_t>(grad_read, memory + slot * W, W);
      const acc_t weight = read_w[r * Q + q];
      scalar_t* grad_word = grad_memory + slot * W;
      for (int64_t i = 0; i < W; ++i) grad_word[i] = scalar_t(acc_t(grad_word[i]) + weight * acc_t(grad_read[i]));
    }
    const scalar_t* modes = squashed + l.modes + 3 * r;
    acc_t grad_mode[3] = {0, 0, 0};
    for (int64_t k = 0, h = r * K; k < K; ++k) {  // w = (pi_0 b, pi_1 c, pi_2 f)
      grad_mode[0] += grad_w[k] * acc_t(backward_w[h + k]);
      grad_mode[1] += grad_w[K + k] * acc_t(content_w[h + k]);
      grad_mode[2] += grad_w[2 * K + k] * acc_t(forward_w[h + k]);
      grad_backward_w[h + k] = scalar_t(acc_t(modes[0]) * grad_w[k]);
      grad_content[k] = scalar_t(acc_t(modes[1]) * grad_w[K + k]);
      grad_forward_w[h + k] = scalar_t(acc_t(modes[2]) * grad_w[2 * K + k]);
    }
    const acc_t expected = acc_t(modes[0]) * grad_mode[0] + acc_t(modes[1]) * grad_mode[1] +
                           acc_t(modes[2]) * grad_mode[2];  // the softmax's backward
    for (int i = 0; i < 3; ++i) grad_interface[l.modes + 3 * r + i] = scalar_t(acc_t(modes[i]) * (grad_mode[i] - expected));
    read_head_backward<scalar_t, acc_t>(memory, grad_memory, content_idx + r * K, squashed + r * W,
                                        acc_t(squashed[l.strengths + r]), content_w + r * K, grad_content.data(),
                                        no_read.data(), K, W, similarity.data(), upstream.data(), grad_key.data(),
                                        grad_interface + r * W, grad_interface + l.strengths + r);
    grad_interface[l.strengths + r] = oneplus_backward(interface[l.strengths + r], grad_interface[l.strengths + r]);
  }
}

// The backward of link_step: the temporal reads' (grad_forward_w, grad_backward_w [B, R, K]) into
// grad_previous_w [B, R Q] (added) and the link rows they read, then the update's; grad_link
// [B, 2N, K_L] and grad_precedence [B, K_L] hold the gradients of the links after the step and leave
// with those before it. -> the gradient of the write weights [B, J] through the links.
at::Tensor link_step_backward(const Layout& l, const LinkStep& step, const at::Tensor& write_w,
                              const at::Tensor& previous_idx, const at::Tensor& previous_w,
                              const at::Tensor& grad_forward_w, const at::Tensor& grad_backward_w,
                              at::Tensor& grad_previous_w, at::Tensor& grad_link, at::Tensor& grad_precedence) {
  const auto B = grad_link.size(0), N = grad_link.size(1) / 2, K_L = grad_link.size(2);
  const auto reads = ext_sparse_temporal_reads_backward(
      grad_forward_w, std::nullopt, grad_backward_w, std::nullopt, previous_w.view({B, l.R, l.Q}), step.ri, step.rv,
      step.bi, step.bv, l.K, step.forward_w, step.forward_s, step.backward_w, step.backward_s);
  grad_previous_w.add_(reads[0].view({B, l.R * l.Q}));
  scatter_rows(grad_link, previous_idx, 0, reads[1].view({B, -1, K_L}), true);
  scatter_rows(grad_link, previous_idx, N, reads[2].view({B, -1, K_L}), true);
  const at::Tensor unused;  // the backward routes by the new rows' slots, not their values
  const auto update = ext_sparse_link_update_backward(
      gather_rows(grad_link, step.fs, 0, 0), std::nullopt, gather_rows(grad_link, step.gs, N, 0), std::nullopt,
      grad_precedence, std::nullopt, step.fs, step.fi, step.fv, step.gs, step.gi, step.gv, step.precedence_idx,
      step.precedence_w, step.write_idx, write_w, unused, step.new_fi, unused, step.new_gi, unused,
      step.new_precedence_idx);
  scatter_rows(grad_link, step.fs, 0, update[0], false);
  scatter_rows(grad_link, step.gs, N, update[1], false);
  grad_precedence = update[2];
  return update[3];
}

// grads: one per output (defined or not); -> one grad per input but active (none for the integer ones).
std::vector<at::Tensor> run_backward(const std::vector<at::Tensor>& grads, const Inputs& in, const Tape& tape,
                                     const std::vector<at::Tensor>& out) {
  const auto T = in.gates_x.size(0), B = in.gates_x.size(1), H = in.gates_x.size(2) / 4;
  const auto R = in.reads.size(1), W = in.reads.size(2), N = in.memory.size(1);
  const Layout l = in.layout();
  const auto K = l.K, Q = l.Q;
  const auto opts = in.gates_x.options();
  const auto or_zeros = [&](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? g.contiguous().clone() : at::zeros_like(like);
  };
  const auto& hidden = out[0];
  const auto grad_hidden = or_zeros(grads[0], out[0]), grad_reads = or_zeros(grads[1], out[1]);
  auto grad_c = or_zeros(grads[2], out[2]), grad_memory = or_zeros(grads[3], out[3]);
  auto grad_read_w = or_zeros(grads[6], out[6]), grad_write_w = or_zeros(grads[8], out[8]);
  at::Tensor grad_link, grad_precedence;
  if (l.links()) grad_link = or_zeros(grads[11], out[11]), grad_precedence = or_zeros(grads[13], out[13]);
  auto grad_h = at::zeros({B, H}, opts), grad_r = at::zeros({B, R, W}, opts);
  auto memory = out[3].clone();  // put back a step at a time
  auto grad_gates_x = at::empty({T, B, 4 * H}, opts), grad_interface = at::zeros({T, B, l.total}, opts);
  const auto zero = at::zeros({}, opts);
  for (int64_t t = T - 1; t >= 0; --t) {
    const auto active_t = in.active[t];
    const bool every = every_row(active_t);
    auto grad_reads_t = grad_reads[t] + grad_r, grad_h_t = grad_hidden[t] + grad_h;
    // the direct gradients of a padded step's kept rows: to the state before it
    std::vector<at::Tensor> direct;
    if (!every) {
      for (auto* g : {&grad_read_w, &grad_write_w, &grad_reads_t, &grad_h_t, &grad_c}) {
        direct.push_back(split_rows(active_t, *g, zero));
      }
      if (l.links()) direct.push_back(split_rows(active_t, grad_precedence, zero));
      grad_reads_t = grad_reads_t.contiguous(), grad_read_w = grad_read_w.contiguous();
      grad_write_w = grad_write_w.contiguous();
    }
    auto grad_previous_w = at::zeros({B, R * Q}, opts);
    auto grad_interface_t = grad_interface[t];
    std::optional<LinkStep> links;
    at::Tensor grad_forward_w, grad_backward_w;
    if (l.links()) {
      links.emplace(&tape.links[t * kLinkTape]);
      grad_forward_w = at::zeros({B, R, K}, opts), grad_backward_w = at::zeros({B, R, K}, opts);
    }
    const int64_t I = l.total, J = l.J, RQ = R * Q, RK = R * K;
    // the reads came after the write (and an SDNC's links): their backward first, on the rows after it
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "sam_sequence_read_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bool* is_active = active_t.data_ptr<bool>();
      const scalar_t* squashed_t = tape.squashed[t].data_ptr<scalar_t>();
      const scalar_t* interface_t = tape.interface[t].data_ptr<scalar_t>();
      const int64_t* read_slots = tape.read_idx[t].data_ptr<int64_t>();
      const scalar_t* read_weights = tape.read_w[t].data_ptr<scalar_t>();
      const scalar_t* g_read_w = grad_read_w.data_ptr<scalar_t>();
      const scalar_t* g_reads = grad_reads_t.data_ptr<scalar_t>();
      const scalar_t* m = memory.data_ptr<scalar_t>();
      scalar_t* g_m = grad_memory.data_ptr<scalar_t>();
      scalar_t* g_interface = grad_interface_t.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(6 * R * Q * W), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> similarity(K), upstream(K), grad_key(W);
        for (int64_t b = begin; b < end; ++b) {
          if (!is_active[b]) continue;
          const scalar_t* squashed = squashed_t + b * I;
          const scalar_t* memory_row0 = m + b * N * W;
          scalar_t* grad_row0 = g_m + b * N * W;
          scalar_t* grad_if = g_interface + b * I;
          if (links) {
            mix_backward<scalar_t>(l, squashed, interface_t + b * I, memory_row0, grad_row0, read_slots + b * RQ,
                                   read_weights + b * RQ, tape.content_idx[t].data_ptr<int64_t>() + b * RK,
                                   tape.content_w[t].data_ptr<scalar_t>() + b * RK,
                                   links->forward_w.data_ptr<scalar_t>() + b * RK,
                                   links->backward_w.data_ptr<scalar_t>() + b * RK, g_read_w + b * RQ,
                                   g_reads + b * R * W, grad_forward_w.data_ptr<scalar_t>() + b * RK,
                                   grad_backward_w.data_ptr<scalar_t>() + b * RK, grad_if);
            continue;
          }
          for (int64_t r = 0; r < R; ++r) {
            const int64_t head = b * R + r;
            read_head_backward<scalar_t, acc_t>(memory_row0, grad_row0, read_slots + head * K, squashed + r * W,
                                                acc_t(squashed[l.strengths + r]), read_weights + head * K,
                                                g_read_w + head * K, g_reads + head * W, K, W, similarity.data(),
                                                upstream.data(), grad_key.data(), grad_if + r * W,
                                                grad_if + l.strengths + r);
            grad_if[l.strengths + r] = oneplus_backward(interface_t[b * I + l.strengths + r], grad_if[l.strengths + r]);
          }
        }
      });
    });
    auto grad_write_total = grad_write_w;
    if (links) {
      grad_write_total = grad_write_w + link_step_backward(l, *links, tape.write_w[t], tape.write_idx[t].narrow(1, 0, RQ),
                                                           tape.previous_w[t], grad_forward_w, grad_backward_w,
                                                           grad_previous_w, grad_link, grad_precedence);
    }
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "sam_sequence_write_backward", [&] {
      const bool* is_active = active_t.data_ptr<bool>();
      const scalar_t* squashed_t = tape.squashed[t].data_ptr<scalar_t>();
      const int64_t* write_slots = tape.write_idx[t].data_ptr<int64_t>();
      const scalar_t* totals = tape.totals[t].data_ptr<scalar_t>();
      const scalar_t* previous_w = tape.previous_w[t].data_ptr<scalar_t>();
      const scalar_t* old_rows = tape.old_rows[t].data_ptr<scalar_t>();
      const scalar_t* g_write_w = grad_write_total.data_ptr<scalar_t>();
      scalar_t* m = memory.data_ptr<scalar_t>();
      scalar_t* g_m = grad_memory.data_ptr<scalar_t>();
      scalar_t* g_previous_w = grad_previous_w.data_ptr<scalar_t>();
      scalar_t* g_interface = grad_interface_t.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(J * 2 * W), [&](int64_t begin, int64_t end) {
        SlotScratch<scalar_t> scratch(N);
        for (int64_t b = begin; b < end; ++b) {
          if (!is_active[b]) continue;
          const scalar_t* squashed = squashed_t + b * I;
          scalar_t* grad_if = g_interface + b * I;
          write_backward<scalar_t>(l, squashed, write_slots + b * J, totals + b * J, previous_w + b * RQ,
                                   g_write_w + b * J, g_m + b * N * W, g_previous_w + b * RQ, grad_if, scratch);
          for (const int64_t gate : {l.gates, l.gates + 1}) {
            grad_if[gate] *= squashed[gate] * (scalar_t(1) - squashed[gate]);
          }
          // the rows before the write, for the step before
          for (int64_t j = 0; j < J; ++j) {
            std::copy_n(old_rows + (b * J + j) * W, W, m + b * N * W + write_slots[b * J + j] * W);
          }
        }
      });
    });
    grad_read_w = grad_previous_w.view({B, R, Q});
    if (every) {
      grad_write_w.zero_();  // the step's write weights replaced the ones before it in every row
    } else {
      grad_write_w = direct[1], grad_read_w = grad_read_w + direct[0];
      if (links) grad_precedence = grad_precedence + direct[5];
    }
    grad_h_t = at::addmm(grad_h_t, grad_interface_t, in.weight_if);
    const auto c_prev = t == 0 ? in.cell : tape.cells[t - 1];
    std::tie(grad_r, grad_h) = cell_step_backward(tape.act[t], c_prev, tape.tanh_cells[t], grad_h_t, grad_c,
                                                  grad_gates_x[t], in.weight_rh, R, W);
    if (!every) {
      grad_r = grad_r + direct[2], grad_h = grad_h + direct[3];
      grad_c.add_(direct[4]);
    }
  }
  const auto every_gates = grad_gates_x.view({T * B, 4 * H}), every_interface = grad_interface.view({T * B, l.total});
  const at::Tensor none;
  std::vector<at::Tensor> input_grads{
      grad_gates_x, grad_h, grad_c, grad_r, grad_memory, none, none, none, grad_read_w, none, grad_write_w};
  if (l.links()) {
    // an empty place's value reaches nothing: the gradient of a row that took part in a step is 0
    // there (as the reference's cut leaves it; a row never active keeps its gradient as it came)
    const auto empty = (in.link_idx < 0).logical_and_(in.active.any(0).view({B, 1, 1}));
    input_grads.insert(input_grads.end(), {none, grad_link.masked_fill_(empty, 0), none, grad_precedence});
  }
  input_grads.insert(input_grads.end(), {every_gates.t().mm(tape.inputs.view({T * B, R * W + H})),
                                         every_interface.t().mm(hidden.view({T * B, H})), every_interface.sum(0)});
  return input_grads;
}

std::vector<at::Tensor> tape_tensors(const Tape& tape) {
  std::vector<at::Tensor> all{tape.inputs,    tape.act,      tape.cells,    tape.tanh_cells, tape.interface,
                              tape.squashed,  tape.write_idx, tape.write_w, tape.totals,     tape.previous_w,
                              tape.old_rows,  tape.read_idx, tape.read_w};
  if (tape.content_idx.defined()) {
    all.insert(all.end(), {tape.content_idx, tape.content_w});
    all.insert(all.end(), tape.links.begin(), tape.links.end());
  }
  return all;
}

// The tape from the saved tensors s[0..end): SAM's 13, then an SDNC's.
Tape tape_of(const at::Tensor* s, const at::Tensor* end) {
  Tape tape{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11], s[12]};
  if (end - s > kTapeTensors) {
    tape.content_idx = s[kTapeTensors], tape.content_w = s[kTapeTensors + 1];
    tape.links.assign(s + kTapeTensors + kSdncTapeTensors, end);
  }
  return tape;
}

// Batch rows never meet in the recurrence (the cell's matrix products act row by row; only the
// weights are shared), so the op splits them into one chunk per thread, each running all T steps:
// one parallel region a call, where a single step's work per row (tens of microseconds) is too
// small to split (vector_math.h: grain). The weights' gradients add up over the chunks.
int64_t chunk_count(int64_t B) { return std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads())); }

std::pair<int64_t, int64_t> chunk_rows(int64_t B, int64_t chunks, int64_t c) {
  return {B * c / chunks, B * (c + 1) / chunks};
}

// Batch rows [begin, end) of the inputs: those rows' controller and memory, the same weights.
Inputs rows_of(const Inputs& in, int64_t begin, int64_t end) {
  Inputs part = in;
  for (auto* x : part.tensors()) {
    if (x == &part.weight_rh || x == &part.weight_if || x == &part.bias_if) continue;
    const int64_t dim = x == &part.gates_x || x == &part.active ? 1 : 0;  // [T, B, ...]
    *x = x->narrow(dim, begin, end - begin).contiguous();
  }
  return part;
}

// Batch rows [begin, end) of the outputs, or of their gradients (undefined ones stay so).
std::vector<at::Tensor> rows_of(const std::vector<at::Tensor>& outputs, int64_t begin, int64_t end) {
  std::vector<at::Tensor> part;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const int64_t dim = i < 2 ? 1 : 0;  // every step's hidden and reads: [T, B, ...]
    part.push_back(outputs[i].defined() ? outputs[i].narrow(dim, begin, end - begin).contiguous() : at::Tensor());
  }
  return part;
}

// run(c, first, last) for each chunk c of rows [first, last), the chunks in parallel, each thread with
// the caller's dispatch keys and grad mode -> run's results, by chunk.
template <typename Run>
std::vector<std::vector<at::Tensor>> per_chunk(int64_t B, int64_t chunks, const Run& run) {
  std::vector<std::vector<at::Tensor>> parts(chunks);
  const at::ThreadLocalState caller;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t c = begin; c < end; ++c) {
      const auto [first, last] = chunk_rows(B, chunks, c);
      parts[c] = run(c, first, last);
    }
  });
  return parts;
}

// run_forward on chunks of batch rows in parallel -> the outputs (tapes: one per chunk).
std::vector<at::Tensor> forward_rows(const Inputs& in, std::vector<Tape>& tapes) {
  const int64_t B = in.gates_x.size(1), chunks = chunk_count(B);
  tapes.assign(chunks, Tape{});
  if (chunks == 1) return run_forward(in, tapes[0]);
  const auto parts = per_chunk(B, chunks, [&](int64_t c, int64_t first, int64_t last) {
    return run_forward(rows_of(in, first, last), tapes[c]);
  });
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < parts[0].size(); ++i) {
    std::vector<at::Tensor> pieces;
    for (const auto& part : parts) pieces.push_back(part[i]);
    out.push_back(at::cat(pieces, i < 2 ? 1 : 0));
  }
  return out;
}

// run_backward on the chunks of forward_rows -> one grad per input but active.
std::vector<at::Tensor> backward_rows(const std::vector<at::Tensor>& grads, const Inputs& in,
                                      const std::vector<Tape>& tapes, const std::vector<at::Tensor>& out) {
  const int64_t B = in.gates_x.size(1), chunks = int64_t(tapes.size());
  if (chunks == 1) return run_backward(grads, in, tapes[0], out);
  const auto parts = per_chunk(B, chunks, [&](int64_t c, int64_t first, int64_t last) {
    return run_backward(rows_of(grads, first, last), rows_of(in, first, last), tapes[c], rows_of(out, first, last));
  });
  std::vector<at::Tensor> input_grads;
  const size_t weights = parts[0].size() - 3;  // weight_rh, weight_if, bias_if: summed over the chunks
  for (size_t i = 0; i < parts[0].size(); ++i) {
    std::vector<at::Tensor> pieces;
    for (const auto& part : parts) pieces.push_back(part[i]);
    if (!pieces[0].defined()) {
      input_grads.emplace_back();
    } else if (i >= weights) {
      input_grads.push_back(at::stack(pieces).sum(0));
    } else {
      input_grads.push_back(at::cat(pieces, i == 0 ? 1 : 0));  // gates_x: [T, B, 4H]
    }
  }
  return input_grads;
}

// The op's forward (no autograd): args in schema order.
std::vector<at::Tensor> forward(at::TensorList args, int64_t clock) {
  std::vector<Tape> tapes;
  return forward_rows(checked(args, clock), tapes);
}

// The registered ops' backward (torch.compile, opcheck, ops/_define.py's convention): it runs the
// forward again for its tape. -> the grads of the differentiable inputs. Eager calls take the C++
// node below, which keeps the tape from its forward.
std::vector<at::Tensor> backward(const std::vector<at::Tensor>& grads, at::TensorList args, int64_t clock) {
  const auto in = checked(args, clock);
  std::vector<Tape> tapes;
  const auto out = forward_rows(in, tapes);
  const auto all = backward_rows(grads, in, tapes, out);
  std::vector<at::Tensor> input_grads;
  for (const auto& g : all) {
    if (g.defined()) input_grads.push_back(g);
  }
  return input_grads;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One C++ node for the whole sequence (SamSequence or SdncSequence, by name in profiles). Saved: the
// inputs, the outputs and the tape.
template <typename Op>
struct Sequence : public torch::autograd::Function<Op> {
  static variable_list forward(AutogradContext* ctx, at::TensorList args, int64_t clock) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto in = checked(args, clock);
    ctx->saved_data["clock"] = clock;
    ctx->saved_data["inputs"] = int64_t(args.size());
    std::vector<Tape> tapes;
    auto out = forward_rows(in, tapes);
    ctx->saved_data["outputs"] = int64_t(out.size());
    ctx->saved_data["chunks"] = int64_t(tapes.size());
    std::vector<at::Tensor> integral{out[4], out[5], out[7], out[9]};
    if (in.links()) integral.insert(integral.end(), {out[10], out[12], out[14]});
    ctx->mark_non_differentiable(integral);
    variable_list saved;
    for (auto* x : in.tensors()) saved.push_back(*x);
    saved.insert(saved.end(), out.begin(), out.end());
    for (const auto& tape : tapes) {
      const auto taped = tape_tensors(tape);
      saved.insert(saved.end(), taped.begin(), taped.end());
    }
    ctx->save_for_backward(saved);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    const auto inputs = ctx->saved_data["inputs"].toInt(), outputs = ctx->saved_data["outputs"].toInt();
    const auto in = inputs_of(at::TensorList(s).slice(0, inputs), ctx->saved_data["clock"].toInt());
    const std::vector<at::Tensor> out(s.begin() + inputs, s.begin() + inputs + outputs);
    const auto chunks = ctx->saved_data["chunks"].toInt();
    const auto per_chunk = (int64_t(s.size()) - inputs - outputs) / chunks;  // each chunk's tape, alike
    std::vector<Tape> tapes;
    for (int64_t c = 0; c < chunks; ++c) {
      const at::Tensor* first = s.data() + inputs + outputs + c * per_chunk;
      tapes.push_back(tape_of(first, first + per_chunk));
    }
    auto input_grads = backward_rows(grads, in, tapes, out);
    input_grads.resize(inputs + 1);  // active and clock: no gradient
    return input_grads;
  }
};

struct SamSequence : Sequence<SamSequence> {};
struct SdncSequence : Sequence<SdncSequence> {};

// The Autograd dispatch of either op: the C++ node, or the kernel alone where no backward will come.
std::vector<at::Tensor> with_autograd(at::TensorList args, int64_t clock) {
  const auto takes_grad = [](const at::Tensor& x) { return x.requires_grad(); };
  if (!at::GradMode::is_enabled() || std::none_of(args.begin(), args.end(), takes_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward(args, clock);
  }
  return args.size() == kSdncInputs ? SdncSequence::apply(args, clock) : SamSequence::apply(args, clock);
}

template <size_t... I>
auto as_tuple(const std::vector<at::Tensor>& o, std::index_sequence<I...>) {
  return std::make_tuple(o[I]...);
}

using SamOutputs = decltype(as_tuple(std::vector<at::Tensor>{}, std::make_index_sequence<10>{}));
using SdncOutputs = decltype(as_tuple(std::vector<at::Tensor>{}, std::make_index_sequence<15>{}));

}  // namespace

SamOutputs ext_sam_sequence(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell,
                            const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& last_access,
                            const at::Tensor& written, const at::Tensor& read_idx, const at::Tensor& read_w,
                            const at::Tensor& write_idx, const at::Tensor& write_w, const at::Tensor& weight_rh,
                            const at::Tensor& weight_if, const at::Tensor& bias_if, const at::Tensor& active,
                            int64_t clock) {
  return as_tuple(forward({gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx,
                           write_w, weight_rh, weight_if, bias_if, active},
                          clock),
                  std::make_index_sequence<10>{});
}

SdncOutputs ext_sdnc_sequence(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell,
                              const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& last_access,
                              const at::Tensor& written, const at::Tensor& read_idx, const at::Tensor& read_w,
                              const at::Tensor& write_idx, const at::Tensor& write_w, const at::Tensor& link_idx,
                              const at::Tensor& link_w, const at::Tensor& precedence_idx,
                              const at::Tensor& precedence_w, const at::Tensor& weight_rh,
                              const at::Tensor& weight_if, const at::Tensor& bias_if, const at::Tensor& active,
                              int64_t clock) {
  return as_tuple(forward({gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx,
                           write_w, link_idx, link_w, precedence_idx, precedence_w, weight_rh, weight_if, bias_if,
                           active},
                          clock),
                  std::make_index_sequence<15>{});
}

// The backward ops: (*grads, *inputs, *outputs) -> one grad per differentiable input: gates_x, hidden,
// cell, reads, memory, read_w, write_w, (link_w, precedence_w,) weight_rh, weight_if, bias_if.
std::vector<at::Tensor> ext_sam_sequence_backward(
    const at::Tensor& grad_hidden, const at::Tensor& grad_reads, const at::Tensor& grad_cell,
    const at::Tensor& grad_memory, const std::optional<at::Tensor>& /*grad_last_access*/,
    const std::optional<at::Tensor>& /*grad_read_idx*/, const at::Tensor& grad_read_w,
    const std::optional<at::Tensor>& /*grad_write_idx*/, const at::Tensor& grad_write_w,
    const std::optional<at::Tensor>& /*grad_written_now*/, const at::Tensor& gates_x, const at::Tensor& hidden,
    const at::Tensor& cell, const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& last_access,
    const at::Tensor& written, const at::Tensor& read_idx, const at::Tensor& read_w, const at::Tensor& write_idx,
    const at::Tensor& write_w, const at::Tensor& weight_rh, const at::Tensor& weight_if, const at::Tensor& bias_if,
    const at::Tensor& active, int64_t clock, const at::Tensor& /*every_hidden*/, const at::Tensor& /*every_reads*/,
    const at::Tensor& /*new_cell*/, const at::Tensor& /*new_memory*/, const at::Tensor& /*new_last_access*/,
    const at::Tensor& /*new_read_idx*/, const at::Tensor& /*new_read_w*/, const at::Tensor& /*new_write_idx*/,
    const at::Tensor& /*new_write_w*/, const at::Tensor& /*written_now*/) {
  const at::Tensor none;
  return backward({grad_hidden, grad_reads, grad_cell, grad_memory, none, none, grad_read_w, none, grad_write_w, none},
                  {gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w,
                   weight_rh, weight_if, bias_if, active},
                  clock);
}

std::vector<at::Tensor> ext_sdnc_sequence_backward(
    const at::Tensor& grad_hidden, const at::Tensor& grad_reads, const at::Tensor& grad_cell,
    const at::Tensor& grad_memory, const std::optional<at::Tensor>& /*grad_last_access*/,
    const std::optional<at::Tensor>& /*grad_read_idx*/, const at::Tensor& grad_read_w,
    const std::optional<at::Tensor>& /*grad_write_idx*/, const at::Tensor& grad_write_w,
    const std::optional<at::Tensor>& /*grad_written_now*/, const std::optional<at::Tensor>& /*grad_link_idx*/,
    const at::Tensor& grad_link_w, const std::optional<at::Tensor>& /*grad_precedence_idx*/,
    const at::Tensor& grad_precedence_w, const std::optional<at::Tensor>& /*grad_linked_now*/,
    const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell, const at::Tensor& reads,
    const at::Tensor& memory, const at::Tensor& last_access, const at::Tensor& written, const at::Tensor& read_idx,
    const at::Tensor& read_w, const at::Tensor& write_idx, const at::Tensor& write_w, const at::Tensor& link_idx,
    const at::Tensor& link_w, const at::Tensor& precedence_idx, const at::Tensor& precedence_w,
    const at::Tensor& weight_rh, const at::Tensor& weight_if, const at::Tensor& bias_if, const at::Tensor& active,
    int64_t clock, const at::Tensor& /*every_hidden*/, const at::Tensor& /*every_reads*/,
    const at::Tensor& /*new_cell*/, const at::Tensor& /*new_memory*/, const at::Tensor& /*new_last_access*/,
    const at::Tensor& /*new_read_idx*/, const at::Tensor& /*new_read_w*/, const at::Tensor& /*new_write_idx*/,
    const at::Tensor& /*new_write_w*/, const at::Tensor& /*written_now*/, const at::Tensor& /*new_link_idx*/,
    const at::Tensor& /*new_link_w*/, const at::Tensor& /*new_precedence_idx*/,
    const at::Tensor& /*new_precedence_w*/, const at::Tensor& /*linked_now*/) {
  const at::Tensor none;
  return backward({grad_hidden, grad_reads, grad_cell, grad_memory, none, none, grad_read_w, none, grad_write_w, none,
                   none, grad_link_w, none, grad_precedence_w, none},
                  {gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w,
                   link_idx, link_w, precedence_idx, precedence_w, weight_rh, weight_if, bias_if, active},
                  clock);
}

namespace {

SamOutputs sam_sequence_autograd(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell,
                                 const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& last_access,
                                 const at::Tensor& written, const at::Tensor& read_idx, const at::Tensor& read_w,
                                 const at::Tensor& write_idx, const at::Tensor& write_w,
                                 const at::Tensor& weight_rh, const at::Tensor& weight_if,
                                 const at::Tensor& bias_if, const at::Tensor& active, int64_t clock) {
  return as_tuple(with_autograd({gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w,
                                 write_idx, write_w, weight_rh, weight_if, bias_if, active},
                                clock),
                  std::make_index_sequence<10>{});
}

SdncOutputs sdnc_sequence_autograd(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell,
                                   const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& last_access,
                                   const at::Tensor& written, const at::Tensor& read_idx, const at::Tensor& read_w,
                                   const at::Tensor& write_idx, const at::Tensor& write_w,
                                   const at::Tensor& link_idx, const at::Tensor& link_w,
                                   const at::Tensor& precedence_idx, const at::Tensor& precedence_w,
                                   const at::Tensor& weight_rh, const at::Tensor& weight_if,
                                   const at::Tensor& bias_if, const at::Tensor& active, int64_t clock) {
  return as_tuple(with_autograd({gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w,
                                 write_idx, write_w, link_idx, link_w, precedence_idx, precedence_w, weight_rh,
                                 weight_if, bias_if, active},
                                clock),
                  std::make_index_sequence<15>{});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def(
      "ext_sam_sequence(Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, Tensor memory, "
      "Tensor last_access, Tensor written, Tensor read_idx, Tensor read_w, Tensor write_idx, Tensor write_w, "
      "Tensor weight_rh, Tensor weight_if, Tensor bias_if, Tensor active, int clock) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_sam_sequence_backward(Tensor grad_hidden, Tensor grad_reads, Tensor grad_cell, Tensor grad_memory, "
      "Tensor? grad_last_access, Tensor? grad_read_idx, Tensor grad_read_w, Tensor? grad_write_idx, "
      "Tensor grad_write_w, Tensor? grad_written_now, Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, "
      "Tensor memory, Tensor last_access, Tensor written, Tensor read_idx, Tensor read_w, Tensor write_idx, "
      "Tensor write_w, Tensor weight_rh, Tensor weight_if, Tensor bias_if, Tensor active, int clock, "
      "Tensor every_hidden, Tensor every_reads, Tensor new_cell, Tensor new_memory, Tensor new_last_access, "
      "Tensor new_read_idx, Tensor new_read_w, Tensor new_write_idx, Tensor new_write_w, Tensor written_now) "
      "-> Tensor[]");
  m.def(
      "ext_sdnc_sequence(Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, Tensor memory, "
      "Tensor last_access, Tensor written, Tensor read_idx, Tensor read_w, Tensor write_idx, Tensor write_w, "
      "Tensor link_idx, Tensor link_w, Tensor precedence_idx, Tensor precedence_w, Tensor weight_rh, "
      "Tensor weight_if, Tensor bias_if, Tensor active, int clock) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_sdnc_sequence_backward(Tensor grad_hidden, Tensor grad_reads, Tensor grad_cell, Tensor grad_memory, "
      "Tensor? grad_last_access, Tensor? grad_read_idx, Tensor grad_read_w, Tensor? grad_write_idx, "
      "Tensor grad_write_w, Tensor? grad_written_now, Tensor? grad_link_idx, Tensor grad_link_w, "
      "Tensor? grad_precedence_idx, Tensor grad_precedence_w, Tensor? grad_linked_now, Tensor gates_x, "
      "Tensor hidden, Tensor cell, Tensor reads, Tensor memory, Tensor last_access, Tensor written, "
      "Tensor read_idx, Tensor read_w, Tensor write_idx, Tensor write_w, Tensor link_idx, Tensor link_w, "
      "Tensor precedence_idx, Tensor precedence_w, Tensor weight_rh, Tensor weight_if, Tensor bias_if, "
      "Tensor active, int clock, Tensor every_hidden, Tensor every_reads, Tensor new_cell, Tensor new_memory, "
      "Tensor new_last_access, Tensor new_read_idx, Tensor new_read_w, Tensor new_write_idx, Tensor new_write_w, "
      "Tensor written_now, Tensor new_link_idx, Tensor new_link_w, Tensor new_precedence_idx, "
      "Tensor new_precedence_w, Tensor linked_now) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_sam_sequence", &ext_sam_sequence);
  m.impl("ext_sam_sequence_backward", &ext_sam_sequence_backward);
  m.impl("ext_sdnc_sequence", &ext_sdnc_sequence);
  m.impl("ext_sdnc_sequence_backward", &ext_sdnc_sequence_backward);
}

TORCH_LIBRARY_IMPL(sparsemem, Autograd, m) {
  m.impl("ext_sam_sequence", &sam_sequence_autograd);
  m.impl("ext_sdnc_sequence", &sdnc_sequence_autograd);
}

}  // namespace sparsemem
