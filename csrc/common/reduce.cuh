// Warp and block reductions with a fixed combination order (nvcc only).
//
// warp_reduce_sum(v), warp_reduce_max(v)          all 32 lanes must call; every lane gets the result
// block_reduce_sum<BLOCK>(v), block_reduce_max<BLOCK>(v)
//                                                 all BLOCK threads must call (BLOCK = blockDim.x, a
//                                                 multiple of 32); every thread gets the result
// warp_reduce(v, op), block_reduce<BLOCK>(v, op)  the same for any commutative op on arithmetic T
// nan_max(a, b)                                   max that propagates NaN, like torch.max
//
// Determinism: the order in which values meet depends only on BLOCK and the thread that holds each
// value, never on timing; there are no atomics. The same inputs therefore give the bitwise same
// result on every run, which multi-tensor norms need (their two-stage scheme: per-block partials
// written to a buffer, then a fixed-order reduction of the partials). An xor butterfly is used
// within a warp: with a commutative op every lane computes bitwise the same value, so no broadcast
// is needed. Across warps each thread sums the <= 32 warp totals from shared memory in warp order.
//
// Trade-off: one extra __syncthreads per call (so back-to-back calls may reuse the shared buffer)
// and a serial pass over warp totals; both are negligible next to the memory traffic of the
// kernels that use them.
#pragma once

#include <cmath>

namespace fusedreg {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename T>
__host__ __device__ inline T nan_max(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return nan_max(a, b); }
};

template <typename T, typename Op>
__device__ inline T warp_reduce(T value, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  }
  return value;
}

template <int BLOCK, typename T, typename Op>
__device__ inline T block_reduce(T value, Op op) {
  static_assert(BLOCK % kWarpSize == 0 && BLOCK <= 1024, "BLOCK must be a multiple of 32, <= 1024");
  constexpr int kWarps = BLOCK / kWarpSize;
  __shared__ T warp_totals[kWarps];
  value = warp_reduce(value, op);
  if constexpr (kWarps == 1) return value;
  __syncthreads();  // an earlier call may still be reading warp_totals
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  T total = warp_totals[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = op(total, warp_totals[w]);
  return total;
}

template <typename T>
__device__ inline T warp_reduce_sum(T value) { return warp_reduce(value, SumOp{}); }

template <typename T>
__device__ inline T warp_reduce_max(T value) { return warp_reduce(value, MaxOp{}); }

template <int BLOCK, typename T>
__device__ inline T block_reduce_sum(T value) { return block_reduce<BLOCK>(value, SumOp{}); }

template <int BLOCK, typename T>
__device__ inline T block_reduce_max(T value) { return block_reduce<BLOCK>(value, MaxOp{}); }

}  // namespace fusedreg
