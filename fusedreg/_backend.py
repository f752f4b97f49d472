"""Backend registry and selection.

Precedence: `backend=` keyword > innermost `use_backend(...)` > `set_backend(...)` >
env FUSEDREG_BACKEND > "auto".

auto: CUDA tensors -> cuda (if fusedreg_cuda builds and loads) -> triton -> reference;
      CPU tensors  -> cpu  (if fusedreg_cpu builds and loads)  -> reference.
A backend named explicitly but unusable raises BackendUnavailable saying why. An automatic fallback
warns once per (backend, reason).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import _build

__all__ = ["BACKENDS", "BackendUnavailable", "available", "select", "set_backend", "use_backend",
           "get_backend"]

BACKENDS = ("cuda", "triton", "cpu", "reference")
_CHOICES = ("auto",) + BACKENDS

# Plain module globals (not thread-locals or contextvars) so that torch.compile can read them while
# tracing; the selection is resolved at trace time and guarded like any other global.
_global_choice: str | None = None
_override_stack: list[str] = []
_warned: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Process-wide default backend ("auto" or None restores automatic selection)."""
    global _global_choice
    _global_choice = None if name is None else _check_name(name)


# os.environ.get costs ~35 us a call when a large op has just evicted the caches (Python-level
# Mapping.get, the key's encoding, a KeyError raised and caught while the variable is unset); the
# mapping's own dict, which os.environ's writes update too, read with the key encoded once, is one
# C-level lookup. CPython keeps that dict as os.environ._data; elsewhere the public path is used.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_VAR = "FUSEDREG_BACKEND"
_ENV_KEY = os.environ.encodekey(_ENV_VAR) if _ENVIRON_DATA is not None else _ENV_VAR


def get_backend() -> str:
    """The backend the precedence rules name now, before looking at any tensor ("auto" if none)."""
    if _override_stack:
        return _override_stack[-1]
    if _global_choice is not None:
        return _global_choice
    if _ENVIRON_DATA is None:
        env = os.environ.get(_ENV_VAR)
    else:  # read inline: every op's call comes here, and a helper's frame costs host time too
        raw = _ENVIRON_DATA.get(_ENV_KEY)
        env = None if raw is None else os.environ.decodevalue(raw)
    return _check_name(env) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ops without an explicit `backend=` use `name`."""
    _override_stack.append(_check_name(name))
    try:
        yield
    finally:
        _override_stack.pop()


# ----------------------------------------------------------------------------- availability

def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_reason(device: torch.device | None) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if device is not None and device.type == "cpu":
        return None if _triton_interpreted() else "CPU tensors run under Triton only with TRITON_INTERPRET=1"
    if not torch.cuda.is_available() and not _triton_interpreted():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
    return None


def _library_reason(kind: str, load: bool) -> str | None:
    if load:  # fast once loaded (or once failed): load_library remembers both
        try:
            _build.load_library(kind)
        except _build.BuildError as exc:
            return str(exc)
        return None
    status, detail = _build.library_status(kind)
    return detail if status in ("failed", "unavailable") else None


def _reason(name: str, device: torch.device | None, load: bool) -> str | None:
    """None if backend `name` can run on `device` (None: on some device), else why not."""
    if name == "reference":
        return None
    if name == "triton":
        return _triton_reason(device)
    if name == "cuda":
        if device is not None and device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got a {device.type} tensor"
        if not torch.cuda.is_available():
            reason = _library_reason("cuda", load=False)
            return "no CUDA device" + (f"; also {reason}" if reason else "")
        return _library_reason("cuda", load)
    if name == "cpu":
        if device is not None and device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got a {device.type} tensor"
        return _library_reason("cpu", load)
    raise ValueError(f"unknown backend {name!r}")


def available() -> dict[str, tuple[bool, str]]:
    """name -> (usable, reason). Builds nothing: a library not built yet counts as usable."""
    result = {}
    for name in BACKENDS:
        reason = _reason(name, None, load=False)
        if reason is None:
            result[name] = (True, _usable_detail(name))
        else:
            result[name] = (False, reason)
    return result


def _usable_detail(name: str) -> str:
    if name in ("cuda", "cpu"):
        status, detail = _build.library_status(name)
        return f"{status}: {detail}"
    if name == "triton":
        import triton

        mode = "interpreter (TRITON_INTERPRET=1)" if _triton_interpreted() else "compiled"
        return f"triton {triton.__version__}, {mode}"
    return "eager PyTorch"


# ----------------------------------------------------------------------------- selection

_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def select(device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs an op on tensors of `device`, loading its library if needed.

    Traceable by torch.compile: the choice (keyword, context, global, env) is read from plain
    globals, which dynamo guards on; resolving it against what is available runs once at trace time.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name = _check_name(backend) if backend is not None else get_backend()
    return _resolve(device_type, name)


# (device type, name) -> a C++ backend that resolution picked, its library loaded: a loaded
# library stays loaded, so the answer holds for the rest of the process and later calls skip the
# checks. Their Python costs ~100 us a call on the 2-core VM when a large op has just evicted the
# caches; the other answers (triton, which depends on TRITON_INTERPRET, and fallbacks) are
# resolved on every call.
_resolved: dict[tuple[str, str], str] = {}


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its cost: the public decorator imports
    torch._dynamo (over a second) only to set this attribute, and `import fusedreg` must stay cheap.
    tests/test_backend.py checks that torch.compile still treats the result as a constant."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _resolve(device_type: str, name: str) -> str:
    known = _resolved.get((device_type, name))
    if known is not None:
        return known
    device = torch.device(device_type)
    if name != "auto":
        reason = _reason(name, device, load=True)
        if reason is not None:
            raise BackendUnavailable(f"fusedreg backend {name!r} is unavailable: {reason}")
        return _remembered(device_type, name, _prepared(name))
    for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
        reason = _reason(candidate, device, load=True)
        if reason is None:
            return _remembered(device_type, name, _prepared(candidate))
        if (candidate, reason) not in _warned:
            _warned.add((candidate, reason))
            warnings.warn(f"fusedreg: backend {candidate!r} unavailable for {device_type} tensors "
                          f"({reason}); falling back", RuntimeWarning, stacklevel=4)
    return "reference"


def _remembered(device_type: str, name: str, backend: str) -> str:
    if backend in ("cuda", "cpu"):
        _resolved[(device_type, name)] = backend
    return backend


def _prepared(name: str) -> str:
    """Register the Triton ops (importing triton) the first time the triton backend is chosen."""
    if name == "triton":
        import importlib
        import pkgutil

        from . import triton as kernels

        for module in pkgutil.iter_modules(kernels.__path__):
            importlib.import_module(f"{kernels.__name__}.{module.name}")
    return name
