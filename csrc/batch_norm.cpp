// CPU ops of BatchNorm: fusedreg::batch_norm_fwd, _bwd, _stats, _elemt, _bwd_reduce, _bwd_elemt.
//
// Algorithm: every op is (per-channel reduction, batch_norm_stats.cpp) -> (per-channel
// coefficients, O(C)) -> (elementwise pass), in the layout of batch_norm.h ((o * C + c) * inner +
// s). The elementwise pass (batch_norm_cpu_passes.h) runs at::parallel_for over the planes
// (inner > 1) or the rows (inner == 1) with the coefficients of a channel loaded once per plane
// (or kept as [C] arrays for rows: a vectorized inner loop over contiguous channels); the fused
// training forward and backward walk a planes layout with enough channels channel by channel
// instead (reductions, then the channel's elementwise pass from cache). The loops are compiled per
// instruction-set level (batch_norm_cpu_loops.h; batch_norm_cpu_isa.h picks one). All arithmetic
// is fp32 (fp64 for double) and the order of every addition depends only on the shape and layout,
// never on the thread count: results are bitwise reproducible.
//
// Trade-off: two passes over each channel's values for the statistics plus one for the output
// (cheap where a channel's slice stays in cache), for the reference's exact two-pass numerics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "batch_norm.h"
#include "batch_norm_cpu_isa.h"
#include "batch_norm_cpu_passes.h"
#include "common/cpu_isa.h"
#include "common/dispatch.h"

namespace fusedreg {
namespace {

using bn_cpu::Pass;

using bn_cpu::Coefs;
using bn_cpu::elementwise;

// invstd and the running statistics' update of a channel from its batch moments (training).
template <typename acc>
struct BatchStats {
  int64_t n;  // values per channel, > 0
  acc eps, keep, mom;
  acc* rm;  // running_mean and running_var work buffers, or nullptr
  acc* rv;

  void finish(int64_t c, const acc* mean, const acc* m2, acc* invstd) const {
    invstd[c] = acc(1) / std::sqrt(m2[c] / static_cast<acc>(n) + eps);
    if (rm) rm[c] = keep * rm[c] + mom * mean[c];
    if (rv) rv[c] = keep * rv[c] + mom * (m2[c] / static_cast<acc>(n - 1));
  }
};

template <typename acc>
const acc* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc>() : nullptr;
}

void check_cpu(const at::Tensor& t, const char* name) { check_device_type(t, at::kCPU, name); }

// Contract: returns (output laid out as empty_like(input) in input's dtype, mean, invstd), the
// last two [C] in the statistics dtype: batch statistics in training (zeros for an empty batch),
// running_mean and 1 / torch.sqrt(running_var + eps) in eval (the reference's bits).
// Mutates running_mean/running_var in training when given (never in eval): (1 - momentum) * old +
// momentum * batch value, the variance unbiased (n / (n - 1)).
// weight/bias/running stats: [C], input's dtype or the statistics dtype. Raises ValueError for one
// value per channel in training and RuntimeError for eval without running stats.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps) {
  check_bn_input(input, "input");
  check_cpu(input, "input");
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor b = to_stats(bias, input, "bias");
  RunningStat rmean(running_mean, input, "running_mean");
  RunningStat rvar(running_var, input, "running_var");
  check_eval_running_stats(rmean, rvar, training);
  check_values_per_channel(input, training);
  BatchNormOperands ops = prepare_bn(input, nullptr, true);
  const int64_t C = ops.layout.channels;
  at::Tensor mean = bn_stats_empty(input);
  at::Tensor invstd = bn_stats_empty(input);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc* mean_p = mean.mutable_data_ptr<acc>();
    acc* invstd_p = invstd.mutable_data_ptr<acc>();
    const int64_t n = ops.layout.per_channel();
    const acc* w_p = data_or_null<acc>(w);
    const acc* b_p = data_or_null<acc>(b);
    Coefs<acc> co(C);
    if (!training) {
      // The bits of the reference's 1 / torch.sqrt(running_var + eps), so that an eval forward is
      // bitwise batch_norm_elemt on the reference's statistics, whichever of the two ran it. The
      // add and the division are IEEE operations, the same here as in torch's kernels; the square
      // root must be torch's own op (its vectorized sqrt is not always correctly rounded, so
      // std::sqrt differs in the last bit). One dispatched op, not four: each costs ~10-30 us of
      // host time when a large op has just evicted the caches.
      const acc* rm = rmean.work.const_data_ptr<acc>();
      const acc* rv = rvar.work.const_data_ptr<acc>();
      const acc eps_acc = static_cast<acc>(eps);
      for (int64_t c = 0; c < C; ++c) {
        mean_p[c] = rm[c];
        invstd_p[c] = rv[c] + eps_acc;
      }
      invstd.sqrt_();
      for (int64_t c = 0; c < C; ++c) invstd_p[c] = acc(1) / invstd_p[c];
    } else if (n == 0) {
      std::fill(mean_p, mean_p + C, acc(0));
      std::fill(invstd_p, invstd_p + C, acc(0));
    } else {
      std::vector<acc> m2(C);
      const BatchStats<acc> stats{n, static_cast<acc>(eps), static_cast<acc>(1.0 - momentum),
                                  static_cast<acc>(momentum),
                                  rmean.defined() ? rmean.work.mutable_data_ptr<acc>() : nullptr,
                                  rvar.defined() ? rvar.work.mutable_data_ptr<acc>() : nullptr};
      if (bn_cpu::by_channel(ops.layout)) {  // moments, then the channel's output from cache
        const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
        const bn_cpu::Streams<Pass::kForward, scalar_t> streams(ops);
        const CpuIsa isa = cpu_isa();
        std::vector<acc> shift(C);
        bn_cpu::for_each_channel(ops.layout, [&](int64_t c) {
          planes_moments(x, ops.layout, c, c + 1, shift.data(), mean_p, m2.data());
          stats.finish(c, mean_p, m2.data(), invstd_p);
          co.set_forward(c, mean_p, invstd_p, w_p, b_p);
          bn_cpu::apply_channel(isa, streams, ops.layout, co, c);
        });
        return;
      }
      channel_moments(ops.x.const_data_ptr<scalar_t>(), ops.layout, mean_p, m2.data());
      for (int64_t c = 0; c < C; ++c) stats.finish(c, mean_p, m2.data(), invstd_p);
    }
    for (int64_t c = 0; c < C; ++c) co.set_forward(c, mean_p, invstd_p, w_p, b_p);
    elementwise<Pass::kForward, scalar_t>(ops, co);
  });
  if (training) {  // eval never writes the running buffers, not even their own values back
    rmean.write_back();
    rvar.write_back();
  }
  return {ops.out, mean, invstd};
}

// dx from the per-channel means: (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * w
// in training, dy * invstd * w in eval (kBackwardEval never reads x).
template <typename scalar_t>
void grad_input_pass(const BatchNormOperands& ops, const at::Tensor& w, const acc_t<scalar_t>* mean,
                     const acc_t<scalar_t>* invstd, const acc_t<scalar_t>* mean_dy,
                     const acc_t<scalar_t>* mean_dy_xmu, bool training) {
  using acc = acc_t<scalar_t>;
  const int64_t C = ops.layout.channels;
  const acc* w_p = data_or_null<acc>(w);
  Coefs<acc> co(C);
  for (int64_t c = 0; c < C; ++c) co.set_backward(c, mean, invstd, w_p, mean_dy[c], mean_dy_xmu[c], training);
  if (training) {
    elementwise<Pass::kBackward, scalar_t>(ops, co);
  } else {
    elementwise<Pass::kBackwardEval, scalar_t>(ops, co);
  }
}

// batch_norm_bwd of a by_channel layout: per channel, the sums, grad_weight and grad_bias, then the
// channel's grad_input while its slices of x and dy are in cache; the bits of the whole-tensor passes.
template <Pass kPass, typename scalar_t>
void backward_by_channel(const BatchNormOperands& ops, const at::Tensor& w, const acc_t<scalar_t>* mean,
                         const acc_t<scalar_t>* invstd, acc_t<scalar_t>* gw, acc_t<scalar_t>* gb) {
  using acc = acc_t<scalar_t>;
  const BatchNormLayout& L = ops.layout;
  const acc n = static_cast<acc>(L.per_channel());
  const acc* w_p = data_or_null<acc>(w);
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = ops.dy.const_data_ptr<scalar_t>();
  const bn_cpu::Streams<kPass, scalar_t> streams(ops);
  const CpuIsa isa = cpu_isa();
  Coefs<acc> co(L.channels);
  bn_cpu::for_each_channel(L, [&](int64_t c) {
    planes_grad_sums(dy, x, L, c, c + 1, mean, gb, gw);
    const acc mean_dy = gb[c] / n, mean_dy_xmu = gw[c] / n;
    gw[c] *= invstd[c];
    co.set_backward(c, mean, invstd, w_p, mean_dy, mean_dy_xmu, kPass == Pass::kBackward);
    bn_cpu::apply_channel(isa, streams, L, co, c);
  });
}

// Contract: returns (grad_input laid out as empty_like(input) in input's dtype, grad_weight,
// grad_bias), the last two [C] in the statistics dtype: grad_bias = sum(dy), grad_weight =
// sum(dy * (x - mean)) * invstd. grad_out: input's shape and dtype, any layout; mean/invstd: [C],
// input's dtype or the statistics dtype (batch statistics in training, running ones in eval).
// Mutates nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  check_bn_input(input, "input");
  check_cpu(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  BatchNormOperands ops = prepare_bn(input, &grad_out, true);
  const int64_t C = ops.layout.channels;
  at::Tensor grad_weight = bn_stats_empty(input);
  at::Tensor grad_bias = bn_stats_empty(input);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* mean_p = m.const_data_ptr<acc>();
    const acc* invstd_p = is.const_data_ptr<acc>();
    acc* gw = grad_weight.mutable_data_ptr<acc>();
    acc* gb = grad_bias.mutable_data_ptr<acc>();
    const int64_t n = ops.layout.per_channel();
    if (bn_cpu::by_channel(ops.layout)) {  // n > 0
      if (training) {
        backward_by_channel<Pass::kBackward, scalar_t>(ops, w, mean_p, invstd_p, gw, gb);
      } else {
        backward_by_channel<Pass::kBackwardEval, scalar_t>(ops, w, mean_p, invstd_p, gw, gb);
      }
      return;
    }
    channel_grad_sums(ops.dy.const_data_ptr<scalar_t>(), ops.x.const_data_ptr<scalar_t>(), ops.layout,
                      mean_p, gb, gw);  // gw holds sum(dy * (x - mean)) until scaled below
    std::vector<acc> mean_dy(C, acc(0)), mean_dy_xmu(C, acc(0));
    for (int64_t c = 0; c < C; ++c) {
      if (n > 0) {
        mean_dy[c] = gb[c] / static_cast<acc>(n);
        mean_dy_xmu[c] = gw[c] / static_cast<acc>(n);
      }
      gw[c] *= invstd_p[c];
    }
    grad_input_pass<scalar_t>(ops, w, mean_p, invstd_p, mean_dy.data(), mean_dy_xmu.data(),
                              training && n > 0);
  });
  return {ops.out, grad_weight, grad_bias};
}

// Contract: returns (mean, biased variance) over every dim but 1, [C] in the statistics dtype;
// zeros for an empty batch. Mutates nothing.
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  check_bn_input(input, "input");
  check_cpu(input, "input");
  BatchNormOperands ops = prepare_bn(input, nullptr, false);
  at::Tensor mean = bn_stats_empty(input);
  at::Tensor var = bn_stats_empty(input);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_stats_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc* var_p = var.mutable_data_ptr<acc>();
    channel_moments(ops.x.const_data_ptr<scalar_t>(), ops.layout, mean.mutable_data_ptr<acc>(), var_p);
    const int64_t n = ops.layout.per_channel();
    for (int64_t c = 0; c < ops.layout.channels; ++c) {
      var_p[c] = n > 0 ? var_p[c] / static_cast<acc>(n) : acc(0);
    }
  });
  return {mean, var};
}

// Contract: returns (input - mean) * invstd * weight + bias laid out as empty_like(input), input's
// dtype; weight/bias optional (1 / 0); per-channel tensors [C] in input's or the statistics dtype.
at::Tensor batch_norm_elemt_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                const at::Tensor& invstd) {
  check_bn_input(input, "input");
  check_cpu(input, "input");
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor b = to_stats(bias, input, "bias");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  BatchNormOperands ops = prepare_bn(input, nullptr, true);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_elemt_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const int64_t C = ops.layout.channels;
    const acc *w_p = data_or_null<acc>(w), *b_p = data_or_null<acc>(b);
    const acc *m_p = m.const_data_ptr<acc>(), *is_p = is.const_data_ptr<acc>();
    Coefs<acc> co(C);
    for (int64_t c = 0; c < C; ++c) co.set_forward(c, m_p, is_p, w_p, b_p);
    elementwise<Pass::kForward, scalar_t>(ops, co);
  });
  return ops.out;
}

// Contract: returns (sum(grad_out), sum(grad_out * (input - mean))) per channel, [C] in the
// statistics dtype. grad_out: input's shape and dtype; mean: [C]. Mutates nothing.
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cpu(const at::Tensor& grad_out,
                                                             const at::Tensor& input,
                                                             const at::Tensor& mean) {
  check_bn_input(input, "input");
  check_cpu(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const at::Tensor m = to_stats(mean, input, "mean");
  BatchNormOperands ops = prepare_bn(input, &grad_out, false);
  at::Tensor sum_dy = bn_stats_empty(input);
  at::Tensor sum_dy_xmu = bn_stats_empty(input);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_reduce_cpu", [&] {
    using acc = acc_t<scalar_t>;
    channel_grad_sums(ops.dy.const_data_ptr<scalar_t>(), ops.x.const_data_ptr<scalar_t>(), ops.layout,
                      m.const_data_ptr<acc>(), sum_dy.mutable_data_ptr<acc>(),
                      sum_dy_xmu.mutable_data_ptr<acc>());
  });
  return {sum_dy, sum_dy_xmu};
}

// Contract: returns (grad_out - mean_dy - (input - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
// laid out as empty_like(input), input's dtype; weight optional (1); the rest [C]. Mutates nothing.
at::Tensor batch_norm_bwd_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& mean_dy,
                                    const at::Tensor& mean_dy_xmu) {
  check_bn_input(input, "input");
  check_cpu(input, "input");
  check_like_input(grad_out, input, "grad_out");
  const at::Tensor w = to_stats(weight, input, "weight");
  const at::Tensor m = to_stats(mean, input, "mean");
  const at::Tensor is = to_stats(invstd, input, "invstd");
  const at::Tensor mdy = to_stats(mean_dy, input, "mean_dy");
  const at::Tensor mdxmu = to_stats(mean_dy_xmu, input, "mean_dy_xmu");
  BatchNormOperands ops = prepare_bn(input, &grad_out, true);
  FUSEDREG_DISPATCH_FLOATING(input.scalar_type(), "fusedreg_batch_norm_bwd_elemt_cpu", [&] {
    using acc = acc_t<scalar_t>;
    grad_input_pass<scalar_t>(ops, w, m.const_data_ptr<acc>(), is.const_data_ptr<acc>(),
                              mdy.const_data_ptr<acc>(), mdxmu.const_data_ptr<acc>(), true);
  });
  return ops.out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("batch_norm_fwd", &fusedreg::batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &fusedreg::batch_norm_bwd_cpu);
  m.impl("batch_norm_stats", &fusedreg::batch_norm_stats_cpu);
  m.impl("batch_norm_elemt", &fusedreg::batch_norm_elemt_cpu);
  m.impl("batch_norm_bwd_reduce", &fusedreg::batch_norm_bwd_reduce_cpu);
  m.impl("batch_norm_bwd_elemt", &fusedreg::batch_norm_bwd_elemt_cpu);
}
