// CUDA split-path reductions of BatchNorm: per-channel statistics (training forward, batch_norm_stats)
// and the backward sums (batch_norm_bwd, batch_norm_bwd_reduce), in two launches.
//
// Algorithm: bn_reduce_kernel cuts each channel into `splits` ranges (of units for planes, of rows
// for rows; the walks of batch_norm.cuh) and writes per-(split, channel) partials: (count, mean, m2)
// of x - shift, shift = the channel's first value; or (kGrad) sum(dy) and sum(dy * (x - mean)).
// A thread takes kUnroll units at a time and folds each channel's values among them (kUnroll * V
// for planes, kUnroll per column for rows) into its moments by Chan's merge of their exact
// two-pass moments: one merge, with its division, per kUnroll units instead of one per value or
// unit, so a value costs a conversion, the shift and three flops. Blocks reduce with a fixed tree in
// shared memory. bn_finalize_kernel (a warp per channel) merges the splits in index order through
// a fixed shuffle tree, writes mean and invstd (or var), updates running_mean / running_var
// (unbiased) in place, or grad_bias / grad_weight. The number of splits fills the GPU (resident
// blocks x SMs) without leaving a block less than a minimum of work.
//
// Determinism: the combination order depends only on shape, layout and grid; no float atomics.
// Trade-off: reading x (and dy) once here and again in the elementwise pass costs 12 B/elem fp32
// forward, against the on-chip path's 8 (batch_norm_onchip.cu), but works for any channel size and
// keeps every SM busy when C is small.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "batch_norm.cuh"
#include "common/reduce.cuh"

namespace fusedreg {
namespace bn {
namespace {

constexpr int64_t kMinUnitsPerBlock = 2048;

__device__ __forceinline__ float fast_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double fast_div(double a, double b) { return a / b; }

template <typename acc>
struct Moments {
  acc n, mean, m2;
  __device__ static Moments merge(const Moments& a, const Moments& b) {
    const acc n = a.n + b.n;
    const acc ratio = n > acc(0) ? fast_div(b.n, n) : acc(0);
    const acc delta = b.mean - a.mean;
    return {n, a.mean + delta * ratio, a.m2 + b.m2 + delta * delta * a.n * ratio};
  }
};

// Chan's merge of one block of kB shifted values per slot (kB a power of two, so 1 / kB is exact)
// into the per-slot moments (count n shared by the slots): the block's exact two-pass moments per
// slot (its sum, then the squared deviations from its mean), then one merge, whose division is
// shared by the slots. vals[s][i]: value i of slot s's block.
template <int kB, int kSlots, typename acc>
__device__ __forceinline__ void merge_block(acc& n, acc (&mean)[kSlots], acc (&m2)[kSlots],
                                            const acc (&vals)[kSlots][kB]) {
  const acc n_new = n + acc(kB);
  const acc ratio = fast_div(acc(kB), n_new);
  const acc weight = n * ratio;  // n * kB / n_new
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    acc bm = 0;
#pragma unroll
    for (int i = 0; i < kB; ++i) bm += vals[s][i];
    bm *= acc(1) / acc(kB);
    acc bq = 0;
#pragma unroll
    for (int i = 0; i < kB; ++i) bq += (vals[s][i] - bm) * (vals[s][i] - bm);
    const acc delta = bm - mean[s];
    mean[s] += delta * ratio;
    m2[s] += bq + delta * delta * weight;
  }
  n = n_new;
}

// The values of kU units (xv[q][e], already shifted) as merge_block's per-slot blocks: rows have a
// slot per value of a unit (a block of kU values each), planes one slot (a block of kU * V).
template <bool kRows, int kU, int V, typename acc>
__device__ __forceinline__ void merge_units(acc& n, acc (&mean)[kRows ? V : 1], acc (&m2)[kRows ? V : 1],
                                            const acc (&xv)[kU][V]) {
  constexpr int kSlots = kRows ? V : 1;
  constexpr int kB = kU * V / kSlots;
  acc vals[kSlots][kB];
#pragma unroll
  for (int q = 0; q < kU; ++q) {
#pragma unroll
    for (int e = 0; e < V; ++e) vals[slot_of<kRows>(e)][kRows ? q : q * V + e] = xv[q][e];
  }
  merge_block<kB>(n, mean, m2, vals);
}

template <typename acc>
struct ReduceArgs {
  int64_t C, inner, outer;
  int64_t splits;
  int64_t per_split;  // units (planes) or rows (rows) per split
  int bx;             // rows only: column threads per block
};

// Per-(split, channel) partials into part ([3][splits][C]): count / mean / m2 of x - shift, or
// (kGrad) sum(dy) / sum(dy * (x - mean)). Grid: channel blocks x splits, flattened.
template <typename scalar_t, int V, bool kRows, bool kGrad>
__global__ void __launch_bounds__(kThreads)
bn_reduce_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                 const acc_t<scalar_t>* __restrict__ mean, acc_t<scalar_t>* __restrict__ part,
                 const ReduceArgs<acc_t<scalar_t>> args) {
  using acc = acc_t<scalar_t>;
  constexpr int kSlots = kRows ? V : 1;
  const int64_t C = args.C;
  int64_t block;
  const int64_t split = divmod(blockIdx.x, args.splits, block);
  const int64_t lo = split * args.per_split;
  const int bx = kRows ? args.bx : 1;
  const int tx = threadIdx.x % bx;
  const int64_t c0 = kRows ? (block * bx + tx) * V : block;  // channel of slot 0
  const bool active = c0 < C;

  auto run = [&](auto walk) {
    acc n = 0, first[kSlots], second[kSlots], ref[kSlots];
    (void)n;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      first[s] = second[s] = 0;
      // Moments are of x - shift (shift = the channel's first value), so a large mean never
      // meets the small deviations; the backward sums need the mean instead.
      ref[s] = !active ? acc(0) : kGrad ? mean[c0 + s] : static_cast<acc>(x[(c0 + s) * args.inner]);
    }
    if constexpr (kGrad) {
      for (int64_t i = 0; i < walk.count; i += kUnroll) {
        acc xv[kUnroll][V], gv[kUnroll][V];
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) {
          if (i + q < walk.count) {
            load_unit<acc, V>(x, walk.offset(), xv[q]);
            load_unit<acc, V>(dy, walk.offset(), gv[q]);
            walk.advance();
          }
        }
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) {
          if (i + q < walk.count) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
              first[slot_of<kRows>(e)] += gv[q][e];
              second[slot_of<kRows>(e)] += gv[q][e] * (xv[q][e] - ref[slot_of<kRows>(e)]);
            }
          }
        }
      }
    } else {
      // Whole blocks of kUnroll units, one merge each; then the last < kUnroll units one by one.
      int64_t i = 0;
      for (; i + kUnroll <= walk.count; i += kUnroll) {
        acc xv[kUnroll][V];
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) {
          load_unit<acc, V>(x, walk.offset(), xv[q]);
          walk.advance();
        }
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) {
#pragma unroll
          for (int e = 0; e < V; ++e) xv[q][e] -= ref[slot_of<kRows>(e)];
        }
        merge_units<kRows>(n, first, second, xv);
      }
      for (; i < walk.count; ++i) {
        acc xv[1][V];
        load_unit<acc, V>(x, walk.offset(), xv[0]);
        walk.advance();
#pragma unroll
        for (int e = 0; e < V; ++e) xv[0][e] -= ref[slot_of<kRows>(e)];
        merge_units<kRows>(n, first, second, xv);
      }
    }
    const int64_t out = split * C + c0;
    const int64_t plane = args.splits * C;
    if constexpr (kGrad) {
      __shared__ Pair<acc> scratch[kThreads];
      Pair<acc> st[kSlots];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) st[s] = {first[s], second[s]};
      column_reduce<kThreads>(st, scratch, bx);
      if (threadIdx.x < bx && active) {
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          part[out + s] = st[s].a;
          part[plane + out + s] = st[s].b;
        }
      }
    } else {
      __shared__ Moments<acc> scratch[kThreads];
      Moments<acc> st[kSlots];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) st[s] = {n, first[s], second[s]};
      column_reduce<kThreads>(st, scratch, bx);
      if (threadIdx.x < bx && active) {
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          part[out + s] = st[s].n;
          part[plane + out + s] = st[s].mean;
          part[2 * plane + out + s] = st[s].m2;
        }
      }
    }
  };
  if constexpr (kRows) {
    run(RowWalk(lo, std::min(lo + args.per_split, args.outer), c0, C, threadIdx.x / bx, kThreads / bx,
                active));
  } else {
    const int64_t units = args.outer * (args.inner / V);
    run(PlaneWalk<kThreads, V>(lo, std::min(lo + args.per_split, units), c0, C, args.inner));
  }
}

// One warp per channel: lane l merges splits l, l + 32, ... in order, then a fixed shuffle tree.
template <typename scalar_t, bool kGrad>
__global__ void __launch_bounds__(kThreads)
bn_finalize_kernel(const scalar_t* __restrict__ x, const acc_t<scalar_t>* __restrict__ part,
                   const FinalizeArgs<acc_t<scalar_t>> args) {
  using acc = acc_t<scalar_t>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (c >= args.C) return;  // whole warps leave together
  const int64_t plane = args.splits * args.C;
  if constexpr (kGrad) {
    Pair<acc> st{0, 0};
    for (int64_t k = lane; k < args.splits; k += kWarpSize) {
      st = Pair<acc>::merge(st, {part[k * args.C + c], part[plane + k * args.C + c]});
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const Pair<acc> other{__shfl_down_sync(kFullWarpMask, st.a, offset),
                            __shfl_down_sync(kFullWarpMask, st.b, offset)};
      st = Pair<acc>::merge(st, other);  // lane 0 only ever meets lanes that exist
    }
    if (lane != 0) return;
    args.first_out[c] = st.a;
    args.second_out[c] = st.b;
    if (args.grad_weight != nullptr) args.grad_weight[c] = st.b * args.invstd[c];
  } else {
    Moments<acc> st{0, 0, 0};
    for (int64_t k = lane; k < args.splits; k += kWarpSize) {
      const int64_t i = k * args.C + c;
      st = Moments<acc>::merge(st, {part[i], part[plane + i], part[2 * plane + i]});
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const Moments<acc> other{__shfl_down_sync(kFullWarpMask, st.n, offset),
                               __shfl_down_sync(kFullWarpMask, st.mean, offset),
                               __shfl_down_sync(kFullWarpMask, st.m2, offset)};
      st = Moments<acc>::merge(st, other);
    }
    if (lane != 0) return;
    const acc mean = static_cast<acc>(x[c * args.inner]) + st.mean;
    const acc var = st.m2 / static_cast<acc>(args.n);
    args.first_out[c] = mean;
    args.second_out[c] = args.out_var ? var : inv_sqrt(var + args.eps);
    if (args.running_mean != nullptr) {
      args.running_mean[c] = args.keep * args.running_mean[c] + args.momentum * mean;
    }
    if (args.running_var != nullptr) {
      const acc unbiased = st.m2 / static_cast<acc>(args.n - 1);
      args.running_var[c] = args.keep * args.running_var[c] + args.momentum * unbiased;
    }
  }
}

}  // namespace

// Contract: batch_norm.cuh. Splits: enough blocks to fill the GPU once, but no split smaller
// than min_per_block units (planes) or rows (rows).
template <typename scalar_t, bool kGrad>
void launch_split_reduce(const Operands<scalar_t>& ops, const acc_t<scalar_t>* mean,
                         FinalizeArgs<acc_t<scalar_t>> fin) {
  using acc = acc_t<scalar_t>;
  const BatchNormLayout& L = ops.layout;
  const int64_t C = L.channels;
  const scalar_t* x = ops.x;
  const scalar_t* dy = kGrad ? ops.dy : nullptr;
  const bool rows = L.inner == 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_vec<scalar_t>(vectorizable<scalar_t>(L, {x, dy}), [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    ReduceArgs<acc> args{C, L.inner, L.outer, 1, 0, 1};
    int64_t channel_blocks, extent, min_per_block;
    const void* kernel;
    if (rows) {
      args.bx = rows_bx(C, V, kThreads);
      channel_blocks = ceil_div(C, int64_t(args.bx) * V);
      extent = L.outer;
      min_per_block = int64_t(kThreads / args.bx) * kUnroll * 4;
      kernel = reinterpret_cast<const void*>(&bn_reduce_kernel<scalar_t, V, true, kGrad>);
    } else {
      channel_blocks = C;
      extent = L.outer * (L.inner / V);
      min_per_block = kMinUnitsPerBlock;
      kernel = reinterpret_cast<const void*>(&bn_reduce_kernel<scalar_t, V, false, kGrad>);
    }
    const int64_t target = int64_t(sm_count()) * resident_per_sm(kernel, kThreads);
    const int64_t splits = std::clamp<int64_t>(ceil_div(target, channel_blocks), 1,
                                               std::max<int64_t>(1, ceil_div(extent, min_per_block)));
    args.per_split = ceil_div(extent, splits);
    args.splits = ceil_div(extent, args.per_split);
    // The [3][splits][C] partials, from the allocator (and on the device and stream) at::empty
    // would use; released, like a tensor, when this scope ends after both launches are queued.
    const size_t part_bytes = static_cast<size_t>(3 * args.splits * C) * sizeof(acc);
    const c10::DataPtr part = c10::cuda::CUDACachingAllocator::get()->allocate(part_bytes);
    acc* partials = static_cast<acc*>(part.get());
    const auto grid = static_cast<unsigned int>(channel_blocks * args.splits);
    if (rows) {
      bn_reduce_kernel<scalar_t, V, true, kGrad><<<grid, kThreads, 0, stream>>>(
          x, dy, mean, partials, args);
    } else {
      bn_reduce_kernel<scalar_t, V, false, kGrad><<<grid, kThreads, 0, stream>>>(
          x, dy, mean, partials, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fin.C = C;
    fin.inner = L.inner;
    fin.splits = args.splits;
    fin.n = L.per_channel();
    const auto fin_grid = static_cast<unsigned int>(ceil_div(C * kWarpSize, kThreads));
    bn_finalize_kernel<scalar_t, kGrad><<<fin_grid, kThreads, 0, stream>>>(
        x, partials, fin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Instantiated in the order of the single-file build (forward, then backward; dtypes in dispatch
// order), which keeps the SASS identical to it: another order can rename registers.
#define FUSEDREG_BN_SPLIT_REDUCE_FWD(scalar_t)                                                              \
  template void launch_split_reduce<scalar_t, false>(const Operands<scalar_t>&, const acc_t<scalar_t>*,     \
                                                     FinalizeArgs<acc_t<scalar_t>>);
#define FUSEDREG_BN_SPLIT_REDUCE_BWD(scalar_t)                                                              \
  template void launch_split_reduce<scalar_t, true>(const Operands<scalar_t>&, const acc_t<scalar_t>*,      \
                                                    FinalizeArgs<acc_t<scalar_t>>);
FUSEDREG_BN_FOR_EACH_DTYPE(FUSEDREG_BN_SPLIT_REDUCE_FWD)
FUSEDREG_BN_FOR_EACH_DTYPE(FUSEDREG_BN_SPLIT_REDUCE_BWD)
#undef FUSEDREG_BN_SPLIT_REDUCE_FWD
#undef FUSEDREG_BN_SPLIT_REDUCE_BWD

}  // namespace bn
}  // namespace fusedreg
