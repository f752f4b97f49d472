// Philox4x32-10 counter-based RNG and the dropout mask layout every fusedreg backend shares.
//
// Algorithm: Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011; the Random123 reference), bit-identical to Triton's tl.philox / tl.randint4x. A round
// maps a 128-bit counter (c0, c1, c2, c3) under a 64-bit key (k0, k1) to
//     (hi(M1*c2) ^ c1 ^ k0,  lo(M1*c2),  hi(M0*c0) ^ c3 ^ k1,  lo(M0*c0))
// and the key is bumped by the Weyl constants (W0, W1) between rounds.
//
// Dropout layout (cuda, triton, cpu and reference backends all implement exactly this):
//   - the key is the 64-bit seed: k0 = low 32 bits, k1 = high 32 bits;
//   - element i (its position in memory order) lies in group j = i / 4 and takes word i % 4 of
//     philox(counter = (j mod 2**32, j / 2**32, 0, 0), key), which is tl.randint4x(seed, j);
//   - it is kept iff word >= t, t = floor(p * 2**32), so P(keep) = 1 - p to within 2**-32;
//   - kept elements become x * scale, scale = 1 / (1 - p) rounded once to float (to double for
//     float64 data), with the product in fp32 (fp64) and one final rounding to the data's dtype;
//     dropped elements become exactly 0 (selected, not multiplied: a dropped inf/NaN gives 0).
//
// Why four elements per call: one call yields 128 random bits, 32 per element is plenty, and ten
// rounds of 32-bit multiplies per element would make bf16 dropout compute-bound on an H100 (it moves
// only 4 bytes per element). Why the counter is the element-group index: the mask is a pure function
// of (seed, position), so every backend produces the same mask bit for bit, and the backward pass
// regenerates it from the seed alone instead of storing it.
//
// Plain C++ (no torch headers): compiled by the host compiler for the CPU kernels and by nvcc for
// both sides of the CUDA kernels.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fusedreg {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multiplier for c0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // round multiplier for c2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump for k0 (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump for k1 (sqrt(3) - 1)
constexpr int kPhiloxRounds = 10;

// Elements of a dropout mask served by one Philox call (one 32-bit word each).
constexpr int kDropoutElemsPerGroup = 4;

struct Philox4x32Words {
  uint32_t w[4];
};

FUSEDREG_HOST_DEVICE inline uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FUSEDREG_HOST_DEVICE inline Philox4x32Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                          uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = philox_mulhi(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;  // unsigned: wraps modulo 2**32 by definition
    const uint32_t hi1 = philox_mulhi(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// The round keys of one 64-bit key (k0 = low word, k1 = high word): a kernel that runs many
// counters under one key derives them once instead of bumping them inside every call.
struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
};

FUSEDREG_HOST_DEVICE inline PhiloxKeys philox_keys(uint64_t key) {
  PhiloxKeys keys;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    keys.k0[round] = k0;
    keys.k1[round] = k1;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return keys;
}

// philox4x32_10 with the round keys given: the same rounds, the same words.
FUSEDREG_HOST_DEVICE inline Philox4x32Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                          const PhiloxKeys& keys) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = philox_mulhi(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = philox_mulhi(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ keys.k0[round];
    c1 = lo1;
    c2 = hi0 ^ c3 ^ keys.k1[round];
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// dropout_group_words (below) with the seed's round keys given.
FUSEDREG_HOST_DEVICE inline Philox4x32Words dropout_group_words(const PhiloxKeys& keys, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u, keys);
}

// The four words for dropout elements 4*group .. 4*group+3. `seed` is the int64 seed tensor's
// value reinterpreted as unsigned (negative seeds are fine).
FUSEDREG_HOST_DEVICE inline Philox4x32Words dropout_group_words(uint64_t seed, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// floor(p * 2**32) for 0 <= p < 1: scaling by a power of two is exact in double and the cast
// truncates, so every backend gets the same threshold. p == 1 (drop everything) has no uint32
// threshold; callers handle it before launching.
FUSEDREG_HOST_DEVICE inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

FUSEDREG_HOST_DEVICE inline bool dropout_keep(uint32_t word, uint32_t threshold) {
  return word >= threshold;
}

// 1 / (1 - p) computed in double and rounded once, for 0 <= p < 1.
FUSEDREG_HOST_DEVICE inline float dropout_scale(double p) {
  return static_cast<float>(1.0 / (1.0 - p));
}

// The scale for float64 data, whose math stays in double.
FUSEDREG_HOST_DEVICE inline double dropout_scale_f64(double p) {
  return 1.0 / (1.0 - p);
}

}  // namespace fusedreg
