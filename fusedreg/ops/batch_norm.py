"""Fused BatchNorm: F.batch_norm's contract over the fusedreg::batch_norm_* kernels.

Training forward is one fused op (statistics + normalize + affine + running-stat update in place);
eval forward is one elementwise pass with the statistics from the running buffers: batch_norm_elemt
fed eval_stats' [C] statistics, or on CPU one batch_norm_fwd call that computes the same bits itself
(from Python, eval_stats' three small ops cost ~40 us a call on the 2-core VM when a large op has
just evicted the caches). A call that autograd
would not record (no_grad, or nothing requiring a gradient) runs the ops directly, without the
autograd Function's host cost. Backward is one fused op giving grad_input, grad_weight and
grad_bias (only its reductions, batch_norm_bwd_reduce, when the input needs no gradient). Eval
mode whose weight and bias need no gradient (frozen BatchNorm when fine-tuning, or affine=False)
has constant statistics and nothing to reduce: grad_input = dy * invstd * weight is
batch_norm_elemt over dy with a zero mean, one elementwise pass (read dy, write dx: 2 B/elem in
units of itemsize, against 3 for the reductions' path), and forward keeps no activation for it,
only the [C] vectors.

Layout: kernels see an input that is non-overlapping and dense (a strided view is copied to
contiguous first, as torch's own SyncBatchNorm does) and an incoming gradient with exactly the
input's strides (copied into that layout when autograd hands over another one), so output and
grad_input keep the input's memory format (channels_last stays channels_last) and a kernel only
ever walks one layout per call.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from .._layout import is_dense
from ..reference import batch_norm as reference
from ._dispatch import kernel

__all__ = ["BatchNormFunction", "batch_norm"]

_COMPILE_MISROUTES_ALIASED_OUTPUTS = torch.__version__ < (2, 12)


def stats_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype of every [C] statistic of `input`: float64 for float64 data, else float32."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def dense(input: torch.Tensor) -> torch.Tensor:
    """`input` itself when non-overlapping and dense (any dim order), else a contiguous copy."""
    return input if is_dense(input) else input.contiguous()


def in_strides(grad: torch.Tensor, shape: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
    """`grad` with the given (dense) strides: a copy only when autograd handed over another
    layout (e.g. a contiguous grad for a channels_last output)."""
    if grad.stride() == stride and grad.shape == shape:  # the common case, without the loop below
        return grad
    # strides of size-1 dimensions are arbitrary and never change which element lives where
    if grad.shape == shape and all(sa == sb for n, sa, sb in zip(shape, grad.stride(), stride)
                                   if n != 1):
        return grad
    return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def in_layout(grad: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """`grad` with the strides of the (dense) `input`."""
    return in_strides(grad, input.shape, input.stride())


def eval_stats(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) in `dtype` from the running buffers, as batch_norm_fwd's eval branch.

    invstd is 1 / sqrt(running_var + eps), each op rounding as the out-of-place expression does,
    but in place on one fresh temporary: three small ops instead of four (`1 / t` is a reciprocal
    and a multiply by 1) and one allocation instead of four, about half the host time of an eval
    call's statistics. The running buffers are never written."""
    var = running_var if running_var.dtype == dtype else running_var.to(dtype)
    return running_mean.to(dtype), torch.add(var, eps).sqrt_().reciprocal_()


def forward_values(input, weight, bias, running_mean, running_var, training, momentum, eps, backend):
    """(output, mean, invstd) of the forward of a dense `input` on a resolved backend: the fused
    training op, or in eval the normalization (batch_norm_elemt) with eval_stats' statistics. The
    cpu library's batch_norm_fwd computes those statistics' bits itself, so a CPU eval call is one
    op: no host round trip per [C]-sized step."""
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    if training or backend == "cpu":
        return kernel("batch_norm_fwd", backend, reference)(
            input, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps))
    mean, invstd = eval_stats(running_mean, running_var, eps, stats_dtype(input))
    return kernel("batch_norm_elemt", backend, reference)(input, weight, bias, mean, invstd), mean, invstd


def needs_grad(input, weight, bias) -> bool:
    """Whether autograd would record the op: grad mode on and some differentiable input requiring
    a gradient. When not, the forward runs without the autograd Function (no graph node, no saved
    tensors: the host cost of an inference call is the kernel's)."""
    return torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


class BatchNormFunction(torch.autograd.Function):
    """apply(input, weight, bias, running_mean, running_var, training, momentum, eps, backend).

    input: (N, C, *); weight, bias, running_mean, running_var: [C] or None. training: normalize with
    the batch statistics and, when the running buffers are given, update them in place with
    `momentum` (a float: the caller turns momentum=None into 1 / num_batches_tracked); otherwise
    normalize with the running buffers (both required). Returns the output, laid out like the
    input. Differentiable in input, weight and bias; saves input, weight and the [C] statistics,
    and in eval mode with weight and bias needing no gradient only weight and invstd (backward is
    then dy * invstd * weight, independent of the input).
    No argument checks here beyond the kernels' own: fusedreg.batch_norm makes F.batch_norm's.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps,
                backend=None):
        backend = _backend.select(input.device, backend)
        if not is_dense(input):  # dense() inline: a call's frame is host time on every call
            input = input.contiguous()
        out, mean, invstd = forward_values(input, weight, bias, running_mean, running_var, training,
                                           momentum, eps, backend)
        ctx.frozen_eval = not training and not any(ctx.needs_input_grad[1:3])
        if ctx.frozen_eval:
            ctx.save_for_backward(None, weight, None, invstd)
            ctx.layout = (input.shape, input.stride())
        else:
            ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training, ctx.backend = bool(training), backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        if backend == "reference" and _COMPILE_MISROUTES_ALIASED_OUTPUTS:
            # torch 2.11's dynamo routes the gradient of an output that aliases a traced
            # intermediate to the wrong slot (pytorch#180642): the reference's eager output would
            # get a zero gradient under torch.compile. A fresh tensor has no alias.
            out = out.clone()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph: the result must refuse a second backward
            return _backward_once(ctx, grad_out)
        return _backward(ctx, grad_out)  # as once_differentiable, without its no_grad block


def _backward(ctx, grad_out):
    """BatchNormFunction's gradients, computed without recording (grad mode off)."""
    input, weight, mean, invstd = ctx.saved_tensors
    if ctx.frozen_eval:  # the statistics are constants: (dy - 0) * invstd * weight
        grad_out = in_strides(grad_out, *ctx.layout)
        grad_input = kernel("batch_norm_elemt", ctx.backend, reference)(
            grad_out, weight, None, torch.zeros_like(invstd), invstd)
        return grad_input, None, None, None, None, None, None, None, None
    if grad_out.stride() != input.stride():  # autograd checked the shape
        grad_out = in_layout(grad_out, input)
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    if needs_input:
        grad_input, grad_weight, grad_bias = kernel("batch_norm_bwd", ctx.backend, reference)(
            grad_out, input, weight, mean, invstd, ctx.training)
    else:  # parameters only: the reductions, without the pass that writes grad_input
        grad_input = None
        grad_bias, sum_dy_xmu = kernel("batch_norm_bwd_reduce", ctx.backend, reference)(
            grad_out, input, mean)
        grad_weight = sum_dy_xmu * invstd
    # [C] gradients in the parameters' dtypes (the kernels give the statistics dtype); the checks
    # spare a call of .to() each, which costs a dispatch even when it returns its input
    if weight is None or not needs_weight:
        grad_weight = None
    elif grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if ctx.bias_dtype is None or not needs_bias:
        grad_bias = None
    elif grad_bias.dtype != ctx.bias_dtype:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


_backward_once = once_differentiable(_backward)


def verify_batch_size(input: torch.Tensor) -> None:
    """F.batch_norm's training check: normalizing one value per channel gives 0/0."""
    size = input.size()
    count = size[0]
    for extent in size[2:]:
        count *= extent
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def check_args(input, running_mean, running_var, weight, bias, training, eps) -> None:
    """F.batch_norm's argument checks with its messages (and exception types).

    Written out check by check: every call runs them, and on a CPU whose caches a large op has just
    evicted, each loop or helper call costs microseconds of host time."""
    shape = input.shape
    if len(shape) < 2:
        raise RuntimeError(f"batch_norm expects an input of shape (N, C, *), got {tuple(shape)}")
    channels = shape[1]
    if training:
        if input.numel() == channels:  # one value per channel (or no channels): count them
            verify_batch_size(input)
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must either both be None or neither be None")
    else:
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        if running_var is None:
            raise RuntimeError("running_var must be defined in evaluation mode")
    if running_mean is not None and running_mean.numel() != channels:
        _wrong_size("running_mean", running_mean, channels)
    if running_var is not None and running_var.numel() != channels:
        _wrong_size("running_var", running_var, channels)
    if weight is not None and weight.numel() != channels:
        _wrong_size("weight", weight, channels)
    if bias is not None and bias.numel() != channels:
        _wrong_size("bias", bias, channels)


def _wrong_size(name: str, t: torch.Tensor, channels: int):
    raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """torch.nn.functional.batch_norm's contract (arguments, errors, running-stat update in place,
    biased variance to normalize, unbiased into running_var) computed by fused kernels.

    momentum=None means a cumulative average, as in the modules: it needs the batch count, passed
    as `num_batches_tracked` (an integer tensor, incremented here for this batch, as the modules'
    buffer is). Where no running statistics are updated, momentum is unused and None is fine."""
    updates_stats = training and running_mean is not None
    if momentum is None and updates_stats and num_batches_tracked is None:
        raise TypeError("batch_norm(): momentum=None (cumulative average) needs the batch count: "
                        "pass num_batches_tracked=<integer tensor>")
    check_args(input, running_mean, running_var, weight, bias, training, eps)
    if num_batches_tracked is not None and updates_stats:
        num_batches_tracked.add_(1)
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked) if updates_stats else 0.0
    if not needs_grad(input, weight, bias):
        if not is_dense(input):  # dense() inline, as in BatchNormFunction.forward
            input = input.contiguous()
        return forward_values(input, weight, bias, running_mean, running_var, bool(training), momentum,
                              eps, _backend.select(input.device, backend))[0]
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training),
                                   momentum, eps, backend)
