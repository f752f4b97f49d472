// CPU kernel of fusedreg::adamw_step_: one AdamW step over a list of tensors (the optimizer-offload
// case: parameters and states in host memory).
//
// Algorithm: every tensor is cut into chunks of 4096 elements; the call is one at::parallel_for
// over all of them (the CUDA kernel's 65536-element chunk tables, 30 KB kernel arguments, would
// only add a fill per call and a fork per table here; small chunks split a list of unequal tensors
// evenly between threads, since parallel_for gives each thread as many chunks), and a chunk is
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
// of their own before the stores (8 groups per AVX2 vector where cpu_isa() allows), which then
// round bfloat16 tensors by adamw_sr_bf16_bits. The SIMD square roots, conversions, block staging
// and Philox words are in adamw_cpu_simd.h.
//
// Where cpu_isa() is AVX-512 (csrc/common/cpu_isa.h), float32 / bfloat16 tensors skip the block
// loops, rounded to nearest or stochastically: adamw_cpu_avx512.h updates a chunk 16 elements per
// register, one pass, no staging, the random words in registers (the same operations in the same
// order and the same stream, so the same bits; tests/test_adamw_cpu_isa.py). cpu_isa() is read
// once per call (a getenv) and passed down.
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
#include "adamw_cpu_avx512.h"
#include "adamw_cpu_simd.h"
#include "common/cpu_isa.h"

namespace fusedreg {
namespace {

constexpr int64_t kAdamWChunkSize = 4096;  // a multiple of 4: chunks hold whole SR element groups

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
// One copy of the chunk loop for AVX2 and one for the x86-64 baseline (SSE2), picked once at load
// time. Not "fma": the compiler would then contract multiply-adds differently in vector bodies and
// scalar tails, and results would depend on where a chunk's vector body ends.
#define FUSEDREG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FUSEDREG_CPU_CLONES
#endif

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

// One chunk of one tensor: the CPU kernel's unit of work.
struct AdamWCpuChunk {
  int64_t tensor;  // index in the lists
  int64_t begin;   // first element
  int64_t size;    // elements: kAdamWChunkSize, or fewer for a tensor's last chunk
};

template <int Depth, bool kSR, typename param_t, typename state_t>
void adamw_step_cpu_typed(const std::array<at::TensorList, Depth>& lists,
                          const std::vector<AdamWScalars<acc_t<param_t>>>& scalars, const int64_t* sr_seed,
                          at::IntArrayRef sr_tensor_ids) {
  constexpr bool kAmsgrad = Depth == 5;
  const CpuIsa isa = cpu_isa();  // once per call: a getenv
  const PhiloxKeys keys = kSR ? philox_keys(static_cast<uint64_t>(*sr_seed)) : PhiloxKeys{};
#if defined(FUSEDREG_ADAMW_AVX512)
  constexpr bool kAvx512Kernel = kAdamWAvx512Types<param_t, state_t>;
  const bool use_avx512 = kAvx512Kernel && isa == CpuIsa::kAvx512;
#endif
  // The chunks of every tensor, in list order (check_adamw_args has checked the lists pair up,
  // dense, on one device), and each list's data pointers.
  std::vector<AdamWCpuChunk> chunks;
  std::array<std::vector<void*>, Depth> data;
  int64_t elements = 0;
  for (size_t i = 0; i < lists[0].size(); ++i) {
    const int64_t numel = lists[0][i].numel();
    for (int d = 0; d < Depth; ++d) data[d].push_back(numel == 0 ? nullptr : lists[d][i].data_ptr());
    for (int64_t begin = 0; begin < numel; begin += kAdamWChunkSize) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(kAdamWChunkSize, numel - begin)});
    }
    elements += numel;
  }
  if (chunks.empty()) return;
  // Lists of many tiny tensors run on one thread rather than pay a fork per few elements.
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE * num_chunks / elements);
  at::parallel_for(0, num_chunks, grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const AdamWCpuChunk chunk = chunks[c];
      param_t* p = static_cast<param_t*>(data[0][chunk.tensor]) + chunk.begin;
      const param_t* g = static_cast<const param_t*>(data[1][chunk.tensor]) + chunk.begin;
      state_t* m = static_cast<state_t*>(data[2][chunk.tensor]) + chunk.begin;
      state_t* v = static_cast<state_t*>(data[3][chunk.tensor]) + chunk.begin;
      state_t* vmax = kAmsgrad ? static_cast<state_t*>(data[Depth - 1][chunk.tensor]) + chunk.begin : nullptr;
      SRStream sr;
      if constexpr (kSR) {
        sr.keys = keys;
        sr.tensor_id = adamw_sr_tensor_id(sr_tensor_ids, static_cast<size_t>(chunk.tensor));
        sr.first = chunk.begin;
        sr.isa = isa;
      }
#if defined(FUSEDREG_ADAMW_AVX512)
      if constexpr (kAvx512Kernel) {
        if (use_avx512) {
          adamw_chunk_avx512<kAmsgrad, kSR>(p, g, m, v, vmax, chunk.size, scalars[chunk.tensor], sr.keys,
                                            sr.tensor_id, sr.first);
          continue;
        }
      }
#endif
      adamw_chunk_cpu<kAmsgrad, kSR>(p, g, m, v, vmax, chunk.size, scalars[chunk.tensor], sr);
    }
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
