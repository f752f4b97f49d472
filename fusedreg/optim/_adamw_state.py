"""AdamW's per-parameter tensors as one fused op call takes them: buckets, dense views, step counts.

The kernels walk memory linearly, so every tensor of a parameter must share one dense layout: a
non-dense parameter is stepped through a dense copy that is copied back, a gradient laid out
otherwise is copied into the parameter's layout, and moments laid out otherwise are re-laid out in
the state for good (they are the optimizer's own, so the copy is paid once). Step counts are
float32 scalars on the parameter's device, where the kernel reads them. State is never made while
a CUDA graph is being captured: every replay would make it again.
"""
from __future__ import annotations

import torch

from .._layout import is_dense, same_layout

__all__ = ["MOMENTS", "Bucket", "dense_views", "refuse_state_in_capture", "step_tensor", "scalar_on"]

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class Bucket:
    """The tensors of one op call, plus what the call needs around it."""
    __slots__ = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "all_steps",
                 "runs", "writebacks", "sharded_grads", "ids")

    def __init__(self):
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.max_exp_avg_sqs: list[torch.Tensor] = []  # stays empty unless amsgrad
        self.steps: list[torch.Tensor] = []      # of the tensors sent to the kernel
        self.all_steps: list[torch.Tensor] = []  # zero-size parameters count steps too
        self.runs: list[list[int]] = []          # [group index, tensor count] in kernel order
        self.writebacks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (non-dense param, dense copy)
        # DTensor parameters: (index its tensors get in the lists above, local grad, sharding group)
        self.sharded_grads: list[tuple[int, torch.Tensor, tuple]] = []
        self.ids: list[int] = []  # of the tensors sent to the kernel: index in the optimizer's flat
                                  # parameter order (their stochastic-rounding stream)

    def rounds_stochastically(self) -> bool:
        """Whether a stochastic-rounding step has a bfloat16 tensor to round in this bucket."""
        return bool(self.params) and torch.bfloat16 in (self.params[0].dtype, self.exp_avgs[0].dtype)


def refuse_state_in_capture(what: str) -> None:
    """State made during capture would be made again (zero-filled, copied) by every replay."""
    raise RuntimeError(f"fusedreg.optim.AdamW: step() is being captured in a CUDA graph, but {what}; "
                       "run step() eagerly at least once before capturing it (e.g. in the usual "
                       "warm-up iterations on a side stream), so that the state exists already")


def dense_views(p, grad, state, amsgrad, bucket, capturing):
    """(param, grad, moments) as the kernel needs them: one dense layout shared by all, real.

    A non-dense parameter is replaced by a dense copy, registered for copying back; a gradient
    in another layout (or dtype) by a copy in the parameter's; moments in another layout are
    re-laid out in the state for good (they are the optimizer's own)."""
    param = p
    if not is_dense(p):
        param = torch.empty_like(p).copy_(p)  # contiguous: empty_like of a non-dense tensor
        bucket.writebacks.append((p, param))
    if not same_layout(grad, param) or grad.dtype != p.dtype:
        grad = torch.empty_like(param).copy_(grad)
    state_dtype = state["exp_avg"].dtype
    moments = []
    for name in MOMENTS[:3 if amsgrad else 2]:
        m = state[name]
        if not same_layout(m, param) or m.dtype != state_dtype:
            if capturing:
                refuse_state_in_capture(f"state[{name!r}] must first be re-laid out like its parameter")
            m = state[name] = torch.empty_like(param, dtype=state_dtype).copy_(m)
        moments.append(m)
    if p.is_complex():
        param, grad = torch.view_as_real(param), torch.view_as_real(grad)
        moments = [torch.view_as_real(m) for m in moments]
    if not amsgrad:
        moments.append(None)
    return param, grad, moments


def step_tensor(value, device: torch.device) -> torch.Tensor:
    """A saved step count (tensor or number) as a fresh float32 scalar on `device`."""
    t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    return t.reshape(()).to(device=device, dtype=torch.float32, copy=True)


def scalar_on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A one-element GradScaler tensor as a float32 scalar on `device` (no sync)."""
    if t is None:
        return None
    return t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
