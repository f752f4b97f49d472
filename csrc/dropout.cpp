// CPU kernels of fused dropout (fusedreg::dropout_fwd, dropout_fwd_, dropout_bwd, dropout_add_fwd).
//
// The mask is regenerated from (seed, memory index) by csrc/common/philox.h, one Philox4x32-10 call
// per group of 4 elements, so it is bit-identical to the reference, CUDA and Triton backends and
// backward needs only the seed. Groups are split across threads with at::parallel_for; every
// group is independent, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/philox.h"
#include "dropout.h"

namespace fusedreg {
namespace {

constexpr int64_t kGroupsPerTask = 1024;

// out[i] = residual[i] + (keep(i) ? (x[i] + bias[b(i)]) * scale : 0), with residual and bias
// present only when kAdd. acc is fp32 (fp64 for double); each output is rounded once.
template <typename scalar_t, bool kAdd>
void dropout_cpu_kernel(const DropoutOperands& ops, uint64_t seed, double p) {
  using acc = acc_t<scalar_t>;
  const int64_t n = ops.out.numel();
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  scalar_t* out = ops.out.mutable_data_ptr<scalar_t>();
  const scalar_t* residual = kAdd ? ops.residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bias = kAdd && ops.bias.defined() ? ops.bias.const_data_ptr<scalar_t>() : nullptr;
  const bool drop_all = p >= 1.0;
  const uint32_t threshold = drop_all ? 0u : dropout_threshold(p);
  const acc scale = drop_all ? acc(0) : std::is_same_v<acc, double> ? acc(dropout_scale_f64(p))
                                                                     : acc(dropout_scale(p));
  const int64_t groups = (n + kDropoutElemsPerGroup - 1) / kDropoutElemsPerGroup;
  at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const Philox4x32Words words = drop_all ? Philox4x32Words{} : dropout_group_words(seed, group);
      for (int k = 0; k < kDropoutElemsPerGroup; ++k) {
        const int64_t i = group * kDropoutElemsPerGroup + k;
        if (i >= n) break;
        acc v = static_cast<acc>(x[i]);
        if constexpr (kAdd) {
          if (bias) v += static_cast<acc>(bias[(i / ops.bias_stride) % ops.bias_size]);
        }
        acc y = (!drop_all && dropout_keep(words.w[k], threshold)) ? v * scale : acc(0);
        if constexpr (kAdd) y = static_cast<acc>(residual[i]) + y;
        out[i] = static_cast<scalar_t>(y);
      }
    }
  });
}

uint64_t read_seed(const at::Tensor& seed) {
  return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
}

template <bool kAdd>
void launch(const DropoutOperands& ops, const at::Tensor& seed, double p) {
  if (ops.out.numel() == 0) return;
  FUSEDREG_DISPATCH_FLOATING(ops.out.scalar_type(), "fusedreg_dropout_cpu", [&] {
    dropout_cpu_kernel<scalar_t, kAdd>(ops, read_seed(seed), p);
  });
}

// Contract: returns a new tensor laid out as at::empty_like(input), same dtype; reads seed (int64,
// one element, CPU); mutates nothing.
at::Tensor dropout_fwd_cpu(const at::Tensor& input, const at::Tensor& seed, double p) {
  check_dropout_args(input, seed, p, "input");
  DropoutOperands ops = prepare_dropout(input);
  launch<false>(ops, seed, p);
  return ops.out;
}

// Contract: mutates input in place with the values dropout_fwd_cpu would return; returns nothing.
void dropout_fwd_inplace_cpu(at::Tensor& input, const at::Tensor& seed, double p) {
  check_dropout_args(input, seed, p, "input");
  if (input.is_non_overlapping_and_dense()) {
    DropoutOperands ops{input, {}, {}, input};
    launch<false>(ops, seed, p);
  } else {
    input.copy_(dropout_fwd_cpu(input, seed, p));
  }
}

// Contract: grad must be in the forward output's layout (the autograd Function ensures it).
at::Tensor dropout_bwd_cpu(const at::Tensor& grad, const at::Tensor& seed, double p) {
  check_dropout_args(grad, seed, p, "grad");
  DropoutOperands ops = prepare_dropout(grad);
  launch<false>(ops, seed, p);
  return ops.out;
}

// Contract: returns residual + dropout(input + bias) laid out as at::empty_like(input); residual
// has input's shape, dtype and device; bias (optional) is [input.size(-1)] of input's dtype.
at::Tensor dropout_add_fwd_cpu(const at::Tensor& input, const at::Tensor& residual,
                               const std::optional<at::Tensor>& bias, const at::Tensor& seed, double p) {
  check_dropout_args(input, seed, p, "input");
  DropoutOperands ops = prepare_dropout_add(input, residual, bias);
  launch<true>(ops, seed, p);
  return ops.out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("dropout_fwd", &fusedreg::dropout_fwd_cpu);
  m.impl("dropout_fwd_", &fusedreg::dropout_fwd_inplace_cpu);
  m.impl("dropout_bwd", &fusedreg::dropout_bwd_cpu);
  m.impl("dropout_add_fwd", &fusedreg::dropout_add_fwd_cpu);
}
