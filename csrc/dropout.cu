// CUDA kernels of fused dropout (fusedreg::dropout_fwd, dropout_fwd_, dropout_bwd, dropout_add_fwd).
//
// Algorithm: one pass that reads x (and, for dropout_add, the residual), regenerates the keep mask
// from (seed, memory index) with csrc/common/philox.h, and writes keep ? x * scale : 0. Backward
// is the same kernel on the gradient, so nothing per element is stored between the passes.
//
// Work split: a thread takes a chunk of kChunk consecutive elements per step of a grid-stride loop,
// kChunk = lcm(16-byte vector, Philox group) = 4 floats or 2 doubles x 2 (one group), 8 halves or
// bfloat16s (two groups). So every group's four words are used by the thread that computed them
// (one Philox call per 4 elements), and loads/stores are single 16-byte transactions when every
// pointer is 16-byte aligned. The chunk->thread mapping and the arithmetic are identical on the
// vector and the scalar (misaligned pointers, ragged tail) path, so results never depend on where
// a tensor starts. The seed is read by the kernel from device memory: no host sync, and CUDA-graph
// replays that redraw the seed get fresh masks.
//
// Trade-off: Philox-4x32-10 costs ~60 integer instructions per group, so bf16 dropout (4 bytes
// moved per element) sits close to the compute/bandwidth balance point on an H100; spending one
// call on four elements keeps it on the bandwidth side. Arithmetic uses explicit round-to-nearest
// intrinsics so nvcc cannot contract (x + bias) * scale + residual into an FMA and the result stays
// bit-identical to the CPU kernel and the eager reference.
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

namespace fusedreg {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename scalar_t>
constexpr int chunk_elems() {
  return std::max(vec_size<scalar_t>(), kDropoutElemsPerGroup);
}

// Everything but the pointers; acc is float (double for double data).
template <typename acc>
struct DropoutArgs {
  int64_t n;            // elements
  uint32_t threshold;   // keep iff word >= threshold
  acc scale;            // 1 / (1 - p) rounded once; unused when drop_all
  bool drop_all;        // p == 1: everything is dropped and no Philox word is needed
  bool need_rng;        // false when p == 0 (threshold 0 keeps every word) or drop_all
  int64_t bias_stride;  // memory distance between neighbours along the last logical dim
  int64_t bias_size;    // size of the last logical dim
  int64_t step_r;       // (grid-stride step) % bias_stride
  int64_t step_b;       // ((grid-stride step) / bias_stride) % bias_size
};

// The bias index (m / bias_stride) % bias_size of memory offset m, kept as (m % bias_stride, index)
// and carried forward instead of recomputed: 64-bit division is a long emulated sequence on the GPU
// and would cost as much as the Philox call per element, so each thread divides once.
struct BiasCursor {
  int64_t r;  // m % bias_stride
  int64_t b;  // (m / bias_stride) % bias_size

  __device__ void next(int64_t stride, int64_t size) {
    if (++r == stride) {
      r = 0;
      if (++b == size) b = 0;
    }
  }
  __device__ void advance(int64_t dr, int64_t db, int64_t stride, int64_t size) {
    r += dr;
    b += db;
    if (r >= stride) {
      r -= stride;
      ++b;
    }
    if (b >= size) b -= size;  // b < 2 * size here: both terms are below size, the carry is 1
  }
};

// out[i] = (residual[i] +) (keep(i) ? (x[i] (+ bias[b(i)])) * scale : 0), i = memory index, where
// residual/bias take part only when kAdd (bias may still be null). kVec: x, out (and residual)
// are 16-byte aligned. x and out may alias (in place), so they are not __restrict__; each chunk is
// loaded whole before any of it is stored.
template <typename scalar_t, bool kAdd, bool kVec>
__global__ void __launch_bounds__(kThreads)
dropout_fwd_kernel(const scalar_t* x,                          // [n] in the output's layout
                   const scalar_t* __restrict__ residual,      // [n] when kAdd, else null
                   const scalar_t* __restrict__ bias,          // [bias_size] or null
                   scalar_t* out,                              // [n] dense output
                   const uint64_t* __restrict__ seed_ptr,      // [1] Philox key
                   const DropoutArgs<acc_t<scalar_t>> args) {
  using acc = acc_t<scalar_t>;
  constexpr int kChunk = chunk_elems<scalar_t>();
  constexpr int kVecN = vec_size<scalar_t>();
  constexpr int kGroups = kChunk / kDropoutElemsPerGroup;
  const uint64_t seed = *seed_ptr;
  const int64_t n = args.n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kChunk;
  int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kChunk;
  BiasCursor cursor{0, 0};
  if (kAdd && bias != nullptr && base < n) {
    const int64_t q = base / args.bias_stride;
    cursor = {base - q * args.bias_stride, q % args.bias_size};
  }
  for (; base < n; base += step) {
    const bool full = base + kChunk <= n;
    acc v[kChunk];
    acc r[kChunk];
    if (kVec && full) {
#pragma unroll
      for (int q = 0; q < kChunk / kVecN; ++q) {
        const AlignedVec<scalar_t, kVecN> xv = load_vec<kVecN>(x + base + q * kVecN);
#pragma unroll
        for (int j = 0; j < kVecN; ++j) v[q * kVecN + j] = static_cast<acc>(xv.val[j]);
        if constexpr (kAdd) {
          const AlignedVec<scalar_t, kVecN> rv = load_vec<kVecN>(residual + base + q * kVecN);
#pragma unroll
          for (int j = 0; j < kVecN; ++j) r[q * kVecN + j] = static_cast<acc>(rv.val[j]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const bool in = full || base + j < n;
        v[j] = in ? static_cast<acc>(x[base + j]) : acc(0);
        if constexpr (kAdd) r[j] = in ? static_cast<acc>(residual[base + j]) : acc(0);
      }
    }
    if constexpr (kAdd) {
      if (bias != nullptr) {
        BiasCursor c = cursor;
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          v[j] = add_rn(v[j], static_cast<acc>(bias[c.b]));  // c.b < bias_size even past n
          c.next(args.bias_stride, args.bias_size);
        }
        cursor.advance(args.step_r, args.step_b, args.bias_stride, args.bias_size);
      }
    }
    scalar_t y[kChunk];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const uint64_t group = static_cast<uint64_t>(base) / kDropoutElemsPerGroup + g;
      const Philox4x32Words words = args.need_rng ? dropout_group_words(seed, group) : Philox4x32Words{};
#pragma unroll
      for (int k = 0; k < kDropoutElemsPerGroup; ++k) {
        const int j = g * kDropoutElemsPerGroup + k;
        const bool keep = !args.drop_all && dropout_keep(words.w[k], args.threshold);
        acc o = keep ? mul_rn(v[j], args.scale) : acc(0);  // selected: a dropped inf/NaN gives 0
        if constexpr (kAdd) o = add_rn(r[j], o);
        y[j] = static_cast<scalar_t>(o);
      }
    }
    if (kVec && full) {
#pragma unroll
      for (int q = 0; q < kChunk / kVecN; ++q) {
        AlignedVec<scalar_t, kVecN> ov;
#pragma unroll
        for (int j = 0; j < kVecN; ++j) ov.val[j] = y[q * kVecN + j];
        store_vec<kVecN>(out + base + q * kVecN, ov);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        if (full || base + j < n) out[base + j] = y[j];
      }
    }
  }
}

// Blocks of the kernel resident on the current device at once (SMs x blocks per SM), queried once
// per device and kept per kernel instantiation. A grid-stride kernel launched with more blocks than
// fit would run the excess as a second, mostly idle wave; the occupancy query, unlike a fixed
// threads-per-SM figure, accounts for kernels whose register count limits residency. Per device:
// the GPUs of one process may differ. Both queries are attribute reads, neither a stream operation
// nor a synchronization, so a first use inside CUDA-graph capture is allowed. Two threads may both
// query on a first use; they store the same value.
template <typename scalar_t, bool kAdd, bool kVec>
int64_t resident_blocks() {
  static std::array<std::atomic<int64_t>, C10_COMPILE_TIME_MAX_GPUS> cache{};  // 0: not queried
  const int device = c10::cuda::current_device();
  int64_t resident = cache[device].load(std::memory_order_relaxed);
  if (resident == 0) {
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, dropout_fwd_kernel<scalar_t, kAdd, kVec>, kThreads, 0));
    resident = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
    cache[device].store(resident, std::memory_order_relaxed);
  }
  return resident;
}

template <typename scalar_t, bool kAdd, bool kVec>
void launch_dropout_kernel(const scalar_t* x, const scalar_t* residual, const scalar_t* bias,
                           scalar_t* out, const uint64_t* seed_ptr, DropoutArgs<acc_t<scalar_t>> args) {
  constexpr int64_t kChunk = chunk_elems<scalar_t>();
  const int64_t chunks = (args.n + kChunk - 1) / kChunk;
  const int64_t blocks = std::min((chunks + kThreads - 1) / kThreads, resident_blocks<scalar_t, kAdd, kVec>());
  // A thread's bias cursor moves by one grid-stride step per iteration.
  const int64_t step = blocks * kThreads * kChunk;
  args.step_r = step % args.bias_stride;
  args.step_b = (step / args.bias_stride) % args.bias_size;
  dropout_fwd_kernel<scalar_t, kAdd, kVec>
      <<<static_cast<unsigned int>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x, residual, bias, out, seed_ptr, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Reads seed inside the kernel; launches nothing for an empty output.
template <bool kAdd>
void launch_dropout(const DropoutOperands& ops, const at::Tensor& seed, double p) {
  const int64_t n = ops.out.numel();
  if (n == 0) return;
  FUSEDREG_DISPATCH_FLOATING(ops.out.scalar_type(), "fusedreg_dropout_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
    const scalar_t* residual = kAdd ? ops.residual.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bias = kAdd && ops.bias.defined() ? ops.bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = ops.out.mutable_data_ptr<scalar_t>();
    const auto* seed_ptr = reinterpret_cast<const uint64_t*>(seed.const_data_ptr<int64_t>());

    DropoutArgs<acc> args{};
    args.n = n;
    args.drop_all = p >= 1.0;
    args.threshold = args.drop_all ? 0u : dropout_threshold(p);
    args.scale = args.drop_all ? acc(0) : std::is_same_v<acc, double> ? acc(dropout_scale_f64(p))
                                                                       : acc(dropout_scale(p));
    args.need_rng = !args.drop_all && args.threshold != 0;
    args.bias_stride = ops.bias_stride;
    args.bias_size = ops.bias_size;
    // Chunks start at multiples of 16 bytes, so aligned base pointers make every full chunk aligned.
    if (all_aligned(kVecBytes, x, out) && (residual == nullptr || is_aligned(residual))) {
      launch_dropout_kernel<scalar_t, kAdd, true>(x, residual, bias, out, seed_ptr, args);
    } else {
      launch_dropout_kernel<scalar_t, kAdd, false>(x, residual, bias, out, seed_ptr, args);
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
