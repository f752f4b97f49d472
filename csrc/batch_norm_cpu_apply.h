// The elementwise pass of the CPU BatchNorm kernels: one read of x (and dy), one write of the
// output, per-channel coefficients (batch_norm.cpp's Coefs). Compiled once per instruction-set
// level like batch_norm_cpu_loops.h, whose load / store widen and round.
//
// Planes (runs of `inner` elements per channel) with the channel's coefficients in registers, rows
// ([rows, C], channels innermost) one row at a time with the coefficients as [C] arrays: plain
// branch-free loops, left to the auto-vectorizer. Trade-off: a row loads four vectors (x, m, a, b)
// per vector stored; walking 4 rows per load of the coefficients (explicit vectors, 8 streams)
// measured slower on one Zen 4 core (8x512x28x28 channels_last float32 eval: 1.2-1.3x torch's
// time -> 1.7x, interleaved in one process): the pass is bound by memory, not by loads, and one
// sequential stream per thread suits the prefetchers better.
#pragma once

#include <cstdint>

#include "batch_norm_cpu_loops.h"

namespace fusedreg {
namespace bn_cpu {

// Per-channel coefficients:
//   kForward:      out = (x - m) * a + b
//   kBackward:     out = (dy - b - (x - m) * k) * a
//   kBackwardEval: out = dy * a
// (acc may be a GCC vector: the same expression, so the same contraction into multiply-adds.)
enum class Pass { kForward, kBackward, kBackwardEval };

template <Pass kPass, typename acc>
FUSEDREG_ALWAYS_INLINE acc formula(acc x, acc g, acc m, acc a, acc b, acc k) {
  if constexpr (kPass == Pass::kForward) {
    return (x - m) * a + b;
  } else if constexpr (kPass == Pass::kBackward) {
    return (g - b - (x - m) * k) * a;
  } else {
    return g * a;
  }
}

// One run of n elements of one channel.
template <Pass kPass, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void run_apply(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t n,
                                      acc_t<scalar_t> m, acc_t<scalar_t> a, acc_t<scalar_t> b, acc_t<scalar_t> k) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc xv = kPass != Pass::kBackwardEval ? load(x, i) : acc(0);
    const acc gv = kPass != Pass::kForward ? load(dy, i) : acc(0);
    store(out, i, formula<kPass>(xv, gv, m, a, b, k));
  }
}

// Rows [r0, r1) of a [rows, C] matrix, one row at a time.
template <Pass kPass, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void rows_apply_loop(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C,
                                       int64_t r0, int64_t r1, const acc_t<scalar_t>* m, const acc_t<scalar_t>* a,
                                       const acc_t<scalar_t>* b, const acc_t<scalar_t>* k) {
  using acc = acc_t<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc xv = kPass != Pass::kBackwardEval ? load(x, base + c) : acc(0);
      const acc gv = kPass != Pass::kForward ? load(dy, base + c) : acc(0);
      store(out, base + c, formula<kPass>(xv, gv, m[c], a[c], b[c], k[c]));
    }
  }
}

}  // namespace bn_cpu
}  // namespace fusedreg
