"""fusedreg.nn.BatchNorm1d/2d/3d: torch's BatchNorm modules computed by fusedreg's fused kernels.

Subclasses of the torch modules: same constructor (plus keyword-only `backend=`), parameters,
buffers, state_dict keys, repr and input checks, so torch checkpoints load both ways and
isinstance(m, torch.nn.BatchNorm2d) holds. Only forward differs, and only in what computes it.
"""
from __future__ import annotations

import inspect

import torch

from ..ops.batch_norm import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

# torch's BatchNorm modules take `bias=` from torch 2.12 on; on older torch the keyword is
# emulated: the torch constructor builds an affine module and the bias is dropped afterwards.
_TORCH_TAKES_BIAS = "bias" in inspect.signature(torch.nn.modules.batchnorm._NormBase.__init__).parameters


def torch_bias_kwargs(bias: bool) -> dict:
    """The `bias=` keyword for the torch BatchNorm constructor, where the running torch has it."""
    return {"bias": bias} if _TORCH_TAKES_BIAS else {}


def finish_bias(module: torch.nn.modules.batchnorm._NormBase, bias: bool) -> None:
    """After the torch constructor: drop the bias (as torch >= 2.12 does) when bias=False."""
    if not bias and module.affine and not _TORCH_TAKES_BIAS:
        module.register_parameter("bias", None)


def reset_bias_aware(module: torch.nn.modules.batchnorm._NormBase) -> None:
    """torch's reset_parameters, tolerating bias=None on torch versions without `bias=`."""
    module.reset_running_stats()
    if module.affine:
        torch.nn.init.ones_(module.weight)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def exponential_average_factor(module: torch.nn.modules.batchnorm._BatchNorm) -> float:
    """torch's _BatchNorm.forward rule, counting this batch: momentum, or with momentum=None the
    cumulative average 1 / num_batches_tracked. Increments num_batches_tracked in training."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            factor = 1.0 / float(module.num_batches_tracked)
    return factor


def use_batch_stats(module: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    """Batch statistics in training, and in eval when there are no running buffers."""
    return module.training or (module.running_mean is None and module.running_var is None)


def running_buffers(module: torch.nn.modules.batchnorm._BatchNorm):
    """The buffers to update (training) or normalize with (eval); none in training untracked."""
    if module.training and not module.track_running_stats:
        return None, None
    return module.running_mean, module.running_var


class _FusedBatchNorm:
    """The forward shared by BatchNorm1d/2d/3d; mixed in before the torch class."""

    def _init_fused(self, bias: bool, backend: str | None) -> None:
        finish_bias(self, bias)
        self.backend = backend

    def reset_parameters(self) -> None:
        reset_bias_aware(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = exponential_average_factor(self)
        running_mean, running_var = running_buffers(self)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                          use_batch_stats(self), factor, self.eps, backend=self.backend)


class BatchNorm1d(_FusedBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d (input (N, C) or (N, C, L)) on fusedreg's kernels."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, backend: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **torch_bias_kwargs(bias))
        self._init_fused(bias, backend)


class BatchNorm2d(_FusedBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (input (N, C, H, W), NCHW or channels_last) on fusedreg's kernels."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, backend: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **torch_bias_kwargs(bias))
        self._init_fused(bias, backend)


class BatchNorm3d(_FusedBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d (input (N, C, D, H, W), NCDHW or channels_last_3d) on fusedreg's
    kernels."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, backend: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **torch_bias_kwargs(bias))
        self._init_fused(bias, backend)
