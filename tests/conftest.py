"""Shared test configuration: backends to test, tolerances, markers.

Without a CUDA device, Triton kernels run on CPU tensors under the Triton interpreter; the variable
must be set before triton compiles any kernel, hence here, before anything imports fusedreg.triton.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedreg  # noqa: E402
from fusedreg import _backend  # noqa: E402

# dtype -> (atol, rtol) for a native backend against the fp32-math reference on the same inputs
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def native_backends(device: str) -> list[str]:
    """Backends (besides `reference`) whose kernels run on `device` tensors in this environment."""
    if device == "cuda":
        return ["cuda", "triton"] if HAS_CUDA else []
    names = ["cpu"]
    if _backend._triton_reason(torch.device("cpu")) is None:
        names.append("triton")
    return names


def device_under_test() -> str:
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
