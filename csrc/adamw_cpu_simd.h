// CPU helpers of the AdamW kernel (csrc/adamw.cpp, the only file that includes this one): SIMD
// square roots, the storage-dtype conversions written with bit masks so the update loops vectorize,
// the staging of an operand's block, and the Philox4x32-10 words of stochastic rounding computed
// eight counters per AVX2 vector (philox_simd::rounds_avx2). Everything here rounds exactly as the
// scalar definitions in csrc/adamw.h and csrc/common/philox.h: results do not depend on the CPU's
// vector width.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "adamw.h"
#include "common/cpu_isa.h"
#include "common/philox_simd.h"

namespace fusedreg {
namespace {

constexpr int kBlock = 64;  // elements per stage (in L1); measured best of 32..1024 on AVX2

// In-place square roots of x[0, n). The compiler does not vectorize std::sqrt itself (it may set
// errno), so SIMD square roots are called explicitly: AVX where the CPU has it (the square root's
// throughput bounds this kernel on CPU: 4-wide SSE2 costs ~40% of a step), else the baseline,
// SSE2 on x86-64, NEON on AArch64. All of them round correctly, like std::sqrt.
#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDREG_ADAMW_AVX_SQRT 1

__attribute__((target("avx"))) void sqrt_inplace_avx(float* x, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) _mm_store_ss(x + i, _mm_sqrt_ss(_mm_load_ss(x + i)));
}

__attribute__((target("avx"))) void sqrt_inplace_avx(double* x, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(x + i, _mm256_sqrt_pd(_mm256_loadu_pd(x + i)));
  for (; i < n; ++i) x[i] = _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_load_sd(x + i)));
}

bool cpu_has_avx() {
  static const bool has_avx = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") != 0;
  }();
  return has_avx;
}
#endif

inline void sqrt_inplace(float* x, int n) {
#if defined(FUSEDREG_ADAMW_AVX_SQRT)
  if (cpu_has_avx()) return sqrt_inplace_avx(x, n);
#endif
  int i = 0;
#if defined(__x86_64__) || defined(_M_X64)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
#elif defined(__aarch64__)
  for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vsqrtq_f32(vld1q_f32(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::sqrt(x[i]);
}

inline void sqrt_inplace(double* x, int n) {
#if defined(FUSEDREG_ADAMW_AVX_SQRT)
  if (cpu_has_avx()) return sqrt_inplace_avx(x, n);
#endif
  int i = 0;
#if defined(__x86_64__) || defined(_M_X64)
  for (; i + 2 <= n; i += 2) _mm_storeu_pd(x + i, _mm_sqrt_pd(_mm_loadu_pd(x + i)));
#elif defined(__aarch64__)
  for (; i + 2 <= n; i += 2) vst1q_f64(x + i, vsqrtq_f64(vld1q_f64(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::sqrt(x[i]);
}

// Loads and stores between the storage dtypes and the math type. c10's own float16 conversions
// branch, which keeps the compiler from vectorizing the loops below; these are the same algorithms
// (bitwise the same results: round to nearest even, NaN kept) written with bit masks instead.
inline float bits_to_float(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  return w;
}

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(c10::BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.x) << 16); }

inline float to_acc(c10::Half x) {
  const uint32_t w = static_cast<uint32_t>(x.x) << 16;
  const uint32_t two_w = w + w;  // exponent and mantissa at the top, sign dropped
  // normal: re-bias the exponent by 0xE0 (so that inf/NaN land on 0xFF), then scale by 2^-112
  const float normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * bits_to_float(0x7800000u);
  // subnormal: the mantissa as the low bits of 0.5f's significand, minus 0.5f
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_normal = 0u - static_cast<uint32_t>((two_w >> 27) != 0);
  return bits_to_float((w & 0x80000000u) | (float_to_bits(normal) & is_normal) |
                       (float_to_bits(subnormal) & ~is_normal));
}

inline void store_acc(float& dst, float x) { dst = x; }
inline void store_acc(double& dst, double x) { dst = x; }

inline void store_acc(c10::BFloat16& dst, float x) {
  const uint32_t w = float_to_bits(x);
  const uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  const uint32_t is_nan = 0u - static_cast<uint32_t>(x != x);
  dst = c10::BFloat16(static_cast<uint16_t>((0x7FC0u & is_nan) | (rounded & ~is_nan)), c10::BFloat16::from_bits());
}

// x rounded to bfloat16 stochastically with the 16-bit random value r16.
inline void store_acc_sr(c10::BFloat16& dst, float x, uint32_t r16) {
  dst = c10::BFloat16(adamw_sr_bf16_bits(x, r16), c10::BFloat16::from_bits());
}

inline void store_acc(c10::Half& dst, float x) {
  // Scaling |x| by 2^112 then 2^-110 rounds it at half precision's position (and overflows to
  // inf); adding a power of two with the right exponent then aligns the rounded mantissa.
  float base = (std::fabs(x) * bits_to_float(239u << 23)) * bits_to_float(17u << 23);
  const uint32_t w = float_to_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
  dst = c10::Half(static_cast<uint16_t>(((w & 0x80000000u) >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan)),
                  c10::Half::from_bits());
}

// Where the first half of the update leaves an operand's new values, in the math type: in the
// tensor itself when it is stored in the math type, else in a staging array on the stack (in L1)
// that store() converts back in a loop of its own. Converting loads fuse into the update loops;
// converting stores of 16-bit moments there would defeat the compiler's vectorizer.
template <typename T, typename acc>
struct BlockOperand {
  static constexpr bool kStaged = !std::is_same_v<T, acc>;
  T* tensor;
  acc staging[kStaged ? kBlock : 1];

  acc* out(int64_t base) {
    if constexpr (kStaged) {
      return staging;
    } else {
      return tensor + base;
    }
  }

  void store(int64_t base, int n) {
    if constexpr (kStaged) {
      T* __restrict dst = tensor + base;
      for (int i = 0; i < n; ++i) store_acc(dst[i], staging[i]);
    }
  }

  // store() for a bfloat16 tensor, stochastically: element i with (words[i] >> shift) & 0xFFFF.
  void store_sr(int64_t base, int n, const uint32_t* words, int shift) {
    static_assert(std::is_same_v<T, c10::BFloat16> && kStaged);
    T* __restrict dst = tensor + base;
    for (int i = 0; i < n; ++i) store_acc_sr(dst[i], staging[i], (words[i] >> shift) & 0xFFFFu);
  }
};

// Where a kSR chunk's random words come from: the seed's round keys, the tensor's id, the chunk's
// first element, and the instruction-set level of the call (cpu_isa(), read once per call).
struct SRStream {
  PhiloxKeys keys{};
  uint32_t tensor_id = 0;
  int64_t first = 0;
  CpuIsa isa = CpuIsa::kDefault;
};

#if FUSEDREG_X86_SIMD
// sr_block_words on AVX2: 8 groups per vector through philox_simd::rounds_avx2 (one counter per
// 32-bit lane; the low counter word's carry into the high word per lane, so any group index works),
// the four output words transposed into element order (word k of group j is element 4j + k) in
// registers.
FUSEDREG_TARGET_AVX2 inline void sr_block_words_avx2(const SRStream& sr, uint64_t first_group, uint32_t pair,
                                                     uint32_t* words) {
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  for (int q = 0; q < kBlock / 4; q += 8) {
    const uint64_t group = first_group + q;
    const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group)));
    __m256i c0 = _mm256_add_epi32(lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0, sign));  // -1
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(group >> 32)), carry);
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(sr.tensor_id));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(pair));
    philox_simd::rounds_avx2(sr.keys, c0, c1, c2, c3);
    const __m256i w01_lo = _mm256_unpacklo_epi32(c0, c1), w23_lo = _mm256_unpacklo_epi32(c2, c3);  // groups 0 1 | 4 5
    const __m256i w01_hi = _mm256_unpackhi_epi32(c0, c1), w23_hi = _mm256_unpackhi_epi32(c2, c3);  // groups 2 3 | 6 7
    const __m256i g04 = _mm256_unpacklo_epi64(w01_lo, w23_lo), g15 = _mm256_unpackhi_epi64(w01_lo, w23_lo);
    const __m256i g26 = _mm256_unpacklo_epi64(w01_hi, w23_hi), g37 = _mm256_unpackhi_epi64(w01_hi, w23_hi);
    __m256i* out = reinterpret_cast<__m256i*>(words + 4 * q);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(g04, g15, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(g26, g37, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(g04, g15, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(g26, g37, 0x31));
  }
}
#endif

// Words A (pair 0) or B (pair 1) of the kBlock elements from `first` (first % 4 == 0) into words
// (element order: csrc/adamw.h's adamw_sr_words, group first / 4 + q, word k -> element 4q + k).
inline void sr_block_words(const SRStream& sr, int64_t first, uint32_t pair, uint32_t* words) {
  static_assert(kBlock % 32 == 0, "the AVX2 words come 8 groups at a time");
  const uint64_t first_group = static_cast<uint64_t>(first) / 4;
#if FUSEDREG_X86_SIMD
  if (sr.isa != CpuIsa::kDefault) return sr_block_words_avx2(sr, first_group, pair, words);
#endif
  for (int q = 0; q < kBlock / 4; ++q) {
    const Philox4x32Words w = adamw_sr_words(sr.keys, sr.tensor_id, first_group + q, pair);
    for (int k = 0; k < 4; ++k) words[4 * q + k] = w.w[k];
  }
}

}  // namespace
}  // namespace fusedreg
