// The CPU BatchNorm elementwise pass for bfloat16 on CPUs with AVX512_BF16 (included by
// batch_norm_cpu_isa.h, which picks it inside the AVX-512 level when cpu_has_avx512bf16()).
//
// Algorithm: batch_norm_cpu_loops.h's run_apply / rows_apply_loop written with explicit 16-lane
// registers: widen on load (a 16-bit shift), the same bn_cpu::formula in float, narrow with
// cpu_vec::to_bf16x16_avx512bf16 (vcvtneps2bf16, or c10's formula for a vector holding a NaN or
// a denormal), a masked load / store for each run's or row's tail.
//
// Trade-off: on bfloat16 the pass is bound by instructions, not bytes, while its data sits in
// cache: c10's round-to-nearest-even is 8 vector instructions per 16 elements, the conversion
// instruction plus its vfpclassps check 2 (measured on one Zen 4 core, 1.6M elements in L3:
// 0.133 -> 0.097 ns per element; out of cache 0.162 -> 0.149). The bits are the same, so the
// results do not depend on which CPU ran the pass; the float arithmetic is the formula the
// AVX-512 level compiles for float32 (tests compare the two).
#pragma once

#include <cstdint>

#include "batch_norm_cpu_apply.h"
#include "common/cpu_isa.h"
#include "common/cpu_vec.h"

namespace fusedreg {
namespace bn_cpu {

#if FUSEDREG_X86_SIMD

// 16 values from p widened to float: all of them, or the `live` lanes (the others zero).
FUSEDREG_TARGET_AVX512BF16 FUSEDREG_ALWAYS_INLINE __m512 load_bf16x16(__mmask16 live, bool full, const uint16_t* p) {
  return full ? cpu_vec::load_bf16x16(p) : cpu_vec::maskz_load_bf16x16(live, p);
}

// 16 lanes of formula<kPass> on widened x[i..] and dy[i..] (a pointer the pass does not read may be
// null: zeros, not loaded, no offset applied to it).
template <Pass kPass>
FUSEDREG_TARGET_AVX512BF16 FUSEDREG_ALWAYS_INLINE __m256i apply_bf16x16(__mmask16 live, bool full, const uint16_t* x,
                                                                    const uint16_t* dy, int64_t i, __m512 m,
                                                                    __m512 a, __m512 b, __m512 k) {
  const __m512 xv = kPass != Pass::kBackwardEval ? load_bf16x16(live, full, x + i) : _mm512_setzero_ps();
  const __m512 gv = kPass != Pass::kForward ? load_bf16x16(live, full, dy + i) : _mm512_setzero_ps();
  return cpu_vec::to_bf16x16_avx512bf16(formula<kPass>(xv, gv, m, a, b, k));
}

// One run of n elements of one channel (run_apply).
template <Pass kPass>
FUSEDREG_TARGET_AVX512BF16 FUSEDREG_ALWAYS_INLINE void run_apply_bf16(const uint16_t* x, const uint16_t* dy,
                                                                  uint16_t* out, int64_t n, float m, float a,
                                                                  float b, float k) {
  const __m512 vm = _mm512_set1_ps(m), va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), vk = _mm512_set1_ps(k);
  int64_t i = 0;
  for (; n - i >= 16; i += 16) {
    const __m256i r = apply_bf16x16<kPass>(0xFFFF, true, x, dy, i, vm, va, vb, vk);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), r);
  }
  if (i < n) {
    const __mmask16 live = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(out + i, live, apply_bf16x16<kPass>(live, false, x, dy, i, vm, va, vb, vk));
  }
}

// Planes p0, p0 + step, ... below p1 of a planes layout (planes_apply_impl).
template <Pass kPass>
FUSEDREG_TARGET_AVX512BF16 void planes_apply_avx512bf16(const uint16_t* x, const uint16_t* dy, uint16_t* out,
                                                        const BatchNormLayout* L, int64_t p0, int64_t p1,
                                                        int64_t step, const float* m, const float* a,
                                                        const float* b, const float* k) {
  for (int64_t p = p0; p < p1; p += step) {
    const int64_t c = p % L->channels;
    const int64_t e = p * L->inner;
    run_apply_bf16<kPass>(x ? x + e : nullptr, dy ? dy + e : nullptr, out + e, L->inner, m[c], a[c], b[c], k[c]);
  }
}

// Rows [r0, r1) of a [rows, C] matrix, coefficients as [C] arrays (rows_apply_loop).
template <Pass kPass>
FUSEDREG_TARGET_AVX512BF16 void rows_apply_avx512bf16(const uint16_t* x, const uint16_t* dy, uint16_t* out,
                                                      int64_t C, int64_t r0, int64_t r1, const float* m,
                                                      const float* a, const float* b, const float* k) {
  const int64_t whole = C - C % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (C % 16)) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * C;
    for (int64_t c = 0; c < whole; c += 16) {
      const __m256i v = apply_bf16x16<kPass>(0xFFFF, true, x, dy, base + c, _mm512_loadu_ps(m + c),
                                             _mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), _mm512_loadu_ps(k + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + base + c), v);
    }
    if (tail != 0) {
      const __m256i v = apply_bf16x16<kPass>(tail, false, x, dy, base + whole, _mm512_maskz_loadu_ps(tail, m + whole),
                                             _mm512_maskz_loadu_ps(tail, a + whole),
                                             _mm512_maskz_loadu_ps(tail, b + whole),
                                             _mm512_maskz_loadu_ps(tail, k + whole));
      _mm256_mask_storeu_epi16(out + base + whole, tail, v);
    }
  }
}

#endif  // FUSEDREG_X86_SIMD

}  // namespace bn_cpu
}  // namespace fusedreg
