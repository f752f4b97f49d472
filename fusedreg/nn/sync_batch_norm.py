"""fusedreg.nn.SyncBatchNorm: batch statistics over every process of a torch.distributed group.

Forward: local (mean, biased var) per channel (batch_norm_stats) -> all-gather (count, mean, var)
from every rank -> count-weighted combination on every rank (ranks may hold unequal batches, empty
ones included) with Chan's parallel variance formula
    mean = sum_r n_r mean_r / n,   var = (sum_r n_r var_r + sum_r n_r (mean_r - mean)^2) / n
(each rank's squared deviations are taken about its own mean, so nothing cancels the way
E[x^2] - E[x]^2 does) -> running stats updated with the unbiased var * n / (n - 1) of the global
count -> batch_norm_elemt.
Backward: local (sum dy, sum dy * (x - mean)) (batch_norm_bwd_reduce) -> all-reduce -> divided by
the global count -> batch_norm_bwd_elemt. grad_weight / grad_bias are the *local* sums, as torch's
SyncBatchNorm returns them: DistributedDataParallel all-reduces parameter gradients itself.

All counts stay on the device: no host synchronization in forward or backward. The collectives move
(2C + 1) and 2C statistics values per rank; the elementwise passes are the same kernels as eval's.
Not training, no process group, or a group of one process: exactly fusedreg.nn.BatchNorm*d.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import torch.distributed as dist

from .. import _backend
from ..ops._dispatch import kernel
from ..ops.batch_norm import batch_norm, dense, in_layout, stats_dtype
from ..reference import batch_norm as reference
from .batch_norm import (exponential_average_factor, finish_bias, reset_bias_aware, running_buffers,
                         torch_bias_kwargs, use_batch_stats)

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction"]


def _all_gather_rows(row: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[world_size, len(row)]: every rank's `row`, in rank order."""
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        rows = [torch.empty_like(row) for _ in range(world_size)]
        dist.all_gather(rows, row, group)
        return torch.stack(rows)
    gathered = row.new_empty(world_size * row.numel())
    dist.all_gather_into_tensor(gathered, row, group)
    return gathered.view(world_size, row.numel())


def combine_stats(mean_all: torch.Tensor, var_all: torch.Tensor, count_all: torch.Tensor):
    """Global (mean, biased var, count) from per-rank [R, C] means / biased variances and [R, 1]
    counts; ranks with count 0 weigh nothing. count is a [1] tensor (0 when every rank is empty,
    with mean = var = 0 then)."""
    count = count_all.sum(0)
    weights = count_all / count.clamp(min=1)
    mean = (weights * mean_all).sum(0)
    var = (weights * (var_all + (mean_all - mean).square())).sum(0)
    return mean, var, count


def update_running_stats(running_mean, running_var, mean, var, count, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance of the
    global count; nothing changes when the global batch is empty (as the local kernels do)."""
    factor = momentum * (count > 0).to(mean.dtype)
    unbiased = var * count / (count - 1).clamp(min=1)
    if running_mean is not None:
        running_mean.copy_(torch.lerp(running_mean.to(mean.dtype), mean, factor))
    if running_var is not None:
        running_var.copy_(torch.lerp(running_var.to(var.dtype), unbiased, factor))


class SyncBatchNormFunction(torch.autograd.Function):
    """apply(input, weight, bias, running_mean, running_var, eps, momentum, group, world_size,
    backend): training-mode BatchNorm with statistics over `group`. Updates the running buffers in
    place; returns the output laid out like the input. grad_weight / grad_bias are local sums."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, group, world_size,
                backend=None):
        backend = _backend.select(input.device, backend)
        input = dense(input)
        dtype = stats_dtype(input)
        local_count = input.numel() // input.shape[1]
        if local_count > 0:
            mean, var = kernel("batch_norm_stats", backend, reference)(input)
        else:  # an empty rank still joins the collective, with weight 0
            mean = var = input.new_zeros(input.shape[1], dtype=dtype)
        row = torch.cat([mean, var, mean.new_full((1,), local_count)])
        gathered = _all_gather_rows(row, group, world_size)
        channels = input.shape[1]
        mean, var, count = combine_stats(gathered[:, :channels], gathered[:, channels:2 * channels],
                                         gathered[:, 2 * channels:])
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        invstd = 1 / torch.sqrt(var + eps)
        if local_count > 0:
            out = kernel("batch_norm_elemt", backend, reference)(input, weight, bias, mean, invstd)
        else:
            out = torch.empty_like(input)
        ctx.save_for_backward(input, weight, mean, invstd, count)
        ctx.group, ctx.backend = group, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, mean, invstd, count = ctx.saved_tensors
        channels = input.shape[1]
        if input.numel() > 0:
            grad_out = in_layout(grad_out, input)
            sum_dy, sum_dy_xmu = kernel("batch_norm_bwd_reduce", ctx.backend, reference)(
                grad_out, input, mean)
        else:
            sum_dy, sum_dy_xmu = mean.new_zeros(channels), mean.new_zeros(channels)
        grad_weight = sum_dy_xmu * invstd if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None

        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, dist.ReduceOp.SUM, ctx.group)
            sums = sums / count.clamp(min=1)
            if input.numel() > 0:
                grad_input = kernel("batch_norm_bwd_elemt", ctx.backend, reference)(
                    grad_out, input, weight, mean, invstd, sums[:channels], sums[channels:])
            else:
                grad_input = torch.empty_like(input)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on fusedreg's kernels (any device torch.distributed serves, CPU with
    gloo included); same constructor plus keyword-only `backend=`, same state_dict and repr."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True, backend: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device, dtype, **torch_bias_kwargs(bias))
        finish_bias(self, bias)
        self.backend = backend

    def reset_parameters(self) -> None:
        reset_bias_aware(self)

    def _sync_group(self):
        """(group, world_size) when statistics must be synchronized, else None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = exponential_average_factor(self)
        running_mean, running_var = running_buffers(self)
        sync = self._sync_group() if use_batch_stats(self) else None
        if sync is None:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                              use_batch_stats(self), factor, self.eps, backend=self.backend)
        if self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        group, world_size = sync
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                           self.eps, factor, group, world_size, self.backend)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None, *,
                               backend: str | None = None) -> torch.nn.Module:
        """Every BatchNorm*d (torch's, fusedreg's, and torch's SyncBatchNorm) in `module` replaced
        by a fusedreg SyncBatchNorm sharing its parameters and buffers, as torch's classmethod does;
        a BatchNorm `module` itself comes back as a new object. `backend` defaults to the converted
        module's own (fusedreg modules) or automatic selection."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            output = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group, bias=module.bias is not None,
                         backend=backend if backend is not None else getattr(module, "backend", None))
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group, backend=backend))
        del module
        return output
