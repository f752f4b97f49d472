// CUDA kernel of fusedreg::adamw_step_: one AdamW step over a list of tensors in one launch.
//
// Algorithm: multi-tensor apply (csrc/common/multi_tensor.cuh). The lists (params, grads, exp_avgs,
// exp_avg_sqs, and max_exp_avg_sqs with amsgrad: Depth 4 or 5) are cut into 65536-element chunks,
// and one block updates one chunk in a single pass: read p, g, m, v (max_v), update in fp32 (fp64
// for float64 params) by adamw_moments/adamw_param (adamw.h, shared with the CPU kernel), write
// each back rounded once. That is 28 bytes per fp32 parameter (36 with amsgrad), the floor; with
// 16-byte vector accesses when every operand of the chunk is aligned, else a scalar loop.
//
// Nothing is read on the host, so the op can be captured in a CUDA graph: each block reads its
// tensor's step and hparams row, grad_scale, found_inf and clip_coef from device memory and
// computes the per-tensor scalars (bias corrections in double, like torch's Python floats). A
// nonzero found_inf makes every block return before touching memory. The step tensors are
// separate allocations: the launch argument holds, per table slot, the step's offset in floats
// from steps[0] (one launch, no gather); steps too far apart for int32 offsets are first gathered
// into one tensor by at::stack (a rare extra launch, still no sync).
//
// Stochastic rounding (sr_seed given) is a compile-time variant (kSR): bfloat16 params and/or
// moments are written by adamw_sr_bf16_bits with the Philox words of csrc/adamw.h's layout, one
// call per four elements and word pair, computed where the elements are (no extra pass, no extra
// bytes: 14 B/param for bfloat16 params and moments), and the math rounds every operation (no FMA)
// so that results are bit-identical to the other backends. The round-to-nearest kernels are the
// same code as before (kSR = false).
//
// Trade-off: every thread recomputes the per-tensor scalars (two double pow calls) instead of one
// thread sharing them through shared memory and a barrier; it costs ~1% of a chunk's time and
// keeps blocks free of synchronization.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "adamw.h"
#include "common/multi_tensor.cuh"
#include "common/vec.cuh"

namespace fusedreg {
namespace {

constexpr int64_t kAdamWChunkSize = 65536;
constexpr int kAdamWThreads = 512;
constexpr int kMaxSlots = MultiTensorTable<4>::kMaxTensors;

// Everything a launch needs besides the chunk table; by value, as a __grid_constant__ argument.
struct AdamWLaunchArgs {
  const double* hparams;      // [n, 5] rows (lr, beta1, beta2, weight_decay, eps)
  const float* step_base;     // the step of the tensor in table slot k: step_base[step_offset[k]]
  const int64_t* sr_seed;     // kSR kernels: the step's seed (the Philox key)
  ScalarRef grad_scale;       // optional
  ScalarRef found_inf;        // optional
  ScalarRef clip_coef;        // optional
  bool maximize;
  int32_t step_offset[kMaxSlots];
  // kSR kernels: slot k's tensor id in the random stream is sr_id_base + the 24-bit little-endian
  // sr_id_delta[k] (a full uint32 per slot would not fit the kernel-argument space of Depth 5)
  uint32_t sr_id_base;
  uint8_t sr_id_delta[kMaxSlots][3];
};

static_assert(sizeof(MultiTensorTable<5>) + sizeof(AdamWLaunchArgs) <= kMaxKernelParamBytes,
              "chunk table + launch arguments exceed the kernel-argument limit");

// Vector width in elements: 16 bytes of the narrower of the two storage types (bfloat16 params
// with float32 states: 8 elements, 16 bytes of params and 2 x 16 bytes of each state).
template <typename param_t, typename state_t>
constexpr int vec_elems() {
  return vec_size<param_t>() > vec_size<state_t>() ? vec_size<param_t>() : vec_size<state_t>();
}

template <typename T>
constexpr bool is_bf16() {
  return std::is_same_v<T, c10::BFloat16>;
}

// x rounded to T: stochastically with the 16-bit r16 when kSR and T is bfloat16, else to nearest.
template <bool kSR, typename T, typename acc>
__device__ __forceinline__ T round_to(acc x, uint32_t r16) {
  if constexpr (kSR && is_bf16<T>()) {
    return T(adamw_sr_bf16_bits(x, r16), T::from_bits());
  } else {
    return static_cast<T>(x);
  }
}

// word_a / word_b: the element's Philox words A and B (csrc/adamw.h), used only when kSR.
template <bool kAmsgrad, bool kDivideGrad, bool kSR, typename acc, typename param_t, typename state_t>
__device__ __forceinline__ void adamw_update(param_t& p, const param_t& g, state_t& m, state_t& v, state_t& vmax,
                                             const AdamWScalars<acc>& s, uint32_t word_a = 0,
                                             uint32_t word_b = 0) {
  acc param = static_cast<acc>(p);
  acc exp_avg = static_cast<acc>(m);
  acc exp_avg_sq = static_cast<acc>(v);
  acc max_exp_avg_sq = kAmsgrad ? static_cast<acc>(vmax) : acc(0);
  const acc second = adamw_moments<kAmsgrad, kDivideGrad, kSR>(param, static_cast<acc>(g), exp_avg, exp_avg_sq,
                                                                max_exp_avg_sq, s);
  p = round_to<kSR, param_t>(adamw_param<kSR>(param, exp_avg, sqrt(second), s), word_a & 0xFFFFu);
  m = round_to<kSR, state_t>(exp_avg, word_a >> 16);
  v = round_to<kSR, state_t>(exp_avg_sq, word_b & 0xFFFFu);
  if constexpr (kAmsgrad) vmax = round_to<kSR, state_t>(max_exp_avg_sq, word_b >> 16);
}

// Where a kSR kernel's random words come from: the seed's round keys (derived once per thread:
// registers are plentiful at one block per SM, and it saves two adds per round), the tensor's id,
// the chunk's first element.
struct SRStream {
  PhiloxKeys keys;
  uint32_t tensor_id;
  int64_t first;
};

// Words A (and B, only when the states are bfloat16) of element group `group`.
template <typename state_t>
__device__ __forceinline__ void sr_group_words(const SRStream& sr, uint64_t group, uint32_t* a, uint32_t* b) {
  const Philox4x32Words wa = adamw_sr_words(sr.keys, sr.tensor_id, group, 0);
#pragma unroll
  for (int l = 0; l < 4; ++l) a[l] = wa.w[l];
  if constexpr (is_bf16<state_t>()) {
    const Philox4x32Words wb = adamw_sr_words(sr.keys, sr.tensor_id, group, 1);
#pragma unroll
    for (int l = 0; l < 4; ++l) b[l] = wb.w[l];
  }
}

// One chunk of `size` elements: vectors of N elements strided over the block, then the ragged tail
// (or everything, when an operand is misaligned) one element per thread and step.
template <bool kAmsgrad, bool kDivideGrad, bool kSR, typename acc, typename param_t, typename state_t>
__device__ __forceinline__ void adamw_chunk(param_t* __restrict__ p, const param_t* __restrict__ g,
                                            state_t* __restrict__ m, state_t* __restrict__ v,
                                            state_t* __restrict__ vmax, int size, const AdamWScalars<acc>& s,
                                            const SRStream& sr) {
  constexpr int N = vec_elems<param_t, state_t>();
  constexpr int kParamBytes = N * sizeof(param_t), kStateBytes = N * sizeof(state_t);
  const bool aligned = is_aligned(p, kParamBytes) && is_aligned(g, kParamBytes) && is_aligned(m, kStateBytes) &&
                       is_aligned(v, kStateBytes) && (!kAmsgrad || is_aligned(vmax, kStateBytes));
  int first_scalar = 0;
  if (aligned) {
    const int n_vec = size / N;
    for (int i = threadIdx.x; i < n_vec; i += kAdamWThreads) {
      AlignedVec<param_t, N> pv = load_vec<N>(p + i * N);
      const AlignedVec<param_t, N> gv = load_vec<N>(g + i * N);
      AlignedVec<state_t, N> mv = load_vec<N>(m + i * N);
      AlignedVec<state_t, N> vv = load_vec<N>(v + i * N);
      AlignedVec<state_t, N> xv;
      if constexpr (kAmsgrad) xv = load_vec<N>(vmax + i * N);
      if constexpr (kSR) {
        // one element group at a time: its words are live only while its four elements update
        static_assert(N % 4 == 0, "a vector must hold whole element groups");
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
          uint32_t word_a[4], word_b[4] = {};
          sr_group_words<state_t>(sr, static_cast<uint64_t>(sr.first + i * N) / 4 + q, word_a, word_b);
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            const int j = 4 * q + l;
            adamw_update<kAmsgrad, kDivideGrad, kSR>(pv.val[j], gv.val[j], mv.val[j], vv.val[j], xv.val[j], s,
                                                     word_a[l], word_b[l]);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          adamw_update<kAmsgrad, kDivideGrad, kSR>(pv.val[j], gv.val[j], mv.val[j], vv.val[j], xv.val[j], s);
        }
      }
      store_vec<N>(p + i * N, pv);
      store_vec<N>(m + i * N, mv);
      store_vec<N>(v + i * N, vv);
      if constexpr (kAmsgrad) store_vec<N>(vmax + i * N, xv);
    }
    first_scalar = n_vec * N;
  }
  for (int i = first_scalar + threadIdx.x; i < size; i += kAdamWThreads) {
    state_t unused;
    if constexpr (kSR) {  // one element of a group: its lane's words (a tail, or a misaligned chunk)
      uint32_t word_a[4], word_b[4] = {};
      sr_group_words<state_t>(sr, static_cast<uint64_t>(sr.first + i) / 4, word_a, word_b);
      const int lane = static_cast<int>((sr.first + i) % 4);
      // selected, not indexed: a run-time index would put the words in local memory
      const uint32_t a = lane == 0 ? word_a[0] : lane == 1 ? word_a[1] : lane == 2 ? word_a[2] : word_a[3];
      const uint32_t b = lane == 0 ? word_b[0] : lane == 1 ? word_b[1] : lane == 2 ? word_b[2] : word_b[3];
      adamw_update<kAmsgrad, kDivideGrad, kSR>(p[i], g[i], m[i], v[i], kAmsgrad ? vmax[i] : unused, s, a, b);
    } else {
      adamw_update<kAmsgrad, kDivideGrad, kSR>(p[i], g[i], m[i], v[i], kAmsgrad ? vmax[i] : unused, s);
    }
  }
}

// Two blocks per SM (<= 64 registers) keep enough loads in flight. One block per SM (<= 128) where
// 64 would spill: float64, float32 params with bfloat16 states (8-element vectors of float32
// params and grads), and stochastic rounding (the Philox state and round keys); a 512-thread block
// still has 8 elements per thread, 32 KB of bfloat16 loads per SM, in flight.
template <typename param_t, typename state_t, bool kSR>
constexpr int min_blocks_per_sm() {
  const bool wide = std::is_same_v<param_t, double> || (std::is_same_v<param_t, float> && is_bf16<state_t>());
  return wide || kSR ? 1 : 2;
}

template <int Depth, typename param_t, typename state_t, bool kSR>
__global__ void __launch_bounds__(kAdamWThreads, min_blocks_per_sm<param_t, state_t, kSR>())
    adamw_kernel(const __grid_constant__ MultiTensorTable<Depth> table, const __grid_constant__ AdamWLaunchArgs args) {
  constexpr bool kAmsgrad = Depth == 5;
  using acc = acc_t<param_t>;
  if (args.found_inf.ptr != nullptr && args.found_inf.read() != 0.0) return;
  const MultiTensorChunk chunk = table.chunk_of(static_cast<int>(blockIdx.x));
  const AdamWScalars<acc> s = adamw_scalars<acc>(
      args.hparams + chunk.tensor * kAdamWHparams, args.step_base[args.step_offset[chunk.slot]],
      args.grad_scale.ptr != nullptr ? args.grad_scale.read() : 1.0,
      args.clip_coef.ptr != nullptr ? args.clip_coef.read() : 1.0, args.maximize);
  param_t* p = table.template chunk_data<param_t>(0, chunk);
  const param_t* g = table.template chunk_data<const param_t>(1, chunk);
  state_t* m = table.template chunk_data<state_t>(2, chunk);
  state_t* v = table.template chunk_data<state_t>(3, chunk);
  state_t* vmax = kAmsgrad ? table.template chunk_data<state_t>(Depth - 1, chunk) : nullptr;
  const int size = static_cast<int>(chunk.size);
  SRStream sr{};
  if constexpr (kSR) {
    const uint8_t* delta = args.sr_id_delta[chunk.slot];
    sr.keys = philox_keys(static_cast<uint64_t>(*args.sr_seed));
    sr.tensor_id = args.sr_id_base + (delta[0] | (uint32_t(delta[1]) << 8) | (uint32_t(delta[2]) << 16));
    sr.first = chunk.begin;
  }
  if (s.grad_divide) {
    adamw_chunk<kAmsgrad, true, kSR>(p, g, m, v, vmax, size, s, sr);
  } else {
    adamw_chunk<kAmsgrad, false, kSR>(p, g, m, v, vmax, size, s, sr);
  }
}

// Where each tensor's step lives, as float offsets from one base pointer: from steps[0] when every
// step is within int32 reach of it (the usual case: small tensors share allocator segments), else
// from a tensor gathering them (returned in `gathered`, which must outlive the launches).
const float* step_offsets(at::TensorList steps, std::vector<int32_t>& offsets, at::Tensor& gathered) {
  const auto base = reinterpret_cast<intptr_t>(steps[0].const_data_ptr<float>());
  offsets.resize(steps.size());
  bool fits = true;
  for (size_t i = 0; i < steps.size() && fits; ++i) {
    const intptr_t bytes = reinterpret_cast<intptr_t>(steps[i].const_data_ptr<float>()) - base;
    const intptr_t floats = bytes / static_cast<intptr_t>(sizeof(float));
    fits = bytes % static_cast<intptr_t>(sizeof(float)) == 0 && floats >= std::numeric_limits<int32_t>::min() &&
           floats <= std::numeric_limits<int32_t>::max();
    offsets[i] = static_cast<int32_t>(floats);
  }
  if (fits) return steps[0].const_data_ptr<float>();
  std::vector<at::Tensor> flat;
  flat.reserve(steps.size());
  for (const at::Tensor& step : steps) flat.push_back(step.reshape({1}));
  gathered = at::cat(flat);
  for (size_t i = 0; i < steps.size(); ++i) offsets[i] = static_cast<int32_t>(i);
  return gathered.const_data_ptr<float>();
}

// The table's tensor ids as a base and 24-bit deltas (AdamWLaunchArgs).
void set_sr_ids(AdamWLaunchArgs& args, const int32_t* tensor_index, int num_tensors, at::IntArrayRef sr_tensor_ids) {
  uint32_t base = std::numeric_limits<uint32_t>::max();
  for (int slot = 0; slot < num_tensors; ++slot) base = std::min(base, adamw_sr_tensor_id(sr_tensor_ids, tensor_index[slot]));
  args.sr_id_base = base;
  for (int slot = 0; slot < num_tensors; ++slot) {
    const uint32_t delta = adamw_sr_tensor_id(sr_tensor_ids, tensor_index[slot]) - base;
    TORCH_CHECK(delta < (1u << 24), "sr_tensor_ids of one launch (256 consecutive tensors) must lie within "
                "2**24 of each other, got ", base, " and ", base + delta);
    for (int b = 0; b < 3; ++b) args.sr_id_delta[slot][b] = static_cast<uint8_t>(delta >> (8 * b));
  }
}

template <int Depth, typename param_t, typename state_t, bool kSR>
void launch_adamw(const std::array<at::TensorList, Depth>& lists, at::TensorList steps, AdamWLaunchArgs args,
                  at::IntArrayRef sr_tensor_ids) {
  std::vector<int32_t> offsets;
  at::Tensor gathered;
  args.step_base = step_offsets(steps, offsets, gathered);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_each_table<Depth>(lists, kAdamWChunkSize, [&](const MultiTensorTable<Depth>& table) {
    for (int slot = 0; slot < table.num_tensors; ++slot) args.step_offset[slot] = offsets[table.tensor_index[slot]];
    if constexpr (kSR) set_sr_ids(args, table.tensor_index, table.num_tensors, sr_tensor_ids);
    adamw_kernel<Depth, param_t, state_t, kSR><<<table.num_blocks, kAdamWThreads, 0, stream>>>(table, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <int Depth, typename param_t, typename state_t>
void launch_adamw_rounding(const std::array<at::TensorList, Depth>& lists, at::TensorList steps,
                           const AdamWLaunchArgs& args, at::IntArrayRef sr_tensor_ids) {
  if constexpr (is_bf16<param_t>() || is_bf16<state_t>()) {
    if (args.sr_seed != nullptr) return launch_adamw<Depth, param_t, state_t, true>(lists, steps, args, sr_tensor_ids);
  }
  launch_adamw<Depth, param_t, state_t, false>(lists, steps, args, sr_tensor_ids);
}

// Contract: one AdamW step (torch.optim.AdamW's math in fp32 for float32/float16/bfloat16 params,
// fp64 for float64 params) over CUDA tensors of one device; see fusedreg/_library.py for the
// arguments. Mutates params, exp_avgs, exp_avg_sqs and, when amsgrad, max_exp_avg_sqs, each element
// rounded once to its dtype; returns nothing. grads have the params' dtype; states the params'
// dtype or, for float16/bfloat16 params, float32. Steps, hparams, grad_scale, found_inf and
// clip_coef are read on the device (no host sync; capturable in a CUDA graph); a nonzero found_inf
// leaves everything untouched. One launch per 256 tensors (or ~17k chunks), on the current stream.
// float32 and float16 params may also have bfloat16 states. With sr_seed (int64 [1], read on the
// device), every bfloat16 tensor is written by stochastic rounding (csrc/adamw.h's stream).
void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                     const at::Tensor& hparams, bool amsgrad, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& sr_seed,
                     at::IntArrayRef sr_tensor_ids) {
  const at::ScalarType state_dtype = check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                      steps, hparams, amsgrad, at::kCUDA);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  AdamWLaunchArgs args{};
  args.hparams = hparams.const_data_ptr<double>();
  args.grad_scale = adamw_scalar_ref(grad_scale, device, "grad_scale");
  args.found_inf = adamw_scalar_ref(found_inf, device, "found_inf");
  args.clip_coef = adamw_scalar_ref(clip_coef, device, "clip_coef");
  args.maximize = maximize;
  args.sr_seed = check_adamw_sr_args(params, state_dtype, sr_seed, sr_tensor_ids);

  adamw_dispatch_types(params[0].scalar_type(), state_dtype, [&](auto param_tag, auto state_tag) {
    using param_t = decltype(param_tag);
    using state_t = decltype(state_tag);
    if (amsgrad) {
      launch_adamw_rounding<5, param_t, state_t>({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, steps,
                                                 args, sr_tensor_ids);
    } else {
      launch_adamw_rounding<4, param_t, state_t>({params, grads, exp_avgs, exp_avg_sqs}, steps, args, sr_tensor_ids);
    }
  });
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("adamw_step_", &fusedreg::adamw_step_cuda);
}
