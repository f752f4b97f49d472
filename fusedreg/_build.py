"""JIT build of the two C++ libraries in csrc/ and their loading.

fusedreg_cpu  = csrc/*.cpp  (C++ only: CPU kernels + TORCH_LIBRARY_IMPL(fusedreg, CPU))
fusedreg_cuda = csrc/*.cu   (C++/CUDA: CUDA kernels + TORCH_LIBRARY_IMPL(fusedreg, CUDA))

Both are shared libraries without a Python module: loading one runs its static operator
registrations (the schemas themselves live in fusedreg/_library.py). Nothing here runs at
`import fusedreg`; a library is built the first time a backend needs it. The CUDA toolkit it is
built with is found by fusedreg/_cuda_paths.py; the compile itself (torch's ninja build) runs in
fusedreg/_build_ninja.py.

Robustness rules (each one answers a failure seen in practice with JIT extensions):
- The cache directory is keyed by torch, CUDA and Python versions: an upgraded torch never loads a
  library built against another ABI.
- A stamp file records a digest of every source, header and flag. A matching stamp means the
  library was built completely from these sources and is loaded directly; no stamp means the last
  build may have been killed midway, so its directory is wiped before building again.
- Builders serialize on an flock()ed lock file (_build_lock.py). The kernel drops the lock when its
  holder dies, so a killed build never blocks the next one; a live but stuck holder makes waiters
  give up after FUSEDREG_BUILD_LOCK_TIMEOUT seconds with a message naming the lock file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ._build_lock import exclusive as _lock_exclusive
from ._build_ninja import max_jobs as _max_jobs
from ._build_ninja import run_build as _run_build
from ._cuda_paths import cuda_home, nvcc_path, nvidia_wheel_include_shim, torch_cpp_extension

__all__ = ["BuildError", "load_library", "library_status", "unbuildable_reason", "build_ahead",
           "built_objects", "source_digest"]

_PACKAGE_DIR = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """A C++/CUDA library of fusedreg failed to build or load; `log_path` holds the full log."""

    def __init__(self, message: str, log_path: str | os.PathLike | None = None):
        self.log_path = None if log_path is None else str(log_path)
        if self.log_path:
            message = f"{message}\n  build log: {self.log_path}"
        super().__init__(message)


@dataclass(frozen=True)
class _Spec:
    kind: str          # "cpu" | "cuda"
    name: str          # library (and build directory) name
    suffix: str        # which csrc/ files belong to it
    seconds_per_file: int  # rough single-core compile time, for the "this takes ~N" line


_SPECS = {
    "cpu": _Spec("cpu", "fusedreg_cpu", ".cpp", 25),
    "cuda": _Spec("cuda", "fusedreg_cuda", ".cu", 75),
}

_lock = threading.Lock()
_loaded: dict[str, Path] = {}
_failed: dict[str, BuildError] = {}


# ----------------------------------------------------------------------------- locations

def csrc_dir() -> Path:
    """FUSEDREG_CSRC_DIR if set, else csrc/ of a source checkout, else the copy an installed wheel
    carries as fusedreg/_csrc."""
    env = os.environ.get("FUSEDREG_CSRC_DIR")
    if env:
        return Path(env).resolve()
    for candidate in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc"):
        if (candidate / "common").is_dir():
            return candidate
    raise BuildError(f"fusedreg's C++ sources are missing (looked in {_PACKAGE_DIR / '_csrc'} "
                     f"and {_PACKAGE_DIR.parent / 'csrc'})")


def version_key() -> str:
    """Directory name that changes whenever the ABI the libraries are built against changes."""
    import torch

    cuda = torch.version.cuda or "none"
    return f"torch-{torch.__version__}_cuda-{cuda}_py{sys.version_info[0]}{sys.version_info[1]}".replace("+", "-")


def cache_root() -> Path:
    env = os.environ.get("FUSEDREG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "fusedreg"


def _build_dir(spec: _Spec, root: Path | None = None) -> Path:
    return (root or cache_root()) / version_key() / spec.name


def _prebuilt_dir(spec: _Spec) -> Path:
    return _PACKAGE_DIR / "_prebuilt" / version_key() / spec.name


# ----------------------------------------------------------------------------- prerequisites

def unbuildable_reason(kind: str) -> str | None:
    """Why library `kind` cannot be built on this machine, or None when it can (or is prebuilt)."""
    spec = _SPECS[kind]
    if _stamp_matches(_prebuilt_dir(spec), spec):
        return None
    cpp_extension = torch_cpp_extension()

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (set CXX or install g++)"
    if kind == "cuda":
        import torch

        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is a CPU-only build"
        if nvcc_path() is None:
            return "no CUDA toolkit found (nvcc and include/cuda_runtime.h; set CUDA_HOME)"
    return None


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST to build for: the user's, else the visible GPUs', else Hopper (sm_90)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    import torch

    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "9.0"


# ----------------------------------------------------------------------------- digest / stamp

def _sources(spec: _Spec) -> list[Path]:
    return sorted(p for p in csrc_dir().iterdir() if p.suffix == spec.suffix)


def _flags(spec: _Spec) -> dict[str, list[str]]:
    # No -std: torch's build adds the language standard its own headers need (C++17 or C++20).
    cflags = ["-O3"]
    if spec.kind == "cpu":
        cflags += ["-fopenmp"]
        return {"cflags": cflags, "cuda_cflags": [], "ldflags": ["-fopenmp"]}
    cuda_cflags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                   "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                   "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return {"cflags": cflags, "cuda_cflags": cuda_cflags, "ldflags": []}


def _digest(spec: _Spec) -> str:
    h = hashlib.sha256()
    root = csrc_dir()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh", ".cpp", ".cu"}):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    h.update(repr((spec, _flags(spec), version_key())).encode())
    if spec.kind == "cuda":
        h.update(cuda_arch_list().encode())
    return h.hexdigest()


def _stamp_path(build_dir: Path, spec: _Spec) -> Path:
    return build_dir / f"{spec.name}.stamp"


def _library_file(build_dir: Path, spec: _Spec) -> Path:
    return build_dir / f"{spec.name}.so"


def _stamp_matches(build_dir: Path, spec: _Spec) -> bool:
    stamp = _stamp_path(build_dir, spec)
    try:
        return (stamp.read_text().strip() == _digest(spec)
                and _library_file(build_dir, spec).is_file())
    except (OSError, BuildError):
        return False


# ----------------------------------------------------------------------------- build

def _exclusive(lock_path: Path, what: str):
    """The builders' lock (_build_lock.py); a timeout is a BuildError naming the lock file."""
    return _lock_exclusive(lock_path, what, BuildError)


def _compile(spec: _Spec, build_dir: Path, verbose: bool) -> Path:
    """Run torch's ninja-based JIT build (_build_ninja.py) into build_dir; return the library path."""
    sources = _sources(spec)
    if not sources:
        raise BuildError(f"no {spec.suffix} sources in {csrc_dir()}")
    include_paths = [str(csrc_dir())]
    cuda = spec.kind == "cuda"
    if cuda:
        shim = nvidia_wheel_include_shim(build_dir)
        if shim is not None:
            include_paths.append(str(shim))
    return _run_build(spec.name, sources, _flags(spec), include_paths, build_dir, verbose, BuildError,
                      cuda_home() if cuda else None, cuda_arch_list() if cuda else None)


def _estimate(spec: _Spec) -> str:
    files = len(_sources(spec))
    seconds = spec.seconds_per_file * -(-files // _max_jobs())
    return f"about {max(1, round(seconds / 60))} min" if seconds >= 90 else f"about {seconds} s"


def _build_into(spec: _Spec, build_dir: Path, verbose: bool) -> Path:
    """Build (if the stamp does not match) under the lock; return the library file."""
    with _exclusive(build_dir.parent / f"{spec.name}.lock", spec.name):
        # The digest is taken before compiling: a source edited during the build then fails to
        # match next time, instead of being stamped as built.
        digest = _digest(spec)
        if _stamp_matches(build_dir, spec):
            return _library_file(build_dir, spec)
        stamp = _stamp_path(build_dir, spec)
        if build_dir.exists() and not stamp.exists():
            # No stamp: the previous build never finished (killed, crashed). Its objects may be
            # truncated yet newer than their sources, so ninja would trust them: start clean.
            shutil.rmtree(build_dir)
        stamp.unlink(missing_ok=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"fusedreg: building {spec.name} ({len(_sources(spec))} {spec.suffix} files, "
              f"{_estimate(spec)} with {_max_jobs()} jobs; once per torch version) ...",
              file=sys.stderr, flush=True)
        start = time.monotonic()
        built = _compile(spec, build_dir, verbose)
        target = _library_file(build_dir, spec)
        if built != target:  # torch names a rebuilt library <name>_v<k>.so; keep one stable path
            shutil.copyfile(built, target)
        stamp.write_text(digest)
        print(f"fusedreg: built {spec.name} in {time.monotonic() - start:.0f} s -> {target}",
              file=sys.stderr, flush=True)
        return target


def load_library(kind: str, verbose: bool = False) -> Path:
    """Build if needed and load library `kind` ("cpu" | "cuda") into this process, once.

    Returns the library's path. Raises BuildError (with the log path) when it cannot be built or
    loaded; the failure is remembered so later calls fail fast with the same error.
    """
    if kind not in _SPECS:
        raise ValueError(f"kind must be one of {sorted(_SPECS)}, got {kind!r}")
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise _failed[kind]
        spec = _SPECS[kind]
        try:
            reason = unbuildable_reason(kind)
            if reason is not None:
                raise BuildError(f"cannot build {spec.name}: {reason}")
            prebuilt = _prebuilt_dir(spec)
            if _stamp_matches(prebuilt, spec):
                path = _library_file(prebuilt, spec)
            else:
                path = _build_into(spec, _build_dir(spec), verbose)
            _load(path, spec)
        except BuildError as exc:
            _failed[kind] = exc
            raise
        _loaded[kind] = path
        return path


def _load(path: Path, spec: _Spec) -> None:
    import torch

    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        raise BuildError(f"loading {path} failed: {exc}", path.parent / "build.log") from exc


def library_status(kind: str) -> tuple[str, str]:
    """("loaded" | "built" | "prebuilt" | "not built" | "failed" | "unavailable", detail)."""
    spec = _SPECS[kind]
    if kind in _loaded:
        return "loaded", str(_loaded[kind])
    if kind in _failed:
        return "failed", str(_failed[kind])
    reason = unbuildable_reason(kind)
    if reason is not None:
        return "unavailable", reason
    if _stamp_matches(_prebuilt_dir(spec), spec):
        return "prebuilt", str(_library_file(_prebuilt_dir(spec), spec))
    if _stamp_matches(_build_dir(spec), spec):
        return "built", str(_library_file(_build_dir(spec), spec))
    return "not built", f"builds on first use ({_estimate(spec)}) into {_build_dir(spec)}"


def build_ahead(root: Path, kinds=("cpu", "cuda"), verbose: bool = True) -> dict[str, str]:
    """Build libraries into root/<version key>/<name>/ (setup.py's FUSEDREG_BUILD_EXT=1 path).

    Returns kind -> library path, or the reason it was skipped.
    """
    result = {}
    for kind in kinds:
        spec = _SPECS[kind]
        reason = unbuildable_reason(kind)
        if reason is not None:
            result[kind] = f"skipped: {reason}"
            continue
        result[kind] = str(_build_into(spec, _build_dir(spec, root), verbose))
    return result


def built_objects(kind: str, root: Path | None = None, arch_list: str | None = None,
                  on_build: Callable[[Path], None] | None = None) -> list[Path]:
    """The object files (one per csrc/ source) of library `kind` built into
    root/<version key>/<name>/ (root: the cache by default), for tools that read the compiled code.

    Unless the stamp there matches, the library is built first (ninja recompiles only what
    changed), after on_build(build directory). arch_list, when given, is the TORCH_CUDA_ARCH_LIST
    of the stamp check and the build; the environment is restored afterwards. Raises BuildError
    when the build fails, FileNotFoundError when it leaves no objects (also when the library
    cannot be built here: see unbuildable_reason).
    """
    spec = _SPECS[kind]
    root = root or cache_root()
    build_dir = _build_dir(spec, root)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        if not _stamp_matches(build_dir, spec):
            if on_build is not None:
                on_build(build_dir)
            build_ahead(root, kinds=(kind,), verbose=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    pattern = "*.cuda.o" if kind == "cuda" else "*.o"  # torch's names: x.cu -> x.cuda.o, x.cpp -> x.o
    objects = sorted(build_dir.glob(pattern))
    if not objects:
        raise FileNotFoundError(f"no {pattern} objects in {build_dir}")
    return objects


def source_digest(kind: str) -> str:
    """The digest library `kind`'s build stamp holds: sources, headers, flags, versions, arch list."""
    return _digest(_SPECS[kind])
