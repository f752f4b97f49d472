// What the CPU (clip.cpp) and CUDA (clip.cu) kernels of fusedreg::grad_norm_pow and
// multi_tensor_scale_ share: argument checks, and which per-element power a norm type needs (the
// specialised kinds avoid pow() for the common norms).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common/checks.h"

namespace fusedreg {

enum class NormKind { kL2, kL1, kInf, kP };

inline NormKind norm_kind(double norm_type) {
  TORCH_CHECK(norm_type > 0, "norm_type must be positive or inf, got ", norm_type);
  if (std::isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

// tensors: a non-empty list of floating-point tensors of one device (of `type`) and dtype.
inline void check_clip_tensors(at::TensorList tensors, at::DeviceType type) {
  check_nonempty(tensors, "tensors");
  check_device_type(tensors[0], type, "tensors[0]");
  check_same_device(tensors, "tensors");
  check_same_dtype(tensors, "tensors");
  check_floating(tensors[0], "tensors");
}

// scale: one float32 or float64 element on the tensors' device.
inline void check_clip_scale(const at::Tensor& scale, at::TensorList tensors) {
  TORCH_CHECK(scale.defined() && scale.numel() == 1, "scale must have exactly one element, got shape ",
              scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble,
              "scale must have dtype float32 or float64, got ", scale.scalar_type());
  check_device(scale, tensors[0].device(), "scale");
}

}  // namespace fusedreg
