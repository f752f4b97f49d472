// fusedreg::_multi_tensor_sumsq on CPU: a self-test of the host half of csrc/common (the chunk
// tables of multi_tensor.cuh, dispatch, checks) that computes, for every tensor of a list, the
// float32 sum of squares of its elements.
//
// It walks exactly the chunks and launches the CUDA version does: each table is one
// at::parallel_for over its blocks, a block sums its chunk into partials[global_chunk], and each
// tensor's partials are then summed in chunk order. The order of every addition is fixed by the
// chunking alone, never by the thread count, so results are bitwise reproducible. Within a chunk
// kLanes independent accumulators (lane = element index mod kLanes, combined in a fixed tree) give
// the compiler independent additions to overlap without reassociating anything.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/multi_tensor.cuh"

namespace fusedreg {
namespace {

// Same chunking as the CUDA kernel (see selftest_multi_tensor.cu for why it is small).
constexpr int64_t kSumsqChunkSize = 2048;
constexpr int kLanes = 8;

template <typename scalar_t>
acc_t<scalar_t> chunk_sumsq(const scalar_t* x, int64_t size) {
  using acc = acc_t<scalar_t>;
  acc lanes[kLanes] = {};
  const int64_t full = size / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc a = static_cast<acc>(x[i + l]);
      lanes[l] += a * a;
    }
  }
  for (int64_t i = full; i < size; ++i) {
    const acc a = static_cast<acc>(x[i]);
    lanes[i - full] += a * a;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Returns float32 [len(tensors)]: out[i] = sum of x * x over tensors[i], accumulated in fp32
// (in fp64 for float64 inputs, rounded to fp32 at the end). Inputs: float32, float64, float16 or
// bfloat16 CPU tensors of one dtype. Dense tensors (contiguous, channels_last, any permutation)
// are read in place in memory order; tensors that are not non-overlapping and dense are rejected
// rather than silently copied. Mutates nothing. Bitwise deterministic for given values, shapes
// and strides, whatever the number of threads.
at::Tensor multi_tensor_sumsq_cpu(at::TensorList tensors) {
  check_nonempty(tensors, "tensors");
  check_device_type(tensors[0], at::kCPU, "tensors[0]");
  check_same_device(tensors, "tensors");
  check_same_dtype(tensors, "tensors");
  check_floating(tensors[0], "tensors");
  check_all_dense(tensors, "tensors");

  const auto n = static_cast<int64_t>(tensors.size());
  const std::vector<int64_t> offsets = chunk_offsets(tensors, kSumsqChunkSize);
  at::Tensor out = at::empty({n}, tensors[0].options().dtype(at::kFloat));
  float* out_data = out.data_ptr<float>();

  FUSEDREG_DISPATCH_FLOATING(tensors[0].scalar_type(), "_multi_tensor_sumsq (CPU)", [&] {
    using acc = acc_t<scalar_t>;
    std::vector<acc> partials(offsets.back());
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / kSumsqChunkSize);
    for_each_table<1>({tensors}, kSumsqChunkSize, [&](const MultiTensorTable<1>& table) {
      at::parallel_for(0, table.num_blocks, grain, [&](int64_t first, int64_t last) {
        for (int64_t block = first; block < last; ++block) {
          const MultiTensorChunk chunk = table.chunk_of(static_cast<int>(block));
          partials[chunk.global_chunk] = chunk_sumsq(table.chunk_data<const scalar_t>(0, chunk), chunk.size);
        }
      });
    });
    for (int64_t i = 0; i < n; ++i) {
      acc sum = 0;
      for (int64_t j = offsets[i]; j < offsets[i + 1]; ++j) sum += partials[j];
      out_data[i] = static_cast<float>(sum);
    }
  });
  return out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("_multi_tensor_sumsq", &fusedreg::multi_tensor_sumsq_cpu);
}
