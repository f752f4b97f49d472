// The run-time entry points of the CPU BatchNorm inner loops (batch_norm_cpu_loops.h): each loop
// is instantiated inside FUSEDREG_TARGET_AVX512 / _AVX2 functions and a plain one, and
// channels_sum / rows_sum / planes_apply / rows_apply call the copy for the level they are given
// (csrc/common/cpu_isa.h picks it once per process); bfloat16's elementwise passes run
// batch_norm_cpu_bf16.h's loops instead at the AVX-512 level on CPUs with AVX512_BF16. Included by
// batch_norm.cpp and batch_norm_stats.cpp.
#pragma once

#include <type_traits>

#include "batch_norm_cpu_apply.h"
#include "batch_norm_cpu_bf16.h"
#include "batch_norm_cpu_loops.h"

namespace fusedreg {
namespace bn_cpu {

// FUSEDREG_BN_ISA_ENTRY(NAME, template params, template args, (params), (args)): NAME##_avx512,
// NAME##_avx2 and NAME##_default, each NAME##_impl compiled at that level.
#define FUSEDREG_BN_ISA_ENTRY(NAME, TPARAMS, TARGS, PARAMS, ARGS)                   \
  template <TPARAMS>                                                                \
  FUSEDREG_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_impl<64, TARGS> ARGS; }  \
  template <TPARAMS>                                                                \
  FUSEDREG_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_impl<32, TARGS> ARGS; }      \
  template <TPARAMS>                                                                \
  void NAME##_default PARAMS { NAME##_impl<16, TARGS> ARGS; }

// Channels [c0, c1) of a planes layout: out[k][c] for each (out: K arrays of C).
template <int kBytes, Term kTerm, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void channels_sum_impl(const scalar_t* x, const scalar_t* dy, const BatchNormLayout* L,
                                              int64_t c0, int64_t c1, const acc_t<scalar_t>* m,
                                              acc_t<scalar_t>* const* out) {
  for (int64_t c = c0; c < c1; ++c) {
    acc_t<scalar_t> sums[2];
    channel_sum<kBytes, kTerm>(x, dy, *L, c, m[c], sums);
    for (int k = 0; k < kSums<kTerm>; ++k) out[k][c] = sums[k];
  }
}

template <int kBytes, Term kTerm, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void rows_sum_impl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t r0, int64_t r1,
                                          const acc_t<scalar_t>* m, acc_t<scalar_t>* part) {
  rows_sum_loop<kBytes, kTerm>(x, dy, C, r0, r1, m, part);
}

// Planes p0, p0 + step, ... below p1 of a planes layout (step 1: a run of planes; step C: one
// channel's planes).
template <int kBytes, Pass kPass, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void planes_apply_impl(const scalar_t* x, const scalar_t* dy, scalar_t* out,
                                              const BatchNormLayout* L, int64_t p0, int64_t p1, int64_t step,
                                              const acc_t<scalar_t>* m, const acc_t<scalar_t>* a,
                                              const acc_t<scalar_t>* b, const acc_t<scalar_t>* k) {
  for (int64_t p = p0; p < p1; p += step) {
    const int64_t c = p % L->channels;
    const int64_t e = p * L->inner;
    run_apply<kPass>(x ? x + e : nullptr, dy ? dy + e : nullptr, out + e, L->inner, m[c], a[c], b[c], k[c]);
  }
}

template <int kBytes, Pass kPass, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void rows_apply_impl(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C,
                                            int64_t r0, int64_t r1, const acc_t<scalar_t>* m,
                                            const acc_t<scalar_t>* a, const acc_t<scalar_t>* b,
                                            const acc_t<scalar_t>* k) {
  rows_apply_loop<kPass>(x, dy, out, C, r0, r1, m, a, b, k);
}

#define FUSEDREG_BN_COMMA ,
FUSEDREG_BN_ISA_ENTRY(channels_sum, Term kTerm FUSEDREG_BN_COMMA typename scalar_t, kTerm FUSEDREG_BN_COMMA scalar_t,
                      (const scalar_t* x, const scalar_t* dy, const BatchNormLayout* L, int64_t c0, int64_t c1,
                       const acc_t<scalar_t>* m, acc_t<scalar_t>* const* out),
                      (x, dy, L, c0, c1, m, out))
FUSEDREG_BN_ISA_ENTRY(rows_sum, Term kTerm FUSEDREG_BN_COMMA typename scalar_t, kTerm FUSEDREG_BN_COMMA scalar_t,
                      (const scalar_t* x, const scalar_t* dy, int64_t C, int64_t r0, int64_t r1,
                       const acc_t<scalar_t>* m, acc_t<scalar_t>* part),
                      (x, dy, C, r0, r1, m, part))
FUSEDREG_BN_ISA_ENTRY(planes_apply, Pass kPass FUSEDREG_BN_COMMA typename scalar_t, kPass FUSEDREG_BN_COMMA scalar_t,
                      (const scalar_t* x, const scalar_t* dy, scalar_t* out, const BatchNormLayout* L, int64_t p0,
                       int64_t p1, int64_t step, const acc_t<scalar_t>* m, const acc_t<scalar_t>* a,
                       const acc_t<scalar_t>* b, const acc_t<scalar_t>* k),
                      (x, dy, out, L, p0, p1, step, m, a, b, k))
FUSEDREG_BN_ISA_ENTRY(rows_apply, Pass kPass FUSEDREG_BN_COMMA typename scalar_t, kPass FUSEDREG_BN_COMMA scalar_t,
                      (const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t r0, int64_t r1,
                       const acc_t<scalar_t>* m, const acc_t<scalar_t>* a, const acc_t<scalar_t>* b,
                       const acc_t<scalar_t>* k),
                      (x, dy, out, C, r0, r1, m, a, b, k))
#undef FUSEDREG_BN_COMMA

// The entry points: each runs its _impl at level isa.
#if FUSEDREG_X86_SIMD
#define FUSEDREG_BN_CALL_AT(ISA, NAME, ...)                          \
  ((ISA) == CpuIsa::kAvx512 ? NAME##_avx512<__VA_ARGS__>             \
   : (ISA) == CpuIsa::kAvx2 ? NAME##_avx2<__VA_ARGS__> : NAME##_default<__VA_ARGS__>)
#else
#define FUSEDREG_BN_CALL_AT(ISA, NAME, ...) NAME##_default<__VA_ARGS__>
#endif

template <Term kTerm, typename scalar_t>
void channels_sum(CpuIsa isa, const scalar_t* x, const scalar_t* dy, const BatchNormLayout& L, int64_t c0,
                  int64_t c1, const acc_t<scalar_t>* m, acc_t<scalar_t>* const* out) {
  FUSEDREG_BN_CALL_AT(isa, channels_sum, kTerm, scalar_t)(x, dy, &L, c0, c1, m, out);
}

template <Term kTerm, typename scalar_t>
void rows_sum(CpuIsa isa, const scalar_t* x, const scalar_t* dy, int64_t C, int64_t r0, int64_t r1,
              const acc_t<scalar_t>* m, acc_t<scalar_t>* part) {
  FUSEDREG_BN_CALL_AT(isa, rows_sum, kTerm, scalar_t)(x, dy, C, r0, r1, m, part);
}

template <Pass kPass, typename scalar_t>
void planes_apply(CpuIsa isa, const scalar_t* x, const scalar_t* dy, scalar_t* out, const BatchNormLayout& L,
                  int64_t p0, int64_t p1, int64_t step, const acc_t<scalar_t>* m, const acc_t<scalar_t>* a,
                  const acc_t<scalar_t>* b, const acc_t<scalar_t>* k) {
#if FUSEDREG_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (isa == CpuIsa::kAvx512 && cpu_has_avx512bf16()) {
      return planes_apply_avx512bf16<kPass>(reinterpret_cast<const uint16_t*>(x),
                                            reinterpret_cast<const uint16_t*>(dy), reinterpret_cast<uint16_t*>(out),
                                            &L, p0, p1, step, m, a, b, k);
    }
  }
#endif
  FUSEDREG_BN_CALL_AT(isa, planes_apply, kPass, scalar_t)(x, dy, out, &L, p0, p1, step, m, a, b, k);
}

template <Pass kPass, typename scalar_t>
void rows_apply(CpuIsa isa, const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t r0,
                int64_t r1, const acc_t<scalar_t>* m, const acc_t<scalar_t>* a, const acc_t<scalar_t>* b,
                const acc_t<scalar_t>* k) {
#if FUSEDREG_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (isa == CpuIsa::kAvx512 && cpu_has_avx512bf16()) {
      return rows_apply_avx512bf16<kPass>(reinterpret_cast<const uint16_t*>(x),
                                          reinterpret_cast<const uint16_t*>(dy), reinterpret_cast<uint16_t*>(out),
                                          C, r0, r1, m, a, b, k);
    }
  }
#endif
  FUSEDREG_BN_CALL_AT(isa, rows_apply, kPass, scalar_t)(x, dy, out, C, r0, r1, m, a, b, k);
}
#undef FUSEDREG_BN_CALL_AT

}  // namespace bn_cpu
}  // namespace fusedreg
