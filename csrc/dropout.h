// Host-side argument handling shared by the CPU (dropout.cpp) and CUDA (dropout.cu) launchers of
// fusedreg::dropout_fwd / dropout_fwd_ / dropout_bwd / dropout_add_fwd.
//
// Layout rule (the same as fusedreg/reference/dropout.py): the output is at::empty_like(input), and
// element i of the mask is the i-th element of that output in memory order. A non-overlapping,
// dense input already has the output's layout; any other input is first copied into it. Kernels
// then walk plain memory, whatever the logical shape or strides.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace fusedreg {

struct DropoutOperands {
  at::Tensor x;         // input (or input's values) in the output's layout
  at::Tensor residual;  // dropout_add only: residual in the output's layout, else undefined
  at::Tensor bias;      // dropout_add only, optional: contiguous [input.size(-1)]
  at::Tensor out;       // at::empty_like(input)
  int64_t bias_stride = 1;  // memory distance between neighbours along the last logical dim (1 when
                            // that dim has size 1: its stride is arbitrary, possibly 0)
  int64_t bias_size = 1;    // size of the last logical dim
};

inline void check_dropout_args(const at::Tensor& input, const at::Tensor& seed, double p,
                               const char* input_name) {
  check_floating(input, input_name);
  check_scalar_tensor(seed, at::kLong, "seed");
  check_device(seed, input.device(), "seed");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
}

// `t`'s values in a tensor laid out as `like` (returns t itself when it already is: same_layout
// with the dense `like` makes t dense too).
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_layout(t, like)) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

inline DropoutOperands prepare_dropout(const at::Tensor& input) {
  DropoutOperands ops;
  ops.out = at::empty_like(input);
  ops.x = in_layout_of(input, ops.out);
  return ops;
}

inline DropoutOperands prepare_dropout_add(const at::Tensor& input, const at::Tensor& residual,
                                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(residual.sizes() == input.sizes(), "residual must have input's shape ", input.sizes(),
              ", got ", residual.sizes());
  check_dtype(residual, input.scalar_type(), "residual");
  check_device(residual, input.device(), "residual");
  DropoutOperands ops = prepare_dropout(input);
  ops.residual = in_layout_of(residual, ops.out);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(input.dim() > 0 && bias->dim() == 1 && bias->size(0) == input.size(-1),
                "bias must have shape [input.shape[-1]] = [", input.dim() ? input.size(-1) : 0,
                "], got ", bias->sizes());
    check_dtype(*bias, input.scalar_type(), "bias");
    check_device(*bias, input.device(), "bias");
    ops.bias = bias->contiguous();
    // In a dense layout, the memory offset m of an element has index (m / stride) % size along
    // every dim of size > 1, so the last dim's index (the bias index) needs no full unravelling.
    // A size-1 last dim has index 0 everywhere and may have any stride, 0 included (a broadcast
    // view is dense): (m / 1) % 1 says 0 without dividing by that stride.
    if (ops.out.size(-1) != 1) {
      ops.bias_stride = ops.out.stride(-1);
      ops.bias_size = ops.out.size(-1);
    }
  }
  return ops;
}

}  // namespace fusedreg
