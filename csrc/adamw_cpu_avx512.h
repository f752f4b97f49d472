// AVX-512 body of the CPU AdamW kernel (csrc/adamw.cpp, the only file that includes this one), for
// float32 and bfloat16 parameters and states: the chunk in one pass of 16 elements per vector,
// every operand loaded, updated and stored in registers (bfloat16 widened and narrowed by shifts,
// csrc/common/cpu_vec.h), the last partial vector under a lane mask. Picked at run time by
// cpu_isa() (csrc/common/cpu_isa.h): FUSEDREG_CPU_CAPABILITY=avx2 or default rules it out. Other
// dtypes (float16, float64) keep the portable block loops.
//
// Stochastic rounding (pure-bf16 training): 32 elements per step, whose Philox words (csrc/adamw.h's
// stream: 8 element groups, A and, for bfloat16 states, B) are computed first in registers by
// philox_simd::rounds_avx512, one group per 64-bit lane, and permuted into element order; each
// bfloat16 store then adds its 16 random bits before truncating. Trade-off: the rounds (10 x 6
// instructions per 8 groups and pair, ~120 per 32 elements for pure bf16) outweigh the update
// itself, so such a step takes about twice one rounded to nearest (on a Zen 4 core, 1.3 vs 0.6 ns
// per element); the amount of Philox work is fixed by the stream all backends share.
//
// Same bits as the portable loops: the operations of adamw_moments / adamw_param (csrc/adamw.h) in
// the same order, each rounded on its own. The arithmetic is written with the embedded-rounding
// intrinsics (_mm512_*_round_ps with _MM_FROUND_CUR_DIRECTION: the rounding mode of MXCSR, as
// scalar code uses), which the compiler treats as opaque builtins; GCC expands the plain
// _mm512_mul_ps / _mm512_add_ps to vector operators that it contracts into FMAs (avx512f implies
// fma), and results would then depend on the CPU. Division stays division, square roots are
// correctly rounded, so a lane computes exactly what a scalar element does, whatever the lane.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "adamw.h"
#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "common/philox_simd.h"

namespace fusedreg {
namespace {

#if FUSEDREG_X86_SIMD
#define FUSEDREG_ADAMW_AVX512 1

// The dtype pairs this path updates: float32 / bfloat16 parameters and states (math in float).
template <typename param_t, typename state_t>
constexpr bool kAdamWAvx512Types =
    (std::is_same_v<param_t, float> || std::is_same_v<param_t, c10::BFloat16>) &&
    (std::is_same_v<state_t, float> || std::is_same_v<state_t, c10::BFloat16>);

FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 avx512_mul(__m512 a, __m512 b) {
  return _mm512_mul_round_ps(a, b, _MM_FROUND_CUR_DIRECTION);
}
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 avx512_add(__m512 a, __m512 b) {
  return _mm512_add_round_ps(a, b, _MM_FROUND_CUR_DIRECTION);
}
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 avx512_sub(__m512 a, __m512 b) {
  return _mm512_sub_round_ps(a, b, _MM_FROUND_CUR_DIRECTION);
}
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 avx512_div(__m512 a, __m512 b) {
  return _mm512_div_round_ps(a, b, _MM_FROUND_CUR_DIRECTION);
}
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 avx512_sqrt(__m512 a) {
  return _mm512_sqrt_round_ps(a, _MM_FROUND_CUR_DIRECTION);
}

// 16 elements from p as floats: all 16 when kFull, else the lanes of k (the others zero; never
// read from memory, so a tail does not read past its tensor).
template <bool kFull>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 avx512_load(const float* p, __mmask16 k) {
  return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
}
template <bool kFull>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE __m512 avx512_load(const c10::BFloat16* p, __mmask16 k) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
  return kFull ? cpu_vec::load_bf16x16(bits) : cpu_vec::maskz_load_bf16x16(k, bits);
}

// x rounded to p's dtype (bfloat16: to nearest even, NaN -> 0x7FC0, as store_acc), 16 elements or
// the lanes of k.
template <bool kFull>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void avx512_store(float* p, __mmask16 k, __m512 x) {
  if constexpr (kFull) {
    _mm512_storeu_ps(p, x);
  } else {
    _mm512_mask_storeu_ps(p, k, x);
  }
}
template <bool kFull>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void avx512_store(c10::BFloat16* p, __mmask16 k, __m512 x) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(p);
  if constexpr (kFull) {
    cpu_vec::store_bf16x16(bits, x);
  } else {
    cpu_vec::mask_store_bf16x16(bits, k, x);
  }
}

// x rounded to bfloat16 stochastically (adamw_sr_bf16_bits: (bits(x) + r16) >> 16, NaN -> 0x7FC0),
// r16 the lanes' 16-bit random values; 16 elements or the lanes of k.
template <bool kFull>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void avx512_store_sr(c10::BFloat16* p, __mmask16 k, __m512 x,
                                                                   __m512i r16) {
  __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(x), r16), 16);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  const __m256i half = _mm512_cvtepi32_epi16(bits);
  if constexpr (kFull) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half);
  } else {
    _mm256_mask_storeu_epi16(p, k, half);
  }
}

// A store of the update: stochastic for a bfloat16 tensor when kSR, else avx512_store.
template <bool kFull, bool kSR, typename T>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void avx512_store_as(T* p, __mmask16 k, __m512 x, __m512i r16) {
  if constexpr (kSR && std::is_same_v<T, c10::BFloat16>) {
    avx512_store_sr<kFull>(p, k, x, r16);
  } else {
    avx512_store<kFull>(p, k, x);
  }
}

// Philox words A (pair 0) or B (pair 1) of the 32 elements of groups g .. g + 7 (csrc/adamw.h's
// stream; groups: g + lane as 64-bit lanes), one word per 32-bit lane in element order: elements
// 0..15 in lo, 16..31 in hi. philox_simd::rounds_avx512 keeps a group per 64-bit lane, words in
// the low halves; a blend packs words (0, 1) and (2, 3) of a group into one 64-bit lane, and two
// two-source permutes interleave them (word k of group j is element 4j + k).
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void sr_words_avx512(const PhiloxKeys& keys, __m512i groups,
                                                                   __m512i tensor_id, uint32_t pair, __m512i& lo,
                                                                   __m512i& hi) {
  __m512i c0 = groups, c1 = _mm512_srli_epi64(groups, 32), c2 = tensor_id, c3 = _mm512_set1_epi64(pair);
  philox_simd::rounds_avx512(keys, c0, c1, c2, c3);
  const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, c0, _mm512_slli_epi64(c1, 32));
  const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, c2, _mm512_slli_epi64(c3, 32));
  lo = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), w23);
  hi = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), w23);
}

// AdamWScalars<float> broadcast to 16 lanes.
struct AdamWAvx512Scalars {
  __m512 decay, lerp_coef, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps;
  __m512 grad_scale, grad_inv_scale, grad_coef;
  __mmask16 lerp_from_grad;  // all lanes or none
};

FUSEDREG_TARGET_AVX512 inline AdamWAvx512Scalars avx512_scalars(const AdamWScalars<float>& s) {
  AdamWAvx512Scalars c;
  c.decay = _mm512_set1_ps(s.decay);
  c.lerp_coef = _mm512_set1_ps(s.lerp_coef);
  c.beta2 = _mm512_set1_ps(s.beta2);
  c.one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2);
  c.step_size = _mm512_set1_ps(s.step_size);
  c.bias_correction2_sqrt = _mm512_set1_ps(s.bias_correction2_sqrt);
  c.eps = _mm512_set1_ps(s.eps);
  c.grad_scale = _mm512_set1_ps(s.grad_scale);
  c.grad_inv_scale = _mm512_set1_ps(s.grad_inv_scale);
  c.grad_coef = _mm512_set1_ps(s.grad_coef);
  c.lerp_from_grad = s.lerp_from_grad ? __mmask16(0xFFFF) : __mmask16(0);
  return c;
}

// How a chunk's gradients are scaled (adamw_moments' first line): divided by grad_scale then
// multiplied by grad_coef; multiplied by grad_inv_scale and grad_coef; or used as they are when
// both factors are 1 (x * 1 is x: every later use of grad is an operation that rounds, quiets a
// NaN and treats a subnormal as MXCSR says anyway, so skipping the two products changes no bit).
enum class GradScaling { kDivide, kMultiply, kNone };

// One vector of the update: adamw_moments then adamw_param (csrc/adamw.h), operation for
// operation. vmax is used only when kAmsgrad.
// When kSR, bfloat16 tensors are rounded stochastically with the random words `a` (param: low
// halves, exp_avg: high halves) and `b` (exp_avg_sq: low, max_exp_avg_sq: high) of these lanes.
template <bool kAmsgrad, GradScaling kScaling, bool kFull, bool kSR = false, typename param_t, typename state_t>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void adamw_vector_avx512(param_t* p, const param_t* g, state_t* m,
                                                                       state_t* v, state_t* vmax, __mmask16 k,
                                                                       const AdamWAvx512Scalars& c,
                                                                       __m512i a = __m512i{}, __m512i b = __m512i{}) {
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  __m512 param = avx512_load<kFull>(p, k);
  __m512 grad = avx512_load<kFull>(g, k);
  __m512 exp_avg = avx512_load<kFull>(m, k);
  __m512 exp_avg_sq = avx512_load<kFull>(v, k);
  if constexpr (kScaling == GradScaling::kDivide) grad = avx512_mul(avx512_div(grad, c.grad_scale), c.grad_coef);
  if constexpr (kScaling == GradScaling::kMultiply) {
    grad = avx512_mul(avx512_mul(grad, c.grad_inv_scale), c.grad_coef);
  }
  param = avx512_mul(param, c.decay);
  // adamw_lerp: base + lerp_coef * (grad - exp_avg), base = grad or exp_avg
  const __m512 base = _mm512_mask_blend_ps(c.lerp_from_grad, exp_avg, grad);
  exp_avg = avx512_add(base, avx512_mul(c.lerp_coef, avx512_sub(grad, exp_avg)));
  exp_avg_sq = avx512_add(avx512_mul(exp_avg_sq, c.beta2), avx512_mul(avx512_mul(c.one_minus_beta2, grad), grad));
  avx512_store_as<kFull, kSR>(m, k, exp_avg, _mm512_srli_epi32(a, 16));  // before the long division chain
  avx512_store_as<kFull, kSR>(v, k, exp_avg_sq, _mm512_and_si512(b, low16));
  __m512 second = exp_avg_sq;
  if constexpr (kAmsgrad) {  // adamw_nan_max(max_exp_avg_sq, exp_avg_sq)
    const __m512 old_max = avx512_load<kFull>(vmax, k);
    const __mmask16 take_old = _mm512_cmp_ps_mask(old_max, exp_avg_sq, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(old_max, old_max, _CMP_UNORD_Q);
    second = _mm512_mask_blend_ps(take_old, exp_avg_sq, old_max);
    avx512_store_as<kFull, kSR>(vmax, k, second, _mm512_srli_epi32(b, 16));
  }
  // adamw_param: decayed_param - step_size * exp_avg / (sqrt(second) / bias_correction2_sqrt + eps)
  const __m512 denom = avx512_add(avx512_div(avx512_sqrt(second), c.bias_correction2_sqrt), c.eps);
  param = avx512_sub(param, avx512_div(avx512_mul(c.step_size, exp_avg), denom));
  avx512_store_as<kFull, kSR>(p, k, param, _mm512_and_si512(a, low16));
}

template <bool kAmsgrad, GradScaling kScaling, typename param_t, typename state_t>
FUSEDREG_TARGET_AVX512 void adamw_loop_avx512(param_t* p, const param_t* g, state_t* m, state_t* v, state_t* vmax,
                                              int64_t n, const AdamWAvx512Scalars& scalars) {
  const AdamWAvx512Scalars c = scalars;  // a local copy: the stores below cannot alias it
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    adamw_vector_avx512<kAmsgrad, kScaling, true>(p + i, g + i, m + i, v + i, kAmsgrad ? vmax + i : vmax,
                                                   __mmask16(0xFFFF), c);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    adamw_vector_avx512<kAmsgrad, kScaling, false>(p + i, g + i, m + i, v + i, kAmsgrad ? vmax + i : vmax, k, c);
  }
}

// adamw_loop_avx512 with stochastic rounding: 32 elements (8 element groups) per step, their words
// A (and B when the states are bfloat16) computed in registers first. n elements from element
// `first` (first % 4 == 0) of tensor `tensor_id`'s stream.
template <bool kAmsgrad, GradScaling kScaling, typename param_t, typename state_t>
FUSEDREG_TARGET_AVX512 void adamw_loop_sr_avx512(param_t* p, const param_t* g, state_t* m, state_t* v,
                                                 state_t* vmax, int64_t n, const AdamWAvx512Scalars& scalars,
                                                 const PhiloxKeys& sr_keys, uint32_t tensor_id, int64_t first) {
  constexpr bool kStateSR = std::is_same_v<state_t, c10::BFloat16>;
  const AdamWAvx512Scalars c = scalars;
  const PhiloxKeys keys = sr_keys;  // local copies: the stores below cannot alias them
  const __m512i id = _mm512_set1_epi64(tensor_id);
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < n; i += 32) {
    const __m512i groups = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>((first + i) / 4)), lanes);
    __m512i a_lo, a_hi, b_lo = _mm512_setzero_si512(), b_hi = b_lo;
    sr_words_avx512(keys, groups, id, 0, a_lo, a_hi);
    if constexpr (kStateSR) sr_words_avx512(keys, groups, id, 1, b_lo, b_hi);
    state_t* vmax_i = kAmsgrad ? vmax + i : vmax;
    state_t* vmax_j = kAmsgrad ? vmax + i + 16 : vmax;
    if (i + 32 <= n) {
      adamw_vector_avx512<kAmsgrad, kScaling, true, true>(p + i, g + i, m + i, v + i, vmax_i, __mmask16(0xFFFF), c,
                                                          a_lo, b_lo);
      adamw_vector_avx512<kAmsgrad, kScaling, true, true>(p + i + 16, g + i + 16, m + i + 16, v + i + 16, vmax_j,
                                                          __mmask16(0xFFFF), c, a_hi, b_hi);
    } else {  // the last 1..31 elements, under lane masks
      const int64_t rest = n - i;
      const __mmask16 k0 = rest >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rest) - 1u);
      adamw_vector_avx512<kAmsgrad, kScaling, false, true>(p + i, g + i, m + i, v + i, vmax_i, k0, c, a_lo, b_lo);
      if (rest > 16) {
        const __mmask16 k1 = static_cast<__mmask16>((1u << (rest - 16)) - 1u);
        adamw_vector_avx512<kAmsgrad, kScaling, false, true>(p + i + 16, g + i + 16, m + i + 16, v + i + 16, vmax_j,
                                                             k1, c, a_hi, b_hi);
      }
    }
  }
}

// adamw_loop_avx512 or, when kSR, adamw_loop_sr_avx512.
template <bool kAmsgrad, bool kSR, GradScaling kScaling, typename param_t, typename state_t>
FUSEDREG_TARGET_AVX512 FUSEDREG_ALWAYS_INLINE void adamw_loop_any_avx512(param_t* p, const param_t* g, state_t* m,
                                                                         state_t* v, state_t* vmax, int64_t n,
                                                                         const AdamWAvx512Scalars& c,
                                                                         const PhiloxKeys& sr_keys,
                                                                         uint32_t tensor_id, int64_t first) {
  if constexpr (kSR) {
    adamw_loop_sr_avx512<kAmsgrad, kScaling>(p, g, m, v, vmax, n, c, sr_keys, tensor_id, first);
  } else {
    adamw_loop_avx512<kAmsgrad, kScaling>(p, g, m, v, vmax, n, c);
  }
}

// Contract: updates n elements of one tensor's chunk in place (p, m, v and, when kAmsgrad, vmax;
// g read), exactly as the portable loops of adamw.cpp do. Call only where cpu_isa() is kAvx512.
// When kSR, every bfloat16 tensor is rounded stochastically with the words of elements first ..
// first + n - 1 (first % 4 == 0) of tensor tensor_id under the seed's round keys sr_keys.
template <bool kAmsgrad, bool kSR, typename param_t, typename state_t>
FUSEDREG_TARGET_AVX512 void adamw_chunk_avx512(param_t* p, const param_t* g, state_t* m, state_t* v, state_t* vmax,
                                               int64_t n, const AdamWScalars<float>& scalars,
                                               const PhiloxKeys& sr_keys, uint32_t tensor_id, int64_t first) {
  const AdamWAvx512Scalars c = avx512_scalars(scalars);
  if (scalars.grad_divide) {
    adamw_loop_any_avx512<kAmsgrad, kSR, GradScaling::kDivide>(p, g, m, v, vmax, n, c, sr_keys, tensor_id, first);
  } else if (scalars.grad_inv_scale == 1.0f && scalars.grad_coef == 1.0f) {
    adamw_loop_any_avx512<kAmsgrad, kSR, GradScaling::kNone>(p, g, m, v, vmax, n, c, sr_keys, tensor_id, first);
  } else {
    adamw_loop_any_avx512<kAmsgrad, kSR, GradScaling::kMultiply>(p, g, m, v, vmax, n, c, sr_keys, tensor_id, first);
  }
}

#endif  // FUSEDREG_X86_SIMD

}  // namespace
}  // namespace fusedreg
