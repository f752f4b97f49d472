// CUDA on-chip kernels of BatchNorm: training forward and backward in one launch each, with the
// block's slice of x (and dy) cached in shared memory, for batch_norm_fwd / batch_norm_bwd.
//
// Algorithm: one block per channel (planes) or per tile of bx * V channels (rows), walking its
// slice with the walks of batch_norm.cuh. Forward: global -> cache with sum(x - shift) (shift = the
// channel's first value), the exact mean, then a second pass over the cache for sum((x - mean)^2),
// invstd and the running statistics, then y from the cache: x read once from global memory,
// 8 B/elem fp32. Backward caches x and dy: (sum dy, sum dy * (x - mean)) -> grad_bias, grad_weight,
// then dx from the cache: 12 B/elem. Reductions are fixed trees in shared memory (deterministic).
// try_onchip picks the widest rows tile (bx) whose slice fits in the opt-in shared memory while
// the blocks fill at least half the SMs (or the whole tensor is below kOnchipSmallBytes).
// Trade-off: one block per channel leaves SMs idle when C (or the number of rows tiles) is small
// next to the SM count, so the split path (batch_norm_stats.cu + batch_norm_elemt.cu) takes over
// then; a slice too big for shared memory does too.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "batch_norm.cuh"

namespace fusedreg {
namespace bn {
namespace {

constexpr int kOnchipThreads = 512;  // on-chip blocks: more loads in flight per (single) block
constexpr int64_t kOnchipSmallBytes = int64_t(1) << 21;  // below this, one launch beats filling SMs

// One block per channel (planes) or per tile of bx * V channels (rows); the block's units are
// cached in dynamic shared memory at (i * kOnchipThreads + t) * V for its i-th unit, then:
//   forward:  sum -> mean; sum of squares about the mean -> invstd, running stats; y from the cache
//   backward: (sum dy, sum dy * (x - mean)) -> grad_weight, grad_bias; dx from the cache
template <typename scalar_t, int V, bool kRows, bool kBackward>
__global__ void __launch_bounds__(kOnchipThreads)
bn_onchip_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                 scalar_t* __restrict__ out, const OnchipArgs<acc_t<scalar_t>> args) {
  using acc = acc_t<scalar_t>;
  constexpr int kSlots = kRows ? V : 1;
  extern __shared__ __align__(16) unsigned char onchip_smem[];
  __shared__ Pair<acc> scratch[kOnchipThreads];
  const int64_t C = args.C;
  const int bx = kRows ? args.bx : 1;
  const int tx = threadIdx.x % bx;
  const int64_t c0 = kRows ? (static_cast<int64_t>(blockIdx.x) * bx + tx) * V : blockIdx.x;
  const bool active = c0 < C;
  const int64_t n = args.outer * args.inner;

  auto run = [&](auto make_walk) {
    auto walk = make_walk();
    const int64_t units_cached = walk.count;
    scalar_t* cache_x = reinterpret_cast<scalar_t*>(onchip_smem);
    scalar_t* cache_dy = cache_x + args.cache_elems;  // backward only
    (void)cache_dy;
    acc ref[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      ref[s] = !active ? acc(0) : kBackward ? args.mean[c0 + s] : static_cast<acc>(x[(c0 + s) * args.inner]);
    }
    // Pass 1: global -> cache, with the sums of x - shift (forward) or of dy, dy * (x - mean).
    Pair<acc> st[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) st[s] = {0, 0};
    for (int64_t i = 0; i < units_cached; i += kUnroll) {
      acc xv[kUnroll][V], gv[kBackward ? kUnroll : 1][V];
      (void)gv;
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        if (i + q < units_cached) {
          const int64_t at = ((i + q) * kOnchipThreads + threadIdx.x) * V;
          const AlignedVec<scalar_t, V> raw = load_vec<V>(x + walk.offset());
          store_vec<V>(cache_x + at, raw);
#pragma unroll
          for (int e = 0; e < V; ++e) xv[q][e] = static_cast<acc>(raw.val[e]);
          if constexpr (kBackward) {
            const AlignedVec<scalar_t, V> graw = load_vec<V>(dy + walk.offset());
            store_vec<V>(cache_dy + at, graw);
#pragma unroll
            for (int e = 0; e < V; ++e) gv[q][e] = static_cast<acc>(graw.val[e]);
          }
          walk.advance();
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        if (i + q < units_cached) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const int s = slot_of<kRows>(e);
            if constexpr (kBackward) {
              st[s].a += gv[q][e];
              st[s].b += gv[q][e] * (xv[q][e] - ref[s]);
            } else {
              st[s].a += xv[q][e] - ref[s];
            }
          }
        }
      }
    }
    column_reduce<kOnchipThreads>(st, scratch, bx);
    Coefs<acc> k[kSlots];
    const bool writer = threadIdx.x < bx && active;
    if constexpr (!kBackward) {
      acc mean[kSlots];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        mean[s] = ref[s] + st[s].a / static_cast<acc>(n);
        st[s] = {0, 0};
      }
      // Pass 2 over the cache: the sum of squared deviations from the exact mean.
      for (int64_t i = 0; i < units_cached; ++i) {
        const AlignedVec<scalar_t, V> raw = load_vec<V>(cache_x + (i * kOnchipThreads + threadIdx.x) * V);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const acc d = static_cast<acc>(raw.val[e]) - mean[slot_of<kRows>(e)];
          st[slot_of<kRows>(e)].a += d * d;
        }
      }
      column_reduce<kOnchipThreads>(st, scratch, bx);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t c = active ? c0 + s : 0;
        const acc invstd = inv_sqrt(st[s].a / static_cast<acc>(n) + args.eps);
        if (writer) {
          args.mean[c] = mean[s];
          args.invstd[c] = invstd;
          if (args.running_mean) {
            args.running_mean[c] = args.keep * args.running_mean[c] + args.momentum * mean[s];
          }
          if (args.running_var) {
            args.running_var[c] = args.keep * args.running_var[c] +
                                  args.momentum * (st[s].a / static_cast<acc>(n - 1));
          }
        }
        k[s] = {mean[s], invstd, acc(0), acc(0)};
        if (active && args.weight) k[s].a *= args.weight[c];
        if (active && args.bias) k[s].b = args.bias[c];
      }
    } else {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t c = active ? c0 + s : 0;
        const acc invstd = active ? args.invstd[c] : acc(0);
        if (writer) {
          args.grad_bias[c] = st[s].a;
          args.grad_weight[c] = st[s].b * invstd;
        }
        k[s] = {ref[s], invstd, acc(0), acc(0)};
        if (active && args.weight) k[s].a *= args.weight[c];
        if (args.training) {
          k[s].b = st[s].a / static_cast<acc>(n);
          k[s].k = invstd * invstd * (st[s].b / static_cast<acc>(n));
        }
      }
    }
    // Last pass: the cache -> out, in the walk's order.
    walk = make_walk();
    for (int64_t i = 0; i < units_cached; ++i) {
      const int64_t at = (i * kOnchipThreads + threadIdx.x) * V;
      acc y[V];
      const AlignedVec<scalar_t, V> raw = load_vec<V>(cache_x + at);
      if constexpr (kBackward) {
        const AlignedVec<scalar_t, V> graw = load_vec<V>(cache_dy + at);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const Coefs<acc>& kk = k[slot_of<kRows>(e)];
          const acc xe = static_cast<acc>(raw.val[e]), ge = static_cast<acc>(graw.val[e]);
          y[e] = args.training ? apply<Pass::kBackward>(kk, xe, ge)
                               : apply<Pass::kBackwardEval>(kk, acc(0), ge);
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          y[e] = apply<Pass::kForward>(k[slot_of<kRows>(e)], static_cast<acc>(raw.val[e]), acc(0));
        }
      }
      if constexpr (kRows) {
        store_unit<acc, V>(out, walk.offset(), y);
      } else {
        store_unit_v4<acc, V>(out, walk.offset(), y);
      }
      walk.advance();
    }
  };
  if constexpr (kRows) {
    run([&] { return RowWalk(0, args.outer, c0, C, threadIdx.x / bx, kOnchipThreads / bx, active); });
  } else {
    const int64_t units = args.outer * (args.inner / V);
    run([&] { return PlaneWalk<kOnchipThreads, V>(0, units, c0, C, args.inner); });
  }
}

}  // namespace

// Contract: batch_norm.cuh.
template <typename scalar_t, bool kBackward>
bool try_onchip(const Operands<scalar_t>& ops, OnchipArgs<acc_t<scalar_t>> args) {
  const BatchNormLayout& L = ops.layout;
  const int64_t C = L.channels;
  const scalar_t* x = ops.x;
  const scalar_t* dy = kBackward ? ops.dy : nullptr;
  scalar_t* out = ops.out;
  const bool rows = L.inner == 1;
  const int64_t total_bytes = L.numel() * int64_t(sizeof(scalar_t)) * (kBackward ? 2 : 1);
  bool launched = false;
  with_vec<scalar_t>(vectorizable<scalar_t>(L, {x, dy, out}), [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const auto kernel = rows ? &bn_onchip_kernel<scalar_t, V, true, kBackward>
                             : &bn_onchip_kernel<scalar_t, V, false, kBackward>;
    const int64_t capacity = onchip_capacity(reinterpret_cast<const void*>(kernel));
    // Narrower rows tiles give more blocks and smaller slices; keep a tile row >= 32 bytes.
    const int64_t unit_bytes = int64_t(V) * int64_t(sizeof(scalar_t));
    const int min_bx = rows ? static_cast<int>(std::max<int64_t>(1, 32 / unit_bytes)) : 1;
    for (int bx = rows ? rows_bx(C, V, kOnchipThreads) : 1; bx >= min_bx; bx /= 2) {
      const int64_t per_thread = rows ? ceil_div(L.outer, kOnchipThreads / bx)
                                      : ceil_div(L.outer * (L.inner / V), kOnchipThreads);
      const int64_t cache_elems = per_thread * kOnchipThreads * V;
      const int64_t bytes = cache_elems * int64_t(sizeof(scalar_t)) * (kBackward ? 2 : 1);
      const int64_t blocks = rows ? ceil_div(C, int64_t(bx) * V) : C;
      const bool fills = blocks * 2 >= sm_count() || total_bytes <= kOnchipSmallBytes;
      if (bytes <= capacity && fills) {
        args.bx = bx;
        args.cache_elems = cache_elems;
        kernel<<<static_cast<unsigned int>(blocks), kOnchipThreads, static_cast<size_t>(bytes),
                 at::cuda::getCurrentCUDAStream()>>>(x, dy, out, args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launched = true;
        return;
      }
    }
  });
  return launched;
}

// Instantiated in the order of the single-file build (forward, then backward; dtypes in dispatch
// order), which keeps the SASS identical to it: another order can rename registers.
#define FUSEDREG_BN_ONCHIP_FWD(scalar_t)                                                                    \
  template bool try_onchip<scalar_t, false>(const Operands<scalar_t>&, OnchipArgs<acc_t<scalar_t>>);
#define FUSEDREG_BN_ONCHIP_BWD(scalar_t)                                                                    \
  template bool try_onchip<scalar_t, true>(const Operands<scalar_t>&, OnchipArgs<acc_t<scalar_t>>);
FUSEDREG_BN_FOR_EACH_DTYPE(FUSEDREG_BN_ONCHIP_FWD)
FUSEDREG_BN_FOR_EACH_DTYPE(FUSEDREG_BN_ONCHIP_BWD)
#undef FUSEDREG_BN_ONCHIP_FWD
#undef FUSEDREG_BN_ONCHIP_BWD

}  // namespace bn
}  // namespace fusedreg
