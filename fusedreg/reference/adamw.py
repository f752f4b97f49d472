"""AdamW step in eager PyTorch: the definition behind `fusedreg::adamw_step_`.

For each tensor i, with (lr, beta1, beta2, weight_decay, eps) = hparams[i] and t = steps[i]
(already counting this step), exactly the order of operations of torch.optim.AdamW's
single-tensor path:

    g  = grad / grad_scale * clip_coef        (each factor only when given; negated if maximize)
    p  = p * (1 - lr * weight_decay)          decoupled weight decay
    m  = lerp(m, g, 1 - beta1)
    v  = v * beta2 + (1 - beta2) * g * g
    v_max = max(v_max, v)                     amsgrad only; the denominator then uses v_max
    denom = sqrt(v) / sqrt(1 - beta2**t) + eps
    p  = p - (lr / (1 - beta1**t)) * m / denom

A nonzero `found_inf` leaves every tensor unchanged; it is applied with `torch.where`, not a
Python branch, so no value is read back to the host.

Numerics, and the deliberate difference from PyTorch: every element is computed in float32 (float64
for float64 parameters) and each tensor is rounded to its own dtype once, at the end. PyTorch's
AdamW on bfloat16/float16 parameters rounds after every operation instead, so on low-precision
parameters this is at least as accurate, not bitwise equal. The per-tensor scalars (1 - lr * wd,
1 - beta1, 1 - beta2, lr / (1 - beta1**t), sqrt(1 - beta2**t), eps) are computed in float64 from
the float64 `hparams` row and the step, as PyTorch computes them in Python floats, and rounded to
the math dtype once; on float32 parameters the result is then PyTorch's single-tensor AdamW
operation for operation.
"""
from __future__ import annotations

import torch

__all__ = ["adamw_step_"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scalar(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # GradScaler keeps its scale and found_inf as one-element tensors of shape () or (1,)
    return None if t is None else t.reshape(()).to(dtype)


@torch.no_grad()
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                steps: list[torch.Tensor], hparams: torch.Tensor, amsgrad: bool, maximize: bool,
                grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                clip_coef: torch.Tensor | None) -> None:
    """One AdamW step; mutates params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs if amsgrad)."""
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        # float64 scalars, as torch's Python floats, rounded to the math dtype once (no host sync)
        lr, beta1, beta2, weight_decay, eps = hparams[i].to(torch.float64).unbind()
        step = steps[i].reshape(()).to(torch.float64)
        decay = (1 - lr * weight_decay).to(dtype)
        lerp_weight = (1 - beta1).to(dtype)
        step_size = (lr / (1 - beta1 ** step)).to(dtype)
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt().to(dtype)
        one_minus_beta2 = (1 - beta2).to(dtype)
        beta2, eps = beta2.to(dtype), eps.to(dtype)

        grad = grads[i].to(dtype)
        scale = _scalar(grad_scale, dtype)
        if scale is not None:
            grad = grad / scale
        coef = _scalar(clip_coef, dtype)
        if coef is not None:
            grad = grad * coef
        if maximize:
            grad = -grad

        p = param.to(dtype) * decay
        m = exp_avgs[i].to(dtype).lerp(grad, lerp_weight)
        v = exp_avg_sqs[i].to(dtype) * beta2 + one_minus_beta2 * grad * grad
        v_for_denom = v
        if amsgrad:
            v_max = torch.maximum(max_exp_avg_sqs[i].to(dtype), v)
            v_for_denom = v_max

        denom = v_for_denom.sqrt() / bias_correction2_sqrt + eps
        p = p - step_size * m / denom

        updates = [(param, p), (exp_avgs[i], m), (exp_avg_sqs[i], v)]
        if amsgrad:
            updates.append((max_exp_avg_sqs[i], v_max))
        skip = None if found_inf is None else _scalar(found_inf, torch.float32) != 0
        for target, value in updates:
            if skip is not None:
                value = torch.where(skip, target.to(dtype), value)
            target.copy_(value)
