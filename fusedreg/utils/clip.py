"""Global-norm gradient clipping with torch.nn.utils' contract, on fused multi-tensor kernels and
without a host sync.

    get_total_norm(tensors, p)   group the tensors by (device, dtype); per group one
                                 fusedreg::grad_norm_pow (sum of |x|^p, or max |x| for p = inf,
                                 accumulated in float32, float64 for float64 tensors); combine the
                                 groups' partial powers on the first tensor's device; all-reduce them
                                 over `process_group` (SUM, or MAX for inf); take the p-th root.
    clip_grads_with_norm_        coef = clamp(max_norm / (total_norm + 1e-6), max=1) on the device,
                                 then one fusedreg::multi_tensor_scale_ per group.
    clip_grad_norm_              both; the coefficient comes from the float32 norm.
    DTensor gradients            (FSDP2, tensor parallel) the same kernels on each local shard, then
                                 one all-reduce per sharding group instead of over `process_group`
                                 (_sharded_norm.py); clipping scales the local shards in place.

Nothing here reads a value back to the host except error_if_nonfinite=True, which has to.

Differences from PyTorch, all deliberate:
- The returned norm has PyTorch's dtype (the promoted dtype of the tensors: bfloat16 gradients get
  a bfloat16 norm) but is rounded once from the float32 accumulator; pass norm_dtype=torch.float32
  to get the accumulator itself. clip_grad_norm_ clips with the float32 norm where PyTorch uses
  its low-precision one: float16 gradients whose norm exceeds 65504 are clipped correctly here,
  where PyTorch's float16 norm overflows to inf and zeroes them. (The returned float16 norm is
  still inf then, and error_if_nonfinite, which judges the float32 norm, does not raise.)
- Sums of |x|^p replace PyTorch's norm of per-tensor norms: equal in exact arithmetic, different
  in the last bits; deterministic run to run.
- norm_type must be positive or inf (PyTorch also takes 0, negative p and -inf).
- An empty tensor contributes nothing to the inf norm (PyTorch raises on it).
- `foreach` is accepted for compatibility and ignored: the kernels are always multi-tensor.
- Sparse gradients count by their coalesced values; complex gradients are not supported.
"""
from __future__ import annotations

import functools
import math
import types
import warnings
from typing import Iterable

import torch

from .. import _backend, _dtensor
from ..ops._dispatch import kernel
from ..reference import clip as reference

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"]

_TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]


def _check_norm_type(norm_type) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if not p > 0:
        raise ValueError(f"norm_type must be positive or inf, got {norm_type!r} (fusedreg computes "
                         "p-norms for p > 0 and inf; use torch.nn.utils for the others)")
    return p


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_Groups = dict[tuple[torch.device, torch.dtype, torch.layout], list[torch.Tensor]]


def _group(tensors: list[torch.Tensor]) -> _Groups:
    """(device, dtype, layout) -> tensors, in order of first appearance (a fixed combination order).
    Runs every step over every gradient, hence the one-group fast path and checks per group."""
    groups: _Groups = {}
    if tensors and isinstance(tensors[0], torch.Tensor):
        first = tensors[0]
        device, dtype, layout = first.device, first.dtype, first.layout
        try:  # the common case, one group, in half the time of the general loop
            if all(t.dtype is dtype and t.layout is layout and t.device == device for t in tensors):
                groups[(device, dtype, layout)] = list(tensors)
        except AttributeError:
            pass
    for t in tensors if not groups else ():
        try:
            key = (t.device, t.dtype, t.layout)
        except AttributeError:
            index = next(i for i, u in enumerate(tensors) if u is t)
            raise TypeError(f"tensors[{index}] must be a Tensor, got {type(t).__name__}") from None
        group = groups.get(key)
        if group is None:
            groups[key] = [t]
        else:
            group.append(t)
    for (_, dtype, layout), group in groups.items():
        if not dtype.is_floating_point or layout not in (torch.strided, torch.sparse_coo):
            index = next(i for i, t in enumerate(tensors) if t is group[0])
            raise TypeError(f"tensors[{index}] must be a strided or sparse_coo tensor of a real "
                            f"floating-point dtype, got {dtype} ({layout})")
    return groups


def _local_pow_sum(groups: _Groups, first_device: torch.device, p: float, backend: str | None) -> torch.Tensor:
    """Sum of |x|^p (max |x| for inf) over every group, in float32 (float64 if any group is float64),
    on first_device: one grad_norm_pow per group (a sparse tensor counts by its coalesced values)."""
    parts = []
    for (device, _, layout), group in groups.items():
        if layout != torch.strided:
            group = [t.coalesce().values() for t in group]
        name = _backend.select(device, backend)
        parts.append(kernel("grad_norm_pow", name, reference)(group, p))
    if len(parts) == 1:
        return parts[0]
    acc = torch.float64 if any(part.dtype == torch.float64 for part in parts) else torch.float32
    stacked = torch.stack([part.to(first_device, acc) for part in parts])
    return stacked.amax() if math.isinf(p) else stacked.sum()


def _collective_device(process_group) -> torch.device:
    """Where a process without tensors puts its share of the all-reduce: on the GPU when the
    group can run NCCL (the others' shares are there), else on the CPU."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(process_group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(pow_sum: torch.Tensor, p: float, process_group) -> torch.Tensor:
    """The p-th power sums (maxima for inf) of every process, added (maxed) together. Reduced in
    float64 whatever each process accumulated in, so that processes with different gradient dtypes
    still agree on the collective's dtype; returned in pow_sum's dtype."""
    import torch.distributed as dist

    local = pow_sum.to(torch.float64)
    if math.isinf(p):
        # A MAX reduction need not propagate NaN (backends may use fmax): reduce a NaN flag with it.
        is_nan = local.isnan()
        both = torch.stack([torch.where(is_nan, 0.0, local), is_nan.to(torch.float64)])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=process_group)
        total = torch.where(both[1] > 0, math.nan, both[0])
    else:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
        total = local
    return total.to(pow_sum.dtype)


def _root(pow_sum: torch.Tensor, p: float) -> torch.Tensor:
    if p == 2.0:
        return pow_sum.sqrt()
    if p == 1.0 or math.isinf(p):
        return pow_sum
    return pow_sum.pow(1.0 / p)


def _pow_sum(tensors: list[torch.Tensor], groups: _Groups, p: float, process_group,
             backend: str | None) -> torch.Tensor | None:
    """The p-th power sum (max for inf) of plain tensors over `process_group` in the accumulation
    dtype, or None without tensors and without a group."""
    if tensors:
        pow_sum = _local_pow_sum(groups, tensors[0].device, p, backend)
    elif process_group is not None:
        pow_sum = torch.zeros((), dtype=torch.float32, device=_collective_device(process_group))
    else:
        return None
    if process_group is not None:
        pow_sum = _all_reduce(pow_sum, p, process_group)
    return pow_sum


def _check_finite(norm: torch.Tensor, p: float) -> None:
    if torch.logical_or(norm.isnan(), norm.isinf()):  # the one host sync, asked for
        raise RuntimeError(
            f"The total norm of order {p} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


def _result_dtype(groups: _Groups, norm_dtype: torch.dtype | None) -> torch.dtype:
    """norm_dtype, else PyTorch's: the promoted dtype of all tensors (float32 without any)."""
    if norm_dtype is not None:
        return norm_dtype
    dtypes = [dtype for _, dtype, _ in groups]
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def _distinct_passes(group: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`group` split into lists without a repeated tensor: list k holds the k-th occurrence of each.

    A tensor listed twice (a parameter passed twice) is scaled twice by torch (coef**2), one
    in-place multiply after the other. One multi-tensor launch would have two blocks (threads,
    programs) read-modify-write the same memory at once, and the result would depend on their
    timing; separate launches on one stream run in order. Tensors count as the same when their
    first elements share an address (views of one storage from one offset included); views that
    overlap from different offsets are not detected (that would need a sort per call). Under
    torch.compile addresses are not real, so there the tensor's identity decides."""
    if len(group) < 2:
        return [group]
    if torch.compiler.is_compiling():
        keys = [id(t) for t in group]
    else:
        keys = [t.data_ptr() for t in group]
        if len(set(keys)) == len(keys):  # the common case, in one pass over the list
            return [group]
        # empty tensors touch no memory and may all report one address
        keys = [key if t.numel() else object() for t, key in zip(group, keys)]
    passes: list[list[torch.Tensor]] = []
    seen: dict = {}
    for t, key in zip(group, keys):
        k = seen.get(key, 0)
        seen[key] = k + 1
        if k == len(passes):
            passes.append([])
        passes[k].append(t)
    return passes


def _scale_grads(groups: _Groups, max_norm: float, total_norm: torch.Tensor, backend: str | None) -> None:
    """Every tensor *= clamp(max_norm / (total_norm + 1e-6), max=1), computed on total_norm's
    device: one multi_tensor_scale_ per strided group (per pass of _distinct_passes: a tensor
    listed n times is scaled n times, as by torch)."""
    coef = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    for (device, dtype, layout), group in groups.items():
        if layout != torch.strided:
            for g in group:
                g.mul_(coef.to(device, dtype))
            continue
        op = kernel("multi_tensor_scale_", _backend.select(device, backend), reference)
        coef_acc = coef.to(device, _accumulate_dtype(dtype))
        for tensors in _distinct_passes(group):
            op(tensors, coef_acc)


def _checked_norm(tensors, norm_type, error_if_nonfinite, process_group, backend):
    """(accumulated norm or None when there are no tensors, the (device, dtype) groups of the
    tensors' local values, the mesh the norm is a DTensor on or None). DTensors go through
    _sharded_norm: one all-reduce per sharding group."""
    p = _check_norm_type(norm_type)
    mesh = None
    if _dtensor.any_dtensor(tensors):
        from ._sharded_norm import sharded_pow_sum

        groups = _group([_dtensor.local(t) for t in tensors])
        pow_sum, mesh = sharded_pow_sum(tensors, p, process_group, backend)
    else:
        groups = _group(tensors)
        pow_sum = _pow_sum(tensors, groups, p, process_group, backend)
    norm = None if pow_sum is None else _root(pow_sum, p)
    if norm is not None and error_if_nonfinite:
        _check_finite(norm, p)
    return norm, groups, mesh


def _result(norm: torch.Tensor, groups: _Groups, norm_dtype: torch.dtype | None, mesh) -> torch.Tensor:
    """The returned norm: in the result dtype; a DTensor replicated over `mesh` when every tensor was
    a DTensor on that one mesh (where torch returns a DTensor too)."""
    norm = norm.to(_result_dtype(groups, norm_dtype))
    return norm if mesh is None else _dtensor.wrap_like(norm, mesh)


def global_norm(tensors: list[torch.Tensor], sharding: list | None, norm_type: float, backend: str | None,
               norm_dtype: torch.dtype) -> torch.Tensor:
    """The global norm of plain tensors in `norm_dtype`, as a plain tensor; with `sharding` (per
    tensor None or the (mesh, dims) group of a DTensor's local shard, see fusedreg._dtensor), of the
    DTensors those local shards belong to. For optimizers that hold local shards already."""
    p = _check_norm_type(norm_type)
    if sharding is None or all(key is None for key in sharding):
        pow_sum = _pow_sum(tensors, _group(tensors), p, None, backend)
    else:
        from ._sharded_norm import grouped_pow_sum

        pow_sum = grouped_pow_sum(tensors, sharding, p, None, backend)
    return _root(pow_sum, p).to(norm_dtype)


@torch.no_grad()
def get_total_norm(tensors: _TensorOrTensors, norm_type: float | str = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None, *, process_group=None, backend: str | None = None,
                   norm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The p-norm of all `tensors` viewed as one vector (torch.nn.utils.get_total_norm).

    Returns a 0-dim tensor on tensors[0]'s device in PyTorch's dtype (the promoted dtype of the
    tensors) or `norm_dtype`; tensor(0.) on the CPU when there are no tensors. With
    `process_group`, every process's p-th power sum is all-reduced first, so each process gets the
    norm of the gradients of all processes (every process of the group must call it, with or
    without tensors). DTensors (FSDP2, tensor parallel) count as the global tensors they are, at the
    cost of one all-reduce per sharding group (process_group= then applies to the plain tensors
    only); when all tensors are DTensors on one mesh the norm is a DTensor replicated over it, as
    torch returns one. Raises RuntimeError if error_if_nonfinite and the norm is nan or inf (the
    only case that waits for the device). `foreach` is ignored.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm, groups, mesh = _checked_norm(tensors, norm_type, error_if_nonfinite, process_group, backend)
    return torch.tensor(0.0) if norm is None else _result(norm, groups, norm_dtype, mesh)


@torch.no_grad()
def clip_grads_with_norm_(parameters: _TensorOrTensors, max_norm: float, total_norm: torch.Tensor,
                          foreach: bool | None = None, *, backend: str | None = None) -> None:
    """Scales every gradient by clamp(max_norm / (total_norm + 1e-6), max=1) in place
    (torch.nn.utils.clip_grads_with_norm_): the coefficient in total_norm's dtype on its device,
    the product in float32 (float64 for float64 gradients) rounded once; DTensor gradients shard
    by shard (a DTensor total_norm is read with full_tensor(): no collective once replicated).
    `foreach` is ignored."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [_dtensor.local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return
    if _dtensor.is_dtensor(total_norm):  # replicated (ours, torch's p-norms) or Partial (torch's inf)
        total_norm = total_norm.full_tensor()
    if not isinstance(total_norm, torch.Tensor):
        # A fill on the device, not torch.tensor(x, device=...): that copies from pageable host
        # memory, which waits for the device, and is refused during CUDA-graph capture.
        total_norm = torch.full((), float(total_norm), device=grads[0].device)
    _scale_grads(_group(grads), max_norm, total_norm, backend)


@torch.no_grad()
def clip_grad_norm_(parameters: _TensorOrTensors, max_norm: float, norm_type: float | str = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None, *, process_group=None,
                    backend: str | None = None, norm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Clips the gradients of `parameters` in place to a global p-norm of at most max_norm
    (torch.nn.utils.clip_grad_norm_) and returns their total norm before clipping.

    The norm as get_total_norm (with process_group: the norm over all processes' gradients, so that
    sharded gradients are clipped by the true global norm); the coefficient
    clamp(max_norm / (norm + 1e-6), max=1) is computed on the device from the float32 (float64)
    norm and applied with one multi-tensor launch per (device, dtype). No host sync unless
    error_if_nonfinite. `foreach` is ignored.
    """
    _check_norm_type(norm_type)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
    grads = [param.grad for param in parameters if param.grad is not None]
    norm, groups, mesh = _checked_norm(grads, norm_type, error_if_nonfinite, process_group, backend)
    if norm is None:
        return torch.tensor(0.0)
    _scale_grads(groups, max_norm, norm, backend)
    return _result(norm, groups, norm_dtype, mesh)
