"""convert_modules: swap torch's Dropout / BatchNorm / SyncBatchNorm for fusedreg's, in place.

The replacement takes over the old module's whole state (its __dict__: parameters, buffers, hooks,
training flag, hyperparameters), so parameter identity, optimizer references, devices, dtypes and
state_dict keys are unchanged and a checkpoint loads on either side. fusedreg's modules subclass
the torch ones they replace, so isinstance checks in user code keep working.
"""
from __future__ import annotations

import torch


def _replacements(dropout: bool, batchnorm: bool) -> dict[type, type]:
    from . import BatchNorm1d, BatchNorm2d, BatchNorm3d, Dropout, SyncBatchNorm

    table: dict[type, type] = {}
    if dropout:
        table[torch.nn.Dropout] = Dropout
    if batchnorm:
        table.update({torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                      torch.nn.BatchNorm3d: BatchNorm3d, torch.nn.SyncBatchNorm: SyncBatchNorm})
    return table


def _swap(old: torch.nn.Module, cls: type, backend: str | None) -> torch.nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    new.backend = backend
    return new


def convert_modules(module: torch.nn.Module, *, dropout: bool = True, batchnorm: bool = True,
                    backend: str | None = None) -> torch.nn.Module:
    """Replace torch.nn.Dropout and BatchNorm{1,2,3}d / SyncBatchNorm anywhere in `module` (the
    root included) by fusedreg's; returns the module (a new object only when the root itself was
    replaced). Exact classes only: subclasses of these are user code and are left alone, as are
    modules fusedreg already provides, so converting twice changes nothing."""
    table = _replacements(dropout, batchnorm)
    root_cls = table.get(type(module))
    if root_cls is not None:
        return _swap(module, root_cls, backend)
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            cls = table.get(type(child))
            if cls is not None:
                setattr(parent, name, _swap(child, cls, backend))
    return module
