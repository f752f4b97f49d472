"""The global p-norm of gradients that are DTensors (FSDP2, tensor parallelism), mixed with plain
tensors or not: one all-reduce per sharding group, nothing gathered.

    per sharding group (mesh, dims)   the p-th power sum (max |x| for inf) of its tensors' local
                                      shards: one fusedreg::grad_norm_pow per (device, dtype), as
                                      for plain tensors; then one all-reduce over the mesh dims
                                      the group is sharded over (SUM, MAX for inf; none when it is
                                      only replicated)
    plain tensors                     their power sum, all-reduced over `process_group` if given
                                      (tensors sharded by hand), else local
    total                             the groups' reduced sums added (maxed) on the first tensor's
                                      device, then the p-th root (by the caller)

Which dims a group reduces over, and why Replicate dims are left out and Partial ones summed first:
fusedreg/_dtensor.py. Every process of a mesh computes the same total, so the clip coefficient
applied to the local shards is the same everywhere. The groups' collectives run in the order the
groups first appear in the list, which every process must pass alike (the same parameters in the
same order, empty local shards included), as collectives need one order everywhere.

Cost: one scalar all-reduce per group (FSDP2 alone: one for every parameter; FSDP x TP with
column- and row-parallel layers: two, the weights sharded over both mesh dims and the row-parallel
biases over the FSDP dim only), where torch's clip_grad_norm_ redistributes its Partial norm DTensor
with one all-reduce per mesh dim. Scratch: one scalar per group. The returned norm is already
reduced: torch's inf norm comes back Partial(max), and raises on an empty local shard (FSDP2 with
more processes than rows), where an empty shard here contributes nothing.
"""
from __future__ import annotations

import math

import torch

from .. import _dtensor
from .clip import _all_reduce, _group, _pow_sum

__all__ = ["grouped_pow_sum", "sharded_pow_sum"]


def grouped_pow_sum(values: list[torch.Tensor], keys: list, p: float, process_group,
                    backend: str | None) -> torch.Tensor | None:
    """The global p-th power sum (max for inf) of the tensors whose local `values` are given, keys[i]
    being values[i]'s sharding group (mesh, dims) or None for a plain tensor; in float32 (float64 if
    any tensor is float64) on values[0]'s device. None without tensors and without a group."""
    plain = [v for v, key in zip(values, keys) if key is None]
    sharded: dict[tuple, list[torch.Tensor]] = {}
    for v, key in zip(values, keys):
        if key is not None:
            group = sharded.get(key)
            if group is None:
                sharded[key] = [v]
            else:
                group.append(v)
    sums = []
    if plain or process_group is not None:
        sums.append(_pow_sum(plain, _group(plain), p, process_group, backend))
    for (mesh, dims), group in sharded.items():  # in order of first appearance
        pow_sum = _pow_sum(group, _group(group), p, None, backend)
        if dims and mesh.get_coordinate() is not None:  # a process outside the mesh holds nothing
            pow_sum = _all_reduce(pow_sum, p, _dtensor.reduction_group(mesh, dims))
        sums.append(pow_sum)
    if not sums:
        return None
    if len(sums) == 1:
        return sums[0]
    device = values[0].device if values else sums[0].device
    acc = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    stacked = torch.stack([s.to(device, acc) for s in sums])
    return stacked.amax() if math.isinf(p) else stacked.sum()


def sharded_pow_sum(tensors: list[torch.Tensor], p: float, process_group, backend: str | None):
    """(grouped_pow_sum of `tensors`, plain or DTensor, the mesh when every tensor is a DTensor on one
    mesh, else None)."""
    entries = [_dtensor.norm_entry(t) for t in tensors]
    values = [value for value, _ in entries]
    keys = [key for _, key in entries]
    meshes = {key[0] for key in keys if key is not None}  # equal meshes (same ranks, same shape) are one
    mesh = next(iter(meshes)) if len(meshes) == 1 and all(key is not None for key in keys) else None
    return grouped_pow_sum(values, keys, p, process_group, backend), mesh
