// Dense memory write (erase + add in one pass) and weighted read, with backward, on the GPU.
//
// Layout: one warp per memory slot (a row of W contiguous values, lanes stride over W, so
// loads are coalesced). Sums over N are split among S blocks per batch row; each block keeps
// its warps' sums in shared memory ([warps, ..., W], each lane owning the w it touches, so no
// atomics), reduces them and writes a partial that at::sum adds: deterministic.
#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace memory_rw_kernels {

constexpr int kThreads = 256;
constexpr int kMinSlotsPerSplit = 64;
constexpr size_t kMaxShared = 48 * 1024;

// Warps per block so that `per_warp` bytes of shared memory each fit in 48 KB.
int warps_for(size_t per_warp) {
  const int warps = static_cast<int>(std::min<size_t>(kThreads / kWarp, kMaxShared / std::max<size_t>(per_warp, 1)));
  TORCH_CHECK(warps >= 1, "R * W is too large for the CUDA kernel's shared memory (", per_warp, " bytes a warp)");
  return warps;
}

template <typename scalar_t, typename acc_t>
__global__ void memory_write_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ write_w,
                                    const scalar_t* __restrict__ erase, const scalar_t* __restrict__ add,
                                    scalar_t* __restrict__ out, int64_t total, int64_t N, int64_t W) {
  // M' = M (1 - w e^T) + w v^T, one thread per element, grid-stride.
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = index % W, slot = index / W, b = slot / N;
    const acc_t weight = write_w[slot];
    out[index] = scalar_t(acc_t(memory[index]) * (1 - weight * acc_t(erase[b * W + w])) + weight * acc_t(add[b * W + w]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void memory_write_backward_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ write_w,
                                             const scalar_t* __restrict__ erase, const scalar_t* __restrict__ add,
                                             const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_memory,
                                             scalar_t* __restrict__ grad_w, acc_t* __restrict__ grad_erase_part,
                                             acc_t* __restrict__ grad_add_part, int64_t N, int64_t W,
                                             int64_t slots_per_split) {
  // With G = dM': dM = G (1 - w e^T); dw_n = sum_w G (v - M e); de = -sum_n w_n G M; dv = sum_n w_n G.
  // Block (b, split); warp per slot; de, dv per warp in shared memory [warps][2][W].
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  acc_t* erase_sum = shared + int64_t(warp) * 2 * W;
  acc_t* add_sum = erase_sum + W;
  for (int64_t w = lane; w < W; w += kWarp) erase_sum[w] = add_sum[w] = acc_t(0);
  const int64_t begin = split * slots_per_split, end = std::min(N, begin + slots_per_split);
  for (int64_t n = begin + warp; n < end; n += warps) {
    const acc_t weight = write_w[b * N + n];
    const int64_t row = (b * N + n) * W;
    acc_t dot = 0;
    for (int64_t w = lane; w < W; w += kWarp) {
      const acc_t g = grad_out[row + w], m = memory[row + w], e = erase[b * W + w], v = add[b * W + w];
      grad_memory[row + w] = scalar_t(g * (1 - weight * e));
      dot += g * (v - m * e);
      erase_sum[w] -= weight * g * m;
      add_sum[w] += weight * g;
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_w[b * N + n] = scalar_t(dot);
  }
  __syncthreads();
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    acc_t e = 0, v = 0;
    for (int k = 0; k < warps; ++k) {
      e += shared[int64_t(k) * 2 * W + w];
      v += shared[int64_t(k) * 2 * W + W + w];
    }
    grad_erase_part[(b * S + split) * W + w] = e;
    grad_add_part[(b * S + split) * W + w] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void memory_read_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ read_w,
                                   acc_t* __restrict__ reads_part, int64_t N, int64_t R, int64_t W,
                                   int64_t slots_per_split) {
  // r_r = sum_n w_rn M_n. Block (b, split); warp per slot; reads per warp in shared [warps][R][W].
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  acc_t* reads = shared + int64_t(warp) * R * W;
  for (int64_t e = lane; e < R * W; e += kWarp) reads[e] = acc_t(0);
  __syncwarp();
  const int64_t begin = split * slots_per_split, end = std::min(N, begin + slots_per_split);
  for (int64_t n = begin + warp; n < end; n += warps) {
    const int64_t row = (b * N + n) * W;
    for (int64_t w = lane; w < W; w += kWarp) {
      const acc_t m = memory[row + w];
      for (int64_t r = 0; r < R; ++r) reads[r * W + w] += acc_t(read_w[(b * R + r) * N + n]) * m;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < R * W; e += blockDim.x) {
    acc_t total = 0;
    for (int k = 0; k < warps; ++k) total += shared[int64_t(k) * R * W + e];
    reads_part[(b * S + split) * R * W + e] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void memory_read_backward_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ read_w,
                                            const scalar_t* __restrict__ grad_reads, scalar_t* __restrict__ grad_memory,
                                            scalar_t* __restrict__ grad_read_w, int64_t B, int64_t N, int64_t R,
                                            int64_t W) {
  // dM_n = sum_r w_rn dr_r and dw_rn = dr_r . M_n: one warp per slot (b, n), nothing shared.
  const int64_t slot = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (slot >= B * N) return;
  const int64_t b = slot / N, n = slot % N, row = slot * W;
  for (int64_t w = lane; w < W; w += kWarp) {
    acc_t g = 0;
    for (int64_t r = 0; r < R; ++r) g += acc_t(read_w[(b * R + r) * N + n]) * acc_t(grad_reads[(b * R + r) * W + w]);
    grad_memory[row + w] = scalar_t(g);
  }
  for (int64_t r = 0; r < R; ++r) {
    acc_t dot = 0;
    for (int64_t w = lane; w < W; w += kWarp) dot += acc_t(grad_reads[(b * R + r) * W + w]) * acc_t(memory[row + w]);
    dot = warp_sum(dot);
    if (lane == 0) grad_read_w[(b * R + r) * N + n] = scalar_t(dot);
  }
}

at::Tensor memory_write_cuda(const at::Tensor& memory_in, const at::Tensor& write_w_in, const at::Tensor& erase_in,
                             const at::Tensor& add_in) {
  check_cuda(memory_in, "memory");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), write_w = write_w_in.contiguous();
  const auto erase = erase_in.contiguous(), add = add_in.contiguous();
  const int64_t N = memory.size(1), W = memory.size(2), total = memory.numel();
  auto out = at::empty_like(memory);
  if (total == 0) return out;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_write_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    memory_write_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream()>>>(
        memory.data_ptr<scalar_t>(), write_w.data_ptr<scalar_t>(), erase.data_ptr<scalar_t>(), add.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), total, N, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> memory_write_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& memory_in,
                                                   const at::Tensor& write_w_in, const at::Tensor& erase_in,
                                                   const at::Tensor& add_in, const at::Tensor& /*new_memory*/) {
  check_cuda(memory_in, "memory");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), write_w = write_w_in.contiguous(), grad_out = grad_out_in.contiguous();
  const auto erase = erase_in.contiguous(), add = add_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2);
  const auto acc_type = accumulator(memory.scalar_type());
  const int64_t S = splits(N, B, kMinSlotsPerSplit), slots_per_split = (N + S - 1) / S;
  auto grad_memory = at::empty_like(memory);
  auto grad_w = at::empty_like(write_w);
  auto grad_erase_part = at::empty({B, S, W}, memory.options().dtype(acc_type));
  auto grad_add_part = at::empty({B, S, W}, memory.options().dtype(acc_type));
  if (B == 0) return {grad_memory, grad_w, grad_erase_part.sum(1).to(erase.scalar_type()),
                      grad_add_part.sum(1).to(add.scalar_type())};  // a grid of 0 blocks is a launch error
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_write_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t per_warp = 2 * W * sizeof(acc_t);
    const int warps = warps_for(per_warp);
    memory_write_backward_kernel<scalar_t, acc_t><<<dim3(B, S), warps * kWarp, warps * per_warp, stream()>>>(
        memory.data_ptr<scalar_t>(), write_w.data_ptr<scalar_t>(), erase.data_ptr<scalar_t>(), add.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(), grad_memory.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
        grad_erase_part.data_ptr<acc_t>(), grad_add_part.data_ptr<acc_t>(), N, W, slots_per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_memory, grad_w, grad_erase_part.sum(1).to(erase.scalar_type()),
          grad_add_part.sum(1).to(add.scalar_type())};
}

at::Tensor memory_read_cuda(const at::Tensor& memory_in, const at::Tensor& read_w_in) {
  check_cuda(memory_in, "memory");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), read_w = read_w_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = read_w.size(1);
  const int64_t S = splits(N, B, kMinSlotsPerSplit), slots_per_split = (N + S - 1) / S;
  auto reads_part = at::empty({B, S, R, W}, memory.options().dtype(accumulator(memory.scalar_type())));
  if (B == 0) return reads_part.sum(1).to(memory.scalar_type());  // a grid of 0 blocks is a launch error
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_read_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t per_warp = R * W * sizeof(acc_t);
    const int warps = warps_for(per_warp);
    memory_read_kernel<scalar_t, acc_t><<<dim3(B, S), warps * kWarp, warps * per_warp, stream()>>>(
        memory.data_ptr<scalar_t>(), read_w.data_ptr<scalar_t>(), reads_part.data_ptr<acc_t>(), N, R, W,
        slots_per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return reads_part.sum(1).to(memory.scalar_type());
}

std::vector<at::Tensor> memory_read_backward_cuda(const at::Tensor& grad_reads_in, const at::Tensor& memory_in,
                                                  const at::Tensor& read_w_in, const at::Tensor& /*reads*/) {
  check_cuda(memory_in, "memory");
  const c10::cuda::CUDAGuard guard(memory_in.device());
  const auto memory = memory_in.contiguous(), read_w = read_w_in.contiguous(), grad_reads = grad_reads_in.contiguous();
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = read_w.size(1);
  auto grad_memory = at::empty_like(memory);
  auto grad_read_w = at::empty_like(read_w);
  const int64_t blocks = (B * N * kWarp + kThreads - 1) / kThreads;
  if (blocks == 0) return {grad_memory, grad_read_w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_read_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    memory_read_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream()>>>(
        memory.data_ptr<scalar_t>(), read_w.data_ptr<scalar_t>(), grad_reads.data_ptr<scalar_t>(),
        grad_memory.data_ptr<scalar_t>(), grad_read_w.data_ptr<scalar_t>(), B, N, R, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_memory, grad_read_w};
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_memory_write", &memory_write_cuda);
  m.impl("ext_memory_write_backward", &memory_write_backward_cuda);
  m.impl("ext_memory_read", &memory_read_cuda);
  m.impl("ext_memory_read_backward", &memory_read_backward_cuda);
}

}  // namespace memory_rw_kernels
}  // namespace cuda
}  // namespace sparsemem
