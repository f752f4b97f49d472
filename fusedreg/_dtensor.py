"""DTensor parameters and gradients (FSDP2's fully_shard, tensor parallelism over a DeviceMesh):
what the fused kernels see of them, and which processes a global norm reduces over.

The kernels take plain tensors, so a DTensor is always handled through its local shard
(to_local(): the real local piece, without FSDP2's padding, possibly empty):
- AdamW's update is elementwise: parameter, gradient and moments are stepped shard by shard. The
  moments stay DTensors with the parameter's mesh and placements (what torch.optim.AdamW keeps),
  so state_dict() and torch.distributed.checkpoint see the same state as torch's.
- A global norm is a sum (a max, for inf) over the elements of every tensor. Each process sums its
  local shards' p-th powers with the same one-launch kernel as for plain tensors; the sums of all
  tensors sharded over the same mesh dimensions (a "sharding group", keyed here by (mesh, dims)) are
  then all-reduced together, once, over those dimensions only:
    Shard(d), _StridedShard  the processes hold disjoint pieces: reduced over;
    Replicate                they hold copies: not reduced over, so each copy counts once;
    Partial                  they hold addends of the true values, whose norm is not a function of
                             the addends' norms: the gradient is first summed over those dims into a
                             local-shard-sized temporary (one all-reduce of the shard; torch's norm
                             reduces it too) and then counts as Replicate.
  Nothing is ever gathered: the scratch is one scalar per group. Parameters are never Partial;
  AdamW brings a gradient whose placements differ from its parameter's to the parameter's first.

A process group spanning several (not all) mesh dimensions is made once per (mesh, dims) and cached:
new_group(use_local_synchronization=True) needs only its own members to take part, so it is safe to
create lazily, when a sharding group first needs it. One dimension uses the mesh's own group, all
of a mesh spanning every process the default group.
"""
from __future__ import annotations

import sys

import torch

from ._layout import same_layout

__all__ = ["any_dtensor", "dtensor_class", "is_dtensor", "local", "norm_entry", "norm_inputs",
           "reduction_group", "step_view", "wrap_like"]


def dtensor_class():
    """torch's DTensor class, or None while torch.distributed.tensor is not imported: without that
    module no DTensor can exist, so plain-tensor code never pays for the import."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors) -> bool:
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """t's local shard if it is a DTensor (the tensor itself, not a copy: writing it writes t), else t."""
    return t.to_local() if is_dtensor(t) else t


def _sharded_dims(placements) -> tuple[int, ...]:
    return tuple(d for d, placement in enumerate(placements) if not placement.is_replicate())


def norm_entry(t: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """(the local values whose |x|^p a norm sums, sharding group) for a gradient: a plain tensor is
    its own values with group None; a DTensor its local shard with (mesh, dims reduced over), Partial
    dims summed first (see the module docstring)."""
    if not is_dtensor(t):
        return t, None
    mesh, placements = t.device_mesh, t.placements
    if any(placement.is_partial() for placement in placements):
        from torch.distributed.tensor import Replicate

        placements = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
        t = t.redistribute(mesh, placements)
    return t.to_local(), (mesh, _sharded_dims(placements))


def wrap_like(value: torch.Tensor, mesh) -> torch.Tensor:
    """A value every process of `mesh` holds alike (a total norm), as a DTensor replicated over it."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)


# ---------------------------------------------------------------------------- process groups

# (mesh, dims) -> (the default group it was found under, the group): none outlives a re-initialisation
_REDUCTION_GROUPS: dict[tuple, tuple] = {}


def reduction_group(mesh, dims: tuple[int, ...]):
    """The process group of this process's ranks along mesh dimensions `dims` (the others fixed at
    this process's coordinate): the mesh's own group for one dimension, the default group when it
    spans every process, else a group made once per (mesh, dims) and cached."""
    import torch.distributed as dist

    if len(dims) == 1:
        return mesh.get_group(dims[0])
    world = dist.group.WORLD
    cached = _REDUCTION_GROUPS.get((mesh, dims))
    if cached is not None and cached[0] is world:
        return cached[1]
    coordinate = mesh.get_coordinate()
    index = tuple(slice(None) if d in dims else c for d, c in enumerate(coordinate))
    ranks = sorted(mesh.mesh[index].reshape(-1).tolist())
    if ranks == list(range(dist.get_world_size())):
        group = world
    else:
        group = dist.new_group(ranks, use_local_synchronization=True)
    _REDUCTION_GROUPS[(mesh, dims)] = (world, group)
    return group


# ---------------------------------------------------------------------------- AdamW

def _aligned_moment(m, p, p_local: torch.Tensor, dtype: torch.dtype, name: str, capturing: bool):
    """(moment DTensor laid out for the kernel, its local shard): the parameter's mesh and
    placements, its local shard's layout, the state dtype. Re-laid-out moments replace the state's."""
    if not is_dtensor(m):
        raise RuntimeError(f"fusedreg.optim.AdamW: state[{name!r}] of a DTensor parameter is a plain "
                           f"tensor; load sharded optimizer state through "
                           f"torch.distributed.checkpoint.state_dict.set_optimizer_state_dict")
    mesh, placements = p.device_mesh, p.placements
    changed = False
    if m.device_mesh != mesh or m.placements != placements:
        m, changed = m.redistribute(mesh, placements), True
    m_local = m.to_local()
    if not same_layout(m_local, p_local) or m_local.dtype != dtype:
        from torch.distributed.tensor import DTensor

        m_local = torch.empty_like(p_local, dtype=dtype).copy_(m_local)
        m = DTensor.from_local(m_local, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
        changed = True
    if changed and capturing:
        from .optim._adamw_state import refuse_state_in_capture

        refuse_state_in_capture(f"state[{name!r}] must first be re-laid out like its parameter's shard")
    return m, m_local, changed


def step_view(p, grad, state: dict, moments: tuple[str, ...], capturing: bool):
    """(local parameter, local gradient, state with local moments, sharding group) for stepping a
    DTensor parameter on its shard. The returned state is a view for the kernel (the step count is
    the state's own); moments re-laid out for it are written back to `state` as DTensors."""
    if not is_dtensor(grad):
        raise RuntimeError(f"fusedreg.optim.AdamW: a DTensor parameter of shape {tuple(p.shape)} has a "
                           f"plain-tensor gradient; its gradient must be a DTensor too")
    mesh, placements = p.device_mesh, p.placements
    if grad.device_mesh != mesh or grad.placements != placements:
        grad = grad.redistribute(mesh, placements)  # e.g. a Partial gradient of a replicated bias
    p_local = p.to_local()
    view = dict(state)
    dtype = state[moments[0]].dtype
    for name in moments:
        m, m_local, changed = _aligned_moment(state[name], p, p_local, dtype, name, capturing)
        if changed:
            state[name] = m
        view[name] = m_local
    return p_local, grad.to_local(), view, (mesh, _sharded_dims(placements))


def norm_inputs(buckets) -> tuple[list[torch.Tensor], list]:
    """(values, sharding groups) for AdamW's global norm: the gradients of each bucket that are not
    DTensors' (group None), then every DTensor's local gradient with its group, in parameter order
    and empty ones included: so every process lists every group, first at the same place, and takes
    part in its all-reduce in the same order. Complex ones as real views, as the buckets hold them."""
    values: list[torch.Tensor] = []
    keys: list = []
    for bucket in buckets:
        stepped = {index for index, grad, _ in bucket.sharded_grads if grad.numel()}
        plain = [g for index, g in enumerate(bucket.grads) if index not in stepped]
        values.extend(plain)
        keys.extend([None] * len(plain))
        for _, grad, key in bucket.sharded_grads:
            values.append(torch.view_as_real(grad) if grad.is_complex() else grad)
            keys.append(key)
    return values, keys
