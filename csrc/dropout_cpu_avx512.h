// AVX-512 loops of the CPU dropout kernels (csrc/dropout.cpp, the only file that includes this one).
//
// Algorithm: per block of 32 Philox groups (128 elements), keep_words32_avx512
// (csrc/common/philox_simd.h) leaves the block's 128 keep bits in two general registers; each
// 16-bit slice of them is the mask of one zero-masking multiply (dropout) or select (dropout_add),
// so no mask is stored and a block's loads and stores overlap the next block's Philox rounds.
// bfloat16 is widened on load and rounded back on store exactly as c10 does, or by AVX512_BF16's
// vcvtne2ps2bf16 where the CPU has it and the results are normal numbers.
//
// Trade-off: one loop per (op, dtype) pair instead of one generic apply pass over a bits buffer;
// the Philox rounds, not memory, bound these loops on one core, so the saved buffer round trip and
// the overlap are what make them faster.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "common/philox.h"
#include "common/philox_simd.h"
#include "dropout.h"

namespace fusedreg {
namespace dropout_cpu {

// Threads take whole blocks of 32 groups (128 elements: 512 bytes of float32, whole cache lines
// for every dtype).
constexpr int64_t kBlockGroups = 32;
constexpr int64_t kBlockElems = kBlockGroups * kDropoutElemsPerGroup;

#if FUSEDREG_X86_SIMD

// One register of 16 elements for the fused AVX-512 loop: float32 as is, bfloat16 widened on load and
// rounded back on store exactly as c10 does (csrc/common/cpu_vec.h).
struct F32x16 {
  using elem = float;
  static FUSEDREG_ALWAYS_INLINE float to_float(float v) { return v; }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE __m512 maskz_load(__mmask16 k, const float* p) {
    return _mm512_maskz_loadu_ps(k, p);
  }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE void mask_store(float* p, __mmask16 k, __m512 v) {
    _mm512_mask_storeu_ps(p, k, v);
  }
};

struct BF16x16 {
  using elem = uint16_t;
  static FUSEDREG_ALWAYS_INLINE float to_float(uint16_t v) { return cpu_vec::bf16_bits_to_float(v); }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE __m512 load(const uint16_t* p) {
    return cpu_vec::load_bf16x16(p);
  }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE __m512 maskz_load(__mmask16 k, const uint16_t* p) {
    return cpu_vec::maskz_load_bf16x16(k, p);
  }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE void store(uint16_t* p, __m512 v) {
    cpu_vec::store_bf16x16(p, v);
  }
  FUSEDREG_TARGET_AVX512 static FUSEDREG_ALWAYS_INLINE void mask_store(uint16_t* p, __mmask16 k, __m512 v) {
    cpu_vec::mask_store_bf16x16(p, k, v);
  }
};

// Elements [begin, end) (begin a multiple of kBlockElems): per block of 32 groups, the keep bits
// stay in two general registers (keep_words32_avx512) and each 16-bit slice of them is the mask of
// one zero-masking multiply, so a dropped element is 0 whatever its value and a kept one is x *
// scale rounded once. Generating and applying in one loop lets the loads and stores of a block
// overlap the next block's Philox rounds.
template <typename V>
FUSEDREG_TARGET_AVX512 void dropout_fused_avx512(const PhiloxKeys& keys, uint32_t threshold, float scale,
                                                 const typename V::elem* x, typename V::elem* out, int64_t begin,
                                                 int64_t end) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t e = begin; e < end; e += kBlockElems) {
    const philox_simd::KeepWords32 k =
        philox_simd::keep_words32_avx512(keys, static_cast<uint64_t>(e / kDropoutElemsPerGroup), threshold);
    if (end - e >= kBlockElems) {
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) {
        const __mmask16 keep = static_cast<__mmask16>(k.w[q / 4] >> (16 * (q % 4)));
        V::store(out + e + 16 * q, _mm512_maskz_mul_ps(keep, V::load(x + e + 16 * q), s));
      }
    } else {
      for (int q = 0; 16 * q < end - e; ++q) {
        const int64_t rest = end - e - 16 * q;
        const __mmask16 live = rest >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << rest) - 1u);
        const __mmask16 keep = static_cast<__mmask16>(k.w[q / 4] >> (16 * (q % 4)));
        V::mask_store(out + e + 16 * q, live, _mm512_maskz_mul_ps(keep, V::maskz_load(live, x + e + 16 * q), s));
      }
    }
  }
}

// The bias of the next `count` (<= 16) elements as floats, cursor moved past them: one load when
// the bias is contiguous in memory order and does not wrap inside the 16, else element by element.
template <typename V>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 next_bias16(const typename V::elem* bias,
                                                                BiasCursor<int64_t>& cursor, int64_t stride,
                                                                int64_t size, int64_t count) {
  if (stride == 1 && count == 16 && cursor.b + 16 <= size) {
    const __m512 v = V::load(bias + cursor.b);
    cursor.b = cursor.b + 16 == size ? 0 : cursor.b + 16;
    return v;
  }
  alignas(64) float values[16] = {};
  for (int64_t j = 0; j < count; ++j) {
    values[j] = V::to_float(bias[cursor.b]);
    cursor.next(stride, size);
  }
  return _mm512_load_ps(values);
}

// dropout_add for elements [begin, end) (begin a multiple of kBlockElems): out = residual +
// (keep ? (x + bias) * scale : 0) with the same fp32 additions and multiply, each rounded once,
// as the scalar loop (no fused multiply-add), and the keep bits straight from registers.
template <typename V>
FUSEDREG_TARGET_AVX512 void dropout_add_avx512(const PhiloxKeys& keys, uint32_t threshold, bool drop_all,
                                               float scale, const DropoutOperands& ops,
                                               const typename V::elem* x, const typename V::elem* residual,
                                               const typename V::elem* bias, typename V::elem* out,
                                               int64_t begin, int64_t end) {
  const __m512 s = _mm512_set1_ps(scale);
  auto cursor = BiasCursor<int64_t>::at(begin, ops.bias_stride, ops.bias_size);
  for (int64_t e = begin; e < end; e += kBlockElems) {
    const philox_simd::KeepWords32 k =
        drop_all ? philox_simd::KeepWords32{{0, 0}}
                 : philox_simd::keep_words32_avx512(keys, static_cast<uint64_t>(e / kDropoutElemsPerGroup),
                                                    threshold);
    for (int q = 0; q < 8 && e + 16 * q < end; ++q) {
      const int64_t j = e + 16 * q, count = std::min<int64_t>(16, end - j);
      const __mmask16 live = count == 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << count) - 1u);
      const __mmask16 keep = static_cast<__mmask16>(k.w[q / 4] >> (16 * (q % 4)));
      __m512 v = V::maskz_load(live, x + j);
      if (bias) v = _mm512_add_ps(v, next_bias16<V>(bias, cursor, ops.bias_stride, ops.bias_size, count));
      const __m512 o = _mm512_add_ps(V::maskz_load(live, residual + j), _mm512_maskz_mul_ps(keep, v, s));
      V::mask_store(out + j, live, o);
    }
  }
}

// c10's bfloat16 rounding (as cpu_vec::to_bf16x16), each result in the low half of its 32-bit lane.
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512i bf16_exact_low_halves(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// The AVX512_BF16 variant of dropout_fused_avx512<BF16x16> for whole blocks. vcvtne2ps2bf16
// rounds to nearest even like c10 for normal numbers, infinities and zeros, but flushes
// denormals to zero and keeps NaN payloads, so a 32-element slice whose products hold a NaN or a
// denormal is rounded by c10's formula instead (vfpclassps finds them; random data almost never
// takes that path). Loads widen with unpack{lo,hi}_epi16, whose lane order packus_epi32 undoes on
// the exact path and one vpermw on the fast path; the keep masks follow by pext. Per 32 elements
// this is about 10 vector instructions instead of about 20, and the vector pipes are what the
// Philox rounds are short of.
FUSEDREG_TARGET_AVX512BF16 inline void dropout_bf16_avx512bf16(const PhiloxKeys& keys, uint32_t threshold, float scale,
                                                        const uint16_t* x, uint16_t* out, int64_t begin,
                                                        int64_t end) {
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i zero = _mm512_setzero_si512();
  // cvtne2ps2bf16(hi, lo) holds lo's 16 results, then hi's; lane i of each came from elements
  // 8 * (i / 4) + i % 4 (lo) and that + 4 (hi).
  alignas(64) static constexpr uint16_t kToMemoryOrder[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,
                                                               7,  20, 21, 22, 23, 8,  9,  10, 11, 24, 25,
                                                               26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i to_memory_order = _mm512_load_si512(kToMemoryOrder);
  int64_t e = begin;
  for (; end - e >= kBlockElems; e += kBlockElems) {
    const philox_simd::KeepWords32 k =
        philox_simd::keep_words32_avx512(keys, static_cast<uint64_t>(e / kDropoutElemsPerGroup), threshold);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const uint32_t keep = static_cast<uint32_t>(k.w[q / 2] >> (32 * (q % 2)));
      const __m512i v = _mm512_loadu_si512(x + e + 32 * q);
      const __m512 lo = _mm512_maskz_mul_ps(static_cast<__mmask16>(_pext_u32(keep, 0x0F0F0F0Fu)),
                                            _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v)), s);
      const __m512 hi = _mm512_maskz_mul_ps(static_cast<__mmask16>(_pext_u32(keep, 0xF0F0F0F0u)),
                                            _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v)), s);
      constexpr int kNanOrDenormal = 0x01 | 0x80 | 0x20;  // QNaN, SNaN, denormal
      __m512i r;
      const __mmask16 special = _mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal);
      if (__builtin_expect(special != 0, 0)) {
        r = _mm512_packus_epi32(bf16_exact_low_halves(lo), bf16_exact_low_halves(hi));
      } else {
        r = _mm512_permutexvar_epi16(to_memory_order, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
      _mm512_storeu_si512(out + e + 32 * q, r);
    }
  }
  if (e < end) dropout_fused_avx512<BF16x16>(keys, threshold, scale, x, out, e, end);
}

#endif  // FUSEDREG_X86_SIMD

}  // namespace dropout_cpu
}  // namespace fusedreg
