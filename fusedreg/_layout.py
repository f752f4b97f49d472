"""Memory-layout predicates shared by the Python layers."""
from __future__ import annotations

import torch


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly once, in
    some order of the dimensions (contiguous, channels_last, any permutation), so kernels may walk
    memory linearly. torch.empty_like keeps such a tensor's strides."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True  # the common case without the loop below (host time matters per call)
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal sizes, and every element at the same memory offset: strides agree on each dimension of
    size > 1. A size-1 dimension's index is always 0, so torch leaves its stride arbitrary
    (AccumulateGrad keeps a contiguous grad of strides (1, 1) for a (1, 8) parameter of strides
    (8, 1)); such tensors walk memory alike. The same rule as same_layout in csrc/common/checks.h."""
    if a.shape != b.shape:
        return False
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for n, x, y in zip(a.shape, sa, sb) if n != 1)
