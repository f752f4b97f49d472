"""BatchNorm in eager PyTorch: the definition behind `fusedreg::batch_norm_fwd` / `batch_norm_bwd`
and their pieces `batch_norm_stats`, `batch_norm_elemt`, `batch_norm_bwd_reduce`,
`batch_norm_bwd_elemt` (SyncBatchNorm combines statistics across processes between them; eval is
one `batch_norm_elemt` pass).

Channels are dimension 1 of an (N, C, *) input; statistics reduce over every other dimension,
n = numel / C values per channel.

Forward, training:
    mean   = sum(x) / n
    var    = sum((x - mean)^2) / n       two passes: no cancellation, unlike E[x^2] - E[x]^2
    invstd = 1 / sqrt(var + eps)
    y      = (x - mean) * invstd * weight + bias
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * sum((x - mean)^2) / (n - 1)
Forward, eval: the same normalization with
    mean = running_mean,  invstd = 1 / sqrt(running_var + eps).
`momentum` has F.batch_norm's meaning; the cumulative average (momentum=None) is the caller passing
1 / num_batches_tracked.

Backward, with x_hat = (x - mean) * invstd, grad_bias = sum(dy), grad_weight = sum(dy * x_hat):
    training:  dx = weight * invstd * (dy - grad_bias / n - x_hat * grad_weight / n)
    eval:      dx = weight * invstd * dy          (the statistics are constants)

Pieces, with sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (x - mean)) (batch_norm_bwd_reduce):
    batch_norm_stats      (mean, sum((x - mean)^2) / n)               biased variance
    batch_norm_elemt      (x - mean) * invstd * weight + bias
    batch_norm_bwd_elemt  (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
                          with mean_dy = sum_dy / n, mean_dy_xmu = sum_dy_xmu / n over the global n;
    grad_bias = sum_dy and grad_weight = sum_dy_xmu * invstd, so fwd/bwd = the pieces on one process.

Numerics: all arithmetic in the statistics dtype, float32 (float64 for float64 inputs); outputs
rounded once to the input's dtype and laid out like torch.empty_like(input), so channels_last stays
channels_last. Every [C] result (mean, invstd, variance, sums, grad_weight, grad_bias) is in the
statistics dtype, as the schemas fix.
A missing weight or bias acts as 1 or 0. The output is computed as (x - mean) * invstd * weight +
bias rather than PyTorch's x * scale + shift, which loses less to cancellation when |mean| >> std.
An empty batch in training leaves the running statistics as they are and reports
mean = invstd = 0; batch_norm_stats of an empty batch is (0, 0).
"""
from __future__ import annotations

import torch

__all__ = ["batch_norm_fwd", "batch_norm_bwd", "batch_norm_stats", "batch_norm_elemt",
           "batch_norm_bwd_reduce", "batch_norm_bwd_elemt"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reduce_dims(input: torch.Tensor) -> list[int]:
    if input.dim() < 2:
        raise ValueError("batch_norm expects an input of shape (N, C, *), "
                         f"got {tuple(input.shape)}")
    return [0] + list(range(2, input.dim()))


def _per_channel(t: torch.Tensor | None, input: torch.Tensor, dtype: torch.dtype):
    """A [C] tensor shaped to broadcast against `input` along dimension 1."""
    if t is None:
        return None
    return t.to(dtype).reshape([1, -1] + [1] * (input.dim() - 2))


def _like_input(value: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(input).copy_(value)


@torch.no_grad()
def batch_norm_fwd(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   training: bool, momentum: float, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (output, mean, invstd); updates running_mean/running_var in place in training."""
    dims = _reduce_dims(input)
    dtype = _compute_dtype(input)
    x = input.to(dtype)
    n = input.numel() // input.shape[1] if input.shape[1] else 0

    if training and n == 0:
        # nothing to learn from: running stats stay, the (unused) statistics are reported as zeros
        mean, invstd = x.new_zeros(input.shape[1]), x.new_zeros(input.shape[1])
    elif training:
        if n == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
        mean = x.mean(dims)
        sum_sq_dev = (x - _per_channel(mean, x, dtype)).square().sum(dims)
        var = sum_sq_dev / n
        if running_mean is not None:
            running_mean.copy_((1 - momentum) * running_mean.to(dtype) + momentum * mean)
        if running_var is not None:
            unbiased_var = sum_sq_dev / (n - 1)
            running_var.copy_((1 - momentum) * running_var.to(dtype) + momentum * unbiased_var)
        invstd = 1 / torch.sqrt(var + eps)
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        mean = running_mean.to(dtype)
        invstd = 1 / torch.sqrt(running_var.to(dtype) + eps)

    y = (x - _per_channel(mean, x, dtype)) * _per_channel(invstd, x, dtype)
    if weight is not None:
        y = y * _per_channel(weight, x, dtype)
    if bias is not None:
        y = y + _per_channel(bias, x, dtype)
    return _like_input(y, input), mean, invstd


@torch.no_grad()
def batch_norm_bwd(grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                   mean: torch.Tensor, invstd: torch.Tensor, training: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input, grad_weight, grad_bias); the last two [C] in the statistics dtype."""
    dims = _reduce_dims(input)
    dtype = _compute_dtype(input)
    x, dy = input.to(dtype), grad_out.to(dtype)
    n = input.numel() // input.shape[1] if input.shape[1] else 0
    invstd_b = _per_channel(invstd, x, dtype)

    x_hat = (x - _per_channel(mean, x, dtype)) * invstd_b
    grad_bias = dy.sum(dims)
    grad_weight = (dy * x_hat).sum(dims)

    scale = invstd_b if weight is None else invstd_b * _per_channel(weight, x, dtype)
    if training and n > 0:
        dy = (dy - _per_channel(grad_bias / n, x, dtype)
              - x_hat * _per_channel(grad_weight / n, x, dtype))
    return _like_input(dy * scale, input), grad_weight, grad_bias


def _count(input: torch.Tensor) -> int:
    return input.numel() // input.shape[1] if input.shape[1] else 0


@torch.no_grad()
def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean, biased variance), [C] in the statistics dtype; (0, 0) for an empty batch."""
    dims = _reduce_dims(input)
    dtype = _compute_dtype(input)
    if _count(input) == 0:
        zeros = input.new_zeros(input.shape[1], dtype=dtype)
        return zeros, zeros.clone()
    x = input.to(dtype)
    mean = x.mean(dims)
    var = (x - _per_channel(mean, x, dtype)).square().mean(dims)
    return mean, var


@torch.no_grad()
def batch_norm_elemt(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """(input - mean) * invstd * weight + bias, laid out as empty_like(input)."""
    _reduce_dims(input)
    dtype = _compute_dtype(input)
    x = input.to(dtype)
    y = (x - _per_channel(mean, x, dtype)) * _per_channel(invstd, x, dtype)
    if weight is not None:
        y = y * _per_channel(weight, x, dtype)
    if bias is not None:
        y = y + _per_channel(bias, x, dtype)
    return _like_input(y, input)


@torch.no_grad()
def batch_norm_bwd_reduce(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (sum(grad_out), sum(grad_out * (input - mean))), [C] in the statistics dtype."""
    dims = _reduce_dims(input)
    dtype = _compute_dtype(input)
    x, dy = input.to(dtype), grad_out.to(dtype)
    return dy.sum(dims), (dy * (x - _per_channel(mean, x, dtype))).sum(dims)


@torch.no_grad()
def batch_norm_bwd_elemt(grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                         mean: torch.Tensor, invstd: torch.Tensor, mean_dy: torch.Tensor,
                         mean_dy_xmu: torch.Tensor) -> torch.Tensor:
    """grad_input from the (possibly all-reduced) sums of batch_norm_bwd_reduce already divided by
    the global count; laid out as empty_like(input)."""
    _reduce_dims(input)
    dtype = _compute_dtype(input)
    x, dy = input.to(dtype), grad_out.to(dtype)
    invstd_b = _per_channel(invstd, x, dtype)
    dx = (dy - _per_channel(mean_dy, x, dtype)
          - (x - _per_channel(mean, x, dtype)) * invstd_b.square() * _per_channel(mean_dy_xmu, x, dtype))
    scale = invstd_b if weight is None else invstd_b * _per_channel(weight, x, dtype)
    return _like_input(dx * scale, input)
