"""What machine a result came from: written into every benchmark file and printed by `fusedreg env`.

Deliberately free of the host name: results are committed to the repository.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess

import torch

__all__ = ["machine_info", "machine_label", "cpu_model", "nvidia_driver", "triton_version",
           "last_level_cache_bytes"]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache level as Linux reports it for cpu0 (None if unknown): a
    benchmark whose bytes fit in it may be timed out of cache and beat the copy bandwidth."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    with contextlib.suppress(OSError):
        for index in sorted(os.listdir(root)):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(root, index, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(root, index, "size")) as f:
                    text = f.read().strip()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
                size = int(text.rstrip("KMGkmg")) * scale
                if best is None or level > best[0] or (level == best[0] and size > best[1]):
                    best = (level, size)
    return best[1] if best else None


def nvidia_driver() -> str | None:
    """The NVIDIA driver release (e.g. "580.95.05"); torch exposes only the CUDA API level."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split("\n")[0].strip()
    return None


def cuda_driver_api() -> str | None:
    """The CUDA version the installed driver supports (from cudaDriverGetVersion)."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is None or not torch.cuda.is_available():
        return None
    with contextlib.suppress(Exception):
        version = int(get())
        return f"{version // 1000}.{version % 1000 // 10}"
    return None


def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return getattr(triton, "__version__", "unknown")


def gpu_info(index: int = 0) -> dict:
    props = torch.cuda.get_device_properties(index)
    return {
        "gpu": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sm_count": props.multi_processor_count,
    }


def machine_info(device: str) -> dict:
    """Versions and hardware that a benchmark result depends on."""
    from fusedreg import __version__

    info = {
        "device": device,
        "fusedreg": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": _cpu_capability(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "cuda": torch.version.cuda,
        "triton": triton_version(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info.update(gpu_info(torch.cuda.current_device()))
        info["driver"] = nvidia_driver()
        info["cuda_driver_api"] = cuda_driver_api()
    return info


def _cpu_capability() -> str:
    """ATen's CPU capability (the SIMD level torch's own CPU kernels run at), when torch says."""
    with contextlib.suppress(Exception):
        return torch.backends.cpu.get_cpu_capability()
    return "unknown"


def machine_label(info: dict) -> str:
    """One line naming the machine, for plot titles and table headers."""
    if info.get("gpu"):
        parts = [info["gpu"], f"torch {info['torch']}", f"CUDA {info.get('cuda')}"]
        if info.get("driver"):
            parts.append(f"driver {info['driver']}")
    else:
        parts = [f"{info['cpu']} ({info['cpu_count']} cores)", f"torch {info['torch']}"]
    return ", ".join(parts)

