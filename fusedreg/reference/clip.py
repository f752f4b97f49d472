"""Global-norm gradient clipping in eager PyTorch: the definition behind `fusedreg::grad_norm_pow`
and `fusedreg::multi_tensor_scale_`, and the composition the public clip functions build from them.

    grad_norm_pow(tensors, p) = sum of |x|^p over all elements of all tensors  (max |x| if p = inf)
    total_norm(tensors, p)    = (sum over device/dtype groups of grad_norm_pow)^(1/p)
    clip_coef(total, max)     = min(max / (total + 1e-6), 1)                    as torch's clipping
    multi_tensor_scale_(tensors, c):  x *= c

Numerics: sums accumulate in float32 (float64 for float64 tensors) whatever the tensors' dtype, in a
fixed order (per tensor, then over tensors in list order), so the same inputs give the same bits.
Scaling multiplies in float32 (float64) and rounds once to the tensor's dtype.

Deliberate differences from torch.nn.utils.get_total_norm / clip_grad_norm_:
- PyTorch takes the p-norm of each tensor and then the p-norm of those norms; here the p-th powers
  are summed directly. Mathematically equal; rounding differs in the last bits.
- The total norm and the clip coefficient are float32 scalars (float64 when a tensor is float64)
  whatever the gradients' dtype (PyTorch returns them in the gradients' dtype, so bfloat16
  gradients get a bfloat16 norm; fusedreg.get_total_norm rounds to that dtype at the very end).
- Only norm types p > 0 and inf are supported (not 0 or -inf): these are the ones that are a sum
  or a max, which is what the fused kernels compute.
- An empty tensor contributes 0 to the inf norm (|x| >= 0, so 0 is the identity of the max),
  where PyTorch raises because a max over nothing has no identity in general.
Non-finite values propagate as in PyTorch: an inf gives an inf norm, a NaN a NaN norm, and
scaling by the resulting coefficient turns those gradients into NaN.
"""
from __future__ import annotations

import math

import torch

__all__ = ["grad_norm_pow", "multi_tensor_scale_", "total_norm", "clip_coef"]


def _accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    return norm_type


def _pow_sum(x: torch.Tensor, norm_type: float) -> torch.Tensor:
    x = x.to(_accumulate_dtype(x))
    if math.isinf(norm_type):
        return x.abs().amax() if x.numel() else x.new_zeros(())
    if norm_type == 2.0:
        return x.square().sum()
    if norm_type == 1.0:
        return x.abs().sum()
    return x.abs().pow(norm_type).sum()


@torch.no_grad()
def grad_norm_pow(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """sum(|x|^p) over all elements of all tensors (max |x| for p = inf): a float32 scalar
    (float64 for float64 tensors) on their device. tensors: non-empty, one device and dtype."""
    norm_type = _check_norm_type(norm_type)
    parts = torch.stack([_pow_sum(t, norm_type) for t in tensors])
    total = parts.amax() if math.isinf(norm_type) else parts.sum()
    return total.to(_accumulate_dtype(tensors[0]))


@torch.no_grad()
def multi_tensor_scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """x *= scale for every tensor, in float32 (float64 for float64) and rounded once."""
    for t in tensors:
        dtype = _accumulate_dtype(t)
        t.copy_(t.to(dtype) * scale.reshape(()).to(t.device, dtype))


@torch.no_grad()
def total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The p-norm of all tensors viewed as one vector: a float32 scalar (float64 when a tensor is
    float64) on the first tensor's device (tensor(0.) on the CPU for an empty list, as PyTorch)."""
    tensors = list(tensors)
    norm_type = _check_norm_type(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    first_device = tensors[0].device
    parts = [grad_norm_pow(group, norm_type) for group in groups.values()]
    acc = torch.float64 if any(part.dtype == torch.float64 for part in parts) else torch.float32
    parts = torch.stack([part.to(first_device, acc) for part in parts])
    if math.isinf(norm_type):
        return parts.amax()
    if norm_type == 2.0:
        return parts.sum().sqrt()
    return parts.sum().pow(1.0 / norm_type)


def clip_coef(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor clip_grad_norm_ multiplies gradients by: max_norm / (total_norm + 1e-6),
    at most 1."""
    return torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
