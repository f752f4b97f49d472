"""AdamW's step plan: what a step derives from the optimizer's structure, kept from one step to the next.

A step buckets the parameters with gradients by (device, dtype, state dtype, amsgrad, maximize),
builds each bucket's hyperparameter rows and looks up the op that runs it. On a small model that
host work costs more than the kernels, and from one step to the next nothing it depends on
changes, so a full step (AdamW._buckets) records its inputs in a plan and later steps check them
instead of deriving the buckets again:
- per parameter position: whether it has a gradient, and if so its class, device, dtype, whether it
  is empty, its state's presence and moment dtype, and that parameter, gradient and moments are
  dense-contiguous and the gradient strided. These are exactly the inputs of the bucketing, so
  equal inputs give the buckets a full step would build; any difference (a new parameter group,
  load_state_dict, `.data =` to another dtype or device, a parameter without a gradient, state
  cleared or replaced by something else) sends the step down the full path, which plans anew.
- per param group: its parameter count, amsgrad / maximize / differentiable / capturable, and its
  hyperparameter objects (by identity: a scheduler assigning a float replaces the object; Tensor
  values also by version counter, which an in-place `fill_` bumps; betas in a mutable list, and
  capturable groups with Tensor values, go to hparam_rows every step). A change rebuilds the rows
  through hparam_rows, whose cache compares values.
- the backend choice (the optimizer's `backend`, else fusedreg's current one): the op of each
  bucket is looked up again when it changes; backend availability is resolved once per choice,
  as torch.compile's trace does.
The plan holds no parameter, gradient or state tensor (they are gathered afresh every step, which a
step must do anyway), so it keeps nothing alive that the optimizer lets go of: state offloaded or
cleared is freed as without it. Never planned (they take the full path every step): CUDA-graph
capture, DTensor parameters, and any tensor stepped through a dense copy (non-dense or complex).
"""
from __future__ import annotations

import torch

from ._adamw_hparams import tensor_version
from ._adamw_state import Bucket

__all__ = ["StepPlan", "position"]

_STRIDED = torch.strided


def position(p: torch.Tensor, key: tuple, sent: bool) -> tuple:
    """What a full step saw of a parameter with a gradient, as StepPlan.gather checks it: (class,
    device, dtype, state dtype, sent to the kernel); the bucket's index is appended by StepPlan."""
    return (type(p), key[0], key[1], key[2], sent)


def _hyperparameters(group: dict) -> tuple:
    """(lr, betas, weight_decay, eps, their Tensors, those Tensors' versions, whether the rows are
    rebuilt every step): betas in a mutable list, or a value neither a Python number nor a Tensor
    (a NumPy array, say), can change unseen, and capturable rows with Tensor values are rebuilt on
    the device every step (see hparam_rows)."""
    lr, betas, weight_decay, eps = group["lr"], group["betas"], group["weight_decay"], group["eps"]
    values = (lr, *betas, weight_decay, eps)
    tensors = tuple(v for v in values if isinstance(v, torch.Tensor))
    every_step = (type(betas) is not tuple or bool(tensors and group["capturable"])
                  or len(tensors) + sum(type(v) in (float, int) for v in values) != len(values))
    return lr, betas, weight_decay, eps, tensors, tuple(tensor_version(t) for t in tensors), every_step


class StepPlan:
    """The buckets' structure, rows and ops of the last full step, and what they were derived from."""
    __slots__ = ("groups", "hyper", "keys", "ids", "runs", "all_steps_apart", "rows", "choice", "ops")

    def __init__(self, param_groups: list[dict], positions: list[list], buckets: dict[tuple, Bucket]) -> None:
        """`positions`: per group, per parameter, None (no gradient) or position(...) of the full
        step that built `buckets`."""
        index = {key: i for i, key in enumerate(buckets)}
        self.groups = [((group["amsgrad"], group["maximize"], group["differentiable"], group["capturable"]),
                        len(group["params"]),
                        tuple(None if e is None else e + (index[_key(e, group)],) for e in entries))
                       for group, entries in zip(param_groups, positions)]
        self.hyper = [_hyperparameters(group) for group in param_groups]
        self.keys = list(buckets)
        self.ids = [bucket.ids for bucket in buckets.values()]
        self.runs = [bucket.runs for bucket in buckets.values()]
        # whether a bucket has empty parameters, whose steps count but are not sent to the kernel
        self.all_steps_apart = [len(bucket.all_steps) != len(bucket.steps) for bucket in buckets.values()]
        self.rows: list[torch.Tensor | None] = [None] * len(buckets)  # filled by the step
        self.choice: str | None = None
        self.ops: list = [None] * len(buckets)

    def gather(self, param_groups: list[dict], states: dict) -> dict[tuple, Bucket] | None:
        """This step's buckets if every input of the bucketing is as planned, else None, having
        changed nothing: the full path then buckets, creates state and raises as it always does."""
        if len(param_groups) != len(self.groups):
            return None
        lists = [([], [], [], [], [], [], [] if apart else None)
                 for apart in self.all_steps_apart]
        for group, (flags, count, entries) in zip(param_groups, self.groups):
            if (group["amsgrad"], group["maximize"], group["differentiable"], group["capturable"]) != flags:
                return None
            params = group["params"]
            if len(params) != count:
                return None
            amsgrad = flags[0]
            for p, entry in zip(params, entries):
                grad = p.grad
                if entry is None:
                    if grad is not None:
                        return None
                    continue
                if grad is None or grad.layout is not _STRIDED:
                    return None
                cls, device, dtype, state_dtype, sent, b = entry
                state = states.get(p)
                if (type(p) is not cls or p.dtype is not dtype or p.device != device or not state):
                    return None
                step, exp_avg, exp_avg_sq = state.get("step"), state.get("exp_avg"), state.get("exp_avg_sq")
                max_exp_avg_sq = state.get("max_exp_avg_sq") if amsgrad else None
                if (step is None or exp_avg is None or exp_avg_sq is None or exp_avg.dtype is not state_dtype
                        or (amsgrad and max_exp_avg_sq is None)):
                    return None
                params_b, grads_b, exp_avgs_b, exp_avg_sqs_b, max_b, steps_b, all_steps_b = lists[b]
                if not sent:
                    if p.numel():
                        return None
                    all_steps_b.append(step)
                    continue
                if not (p.numel() and p.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous()
                        and exp_avg_sq.is_contiguous()
                        and (max_exp_avg_sq is None or max_exp_avg_sq.is_contiguous())):
                    return None
                params_b.append(p)
                grads_b.append(grad)
                exp_avgs_b.append(exp_avg)
                exp_avg_sqs_b.append(exp_avg_sq)
                if amsgrad:
                    max_b.append(max_exp_avg_sq)
                steps_b.append(step)
                if all_steps_b is not None:
                    all_steps_b.append(step)
        buckets = {}
        for key, filled, ids, runs in zip(self.keys, lists, self.ids, self.runs):
            bucket = Bucket.__new__(Bucket)  # without Bucket()'s empty lists: these are filled already
            (bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.max_exp_avg_sqs,
             bucket.steps, all_steps) = filled
            bucket.all_steps = bucket.steps if all_steps is None else all_steps
            bucket.ids, bucket.runs, bucket.writebacks, bucket.sharded_grads = ids, runs, [], []
            buckets[key] = bucket
        return buckets

    def hyperparameters_changed(self, param_groups: list[dict]) -> bool:
        """Whether any group's hyperparameters may differ from those the rows were built from (the
        objects, or a Tensor's version); records the current ones."""
        changed = False
        for i, (group, (lr, betas, weight_decay, eps, tensors, versions, every_step)) in enumerate(
                zip(param_groups, self.hyper)):
            if (every_step or group["lr"] is not lr or group["betas"] is not betas
                    or group["weight_decay"] is not weight_decay or group["eps"] is not eps
                    or (tensors and tuple(tensor_version(t) for t in tensors) != versions)):
                self.hyper[i] = _hyperparameters(group)
                changed = True
        return changed


def _key(entry: tuple, group: dict) -> tuple:
    """The bucket key of a planned position (see AdamW._buckets)."""
    return (entry[1], entry[2], entry[3], bool(group["amsgrad"]), bool(group["maximize"]))
