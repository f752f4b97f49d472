"""Triton BatchNorm ops: fusedreg::batch_norm_fwd_triton, _bwd_triton, _stats_triton,
_elemt_triton, _bwd_reduce_triton and _bwd_elemt_triton: argument checks, layout, grid sizing and
registration. The kernels live in _batch_norm_stats (split reductions and their finalize) and
_batch_norm_elemt (the elementwise pass).

Layout (as csrc/batch_norm.h): outputs are torch.empty_like(input), every per-element operand is
brought into that layout, and element (o, c, s) then lives at (o * C + c) * inner + s with
inner = stride(1). Contiguous NC* inputs have inner = H*W; channels_last(_3d) and (N, C) inputs
have inner = 1, rows of an [outer, C] matrix.

Algorithm: training forward = statistics (partial + finalize, which also updates the running
statistics) then the elementwise normalization; backward = the gradient sums (partial + finalize,
which also gives grad_weight, mean_dy, mean_dy_xmu) then the elementwise grad_input; eval forward
and eval backward with frozen parameters are the elementwise pass alone. The reduction grid is sized
to _PROGRAMS_PER_SM programs per SM, split over channel blocks and then over each channel's rows
(and columns); the finalize grid puts up to _FINALIZE_TILE partials in one program's tile.

Trade-off: training forward reads x twice (12 B/elem fp32), backward reads dy and x twice; a
channel slice is not kept on chip between the reduction and the elementwise pass, which would
need one program per channel and leave most of the GPU idle for small C.
All arithmetic is float32 (float64 for float64 data); outputs are rounded once. Indices: the program
id and its divisions stay int32 (cheap); every product of them that locates data is int64, since a
channel's slice (C == 1: the whole tensor) or the rows of channels_last can pass 2**31 elements
(tests/test_triton_sm90.py checks it).
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton

from . import _batch_norm_elemt as _elemt
from . import _batch_norm_stats as _stats
from . import _common
from ._common import interpreted, registered_as


__all__ = ["batch_norm_fwd", "batch_norm_bwd", "batch_norm_stats", "batch_norm_elemt",
           "batch_norm_bwd_reduce", "batch_norm_bwd_elemt"]

_TILE = 2048            # elements per [BLOCK_O, BLOCK_X] tile
_MAX_BLOCK_X = 1024      # columns of a tile: s (NCHW-like) ...
_MAX_BLOCK_C = 128       # ... or channels (channels_last)
_ELEMS_PER_SPLIT = 16384  # a reduction program covers at least this many elements of its channels
_FINALIZE_TILE = 1024    # partials per finalize tile [BLOCK_S, BLOCK_C]: S <= 1024 in one tile
_NUM_WARPS = 4
# Reduction programs per SM. The partial kernel is bandwidth-bound and each program streams one
# equal slab, so the grid should be one wave of co-resident programs with as many loads in flight
# as fit. 4 programs of 4 warps (16 warps per SM) are co-resident up to 128 registers per thread
# (65536 / (4 * 128 threads)); the sm_90 compile test's large 16- and 32-bit cases use 45-116, so
# their grid is one full wave with no tail. 8 per SM would double the loads in flight only where a
# variant stays <= 64 registers and make the 65-128 ones 1.1-2 waves, the last on a fraction of
# the SMs; it would also double the splits. (Odd-inner bfloat16 NCHW moments, 140 registers, and
# float64 NCHW moments, 201, fit 3 and 2 per SM: a second, partial wave, accepted there.)
# More bytes in flight per program (larger tiles), not more programs, is the lever left.
_PROGRAMS_PER_SM = 4
_CPU_TARGET_PROGRAMS = 16  # interpreter runs (tests): enough splits to exercise their merge

_FWD, _BWD, _BWD_EVAL = 0, 1, 2


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
    """Reduction programs to launch on `device` (all channel blocks and splits together)."""
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * _sm_count(device.index or 0)
    return _CPU_TARGET_PROGRAMS


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
    _stats._bn_partial_kernel[(channel_blocks * splits,)](
        x, dy if grad else x, mean if grad else part, part[0], part[1], part[2],
        c, layout.inner, layout.outer, splits, splits_s, o_per_split, x_per_split,
        CHANNELS_LAST=layout.channels_last, GRAD=grad, FP64=x.dtype == torch.float64,
        BLOCK_O=block_o, BLOCK_X=block_x, num_warps=_NUM_WARPS)
    return splits, part[0], part[1], part[2]


def _finalize_grid(splits: int, channels: int) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK_S, BLOCK_C) of a finalize over [splits, channels] partials: all splits in one
    tile up to _FINALIZE_TILE of them (the split axis is reduced as a tree), channels filling the
    rest of the tile, so small C gets one program and large C many."""
    block_s = min(triton.next_power_of_2(splits), _FINALIZE_TILE)
    block_c = min(triton.next_power_of_2(channels), max(1, _FINALIZE_TILE // block_s))
    return (triton.cdiv(channels, block_c),), block_s, block_c


def _moments(x: torch.Tensor, layout: _Layout, mean_out: torch.Tensor, second_out: torch.Tensor,
             out_var: bool, running_mean=None, running_var=None, momentum=0.0, eps=0.0) -> None:
    """mean_out, second_out (invstd or biased var) and the running stats from x; layout.n > 0."""
    splits, part_n, part_mean, part_m2 = _partials(x, layout)
    grid, block_s, block_c = _finalize_grid(splits, layout.channels)
    _stats._bn_finalize_moments_kernel[grid](
        x, part_n, part_mean, part_m2, mean_out, second_out,
        mean_out if running_mean is None else running_mean,
        mean_out if running_var is None else running_var,
        layout.channels, layout.inner, splits, layout.n, _float_bits(eps), _float_bits(momentum),
        OUT_VAR=out_var, HAS_RUNNING_MEAN=running_mean is not None,
        HAS_RUNNING_VAR=running_var is not None, FP64=x.dtype == torch.float64, BLOCK_S=block_s,
        BLOCK_C=block_c, num_warps=_NUM_WARPS)


def _grad_sums(dy: torch.Tensor, x: torch.Tensor, layout: _Layout, mean: torch.Tensor,
               invstd: torch.Tensor | None = None):
    """(sum_dy, sum_dy_xmu) and, given invstd, (grad_weight, mean_dy, mean_dy_xmu) too."""
    stats = _stats_dtype(x)
    c = layout.channels
    if layout.numel == 0:
        return tuple(x.new_zeros((c,), dtype=stats) for _ in range(5))
    outs = tuple(x.new_empty((c,), dtype=stats) for _ in range(5))  # separate: outputs never alias
    splits, part_a, part_b, _ = _partials(x, layout, dy, mean)
    grid, block_s, block_c = _finalize_grid(splits, c)
    _stats._bn_finalize_sums_kernel[grid](
        part_a, part_b, outs[0], outs[1], outs[0] if invstd is None else invstd, outs[2], outs[3], outs[4],
        c, splits, layout.n, MEANS=invstd is not None, FP64=x.dtype == torch.float64,
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=_NUM_WARPS)
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
    _elemt._bn_elementwise_kernel[(programs,)](
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
