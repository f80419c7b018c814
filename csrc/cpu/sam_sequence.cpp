// T steps of a SAM whose controller is an LSTM cell, forward and backward through time, in one op
// (reference/sam.py: sam_sequence_ref), over a dense copy of a small memory.
//
// Why: at the sizes most training happens (N <= a few thousand slots) a SAM step run from Python
// is a few hundred small calls (the cell, the interface Linear and its split, the LRU, the write
// through the journal, the index search, the read, their autograd nodes): 2-3 ms a step where the
// arithmetic is well under one. Here a step is the cell's two addmm's and, per batch row, the
// LRU's argmin, the J = R K + 1 rows written in place, a top-K scan of the rows written so far
// (an unwritten slot holds the zero word: cosine 0), the K rows read per head, and the accessed
// slots stamped; the backward walks the steps in reverse, putting back the rows each step
// overwrote, and the weights' gradients are one matrix product each over all T steps.
//
// The memory's state travels as dense tensors: memory [B, N, W], last_access [B, N] int64 (the
// step a slot was last accessed, 0 = never), written [B, N] bool, the read weights (slots and
// weights [B, R, K]) and the write weights (slots and weights [B, J]). sparsemem.models gathers
// them from the SAMState and stores back the rows this op wrote.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "lstm_cell.h"
#include "sparse_read.h"
#include "sparse_write.h"
#include "topk.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

constexpr double kDelta = 0.005;  // sparsemem/_constants.py: DELTA, the access threshold

// The interface [B, I], I = R W + R + W + 2: read keys, read strengths (oneplus), add, write gate
// alpha and interpolation gate gamma (sigmoid) (SAMMemory.split_interface).
struct Layout {
  int64_t R, W, K, strengths, add, gates, total, J;
  Layout(int64_t R, int64_t W, int64_t K)
      : R(R), W(W), K(K), strengths(R * W), add(R * W + R), gates(R * W + R + W), total(R * W + R + W + 2),
        J(R * K + 1) {}
};

// The op's inputs, in schema order.
struct Inputs {
  at::Tensor gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w,
      weight_rh, weight_if, bias_if, active;
  int64_t clock;
};

Inputs checked(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell, const at::Tensor& reads,
               const at::Tensor& memory, const at::Tensor& last_access, const at::Tensor& written,
               const at::Tensor& read_idx, const at::Tensor& read_w, const at::Tensor& write_idx,
               const at::Tensor& write_w, const at::Tensor& weight_rh, const at::Tensor& weight_if,
               const at::Tensor& bias_if, const at::Tensor& active, int64_t clock) {
  TORCH_CHECK(gates_x.dim() == 3 && gates_x.size(0) >= 1 && gates_x.size(2) % 4 == 0,
              "gates_x must be [T, B, 4H] with T >= 1; got ", gates_x.sizes());
  TORCH_CHECK(reads.dim() == 3 && memory.dim() == 3 && read_idx.dim() == 3,
              "reads must be [B, R, W], memory [B, N, W] and read_idx [B, R, K]");
  const auto T = gates_x.size(0), B = gates_x.size(1), H = gates_x.size(2) / 4, R = reads.size(1), W = reads.size(2);
  const auto N = memory.size(1), K = read_idx.size(2);
  const Layout l(R, W, K);
  TORCH_CHECK(K >= 1 && K <= N, "read_idx must be [B, R, K] with 1 <= K <= N=", N, "; got ", read_idx.sizes());
  const auto expect = [](const at::Tensor& x, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
    TORCH_CHECK(x.sizes() == shape, name, " must be ", shape, "; got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, "; got ", x.scalar_type());
  };
  const auto dtype = gates_x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "sam_sequence runs float32 and float64; got ", dtype);
  expect(hidden, "hidden", {B, H}, dtype);
  expect(cell, "cell", {B, H}, dtype);
  expect(reads, "reads", {B, R, W}, dtype);
  expect(memory, "memory", {B, N, W}, dtype);
  expect(last_access, "last_access", {B, N}, at::kLong);
  expect(written, "written", {B, N}, at::kBool);
  expect(read_idx, "read_idx", {B, R, K}, at::kLong);
  expect(read_w, "read_w", {B, R, K}, dtype);
  expect(write_idx, "write_idx", {B, l.J}, at::kLong);
  expect(write_w, "write_w", {B, l.J}, dtype);
  expect(weight_rh, "weight_rh", {4 * H, R * W + H}, dtype);
  expect(weight_if, "weight_if", {l.total, H}, dtype);
  expect(bias_if, "bias_if", {l.total}, dtype);
  expect(active, "active", {T, B}, at::kBool);
  for (const auto* slots : {&read_idx, &write_idx}) {
    const auto low = slots->min().item<int64_t>(), high = slots->max().item<int64_t>();
    TORCH_CHECK(0 <= low && high < N, "read_idx and write_idx must be slots in [0, N=", N, "); got [", low, ", ",
                high, "]");
  }
  Inputs in{gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx,
            write_w, weight_rh, weight_if, bias_if, active, clock};
  for (auto* x : {&in.gates_x, &in.hidden, &in.cell, &in.reads, &in.memory, &in.last_access, &in.written,
                  &in.read_idx, &in.read_w, &in.write_idx, &in.write_w, &in.weight_rh, &in.weight_if, &in.bias_if,
                  &in.active}) {
    *x = x->contiguous();
  }
  return in;
}

// What the backward reads, stacked over T: the controller input [r_{t-1} ; h_{t-1}], the squashed
// gates, the cell and its tanh, the interface before and after squashing; per batch row the write's
// J entries (slots, weights, their slot's total), the read weights they were made from, the rows
// the write overwrote, and the new read weights (slots, weights).
struct Tape {
  at::Tensor inputs, act, cells, tanh_cells, interface, squashed;
  at::Tensor write_idx, write_w, totals, previous_w, old_rows, read_idx, read_w;
};

// One step of one batch row's memory, in place (memory [N, W], stamps [N], written [N]): the
// LRU slot, the write (entries into write_idx / write_w / totals, overwritten rows into old_rows)
// where active, the top-K reads, and the accessed slots stamped `now` where active.
template <typename scalar_t>
void memory_step(const Layout& l, int64_t N, bool active, int64_t now, const scalar_t* squashed,
                 const int64_t* previous_idx, const scalar_t* previous_w, scalar_t* memory, int64_t* stamps,
                 bool* written, bool* written_now, int64_t* write_idx, scalar_t* write_w, scalar_t* totals,
                 scalar_t* old_rows, int64_t* read_idx, scalar_t* read_w, scalar_t* reads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = l.R, W = l.W, K = l.K, J = l.J, RK = R * K;
  const scalar_t* keys = squashed;
  const scalar_t* add = squashed + l.add;
  const scalar_t alpha = squashed[l.gates], gamma = squashed[l.gates + 1];
  // w^W = alpha (gamma mean_r w^R_{t-1} + (1 - gamma) I^U): one entry per (head, k) and the LRU
  const int64_t lru = std::min_element(stamps, stamps + N) - stamps;  // the first minimum
  for (int64_t j = 0; j < RK; ++j) {
    write_idx[j] = previous_idx[j];
    write_w[j] = alpha * gamma * previous_w[j] / scalar_t(R);
  }
  write_idx[RK] = lru;
  write_w[RK] = alpha * (scalar_t(1) - gamma);
  for (int64_t j = 0; j < J; ++j) {
    scalar_t total = 0;
    for (int64_t i = 0; i < J; ++i) total += write_idx[i] == write_idx[j] ? write_w[i] : scalar_t(0);
    totals[j] = total;
  }
  if (active) {
    for (int64_t j = 0; j < J; ++j) std::copy_n(memory + write_idx[j] * W, W, old_rows + j * W);
    for (int64_t j = 0; j < J; ++j) {
      if (std::find(write_idx, write_idx + j, write_idx[j]) != write_idx + j) continue;  // stored by its first
      scalar_t* row = memory + write_idx[j] * W;
      write_row<scalar_t, acc_t>(row, acc_t(totals[j]), add, write_idx[j] == lru, row, W);
      written[write_idx[j]] = written_now[write_idx[j]] = true;
    }
  }
  // Top K per head over the written rows; an unwritten slot scores D(key, 0) = 0, and only the
  // K lowest of them can place (ties go to the lowest slot).
  std::vector<acc_t> key(R * W), key_norm(R), score(K), sum(W);
  std::vector<Candidate<acc_t>> best(R * K);
  std::vector<int64_t> count(R, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < W; ++i) key[r * W + i] = acc_t(keys[r * W + i]);
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
    for (int64_t j = 0; j < K; ++j) read_idx[r * K + j] = best[r * K + j].slot;
    read_head<scalar_t, acc_t>(memory, read_idx + r * K, keys + r * W, acc_t(squashed[l.strengths + r]), K, W,
                               score.data(), sum.data(), read_w + r * K, reads + r * W);
  }
  if (!active) return;
  // a slot is accessed when its write plus read weight exceeds DELTA (over all its entries)
  const auto slot_of = [&](int64_t e) { return e < J ? write_idx[e] : read_idx[e - J]; };
  const auto weight_of = [&](int64_t e) { return e < J ? write_w[e] : read_w[e - J]; };
  for (int64_t e = 0; e < J + RK; ++e) {
    const int64_t slot = slot_of(e);
    bool first = true;
    for (int64_t i = 0; i < e && first; ++i) first = slot_of(i) != slot;
    if (!first) continue;
    scalar_t total = 0;
    for (int64_t i = e; i < J + RK; ++i) total += slot_of(i) == slot ? weight_of(i) : scalar_t(0);
    if (total > scalar_t(kDelta)) stamps[slot] = now;
  }
}

// -> (hidden [T, B, H], reads [T, B, R, W], cell, memory, last_access, read_idx, read_w, write_idx,
// write_w, written_now [B, N]: the slots this call wrote).
std::vector<at::Tensor> run_forward(const Inputs& in, Tape& tape) {
  const auto T = in.gates_x.size(0), B = in.gates_x.size(1), H = in.gates_x.size(2) / 4;
  const auto R = in.reads.size(1), W = in.reads.size(2), N = in.memory.size(1), K = in.read_idx.size(2);
  const Layout l(R, W, K);
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
  tape.previous_w = at::empty({T, B, R * K}, opts);
  tape.old_rows = at::empty({T, B, l.J, W}, opts);
  tape.read_idx = at::empty({T, B, R, K}, longs);
  tape.read_w = at::empty({T, B, R, K}, opts);
  auto hidden = at::empty({T, B, H}, opts), every_reads = at::empty({T, B, R, W}, opts);
  auto memory = in.memory.clone(), stamps = in.last_access.clone(), written = in.written.clone();
  auto written_now = at::zeros({B, N}, opts.dtype(at::kBool));
  auto read_idx = in.read_idx.clone(), read_w = in.read_w.clone();
  auto write_idx = in.write_idx.clone(), write_w = in.write_w.clone();
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
    tape.previous_w[t].copy_(read_w.view({B, R * K}));
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "sam_sequence_step", [&] {
      const bool* is_active = active_t.data_ptr<bool>();
      const scalar_t* x = interface.data_ptr<scalar_t>();
      scalar_t* y = squashed.data_ptr<scalar_t>();
      const int64_t* previous_idx = read_idx.data_ptr<int64_t>();
      const scalar_t* previous_w = tape.previous_w[t].data_ptr<scalar_t>();
      scalar_t* m = memory.data_ptr<scalar_t>();
      int64_t* stamp = stamps.data_ptr<int64_t>();
      bool *mark = written.data_ptr<bool>(), *mark_now = written_now.data_ptr<bool>();
      int64_t* write_slots = tape.write_idx[t].data_ptr<int64_t>();
      scalar_t* write_weights = tape.write_w[t].data_ptr<scalar_t>();
      scalar_t* totals = tape.totals[t].data_ptr<scalar_t>();
      scalar_t* old_rows = tape.old_rows[t].data_ptr<scalar_t>();
      int64_t* read_slots = tape.read_idx[t].data_ptr<int64_t>();
      scalar_t* read_weights = tape.read_w[t].data_ptr<scalar_t>();
      scalar_t* r_out = new_reads.data_ptr<scalar_t>();
      const int64_t I = l.total, J = l.J, RK = R * K;
      at::parallel_for(0, B, grain((R + 1) * N * W), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* row_in = x + b * I;
          scalar_t* row_out = y + b * I;
          std::copy_n(row_in, l.strengths, row_out);  // keys
          for (int64_t r = 0; r < R; ++r) row_out[l.strengths + r] = oneplus(row_in[l.strengths + r]);
          std::copy_n(row_in + l.add, W, row_out + l.add);
          memory_step<scalar_t>(l, N, is_active[b], in.clock + t + 1, row_out, previous_idx + b * RK,
                                previous_w + b * RK, m + b * N * W, stamp + b * N, mark + b * N, mark_now + b * N,
                                write_slots + b * J, write_weights + b * J, totals + b * J, old_rows + b * J * W,
                                read_slots + b * RK, read_weights + b * RK, r_out + b * R * W);
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
  return {hidden, every_reads, c.clone(), memory, stamps, read_idx, read_w, write_idx, write_w, written_now};
}

// The backward of one step's write for one batch row (active): grad_memory [N, W] holds the
// gradient of the rows after the write and leaves with the rows' before it; the entries' weights
// get their slot's total's gradient (plus grad_write_w, the gradient of the kept write weights),
// which goes to alpha, gamma and the read weights the entries came from (grad_previous_w, added).
template <typename scalar_t>
void write_backward(const Layout& l, const scalar_t* squashed, const int64_t* write_idx, const scalar_t* totals,
                    const scalar_t* previous_w, const scalar_t* grad_write_w, scalar_t* grad_memory,
                    scalar_t* grad_previous_w, scalar_t* grad_interface) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = l.R, W = l.W, J = l.J, RK = R * l.K;
  const scalar_t* add = squashed + l.add;
  const acc_t alpha = squashed[l.gates], gamma = squashed[l.gates + 1];
  const int64_t lru = write_idx[RK];
  std::vector<acc_t> grad_total(J, acc_t(0)), grad_add(W, acc_t(0));
  for (int64_t j = 0; j < J; ++j) {
    const int64_t first = std::find(write_idx, write_idx + j, write_idx[j]) - write_idx;
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
  for (int64_t j = 0; j < RK; ++j) {  // w_j = alpha gamma w^R_{t-1, j} / R
    const acc_t grad_w = grad_total[j] + acc_t(grad_write_w[j]);
    grad_alpha_gamma += grad_w * acc_t(previous_w[j]) / acc_t(R);
    grad_previous_w[j] += scalar_t(grad_w * alpha * gamma / acc_t(R));
  }
  const acc_t grad_lru_w = grad_total[RK] + acc_t(grad_write_w[RK]);  // alpha (1 - gamma)
  const acc_t grad_alpha = grad_alpha_gamma * gamma + grad_lru_w * (acc_t(1) - gamma);
  const acc_t grad_gamma = grad_alpha_gamma * alpha - grad_lru_w * alpha;
  for (int64_t i = 0; i < W; ++i) grad_interface[l.add + i] = scalar_t(grad_add[i]);
  grad_interface[l.gates] = scalar_t(grad_alpha);
  grad_interface[l.gates + 1] = scalar_t(grad_gamma);
}

// grads: one per output (defined or not); -> one grad per input (none for the integer inputs).
std::vector<at::Tensor> run_backward(const std::vector<at::Tensor>& grads, const Inputs& in, const Tape& tape,
                                     const std::vector<at::Tensor>& out) {
  const auto T = in.gates_x.size(0), B = in.gates_x.size(1), H = in.gates_x.size(2) / 4;
  const auto R = in.reads.size(1), W = in.reads.size(2), N = in.memory.size(1), K = in.read_idx.size(2);
  const Layout l(R, W, K);
  const auto opts = in.gates_x.options();
  const auto or_zeros = [&](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? g.contiguous().clone() : at::zeros_like(like);
  };
  const auto& hidden = out[0];
  const auto grad_hidden = or_zeros(grads[0], out[0]), grad_reads = or_zeros(grads[1], out[1]);
  auto grad_c = or_zeros(grads[2], out[2]), grad_memory = or_zeros(grads[3], out[3]);
  auto grad_read_w = or_zeros(grads[6], out[6]), grad_write_w = or_zeros(grads[8], out[8]);
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
      grad_reads_t = grad_reads_t.contiguous(), grad_read_w = grad_read_w.contiguous();
      grad_write_w = grad_write_w.contiguous();
    }
    auto grad_previous_w = at::zeros({B, R * K}, opts);
    auto grad_interface_t = grad_interface[t];
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "sam_sequence_step_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bool* is_active = active_t.data_ptr<bool>();
      const scalar_t* squashed_t = tape.squashed[t].data_ptr<scalar_t>();
      const scalar_t* interface_t = tape.interface[t].data_ptr<scalar_t>();
      const int64_t* write_slots = tape.write_idx[t].data_ptr<int64_t>();
      const scalar_t* totals = tape.totals[t].data_ptr<scalar_t>();
      const scalar_t* previous_w = tape.previous_w[t].data_ptr<scalar_t>();
      const scalar_t* old_rows = tape.old_rows[t].data_ptr<scalar_t>();
      const int64_t* read_slots = tape.read_idx[t].data_ptr<int64_t>();
      const scalar_t* read_weights = tape.read_w[t].data_ptr<scalar_t>();
      const scalar_t* g_read_w = grad_read_w.data_ptr<scalar_t>();
      const scalar_t* g_reads = grad_reads_t.data_ptr<scalar_t>();
      const scalar_t* g_write_w = grad_write_w.data_ptr<scalar_t>();
      scalar_t* m = memory.data_ptr<scalar_t>();
      scalar_t* g_m = grad_memory.data_ptr<scalar_t>();
      scalar_t* g_previous_w = grad_previous_w.data_ptr<scalar_t>();
      scalar_t* g_interface = grad_interface_t.data_ptr<scalar_t>();
      const int64_t I = l.total, J = l.J, RK = R * K;
      at::parallel_for(0, B, grain(6 * R * K * W + J * W), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> similarity(K), upstream(K), grad_key(W);
        for (int64_t b = begin; b < end; ++b) {
          if (!is_active[b]) continue;
          const scalar_t* squashed = squashed_t + b * I;
          scalar_t* memory_row0 = m + b * N * W;
          scalar_t* grad_row0 = g_m + b * N * W;
          scalar_t* grad_if = g_interface + b * I;
          // the read came after the write: its backward first, on the rows after the write
          for (int64_t r = 0; r < R; ++r) {
            const int64_t head = b * R + r;
            read_head_backward<scalar_t, acc_t>(memory_row0, grad_row0, read_slots + head * K, squashed + r * W,
                                                acc_t(squashed[l.strengths + r]), read_weights + head * K,
                                                g_read_w + head * K, g_reads + head * W, K, W, similarity.data(),
                                                upstream.data(), grad_key.data(), grad_if + r * W,
                                                grad_if + l.strengths + r);
            grad_if[l.strengths + r] = oneplus_backward(interface_t[b * I + l.strengths + r], grad_if[l.strengths + r]);
          }
          write_backward<scalar_t>(l, squashed, write_slots + b * J, totals + b * J, previous_w + b * RK,
                                   g_write_w + b * J, grad_row0, g_previous_w + b * RK, grad_if);
          for (const int64_t gate : {l.gates, l.gates + 1}) {
            grad_if[gate] *= squashed[gate] * (scalar_t(1) - squashed[gate]);
          }
          // the rows before the write, for the step before
          for (int64_t j = 0; j < J; ++j) {
            std::copy_n(old_rows + (b * J + j) * W, W, memory_row0 + write_slots[b * J + j] * W);
          }
        }
      });
    });
    grad_read_w = grad_previous_w.view({B, R, K});
    if (every) {
      grad_write_w.zero_();  // the step's write weights replaced the ones before it in every row
    } else {
      grad_write_w = direct[1], grad_read_w = grad_read_w + direct[0];
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
  return {grad_gates_x,
          grad_h,
          grad_c,
          grad_r,
          grad_memory,
          none,
          none,
          none,
          grad_read_w,
          none,
          grad_write_w,
          every_gates.t().mm(tape.inputs.view({T * B, R * W + H})),
          every_interface.t().mm(hidden.view({T * B, H})),
          every_interface.sum(0)};
}

constexpr int64_t kInputs = 15, kOutputs = 10, kTapeTensors = 13;

std::vector<at::Tensor> tape_tensors(const Tape& tape) {
  return {tape.inputs,    tape.act,    tape.cells,      tape.tanh_cells, tape.interface,
          tape.squashed,  tape.write_idx, tape.write_w, tape.totals,     tape.previous_w,
          tape.old_rows,  tape.read_idx, tape.read_w};
}

Tape tape_of(const at::Tensor* s) {
  return {s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11], s[12]};
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;

Outputs as_tuple(const std::vector<at::Tensor>& o) {
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9]};
}

}  // namespace

Outputs ext_sam_sequence(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell,
                         const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& last_access,
                         const at::Tensor& written, const at::Tensor& read_idx, const at::Tensor& read_w,
                         const at::Tensor& write_idx, const at::Tensor& write_w, const at::Tensor& weight_rh,
                         const at::Tensor& weight_if, const at::Tensor& bias_if, const at::Tensor& active,
                         int64_t clock) {
  Tape tape;
  return as_tuple(run_forward(checked(gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w,
                                      write_idx, write_w, weight_rh, weight_if, bias_if, active, clock),
                              tape));
}

// The backward of the registered custom op (torch.compile, opcheck, ops/_define.py's convention:
// grads, inputs, outputs): it runs the forward again for its tape. Eager calls take the C++ node
// below, which keeps the tape from its forward.
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
  const auto in = checked(gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx,
                          write_w, weight_rh, weight_if, bias_if, active, clock);
  Tape tape;
  const auto out = run_forward(in, tape);
  const at::Tensor none;
  auto grads = run_backward({grad_hidden, grad_reads, grad_cell, grad_memory, none, none, grad_read_w, none,
                             grad_write_w, none},
                            in, tape, out);
  // one per differentiable input: gates_x, hidden, cell, reads, memory, read_w, write_w, weight_rh,
  // weight_if, bias_if
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[8], grads[10], grads[11], grads[12], grads[13]};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One C++ node for the whole sequence. Saved: the inputs, the outputs and the tape.
struct SamSequence : public torch::autograd::Function<SamSequence> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gates_x, const at::Tensor& hidden,
                               const at::Tensor& cell, const at::Tensor& reads, const at::Tensor& memory,
                               const at::Tensor& last_access, const at::Tensor& written, const at::Tensor& read_idx,
                               const at::Tensor& read_w, const at::Tensor& write_idx, const at::Tensor& write_w,
                               const at::Tensor& weight_rh, const at::Tensor& weight_if, const at::Tensor& bias_if,
                               const at::Tensor& active, int64_t clock) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto in = checked(gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx,
                            write_w, weight_rh, weight_if, bias_if, active, clock);
    ctx->saved_data["clock"] = clock;
    Tape tape;
    auto out = run_forward(in, tape);
    ctx->mark_non_differentiable({out[4], out[5], out[7], out[9]});
    variable_list saved{in.gates_x, in.hidden,    in.cell,     in.reads,     in.memory,
                        in.last_access, in.written, in.read_idx, in.read_w, in.write_idx,
                        in.write_w, in.weight_rh, in.weight_if, in.bias_if,  in.active};
    saved.insert(saved.end(), out.begin(), out.end());
    const auto taped = tape_tensors(tape);
    saved.insert(saved.end(), taped.begin(), taped.end());
    ctx->save_for_backward(saved);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    const Inputs in{s[0], s[1], s[2],  s[3],  s[4],  s[5],  s[6], s[7],
                    s[8], s[9], s[10], s[11], s[12], s[13], s[14], ctx->saved_data["clock"].toInt()};
    const std::vector<at::Tensor> out(s.begin() + kInputs, s.begin() + kInputs + kOutputs);
    auto input_grads = run_backward(grads, in, tape_of(&s[kInputs + kOutputs]), out);
    input_grads.resize(kInputs + 1);  // active and clock: no gradient
    return input_grads;
  }
};

Outputs sam_sequence_autograd(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell,
                              const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& last_access,
                              const at::Tensor& written, const at::Tensor& read_idx, const at::Tensor& read_w,
                              const at::Tensor& write_idx, const at::Tensor& write_w, const at::Tensor& weight_rh,
                              const at::Tensor& weight_if, const at::Tensor& bias_if, const at::Tensor& active,
                              int64_t clock) {
  const std::array<const at::Tensor*, 10> floats = {&gates_x, &hidden, &cell,      &reads,     &memory,
                                                    &read_w,  &write_w, &weight_rh, &weight_if, &bias_if};
  const auto takes_grad = [](const at::Tensor* x) { return x->requires_grad(); };
  const bool needs_grad = at::GradMode::is_enabled() && std::any_of(floats.begin(), floats.end(), takes_grad);
  if (!needs_grad) {  // no backward will come: the kernel alone
    at::AutoDispatchBelowADInplaceOrView guard;
    return ext_sam_sequence(gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx,
                            write_w, weight_rh, weight_if, bias_if, active, clock);
  }
  return as_tuple(SamSequence::apply(gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w,
                                     write_idx, write_w, weight_rh, weight_if, bias_if, active, clock));
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
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_sam_sequence", &ext_sam_sequence);
  m.impl("ext_sam_sequence_backward", &ext_sam_sequence_backward);
}

TORCH_LIBRARY_IMPL(sparsemem, Autograd, m) { m.impl("ext_sam_sequence", &sam_sequence_autograd); }

}  // namespace sparsemem
