"""Triton kernel of fusedreg::_philox4x32_triton: Triton's own tl.philox on rows of (counter, key).

It is the ground truth the shared dropout layout (csrc/common/philox.h) is pinned to: tests compare
it word for word with the eager reference and with the C++ header on CPU and CUDA, so a drift in
any of them, or in Triton's generator, shows up as a failing self-test rather than as dropout masks
that differ between backends.

tl.philox takes its key as one 64-bit seed (low word k0, high word k1). Passing a per-row block of
seeds gives every row its own key, so any (counter, key) test vector can be checked in one launch.

Contract: counter int64 [n, 4], key int64 [n, 2] on one device (CUDA, or CPU under
TRITON_INTERPRET=1); the low 32 bits of each element are a word. Returns int64 [n, 4] laid out as
torch.empty_like(counter), holding uint32 values.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _common
from ._common import registered_as

__all__ = ["philox4x32"]

_BLOCK_ROWS = 128


@triton.jit
def _philox4x32_kernel(
    counter_ptr,          # int64 [n, 4], strides (stride_counter_row, stride_counter_col)
    key_ptr,              # int64 [n, 2], strides (stride_key_row, stride_key_col)
    out_ptr,              # int64 [n, 4], strides (stride_out_row, stride_out_col)
    n_rows,               # n
    stride_counter_row,   # elements between rows of counter
    stride_counter_col,   # elements between words of a counter row
    stride_key_row,       # elements between rows of key
    stride_key_col,       # elements between words of a key row
    stride_out_row,       # elements between rows of out
    stride_out_col,       # elements between words of an out row
    BLOCK_ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_range = rows < n_rows
    counter_row = counter_ptr + rows * stride_counter_row
    key_row = key_ptr + rows * stride_key_row
    # Truncating int64 -> uint32 keeps the low word, the documented meaning of each element.
    c0 = tl.load(counter_row, mask=in_range, other=0).to(tl.uint32)
    c1 = tl.load(counter_row + stride_counter_col, mask=in_range, other=0).to(tl.uint32)
    c2 = tl.load(counter_row + 2 * stride_counter_col, mask=in_range, other=0).to(tl.uint32)
    c3 = tl.load(counter_row + 3 * stride_counter_col, mask=in_range, other=0).to(tl.uint32)
    k0 = tl.load(key_row, mask=in_range, other=0).to(tl.uint32).to(tl.uint64)
    k1 = tl.load(key_row + stride_key_col, mask=in_range, other=0).to(tl.uint32).to(tl.uint64)
    seed = (k1 << 32) | k0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    out_row = out_ptr + rows * stride_out_row
    # uint32 -> int64 zero-extends: words come back as values in [0, 2**32).
    tl.store(out_row, w0.to(tl.int64), mask=in_range)
    tl.store(out_row + stride_out_col, w1.to(tl.int64), mask=in_range)
    tl.store(out_row + 2 * stride_out_col, w2.to(tl.int64), mask=in_range)
    tl.store(out_row + 3 * stride_out_col, w3.to(tl.int64), mask=in_range)


def _check_args(counter: torch.Tensor, key: torch.Tensor) -> None:
    if counter.dim() != 2 or counter.shape[1] != 4:
        raise ValueError(f"_philox4x32_triton: counter must have shape [n, 4], got {tuple(counter.shape)}")
    if key.dim() != 2 or key.shape[1] != 2:
        raise ValueError(f"_philox4x32_triton: key must have shape [n, 2], got {tuple(key.shape)}")
    if key.shape[0] != counter.shape[0]:
        raise ValueError(f"_philox4x32_triton: key must have as many rows as counter ({counter.shape[0]}), "
                         f"got {key.shape[0]}")
    for name, t in (("counter", counter), ("key", key)):
        if t.dtype != torch.int64:
            raise ValueError(f"_philox4x32_triton: {name} must be int64, got {t.dtype}")
    if key.device != counter.device:
        raise ValueError(f"_philox4x32_triton: key must be on counter's device ({counter.device}), "
                         f"got {key.device}")
    if counter.device.type == "cpu" and not _common.cpu_tensors_allowed():
        raise RuntimeError("_philox4x32_triton: CPU tensors need the Triton interpreter "
                           "(TRITON_INTERPRET=1 set before fusedreg.triton is imported)")


@registered_as("_philox4x32_triton")
def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of each row of counter under the matching row of key, by tl.philox."""
    _check_args(counter, key)
    out = torch.empty_like(counter)
    n = counter.shape[0]
    if n == 0:
        return out
    with torch.cuda.device(counter.device) if counter.is_cuda else contextlib.nullcontext():
        _philox4x32_kernel[(triton.cdiv(n, _BLOCK_ROWS),)](
            counter, key, out, n,
            counter.stride(0), counter.stride(1),
            key.stride(0), key.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_ROWS=_BLOCK_ROWS,
        )
    return out

