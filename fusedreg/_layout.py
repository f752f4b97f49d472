"""Memory-layout predicates shared by the Python layers."""
from __future__ import annotations

import torch


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly once, in
    some order of the dimensions (contiguous, channels_last, any permutation), so kernels may walk
    memory linearly. torch.empty_like keeps such a tensor's strides."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True
