"""One run of torch's ninja-based JIT build (torch.utils.cpp_extension.load) for fusedreg's libraries.

What the run needs from the process is set for it and restored after it, whatever happens: torch's
CUDA_HOME global (the toolkit fusedreg found, for includes, nvcc and -lcudart), TORCH_CUDA_ARCH_LIST
and MAX_JOBS. ninja's output goes to build_dir/build.log (_build_log.py), and any failure (ninja,
compiler, loader) becomes the caller's error type with the log's first error line and its path.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from ._build_log import first_error, ninja_output_to
from ._cuda_paths import torch_cpp_extension

__all__ = ["run_build", "max_jobs"]


def max_jobs() -> int:
    """Parallel compile jobs: MAX_JOBS if set, else one per core, but no more than memory allows
    (an nvcc job of a torch extension can take ~2 GiB)."""
    env = os.environ.get("MAX_JOBS")
    if env and env.isdigit():
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 2)))


def run_build(name: str, sources: list[Path], flags: dict[str, list[str]], include_paths: list[str],
              build_dir: Path, verbose: bool, error: Callable[[str, Path], Exception],
              cuda_home: str | None = None, arch_list: str | None = None) -> Path:
    """Build shared library `name` (no Python module) from sources into build_dir and return its
    path. flags: cflags / cuda_cflags / ldflags; cuda_home and arch_list given for a CUDA library.
    On failure raises error(message, log path)."""
    cpp_extension = torch_cpp_extension()
    env_backup = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    torch_cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # torch reads this global for includes, nvcc, -lcudart
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list or ""
    os.environ["MAX_JOBS"] = str(max_jobs())
    # A lock file left by torch's own (older, existence-based) build lock would block forever; the
    # caller holds fusedreg's own lock (_build_lock.py), so any such file is stale.
    with contextlib.suppress(FileNotFoundError):
        (build_dir / "lock").unlink()
    log_path = build_dir / "build.log"
    try:
        with ninja_output_to(log_path, echo_progress=verbose):
            built = cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=flags["cflags"],
                extra_cuda_cflags=flags["cuda_cflags"] or None,
                extra_ldflags=flags["ldflags"],
                extra_include_paths=include_paths,
                build_directory=str(build_dir),
                with_cuda=cuda_home is not None,
                is_python_module=False,
                verbose=True,
            )
    except Exception as exc:  # ninja, compiler and loader failures all end here
        with open(log_path, "a") as log:
            log.write(f"\n{type(exc).__name__}: {exc}\n")
        raise error(f"building {name} failed: {first_error(log_path) or exc}", log_path) from exc
    finally:
        cpp_extension.CUDA_HOME = torch_cuda_home
        for key, value in env_backup.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Path(built)
