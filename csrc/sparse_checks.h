// Host-side input checks of the sparse ops, shared by the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda), which add their device checks after these. Plain C++ (no device code).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparsemem {

// sparse_read: memory [B, N, W], indices [B, R, K] int64, keys [B, R, W], strengths [B, R].
inline void check_sparse_read_inputs(const at::Tensor& memory, const at::Tensor& indices, const at::Tensor& keys,
                                     const at::Tensor& strengths) {
  TORCH_CHECK(memory.dim() == 3 && indices.dim() == 3 && keys.dim() == 3 && strengths.dim() == 2,
              "memory must be [B, N, W], indices [B, R, K], keys [B, R, W] and strengths [B, R]");
  const int64_t B = memory.size(0), R = keys.size(1);
  TORCH_CHECK(keys.size(0) == B && keys.size(2) == memory.size(2), "keys must be [B, R, W] matching memory");
  TORCH_CHECK(indices.size(0) == B && indices.size(1) == R, "indices must be [B, R, K] matching keys");
  TORCH_CHECK(strengths.size(0) == B && strengths.size(1) == R, "strengths must be [B, R] matching keys");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(memory.scalar_type() == keys.scalar_type() && memory.scalar_type() == strengths.scalar_type(),
              "memory, keys and strengths must share a dtype");
}

// The write of sparse_write and journaled_write on B x J rows of W: weights [B, J], add [B, W],
// erase_rows [B, J] bool, weights and add of the rows' dtype.
inline void check_write_inputs(int64_t B, int64_t J, int64_t W, at::ScalarType dtype, const at::Tensor& weights,
                               const at::Tensor& add, const at::Tensor& erase_rows) {
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == J, "weights must be [B, J] = [", B,
              ", ", J, "]");
  TORCH_CHECK(add.dim() == 2 && add.size(0) == B && add.size(1) == W, "add must be [B, W] = [", B, ", ", W, "]");
  TORCH_CHECK(erase_rows.dim() == 2 && erase_rows.size(0) == B && erase_rows.size(1) == J,
              "erase_rows must be [B, J] = [", B, ", ", J, "]");
  TORCH_CHECK(erase_rows.scalar_type() == at::kBool, "erase_rows must be bool");
  TORCH_CHECK(weights.scalar_type() == dtype && add.scalar_type() == dtype, "rows, weights and add must share a dtype");
}

// sparse_write: rows [B, J, W] gathered, with the write's inputs.
inline void check_sparse_write_inputs(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& add,
                                      const at::Tensor& erase_rows) {
  TORCH_CHECK(rows.dim() == 3, "rows must be [B, J, W]");
  check_write_inputs(rows.size(0), rows.size(1), rows.size(2), rows.scalar_type(), weights, add, erase_rows);
}

// journaled_write's store: rows [M, W] and written [M] bool (both contiguous, written in place),
// initial_word [W] of the rows' dtype, keys [B, J] int64; then the write's inputs.
inline void check_journaled_write_inputs(const at::Tensor& rows, const at::Tensor& written,
                                         const at::Tensor& initial_word, const at::Tensor& keys,
                                         const at::Tensor& weights, const at::Tensor& add,
                                         const at::Tensor& erase_rows) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), "rows must be a contiguous [M, W] store");
  TORCH_CHECK(written.dim() == 1 && written.is_contiguous() && written.scalar_type() == at::kBool,
              "written must be a contiguous [M] bool mask");
  TORCH_CHECK(keys.dim() == 2 && keys.scalar_type() == at::kLong, "keys must be [B, J] int64");
  const int64_t W = rows.size(1);
  TORCH_CHECK(initial_word.dim() == 1 && initial_word.size(0) == W, "initial_word must be [W] matching rows");
  TORCH_CHECK(initial_word.scalar_type() == rows.scalar_type(), "initial_word must share the dtype of rows");
  check_write_inputs(keys.size(0), keys.size(1), W, rows.scalar_type(), weights, add, erase_rows);
}

}  // namespace sparsemem
