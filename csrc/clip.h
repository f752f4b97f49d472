// What the CPU (clip.cpp) and CUDA (clip.cu) kernels of fusedreg::grad_norm_pow and
// multi_tensor_scale_ share: argument checks, which per-element power a norm type needs (the
// specialised kinds avoid pow() for the common norms), and |x|^p for the general one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common/checks.h"

#include "common/host_device.h"

namespace fusedreg {

enum class NormKind { kL2, kL1, kInf, kP };

inline NormKind norm_kind(double norm_type) {
  TORCH_CHECK(norm_type > 0, "norm_type must be positive or inf, got ", norm_type);
  if (std::isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

// |x|^p of the general p-norm (NormKind::kP, p > 0, finite), accumulated in float for every dtype
// but float64.
// float: exp2(p * log2|x|). On the GPU log2 and exp2 are the MUFU approximations (lg2.approx and
// ex2.approx, flushing to zero), two issue slots where powf takes about eighty; on the CPU they are
// std::log2 and std::exp2, so both backends round the same product p * log2|x| and differ only by
// the approximations' few ulp. Relative error: |p * log2|x|| * 2^-24 * ln 2 from that product
// (1e-6 at p = 3, |x| = 1e-3), plus about 2^-22 * p from lg2's absolute error and 2 ulp from ex2
// on the GPU; a p-th power sum keeps that relative error, the norm (its p-th root) divides it by
// p. Special values as torch.pow: 0 -> log2 = -inf -> 0; inf -> inf; NaN -> NaN. Flushing on the
// GPU: |x| below 2^-126 (a float32 subnormal; float16 has none) counts as 0, and so does a power
// below 2^-126, which can only matter when every |x|^p of the list is that small.
// double: pow, as accurate as the float64 norms are held to be.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float log2_approx(float a) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float exp2_approx(float a) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
#endif

FUSEDREG_HOST_DEVICE inline float abs_pow(float x, float p) {
#if defined(__CUDA_ARCH__)
  return exp2_approx(p * log2_approx(fabsf(x)));
#else
  return std::exp2(p * std::log2(std::fabs(x)));
#endif
}

FUSEDREG_HOST_DEVICE inline double abs_pow(double x, double p) {
#if defined(__CUDA_ARCH__)
  return pow(fabs(x), p);
#else
  return std::pow(std::fabs(x), p);
#endif
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
