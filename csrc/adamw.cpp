// CPU kernel of fusedreg::adamw_step_: one AdamW step over a list of tensors (the optimizer-offload
// case: parameters and states in host memory).
//
// Algorithm: the list is cut into the chunks of csrc/common/multi_tensor.cuh (65536 elements, the
// CUDA kernel's chunks); each chunk table is one at::parallel_for over its chunks, and a chunk is
// updated in one pass over memory: p, g, m, v (and max_v) are read once and written once (28 bytes
// per fp32 parameter, the minimum), in fp32 (fp64 for float64 params) by adamw_moments and
// adamw_param (adamw.h, shared with the CUDA kernel), each element rounded once to its dtype. The
// per-tensor scalars (bias corrections, step size) are computed once per tensor in double, as torch
// computes them in Python floats.
//
// Vectorization without intrinsics for the arithmetic: a chunk is updated kBlock elements at a time
// by plain loops the compiler vectorizes: the first half of the update with the converting loads,
// then the square roots, which the compiler will not vectorize (std::sqrt may set errno) and are an
// explicit SIMD call, then the second half with the parameter's converting store, then the 16-bit
// moments' converting stores (which, fused into the update, would defeat the vectorizer; float16
// loads are staged likewise). On x86-64 Linux with GCC the chunk function is also compiled for AVX2
// and picked at load time. No FMA anywhere, so all paths round alike and results do not depend on
// the CPU, the thread count or where a vector loop's tail begins.
//
// Stochastic rounding (sr_seed given, kSR): a block's Philox words (csrc/adamw.h's layout: a block
// starts on a multiple of four elements, so it holds whole element groups) are computed in a loop
// of their own before the stores, which then round bfloat16 tensors by adamw_sr_bf16_bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "adamw.h"
#include "common/multi_tensor.cuh"

namespace fusedreg {
namespace {

constexpr int64_t kAdamWChunkSize = 65536;

constexpr int kBlock = 64;  // elements per stage (in L1); measured best of 32..1024 on AVX2

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
// One copy of the chunk loop for AVX2 and one for the x86-64 baseline (SSE2), picked once at load
// time. Not "fma": the compiler would then contract multiply-adds differently in vector bodies and
// scalar tails, and results would depend on where a chunk's vector body ends.
#define FUSEDREG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FUSEDREG_CPU_CLONES
#endif

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
// first element.
struct SRStream {
  PhiloxKeys keys{};
  uint32_t tensor_id = 0;
  int64_t first = 0;
};

// Philox4x32-10 rounds (csrc/common/philox.h) over n counters held as four arrays, in place.
// AVX2 where the CPU has it: 8 counters per vector, the 32 x 32 -> 64-bit products by
// _mm256_mul_epu32 on the even and odd lanes (the compiler does not vectorize the widening
// multiplies itself, and one counter at a time the rounds cost ~10x the rest of the update).
void philox_rounds_scalar(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, int n, const PhiloxKeys& keys) {
  for (int q = 0; q < n; ++q) {
    const Philox4x32Words w = philox4x32_10(c0[q], c1[q], c2[q], c3[q], keys);
    c0[q] = w.w[0];
    c1[q] = w.w[1];
    c2[q] = w.w[2];
    c3[q] = w.w[3];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDREG_ADAMW_AVX2_PHILOX 1

// (hi, lo) 32-bit halves of m * x for eight uint32 lanes x.
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i x, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);                        // lanes 0, 2, 4, 6 as 64 bits
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void philox_rounds_avx2(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3,
                                                        int n, const PhiloxKeys& keys) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  int q = 0;
  for (; q + 8 <= n; q += 8) {
    // (no lambdas here: they would not inherit the avx2 target)
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + q));
    __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + q));
    __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c2 + q));
    __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c3 + q));
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(x0, m0, hi0, lo0);
      mulhilo_avx2(x2, m1, hi1, lo1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(keys.k0[round])));
      x1 = lo1;
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(keys.k1[round])));
      x3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c0 + q), x0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c1 + q), x1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c2 + q), x2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c3 + q), x3);
  }
  philox_rounds_scalar(c0 + q, c1 + q, c2 + q, c3 + q, n - q, keys);
}

bool cpu_has_avx2() {
  static const bool has_avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has_avx2;
}
#endif

// Words A (pair 0) or B (pair 1) of the kBlock elements from `first` (first % 4 == 0) into words.
void sr_block_words(const SRStream& sr, int64_t first, uint32_t pair, uint32_t* words) {
  constexpr int kGroups = kBlock / 4;
  uint32_t c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int q = 0; q < kGroups; ++q) {
    const uint64_t group = static_cast<uint64_t>(first) / 4 + q;
    c0[q] = static_cast<uint32_t>(group);
    c1[q] = static_cast<uint32_t>(group >> 32);
    c2[q] = sr.tensor_id;
    c3[q] = pair;
  }
#if defined(FUSEDREG_ADAMW_AVX2_PHILOX)
  if (cpu_has_avx2()) {
    philox_rounds_avx2(c0, c1, c2, c3, kGroups, sr.keys);
  } else {
    philox_rounds_scalar(c0, c1, c2, c3, kGroups, sr.keys);
  }
#else
  philox_rounds_scalar(c0, c1, c2, c3, kGroups, sr.keys);
#endif
  for (int q = 0; q < kGroups; ++q) {
    words[4 * q] = c0[q];
    words[4 * q + 1] = c1[q];
    words[4 * q + 2] = c2[q];
    words[4 * q + 3] = c3[q];
  }
}

// An operand's block as the update loop reads it: the tensor itself (converted in the loop), or for
// float16, whose conversion fused into the loop defeats the vectorizer, converted first by a loop
// of its own into a staging array.
template <typename T, typename acc>
struct BlockInput {
  static constexpr bool kStaged = std::is_same_v<T, c10::Half>;
  const T* tensor;
  acc staging[kStaged ? kBlock : 1];

  auto in(int64_t base, int n) {
    if constexpr (kStaged) {
      const T* __restrict src = tensor + base;
      for (int i = 0; i < n; ++i) staging[i] = to_acc(src[i]);
      return static_cast<const acc*>(staging);
    } else {
      return tensor + base;
    }
  }
};

// Updates n elements in place, kBlock at a time: the first half of the update (adamw_moments, with
// converting loads), SIMD square roots, the second half (adamw_param, with the converting store of
// the parameter), then the staged moments' stores. Every loop vectorizes. vmax is used only when
// kAmsgrad.
template <bool kAmsgrad, bool kSR, typename param_t, typename state_t>
FUSEDREG_CPU_CLONES void adamw_chunk_cpu(param_t* p, const param_t* g, state_t* m, state_t* v, state_t* vmax,
                                         int64_t n, const AdamWScalars<acc_t<param_t>>& scalars,
                                         const SRStream& sr) {
  constexpr bool kParamSR = kSR && std::is_same_v<param_t, c10::BFloat16>;
  constexpr bool kStateSR = kSR && std::is_same_v<state_t, c10::BFloat16>;
  uint32_t word_a[kSR ? kBlock : 1], word_b[kStateSR ? kBlock : 1];
  using acc = acc_t<param_t>;
  const AdamWScalars<acc> s = scalars;  // a local copy: the stores below cannot alias it
  acc decayed[kBlock], root[kBlock];
  BlockInput<param_t, acc> param_input{p}, grad_input{g};
  BlockInput<state_t, acc> exp_avg_input{m}, exp_avg_sq_input{v}, max_exp_avg_sq_input{vmax};
  BlockOperand<state_t, acc> exp_avg_block{m}, exp_avg_sq_block{v}, max_exp_avg_sq_block{vmax};
  for (int64_t base = 0; base < n; base += kBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kBlock, n - base));
    // Distinct tensors or distinct arrays, except an operand's loads and its own stores at the
    // same index (unstaged operands), which the compiler sees as the same address.
    const auto p_in = param_input.in(base, len);
    const auto g_in = grad_input.in(base, len);
    const auto m_in = exp_avg_input.in(base, len);
    const auto v_in = exp_avg_sq_input.in(base, len);
    const auto vmax_in = kAmsgrad ? max_exp_avg_sq_input.in(base, len) : nullptr;
    acc* exp_avg = exp_avg_block.out(base);
    acc* exp_avg_sq = exp_avg_sq_block.out(base);
    acc* max_exp_avg_sq = kAmsgrad ? max_exp_avg_sq_block.out(base) : nullptr;
    auto moments = [&](auto divide_grad) {
      for (int i = 0; i < len; ++i) {
        acc param = to_acc(p_in[i]);
        acc m_i = to_acc(m_in[i]);
        acc v_i = to_acc(v_in[i]);
        acc max_i = kAmsgrad ? to_acc(vmax_in[i]) : acc(0);
        root[i] = adamw_moments<kAmsgrad, decltype(divide_grad)::value>(param, to_acc(g_in[i]), m_i, v_i, max_i, s);
        decayed[i] = param;
        exp_avg[i] = m_i;
        exp_avg_sq[i] = v_i;
        if constexpr (kAmsgrad) max_exp_avg_sq[i] = max_i;
      }
    };
    if (s.grad_divide) {
      moments(std::true_type{});
    } else {
      moments(std::false_type{});
    }
    sqrt_inplace(root, len);
    param_t* p_out = p + base;
    if constexpr (kSR) {  // a whole block's words, also for a shorter last block
      sr_block_words(sr, sr.first + base, 0, word_a);
      if constexpr (kStateSR) sr_block_words(sr, sr.first + base, 1, word_b);
    }
    if constexpr (kParamSR) {
      for (int i = 0; i < len; ++i) {
        store_acc_sr(p_out[i], adamw_param(decayed[i], exp_avg[i], root[i], s), word_a[i] & 0xFFFFu);
      }
    } else {
      for (int i = 0; i < len; ++i) store_acc(p_out[i], adamw_param(decayed[i], exp_avg[i], root[i], s));
    }
    if constexpr (kStateSR) {
      exp_avg_block.store_sr(base, len, word_a, 16);
      exp_avg_sq_block.store_sr(base, len, word_b, 0);
      if constexpr (kAmsgrad) max_exp_avg_sq_block.store_sr(base, len, word_b, 16);
    } else {
      exp_avg_block.store(base, len);
      exp_avg_sq_block.store(base, len);
      if constexpr (kAmsgrad) max_exp_avg_sq_block.store(base, len);
    }
  }
}

template <int Depth, bool kSR, typename param_t, typename state_t>
void adamw_step_cpu_typed(const std::array<at::TensorList, Depth>& lists,
                          const std::vector<AdamWScalars<acc_t<param_t>>>& scalars, const int64_t* sr_seed,
                          at::IntArrayRef sr_tensor_ids) {
  constexpr bool kAmsgrad = Depth == 5;
  for_each_table<Depth>(lists, kAdamWChunkSize, [&](const MultiTensorTable<Depth>& table) {
    int64_t elements = 0;
    for (int b = 0; b < table.num_blocks; ++b) elements += table.chunk_of(b).size;
    // Tables of many tiny tensors run on one thread rather than pay a fork per few elements.
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE * table.num_blocks / std::max<int64_t>(1, elements));
    at::parallel_for(0, table.num_blocks, grain, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        const MultiTensorChunk chunk = table.chunk_of(static_cast<int>(block));
        SRStream sr;
        if constexpr (kSR) {
          sr.keys = philox_keys(static_cast<uint64_t>(*sr_seed));
          sr.tensor_id = adamw_sr_tensor_id(sr_tensor_ids, static_cast<size_t>(chunk.tensor));
          sr.first = chunk.begin;
        }
        adamw_chunk_cpu<kAmsgrad, kSR>(table.template chunk_data<param_t>(0, chunk),
                                  table.template chunk_data<const param_t>(1, chunk),
                                  table.template chunk_data<state_t>(2, chunk),
                                  table.template chunk_data<state_t>(3, chunk),
                                  kAmsgrad ? table.template chunk_data<state_t>(Depth - 1, chunk) : nullptr,
                                  chunk.size, scalars[chunk.tensor], sr);
      }
    });
  });
}

template <typename param_t, typename state_t>
void adamw_step_cpu_dispatch_depth(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                   at::TensorList steps, const at::Tensor& hparams, bool amsgrad,
                                   bool maximize, const ScalarRef& grad_scale, const ScalarRef& clip_coef,
                                   const int64_t* sr_seed, at::IntArrayRef sr_tensor_ids) {
  using acc = acc_t<param_t>;
  const double scale = grad_scale.ptr ? grad_scale.read() : 1.0;
  const double coef = clip_coef.ptr ? clip_coef.read() : 1.0;
  const double* rows = hparams.const_data_ptr<double>();
  std::vector<AdamWScalars<acc>> scalars(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    scalars[i] = adamw_scalars<acc>(rows + i * kAdamWHparams, *steps[i].const_data_ptr<float>(), scale,
                                    coef, maximize);
  }
  auto run = [&](auto sr) {
    constexpr bool kSR = decltype(sr)::value;
    if (amsgrad) {
      adamw_step_cpu_typed<5, kSR, param_t, state_t>({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                                                     scalars, sr_seed, sr_tensor_ids);
    } else {
      adamw_step_cpu_typed<4, kSR, param_t, state_t>({params, grads, exp_avgs, exp_avg_sqs}, scalars, sr_seed,
                                                     sr_tensor_ids);
    }
  };
  if constexpr (std::is_same_v<param_t, c10::BFloat16> || std::is_same_v<state_t, c10::BFloat16>) {
    if (sr_seed != nullptr) return run(std::true_type{});
  }
  run(std::false_type{});
}

// Contract: one AdamW step (torch.optim.AdamW's math, fp32 for float32/float16/bfloat16 params, fp64
// for float64 ones) over CPU tensors; see fusedreg/_library.py for the arguments. Mutates params,
// exp_avgs, exp_avg_sqs and, when amsgrad, max_exp_avg_sqs, each element rounded once to its dtype;
// returns nothing. grads have the params' dtype; states the params' dtype or, for float16/bfloat16
// params, float32 (and float32/float16 params bfloat16). A nonzero found_inf (read here: CPU
// memory) leaves everything untouched. With sr_seed (int64 [1]), every bfloat16 tensor is written
// by stochastic rounding (csrc/adamw.h's stream).
void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    const at::Tensor& hparams, bool amsgrad, bool maximize,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& sr_seed,
                    at::IntArrayRef sr_tensor_ids) {
  const at::ScalarType state_dtype = check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                      steps, hparams, amsgrad, at::kCPU);
  const at::Device device = params[0].device();
  const ScalarRef scale = adamw_scalar_ref(grad_scale, device, "grad_scale");
  const ScalarRef inf = adamw_scalar_ref(found_inf, device, "found_inf");
  const ScalarRef coef = adamw_scalar_ref(clip_coef, device, "clip_coef");
  const int64_t* seed = check_adamw_sr_args(params, state_dtype, sr_seed, sr_tensor_ids);
  if (inf.ptr && inf.read() != 0.0) return;

  adamw_dispatch_types(params[0].scalar_type(), state_dtype, [&](auto param_tag, auto state_tag) {
    adamw_step_cpu_dispatch_depth<decltype(param_tag), decltype(state_tag)>(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams, amsgrad, maximize, scale, coef,
        seed, sr_tensor_ids);
  });
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("adamw_step_", &fusedreg::adamw_step_cpu);
}
