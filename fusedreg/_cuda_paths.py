"""The CUDA toolkit fusedreg builds with, and the headers that pip's nvidia-* wheels add to it.

torch takes its toolkit from CUDA_HOME or `which nvcc`; fusedreg/_build.py asks here instead,
because in practice nvcc can be a wrapper script outside its toolkit, and a bare toolkit can lack
the cuBLAS/cuSPARSE/... headers that ATen's CUDA headers include.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import site
import subprocess
from pathlib import Path

__all__ = ["torch_cpp_extension", "cuda_home", "nvcc_path", "nvidia_wheel_include_shim"]


def torch_cpp_extension():
    """torch.utils.cpp_extension, imported without its import-time warning about a missing CUDA
    runtime (expected on machines without a GPU, and said better by `fusedreg env`)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


@functools.lru_cache(maxsize=None)
def cuda_home() -> str | None:
    """The CUDA toolkit to build with: the one whose include/ has cuda_runtime.h.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script outside
    the toolkit (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc); nvcc's own
    dry run names the directory it really lives in.
    """
    cpp_extension = torch_cpp_extension()

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                                 text=True, timeout=30).stderr
            for line in out.splitlines():
                if line.startswith("#$ _HERE_="):
                    candidates.append(str(Path(line.split("=", 1)[1].strip()).parent))
    import torch

    candidates += [f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) \
                and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def nvcc_path() -> str | None:
    """cuda_home()'s nvcc, or None without a toolkit."""
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def nvidia_wheel_include_shim(build_dir: Path) -> Path | None:
    """A directory of links to headers that pip's nvidia-* wheels carry and CUDA_HOME lacks.

    ATen's CUDA headers include cublas/cusparse/... headers that a bare toolkit may not ship. Adding
    the wheels' include directories wholesale would shadow the toolkit's own runtime headers with
    another version's, so only the missing files are linked in.
    """
    home_include = Path(cuda_home() or "/nonexistent") / "include"
    roots = [Path(p) / "nvidia" for p in site.getsitepackages() + [site.getusersitepackages()]]
    shim = build_dir / "nvidia_include"
    linked = 0
    for root in roots:
        for include in sorted(glob.glob(str(root / "*" / "include"))):
            for entry in sorted(os.listdir(include)):
                if (home_include / entry).exists() or (shim / entry).exists():
                    continue
                shim.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.join(include, entry), shim / entry)
                linked += 1
    return shim if shim.is_dir() else None
