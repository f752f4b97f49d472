"""Shared test configuration: backends to test, tolerances, markers.

Without a CUDA device, Triton kernels run on CPU tensors under the Triton interpreter; the variable
must be set before triton compiles any kernel, hence here, before anything imports fusedreg.triton.
"""
import os
import shutil
import subprocess

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedreg  # noqa: E402
from fusedreg import _backend, _build  # noqa: E402

# dtype -> (atol, rtol) for a native backend against the fp32-math reference on the same inputs
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def native_backends(device: str) -> list[str]:
    """Backends (besides `reference`) whose kernels run on `device` tensors.

    CUDA cases are collected on every machine, so that a machine without a GPU counts (and skips)
    exactly the cases a GPU machine runs; CPU Triton cases exist only under the interpreter."""
    if device == "cuda":
        return ["cuda", "triton"]
    names = ["cpu"]
    if _backend._triton_reason(torch.device("cpu")) is None:
        names.append("triton")
    return names


def device_backend_pairs(with_reference: bool = True) -> list:
    """(device, backend) parameters: every backend on CPU tensors, then every one on CUDA tensors
    (those are marked `gpu` by pytest_collection_modifyitems)."""
    return [pytest.param(device, backend, id=f"{device}-{backend}")
            for device in ("cpu", "cuda")
            for backend in (["reference"] if with_reference else []) + native_backends(device)]


def _needs_gpu(item) -> bool:
    """A case runs on a GPU when any of its parameters is a CUDA device or the cuda backend."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for value in params.values():
        if isinstance(value, torch.device) and value.type == "cuda":
            return True
        if isinstance(value, str) and (value == "cuda" or value.startswith("cuda:")):
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marks added here must count
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" not in item.keywords and _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def cpu_library():
    """The cpu backend's library, built and loaded once; skips the requesting tests when it cannot be
    built here (no C++ compiler)."""
    reason = _build.unbuildable_reason("cpu")
    if reason:
        pytest.skip(reason)
    _build.load_library("cpu")


def build_host_program(source: str, directory, link_torch: bool = False):
    """A host harness from C++ `source` (csrc/ on the include path), built in `directory` with the
    host compiler; with link_torch, against torch's headers and its c10 / torch_cpu libraries. Skips
    the requesting test when there is no C++ compiler; returns the executable's path."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    path = directory / "harness.cpp"
    path.write_text(source)
    cmd = [cxx, "-std=c++20", "-O2", f"-I{_build.csrc_dir()}", str(path), "-o", str(directory / "harness")]
    if link_torch:
        from torch.utils import cpp_extension
        libs = cpp_extension.library_paths()
        cmd[4:4] = [f"-isystem{p}" for p in cpp_extension.include_paths()]
        cmd += [*(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    return directory / "harness"
