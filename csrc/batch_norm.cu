// CUDA kernels of BatchNorm: fusedreg::batch_norm_fwd, _bwd, _stats, _elemt, _bwd_reduce, _bwd_elemt.
//
// Layout (batch_norm.h): element (o, c, s) at (o * C + c) * inner + s. Two native traversals:
// - planes (inner > 1, NCHW-like): a channel is `outer` runs of `inner` contiguous values; threads
//   walk a channel's "units" (V values of one run, a 16-byte vector when inner % V == 0 and the
//   pointers are aligned, else V = 1) with a carried (o, unit) cursor: one division per thread.
// - rows (inner == 1: channels_last, channels_last_3d, (N, C)): an [R, C] matrix; a block is
//   bx x by threads, thread (ty, tx) owns the V consecutive channels of one 16-byte column unit
//   and walks rows ty, ty + by, ..., so every warp reads whole rows of C (coalesced).
//
// Training forward, two paths:
// - on chip (a channel's slice, or a rows tile of bx * V channels, fits in shared memory, and
//   there are enough channels to fill the GPU): one block per channel (tile) loads the slice once
//   into shared memory, computes the exact two-pass statistics from there, updates the running
//   statistics and writes y: one launch, 8 B/elem fp32. Backward likewise caches x and dy: 12 B/elem.
// - split: a reduction kernel gives per-(split, channel) partials: (count, mean, m2) of x - shift
//   (shift = the channel's first value; Chan's merge of exact per-vector two-pass moments), or the
//   backward sums; a finalize kernel (a warp per channel) merges the splits in split order, writes
//   mean/invstd (or var) and updates running_mean / running_var (unbiased) in place; then one
//   elementwise pass. 12 B/elem fp32 forward; backward reads dy and x twice.
// Eval forward is the elementwise kernel alone, invstd computed from running_var on the fly.
//
// Determinism: every reduction combines values in an order fixed by the shape, layout and grid
// (fixed trees in shared memory, splits merged in index order); no float atomics.
// Trade-off: the split path reads x twice; the on-chip path leaves SMs idle when C (or the number
// of rows tiles) is small next to the SM count, so it is used only when it fills the GPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "batch_norm.h"
#include "common/dispatch.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace fusedreg {
namespace {

constexpr int kThreads = 256;        // split-path and elementwise blocks
constexpr int kOnchipThreads = 512;  // on-chip blocks: more loads in flight per (single) block
constexpr int kUnroll = 4;           // units loaded before any is used
constexpr int kRowBx = 32;           // column threads of a rows block (at most)
constexpr int64_t kMinUnitsPerBlock = 2048;
constexpr int64_t kOnchipSmallBytes = int64_t(1) << 21;  // below this, one launch beats filling SMs

__device__ __forceinline__ float fast_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double fast_div(double a, double b) { return a / b; }

template <typename acc>
__device__ __forceinline__ acc inv_sqrt(acc v) {
  return acc(1) / sqrt(v);  // IEEE sqrt and division (no fast math), like 1 / torch.sqrt
}

// q = a / b, returns a - q * b, for 0 <= a < 2^53 and 0 < b. 32-bit division when both fit;
// otherwise a float64 reciprocal estimate (within one of the quotient) corrected with integer
// arithmetic, which avoids the called 64-bit division routine and the spills around the call.
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& q) {
  if (((a | b) >> 31) == 0) {
    q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    return a - q * b;
  }
  q = static_cast<int64_t>(static_cast<double>(a) * __drcp_rn(static_cast<double>(b)));
  int64_t r = a - q * b;
  if (r < 0) {
    --q;
    r += b;
  } else if (r >= b) {
    ++q;
    r -= b;
  }
  return r;
}

// ----------------------------------------------------------------------------- reduction states

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

template <typename acc>
struct Pair {
  acc a, b;
  __device__ static Pair merge(const Pair& x, const Pair& y) { return {x.a + y.a, x.b + y.b}; }
};

// Combines st[s] across the threads of one column (t = ty * bx + tx, bx and kBlock powers of two)
// with a fixed tree in `scratch` ([kBlock]); every thread gets its column's result. bx == 1
// reduces the whole block.
template <int kBlock, int kSlots, typename State>
__device__ void column_reduce(State (&st)[kSlots], State* scratch, int bx) {
  const int t = threadIdx.x;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    scratch[t] = st[s];
    __syncthreads();
    for (int stride = kBlock / 2; stride >= bx; stride /= 2) {
      if (t < stride) scratch[t] = State::merge(scratch[t], scratch[t + stride]);
      __syncthreads();
    }
    st[s] = scratch[t & (bx - 1)];
    __syncthreads();
  }
}

// ----------------------------------------------------------------------------- walks

// The units one thread visits, in order: `count` of them, offset() of the current one, advance().
// Planes: channel c's units u in [lo, hi), unit u = (o = u / upp, j = u % upp) at
// (o * C + c) * inner + j * V; thread t takes u = lo + t, lo + t + kBlock, ...
template <int kBlock, int V>
struct PlaneWalk {
  int64_t count, o, j, upp, d_o, d_j, plane_stride, base;
  __device__ PlaneWalk(int64_t lo, int64_t hi, int64_t c, int64_t C, int64_t inner) {
    const int64_t u = lo + threadIdx.x;
    count = u < hi ? (hi - u + kBlock - 1) / kBlock : 0;
    upp = inner / V;
    j = divmod(u, upp, o);
    d_j = divmod(kBlock, upp, d_o);
    plane_stride = C * inner;
    base = c * inner;
  }
  __device__ int64_t offset() const { return o * plane_stride + base + j * V; }
  __device__ void advance() {
    j += d_j;
    o += d_o;
    if (j >= upp) {
      j -= upp;
      ++o;
    }
  }
};

// Rows: the unit of columns c0 .. c0 + V - 1 in rows lo + ty, lo + ty + by, ... < hi.
struct RowWalk {
  int64_t count, off, step;
  __device__ RowWalk(int64_t lo, int64_t hi, int64_t c0, int64_t C, int ty, int by, bool active) {
    const int64_t r = lo + ty;
    count = active && r < hi ? (hi - r + by - 1) / by : 0;
    off = r * C + c0;
    step = static_cast<int64_t>(by) * C;
  }
  __device__ int64_t offset() const { return off; }
  __device__ void advance() { off += step; }
};

template <typename acc, int V, typename scalar_t>
__device__ __forceinline__ void load_unit(const scalar_t* p, int64_t off, acc (&v)[V]) {
  const AlignedVec<scalar_t, V> raw = load_vec<V>(p + off);
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = static_cast<acc>(raw.val[i]);
}

template <typename acc, int V, typename scalar_t>
__device__ __forceinline__ void store_unit(scalar_t* p, int64_t off, const acc (&v)[V]) {
  AlignedVec<scalar_t, V> raw;
#pragma unroll
  for (int i = 0; i < V; ++i) raw.val[i] = static_cast<scalar_t>(v[i]);
  store_vec<V>(p + off, raw);
}

// Slot of value i of a unit: planes have one channel per unit (slot 0), rows V (slot i).
template <bool kRows>
__device__ __forceinline__ constexpr int slot_of(int i) { return kRows ? i : 0; }

// Welford/Chan update of the per-slot moments (count n shared by the slots) with one unit of
// shifted values: the unit's exact two-pass moments per slot, then Chan's merge.
template <bool kRows, int V, typename acc>
__device__ __forceinline__ void add_unit_moments(acc& n, acc* mean, acc* m2, const acc (&v)[V]) {
  constexpr int kSlots = kRows ? V : 1;
  constexpr int kPer = V / kSlots;
  const acc n_new = n + acc(kPer);
  const acc ratio = fast_div(acc(kPer), n_new);
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    acc bm = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) bm += v[s * kPer + i];
    bm *= acc(1) / acc(kPer);  // a power of two: exact
    acc bq = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) bq += (v[s * kPer + i] - bm) * (v[s * kPer + i] - bm);
    const acc delta = bm - mean[s];
    mean[s] += delta * ratio;
    m2[s] += bq + delta * delta * n * ratio;
  }
  n = n_new;
}

// ----------------------------------------------------------------------------- split path

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
    for (int64_t i = 0; i < walk.count; i += kUnroll) {
      acc xv[kUnroll][V], gv[kGrad ? kUnroll : 1][V];
      (void)gv;
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        if (i + q < walk.count) {
          load_unit<acc, V>(x, walk.offset(), xv[q]);
          if constexpr (kGrad) load_unit<acc, V>(dy, walk.offset(), gv[q]);
          walk.advance();
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        if (i + q < walk.count) {
          if constexpr (kGrad) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
              first[slot_of<kRows>(e)] += gv[q][e];
              second[slot_of<kRows>(e)] += gv[q][e] * (xv[q][e] - ref[slot_of<kRows>(e)]);
            }
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) xv[q][e] -= ref[slot_of<kRows>(e)];
            add_unit_moments<kRows, V>(n, first, second, xv[q]);
          }
        }
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

template <typename acc>
struct FinalizeArgs {
  int64_t C, inner, splits, n;  // n: values per channel (> 0 for moments)
  acc eps, keep, momentum;      // keep = 1 - momentum
  acc* first_out;               // moments: mean; grad: sum(dy)
  acc* second_out;              // moments: invstd (var when out_var); grad: sum(dy * (x - mean))
  bool out_var;
  acc* running_mean;            // moments, optional, updated in place
  acc* running_var;
  const acc* invstd;            // grad, optional: then grad_weight = second * invstd ...
  acc* grad_weight;             // ... is written here
};

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

// ----------------------------------------------------------------------------- elementwise

enum class Pass { kForward, kBackward, kBackwardEval };

template <typename acc>
struct CoefArgs {
  const acc* mean;    // [C]
  const acc* invstd;  // [C]: invstd, or the variance when from_var
  const acc* weight;  // [C] or null (1)
  const acc* shift;   // [C] or null (0): bias (forward); sum or mean of dy (backward)
  const acc* dot;     // [C]: sum or mean of dy * (x - mean) (training backward)
  acc count;          // shift and dot (backward) are divided by it: n for sums, 1 for means
  acc eps;            // from_var only
  bool from_var;
  acc* mean_out;      // eval forward: the block (0, 0) writes mean and invstd here (else null)
  acc* invstd_out;
};

// out = (x - m) * a + b (forward), (dy - b - (x - m) * k) * a (backward), dy * a (eval backward)
template <typename acc>
struct Coefs {
  acc m, a, b, k;
};

template <Pass kPass, typename acc>
__device__ __forceinline__ Coefs<acc> load_coefs(const CoefArgs<acc>& p, int64_t c) {
  const acc inv = p.from_var ? inv_sqrt(p.invstd[c] + p.eps) : p.invstd[c];
  Coefs<acc> r{p.mean[c], p.weight != nullptr ? inv * p.weight[c] : inv, acc(0), acc(0)};
  if constexpr (kPass == Pass::kForward) {
    if (p.shift != nullptr) r.b = p.shift[c];
  } else if constexpr (kPass == Pass::kBackward) {
    r.b = p.shift[c] / p.count;
    r.k = inv * inv * (p.dot[c] / p.count);
  }
  return r;
}

template <Pass kPass, typename acc>
__device__ __forceinline__ acc apply(const Coefs<acc>& k, acc x, acc g) {
  if constexpr (kPass == Pass::kForward) {
    return (x - k.m) * k.a + k.b;
  } else if constexpr (kPass == Pass::kBackward) {
    return (g - k.b - (x - k.m) * k.k) * k.a;
  } else {
    return g * k.a;
  }
}

template <typename acc>
__device__ void write_eval_stats(const CoefArgs<acc>& p, int64_t C) {
  if (p.mean_out == nullptr || blockIdx.x != 0 || blockIdx.y != 0) return;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    p.mean_out[c] = p.mean[c];
    p.invstd_out[c] = inv_sqrt(p.invstd[c] + p.eps);
  }
}

struct PlanesElemtArgs {
  int64_t units, upp, C;  // units in the tensor, per plane; channels
  int64_t step_j, step_c;  // a grid-stride step (in units) as (unit-in-plane, channel) advance
};

// Planes: grid-stride over every unit in memory order, with a carried (unit-in-plane, channel)
// cursor; coefficients reloaded only when the channel changes.
template <typename scalar_t, int V, Pass kPass>
__global__ void __launch_bounds__(kThreads)
bn_elemt_planes_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                       scalar_t* __restrict__ out, const CoefArgs<acc_t<scalar_t>> co,
                       const PlanesElemtArgs args) {
  using acc = acc_t<scalar_t>;
  write_eval_stats(co, args.C);
  int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (u >= args.units) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t plane, sample;
  int64_t j = divmod(u, args.upp, plane);
  int64_t c = divmod(plane, args.C, sample);
  int64_t loaded = -1;
  Coefs<acc> k{};
  for (; u < args.units; u += step) {
    if (c != loaded) {
      k = load_coefs<kPass>(co, c);
      loaded = c;
    }
    acc xv[V], gv[V], y[V];
    if constexpr (kPass != Pass::kBackwardEval) load_unit<acc, V>(x, u * V, xv);
    if constexpr (kPass != Pass::kForward) load_unit<acc, V>(dy, u * V, gv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      y[e] = apply<kPass>(k, kPass != Pass::kBackwardEval ? xv[e] : acc(0),
                          kPass != Pass::kForward ? gv[e] : acc(0));
    }
    store_unit<acc, V>(out, u * V, y);
    j += args.step_j;
    c += args.step_c;
    if (j >= args.upp) {
      j -= args.upp;
      ++c;
    }
    if (c >= args.C) c -= args.C;  // step_c < C and the carry is 1: one wrap at most
  }
}

struct RowsElemtArgs {
  int64_t rows, C;
  int bx;
};

// Rows: thread (ty, tx) keeps the coefficients of its V channels and walks rows.
template <typename scalar_t, int V, Pass kPass>
__global__ void __launch_bounds__(kThreads)
bn_elemt_rows_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                     scalar_t* __restrict__ out, const CoefArgs<acc_t<scalar_t>> co,
                     const RowsElemtArgs args) {
  using acc = acc_t<scalar_t>;
  write_eval_stats(co, args.C);
  const int bx = args.bx, by = kThreads / args.bx;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * bx + threadIdx.x % bx) * V;
  if (c0 >= args.C) return;
  Coefs<acc> k[V];
#pragma unroll
  for (int e = 0; e < V; ++e) k[e] = load_coefs<kPass>(co, c0 + e);
  const int64_t step = static_cast<int64_t>(gridDim.y) * by;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * by + threadIdx.x / bx; r < args.rows; r += step) {
    const int64_t off = r * args.C + c0;
    acc xv[V], gv[V], y[V];
    if constexpr (kPass != Pass::kBackwardEval) load_unit<acc, V>(x, off, xv);
    if constexpr (kPass != Pass::kForward) load_unit<acc, V>(dy, off, gv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      y[e] = apply<kPass>(k[e], kPass != Pass::kBackwardEval ? xv[e] : acc(0),
                          kPass != Pass::kForward ? gv[e] : acc(0));
    }
    store_unit<acc, V>(out, off, y);
  }
}

// ----------------------------------------------------------------------------- on-chip path

template <typename acc>
struct OnchipArgs {
  int64_t C, inner, outer;
  int64_t cache_elems;     // elements of the x cache (the dy cache follows it)
  int bx;                  // rows: column threads per block (1 for planes)
  acc eps, keep, momentum;
  const acc* weight;       // [C] or null
  const acc* bias;         // forward: [C] or null
  acc* running_mean;       // forward: [C] or null, updated in place
  acc* running_var;
  acc* mean;               // forward: out [C]; backward: in
  acc* invstd;             // forward: out [C]; backward: in
  acc* grad_weight;        // backward: out [C]
  acc* grad_bias;          // backward: out [C]
  bool training;           // backward
};

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
      store_unit<acc, V>(out, walk.offset(), y);
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


// ----------------------------------------------------------------------------- host side

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of `kernel` resident on one SM of the current device at `threads` threads (and `smem`
// dynamic bytes), queried once per device, kernel and size: a grid-stride kernel launched with
// more would run a mostly idle wave. Per device: GPUs of one process may differ, and the answer
// for smem beyond 48 KiB depends on onchip_capacity's attribute, which is per device.
int resident_per_sm(const void* kernel, int threads, size_t smem = 0) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(static_cast<int>(c10::cuda::current_device()), kernel, threads, smem);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
    it = cache.emplace(key, std::max(blocks, 1)).first;
  }
  return it->second;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p *= 2;
  return p;
}

// Column threads of a rows block: enough for C (in units of V channels), at most kRowBx.
int rows_bx(int64_t C, int V, int block) {
  return static_cast<int>(std::min<int64_t>({kRowBx, next_pow2(ceil_div(C, V)), block}));
}

// f(std::integral_constant<int, V>) with V = 16-byte vectors when `vec`, else single values.
template <typename scalar_t, typename F>
void with_vec(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, vec_size<scalar_t>()>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// 16-byte units are usable when the unit extent (C for rows, inner for planes) is a multiple of
// the vector and every pointer is 16-byte aligned: then every unit is.
template <typename scalar_t>
bool vectorizable(const BatchNormLayout& L, std::initializer_list<const void*> ptrs) {
  const int64_t extent = L.inner == 1 ? L.channels : L.inner;
  if (extent % vec_size<scalar_t>() != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned(p)) return false;
  }
  return true;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Split path: reduction kernel + finalize kernel. kGrad: sums of dy and dy * (x - mean[c]).
// fin carries the outputs; its C/inner/splits fields are filled here.
template <typename scalar_t, bool kGrad>
void launch_split_reduce(const BatchNormOperands& ops, const acc_t<scalar_t>* mean,
                         FinalizeArgs<acc_t<scalar_t>> fin) {
  using acc = acc_t<scalar_t>;
  const BatchNormLayout& L = ops.layout;
  const int64_t C = L.channels;
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = kGrad ? ops.dy.const_data_ptr<scalar_t>() : nullptr;
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
    at::Tensor part = at::empty({3 * args.splits * C}, ops.x.options().dtype(bn_stats_dtype(ops.x)));
    const auto grid = static_cast<unsigned int>(channel_blocks * args.splits);
    if (rows) {
      bn_reduce_kernel<scalar_t, V, true, kGrad><<<grid, kThreads, 0, stream>>>(
          x, dy, mean, part.mutable_data_ptr<acc>(), args);
    } else {
      bn_reduce_kernel<scalar_t, V, false, kGrad><<<grid, kThreads, 0, stream>>>(
          x, dy, mean, part.mutable_data_ptr<acc>(), args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fin.C = C;
    fin.inner = L.inner;
    fin.splits = args.splits;
    fin.n = L.per_channel();
    const auto fin_grid = static_cast<unsigned int>(ceil_div(C * kWarpSize, kThreads));
    bn_finalize_kernel<scalar_t, kGrad><<<fin_grid, kThreads, 0, stream>>>(
        x, part.const_data_ptr<acc>(), fin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One elementwise pass (plus, for eval forward, the mean/invstd outputs in co).
template <typename scalar_t, Pass kPass>
void launch_elementwise(const BatchNormOperands& ops, const CoefArgs<acc_t<scalar_t>>& co) {
  const BatchNormLayout& L = ops.layout;
  if (L.numel() == 0) return;
  const int64_t C = L.channels;
  const scalar_t* x = kPass != Pass::kBackwardEval ? ops.x.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* dy = kPass != Pass::kForward ? ops.dy.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = ops.out.mutable_data_ptr<scalar_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_vec<scalar_t>(vectorizable<scalar_t>(L, {x, dy, out}), [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    if (L.inner == 1) {
      const auto kernel = &bn_elemt_rows_kernel<scalar_t, V, kPass>;
      RowsElemtArgs args{L.outer, C, rows_bx(C, V, kThreads)};
      const int64_t blocks_x = ceil_div(C, int64_t(args.bx) * V);
      const int64_t resident =
          int64_t(sm_count()) * resident_per_sm(reinterpret_cast<const void*>(kernel), kThreads);
      const int64_t blocks_y = std::clamp<int64_t>(std::min(ceil_div(L.outer, kThreads / args.bx),
                                                            ceil_div(resident, blocks_x)), 1, 65535);
      TORCH_CHECK(blocks_x <= INT32_MAX, "batch_norm: too many channels (", C, ")");
      kernel<<<dim3(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(blocks_y)), kThreads, 0,
               stream>>>(x, dy, out, co, args);
    } else {
      const auto kernel = &bn_elemt_planes_kernel<scalar_t, V, kPass>;
      PlanesElemtArgs args{L.numel() / V, L.inner / V, C, 0, 0};
      const int64_t resident =
          int64_t(sm_count()) * resident_per_sm(reinterpret_cast<const void*>(kernel), kThreads);
      const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(args.units, kThreads), resident));
      const int64_t step = blocks * kThreads;
      args.step_j = step % args.upp;
      args.step_c = (step / args.upp) % C;
      kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(x, dy, out, co, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Dynamic shared memory an on-chip kernel may use on the current device (opt-in maximum less its
// static shared memory), allowed on the kernel once per device: a function attribute set on one
// device does not carry over to another, where launching with more than 48 KiB then fails.
int64_t onchip_capacity(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(c10::cuda::current_device()), kernel);
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    const int64_t capacity = optin - static_cast<int64_t>(attr.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(capacity)));
    it = cache.emplace(key, capacity).first;
  }
  return it->second;
}

// On-chip path: launches and returns true when the block's slice fits in shared memory and the
// blocks fill at least half the GPU (or the whole tensor is small); else launches nothing.
template <typename scalar_t, bool kBackward>
bool try_onchip(const BatchNormOperands& ops, OnchipArgs<acc_t<scalar_t>> args) {
  const BatchNormLayout& L = ops.layout;
  const int64_t C = L.channels;
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = kBackward ? ops.dy.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = ops.out.mutable_data_ptr<scalar_t>();
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

void check_cuda(const at::Tensor& t, const char* name) { check_device_type(t, at::kCUDA, name); }

template <typename acc>
const acc* cptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc>() : nullptr;
}

// Contract: returns (output laid out as empty_like(input) in input's dtype, mean, invstd), the
// last two [C] in the statistics dtype: batch statistics in training (zeros for an empty batch),
// running_mean and 1/sqrt(running_var + eps) in eval. Mutates running_mean/running_var in training
// when given, inside the launches (through a statistics-dtype copy when they are not contiguous
// statistics-dtype tensors): (1 - momentum) * old + momentum * batch value, the variance unbiased.
// Raises ValueError for one value per channel in training, RuntimeError for eval without running
// stats. Never syncs with the host.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor b = to_stats(bias, input, "bias");
  RunningStat rmean(running_mean, input, "running_mean");
  RunningStat rvar(running_var, input, "running_var");
  check_eval_running_stats(rmean, rvar, training);
  check_values_per_channel(input, training);
  BatchNormOperands ops = prepare_bn(input, nullptr, true);
  at::Tensor mean = bn_stats_empty(input);
  at::Tensor invstd = bn_stats_empty(input);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_fwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    CoefArgs<acc> co{};
    co.weight = cptr<acc>(w);
    co.shift = cptr<acc>(b);
    co.count = acc(1);
    co.eps = static_cast<acc>(eps);
    if (!training) {
      co.mean = cptr<acc>(rmean.work);
      co.invstd = cptr<acc>(rvar.work);
      co.from_var = true;
      if (ops.layout.numel() == 0) {
        mean.copy_(rmean.work);
        invstd.copy_(at::reciprocal(at::sqrt(rvar.work + eps)));
      }
      co.mean_out = mean.mutable_data_ptr<acc>();
      co.invstd_out = invstd.mutable_data_ptr<acc>();
      launch_elementwise<scalar_t, Pass::kForward>(ops, co);
      return;
    }
    if (ops.layout.per_channel() == 0) {
      mean.zero_();
      invstd.zero_();
      return;
    }
    const acc keep = static_cast<acc>(1.0 - momentum), mom = static_cast<acc>(momentum);
    OnchipArgs<acc> oa{};
    oa.C = ops.layout.channels;
    oa.inner = ops.layout.inner;
    oa.outer = ops.layout.outer;
    oa.eps = co.eps;
    oa.keep = keep;
    oa.momentum = mom;
    oa.weight = co.weight;
    oa.bias = co.shift;
    oa.running_mean = ptr_or_null<acc>(rmean.work);
    oa.running_var = ptr_or_null<acc>(rvar.work);
    oa.mean = mean.mutable_data_ptr<acc>();
    oa.invstd = invstd.mutable_data_ptr<acc>();
    if (try_onchip<scalar_t, false>(ops, oa)) return;
    FinalizeArgs<acc> fin{};
    fin.eps = co.eps;
    fin.keep = keep;
    fin.momentum = mom;
    fin.first_out = oa.mean;
    fin.second_out = oa.invstd;
    fin.running_mean = oa.running_mean;
    fin.running_var = oa.running_var;
    launch_split_reduce<scalar_t, false>(ops, nullptr, fin);
    co.mean = oa.mean;
    co.invstd = oa.invstd;
    launch_elementwise<scalar_t, Pass::kForward>(ops, co);
  });
  rmean.write_back();
  rvar.write_back();
  return {ops.out, mean, invstd};
}

// Contract: returns (grad_input laid out as empty_like(input) in input's dtype, grad_weight,
// grad_bias), the last two [C] in the statistics dtype: grad_bias = sum(dy), grad_weight =
// sum(dy * (x - mean)) * invstd; grad_input as in the schema for training, dy * invstd * weight in
// eval. grad_out: input's shape and dtype, any layout. Mutates nothing; never syncs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  BatchNormOperands ops = prepare_bn(input, &grad_out, true);
  at::Tensor grad_weight = bn_stats_empty(input);
  at::Tensor grad_bias = bn_stats_empty(input);
  if (ops.layout.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {ops.out, grad_weight, grad_bias};
  }
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    OnchipArgs<acc> oa{};
    oa.C = ops.layout.channels;
    oa.inner = ops.layout.inner;
    oa.outer = ops.layout.outer;
    oa.weight = cptr<acc>(w);
    oa.mean = const_cast<acc*>(cptr<acc>(m));  // read only in the backward kernel
    oa.invstd = const_cast<acc*>(cptr<acc>(is));
    oa.grad_weight = grad_weight.mutable_data_ptr<acc>();
    oa.grad_bias = grad_bias.mutable_data_ptr<acc>();
    oa.training = training;
    if (try_onchip<scalar_t, true>(ops, oa)) return;
    at::Tensor sum_dy_xmu = bn_stats_empty(input);
    FinalizeArgs<acc> fin{};
    fin.first_out = oa.grad_bias;
    fin.second_out = sum_dy_xmu.mutable_data_ptr<acc>();
    fin.invstd = oa.invstd;
    fin.grad_weight = oa.grad_weight;
    launch_split_reduce<scalar_t, true>(ops, oa.mean, fin);
    CoefArgs<acc> co{};
    co.mean = oa.mean;
    co.invstd = oa.invstd;
    co.weight = oa.weight;
    co.shift = oa.grad_bias;
    co.dot = sum_dy_xmu.const_data_ptr<acc>();
    co.count = static_cast<acc>(ops.layout.per_channel());
    if (training) {
      launch_elementwise<scalar_t, Pass::kBackward>(ops, co);
    } else {
      launch_elementwise<scalar_t, Pass::kBackwardEval>(ops, co);
    }
  });
  return {ops.out, grad_weight, grad_bias};
}

// Contract: returns (mean, biased variance) over every dim but 1, [C] in the statistics dtype;
// zeros for an empty batch. Mutates nothing.
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  BatchNormOperands ops = prepare_bn(input, nullptr, false);
  at::Tensor mean = bn_stats_empty(input);
  at::Tensor var = bn_stats_empty(input);
  if (ops.layout.per_channel() == 0) {
    mean.zero_();
    var.zero_();
    return {mean, var};
  }
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_stats_cuda", [&] {
    using acc = acc_t<scalar_t>;
    FinalizeArgs<acc> fin{};
    fin.first_out = mean.mutable_data_ptr<acc>();
    fin.second_out = var.mutable_data_ptr<acc>();
    fin.out_var = true;
    launch_split_reduce<scalar_t, false>(ops, nullptr, fin);
  });
  return {mean, var};
}

// Contract: returns (input - mean) * invstd * weight + bias laid out as empty_like(input), input's
// dtype; weight/bias optional (1 / 0); per-channel tensors [C] in input's or the statistics dtype.
at::Tensor batch_norm_elemt_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor b = to_stats(bias, input, "bias");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  BatchNormOperands ops = prepare_bn(input, nullptr, true);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_elemt_cuda", [&] {
    using acc = acc_t<scalar_t>;
    CoefArgs<acc> co{};
    co.mean = cptr<acc>(m);
    co.invstd = cptr<acc>(is);
    co.weight = cptr<acc>(w);
    co.shift = cptr<acc>(b);
    co.count = acc(1);
    launch_elementwise<scalar_t, Pass::kForward>(ops, co);
  });
  return ops.out;
}

// Contract: returns (sum(grad_out), sum(grad_out * (input - mean))) per channel, [C] in the
// statistics dtype. grad_out: input's shape and dtype; mean: [C]. Mutates nothing.
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cuda(const at::Tensor& grad_out,
                                                              const at::Tensor& input,
                                                              const at::Tensor& mean) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor m = to_stats(mean, input, "mean");
  BatchNormOperands ops = prepare_bn(input, &grad_out, false);
  at::Tensor sum_dy = bn_stats_empty(input);
  at::Tensor sum_dy_xmu = bn_stats_empty(input);
  if (ops.layout.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_reduce_cuda", [&] {
    using acc = acc_t<scalar_t>;
    FinalizeArgs<acc> fin{};
    fin.first_out = sum_dy.mutable_data_ptr<acc>();
    fin.second_out = sum_dy_xmu.mutable_data_ptr<acc>();
    launch_split_reduce<scalar_t, true>(ops, cptr<acc>(m), fin);
  });
  return {sum_dy, sum_dy_xmu};
}

// Contract: returns (grad_out - mean_dy - (input - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
// laid out as empty_like(input), input's dtype; weight optional (1); the rest [C]. Mutates nothing.
at::Tensor batch_norm_bwd_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& mean_dy,
                                     const at::Tensor& mean_dy_xmu) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  const at::Tensor mdy = to_stats(mean_dy, input, "mean_dy");
  const at::Tensor mdxmu = to_stats(mean_dy_xmu, input, "mean_dy_xmu");
  BatchNormOperands ops = prepare_bn(input, &grad_out, true);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_elemt_cuda", [&] {
    using acc = acc_t<scalar_t>;
    CoefArgs<acc> co{};
    co.mean = cptr<acc>(m);
    co.invstd = cptr<acc>(is);
    co.weight = cptr<acc>(w);
    co.shift = cptr<acc>(mdy);
    co.dot = cptr<acc>(mdxmu);
    co.count = acc(1);
    launch_elementwise<scalar_t, Pass::kBackward>(ops, co);
  });
  return ops.out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("batch_norm_fwd", &fusedreg::batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd", &fusedreg::batch_norm_bwd_cuda);
  m.impl("batch_norm_stats", &fusedreg::batch_norm_stats_cuda);
  m.impl("batch_norm_elemt", &fusedreg::batch_norm_elemt_cuda);
  m.impl("batch_norm_bwd_reduce", &fusedreg::batch_norm_bwd_reduce_cuda);
  m.impl("batch_norm_bwd_elemt", &fusedreg::batch_norm_bwd_elemt_cuda);
}
