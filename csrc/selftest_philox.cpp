// CPU kernel of fusedreg::_philox4x32, the self-test of csrc/common/philox.h: it runs the header's
// Philox4x32-10 on rows of (counter, key) so tests can compare it word for word with the eager
// reference, Triton's tl.philox and the CUDA build of the same header.
//
// Contract: counter int64 [n, 4], key int64 [n, 2], both on the CPU; the low 32 bits of each element
// are a word. Returns int64 [n, 4] (laid out as empty_like(counter)) holding uint32 values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/philox.h"

namespace fusedreg {
namespace {

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
  TORCH_CHECK(counter.device().is_cpu(), "_philox4x32: counter must be a CPU tensor, got ",
              counter.device());
  TORCH_CHECK(key.device().is_cpu(), "_philox4x32: key must be a CPU tensor, got ", key.device());
}

at::Tensor philox4x32_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const at::Tensor ctr = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(counter);
  at::Tensor result = out.is_contiguous() ? out : at::empty(counter.sizes(), counter.options());
  const int64_t* ctr_data = ctr.const_data_ptr<int64_t>();
  const int64_t* key_data = k.const_data_ptr<int64_t>();
  int64_t* result_data = result.mutable_data_ptr<int64_t>();
  at::parallel_for(0, counter.size(0), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* c = ctr_data + 4 * row;
      const int64_t* kk = key_data + 2 * row;
      const Philox4x32Words words = philox4x32_10(
          static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]), static_cast<uint32_t>(c[2]),
          static_cast<uint32_t>(c[3]), static_cast<uint32_t>(kk[0]), static_cast<uint32_t>(kk[1]));
      for (int w = 0; w < 4; ++w) result_data[4 * row + w] = words.w[w];
    }
  });
  if (!result.is_same(out)) out.copy_(result);
  return out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("_philox4x32", &fusedreg::philox4x32_cpu);
}
