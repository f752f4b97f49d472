"""Operator schemas of the `fusedreg` torch.library namespace, and their fake (meta) kernels.

Every schema is defined here and only here. Each is defined twice from the same string:
  fusedreg::<op>          kernels come from the C++ libraries (TORCH_LIBRARY_IMPL CPU / CUDA)
  fusedreg::<op>_triton   kernels come from fusedreg/triton/<op>.py (registered when imported)
Both C++ libraries may be loaded in either order or not at all, so C++ defines no schema.
Fake kernels let torch.compile(fullgraph=True) trace the ops and torch.library.opcheck test them.

Conventions shared by every kernel behind these schemas:
- `seed` is an int64 tensor of one element on the input's device (drawn from torch's generator);
  kernels read it from memory, so CUDA-graph replays that redraw it get fresh masks.
- Outputs keep a non-overlapping-and-dense input's strides (channels_last stays channels_last) and
  are contiguous otherwise: exactly what torch.empty_like gives.
- Multi-tensor ops take lists that are non-empty and share one device and dtype (per list); the
  Python layer groups parameters before calling.
- Statistics and scalars computed on the device are float32, float64 when the data is float64.
"""
from __future__ import annotations

import torch

NAMESPACE = "fusedreg"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")

# name -> schema (arguments and returns, without the name)
SCHEMAS: dict[str, str] = {
    # y = x * keep / (1 - p), keep regenerated from (seed, element index in memory order)
    "dropout_fwd": "(Tensor input, Tensor seed, float p) -> Tensor",
    "dropout_fwd_": "(Tensor(a!) input, Tensor seed, float p) -> ()",
    "dropout_bwd": "(Tensor grad, Tensor seed, float p) -> Tensor",
    # residual + dropout(input + bias); bias broadcasts over the last dimension
    "dropout_add_fwd": "(Tensor input, Tensor residual, Tensor? bias, Tensor seed, float p) -> Tensor",
    # One AdamW step over a list of tensors of one device and dtype. hparams: float64 [n, 5] on that
    # device, rows (lr, beta1, beta2, weight_decay, eps) per tensor (float64 so that 1 - beta2 and
    # the bias corrections are as exact as torch's Python-float ones); steps: per-tensor float32
    # scalars already counting this step. grads are divided by grad_scale and multiplied by
    # clip_coef when given; a nonzero found_inf makes the step a no-op. sr_seed (int64 [1] on that
    # device): bfloat16 tensors are written by stochastic rounding with Philox bits keyed by it,
    # counter (element group, sr_tensor_ids[i] or i) (layout: csrc/adamw.h); else to nearest.
    "adamw_step_": ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
                    "Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, Tensor hparams, bool amsgrad, "
                    "bool maximize, Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, "
                    "Tensor? sr_seed=None, int[] sr_tensor_ids=[]) -> ()"),
    # sum(|x|^p) over all elements of all tensors (max |x| for p = inf), a float32 scalar (float64
    # for float64 tensors), computed in a fixed order so the same inputs give the bitwise same result
    "grad_norm_pow": "(Tensor[] tensors, float norm_type) -> Tensor",
    # x *= scale for every tensor; scale is a float32 scalar tensor on the tensors' device
    "multi_tensor_scale_": "(Tensor(a!)[] tensors, Tensor scale) -> ()",
    # returns (output, mean, invstd); mean/invstd are [C] in the statistics dtype (float32, float64
    # for float64 input): batch statistics in training,
    # running statistics in eval. Running stats are updated in place in training when given.
    "batch_norm_fwd": ("(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
                       "Tensor(b!)? running_var, bool training, float momentum, float eps) "
                       "-> (Tensor, Tensor, Tensor)"),
    # returns (grad_input, grad_weight, grad_bias); the last two [C] in the statistics dtype
    "batch_norm_bwd": ("(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
                       "bool training) -> (Tensor, Tensor, Tensor)"),
    # The pieces of batch_norm_fwd/bwd, for SyncBatchNorm (statistics combined across processes
    # between them) and eval (one elementwise pass). Statistics are [C] in the statistics dtype.
    # (mean, biased variance) over every dim but 1:
    "batch_norm_stats": "(Tensor input) -> (Tensor, Tensor)",
    # (input - mean) * invstd * weight + bias, laid out as empty_like(input):
    "batch_norm_elemt": "(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor",
    # (sum(grad_out), sum(grad_out * (input - mean))) per channel:
    "batch_norm_bwd_reduce": "(Tensor grad_out, Tensor input, Tensor mean) -> (Tensor, Tensor)",
    # (grad_out - mean_dy - (input - mean) * invstd**2 * mean_dy_xmu) * invstd * weight, where
    # mean_dy / mean_dy_xmu are the (possibly all-reduced) sums above divided by the global count:
    "batch_norm_bwd_elemt": ("(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
                             "Tensor mean_dy, Tensor mean_dy_xmu) -> Tensor"),
    # Self-tests of csrc/common: Philox4x32-10 on int64 tensors holding uint32 words
    # (counter [n, 4], key [n, 2] -> [n, 4]) ...
    "_philox4x32": "(Tensor counter, Tensor key) -> Tensor",
    # ... and per-tensor float32 sum of squares through the multi-tensor/reduction machinery.
    "_multi_tensor_sumsq": "(Tensor[] tensors) -> Tensor",
}

TRITON_SUFFIX = "_triton"


def _channels(input: torch.Tensor) -> int:
    return input.shape[1] if input.dim() > 1 else input.shape[0]


def _stats(like: torch.Tensor, *shape) -> torch.Tensor:
    """A statistics tensor: float32, or float64 for float64 data."""
    return like.new_empty(shape, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def _fake_dropout_fwd(input, seed, p):
    return torch.empty_like(input)


def _fake_dropout_fwd_(input, seed, p):
    return None


def _fake_dropout_bwd(grad, seed, p):
    return torch.empty_like(grad)


def _fake_dropout_add_fwd(input, residual, bias, seed, p):
    return torch.empty_like(input)


def _fake_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams,
                      amsgrad, maximize, grad_scale, found_inf, clip_coef, sr_seed=None, sr_tensor_ids=()):
    return None


def _fake_grad_norm_pow(tensors, norm_type):
    return _stats(tensors[0])


def _fake_multi_tensor_scale_(tensors, scale):
    return None


def _fake_batch_norm_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps):
    c = _channels(input)
    return torch.empty_like(input), _stats(input, c), _stats(input, c)


def _fake_batch_norm_bwd(grad_out, input, weight, mean, invstd, training):
    c = _channels(input)
    return torch.empty_like(input), _stats(input, c), _stats(input, c)


def _fake_batch_norm_stats(input):
    c = _channels(input)
    return _stats(input, c), _stats(input, c)


def _fake_batch_norm_elemt(input, weight, bias, mean, invstd):
    return torch.empty_like(input)


def _fake_batch_norm_bwd_reduce(grad_out, input, mean):
    c = _channels(input)
    return _stats(input, c), _stats(input, c)


def _fake_batch_norm_bwd_elemt(grad_out, input, weight, mean, invstd, mean_dy, mean_dy_xmu):
    return torch.empty_like(input)


def _fake_philox4x32(counter, key):
    return torch.empty_like(counter)


def _fake_multi_tensor_sumsq(tensors):
    return tensors[0].new_empty((len(tensors),), dtype=torch.float32)


FAKES = {name: globals()["_fake_" + name.lstrip("_")] for name in SCHEMAS}


def qualname(name: str, backend: str = "cuda") -> str:
    """'fusedreg::<name>' for the C++ backends, 'fusedreg::<name>_triton' for Triton."""
    return f"{NAMESPACE}::{name}{TRITON_SUFFIX if backend == 'triton' else ''}"


def op(name: str, backend: str = "cuda"):
    """The OpOverloadPacket to call for op `name` on `backend` ("cuda" and "cpu" share one)."""
    return getattr(torch.ops.fusedreg, name + (TRITON_SUFFIX if backend == "triton" else ""))


def _define_all() -> None:
    for name, schema in SCHEMAS.items():
        for full in (name, name + TRITON_SUFFIX):
            _lib.define(full + schema)
            torch.library.register_fake(f"{NAMESPACE}::{full}", FAKES[name], lib=_lib)


_define_all()
