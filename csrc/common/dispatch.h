// dtype dispatch for kernels (host only; usable from .cpp and .cu).
//
// FUSEDREG_DISPATCH_FLOATING(dtype, name, [&] { ...scalar_t... })
//     float, double, at::Half, at::BFloat16: CPU kernels and CUDA kernels that support double.
// FUSEDREG_DISPATCH_FLOATING_NO_DOUBLE(dtype, name, [&] { ...scalar_t... })
//     float, at::Half, at::BFloat16: CUDA kernels that skip double (it would double the compiled
//     variants of every kernel for a dtype nobody trains in).
// acc_t<scalar_t>
//     the type to do arithmetic in: float for float/half/bfloat16, double for double. Loads and
//     stores use scalar_t; everything between them uses acc_t, so low precision only rounds once.
// Any other dtype raises "<name>" not implemented for '<dtype>'.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define FUSEDREG_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

#define FUSEDREG_DISPATCH_FLOATING_NO_DOUBLE(TYPE, NAME, ...)   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace fusedreg {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

}  // namespace fusedreg
