// DNC temporal links on the CPU: link_update, temporal_reads and the fused link_update_reads.
//   L'[i, j] = (1 - w_i - w_j) L[i, j] + w_i p_j  (i != j),  L'[i, i] = 0
//   p' = (1 - sum_i w_i) p + w
//   f[r, i] = sum_j L'[i, j] wr[r, j]   (forward),   b[r, j] = sum_i L'[i, j] wr[r, i]   (backward)
//
// One kernel per direction, templated on what it does (kUpdate: the link update; kReads: the two
// reads), so the fused op touches the N x N link matrix once per step: the forward reads L and
// writes L', the backward reads L and grad L' and writes grad L (L' is recomputed, not re-read).
//
// Tiling: the rows of each batch row are cut into blocks and the (b, block) pieces run in
// parallel. With 1 to 4 read heads (the DNC's case) a piece sweeps each row i once, every head at
// once (forward_rows_fused / backward_rows_fused); with more, one row at a time is kept in an acc_t
// buffer and swept once per head. Row reductions (f, the row part of grad w) are dot products;
// column reductions (b, the column parts of grad w, grad p, grad wr) go to per-piece partial
// vectors of length N, summed after the parallel loop, so no two threads write the same element.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "autograd.h"
#include "dnc.h"
#include "vector_math.h"

namespace sparsemem {

namespace {

// The N x N outputs (a new link every step, a link gradient every backward step) come from a pool
// of the blocks earlier ones freed. A fresh block that large is mmapped by malloc and faulted in
// page by page on its first write, which costs more than the op (32 MiB at N = 2^10, B = 8); a
// reused one is already mapped. The pool keeps at most kPoolBlocks freed blocks and kPoolBytes,
// each reused for a request of its exact size; blocks under kPooledBytes come from at::empty.
constexpr size_t kPooledBytes = size_t(1) << 22;
constexpr size_t kPoolBytes = size_t(1) << 31;
constexpr size_t kPoolBlocks = 4;

class BlockPool {
 public:
  void* take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto found = free_.find(bytes);
      if (found != free_.end()) {
        void* block = found->second;
        free_.erase(found);
        cached_ -= bytes;
        return block;
      }
    }
    return c10::alloc_cpu(bytes);
  }

  void give(void* block, size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kPoolBlocks && cached_ + bytes <= kPoolBytes) {
        free_.emplace(bytes, block);
        cached_ += bytes;
        return;
      }
    }
    c10::free_cpu(block);
  }

 private:
  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

BlockPool& pool() {
  static auto* blocks = new BlockPool();  // never destroyed: a tensor may be freed during exit
  return *blocks;
}

// An uninitialised contiguous tensor shaped like `like` (contiguous), from the pool when large;
// from at::empty when torch poisons uninitialised memory (the tests' check for unwritten elements).
at::Tensor empty_link(const at::Tensor& like) {
  const size_t bytes = size_t(like.numel()) * like.element_size();
  const auto& context = at::globalContext();
  if (bytes < kPooledBytes ||
      (context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory())) {
    return at::empty_like(like);
  }
  return at::from_blob(pool().take(bytes), like.sizes(), [bytes](void* block) { pool().give(block, bytes); },
                       like.options());
}

// Blocks of rows per batch row: enough pieces for every thread when B is small, one when B is large.
// B = 0 counts as one row (no division by zero; the loops over B * blocks pieces then run none).
int64_t row_blocks(int64_t B, int64_t N) {
  const int64_t rows = std::max<int64_t>(B, 1);
  const int64_t wanted = (2 * int64_t(at::get_num_threads()) + rows - 1) / rows;
  return std::max<int64_t>(1, std::min<int64_t>(N, wanted));
}

void check_link(const at::Tensor& link) {
  TORCH_CHECK(link.dim() == 3 && link.size(1) == link.size(2), "link must be [B, N, N]; got ", link.sizes());
}

void check_vector(const char* name, const at::Tensor& x, const at::Tensor& link) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == link.size(0) && x.size(1) == link.size(1), name,
              " must be [B, N] matching link [B, N, N]; got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == link.scalar_type(), name, " must have link's dtype");
}

void check_read_w(const at::Tensor& read_w, const at::Tensor& link) {
  TORCH_CHECK(read_w.dim() == 3 && read_w.size(0) == link.size(0) && read_w.size(2) == link.size(1),
              "read_w must be [B, R, N] matching link [B, N, N]; got ", read_w.sizes());
  TORCH_CHECK(read_w.scalar_type() == link.scalar_type(), "read_w must have link's dtype");
}

// Raw pointers of one call; the ones a variant does not use stay null.
template <typename scalar_t>
struct Links {
  int64_t B = 0, N = 0, R = 0;
  const scalar_t* link = nullptr;        // [B, N, N]
  const scalar_t* precedence = nullptr;  // [B, N]
  const scalar_t* write_w = nullptr;     // [B, N]
  const scalar_t* read_w = nullptr;      // [B, R, N]
};

// Row i of L' (kUpdate) or of L, in acc_t: computed into `buffer`, or L's own row when it is already acc_t.
template <bool kUpdate, typename acc_t, typename scalar_t>
const acc_t* link_row(const Links<scalar_t>& x, int64_t b, int64_t i, acc_t* buffer) {
  const int64_t N = x.N;
  const scalar_t* L = x.link + (b * N + i) * N;
  if constexpr (kUpdate) {
    const scalar_t* w = x.write_w + b * N;
    const scalar_t* p = x.precedence + b * N;
    const acc_t wi = acc_t(w[i]);
    for (int64_t j = 0; j < N; ++j) buffer[j] = (1 - wi - acc_t(w[j])) * acc_t(L[j]) + wi * acc_t(p[j]);
    buffer[i] = 0;
    return buffer;
  } else if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return L;
  } else {
    for (int64_t j = 0; j < N; ++j) buffer[j] = acc_t(L[j]);
    return buffer;
  }
}

// Rows first..last of batch row b: L' into new_link (kUpdate); f into forward and this piece's
// partial b into column (kReads).
template <bool kUpdate, bool kReads, typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void forward_rows(const Links<scalar_t>& x, int64_t b, int64_t first, int64_t last,
                                          acc_t* buffer, scalar_t* new_link, scalar_t* forward, acc_t* column) {
  const int64_t N = x.N, R = x.R;
  for (int64_t i = first; i < last; ++i) {
    const acc_t* row = link_row<kUpdate>(x, b, i, buffer);
    if constexpr (kUpdate) {
      scalar_t* out = new_link + (b * N + i) * N;
      for (int64_t j = 0; j < N; ++j) out[j] = scalar_t(row[j]);
    }
    if constexpr (kReads) {
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* wr = x.read_w + (b * R + r) * N;
        forward[(b * R + r) * N + i] = scalar_t(dot<acc_t>(row, wr, N));
        const acc_t weight = acc_t(wr[i]);
        acc_t* col = column + r * N;
        for (int64_t j = 0; j < N; ++j) col[j] += weight * row[j];
      }
    }
  }
}

// The O(N) vectors of batch row b that a fused sweep reads (w, p, each head's wr and grad b), and
// the piece's column partials, in acc_t at a padded stride. Arrays a multiple of 4 KiB apart (N a
// power of two) fall in the same L1 sets, and a sweep streaming a dozen of them at once would
// evict its own lines (8 ways); a stride of N + kStagePad puts each array one line further on.
constexpr int64_t kStagePad = 16;
constexpr int64_t kStagedColumns = 2 + kHeadGroup;  // grad w's and grad p's column sums, then one per head

template <typename acc_t>
struct Staged {
  const acc_t* w = nullptr;
  const acc_t* p = nullptr;
  const acc_t* wr[kHeadGroup] = {};
  const acc_t* gb[kHeadGroup] = {};
  acc_t* column[kStagedColumns] = {};  // [sum_i G L, sum_i G w_i] (backward), then per head
};

inline int64_t staged_stride(int64_t N) { return (N + kStagePad - 1) / kStagePad * kStagePad + kStagePad; }

// Room for every staged array of one piece: w, p, H read weights, H grad b, and the columns.
inline int64_t staged_size(int64_t N) { return (2 + 2 * kHeadGroup + kStagedColumns) * staged_stride(N); }

// Converts and copies batch row b's vectors into `storage` (staged_size(N) elements) and zeros the
// columns. grad_backward: null in the forward.
template <typename scalar_t, typename acc_t>
Staged<acc_t> stage(const Links<scalar_t>& x, const scalar_t* grad_backward, int64_t b, acc_t* storage) {
  const int64_t N = x.N, R = x.R, stride = staged_stride(N);
  Staged<acc_t> s;
  acc_t* next = storage;
  auto copy = [&](const scalar_t* from) {
    acc_t* to = next;
    for (int64_t n = 0; n < N; ++n) to[n] = acc_t(from[n]);
    next += stride;
    return to;
  };
  if (x.write_w) s.w = copy(x.write_w + b * N);
  if (x.precedence) s.p = copy(x.precedence + b * N);
  for (int64_t r = 0; r < R; ++r) s.wr[r] = copy(x.read_w + (b * R + r) * N);
  if (grad_backward) {
    for (int64_t r = 0; r < R; ++r) s.gb[r] = copy(grad_backward + (b * R + r) * N);
  }
  for (int64_t c = 0; c < kStagedColumns; ++c) {
    s.column[c] = next;
    std::fill(next, next + N, acc_t(0));
    next += stride;
  }
  return s;
}

// All of a call's H <= kHeadGroup read heads in one sweep over each row: L' is computed once per
// element and used for the link output and every head's reads while it sits in a register, and
// each head's row sum is a vector accumulator (omp simd reduction), so a row costs a few loads and
// stores per element instead of one pass over an L1 buffer per head. The diagonal is masked in
// the sweep (j == i), which keeps the loop branch-free. Column partials go to s.column[2 + h].
template <int64_t H, bool kUpdate, typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void forward_rows_fused(const Links<scalar_t>& x, int64_t b, int64_t first, int64_t last,
                                                const Staged<acc_t>& s, scalar_t* new_link, scalar_t* forward) {
  static_assert(1 <= H && H <= kHeadGroup, "one sweep holds up to kHeadGroup heads");
  const int64_t N = x.N;
  const acc_t* __restrict w = s.w;
  const acc_t* __restrict p = s.p;
  // Heads past H alias head 0 and are never touched (their code is compiled out).
  const acc_t* __restrict wr0 = s.wr[0];
  const acc_t* __restrict wr1 = s.wr[H > 1 ? 1 : 0];
  const acc_t* __restrict wr2 = s.wr[H > 2 ? 2 : 0];
  const acc_t* __restrict wr3 = s.wr[H > 3 ? 3 : 0];
  acc_t* __restrict c0 = s.column[2];
  acc_t* __restrict c1 = s.column[H > 1 ? 3 : 2];
  acc_t* __restrict c2 = s.column[H > 2 ? 4 : 2];
  acc_t* __restrict c3 = s.column[H > 3 ? 5 : 2];
  for (int64_t i = first; i < last; ++i) {
    const scalar_t* __restrict L = x.link + (b * N + i) * N;
    scalar_t* __restrict out = kUpdate ? new_link + (b * N + i) * N : nullptr;
    const acc_t wi = kUpdate ? w[i] : acc_t(0);
    const acc_t q0 = wr0[i], q1 = wr1[i], q2 = wr2[i], q3 = wr3[i];
    acc_t f0 = 0, f1 = 0, f2 = 0, f3 = 0;
#pragma omp simd reduction(+ : f0, f1, f2, f3)
    for (int64_t j = 0; j < N; ++j) {
      acc_t v = acc_t(L[j]);
      if constexpr (kUpdate) {
        v = (1 - wi - w[j]) * v + wi * p[j];
        v = j == i ? acc_t(0) : v;
        out[j] = scalar_t(v);
      }
      f0 += v * wr0[j];
      c0[j] += q0 * v;
      if constexpr (H > 1) {
        f1 += v * wr1[j];
        c1[j] += q1 * v;
      }
      if constexpr (H > 2) {
        f2 += v * wr2[j];
        c2[j] += q2 * v;
      }
      if constexpr (H > 3) {
        f3 += v * wr3[j];
        c3[j] += q3 * v;
      }
    }
    scalar_t* f = forward + b * H * N + i;
    f[0] = scalar_t(f0);
    if constexpr (H > 1) f[N] = scalar_t(f1);
    if constexpr (H > 2) f[2 * N] = scalar_t(f2);
    if constexpr (H > 3) f[3 * N] = scalar_t(f3);
  }
}

// Calls body(std::integral_constant<int64_t, R>{}) for 1 <= R <= kHeadGroup: the fused sweeps are
// compiled per head count, with every head's sums in registers.
template <typename Body>
void with_head_count(int64_t R, const Body& body) {
  switch (R) {
    case 1: body(std::integral_constant<int64_t, 1>{}); break;
    case 2: body(std::integral_constant<int64_t, 2>{}); break;
    case 3: body(std::integral_constant<int64_t, 3>{}); break;
    default: body(std::integral_constant<int64_t, 4>{}); break;
  }
}

template <bool kUpdate, bool kReads, typename scalar_t>
void links_forward(const Links<scalar_t>& x, scalar_t* new_link, scalar_t* new_precedence, scalar_t* forward,
                   scalar_t* backward) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.B, N = x.N, R = x.R;
  const int64_t blocks = row_blocks(B, N), rows_per_block = (N + blocks - 1) / blocks;
  // Per piece: its partial b[r, :] = sum over its rows i of L'[i, :] wr[r, i].
  std::vector<acc_t> partial_backward(kReads ? B * blocks * R * N : 0);
  const bool fused = kReads && 1 <= R && R <= kHeadGroup;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(fused ? staged_size(N) : N);
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t b = piece / blocks, first = (piece % blocks) * rows_per_block;
      const int64_t last = std::min(N, first + rows_per_block);
      acc_t* column = kReads ? &partial_backward[piece * R * N] : nullptr;
      if (fused) {
        const Staged<acc_t> s = stage(x, static_cast<const scalar_t*>(nullptr), b, buffer.data());
        with_head_count(R, [&](auto heads) {
          forward_rows_fused<decltype(heads)::value, kUpdate>(x, b, first, last, s, new_link, forward);
        });
        for (int64_t r = 0; r < R; ++r) std::copy(s.column[2 + r], s.column[2 + r] + N, column + r * N);
      } else {
        if constexpr (kReads) std::fill(column, column + R * N, acc_t(0));
        forward_rows<kUpdate, kReads>(x, b, first, last, buffer.data(), new_link, forward, column);
      }
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if constexpr (kReads) {
        for (int64_t at = 0; at < R * N; ++at) {
          acc_t sum = 0;
          for (int64_t block = 0; block < blocks; ++block) sum += partial_backward[(b * blocks + block) * R * N + at];
          backward[b * R * N + at] = scalar_t(sum);
        }
      }
      if constexpr (kUpdate) {
        const scalar_t* w = x.write_w + b * N;
        const scalar_t* p = x.precedence + b * N;
        acc_t written = 0;
        for (int64_t n = 0; n < N; ++n) written += acc_t(w[n]);
        for (int64_t n = 0; n < N; ++n) new_precedence[b * N + n] = scalar_t((1 - written) * acc_t(p[n]) + acc_t(w[n]));
      }
    }
  });
}

// Gradients of one call; the ones a variant does not use stay null.
template <typename scalar_t>
struct LinkGrads {
  const scalar_t* new_link = nullptr;        // grad L' [B, N, N]
  const scalar_t* new_precedence = nullptr;  // grad p' [B, N]
  const scalar_t* forward = nullptr;         // grad f [B, R, N]
  const scalar_t* backward = nullptr;        // grad b [B, R, N]
};

// Rows first..last of batch row b: grad L into grad_link, the row parts of grad w (row_write) and
// grad wr (row_read), and this piece's column partials into column (see links_backward).
template <bool kUpdate, bool kReads, typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void backward_rows(const Links<scalar_t>& x, const LinkGrads<scalar_t>& g, int64_t b,
                                           int64_t first, int64_t last, acc_t* buffer, acc_t* G, acc_t* column,
                                           scalar_t* grad_link, acc_t* row_write, acc_t* row_read) {
  const int64_t N = x.N, R = x.R;
  for (int64_t i = first; i < last; ++i) {
    const acc_t* row = link_row<kUpdate>(x, b, i, buffer);
    if constexpr (kUpdate) {
      const scalar_t* gL = g.new_link + (b * N + i) * N;
      for (int64_t j = 0; j < N; ++j) G[j] = acc_t(gL[j]);
    } else {
      std::fill(G, G + N, acc_t(0));
    }
    if constexpr (kReads) {
      acc_t* read_column = column + (kUpdate ? 2 : 0) * N;
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* wr = x.read_w + (b * R + r) * N;
        const scalar_t* gb = g.backward + (b * R + r) * N;
        const acc_t gf_i = acc_t(g.forward[(b * R + r) * N + i]);
        const acc_t wr_i = acc_t(wr[i]);
        for (int64_t j = 0; j < N; ++j) G[j] += gf_i * acc_t(wr[j]) + wr_i * acc_t(gb[j]);
        row_read[(b * R + r) * N + i] = dot<acc_t>(row, gb, N);
        acc_t* col = read_column + r * N;
        for (int64_t j = 0; j < N; ++j) col[j] += gf_i * row[j];
      }
    }
    scalar_t* out = grad_link + (b * N + i) * N;
    if constexpr (kUpdate) {
      const scalar_t* L = x.link + (b * N + i) * N;
      const scalar_t* w = x.write_w + b * N;
      const scalar_t* p = x.precedence + b * N;
      const acc_t wi = acc_t(w[i]);
      acc_t* col_link = column;
      acc_t* col_write = column + N;
      // j < i, then j > i: the diagonal is a constant 0 and passes no gradient.
      acc_t row_sum = 0;
      for (int64_t part = 0; part < 2; ++part) {
        const int64_t from = part == 0 ? 0 : i + 1, to = part == 0 ? i : N;
#pragma omp simd reduction(+ : row_sum)
        for (int64_t j = from; j < to; ++j) {
          const acc_t Lij = acc_t(L[j]);
          out[j] = scalar_t(G[j] * (1 - wi - acc_t(w[j])));
          row_sum += G[j] * (acc_t(p[j]) - Lij);
          col_link[j] += G[j] * Lij;
          col_write[j] += G[j] * wi;
        }
      }
      row_write[b * N + i] = row_sum;
      out[i] = scalar_t(0);
    } else {
      for (int64_t j = 0; j < N; ++j) out[j] = scalar_t(G[j]);
    }
  }
}

// The backward of forward_rows_fused, one sweep per row (see backward_rows for the sums): G is
// built in a register from grad L' and every head's share, then used for grad L, the row part of
// grad w and the column partials (s.column: [sum_i G L, sum_i G w_i], then per head) unstored.
template <int64_t H, bool kUpdate, typename scalar_t, typename acc_t>
SPARSEMEM_VECTOR_CLONES void backward_rows_fused(const Links<scalar_t>& x, const LinkGrads<scalar_t>& g, int64_t b,
                                                 int64_t first, int64_t last, const Staged<acc_t>& s,
                                                 scalar_t* grad_link, acc_t* row_write, acc_t* row_read) {
  static_assert(1 <= H && H <= kHeadGroup, "one sweep holds up to kHeadGroup heads");
  const int64_t N = x.N;
  const acc_t* __restrict w = s.w;
  const acc_t* __restrict p = s.p;
  const acc_t* __restrict wr0 = s.wr[0];
  const acc_t* __restrict wr1 = s.wr[H > 1 ? 1 : 0];
  const acc_t* __restrict wr2 = s.wr[H > 2 ? 2 : 0];
  const acc_t* __restrict wr3 = s.wr[H > 3 ? 3 : 0];
  const acc_t* __restrict gb0 = s.gb[0];
  const acc_t* __restrict gb1 = s.gb[H > 1 ? 1 : 0];
  const acc_t* __restrict gb2 = s.gb[H > 2 ? 2 : 0];
  const acc_t* __restrict gb3 = s.gb[H > 3 ? 3 : 0];
  const scalar_t* gf = g.forward + b * H * N;
  acc_t* __restrict col_link = s.column[0];
  acc_t* __restrict col_write = s.column[1];
  acc_t* __restrict c0 = s.column[2];
  acc_t* __restrict c1 = s.column[H > 1 ? 3 : 2];
  acc_t* __restrict c2 = s.column[H > 2 ? 4 : 2];
  acc_t* __restrict c3 = s.column[H > 3 ? 5 : 2];
  for (int64_t i = first; i < last; ++i) {
    const scalar_t* __restrict L = x.link + (b * N + i) * N;
    const scalar_t* __restrict gL = kUpdate ? g.new_link + (b * N + i) * N : nullptr;
    scalar_t* __restrict out = grad_link + (b * N + i) * N;
    const acc_t wi = kUpdate ? w[i] : acc_t(0);
    const acc_t q0 = wr0[i], q1 = wr1[i], q2 = wr2[i], q3 = wr3[i];
    const acc_t e0 = acc_t(gf[i]), e1 = H > 1 ? acc_t(gf[N + i]) : acc_t(0);
    const acc_t e2 = H > 2 ? acc_t(gf[2 * N + i]) : acc_t(0), e3 = H > 3 ? acc_t(gf[3 * N + i]) : acc_t(0);
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, row_sum = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, row_sum)
    for (int64_t j = 0; j < N; ++j) {
      const acc_t Lij = acc_t(L[j]);
      acc_t v = Lij, G = 0;
      if constexpr (kUpdate) {
        v = (1 - wi - w[j]) * Lij + wi * p[j];
        v = j == i ? acc_t(0) : v;
        G = acc_t(gL[j]);
      }
      G += e0 * wr0[j] + q0 * gb0[j];
      s0 += v * gb0[j];
      c0[j] += e0 * v;
      if constexpr (H > 1) {
        G += e1 * wr1[j] + q1 * gb1[j];
        s1 += v * gb1[j];
        c1[j] += e1 * v;
      }
      if constexpr (H > 2) {
        G += e2 * wr2[j] + q2 * gb2[j];
        s2 += v * gb2[j];
        c2[j] += e2 * v;
      }
      if constexpr (H > 3) {
        G += e3 * wr3[j] + q3 * gb3[j];
        s3 += v * gb3[j];
        c3[j] += e3 * v;
      }
      if constexpr (kUpdate) {
        G = j == i ? acc_t(0) : G;  // the diagonal is a constant 0 and passes no gradient
        out[j] = scalar_t(G * (1 - wi - w[j]));
        row_sum += G * (p[j] - Lij);
        col_link[j] += G * Lij;
        col_write[j] += G * wi;
      } else {
        out[j] = scalar_t(G);
      }
    }
    if constexpr (kUpdate) row_write[b * N + i] = row_sum;
    acc_t* r = row_read + b * H * N + i;
    r[0] = s0;
    if constexpr (H > 1) r[N] = s1;
    if constexpr (H > 2) r[2 * N] = s2;
    if constexpr (H > 3) r[3 * N] = s3;
  }
}

// With G = dLoss/dL' (grad L' plus, with kReads, the reads' share
//   G[i, j] += sum_r grad_f[r, i] wr[r, j] + grad_b[r, j] wr[r, i]):
//   grad L[i, j] = G[i, j] (1 - w_i - w_j) (i != j), 0 on the diagonal   (kUpdate; else G)
//   grad w_k = sum_{j != k} G[k, j] (p_j - L[k, j]) - sum_{i != k} G[i, k] L[i, k] + gp'_k - gp' . p
//   grad p_j = sum_{i != j} G[i, j] w_i + gp'_j (1 - sum w)
//   grad wr[r, n] = sum_j L'[n, j] grad_b[r, j] + sum_i L'[i, n] grad_f[r, i]
template <bool kUpdate, bool kReads, typename scalar_t>
void links_backward(const Links<scalar_t>& x, const LinkGrads<scalar_t>& g, scalar_t* grad_link,
                    scalar_t* grad_precedence, scalar_t* grad_write_w, scalar_t* grad_read_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.B, N = x.N, R = x.R;
  const int64_t blocks = row_blocks(B, N), rows_per_block = (N + blocks - 1) / blocks;
  // Per piece, column partials: [sum_i G L, sum_i G w_i] (kUpdate), then [sum_i L' grad_f[r, i]]_r (kReads).
  const int64_t columns = (kUpdate ? 2 : 0) + (kReads ? R : 0);
  std::vector<acc_t> partial(B * blocks * columns * N);
  // Row parts, written once per row: grad w's first sum (kUpdate); grad wr's first sum (kReads).
  std::vector<acc_t> row_write(kUpdate ? B * N : 0), row_read(kReads ? B * R * N : 0);
  const bool fused = kReads && 1 <= R && R <= kHeadGroup;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(fused ? staged_size(N) : N), G(fused ? 0 : N);
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t b = piece / blocks, first = (piece % blocks) * rows_per_block;
      const int64_t last = std::min(N, first + rows_per_block);
      acc_t* column = &partial[piece * columns * N];
      if (fused) {
        const Staged<acc_t> s = stage(x, g.backward, b, buffer.data());
        with_head_count(R, [&](auto heads) {
          backward_rows_fused<decltype(heads)::value, kUpdate>(x, g, b, first, last, s, grad_link,
                                                               row_write.data(), row_read.data());
        });
        // the staged columns in the partial's layout: [link, write] (kUpdate), then per head
        for (int64_t c = kUpdate ? 0 : 2; c < 2 + R; ++c) {
          std::copy(s.column[c], s.column[c] + N, column + (c - (kUpdate ? 0 : 2)) * N);
        }
      } else {
        std::fill(column, column + columns * N, acc_t(0));
        backward_rows<kUpdate, kReads>(x, g, b, first, last, buffer.data(), G.data(), column, grad_link,
                                       row_write.data(), row_read.data());
      }
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(columns * N);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t block = 0; block < blocks; ++block) {
        const acc_t* column = &partial[(b * blocks + block) * columns * N];
        for (int64_t at = 0; at < columns * N; ++at) sum[at] += column[at];
      }
      if constexpr (kUpdate) {
        const scalar_t* w = x.write_w + b * N;
        const scalar_t* p = x.precedence + b * N;
        const scalar_t* gp = g.new_precedence + b * N;
        acc_t written = 0, gp_dot_p = 0;
        for (int64_t n = 0; n < N; ++n) {
          written += acc_t(w[n]);
          gp_dot_p += acc_t(gp[n]) * acc_t(p[n]);
        }
        for (int64_t n = 0; n < N; ++n) {
          grad_write_w[b * N + n] = scalar_t(row_write[b * N + n] - sum[n] + acc_t(gp[n]) - gp_dot_p);
          grad_precedence[b * N + n] = scalar_t(sum[N + n] + acc_t(gp[n]) * (1 - written));
        }
      }
      if constexpr (kReads) {
        const acc_t* read_sum = sum.data() + (kUpdate ? 2 : 0) * N;
        for (int64_t at = 0; at < R * N; ++at) grad_read_w[b * R * N + at] = scalar_t(row_read[b * R * N + at] + read_sum[at]);
      }
    }
  });
}

template <typename scalar_t>
Links<scalar_t> links_of(const at::Tensor& link, const at::Tensor* precedence, const at::Tensor* write_w,
                         const at::Tensor* read_w) {
  Links<scalar_t> x;
  x.B = link.size(0);
  x.N = link.size(1);
  x.R = read_w ? read_w->size(1) : 0;
  x.link = link.data_ptr<scalar_t>();
  x.precedence = precedence ? precedence->data_ptr<scalar_t>() : nullptr;
  x.write_w = write_w ? write_w->data_ptr<scalar_t>() : nullptr;
  x.read_w = read_w ? read_w->data_ptr<scalar_t>() : nullptr;
  return x;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ext_link_update(const at::Tensor& link_in, const at::Tensor& precedence_in,
                                                   const at::Tensor& write_w_in) {
  check_link(link_in);
  check_vector("precedence", precedence_in, link_in);
  check_vector("write_w", write_w_in, link_in);
  const auto link = link_in.contiguous(), precedence = precedence_in.contiguous(), write_w = write_w_in.contiguous();
  auto new_link = empty_link(link);
  auto new_precedence = at::empty_like(precedence);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "ext_link_update", [&] {
    links_forward<true, false>(links_of<scalar_t>(link, &precedence, &write_w, nullptr), new_link.data_ptr<scalar_t>(),
                               new_precedence.data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr),
                               static_cast<scalar_t*>(nullptr));
  });
  return {new_link, new_precedence};
}

std::vector<at::Tensor> ext_link_update_backward(const at::Tensor& grad_link, const at::Tensor& grad_precedence,
                                                 const at::Tensor& link_in, const at::Tensor& precedence_in,
                                                 const at::Tensor& write_w_in, const at::Tensor& /*new_link*/,
                                                 const at::Tensor& /*new_precedence*/) {
  check_link(link_in);
  const auto link = link_in.contiguous(), precedence = precedence_in.contiguous(), write_w = write_w_in.contiguous();
  const auto grad_link_c = grad_link.contiguous(), grad_precedence_c = grad_precedence.contiguous();
  auto d_link = empty_link(link), d_precedence = at::empty_like(precedence), d_write_w = at::empty_like(write_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "ext_link_update_backward", [&] {
    LinkGrads<scalar_t> g;
    g.new_link = grad_link_c.data_ptr<scalar_t>();
    g.new_precedence = grad_precedence_c.data_ptr<scalar_t>();
    links_backward<true, false>(links_of<scalar_t>(link, &precedence, &write_w, nullptr), g,
                                d_link.data_ptr<scalar_t>(), d_precedence.data_ptr<scalar_t>(),
                                d_write_w.data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr));
  });
  return {d_link, d_precedence, d_write_w};
}

std::tuple<at::Tensor, at::Tensor> ext_temporal_reads(const at::Tensor& link_in, const at::Tensor& read_w_in) {
  check_link(link_in);
  check_read_w(read_w_in, link_in);
  const auto link = link_in.contiguous(), read_w = read_w_in.contiguous();
  auto forward = at::empty_like(read_w), backward = at::empty_like(read_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "ext_temporal_reads", [&] {
    links_forward<false, true>(links_of<scalar_t>(link, nullptr, nullptr, &read_w), static_cast<scalar_t*>(nullptr),
                               static_cast<scalar_t*>(nullptr), forward.data_ptr<scalar_t>(),
                               backward.data_ptr<scalar_t>());
  });
  return {forward, backward};
}

std::vector<at::Tensor> ext_temporal_reads_backward(const at::Tensor& grad_forward, const at::Tensor& grad_backward,
                                                    const at::Tensor& link_in, const at::Tensor& read_w_in,
                                                    const at::Tensor& /*forward*/, const at::Tensor& /*backward*/) {
  check_link(link_in);
  check_read_w(read_w_in, link_in);
  const auto link = link_in.contiguous(), read_w = read_w_in.contiguous();
  const auto grad_forward_c = grad_forward.contiguous(), grad_backward_c = grad_backward.contiguous();
  auto d_link = empty_link(link), d_read_w = at::empty_like(read_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "ext_temporal_reads_backward", [&] {
    LinkGrads<scalar_t> g;
    g.forward = grad_forward_c.data_ptr<scalar_t>();
    g.backward = grad_backward_c.data_ptr<scalar_t>();
    links_backward<false, true>(links_of<scalar_t>(link, nullptr, nullptr, &read_w), g, d_link.data_ptr<scalar_t>(),
                                static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr),
                                d_read_w.data_ptr<scalar_t>());
  });
  return {d_link, d_read_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_link_update_reads(const at::Tensor& link_in,
                                                                                 const at::Tensor& precedence_in,
                                                                                 const at::Tensor& write_w_in,
                                                                                 const at::Tensor& read_w_in) {
  check_link(link_in);
  check_vector("precedence", precedence_in, link_in);
  check_vector("write_w", write_w_in, link_in);
  check_read_w(read_w_in, link_in);
  const auto link = link_in.contiguous(), precedence = precedence_in.contiguous(), write_w = write_w_in.contiguous();
  const auto read_w = read_w_in.contiguous();
  auto new_link = empty_link(link), new_precedence = at::empty_like(precedence);
  auto forward = at::empty_like(read_w), backward = at::empty_like(read_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "ext_link_update_reads", [&] {
    links_forward<true, true>(links_of<scalar_t>(link, &precedence, &write_w, &read_w), new_link.data_ptr<scalar_t>(),
                              new_precedence.data_ptr<scalar_t>(), forward.data_ptr<scalar_t>(),
                              backward.data_ptr<scalar_t>());
  });
  return {new_link, new_precedence, forward, backward};
}

std::vector<at::Tensor> ext_link_update_reads_backward(
    const at::Tensor& grad_link, const at::Tensor& grad_precedence, const at::Tensor& grad_forward,
    const at::Tensor& grad_backward, const at::Tensor& link_in, const at::Tensor& precedence_in,
    const at::Tensor& write_w_in, const at::Tensor& read_w_in, const at::Tensor& /*new_link*/,
    const at::Tensor& /*new_precedence*/, const at::Tensor& /*forward*/, const at::Tensor& /*backward*/) {
  check_link(link_in);
  check_read_w(read_w_in, link_in);
  const auto link = link_in.contiguous(), precedence = precedence_in.contiguous(), write_w = write_w_in.contiguous();
  const auto read_w = read_w_in.contiguous();
  const auto grad_link_c = grad_link.contiguous(), grad_precedence_c = grad_precedence.contiguous();
  const auto grad_forward_c = grad_forward.contiguous(), grad_backward_c = grad_backward.contiguous();
  auto d_link = empty_link(link), d_precedence = at::empty_like(precedence), d_write_w = at::empty_like(write_w);
  auto d_read_w = at::empty_like(read_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, link.scalar_type(), "ext_link_update_reads_backward", [&] {
    LinkGrads<scalar_t> g;
    g.new_link = grad_link_c.data_ptr<scalar_t>();
    g.new_precedence = grad_precedence_c.data_ptr<scalar_t>();
    g.forward = grad_forward_c.data_ptr<scalar_t>();
    g.backward = grad_backward_c.data_ptr<scalar_t>();
    links_backward<true, true>(links_of<scalar_t>(link, &precedence, &write_w, &read_w), g,
                               d_link.data_ptr<scalar_t>(), d_precedence.data_ptr<scalar_t>(),
                               d_write_w.data_ptr<scalar_t>(), d_read_w.data_ptr<scalar_t>());
  });
  return {d_link, d_precedence, d_write_w, d_read_w};
}

namespace {

// The backward reads the inputs only: the outputs are not kept (the next step holds the new link).
struct LinkUpdateReads {
  static constexpr bool kSavesOutputs = false;
  static torch::autograd::variable_list forward(const at::Tensor& link, const at::Tensor& precedence,
                                                const at::Tensor& write_w, const at::Tensor& read_w) {
    auto [new_link, new_precedence, forward, backward] = ext_link_update_reads(link, precedence, write_w, read_w);
    return {new_link, new_precedence, forward, backward};
  }
  static torch::autograd::variable_list backward(const torch::autograd::variable_list& g,
                                                 const torch::autograd::variable_list& s) {
    const at::Tensor unused;
    return ext_link_update_reads_backward(g[0], g[1], g[2], g[3], s[0], s[1], s[2], s[3], unused, unused, unused,
                                          unused);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> link_update_reads_autograd(const at::Tensor& link,
                                                                                      const at::Tensor& precedence,
                                                                                      const at::Tensor& write_w,
                                                                                      const at::Tensor& read_w) {
  const auto out = Differentiated<LinkUpdateReads>::apply(link, precedence, write_w, read_w);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_link_update(Tensor link, Tensor precedence, Tensor write_w) -> (Tensor, Tensor)");
  m.def(
      "ext_link_update_backward(Tensor grad_link, Tensor grad_precedence, Tensor link, Tensor precedence, "
      "Tensor write_w, Tensor new_link, Tensor new_precedence) -> Tensor[]");
  m.def("ext_temporal_reads(Tensor link, Tensor read_w) -> (Tensor, Tensor)");
  m.def(
      "ext_temporal_reads_backward(Tensor grad_forward, Tensor grad_backward, Tensor link, Tensor read_w, "
      "Tensor forward, Tensor backward) -> Tensor[]");
  m.def(
      "ext_link_update_reads(Tensor link, Tensor precedence, Tensor write_w, Tensor read_w) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_link_update_reads_backward(Tensor grad_link, Tensor grad_precedence, Tensor grad_forward, "
      "Tensor grad_backward, Tensor link, Tensor precedence, Tensor write_w, Tensor read_w, Tensor new_link, "
      "Tensor new_precedence, Tensor forward, Tensor backward) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_link_update", &ext_link_update);
  m.impl("ext_link_update_backward", &ext_link_update_backward);
  m.impl("ext_temporal_reads", &ext_temporal_reads);
  m.impl("ext_temporal_reads_backward", &ext_temporal_reads_backward);
  m.impl("ext_link_update_reads", &ext_link_update_reads);
  m.impl("ext_link_update_reads_backward", &ext_link_update_reads_backward);
}

TORCH_LIBRARY_IMPL(sparsemem, Autograd, m) { m.impl("ext_link_update_reads", &link_update_reads_autograd); }

}  // namespace sparsemem
