// CUDA kernel of fused dropout (dropout_fwd_kernel, its fast / vector / scalar variants) and its
// device helpers; the ops, launchers and plan choice are in dropout.cu, the only file that includes
// this one (the kernel lives in that file's anonymous namespace).
//
// Algorithm: one pass that reads x (and, for dropout_add, the residual), regenerates the keep mask
// from (seed, memory index) with csrc/common/philox.h, and writes keep ? x * scale : 0. Backward
// is the same kernel on the gradient, so nothing per element is stored between the passes.
//
// Work split: a grid-stride loop over units of consecutive elements (unit_elems; the element
// bookkeeping is in dropout_units.cuh): one chunk of 8 (two Philox groups; one 16-byte vector of
// bf16/fp16, two of fp32) or 4 for double on the fast kernel, two chunks on the vector kernel.
// Elements before the operands' first 16-byte boundary (a view at an odd offset) and the ragged
// tail are edges, one per thread of the first block, each with its own Philox call. A launch
// covers at most 2**31 elements (dropout_segment), so indices and cursors are 32-bit. The host
// (plan_dropout_cuda, dropout.h) picks one of three kernels:
//   fast    chunks start on Philox group boundaries, so a chunk's groups are exactly its words; a
//           bias comes in whole rows, read per chunk with a 32-bit cursor;
//   vector  any offset shared by every operand: a unit of two chunks (16 elements, all their
//           16-byte loads in flight) starts lead % 4 words into a group and then straddles one
//           group more than it covers (5 Philox calls per 16 elements; one loop per skew, so
//           the words need no shifting); any bias layout (a per-element cursor);
//   scalar  operands at different offsets within 16 bytes: element-wise accesses.
// The RNG mode (random, keep-all for p = 0, drop-all for p = 1) is a template argument of the
// loops, chosen once per thread, so the per-unit code tests nothing but the keep words. The mask
// is a function of the element index alone: every kernel, the CPU one, Triton and the reference
// produce the same bits. The seed is read by the kernel from device memory: no host sync, and
// CUDA-graph replays that redraw the seed get fresh masks.
//
// Trade-off: Philox-4x32-10 costs ~37 integer instructions per group even with the round keys
// derived once per thread, so bf16 dropout (4 bytes moved per element) is close to the H200's
// compute/bandwidth balance; everything else per element is a few instructions (select, multiply,
// paired conversions). The vector kernel's straddling units cost 5 calls per 16 elements instead
// of 4 (one chunk per unit would cost 3 per 8; longer units would save a little more for twice
// the registers), and it carries one copy of its random loop per skew (up to four: a larger
// binary instead of two selects per word); the scalar kernel is for layouts PyTorch rarely
// produces. The round keys are derived once per thread and pinned in registers (pinned_keys).
// Arithmetic uses explicit round-to-nearest intrinsics so nvcc cannot contract (x + bias) * scale + residual into an FMA
// and the result stays bit-identical to the CPU kernel and the eager reference.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/philox.h"
#include "common/vec.cuh"
#include "dropout.h"
#include "dropout_units.cuh"

namespace fusedreg {
namespace {

constexpr int kThreads = 256;

enum class Rng { kRandom, kKeepAll, kDropAll };

template <typename scalar_t>
constexpr int chunk_elems() {
  return sizeof(scalar_t) == 8 ? 4 : 8;
}

// Elements a thread takes per grid-stride step (a unit, see dropout_units.cuh): one chunk, two on
// the vector kernel (their 16-byte loads all in flight, and the Philox group the chunks share
// computed once: 5 calls per 16 elements instead of 6).
template <typename scalar_t, bool kFast, bool kVec>
constexpr int unit_elems() {
  return chunk_elems<scalar_t>() * (kVec && !kFast ? 2 : 1);
}

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Everything but the pointers (which point at the segment's first element, see dropout_segment);
// acc is float (double for double data).
template <typename acc>
struct DropoutArgs {
  uint32_t n;           // elements in the segment
  uint32_t lead;        // elements before the first chunk (edges)
  uint32_t body_end;    // chunks cover [lead, body_end); [body_end, n) are edges too
  uint32_t group_lo;    // the Philox group of the segment's first element: low word
  uint32_t group_hi;    // ... and high word
  int64_t base;         // index of the segment's first element in the tensor (bias index)
  uint32_t threshold;   // keep iff word >= threshold
  acc scale;            // 1 / (1 - p) rounded once; unused by Rng::kDropAll
  Rng rng;
  bool bias_rows;       // fast kernel with a bias: contiguous rows, whole chunks long
  int64_t bias_stride;  // memory distance between neighbours along the last logical dim
  int64_t bias_size;    // size of the last logical dim
  int64_t step_r;       // (grid-stride step) % bias_stride
  int64_t step_b;       // ((grid-stride step) / bias_stride) % bias_size
};

// The Philox group of segment element m (see kDropoutSegment).
template <typename acc>
__device__ __forceinline__ uint64_t group_of(const DropoutArgs<acc>& args, uint32_t m) {
  return segment_group(args.group_lo, args.group_hi, m);
}

// The output of one element: keep ? v * scale : 0, then residual + that for dropout_add; v already
// holds x (+ bias). The select comes first, (keep ? v : 0) * scale: the same bits, since scale is
// finite and positive (0 * scale is +0 and a dropped inf/NaN still gives 0), and one select plus an
// unconditional multiply is cheaper than a multiply under a predicate.
template <bool kAdd, typename acc>
__device__ __forceinline__ acc finish(acc v, acc r, bool keep, acc scale) {
  acc o = mul_rn(keep ? v : acc(0), scale);
  if constexpr (kAdd) o = add_rn(r, o);
  return o;
}

template <Rng kRng>
__device__ __forceinline__ bool keep_word(uint32_t word, uint32_t threshold) {
  if constexpr (kRng == Rng::kRandom) return dropout_keep(word, threshold);
  return kRng == Rng::kKeepAll;
}

// The seed's round keys, opaque to nvcc: it would otherwise re-derive inside the loops (seed +
// round * Weyl constant, one instruction per key and unit) the keys it cannot keep in uniform
// registers, about 2 instructions per element on the dropout_add loops.
__device__ __forceinline__ PhiloxKeys pinned_keys(uint64_t seed) {
  PhiloxKeys keys = philox_keys(seed);
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    asm volatile("" : "+r"(keys.k0[round]), "+r"(keys.k1[round]));
  }
  return keys;
}

template <typename scalar_t>
struct Operands {
  const scalar_t* x;         // [n] in the output's layout; may alias out (in place)
  const scalar_t* residual;  // [n] for dropout_add, else null
  const scalar_t* bias;      // [bias_size] (not offset by segments) or null
  scalar_t* out;             // [n] dense output
};

// The head [0, lead) and the tail [body_end, n): fewer than two units, one element per thread
// (edge_element), each with its own Philox call and bias division.
template <bool kAdd, typename scalar_t, typename acc>
__device__ void edge_elements(const Operands<scalar_t>& ops, const DropoutArgs<acc>& args,
                              const PhiloxKeys& keys) {
  const uint32_t m = edge_element(blockIdx.x * kThreads + threadIdx.x, args.lead, args.body_end, args.n);
  if (m == args.n) return;
  acc v = static_cast<acc>(ops.x[m]);
  acc r = acc(0);
  if constexpr (kAdd) {
    if (ops.bias != nullptr) {
      v = add_rn(v, static_cast<acc>(ops.bias[((args.base + m) / args.bias_stride) % args.bias_size]));
    }
    r = static_cast<acc>(ops.residual[m]);
  }
  bool keep = args.rng == Rng::kKeepAll;
  if (args.rng == Rng::kRandom) {
    const Philox4x32Words w = dropout_group_words(keys, group_of(args, m));
    keep = dropout_keep(group_word(w, m % kDropoutElemsPerGroup), args.threshold);
  }
  ops.out[m] = static_cast<scalar_t>(finish<kAdd>(v, r, keep, args.scale));
}

// Fast kernel's loop for one RNG mode: chunks start on group boundaries (lead % 4 == 0), so its
// kChunk / 4 groups are exactly the chunk's words; the bias, if any, comes in whole rows (lead 0,
// bias_size % kChunk == 0): the chunk's bias values are contiguous and read in 8-byte pieces.
// Each chunk is loaded whole before any of it is stored (x and out may alias).
template <Rng kRng, bool kAdd, typename scalar_t, typename acc>
__device__ __forceinline__ void fast_chunks(const Operands<scalar_t>& ops, const DropoutArgs<acc>& args,
                                            const PhiloxKeys& keys) {
  constexpr int kChunk = chunk_elems<scalar_t>();
  constexpr int kVecN = vec_size<scalar_t>();
  constexpr int kPiece = 8 / sizeof(scalar_t);  // bias values per 8-byte load
  const uint32_t step = gridDim.x * kThreads * kChunk;
  const uint32_t end = args.body_end;
  const uint32_t threshold = args.threshold;
  const acc scale = args.scale;
  const scalar_t* bias = kAdd && args.bias_rows ? ops.bias : nullptr;
  const auto bias_size = static_cast<uint32_t>(args.bias_size);
  const auto step_b = static_cast<uint32_t>(args.step_b);
  uint32_t m = first_unit<kChunk>(blockIdx.x * kThreads + threadIdx.x, args.lead);
  uint32_t b = bias != nullptr && m < end ? static_cast<uint32_t>((args.base + m) % args.bias_size) : 0u;
  for (; m < end; m += step) {
    acc v[kChunk] = {};
    acc r[kChunk] = {};
    if constexpr (kRng != Rng::kDropAll) load_widened<kVecN, kChunk>(ops.x + m, v);
    if constexpr (kAdd) load_widened<kVecN, kChunk>(ops.residual + m, r);
    if (kAdd && kRng != Rng::kDropAll && bias != nullptr) {
      // 8-byte pieces: the row is reread from cache by every row of x, and 16-byte accesses stay
      // the streamed operands' alone (fusedreg/bench/static_sass.py counts them as such).
      acc bv[kChunk];
      load_widened<kPiece, kChunk>(bias + b, bv);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) v[j] = add_rn(v[j], bv[j]);
      b += step_b;
      b = b >= bias_size ? b - bias_size : b;
    }
    uint32_t w[kChunk] = {};
    if constexpr (kRng == Rng::kRandom) unit_words<kChunk, 0>(keys, group_of(args, m), w);
    acc o[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) o[j] = finish<kAdd>(v[j], r[j], keep_word<kRng>(w[j], threshold), scale);
    store_narrowed<kVecN, kChunk>(ops.out + m, o);
  }
}

// General loop, vector (kVec) or element-wise. Vector units are two chunks starting `lead`
// elements past a 16-byte boundary, kSkew = lead % 4 words into a Philox group, so they may
// straddle one group more than they cover (unit_words). Element-wise units are one chunk starting
// at 0, on group boundaries (kSkew 0). The bias takes any layout: a per-element cursor, 32-bit on
// the vector kernel (see plan_dropout_cuda).
template <Rng kRng, bool kVec, bool kAdd, int kSkew, typename scalar_t, typename acc>
__device__ __forceinline__ void general_chunks(const Operands<scalar_t>& ops, const DropoutArgs<acc>& args,
                                               const PhiloxKeys& keys) {
  using index_t = std::conditional_t<kVec, uint32_t, int64_t>;
  constexpr int kUnit = unit_elems<scalar_t, false, kVec>();
  constexpr int kVecN = kVec ? vec_size<scalar_t>() : 1;
  const uint32_t step = gridDim.x * kThreads * kUnit;
  const uint32_t end = args.body_end;
  const uint32_t threshold = args.threshold;
  const acc scale = args.scale;
  const auto stride = static_cast<index_t>(args.bias_stride), size = static_cast<index_t>(args.bias_size);
  uint32_t m = first_unit<kUnit>(blockIdx.x * kThreads + threadIdx.x, args.lead);
  BiasCursor<index_t> cursor{0, 0};
  if (kAdd && ops.bias != nullptr && m < end) {
    cursor = BiasCursor<index_t>::at(args.base + m, args.bias_stride, args.bias_size);
  }
  for (; m < end; m += step) {
    acc v[kUnit];
    acc r[kUnit] = {};
    load_widened<kVecN, kUnit>(ops.x + m, v);
    if constexpr (kAdd) {
      load_widened<kVecN, kUnit>(ops.residual + m, r);
      if (ops.bias != nullptr) {
        BiasCursor<index_t> c = cursor;
#pragma unroll
        for (int j = 0; j < kUnit; ++j) {
          v[j] = add_rn(v[j], static_cast<acc>(ops.bias[c.b]));
          c.next(stride, size);
        }
        cursor.advance(static_cast<index_t>(args.step_r), static_cast<index_t>(args.step_b), stride, size);
      }
    }
    uint32_t w[kUnit] = {};
    if constexpr (kRng == Rng::kRandom) unit_words<kUnit, kSkew>(keys, group_of(args, m), w);
    acc o[kUnit];
#pragma unroll
    for (int j = 0; j < kUnit; ++j) o[j] = finish<kAdd>(v[j], r[j], keep_word<kRng>(w[j], threshold), scale);
    store_narrowed<kVecN, kUnit>(ops.out + m, o);
  }
}

template <Rng kRng, bool kAdd, bool kFast, bool kVec, typename scalar_t, typename acc>
__device__ __forceinline__ void chunks(const Operands<scalar_t>& ops, const DropoutArgs<acc>& args,
                                       const PhiloxKeys& keys) {
  if constexpr (kFast) {
    fast_chunks<kRng, kAdd>(ops, args, keys);
  } else if constexpr (kVec && kRng == Rng::kRandom) {  // the skews 16 bytes of scalar_t allow
    constexpr int kMaxSkew = std::min<int>(vec_size<scalar_t>(), kDropoutElemsPerGroup) - 1;
    with_skew<kMaxSkew>(args.lead % kDropoutElemsPerGroup, [&](auto skew) {
      general_chunks<kRng, kVec, kAdd, decltype(skew)::value>(ops, args, keys);
    });
  } else {  // no Philox words, or element-wise units from element 0
    general_chunks<kRng, kVec, kAdd, 0>(ops, args, keys);
  }
}

// out[i] = (residual[i] +) (keep(i) ? (x[i] (+ bias[b(i)])) * scale : 0), i = memory index, where
// residual/bias take part only when kAdd (bias may still be null). kFast: the fast kernel (see the
// file header); otherwise kVec picks the vector or the element-wise general kernel.
template <typename scalar_t, bool kAdd, bool kFast, bool kVec>
__global__ void __launch_bounds__(kThreads)
dropout_fwd_kernel(const scalar_t* x,                          // [n] segment, output's layout
                   const scalar_t* __restrict__ residual,      // [n] segment when kAdd, else null
                   const scalar_t* __restrict__ bias,          // [bias_size] or null
                   scalar_t* out,                              // [n] segment of the dense output
                   const uint64_t* __restrict__ seed_ptr,      // [1] Philox key
                   const DropoutArgs<acc_t<scalar_t>> args) {
  static_assert(kVec || !kFast, "the fast kernel is a vector kernel");
  const PhiloxKeys keys = pinned_keys(*seed_ptr);
  const Operands<scalar_t> ops{x, residual, bias, out};
  edge_elements<kAdd>(ops, args, keys);
  // One uniform branch per thread; the loops themselves carry no mode test.
  if (args.rng == Rng::kRandom) {
    chunks<Rng::kRandom, kAdd, kFast, kVec>(ops, args, keys);
  } else if (args.rng == Rng::kKeepAll) {
    chunks<Rng::kKeepAll, kAdd, kFast, kVec>(ops, args, keys);
  } else if constexpr (kAdd) {  // dropout alone never launches drop-all: it is a memset
    chunks<Rng::kDropAll, kAdd, kFast, kVec>(ops, args, keys);
  }
}

}  // namespace
}  // namespace fusedreg
