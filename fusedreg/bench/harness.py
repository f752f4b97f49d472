"""Runs registered cases and collects one JSON-ready document of results.

Per (case, dtype, size): the inputs are made once, each implementation's setup runs once, then its
callable is timed (and, where the case asks, timed again as CUDA-graph replays and its peak memory
taken). A failing implementation is recorded with its error and the run goes on; `Skip` marks one
that does not apply here.
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
import traceback
from typing import Callable, Sequence

import torch

from . import registry
from .copy import copy_bandwidth
from .machine import machine_info
from .timing import make_timer, peak_memory_bytes

__all__ = ["run", "failures", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_size(size):
    return list(size) if isinstance(size, tuple) else size


def _measure_impl(case, impl, inputs, device, timer, copy_gbps, bytes_moved) -> dict:
    result: dict = {"ok": False}
    try:
        fn = impl.setup(inputs)
        measured = timer.time(fn)
    except registry.Skip as exc:
        return {"ok": False, "skipped": str(exc) or "n/a"}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8)}
    gbps = bytes_moved / (measured.median_ms * 1e-3) / 1e9
    result.update(ok=True, time_ms=measured.median_ms, time_ms_q20=measured.q20_ms,
                  time_ms_q80=measured.q80_ms, gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps)
    if case.measure_memory:
        try:
            result["peak_memory_bytes"] = peak_memory_bytes(fn, device)
        except Exception as exc:
            result["peak_memory_error"] = f"{type(exc).__name__}: {exc}"
    if case.cuda_graph and device == "cuda":
        try:
            graph = timer.graph(fn)
            result.update(graph_time_ms=graph.median_ms, graph_time_ms_q20=graph.q20_ms,
                          graph_time_ms_q80=graph.q80_ms)
        except Exception as exc:  # capture is not supported by every baseline; worth knowing
            result["graph_error"] = f"{type(exc).__name__}: {exc}"
    return result


def _ratios(impls: dict, subject: str | None) -> dict:
    """baseline name -> baseline_time / subject_time (> 1: the subject is faster)."""
    if subject is None or not impls[subject].get("ok"):
        return {name: None for name in impls if name != subject}
    base = impls[subject]["time_ms"]
    return {name: (r["time_ms"] / base if r.get("ok") else None)
            for name, r in impls.items() if name != subject}


def _release(device: str) -> None:
    """Free one size's tensors before the next: on a GPU the largest sizes only fit one at a time
    (gc.collect costs ~0.2 s, too much for a quick CPU run, where nothing needs it)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _compile_everything():
    """torch.compile baselines recompile per size and dtype; past dynamo's default limit (8 per
    function) they would silently run eagerly and be timed as if compiled."""
    import torch._dynamo.config as dynamo_config

    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, n)]
    saved = {n: getattr(dynamo_config, n) for n in names}
    for name in names:
        setattr(dynamo_config, name, max(saved[name], 256))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(dynamo_config, name, value)


def run(ops: Sequence[str] | None, device: str, dtypes: Sequence[torch.dtype] | None = None,
        quick: bool = False, progress: Callable[[str], None] | None = None, *,
        min_elements: int = 0, compiled: bool = True, budget_s: float | None = None) -> dict:
    """Benchmark the cases of `ops` (all when empty) on `device`; return the results document.

    min_elements: skip sizes with fewer elements (a size's elements: the product of its integers).
    compiled: whether torch.compile baselines run (their compile time dominates a short run).
    budget_s: start no new measurement after this many seconds; the document then says what was
    left out, so a run cut short by a time window still writes everything it measured."""
    with _compile_everything():
        return _run(ops, device, dtypes, quick, progress, min_elements, compiled, budget_s)


def size_elements(size) -> int:
    """Elements a benchmark size stands for: the product of the integers in it."""
    if isinstance(size, (int, float)):
        return int(size)
    return math.prod(int(v) for v in size if isinstance(v, int) and not isinstance(v, bool))


def _run(ops, device, dtypes, quick, progress, min_elements=0, compiled=True, budget_s=None) -> dict:
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    load_errors = registry.load_op_modules()
    for module, error in load_errors.items():
        say(f"warning: benchmark module fusedreg.bench.{module} failed to import: {error}")
    timer = make_timer(device, quick)
    say(f"measuring copy bandwidth on {device} ...")
    copy_bw = copy_bandwidth(device, timer, quick)
    say(f"copy bandwidth: {copy_bw['gbps']:.1f} GB/s")

    results, left_out = [], []
    for case in registry.cases(ops, device):
        impls = case.impls_for(device, quick)
        if not compiled:
            impls = {name: impl for name, impl in impls.items() if not name.startswith("torch.compile")}
        case_dtypes = [d for d in case.dtypes if dtypes is None or d in dtypes]
        for dtype in case_dtypes:
            for size in case.sizes_for(device, quick):
                label = case.size_label(size)
                if size_elements(size) < min_elements:
                    continue
                if budget_s is not None and time.monotonic() - started > budget_s:
                    left_out.append(f"{case.key} {_dtype_name(dtype)} {label}")
                    continue
                say(f"{case.key} {_dtype_name(dtype)} {label} ...")
                bytes_moved = int(case.bytes_moved(size, dtype))
                entry = {"op": case.op, "case": case.name, "note": case.note,
                         "size": _json_size(size), "size_label": label, "dtype": _dtype_name(dtype),
                         "bytes_moved": bytes_moved,
                         "floor_time_ms": bytes_moved / (copy_bw["gbps"] * 1e9) * 1e3,
                         "subject": next(iter(impls), None)}
                try:
                    inputs = case.make(size, dtype, device)
                except Exception as exc:
                    error = {"ok": False, "error": f"making inputs failed: {type(exc).__name__}: {exc}"}
                    entry["impls"] = {name: dict(error) for name in impls}
                else:
                    entry["impls"] = {name: _measure_impl(case, impl, inputs, device, timer,
                                                          copy_bw["gbps"], bytes_moved)
                                      for name, impl in impls.items()}
                    del inputs
                entry["ratios"] = _ratios(entry["impls"], entry["subject"])
                results.append(entry)
                _release(device)

    return {
        "schema": SCHEMA_VERSION,
        "machine": machine_info(device),
        "device": device,
        "quick": quick,
        "timer": timer.name,
        "ops": list(ops) if ops else registry.known_ops(),
        "copy_bandwidth": copy_bw,
        "load_errors": load_errors,
        "results": results,
        "left_out_by_budget": left_out,
        "elapsed_s": round(time.monotonic() - started, 2),
    }


def failures(doc: dict) -> list[str]:
    """'case dtype size impl: error' for every implementation that failed (skips excluded)."""
    out = []
    for entry in doc["results"]:
        for name, r in entry["impls"].items():
            if r.get("error"):
                out.append(f"{entry['op']}/{entry['case']} {entry['dtype']} {entry['size_label']} "
                           f"{name}: {r['error']}")
    return out
