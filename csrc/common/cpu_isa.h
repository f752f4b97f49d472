// Run-time choice of the CPU kernels' instruction set, like ATen's CPU capability.
//
// The CPU library is compiled once for the baseline x86-64 (SSE2) ISA; kernels that gain from wider
// vectors are compiled again inside functions marked FUSEDREG_TARGET_AVX2 / FUSEDREG_TARGET_AVX512
// and picked per call by cpu_isa(): the best level this CPU supports, capped by the environment
// variable FUSEDREG_CPU_CAPABILITY ("default", "avx2" or "avx512", the names ATen's
// ATEN_CPU_CAPABILITY uses), so that tests can run every level on one machine and a user can rule
// out a SIMD path. An unknown value is ignored (the best level is used). Non-x86 builds always get
// kDefault: the portable kernels.
//
// Dropout computes the same bits at every level (integer Philox, one multiply per element, the
// same bf16 rounding). BatchNorm's loops are the same source at every level, so their sums are
// added in the same order, but the compiler may fuse a multiply-add where AVX2 / AVX-512 have one:
// its results may differ between levels in the last bit, never between thread counts.
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDREG_X86_SIMD 1
#define FUSEDREG_TARGET_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt")))
#define FUSEDREG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2,popcnt")))
#define FUSEDREG_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,bmi,bmi2,popcnt")))
#else
#define FUSEDREG_X86_SIMD 0
#define FUSEDREG_TARGET_AVX2
#define FUSEDREG_TARGET_AVX512
#define FUSEDREG_TARGET_AVX512BF16
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FUSEDREG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FUSEDREG_ALWAYS_INLINE inline
#endif

namespace fusedreg {

enum class CpuIsa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level this CPU and OS support (cached: CPUID does not change while a process runs).
inline CpuIsa cpu_isa_supported() {
#if FUSEDREG_X86_SIMD
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) {
      return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) return CpuIsa::kAvx2;
    return CpuIsa::kDefault;
  }();
  return best;
#else
  return CpuIsa::kDefault;
#endif
}

// AVX512_BF16 on top of the AVX-512 level (Zen 4, Cooper Lake, Sapphire Rapids and later): not a
// level of its own, only a faster float -> bfloat16 narrowing inside AVX-512 loops, whose results
// are the same bits (cpu_vec::to_bf16x16_avx512bf16), so it needs no switch of its own.
inline bool cpu_has_avx512bf16() {
#if FUSEDREG_X86_SIMD
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
#else
  return false;
#endif
}

// The level a kernel should use now: cpu_isa_supported(), capped by FUSEDREG_CPU_CAPABILITY.
// Read on every call (a getenv per op is negligible next to any kernel worth vectorizing), so a
// test can switch levels within one process.
inline CpuIsa cpu_isa() {
  const CpuIsa best = cpu_isa_supported();
  const char* cap = std::getenv("FUSEDREG_CPU_CAPABILITY");
  if (cap == nullptr) return best;
  CpuIsa wanted = best;
  if (std::strcmp(cap, "default") == 0) {
    wanted = CpuIsa::kDefault;
  } else if (std::strcmp(cap, "avx2") == 0) {
    wanted = CpuIsa::kAvx2;
  } else if (std::strcmp(cap, "avx512") == 0) {
    wanted = CpuIsa::kAvx512;
  }
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace fusedreg
