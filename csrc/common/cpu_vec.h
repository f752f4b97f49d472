// float <-> bfloat16 for the CPU kernels, scalar and in AVX2 / AVX-512 registers, bit-identical to
// c10::BFloat16: widening is a 16-bit shift, narrowing rounds to nearest even and turns every NaN
// into 0x7FC0. AVX512_BF16's vcvtneps2bf16 rounds the same way but flushes denormals to zero and
// keeps NaN payloads, so to_bf16x16_avx512bf16 uses it only for vectors without either.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_isa.h"

#if FUSEDREG_X86_SIMD
#include <immintrin.h>
#endif

namespace fusedreg {
namespace cpu_vec {

FUSEDREG_ALWAYS_INLINE float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Branch-free (vectorizable) twin of c10::detail::round_to_nearest_even.
FUSEDREG_ALWAYS_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
  return f != f ? uint16_t{0x7FC0} : rounded;
}

#if FUSEDREG_X86_SIMD

FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 load_bf16x16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 maskz_load_bf16x16(__mmask16 k, const uint16_t* p) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m256i to_bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void store_bf16x16(uint16_t* p, __m512 f) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(f));
}

FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void mask_store_bf16x16(uint16_t* p, __mmask16 k, __m512 f) {
  _mm256_mask_storeu_epi16(p, k, to_bf16x16(f));
}

// to_bf16x16's bits in 3 instructions instead of 8 where no element is a NaN or a denormal (one
// vfpclassps tells; random data almost never takes the exact path). CPUs with cpu_has_avx512bf16().
FUSEDREG_TARGET_AVX512BF16 FUSEDREG_ALWAYS_INLINE __m256i to_bf16x16_avx512bf16(__m512 f) {
  constexpr int kNanOrDenormal = 0x01 | 0x80 | 0x20;  // vfpclassps: QNaN, SNaN, denormal
  if (__builtin_expect(_mm512_fpclass_ps_mask(f, kNanOrDenormal) != 0, 0)) return to_bf16x16(f);
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f));
}

FUSEDREG_TARGET_AVX2 FUSEDREG_ALWAYS_INLINE __m256 load_bf16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

FUSEDREG_TARGET_AVX2 FUSEDREG_ALWAYS_INLINE void store_bf16x8(uint16_t* p, __m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                           _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

#endif  // FUSEDREG_X86_SIMD

}  // namespace cpu_vec
}  // namespace fusedreg
