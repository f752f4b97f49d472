"""Triton kernels of BatchNorm: fusedreg::batch_norm_fwd_triton, _bwd_triton, _stats_triton,
_elemt_triton, _bwd_reduce_triton and _bwd_elemt_triton.

Layout (as csrc/batch_norm.h): outputs are torch.empty_like(input), every per-element operand is
brought into that layout, and element (o, c, s) then lives at (o * C + c) * inner + s with
inner = stride(1). Contiguous NC* inputs have inner = H*W; channels_last(_3d) and (N, C) inputs
have inner = 1, rows of an [outer, C] matrix. Programs work on [BLOCK_O, BLOCK_X] tiles whose
columns are s (NCHW-like: one channel per program) or c (channels_last: BLOCK_X channels per
program, coalesced along C), so neither layout is transposed and no index is divided per element.

Algorithm:
- statistics: programs own (channel block, split) pairs. Each tile contributes its exact two-pass
  moments (count, mean, m2 of x - shift, shift = the channel's first value) per column, merged
  into per-column accumulators with Chan's formula; NCHW programs then merge their columns with a
  fixed tl.reduce tree. A finalize program per channel block merges the splits in split order and
  writes mean/invstd (or var) and the running statistics (unbiased variance). Fixed orders and no
  atomics: bitwise reproducible.
- backward sums: the same traversal summing dy and dy * (x - mean); finalize sums the splits.
- one elementwise kernel for y = (x - mean) * invstd * w + b, the training grad_input
  (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * w and the eval one, dy * invstd * w.
  Eval forward is this kernel alone (invstd from running_var, mean/invstd written by the programs
  of the first row tile).

Trade-off: training forward reads x twice (12 B/elem fp32), backward reads dy and x twice; a
channel slice is not kept on chip between the reduction and the elementwise pass, which would
need one program per channel and leave most of the GPU idle for small C.
All arithmetic is float32 (float64 for float64 data); outputs are rounded once. Indices: the program
id and its divisions stay int32 (cheap); every product of them that locates data is int64, since a
channel's slice (C == 1: the whole tensor) or the rows of channels_last can pass 2**31 elements. The
per-channel ones are widened too, so that the one rule holds (tests/test_triton_sm90.py checks it).
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

from . import _common
from ._common import float32_to_bfloat16_rne, interpreted, registered_as


__all__ = ["batch_norm_fwd", "batch_norm_bwd", "batch_norm_stats", "batch_norm_elemt",
           "batch_norm_bwd_reduce", "batch_norm_bwd_elemt"]

_TILE = 2048            # elements per [BLOCK_O, BLOCK_X] tile
_MAX_BLOCK_X = 1024      # columns of a tile: s (NCHW-like) ...
_MAX_BLOCK_C = 128       # ... or channels (channels_last)
_ELEMS_PER_SPLIT = 16384  # a reduction program covers at least this many elements of its channels
_NUM_WARPS = 4
_CPU_TARGET_PROGRAMS = 16  # interpreter runs (tests): enough splits to exercise their merge

_FWD, _BWD, _BWD_EVAL = 0, 1, 2


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, m2) sets; empty sets leave the other unchanged."""
    n = n_a + n_b
    ratio = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * ratio, m2_a + m2_b + delta * delta * n_a * ratio


@triton.jit
def _from_bits(bits):
    """The float64 whose bits are `bits`. Triton types an int argument by its value (int32 when
    it fits, as the bits of 0.0 do), so widen before the bitcast."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _inv_sqrt(v, FP64: tl.constexpr):
    """1 / sqrt(v), each step correctly rounded (as torch computes 1 / torch.sqrt(v))."""
    if FP64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), tl.sqrt_rn(v))


@triton.jit
def _tile_offsets(o0, x0, c, o_hi, x_hi, C, inner,
                  CHANNELS_LAST: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr):
    """Memory offsets (int64) and mask of the tile at rows o0.., columns x0.. (x = s, or c when
    CHANNELS_LAST; `c` is the program's channel, unused when CHANNELS_LAST); o0, x0 are int64."""
    rows = o0 + tl.arange(0, BLOCK_O).to(tl.int64)                 # [BLOCK_O]
    cols = x0 + tl.arange(0, BLOCK_X).to(tl.int64)                 # [BLOCK_X]
    mask = (rows < o_hi)[:, None] & (cols < x_hi)[None, :]
    if CHANNELS_LAST:
        offsets = rows[:, None] * C + cols[None, :]
    else:
        offsets = (rows[:, None] * C + c) * inner + cols[None, :]
    return offsets, mask


@triton.jit
def _bn_partial_kernel(
    x_ptr,        # [outer * C * inner] input in the layout (o * C + c) * inner + s
    dy_ptr,       # like x_ptr: grad_out; read only when GRAD
    mean_ptr,     # [C] channel means; read only when GRAD
    part_a_ptr,   # [S, C] out: count (moments) | sum(dy) (GRAD)
    part_b_ptr,   # [S, C] out: mean of x - shift (moments) | sum(dy * (x - mean)) (GRAD)
    part_c_ptr,   # [S, C] out: m2 (moments); untouched when GRAD
    C, inner, outer,
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


# n_total is 1 for one value per channel and the bits of 5e-324 are 1: Triton would pass a 1 as a
# constant Python int, which has no .to(); these arguments are never specialised.
@triton.jit(do_not_specialize=["n_total", "eps_bits", "momentum_bits"])
def _bn_finalize_moments_kernel(
    x_ptr,            # input, for the channels' shifts at offsets c * inner
    part_n_ptr,       # [S, C] counts
    part_mean_ptr,    # [S, C] means of x - shift
    part_m2_ptr,      # [S, C] m2
    mean_out_ptr,     # [C] out: mean
    second_out_ptr,   # [C] out: invstd, or the biased variance when OUT_VAR
    running_mean_ptr,  # [C] in/out when HAS_RUNNING_MEAN (any float dtype)
    running_var_ptr,   # [C] in/out when HAS_RUNNING_VAR (any float dtype)
    C, inner, splits,
    n_total,          # values per channel, > 0
    eps_bits,         # int64 bits of eps as a float64
    momentum_bits,    # int64 bits of momentum as a float64
    OUT_VAR: tl.constexpr, HAS_RUNNING_MEAN: tl.constexpr, HAS_RUNNING_VAR: tl.constexpr,
    FP64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n = tl.zeros([BLOCK_C], dtype=acc_ty)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for split in range(0, splits):  # in split order: deterministic
        offsets = split * C + c
        n, mean, m2 = _chan_merge(n, mean, m2,
                                  tl.load(part_n_ptr + offsets, mask=c_mask, other=0.0),
                                  tl.load(part_mean_ptr + offsets, mask=c_mask, other=0.0),
                                  tl.load(part_m2_ptr + offsets, mask=c_mask, other=0.0))
    shift = tl.load(x_ptr + c.to(tl.int64) * inner, mask=c_mask, other=0.0).to(acc_ty)
    mean = shift + mean
    count = n_total.to(acc_ty)
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
    part_a_ptr,     # [S, C] sum(dy) per split
    part_b_ptr,     # [S, C] sum(dy * (x - mean)) per split
    sum_a_ptr,      # [C] out: sum(dy)
    sum_b_ptr,      # [C] out: sum(dy * (x - mean))
    invstd_ptr,     # [C] read when MEANS: for grad_weight
    grad_weight_ptr,  # [C] out when MEANS: sum_b * invstd
    mean_a_ptr,     # [C] out when MEANS: sum_a / n
    mean_b_ptr,     # [C] out when MEANS: sum_b / n
    C, splits, n_total,
    MEANS: tl.constexpr, FP64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_a = tl.zeros([BLOCK_C], dtype=acc_ty)
    sum_b = tl.zeros([BLOCK_C], dtype=acc_ty)
    for split in range(0, splits):
        sum_a += tl.load(part_a_ptr + split * C + c, mask=c_mask, other=0.0)
        sum_b += tl.load(part_b_ptr + split * C + c, mask=c_mask, other=0.0)
    tl.store(sum_a_ptr + c, sum_a, mask=c_mask)
    tl.store(sum_b_ptr + c, sum_b, mask=c_mask)
    if MEANS:
        invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
        tl.store(grad_weight_ptr + c, sum_b * invstd, mask=c_mask)
        count = n_total.to(acc_ty)
        tl.store(mean_a_ptr + c, sum_a / count, mask=c_mask)
        tl.store(mean_b_ptr + c, sum_b / count, mask=c_mask)


@triton.jit(do_not_specialize=["eps_bits"])  # the bits of 5e-324 are 1, see above
def _bn_elementwise_kernel(
    x_ptr,          # [numel] input in the layout (o * C + c) * inner + s; unused when PASS == 2
    dy_ptr,         # like x_ptr: grad_out; unused when PASS == 0
    out_ptr,        # like x_ptr: output
    mean_ptr,       # [C]
    invstd_ptr,     # [C] invstd, or the running variance when FROM_VAR
    weight_ptr,     # [C] when HAS_WEIGHT
    shift_ptr,      # [C] when HAS_SHIFT: bias (PASS 0) or mean_dy (PASS 1)
    dot_ptr,        # [C] mean_dy_xmu (PASS 1)
    mean_out_ptr,   # [C] out when WRITE_STATS: mean
    invstd_out_ptr,  # [C] out when WRITE_STATS: invstd
    C, inner, outer,
    tiles_x,        # column tiles per row tile
    tiles_o,        # row tiles
    eps_bits,       # int64 bits of eps as a float64 (FROM_VAR)
    PASS: tl.constexpr,  # 0: forward, 1: training grad_input, 2: eval grad_input
    CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SHIFT: tl.constexpr,
    FROM_VAR: tl.constexpr, WRITE_STATS: tl.constexpr, FP64: tl.constexpr,
    BF16_ROUND_BY_BITS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    tile_x = pid % tiles_x
    rest = pid // tiles_x
    tile_o = rest % tiles_o
    o0 = tile_o.to(tl.int64) * BLOCK_O
    x0 = tile_x.to(tl.int64) * BLOCK_X
    if CHANNELS_LAST:
        c = x0 + tl.arange(0, BLOCK_X)
        x_hi = C
    else:
        c = rest // tiles_o
        x_hi = inner
    c_mask = c < C
    offsets, mask = _tile_offsets(o0, x0, c, outer, x_hi, C, inner, CHANNELS_LAST, BLOCK_O, BLOCK_X)

    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    if FROM_VAR:
        eps = _from_bits(eps_bits).to(acc_ty)
        invstd = _inv_sqrt(tl.load(invstd_ptr + c, mask=c_mask, other=1.0).to(acc_ty) + eps, FP64)
    else:
        invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    shift = tl.zeros_like(scale)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    if WRITE_STATS:
        if CHANNELS_LAST:
            first = tile_o == 0
        else:
            first = (tile_o == 0) & (tile_x == 0)
        if first:
            tl.store(mean_out_ptr + c, mean, mask=c_mask)
            tl.store(invstd_out_ptr + c, invstd, mask=c_mask)
    if CHANNELS_LAST:  # per-column coefficients
        mean, scale, shift, invstd = mean[None, :], scale[None, :], shift[None, :], invstd[None, :]

    if PASS == 0:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        y = (x - mean) * scale + shift
    elif PASS == 1:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        dot = tl.load(dot_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
        if CHANNELS_LAST:
            dot = dot[None, :]
        y = (dy - shift - (x - mean) * (invstd * invstd * dot)) * scale
    else:
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        y = dy * scale
    if BF16_ROUND_BY_BITS:
        y = float32_to_bfloat16_rne(y)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host side


def _float_bits(value: float) -> int:
    """Triton passes Python floats as float32; int64 bits keep a float64 exact."""
    return struct.unpack("q", struct.pack("d", float(value)))[0]


def _stats_dtype(input: torch.Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    return 4 * _sm_count(device.index or 0) if device.type == "cuda" else _CPU_TARGET_PROGRAMS


def _check_input(input: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {getattr(input, 'dtype', type(input))}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got {tuple(input.shape)}")
    if input.device.type == "cpu" and not _common.cpu_tensors_allowed():
        raise RuntimeError("batch_norm (triton): input is a CPU tensor, which needs the Triton interpreter "
                           "(TRITON_INTERPRET=1 set before fusedreg.triton is imported)")


def _check_like_input(t: torch.Tensor, input: torch.Tensor, name: str) -> None:
    if t.shape != input.shape or t.dtype != input.dtype or t.device != input.device:
        raise ValueError(f"{name} must match input's shape, dtype and device ({tuple(input.shape)}, "
                         f"{input.dtype}, {input.device}), got {tuple(t.shape)}, {t.dtype}, {t.device}")


def _channel(t: torch.Tensor | None, input: torch.Tensor, name: str) -> torch.Tensor | None:
    """A per-channel [C] tensor of input's dtype or the statistics dtype, made contiguous."""
    if t is None:
        return None
    c = input.shape[1]
    if t.shape != (c,):
        raise ValueError(f"{name} must have shape [C] = [{c}], got {tuple(t.shape)}")
    if t.dtype not in (input.dtype, _stats_dtype(input)):
        raise ValueError(f"{name} must have dtype {input.dtype} or {_stats_dtype(input)} (the input's "
                         f"dtype or the statistics dtype), got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} must be on {input.device}, got {t.device}")
    return t.contiguous()


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.stride() == like.stride() else torch.empty_like(like, dtype=t.dtype).copy_(t)


class _Layout:
    """(outer, C, inner) of a dense tensor: element (o, c, s) at (o * C + c) * inner + s."""

    def __init__(self, dense: torch.Tensor):
        self.channels = dense.shape[1]
        self.numel = dense.numel()
        self.inner = (self.numel if self.channels == 1 else dense.stride(1)) if self.numel else 0
        self.outer = self.numel // (self.channels * self.inner) if self.numel else 0
        self.channels_last = self.inner == 1
        self.n = self.outer * self.inner  # values per channel

    def tile(self) -> tuple[int, int]:
        """(BLOCK_O, BLOCK_X) for this layout's columns (c when channels_last, else s)."""
        cols = self.channels if self.channels_last else self.inner
        # channels_last: 128 channels (512 B of fp32 per row) already coalesce; more rows per
        # tile and more channel blocks keep the reduction programs numerous and short.
        cap = min(_MAX_BLOCK_X, _MAX_BLOCK_C) if self.channels_last else _MAX_BLOCK_X
        block_x = min(triton.next_power_of_2(max(cols, 1)), cap)
        return max(1, _TILE // block_x), block_x


def _device_context(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _partials(x: torch.Tensor, layout: _Layout, dy: torch.Tensor | None = None,
              mean: torch.Tensor | None = None):
    """Launches the reduction; returns (splits, part_a, part_b, part_c) with parts [S, C]."""
    block_o, block_x = layout.tile()
    c = layout.channels
    channel_blocks = triton.cdiv(c, block_x) if layout.channels_last else c
    wanted = max(1, min(triton.cdiv(_target_programs(x.device), channel_blocks),
                        triton.cdiv(layout.n, _ELEMS_PER_SPLIT)))
    splits_o = min(wanted, layout.outer)
    o_per_split = triton.cdiv(layout.outer, splits_o)
    splits_o = triton.cdiv(layout.outer, o_per_split)
    if layout.channels_last:
        splits_s, x_per_split = 1, block_x
    else:
        col_tiles = triton.cdiv(layout.inner, block_x)
        splits_s = min(col_tiles, triton.cdiv(wanted, splits_o))
        x_per_split = triton.cdiv(col_tiles, splits_s) * block_x
        splits_s = triton.cdiv(layout.inner, x_per_split)
    splits = splits_o * splits_s
    part = x.new_empty((3, splits, c), dtype=_stats_dtype(x))
    grad = dy is not None
    _bn_partial_kernel[(channel_blocks * splits,)](
        x, dy if grad else x, mean if grad else part, part[0], part[1], part[2],
        c, layout.inner, layout.outer, splits, splits_s, o_per_split, x_per_split,
        CHANNELS_LAST=layout.channels_last, GRAD=grad, FP64=x.dtype == torch.float64,
        BLOCK_O=block_o, BLOCK_X=block_x, num_warps=_NUM_WARPS)
    return splits, part[0], part[1], part[2]


def _moments(x: torch.Tensor, layout: _Layout, mean_out: torch.Tensor, second_out: torch.Tensor,
             out_var: bool, running_mean=None, running_var=None, momentum=0.0, eps=0.0) -> None:
    """mean_out, second_out (invstd or biased var) and the running stats from x; layout.n > 0."""
    splits, part_n, part_mean, part_m2 = _partials(x, layout)
    block_c = min(triton.next_power_of_2(layout.channels), 1024)
    _bn_finalize_moments_kernel[(triton.cdiv(layout.channels, block_c),)](
        x, part_n, part_mean, part_m2, mean_out, second_out,
        mean_out if running_mean is None else running_mean,
        mean_out if running_var is None else running_var,
        layout.channels, layout.inner, splits, layout.n, _float_bits(eps), _float_bits(momentum),
        OUT_VAR=out_var, HAS_RUNNING_MEAN=running_mean is not None,
        HAS_RUNNING_VAR=running_var is not None, FP64=x.dtype == torch.float64, BLOCK_C=block_c,
        num_warps=_NUM_WARPS)


def _grad_sums(dy: torch.Tensor, x: torch.Tensor, layout: _Layout, mean: torch.Tensor,
               invstd: torch.Tensor | None = None):
    """(sum_dy, sum_dy_xmu) and, given invstd, (grad_weight, mean_dy, mean_dy_xmu) too."""
    stats = _stats_dtype(x)
    c = layout.channels
    if layout.numel == 0:
        return tuple(x.new_zeros((c,), dtype=stats) for _ in range(5))
    outs = tuple(x.new_empty((c,), dtype=stats) for _ in range(5))  # separate: outputs never alias
    splits, part_a, part_b, _ = _partials(x, layout, dy, mean)
    block_c = min(triton.next_power_of_2(c), 1024)
    _bn_finalize_sums_kernel[(triton.cdiv(c, block_c),)](
        part_a, part_b, outs[0], outs[1], outs[0] if invstd is None else invstd, outs[2], outs[3], outs[4],
        c, splits, layout.n, MEANS=invstd is not None, FP64=x.dtype == torch.float64,
        BLOCK_C=block_c, num_warps=_NUM_WARPS)
    return outs


def _elementwise(pass_: int, x: torch.Tensor | None, dy: torch.Tensor | None, out: torch.Tensor,
                 layout: _Layout, mean: torch.Tensor, invstd: torch.Tensor, weight=None, shift=None,
                 dot=None, from_var: bool = False, eps: float = 0.0, stats_out=None) -> None:
    if layout.numel == 0:
        return
    block_o, block_x = layout.tile()
    cols = layout.channels if layout.channels_last else layout.inner
    tiles_x, tiles_o = triton.cdiv(cols, block_x), triton.cdiv(layout.outer, block_o)
    programs = tiles_x * tiles_o * (1 if layout.channels_last else layout.channels)
    any_ = out
    _bn_elementwise_kernel[(programs,)](
        any_ if x is None else x, any_ if dy is None else dy, out, mean, invstd,
        mean if weight is None else weight, mean if shift is None else shift,
        mean if dot is None else dot,
        mean if stats_out is None else stats_out[0], mean if stats_out is None else stats_out[1],
        layout.channels, layout.inner, layout.outer, tiles_x, tiles_o, _float_bits(eps),
        PASS=pass_, CHANNELS_LAST=layout.channels_last, HAS_WEIGHT=weight is not None,
        HAS_SHIFT=shift is not None, FROM_VAR=from_var, WRITE_STATS=stats_out is not None,
        FP64=out.dtype == torch.float64,
        # The interpreter's float32 -> bfloat16 cast truncates; compiled kernels round to nearest.
        BF16_ROUND_BY_BITS=out.dtype == torch.bfloat16 and interpreted(),
        BLOCK_O=block_o, BLOCK_X=block_x, num_warps=_NUM_WARPS)


def _prepare(input: torch.Tensor, grad_out: torch.Tensor | None = None):
    out = torch.empty_like(input)
    x = _in_layout_of(input, out)
    dy = None if grad_out is None else _in_layout_of(grad_out, out)
    return out, x, dy, _Layout(out)


class _Running:
    """A running statistic updated in place. The kernels update a contiguous statistics-dtype
    array: the caller's tensor when it is one, else a copy written back (rounded once, by torch)."""

    def __init__(self, t: torch.Tensor | None, input: torch.Tensor, name: str):
        self.target = t
        self.work = None
        if t is not None:
            _channel(t, input, name)
            usable = t.dtype == _stats_dtype(input) and t.is_contiguous()
            self.work = t if usable else t.to(_stats_dtype(input)).contiguous()

    def write_back(self) -> None:
        if self.target is not None and self.work is not self.target:
            self.target.copy_(self.work)


@registered_as("batch_norm_fwd_triton")
def batch_norm_fwd(input, weight, bias, running_mean, running_var, training: bool, momentum: float,
                   eps: float):
    """(output laid out as empty_like(input), mean, invstd); the last two [C] in the statistics
    dtype. Training updates running_mean/running_var in place (unbiased variance); eval uses them."""
    _check_input(input)
    weight, bias = _channel(weight, input, "weight"), _channel(bias, input, "bias")
    rmean, rvar = _Running(running_mean, input, "running_mean"), _Running(running_var, input, "running_var")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    c = input.shape[1]
    if training and input.numel() > 0 and input.numel() == c:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {input.size()}")
    out, x, _, layout = _prepare(input)
    mean = input.new_empty((c,), dtype=_stats_dtype(input))
    invstd = torch.empty_like(mean)
    with _device_context(input):
        if not training:
            if layout.numel == 0:
                mean.copy_(rmean.work)
                invstd.copy_(1 / torch.sqrt(rvar.work.to(mean.dtype) + eps))
            _elementwise(_FWD, x, None, out, layout, rmean.work, rvar.work, weight, bias,
                         from_var=True, eps=eps, stats_out=(mean, invstd))
            return out, mean, invstd
        if layout.n == 0:
            mean.zero_()
            invstd.zero_()
            return out, mean, invstd
        _moments(x, layout, mean, invstd, False, rmean.work, rvar.work, momentum, eps)
        rmean.write_back()
        rvar.write_back()
        _elementwise(_FWD, x, None, out, layout, mean, invstd, weight, bias)
    return out, mean, invstd


@registered_as("batch_norm_bwd_triton")
def batch_norm_bwd(grad_out, input, weight, mean, invstd, training: bool):
    """(grad_input laid out as empty_like(input), grad_weight, grad_bias); the last two [C] in the
    statistics dtype."""
    _check_input(input)
    _check_like_input(grad_out, input, "grad_out")
    weight = _channel(weight, input, "weight")
    mean, invstd = _channel(mean, input, "mean"), _channel(invstd, input, "invstd")
    out, x, dy, layout = _prepare(input, grad_out)
    with _device_context(input):
        sum_dy, _, grad_weight, mean_dy, mean_dy_xmu = _grad_sums(dy, x, layout, mean, invstd)
        if training and layout.n > 0:
            _elementwise(_BWD, x, dy, out, layout, mean, invstd, weight, mean_dy, mean_dy_xmu)
        else:
            _elementwise(_BWD_EVAL, None, dy, out, layout, mean, invstd, weight)
    return out, grad_weight, sum_dy


@registered_as("batch_norm_stats_triton")
def batch_norm_stats(input):
    """(mean, biased variance) over every dim but 1, [C] in the statistics dtype (zeros if empty)."""
    _check_input(input)
    _, x, _, layout = _prepare(input)
    mean = input.new_zeros((input.shape[1],), dtype=_stats_dtype(input))
    var = torch.zeros_like(mean)
    if layout.n > 0:
        with _device_context(input):
            _moments(x, layout, mean, var, True)
    return mean, var


@registered_as("batch_norm_elemt_triton")
def batch_norm_elemt(input, weight, bias, mean, invstd):
    """(input - mean) * invstd * weight + bias laid out as empty_like(input)."""
    _check_input(input)
    weight, bias = _channel(weight, input, "weight"), _channel(bias, input, "bias")
    mean, invstd = _channel(mean, input, "mean"), _channel(invstd, input, "invstd")
    out, x, _, layout = _prepare(input)
    with _device_context(input):
        _elementwise(_FWD, x, None, out, layout, mean, invstd, weight, bias)
    return out


@registered_as("batch_norm_bwd_reduce_triton")
def batch_norm_bwd_reduce(grad_out, input, mean):
    """(sum(grad_out), sum(grad_out * (input - mean))) per channel, in the statistics dtype."""
    _check_input(input)
    _check_like_input(grad_out, input, "grad_out")
    mean = _channel(mean, input, "mean")
    _, x, dy, layout = _prepare(input, grad_out)
    with _device_context(input):
        sum_dy, sum_dy_xmu, *_ = _grad_sums(dy, x, layout, mean)
    return sum_dy, sum_dy_xmu


@registered_as("batch_norm_bwd_elemt_triton")
def batch_norm_bwd_elemt(grad_out, input, weight, mean, invstd, mean_dy, mean_dy_xmu):
    """(grad_out - mean_dy - (input - mean) * invstd^2 * mean_dy_xmu) * invstd * weight."""
    _check_input(input)
    _check_like_input(grad_out, input, "grad_out")
    weight, mean, invstd = (_channel(t, input, n) for t, n in
                            ((weight, "weight"), (mean, "mean"), (invstd, "invstd")))
    mean_dy, mean_dy_xmu = _channel(mean_dy, input, "mean_dy"), _channel(mean_dy_xmu, input, "mean_dy_xmu")
    out, x, dy, layout = _prepare(input, grad_out)
    with _device_context(input):
        _elementwise(_BWD, x, dy, out, layout, mean, invstd, weight, mean_dy, mean_dy_xmu)
    return out
