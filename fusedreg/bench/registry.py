"""Benchmark cases and where they come from.

A case is one thing to time (e.g. "dropout fwd+bwd") over a set of sizes and dtypes, with a dict of
named implementations. The first implementation that runs on the device is the *subject* (normally
fusedreg's own backend); every other one is a *baseline*, and ratios are reported as
baseline_time / subject_time (above 1: the subject is faster).

Op modules register their cases at import: every module in this package that is not part of the
harness (see _HARNESS_MODULES) is imported by `load_op_modules()`, so adding an op's benchmarks means
adding `fusedreg/bench/<op>.py`. A module that fails to import is reported, not fatal: one broken op
must not stop the others from being measured.

    from fusedreg.bench.registry import Case, Impl, Skip, register

    def make(size, dtype, device):            # inputs, built once per (size, dtype)
        return torch.randn(size, dtype=dtype, device=device)

    def fusedreg_impl(backend):
        def setup(x):                         # called once per (size, dtype); returns what is timed
            return lambda: fusedreg.dropout(x, 0.1, backend=backend)
        return setup

    register(Case(
        op="dropout", name="fwd",
        make=make,
        bytes_moved=lambda size, dtype: 2 * size * dtype.itemsize,   # the floor: read x, write y
        impls={
            "fusedreg[cuda]": Impl(fusedreg_impl("cuda"), devices=("cuda",)),
            "fusedreg[cpu]": Impl(fusedreg_impl("cpu"), devices=("cpu",)),
            "torch F.dropout": lambda x: (lambda: F.dropout(x, 0.1)),
        },
        sizes={"cuda": [2**20, 2**24, 2**28], "cpu": [2**16, 2**20, 2**23]},
        quick_sizes={"cuda": [2**20, 2**26], "cpu": [2**16, 2**20]},
    ))
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["Case", "Impl", "Skip", "register", "register_case", "cases", "known_ops",
           "load_op_modules", "DEVICES"]

DEVICES = ("cuda", "cpu")

# Modules of this package that make up the harness itself; every other module is an op module.
_HARNESS_MODULES = {"registry", "harness", "timing", "report", "plot", "machine", "callgrind",
                    "callgrind_report"}

# Op modules imported first, in this order (the order of the table); others follow alphabetically.
_PREFERRED_ORDER = ("copy", "dropout", "adamw", "clip", "batch_norm")


class Skip(Exception):
    """Raised by an implementation's setup when it does not apply here (reported as n/a, not an
    error): e.g. a variant that needs a newer torch."""


@dataclass(frozen=True)
class Impl:
    """One implementation of a case.

    setup(inputs) -> fn: called once per (size, dtype) with what `Case.make` returned; `fn()` is what
    gets timed, so do allocations, optimizer construction and torch.compile in setup. An impl that
    mutates the inputs shares them with the others; clone in setup if that matters.
    devices: where it runs (None: everywhere the case runs).
    quick: whether `--quick` runs it: True, False, or the devices on which it does (e.g.
    ("cuda",) for torch.compile, whose compile time per size would dominate a quick CPU run).
    paired: on a CPU, whether it is timed in the same interleaved rounds as the subject, its
    speed-up the median of per-round ratios (True), or in rounds of its own after them, its
    speed-up the ratio of medians (False: an eager reference, many times slower, whose traffic
    through memory would slow whichever implementation runs after it).
    """
    setup: Callable[[Any], Callable[[], Any]]
    devices: Sequence[str] | None = None
    quick: bool | Sequence[str] = True
    paired: bool = True

    def runs_on(self, device: str, quick: bool) -> bool:
        if self.devices is not None and device not in self.devices:
            return False
        if quick and self.quick is not True:
            return bool(self.quick) and device in self.quick
        return True


@dataclass
class Case:
    """One benchmark: `op` groups cases in the table and the plot, `name` tells them apart.

    make(size, dtype, device) -> inputs; bytes_moved(size, dtype) -> the fewest bytes any
    implementation must move (DESIGN.md §5), which gives GB/s and % of copy bandwidth.
    sizes / quick_sizes: a list, or a dict device -> list; a size is anything make() understands
    (an int numel, a shape tuple, (n_tensors, numel) ...); size_label turns it into table text.
    cuda_graph: also time CUDA-graph replays (launch-bound cases: many small tensors).
    measure_memory: report each implementation's peak memory during one call (CUDA only).
    """
    op: str
    name: str
    make: Callable[[Any, torch.dtype, str], Any]
    bytes_moved: Callable[[Any, torch.dtype], int]
    impls: Mapping[str, Impl | Callable[[Any], Callable[[], Any]]]
    sizes: Sequence[Any] | Mapping[str, Sequence[Any]]
    quick_sizes: Sequence[Any] | Mapping[str, Sequence[Any]] | None = None
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)
    devices: Sequence[str] = DEVICES
    size_label: Callable[[Any], str] = str
    cuda_graph: bool = False
    measure_memory: bool = False
    note: str = ""
    _impls: dict[str, Impl] = field(init=False, repr=False)

    def __post_init__(self):
        if not self.op or not self.name:
            raise ValueError("a benchmark case needs an op and a name")
        if not self.impls:
            raise ValueError(f"benchmark case {self.key} has no implementations")
        unknown = set(self.devices) - set(DEVICES)
        if unknown:
            raise ValueError(f"benchmark case {self.key}: unknown devices {sorted(unknown)}")
        self._impls = {name: impl if isinstance(impl, Impl) else Impl(impl)
                       for name, impl in self.impls.items()}

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"

    def sizes_for(self, device: str, quick: bool) -> list[Any]:
        chosen = self.quick_sizes if quick and self.quick_sizes is not None else self.sizes
        if isinstance(chosen, Mapping):
            return list(chosen.get(device, ()))
        return list(chosen)

    def impls_for(self, device: str, quick: bool) -> dict[str, Impl]:
        """The implementations that run here, subject first."""
        return {name: impl for name, impl in self._impls.items() if impl.runs_on(device, quick)}


_CASES: dict[str, Case] = {}
_load_errors: dict[str, str] = {}
_loaded = False


def register(case: Case) -> Case:
    if case.key in _CASES:
        raise ValueError(f"benchmark case {case.key} is registered twice")
    _CASES[case.key] = case
    return case


def register_case(**fields) -> Callable[[Callable], Callable]:
    """Decorator form of register(): the decorated function is the case's `make`."""
    def decorate(make):
        register(Case(make=make, **fields))
        return make
    return decorate


def _op_module_names() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules([str(Path(__file__).resolve().parent)])
             if not m.name.startswith("_") and m.name not in _HARNESS_MODULES}
    first = [name for name in _PREFERRED_ORDER if name in found]
    return first + sorted(found - set(first))


def load_op_modules(names: Sequence[str] | None = None) -> dict[str, str]:
    """Import op modules (by default all of them, once); return module -> import error.

    Errors of the default import are remembered and reported with every run's results.
    """
    global _loaded
    if names is not None:
        return _import(names)
    if not _loaded:
        _load_errors.update(_import(_op_module_names()))
        _loaded = True
    return dict(_load_errors)


def _import(names: Sequence[str]) -> dict[str, str]:
    errors = {}
    for name in names:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except Exception as exc:  # a broken op module must not hide the others' results
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def cases(ops: Sequence[str] | None = None, device: str | None = None) -> list[Case]:
    """Registered cases (of `ops` and `device` when given), in registration order."""
    load_op_modules()
    return [case for case in _CASES.values()
            if (not ops or case.op in ops) and (device is None or device in case.devices)]


def known_ops() -> list[str]:
    load_op_modules()
    return list(dict.fromkeys(case.op for case in _CASES.values()))
