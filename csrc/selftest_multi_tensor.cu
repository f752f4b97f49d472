// fusedreg::_multi_tensor_sumsq on CUDA: a self-test of csrc/common (multi-tensor apply, 16-byte
// vectors, block reductions, dispatch, checks) that computes, for every tensor of a list, the
// float32 sum of squares of its elements.
//
// Two stages, both deterministic (no atomics, fixed combination order):
//   1. multi_tensor_apply: one block per chunk sums the chunk's squares in fp32 and writes one
//      partial to partials[global_chunk];
//   2. one block per tensor sums that tensor's partials, which sit contiguously in chunk order.
// Threads take the same elements in the same order on the vector and the scalar path, so the
// result does not depend on a tensor's alignment either. The chunk is small (2048 elements) so
// that a test-sized list (~50M elements) overflows one chunk table and exercises a tensor split
// across launches; real ops use larger chunks (65536).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/multi_tensor.cuh"
#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace fusedreg {
namespace {

constexpr int64_t kSumsqChunkSize = 2048;
constexpr int kSumsqBlock = 256;
constexpr int64_t kMaxTensorsPerFinalLaunch = 2048;

template <typename scalar_t, int BLOCK>
struct ChunkSumsqFunctor {
  float* partials;  // [total chunks]

  __device__ void operator()(const MultiTensorChunk& chunk, const MultiTensorTable<1>& table) const {
    using acc = acc_t<scalar_t>;
    constexpr int N = vec_size<scalar_t>();
    const scalar_t* x = table.chunk_data<const scalar_t>(0, chunk);
    const int64_t n_vec = chunk.size / N;
    acc sum = 0;
    // fma in both paths: left to the compiler, contraction could differ between them.
    if (is_aligned(x)) {
      for (int64_t v = threadIdx.x; v < n_vec; v += BLOCK) {
        const AlignedVec<scalar_t, N> xv = load_vec<N>(x + v * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const acc a = static_cast<acc>(xv.val[j]);
          sum = fma(a, a, sum);
        }
      }
    } else {
      for (int64_t v = threadIdx.x; v < n_vec; v += BLOCK) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const acc a = static_cast<acc>(x[v * N + j]);
          sum = fma(a, a, sum);
        }
      }
    }
    for (int64_t i = n_vec * N + threadIdx.x; i < chunk.size; i += BLOCK) {
      const acc a = static_cast<acc>(x[i]);
      sum = fma(a, a, sum);
    }
    sum = block_reduce_sum<BLOCK>(sum);
    if (threadIdx.x == 0) partials[chunk.global_chunk] = static_cast<float>(sum);
  }
};

// Tensor first_tensor + b owns partials [offsets[b], offsets[b + 1]); by value, like the chunk table.
struct TensorPartialRanges {
  int64_t offsets[kMaxTensorsPerFinalLaunch + 1];
  int64_t first_tensor;
};

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    sum_partials_per_tensor_kernel(const __grid_constant__ TensorPartialRanges ranges,
                                   const float* __restrict__ partials,  // [total chunks]
                                   float* __restrict__ out) {           // [tensors]
  const int64_t begin = ranges.offsets[blockIdx.x];
  const int64_t end = ranges.offsets[blockIdx.x + 1];
  float sum = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += BLOCK) sum += partials[i];
  sum = block_reduce_sum<BLOCK>(sum);
  if (threadIdx.x == 0) out[ranges.first_tensor + blockIdx.x] = sum;
}

// Returns float32 [len(tensors)] on the tensors' device: out[i] = sum of x * x over tensors[i],
// accumulated in fp32 (inputs float32, float16 or bfloat16; one device and dtype). Dense tensors
// (contiguous, channels_last, any permutation) are read in place in memory order; tensors that
// are not non-overlapping and dense are rejected rather than silently copied. Mutates nothing.
// Bitwise deterministic for given values, shapes and strides.
at::Tensor multi_tensor_sumsq_cuda(at::TensorList tensors) {
  check_nonempty(tensors, "tensors");
  check_device_type(tensors[0], at::kCUDA, "tensors[0]");
  check_same_device(tensors, "tensors");
  check_same_dtype(tensors, "tensors");
  check_floating(tensors[0], "tensors");
  check_all_dense(tensors, "tensors");

  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto n = static_cast<int64_t>(tensors.size());
  const std::vector<int64_t> offsets = chunk_offsets(tensors, kSumsqChunkSize);
  at::Tensor out = at::empty({n}, tensors[0].options().dtype(at::kFloat));
  at::Tensor partials = at::empty({offsets.back()}, out.options());

  FUSEDREG_DISPATCH_FLOATING_NO_DOUBLE(tensors[0].scalar_type(), "_multi_tensor_sumsq (CUDA)", [&] {
    multi_tensor_apply<1, kSumsqBlock>(kSumsqChunkSize, {tensors},
                                       ChunkSumsqFunctor<scalar_t, kSumsqBlock>{partials.data_ptr<float>()});
  });

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t first = 0; first < n; first += kMaxTensorsPerFinalLaunch) {
    const int64_t count = std::min(kMaxTensorsPerFinalLaunch, n - first);
    TensorPartialRanges ranges;
    ranges.first_tensor = first;
    std::copy(offsets.begin() + first, offsets.begin() + first + count + 1, ranges.offsets);
    sum_partials_per_tensor_kernel<kSumsqBlock><<<count, kSumsqBlock, 0, stream>>>(
        ranges, partials.data_ptr<float>(), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("_multi_tensor_sumsq", &fusedreg::multi_tensor_sumsq_cuda);
}
