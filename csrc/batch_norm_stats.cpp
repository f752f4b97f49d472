// CPU reductions of BatchNorm: the per-channel statistics (mean, m2) and backward sums (sum dy,
// sum dy * (x - mean)) that batch_norm.cpp's ops build on (declared in batch_norm.h).
//
// Algorithm, in the layout of batch_norm.h ((o * C + c) * inner + s):
// - inner > 1 (NCHW-like): at::parallel_for over channels; a channel is `outer` runs of `inner`
//   contiguous values, each run summed with kLanes interleaved accumulators (vectorizable) and
//   pairwise above kCascadeBase values, the run sums then summed pairwise: rounding error grows
//   with log(n), not n.
// - inner == 1 (channels_last, (N, C)): at::parallel_for over fixed blocks of kRowsPerBlock rows;
//   each block sums its rows into its own [C] partials (the inner loop runs over contiguous
//   channels: vectorizable), and the partials are then summed pairwise in block order.
// Statistics are two-pass and shifted: mean = shift + sum(x - shift) / n with shift = the channel's
// first value, then m2 = sum((x - mean)^2), so neither a large mean nor cancellation hurts. The
// order of every addition depends only on the shape and layout, never on the thread count.
//
// Trade-off: two passes over the input for the exact two-pass numerics of the reference, cheap
// for the small per-channel slices CPUs see, where they stay in cache.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "batch_norm.h"
#include "common/dispatch.h"

namespace fusedreg {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kCascadeBase = 1024;
constexpr int64_t kRowsPerBlock = 64;


// out[k] = sum over i in [begin, end) of term(i)[k], for K sums at once.
template <int K, typename acc, typename Term>
void cascade_sum(int64_t begin, int64_t end, const Term& term, acc* out) {
  if (end - begin > kCascadeBase) {
    const int64_t mid = begin + (end - begin) / 2;
    acc lo[K], hi[K];
    cascade_sum<K>(begin, mid, term, lo);
    cascade_sum<K>(mid, end, term, hi);
    for (int k = 0; k < K; ++k) out[k] = lo[k] + hi[k];
    return;
  }
  acc lanes[K][kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc t[K];
      term(i + l, t);
      for (int k = 0; k < K; ++k) lanes[k][l] += t[k];
    }
  }
  for (int l = 0; i < end; ++i, ++l) {
    acc t[K];
    term(i, t);
    for (int k = 0; k < K; ++k) lanes[k][l] += t[k];
  }
  for (int k = 0; k < K; ++k) {
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) lanes[k][l] += lanes[k][l + width];
    }
    out[k] = lanes[k][0];
  }
}

// out[k][c] = sum over the elements of channel c (memory offsets e) of term(c, e)[k].
template <int K, typename acc, typename Term>
void reduce_channels(const BatchNormLayout& L, const Term& term, acc* const* out) {
  const int64_t C = L.channels;
  if (L.numel() == 0) {
    for (int k = 0; k < K; ++k) std::fill(out[k], out[k] + C, acc(0));
    return;
  }
  if (L.inner > 1) {
    const int64_t grain = std::max<int64_t>(1, kCpuGrainElems / L.per_channel());
    at::parallel_for(0, C, grain, [&](int64_t c_begin, int64_t c_end) {
      std::vector<acc> runs(L.outer * K);
      for (int64_t c = c_begin; c < c_end; ++c) {
        for (int64_t o = 0; o < L.outer; ++o) {
          const int64_t base = (o * C + c) * L.inner;
          cascade_sum<K>(0, L.inner, [&](int64_t s, acc* t) { term(c, base + s, t); }, &runs[o * K]);
        }
        acc total[K];
        cascade_sum<K>(0, L.outer, [&](int64_t o, acc* t) {
          for (int k = 0; k < K; ++k) t[k] = runs[o * K + k];
        }, total);
        for (int k = 0; k < K; ++k) out[k][c] = total[k];
      }
    });
    return;
  }
  const int64_t rows = L.outer;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc> partials(blocks * K * C, acc(0));  // [block][k][c]
  at::parallel_for(0, blocks, std::max<int64_t>(1, kCpuGrainElems / (kRowsPerBlock * C)),
                   [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      acc* part = &partials[b * K * C];
      const int64_t r_end = std::min(rows, (b + 1) * kRowsPerBlock);
      for (int64_t r = b * kRowsPerBlock; r < r_end; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          acc t[K];
          term(c, r * C + c, t);
          for (int k = 0; k < K; ++k) part[k * C + c] += t[k];
        }
      }
    }
  });
  at::parallel_for(0, C, std::max<int64_t>(1, kCpuGrainElems / blocks), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc total[K];
      cascade_sum<K>(0, blocks, [&](int64_t b, acc* t) {
        for (int k = 0; k < K; ++k) t[k] = partials[(b * K + k) * C + c];
      }, total);
      for (int k = 0; k < K; ++k) out[k][c] = total[k];
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
  const acc n = static_cast<acc>(L.per_channel());
  std::vector<acc> shift(C, acc(0));
  if (L.numel() > 0) {
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc>(x[c * L.inner]);  // o = s = 0
  }
  acc* sums[1] = {mean};
  reduce_channels<1, acc>(L, [&](int64_t c, int64_t e, acc* t) {
    t[0] = static_cast<acc>(x[e]) - shift[c];
  }, sums);
  for (int64_t c = 0; c < C; ++c) mean[c] = L.numel() > 0 ? shift[c] + mean[c] / n : acc(0);
  acc* squares[1] = {m2};
  reduce_channels<1, acc>(L, [&](int64_t c, int64_t e, acc* t) {
    const acc d = static_cast<acc>(x[e]) - mean[c];
    t[0] = d * d;
  }, squares);
}

template <typename scalar_t>
void channel_grad_sums(const scalar_t* dy, const scalar_t* x, const BatchNormLayout& L,
                       const acc_t<scalar_t>* mean, acc_t<scalar_t>* sum_dy, acc_t<scalar_t>* sum_dy_xmu) {
  using acc = acc_t<scalar_t>;
  acc* outs[2] = {sum_dy, sum_dy_xmu};
  reduce_channels<2, acc>(L, [&](int64_t c, int64_t e, acc* t) {
    const acc g = static_cast<acc>(dy[e]);
    t[0] = g;
    t[1] = g * (static_cast<acc>(x[e]) - mean[c]);
  }, outs);
}

#define FUSEDREG_BN_CPU_REDUCTIONS(scalar_t)                                                                \
  template void channel_moments<scalar_t>(const scalar_t*, const BatchNormLayout&, acc_t<scalar_t>*,        \
                                          acc_t<scalar_t>*);                                                \
  template void channel_grad_sums<scalar_t>(const scalar_t*, const scalar_t*, const BatchNormLayout&,       \
                                            const acc_t<scalar_t>*, acc_t<scalar_t>*, acc_t<scalar_t>*);
FUSEDREG_BN_CPU_REDUCTIONS(double)
FUSEDREG_BN_CPU_REDUCTIONS(float)
FUSEDREG_BN_CPU_REDUCTIONS(at::Half)
FUSEDREG_BN_CPU_REDUCTIONS(at::BFloat16)
#undef FUSEDREG_BN_CPU_REDUCTIONS

}  // namespace fusedreg
