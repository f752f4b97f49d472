// What the CPU (adamw.cpp) and CUDA (adamw.cu) kernels of fusedreg::adamw_step_ share: the
// per-tensor scalars, the per-element update, and the argument checks.
//
// Numerics (the same as fusedreg/reference/adamw.py): the per-tensor scalars (1 - lr * wd,
// 1 - beta1, 1 - beta2, lr / (1 - beta1^t), sqrt(1 - beta2^t)) are computed in double from the
// float64 hparams row and the float32 step, exactly like torch.optim.AdamW computes them in Python
// floats, then rounded to the math type: float for float32/float16/bfloat16 parameters, double for
// float64 ones. Each element is loaded, updated entirely in the math type, and rounded to its
// storage dtype once (states may be float32 under float16/bfloat16 params). The order of operations
// is torch.optim.AdamW's single-tensor path, so fp32 results differ from it only where a multiply
// and an add are contracted into an FMA (by nvcc here, by torch's own vectorized CPU kernels there).
//
// Stochastic rounding (pure-bf16 training; the op's sr_seed): every bfloat16 tensor of the call
// (params, moments) is written from its float32 value v as bits = (bits(v) + r) >> 16, r a 16-bit
// random value: rounded away from zero with probability (discarded fraction) / 2**16, so unbiased.
// NaN gives 0x7FC0 (as rounding to nearest does), inf stays inf (its low bits are zero, no carry),
// and a finite value above the largest bfloat16 rounds to inf with the probability of its fraction
// (as torchao's and llm.c's rounding do). The random bits (cuda, triton, cpu and reference all
// implement exactly this, csrc/common/philox.h's Philox4x32-10):
//   - key = the step's 64-bit seed (k0 = low word, k1 = high word), an int64 device tensor drawn
//     from torch's generator once per optimizer step;
//   - t = sr_tensor_ids[i] (default i), which the optimizer sets to the parameter's index in its
//     flat parameter order (param groups in order, parameters in order, with or without a
//     gradient), so a tensor's bits do not depend on the dtype bucket or call it is stepped in;
//   - element e of the tensor (memory order) is lane e % 4 of group j = e / 4, and its words are
//     A = philox(counter = (j mod 2**32, j >> 32, t, 0), key), B = the same with counter word 3 = 1;
//   - r = A[lane] & 0xFFFF for the parameter, A[lane] >> 16 for exp_avg, B[lane] & 0xFFFF for
//     exp_avg_sq, B[lane] >> 16 for max_exp_avg_sq.
// One Philox call thus serves four elements' parameter and first moment, as dropout's four
// elements (only the calls a dtype pair needs are made: A for bfloat16 params, A and B for
// bfloat16 states). Dropout's counters have word 2 = 0; ours have the tensor index there.
// For results bit-identical across backends the CUDA kernel's stochastic-rounding variant also
// rounds every product and sum (no FMA contraction), like the other backends; the round-to-nearest
// kernels keep their FMAs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/philox.h"
#include "common/vec.cuh"

namespace fusedreg {

constexpr int kAdamWHparams = 5;  // hparams row: lr, beta1, beta2, weight_decay, eps

// A one-element float32 or float64 tensor the kernel reads itself (grad_scale, found_inf,
// clip_coef): its address, so nothing is read on the host and CUDA graphs replay it.
struct ScalarRef {
  const void* ptr = nullptr;  // null: not given
  bool is_double = false;

  FUSEDREG_HOST_DEVICE double read() const {
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

template <typename acc>
struct AdamWScalars {
  acc decay;            // 1 - lr * weight_decay
  acc lerp_coef;        // exp_avg = lerp(exp_avg, grad, 1 - beta1) = base + lerp_coef * (grad - exp_avg),
  bool lerp_from_grad;  // base = grad when true, else exp_avg (see adamw_lerp)
  acc beta2;
  acc one_minus_beta2;
  acc step_size;        // lr / (1 - beta1^t)
  acc bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  acc eps;
  acc grad_scale;       // grads are divided by this (1 when not given: exact) ...
  acc grad_inv_scale;   // ... or multiplied by this, 1 / grad_scale, where that is exact
  bool grad_divide;     // false: grad_inv_scale is exact (grad_scale is a power of two)
  acc grad_coef;        // then multiplied by this: clip_coef, negated when maximizing (+-1 when
                        // not given: exact)
};

// hparams_row: lr, beta1, beta2, weight_decay, eps. step: already counts this step.
template <typename acc>
FUSEDREG_HOST_DEVICE inline AdamWScalars<acc> adamw_scalars(const double* hparams_row, float step,
                                                            double grad_scale, double clip_coef,
                                                            bool maximize) {
  using std::frexp;
  using std::pow;
  using std::sqrt;
  const double lr = hparams_row[0], beta1 = hparams_row[1], beta2 = hparams_row[2];
  const double weight_decay = hparams_row[3], eps = hparams_row[4];
  const double t = static_cast<double>(step);
  AdamWScalars<acc> s;
  s.decay = static_cast<acc>(1.0 - lr * weight_decay);
  // torch.lerp's two forms (ATen's lerp), exact at both ends: start + w * (end - start) for
  // |w| < 0.5, else end - (end - start) * (1 - w), written as end + (w - 1) * (end - start), which
  // rounds identically (negation is exact). Which one is a per-tensor choice, made here.
  const acc weight = static_cast<acc>(1.0 - beta1);
  s.lerp_from_grad = !(weight < acc(0.5) && weight > acc(-0.5));
  s.lerp_coef = s.lerp_from_grad ? weight - acc(1) : weight;
  s.beta2 = static_cast<acc>(beta2);
  s.one_minus_beta2 = static_cast<acc>(1.0 - beta2);
  s.step_size = static_cast<acc>(lr / (1.0 - pow(beta1, t)));
  s.bias_correction2_sqrt = static_cast<acc>(sqrt(1.0 - pow(beta2, t)));
  s.eps = static_cast<acc>(eps);
  // x / 2^k and x * 2^-k round the same real number once, so they are bitwise equal; GradScaler's
  // scales are powers of two, and a multiply is much cheaper than a divide on every backend.
  s.grad_scale = static_cast<acc>(grad_scale);
  s.grad_inv_scale = acc(1) / s.grad_scale;
  int exponent = 0;
  const double mantissa = frexp(static_cast<double>(s.grad_scale), &exponent);  // inf, NaN, 0: not +-0.5
  const bool power_of_two = mantissa == 0.5 || mantissa == -0.5;
  s.grad_divide = !(power_of_two && s.grad_inv_scale * s.grad_scale == acc(1));
  s.grad_coef = static_cast<acc>(maximize ? -clip_coef : clip_coef);
  return s;
}

// a * b and a + b, each rounded on its own when kExact: on the device __fmul_rn / __fadd_rn, which
// nvcc never contracts into an FMA; on the host plain operators (the CPU build contracts nothing).
template <bool kExact, typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_mul(acc a, acc b) {
#if defined(__CUDA_ARCH__)
  if constexpr (kExact && std::is_same_v<acc, float>) return __fmul_rn(a, b);
  if constexpr (kExact && std::is_same_v<acc, double>) return __dmul_rn(a, b);
#endif
  return a * b;
}

template <bool kExact, typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_add(acc a, acc b) {
#if defined(__CUDA_ARCH__)
  if constexpr (kExact && std::is_same_v<acc, float>) return __fadd_rn(a, b);
  if constexpr (kExact && std::is_same_v<acc, double>) return __dadd_rn(a, b);
#endif
  return a + b;
}

// lerp(exp_avg, grad, 1 - beta1) with the form adamw_scalars chose. Only the base is selected per
// element, between two values already computed, so a CPU loop needs no branch and vectorizes.
template <bool kExact = false, typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_lerp(acc exp_avg, acc grad, const AdamWScalars<acc>& s) {
  const acc base = s.lerp_from_grad ? grad : exp_avg;
  if constexpr (kExact) return adamw_add<true>(base, adamw_mul<true>(s.lerp_coef, grad - exp_avg));
  return base + s.lerp_coef * (grad - exp_avg);
}

// max that propagates NaN, like torch.maximum. Both comparisons always run (| not ||): no branch,
// so the CPU loop around it vectorizes.
template <typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_nan_max(acc a, acc b) {
  const bool take_a = (a > b) | (a != a);
  return take_a ? a : b;
}

// One element of the step, in the math type, in two halves around the square root so that a
// CPU loop can take the square roots of a block of elements with SIMD instructions in between:
//   second = adamw_moments<kAmsgrad, kDivideGrad>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s);
//   param  = adamw_param(param, exp_avg, sqrt(second), s);
// adamw_moments applies weight decay to param and updates the moments in place (max_exp_avg_sq
// only when kAmsgrad); it returns the second moment the denominator uses. kDivideGrad must be
// s.grad_divide (a template argument so that loops hoist the choice). kExact: no FMA contraction
// on the device (see adamw_mul), for results bit-identical to the other backends.
template <bool kAmsgrad, bool kDivideGrad, bool kExact = false, typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_moments(acc& param, acc grad, acc& exp_avg, acc& exp_avg_sq,
                                              acc& max_exp_avg_sq, const AdamWScalars<acc>& s) {
  if constexpr (kExact) {  // products that would otherwise contract into later adds
    grad = adamw_mul<true>(kDivideGrad ? grad / s.grad_scale : adamw_mul<true>(grad, s.grad_inv_scale), s.grad_coef);
    param = adamw_mul<true>(param, s.decay);
  } else {
    grad = (kDivideGrad ? grad / s.grad_scale : grad * s.grad_inv_scale) * s.grad_coef;
    param = param * s.decay;
  }
  exp_avg = adamw_lerp<kExact>(exp_avg, grad, s);
  if constexpr (kExact) {
    exp_avg_sq = adamw_add<true>(adamw_mul<true>(exp_avg_sq, s.beta2),
                                 adamw_mul<true>(adamw_mul<true>(s.one_minus_beta2, grad), grad));
  } else {
    exp_avg_sq = exp_avg_sq * s.beta2 + s.one_minus_beta2 * grad * grad;
  }
  if constexpr (kAmsgrad) {
    max_exp_avg_sq = adamw_nan_max(max_exp_avg_sq, exp_avg_sq);
    return max_exp_avg_sq;
  }
  return exp_avg_sq;
}

template <bool kExact = false, typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_param(acc decayed_param, acc exp_avg, acc sqrt_second_moment,
                                            const AdamWScalars<acc>& s) {
  if constexpr (kExact) {
    const acc denom = adamw_add<true>(sqrt_second_moment / s.bias_correction2_sqrt, s.eps);
    return adamw_add<true>(decayed_param, -(adamw_mul<true>(s.step_size, exp_avg) / denom));
  }
  const acc denom = sqrt_second_moment / s.bias_correction2_sqrt + s.eps;
  return decayed_param - s.step_size * exp_avg / denom;
}

// ---------------------------------------------------------------------- stochastic rounding

// The Philox words of one element group (the layout in the header comment): pair 0 = A (param,
// exp_avg), pair 1 = B (exp_avg_sq, max_exp_avg_sq).
FUSEDREG_HOST_DEVICE inline Philox4x32Words adamw_sr_words(uint64_t seed, uint32_t tensor_id, uint64_t group,
                                                           uint32_t pair) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), tensor_id, pair,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// adamw_sr_words with the seed's round keys given (philox_keys(seed)): a kernel that draws many
// groups under one seed derives them once.
FUSEDREG_HOST_DEVICE inline Philox4x32Words adamw_sr_words(const PhiloxKeys& keys, uint32_t tensor_id,
                                                           uint64_t group, uint32_t pair) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), tensor_id, pair, keys);
}

// float32 -> bfloat16 bits by stochastic rounding with the 16-bit random value r16. (The NaN test
// on the float: one compare, where a test of the bits would take two instructions.)
FUSEDREG_HOST_DEVICE inline uint16_t adamw_sr_bf16_bits(float x, uint32_t r16) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return x != x ? uint16_t(0x7FC0u) : static_cast<uint16_t>((bits + r16) >> 16);
}

// ---------------------------------------------------------------------------- host side

template <typename param_t, typename F>
void adamw_with_state_type(at::ScalarType state_dtype, const F& f) {
  if constexpr (std::is_same_v<param_t, at::Half> || std::is_same_v<param_t, at::BFloat16>) {
    if (state_dtype == at::kFloat) return f(param_t{}, float{});
  }
  if constexpr (std::is_same_v<param_t, float> || std::is_same_v<param_t, at::Half>) {
    if (state_dtype == at::kBFloat16) return f(param_t{}, at::BFloat16{});
  }
  f(param_t{}, param_t{});
}

// Calls f(param_t{}, state_t{}) for the storage types of the call: (float, float), (double,
// double), (Half, Half), (BFloat16, BFloat16), (Half, float), (BFloat16, float), (float, BFloat16),
// (Half, BFloat16), the pairs check_adamw_args admits.
template <typename F>
void adamw_dispatch_types(at::ScalarType param_dtype, at::ScalarType state_dtype, const F& f) {
  FUSEDREG_DISPATCH_FLOATING(param_dtype, "adamw_step_", [&] { adamw_with_state_type<scalar_t>(state_dtype, f); });
}

// grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs: list[i] pairs up element by element with
// params[i] (shape, device, layout as same_layout judges it), with `dtype`.
inline void check_adamw_partner_list(at::TensorList params, at::TensorList list, const char* name,
                                     at::ScalarType dtype, const char* dtype_rule) {
  check_same_shapes(params, "params", list, name);
  const at::Device device = params[0].device();
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].device() == device, name, "[", i, "] is on ", list[i].device(),
                ", but params are on ", device);
    TORCH_CHECK(list[i].scalar_type() == dtype, name, "[", i, "] has dtype ", list[i].scalar_type(),
                ", expected ", dtype, " (", dtype_rule, ")");
    TORCH_CHECK(list[i].numel() == 0 || same_layout(list[i], params[i]), name, "[", i, "] has strides ",
                list[i].strides(), ", but params[", i, "] has ", params[i].strides(),
                "; grads and states must have their parameter's memory layout (strides may differ "
                "only on dimensions of size 1)");
  }
}

// grad_scale / found_inf / clip_coef: absent, or one float32/float64 element on `device`.
inline ScalarRef adamw_scalar_ref(const std::optional<at::Tensor>& t, at::Device device, const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->numel() == 1, name, " must have exactly one element, got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t->scalar_type());
  check_device(*t, device, name);
  return {t->const_data_ptr(), t->scalar_type() == at::kDouble};
}

// Checks every argument of adamw_step_ (see the schema in fusedreg/_library.py) and returns the
// dtype of the optimizer states: the params' dtype, or float32 for float16/bfloat16 params.
inline at::ScalarType check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                       at::TensorList steps, const at::Tensor& hparams, bool amsgrad,
                                       at::DeviceType device_type) {
  check_nonempty(params, "params");
  check_device_type(params[0], device_type, "params[0]");
  check_same_device(params, "params");
  check_same_dtype(params, "params");
  check_floating(params[0], "params");
  check_all_dense(params, "params");
  const at::ScalarType param_dtype = params[0].scalar_type();
  const at::Device device = params[0].device();

  check_adamw_partner_list(params, grads, "grads", param_dtype,
                           "grads must have their parameter's dtype, as in torch's fused AdamW");
  check_same_length(params, "params", exp_avgs, "exp_avgs");
  const at::ScalarType state_dtype = exp_avgs[0].scalar_type();
  const bool low_precision = param_dtype == at::kHalf || param_dtype == at::kBFloat16;
  const bool bf16_states_ok = low_precision || param_dtype == at::kFloat;
  TORCH_CHECK(state_dtype == param_dtype || (low_precision && state_dtype == at::kFloat) ||
                  (bf16_states_ok && state_dtype == at::kBFloat16),
              "exp_avgs[0] has dtype ", state_dtype, "; optimizer states must have the params' dtype (",
              param_dtype, ")", low_precision ? ", float32" : "", bf16_states_ok ? " or bfloat16" : "");
  const char* state_rule = "all optimizer states share exp_avgs[0]'s dtype";
  check_adamw_partner_list(params, exp_avgs, "exp_avgs", state_dtype, state_rule);
  check_adamw_partner_list(params, exp_avg_sqs, "exp_avg_sqs", state_dtype, state_rule);
  if (amsgrad) {
    check_adamw_partner_list(params, max_exp_avg_sqs, "max_exp_avg_sqs", state_dtype, state_rule);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), "max_exp_avg_sqs must be empty when amsgrad=False, got ",
                max_exp_avg_sqs.size(), " tensors");
  }

  check_same_length(params, "params", steps, "steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat, "steps[", i,
                "] must be a float32 tensor of one element, got ", steps[i].scalar_type(), " of shape ",
                steps[i].sizes());
    TORCH_CHECK(steps[i].device() == device, "steps[", i, "] is on ", steps[i].device(),
                ", but params are on ", device);
  }

  check_dtype(hparams, at::kDouble, "hparams");
  TORCH_CHECK(hparams.dim() == 2 && hparams.size(0) == static_cast<int64_t>(params.size()) &&
                  hparams.size(1) == kAdamWHparams,
              "hparams must have shape [len(params), 5] = [", params.size(), ", 5], got ", hparams.sizes());
  check_contiguous(hparams, "hparams");
  check_device(hparams, device, "hparams");
  return state_dtype;
}

// Checks sr_seed / sr_tensor_ids (fusedreg/reference/adamw.py words them alike) and returns the
// seed's address (null: round to nearest).
inline const int64_t* check_adamw_sr_args(at::TensorList params, at::ScalarType state_dtype,
                                          const std::optional<at::Tensor>& sr_seed,
                                          at::IntArrayRef sr_tensor_ids) {
  if (!sr_seed.has_value() || !sr_seed->defined()) {
    TORCH_CHECK(sr_tensor_ids.empty(), "sr_tensor_ids given without sr_seed");
    return nullptr;
  }
  TORCH_CHECK(sr_seed->numel() == 1 && sr_seed->scalar_type() == at::kLong,
              "sr_seed must be an int64 tensor of one element, got ", sr_seed->scalar_type(), " of shape ",
              sr_seed->sizes());
  check_device(*sr_seed, params[0].device(), "sr_seed");
  TORCH_CHECK(params[0].scalar_type() == at::kBFloat16 || state_dtype == at::kBFloat16,
              "sr_seed given, but neither params (", params[0].scalar_type(), ") nor optimizer states (",
              state_dtype, ") are bfloat16: stochastic rounding has no bfloat16 tensor to round");
  TORCH_CHECK(sr_tensor_ids.empty() || sr_tensor_ids.size() == params.size(),
              "sr_tensor_ids must be empty or have one id per tensor (", params.size(), "), got ",
              sr_tensor_ids.size());
  for (const int64_t id : sr_tensor_ids) {
    TORCH_CHECK(id >= 0 && id < (int64_t(1) << 32), "sr_tensor_ids must be in [0, 2**32)");
  }
  return sr_seed->const_data_ptr<int64_t>();
}

// Tensor i's id in the random stream.
inline uint32_t adamw_sr_tensor_id(at::IntArrayRef sr_tensor_ids, size_t i) {
  return static_cast<uint32_t>(sr_tensor_ids.empty() ? static_cast<int64_t>(i) : sr_tensor_ids[i]);
}

}  // namespace fusedreg
