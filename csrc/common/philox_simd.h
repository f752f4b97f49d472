// Dropout keep-masks from Philox4x32-10, several counters per SIMD register (CPU only).
//
// dropout_keep_bits() writes, for the elements of groups [first, first + groups), one bit per
// element (1 = kept) in memory order: bit b of bits[w] is element 4 * first + 64 * w + b. The bits
// are exactly those of dropout_keep(dropout_group_words(...).w[k], threshold) in philox.h, at every
// level (tests/test_cpu_isa.py compares the levels with each other and with the reference).
//
// Algorithm: each lane holds one group's counter. The 32x32 -> 64-bit products come from
// vpmuludq, which multiplies the low words of 64-bit lanes. AVX-512 keeps one counter per 64-bit
// lane: lo is the product itself, hi one shift away, and vpternlogd XORs three words at once, so a
// round costs six instructions per 8 counters (rounds_avx512). keep_words32_avx512 runs four such
// streams (32 groups, 128 elements) side by side, enough independent work to cover vpmuludq's
// latency, and specialises rounds 1 and 2, whose inputs are mostly zero or the same in every lane.
// AVX2 keeps one counter per 32-bit lane (8 groups) and multiplies the even lanes and the odd
// lanes shifted down, recombining high and low words by blends. Each output word is compared with
// the threshold (unsigned: AVX-512 has the compare, AVX2 flips the sign bits and compares signed),
// giving one mask bit per group, and the four masks are interleaved into element order (word k of
// group j is element 4j + k) by pdep (AVX-512) or the kSpread4 table (AVX2). The scalar level runs
// philox4x32_10 per group. Blocks whose low counter word would wrap inside them (only past 2**34
// elements) take the scalar path.
//
// Cost on a Zen 4 core (measured: one 512-bit vpmuludq or vpsrlq per cycle, two vpternlogd): a
// round of 8 counters takes 3 cycles, and keep_words32_avx512 needs about 240 vector instructions
// per 128 elements, at least 0.94 cycles per element; it runs at about 1.1 (0.30 ns at 3.7 GHz).
// The rounds, not the memory traffic, bound dropout on one core. 256-bit lanes (AVX-512VL) measured
// about 12% slower than 512-bit ones: twice the instructions for the same pipe time.
//
// Trade-off: dropout.cpp applies keep_words32_avx512's bits straight from registers for float32
// and bfloat16 (dropout and dropout_add); dropout_keep_bits writes them to a small buffer for the
// other dtypes and the AVX2 and scalar levels, which keeps one mask generator for every variant.
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

// Keep bits of 32 consecutive groups (128 elements), in dropout_keep_bits' order: w[0] holds
// elements 0..63, w[1] elements 64..127.
struct KeepWords32 {
  uint64_t w[2];
};

// A round key in every 32-bit lane: what vpternlogd reads as a {1to16} memory operand.
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512i key_lanes(uint32_t key) {
  return _mm512_set1_epi32(static_cast<int>(key));
}

// 32 groups from four streams of 8 counters: stream 2h + e holds groups first + 16h + 2i + e in
// its 64-bit lanes i, so that one unsigned compare of the even 32-bit lanes gives bit 2i of a
// mask and the odd-group stream's mask shifted by one fills the gaps. Four independent streams
// keep the multiplier busy through vpmuludq's latency. Rounds 1 and 2 are specialised: every
// counter starts as (lo + lane, hi, 0, 0), so round 1 has one product and round 2's product of
// c0 is the same constant in every lane (folded into the keys of rounds 2 and 3): 7 instead of
// 12 instructions per stream for those rounds, 55 instead of 60 in all. The rounds 3-10 are
// rounds_avx512's, written out per stream so that the four streams interleave, with the round keys
// broadcast to every 32-bit lane (the high halves are garbage anyway): vpternlogd then reads them
// from memory as {1to16} operands instead of the compiler broadcasting each from a general
// register in every block (about 6% faster).
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE KeepWords32 keep_words32_avx512(const PhiloxKeys& keys, uint64_t first,
                                                                             uint32_t threshold) {
  constexpr int kStreams = 4;
  const uint32_t lo = static_cast<uint32_t>(first);
  if (lo > UINT32_MAX - 31u) {  // the low counter word wraps inside the block
    return {{keep_word_scalar(keys, first, threshold), keep_word_scalar(keys, first + 16, threshold)}};
  }
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  // Round 1 with c1 = first >> 32, c2 = c3 = 0: c0 <- c1 ^ k0 (the same in every lane), c1 <- 0.
  const uint32_t c0_round1 = static_cast<uint32_t>(first >> 32) ^ keys.k0[0];
  const uint64_t p0_round2 = uint64_t{kPhiloxM0} * c0_round1;  // round 2's M0 * c0, every lane
  const __m512i k1_round2 = _mm512_set1_epi64(static_cast<uint32_t>(p0_round2 >> 32) ^ keys.k1[1]);
  const __m512i k1_round3 = _mm512_set1_epi64(static_cast<uint32_t>(p0_round2) ^ keys.k1[2]);
  const __m512i lanes = _mm512_add_epi64(_mm512_set1_epi64(lo), _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14));
  __m512i c0[kStreams], c1[kStreams], c2[kStreams], c3[kStreams];
  for (int s = 0; s < kStreams; ++s) {
    const __m512i p0 = _mm512_mul_epu32(_mm512_add_epi64(lanes, _mm512_set1_epi64(16 * (s / 2) + s % 2)), m0);
    const __m512i c2_round1 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), key_lanes(keys.k1[0]));
    const __m512i p1 = _mm512_mul_epu32(c2_round1, m1);
    c0[s] = _mm512_xor_si512(_mm512_srli_epi64(p1, 32), key_lanes(keys.k0[1]));  // c1 was 0
    c1[s] = p1;
    c2[s] = _mm512_xor_si512(p0, k1_round2);  // c3 after round 1 is p0
  }
  for (int s = 0; s < kStreams; ++s) {  // round 3: c3 after round 2 is the constant lo(p0_round2)
    const __m512i p0 = _mm512_mul_epu32(c0[s], m0);
    const __m512i p1 = _mm512_mul_epu32(c2[s], m1);
    c0[s] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[s], key_lanes(keys.k0[2]), 0x96);
    c1[s] = p1;
    c2[s] = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), k1_round3);
    c3[s] = p0;
  }
  for (int round = 3; round < kPhiloxRounds; ++round) {
    const __m512i k0 = key_lanes(keys.k0[round]), k1 = key_lanes(keys.k1[round]);
    for (int s = 0; s < kStreams; ++s) {
      const __m512i p0 = _mm512_mul_epu32(c0[s], m0);
      const __m512i p1 = _mm512_mul_epu32(c2[s], m1);
      c0[s] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[s], k0, 0x96);
      c1[s] = p1;
      c2[s] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3[s], k1, 0x96);
      c3[s] = p0;
    }
  }
  // The high halves of the lanes hold garbage: compare the even 32-bit lanes only.
  const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512i* words[4] = {c0, c1, c2, c3};
  constexpr uint64_t kEvery4th = 0x1111111111111111ull;
  KeepWords32 out{{0, 0}};
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      const uint32_t even = _mm512_mask_cmpge_epu32_mask(0x5555, words[k][2 * h], t);
      const uint32_t odd = _mm512_mask_cmpge_epu32_mask(0x5555, words[k][2 * h + 1], t);
      out.w[h] |= _pdep_u64(even | odd << 1, kEvery4th << k);  // group j's word k -> bit 4j + k
    }
  }
  return out;
}

FUSEDREG_TARGET_AVX512 inline void keep_bits_avx512(const PhiloxKeys& keys, uint32_t threshold, uint64_t first,
                                                   int64_t groups, uint64_t* bits) {
  for (int64_t g = 0; g < groups; g += 32) {
    const KeepWords32 k = keep_words32_avx512(keys, first + g, threshold);
    if (groups - g >= 32) {
      bits[g / 16] = k.w[0];
      bits[g / 16 + 1] = k.w[1];
    } else {  // the last block: keep only its first groups - g groups
      const int64_t live = 4 * (groups - g);
      bits[g / 16] = live >= 64 ? k.w[0] : k.w[0] & ((uint64_t{1} << live) - 1);
      if (live > 64) bits[g / 16 + 1] = live == 128 ? k.w[1] : k.w[1] & ((uint64_t{1} << (live - 64)) - 1);
    }
  }
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
