// CPU kernels of global-norm gradient clipping: fusedreg::grad_norm_pow and
// fusedreg::multi_tensor_scale_.
//
// grad_norm_pow walks exactly the chunks multi_tensor.cuh gives the CUDA kernel (for_each_table):
// each table is one at::parallel_for over its chunks, a chunk reduces into partials[global_chunk],
// and the partials are then combined serially in chunk order. Every addition happens in an order
// fixed by the chunking alone, never by the thread count, so the result is bitwise reproducible.
// Within a chunk kLanes = 64 independent accumulators (lane = element index mod kLanes, combined in
// a fixed tree) let the additions run as vectors and overlap without reassociating anything. For
// float32 and bfloat16 with the L2, L1 and inf norms the lanes run in AVX2 / AVX-512 registers at
// the level cpu_isa() picks (clip_cpu_simd.h), adding in the same order: the same bits at every
// level.
//
// |x|^p is accumulated in float32 (float64 for float64 data) without rescaling: like PyTorch's own
// norm kernels, a p-th power sum beyond the accumulator's range (e.g. |x| = 1e4 with p = 10)
// overflows to inf rather than being rescaled by the maximum, which would need a second pass.
//
// multi_tensor_scale_ multiplies in float32 (float64) and rounds once (float32 and bfloat16 in
// AVX2 / AVX-512 registers where available, the same rounding). A scale of exactly 1 is
// the identity on every value, so it returns without touching memory: clipping that does not clip
// costs only the norm pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "clip.h"
#include "clip_cpu_simd.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/dispatch.h"
#include "common/multi_tensor.cuh"

namespace fusedreg {
namespace {

constexpr int64_t kClipChunkSize = 32768;
constexpr int kLanes = clip_cpu::kClipLanes;
// Fewest elements per at::parallel_for task: a list of small tensors runs inline on the calling
// thread instead of waking the pool for microseconds of work.
constexpr int64_t kMinTaskElements = 4 * kClipChunkSize;

template <typename T>
inline T nan_propagating_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// float32 and bfloat16 elements as the SIMD loops read them (bfloat16 as its bits).
template <typename scalar_t>
constexpr bool kSimdClip = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>;
template <typename scalar_t>
using simd_elem_t = std::conditional_t<std::is_same_v<scalar_t, float>, float, uint16_t>;

// Whole blocks of kLanes elements through the SIMD loops at `isa`; returns how many elements
// were done (0 where there is no SIMD loop for this dtype, norm or level).
template <typename scalar_t, NormKind kKind>
int64_t simd_pow_sum_blocks(const scalar_t* x, int64_t size, acc_t<scalar_t>* lanes, CpuIsa isa) {
#if FUSEDREG_X86_SIMD
  if constexpr (kSimdClip<scalar_t> && kKind != NormKind::kP) {
    const auto* e = reinterpret_cast<const simd_elem_t<scalar_t>*>(x);
    const int64_t blocks = size / kLanes;
    if (isa == CpuIsa::kAvx512) {
      clip_cpu::pow_sum_blocks_avx512<kKind>(e, blocks, lanes);
      return blocks * kLanes;
    }
    if (isa == CpuIsa::kAvx2) {
      clip_cpu::pow_sum_blocks_avx2<kKind>(e, blocks, lanes);
      return blocks * kLanes;
    }
  }
#endif
  return 0;
}

// sum of |x|^p over x[0, size) (max |x| for kInf), in acc (float / double).
template <typename scalar_t, NormKind kKind>
acc_t<scalar_t> chunk_pow_sum(const scalar_t* x, int64_t size, acc_t<scalar_t> p, CpuIsa isa) {
  using acc = acc_t<scalar_t>;
  acc lanes[kLanes] = {};
  auto add = [&](int lane, acc a) {
    if constexpr (kKind == NormKind::kL2) {
      lanes[lane] += a * a;
    } else if constexpr (kKind == NormKind::kL1) {
      lanes[lane] += std::abs(a);
    } else if constexpr (kKind == NormKind::kInf) {
      lanes[lane] = nan_propagating_max(lanes[lane], std::abs(a));
    } else {
      lanes[lane] += abs_pow(a, p);  // clip.h: exp2(p * log2|x|) in float, as the CUDA kernel
    }
  };
  const int64_t full = size / kLanes * kLanes;
  for (int64_t i = simd_pow_sum_blocks<scalar_t, kKind>(x, size, lanes, isa); i < full; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) add(l, static_cast<acc>(x[i + l]));
  }
  for (int64_t i = full; i < size; ++i) add(static_cast<int>(i - full), static_cast<acc>(x[i]));
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lanes[l] = kKind == NormKind::kInf ? nan_propagating_max(lanes[l], lanes[l + width])
                                         : lanes[l] + lanes[l + width];
    }
  }
  return lanes[0];
}

// x[i] = x[i] * factor, rounded once. By value: a factor read through a reference could alias x,
// which would keep the compiler from vectorizing the loop.
// bfloat16 goes through its bits: the same round-to-nearest-even as c10::BFloat16, without its
// NaN branch, so the loop vectorizes (the c10 conversion made it several times slower).
template <typename scalar_t>
void scale_chunk(scalar_t* x, int64_t size, acc_t<scalar_t> factor, CpuIsa isa) {
#if FUSEDREG_X86_SIMD
  if constexpr (kSimdClip<scalar_t>) {
    auto* e = reinterpret_cast<simd_elem_t<scalar_t>*>(x);
    if (isa == CpuIsa::kAvx512) return clip_cpu::scale_avx512(e, size, factor);
    if (isa == CpuIsa::kAvx2) return clip_cpu::scale_avx2(e, size, factor);
  }
#endif
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(x);
    for (int64_t i = 0; i < size; ++i) {
      const uint32_t in = static_cast<uint32_t>(bits[i]) << 16;
      float value;
      std::memcpy(&value, &in, sizeof(value));
      value *= factor;
      uint32_t out;
      std::memcpy(&out, &value, sizeof(out));
      const uint32_t rounded = (out + 0x7FFFu + ((out >> 16) & 1u)) >> 16;
      bits[i] = value != value ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    }
  } else {
    for (int64_t i = 0; i < size; ++i) x[i] = static_cast<scalar_t>(static_cast<acc_t<scalar_t>>(x[i]) * factor);
  }
}

// The tensors a multi-tensor kernel may walk linearly: dense ones as they are, others as dense
// copies (read-only use).
std::vector<at::Tensor> dense_copies(at::TensorList tensors) {
  std::vector<at::Tensor> dense(tensors.begin(), tensors.end());
  for (auto& t : dense) {
    if (t.numel() > 0 && !t.is_non_overlapping_and_dense()) t = t.contiguous();
  }
  return dense;
}

// Chunks per parallel task for one table, from its element count (partials stay per chunk, so the
// grouping never changes a result).
int64_t grain_blocks(const MultiTensorTable<1>& table) {
  int64_t elements = 0;
  for (int slot = 0; slot < table.num_tensors; ++slot) {
    const int64_t end = slot + 1 < table.num_tensors ? table.first_block[slot + 1] : table.num_blocks;
    const int64_t blocks = end - table.first_block[slot];
    elements += std::min(table.numels[slot] - table.first_chunk[slot] * table.chunk_size,
                         blocks * table.chunk_size);
  }
  return std::max<int64_t>(1, (kMinTaskElements * table.num_blocks + elements - 1) / std::max<int64_t>(elements, 1));
}

template <typename scalar_t, NormKind kKind>
acc_t<scalar_t> pow_sum_cpu(at::TensorList tensors, double norm_type) {
  using acc = acc_t<scalar_t>;
  const int64_t total_chunks = chunk_offsets(tensors, kClipChunkSize).back();
  std::vector<acc> partials(total_chunks);
  const CpuIsa isa = cpu_isa();
  for_each_table<1>({tensors}, kClipChunkSize, [&](const MultiTensorTable<1>& table) {
    at::parallel_for(0, table.num_blocks, grain_blocks(table), [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        const MultiTensorChunk chunk = table.chunk_of(static_cast<int>(block));
        partials[chunk.global_chunk] = chunk_pow_sum<scalar_t, kKind>(
            table.chunk_data<const scalar_t>(0, chunk), chunk.size, static_cast<acc>(norm_type), isa);
      }
    });
  });
  acc total = 0;
  for (const acc partial : partials) {
    total = kKind == NormKind::kInf ? nan_propagating_max(total, partial) : total + partial;
  }
  return total;
}

// Contract: returns a 0-dim tensor on the CPU, float32 (float64 for float64 tensors): the sum of
// |x|^norm_type over every element of every tensor, or max |x| for norm_type = inf (0 when there
// are no elements). tensors: a non-empty list of floating-point CPU tensors of one dtype; tensors
// that are not non-overlapping and dense are read through a contiguous copy. NaN propagates.
// Mutates nothing. Bitwise deterministic for given values and layouts, whatever the thread count.
at::Tensor grad_norm_pow_cpu(at::TensorList tensors, double norm_type) {
  check_clip_tensors(tensors, at::kCPU);
  const NormKind kind = norm_kind(norm_type);
  const std::vector<at::Tensor> dense = dense_copies(tensors);
  const at::ScalarType dtype = tensors[0].scalar_type();
  at::Tensor out = at::empty({}, tensors[0].options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  FUSEDREG_DISPATCH_FLOATING(dtype, "grad_norm_pow (CPU)", [&] {
    using acc = acc_t<scalar_t>;
    acc total;
    switch (kind) {
      case NormKind::kL2: total = pow_sum_cpu<scalar_t, NormKind::kL2>(dense, norm_type); break;
      case NormKind::kL1: total = pow_sum_cpu<scalar_t, NormKind::kL1>(dense, norm_type); break;
      case NormKind::kInf: total = pow_sum_cpu<scalar_t, NormKind::kInf>(dense, norm_type); break;
      default: total = pow_sum_cpu<scalar_t, NormKind::kP>(dense, norm_type); break;
    }
    *out.mutable_data_ptr<acc>() = total;
  });
  return out;
}

// Contract: x = x * scale for every tensor, in float32 (float64 for float64 tensors; scale is
// rounded to that type first), rounded once to x's dtype. tensors: a non-empty list of
// floating-point CPU tensors of one dtype; scale: one float32 or float64 element on the CPU.
// Mutates the tensors in place (dense ones directly, others through a temporary); returns nothing.
// scale == 1 returns at once: x * 1 == x for every x, NaN and inf included.
void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  check_clip_tensors(tensors, at::kCPU);
  check_clip_scale(scale, tensors);
  const at::ScalarType dtype = tensors[0].scalar_type();
  FUSEDREG_DISPATCH_FLOATING(dtype, "multi_tensor_scale_ (CPU)", [&] {
    using acc = acc_t<scalar_t>;
    const acc s = scale.scalar_type() == at::kDouble ? static_cast<acc>(*scale.const_data_ptr<double>())
                                                      : static_cast<acc>(*scale.const_data_ptr<float>());
    if (s == acc(1)) return;
    std::vector<at::Tensor> dense;
    for (const at::Tensor& t : tensors) {
      if (t.numel() == 0) continue;
      if (t.is_non_overlapping_and_dense()) {
        dense.push_back(t);
      } else {
        t.copy_(t.to(c10::CppTypeToScalarType<acc>::value).mul_(s));
      }
    }
    if (dense.empty()) return;
    const CpuIsa isa = cpu_isa();
    for_each_table<1>({dense}, kClipChunkSize, [&](const MultiTensorTable<1>& table) {
      at::parallel_for(0, table.num_blocks, grain_blocks(table), [&](int64_t first, int64_t last) {
        for (int64_t block = first; block < last; ++block) {
          const MultiTensorChunk chunk = table.chunk_of(static_cast<int>(block));
          scale_chunk(table.chunk_data<scalar_t>(0, chunk), chunk.size, s, isa);
        }
      });
    });
  });
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("grad_norm_pow", &fusedreg::grad_norm_pow_cpu);
  m.impl("multi_tensor_scale_", &fusedreg::multi_tensor_scale_cpu);
}
