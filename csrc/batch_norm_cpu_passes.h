// The CPU BatchNorm ops' passes over memory, as batch_norm.cpp composes them: per-channel
// coefficients (Coefs), the whole-tensor elementwise pass, and the channel-by-channel walk.
//
// Algorithm: planes layouts (inner > 1, NCHW-like) with enough channels to share among the threads
// are walked channel by channel (at::parallel_for over channels): a channel's reductions, its
// coefficients, then its elementwise pass, which reads the channel's slice again while it is still
// in the core's cache. A large tensor is then read from memory once per op instead of once per
// pass (training forward: 2 x itemsize bytes per element instead of 4; backward: 3 instead of 5).
// Every other layout runs the reductions, then one elementwise pass over the whole tensor
// (parallel over planes or rows). Both give the same bits: each channel's arithmetic is the same
// functions' on the same values, only the order in which channels are visited differs.
// Trade-off: walking by channel gives up parallelism across a channel's planes, so it needs
// several channels per thread (kChannelsPerThread), and costs some work per channel, so it needs
// large channels (kMinChannelValues); otherwise the whole-tensor passes run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "batch_norm.h"
#include "batch_norm_cpu_isa.h"
#include "common/cpu_isa.h"

namespace fusedreg {
namespace bn_cpu {

// Per-channel coefficients of the elementwise pass (formulas: bn_cpu::formula):
//   kForward:      out = (x - m) * a + b
//   kBackward:     out = (dy - b - (x - m) * k) * a
//   kBackwardEval: out = dy * a
// The four [C] arrays live in one buffer from c10's CPU allocator (64-byte aligned), each starting
// on a cache line, so that no vector load of coefficients straddles two lines: with malloc's
// 16-byte alignment every 512-bit load did, and the channels_last elementwise pass out of cache
// ran 1.3-1.7x slower at the AVX-512 level ([25088, 256] float32 eval: 1.70 ms, aligned 1.25,
// torch 1.32).
template <typename acc>
struct Coefs {
  at::Tensor storage;
  acc *m, *a, *b, *k;
  explicit Coefs(int64_t C) {
    const int64_t stride = (C + 15) / 16 * 16;  // 64 bytes of float, 128 of double
    storage = at::empty({4 * stride}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
    m = storage.mutable_data_ptr<acc>();
    a = m + stride;
    b = a + stride;
    k = b + stride;
    std::fill(m, m + C, acc(0));
    std::fill(a, a + C, acc(1));
    std::fill(b, b + C, acc(0));
    std::fill(k, k + C, acc(0));
  }

  // Normalization by (mean, invstd), then weight and bias (nullptr: 1 and 0).
  void set_forward(int64_t c, const acc* mean, const acc* invstd, const acc* w, const acc* bias) {
    m[c] = mean[c];
    a[c] = w ? invstd[c] * w[c] : invstd[c];
    b[c] = bias ? bias[c] : acc(0);
  }

  // grad_input from the channel's mean(dy) and mean(dy * (x - mean)) in training; in eval (the
  // statistics constants) only dy * invstd * weight, whatever the means.
  void set_backward(int64_t c, const acc* mean, const acc* invstd, const acc* w, acc mean_dy, acc mean_dy_xmu,
                    bool training) {
    m[c] = mean[c];
    a[c] = w ? invstd[c] * w[c] : invstd[c];
    if (training) {
      b[c] = mean_dy;
      k[c] = invstd[c] * invstd[c] * mean_dy_xmu;
    }
  }
};

// What one elementwise pass reads and writes: x (not in kBackwardEval), dy (backward) and out.
template <Pass kPass, typename scalar_t>
struct Streams {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* out;
  explicit Streams(const BatchNormOperands& ops)
      : x(kPass != Pass::kBackwardEval ? ops.x.const_data_ptr<scalar_t>() : nullptr),
        dy(kPass != Pass::kForward ? ops.dy.const_data_ptr<scalar_t>() : nullptr),
        out(ops.out.mutable_data_ptr<scalar_t>()) {}
};

// The elementwise pass over the whole tensor: parallel over planes (inner > 1) or rows.
template <Pass kPass, typename scalar_t>
void elementwise(const BatchNormOperands& ops, const Coefs<acc_t<scalar_t>>& co) {
  const BatchNormLayout& L = ops.layout;
  if (L.numel() == 0) return;
  const int64_t C = L.channels;
  const Streams<kPass, scalar_t> s(ops);
  const CpuIsa isa = cpu_isa();
  const acc_t<scalar_t> *m = co.m, *a = co.a, *b = co.b, *k = co.k;
  if (L.inner > 1) {
    at::parallel_for(0, L.outer * C, std::max<int64_t>(1, kCpuGrainElems / L.inner),
                     [&](int64_t p_begin, int64_t p_end) {
      planes_apply<kPass>(isa, s.x, s.dy, s.out, L, p_begin, p_end, 1, m, a, b, k);
    });
  } else {
    at::parallel_for(0, L.outer, std::max<int64_t>(1, kCpuGrainElems / C), [&](int64_t r_begin, int64_t r_end) {
      rows_apply<kPass>(isa, s.x, s.dy, s.out, C, r_begin, r_end, m, a, b, k);
    });
  }
}

constexpr int64_t kChannelsPerThread = 4;
// Below this many values per channel a channel is cheap to read twice from memory anyway, and the
// per-channel work of the walk (entry points called per channel, accumulators reduced per
// channel) outweighs what it saves (8x2048x7x7 float32 backward: 0.27 ms walked vs 0.21 for torch).
constexpr int64_t kMinChannelValues = 4096;

// Whether the op walks channel by channel: a planes layout with large channels, enough of them.
inline bool by_channel(const BatchNormLayout& L) {
  return L.inner > 1 && L.per_channel() >= kMinChannelValues &&
         L.channels >= kChannelsPerThread * at::get_num_threads();
}

// at::parallel_for over the channels [0, C), channel_fn(c) per channel (by_channel layouts).
template <typename F>
void for_each_channel(const BatchNormLayout& L, const F& channel_fn) {
  at::parallel_for(0, L.channels, std::max<int64_t>(1, kCpuGrainElems / L.per_channel()),
                   [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) channel_fn(c);
  });
}

// The elementwise pass over channel c's planes alone (c, c + C, ...), on the calling thread.
template <Pass kPass, typename scalar_t>
void apply_channel(CpuIsa isa, const Streams<kPass, scalar_t>& s, const BatchNormLayout& L,
                   const Coefs<acc_t<scalar_t>>& co, int64_t c) {
  planes_apply<kPass>(isa, s.x, s.dy, s.out, L, c, L.outer * L.channels, L.channels, co.m, co.a, co.b, co.k);
}

}  // namespace bn_cpu
}  // namespace fusedreg
