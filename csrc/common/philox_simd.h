// Dropout keep-masks from Philox4x32-10, several counters per SIMD register (CPU only).
//
// dropout_keep_bits() writes, for the elements of groups [first, first + groups), one bit per
// element (1 = kept) in memory order: bit b of bits[w] is element 4 * first + 64 * w + b. The bits
// are exactly those of dropout_keep(dropout_group_words(...).w[k], threshold) in philox.h, at every
// level (tests/test_cpu_isa.py compares the levels with each other and with the reference).
//
// Algorithm: lane j holds the counter of group first + j. The 32x32 -> 64-bit products come from
// vpmuludq, which multiplies the low words of 64-bit lanes: AVX-512 keeps one counter per 64-bit
// lane (two registers per word for 16 groups, six instructions per round; see rounds_avx512), AVX2
// keeps one per 32-bit lane (8 groups) and multiplies the even lanes and the odd lanes shifted
// down, recombining high and low words by blends. Each of the four output words is compared with
// the threshold (unsigned: AVX-512 has the compare, AVX2 flips the sign bits and compares signed),
// giving one mask bit per group, and the four masks are interleaved into element order (word k of
// group j is element 4j + k) by pdep (AVX-512) or the kSpread4 table (AVX2). The scalar level
// runs philox4x32_10 per group. Groups whose low counter word would wrap inside one register (only
// past 2**34 elements) take the scalar path.
//
// Trade-off: writing bits to a small buffer and applying them in a second loop costs a few L1
// accesses per 64 elements, and keeps one mask generator for every dtype and op variant.
#pragma once

#include <cstdint>

#include "cpu_isa.h"
#include "philox.h"

#if FUSEDREG_X86_SIMD
#include <immintrin.h>
#endif

namespace fusedreg {
namespace philox_simd {

// kSpread4[m]: bit i of m moved to bit 4i (8 mask bits -> 32 bits).
struct Spread4Table {
  uint32_t v[256];
  constexpr Spread4Table() : v() {
    for (uint32_t m = 0; m < 256; ++m) {
      uint32_t s = 0;
      for (int i = 0; i < 8; ++i) s |= ((m >> i) & 1u) << (4 * i);
      v[m] = s;
    }
  }
};
inline constexpr Spread4Table kSpread4{};

// Bits of elements 4g .. 4g+3 of one group (bit k = word k kept).
FUSEDREG_ALWAYS_INLINE uint32_t group_keep_nibble(const PhiloxKeys& keys, uint64_t group, uint32_t threshold) {
  const Philox4x32Words w = dropout_group_words(keys, group);
  return uint32_t{dropout_keep(w.w[0], threshold)} | uint32_t{dropout_keep(w.w[1], threshold)} << 1 |
         uint32_t{dropout_keep(w.w[2], threshold)} << 2 | uint32_t{dropout_keep(w.w[3], threshold)} << 3;
}

// Scalar: 16 groups -> one 64-bit word.
inline uint64_t keep_word_scalar(const PhiloxKeys& keys, uint64_t first, uint32_t threshold, int groups = 16) {
  uint64_t bits = 0;
  for (int j = 0; j < groups; ++j) {
    bits |= uint64_t{group_keep_nibble(keys, first + j, threshold)} << (4 * j);
  }
  return bits;
}

inline void keep_bits_default(const PhiloxKeys& keys, uint32_t threshold, uint64_t first, int64_t groups,
                              uint64_t* bits) {
  for (int64_t g = 0; g < groups; g += 16) {
    bits[g / 16] = keep_word_scalar(keys, first + g, threshold, static_cast<int>(groups - g < 16 ? groups - g : 16));
  }
}

#if FUSEDREG_X86_SIMD

// Ten rounds for 8 counters, one per 64-bit lane, the counter words in the lanes' low halves (the
// high halves hold garbage that vpmuludq ignores and the final compare masks off). A 64-bit lane
// takes the whole product of vpmuludq, so lo is the product itself and hi one shift away, and
// vpternlogd XORs three words at once: six instructions per round.
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void rounds_avx512(const PhiloxKeys& keys, __m512i& c0, __m512i& c1,
                                                                 __m512i& c2, __m512i& c3) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i p0 = _mm512_mul_epu32(c0, m0);
    const __m512i p1 = _mm512_mul_epu32(c2, m1);
    c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1, _mm512_set1_epi64(keys.k0[round]), 0x96);
    c1 = p1;
    c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3, _mm512_set1_epi64(keys.k1[round]), 0x96);
    c3 = p0;
  }
}

// Bit j: the low word of 64-bit lane j >= threshold.
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE uint32_t keep_mask_avx512(__m512i w, __m512i t) {
  return _mm512_cmpge_epu64_mask(_mm512_and_si512(w, _mm512_set1_epi64(0xFFFFFFFFll)), t);
}

FUSEDREG_TARGET_AVX512 inline uint64_t keep_word_avx512(const PhiloxKeys& keys, uint64_t first, uint32_t threshold) {
  const uint32_t lo = static_cast<uint32_t>(first);
  if (lo > UINT32_MAX - 15u) return keep_word_scalar(keys, first, threshold);  // low word wraps
  const __m512i hi = _mm512_set1_epi64(static_cast<int64_t>(first >> 32));
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i a0 = _mm512_add_epi64(_mm512_set1_epi64(lo), lanes), a1 = hi;  // groups first + 0..7
  __m512i b0 = _mm512_add_epi64(_mm512_set1_epi64(lo + 8u), lanes), b1 = hi;  // first + 8..15
  __m512i a2 = _mm512_setzero_si512(), a3 = a2, b2 = a2, b3 = a2;
  rounds_avx512(keys, a0, a1, a2, a3);
  rounds_avx512(keys, b0, b1, b2, b3);
  const __m512i t = _mm512_set1_epi64(threshold);
  const uint64_t k0 = keep_mask_avx512(a0, t) | keep_mask_avx512(b0, t) << 8;
  const uint64_t k1 = keep_mask_avx512(a1, t) | keep_mask_avx512(b1, t) << 8;
  const uint64_t k2 = keep_mask_avx512(a2, t) | keep_mask_avx512(b2, t) << 8;
  const uint64_t k3 = keep_mask_avx512(a3, t) | keep_mask_avx512(b3, t) << 8;
  // pdep spreads group j's bit to bit 4j + k (fast on every CPU with AVX-512)
  constexpr uint64_t kEvery4th = 0x1111111111111111ull;
  return _pdep_u64(k0, kEvery4th) | _pdep_u64(k1, kEvery4th << 1) | _pdep_u64(k2, kEvery4th << 2) |
         _pdep_u64(k3, kEvery4th << 3);
}

FUSEDREG_TARGET_AVX512 inline void keep_bits_avx512(const PhiloxKeys& keys, uint32_t threshold, uint64_t first,
                                                   int64_t groups, uint64_t* bits) {
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) bits[g / 16] = keep_word_avx512(keys, first + g, threshold);
  if (g < groups) bits[g / 16] = keep_word_scalar(keys, first + g, threshold, static_cast<int>(groups - g));
}

FUSEDREG_TARGET_AVX2 inline void mul_hilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Ten rounds for 8 counters, one per 32-bit lane (c0..c3: the counters' words in, the Philox words
// out). vpmuludq multiplies the even lanes, and the odd ones shifted down; mul_hilo_avx2 recombines
// the high and low words by blends. The AVX2 twin of rounds_avx512, shared by dropout's masks and
// AdamW's stochastic rounding.
FUSEDREG_TARGET_AVX2 FUSEDREG_ALWAYS_INLINE void rounds_avx2(const PhiloxKeys& keys, __m256i& c0, __m256i& c1,
                                                             __m256i& c2, __m256i& c3) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mul_hilo_avx2(c0, m0, hi0, lo0);
    mul_hilo_avx2(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(keys.k0[round])));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(keys.k1[round])));
    c3 = lo0;
  }
}

// Bit j set where lane j of w >= threshold, unsigned: !(t > w) with both sign bits flipped and
// compared signed (t_flipped = threshold ^ 0x80000000 in every lane).
FUSEDREG_TARGET_AVX2 inline uint32_t keep_mask_avx2(__m256i w, __m256i t_flipped) {
  const __m256i dropped = _mm256_cmpgt_epi32(t_flipped, _mm256_xor_si256(w, _mm256_set1_epi32(INT32_MIN)));
  return ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(dropped))) & 0xFFu;
}

// 8 groups -> 32 bits.
FUSEDREG_TARGET_AVX2 inline uint32_t keep_half_avx2(const PhiloxKeys& keys, uint64_t first, uint32_t threshold) {
  const uint32_t lo = static_cast<uint32_t>(first);
  if (lo > UINT32_MAX - 7u) return static_cast<uint32_t>(keep_word_scalar(keys, first, threshold, 8));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(first >> 32));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  rounds_avx2(keys, c0, c1, c2, c3);
  // word >= t (unsigned) <=> !(t > word) with both sign bits flipped and compared signed
  const __m256i t = _mm256_set1_epi32(static_cast<int>(threshold ^ 0x80000000u));
  return kSpread4.v[keep_mask_avx2(c0, t)] | kSpread4.v[keep_mask_avx2(c1, t)] << 1 |
         kSpread4.v[keep_mask_avx2(c2, t)] << 2 | kSpread4.v[keep_mask_avx2(c3, t)] << 3;
}

FUSEDREG_TARGET_AVX2 inline void keep_bits_avx2(const PhiloxKeys& keys, uint32_t threshold, uint64_t first,
                                               int64_t groups, uint64_t* bits) {
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    bits[g / 16] = uint64_t{keep_half_avx2(keys, first + g, threshold)} |
                   uint64_t{keep_half_avx2(keys, first + g + 8, threshold)} << 32;
  }
  if (g < groups) bits[g / 16] = keep_word_scalar(keys, first + g, threshold, static_cast<int>(groups - g));
}

#endif  // FUSEDREG_X86_SIMD

}  // namespace philox_simd

// Keep bits of groups [first, first + groups): (groups + 15) / 16 words of `bits`; bits past the
// last group's 4 elements are 0. isa: the level to run (cpu_isa()).
inline void dropout_keep_bits(CpuIsa isa, const PhiloxKeys& keys, uint32_t threshold, uint64_t first,
                              int64_t groups, uint64_t* bits) {
#if FUSEDREG_X86_SIMD
  if (isa == CpuIsa::kAvx512) return philox_simd::keep_bits_avx512(keys, threshold, first, groups, bits);
  if (isa == CpuIsa::kAvx2) return philox_simd::keep_bits_avx2(keys, threshold, first, groups, bits);
#endif
  (void)isa;
  philox_simd::keep_bits_default(keys, threshold, first, groups, bits);
}

}  // namespace fusedreg
