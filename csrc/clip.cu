// CUDA kernels of global-norm gradient clipping: fusedreg::grad_norm_pow and
// fusedreg::multi_tensor_scale_.
//
// grad_norm_pow, two stages, both deterministic (no atomics, a fixed combination order):
//   1. multi_tensor_apply (depth 1): one block per chunk of kClipChunkSize elements reduces
//      |x|^p (max |x| for p = inf) over its chunk in float32 (float64 for float64 data) and writes
//      one partial to partials[global_chunk];
//   2. one block of kCombineBlock threads combines all partials in a fixed order into the result.
// Threads take the same elements in the same order on the 16-byte vector path and the scalar path
// (used when a tensor's data is not 16-byte aligned), so the bits do not depend on alignment
// either. A list is one launch of stage 1 up to the chunk table's capacity (256 tensors, ~23k
// chunks; see multi_tensor.cuh), then one more per refill, and always one launch of stage 2.
//
// |x|^p is not rescaled by the maximum: as in PyTorch's own norm kernels, a p-th power sum beyond
// the accumulator's range overflows to inf (only a concern for large p or huge gradients). For a
// general p it is exp2(p * log2|x|) on the MUFU approximations (abs_pow, clip.h): about 6 issued
// instructions per value instead of powf's ~80, but two MUFU operations, and the MUFU pipe (16 per
// clock per SM on sm_90) then sets the pace of 16-bit data at about its memory rate. max |x| of
// 16-bit data is an unsigned max over the bits, two values at a time (AbsBitsMaxFold).
//
// multi_tensor_scale_: one multi-tensor launch, x = x * scale with 16-byte loads and stores, the
// product in float32 (float64) rounded once. Every block reads the scale from device memory (no
// host sync) and returns at once when it is exactly 1: x * 1 == x for every x, so clipping that
// does not clip costs the norm pass only (4 instead of 12 bytes per float32 element).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "clip.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/multi_tensor.cuh"
#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace fusedreg {
namespace {

constexpr int64_t kClipChunkSize = 65536;
constexpr int kClipBlock = 512;
constexpr int kCombineBlock = 1024;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread before any arithmetic

// Additions that are never contracted into an fma with an inlined product, so the vector and the
// scalar path (and every build) round identically.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <NormKind kKind, typename acc>
__device__ __forceinline__ acc accumulate(acc total, acc x, acc p) {
  if constexpr (kKind == NormKind::kL2) {
    return fma(x, x, total);  // an explicit fma on every path
  } else if constexpr (kKind == NormKind::kL1) {
    return add_rn(total, fabs(x));
  } else if constexpr (kKind == NormKind::kInf) {
    return nan_max(total, static_cast<acc>(fabs(x)));
  } else {
    return add_rn(total, abs_pow(x, p));  // clip.h: MUFU log2 / exp2 in float
  }
}

template <NormKind kKind>
using CombineOp = std::conditional_t<kKind == NormKind::kInf, MaxOp, SumOp>;

// How a thread folds its values into its total: one value (the scalar paths) or one 16-byte vector.
template <typename scalar_t, NormKind kKind>
struct ValueFold {
  using acc = acc_t<scalar_t>;
  acc total = 0;  // identity of both the sum and the max of |x| >= 0
  acc p;          // norm_type (kP only)
  __device__ explicit ValueFold(acc norm_type) : p(norm_type) {}
  __device__ void add(scalar_t x) { total = accumulate<kKind>(total, static_cast<acc>(x), p); }
  template <int N>
  __device__ void add(const AlignedVec<scalar_t, N>& v) {
#pragma unroll
    for (int j = 0; j < N; ++j) add(v.val[j]);
  }
  __device__ acc result() const { return total; }
};

// max |x| of 16-bit floats on their bits: with the sign cleared, the unsigned order of bfloat16 /
// float16 bit patterns is the order of the values, and every NaN pattern lies above inf, so an
// unsigned max is max |x| with NaN propagated. Two values per 32-bit word (max.u16x2 on sm_90):
// one mask and one max per pair instead of a conversion and a NaN-aware float max per value.
template <typename scalar_t>
struct AbsBitsMaxFold {
  uint32_t total = 0;  // two 16-bit lanes, each a running max of |x|'s bits
  __device__ explicit AbsBitsMaxFold(float /* norm_type: inf */) {}
  __device__ void add(scalar_t x) { total = __vmaxu2(total, bits_as<uint16_t>(x) & 0x7FFFu); }
  template <int N>
  __device__ void add(const AlignedVec<scalar_t, N>& v) {
    const auto words = bits_as<AlignedVec<uint32_t, N / 2>>(v);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) total = __vmaxu2(total, words.val[j] & 0x7FFF7FFFu);
  }
  __device__ float result() const {
    const uint16_t top = static_cast<uint16_t>(max(total & 0xFFFFu, total >> 16));
    return static_cast<float>(bits_as<scalar_t>(top));
  }
};

template <typename scalar_t, NormKind kKind>
using Fold = std::conditional_t<kKind == NormKind::kInf && sizeof(scalar_t) == 2, AbsBitsMaxFold<scalar_t>,
                                ValueFold<scalar_t, kKind>>;

template <typename scalar_t, NormKind kKind, int BLOCK>
struct ChunkPowSumFunctor {
  using acc = acc_t<scalar_t>;
  acc* partials;  // [total chunks of the call]
  acc p;          // norm_type (kP only)

  __device__ void operator()(const MultiTensorChunk& chunk, const MultiTensorTable<1>& table) const {
    constexpr int N = vec_size<scalar_t>();
    const scalar_t* x = table.chunk_data<const scalar_t>(0, chunk);
    const int64_t n_vec = chunk.size / N;
    Fold<scalar_t, kKind> fold(p);
    int64_t v = threadIdx.x;
    if (is_aligned(x)) {
      for (; v + (kUnroll - 1) * BLOCK < n_vec; v += kUnroll * BLOCK) {
        AlignedVec<scalar_t, N> xv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) xv[u] = load_vec<N>(x + (v + u * BLOCK) * N);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) fold.add(xv[u]);
      }
      for (; v < n_vec; v += BLOCK) fold.add(load_vec<N>(x + v * N));
    } else {
      for (; v < n_vec; v += BLOCK) {
#pragma unroll
        for (int j = 0; j < N; ++j) fold.add(x[v * N + j]);
      }
    }
    for (int64_t i = n_vec * N + threadIdx.x; i < chunk.size; i += BLOCK) fold.add(x[i]);
    const acc total = block_reduce<BLOCK>(static_cast<acc>(fold.result()), CombineOp<kKind>{});
    if (threadIdx.x == 0) partials[chunk.global_chunk] = total;
  }
};

template <typename acc, typename Op>
__global__ void __launch_bounds__(kCombineBlock)
    combine_partials_kernel(const acc* __restrict__ partials,  // [n_partials]
                            int64_t n_partials,
                            acc* __restrict__ out) {           // [] the result
  acc total = 0;
  for (int64_t i = threadIdx.x; i < n_partials; i += kCombineBlock) total = Op{}(total, partials[i]);
  total = block_reduce<kCombineBlock>(total, Op{});
  if (threadIdx.x == 0) *out = total;
}

template <typename scalar_t, NormKind kKind>
void grad_norm_pow_launch(at::TensorList tensors, double norm_type, const at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t total_chunks = chunk_offsets(tensors, kClipChunkSize).back();
  at::Tensor partials = at::empty({total_chunks}, out.options());
  multi_tensor_apply<1, kClipBlock>(
      kClipChunkSize, {tensors},
      ChunkPowSumFunctor<scalar_t, kKind, kClipBlock>{partials.mutable_data_ptr<acc>(), static_cast<acc>(norm_type)});
  combine_partials_kernel<acc, CombineOp<kKind>><<<1, kCombineBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      partials.const_data_ptr<acc>(), total_chunks, out.mutable_data_ptr<acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> dense_copies(at::TensorList tensors) {
  std::vector<at::Tensor> dense(tensors.begin(), tensors.end());
  for (auto& t : dense) {
    if (t.numel() > 0 && !t.is_non_overlapping_and_dense()) t = t.contiguous();
  }
  return dense;
}

// Contract: returns a 0-dim tensor on the tensors' device, float32 (float64 for float64 tensors):
// the sum of |x|^norm_type over every element of every tensor, or max |x| for norm_type = inf (0
// when there are no elements). tensors: a non-empty list of floating-point CUDA tensors of one
// device and dtype; tensors that are not non-overlapping and dense are read through a contiguous
// copy. NaN propagates. Mutates nothing; no host sync. Bitwise deterministic for given values and
// layouts.
at::Tensor grad_norm_pow_cuda(at::TensorList tensors, double norm_type) {
  check_clip_tensors(tensors, at::kCUDA);
  const NormKind kind = norm_kind(norm_type);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const std::vector<at::Tensor> dense = dense_copies(tensors);
  const at::ScalarType dtype = tensors[0].scalar_type();
  at::Tensor out = at::empty({}, tensors[0].options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  FUSEDREG_DISPATCH_FLOATING(dtype, "grad_norm_pow (CUDA)", [&] {
    switch (kind) {
      case NormKind::kL2: grad_norm_pow_launch<scalar_t, NormKind::kL2>(dense, norm_type, out); break;
      case NormKind::kL1: grad_norm_pow_launch<scalar_t, NormKind::kL1>(dense, norm_type, out); break;
      case NormKind::kInf: grad_norm_pow_launch<scalar_t, NormKind::kInf>(dense, norm_type, out); break;
      default: grad_norm_pow_launch<scalar_t, NormKind::kP>(dense, norm_type, out); break;
    }
  });
  return out;
}

template <typename scalar_t, int BLOCK>
struct ScaleFunctor {
  using acc = acc_t<scalar_t>;
  const acc* scale;  // [] on the device

  __device__ void operator()(const MultiTensorChunk& chunk, const MultiTensorTable<1>& table) const {
    constexpr int N = vec_size<scalar_t>();
    const acc s = *scale;
    if (s == acc(1)) return;
    scalar_t* x = table.chunk_data<scalar_t>(0, chunk);
    const int64_t n_vec = chunk.size / N;
    int64_t v = threadIdx.x;
    if (is_aligned(x)) {
      for (; v + (kUnroll - 1) * BLOCK < n_vec; v += kUnroll * BLOCK) {
        AlignedVec<scalar_t, N> xv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) xv[u] = load_vec<N>(x + (v + u * BLOCK) * N);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int j = 0; j < N; ++j) xv[u].val[j] = static_cast<scalar_t>(static_cast<acc>(xv[u].val[j]) * s);
          store_vec<N>(x + (v + u * BLOCK) * N, xv[u]);
        }
      }
      for (; v < n_vec; v += BLOCK) {
        AlignedVec<scalar_t, N> xv = load_vec<N>(x + v * N);
#pragma unroll
        for (int j = 0; j < N; ++j) xv.val[j] = static_cast<scalar_t>(static_cast<acc>(xv.val[j]) * s);
        store_vec<N>(x + v * N, xv);
      }
    } else {
      for (int64_t i = threadIdx.x; i < n_vec * N; i += BLOCK) {
        x[i] = static_cast<scalar_t>(static_cast<acc>(x[i]) * s);
      }
    }
    for (int64_t i = n_vec * N + threadIdx.x; i < chunk.size; i += BLOCK) {
      x[i] = static_cast<scalar_t>(static_cast<acc>(x[i]) * s);
    }
  }
};

// Contract: x = x * scale for every tensor, in float32 (float64 for float64 tensors; scale is
// rounded to that type first), rounded once to x's dtype. tensors: a non-empty list of
// floating-point CUDA tensors of one device and dtype; scale: one float32 or float64 element on
// that device, read by the kernel (no host sync). Mutates the tensors in place (dense ones in one
// multi-tensor launch, others through a temporary); returns nothing.
void multi_tensor_scale_cuda(at::TensorList tensors, const at::Tensor& scale) {
  check_clip_tensors(tensors, at::kCUDA);
  check_clip_scale(scale, tensors);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::ScalarType dtype = tensors[0].scalar_type();
  const at::ScalarType acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor scale_acc = scale.reshape({}).to(acc_dtype);
  std::vector<at::Tensor> dense;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    if (t.is_non_overlapping_and_dense()) {
      dense.push_back(t);
    } else {
      t.copy_(t.to(acc_dtype).mul_(scale_acc));
    }
  }
  if (dense.empty()) return;
  FUSEDREG_DISPATCH_FLOATING(dtype, "multi_tensor_scale_ (CUDA)", [&] {
    using acc = acc_t<scalar_t>;
    multi_tensor_apply<1, kClipBlock>(kClipChunkSize, {dense},
                                      ScaleFunctor<scalar_t, kClipBlock>{scale_acc.const_data_ptr<acc>()});
  });
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("grad_norm_pow", &fusedreg::grad_norm_pow_cuda);
  m.impl("multi_tensor_scale_", &fusedreg::multi_tensor_scale_cuda);
}
