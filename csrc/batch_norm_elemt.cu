// CUDA elementwise kernels of BatchNorm: the one pass that writes y or dx once per-channel
// coefficients are known. Used by eval forward (invstd from running_var on the fly; block (0, 0)
// also writes mean/invstd), training forward's split path after batch_norm_stats.cu, training
// backward's split path (dx from the sums), eval backward (dx = dy * invstd * weight, no x read),
// and the SyncBatchNorm pieces batch_norm_elemt / batch_norm_bwd_elemt.
//
// Algorithm: out = (x - m) * a + b, (dy - b - (x - m) * k) * a or dy * a (apply, batch_norm.cuh),
// with 16-byte units when the layout and pointers allow. Planes: a grid-stride loop over every unit
// in memory order, carrying a (unit-in-plane, channel) cursor so the loop needs no division and
// reloads coefficients only when the channel changes. Rows: thread (ty, tx) keeps the coefficients
// of its V channels in registers and walks rows ty, ty + by, ...
// Trade-off: the grid is capped at the blocks resident at once (grid-stride), so a big tensor runs
// one full wave instead of many short blocks, at the price of the cursor bookkeeping per unit.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "batch_norm.cuh"

namespace fusedreg {
namespace bn {
namespace {

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

template <typename acc>
__device__ void write_eval_stats(const CoefArgs<acc>& p, int64_t C) {
  if (p.mean_out == nullptr || blockIdx.x != 0 || blockIdx.y != 0) return;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    p.mean_out[c] = p.mean[c];
    p.invstd_out[c] = inv_sqrt(p.invstd[c] + p.eps);
  }
}

// One unit at element offset off: loads what kPass reads (x unless kBackwardEval, dy unless
// kForward), applies coef(e)'s coefficients to value e, stores the unit (kStoreV4: one explicit
// st.global.v4, see store_unit_v4).
template <Pass kPass, int V, bool kStoreV4, typename scalar_t, typename CoefOf>
__device__ __forceinline__ void elemt_unit(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                           scalar_t* __restrict__ out, int64_t off, CoefOf coef) {
  using acc = acc_t<scalar_t>;
  acc xv[V], gv[V], y[V];
  if constexpr (kPass != Pass::kBackwardEval) load_unit<acc, V>(x, off, xv);
  if constexpr (kPass != Pass::kForward) load_unit<acc, V>(dy, off, gv);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    y[e] = apply<kPass>(coef(e), kPass != Pass::kBackwardEval ? xv[e] : acc(0),
                        kPass != Pass::kForward ? gv[e] : acc(0));
  }
  if constexpr (kStoreV4) {
    store_unit_v4<acc, V>(out, off, y);
  } else {
    store_unit<acc, V>(out, off, y);
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
    elemt_unit<kPass, V, false>(x, dy, out, u * V, [&](int) -> const Coefs<acc>& { return k; });
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
    elemt_unit<kPass, V, true>(x, dy, out, r * args.C + c0, [&](int e) -> const Coefs<acc>& { return k[e]; });
  }
}

}  // namespace

// Contract: batch_norm.cuh.
template <typename scalar_t, Pass kPass>
void launch_elementwise(const Operands<scalar_t>& ops, const CoefArgs<acc_t<scalar_t>>& co) {
  const BatchNormLayout& L = ops.layout;
  if (L.numel() == 0) return;
  const int64_t C = L.channels;
  const scalar_t* x = kPass != Pass::kBackwardEval ? ops.x : nullptr;
  const scalar_t* dy = kPass != Pass::kForward ? ops.dy : nullptr;
  scalar_t* out = ops.out;
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

// Instantiated in the order of the single-file build (forward, then backward; dtypes in dispatch
// order), which keeps the SASS identical to it: another order can rename registers.
#define FUSEDREG_BN_ELEMENTWISE_FWD(scalar_t)                                                               \
  template void launch_elementwise<scalar_t, Pass::kForward>(const Operands<scalar_t>&,                     \
                                                             const CoefArgs<acc_t<scalar_t>>&);
#define FUSEDREG_BN_ELEMENTWISE_BWD(scalar_t)                                                               \
  template void launch_elementwise<scalar_t, Pass::kBackward>(const Operands<scalar_t>&,                    \
                                                              const CoefArgs<acc_t<scalar_t>>&);            \
  template void launch_elementwise<scalar_t, Pass::kBackwardEval>(const Operands<scalar_t>&,                \
                                                                  const CoefArgs<acc_t<scalar_t>>&);
FUSEDREG_BN_FOR_EACH_DTYPE(FUSEDREG_BN_ELEMENTWISE_FWD)
FUSEDREG_BN_FOR_EACH_DTYPE(FUSEDREG_BN_ELEMENTWISE_BWD)
#undef FUSEDREG_BN_ELEMENTWISE_FWD
#undef FUSEDREG_BN_ELEMENTWISE_BWD

}  // namespace bn
}  // namespace fusedreg
