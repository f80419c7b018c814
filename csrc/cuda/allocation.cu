// DNC allocation on the GPU: a[phi_k] = (1 - s_k) P_k, P_k = prod_{i<k} s_i, s = u[phi] ascending.
//
// Sort: CUB radix sort, stable, so ties keep slot order. For 32-bit (and narrower) usages one
// DeviceRadixSort over all B rows at once on 64-bit keys (row << 32 | order-preserving bits of
// the float): a segmented sort gives each row to one block, slow for few long rows. float64
// rows go through DeviceSegmentedRadixSort.
// Scan: tiles of kTile = 256 threads x 8 sorted slots. allocation_tile_kernel writes each tile's
// product (and, for the backward, its composed map); the second kernel takes its carry from the
// tiles before it and runs cub::BlockScan within the tile, then scatters to phi.
// Backward without division (finite at usages 0 and 1), with g_k = grad[phi_k], c_j = g_j (1 - s_j):
//   grad_s_k = P_k (Q_k - g_k),  Q_k = c_{k+1} + s_{k+1} Q_{k+1},  Q_{N-1} = 0,
// a scan of affine maps x -> a x + c run from the end: positions in the tile are walked in
// reverse (scan position i holds slot base + kTile - 1 - i); P is scanned forwards and passed
// through shared memory.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "common.cuh"

namespace sparsemem {
namespace cuda {
// Named, not anonymous: the syntax check compiles every .cu file together in one unit.
namespace allocation_kernels {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int64_t kTile = kThreads * kItems;

template <typename acc_t>
struct Affine {  // x -> a x + c
  acc_t a, c;
};

struct Compose {  // the map `first` then the map `then`
  template <typename acc_t>
  __device__ __forceinline__ Affine<acc_t> operator()(const Affine<acc_t>& first, const Affine<acc_t>& then) const {
    return {first.a * then.a, then.a * first.c + then.c};
  }
};

struct Multiply {
  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(const acc_t& x, const acc_t& y) const {
    return x * y;
  }
};

// The map for sorted slot k: Q_k = s_{k+1} Q_{k+1} + c_{k+1} (identity past the end).
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> slot_map(const acc_t* sorted, const int32_t* order, const acc_t* grad,
                                                  int64_t k, int64_t N) {
  if (k + 1 >= N) return {acc_t(1), acc_t(0)};
  const acc_t s = sorted[k + 1];
  return {s, grad[order[k + 1]] * (1 - s)};
}

template <typename acc_t>
__global__ void allocation_tile_kernel(const acc_t* __restrict__ sorted, const int32_t* __restrict__ order,
                                       const acc_t* __restrict__ grad, acc_t* __restrict__ products,
                                       acc_t* __restrict__ maps_a, acc_t* __restrict__ maps_c, int64_t N) {
  // Block (tile t, row b): the product of the tile's usages and, when grad is given, the
  // composition of its slot maps in reverse order (Q_base = A Q_end + C).
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  using Scan = cub::BlockScan<Affine<acc_t>, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } temp;
  const int64_t t = blockIdx.x, T = gridDim.x, b = blockIdx.y, base = t * kTile;
  const acc_t* row = sorted + b * N;
  acc_t product = 1;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t k = base + threadIdx.x * kItems + j;
    if (k < N) product *= row[k];
  }
  product = Reduce(temp.reduce).Reduce(product, Multiply());
  if (threadIdx.x == 0) products[b * T + t] = product;
  if (grad == nullptr) return;
  __syncthreads();
  Affine<acc_t> maps[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t k = base + kTile - 1 - (threadIdx.x * kItems + j);
    maps[j] = slot_map(row, order + b * N, grad + b * N, k, N);
  }
  Affine<acc_t> total;
  Scan(temp.scan).InclusiveScan(maps, maps, Compose(), total);
  if (threadIdx.x == 0) {
    maps_a[b * T + t] = total.a;
    maps_c[b * T + t] = total.c;
  }
}

// The product of the tiles before t, on every thread.
template <typename acc_t, typename Reduce>
__device__ acc_t product_before(const acc_t* products, int64_t t, typename Reduce::TempStorage& temp, acc_t* shared) {
  acc_t product = 1;
  for (int64_t u = threadIdx.x; u < t; u += kThreads) product *= products[u];
  product = Reduce(temp).Reduce(product, Multiply());
  if (threadIdx.x == 0) *shared = product;
  __syncthreads();
  return *shared;
}

template <typename scalar_t, typename acc_t>
__global__ void allocation_scatter_kernel(const acc_t* __restrict__ sorted, const int32_t* __restrict__ order,
                                          const acc_t* __restrict__ products, scalar_t* __restrict__ out, int64_t N) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  using Scan = cub::BlockScan<acc_t, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } temp;
  __shared__ acc_t carry;
  const int64_t t = blockIdx.x, T = gridDim.x, b = blockIdx.y, base = t * kTile;
  const acc_t* row = sorted + b * N;
  const acc_t before = product_before<acc_t, Reduce>(products + b * T, t, temp.reduce, &carry);
  __syncthreads();
  acc_t usage[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t k = base + threadIdx.x * kItems + j;
    usage[j] = k < N ? row[k] : acc_t(1);
  }
  acc_t exclusive[kItems];
  Scan(temp.scan).ExclusiveScan(usage, exclusive, acc_t(1), Multiply());
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t k = base + threadIdx.x * kItems + j;
    if (k < N) out[b * N + order[b * N + k]] = scalar_t((1 - usage[j]) * exclusive[j] * before);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void allocation_backward_kernel(const acc_t* __restrict__ sorted, const int32_t* __restrict__ order,
                                           const acc_t* __restrict__ grad, const acc_t* __restrict__ products,
                                           const acc_t* __restrict__ maps_a, const acc_t* __restrict__ maps_c,
                                           scalar_t* __restrict__ grad_usage, int64_t N) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  using ProductScan = cub::BlockScan<acc_t, kThreads>;
  using MapScan = cub::BlockScan<Affine<acc_t>, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename ProductScan::TempStorage product_scan;
    typename MapScan::TempStorage map_scan;
  } temp;
  __shared__ acc_t carry_p, carry_q;
  __shared__ acc_t prefix[kTile];  // P of the tile's slots, by position from the tile's start
  const int64_t t = blockIdx.x, T = gridDim.x, b = blockIdx.y, base = t * kTile;
  const acc_t* row = sorted + b * N;
  const int32_t* row_order = order + b * N;
  const acc_t* row_grad = grad + b * N;
  const acc_t before = product_before<acc_t, Reduce>(products + b * T, t, temp.reduce, &carry_p);
  if (threadIdx.x == 0) {
    // Q at the end of this tile: the maps of tiles T-1, ..., t+1 applied in that order to Q_N = 0
    acc_t q = 0;
    for (int64_t u = T - 1; u > t; --u) q = maps_a[b * T + u] * q + maps_c[b * T + u];
    carry_q = q;
  }
  __syncthreads();
  acc_t usage[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t k = base + threadIdx.x * kItems + j;
    usage[j] = k < N ? row[k] : acc_t(1);
  }
  acc_t exclusive[kItems];
  ProductScan(temp.product_scan).ExclusiveScan(usage, exclusive, acc_t(1), Multiply());
#pragma unroll
  for (int j = 0; j < kItems; ++j) prefix[threadIdx.x * kItems + j] = exclusive[j] * before;
  __syncthreads();
  Affine<acc_t> maps[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t k = base + kTile - 1 - (threadIdx.x * kItems + j);
    maps[j] = slot_map(row, row_order, row_grad, k, N);
  }
  MapScan(temp.map_scan).InclusiveScan(maps, maps, Compose());
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t position = kTile - 1 - (threadIdx.x * kItems + j), k = base + position;
    if (k >= N) continue;
    const acc_t q = maps[j].a * carry_q + maps[j].c;
    const int32_t slot = row_order[k];
    grad_usage[b * N + slot] = scalar_t(prefix[position] * (q - row_grad[slot]));
  }
}

// Order-preserving unsigned bits of a float (negative floats reversed), under the row index.
// -0.0 is folded into +0.0, so it ties with 0 (slot order) as in torch's compare and the C++
// kernel; CUB does the same for the float64 keys of the segmented sort.
__global__ void row_keys_kernel(const float* __restrict__ usage, uint64_t* __restrict__ keys,
                                int32_t* __restrict__ slots, int64_t total, int64_t N) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    uint32_t bits = __float_as_uint(usage[index]);
    if (bits == 0x80000000u) bits = 0u;
    const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    keys[index] = (uint64_t(index / N) << 32) | ordered;
    slots[index] = static_cast<int32_t>(index % N);
  }
}

__global__ void gather_kernel(const float* __restrict__ usage, const int32_t* __restrict__ slots,
                              float* __restrict__ sorted, int64_t total, int64_t N) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    sorted[index] = usage[(index / N) * N + slots[index]];
  }
}

int64_t grid_for(int64_t total) { return std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 65535 * 8)); }

int bits_for(int64_t B) {
  int bits = 0;
  while ((int64_t(1) << bits) < B) ++bits;
  return bits;
}

// (sorted usages in the accumulator dtype [B, N], slots int32 [B, N]), stable per row.
std::tuple<at::Tensor, at::Tensor> sort_rows(const at::Tensor& usage_in) {
  const int64_t B = usage_in.size(0), N = usage_in.size(1), total = B * N;
  TORCH_CHECK(N < (int64_t(1) << 31), "allocation on CUDA supports N < 2^31 slots");
  const auto acc_type = accumulator(usage_in.scalar_type());
  const auto usage = usage_in.to(acc_type).contiguous();  // exact: narrower floats widen without rounding
  auto sorted = at::empty({B, N}, usage.options());
  auto slots_out = at::empty({B, N}, usage.options().dtype(at::kInt));
  size_t temp_bytes = 0;
  if (acc_type == at::kFloat) {
    auto keys_in = at::empty({total}, usage.options().dtype(at::kLong));
    auto keys_out = at::empty_like(keys_in);
    auto slots_in = at::empty({total}, slots_out.options());
    auto* keys_in_ptr = reinterpret_cast<uint64_t*>(keys_in.data_ptr<int64_t>());
    auto* keys_out_ptr = reinterpret_cast<uint64_t*>(keys_out.data_ptr<int64_t>());
    row_keys_kernel<<<grid_for(total), 256, 0, stream()>>>(usage.data_ptr<float>(), keys_in_ptr,
                                                           slots_in.data_ptr<int32_t>(), total, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int end_bit = 32 + bits_for(B);
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in_ptr, keys_out_ptr,
                                                   slots_in.data_ptr<int32_t>(), slots_out.data_ptr<int32_t>(),
                                                   total, 0, end_bit, stream()));
    auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, usage.options().dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys_in_ptr, keys_out_ptr,
                                                   slots_in.data_ptr<int32_t>(), slots_out.data_ptr<int32_t>(),
                                                   total, 0, end_bit, stream()));
    gather_kernel<<<grid_for(total), 256, 0, stream()>>>(usage.data_ptr<float>(), slots_out.data_ptr<int32_t>(),
                                                         sorted.data_ptr<float>(), total, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    auto slots_in = at::arange(N, usage.options().dtype(at::kInt)).repeat({B});
    auto offsets = at::arange(0, total + 1, N, usage.options().dtype(at::kLong));
    const int64_t* offsets_ptr = offsets.data_ptr<int64_t>();
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
        nullptr, temp_bytes, usage.data_ptr<double>(), sorted.data_ptr<double>(), slots_in.data_ptr<int32_t>(),
        slots_out.data_ptr<int32_t>(), total, B, offsets_ptr, offsets_ptr + 1, 0, 64, stream()));
    auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, usage.options().dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
        temp.data_ptr(), temp_bytes, usage.data_ptr<double>(), sorted.data_ptr<double>(),
        slots_in.data_ptr<int32_t>(), slots_out.data_ptr<int32_t>(), total, B, offsets_ptr, offsets_ptr + 1, 0, 64,
        stream()));
  }
  return {sorted, slots_out};
}

at::Tensor allocation_weights_cuda(const at::Tensor& usage) {
  check_cuda(usage, "usage");
  const c10::cuda::CUDAGuard guard(usage.device());
  const int64_t B = usage.size(0), N = usage.size(1);
  auto out = at::empty({B, N}, usage.options());
  if (B * N == 0) return out;
  at::Tensor sorted, order;
  std::tie(sorted, order) = sort_rows(usage);
  const int64_t T = (N + kTile - 1) / kTile;
  auto products = at::empty({B, T}, sorted.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "allocation_weights_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (T > 1) {
      allocation_tile_kernel<acc_t><<<dim3(T, B), kThreads, 0, stream()>>>(
          sorted.data_ptr<acc_t>(), order.data_ptr<int32_t>(), nullptr, products.data_ptr<acc_t>(), nullptr, nullptr,
          N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    allocation_scatter_kernel<scalar_t, acc_t><<<dim3(T, B), kThreads, 0, stream()>>>(
        sorted.data_ptr<acc_t>(), order.data_ptr<int32_t>(), products.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> allocation_weights_backward_cuda(const at::Tensor& grad_in, const at::Tensor& usage,
                                                         const at::Tensor& /*allocation*/) {
  check_cuda(usage, "usage");
  const c10::cuda::CUDAGuard guard(usage.device());
  const int64_t B = usage.size(0), N = usage.size(1);
  auto grad_usage = at::empty({B, N}, usage.options());
  if (B * N == 0) return {grad_usage};
  // the permutation is not saved by the forward: sorting again costs less than keeping it
  at::Tensor sorted, order;
  std::tie(sorted, order) = sort_rows(usage);
  const auto grad = grad_in.to(sorted.scalar_type()).contiguous();
  const int64_t T = (N + kTile - 1) / kTile;
  auto products = at::empty({B, T}, sorted.options());
  auto maps_a = at::empty({B, T}, sorted.options());
  auto maps_c = at::empty({B, T}, sorted.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "allocation_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (T > 1) {
      allocation_tile_kernel<acc_t><<<dim3(T, B), kThreads, 0, stream()>>>(
          sorted.data_ptr<acc_t>(), order.data_ptr<int32_t>(), grad.data_ptr<acc_t>(), products.data_ptr<acc_t>(),
          maps_a.data_ptr<acc_t>(), maps_c.data_ptr<acc_t>(), N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    allocation_backward_kernel<scalar_t, acc_t><<<dim3(T, B), kThreads, 0, stream()>>>(
        sorted.data_ptr<acc_t>(), order.data_ptr<int32_t>(), grad.data_ptr<acc_t>(), products.data_ptr<acc_t>(),
        maps_a.data_ptr<acc_t>(), maps_c.data_ptr<acc_t>(), grad_usage.data_ptr<scalar_t>(), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_usage};
}

TORCH_LIBRARY_IMPL(sparsemem, CUDA, m) {
  m.impl("ext_allocation_weights", &allocation_weights_cuda);
  m.impl("ext_allocation_weights_backward", &allocation_weights_backward_cuda);
}

}  // namespace allocation_kernels
}  // namespace cuda
}  // namespace sparsemem
