"""AdamW whose step is one fused kernel launch per (device, dtype) group of parameters.

Algorithm: torch.optim.AdamW's math (decoupled weight decay, lerp'd first moment, bias-corrected
second moment, AMSGrad, maximize), computed by the op `fusedreg::adamw_step_` (the order of
operations is spelled out in fusedreg/reference/adamw.py). Every parameter with a gradient, across
all param groups, is bucketed by (device, parameter dtype, state dtype, amsgrad, maximize) and each
bucket is one op call: its per-tensor hyperparameters travel as one float64 [n, 5] tensor on the
device (rows lr, beta1, beta2, weight_decay, eps), its step counts as float32 device scalars that
are incremented on the device before the call. Per-group hyperparameters cost nothing extra: a
row per tensor.

Choices and their trade-offs:
- A step's host work is planned once (fusedreg/optim/_adamw_plan.py): later steps check that the
  inputs of the bucketing, the hyperparameter objects and the backend choice are unchanged instead
  of bucketing, building rows and looking ops up again; any change takes the full path once.
- The hyperparameter tensor is cached per bucket and rebuilt only when a value changes: floats by
  value, Tensor values by identity and version counter (a scheduler's in-place `fill_` bumps it).
  With capturable=True and Tensor hyperparameters it is instead rebuilt on the device every step,
  so a CUDA-graph capture records the rebuild and each replay reads the current lr. A captured
  step never shares rows with the cache (see _adamw_hparams.py), and one that would create state
  is refused: warm up eagerly first, as torch.cuda.graph's documentation asks.
- state["step"] is always a float32 scalar on the parameter's device (torch's layout for its fused
  and capturable modes): the kernel reads it there, torch.optim.AdamW accepts it in every mode,
  and torch's CPU step counts move there on load. Moments are in the parameter's dtype (as torch),
  or float32 for float16/bfloat16 parameters with state_dtype=torch.float32.
- GradScaler: grad_scale / found_inf go into the kernel, which unscales gradients as it reads them
  and leaves everything untouched when found_inf is nonzero; the step count advances by
  (found_inf == 0), computed on the device (torch's fused AdamW semantics, no host sync).
- max_grad_norm: one global 2-norm of all gradients, the clip coefficient
  min(max_grad_norm / (norm + 1e-6), 1) computed on the device and applied inside the same kernel
  (no separate scaling pass over the gradients). A non-finite norm skips the whole step like an
  overflow under GradScaler (torch's clip_grad_norm_ + step would write NaNs into the parameters).
- Parameters that are not non-overlapping-and-dense (the kernels walk memory linearly) are stepped
  through a dense copy that is copied back; gradients or moments laid out unlike their parameter
  are brought into its layout first. Zero-size parameters count steps but are not sent to the kernel.
- Complex parameters are stepped as real views, as torch does.
- DTensor parameters (FSDP2, tensor parallel) are stepped through their local shards, in the same
  buckets as plain ones; their moments are DTensors placed like them, and max_grad_norm's norm
  costs one all-reduce per sharding group (fusedreg/_dtensor.py).
- Pure-bf16 training (bf16_stochastic_round=True, with bfloat16 parameters and/or
  state_dtype=torch.bfloat16): bfloat16 tensors are written back from the float32 update by
  stochastic rounding inside the same kernel, the random bits Philox-keyed by one seed per step
  and device (an int64 device tensor from torch's generator: reproducible under
  torch.manual_seed, fresh in every step and CUDA-graph replay) and each parameter's index in the
  flat parameter order (layout: csrc/adamw.h): every backend gives bit-identical results.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .. import _backend, _dtensor
from ..ops._dispatch import kernel
from ..ops.dropout import draw_seed
from ..reference import adamw as reference
from ..utils.clip import global_norm
from ._adamw_hparams import (STATE_DTYPE_PARAMS, check_differentiable, check_hyperparameters, check_state_dtype,
                             check_stochastic_rounding, group_signatures, hparam_rows, to_scalar)
from ._adamw_plan import StepPlan, position
from ._adamw_state import MOMENTS, Bucket, dense_views, refuse_state_in_capture, scalar_on, step_tensor

__all__ = ["AdamW"]

_COMPLEX = (torch.complex32, torch.complex64, torch.complex128)
# Keys torch.optim.AdamW keeps in every param group, with the values it fills in for old checkpoints.
_GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                   "differentiable": False, "fused": None}


class AdamW(Optimizer):
    """torch.optim.AdamW's algorithm, state and checkpoint format; one fused launch per
    (device, dtype) group of parameters.

    Extra keyword arguments:
      max_grad_norm: clip by the global 2-norm of all gradients inside the step (see the module
          docstring); the pre-clip norm of the last step is `last_grad_norm` (a tensor).
      backend: fusedreg backend for the update ("cuda", "triton", "cpu", "reference"; None: the
          selection rules of fusedreg.backends).
      state_dtype: the dtype of exp_avg / exp_avg_sq / max_exp_avg_sq of float32, float16 and
          bfloat16 parameters: None (the parameter's dtype, as torch), torch.float32 or
          torch.bfloat16 (float64 and complex parameters always have moments of their own dtype).
      bf16_stochastic_round: bfloat16 parameters and bfloat16 moments are written back from the
          float32 update by stochastic rounding (unbiased; see the module docstring) instead of to
          nearest, so that updates far below a bfloat16 ulp still move them on average.
    `foreach` and `fused` are accepted for compatibility and change nothing: the step is always one
    fused kernel per group (torch's constructor errors for their combinations are kept).
    `capturable=True` lets step() be captured in a CUDA graph, Tensor hyperparameters then read
    from device memory on every replay; the step never syncs with the host either way.
    GradScaler passes grad_scale / found_inf (`_step_supports_amp_scaling`): as with torch's fused
    AdamW, gradients are unscaled inside the step and `p.grad` stays scaled afterwards.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, max_grad_norm: float | None = None,
                 backend: str | None = None, state_dtype: torch.dtype | None = None,
                 bf16_stochastic_round: bool = False) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay, foreach, capturable)
        check_differentiable(differentiable)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if max_grad_norm is not None and not 0.0 < float(max_grad_norm) < float("inf"):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (must be positive and finite)")
        check_state_dtype(state_dtype)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = None if backend is None else _backend._check_name(backend)
        self.state_dtype = state_dtype
        self.bf16_stochastic_round = bf16_stochastic_round
        self.last_grad_norm: torch.Tensor | None = None
        self._hparams_cache: dict[tuple, tuple] = {}
        self._plan: StepPlan | None = None
        defaults = dict(lr=lr, betas=(to_scalar(betas[0]), to_scalar(betas[1])), eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True)
        super().__init__(params, defaults)
        check_stochastic_rounding(bf16_stochastic_round, state_dtype, self.param_groups)

    # ------------------------------------------------------------------ torch.optim plumbing

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, but a parameter listed twice in one group is an error (torch warns that it will
        be): the fused step would update it from two places at once, racing on the GPU."""
        if isinstance(param_group, dict):  # else torch raises its own error
            check_differentiable(param_group.get("differentiable", False))
            self._check_no_duplicates(param_group)
        super().add_param_group(param_group)
        try:  # no float16 parameters with stochastic rounding (whether anything is bfloat16 is
            # checked once all of the constructor's groups exist)
            check_stochastic_rounding(getattr(self, "bf16_stochastic_round", False), self.state_dtype,
                                      [self.param_groups[-1]], need_bf16=False)
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_no_duplicates(param_group: dict[str, Any]) -> None:
        if isinstance(param_group["params"], (torch.Tensor, set)):  # torch handles those
            return
        params = param_group["params"] = list(param_group["params"])
        seen: dict[int, int] = {}
        for index, p in enumerate(params):
            first = seen.setdefault(id(p[1] if isinstance(p, tuple) else p), index)  # (name, p) too
            if first != index:
                raise ValueError(f"optimizer contains a parameter group with duplicate parameters "
                                 f"(params[{first}] and params[{index}] are one tensor); list it once")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(max_grad_norm=self.max_grad_norm, backend=self.backend, state_dtype=self.state_dtype,
                     bf16_stochastic_round=self.bf16_stochastic_round)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, value in (("max_grad_norm", None), ("backend", None), ("state_dtype", None),
                            ("last_grad_norm", None), ("bf16_stochastic_round", False)):
            self.__dict__.setdefault(name, value)
        self._hparams_cache = {}
        self._plan = None
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            group["decoupled_weight_decay"] = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, then this optimizer's layout: torch casts moments to the parameter's
        dtype (they are recast from the saved tensors to the state dtype) and keeps non-capturable
        steps where they were saved (they move to the parameter's device as float32)."""
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            saved = saved_state.get(pid)
            if not saved:
                continue
            state = self.state[p]
            if "step" in saved:
                state["step"] = step_tensor(saved["step"], p.device)
            for key in MOMENTS:
                if isinstance(saved.get(key), torch.Tensor):
                    state[key] = saved[key].to(device=p.device, dtype=self._state_dtype(p))

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return p.dtype if self.state_dtype is None or p.dtype not in STATE_DTYPE_PARAMS else self.state_dtype

    def _init_state(self, p: torch.Tensor, state: dict, amsgrad: bool) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in MOMENTS[:3 if amsgrad else 2]:
            state[key] = torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.preserve_format)

    def _graph_capture_check(self) -> bool:
        """Whether step() is being captured in a CUDA graph. torch's rule: capturing step() needs
        capturable=True (which makes the hyperparameter rows a device computation that the graph
        records)."""
        capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
        if capturing and not all(group["capturable"] for group in self.param_groups):
            raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of "
                               f"{type(self).__name__} but param_groups' capturable is False.")
        return capturing

    # ------------------------------------------------------------------ the step

    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None):
        """One AdamW step over every parameter with a gradient; returns closure()'s loss.

        grad_scale / found_inf (one-element tensors, as GradScaler keeps them; default: the
        optimizer's `grad_scale` / `found_inf` attributes, which GradScaler.step sets): gradients
        are divided by grad_scale inside the kernel; a nonzero found_inf skips the whole step,
        step counts included. Nothing is read back to the host.
        """
        # torch.no_grad() as a decorator, but without its context-manager objects: on a small model
        # they cost as much as the rest of the step's Python
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._step(closure, grad_scale, found_inf)
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    def _step(self, closure, grad_scale, found_inf):
        capturing = self._graph_capture_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        # the plan (see _adamw_plan.py) spares an unchanged structure its bucketing, rows and op lookups;
        # a captured step takes the full path and never reads or writes cached rows
        plan = None if capturing else self._plan
        buckets = None if plan is None else plan.gather(self.param_groups, self.state)
        if buckets is None:
            buckets, positions = self._buckets(capturing)
            plan = self._plan = None if positions is None else StepPlan(self.param_groups, positions, buckets)
        if not buckets:
            return loss
        clip_coef = None
        if self.max_grad_norm is not None:
            clip_coef, found_inf = self._clip_coef(buckets, grad_scale, found_inf)

        choice = self.backend if self.backend is not None else _backend.get_backend()
        if plan is not None:
            # reset before the loop, so that a step that raises halfway leaves nothing stale behind
            if plan.hyperparameters_changed(self.param_groups):
                plan.rows = [None] * len(plan.rows)
            if plan.choice != choice:
                plan.choice, plan.ops = None, [None] * len(plan.ops)
        signatures = None
        device_scalars = grad_scale is not None or found_inf is not None or clip_coef is not None
        scale_d = found_d = advance_d = coef_d = None
        per_device: dict[torch.device, tuple] = {}
        seeds: dict[torch.device, torch.Tensor] = {}
        for index, (key, bucket) in enumerate(buckets.items()):
            device = key[0]
            if device_scalars:
                if device not in per_device:
                    found = scalar_on(found_inf, device)
                    advance = None if found is None else (found == 0).to(torch.float32)
                    coef = None if clip_coef is None else clip_coef.to(device, non_blocking=True)
                    per_device[device] = (scalar_on(grad_scale, device), found, advance, coef)
                scale_d, found_d, advance_d, coef_d = per_device[device]
            torch._foreach_add_(bucket.all_steps, 1 if advance_d is None else advance_d)
            if bucket.params:
                amsgrad, maximize = key[3], key[4]
                hparams, op = (None, None) if plan is None else (plan.rows[index], plan.ops[index])
                if hparams is None:
                    signatures = signatures or group_signatures(self.param_groups)
                    hparams = hparam_rows(self._hparams_cache, key, bucket.runs, self.param_groups, signatures,
                                          capturing)
                if op is None:
                    op = kernel("adamw_step_", _backend.select(device, self.backend), reference)
                if plan is not None:
                    plan.rows[index], plan.ops[index] = hparams, op
                rounding = ()
                if self.bf16_stochastic_round and bucket.rounds_stochastically():
                    if device not in seeds:  # one seed per step and device, on the device
                        seeds[device] = draw_seed(device)
                    rounding = (seeds[device], bucket.ids)
                op(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                   bucket.max_exp_avg_sqs, bucket.steps, hparams, amsgrad, maximize,
                   scale_d, found_d, coef_d, *rounding)
            for param, dense in bucket.writebacks:
                param.copy_(dense)
        if plan is not None:
            plan.choice = choice
        return loss

    def _buckets(self, capturing: bool) -> tuple[dict[tuple, Bucket], list[list] | None]:
        """Parameters with gradients, bucketed by (device, dtype, state dtype, amsgrad, maximize);
        creates missing state. Also what a StepPlan needs to recognise the same inputs next step
        (per group, per parameter, None (no gradient) or its position(...)), or None where the step
        cannot be planned. The common case (all contiguous, real) costs a handful of attribute
        reads per parameter; the rest goes through dense_views."""
        buckets: dict[tuple, Bucket] = {}
        states = self.state
        dtensor = _dtensor.dtensor_class()
        positions: list[list] | None = [] if not capturing else None
        flat_index = -1  # the parameter's index in the flat parameter order (its SR stream)
        for index, group in enumerate(self.param_groups):
            check_differentiable(group["differentiable"])
            amsgrad, maximize = bool(group["amsgrad"]), bool(group["maximize"])
            seen: list = []
            if positions is not None:
                positions.append(seen)
            for p in group["params"]:
                flat_index += 1
                grad = p.grad
                if grad is None:
                    seen.append(None)
                    continue
                if grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider "
                                       "SparseAdam instead")
                state = states[p]
                if not state:
                    if capturing:
                        refuse_state_in_capture("a parameter has no optimizer state yet")
                    self._init_state(p, state, amsgrad)
                elif amsgrad and "max_exp_avg_sq" not in state:  # amsgrad switched on mid-training
                    if capturing:
                        refuse_state_in_capture("amsgrad needs a max_exp_avg_sq it has not made yet")
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
                shard_key = None
                if dtensor is not None and isinstance(p, dtensor):  # FSDP2 / TP: step the local shard
                    p, grad, state, shard_key = _dtensor.step_view(p, grad, state, MOMENTS[:3 if amsgrad else 2],
                                                                   capturing)
                    positions = None
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                max_exp_avg_sq = state["max_exp_avg_sq"] if amsgrad else None
                key = (p.device, p.dtype, exp_avg.dtype, amsgrad, maximize)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket()
                step = state["step"]
                bucket.all_steps.append(step)
                if shard_key is not None:  # for the norm, empty shards too: every process has every group
                    bucket.sharded_grads.append((len(bucket.grads), grad, shard_key))
                sent = bool(p.numel())
                seen.append(position(p, key, sent))
                if not sent:
                    continue

                param = p
                if not (p.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous()
                        and exp_avg_sq.is_contiguous() and key[1] not in _COMPLEX
                        and (max_exp_avg_sq is None or max_exp_avg_sq.is_contiguous())):
                    param, grad, (exp_avg, exp_avg_sq, max_exp_avg_sq) = dense_views(
                        p, grad, state, amsgrad, bucket, capturing)
                    positions = None
                bucket.params.append(param)
                bucket.grads.append(grad)
                bucket.exp_avgs.append(exp_avg)
                bucket.exp_avg_sqs.append(exp_avg_sq)
                if amsgrad:
                    bucket.max_exp_avg_sqs.append(max_exp_avg_sq)
                bucket.steps.append(step)
                bucket.ids.append(flat_index)
                runs = bucket.runs
                if runs and runs[-1][0] == index:
                    runs[-1][1] += 1
                else:
                    runs.append([index, 1])
        return buckets, positions

    def _clip_coef(self, buckets: dict[tuple, Bucket], grad_scale, found_inf):
        """(clip coefficient, found_inf) for max_grad_norm, device scalars (the coefficient in the
        norm's dtype: float32, float64 for float64 gradients); sets last_grad_norm."""
        grads = [g for bucket in buckets.values() for g in bucket.grads]
        sharding = None
        if any(bucket.sharded_grads for bucket in buckets.values()):
            grads, sharding = _dtensor.norm_inputs(buckets.values())
        if not grads:  # only zero-size parameters have gradients
            first = next(iter(buckets))[0]
            norm = torch.zeros((), dtype=torch.float32, device=first)
        else:
            # fusedreg.get_total_norm's kernels (with `sharding`, over DTensors' local shards: see
            # fusedreg._dtensor.norm_inputs), in float32 even for low-precision gradients (torch would
            # round the norm, and so the coefficient, to bfloat16), float64 for float64 gradients
            wide = any(key[1] in (torch.float64, torch.complex128) for key in buckets)
            norm = global_norm(grads, sharding, 2.0, self.backend, torch.float64 if wide else torch.float32)
        if grad_scale is not None:  # the norm of the unscaled gradients
            norm = norm / scalar_on(grad_scale, norm.device).to(norm.dtype)
        self.last_grad_norm = norm
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        nonfinite = (~torch.isfinite(norm)).to(torch.float32)
        found = nonfinite if found_inf is None else scalar_on(found_inf, norm.device) + nonfinite
        return coef, found
