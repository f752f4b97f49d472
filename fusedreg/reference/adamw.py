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

Stochastic rounding (`sr_seed` given: an int64 tensor [1], the step's seed): every bfloat16 tensor
(params, moments) is written from its float32 value by stochastic rounding instead of to nearest,
with the random bits of the layout below (csrc/adamw.h states it too; every backend implements
exactly this, so all give bit-identical results for one seed):
  - key = the seed (k0 = low 32 bits, k1 = high 32 bits); t = sr_tensor_ids[i] (default i): the
    optimizer passes each parameter's index in its flat parameter order (param groups in order,
    parameters in order, counting those without a gradient), so a tensor's bits do not depend on
    which dtype bucket or call it is stepped in;
  - element e of tensor i (its position in memory order) lies in group j = e // 4, lane e % 4;
    words A = philox(counter = (j mod 2**32, j >> 32, t, 0), key), B = the same with counter word
    3 = 1; the element's 16-bit random values are A[lane] & 0xFFFF for the parameter, A[lane] >> 16
    for exp_avg, B[lane] & 0xFFFF for exp_avg_sq, B[lane] >> 16 for max_exp_avg_sq;
  - bfloat16 bits = (float32 bits + r) >> 16 (unsigned): rounds away from zero with probability
    (discarded low 16 bits) / 2**16, so E[rounded] = value.
  - the float32 values themselves must then agree to the bit, so the first moment's lerp is written
    out in the kernels' form (torch's vectorized CPU lerp contracts it into FMAs; every other
    operation above is one rounded torch op already). NaN gives 0x7FC0 (as rounding to
    nearest does), inf stays inf, and a finite value above the largest bfloat16 rounds to inf with
    the probability of its discarded fraction (as torchao's and llm.c's rounding do).

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

from .philox import philox4x32

__all__ = ["adamw_step_", "stochastic_round_bf16", "sr_random_bits"]

_MASK32 = 0xFFFFFFFF
_SR_OPERANDS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # operand k: word pair k // 2, half k % 2


def sr_random_bits(seed: torch.Tensor, tensor_id: int, numel: int, operand: int) -> torch.Tensor:
    """The 16-bit random values (int64 [numel], in [0, 2**16)) of elements 0..numel-1 in memory order
    of the tensor `tensor_id` for operand `operand` (0 param, 1 exp_avg, 2 exp_avg_sq, 3
    max_exp_avg_sq), under the layout of the module docstring. Read on the seed's device, no sync."""
    groups = -(-numel // 4)
    j = torch.arange(groups, dtype=torch.int64, device=seed.device)
    counter = torch.stack([j & _MASK32, j >> 32, torch.full_like(j, tensor_id & _MASK32),
                           torch.full_like(j, operand // 2)], dim=-1)
    s = seed.reshape(()).to(torch.int64)
    key = torch.stack([s & _MASK32, (s >> 32) & _MASK32]).expand(groups, 2)
    words = philox4x32(counter, key).reshape(-1)[:numel]
    return (words >> 16) if operand % 2 else (words & 0xFFFF)


def stochastic_round_bf16(value: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 `value` rounded to bfloat16 by adding the 16-bit `bits` (int64, same shape) to its low
    half and truncating; NaN becomes 0x7FC0."""
    w = value.to(torch.float32).view(torch.int32).to(torch.int64) & _MASK32
    rounded = (w + bits) >> 16  # < 2**16 except for NaNs, replaced below
    rounded = torch.where(value.isnan(), 0x7FC0, rounded)
    return (rounded - ((rounded >> 15) << 16)).to(torch.int16).view(torch.bfloat16)


def _in_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """flat[k] placed at the element of `like`'s shape stored k-th in memory (like is dense)."""
    if like.dim() == 0:
        return flat.reshape(())
    # dims by stride, outermost first, give memory order; dims of size one may go anywhere
    perm = sorted((d for d in range(like.dim()) if like.shape[d] != 1), key=lambda d: -like.stride(d))
    perm += [d for d in range(like.dim()) if like.shape[d] == 1]
    inverse = [perm.index(d) for d in range(like.dim())]
    return flat.reshape([like.shape[d] for d in perm]).permute(inverse)


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
                clip_coef: torch.Tensor | None, sr_seed: torch.Tensor | None = None,
                sr_tensor_ids: list[int] = ()) -> None:
    """One AdamW step; mutates params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs if amsgrad).
    With sr_seed, bfloat16 tensors are written by stochastic rounding (module docstring)."""
    check_stochastic_rounding(params, exp_avgs, sr_seed, sr_tensor_ids)
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

        # With stochastic rounding the float32 values must match the kernels' to the bit (every
        # operation correctly rounded): a CPU division by a 0-dim tensor multiplies by its
        # reciprocal, so divide by a full tensor.
        exact = None if sr_seed is None else (lambda scalar, like: scalar.expand(like.shape).contiguous())
        grad = grads[i].to(dtype)
        scale = _scalar(grad_scale, dtype)
        if scale is not None:
            grad = grad / (scale if exact is None else exact(scale, grad))
        coef = _scalar(clip_coef, dtype)
        if coef is not None:
            grad = grad * coef
        if maximize:
            grad = -grad

        p = param.to(dtype) * decay
        m = exp_avgs[i].to(dtype)
        if sr_seed is None:
            m = m.lerp(grad, lerp_weight)
        else:  # lerp's two forms written out: torch's vectorized CPU lerp contracts them into FMAs
            from_grad = (lerp_weight >= 0.5) | (lerp_weight <= -0.5)
            coef = torch.where(from_grad, lerp_weight - 1, lerp_weight)
            m = torch.where(from_grad, grad, m) + coef * (grad - m)
        v = exp_avg_sqs[i].to(dtype) * beta2 + one_minus_beta2 * grad * grad
        v_for_denom = v
        if amsgrad:
            v_max = torch.maximum(max_exp_avg_sqs[i].to(dtype), v)
            v_for_denom = v_max

        if exact is None:
            denom = v_for_denom.sqrt() / bias_correction2_sqrt + eps
        else:  # torch's CPU float32 sqrt is not always correctly rounded; via float64 it is
            denom = v_for_denom.double().sqrt().to(dtype) / exact(bias_correction2_sqrt, v_for_denom) + eps
        p = p - step_size * m / denom

        updates = [(param, p), (exp_avgs[i], m), (exp_avg_sqs[i], v)]
        if amsgrad:
            updates.append((max_exp_avg_sqs[i], v_max))
        skip = None if found_inf is None else _scalar(found_inf, torch.float32) != 0
        for operand, (target, value) in enumerate(updates):
            if sr_seed is not None and target.dtype == torch.bfloat16:
                tensor_id = sr_tensor_ids[i] if len(sr_tensor_ids) else i
                bits = _in_memory_order(sr_random_bits(sr_seed, tensor_id, target.numel(), operand), target)
                value = stochastic_round_bf16(value, bits)
                if skip is not None:
                    value = torch.where(skip, target, value)
            elif skip is not None:
                value = torch.where(skip, target.to(dtype), value)
            target.copy_(value)


def check_stochastic_rounding(params, exp_avgs, sr_seed, sr_tensor_ids) -> None:
    """The rules of csrc/adamw.h for sr_seed / sr_tensor_ids (same wording)."""
    if sr_seed is None:
        if len(sr_tensor_ids):
            raise ValueError("sr_tensor_ids given without sr_seed")
        return
    if sr_seed.numel() != 1 or sr_seed.dtype != torch.int64:
        raise ValueError(f"sr_seed must be an int64 tensor of one element, got {sr_seed.dtype} of shape "
                         f"{tuple(sr_seed.shape)}")
    if params and sr_seed.device != params[0].device:
        raise ValueError(f"sr_seed must be on {params[0].device}, got {sr_seed.device}")
    if params and torch.bfloat16 not in (params[0].dtype, exp_avgs[0].dtype if exp_avgs else None):
        raise ValueError(f"sr_seed given, but neither params ({params[0].dtype}) nor optimizer states "
                         f"({exp_avgs[0].dtype if exp_avgs else None}) are bfloat16: stochastic rounding "
                         "has no bfloat16 tensor to round")
    if len(sr_tensor_ids) not in (0, len(params)):
        raise ValueError(f"sr_tensor_ids must be empty or have one id per tensor ({len(params)}), got "
                         f"{len(sr_tensor_ids)}")
    if any(not 0 <= t < 2**32 for t in sr_tensor_ids):
        raise ValueError("sr_tensor_ids must be in [0, 2**32)")
