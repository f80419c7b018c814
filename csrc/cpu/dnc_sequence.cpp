// T steps of a DNC whose controller is an LSTM cell, forward and backward through time, in one op
// (reference/dnc.py: dnc_sequence_ref).
//
// Why: at the sizes a DNC trains at (B = 32, N = 16-64, hidden 128) a step's arithmetic is two
// small matrix products and a few microseconds of memory kernels, while the step run from Python
// (LSTMCell, the interface Linear and its split, three memory ops, their autograd nodes) costs
// several times that in calls. Here each step is two addmm's, the cell's and the interface's
// squashing, and the step's three kernels (dnc.cpp, links.cpp); the backward walks the steps in
// reverse calling their backward kernels, and the weights' gradients are one matrix product each
// over all T steps.
//
// The backward reads the N x N link before every step. The tape keeps the link before every
// checkpoint_every-th step and the backward rebuilds the others from it, a segment at a time, with
// link_update (bit for bit the links link_update_reads made) from the precedence and write weights
// each step keeps: about T / k + k links instead of T, for k - 1 link updates more per k steps
// (sparsemem.models picks k from DNCMemory.sequence_link_bytes; 1 keeps every link).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "dnc.h"
#include "lstm_cell.h"

namespace sparsemem {

namespace {

// The interface's ten parts in order (DNCMemory.split_interface): read keys R*W, read strengths R,
// write key W, write strength 1, erase W, write vector W, free gates R, allocation gate 1, write
// gate 1, read modes 3R.
enum Part { kReadKeys, kReadStrengths, kWriteKey, kWriteStrength, kErase, kAdd, kFreeGates, kAllocationGate,
            kWriteGate, kReadModes, kParts };
enum Squash { kIdentity, kOneplus, kSigmoid, kSoftmax3 };
constexpr std::array<Squash, kParts> kSquash = {kIdentity, kOneplus, kIdentity, kOneplus, kSigmoid,
                                                kIdentity, kSigmoid, kSigmoid, kSigmoid, kSoftmax3};

struct Layout {
  int64_t B, R, W, size[kParts], offset[kParts], total;

  Layout(int64_t B, int64_t R, int64_t W) : B(B), R(R), W(W) {
    const int64_t sizes[kParts] = {R * W, R, W, 1, W, W, R, 1, 1, 3 * R};
    total = 0;
    for (int p = 0; p < kParts; ++p) {
      size[p] = sizes[p];
      offset[p] = total;
      total += sizes[p];
    }
  }

  // Part p of a squashed interface stored part after part ([B, size] each, contiguous), in the
  // shape the memory kernels take.
  at::Tensor part(const at::Tensor& squashed, int p) const {
    const auto flat = squashed.narrow(0, B * offset[p], B * size[p]);
    switch (p) {
      case kReadKeys: return flat.view({B, R, W});
      case kWriteKey: return flat.view({B, 1, W});
      case kReadModes: return flat.view({B, R, 3});
      default: return flat.view({B, size[p]});
    }
  }
};

// interface [B, I] and its sigmoid (torch's, vectorised) -> squashed [B * I], part after part.
template <typename scalar_t>
void squash_forward(const Layout& l, const scalar_t* interface, const scalar_t* sigmoid_of, scalar_t* squashed) {
  const int64_t I = l.total;
  for (int p = 0; p < kParts; ++p) {
    const int64_t size = l.size[p], offset = l.offset[p];
    for (int64_t b = 0; b < l.B; ++b) {
      const scalar_t* x = interface + b * I + offset;
      const scalar_t* sx = sigmoid_of + b * I + offset;
      scalar_t* y = squashed + l.B * offset + b * size;
      switch (kSquash[p]) {
        case kIdentity:
          for (int64_t j = 0; j < size; ++j) y[j] = x[j];
          break;
        case kOneplus:
          for (int64_t j = 0; j < size; ++j) y[j] = oneplus(x[j]);
          break;
        case kSigmoid:
          for (int64_t j = 0; j < size; ++j) y[j] = sx[j];
          break;
        case kSoftmax3:
          for (int64_t j = 0; j < size; j += 3) {
            const scalar_t top = std::max(x[j], std::max(x[j + 1], x[j + 2]));
            const scalar_t e0 = std::exp(x[j] - top), e1 = std::exp(x[j + 1] - top), e2 = std::exp(x[j + 2] - top);
            const scalar_t sum = e0 + e1 + e2;
            y[j] = e0 / sum;
            y[j + 1] = e1 / sum;
            y[j + 2] = e2 / sum;
          }
          break;
      }
    }
  }
}

// The gradient of the interface [B, I] from the parts' gradients (grads[p]: [B, size] contiguous).
template <typename scalar_t>
void squash_backward(const Layout& l, const scalar_t* interface, const scalar_t* squashed,
                     const std::array<const scalar_t*, kParts>& grads, scalar_t* grad_interface) {
  const int64_t I = l.total;
  for (int p = 0; p < kParts; ++p) {
    const int64_t size = l.size[p], offset = l.offset[p];
    for (int64_t b = 0; b < l.B; ++b) {
      const scalar_t* x = interface + b * I + offset;
      const scalar_t* y = squashed + l.B * offset + b * size;
      const scalar_t* g = grads[p] + b * size;
      scalar_t* dx = grad_interface + b * I + offset;
      switch (kSquash[p]) {
        case kIdentity:
          for (int64_t j = 0; j < size; ++j) dx[j] = g[j];
          break;
        case kOneplus:
          for (int64_t j = 0; j < size; ++j) dx[j] = oneplus_backward(x[j], g[j]);
          break;
        case kSigmoid:
          for (int64_t j = 0; j < size; ++j) dx[j] = g[j] * y[j] * (scalar_t(1) - y[j]);
          break;
        case kSoftmax3:  // dx = y (g - sum y g)
          for (int64_t j = 0; j < size; j += 3) {
            const scalar_t dot = y[j] * g[j] + y[j + 1] * g[j + 1] + y[j + 2] * g[j + 2];
            for (int64_t k = j; k < j + 3; ++k) dx[k] = y[k] * (g[k] - dot);
          }
          break;
      }
    }
  }
}

// The op's inputs, in schema order.
struct Inputs {
  at::Tensor gates_x, hidden, cell, reads, memory, usage, link, precedence, read_w, write_w, weight_rh, weight_if,
      bias_if, active;
  int64_t checkpoint_every;
};

Inputs checked(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell, const at::Tensor& reads,
               const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& link,
               const at::Tensor& precedence, const at::Tensor& read_w, const at::Tensor& write_w,
               const at::Tensor& weight_rh, const at::Tensor& weight_if, const at::Tensor& bias_if,
               const at::Tensor& active, int64_t checkpoint_every) {
  TORCH_CHECK(checkpoint_every >= 1, "checkpoint_every must be at least 1; got ", checkpoint_every);
  TORCH_CHECK(gates_x.dim() == 3 && gates_x.size(0) >= 1 && gates_x.size(2) % 4 == 0,
              "gates_x must be [T, B, 4H] with T >= 1; got ", gates_x.sizes());
  TORCH_CHECK(reads.dim() == 3 && memory.dim() == 3, "reads must be [B, R, W] and memory [B, N, W]");
  const auto B = gates_x.size(1), H = gates_x.size(2) / 4, R = reads.size(1), W = reads.size(2);
  const auto N = memory.size(1), I = Layout(B, R, W).total;
  const auto expect = [](const at::Tensor& x, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(x.sizes() == shape, name, " must be ", shape, "; got ", x.sizes());
  };
  expect(hidden, "hidden", {B, H});
  expect(cell, "cell", {B, H});
  expect(reads, "reads", {B, R, W});
  expect(memory, "memory", {B, N, W});
  expect(usage, "usage", {B, N});
  expect(link, "link", {B, N, N});
  expect(precedence, "precedence", {B, N});
  expect(read_w, "read_w", {B, R, N});
  expect(write_w, "write_w", {B, N});
  expect(weight_rh, "weight_rh", {4 * H, R * W + H});
  expect(weight_if, "weight_if", {I, H});
  expect(bias_if, "bias_if", {I});
  expect(active, "active", {gates_x.size(0), B});
  TORCH_CHECK(active.scalar_type() == at::kBool, "active must be bool; got ", active.scalar_type());
  Inputs in{gates_x,   hidden,    cell,    reads,   memory,
            usage,     link,      precedence, read_w, write_w,
            weight_rh, weight_if, bias_if, active.contiguous(), checkpoint_every};
  for (auto* x : {&in.gates_x, &in.hidden, &in.cell, &in.reads, &in.memory, &in.usage, &in.link, &in.precedence,
                  &in.read_w, &in.write_w, &in.weight_rh, &in.weight_if, &in.bias_if}) {
    TORCH_CHECK(x->scalar_type() == gates_x.scalar_type(), "every input of dnc_sequence must share one dtype");
    TORCH_CHECK(x->scalar_type() == at::kFloat || x->scalar_type() == at::kDouble,
                "dnc_sequence runs float32 and float64; got ", x->scalar_type());
    *x = x->contiguous();
  }
  return in;
}

// What the backward reads. Per step: the controller input [r_{t-1} ; h_{t-1}], the squashed gates,
// the cell (kept: a padded row's is the step before's) and the new cell's tanh, the interface
// before and after squashing (all stacked over T), the memory kernels' outputs (dnc_write's five,
// link_update_reads' four, dnc_read's three) and the state the step leaves (the kernels' outputs
// where every row is active).
constexpr int64_t kPerStep = 16;  // kLink: the link before the next step, where it is a checkpoint
enum StepOutput { kMemory, kUsage, kWriteW, kAllocation, kWriteContent, kLink, kPrecedence, kForward, kBackward,
                  kReads, kReadW, kReadContent, kKeptMemory, kKeptUsage, kKeptWriteW, kKeptReadW };

struct Tape {
  at::Tensor inputs, act, cells, tanh_cells, interface, squashed;  // [T, B, ...]
  std::vector<at::Tensor> steps;                       // T * kPerStep
};

// -> (hidden [T, B, H], reads [T, B, R, W], cell, memory, usage, link, precedence, read_w, write_w).
// record: keep the per-step tensors for a backward (without one, a step's tensors are freed as the
// next one runs: at 2^12 slots a tape of links and memories would double a no-grad forward's memory).
std::vector<at::Tensor> run_forward(const Inputs& in, Tape& tape, bool record) {
  const auto T = in.gates_x.size(0), B = in.gates_x.size(1), H = in.gates_x.size(2) / 4;
  const auto R = in.reads.size(1), W = in.reads.size(2);
  const Layout l(B, R, W);
  const auto opts = in.gates_x.options();
  tape.inputs = at::empty({T, B, R * W + H}, opts);
  tape.act = at::empty({T, B, 4 * H}, opts);
  tape.cells = at::empty({T, B, H}, opts);
  tape.tanh_cells = at::empty({T, B, H}, opts);
  tape.interface = at::empty({T, B, l.total}, opts);
  tape.squashed = at::empty({T, B * l.total}, opts);
  tape.steps.clear();
  tape.steps.reserve(record ? T * kPerStep : 0);
  auto hidden = at::empty({T, B, H}, opts), every_reads = at::empty({T, B, R, W}, opts);
  const auto weight_rh_t = in.weight_rh.t(), weight_if_t = in.weight_if.t();
  at::Tensor h = in.hidden, c = in.cell, reads = in.reads, memory = in.memory, usage = in.usage, link = in.link;
  at::Tensor precedence = in.precedence, read_w = in.read_w, write_w = in.write_w;
  const auto zero = at::zeros({}, opts);
  for (int64_t t = 0; t < T; ++t) {
    const auto active_t = in.active[t];
    const bool every = every_row(active_t);
    auto new_c = tape.cells[t], new_h = hidden[t];
    cell_step(in.gates_x[t], reads, h, c, weight_rh_t, tape.inputs[t], tape.act[t], new_c, tape.tanh_cells[t], new_h);
    auto interface = tape.interface[t];
    at::addmm_out(interface, in.bias_if, new_h, weight_if_t);
    const auto squashed = tape.squashed[t], sigmoid_of = at::sigmoid(interface);
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "dnc_sequence_squash", [&] {
      squash_forward<scalar_t>(l, interface.data_ptr<scalar_t>(), sigmoid_of.data_ptr<scalar_t>(),
                               squashed.data_ptr<scalar_t>());
    });
    auto [new_memory, new_usage, new_write_w, allocation, write_content] =
        ext_dnc_write(memory, usage, write_w, read_w, l.part(squashed, kFreeGates), l.part(squashed, kWriteKey),
                      l.part(squashed, kWriteStrength), l.part(squashed, kAllocationGate),
                      l.part(squashed, kWriteGate), l.part(squashed, kErase), l.part(squashed, kAdd));
    // A padded row writes nothing to the links: with w = 0 they stay as they were (DNCMemory.step)
    const auto link_writes = every ? new_write_w : rows_where(active_t, new_write_w, zero);
    auto [new_link, new_precedence, forward, backward] = ext_link_update_reads(link, precedence, link_writes, read_w);
    auto [new_reads, new_read_w, read_content] =
        ext_dnc_read(new_memory, l.part(squashed, kReadKeys), l.part(squashed, kReadStrengths),
                     l.part(squashed, kReadModes), backward, forward);
    // the link before step t + 1, kept when that step starts a segment (a checkpoint)
    const auto kept_link = (t + 1) % in.checkpoint_every == 0 && t + 1 < T ? new_link : at::Tensor();
    if (record) {
      tape.steps.insert(tape.steps.end(), {new_memory, new_usage, new_write_w, allocation, write_content, kept_link,
                                           new_precedence, forward, backward, new_reads, new_read_w, read_content});
    }
    if (every) {
      every_reads[t].copy_(new_reads);
      memory = new_memory, usage = new_usage, write_w = new_write_w, read_w = new_read_w;
    } else {
      every_reads[t].copy_(rows_where(active_t, new_reads, reads));
      new_h.copy_(rows_where(active_t, new_h, h));
      new_c.copy_(rows_where(active_t, new_c, c));
      memory = rows_where(active_t, new_memory, memory), usage = rows_where(active_t, new_usage, usage);
      write_w = rows_where(active_t, new_write_w, write_w), read_w = rows_where(active_t, new_read_w, read_w);
    }
    if (record) tape.steps.insert(tape.steps.end(), {memory, usage, write_w, read_w});
    h = new_h, c = new_c, reads = every_reads[t], link = new_link, precedence = new_precedence;
  }
  return {hidden, every_reads, c.clone(), memory, usage, link, precedence, read_w, write_w};
}

// grads: one per output (defined); -> one grad per input.
std::vector<at::Tensor> run_backward(const std::vector<at::Tensor>& grads, const Inputs& in, const Tape& tape,
                                     const at::Tensor& hidden) {
  const auto T = in.gates_x.size(0), B = in.gates_x.size(1), H = in.gates_x.size(2) / 4;
  const auto R = in.reads.size(1), W = in.reads.size(2), N = in.memory.size(1);
  const Layout l(B, R, W);
  const auto opts = in.gates_x.options();
  const auto grad_hidden = grads[0].contiguous(), grad_reads = grads[1].contiguous();
  auto grad_c = grads[2].contiguous().clone();
  at::Tensor grad_memory = grads[3], grad_usage = grads[4], grad_link = grads[5], grad_precedence = grads[6];
  at::Tensor grad_read_w = grads[7], grad_write_w = grads[8];
  auto grad_h = at::zeros({B, H}, opts), grad_r = at::zeros({B, R, W}, opts);
  const auto no_grad_allocation = at::zeros({B, N}, opts), no_grad_write_content = at::zeros({B, 1, N}, opts);
  const auto no_grad_read_content = at::zeros({B, R, N}, opts), zero = at::zeros({}, opts);
  auto grad_gates_x = at::empty({T, B, 4 * H}, opts), grad_interface = at::empty({T, B, l.total}, opts);
  const at::Tensor unused;
  // the state a step read: the step before's outputs, or the op's inputs for step 0
  const auto before = [&](int64_t t, StepOutput k, const at::Tensor& initial) -> const at::Tensor& {
    return t == 0 ? initial : tape.steps[(t - 1) * kPerStep + k];
  };
  // the write weights step t gave the links: none in its padded rows
  const auto link_writes_of = [&](int64_t t) {
    const auto& w = tape.steps[t * kPerStep + kWriteW];
    return every_row(in.active[t]) ? w : rows_where(in.active[t], w, zero);
  };
  // The link before step t: its segment's checkpoint, or rebuilt from it. The steps run backwards,
  // so the first one of a segment to ask rebuilds the links up to its own and the rest pop them.
  std::vector<at::Tensor> rebuilt;
  const auto link_before = [&](int64_t t) -> at::Tensor {
    const int64_t first = t - t % in.checkpoint_every;
    if (t == first) return before(t, kLink, in.link);
    if (rebuilt.empty()) {
      at::Tensor link = before(first, kLink, in.link);
      for (int64_t u = first; u < t; ++u) {
        link = std::get<0>(ext_link_update(link, before(u, kPrecedence, in.precedence), link_writes_of(u)));
        rebuilt.push_back(link);
      }
    }
    auto link = std::move(rebuilt.back());
    rebuilt.pop_back();
    return link;
  };
  for (int64_t t = T - 1; t >= 0; --t) {
    const auto* out = &tape.steps[t * kPerStep];
    const auto squashed = tape.squashed[t];
    const auto memory = before(t, kKeptMemory, in.memory), usage = before(t, kKeptUsage, in.usage);
    const auto write_w = before(t, kKeptWriteW, in.write_w), read_w = before(t, kKeptReadW, in.read_w);
    const auto link = link_before(t);
    const auto& precedence = before(t, kPrecedence, in.precedence);
    const auto active_t = in.active[t];
    const bool every = every_row(active_t);
    auto grad_reads_t = grad_reads[t] + grad_r, grad_h_t = grad_hidden[t] + grad_h;
    // the direct gradients of a padded step's kept rows: to the state before it
    std::vector<at::Tensor> direct;
    if (!every) {
      for (auto* g : {&grad_memory, &grad_usage, &grad_write_w, &grad_read_w, &grad_reads_t, &grad_h_t, &grad_c}) {
        direct.push_back(split_rows(active_t, *g, zero));
      }
    }
    const auto read = ext_dnc_read_backward(
        grad_reads_t, grad_read_w, no_grad_read_content, out[kMemory], l.part(squashed, kReadKeys),
        l.part(squashed, kReadStrengths), l.part(squashed, kReadModes), out[kBackward], out[kForward], out[kReads],
        out[kReadW], out[kReadContent]);
    // read: memory, read keys, read strengths, read modes, backward, forward
    const auto link_writes = link_writes_of(t);
    auto linked = ext_link_update_reads_backward(grad_link, grad_precedence, read[5], read[4], link, precedence,
                                                 link_writes, read_w, unused, unused, unused, unused);
    // linked: link, precedence, link_writes (this step's), read_w (the step before's)
    if (!every) linked[2] = rows_where(active_t, linked[2], zero);
    const auto written = ext_dnc_write_backward(
        grad_memory + read[0], grad_usage, grad_write_w + linked[2], no_grad_allocation, no_grad_write_content,
        memory, usage, write_w, read_w, l.part(squashed, kFreeGates), l.part(squashed, kWriteKey),
        l.part(squashed, kWriteStrength), l.part(squashed, kAllocationGate), l.part(squashed, kWriteGate),
        l.part(squashed, kErase), l.part(squashed, kAdd), out[kMemory], out[kUsage], out[kWriteW],
        out[kAllocation], out[kWriteContent]);
    // written: memory, usage, write_w, read_w, free gates, write key, write strength, allocation
    // gate, write gate, erase, add
    grad_memory = written[0], grad_usage = written[1], grad_write_w = written[2];
    grad_read_w = written[3] + linked[3], grad_link = linked[0], grad_precedence = linked[1];
    if (!every) {
      grad_memory = grad_memory + direct[0], grad_usage = grad_usage + direct[1];
      grad_write_w = grad_write_w + direct[2], grad_read_w = grad_read_w + direct[3];
    }
    std::array<at::Tensor, kParts> part_grads = {read[1], read[2], written[5], written[6], written[9],
                                                 written[10], written[4], written[7], written[8], read[3]};
    for (auto& g : part_grads) g = g.contiguous();
    auto grad_interface_t = grad_interface[t];
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "dnc_sequence_squash_backward", [&] {
      std::array<const scalar_t*, kParts> g;
      for (int p = 0; p < kParts; ++p) g[p] = part_grads[p].data_ptr<scalar_t>();
      squash_backward<scalar_t>(l, tape.interface[t].data_ptr<scalar_t>(), squashed.data_ptr<scalar_t>(), g,
                                grad_interface_t.data_ptr<scalar_t>());
    });
    grad_h_t = at::addmm(grad_h_t, grad_interface_t, in.weight_if);
    const auto c_prev = t == 0 ? in.cell : tape.cells[t - 1];
    std::tie(grad_r, grad_h) = cell_step_backward(tape.act[t], c_prev, tape.tanh_cells[t], grad_h_t, grad_c,
                                                  grad_gates_x[t], in.weight_rh, R, W);
    if (!every) {
      grad_r = grad_r + direct[4], grad_h = grad_h + direct[5];
      grad_c.add_(direct[6]);
    }
  }
  const auto every_gates = grad_gates_x.view({T * B, 4 * H}), every_interface = grad_interface.view({T * B, l.total});
  return {grad_gates_x,
          grad_h,
          grad_c,
          grad_r,
          grad_memory,
          grad_usage,
          grad_link,
          grad_precedence,
          grad_read_w,
          grad_write_w,
          every_gates.t().mm(tape.inputs.view({T * B, R * W + H})),
          every_interface.t().mm(hidden.view({T * B, H})),
          every_interface.sum(0)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ext_dnc_sequence(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell, const at::Tensor& reads,
                 const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& link,
                 const at::Tensor& precedence, const at::Tensor& read_w, const at::Tensor& write_w,
                 const at::Tensor& weight_rh, const at::Tensor& weight_if, const at::Tensor& bias_if,
                 const at::Tensor& active, int64_t checkpoint_every) {
  Tape tape;
  const auto out = run_forward(checked(gates_x, hidden, cell, reads, memory, usage, link, precedence, read_w, write_w,
                                       weight_rh, weight_if, bias_if, active, checkpoint_every),
                               tape, /*record=*/false);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

// The backward of the registered custom op (torch.compile, opcheck, ops/_define.py's convention:
// grads, inputs, outputs): it runs the forward again for its tape. Eager calls take the C++ node
// below, which keeps the tape from its forward.
std::vector<at::Tensor> ext_dnc_sequence_backward(
    const at::Tensor& grad_hidden, const at::Tensor& grad_reads, const at::Tensor& grad_cell,
    const at::Tensor& grad_memory, const at::Tensor& grad_usage, const at::Tensor& grad_link,
    const at::Tensor& grad_precedence, const at::Tensor& grad_read_w, const at::Tensor& grad_write_w,
    const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell, const at::Tensor& reads,
    const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& link, const at::Tensor& precedence,
    const at::Tensor& read_w, const at::Tensor& write_w, const at::Tensor& weight_rh, const at::Tensor& weight_if,
    const at::Tensor& bias_if, const at::Tensor& active, int64_t checkpoint_every, const at::Tensor& /*every_hidden*/,
    const at::Tensor& /*every_reads*/,
    const at::Tensor& /*new_cell*/, const at::Tensor& /*new_memory*/, const at::Tensor& /*new_usage*/,
    const at::Tensor& /*new_link*/, const at::Tensor& /*new_precedence*/, const at::Tensor& /*new_read_w*/,
    const at::Tensor& /*new_write_w*/) {
  const auto in = checked(gates_x, hidden, cell, reads, memory, usage, link, precedence, read_w, write_w, weight_rh,
                          weight_if, bias_if, active, checkpoint_every);
  Tape tape;
  const auto out = run_forward(in, tape, /*record=*/true);
  return run_backward({grad_hidden, grad_reads, grad_cell, grad_memory, grad_usage, grad_link, grad_precedence,
                       grad_read_w, grad_write_w},
                      in, tape, out[0]);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kInputs = 14, kOutputs = 9, kTapeStacks = 6;

// One C++ node for the whole sequence. Saved: the inputs, the outputs, the tape's stacks and its
// per-step tensors (the final state's are outputs, so autograd sees an in-place change to them).
struct DncSequence : public torch::autograd::Function<DncSequence> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gates_x, const at::Tensor& hidden,
                               const at::Tensor& cell, const at::Tensor& reads, const at::Tensor& memory,
                               const at::Tensor& usage, const at::Tensor& link, const at::Tensor& precedence,
                               const at::Tensor& read_w, const at::Tensor& write_w, const at::Tensor& weight_rh,
                               const at::Tensor& weight_if, const at::Tensor& bias_if, const at::Tensor& active,
                               int64_t checkpoint_every) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto in = checked(gates_x, hidden, cell, reads, memory, usage, link, precedence, read_w, write_w,
                            weight_rh, weight_if, bias_if, active, checkpoint_every);
    ctx->saved_data["checkpoint_every"] = checkpoint_every;
    Tape tape;
    auto out = run_forward(in, tape, /*record=*/true);
    variable_list saved{in.gates_x, in.hidden,  in.cell,    in.reads,     in.memory,    in.usage,    in.link,
                        in.precedence, in.read_w, in.write_w, in.weight_rh, in.weight_if, in.bias_if, in.active};
    saved.insert(saved.end(), out.begin(), out.end());
    saved.insert(saved.end(), {tape.inputs, tape.act, tape.cells, tape.tanh_cells, tape.interface, tape.squashed});
    saved.insert(saved.end(), tape.steps.begin(), tape.steps.end());
    ctx->save_for_backward(saved);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    const Inputs in{s[0], s[1],  s[2],  s[3],  s[4],  s[5],  s[6], s[7],
                    s[8], s[9], s[10], s[11], s[12], s[13], ctx->saved_data["checkpoint_every"].toInt()};
    const auto* stacks = &s[kInputs + kOutputs];
    Tape tape{stacks[0], stacks[1], stacks[2], stacks[3], stacks[4], stacks[5],
              std::vector<at::Tensor>(s.begin() + kInputs + kOutputs + kTapeStacks, s.end())};
    auto input_grads = run_backward(grads, in, tape, s[kInputs]);
    input_grads.resize(kInputs + 1);  // active and checkpoint_every: no gradient
    return input_grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dnc_sequence_autograd(const at::Tensor& gates_x, const at::Tensor& hidden, const at::Tensor& cell,
                      const at::Tensor& reads, const at::Tensor& memory, const at::Tensor& usage,
                      const at::Tensor& link, const at::Tensor& precedence, const at::Tensor& read_w,
                      const at::Tensor& write_w, const at::Tensor& weight_rh, const at::Tensor& weight_if,
                      const at::Tensor& bias_if, const at::Tensor& active, int64_t checkpoint_every) {
  const std::array<const at::Tensor*, 13> floats = {&gates_x, &hidden,  &cell,    &reads,     &memory,
                                                    &usage,   &link,    &precedence, &read_w, &write_w,
                                                    &weight_rh, &weight_if, &bias_if};
  const auto takes_grad = [](const at::Tensor* x) { return x->requires_grad(); };
  const bool needs_grad = at::GradMode::is_enabled() && std::any_of(floats.begin(), floats.end(), takes_grad);
  if (!needs_grad) {  // no backward will come: the kernel alone, which keeps no tape
    at::AutoDispatchBelowADInplaceOrView guard;
    return ext_dnc_sequence(gates_x, hidden, cell, reads, memory, usage, link, precedence, read_w, write_w, weight_rh,
                            weight_if, bias_if, active, checkpoint_every);
  }
  const auto o = DncSequence::apply(gates_x, hidden, cell, reads, memory, usage, link, precedence, read_w, write_w,
                                    weight_rh, weight_if, bias_if, active, checkpoint_every);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def(
      "ext_dnc_sequence(Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, Tensor memory, Tensor usage, "
      "Tensor link, Tensor precedence, Tensor read_w, Tensor write_w, Tensor weight_rh, Tensor weight_if, "
      "Tensor bias_if, Tensor active, int checkpoint_every) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "ext_dnc_sequence_backward(Tensor grad_hidden, Tensor grad_reads, Tensor grad_cell, Tensor grad_memory, "
      "Tensor grad_usage, Tensor grad_link, Tensor grad_precedence, Tensor grad_read_w, Tensor grad_write_w, "
      "Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, Tensor memory, Tensor usage, Tensor link, "
      "Tensor precedence, Tensor read_w, Tensor write_w, Tensor weight_rh, Tensor weight_if, Tensor bias_if, "
      "Tensor active, int checkpoint_every, Tensor every_hidden, Tensor every_reads, Tensor new_cell, "
      "Tensor new_memory, Tensor new_usage, Tensor new_link, Tensor new_precedence, Tensor new_read_w, "
      "Tensor new_write_w) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_dnc_sequence", &ext_dnc_sequence);
  m.impl("ext_dnc_sequence_backward", &ext_dnc_sequence_backward);
}

TORCH_LIBRARY_IMPL(sparsemem, Autograd, m) { m.impl("ext_dnc_sequence", &dnc_sequence_autograd); }

}  // namespace sparsemem
