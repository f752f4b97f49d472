// CPU reductions of BatchNorm: the per-channel statistics (mean, m2) and backward sums (sum dy,
// sum dy * (x - mean)) that batch_norm.cpp's ops build on (declared in batch_norm.h).
//
// Algorithm, in the layout of batch_norm.h ((o * C + c) * inner + s):
// - inner > 1 (NCHW-like): at::parallel_for over channels; a channel is `outer` runs of `inner`
//   contiguous values, all read 16 at a time into the same vector accumulators, whose sums over
//   blocks of 128 values are paired in a binary tree (batch_norm_cpu_loops.h: channel_sum):
//   rounding error grows with log(n), not n.
// - inner == 1 (channels_last, (N, C)): at::parallel_for over fixed blocks of kRowsPerBlock rows;
//   each block sums its rows into its own [C] partials (the inner loop runs over contiguous
//   channels: vectorized), and the partials are then summed pairwise in block order.
// Statistics are two-pass and shifted: mean = shift + sum(x - shift) / n with shift = the channel's
// first value, then m2 = sum((x - mean)^2), so neither a large mean nor cancellation hurts. In the
// planes layout a channel's two passes run back to back (planes_moments), the second reading the
// channel's slice from cache where it fits; in the rows layout they run per block of rows while
// the block is in cache, and the blocks' (sum, m2 about the block's center) are combined exactly
// (rows_moments): one pass over memory either way. The order of every addition depends only on the
// shape and layout, never on the thread count.
//
// The loops themselves are compiled per instruction-set level (AVX-512 / AVX2 / SSE2, picked at run
// time by cpu_isa()) and widen bf16 with a shift, so bf16 and channels_last reductions run at
// vector speed.
//
// Trade-off: two passes over the input for the exact two-pass numerics of the reference, cheap
// for the small per-channel slices CPUs see, where they stay in cache.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "batch_norm.h"
#include "batch_norm_cpu_isa.h"
#include "common/cpu_isa.h"
#include "common/dispatch.h"

namespace fusedreg {
namespace {

using bn_cpu::Term;

constexpr int64_t kCascadeBase = 1024;

// n zeros of acc from c10's CPU allocator, 64-byte aligned: [C] rows of the rows layout's partials,
// centers and shifts, walked a vector at a time, then start on a cache line wherever C is a multiple
// of the vector width (malloc's 16-byte alignment made every 512-bit access straddle two lines).
template <typename acc>
at::Tensor aligned_zeros(int64_t n) {
  return at::zeros({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
}
constexpr int64_t kRowsPerBlock = 64;

// out[k * n + j] = sum over blocks b in [begin, end) of partials[(b * K + k) * C + c0 + j], for the
// O(blocks) partials of the rows layout: pairwise above kCascadeBase blocks, in block order below,
// each channel's additions in an order fixed by `blocks` alone. The channels are the inner loop
// (contiguous in every block's partials: vectorized), not one channel at a time down a column.
template <int K, typename acc>
void cascade_columns(const acc* partials, int64_t C, int64_t begin, int64_t end, int64_t c0, int64_t n, acc* out) {
  if (end - begin > kCascadeBase) {
    const int64_t mid = begin + (end - begin) / 2;
    std::vector<acc> hi(K * n);
    cascade_columns<K>(partials, C, begin, mid, c0, n, out);
    cascade_columns<K>(partials, C, mid, end, c0, n, hi.data());
    for (int64_t i = 0; i < K * n; ++i) out[i] = out[i] + hi[i];
    return;
  }
  std::fill(out, out + K * n, acc(0));
  for (int64_t b = begin; b < end; ++b) {
    for (int k = 0; k < K; ++k) {
      const acc* p = partials + (b * K + k) * C + c0;
      acc* o = out + k * n;
      for (int64_t j = 0; j < n; ++j) o[j] += p[j];
    }
  }
}

// out[k][c] = sum over the elements of channel c of the term kTerm (bn_cpu::run_sum) with m[c].
template <Term kTerm, typename scalar_t>
void reduce_channels(const scalar_t* x, const scalar_t* dy, const BatchNormLayout& L,
                     const acc_t<scalar_t>* m, acc_t<scalar_t>* const* out) {
  using acc = acc_t<scalar_t>;
  constexpr int K = bn_cpu::kSums<kTerm>;
  const int64_t C = L.channels;
  if (L.numel() == 0) {
    for (int k = 0; k < K; ++k) std::fill(out[k], out[k] + C, acc(0));
    return;
  }
  const CpuIsa isa = cpu_isa();
  if (L.inner > 1) {
    const int64_t grain = std::max<int64_t>(1, kCpuGrainElems / L.per_channel());
    at::parallel_for(0, C, grain, [&](int64_t c_begin, int64_t c_end) {
      bn_cpu::channels_sum<kTerm>(isa, x, dy, L, c_begin, c_end, m, out);
    });
    return;
  }
  const int64_t rows = L.outer;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const at::Tensor partials_buffer = aligned_zeros<acc>(blocks * K * C);
  acc* partials = partials_buffer.mutable_data_ptr<acc>();  // [block][k][c]
  at::parallel_for(0, blocks, std::max<int64_t>(1, kCpuGrainElems / (kRowsPerBlock * C)),
                   [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      bn_cpu::rows_sum<kTerm>(isa, x, dy, C, b * kRowsPerBlock, std::min(rows, (b + 1) * kRowsPerBlock), m,
                              &partials[b * K * C]);
    }
  });
  at::parallel_for(0, C, std::max<int64_t>(1, kCpuGrainElems / blocks), [&](int64_t c_begin, int64_t c_end) {
    const int64_t n = c_end - c_begin;
    std::vector<acc> total(K * n);
    cascade_columns<K>(partials, C, 0, blocks, c_begin, n, total.data());
    for (int k = 0; k < K; ++k) std::copy(total.begin() + k * n, total.begin() + (k + 1) * n, out[k] + c_begin);
  });
}

// mean and m2 of a rows layout (inner == 1, numel > 0) in one parallel pass over memory. Each
// block of kRowsPerBlock rows (an L1/L2-sized slice) gets its two-pass statistics while it is in
// cache: S_b = sum(x - shift), then Q_b = sum((x - c_b)^2) about its own rounded center c_b =
// shift + S_b / n_b. The blocks are then combined exactly (Chan et al.'s parallel variance with
// the cross term of an inexact center), in shift coordinates (e_b = c_b - shift, exact, and
// d = mean - shift): m2 = sum_b Q_b + 2 (e_b - d) T_b + n_b (e_b - d)^2, T_b = S_b - n_b e_b.
// S = sum_b S_b is added in the order reduce_channels uses, so the mean has the bits of the separate
// passes.
template <typename scalar_t>
void rows_moments(const scalar_t* x, const BatchNormLayout& L, const acc_t<scalar_t>* shift,
                  acc_t<scalar_t>* mean, acc_t<scalar_t>* m2) {
  using acc = acc_t<scalar_t>;
  const CpuIsa isa = cpu_isa();
  const int64_t C = L.channels, rows = L.outer;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const at::Tensor buffer = aligned_zeros<acc>(blocks * 3 * C);
  acc* partials = buffer.mutable_data_ptr<acc>();  // [block][S_b, then Q_b][c]
  acc* centers = partials + blocks * 2 * C;         // [block][c]: c_b
  at::parallel_for(0, blocks, std::max<int64_t>(1, kCpuGrainElems / (kRowsPerBlock * C)),
                   [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * kRowsPerBlock, r1 = std::min(rows, r0 + kRowsPerBlock);
      acc* sum = &partials[b * 2 * C];
      acc* center = &centers[b * C];
      bn_cpu::rows_sum<Term::kShifted>(isa, x, static_cast<const scalar_t*>(nullptr), C, r0, r1, shift, sum);
      for (int64_t c = 0; c < C; ++c) center[c] = shift[c] + sum[c] / static_cast<acc>(r1 - r0);
      bn_cpu::rows_sum<Term::kSquares>(isa, x, static_cast<const scalar_t*>(nullptr), C, r0, r1, center,
                                       sum + C);
    }
  });
  const acc n = static_cast<acc>(rows);
  at::parallel_for(0, C, std::max<int64_t>(1, kCpuGrainElems / blocks), [&](int64_t c_begin, int64_t c_end) {
    const int64_t width = c_end - c_begin;
    std::vector<acc> total(2 * width), d(width);
    cascade_columns<2>(partials, C, 0, blocks, c_begin, width, total.data());
    for (int64_t j = 0; j < width; ++j) d[j] = total[j] / n;
    std::vector<acc> terms(blocks * 2 * width, acc(0));  // [block][unused, term][j], as partials
    for (int64_t b = 0; b < blocks; ++b) {
      const acc nb = static_cast<acc>(std::min(rows, (b + 1) * kRowsPerBlock) - b * kRowsPerBlock);
      const acc* sum = &partials[b * 2 * C + c_begin];
      const acc* q = sum + C;
      const acc* center = &centers[b * C + c_begin];
      acc* term = &terms[(b * 2 + 1) * width];
      for (int64_t j = 0; j < width; ++j) {
        const acc e = center[j] - shift[c_begin + j];
        const acc t = sum[j] - nb * e;
        const acc g = e - d[j];
        term[j] = q[j] + (acc(2) * g * t + nb * g * g);
      }
    }
    cascade_columns<2>(terms.data(), width, 0, blocks, 0, width, total.data());
    for (int64_t j = 0; j < width; ++j) {
      mean[c_begin + j] = shift[c_begin + j] + d[j];
      m2[c_begin + j] = total[width + j];
    }
  });
}

}  // namespace

// Contracts: batch_norm.h.
template <typename scalar_t>
void channel_moments(const scalar_t* x, const BatchNormLayout& L, acc_t<scalar_t>* mean,
                     acc_t<scalar_t>* m2) {
  using acc = acc_t<scalar_t>;
  const int64_t C = L.channels;
  if (L.numel() == 0) {
    std::fill(mean, mean + C, acc(0));
    std::fill(m2, m2 + C, acc(0));
    return;
  }
  const at::Tensor shift_buffer = aligned_zeros<acc>(C);
  acc* shift = shift_buffer.mutable_data_ptr<acc>();
  if (L.inner == 1) {
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc>(x[c]);  // row 0
    rows_moments(x, L, shift, mean, m2);
    return;
  }
  at::parallel_for(0, C, std::max<int64_t>(1, kCpuGrainElems / L.per_channel()), [&](int64_t c0, int64_t c1) {
    planes_moments(x, L, c0, c1, shift, mean, m2);
  });
}

template <typename scalar_t>
void planes_moments(const scalar_t* x, const BatchNormLayout& L, int64_t c0, int64_t c1,
                    acc_t<scalar_t>* shift, acc_t<scalar_t>* mean, acc_t<scalar_t>* m2) {
  using acc = acc_t<scalar_t>;
  const CpuIsa isa = cpu_isa();
  const acc n = static_cast<acc>(L.per_channel());
  acc* sums[1] = {mean};
  acc* squares[1] = {m2};
  const scalar_t* no_dy = nullptr;
  for (int64_t c = c0; c < c1; ++c) {
    shift[c] = static_cast<acc>(x[c * L.inner]);  // o = s = 0
    bn_cpu::channels_sum<Term::kShifted>(isa, x, no_dy, L, c, c + 1, shift, sums);
    mean[c] = shift[c] + mean[c] / n;
    bn_cpu::channels_sum<Term::kSquares>(isa, x, no_dy, L, c, c + 1, mean, squares);
  }
}

template <typename scalar_t>
void planes_grad_sums(const scalar_t* dy, const scalar_t* x, const BatchNormLayout& L, int64_t c0, int64_t c1,
                      const acc_t<scalar_t>* mean, acc_t<scalar_t>* sum_dy, acc_t<scalar_t>* sum_dy_xmu) {
  acc_t<scalar_t>* outs[2] = {sum_dy, sum_dy_xmu};
  bn_cpu::channels_sum<Term::kGrad>(cpu_isa(), x, dy, L, c0, c1, mean, outs);
}

template <typename scalar_t>
void channel_grad_sums(const scalar_t* dy, const scalar_t* x, const BatchNormLayout& L,
                       const acc_t<scalar_t>* mean, acc_t<scalar_t>* sum_dy, acc_t<scalar_t>* sum_dy_xmu) {
  using acc = acc_t<scalar_t>;
  acc* outs[2] = {sum_dy, sum_dy_xmu};
  reduce_channels<Term::kGrad>(x, dy, L, mean, outs);
}

#define FUSEDREG_BN_CPU_REDUCTIONS(scalar_t)                                                                \
  template void channel_moments<scalar_t>(const scalar_t*, const BatchNormLayout&, acc_t<scalar_t>*,        \
                                          acc_t<scalar_t>*);                                                \
  template void channel_grad_sums<scalar_t>(const scalar_t*, const scalar_t*, const BatchNormLayout&,       \
                                            const acc_t<scalar_t>*, acc_t<scalar_t>*, acc_t<scalar_t>*);     \
  template void planes_moments<scalar_t>(const scalar_t*, const BatchNormLayout&, int64_t, int64_t,         \
                                         acc_t<scalar_t>*, acc_t<scalar_t>*, acc_t<scalar_t>*);             \
  template void planes_grad_sums<scalar_t>(const scalar_t*, const scalar_t*, const BatchNormLayout&, int64_t, \
                                           int64_t, const acc_t<scalar_t>*, acc_t<scalar_t>*, acc_t<scalar_t>*);
FUSEDREG_BN_CPU_REDUCTIONS(double)
FUSEDREG_BN_CPU_REDUCTIONS(float)
FUSEDREG_BN_CPU_REDUCTIONS(at::Half)
FUSEDREG_BN_CPU_REDUCTIONS(at::BFloat16)
#undef FUSEDREG_BN_CPU_REDUCTIONS

}  // namespace fusedreg
