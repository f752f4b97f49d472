"""Dropout in eager PyTorch: the definition every fusedreg dropout backend must match bit for bit.

y = x * keep * scale, keep regenerated from (seed, element index) by Philox4x32-10 with the layout
of csrc/common/philox.h (see fusedreg/reference/philox.py), scale = 1 / (1 - p) rounded to float.

Element index: the output is laid out as torch.empty_like(input) (an input that is non-overlapping
and dense keeps its strides, so channels_last stays channels_last; any other input gets the layout
torch suggests, usually contiguous), and element i is the i-th element of that output in MEMORY
order. Kernels then walk memory linearly, whatever the logical shape. The backward pass must
therefore see the gradient in the forward output's layout to regenerate the same mask.

Numerics: the product is formed in fp32 for every floating dtype (fp64 for float64) and rounded once
to the input's dtype. Dropped elements are selected to 0 rather than multiplied by it, so a dropped
inf or NaN gives 0 and p == 1 gives exact zeros.
"""
from __future__ import annotations

import torch

from .philox import dropout_keep, dropout_scale

__all__ = ["dropout_fwd", "dropout_fwd_", "dropout_bwd", "dropout_add_fwd", "dropout_mask"]


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _seed_value(seed: torch.Tensor) -> int:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be an int64 tensor of one element, got "
                         f"{getattr(seed, 'dtype', type(seed))} {tuple(getattr(seed, 'shape', ()))}")
    return int(seed.item())


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(dense: torch.Tensor) -> torch.Tensor:
    """1-D view of a non-overlapping, dense tensor's elements in memory order."""
    return dense.as_strided((dense.numel(),), (1,))


def _in_output_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`'s values in a fresh tensor laid out as torch.empty_like(like) (same shape as like)."""
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _keep_flat(like: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    return dropout_keep(seed, like.numel(), p, like.device)


def _scaled(values: torch.Tensor, keep: torch.Tensor, p: float, math_dtype: torch.dtype) -> torch.Tensor:
    """keep ? values * scale : 0, in math_dtype (values already in math_dtype)."""
    if p == 1.0:
        return torch.zeros_like(values)
    scale = dropout_scale(p, math_dtype)
    return torch.where(keep, values * scale, torch.zeros((), dtype=math_dtype, device=values.device))


def dropout_mask(like: torch.Tensor, seed: torch.Tensor | int, p: float) -> torch.Tensor:
    """The bool keep mask of dropout of `like` (shape and layout of torch.empty_like(like))."""
    _check_p(p)
    seed = seed if isinstance(seed, int) else _seed_value(seed)
    mask = torch.empty_like(like, dtype=torch.bool)
    if mask.numel():
        _flat(mask).copy_(_keep_flat(like, seed, p))
    return mask


def dropout_fwd(input: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """input * keep / (1 - p) in input's dtype, laid out as torch.empty_like(input)."""
    _check_floating("input", input)
    _check_p(p)
    seed_value = _seed_value(seed)
    out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    math_dtype = _math_dtype(input.dtype)
    x = _flat(_in_output_layout(input, out)).to(math_dtype)
    _flat(out).copy_(_scaled(x, _keep_flat(out, seed_value, p), p, math_dtype))
    return out


def dropout_fwd_(input: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """In place; element indices as for dropout_fwd, so the result equals dropout_fwd's."""
    input.copy_(dropout_fwd(input, seed, p))


def dropout_bwd(grad: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """grad * keep / (1 - p): the forward's mask regenerated, given grad in the output's layout."""
    _check_floating("grad", grad)
    return dropout_fwd(grad, seed, p)


def dropout_add_fwd(input: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None,
                    seed: torch.Tensor, p: float) -> torch.Tensor:
    """residual + dropout(input + bias), both adds in fp32 and one rounding; bias [input.shape[-1]]
    broadcasts over the last dimension. Laid out (and masked) as dropout_fwd(input) would be."""
    _check_floating("input", input)
    _check_p(p)
    if residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != input.dtype or residual.device != input.device:
        raise ValueError(f"residual must match input's dtype and device ({input.dtype}, {input.device}), "
                         f"got {residual.dtype}, {residual.device}")
    if bias is not None:
        if input.dim() == 0 or bias.shape != input.shape[-1:]:
            raise ValueError(f"bias must have shape [input.shape[-1]] = {tuple(input.shape[-1:])}, "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != input.dtype or bias.device != input.device:
            raise ValueError(f"bias must match input's dtype and device ({input.dtype}, {input.device}), "
                             f"got {bias.dtype}, {bias.device}")
    seed_value = _seed_value(seed)
    out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    math_dtype = _math_dtype(input.dtype)
    x = input.to(math_dtype)
    if bias is not None:
        x = x + bias.to(math_dtype)
    x = _flat(_in_output_layout(x, out))
    r = _flat(_in_output_layout(residual, out)).to(math_dtype)
    _flat(out).copy_(r + _scaled(x, _keep_flat(out, seed_value, p), p, math_dtype))
    return out
