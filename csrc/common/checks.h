// Argument checks shared by every op launcher (host only; usable from .cpp and .cu).
//
// Each check wraps TORCH_CHECK and names the offending argument, and for tensor lists its index
// ("tensors[3] is on cpu, but tensors[0] is on cuda:0"), so a failing call says what to fix.
// Messages are built only on failure; the passing path costs a few field reads per tensor, which
// matters for multi-tensor ops called with hundreds of small tensors every step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fusedreg {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
}

inline void check_device(const at::Tensor& t, at::Device device, const char* name) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

// Device type only (any CUDA index): what a TORCH_LIBRARY_IMPL(CUDA | CPU) kernel can rely on.
inline void check_device_type(const at::Tensor& t, at::DeviceType type, const char* name) {
  TORCH_CHECK(t.device().type() == type, name, " must be a ", at::DeviceTypeName(type, true),
              " tensor, got one on ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must have a floating-point dtype, got ", t.scalar_type());
}

// Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly once, so a
// kernel may walk memory linearly (channels_last and other permuted layouts included).
inline void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name,
              " must be non-overlapping and dense (e.g. contiguous or channels_last), got sizes ",
              t.sizes(), " and strides ", t.strides(), "; call .contiguous() first");
}

// Whether a and b have equal sizes and put every element at the same memory offset: their strides
// agree on every dimension of size > 1. A size-1 dimension's index is always 0, so its stride is
// never used and torch leaves it arbitrary: AccumulateGrad keeps a contiguous gradient of strides
// [1, 1] for a [1, 8] parameter of strides [8, 1], and both walk memory alike.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  const c10::IntArrayRef sizes = a.sizes();
  if (sizes != b.sizes()) return false;
  const c10::IntArrayRef sa = a.strides(), sb = b.strides();
  if (sa == sb) return true;
  for (size_t d = 0; d < sa.size(); ++d) {
    if (sizes[d] != 1 && sa[d] != sb[d]) return false;
  }
  return true;
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

// A one-element tensor of `dtype` (any shape with one element: [], [1], [1, 1]).
inline void check_scalar_tensor(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.numel() == 1, name, " must have exactly one element, got shape ", t.sizes());
  check_dtype(t, dtype, name);
}

inline void check_nonempty(at::TensorList list, const char* name) {
  TORCH_CHECK(!list.empty(), name, " must be a non-empty list of tensors");
}

inline void check_same_length(at::TensorList a, const char* a_name, at::TensorList b,
                              const char* b_name) {
  TORCH_CHECK(a.size() == b.size(), a_name, " and ", b_name, " must have the same length, got ",
              a.size(), " and ", b.size());
}

// Every tensor of `list` on the device of list[0] (which must exist: check_nonempty first).
inline void check_same_device(at::TensorList list, const char* name) {
  for (size_t i = 1; i < list.size(); ++i) {
    TORCH_CHECK(list[i].device() == list[0].device(), name, "[", i, "] is on ", list[i].device(),
                ", but ", name, "[0] is on ", list[0].device(), "; all must share one device");
  }
}

inline void check_same_dtype(at::TensorList list, const char* name) {
  for (size_t i = 1; i < list.size(); ++i) {
    TORCH_CHECK(list[i].scalar_type() == list[0].scalar_type(), name, "[", i, "] has dtype ",
                list[i].scalar_type(), ", but ", name, "[0] has ", list[0].scalar_type(),
                "; all must share one dtype");
  }
}

// check_dense for every tensor of `list` that has elements (an empty one is never read).
inline void check_all_dense(at::TensorList list, const char* name) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].numel() == 0 || list[i].is_non_overlapping_and_dense(), name, "[", i,
                "] must be non-overlapping and dense (e.g. contiguous or channels_last), got sizes ",
                list[i].sizes(), " and strides ", list[i].strides(), "; call .contiguous() first");
  }
}

// Element-wise partners: a[i] and b[i] have the same shape, for every i.
inline void check_same_shapes(at::TensorList a, const char* a_name, at::TensorList b,
                              const char* b_name) {
  check_same_length(a, a_name, b, b_name);
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), a_name, "[", i, "] has shape ", a[i].sizes(), ", but ",
                b_name, "[", i, "] has shape ", b[i].sizes());
  }
}

}  // namespace fusedreg
