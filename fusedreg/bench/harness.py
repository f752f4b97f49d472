"""Runs registered cases and collects one JSON-ready document of results.

Per (case, dtype, size): the inputs are made once, each implementation's setup runs once and its
callable once more (a failing implementation is recorded with its error and the run goes on;
`Skip` marks one that does not apply here), then the callables are timed: on a CPU together in
interleaved rounds (timing.CpuTimer.time_interleaved), so that speed-ups are medians of paired
per-round ratios, trustworthy on a machine other processes load (an eager reference, Impl.paired
False, in rounds of its own: its speed-up is a ratio of medians); on a GPU one after the other
(and, where the case asks, again as CUDA-graph replays, with their peak memory). Each result
carries its q20..q80 band relative to the median, flagged when wider than timing.WIDE_BAND, and
on a CPU the median page faults per call.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Sequence

import torch

from . import cpu_malloc, registry
from .copy import copy_bandwidth
from .machine import last_level_cache_bytes, machine_info
from .timing import WIDE_BAND, Measurement, make_timer, peak_memory_bytes, quantiles

__all__ = ["run", "failures", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_size(size):
    return list(size) if isinstance(size, tuple) else size


def _result(measured: Measurement, copy_gbps: float, bytes_moved: int) -> dict:
    gbps = bytes_moved / (measured.median_ms * 1e-3) / 1e9
    band = (measured.q80_ms - measured.q20_ms) / measured.median_ms if measured.median_ms > 0 else 0.0
    return {"ok": True, "time_ms": measured.median_ms, "time_ms_q20": measured.q20_ms,
            "time_ms_q80": measured.q80_ms, "samples": measured.reps, "band": band,
            "wide_band": band > WIDE_BAND, "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps}


def _failure(exc: Exception) -> dict:
    if isinstance(exc, registry.Skip):
        return {"ok": False, "skipped": str(exc) or "n/a"}
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}


def _measure_case(case, impls, inputs, device, timer, copy_gbps, bytes_moved) -> tuple[dict, dict]:
    """(name -> result, name -> per-round samples in ms of the paired implementations, else None).
    Every implementation is set up and called once on its own (so one that raises is recorded and
    left out); the rest are timed together when the timer can interleave them (CPU: the paired
    ones in one set of rounds, then the others in their own), else one after the other."""
    results, fns = {}, {}
    for name, impl in impls.items():
        try:
            fn = impl.setup(inputs)
            fn()
        except Exception as exc:
            results[name] = _failure(exc)
        else:
            fns[name] = fn
    samples: dict = {}
    page_faults: dict = {}
    if fns and hasattr(timer, "time_interleaved"):
        groups = ({n: f for n, f in fns.items() if impls[n].paired},
                  {n: f for n, f in fns.items() if not impls[n].paired})
        for group in filter(None, groups):
            try:
                samples.update(timer.time_interleaved(group))
                page_faults.update(getattr(timer, "page_faults", {}))
            except Exception:  # a call that fails only sometimes: find it by timing it on its own
                pass
    for name, fn in fns.items():
        try:
            measured = quantiles(samples[name]) if name in samples else timer.time(fn)
        except Exception as exc:
            results[name] = _failure(exc)
            continue
        result = _result(measured, copy_gbps, bytes_moved)
        faults = page_faults.get(name) if name in samples else None
        if faults:
            result["page_faults_per_call"] = statistics.median(faults)
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
        results[name] = result
    ordered = {name: results[name] for name in impls}
    return ordered, {name: samples.get(name) if impls[name].paired else None for name in impls}


def _ratios(impls: dict, subject: str | None, samples: dict | None = None) -> tuple[dict, dict]:
    """(baseline name -> baseline time / subject time, baseline name -> [q20, q80] of that ratio or
    None); > 1: the subject is faster. With per-round samples of both (interleaved timing) the
    ratio is the median of the rounds' ratios, each taken between runs a moment apart, so load
    that comes and goes cancels out; otherwise it is the ratio of the medians."""
    names = [name for name in impls if name != subject]
    if subject is None or not impls[subject].get("ok"):
        return {name: None for name in names}, {name: None for name in names}
    samples = samples or {}
    base = impls[subject]["time_ms"]
    ratios, bands = {}, {}
    for name in names:
        r = impls[name]
        ours, theirs = samples.get(subject), samples.get(name)
        if r.get("ok") and ours and theirs and len(ours) == len(theirs):
            m = quantiles([t / o for o, t in zip(ours, theirs)])
            ratios[name], bands[name] = m.median_ms, [m.q20_ms, m.q80_ms]
        else:
            ratios[name] = r["time_ms"] / base if r.get("ok") else None
            bands[name] = None
    return ratios, bands


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
        min_elements: int = 0, compiled: bool = True, budget_s: float | None = None,
        threads: int | None = None, steady_malloc: bool = False) -> dict:
    """Benchmark the cases of `ops` (all when empty) on `device`; return the results document.

    min_elements: skip sizes with fewer elements (a size's elements: the product of its integers).
    compiled: whether torch.compile baselines run (their compile time dominates a short run).
    budget_s: start no new measurement after this many seconds; the document then says what was
    left out, so a run cut short by a time window still writes everything it measured.
    threads: torch's intra-op thread count for the run (default: every core this process may use),
    restored afterwards; the document records it.
    steady_malloc: on a CPU, time under cpu_malloc.steady_malloc (freed memory kept in the process);
    the document's "malloc" says which policy the times were taken under."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    policy = (cpu_malloc.steady_malloc() if steady_malloc and device == "cpu"
              else contextlib.nullcontext(cpu_malloc.SYSTEM_DEFAULT))
    try:
        load_start = load_average()
        with _compile_everything(), policy as malloc:
            doc = _run(ops, device, dtypes, quick, progress, min_elements, compiled, budget_s)
        doc["load_average"] = {"start": load_start, "end": load_average(), "cores": default_threads()}
        doc["malloc"] = malloc if device == "cpu" else None
        return doc
    finally:
        torch.set_num_threads(saved_threads)


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, this one included), where the OS says."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def default_threads() -> int:
    """Every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def size_elements(size) -> int:
    """Elements a benchmark size stands for: the product of the integers in it."""
    if isinstance(size, (int, float)):
        return int(size)
    return math.prod(int(v) for v in size if isinstance(v, int) and not isinstance(v, bool))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _run(ops, device, dtypes, quick, progress, min_elements=0, compiled=True, budget_s=None) -> dict:
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    load_errors = registry.load_op_modules()
    for module, error in load_errors.items():
        say(f"warning: benchmark module fusedreg.bench.{module} failed to import: {error}")
    timer = make_timer(device, quick)
    threads = torch.get_num_threads()
    say(f"measuring copy bandwidth on {device} ({threads} thread{'s' * (threads != 1)}) ...")
    copy_bw = copy_bandwidth(device, timer, quick)
    say(f"copy bandwidth: {copy_bw['gbps']:.1f} GB/s")
    cache_bytes = last_level_cache_bytes() if device == "cpu" else None

    plan = []  # (case, impls, dtype, size): every measurement, so progress can say k of N
    for case in registry.cases(ops, device):
        impls = case.impls_for(device, quick)
        if not compiled:
            impls = {name: impl for name, impl in impls.items() if not name.startswith("torch.compile")}
        for dtype in [d for d in case.dtypes if dtypes is None or d in dtypes]:
            plan += [(case, impls, dtype, size) for size in case.sizes_for(device, quick)
                     if size_elements(size) >= min_elements]

    results, left_out = [], []
    measuring_started = time.monotonic()
    for k, (case, impls, dtype, size) in enumerate(plan):
        label = case.size_label(size)
        if budget_s is not None and time.monotonic() - started > budget_s:
            left_out.append(f"{case.key} {_dtype_name(dtype)} {label}")
            continue
        spent = time.monotonic() - measuring_started
        eta = f", ~{_duration(spent / k * (len(plan) - k))} left" if k else ""
        say(f"[{k + 1}/{len(plan)}] {case.key} {_dtype_name(dtype)} {label} ({_duration(spent)} so far{eta})")
        bytes_moved = int(case.bytes_moved(size, dtype))
        entry = {"op": case.op, "case": case.name, "note": case.note,
                 "size": _json_size(size), "size_label": label, "dtype": _dtype_name(dtype),
                 "bytes_moved": bytes_moved,
                 "floor_time_ms": bytes_moved / (copy_bw["gbps"] * 1e9) * 1e3,
                 "in_cache": cache_bytes is not None and bytes_moved <= cache_bytes,
                 "subject": next(iter(impls), None)}
        samples = None
        try:
            inputs = case.make(size, dtype, device)
        except Exception as exc:
            error = {"ok": False, "error": f"making inputs failed: {type(exc).__name__}: {exc}"}
            entry["impls"] = {name: dict(error) for name in impls}
        else:
            entry["impls"], samples = _measure_case(case, impls, inputs, device, timer, copy_bw["gbps"],
                                                    bytes_moved)
            del inputs
        entry["ratios"], entry["ratio_bands"] = _ratios(entry["impls"], entry["subject"], samples)
        results.append(entry)
        _release(device)

    return {
        "schema": SCHEMA_VERSION,
        "machine": machine_info(device),
        "device": device,
        "quick": quick,
        "timer": timer.name,
        "threads": torch.get_num_threads(),
        "interleaved": hasattr(timer, "time_interleaved"),
        "wide_band": WIDE_BAND,
        "cache_bytes": cache_bytes,
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
