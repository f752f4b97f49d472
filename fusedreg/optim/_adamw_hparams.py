"""AdamW's hyperparameters: the constructor's checks, and the float64 rows the fused step reads.

The op takes one [n, 5] float64 tensor per bucket (rows lr, beta1, beta2, weight_decay, eps, one
per tensor), so per-group values cost nothing extra. Building that tensor is a host-to-device copy,
so it is cached per bucket and rebuilt only when a value changes: floats by value, Tensor values by
identity and version counter (a scheduler's in-place `fill_` bumps it), never by reading a tensor
(that would sync). With capturable=True and Tensor values the rows are instead rebuilt on the
device every step, so a CUDA-graph capture records the rebuild and each replay reads the current lr.
"""
from __future__ import annotations

import torch

__all__ = ["to_scalar", "check_hyperparameters", "check_differentiable", "check_state_dtype",
           "check_stochastic_rounding", "group_signatures", "hparam_rows", "tensor_version"]

# parameter dtypes whose moments state_dtype applies to (float64 and complex keep their own)
STATE_DTYPE_PARAMS = (torch.float32, torch.float16, torch.bfloat16)


def to_scalar(x):
    """A 1-element Tensor hyperparameter as a 0-dim tensor (torch.optim's convention)."""
    return x.squeeze() if isinstance(x, torch.Tensor) and x.dim() != 0 else x


def check_hyperparameters(lr, betas, eps, weight_decay, foreach, capturable) -> None:
    """torch.optim.Adam's constructor checks, in its order and with its messages."""
    if isinstance(lr, torch.Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for index in (0, 1):
        if isinstance(betas[index], torch.Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False "
                                 "and foreach=True")
            if betas[index].numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")


def check_state_dtype(state_dtype) -> None:
    if state_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"state_dtype must be None (the parameter's dtype), torch.float32 or torch.bfloat16, "
                         f"got {state_dtype!r}")


def check_stochastic_rounding(bf16_stochastic_round, state_dtype, param_groups: list[dict],
                              need_bf16: bool = True) -> None:
    """bf16_stochastic_round=True needs a bfloat16 tensor to round (a bfloat16 parameter, or
    state_dtype=torch.bfloat16 with a parameter it applies to; checked when need_bf16) and no
    float16 parameter (stochastic rounding to float16 is not offered: it would silently round those
    to nearest)."""
    if not isinstance(bf16_stochastic_round, bool):
        raise TypeError(f"bf16_stochastic_round must be a bool, got {type(bf16_stochastic_round).__name__}")
    if not bf16_stochastic_round:
        return
    dtypes = {p.dtype for group in param_groups for p in group["params"]}
    if torch.float16 in dtypes:
        raise ValueError("bf16_stochastic_round=True: stochastic rounding is offered for bfloat16 only, and "
                         "there are float16 parameters; convert them to bfloat16, or leave "
                         "bf16_stochastic_round=False")
    bf16_states = state_dtype == torch.bfloat16 and bool(dtypes & set(STATE_DTYPE_PARAMS))
    if need_bf16 and torch.bfloat16 not in dtypes and not bf16_states:
        raise ValueError(f"bf16_stochastic_round=True, but there is no bfloat16 tensor to round: no parameter "
                         f"is bfloat16 (dtypes: {sorted(str(d) for d in dtypes)}) and state_dtype is "
                         f"{state_dtype}; use bfloat16 parameters or state_dtype=torch.bfloat16")


def check_differentiable(differentiable) -> None:
    if differentiable:
        raise RuntimeError("fusedreg.optim.AdamW does not support differentiable=True (its step is a "
                           "fused kernel with no autograd formula); use "
                           "torch.optim.AdamW(differentiable=True)")


def tensor_version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: treat as always changed
        return object()


def _signature(values) -> tuple:
    """What the cached hyperparameter rows depend on (never a tensor's value: that would sync)."""
    return tuple((id(v), tensor_version(v)) if isinstance(v, torch.Tensor) else float(v) for v in values)


def _group_values(group) -> tuple:
    beta1, beta2 = group["betas"]
    return group["lr"], beta1, beta2, group["weight_decay"], group["eps"]


def group_signatures(param_groups: list[dict]) -> list[tuple]:
    """One signature per param group, taken once per step for all of its buckets."""
    return [_signature(_group_values(group)) for group in param_groups]


def _device_row(values, device: torch.device) -> torch.Tensor:
    """(lr, beta1, beta2, weight_decay, eps) as float64 [5] on `device`, built with device ops only
    (no host-to-device copy of Python floats), so it can run inside CUDA-graph capture."""
    return torch.stack([
        v.detach().reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
        if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=torch.float64, device=device)
        for v in values])


def hparam_rows(cache: dict, key: tuple, runs: list[list[int]], groups: list[dict], signatures: list[tuple],
                capturing: bool) -> torch.Tensor:
    """float64 [n, 5] rows (lr, beta1, beta2, weight_decay, eps) per tensor of the bucket `key`
    (whose device is key[0]; `runs`: its [group index, tensor count] in kernel order), on its
    device; kept in `cache` while the groups' values (and the tensors' versions) stay the same.

    Under CUDA-graph capture they are built afresh and not cached: rows made during capture
    hold nothing until a replay (an eager step reading them would read garbage), and a graph
    reading the cached rows would read freed memory once a new value replaced the entry."""
    runs = [(index, count) for index, count in runs]
    signature = tuple((index, count, signatures[index]) for index, count in runs)
    has_tensor = [any(isinstance(v, torch.Tensor) for v in _group_values(groups[i])) for i, _ in runs]
    on_device = any(has_tensor) or any(groups[i]["capturable"] for i, _ in runs)
    every_step = any(t and groups[i]["capturable"] for t, (i, _) in zip(has_tensor, runs))
    device = key[0]
    cached = None if capturing else cache.get(key)
    if cached is not None and not every_step and cached[0] == signature:
        return cached[1]

    if on_device or capturing:
        hparams = torch.cat([_device_row(_group_values(groups[i]), device).expand(count, 5)
                             for i, count in runs])
    else:  # one host-to-device copy, asynchronous from pinned memory
        rows = []
        for i, count in runs:
            rows.extend([[float(v) for v in _group_values(groups[i])]] * count)
        host = torch.tensor(rows, dtype=torch.float64)
        if device.type == "cuda":
            host = host.pin_memory()
        hparams = host.to(device, non_blocking=True)
    if capturing:
        return hparams
    # the Tensor values are kept alive with the entry, so their ids in `signature` stay theirs
    keep_alive = [v for i, _ in runs for v in _group_values(groups[i]) if isinstance(v, torch.Tensor)]
    cache[key] = (signature, hparams, keep_alive)
    return hparams
