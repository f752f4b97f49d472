"""Which callable runs op `name` on a resolved backend."""
from __future__ import annotations

from types import ModuleType

from .. import _library


def kernel(name: str, backend: str, reference: ModuleType):
    """`reference.<name>` for the reference backend, else the registered op (cpu and cuda share
    `fusedreg::<name>`, which the dispatcher routes by device; triton has `fusedreg::<name>_triton`):
    its one overload, called directly rather than through the packet's Python-level lookup."""
    if backend == "reference":
        return getattr(reference, name)
    return _library.op(name, backend).default
