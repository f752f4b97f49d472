// Host-side argument handling shared by the CPU (batch_norm.cpp) and CUDA (batch_norm.cu) launchers
// of fusedreg::batch_norm_fwd / _bwd / _stats / _elemt / _bwd_reduce / _bwd_elemt.
//
// Layout rule (as fusedreg/reference/batch_norm.py): outputs are at::empty_like(input); an input
// that is not non-overlapping and dense is first copied into that layout, and every other
// per-element operand (grad_out) is brought into it too. Kernels then see one dense layout,
// described by three numbers (BatchNormLayout, batch_norm_layout.h):
//     memory offset of element (o, c, s) = (o * C + c) * inner + s,   o < outer, s < inner
// inner = input.stride(1) (the product of the sizes of the dims stored inside the channel dim),
// outer = numel / (C * inner). Contiguous NC* inputs have outer = N, inner = H*W; channels_last
// and channels_last_3d (and plain (N, C)) have inner = 1: rows of a [outer, C] matrix. Any other
// dense permutation fits the same formula, so no layout is ever transposed.
//
// Per-channel tensors (weight, bias, running stats, statistics) may be in the input's dtype or in
// the statistics dtype (float32, float64 for float64 input), like F.batch_norm accepts; kernels
// see them as contiguous statistics-dtype arrays (`to_stats`), and running stats that are not
// already such an array are updated through one (`RunningStat`).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>

#include "batch_norm_layout.h"
#include "common/checks.h"
#include "common/dispatch.h"

namespace fusedreg {

inline at::ScalarType bn_stats_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bn_input(const at::Tensor& input, const char* name) {
  check_defined(input, name);
  check_floating(input, name);
  TORCH_CHECK_VALUE(input.dim() >= 2, "batch_norm expects an input of shape (N, C, *), got ",
                    input.sizes());
}

// `t`'s values in a tensor laid out as `like` (t itself when it already is).
inline at::Tensor bn_in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

// `dense` must be non-overlapping and dense (an empty_like output is).
inline BatchNormLayout bn_layout(const at::Tensor& dense) {
  BatchNormLayout layout;
  layout.channels = dense.size(1);
  const int64_t numel = dense.numel();
  if (numel == 0) return layout;
  // One channel: every element is channel 0, whatever stride(1) says, so walk memory as one run.
  layout.inner = layout.channels == 1 ? numel : dense.stride(1);
  layout.outer = numel / (layout.channels * layout.inner);
  return layout;
}

// A second per-element operand (grad_out) of input's shape, dtype and device.
inline void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.sizes() == input.sizes(), name, " must have input's shape ", input.sizes(), ", got ",
              t.sizes());
  check_dtype(t, input.scalar_type(), name);
  check_device(t, input.device(), name);
}

// A per-channel [C] tensor of input's dtype or the statistics dtype, on input's device.
inline void check_channel_tensor(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), name, " must have shape [C] = [",
              input.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == bn_stats_dtype(input),
              name, " must have dtype ", input.scalar_type(), " or ", bn_stats_dtype(input),
              " (the input's dtype or the statistics dtype), got ", t.scalar_type());
  check_device(t, input.device(), name);
}

// A checked per-channel tensor as a contiguous statistics-dtype array; undefined when absent.
inline at::Tensor to_stats(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_channel_tensor(*t, input, name);
  return t->to(bn_stats_dtype(input)).contiguous();
}

inline at::Tensor to_stats(const at::Tensor& t, const at::Tensor& input, const char* name) {
  return to_stats(std::optional<at::Tensor>(t), input, name);
}

// A running statistic the kernels update in place: `work` is the caller's tensor itself when it
// is a contiguous statistics-dtype array, else a copy that `write_back` copies into it.
struct RunningStat {
  at::Tensor target;
  at::Tensor work;

  RunningStat(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
    if (!t.has_value() || !t->defined()) return;
    check_channel_tensor(*t, input, name);
    target = *t;
    const bool usable = t->scalar_type() == bn_stats_dtype(input) && t->is_contiguous();
    work = usable ? target : target.to(bn_stats_dtype(input)).contiguous();
  }
  bool defined() const { return work.defined(); }
  void write_back() {
    if (work.defined() && !work.is_same(target)) target.copy_(work);
  }
};

// Training needs two values per channel for a variance; same error (ValueError) as F.batch_norm.
inline void check_values_per_channel(const at::Tensor& input, bool training) {
  if (!training || input.numel() == 0 || input.size(1) == 0) return;
  if (input.numel() / input.size(1) != 1) return;
  std::ostringstream size;
  size << "torch.Size([";
  for (int64_t d = 0; d < input.dim(); ++d) size << (d ? ", " : "") << input.size(d);
  size << "])";
  TORCH_CHECK_VALUE(false, "Expected more than 1 value per channel when training, got input size ",
                    size.str());
}

inline void check_eval_running_stats(const RunningStat& mean, const RunningStat& var, bool training) {
  TORCH_CHECK(training || (mean.defined() && var.defined()),
              "running_mean must be defined in evaluation mode");
}

// The per-element operands of one call, all in out's layout.
struct BatchNormOperands {
  at::Tensor x;      // input
  at::Tensor dy;     // grad_out (backward ops), else undefined
  at::Tensor out;    // at::empty_like(input) (ops with a per-element result), else undefined
  BatchNormLayout layout;
};

inline BatchNormOperands prepare_bn(const at::Tensor& input, const at::Tensor* grad_out,
                                    bool with_out) {
  BatchNormOperands ops;
  const at::Tensor like = at::empty_like(input);
  ops.x = bn_in_layout_of(input, like);
  if (grad_out != nullptr) ops.dy = bn_in_layout_of(*grad_out, like);
  if (with_out) ops.out = like;
  ops.layout = bn_layout(like);
  return ops;
}

inline at::Tensor bn_stats_empty(const at::Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(bn_stats_dtype(input)));
}

// ----------------------------------------------------------------------------- CPU reductions
// Defined in batch_norm_stats.cpp for every FUSEDREG_DISPATCH_FLOATING dtype; used by batch_norm.cpp.

constexpr int64_t kCpuGrainElems = 32768;  // elements per at::parallel_for task, roughly

// Per-channel mean and m2 = sum((x - mean)^2) of x; zeros for an empty batch.
template <typename scalar_t>
void channel_moments(const scalar_t* x, const BatchNormLayout& L, acc_t<scalar_t>* mean,
                     acc_t<scalar_t>* m2);

// Per-channel sum(dy) and sum(dy * (x - mean)).
template <typename scalar_t>
void channel_grad_sums(const scalar_t* dy, const scalar_t* x, const BatchNormLayout& L,
                       const acc_t<scalar_t>* mean, acc_t<scalar_t>* sum_dy, acc_t<scalar_t>* sum_dy_xmu);

// The same for channels [c0, c1) of a planes layout (inner > 1, numel > 0), on the calling thread,
// with the bits the whole-tensor functions give them: for passes that walk channel by channel
// (batch_norm.cpp). Arrays are [C], indexed by channel; shift is scratch.
template <typename scalar_t>
void planes_moments(const scalar_t* x, const BatchNormLayout& L, int64_t c0, int64_t c1,
                    acc_t<scalar_t>* shift, acc_t<scalar_t>* mean, acc_t<scalar_t>* m2);
template <typename scalar_t>
void planes_grad_sums(const scalar_t* dy, const scalar_t* x, const BatchNormLayout& L, int64_t c0, int64_t c1,
                      const acc_t<scalar_t>* mean, acc_t<scalar_t>* sum_dy, acc_t<scalar_t>* sum_dy_xmu);

}  // namespace fusedreg
