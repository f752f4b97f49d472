// AVX2 / AVX-512 inner loops of the CPU clip kernels (clip.cpp) for float32 and bfloat16: the
// power sum of the L2, L1 and inf norms over whole blocks of kClipLanes elements, and the in-place
// scale. clip.cpp calls them at the level cpu_isa() gives (common/cpu_isa.h) and keeps the
// portable loops for the default level, float16, float64 and the general p-norm.
//
// Same bits at every level. The power sum keeps kClipLanes independent float accumulators, lane =
// element index mod kClipLanes; here they live in 4 zmm (AVX-512) or 8 ymm (AVX2) registers,
// each lane added to in exactly the element order of the portable loop, with a separate multiply
// and add (no fused multiply-add), so the lanes hold the bits the portable loop computes. Four
// (eight) registers keep four (eight) additions in flight, hiding the add latency that a single
// accumulator would expose. The tail (< kClipLanes elements) and the fixed reduction tree stay in
// clip.cpp, shared by every level. bfloat16 is widened by a 16-bit shift and narrowed with the
// round-to-nearest-even of common/cpu_vec.h (NaN -> 0x7FC0), the rounding of the portable loop.
#pragma once

#include <cstdint>

#include "clip.h"
#include "common/cpu_isa.h"
#include "common/cpu_vec.h"

namespace fusedreg {
namespace clip_cpu {

constexpr int kClipLanes = 64;

#if FUSEDREG_X86_SIMD

// ---------------------------------------------------------------------------------- AVX-512

FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 load16(const uint16_t* p) { return cpu_vec::load_bf16x16(p); }

// One lane step of the portable loop, 16 lanes at once: acc += a * a, acc += |a|, or
// acc = (|a| > acc || |a| is NaN) ? |a| : acc.
template <NormKind kKind>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 step16(__m512 acc, __m512 a) {
  if constexpr (kKind == NormKind::kL2) {
    return _mm512_add_ps(acc, _mm512_mul_ps(a, a));
  } else if constexpr (kKind == NormKind::kL1) {
    return _mm512_add_ps(acc, _mm512_abs_ps(a));
  } else {
    const __m512 b = _mm512_abs_ps(a);
    const __mmask16 take = _mm512_cmp_ps_mask(b, acc, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(acc, take, b);
  }
}

// lanes[l] = step(lanes[l], x[b * kClipLanes + l]) for every block b < blocks, in block order.
// elem_t: float or uint16_t (bfloat16 bits).
template <NormKind kKind, typename elem_t>
FUSEDREG_TARGET_AVX512 void pow_sum_blocks_avx512(const elem_t* x, int64_t blocks, float* lanes) {
  __m512 a0 = _mm512_loadu_ps(lanes), a1 = _mm512_loadu_ps(lanes + 16);
  __m512 a2 = _mm512_loadu_ps(lanes + 32), a3 = _mm512_loadu_ps(lanes + 48);
  for (int64_t b = 0; b < blocks; ++b) {
    const elem_t* p = x + b * kClipLanes;
    a0 = step16<kKind>(a0, load16(p));
    a1 = step16<kKind>(a1, load16(p + 16));
    a2 = step16<kKind>(a2, load16(p + 32));
    a3 = step16<kKind>(a3, load16(p + 48));
  }
  _mm512_storeu_ps(lanes, a0);
  _mm512_storeu_ps(lanes + 16, a1);
  _mm512_storeu_ps(lanes + 32, a2);
  _mm512_storeu_ps(lanes + 48, a3);
}

// x[i] = round(x[i] * factor) for i < size; the tail through masked loads and stores.
FUSEDREG_TARGET_AVX512 inline void scale_avx512(float* x, int64_t size, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  int64_t i = 0;
  for (; i + 16 <= size; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), f));
  if (i < size) {
    const __mmask16 k = static_cast<__mmask16>((1u << (size - i)) - 1);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), f));
  }
}

FUSEDREG_TARGET_AVX512 inline void scale_avx512(uint16_t* x, int64_t size, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  int64_t i = 0;
  for (; i + 32 <= size; i += 32) {
    const __m512 v0 = _mm512_mul_ps(cpu_vec::load_bf16x16(x + i), f);
    const __m512 v1 = _mm512_mul_ps(cpu_vec::load_bf16x16(x + i + 16), f);
    cpu_vec::store_bf16x16(x + i, v0);
    cpu_vec::store_bf16x16(x + i + 16, v1);
  }
  for (; i < size; i += 16) {
    const int64_t n = size - i < 16 ? size - i : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << n) - 1);
    cpu_vec::mask_store_bf16x16(x + i, k, _mm512_mul_ps(cpu_vec::maskz_load_bf16x16(k, x + i), f));
  }
}

// ---------------------------------------------------------------------------------- AVX2

FUSEDREG_TARGET_AVX2 FUSEDREG_ALWAYS_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FUSEDREG_TARGET_AVX2 FUSEDREG_ALWAYS_INLINE __m256 load8(const uint16_t* p) { return cpu_vec::load_bf16x8(p); }

template <NormKind kKind>
FUSEDREG_TARGET_AVX2 FUSEDREG_ALWAYS_INLINE __m256 step8(__m256 acc, __m256 a) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  if constexpr (kKind == NormKind::kL2) {
    return _mm256_add_ps(acc, _mm256_mul_ps(a, a));
  } else if constexpr (kKind == NormKind::kL1) {
    return _mm256_add_ps(acc, _mm256_and_ps(a, abs_mask));
  } else {
    const __m256 b = _mm256_and_ps(a, abs_mask);
    const __m256 take = _mm256_or_ps(_mm256_cmp_ps(b, acc, _CMP_GT_OQ), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    return _mm256_blendv_ps(acc, b, take);
  }
}

template <NormKind kKind, typename elem_t>
FUSEDREG_TARGET_AVX2 void pow_sum_blocks_avx2(const elem_t* x, int64_t blocks, float* lanes) {
  __m256 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm256_loadu_ps(lanes + 8 * r);
  for (int64_t b = 0; b < blocks; ++b) {
    const elem_t* p = x + b * kClipLanes;
    for (int r = 0; r < 8; ++r) a[r] = step8<kKind>(a[r], load8(p + 8 * r));
  }
  for (int r = 0; r < 8; ++r) _mm256_storeu_ps(lanes + 8 * r, a[r]);
}

FUSEDREG_TARGET_AVX2 inline void scale_avx2(float* x, int64_t size, float factor) {
  const __m256 f = _mm256_set1_ps(factor);
  int64_t i = 0;
  for (; i + 8 <= size; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), f));
  for (; i < size; ++i) x[i] = x[i] * factor;
}

FUSEDREG_TARGET_AVX2 inline void scale_avx2(uint16_t* x, int64_t size, float factor) {
  const __m256 f = _mm256_set1_ps(factor);
  int64_t i = 0;
  for (; i + 8 <= size; i += 8) cpu_vec::store_bf16x8(x + i, _mm256_mul_ps(cpu_vec::load_bf16x8(x + i), f));
  for (; i < size; ++i) x[i] = cpu_vec::float_to_bf16_bits(cpu_vec::bf16_bits_to_float(x[i]) * factor);
}

#endif  // FUSEDREG_X86_SIMD

}  // namespace clip_cpu
}  // namespace fusedreg
