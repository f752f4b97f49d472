"""torch.library.opcheck on every registered op, for every backend whose kernel is registered here.

An op of _library.SCHEMAS gets its kernels from the C++ libraries (cpu/cuda backends) or from
fusedreg/triton/<op>.py (triton backend: `<op>_triton`). Pairs without a kernel yet are not
collected; the fake kernels are checked for every op regardless.
"""
import importlib
import pkgutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedreg.triton
from fusedreg import _backend, _build, _library
from conftest import native_backends
from op_samples import SAMPLES


def _load_backend(backend: str, device: str) -> bool:
    if backend in ("cpu", "cuda"):
        try:
            _build.load_library(backend)
        except _build.BuildError:
            return False
        return True
    if device == "cpu" and _backend._triton_reason(torch.device("cpu")) is not None:
        return False  # CPU tensors need the interpreter; CUDA cases are collected everywhere
    for module in pkgutil.iter_modules(fusedreg.triton.__path__):
        importlib.import_module(f"fusedreg.triton.{module.name}")
    return True


def _cases():
    cases = []
    for device in ("cpu", "cuda"):
        for backend in native_backends(device):
            if not _load_backend(backend, device):
                continue
            for name in _library.SCHEMAS:
                qualname = _library.qualname(name, backend)
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, device.upper()):
                    cases.append(pytest.param(name, backend, device, id=f"{name}-{device}-{backend}"))
    return cases


def test_every_schema_has_samples():
    assert set(_library.SCHEMAS) <= set(SAMPLES)


@pytest.mark.parametrize("name", sorted(_library.SCHEMAS))
def test_fake_kernel_runs(name):
    op = _library.op(name)
    for args in SAMPLES[name]("cpu", torch.float32):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
            op(*fake_args)


@pytest.mark.parametrize("name,backend,device", _cases())
def test_opcheck(name, backend, device):
    op = _library.op(name, backend)
    dtypes = [torch.float32] if name.startswith("_philox") else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for args in SAMPLES[name](device, dtype):
            torch.library.opcheck(op, args)
