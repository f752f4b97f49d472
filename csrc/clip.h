// What the CPU (clip.cpp) and CUDA (clip.cu) kernels of fusedreg::grad_norm_pow share: which
// per-element power a norm type needs. The specialised kinds avoid pow() for the common norms.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>

namespace fusedreg {

enum class NormKind { kL2, kL1, kInf, kP };

inline NormKind norm_kind(double norm_type) {
  TORCH_CHECK(norm_type > 0, "norm_type must be positive or inf, got ", norm_type);
  if (std::isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

}  // namespace fusedreg
