"""Triton BatchNorm elementwise pass: one kernel for the forward normalization
y = (x - mean) * invstd * w + b, the training grad_input
(dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * w, and the eval grad_input
dy * invstd * w.

Algorithm: one program per [BLOCK_O, BLOCK_X] tile (columns s with one channel per program for
NCHW-like layouts, columns c for channels_last), per-channel coefficients loaded once per program
and folded into one scale and shift, fp32 math (fp64 for fp64 data), one rounding on store. Eval
forward is this kernel alone: invstd comes from running_var (FROM_VAR) and the programs of the
first row tile also write mean/invstd, so no separate launch produces them.

Trade-off: a program per tile rather than a persistent grid: the tiles are independent and
bandwidth-bound, and the per-tile setup (a few [C] loads, served from L2) is small next to 2048
elements of traffic; in exchange no index is divided per element and both layouts are native.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._batch_norm_common import _from_bits, _inv_sqrt, _tile_offsets
from ._common import float32_to_bfloat16_rne


# The float64 bits of eps = 5e-324 are the int 1, which Triton would pass as a constant Python int.
@triton.jit(do_not_specialize=["eps_bits"])
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
    C,              # channels
    inner,          # s per (o, c): stride of dim 1 (1 when CHANNELS_LAST)
    outer,          # rows o
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
