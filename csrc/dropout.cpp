// CPU kernels of fused dropout (fusedreg::dropout_fwd, dropout_fwd_, dropout_bwd, dropout_add_fwd).
//
// The mask is regenerated from (seed, memory index) by Philox4x32-10 (csrc/common/philox.h: one
// call per group of 4 elements), so it is bit-identical to the reference, CUDA and Triton backends
// and backward needs only the seed. Groups are split across threads with at::parallel_for; every
// group is independent, so the result does not depend on the thread count.
//
// Threads take whole blocks of 32 groups (128 elements, whole cache lines for every dtype). With
// AVX-512, float32 and bfloat16 run fused loops: per block, keep_words32_avx512
// (csrc/common/philox_simd.h) leaves the 128 keep bits in two general registers and each 16-bit
// slice is the mask of a zero-masking multiply, so no mask is stored and a block's loads and
// stores overlap the next block's rounds (dropout: dropout_fused_avx512, bf16 converted by
// AVX512_BF16 where the CPU has it; dropout_add: dropout_add_avx512; all in dropout_cpu_avx512.h).
// Other dtypes and the AVX2 / scalar levels take chunks of 1024 elements: first the chunk's keep
// bits into a 128-byte buffer (dropout_keep_bits), then one pass applying them (masked multiplies
// for float32 and bfloat16 under AVX2, a scalar loop otherwise). Mask generation, ten Philox rounds
// per 4 elements, bounds dropout on one core: about 0.3 ns per element on a Zen 4 core, against
// about 0.1 for the memory traffic of a cached fp32 multiply.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "common/dispatch.h"
#include "common/philox.h"
#include "common/philox_simd.h"
#include "dropout.h"
#include "dropout_cpu_avx512.h"

namespace fusedreg {
namespace {

using namespace dropout_cpu;  // kBlockElems and the AVX-512 loops

// Threads take at least kBlocksPerTask blocks.
constexpr int64_t kBlocksPerTask = 32;
constexpr int64_t kChunkBlocks = 8;  // chunk of the two-pass loop: 1024 elements; their keep bits: 16 words
constexpr int64_t kChunkWords = kChunkBlocks * kBlockElems / 64;

FUSEDREG_ALWAYS_INLINE bool kept(const uint64_t* bits, int64_t j) { return (bits[j >> 6] >> (j & 63)) & 1u; }

// out[j] = kept(j) ? x[j] * scale : 0 for j < count, element by element (any dtype).
template <typename scalar_t>
void apply_scalar(const scalar_t* x, scalar_t* out, int64_t count, const uint64_t* bits, acc_t<scalar_t> scale) {
  using acc = acc_t<scalar_t>;
  for (int64_t j = 0; j < count; ++j) {
    out[j] = static_cast<scalar_t>(kept(bits, j) ? static_cast<acc>(x[j]) * scale : acc(0));
  }
}

#if FUSEDREG_X86_SIMD

// All-ones lanes where bit i of `byte` is set (8 lanes).
FUSEDREG_TARGET_AVX2 FUSEDREG_ALWAYS_INLINE __m256 lane_mask_avx2(uint32_t byte) {
  const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), select), select));
}

FUSEDREG_TARGET_AVX2 void apply_f32_avx2(const float* x, float* out, int64_t count, const uint64_t* bits,
                                         float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 keep = lane_mask_avx2(static_cast<uint32_t>(bits[j >> 6] >> (j & 63)) & 0xFFu);
    _mm256_storeu_ps(out + j, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), s), keep));
  }
  for (; j < count; ++j) out[j] = kept(bits, j) ? x[j] * scale : 0.0f;
}

FUSEDREG_TARGET_AVX2 void apply_bf16_avx2(const uint16_t* x, uint16_t* out, int64_t count, const uint64_t* bits,
                                          float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 keep = lane_mask_avx2(static_cast<uint32_t>(bits[j >> 6] >> (j & 63)) & 0xFFu);
    cpu_vec::store_bf16x8(out + j, _mm256_and_ps(_mm256_mul_ps(cpu_vec::load_bf16x8(x + j), s), keep));
  }
  for (; j < count; ++j) {
    out[j] = cpu_vec::float_to_bf16_bits(kept(bits, j) ? cpu_vec::bf16_bits_to_float(x[j]) * scale : 0.0f);
  }
}

#endif  // FUSEDREG_X86_SIMD

// Plain dropout of one chunk: the SIMD apply where there is one for this dtype and level.
template <typename scalar_t>
void apply_chunk(CpuIsa isa, const scalar_t* x, scalar_t* out, int64_t count, const uint64_t* bits,
                 acc_t<scalar_t> scale) {
#if FUSEDREG_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (isa == CpuIsa::kAvx2) return apply_f32_avx2(x, out, count, bits, scale);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    auto* xi = reinterpret_cast<const uint16_t*>(x);
    auto* oi = reinterpret_cast<uint16_t*>(out);
    if (isa == CpuIsa::kAvx2) return apply_bf16_avx2(xi, oi, count, bits, scale);
  }
#endif
  (void)isa;
  apply_scalar(x, out, count, bits, scale);
}

// out[i] = residual[i] + (keep(i) ? (x[i] + bias[b(i)]) * scale : 0), with residual and bias
// present only when kAdd. acc is fp32 (fp64 for double); each output is rounded once.
template <typename scalar_t, bool kAdd>
void dropout_cpu_kernel(const DropoutOperands& ops, uint64_t seed, double p) {
  using acc = acc_t<scalar_t>;
  const int64_t n = ops.out.numel();
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  scalar_t* out = ops.out.mutable_data_ptr<scalar_t>();
  const scalar_t* residual = kAdd ? ops.residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bias = kAdd && ops.bias.defined() ? ops.bias.const_data_ptr<scalar_t>() : nullptr;
  const bool drop_all = p >= 1.0;
  const uint32_t threshold = drop_all ? 0u : dropout_threshold(p);
  const acc scale = drop_all ? acc(0) : std::is_same_v<acc, double> ? acc(dropout_scale_f64(p))
                                                                     : acc(dropout_scale(p));
  const PhiloxKeys keys = philox_keys(seed);
  const CpuIsa isa = cpu_isa();
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t block_begin, int64_t block_end) {
    const int64_t begin = block_begin * kBlockElems, end = std::min(n, block_end * kBlockElems);
#if FUSEDREG_X86_SIMD
    if constexpr (kAdd && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>)) {
      if (isa == CpuIsa::kAvx512) {
        using V = std::conditional_t<std::is_same_v<scalar_t, float>, F32x16, BF16x16>;
        using E = typename V::elem;
        return dropout_add_avx512<V>(keys, threshold, drop_all, scale, ops, reinterpret_cast<const E*>(x),
                                     reinterpret_cast<const E*>(residual), reinterpret_cast<const E*>(bias),
                                     reinterpret_cast<E*>(out), begin, end);
      }
    }
    if constexpr (!kAdd && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>)) {
      if (isa == CpuIsa::kAvx512 && !drop_all) {
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (cpu_has_avx512bf16()) {
            return dropout_bf16_avx512bf16(keys, threshold, scale, reinterpret_cast<const uint16_t*>(x),
                                           reinterpret_cast<uint16_t*>(out), begin, end);
          }
        }
        using V = std::conditional_t<std::is_same_v<scalar_t, float>, F32x16, BF16x16>;
        auto* xv = reinterpret_cast<const typename V::elem*>(x);
        auto* outv = reinterpret_cast<typename V::elem*>(out);
        return dropout_fused_avx512<V>(keys, threshold, scale, xv, outv, begin, end);
      }
    }
#endif
    uint64_t bits[kChunkWords];
    for (int64_t first = begin; first < end; first += kChunkBlocks * kBlockElems) {
      const int64_t count = std::min(end - first, kChunkBlocks * kBlockElems);
      if (drop_all) {
        std::fill(bits, bits + kChunkWords, uint64_t{0});
      } else {
        const int64_t groups = (count + kDropoutElemsPerGroup - 1) / kDropoutElemsPerGroup;
        dropout_keep_bits(isa, keys, threshold, static_cast<uint64_t>(first / kDropoutElemsPerGroup), groups, bits);
      }
      if constexpr (!kAdd) {
        apply_chunk(isa, x + first, out + first, count, bits, scale);
      } else {
        auto cursor = BiasCursor<int64_t>::at(first, ops.bias_stride, ops.bias_size);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t i = first + j;
          acc v = static_cast<acc>(x[i]);
          if (bias) v += static_cast<acc>(bias[cursor.b]);
          out[i] = static_cast<scalar_t>(static_cast<acc>(residual[i]) + (kept(bits, j) ? v * scale : acc(0)));
          cursor.next(ops.bias_stride, ops.bias_size);
        }
      }
    }
  });
}

uint64_t read_seed(const at::Tensor& seed) {
  return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
}

template <bool kAdd>
void launch(const DropoutOperands& ops, const at::Tensor& seed, double p) {
  if (ops.out.numel() == 0) return;
  FUSEDREG_DISPATCH_FLOATING(ops.out.scalar_type(), "fusedreg_dropout_cpu", [&] {
    dropout_cpu_kernel<scalar_t, kAdd>(ops, read_seed(seed), p);
  });
}

// Contract: returns a new tensor laid out as at::empty_like(input), same dtype; reads seed (int64,
// one element, CPU); mutates nothing.
at::Tensor dropout_fwd_cpu(const at::Tensor& input, const at::Tensor& seed, double p) {
  check_dropout_args(input, seed, p, "input");
  DropoutOperands ops = prepare_dropout(input);
  launch<false>(ops, seed, p);
  return ops.out;
}

// Contract: mutates input in place with the values dropout_fwd_cpu would return; returns nothing.
void dropout_fwd_inplace_cpu(at::Tensor& input, const at::Tensor& seed, double p) {
  check_dropout_args(input, seed, p, "input");
  if (input.is_non_overlapping_and_dense()) {
    DropoutOperands ops{input, {}, {}, input};
    launch<false>(ops, seed, p);
  } else {
    input.copy_(dropout_fwd_cpu(input, seed, p));
  }
}

// Contract: grad must be in the forward output's layout (the autograd Function ensures it).
at::Tensor dropout_bwd_cpu(const at::Tensor& grad, const at::Tensor& seed, double p) {
  check_dropout_args(grad, seed, p, "grad");
  DropoutOperands ops = prepare_dropout(grad);
  launch<false>(ops, seed, p);
  return ops.out;
}

// Contract: returns residual + dropout(input + bias) laid out as at::empty_like(input); residual
// has input's shape, dtype and device; bias (optional) is [input.size(-1)] of input's dtype.
at::Tensor dropout_add_fwd_cpu(const at::Tensor& input, const at::Tensor& residual,
                               const std::optional<at::Tensor>& bias, const at::Tensor& seed, double p) {
  check_dropout_args(input, seed, p, "input");
  DropoutOperands ops = prepare_dropout_add(input, residual, bias);
  launch<true>(ops, seed, p);
  return ops.out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("dropout_fwd", &fusedreg::dropout_fwd_cpu);
  m.impl("dropout_fwd_", &fusedreg::dropout_fwd_inplace_cpu);
  m.impl("dropout_bwd", &fusedreg::dropout_bwd_cpu);
  m.impl("dropout_add_fwd", &fusedreg::dropout_add_fwd_cpu);
}
