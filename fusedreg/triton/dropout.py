"""Triton kernels of fused dropout: fusedreg::dropout_fwd_triton, dropout_fwd__triton,
dropout_bwd_triton and dropout_add_fwd_triton.

Algorithm: one pass over memory. A program covers 2048 consecutive elements as a [ROWS, COLS] tile
whose rows are whole groups of 4 elements (COLS = 4 for float32/float64, 8 for 16-bit dtypes: 16
bytes per row, so loads and stores are 16-byte vectors). One tl.philox call per group yields its 4
words, which a join/reshape puts on the group's 4 columns: the layout of csrc/common/philox.h
(group j = i // 4, word i % 4, counter (j mod 2**32, j >> 32, 0, 0), key = seed), so the mask is
bit-identical to the cuda, cpu and reference backends. The seed is loaded by the kernel: no host
sync, and CUDA-graph replays that redraw it get fresh masks. Backward is the same kernel on the
gradient.

Trade-off: one Philox-4x32-10 call serves 4 elements, which keeps 16-bit dropout on the bandwidth
side of an H100; the bias index of dropout_add uses 32-bit multiply-high division (64-bit division
per element would make it compute-bound) except on tensors of 2**31+ elements. Tensors whose size is
not a multiple of 16 get masked scalar accesses (Triton cannot prove the vectors in bounds).

Layout rule (as fusedreg/reference/dropout.py): the output is torch.empty_like(input) and element i
is its i-th element in memory order; an input without that layout is first copied into it.
"""
from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from . import _common
from ._common import float32_to_bfloat16_rne, interpreted, registered_as

__all__ = ["dropout_fwd", "dropout_fwd_", "dropout_bwd", "dropout_add_fwd"]

_ELEMS_PER_PROGRAM = 2048
_NUM_WARPS = 4


@triton.jit
def _divmod_u32(n, divisor, magic, shift):
    """(n // divisor, n % divisor) for uint32 n, divisor < 2**31, by a multiply-high instead of a
    division (ATen's IntDivider): n // d == (umulhi(n, magic) + n) >> shift, see _magic_divider."""
    q = (tl.umulhi(n, magic) + n) >> shift
    return q, n - q * divisor


@triton.jit(do_not_specialize=["stride_magic", "size_magic"])
def _dropout_kernel(
    x_ptr,          # [n] input, dense, in the output's memory order
    residual_ptr,   # [n] like x_ptr; read only when HAS_RESIDUAL
    bias_ptr,       # [bias_size] contiguous; read only when HAS_BIAS
    out_ptr,        # [n] dense output (x_ptr itself when in place)
    seed_ptr,       # int64 [1]: the Philox key
    n_elements,     # n
    threshold,      # floor(p * 2**32): element kept iff its word >= threshold
    scale_bits,     # int64: IEEE-754 bits of 1 / (1 - p) as a double
    bias_stride,    # memory distance between neighbours along the last logical dim
    bias_size,      # size of the last logical dim
    stride_magic,   # _magic_divider(bias_stride), used when INDEX_32
    stride_shift,
    size_magic,     # _magic_divider(bias_size), used when INDEX_32
    size_shift,
    HAS_RESIDUAL: tl.constexpr,  # dropout_add: out = residual + dropout(x (+ bias))
    HAS_BIAS: tl.constexpr,
    INDEX_32: tl.constexpr,      # n < 2**31: bias indices by 32-bit multiply-high division
    DROP_ALL: tl.constexpr,      # p == 1: every element dropped, no Philox words needed
    FP64: tl.constexpr,          # math in float64 (float64 data) instead of float32
    BF16_ROUND_BY_BITS: tl.constexpr,  # bfloat16 output rounded by float32_to_bfloat16_rne
    ROWS: tl.constexpr,          # tile rows per program
    GROUPS_PER_ROW: tl.constexpr,  # groups of 4 elements per tile row: 16 bytes of data per row
):
    math_ty = tl.float64 if FP64 else tl.float32
    COLS: tl.constexpr = 4 * GROUPS_PER_ROW
    # int64 throughout: element and group indices of large tensors pass 2**31 and 2**32.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)    # [ROWS]
    offsets = rows[:, None] * COLS + tl.arange(0, COLS)[None, :]                      # [ROWS, COLS]
    in_range = offsets < n_elements

    v = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(math_ty)
    if HAS_BIAS:
        # Bias index of memory offset m: (m // bias_stride) % bias_size. A 64-bit division per
        # element would cost more than the Philox call, hence the 32-bit multiply-high form.
        if INDEX_32:
            q, _ = _divmod_u32(offsets.to(tl.uint32), bias_stride, stride_magic.to(tl.uint32), stride_shift)
            _, bias_index = _divmod_u32(q, bias_size, size_magic.to(tl.uint32), size_shift)
        else:
            bias_index = (offsets // bias_stride) % bias_size
        v = v + tl.load(bias_ptr + bias_index, mask=in_range, other=0.0).to(math_ty)

    if DROP_ALL:
        y = tl.zeros_like(v)
    else:
        seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
        groups = rows[:, None] * GROUPS_PER_ROW + tl.arange(0, GROUPS_PER_ROW)[None, :]  # [ROWS, G]
        counter_lo = groups.to(tl.uint32)             # truncates: j mod 2**32
        counter_hi = (groups >> 32).to(tl.uint32)
        zero = tl.zeros_like(counter_lo)
        w0, w1, w2, w3 = tl.philox(seed, counter_lo, counter_hi, zero, zero)
        # [ROWS, G, 2, 2] holding w(2a+b) at [r, g, a, b]; row-major flattening puts word k of
        # group g at column 4g + k, the element it belongs to.
        word = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, COLS])
        # Words are uint32 and the threshold may be >= 2**31 (an int64 argument then): compare in
        # int64, where the uint32 word widens by zero extension, so no signed 32-bit view of either
        # side can flip the comparison.
        keep = word.to(tl.int64) >= threshold
        scale = scale_bits.to(tl.float64, bitcast=True).to(math_ty)  # exact: already math_ty's value
        # Selected, not multiplied by the mask: a dropped inf or NaN gives 0.
        y = tl.where(keep, v * scale, 0.0)
    if HAS_RESIDUAL:
        y = tl.load(residual_ptr + offsets, mask=in_range, other=0.0).to(math_ty) + y
    if BF16_ROUND_BY_BITS:
        y = float32_to_bfloat16_rne(y)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=in_range)



def _check_seed(seed: torch.Tensor, device: torch.device) -> None:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be an int64 tensor of one element, got "
                         f"{getattr(seed, 'dtype', type(seed))} {tuple(getattr(seed, 'shape', ()))}")
    if seed.device != device:
        raise ValueError(f"seed must be on {device}, got {seed.device}")


def _check_args(input: torch.Tensor, seed: torch.Tensor, p: float, name: str) -> None:
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {input.dtype}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    _check_seed(seed, input.device)
    if input.device.type == "cpu" and not _common.cpu_tensors_allowed():
        raise RuntimeError(f"dropout (triton): {name} is a CPU tensor, which needs the Triton interpreter "
                           "(TRITON_INTERPRET=1 set before fusedreg.triton is imported)")


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`'s values laid out as `like` (t itself when it already is)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _scale_bits(p: float, dtype: torch.dtype) -> int:
    """Bits of the double holding 1 / (1 - p), rounded once to float32 unless dtype is float64.
    Triton passes Python floats as float32, which would round a float64 scale; int64 bits do not
    (and a scale >= 1 has bits >= 2**62, so the argument is always typed int64)."""
    scale = 1.0 if p == 1.0 else 1.0 / (1.0 - p)
    if dtype != torch.float64:
        scale = struct.unpack("f", struct.pack("f", scale))[0]
    return struct.unpack("q", struct.pack("d", scale))[0]


def _magic_divider(d: int) -> tuple[int, int]:
    """(magic, shift) with n // d == (umulhi(n, magic) + n) >> shift for 0 <= n, d < 2**31
    (ATen's IntDivider): shift = ceil(log2 d), magic = floor(2**32 * (2**shift - d) / d) + 1."""
    shift = (d - 1).bit_length()
    return (2**32 * ((1 << shift) - d)) // d + 1, shift


def _launch(x: torch.Tensor, out: torch.Tensor, seed: torch.Tensor, p: float,
            residual: torch.Tensor | None = None, bias: torch.Tensor | None = None,
            bias_stride: int = 1, bias_size: int = 1, index_32: bool | None = None) -> None:
    """out = (residual +) dropout(x (+ bias)) over the n elements of dense x/out in memory order.
    index_32 (None: when n < 2**31) picks the 32-bit bias-index arithmetic."""
    n = out.numel()
    if n == 0:
        return
    index_32 = n < 2**31 if index_32 is None else index_32
    # A tile row holds 16 bytes of data (whole groups of 4), one vector access per row.
    groups_per_row = max(1, 16 // out.element_size() // 4)
    rows = _ELEMS_PER_PROGRAM // (4 * groups_per_row)
    grid = (triton.cdiv(n, _ELEMS_PER_PROGRAM),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _dropout_kernel[grid](
            x, x if residual is None else residual, x if bias is None else bias, out, seed,
            n, 0 if p == 1.0 else int(p * 4294967296.0), _scale_bits(p, out.dtype),
            bias_stride, bias_size, *_magic_divider(bias_stride), *_magic_divider(bias_size),
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, INDEX_32=index_32,
            DROP_ALL=p == 1.0, FP64=out.dtype == torch.float64,
            # The interpreter's float32 -> bfloat16 cast truncates; compiled kernels round to
            # nearest even in hardware (cvt.rn), as torch does.
            BF16_ROUND_BY_BITS=out.dtype == torch.bfloat16 and interpreted(),
            ROWS=rows, GROUPS_PER_ROW=groups_per_row, num_warps=_NUM_WARPS,
            # (x + bias) * scale + residual must not become one FMA: the reference rounds twice.
            enable_fp_fusion=False,
        )


@registered_as("dropout_fwd_triton")
def dropout_fwd(input: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """input * keep / (1 - p) in input's dtype, laid out as torch.empty_like(input)."""
    _check_args(input, seed, p, "input")
    out = torch.empty_like(input)
    _launch(_in_layout_of(input, out), out, seed, p)
    return out


@registered_as("dropout_fwd__triton")
def dropout_fwd_(input: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """In place, with the mask dropout_fwd would use (a dense input is its own output layout)."""
    _check_args(input, seed, p, "input")
    # empty_like keeps the strides of exactly the non-overlapping, dense inputs (meta: no memory).
    if torch.empty_like(input, device="meta").stride() == input.stride():
        _launch(input, input, seed, p)
    else:
        input.copy_(dropout_fwd(input, seed, p))


@registered_as("dropout_bwd_triton")
def dropout_bwd(grad: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """grad * keep / (1 - p); grad must be in the forward output's layout to get its mask."""
    _check_args(grad, seed, p, "grad")
    out = torch.empty_like(grad)
    _launch(_in_layout_of(grad, out), out, seed, p)
    return out


@registered_as("dropout_add_fwd_triton")
def dropout_add_fwd(input: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None,
                    seed: torch.Tensor, p: float) -> torch.Tensor:
    """residual + dropout(input + bias), adds and product in fp32 (fp64 for float64) with one final
    rounding; bias [input.shape[-1]] broadcasts over the last dim. Masked as dropout_fwd(input)."""
    _check_args(input, seed, p, "input")
    if residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != input.dtype or residual.device != input.device:
        raise ValueError(f"residual must match input's dtype and device ({input.dtype}, {input.device}), "
                         f"got {residual.dtype}, {residual.device}")
    out = torch.empty_like(input)
    bias_stride = bias_size = 1
    if bias is not None:
        if input.dim() == 0 or bias.shape != input.shape[-1:]:
            raise ValueError(f"bias must have shape [input.shape[-1]] = {tuple(input.shape[-1:])}, "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != input.dtype or bias.device != input.device:
            raise ValueError(f"bias must match input's dtype and device ({input.dtype}, {input.device}), "
                             f"got {bias.dtype}, {bias.device}")
        bias = bias.contiguous()
        # In a dense layout, memory offset m has index (m // stride) % size along every dim of
        # size > 1. A size-1 last dim has index 0 and any stride, even 0: keep (1, 1) for it.
        if out.shape[-1] != 1:
            bias_stride, bias_size = out.stride(-1), out.shape[-1]
    _launch(_in_layout_of(input, out), out, seed, p, _in_layout_of(residual, out), bias,
            bias_stride, bias_size)
    return out
