// CUDA ops of fused dropout (fusedreg::dropout_fwd, dropout_fwd_, dropout_bwd, dropout_add_fwd):
// argument checks, the plan (fast / vector / scalar kernel, dropout.h's plan_dropout_cuda), grid
// sizing, one launch per 2**31-element segment, and registration. The kernel, its algorithm and its
// trade-offs are in dropout_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/philox.h"
#include "common/vec.cuh"
#include "dropout.h"
#include "dropout_kernel.cuh"

namespace fusedreg {
namespace {

// Blocks of the kernel resident on the current device at once (SMs x blocks per SM), queried once
// per device and kept per kernel instantiation. A grid-stride kernel launched with more blocks than
// fit would run the excess as a second, mostly idle wave; the occupancy query, unlike a fixed
// threads-per-SM figure, accounts for kernels whose register count limits residency. Per device:
// the GPUs of one process may differ. Both queries are attribute reads, neither a stream operation
// nor a synchronization, so a first use inside CUDA-graph capture is allowed. Two threads may both
// query on a first use; they store the same value.
template <typename scalar_t, bool kAdd, bool kFast, bool kVec>
int64_t resident_blocks() {
  static std::array<std::atomic<int64_t>, C10_COMPILE_TIME_MAX_GPUS> cache{};  // 0: not queried
  const int device = c10::cuda::current_device();
  int64_t resident = cache[device].load(std::memory_order_relaxed);
  if (resident == 0) {
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, dropout_fwd_kernel<scalar_t, kAdd, kFast, kVec>, kThreads, 0));
    resident = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
    cache[device].store(resident, std::memory_order_relaxed);
  }
  return resident;
}

// One launch per segment (see dropout_segment); args holds everything but the segment's fields.
template <typename scalar_t, bool kAdd, bool kFast, bool kVec>
void launch_dropout_kernel(const Operands<scalar_t>& ops, const uint64_t* seed_ptr, int64_t n,
                           int64_t lead, DropoutArgs<acc_t<scalar_t>> args) {
  constexpr int64_t kUnit = unit_elems<scalar_t, kFast, kVec>();
  for (int64_t base = 0; base < n; base += kDropoutSegment) {
    const DropoutSegment seg = dropout_segment(n, lead, kUnit, base);
    args.n = static_cast<uint32_t>(seg.count);
    args.lead = static_cast<uint32_t>(seg.lead);
    args.body_end = static_cast<uint32_t>(seg.body_end);
    args.group_lo = seg.group_lo;
    args.group_hi = seg.group_hi;
    args.base = base;
    // At least one block: the edges need up to 7 + kUnit - 1 threads of it (kUnit <= 16).
    const int64_t units = (seg.body_end - seg.lead) / kUnit;
    const int64_t blocks = std::clamp<int64_t>((units + kThreads - 1) / kThreads, 1,
                                               resident_blocks<scalar_t, kAdd, kFast, kVec>());
    // A thread's bias cursor moves by one grid-stride step per iteration.
    const int64_t step = blocks * kThreads * kUnit;
    args.step_r = step % args.bias_stride;
    args.step_b = (step / args.bias_stride) % args.bias_size;
    dropout_fwd_kernel<scalar_t, kAdd, kFast, kVec>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            ops.x + base, kAdd ? ops.residual + base : nullptr, ops.bias, ops.out + base, seed_ptr, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Reads seed inside the kernel; launches nothing for an empty output and writes zeros with a
// memset for dropout with p == 1 (every element dropped: exactly what the kernel would store).
template <bool kAdd>
void launch_dropout(const DropoutOperands& ops, const at::Tensor& seed, double p) {
  const int64_t n = ops.out.numel();
  if (n == 0) return;
  if (!kAdd && p >= 1.0) {
    ops.out.zero_();
    return;
  }
  FUSEDREG_DISPATCH_FLOATING(ops.out.scalar_type(), "fusedreg_dropout_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int64_t kChunk = chunk_elems<scalar_t>();
    const Operands<scalar_t> ptrs{ops.x.const_data_ptr<scalar_t>(),
                                  kAdd ? ops.residual.const_data_ptr<scalar_t>() : nullptr,
                                  kAdd && ops.bias.defined() ? ops.bias.const_data_ptr<scalar_t>() : nullptr,
                                  ops.out.mutable_data_ptr<scalar_t>()};
    const auto* seed_ptr = reinterpret_cast<const uint64_t*>(seed.const_data_ptr<int64_t>());
    const auto address = [](const void* q) { return reinterpret_cast<uintptr_t>(q); };
    const DropoutPlan plan =
        kAdd ? plan_dropout_cuda({address(ptrs.x), address(ptrs.out), address(ptrs.residual)}, sizeof(scalar_t),
                                 kChunk, n, address(ptrs.bias), ops.bias_stride, ops.bias_size)
             : plan_dropout_cuda({address(ptrs.x), address(ptrs.out)}, sizeof(scalar_t), kChunk, n, 0, 1, 1);

    DropoutArgs<acc> args{};
    args.rng = p >= 1.0 ? Rng::kDropAll : p == 0.0 ? Rng::kKeepAll : Rng::kRandom;
    args.threshold = args.rng == Rng::kRandom ? dropout_threshold(p) : 0u;
    args.scale = args.rng == Rng::kDropAll ? acc(0) : std::is_same_v<acc, double> ? acc(dropout_scale_f64(p))
                                                                                  : acc(dropout_scale(p));
    args.bias_rows = plan.bias_rows;
    args.bias_stride = ops.bias_stride;
    args.bias_size = ops.bias_size;
    switch (plan.path) {
      case DropoutPath::kFast:
        launch_dropout_kernel<scalar_t, kAdd, true, true>(ptrs, seed_ptr, n, plan.lead, args);
        break;
      case DropoutPath::kVec:
        launch_dropout_kernel<scalar_t, kAdd, false, true>(ptrs, seed_ptr, n, plan.lead, args);
        break;
      case DropoutPath::kScalar:
        launch_dropout_kernel<scalar_t, kAdd, false, false>(ptrs, seed_ptr, n, plan.lead, args);
        break;
    }
  });
}

void check_cuda_args(const at::Tensor& input, const at::Tensor& seed, double p, const char* input_name) {
  check_dropout_args(input, seed, p, input_name);
  check_device_type(input, at::kCUDA, input_name);
}

// Contract: returns a new tensor laid out as at::empty_like(input), same dtype (float, double,
// half, bfloat16); reads seed (int64, one element, on input's device) inside the kernel, so the
// host never syncs; mutates nothing.
at::Tensor dropout_fwd_cuda(const at::Tensor& input, const at::Tensor& seed, double p) {
  check_cuda_args(input, seed, p, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  DropoutOperands ops = prepare_dropout(input);
  launch_dropout<false>(ops, seed, p);
  return ops.out;
}

// Contract: mutates input in place with the values dropout_fwd_cuda would return (same mask: a
// dense input is its own output layout); returns nothing.
void dropout_fwd_inplace_cuda(at::Tensor& input, const at::Tensor& seed, double p) {
  check_cuda_args(input, seed, p, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (input.is_non_overlapping_and_dense()) {
    DropoutOperands ops{input, {}, {}, input};
    launch_dropout<false>(ops, seed, p);
  } else {
    input.copy_(dropout_fwd_cuda(input, seed, p));
  }
}

// Contract: as dropout_fwd_cuda on grad; grad must be in the forward output's layout (the
// autograd Function ensures it) for the mask to match the forward's.
at::Tensor dropout_bwd_cuda(const at::Tensor& grad, const at::Tensor& seed, double p) {
  check_cuda_args(grad, seed, p, "grad");
  const c10::cuda::CUDAGuard device_guard(grad.device());
  DropoutOperands ops = prepare_dropout(grad);
  launch_dropout<false>(ops, seed, p);
  return ops.out;
}

// Contract: returns residual + dropout(input + bias) laid out as at::empty_like(input), input's
// dtype, both adds and the product in fp32 (fp64 for double) with one final rounding; residual
// has input's shape, dtype and device; bias (optional) is [input.size(-1)] of input's dtype and
// device. Mutates nothing.
at::Tensor dropout_add_fwd_cuda(const at::Tensor& input, const at::Tensor& residual,
                                const std::optional<at::Tensor>& bias, const at::Tensor& seed, double p) {
  check_cuda_args(input, seed, p, "input");
  const c10::cuda::CUDAGuard device_guard(input.device());
  DropoutOperands ops = prepare_dropout_add(input, residual, bias);
  launch_dropout<true>(ops, seed, p);
  return ops.out;
}

}  // namespace
}  // namespace fusedreg

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("dropout_fwd", &fusedreg::dropout_fwd_cuda);
  m.impl("dropout_fwd_", &fusedreg::dropout_fwd_inplace_cuda);
  m.impl("dropout_bwd", &fusedreg::dropout_bwd_cuda);
  m.impl("dropout_add_fwd", &fusedreg::dropout_add_fwd_cuda);
}
