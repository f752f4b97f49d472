"""The yardstick every case is compared with: device memory copy bandwidth, measured in the same run.

Every op here is memory-bound, so the best it can do is move its floor bytes at the speed of a
plain copy. The copy is large (1 GiB on a GPU, far beyond L2; 64-256 MiB on a CPU, beyond its
caches yet quick) and counts bytes read plus bytes written, as the cases' floors do.

Also registers the harness's own sanity case, op "copy": `copy_` into a preallocated tensor (the
subject) against `clone` (which also allocates). Its GB/s should sit near the copy bandwidth at
large sizes; if it does not, the timing is wrong, not the kernels.
"""
from __future__ import annotations

import torch

from .registry import Case, register
from .timing import Timer

__all__ = ["copy_bandwidth"]


def copy_bandwidth(device: str, timer: Timer, quick: bool) -> dict:
    """{"bytes": size of the copied buffer, "time_ms", "gbps": (read + write bytes) / time}."""
    if device == "cuda":
        nbytes = 2**30
    else:
        nbytes = 64 * 2**20 if quick else 256 * 2**20
    numel = nbytes // 4
    src = torch.rand(numel, device=device)  # random, not zeros: zeros can move faster than data
    dst = torch.empty_like(src)
    measured = timer.time(lambda: dst.copy_(src))
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "bytes": nbytes,
        "time_ms": measured.median_ms,
        "time_ms_q20": measured.q20_ms,
        "time_ms_q80": measured.q80_ms,
        "gbps": 2 * nbytes / (measured.median_ms * 1e-3) / 1e9,
        "method": f"dst.copy_(src), float32, {nbytes // 2**20} MiB each, read + write bytes",
    }


def _make(size, dtype, device):
    src = torch.randn(size, device=device).to(dtype)
    return src, torch.empty_like(src)


def _copy_into(inputs):
    src, dst = inputs
    return lambda: dst.copy_(src)


def _clone(inputs):
    src, _ = inputs
    return lambda: src.clone()


register(Case(
    op="copy",
    name="copy_",
    make=_make,
    bytes_moved=lambda size, dtype: 2 * size * dtype.itemsize,  # read src, write dst
    impls={"torch copy_": _copy_into, "torch clone": _clone},
    sizes={"cuda": [2**20, 2**24, 2**28], "cpu": [2**16, 2**20, 2**22, 2**24]},
    quick_sizes={"cuda": [2**20, 2**26], "cpu": [2**16, 2**23]},
    measure_memory=True,
    note="harness sanity check: should approach the copy bandwidth at large sizes",
))
