"""Fused dropout: mask generation and inverted scaling in one pass; backward regenerates the mask.

Nothing per element is saved for backward, only the seed (an int64 tensor of one element drawn
from torch's generator on the input's device: reproducible under torch.manual_seed, fresh on every
call, and redrawn on every CUDA-graph replay because the kernels read it from memory).
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import dropout as reference
from ._dispatch import kernel

__all__ = ["DropoutFunction", "DropoutAddFunction", "dropout", "dropout_add", "draw_seed"]


def _check_p(p: float) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise TypeError(f"dropout probability p must be a float, got {type(p).__name__}")
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


_SEED_HIGH = 2**63 - 1  # out-of-place randint (traceable by torch.compile) over the int64 range


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit seed from torch's generator for `device`, as an int64 tensor [1] on it."""
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)


def _in_layout(grad: torch.Tensor, shape, stride) -> torch.Tensor:
    """The mask follows the forward output's memory order: give backward grads in that layout."""
    if grad.stride() == stride:
        return grad
    return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


class DropoutFunction(torch.autograd.Function):
    """y = x * keep / (1 - p). apply(input, p, seed, backend, inplace); saves only `seed`.

    seed: int64 tensor [1] on input's device (None: drawn from torch's default generator);
    backend: a name or None for the selection rules of fusedreg.backends.
    """

    @staticmethod
    def forward(ctx, input, p=0.5, seed=None, backend=None, inplace=False):
        p = _check_p(p)
        backend = _backend.select(input.device, backend)
        seed = draw_seed(input.device) if seed is None else seed
        if inplace:
            kernel("dropout_fwd_", backend, reference)(input, seed, p)
            ctx.mark_dirty(input)
            out = input
        else:
            out = kernel("dropout_fwd", backend, reference)(input, seed, p)
        ctx.save_for_backward(seed)
        ctx.p, ctx.backend, ctx.layout = p, backend, (out.shape, out.stride())
        return out

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        grad = _in_layout(grad, *ctx.layout)
        return kernel("dropout_bwd", ctx.backend, reference)(grad, seed, ctx.p), None, None, None, None


class DropoutAddFunction(torch.autograd.Function):
    """residual + dropout(input + bias) in one pass. apply(input, residual, bias, p, seed, backend)."""

    @staticmethod
    def forward(ctx, input, residual, bias, p, seed, backend):
        p = _check_p(p)
        backend = _backend.select(input.device, backend)
        out = kernel("dropout_add_fwd", backend, reference)(input, residual, bias, seed, p)
        ctx.save_for_backward(seed)
        ctx.p, ctx.backend, ctx.layout = p, backend, (out.shape, out.stride())
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        grad = _in_layout(grad, *ctx.layout)
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            grad_input = kernel("dropout_bwd", ctx.backend, reference)(grad, seed, ctx.p)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_input.reshape(-1, grad_input.shape[-1]).sum(0, dtype=torch.float32)
            grad_bias = grad_bias.to(grad.dtype)
        return grad_input, grad, grad_bias, None, None, None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    """torch.nn.functional.dropout's contract, computed by a fused kernel that keeps no mask."""
    p = _check_p(p)
    if not training:
        return input
    seed = draw_seed(input.device, generator)
    return DropoutFunction.apply(input, p, seed, backend, inplace)


def dropout_add(input: torch.Tensor, residual: torch.Tensor, p: float = 0.5, training: bool = True, *,
                bias: torch.Tensor | None = None, generator: torch.Generator | None = None,
                backend: str | None = None) -> torch.Tensor:
    """residual + dropout(input + bias, p) in one pass (the transformer residual branch).

    input, residual and bias (shape [input.shape[-1]], optional) share dtype and device; the result
    is laid out like input. In eval (training=False) it is residual + input + bias.
    """
    p = _check_p(p)
    if not training:
        return residual + (input if bias is None else input + bias)
    seed = draw_seed(input.device, generator)
    return DropoutAddFunction.apply(input, residual, bias, p, seed, backend)
