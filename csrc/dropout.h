// Host-side argument handling shared by the CPU (dropout.cpp) and CUDA (dropout.cu) launchers of
// fusedreg::dropout_fwd / dropout_fwd_ / dropout_bwd / dropout_add_fwd.
//
// Layout rule (the same as fusedreg/reference/dropout.py): the output is at::empty_like(input), and
// element i of the mask is the i-th element of that output in memory order. A non-overlapping,
// dense input already has the output's layout; any other input is first copied into it. Kernels
// then walk plain memory, whatever the logical shape or strides.
//
// Below that, the CUDA kernels' integer bookkeeping, kept here in plain host/device C++ so that it
// is testable without a GPU: which kernel variant runs an op and where its 16-byte vectors start
// (plan_dropout_cuda), how a tensor splits into launches of 32-bit indices (dropout_segment), and
// the bias index carried from element to element (BiasCursor).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common/checks.h"
#include "common/philox.h"
#include "common/vec.cuh"

namespace fusedreg {

struct DropoutOperands {
  at::Tensor x;         // input (or input's values) in the output's layout
  at::Tensor residual;  // dropout_add only: residual in the output's layout, else undefined
  at::Tensor bias;      // dropout_add only, optional: contiguous [input.size(-1)]
  at::Tensor out;       // at::empty_like(input)
  int64_t bias_stride = 1;  // memory distance between neighbours along the last logical dim (1 when
                            // that dim has size 1: its stride is arbitrary, possibly 0)
  int64_t bias_size = 1;    // size of the last logical dim
};

inline void check_dropout_args(const at::Tensor& input, const at::Tensor& seed, double p,
                               const char* input_name) {
  check_floating(input, input_name);
  check_scalar_tensor(seed, at::kLong, "seed");
  check_device(seed, input.device(), "seed");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
}

// `t`'s values in a tensor laid out as `like` (returns t itself when it already is: same_layout
// with the dense `like` makes t dense too).
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_layout(t, like)) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

inline DropoutOperands prepare_dropout(const at::Tensor& input) {
  DropoutOperands ops;
  ops.out = at::empty_like(input);
  ops.x = in_layout_of(input, ops.out);
  return ops;
}

inline DropoutOperands prepare_dropout_add(const at::Tensor& input, const at::Tensor& residual,
                                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(residual.sizes() == input.sizes(), "residual must have input's shape ", input.sizes(),
              ", got ", residual.sizes());
  check_dtype(residual, input.scalar_type(), "residual");
  check_device(residual, input.device(), "residual");
  DropoutOperands ops = prepare_dropout(input);
  ops.residual = in_layout_of(residual, ops.out);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(input.dim() > 0 && bias->dim() == 1 && bias->size(0) == input.size(-1),
                "bias must have shape [input.shape[-1]] = [", input.dim() ? input.size(-1) : 0,
                "], got ", bias->sizes());
    check_dtype(*bias, input.scalar_type(), "bias");
    check_device(*bias, input.device(), "bias");
    ops.bias = bias->contiguous();
    // In a dense layout, the memory offset m of an element has index (m / stride) % size along
    // every dim of size > 1, so the last dim's index (the bias index) needs no full unravelling.
    // A size-1 last dim has index 0 everywhere and may have any stride, 0 included (a broadcast
    // view is dense): (m / 1) % 1 says 0 without dividing by that stride.
    if (ops.out.size(-1) != 1) {
      ops.bias_stride = ops.out.stride(-1);
      ops.bias_size = ops.out.size(-1);
    }
  }
  return ops;
}

enum class DropoutPath {
  kFast,    // 16-byte vectors, chunks starting on Philox group boundaries, bias absent or whole rows
  kVec,     // 16-byte vectors from the shared 16-byte boundary on, any offset, any bias layout
  kScalar,  // element by element: operands at different offsets within 16 bytes, or a bias
            // dimension too large for 32-bit cursors
};

struct DropoutPlan {
  DropoutPath path = DropoutPath::kScalar;
  int64_t lead = 0;        // elements before the 16-byte boundary every streamed operand shares (run
                           // one per thread, outside the chunks); 0 on kScalar; never above n
  bool bias_rows = false;  // kFast with a bias: contiguous rows, a whole number of chunks long
};

// streamed: the addresses of x, out (and residual); elem_size: bytes per element; chunk: elements
// a thread takes per step (a multiple of the Philox group); bias: its address, 0 when absent;
// bias_stride / bias_size as in DropoutOperands.
//
// Vectors need every streamed operand at the same offset within 16 bytes; then `lead` elements
// bring them all to a boundary. The fast kernel also needs its chunks to start on Philox group
// boundaries (lead a multiple of 4 elements: one Philox call serves exactly one group), and reads
// a bias row per chunk only when no chunk can wrap around the end of the bias: stride 1, rows a
// whole number of chunks, chunks starting at row boundaries (lead 0), and a bias aligned for its
// 8-byte loads. Everything else runs the general vector kernel (one more Philox call per chunk,
// a per-element bias cursor) or, for mismatched offsets, the element-wise one.
inline DropoutPlan plan_dropout_cuda(std::initializer_list<uintptr_t> streamed, int64_t elem_size,
                                     int64_t chunk, int64_t n, uintptr_t bias, int64_t bias_stride,
                                     int64_t bias_size) {
  constexpr int64_t kCursorLimit = int64_t{1} << 31;  // 32-bit cursors: see BiasCursor
  const uintptr_t phase = *streamed.begin() % kVecBytes;
  const bool shared_phase = std::all_of(streamed.begin(), streamed.end(),
                                        [&](uintptr_t p) { return p % kVecBytes == phase; });
  if (!shared_phase || phase % elem_size != 0 || bias_stride >= kCursorLimit || bias_size >= kCursorLimit) {
    return {};
  }
  DropoutPlan plan;
  plan.lead = std::min<int64_t>(static_cast<int64_t>((kVecBytes - phase) % kVecBytes) / elem_size, n);
  if (bias == 0) {
    plan.path = plan.lead % kDropoutElemsPerGroup == 0 ? DropoutPath::kFast : DropoutPath::kVec;
  } else {
    plan.bias_rows = bias_stride == 1 && bias_size % chunk == 0 && plan.lead == 0 && bias % 8 == 0;
    plan.path = plan.bias_rows ? DropoutPath::kFast : DropoutPath::kVec;
  }
  return plan;
}

// A CUDA launch covers one segment of at most 2**31 elements (a larger tensor takes several), so
// offsets, loop counters and cursors inside a kernel are 32-bit. Segments start at multiples of
// 2**31 elements: multiples of 4 elements and of 16 bytes, so every segment has the tensor's lead
// and skew, and the Philox group of segment element m is (group_hi, group_lo + m / 4) with
// group_lo a multiple of 2**29 and m / 4 < 2**29: the low word never carries into the high one.
constexpr int64_t kDropoutSegment = int64_t{1} << 31;

struct DropoutSegment {
  int64_t base;       // index of the segment's first element in the tensor
  int64_t count;      // elements in the segment
  int64_t lead;       // elements before its first chunk
  int64_t body_end;   // its chunks cover [lead, body_end); [0, lead) and [body_end, count) are edges
  uint32_t group_lo;  // the Philox group of element `base`: low word
  uint32_t group_hi;  // ... and high word
};

// The segment starting at element `base` (a multiple of kDropoutSegment) of n, for a plan's lead.
inline DropoutSegment dropout_segment(int64_t n, int64_t lead, int64_t chunk, int64_t base) {
  DropoutSegment seg;
  seg.base = base;
  seg.count = std::min(kDropoutSegment, n - base);
  seg.lead = std::min(lead, seg.count);
  seg.body_end = seg.lead + (seg.count - seg.lead) / chunk * chunk;
  const uint64_t group = static_cast<uint64_t>(base) / kDropoutElemsPerGroup;
  seg.group_lo = static_cast<uint32_t>(group);
  seg.group_hi = static_cast<uint32_t>(group >> 32);
  return seg;
}

// The bias index (i / bias_stride) % bias_size of tensor element i, kept as (i % bias_stride,
// index) and carried forward instead of recomputed: a 64-bit division per element would cost as
// much as the Philox call, so each thread divides once. index_t is uint32_t when stride and size
// are below 2**31 (r + dr and b + db + 1 then stay below 2**32), else int64_t.
template <typename index_t>
struct BiasCursor {
  index_t r;  // i % bias_stride
  index_t b;  // (i / bias_stride) % bias_size

  FUSEDREG_HOST_DEVICE static BiasCursor at(int64_t i, int64_t stride, int64_t size) {
    return {static_cast<index_t>(i % stride), static_cast<index_t>((i / stride) % size)};
  }
  // to element i + 1
  FUSEDREG_HOST_DEVICE void next(index_t stride, index_t size) {
    if (++r == stride) {
      r = 0;
      if (++b == size) b = 0;
    }
  }
  // to element i + d, given dr = d % stride and db = (d / stride) % size
  FUSEDREG_HOST_DEVICE void advance(index_t dr, index_t db, index_t stride, index_t size) {
    r += dr;
    b += db;
    if (r >= stride) {
      r -= stride;
      ++b;
    }
    if (b >= size) b -= size;  // b < 2 * size here: both terms are below size, the carry is 1
  }
};

}  // namespace fusedreg
