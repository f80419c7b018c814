// Content addressing on the CPU: w[b, r, :] = softmax_n(s_r * D(k_r, M_n)), with the cosine
// similarity D(k, M_n) = k . M_n / (||k||_eps ||M_n||_eps), ||x||_eps = sqrt(sum x^2 + 1e-6),
// and (content_read) the read vectors reads[b, r, :] = sum_n w[b, r, n] M_n.
//
// Tiling: the slots of each batch row are cut into tiles of kTile slots, and the (b, tile)
// pieces run in parallel (at::parallel_for), so a single batch row still uses every thread.
// A piece reads each word M_n once: its norm and its R dot products come from the same load.
// Per head it keeps an online softmax state -- running max m, running sum l of exp(z - m) and,
// for content_read, the running sum of exp(z - m) M_n -- rescaled by exp(m_old - m_new) when the
// max grows. The logits go to the output (or an fp32 buffer for half types); the pieces of a row
// are merged afterwards and one pass over [B, R, N] turns logits into weights. Memory [B, N, W]
// is read once; reads need no second pass over [B, R, N].
//
// The backward reads memory once too, recomputing norms and similarities instead of saving them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace sparsemem {

namespace {

constexpr double kEps = 1e-6;  // the reference's eps on squared norms (sparsemem/reference/dnc.py)
constexpr int64_t kTile = 2048;

void check_inputs(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths) {
  TORCH_CHECK(memory.dim() == 3 && keys.dim() == 3 && strengths.dim() == 2,
              "memory must be [B, N, W], keys [B, R, W], strengths [B, R]");
  TORCH_CHECK(keys.size(0) == memory.size(0) && keys.size(2) == memory.size(2),
              "keys must be [B, R, W] matching memory [B, N, W]");
  TORCH_CHECK(strengths.size(0) == keys.size(0) && strengths.size(1) == keys.size(1),
              "strengths must be [B, R] matching keys [B, R, W]");
  TORCH_CHECK(memory.size(1) >= 1, "memory needs at least one slot (N >= 1)");
  TORCH_CHECK(memory.scalar_type() == keys.scalar_type() && keys.scalar_type() == strengths.scalar_type(),
              "memory, keys and strengths must share a dtype");
}

template <typename acc_t, typename scalar_t>
acc_t safe_norm(const scalar_t* x, int64_t W) {
  acc_t sum = 0;
  for (int64_t i = 0; i < W; ++i) sum += acc_t(x[i]) * acc_t(x[i]);
  return std::sqrt(sum + acc_t(kEps));
}

template <typename acc_t, typename scalar_t>
acc_t dot(const acc_t* a, const scalar_t* b, int64_t W) {
  acc_t sum = 0;
  for (int64_t i = 0; i < W; ++i) sum += a[i] * acc_t(b[i]);
  return sum;
}

// Forward of content_weights (with_reads = false) and content_read (with_reads = true).
template <typename scalar_t>
void content_forward(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                     at::Tensor& weights, at::Tensor* reads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  const int64_t tiles = (N + kTile - 1) / kTile;
  const bool with_reads = reads != nullptr;
  // Logits are kept in acc_t: written straight into the output when it has that type.
  constexpr bool kLogitsInOutput = std::is_same_v<scalar_t, acc_t>;
  at::Tensor logits_buffer =
      kLogitsInOutput ? weights : at::empty({B, R, N}, weights.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* logits = logits_buffer.data_ptr<acc_t>();
  const scalar_t* m = memory.data_ptr<scalar_t>();
  // Keys pre-scaled by s_r / ||k_r||: the logit is then scaled_key . M_n / ||M_n||.
  std::vector<acc_t> scaled_keys(B * R * W);
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t* s = strengths.data_ptr<scalar_t>();
  for (int64_t row = 0; row < B * R; ++row) {
    const acc_t scale = acc_t(s[row]) / safe_norm<acc_t>(k + row * W, W);
    for (int64_t i = 0; i < W; ++i) scaled_keys[row * W + i] = scale * acc_t(k[row * W + i]);
  }
  // Per (b, tile, r): running max, running sum, and (reads) the running weighted sum of words.
  std::vector<acc_t> tile_max(B * tiles * R), tile_sum(B * tiles * R);
  std::vector<acc_t> tile_acc(with_reads ? B * tiles * R * W : 0);

  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(R);
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t b = piece / tiles, first = (piece % tiles) * kTile, last = std::min(N, first + kTile);
      acc_t* run_max = &tile_max[piece * R];
      acc_t* run_sum = &tile_sum[piece * R];
      acc_t* run_acc = with_reads ? &tile_acc[piece * R * W] : nullptr;
      std::fill(run_max, run_max + R, -std::numeric_limits<acc_t>::infinity());
      std::fill(run_sum, run_sum + R, acc_t(0));
      if (with_reads) std::fill(run_acc, run_acc + R * W, acc_t(0));
      for (int64_t n = first; n < last; ++n) {
        const scalar_t* word = m + (b * N + n) * W;
        const acc_t inv_norm = acc_t(1) / safe_norm<acc_t>(word, W);
        for (int64_t r = 0; r < R; ++r) {
          z[r] = dot(&scaled_keys[(b * R + r) * W], word, W) * inv_norm;
          logits[(b * R + r) * N + n] = z[r];
        }
        for (int64_t r = 0; r < R; ++r) {
          if (z[r] > run_max[r]) {
            const acc_t rescale = std::exp(run_max[r] - z[r]);
            run_sum[r] *= rescale;
            if (with_reads) {
              for (int64_t i = 0; i < W; ++i) run_acc[r * W + i] *= rescale;
            }
            run_max[r] = z[r];
          }
          const acc_t e = std::exp(z[r] - run_max[r]);
          run_sum[r] += e;
          if (with_reads) {
            for (int64_t i = 0; i < W; ++i) run_acc[r * W + i] += e * acc_t(word[i]);
          }
        }
      }
    }
  });

  // Merge the tiles of each (b, r), then normalise the logits into weights.
  std::vector<acc_t> row_max(B * R), row_inv_sum(B * R);
  scalar_t* out_reads = with_reads ? reads->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / R, r = row % R;
      acc_t max = -std::numeric_limits<acc_t>::infinity();
      for (int64_t t = 0; t < tiles; ++t) max = std::max(max, tile_max[(b * tiles + t) * R + r]);
      acc_t sum = 0;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t at = (b * tiles + t) * R + r;
        const acc_t rescale = std::exp(tile_max[at] - max);
        sum += tile_sum[at] * rescale;
        if (with_reads) {
          for (int64_t i = 0; i < W; ++i) acc[i] += tile_acc[at * W + i] * rescale;
        }
      }
      row_max[row] = max;
      row_inv_sum[row] = acc_t(1) / sum;
      if (with_reads) {
        for (int64_t i = 0; i < W; ++i) out_reads[row * W + i] = scalar_t(acc[i] * row_inv_sum[row]);
      }
    }
  });
  scalar_t* w = weights.data_ptr<scalar_t>();
  at::parallel_for(0, B * R * N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t at = begin; at < end; ++at) {
      const int64_t row = at / N;
      w[at] = scalar_t(std::exp(logits[at] - row_max[row]) * row_inv_sum[row]);
    }
  });
}

// Backward of both ops; grad_reads (content_read) may be null.
//   g'_rn = g_w[r, n] + g_reads_r . M_n          (the read adds a path from M_n to w_rn)
//   dz_rn = w_rn (g'_rn - c_r),  c_r = sum_n w_rn g'_rn = sum_n w_rn g_w[r, n] + g_reads_r . reads_r
//   dD_rn = s_r dz_rn;  ds_r = sum_n dz_rn D_rn
//   dk_r = (sum_n dD_rn M_n / ||M_n||) / ||k_r|| - k_r (sum_n dD_rn D_rn) / ||k_r||^2
//   dM_n = sum_r dD_rn k_r / (||k_r|| ||M_n||) - (sum_r dD_rn D_rn) M_n / ||M_n||^2 + sum_r w_rn g_reads_r
template <typename scalar_t>
std::vector<at::Tensor> content_backward(const at::Tensor& grad_weights, const at::Tensor* grad_reads,
                                         const at::Tensor& memory, const at::Tensor& keys,
                                         const at::Tensor& strengths, const at::Tensor& weights,
                                         const at::Tensor* reads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = memory.size(0), N = memory.size(1), W = memory.size(2), R = keys.size(1);
  const int64_t tiles = (N + kTile - 1) / kTile;
  const bool with_reads = grad_reads != nullptr;
  const scalar_t* m = memory.data_ptr<scalar_t>();
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t* s = strengths.data_ptr<scalar_t>();
  const scalar_t* w = weights.data_ptr<scalar_t>();
  const scalar_t* gw = grad_weights.data_ptr<scalar_t>();
  const scalar_t* gr = with_reads ? grad_reads->data_ptr<scalar_t>() : nullptr;

  // Per (b, r): unit key k_r / ||k_r||, 1 / ||k_r||, read gradient in acc_t, and c_r.
  std::vector<acc_t> unit_keys(B * R * W), inv_key_norm(B * R), grad_read(with_reads ? B * R * W : 0), c(B * R);
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      inv_key_norm[row] = acc_t(1) / safe_norm<acc_t>(k + row * W, W);
      for (int64_t i = 0; i < W; ++i) unit_keys[row * W + i] = acc_t(k[row * W + i]) * inv_key_norm[row];
      acc_t total = 0;
      for (int64_t n = 0; n < N; ++n) total += acc_t(w[row * N + n]) * acc_t(gw[row * N + n]);
      if (with_reads) {
        const scalar_t* read = reads->data_ptr<scalar_t>() + row * W;
        for (int64_t i = 0; i < W; ++i) {
          grad_read[row * W + i] = acc_t(gr[row * W + i]);
          total += grad_read[row * W + i] * acc_t(read[i]);
        }
      }
      c[row] = total;
    }
  });

  auto grad_memory = at::empty_like(memory);
  scalar_t* gm = grad_memory.data_ptr<scalar_t>();
  // Per (b, tile, r): partial sums of dz D (strength), dD D (key, scalar part), dD M / ||M|| (key).
  std::vector<acc_t> part_strength(B * tiles * R), part_key_scalar(B * tiles * R), part_key(B * tiles * R * W);
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> word_grad(W);
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t b = piece / tiles, first = (piece % tiles) * kTile, last = std::min(N, first + kTile);
      acc_t* p_strength = &part_strength[piece * R];
      acc_t* p_key_scalar = &part_key_scalar[piece * R];
      acc_t* p_key = &part_key[piece * R * W];
      std::fill(p_strength, p_strength + R, acc_t(0));
      std::fill(p_key_scalar, p_key_scalar + R, acc_t(0));
      std::fill(p_key, p_key + R * W, acc_t(0));
      for (int64_t n = first; n < last; ++n) {
        const scalar_t* word = m + (b * N + n) * W;
        const acc_t inv_norm = acc_t(1) / safe_norm<acc_t>(word, W);
        std::fill(word_grad.begin(), word_grad.end(), acc_t(0));
        acc_t word_scalar = 0;  // sum_r dD_rn D_rn
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = b * R + r;
          const acc_t similarity = dot(&unit_keys[row * W], word, W) * inv_norm;
          acc_t grad = acc_t(gw[row * N + n]);
          if (with_reads) grad += dot(&grad_read[row * W], word, W);
          const acc_t weight = acc_t(w[row * N + n]);
          const acc_t dz = weight * (grad - c[row]);
          const acc_t dD = acc_t(s[row]) * dz;
          p_strength[r] += dz * similarity;
          p_key_scalar[r] += dD * similarity;
          word_scalar += dD * similarity;
          const acc_t to_key = dD * inv_norm;
          for (int64_t i = 0; i < W; ++i) {
            p_key[r * W + i] += to_key * acc_t(word[i]);
            word_grad[i] += to_key * unit_keys[row * W + i];
          }
          if (with_reads) {
            for (int64_t i = 0; i < W; ++i) word_grad[i] += weight * grad_read[row * W + i];
          }
        }
        const acc_t to_word = word_scalar * inv_norm * inv_norm;
        for (int64_t i = 0; i < W; ++i) gm[(b * N + n) * W + i] = scalar_t(word_grad[i] - to_word * acc_t(word[i]));
      }
    }
  });

  auto grad_keys = at::empty_like(keys);
  auto grad_strengths = at::empty_like(strengths);
  scalar_t* gk = grad_keys.data_ptr<scalar_t>();
  scalar_t* gs = grad_strengths.data_ptr<scalar_t>();
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> key_sum(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / R, r = row % R;
      acc_t strength = 0, key_scalar = 0;
      std::fill(key_sum.begin(), key_sum.end(), acc_t(0));
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t at = (b * tiles + t) * R + r;
        strength += part_strength[at];
        key_scalar += part_key_scalar[at];
        for (int64_t i = 0; i < W; ++i) key_sum[i] += part_key[at * W + i];
      }
      gs[row] = scalar_t(strength);
      const acc_t inv = inv_key_norm[row];
      for (int64_t i = 0; i < W; ++i) {
        gk[row * W + i] = scalar_t(key_sum[i] * inv - unit_keys[row * W + i] * key_scalar * inv);
      }
    }
  });
  return {grad_memory, grad_keys, grad_strengths};
}

}  // namespace

at::Tensor ext_content_weights(const at::Tensor& memory_in, const at::Tensor& keys_in,
                               const at::Tensor& strengths_in) {
  check_inputs(memory_in, keys_in, strengths_in);
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous(), strengths = strengths_in.contiguous();
  auto weights = at::empty({keys.size(0), keys.size(1), memory.size(1)}, memory.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_weights", [&] {
    content_forward<scalar_t>(memory, keys, strengths, weights, nullptr);
  });
  return weights;
}

std::tuple<at::Tensor, at::Tensor> ext_content_read(const at::Tensor& memory_in, const at::Tensor& keys_in,
                                                    const at::Tensor& strengths_in) {
  check_inputs(memory_in, keys_in, strengths_in);
  const auto memory = memory_in.contiguous(), keys = keys_in.contiguous(), strengths = strengths_in.contiguous();
  auto weights = at::empty({keys.size(0), keys.size(1), memory.size(1)}, memory.options());
  auto reads = at::empty_like(keys);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_read", [&] {
    content_forward<scalar_t>(memory, keys, strengths, weights, &reads);
  });
  return {weights, reads};
}

std::vector<at::Tensor> ext_content_weights_backward(const at::Tensor& grad_weights, const at::Tensor& memory,
                                                     const at::Tensor& keys, const at::Tensor& strengths,
                                                     const at::Tensor& weights) {
  check_inputs(memory, keys, strengths);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_weights_backward", [&] {
    grads = content_backward<scalar_t>(grad_weights.contiguous(), nullptr, memory.contiguous(), keys.contiguous(),
                                       strengths.contiguous(), weights.contiguous(), nullptr);
  });
  return grads;
}

std::vector<at::Tensor> ext_content_read_backward(const at::Tensor& grad_weights, const at::Tensor& grad_reads,
                                                  const at::Tensor& memory, const at::Tensor& keys,
                                                  const at::Tensor& strengths, const at::Tensor& weights,
                                                  const at::Tensor& reads) {
  check_inputs(memory, keys, strengths);
  const auto grad_reads_c = grad_reads.contiguous(), reads_c = reads.contiguous();
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "ext_content_read_backward", [&] {
    grads = content_backward<scalar_t>(grad_weights.contiguous(), &grad_reads_c, memory.contiguous(),
                                       keys.contiguous(), strengths.contiguous(), weights.contiguous(), &reads_c);
  });
  return grads;
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_content_weights(Tensor memory, Tensor keys, Tensor strengths) -> Tensor");
  m.def(
      "ext_content_weights_backward(Tensor grad_weights, Tensor memory, Tensor keys, Tensor strengths, "
      "Tensor weights) -> Tensor[]");
  m.def("ext_content_read(Tensor memory, Tensor keys, Tensor strengths) -> (Tensor, Tensor)");
  m.def(
      "ext_content_read_backward(Tensor grad_weights, Tensor grad_reads, Tensor memory, Tensor keys, "
      "Tensor strengths, Tensor weights, Tensor reads) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparsemem, CPU, m) {
  m.impl("ext_content_weights", &ext_content_weights);
  m.impl("ext_content_weights_backward", &ext_content_weights_backward);
  m.impl("ext_content_read", &ext_content_read);
  m.impl("ext_content_read_backward", &ext_content_read_backward);
}

}  // namespace sparsemem
