"""Which callable runs op `name` on a resolved backend."""
from __future__ import annotations

from types import ModuleType

from .. import _library

# (name, backend) -> the op's overload. A registered op never goes away, so the lookup through
# torch.ops (Python-level attribute access on the namespace and the packet: ~15 us a call on the
# 2-core VM when a large op has just evicted the caches) runs once per op and backend.
_overloads: dict[tuple[str, str], object] = {}


def kernel(name: str, backend: str, reference: ModuleType):
    """`reference.<name>` for the reference backend, else the registered op (cpu and cuda share
    `fusedreg::<name>`, which the dispatcher routes by device; triton has `fusedreg::<name>_triton`):
    its one overload, called directly rather than through the packet's Python-level lookup."""
    found = _overloads.get((name, backend))
    if found is not None:
        return found
    if backend == "reference":
        return getattr(reference, name)
    found = _overloads[(name, backend)] = _library.op(name, backend).default
    return found
