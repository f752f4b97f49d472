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
- The hyperparameter tensor is cached per bucket and rebuilt only when a value changes: floats by
  value, Tensor values by identity and version counter (a scheduler's in-place `fill_` bumps it).
  With capturable=True and Tensor hyperparameters it is instead rebuilt on the device every step,
  so a CUDA-graph capture records the rebuild and each replay reads the current lr. A captured
  step never shares rows with the cache (see _hparams), and one that would create state is refused:
  warm up eagerly first, as torch.cuda.graph's documentation asks.
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
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .. import _backend
from .._layout import is_dense, same_layout
from ..ops._dispatch import kernel
from ..reference import adamw as reference
from ..utils.clip import get_total_norm

__all__ = ["AdamW"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_COMPLEX = (torch.complex32, torch.complex64, torch.complex128)
# Keys torch.optim.AdamW keeps in every param group, with the values it fills in for old checkpoints.
_GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                   "differentiable": False, "fused": None}


def _to_scalar(x):
    """A 1-element Tensor hyperparameter as a 0-dim tensor (torch.optim's convention)."""
    return x.squeeze() if isinstance(x, torch.Tensor) and x.dim() != 0 else x


def _check_hyperparameters(lr, betas, eps, weight_decay, foreach, capturable) -> None:
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


def _check_differentiable(differentiable) -> None:
    if differentiable:
        raise RuntimeError("fusedreg.optim.AdamW does not support differentiable=True (its step is a "
                           "fused kernel with no autograd formula); use "
                           "torch.optim.AdamW(differentiable=True)")


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: treat as always changed
        return object()


def _signature(values) -> tuple:
    """What the cached hyperparameter rows depend on (never a tensor's value: that would sync)."""
    return tuple((id(v), _version(v)) if isinstance(v, torch.Tensor) else float(v) for v in values)


def _group_values(group) -> tuple:
    beta1, beta2 = group["betas"]
    return group["lr"], beta1, beta2, group["weight_decay"], group["eps"]


def _device_row(values, device: torch.device) -> torch.Tensor:
    """(lr, beta1, beta2, weight_decay, eps) as float64 [5] on `device`, built with device ops only
    (no host-to-device copy of Python floats), so it can run inside CUDA-graph capture."""
    return torch.stack([
        v.detach().reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
        if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=torch.float64, device=device)
        for v in values])


def _step_tensor(value, device: torch.device) -> torch.Tensor:
    """A saved step count (tensor or number) as a fresh float32 scalar on `device`."""
    t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    return t.reshape(()).to(device=device, dtype=torch.float32, copy=True)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A one-element GradScaler tensor as a float32 scalar on `device` (no sync)."""
    if t is None:
        return None
    return t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)


def _total_norm(grads: list[torch.Tensor], backend: str | None, norm_dtype: torch.dtype) -> torch.Tensor:
    """The global 2-norm of `grads` in `norm_dtype`, by fusedreg.get_total_norm's kernels."""
    return get_total_norm(grads, 2.0, backend=backend, norm_dtype=norm_dtype)


class _Bucket:
    """The tensors of one op call, plus what the call needs around it."""
    __slots__ = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "all_steps",
                 "runs", "writebacks")

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


class AdamW(Optimizer):
    """torch.optim.AdamW's algorithm, state and checkpoint format; one fused launch per
    (device, dtype) group of parameters.

    Extra keyword arguments:
      max_grad_norm: clip by the global 2-norm of all gradients inside the step (see the module
          docstring); the pre-clip norm of the last step is `last_grad_norm` (a tensor).
      backend: fusedreg backend for the update ("cuda", "triton", "cpu", "reference"; None: the
          selection rules of fusedreg.backends).
      state_dtype: torch.float32 keeps exp_avg / exp_avg_sq / max_exp_avg_sq of float16 and
          bfloat16 parameters in float32 (None: in the parameter's dtype, as torch; parameters of
          other dtypes always have moments of their own dtype).
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
                 backend: str | None = None, state_dtype: torch.dtype | None = None) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, foreach, capturable)
        _check_differentiable(differentiable)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if max_grad_norm is not None and not 0.0 < float(max_grad_norm) < float("inf"):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (must be positive and finite)")
        if state_dtype not in (None, torch.float32):
            raise ValueError(f"state_dtype must be None (the parameter's dtype) or torch.float32, "
                             f"got {state_dtype!r}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = None if backend is None else _backend._check_name(backend)
        self.state_dtype = state_dtype
        self.last_grad_norm: torch.Tensor | None = None
        self._hparams_cache: dict[tuple, tuple] = {}
        defaults = dict(lr=lr, betas=(_to_scalar(betas[0]), _to_scalar(betas[1])), eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ torch.optim plumbing

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, but a parameter listed twice in one group is an error (torch warns that it will
        be): the fused step would update it from two places at once, racing on the GPU."""
        if isinstance(param_group, dict):  # else torch raises its own error
            _check_differentiable(param_group.get("differentiable", False))
            self._check_no_duplicates(param_group)
        super().add_param_group(param_group)

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
        state.update(max_grad_norm=self.max_grad_norm, backend=self.backend, state_dtype=self.state_dtype)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, value in (("max_grad_norm", None), ("backend", None), ("state_dtype", None),
                            ("last_grad_norm", None)):
            self.__dict__.setdefault(name, value)
        self._hparams_cache = {}
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
                state["step"] = _step_tensor(saved["step"], p.device)
            for key in _MOMENTS:
                if isinstance(saved.get(key), torch.Tensor):
                    state[key] = saved[key].to(device=p.device, dtype=self._state_dtype(p))

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return self.state_dtype if self.state_dtype is not None and p.dtype in _LOW_PRECISION else p.dtype

    def _init_state(self, p: torch.Tensor, state: dict, amsgrad: bool) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in _MOMENTS[:3 if amsgrad else 2]:
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

    @staticmethod
    def _refuse_state_in_capture(what: str) -> None:
        """State made during capture would be made again (zero-filled, copied) by every replay."""
        raise RuntimeError(f"fusedreg.optim.AdamW: step() is being captured in a CUDA graph, but {what}; "
                           "run step() eagerly at least once before capturing it (e.g. in the usual "
                           "warm-up iterations on a side stream), so that the state exists already")

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None):
        """One AdamW step over every parameter with a gradient; returns closure()'s loss.

        grad_scale / found_inf (one-element tensors, as GradScaler keeps them; default: the
        optimizer's `grad_scale` / `found_inf` attributes, which GradScaler.step sets): gradients
        are divided by grad_scale inside the kernel; a nonzero found_inf skips the whole step,
        step counts included. Nothing is read back to the host.
        """
        capturing = self._graph_capture_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        buckets = self._buckets(capturing)
        if not buckets:
            return loss
        clip_coef = None
        if self.max_grad_norm is not None:
            clip_coef, found_inf = self._clip_coef(buckets, grad_scale, found_inf)

        signatures = [_signature(_group_values(group)) for group in self.param_groups]
        per_device: dict[torch.device, tuple] = {}
        for key, bucket in buckets.items():
            device = key[0]
            if device not in per_device:
                found = _on(found_inf, device)
                advance = None if found is None else (found == 0).to(torch.float32)
                coef = None if clip_coef is None else clip_coef.to(device, non_blocking=True)
                per_device[device] = (_on(grad_scale, device), found, advance, coef)
            scale_d, found_d, advance_d, coef_d = per_device[device]
            torch._foreach_add_(bucket.all_steps, 1 if advance_d is None else advance_d)
            if bucket.params:
                amsgrad, maximize = key[3], key[4]
                hparams = self._hparams(key, bucket, signatures, capturing)
                op = kernel("adamw_step_", _backend.select(device, self.backend), reference)
                op(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                   bucket.max_exp_avg_sqs, bucket.steps, hparams, amsgrad, maximize,
                   scale_d, found_d, coef_d)
            for param, dense in bucket.writebacks:
                param.copy_(dense)
        return loss

    def _buckets(self, capturing: bool) -> dict[tuple, _Bucket]:
        """Parameters with gradients, bucketed by (device, dtype, state dtype, amsgrad, maximize);
        creates missing state. Runs every step over every parameter, so the common case (all
        contiguous, real) costs a handful of attribute reads; the rest goes through _dense_views."""
        buckets: dict[tuple, _Bucket] = {}
        states = self.state
        for index, group in enumerate(self.param_groups):
            _check_differentiable(group["differentiable"])
            amsgrad, maximize = bool(group["amsgrad"]), bool(group["maximize"])
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider "
                                       "SparseAdam instead")
                state = states[p]
                if not state:
                    if capturing:
                        self._refuse_state_in_capture("a parameter has no optimizer state yet")
                    self._init_state(p, state, amsgrad)
                elif amsgrad and "max_exp_avg_sq" not in state:  # amsgrad switched on mid-training
                    if capturing:
                        self._refuse_state_in_capture("amsgrad needs a max_exp_avg_sq it has not made yet")
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                max_exp_avg_sq = state["max_exp_avg_sq"] if amsgrad else None
                key = (p.device, p.dtype, exp_avg.dtype, amsgrad, maximize)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = _Bucket()
                step = state["step"]
                bucket.all_steps.append(step)
                if not p.numel():
                    continue

                param = p
                if not (p.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous()
                        and exp_avg_sq.is_contiguous() and key[1] not in _COMPLEX
                        and (max_exp_avg_sq is None or max_exp_avg_sq.is_contiguous())):
                    param, grad, (exp_avg, exp_avg_sq, max_exp_avg_sq) = self._dense_views(
                        p, grad, state, amsgrad, bucket, capturing)
                bucket.params.append(param)
                bucket.grads.append(grad)
                bucket.exp_avgs.append(exp_avg)
                bucket.exp_avg_sqs.append(exp_avg_sq)
                if amsgrad:
                    bucket.max_exp_avg_sqs.append(max_exp_avg_sq)
                bucket.steps.append(step)
                runs = bucket.runs
                if runs and runs[-1][0] == index:
                    runs[-1][1] += 1
                else:
                    runs.append([index, 1])
        return buckets

    @staticmethod
    def _dense_views(p, grad, state, amsgrad, bucket, capturing):
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
        for name in _MOMENTS[:3 if amsgrad else 2]:
            m = state[name]
            if not same_layout(m, param) or m.dtype != state_dtype:
                if capturing:
                    AdamW._refuse_state_in_capture(f"state[{name!r}] must first be re-laid out "
                                                   "like its parameter")
                m = state[name] = torch.empty_like(param, dtype=state_dtype).copy_(m)
            moments.append(m)
        if p.is_complex():
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            moments = [torch.view_as_real(m) for m in moments]
        if not amsgrad:
            moments.append(None)
        return param, grad, moments

    def _hparams(self, key: tuple, bucket: _Bucket, signatures: list[tuple], capturing: bool) -> torch.Tensor:
        """float64 [n, 5] rows (lr, beta1, beta2, weight_decay, eps) per tensor of the bucket, on
        its device; cached while the groups' values (and the tensors' versions) stay the same.

        Under CUDA-graph capture they are built afresh and not cached: rows made during capture
        hold nothing until a replay (an eager step reading them would read garbage), and a graph
        reading the cached rows would read freed memory once a new value replaced the entry."""
        groups = self.param_groups
        runs = [(index, count) for index, count in bucket.runs]
        signature = tuple((index, count, signatures[index]) for index, count in runs)
        has_tensor = [any(isinstance(v, torch.Tensor) for v in _group_values(groups[i])) for i, _ in runs]
        on_device = any(has_tensor) or any(groups[i]["capturable"] for i, _ in runs)
        every_step = any(t and groups[i]["capturable"] for t, (i, _) in zip(has_tensor, runs))
        device = key[0]
        cached = None if capturing else self._hparams_cache.get(key)
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
        self._hparams_cache[key] = (signature, hparams, keep_alive)
        return hparams

    def _clip_coef(self, buckets: dict[tuple, _Bucket], grad_scale, found_inf):
        """(clip coefficient, found_inf) for max_grad_norm, device scalars (the coefficient in the
        norm's dtype: float32, float64 for float64 gradients); sets last_grad_norm."""
        grads = [g for bucket in buckets.values() for g in bucket.grads]
        if not grads:  # only zero-size parameters have gradients
            first = next(iter(buckets))[0]
            norm = torch.zeros((), dtype=torch.float32, device=first)
        else:
            # float32 even for low-precision gradients (torch would round the norm, and so the
            # coefficient, to bfloat16), float64 where there are float64 gradients
            wide = any(key[1] in (torch.float64, torch.complex128) for key in buckets)
            norm = _total_norm(grads, self.backend, torch.float64 if wide else torch.float32)
        if grad_scale is not None:  # the norm of the unscaled gradients
            norm = norm / _on(grad_scale, norm.device).to(norm.dtype)
        self.last_grad_norm = norm
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        nonfinite = (~torch.isfinite(norm)).to(torch.float32)
        found = nonfinite if found_inf is None else _on(found_inf, norm.device) + nonfinite
        return coef, found
