// DNC temporal links on the GPU: link + precedence update, reads through the links, backward.
//
// Tiling: a block of 32 x 8 threads owns kRows = 32 rows i of one batch row's N x N matrix and
// walks the columns j in chunks of 32; thread (x, y) handles rows i0 + y + 8q (q < 4), column
// j0 + x, so a warp reads 32 contiguous values of a row. Sums along a row (over j) stay in
// registers and end in a warp shuffle; sums along a column (over i) meet in shared memory
// [8][32] per chunk and are written as this row block's partial, added by at::sum
// (deterministic, N / 32 partials per column). Every kernel reads each N x N input once.
#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace links_kernels {

constexpr int kRows = 32;  // rows per block
constexpr int kLanes = 32;  // columns per chunk (blockDim.x)
constexpr int kWarps = 8;  // blockDim.y
constexpr int kRowsPerThread = kRows / kWarps;
constexpr int kHeads = 4;  // read heads per launch of link_reads_kernel (registers per thread)

template <typename scalar_t, typename acc_t>
__global__ void link_update_kernel(const scalar_t* __restrict__ link, const scalar_t* __restrict__ write_w,
                                   const scalar_t* __restrict__ precedence, scalar_t* __restrict__ new_link,
                                   int64_t total, int64_t N) {
  // L'[i, j] = (1 - w_i - w_j) L[i, j] + w_i p_j, L'[i, i] = 0: one thread per element, grid-stride.
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = index % N, i = (index / N) % N, b = index / (N * N);
    const acc_t w_i = write_w[b * N + i], w_j = write_w[b * N + j];
    const acc_t value = (1 - w_i - w_j) * acc_t(link[index]) + w_i * acc_t(precedence[b * N + j]);
    new_link[index] = scalar_t(i == j ? acc_t(0) : value);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void precedence_kernel(const scalar_t* __restrict__ precedence, const scalar_t* __restrict__ write_w,
                                  scalar_t* __restrict__ new_precedence, int64_t N) {
  // p' = (1 - sum w) p + w: one block per batch row; the sum over N meets in shared memory.
  __shared__ acc_t warp_sums[32];
  const int64_t b = blockIdx.x;
  acc_t total = 0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) total += acc_t(write_w[b * N + n]);
  total = warp_sum(total);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = total;
  __syncthreads();
  total = 0;
  for (int k = 0; k < int(blockDim.x / kWarp); ++k) total += warp_sums[k];
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    new_precedence[b * N + n] = scalar_t((1 - total) * acc_t(precedence[b * N + n]) + acc_t(write_w[b * N + n]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void link_update_backward_kernel(const scalar_t* __restrict__ link, const scalar_t* __restrict__ precedence,
                                            const scalar_t* __restrict__ write_w,
                                            const scalar_t* __restrict__ grad_new_link,
                                            scalar_t* __restrict__ grad_link, acc_t* __restrict__ grad_w_rows,
                                            acc_t* __restrict__ column_part, int64_t N) {
  // With G = dL' off the diagonal: dL = G (1 - w_i - w_j); row sum dw_i = sum_j G (p_j - L);
  // column sums -sum_i G L (into dw_j) and sum_i G w_i (dp_j): partials [B, blocks, 2, N].
  __shared__ acc_t columns[2][kWarps][kLanes];
  const int64_t b = blockIdx.x, block = blockIdx.y, blocks = gridDim.y;
  const int x = threadIdx.x, y = threadIdx.y;
  acc_t row[kRowsPerThread], w_i[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = block * kRows + y + kWarps * q;
    row[q] = 0;
    w_i[q] = i < N ? acc_t(write_w[b * N + i]) : acc_t(0);
  }
  for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
    const int64_t j = j0 + x;
    const bool j_ok = j < N;
    const acc_t w_j = j_ok ? acc_t(write_w[b * N + j]) : acc_t(0);
    const acc_t p_j = j_ok ? acc_t(precedence[b * N + j]) : acc_t(0);
    acc_t minus_gl = 0, gw = 0;
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = block * kRows + y + kWarps * q;
      if (i >= N || !j_ok) continue;
      const int64_t at = (b * N + i) * N + j;
      const acc_t g = i == j ? acc_t(0) : acc_t(grad_new_link[at]);
      const acc_t l = link[at];
      grad_link[at] = scalar_t(g * (1 - w_i[q] - w_j));
      row[q] += g * (p_j - l);
      minus_gl -= g * l;
      gw += g * w_i[q];
    }
    columns[0][y][x] = minus_gl;
    columns[1][y][x] = gw;
    __syncthreads();
    if (y < 2 && j_ok) {
      acc_t total = 0;
      for (int k = 0; k < kWarps; ++k) total += columns[y][k][x];
      column_part[((b * blocks + block) * 2 + y) * N + j] = total;
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const acc_t total = warp_sum(row[q]);
    const int64_t i = block * kRows + y + kWarps * q;
    if (x == 0 && i < N) grad_w_rows[b * N + i] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void link_reads_kernel(const scalar_t* __restrict__ link, const scalar_t* __restrict__ right,
                                  const scalar_t* __restrict__ left, const scalar_t* __restrict__ read_w,
                                  const scalar_t* __restrict__ write_w, const scalar_t* __restrict__ precedence,
                                  scalar_t* __restrict__ new_link, acc_t* __restrict__ rows_out,
                                  acc_t* __restrict__ column_part, scalar_t* __restrict__ grad_link, int64_t N,
                                  int64_t R, int64_t r0, bool accumulate_grad_link) {
  // For heads r0 .. r0 + kHeads - 1:
  //   rows[r, i] = sum_j L[i, j] right[r, j] (registers, warp shuffle),
  //   columns[r, j] = sum_i L[i, j] left[r, i] (partials [B, blocks, R, N]).
  // With write_w given, the tile is first updated in registers, L <- (1 - w_i - w_j) L + w_i p_j
  // (0 on the diagonal), and the first head group writes it to new_link: the fused
  // link_update_reads reads L once and writes L' once.
  // Forward: right = left = w^r (f = rows, b = columns). Backward: right = grad_b, left = grad_f
  // (grad_w = rows + columns) and, when read_w is given,
  //   grad_L[i, j] = sum_r grad_f[r, i] w[r, j] + w[r, i] grad_b[r, j], added over head groups.
  __shared__ acc_t columns[kWarps][kLanes][kHeads];
  const int64_t b = blockIdx.x, block = blockIdx.y, blocks = gridDim.y;
  const int x = threadIdx.x, y = threadIdx.y;
  const int heads = static_cast<int>(std::min<int64_t>(kHeads, R - r0));
  acc_t rows[kRowsPerThread][kHeads], left_i[kRowsPerThread][kHeads], read_i[kRowsPerThread][kHeads];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = block * kRows + y + kWarps * q;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const bool ok = i < N && h < heads;
      const int64_t at = (b * R + r0 + h) * N + i;
      rows[q][h] = 0;
      left_i[q][h] = ok ? acc_t(left[at]) : acc_t(0);
      read_i[q][h] = ok && read_w != nullptr ? acc_t(read_w[at]) : acc_t(0);
    }
  }
  acc_t w_i[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = block * kRows + y + kWarps * q;
    w_i[q] = write_w != nullptr && i < N ? acc_t(write_w[b * N + i]) : acc_t(0);
  }
  for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
    const int64_t j = j0 + x;
    const bool j_ok = j < N;
    const acc_t w_j = write_w != nullptr && j_ok ? acc_t(write_w[b * N + j]) : acc_t(0);
    const acc_t p_j = write_w != nullptr && j_ok ? acc_t(precedence[b * N + j]) : acc_t(0);
    acc_t right_j[kHeads], read_j[kHeads], column[kHeads];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const bool ok = j_ok && h < heads;
      const int64_t at = (b * R + r0 + h) * N + j;
      right_j[h] = ok ? acc_t(right[at]) : acc_t(0);
      read_j[h] = ok && read_w != nullptr ? acc_t(read_w[at]) : acc_t(0);
      column[h] = 0;
    }
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = block * kRows + y + kWarps * q;
      if (i >= N || !j_ok) continue;
      const int64_t at = (b * N + i) * N + j;
      acc_t l = link[at];
      if (write_w != nullptr) {
        l = i == j ? acc_t(0) : (1 - w_i[q] - w_j) * l + w_i[q] * p_j;
        if (r0 == 0) new_link[at] = scalar_t(l);
      }
      acc_t grad = 0;
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        rows[q][h] += l * right_j[h];
        column[h] += l * left_i[q][h];
        grad += left_i[q][h] * read_j[h] + read_i[q][h] * right_j[h];
      }
      if (grad_link != nullptr) grad_link[at] = scalar_t(accumulate_grad_link ? acc_t(grad_link[at]) + grad : grad);
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) columns[y][x][h] = column[h];
    __syncthreads();
    if (y < heads && j_ok) {
      acc_t total = 0;
      for (int k = 0; k < kWarps; ++k) total += columns[k][x][y];
      column_part[((b * blocks + block) * R + r0 + y) * N + j] = total;
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = block * kRows + y + kWarps * q;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const acc_t total = warp_sum(rows[q][h]);
      if (x == 0 && i < N && h < heads) rows_out[(b * R + r0 + h) * N + i] = total;
    }
  }
}

// (L right, L^T left, and grad_L when read_w is defined) for [B, R, N] right / left. With
// update = (write_w, precedence, new_link), L is first updated tile by tile into new_link.
struct Update {
  at::Tensor write_w, precedence, new_link;
};

std::vector<at::Tensor> link_reads(const at::Tensor& link, const at::Tensor& right, const at::Tensor& left,
                                   const c10::optional<at::Tensor>& read_w, const c10::optional<Update>& update) {
  const int64_t B = link.size(0), N = link.size(1), R = right.size(1);
  const int64_t blocks = (N + kRows - 1) / kRows;
  const auto acc_type = accumulator(link.scalar_type());
  auto rows = at::empty({B, R, N}, link.options().dtype(acc_type));
  auto column_part = at::empty({B, blocks, R, N}, link.options().dtype(acc_type));
  // with no heads no launch writes grad_L, and it is 0
  at::Tensor grad_link = !read_w.has_value() ? at::Tensor() : R > 0 ? at::empty_like(link) : at::zeros_like(link);
  if (B * N * R == 0) return {rows, column_part.sum(1), grad_link};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "link_reads_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t r0 = 0; r0 < R; r0 += kHeads) {
      link_reads_kernel<scalar_t, acc_t><<<dim3(B, blocks), dim3(kLanes, kWarps), 0, stream()>>>(
          link.data_ptr<scalar_t>(), right.data_ptr<scalar_t>(), left.data_ptr<scalar_t>(),
          read_w.has_value() ? read_w->data_ptr<scalar_t>() : nullptr,
          update.has_value() ? update->write_w.data_ptr<scalar_t>() : nullptr,
          update.has_value() ? update->precedence.data_ptr<scalar_t>() : nullptr,
          update.has_value() ? update->new_link.data_ptr<scalar_t>() : nullptr, rows.data_ptr<acc_t>(),
          column_part.data_ptr<acc_t>(), read_w.has_value() ? grad_link.data_ptr<scalar_t>() : nullptr, N, R, r0,
          r0 > 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, column_part.sum(1), grad_link};
}

std::tuple<at::Tensor, at::Tensor> link_update_cuda(const at::Tensor& link_in, const at::Tensor& precedence_in,
                                         const at::Tensor& write_w_in) {
  check_cuda(link_in, "link");
  const c10::cuda::CUDAGuard guard(link_in.device());
  const auto link = link_in.contiguous(), precedence = precedence_in.contiguous(), write_w = write_w_in.contiguous();
  const int64_t B = link.size(0), N = link.size(1), total = link.numel();
  auto new_link = at::empty_like(link);
  auto new_precedence = at::empty_like(precedence);
  if (total == 0) return {new_link, new_precedence};
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535 * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "link_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    link_update_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream()>>>(
        link.data_ptr<scalar_t>(), write_w.data_ptr<scalar_t>(), precedence.data_ptr<scalar_t>(),
        new_link.data_ptr<scalar_t>(), total, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    precedence_kernel<scalar_t, acc_t><<<B, 256, 0, stream()>>>(
        precedence.data_ptr<scalar_t>(), write_w.data_ptr<scalar_t>(), new_precedence.data_ptr<scalar_t>(), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {new_link, new_precedence};
}

std::vector<at::Tensor> link_update_backward_cuda(const at::Tensor& grad_new_link_in,
                                                  const at::Tensor& grad_new_precedence_in, const at::Tensor& link_in,
                                                  const at::Tensor& precedence_in, const at::Tensor& write_w_in,
                                                  const at::Tensor& /*new_link*/,
                                                  const at::Tensor& /*new_precedence*/) {
  check_cuda(link_in, "link");
  const c10::cuda::CUDAGuard guard(link_in.device());
  const auto link = link_in.contiguous(), precedence = precedence_in.contiguous(), write_w = write_w_in.contiguous();
  const auto grad_new_link = grad_new_link_in.contiguous();
  const int64_t B = link.size(0), N = link.size(1);
  const int64_t blocks = (N + kRows - 1) / kRows;
  const auto acc_type = accumulator(link.scalar_type());
  auto grad_link = at::empty_like(link);
  auto grad_w_rows = at::empty({B, N}, link.options().dtype(acc_type));
  auto column_part = at::empty({B, blocks, 2, N}, link.options().dtype(acc_type));
  if (B * N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "link_update_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      link_update_backward_kernel<scalar_t, acc_t><<<dim3(B, blocks), dim3(kLanes, kWarps), 0, stream()>>>(
          link.data_ptr<scalar_t>(), precedence.data_ptr<scalar_t>(), write_w.data_ptr<scalar_t>(),
          grad_new_link.data_ptr<scalar_t>(), grad_link.data_ptr<scalar_t>(), grad_w_rows.data_ptr<acc_t>(),
          column_part.data_ptr<acc_t>(), N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto columns = column_part.sum(1);
  // p' = (1 - sum w) p + w adds dw_n = dp'_n - sum_m dp'_m p_m and dp = dp' (1 - sum w).
  const auto grad_p = grad_new_precedence_in.to(acc_type), p = precedence.to(acc_type), w = write_w.to(acc_type);
  const auto grad_w = grad_w_rows + columns.select(1, 0) + grad_p - (grad_p * p).sum(-1, true);
  const auto grad_precedence = columns.select(1, 1) + grad_p * (1 - w.sum(-1, true));
  return {grad_link, grad_precedence.to(link.scalar_type()), grad_w.to(link.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> temporal_reads_cuda(const at::Tensor& link_in, const at::Tensor& read_w_in) {
  check_cuda(link_in, "link");
  const c10::cuda::CUDAGuard guard(link_in.device());
  const auto link = link_in.contiguous(), read_w = read_w_in.contiguous();
  const auto result = link_reads(link, read_w, read_w, c10::nullopt, c10::nullopt);
  return {result[0].to(read_w.scalar_type()), result[1].to(read_w.scalar_type())};
}

std::vector<at::Tensor> temporal_reads_backward_cuda(const at::Tensor& grad_forward_in,
                                                     const at::Tensor& grad_backward_in, const at::Tensor& link_in,
                                                     const at::Tensor& read_w_in, const at::Tensor& /*forward*/,
                                                     const at::Tensor& /*backward*/) {
  check_cuda(link_in, "link");
  const c10::cuda::CUDAGuard guard(link_in.device());
  const auto link = link_in.contiguous(), read_w = read_w_in.contiguous();
  const auto grad_forward = grad_forward_in.contiguous(), grad_backward = grad_backward_in.contiguous();
  const auto result = link_reads(link, grad_backward, grad_forward, read_w, c10::nullopt);
  return {result[2], (result[0] + result[1]).to(read_w.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> link_update_reads_cuda(const at::Tensor& link_in,
                                                                               const at::Tensor& precedence_in,
                                                                               const at::Tensor& write_w_in,
                                                                               const at::Tensor& read_w_in) {
  check_cuda(link_in, "link");
  const c10::cuda::CUDAGuard guard(link_in.device());
  const auto link = link_in.contiguous(), precedence = precedence_in.contiguous(), write_w = write_w_in.contiguous();
  const auto read_w = read_w_in.contiguous();
  const int64_t B = link.size(0), N = link.size(1), R = read_w.size(1);
  auto new_precedence = at::empty_like(precedence);
  // with no heads no read launch writes L', so it comes from link_update alone
  if (R == 0) {
    at::Tensor new_link;
    std::tie(new_link, new_precedence) = link_update_cuda(link, precedence, write_w);
    return {new_link, new_precedence, at::empty_like(read_w), at::empty_like(read_w)};
  }
  const Update update{write_w, precedence, at::empty_like(link)};
  const auto result = link_reads(link, read_w, read_w, c10::nullopt, update);
  if (B * N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "link_update_reads_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      precedence_kernel<scalar_t, acc_t><<<B, 256, 0, stream()>>>(
          precedence.data_ptr<scalar_t>(), write_w.data_ptr<scalar_t>(), new_precedence.data_ptr<scalar_t>(), N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {update.new_link, new_precedence, result[0].to(read_w.scalar_type()), result[1].to(read_w.scalar_type())};
}

// The backward composes the two ops' kernels: the reads' gradient through L' (one pass over L',
// recomputed from L: like the CPU and triton kernels it reads no output, so a caller may pass
// stand-ins for them, as the DNC's link chain does), added to dL', then link_update's backward
// (one pass over L and G).
std::vector<at::Tensor> link_update_reads_backward_cuda(
    const at::Tensor& grad_new_link, const at::Tensor& grad_new_precedence, const at::Tensor& grad_forward,
    const at::Tensor& grad_backward, const at::Tensor& link, const at::Tensor& precedence, const at::Tensor& write_w,
    const at::Tensor& read_w, const at::Tensor& /*new_link*/, const at::Tensor& new_precedence,
    const at::Tensor& forward, const at::Tensor& backward) {
  const auto new_link = std::get<0>(link_update_cuda(link, precedence, write_w));
  const auto reads = temporal_reads_backward_cuda(grad_forward, grad_backward, new_link, read_w, forward, backward);
  const auto update = link_update_backward_cuda(grad_new_link + reads[0], grad_new_precedence, link, precedence,
                                                write_w, new_link, new_precedence);
  return {update[0], update[1], update[2], reads[1]};
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_link_update", &link_update_cuda);
  m.impl("ext_link_update_backward", &link_update_backward_cuda);
  m.impl("ext_temporal_reads", &temporal_reads_cuda);
  m.impl("ext_temporal_reads_backward", &temporal_reads_backward_cuda);
  m.impl("ext_link_update_reads", &link_update_reads_cuda);
  m.impl("ext_link_update_reads_backward", &link_update_reads_backward_cuda);
}

}  // namespace links_kernels
}  // namespace cuda
}  // namespace sparsemem
