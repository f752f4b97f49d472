"""Triton BatchNorm statistics: the per-channel moments of x (forward) and the sums of dy and
dy * (x - mean) (backward), as a split reduction: _bn_partial_kernel writes one partial per
(split, channel), a finalize kernel merges the splits.

Algorithm:
- partial: programs own (channel block, split) pairs and stream their slab of rows (and columns s
  for NCHW-like layouts) in [BLOCK_O, BLOCK_X] tiles. Moments: each tile contributes its exact
  two-pass (count, mean, m2) of x - shift per column (shift = the channel's first value, so a large
  mean never meets small deviations), merged into per-column accumulators with Chan's formula;
  NCHW programs then merge their columns with a fixed tl.reduce tree. Gradient sums: plain sums.
- finalize: a program per block of channels loads [BLOCK_S, BLOCK_C] tiles of the [S, C]
  partials (all S splits in one tile unless S > BLOCK_S, then tiles in split order, accumulated
  elementwise) and reduces the split axis with tl.sum. The moments merge as the multi-set form
  of Chan's formula, in two passes over the (L2-resident) partials:
      mean = sum_s n_s * mean_s / n,   m2 = sum_s (m2_s + n_s * (mean_s - mean)^2),
  which is the two-pass algorithm applied to the split summaries: every term of m2 is a sum of
  squares, nothing cancels (unlike n * E[x^2] - n * mean^2). Then mean/invstd (or var) and the
  running statistics (unbiased variance into running_var).

Determinism: no atomics, every output written by one program, and each reduction's order is the
compiled tl.sum tree over the tile plus the chunk order in split order: fixed by (S, C, dtype), so
the same input gives the same bits run to run.

Trade-off: the finalize is latency-bound, not bandwidth-bound (S * C * 3 values); a tree over the
splits costs one load round trip and log2(BLOCK_S) steps where a serial loop over S splits cost S
dependent load round trips (528 splits for small C on an H200 took 0.2-0.5 ms, more than the
data pass). The moments' second pass re-reads the partials, so that the tree adds instead of
merging pairs with a division each.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._batch_norm_common import _from_bits, _inv_sqrt, _tile_offsets


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, m2) sets; empty sets leave the other unchanged."""
    n = n_a + n_b
    ratio = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * ratio, m2_a + m2_b + delta * delta * n_a * ratio


@triton.jit
def _bn_partial_kernel(
    x_ptr,        # [outer * C * inner] input in the layout (o * C + c) * inner + s
    dy_ptr,       # like x_ptr: grad_out; read only when GRAD
    mean_ptr,     # [C] channel means; read only when GRAD
    part_a_ptr,   # [S, C] out: count (moments) | sum(dy) (GRAD)
    part_b_ptr,   # [S, C] out: mean of x - shift (moments) | sum(dy * (x - mean)) (GRAD)
    part_c_ptr,   # [S, C] out: m2 (moments); untouched when GRAD
    C,            # channels
    inner,        # s per (o, c): stride of dim 1 (1 when CHANNELS_LAST)
    outer,        # rows o
    splits,       # S = splits_o * splits_s reduction programs per channel block
    splits_s,     # splits along s (NCHW-like only; 1 when CHANNELS_LAST)
    o_per_split,  # rows o per split
    x_per_split,  # columns s per split (a multiple of BLOCK_X); unused when CHANNELS_LAST
    CHANNELS_LAST: tl.constexpr, GRAD: tl.constexpr, FP64: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    block, split = pid // splits, pid % splits
    o_lo = (split // splits_s).to(tl.int64) * o_per_split
    o_hi = tl.minimum(o_lo + o_per_split, outer)
    if CHANNELS_LAST:
        x_lo = block.to(tl.int64) * BLOCK_X
        c = x_lo + tl.arange(0, BLOCK_X)                 # [BLOCK_X] channels
        c_mask = c < C
        x_hi = tl.minimum(x_lo + BLOCK_X, C)
        shift_offsets = c
    else:
        c = block                                        # one channel
        c_mask = c < C
        x_lo = (split % splits_s).to(tl.int64) * x_per_split
        x_hi = tl.minimum(x_lo + x_per_split, inner)
        shift_offsets = c.to(tl.int64) * inner
    if GRAD:
        mean_c = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
        acc_a = tl.zeros([BLOCK_X], dtype=acc_ty)
        acc_b = tl.zeros([BLOCK_X], dtype=acc_ty)
    else:
        # Shifted by a value of the channel itself: a large mean never meets small deviations.
        shift = tl.load(x_ptr + shift_offsets, mask=c_mask, other=0.0).to(acc_ty)
        n = tl.zeros([BLOCK_X], dtype=acc_ty)
        mean = tl.zeros([BLOCK_X], dtype=acc_ty)
        m2 = tl.zeros([BLOCK_X], dtype=acc_ty)
    for o0 in range(o_lo, o_hi, BLOCK_O):
        for x0 in range(x_lo, x_hi, BLOCK_X):
            offsets, mask = _tile_offsets(o0, x0, c, o_hi, x_hi, C, inner, CHANNELS_LAST, BLOCK_O, BLOCK_X)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
            if GRAD:
                dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
                if CHANNELS_LAST:
                    xmu = x - mean_c[None, :]
                else:
                    xmu = x - mean_c
                acc_a += tl.sum(dy, axis=0)
                acc_b += tl.sum(tl.where(mask, dy * xmu, 0.0), axis=0)
            else:
                if CHANNELS_LAST:
                    v = tl.where(mask, x - shift[None, :], 0.0)
                else:
                    v = tl.where(mask, x - shift, 0.0)
                count = tl.sum(mask.to(acc_ty), axis=0)                              # [BLOCK_X]
                tile_mean = tl.sum(v, axis=0) / tl.maximum(count, 1.0)
                d = tl.where(mask, v - tile_mean[None, :], 0.0)
                n, mean, m2 = _chan_merge(n, mean, m2, count, tile_mean, tl.sum(d * d, axis=0))
    out = split.to(tl.int64) * C + c
    if GRAD:
        if CHANNELS_LAST:
            tl.store(part_a_ptr + out, acc_a, mask=c_mask)
            tl.store(part_b_ptr + out, acc_b, mask=c_mask)
        else:
            tl.store(part_a_ptr + out, tl.sum(acc_a, axis=0))
            tl.store(part_b_ptr + out, tl.sum(acc_b, axis=0))
    else:
        if CHANNELS_LAST:
            tl.store(part_a_ptr + out, n, mask=c_mask)
            tl.store(part_b_ptr + out, mean, mask=c_mask)
            tl.store(part_c_ptr + out, m2, mask=c_mask)
        else:
            n_all, mean_all, m2_all = tl.reduce((n, mean, m2), 0, _chan_merge)
            tl.store(part_a_ptr + out, n_all)
            tl.store(part_b_ptr + out, mean_all)
            tl.store(part_c_ptr + out, m2_all)


@triton.jit
def _split_tile(s0, c, c_mask, splits, C, BLOCK_S: tl.constexpr):
    """Offsets (int64) and mask of the [BLOCK_S, BLOCK_C] tile of an [S, C] partials array at
    splits s0.. and channels c."""
    s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)                    # [BLOCK_S]
    return s[:, None] * C + c[None, :], (s < splits)[:, None] & c_mask[None, :]


# n_total is 1 for one value per channel and the bits of 5e-324 are 1: Triton would pass a 1 as a
# constant Python int, which has no .to(); these arguments are never specialised.
@triton.jit(do_not_specialize=["n_total", "eps_bits", "momentum_bits"])
def _bn_finalize_moments_kernel(
    x_ptr,            # input, for the channels' shifts at offsets c * inner
    part_n_ptr,       # [S, C] counts (row stride C)
    part_mean_ptr,    # [S, C] means of x - shift (row stride C)
    part_m2_ptr,      # [S, C] m2 (row stride C)
    mean_out_ptr,     # [C] out: mean
    second_out_ptr,   # [C] out: invstd, or the biased variance when OUT_VAR
    running_mean_ptr,  # [C] in/out when HAS_RUNNING_MEAN (any float dtype)
    running_var_ptr,   # [C] in/out when HAS_RUNNING_VAR (any float dtype)
    C,                # channels
    inner,            # stride of dim 1 of the input (in elements)
    splits,           # S, the partials' rows
    n_total,          # values per channel, > 0 (= sum of the partial counts)
    eps_bits,         # int64 bits of eps as a float64
    momentum_bits,    # int64 bits of momentum as a float64
    OUT_VAR: tl.constexpr, HAS_RUNNING_MEAN: tl.constexpr, HAS_RUNNING_VAR: tl.constexpr,
    FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    c_mask = c < C
    count = n_total.to(acc_ty)  # exact where the summed float counts may not be (> 2**24 in fp32)
    # Masked entries load as n = mean = m2 = 0 and add nothing to either pass.
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for s0 in range(0, splits, BLOCK_S):  # chunks in split order; one when S <= BLOCK_S
        offsets, mask = _split_tile(s0, c, c_mask, splits, C, BLOCK_S)
        n = tl.load(part_n_ptr + offsets, mask=mask, other=0.0)
        acc += n * tl.load(part_mean_ptr + offsets, mask=mask, other=0.0)
    mean = tl.sum(acc, axis=0) / count                              # of x - shift, [BLOCK_C]
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for s0 in range(0, splits, BLOCK_S):
        offsets, mask = _split_tile(s0, c, c_mask, splits, C, BLOCK_S)
        n = tl.load(part_n_ptr + offsets, mask=mask, other=0.0)
        d = tl.load(part_mean_ptr + offsets, mask=mask, other=0.0) - mean[None, :]
        acc += tl.load(part_m2_ptr + offsets, mask=mask, other=0.0) + n * d * d
    m2 = tl.sum(acc, axis=0)

    shift = tl.load(x_ptr + c * inner, mask=c_mask, other=0.0).to(acc_ty)
    mean = shift + mean
    var = m2 / count
    tl.store(mean_out_ptr + c, mean, mask=c_mask)
    if OUT_VAR:
        tl.store(second_out_ptr + c, var, mask=c_mask)
    else:
        eps = _from_bits(eps_bits).to(acc_ty)
        tl.store(second_out_ptr + c, _inv_sqrt(var + eps, FP64), mask=c_mask)
    momentum = _from_bits(momentum_bits)
    keep = (1.0 - momentum).to(acc_ty)
    momentum = momentum.to(acc_ty)
    if HAS_RUNNING_MEAN:
        rm = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
        rm = keep * rm + momentum * mean
        tl.store(running_mean_ptr + c, rm.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
    if HAS_RUNNING_VAR:
        rv = tl.load(running_var_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
        rv = keep * rv + momentum * (m2 / (count - 1.0))
        tl.store(running_var_ptr + c, rv.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["n_total"])  # 1 for one value per channel, as above
def _bn_finalize_sums_kernel(
    part_a_ptr,     # [S, C] sum(dy) per split (row stride C)
    part_b_ptr,     # [S, C] sum(dy * (x - mean)) per split (row stride C)
    sum_a_ptr,      # [C] out: sum(dy)
    sum_b_ptr,      # [C] out: sum(dy * (x - mean))
    invstd_ptr,     # [C] read when MEANS: for grad_weight
    grad_weight_ptr,  # [C] out when MEANS: sum_b * invstd
    mean_a_ptr,     # [C] out when MEANS: sum_a / n
    mean_b_ptr,     # [C] out when MEANS: sum_b / n
    C,              # channels
    splits,         # S, the partials' rows
    n_total,        # values per channel
    MEANS: tl.constexpr, FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    c_mask = c < C
    acc_a = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc_b = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for s0 in range(0, splits, BLOCK_S):  # chunks in split order; one when S <= BLOCK_S
        offsets, mask = _split_tile(s0, c, c_mask, splits, C, BLOCK_S)
        acc_a += tl.load(part_a_ptr + offsets, mask=mask, other=0.0)
        acc_b += tl.load(part_b_ptr + offsets, mask=mask, other=0.0)
    sum_a = tl.sum(acc_a, axis=0)
    sum_b = tl.sum(acc_b, axis=0)
    tl.store(sum_a_ptr + c, sum_a, mask=c_mask)
    tl.store(sum_b_ptr + c, sum_b, mask=c_mask)
    if MEANS:
        invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
        tl.store(grad_weight_ptr + c, sum_b * invstd, mask=c_mask)
        count = n_total.to(acc_ty)
        tl.store(mean_a_ptr + c, sum_a / count, mask=c_mask)
        tl.store(mean_b_ptr + c, sum_b / count, mask=c_mask)
