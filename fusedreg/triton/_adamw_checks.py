"""Argument checks of fusedreg::adamw_step__triton: csrc/adamw.h's rules and wording, in Python.

Split by cost: check_constant_time runs on every call; check_each_tensor, whose cost grows with the
number of tensors, runs when a pointer table is built (fusedreg/triton/adamw.py explains why a
cached table may skip it), with whole-list comparisons first and a loop naming the tensor at fault
only when one of them fails.
"""
from __future__ import annotations

import operator

import torch

from .._layout import is_dense, same_layout
from ..reference.adamw import check_stochastic_rounding
from . import _pointer_table

__all__ = ["check_constant_time", "check_each_tensor", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_shape = operator.attrgetter("shape")


def _check_scalar(t, name, device):
    if t is None:
        return
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_constant_time(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams, amsgrad,
                        grad_scale, found_inf, clip_coef, sr_seed=None, sr_tensor_ids=()) -> torch.dtype:
    """The checks of csrc/adamw.h (same rules, same wording) whose cost does not grow with the number
    of tensors, run on every call; returns the states' dtype."""
    if len(params) == 0:
        raise ValueError("params must be a non-empty list of tensors")
    device, dtype = params[0].device, params[0].dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"params must have a floating-point dtype, got {dtype}")
    named = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    for name, lst in named + [("max_exp_avg_sqs", max_exp_avg_sqs)] * amsgrad + [("steps", steps)]:
        if len(lst) != len(params):
            raise ValueError(f"params and {name} must have the same length, got {len(params)} and {len(lst)}")
    if not amsgrad and len(max_exp_avg_sqs):
        raise ValueError(f"max_exp_avg_sqs must be empty when amsgrad=False, got {len(max_exp_avg_sqs)} tensors")
    state_dtype = exp_avgs[0].dtype
    low_precision = dtype in (torch.float16, torch.bfloat16)
    bf16_states_ok = low_precision or dtype == torch.float32
    if state_dtype != dtype and not ((low_precision and state_dtype == torch.float32)
                                     or (bf16_states_ok and state_dtype == torch.bfloat16)):
        raise ValueError(f"exp_avgs[0] has dtype {state_dtype}; optimizer states must have the params' dtype "
                         f"({dtype}){', float32' if low_precision else ''}{' or bfloat16' if bf16_states_ok else ''}")
    if hparams.dtype != torch.float64:
        raise ValueError(f"hparams must have dtype torch.float64, got {hparams.dtype}")
    if hparams.shape != (len(params), 5):
        raise ValueError(f"hparams must have shape [len(params), 5] = [{len(params)}, 5], got {list(hparams.shape)}")
    if not hparams.is_contiguous():
        raise ValueError(f"hparams must be contiguous, got strides {hparams.stride()}")
    if hparams.device != device:
        raise ValueError(f"hparams must be on {device}, got {hparams.device}")
    _check_scalar(grad_scale, "grad_scale", device)
    _check_scalar(found_inf, "found_inf", device)
    _check_scalar(clip_coef, "clip_coef", device)
    check_stochastic_rounding(params, exp_avgs, sr_seed, sr_tensor_ids)
    return state_dtype


def _all_are(values, expected) -> bool:
    return set(values) == {expected}


def _name_the_culprit(params, named, steps):
    """The per-tensor checks of csrc/adamw.h, one tensor at a time: raises naming the first at fault."""
    device, dtype = params[0].device, params[0].dtype
    for i, p in enumerate(params):
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device}, but params[0] is on {device}; all must share one device")
        if p.dtype != dtype:
            raise ValueError(f"params[{i}] has dtype {p.dtype}, but params[0] has {dtype}; all must share one dtype")
        if p.numel() and not is_dense(p):
            raise ValueError(f"params[{i}] must be non-overlapping and dense (e.g. contiguous or channels_last), "
                             f"got sizes {tuple(p.shape)} and strides {p.stride()}; call .contiguous() first")
    for name, lst, want, rule in named:
        for i, (p, t) in enumerate(zip(params, lst)):
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, but params[{i}] has shape {tuple(p.shape)}")
            if t.device != p.device:
                raise ValueError(f"{name}[{i}] is on {t.device}, but params are on {p.device}")
            if t.dtype != want:
                raise ValueError(f"{name}[{i}] has dtype {t.dtype}, expected {want} ({rule})")
            if t.numel() and not same_layout(t, p):
                raise ValueError(f"{name}[{i}] has strides {t.stride()}, but params[{i}] has {p.stride()}; "
                                 "grads and states must have their parameter's memory layout")
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(f"steps[{i}] must be a float32 tensor of one element, got {s.dtype} of shape "
                             f"{tuple(s.shape)}")
        if s.device != device:
            raise ValueError(f"steps[{i}] is on {s.device}, but params are on {device}")


def check_each_tensor(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad, state_dtype):
    """The checks of csrc/adamw.h that look at every tensor, run when a table is built: whole-list
    comparisons (C-level maps, a few times faster than a Python loop); the loop that names the
    tensor at fault runs only when one of them fails."""
    device, dtype = params[0].device, params[0].dtype
    rule = "all optimizer states share exp_avgs[0]'s dtype"
    named = [("grads", grads, dtype, "grads must have their parameter's dtype, as in torch's fused AdamW"),
             ("exp_avgs", exp_avgs, state_dtype, rule), ("exp_avg_sqs", exp_avg_sqs, state_dtype, rule)]
    if amsgrad:
        named.append(("max_exp_avg_sqs", max_exp_avg_sqs, state_dtype, rule))
    shapes = list(map(_shape, params))
    if not (_all_are(map(_dtype, params), dtype) and _all_are(map(_device, params), device)
            and all(_all_are(map(_dtype, lst), want) and _all_are(map(_device, lst), device)
                    and list(map(_shape, lst)) == shapes for _, lst, want, _ in named)
            and _pointer_table.layouts_match([params] + [lst for _, lst, _, _ in named], len(named) + 1)
            and _all_are(map(_dtype, steps), torch.float32) and _all_are(map(torch.Tensor.numel, steps), 1)
            and _all_are(map(_device, steps), device)):
        _name_the_culprit(params, named, steps)
