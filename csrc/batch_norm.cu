// CUDA ops of BatchNorm: fusedreg::batch_norm_fwd, _bwd, _stats, _elemt, _bwd_reduce, _bwd_elemt:
// argument handling, the choice between the paths below, per-device caches, registration.
// Kernels: batch_norm_onchip.cu, batch_norm_stats.cu (split reductions), batch_norm_elemt.cu
// (elementwise); what they share: batch_norm.cuh.
//
// Layout (batch_norm.h): element (o, c, s) at (o * C + c) * inner + s. Two native traversals:
// - planes (inner > 1, NCHW-like): a channel is `outer` runs of `inner` contiguous values; threads
//   walk a channel's "units" (V values of one run, a 16-byte vector when inner % V == 0 and the
//   pointers are aligned, else V = 1) with a carried (o, unit) cursor: one division per thread.
// - rows (inner == 1: channels_last, channels_last_3d, (N, C)): an [R, C] matrix; a block is
//   bx x by threads, thread (ty, tx) owns the V consecutive channels of one 16-byte column unit
//   and walks rows ty, ty + by, ..., so every warp reads whole rows of C (coalesced).
//
// Training forward, two paths:
// - on chip (a channel's slice, or a rows tile of bx * V channels, fits in shared memory, and
//   there are enough channels to fill the GPU): one block per channel (tile) loads the slice once
//   into shared memory, computes the exact two-pass statistics from there, updates the running
//   statistics and writes y: one launch, 8 B/elem fp32. Backward likewise caches x and dy: 12 B/elem.
// - split: a reduction kernel gives per-(split, channel) partials: (count, mean, m2) of x - shift
//   (shift = the channel's first value; Chan's merge of exact per-vector two-pass moments), or the
//   backward sums; a finalize kernel (a warp per channel) merges the splits in split order, writes
//   mean/invstd (or var) and updates running_mean / running_var (unbiased) in place; then one
//   elementwise pass. 12 B/elem fp32 forward; backward reads dy and x twice.
// Eval forward is the elementwise kernel alone, invstd computed from running_var on the fly.
//
// Determinism: every reduction combines values in an order fixed by the shape, layout and grid
// (fixed trees in shared memory, splits merged in index order); no float atomics.
// Trade-off: the split path reads x twice; the on-chip path leaves SMs idle when C (or the number
// of rows tiles) is small next to the SM count, so it is used only when it fills the GPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "batch_norm.cuh"
#include "batch_norm.h"
#include "common/dispatch.h"

namespace fusedreg {
namespace bn {

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int resident_per_sm(const void* kernel, int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(static_cast<int>(c10::cuda::current_device()), kernel, threads, smem);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
    it = cache.emplace(key, std::max(blocks, 1)).first;
  }
  return it->second;
}

int64_t onchip_capacity(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(c10::cuda::current_device()), kernel);
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    const int64_t capacity = optin - static_cast<int64_t>(attr.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(capacity)));
    it = cache.emplace(key, capacity).first;
  }
  return it->second;
}

namespace {

void check_cuda(const at::Tensor& t, const char* name) { check_device_type(t, at::kCUDA, name); }

template <typename acc>
const acc* cptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc>() : nullptr;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename scalar_t>
Operands<scalar_t> operands_of(const BatchNormOperands& ops) {
  return {ops.x.const_data_ptr<scalar_t>(), ops.dy.defined() ? ops.dy.const_data_ptr<scalar_t>() : nullptr,
          ops.out.defined() ? ops.out.mutable_data_ptr<scalar_t>() : nullptr, ops.layout};
}

// Contract: returns (output laid out as empty_like(input) in input's dtype, mean, invstd), the
// last two [C] in the statistics dtype: batch statistics in training (zeros for an empty batch),
// running_mean and 1/sqrt(running_var + eps) in eval. Mutates running_mean/running_var in training
// when given, inside the launches (through a statistics-dtype copy when they are not contiguous
// statistics-dtype tensors): (1 - momentum) * old + momentum * batch value, the variance unbiased.
// Raises ValueError for one value per channel in training, RuntimeError for eval without running
// stats. Never syncs with the host.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor b = to_stats(bias, input, "bias");
  RunningStat rmean(running_mean, input, "running_mean");
  RunningStat rvar(running_var, input, "running_var");
  check_eval_running_stats(rmean, rvar, training);
  check_values_per_channel(input, training);
  BatchNormOperands ops = prepare_bn(input, nullptr, true);
  at::Tensor mean = bn_stats_empty(input);
  at::Tensor invstd = bn_stats_empty(input);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_fwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    CoefArgs<acc> co{};
    co.weight = cptr<acc>(w);
    co.shift = cptr<acc>(b);
    co.count = acc(1);
    co.eps = static_cast<acc>(eps);
    if (!training) {
      co.mean = cptr<acc>(rmean.work);
      co.invstd = cptr<acc>(rvar.work);
      co.from_var = true;
      if (ops.layout.numel() == 0) {
        mean.copy_(rmean.work);
        invstd.copy_(at::reciprocal(at::sqrt(rvar.work + eps)));
      }
      co.mean_out = mean.mutable_data_ptr<acc>();
      co.invstd_out = invstd.mutable_data_ptr<acc>();
      launch_elementwise<scalar_t, Pass::kForward>(operands_of<scalar_t>(ops), co);
      return;
    }
    if (ops.layout.per_channel() == 0) {
      mean.zero_();
      invstd.zero_();
      return;
    }
    const acc keep = static_cast<acc>(1.0 - momentum), mom = static_cast<acc>(momentum);
    OnchipArgs<acc> oa{};
    oa.C = ops.layout.channels;
    oa.inner = ops.layout.inner;
    oa.outer = ops.layout.outer;
    oa.eps = co.eps;
    oa.keep = keep;
    oa.momentum = mom;
    oa.weight = co.weight;
    oa.bias = co.shift;
    oa.running_mean = ptr_or_null<acc>(rmean.work);
    oa.running_var = ptr_or_null<acc>(rvar.work);
    oa.mean = mean.mutable_data_ptr<acc>();
    oa.invstd = invstd.mutable_data_ptr<acc>();
    if (try_onchip<scalar_t, false>(operands_of<scalar_t>(ops), oa)) return;
    FinalizeArgs<acc> fin{};
    fin.eps = co.eps;
    fin.keep = keep;
    fin.momentum = mom;
    fin.first_out = oa.mean;
    fin.second_out = oa.invstd;
    fin.running_mean = oa.running_mean;
    fin.running_var = oa.running_var;
    launch_split_reduce<scalar_t, false>(operands_of<scalar_t>(ops), nullptr, fin);
    co.mean = oa.mean;
    co.invstd = oa.invstd;
    launch_elementwise<scalar_t, Pass::kForward>(operands_of<scalar_t>(ops), co);
  });
  rmean.write_back();
  rvar.write_back();
  return {ops.out, mean, invstd};
}

// Contract: returns (grad_input laid out as empty_like(input) in input's dtype, grad_weight,
// grad_bias), the last two [C] in the statistics dtype: grad_bias = sum(dy), grad_weight =
// sum(dy * (x - mean)) * invstd; grad_input as in the schema for training, dy * invstd * weight in
// eval. grad_out: input's shape and dtype, any layout. Mutates nothing; never syncs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  BatchNormOperands ops = prepare_bn(input, &grad_out, true);
  at::Tensor grad_weight = bn_stats_empty(input);
  at::Tensor grad_bias = bn_stats_empty(input);
  if (ops.layout.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {ops.out, grad_weight, grad_bias};
  }
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    OnchipArgs<acc> oa{};
    oa.C = ops.layout.channels;
    oa.inner = ops.layout.inner;
    oa.outer = ops.layout.outer;
    oa.weight = cptr<acc>(w);
    oa.mean = const_cast<acc*>(cptr<acc>(m));  // read only in the backward kernel
    oa.invstd = const_cast<acc*>(cptr<acc>(is));
    oa.grad_weight = grad_weight.mutable_data_ptr<acc>();
    oa.grad_bias = grad_bias.mutable_data_ptr<acc>();
    oa.training = training;
    if (try_onchip<scalar_t, true>(operands_of<scalar_t>(ops), oa)) return;
    at::Tensor sum_dy_xmu = bn_stats_empty(input);
    FinalizeArgs<acc> fin{};
    fin.first_out = oa.grad_bias;
    fin.second_out = sum_dy_xmu.mutable_data_ptr<acc>();
    fin.invstd = oa.invstd;
    fin.grad_weight = oa.grad_weight;
    launch_split_reduce<scalar_t, true>(operands_of<scalar_t>(ops), oa.mean, fin);
    CoefArgs<acc> co{};
    co.mean = oa.mean;
    co.invstd = oa.invstd;
    co.weight = oa.weight;
    co.shift = oa.grad_bias;
    co.dot = sum_dy_xmu.const_data_ptr<acc>();
    co.count = static_cast<acc>(ops.layout.per_channel());
    if (training) {
      launch_elementwise<scalar_t, Pass::kBackward>(operands_of<scalar_t>(ops), co);
    } else {
      launch_elementwise<scalar_t, Pass::kBackwardEval>(operands_of<scalar_t>(ops), co);
    }
  });
  return {ops.out, grad_weight, grad_bias};
}

// Contract: returns (mean, biased variance) over every dim but 1, [C] in the statistics dtype;
// zeros for an empty batch. Mutates nothing.
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  BatchNormOperands ops = prepare_bn(input, nullptr, false);
  at::Tensor mean = bn_stats_empty(input);
  at::Tensor var = bn_stats_empty(input);
  if (ops.layout.per_channel() == 0) {
    mean.zero_();
    var.zero_();
    return {mean, var};
  }
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_stats_cuda", [&] {
    using acc = acc_t<scalar_t>;
    FinalizeArgs<acc> fin{};
    fin.first_out = mean.mutable_data_ptr<acc>();
    fin.second_out = var.mutable_data_ptr<acc>();
    fin.out_var = true;
    launch_split_reduce<scalar_t, false>(operands_of<scalar_t>(ops), nullptr, fin);
  });
  return {mean, var};
}

// Contract: returns (input - mean) * invstd * weight + bias laid out as empty_like(input), input's
// dtype; weight/bias optional (1 / 0); per-channel tensors [C] in input's or the statistics dtype.
at::Tensor batch_norm_elemt_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor b = to_stats(bias, input, "bias");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  BatchNormOperands ops = prepare_bn(input, nullptr, true);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_elemt_cuda", [&] {
    using acc = acc_t<scalar_t>;
    CoefArgs<acc> co{};
    co.mean = cptr<acc>(m);
    co.invstd = cptr<acc>(is);
    co.weight = cptr<acc>(w);
    co.shift = cptr<acc>(b);
    co.count = acc(1);
    launch_elementwise<scalar_t, Pass::kForward>(operands_of<scalar_t>(ops), co);
  });
  return ops.out;
}

// Contract: returns (sum(grad_out), sum(grad_out * (input - mean))) per channel, [C] in the
// statistics dtype. grad_out: input's shape and dtype; mean: [C]. Mutates nothing.
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cuda(const at::Tensor& grad_out,
                                                              const at::Tensor& input,
                                                              const at::Tensor& mean) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor m = to_stats(mean, input, "mean");
  BatchNormOperands ops = prepare_bn(input, &grad_out, false);
  at::Tensor sum_dy = bn_stats_empty(input);
  at::Tensor sum_dy_xmu = bn_stats_empty(input);
  if (ops.layout.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_reduce_cuda", [&] {
    using acc = acc_t<scalar_t>;
    FinalizeArgs<acc> fin{};
    fin.first_out = sum_dy.mutable_data_ptr<acc>();
    fin.second_out = sum_dy_xmu.mutable_data_ptr<acc>();
    launch_split_reduce<scalar_t, true>(operands_of<scalar_t>(ops), cptr<acc>(m), fin);
  });
  return {sum_dy, sum_dy_xmu};
}

// Contract: returns (grad_out - mean_dy - (input - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
// laid out as empty_like(input), input's dtype; weight optional (1); the rest [C]. Mutates nothing.
at::Tensor batch_norm_bwd_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& mean_dy,
                                     const at::Tensor& mean_dy_xmu) {
  check_bn_input(input, "input");
  check_cuda(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  const at::Tensor mdy = to_stats(mean_dy, input, "mean_dy");
  const at::Tensor mdxmu = to_stats(mean_dy_xmu, input, "mean_dy_xmu");
  BatchNormOperands ops = prepare_bn(input, &grad_out, true);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_elemt_cuda", [&] {
    using acc = acc_t<scalar_t>;
    CoefArgs<acc> co{};
    co.mean = cptr<acc>(m);
    co.invstd = cptr<acc>(is);
    co.weight = cptr<acc>(w);
    co.shift = cptr<acc>(mdy);
    co.dot = cptr<acc>(mdxmu);
    co.count = acc(1);
    launch_elementwise<scalar_t, Pass::kBackward>(operands_of<scalar_t>(ops), co);
  });
  return ops.out;
}

}  // namespace
}  // namespace bn
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("batch_norm_fwd", &fusedreg::bn::batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd", &fusedreg::bn::batch_norm_bwd_cuda);
  m.impl("batch_norm_stats", &fusedreg::bn::batch_norm_stats_cuda);
  m.impl("batch_norm_elemt", &fusedreg::bn::batch_norm_elemt_cuda);
  m.impl("batch_norm_bwd_reduce", &fusedreg::bn::batch_norm_bwd_reduce_cuda);
  m.impl("batch_norm_bwd_elemt", &fusedreg::bn::batch_norm_bwd_elemt_cuda);
}
