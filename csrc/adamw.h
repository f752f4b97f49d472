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
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/dispatch.h"
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

// lerp(exp_avg, grad, 1 - beta1) with the form adamw_scalars chose. Only the base is selected per
// element, between two values already computed, so a CPU loop needs no branch and vectorizes.
template <typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_lerp(acc exp_avg, acc grad, const AdamWScalars<acc>& s) {
  const acc base = s.lerp_from_grad ? grad : exp_avg;
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
// s.grad_divide (a template argument so that loops hoist the choice).
template <bool kAmsgrad, bool kDivideGrad, typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_moments(acc& param, acc grad, acc& exp_avg, acc& exp_avg_sq,
                                              acc& max_exp_avg_sq, const AdamWScalars<acc>& s) {
  grad = (kDivideGrad ? grad / s.grad_scale : grad * s.grad_inv_scale) * s.grad_coef;
  param = param * s.decay;
  exp_avg = adamw_lerp(exp_avg, grad, s);
  exp_avg_sq = exp_avg_sq * s.beta2 + s.one_minus_beta2 * grad * grad;
  if constexpr (kAmsgrad) {
    max_exp_avg_sq = adamw_nan_max(max_exp_avg_sq, exp_avg_sq);
    return max_exp_avg_sq;
  }
  return exp_avg_sq;
}

template <typename acc>
FUSEDREG_HOST_DEVICE inline acc adamw_param(acc decayed_param, acc exp_avg, acc sqrt_second_moment,
                                            const AdamWScalars<acc>& s) {
  const acc denom = sqrt_second_moment / s.bias_correction2_sqrt + s.eps;
  return decayed_param - s.step_size * exp_avg / denom;
}

// ---------------------------------------------------------------------------- host side

template <typename param_t, typename F>
void adamw_with_state_type(at::ScalarType state_dtype, const F& f) {
  if constexpr (std::is_same_v<param_t, at::Half> || std::is_same_v<param_t, at::BFloat16>) {
    if (state_dtype == at::kFloat) return f(param_t{}, float{});
  }
  f(param_t{}, param_t{});
}

// Calls f(param_t{}, state_t{}) for the storage types of the call: (float, float), (double,
// double), (Half, Half), (BFloat16, BFloat16), (Half, float), (BFloat16, float), the pairs
// check_adamw_args admits.
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
  TORCH_CHECK(state_dtype == param_dtype || (low_precision && state_dtype == at::kFloat),
              "exp_avgs[0] has dtype ", state_dtype, "; optimizer states must have the params' dtype (",
              param_dtype, ")", low_precision ? " or float32" : "");
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

}  // namespace fusedreg
