// CUDA kernel of fusedreg::_philox4x32, the self-test of csrc/common/philox.h on the device: the
// same header as the CPU kernel, compiled by nvcc (device mulhi is __umulhi), so comparing the two
// catches any host/device divergence of the dropout RNG.
//
// Contract: counter int64 [n, 4], key int64 [n, 2], both on one CUDA device; the low 32 bits of
// each element are a word. Returns int64 [n, 4] (laid out as empty_like(counter)) holding uint32
// values. One thread per row: this is a test op, not a hot path.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/philox.h"

namespace fusedreg {
namespace {

constexpr int kThreads = 256;

__global__ void philox4x32_kernel(const int64_t* __restrict__ counter,  // [n, 4] contiguous
                                  const int64_t* __restrict__ key,      // [n, 2] contiguous
                                  int64_t* __restrict__ out,            // [n, 4] contiguous
                                  int64_t n) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  const int64_t* c = counter + 4 * row;
  const int64_t* k = key + 2 * row;
  const Philox4x32Words words = philox4x32_10(
      static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]), static_cast<uint32_t>(c[2]),
      static_cast<uint32_t>(c[3]), static_cast<uint32_t>(k[0]), static_cast<uint32_t>(k[1]));
#pragma unroll
  for (int w = 0; w < 4; ++w) out[4 * row + w] = words.w[w];
}

void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4,
              "_philox4x32: counter must have shape [n, 4], got ", counter.sizes());
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2, "_philox4x32: key must have shape [n, 2], got ",
              key.sizes());
  TORCH_CHECK(key.size(0) == counter.size(0), "_philox4x32: key must have as many rows as counter (",
              counter.size(0), "), got ", key.size(0));
  TORCH_CHECK(counter.scalar_type() == at::kLong, "_philox4x32: counter must be int64, got ",
              counter.scalar_type());
  TORCH_CHECK(key.scalar_type() == at::kLong, "_philox4x32: key must be int64, got ", key.scalar_type());
  TORCH_CHECK(counter.is_cuda(), "_philox4x32: counter must be a CUDA tensor, got ", counter.device());
  TORCH_CHECK(key.device() == counter.device(), "_philox4x32: key must be on counter's device (",
              counter.device(), "), got ", key.device());
}

at::Tensor philox4x32_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const c10::cuda::CUDAGuard device_guard(counter.device());
  const at::Tensor ctr = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(counter);
  at::Tensor result = out.is_contiguous() ? out : at::empty(counter.sizes(), counter.options());
  const int64_t n = counter.size(0);
  if (n > 0) {
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    philox4x32_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0,
                        at::cuda::getCurrentCUDAStream()>>>(
        ctr.const_data_ptr<int64_t>(), k.const_data_ptr<int64_t>(), result.mutable_data_ptr<int64_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!result.is_same(out)) out.copy_(result);
  return out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("_philox4x32", &fusedreg::philox4x32_cuda);
}
