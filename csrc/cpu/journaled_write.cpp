// SAM's write done in place on the memory's row store, on the CPU (sparsemem.ops.journaled_write,
// the step of the sparse memory's journal): ext_journaled_write gathers the J old rows of each batch
// row (the journal entry autograd keeps), computes the new rows with sparse_write's write_row,
// stores them and marks them written. It mutates its inputs, so it has no autograd formula of its
// own (torch 2.13); ext_journaled_write_backward works on the journal's row-keyed gradient buffer
// around the same backward body (write_backward_rows) as ext_sparse_write's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../sparse_checks.h"
#include "sparse_write.h"

namespace sparsemem {

// rows [M, W] (the store, written in place), written [M'] bool (set at every key), initial_word [W],
// keys [B, J] int64 in [0, min(M, M')), weights [B, J], add [B, W], erase_rows [B, J] bool
// -> (old rows [B, J, W]: rows[key] where written[key], else initial_word; new rows [B, J, W];
//     fresh [B, J] bool: the first entry of each key that was not written before, so the caller
//     can log the rows a reset must clear without a unique).
// A key repeated within a batch row must carry identical weights and erase (SAM's group sums):
// every old row is read before any is written, and the repeats store the same new row. Keys of
// different batch rows must differ (b*N + slot), so batch rows run in parallel without races.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_journaled_write(at::Tensor& rows, at::Tensor& written,
                                                       const at::Tensor& initial_word_in, const at::Tensor& keys_in,
                                                       const at::Tensor& weights_in, const at::Tensor& add_in,
                                                       const at::Tensor& erase_rows_in) {
  check_journaled_write_inputs(rows, written, initial_word_in, keys_in, weights_in, add_in, erase_rows_in);
  const int64_t B = keys_in.size(0), J = keys_in.size(1), W = rows.size(1);
  const auto keys = keys_in.contiguous(), weights = weights_in.contiguous(), add = add_in.contiguous();
  const auto erase_rows = erase_rows_in.contiguous(), initial_word = initial_word_in.contiguous();
  const int64_t limit = std::min(rows.size(0), written.size(0));
  const int64_t* key = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * J; ++i) {
    TORCH_CHECK(key[i] >= 0 && key[i] < limit, "keys must lie in [0, ", limit, "); got ", key[i]);
  }
  auto old_rows = at::empty({B, J, W}, rows.options());
  auto new_rows = at::empty({B, J, W}, rows.options());
  auto fresh_rows = at::empty({B, J}, written.options());
  bool* mark = written.data_ptr<bool>();
  bool* fresh = fresh_rows.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "ext_journaled_write", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* store = rows.data_ptr<scalar_t>();
    const scalar_t* initial = initial_word.data_ptr<scalar_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    const scalar_t* v = add.data_ptr<scalar_t>();
    const bool* erase = erase_rows.data_ptr<bool>();
    scalar_t* old = old_rows.data_ptr<scalar_t>();
    scalar_t* out = new_rows.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(J * W), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        // Gather every old row first: a repeated key must not read a row this call already wrote.
        for (int64_t row = b * J; row < (b + 1) * J; ++row) {
          const scalar_t* source = mark[key[row]] ? store + key[row] * W : initial;
          std::copy(source, source + W, old + row * W);
        }
        for (int64_t row = b * J; row < (b + 1) * J; ++row) {
          scalar_t* updated = out + row * W;
          write_row<scalar_t, acc_t>(old + row * W, acc_t(w[row]), v + b * W, erase[row], updated, W);
          std::copy(updated, updated + W, store + key[row] * W);
          fresh[row] = !mark[key[row]];  // a repeat finds its key marked by its first entry
          mark[key[row]] = true;
        }
      }
    });
  });
  return {old_rows, new_rows, fresh_rows};
}

// The backward of ext_journaled_write on the row-keyed gradient buffer of the sparse memory's journal:
// grad_buffer [P, W] (in place), positions [B, J] int64 (each key's row in it), first [B, J] bool
// (one entry per distinct key), weights, add, erase_rows as in the forward -> (grad weights [B, J],
// grad add [B, W]). Per batch row, the three steps of sparsemem.ops.journaled_write's composed
// backward in one pass: g = buffer[positions] * first; buffer[positions] = 0; the write's backward
// of g (write_backward_rows); buffer[positions] += grad rows, in order of j.
std::tuple<at::Tensor, at::Tensor> ext_journaled_write_backward(at::Tensor& grad_buffer,
                                                                const at::Tensor& positions_in,
                                                                const at::Tensor& first_in,
                                                                const at::Tensor& weights_in, const at::Tensor& add_in,
                                                                const at::Tensor& erase_rows_in) {
  TORCH_CHECK(grad_buffer.dim() == 2 && grad_buffer.is_contiguous(), "grad_buffer must be a contiguous [P, W]");
  TORCH_CHECK(positions_in.dim() == 2 && positions_in.scalar_type() == at::kLong, "positions must be [B, J] int64");
  const int64_t B = positions_in.size(0), J = positions_in.size(1), W = grad_buffer.size(1);
  TORCH_CHECK(first_in.dim() == 2 && first_in.size(0) == B && first_in.size(1) == J && first_in.scalar_type() == at::kBool,
              "first must be [B, J] bool matching positions");
  check_write_inputs(B, J, W, grad_buffer.scalar_type(), weights_in, add_in, erase_rows_in);
  const auto positions = positions_in.contiguous(), first = first_in.contiguous(), weights = weights_in.contiguous();
  const auto add = add_in.contiguous(), erase_rows = erase_rows_in.contiguous();
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * J; ++i) {
    TORCH_CHECK(position[i] >= 0 && position[i] < grad_buffer.size(0), "positions must lie in [0, ",
                grad_buffer.size(0), "); got ", position[i]);
  }
  auto grad_weights = at::empty_like(weights);
  auto grad_add = at::empty_like(add);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_buffer.scalar_type(), "ext_journaled_write_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* buffer = grad_buffer.data_ptr<scalar_t>();
    const bool* once = first.data_ptr<bool>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    const scalar_t* v = add.data_ptr<scalar_t>();
    const bool* erase = erase_rows.data_ptr<bool>();
    scalar_t* grad_w = grad_weights.data_ptr<scalar_t>();
    scalar_t* grad_v = grad_add.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(J * W), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> grad_new(J * W), grad_old(J * W);
      std::vector<acc_t> sum(W);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* at = position + b * J;
        for (int64_t j = 0; j < J; ++j) {
          // x * first as torch computes it (x * 0 keeps the sign of zero and NaN of x)
          const scalar_t keep = once[b * J + j] ? scalar_t(1) : scalar_t(0);
          const scalar_t* row = buffer + at[j] * W;
          for (int64_t i = 0; i < W; ++i) grad_new[j * W + i] = row[i] * keep;
        }
        for (int64_t j = 0; j < J; ++j) std::fill(buffer + at[j] * W, buffer + (at[j] + 1) * W, scalar_t(0));
        write_backward_rows<scalar_t, acc_t>(grad_new.data(), w + b * J, v + b * W, erase + b * J, grad_old.data(),
                                             grad_w + b * J, grad_v + b * W, sum.data(), J, W);
        for (int64_t j = 0; j < J; ++j) {
          scalar_t* row = buffer + at[j] * W;
          for (int64_t i = 0; i < W; ++i) row[i] += grad_old[j * W + i];
        }
      }
    });
  });
  return {grad_weights, grad_add};
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def(
      "ext_journaled_write_backward(Tensor(a!) grad_buffer, Tensor positions, Tensor first, Tensor weights, "
      "Tensor add, Tensor erase_rows) -> (Tensor, Tensor)");
  m.def(
      "ext_journaled_write(Tensor(a!) rows, Tensor(b!) written, Tensor initial_word, Tensor keys, Tensor weights, "
      "Tensor add, Tensor erase_rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_journaled_write", &ext_journaled_write);
  m.impl("ext_journaled_write_backward", &ext_journaled_write_backward);
}

}  // namespace sparsemem
