"""Triton kernels of global-norm gradient clipping: fusedreg::grad_norm_pow_triton and
fusedreg::multi_tensor_scale__triton.

Algorithm: a whole list of tensors is one launch. The host writes a pointer table, one int64
tensor on the device: each tensor's data address and numel, then for every program the (tensor,
chunk) it works on (chunks of _CHUNK elements). A program loads its tensor's address, casts it to
a typed pointer and walks its chunk in tiles of _BLOCK elements, unmasked except for the last tile,
with the address hinted 16-byte aligned when every tensor is (so full tiles use 16-byte accesses).
- grad_norm_pow: each program writes one partial (sum of |x|^p in float32, float64 for float64
  data; max |x| for p = inf) to a buffer, and a second one-program kernel reduces the partials in a
  fixed order. No atomics: the same inputs give the same bits on every run. The inf norm takes the
  max over the integer bits of |x|: non-negative floats order like their bits and NaN's bits lie
  above inf's, so the max propagates NaN as torch.max does, on every Triton version.
- multi_tensor_scale_: x = x * scale in float32 (float64) rounded once; a scale of exactly 1 is the
  identity, so then the programs run no tile (only the norm pass is paid when nothing is clipped).

Trade-off: the table is built and copied to the device on the host (pinned, non-blocking: no host
sync), which costs a few microseconds per hundred tensors; it is cached per (addresses, numels),
so a training loop whose gradients keep their storage builds it once, and a CUDA graph captured
after one warm-up call replays the cached table. The first call for a new set of addresses cannot
happen during graph capture (the copy's host buffer would not outlive the capture): it raises.
The copy is ordered on the stream of the call that builds the table; a first use on another stream
must be ordered after that one, as for any tensor shared between streams.

General p computes |x|^p as exp2(p * log2|x|) in float64 (the Triton interpreter has no pow), then
rounds to the accumulator: as exact as powf. No rescaling by the maximum: like PyTorch's norm
kernels, a p-th power sum beyond the accumulator's range overflows to inf.
"""
from __future__ import annotations

import collections
import contextlib
import math
import struct

import torch
import triton
import triton.language as tl

from .._layout import is_dense
from . import _common
from ._common import float32_to_bfloat16_rne, interpreted, registered_as

__all__ = ["grad_norm_pow", "multi_tensor_scale_"]

_CHUNK = 65536       # elements per program
_BLOCK = 2048        # elements per tile
_NUM_WARPS = 8
_COMBINE_BLOCK = 1024
_TABLE_CACHE_SIZE = 32

_KIND_L2, _KIND_L1, _KIND_INF, _KIND_P = 0, 1, 2, 3

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


@triton.jit
def _program_chunk(table_ptr, n_tensors, n_programs, ALIGNED: tl.constexpr, DTYPE: tl.constexpr,
                   CHUNK: tl.constexpr):
    """(typed pointer to the first element of this program's chunk, elements in the chunk)."""
    pid = tl.program_id(0)
    tensor = tl.load(table_ptr + 2 * n_tensors + pid)
    chunk = tl.load(table_ptr + 2 * n_tensors + n_programs + pid)
    base = tl.load(table_ptr + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # on the pointer, not the integer: the alignment analysis does not see through the cast
        base = tl.multiple_of(base, 16)
    begin = chunk * CHUNK
    size = tl.minimum(tl.load(table_ptr + n_tensors + tensor) - begin, CHUNK)
    return base + begin, size


# p_bits is 1 for p = 5e-324: Triton would pass that 1 as a constant Python int, which has no .to(),
# and bits below 2**31 (p < 1.1e-314) come as an int32
@triton.jit(do_not_specialize=["p_bits"])
def _pow_sum_chunks_kernel(
    table_ptr,      # int64 [2 * n_tensors + 2 * n_programs]: addresses, numels, tensor and chunk per program
    partials_ptr,   # ACC [n_programs]: one partial per program
    n_tensors,      # tensors in the table
    n_programs,     # programs launched (chunks)
    p_bits,         # int64: IEEE-754 bits of p as a double (used when KIND == 3; a float
                    # argument would be passed as float32)
    KIND: tl.constexpr,     # 0: p = 2, 1: p = 1, 2: p = inf, 3: any other p
    DTYPE: tl.constexpr,    # element type of every tensor
    ACC: tl.constexpr,      # tl.float32, or tl.float64 for float64 data
    BITS: tl.constexpr,     # integer type as wide as ACC (inf norm)
    ALIGNED: tl.constexpr,  # every address 16-byte aligned
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    x_ptr, size = _program_chunk(table_ptr, n_tensors, n_programs, ALIGNED, DTYPE, CHUNK)
    if KIND == 2:
        total = tl.zeros([BLOCK], BITS)
    else:
        total = tl.zeros([BLOCK], ACC)
    for tile in range(0, tl.cdiv(size, BLOCK)):
        start = tile * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        if start + BLOCK <= size:
            x = tl.load(x_ptr + offsets)
        else:
            x = tl.load(x_ptr + offsets, mask=offsets < size, other=0.0)
        a = tl.abs(x.to(ACC))
        if KIND == 0:
            total += a * a
        elif KIND == 1:
            total += a
        elif KIND == 2:
            total = tl.maximum(total, a.to(BITS, bitcast=True))
        else:
            a64 = a.to(tl.float64)
            # log2 of 1 where |x| = 0: 0^p = 0 for p > 0, without evaluating log2(0)
            p = p_bits.to(tl.int64).to(tl.float64, bitcast=True)  # an int32 when p's bits fit in one
            power = tl.exp2(p * tl.log2(tl.where(a64 == 0, 1.0, a64)))
            total += tl.where(a64 == 0, 0.0, power).to(ACC)
    if KIND == 2:
        partial = tl.max(total, 0).to(ACC, bitcast=True)
    else:
        partial = tl.sum(total, 0)
    tl.store(partials_ptr + tl.program_id(0), partial)


@triton.jit
def _combine_partials_kernel(
    partials_ptr,   # ACC [n_partials]
    out_ptr,        # ACC [] the result
    n_partials,     # partials to combine
    IS_MAX: tl.constexpr,   # max over the bits of non-negative partials (inf norm), else sum
    ACC: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if IS_MAX:
        total = tl.zeros([BLOCK], BITS)
    else:
        total = tl.zeros([BLOCK], ACC)
    for start in range(0, n_partials, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        part = tl.load(partials_ptr + offsets, mask=offsets < n_partials, other=0.0)
        if IS_MAX:
            total = tl.maximum(total, part.to(BITS, bitcast=True))
        else:
            total += part
    if IS_MAX:
        result = tl.max(total, 0).to(ACC, bitcast=True)
    else:
        result = tl.sum(total, 0)
    tl.store(out_ptr, result)


@triton.jit
def _scale_kernel(
    table_ptr,      # int64 [2 * n_tensors + 2 * n_programs]: as _pow_sum_chunks_kernel
    scale_ptr,      # ACC [1]: the factor, read on the device
    n_tensors,      # tensors in the table
    n_programs,     # programs launched (chunks)
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    ALIGNED: tl.constexpr,
    BF16_ROUND_BY_BITS: tl.constexpr,  # bfloat16 rounded by float32_to_bfloat16_rne
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    x_ptr, size = _program_chunk(table_ptr, n_tensors, n_programs, ALIGNED, DTYPE, CHUNK)
    scale = tl.load(scale_ptr)
    n_tiles = tl.where(scale == 1.0, 0, tl.cdiv(size, BLOCK))  # x * 1 == x: touch nothing
    for tile in range(0, n_tiles):
        start = tile * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        full = start + BLOCK <= size
        if full:
            x = tl.load(x_ptr + offsets)
        else:
            x = tl.load(x_ptr + offsets, mask=offsets < size, other=0.0)
        y = x.to(ACC) * scale
        if BF16_ROUND_BY_BITS:
            y = float32_to_bfloat16_rne(y)
        else:
            y = y.to(DTYPE)
        if full:
            tl.store(x_ptr + offsets, y)
        else:
            tl.store(x_ptr + offsets, y, mask=offsets < size)


# ----------------------------------------------------------------------------- host side


_tables: collections.OrderedDict = collections.OrderedDict()


def _pointer_table(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, int, bool]:
    """(table, programs, all 16-byte aligned) for non-empty dense tensors of one device, from the
    cache when these addresses and sizes were seen before."""
    addresses = tuple(t.data_ptr() for t in tensors)
    numels = tuple(t.numel() for t in tensors)
    device = tensors[0].device
    key = (device, addresses, numels)
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
    else:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fusedreg clip (triton): a new set of tensors during CUDA graph capture; call it once "
                "with the same tensors before capturing, so that its pointer table is cached")
        chunks = [math.ceil(n / _CHUNK) for n in numels]
        program_tensor = [i for i, c in enumerate(chunks) for _ in range(c)]
        program_chunk = [k for c in chunks for k in range(c)]
        host = torch.tensor(list(addresses) + list(numels) + program_tensor + program_chunk, dtype=torch.int64)
        if device.type == "cuda":
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
        _tables[key] = table
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    aligned = all(a % 16 == 0 for a in addresses)
    return table, (table.numel() - 2 * len(tensors)) // 2, aligned


def _check_list(tensors: list[torch.Tensor], op: str) -> None:
    if len(tensors) == 0:
        raise ValueError(f"{op} (triton): tensors must be a non-empty list of tensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.device != first.device:
            raise ValueError(f"{op} (triton): tensors[{i}] is on {t.device}, but tensors[0] is on "
                             f"{first.device}; all must share one device")
        if t.dtype != first.dtype:
            raise ValueError(f"{op} (triton): tensors[{i}] has dtype {t.dtype}, but tensors[0] has "
                             f"{first.dtype}; all must share one dtype")
    if first.dtype not in _TL_DTYPES:
        raise TypeError(f"{op} (triton): tensors must have a floating-point dtype, got {first.dtype}")
    if first.device.type == "cpu" and not _common.cpu_tensors_allowed():
        raise RuntimeError(f"{op} (triton): CPU tensors need the Triton interpreter "
                           "(TRITON_INTERPRET=1 set before fusedreg.triton is imported)")


def _double_bits(value: float) -> int:
    return struct.unpack("q", struct.pack("d", float(value)))[0]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@registered_as("grad_norm_pow_triton")
def grad_norm_pow(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Returns a 0-dim tensor on the tensors' device, float32 (float64 for float64 tensors): the sum
    of |x|^norm_type over all elements of all tensors (max |x| for inf; 0 without elements).
    tensors: non-empty, one device and floating dtype; non-dense ones are read through a contiguous
    copy. Mutates nothing; no host sync; bitwise deterministic."""
    _check_list(tensors, "grad_norm_pow")
    if not norm_type > 0:
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    first = tensors[0]
    acc = _acc_dtype(first.dtype)
    out = torch.empty((), dtype=acc, device=first.device)
    dense = [t if is_dense(t) else t.contiguous() for t in tensors if t.numel()]
    if not dense:
        return out.zero_()
    kind = (_KIND_INF if math.isinf(norm_type) else _KIND_L2 if norm_type == 2.0
            else _KIND_L1 if norm_type == 1.0 else _KIND_P)
    table, programs, aligned = _pointer_table(dense)
    partials = torch.empty(programs, dtype=acc, device=first.device)
    acc_tl, bits_tl = (tl.float64, tl.int64) if acc == torch.float64 else (tl.float32, tl.int32)
    with _device_context(first.device):
        _pow_sum_chunks_kernel[(programs,)](
            table, partials, len(dense), programs, _double_bits(norm_type if kind == _KIND_P else 2.0),
            KIND=kind, DTYPE=_TL_DTYPES[first.dtype], ACC=acc_tl, BITS=bits_tl, ALIGNED=aligned,
            CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        _combine_partials_kernel[(1,)](
            partials, out, programs, IS_MAX=kind == _KIND_INF, ACC=acc_tl, BITS=bits_tl,
            BLOCK=_COMBINE_BLOCK, num_warps=4)
    return out


@registered_as("multi_tensor_scale__triton")
def multi_tensor_scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """x = x * scale for every tensor, in float32 (float64 for float64 tensors) rounded once.
    tensors: non-empty, one device and floating dtype; scale: one float32 or float64 element on
    their device, read by the kernel (no host sync). Mutates the tensors (dense ones in one launch,
    others through a temporary); returns nothing."""
    _check_list(tensors, "multi_tensor_scale_")
    first = tensors[0]
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"scale must be a float32 or float64 tensor of one element, got "
                         f"{getattr(scale, 'dtype', type(scale))} {tuple(getattr(scale, 'shape', ()))}")
    if scale.device != first.device:
        raise ValueError(f"scale must be on {first.device}, got {scale.device}")
    acc = _acc_dtype(first.dtype)
    scale = scale.reshape(1).to(acc)
    dense = []
    for t in tensors:
        if t.numel() == 0:
            continue
        if is_dense(t):
            dense.append(t)
        else:
            t.copy_(t.to(acc) * scale)
    if not dense:
        return
    table, programs, aligned = _pointer_table(dense)
    with _device_context(first.device):
        _scale_kernel[(programs,)](
            table, scale, len(dense), programs,
            DTYPE=_TL_DTYPES[first.dtype], ACC=tl.float64 if acc == torch.float64 else tl.float32,
            ALIGNED=aligned,
            # The interpreter's float32 -> bfloat16 cast truncates; compiled kernels round to
            # nearest even in hardware, as torch does.
            BF16_ROUND_BY_BITS=first.dtype == torch.bfloat16 and interpreted(),
            CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
