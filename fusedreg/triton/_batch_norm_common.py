"""Device helpers shared by the Triton BatchNorm kernels (_batch_norm_stats, _batch_norm_elemt):
tile addressing in the layout (o * C + c) * inner + s, float64 scalars passed as int64 bits, and
1 / sqrt rounded as torch rounds it.

Algorithm: a tile is [BLOCK_O, BLOCK_X] with rows o and columns s (NCHW-like: one channel per
program) or c (channels_last: BLOCK_X channels per program), so neither layout is transposed and no
index is divided per element.
Trade-off: offsets are int64 throughout (a channel's slice, or the rows of channels_last, can pass
2**31 elements); the extra integer width costs a few instructions per tile, not per byte.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
