"""Instruction counts of the CPU cases under valgrind's callgrind: `fusedreg bench --count-instructions`.

Times on a shared machine swing with other processes' load; instruction counts do not. For every
CPU case with a fusedreg[cpu] subject, this counts the instructions (callgrind's Ir) of one call of
the subject and of each PyTorch built-in baseline of the case (names starting "torch "), on the
same inputs, one thread: per call, per element, and the ratio baseline / subject.

Method: one child process runs every case under `valgrind --tool=callgrind --instr-atstart=no
--collect-atstart=no`, so Python and torch start uninstrumented (importing torch instrumented costs
a minute). A helper compiled at run time from callgrind.h's client requests (the cpu library has no
such marker) brackets each region: start instrumentation, zero, collect on, N calls, collect off,
dump under a label. Each implementation is counted over N and over 2N calls; (c_2N - c_N) / N is one
call, and the region's constant cost (the loop, the ctypes calls) cancels exactly. Warm-up calls
first (lazy initialisation, allocator growth, Python's bytecode specialisation); the garbage
collector is off in the regions, so a collection cannot land in one region and not the other.
Valgrind decodes AVX2 but not AVX-512 (its virtual CPU hides it; an AVX-512 instruction stops the
run with SIGILL), so both sides are pinned to AVX2 (FUSEDREG_CPU_CAPABILITY, ATEN_CPU_CAPABILITY,
unless the caller set them) and the header names the level each side used. Instructions are work,
not time: a division counts like an add, a cache miss not at all.
"""
from __future__ import annotations

import ctypes
import gc
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

__all__ = ["CallgrindUnavailable", "parse_counts", "read_dumps", "per_call", "primary_elements", "plan_cases",
           "count", "which_valgrind", "QUICK_MAX_ELEMENTS"]

# --quick leaves out sizes above this many elements (clip's 7.8M-gradient GPT-2 lists): under
# valgrind a call takes ~50x its native time, and the smallest size of every other case is below.
QUICK_MAX_ELEMENTS = 2**21
# Calls in the first counted region; the second has twice as many. Fewer than 4 leave call-to-call
# differences of the Python side (allocator state) visible: +-2% per call at 2^16 elements.
CALLS = 4
WARMUP_CALLS = 8
_ISA_NAMES = {0: "default", 1: "avx2", 2: "avx512"}

_HELPER_SOURCE = r"""
#include <valgrind/callgrind.h>

/* Brackets for one counted region (see fusedreg/bench/callgrind.py). */
void fusedreg_cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void fusedreg_cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void fusedreg_cg_begin(void) { CALLGRIND_ZERO_STATS; CALLGRIND_TOGGLE_COLLECT; }
void fusedreg_cg_end(const char* label) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS_AT(label); }
int fusedreg_cg_running(void) { return RUNNING_ON_VALGRIND; }

/* The level fusedreg's CPU kernels pick (csrc/common/cpu_isa.h, same tests) on the CPU that this
   process sees: under valgrind, its virtual CPU. 0 default, 1 avx2, 2 avx512. */
int fusedreg_cg_cpu_level(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) return 2;
  return avx2 ? 1 : 0;
#else
  return 0;
#endif
}
"""


class CallgrindUnavailable(RuntimeError):
    """Counting cannot run here (no valgrind, no valgrind headers or C compiler); says what is missing."""


# ----------------------------------------------------------------------------- callgrind's output

_TRIGGER = re.compile(r"^desc:\s*Trigger:\s*Client Request:\s*(\S+)")


def parse_counts(text: str) -> tuple[str | None, int]:
    """(label, Ir) of one callgrind output file: the label given to CALLGRIND_DUMP_STATS_AT (None
    for other dumps, e.g. at program end) and the file's total instructions ("totals:", else the
    header's "summary:"; the first event column, Ir)."""
    label, totals, summary, events = None, None, None, None
    for line in text.splitlines():
        match = _TRIGGER.match(line)
        if match:
            label = match.group(1)
        elif line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("totals:"):
            totals = int(line.split()[1])
        elif line.startswith("summary:"):
            summary = int(line.split()[1])
    if events is not None and events[:1] != ["Ir"]:
        raise ValueError(f"callgrind output counts {events}, not Ir first")
    count = totals if totals is not None else summary
    if count is None:
        raise ValueError("callgrind output without totals: or summary: line")
    return label, count


def read_dumps(pattern: str) -> dict[str, int]:
    """label -> Ir over every labelled callgrind dump matching the glob `pattern`."""
    found = {}
    for path in glob.glob(pattern):
        with open(path, errors="replace") as f:
            label, count = parse_counts(f.read())
        if label is not None:
            found[label] = count
    return found


def per_call(count_n: int, count_2n: int, calls: int) -> tuple[float, float]:
    """(instructions of one call, constant instructions of a region) from a region of `calls`
    calls and one of 2 x `calls`: c_n = fixed + n x per_call, c_2n = fixed + 2n x per_call."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    one = (count_2n - count_n) / calls
    return one, count_n - calls * one


# ----------------------------------------------------------------------------- what is counted

def primary_elements(inputs) -> int:
    """Elements of a case's primary operand, from what its make() returned: a tensor's numel; a
    list of tensors' total (AdamW's parameters, clip's gradients); in a tuple, its first item's
    (dropout_add's input, BatchNorm's input)."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs.numel()
    if isinstance(inputs, list) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return sum(t.numel() for t in inputs)
    if isinstance(inputs, (list, tuple)) and inputs:
        return primary_elements(inputs[0])
    raise ValueError(f"no tensor in a case's inputs ({type(inputs).__name__})")


def _is_baseline(name: str) -> bool:
    return name.startswith("torch ")  # PyTorch's built-ins; "torch.compile(...)" does not match


def plan_cases(ops: Sequence[str] | None, dtypes=None, quick: bool = False) -> list[dict]:
    """Measurements: every CPU case whose subject is fusedreg[cpu], its quick sizes (with `quick`,
    the first, smallest, only; one above QUICK_MAX_ELEMENTS is marked skipped, its inputs made here
    to count them: under valgrind that alone takes seconds), the dtypes asked for; the subject and
    the torch baselines."""
    import torch

    from . import registry

    plan = []
    for case in registry.cases(ops, "cpu"):
        impls = list(case.impls_for("cpu", True))
        if not impls or not impls[0].startswith("fusedreg[cpu]"):
            continue
        names = impls[:1] + [n for n in impls[1:] if _is_baseline(n)]
        sizes = case.sizes_for("cpu", True)
        for dtype in [d for d in case.dtypes if dtypes is None or d in dtypes]:
            for size in sizes[:1] if quick else sizes:
                item = {"case": case.key, "dtype": str(dtype).removeprefix("torch."), "size": size,
                        "size_label": case.size_label(size), "impls": names}
                if quick:
                    with torch.random.fork_rng():
                        elements = primary_elements(case.make(size, dtype, "cpu"))
                    if elements > QUICK_MAX_ELEMENTS:
                        item["skipped"] = f"{elements} elements, above --quick's {QUICK_MAX_ELEMENTS}"
                plan.append(item)
    return plan


# ----------------------------------------------------------------------------- the child, under valgrind

def _as_size(value):
    return tuple(value) if isinstance(value, list) else value


def _child(plan_path: str, out_path: str, helper_path: str) -> None:
    import torch

    from . import registry

    started = time.monotonic()
    torch.set_num_threads(1)
    lib = ctypes.CDLL(helper_path)
    lib.fusedreg_cg_end.argtypes = [ctypes.c_char_p]
    with open(plan_path) as f:
        plan = json.load(f)
    cases = {case.key: case for case in registry.cases(None, "cpu")}
    with open(out_path, "w") as out:
        def emit(record):
            out.write(json.dumps(record) + "\n")
            out.flush()  # what was counted survives a crash later on

        emit({"on_valgrind": lib.fusedreg_cg_running(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
              "cpu_level": lib.fusedreg_cg_cpu_level(), "threads": torch.get_num_threads()})
        for k, item in enumerate(plan):
            case = cases[item["case"]]
            impls = case.impls_for("cpu", False)
            if "skipped" in item:
                emit({"id": k, "skipped": item["skipped"]})
                continue
            torch.manual_seed(0)
            try:
                inputs = case.make(_as_size(item["size"]), getattr(torch, item["dtype"]), "cpu")
                elements = primary_elements(inputs)
            except Exception as exc:
                emit({"id": k, "error": f"making inputs failed: {type(exc).__name__}: {exc}"})
                continue
            emit({"id": k, "elements": elements})
            for j, name in enumerate(item["impls"]):
                print(f"[{k + 1}/{len(plan)}] {item['case']} {item['dtype']} {item['size_label']} {name} "
                      f"({time.monotonic() - started:.0f} s so far)", file=sys.stderr, flush=True)
                try:
                    fn = impls[name].setup(inputs)
                    for _ in range(WARMUP_CALLS):
                        fn()
                except Exception as exc:
                    emit({"id": k, "impl": name, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                calls_n = item.get("calls", CALLS)
                labels = [f"m{k}.{j}.{calls}" for calls in (calls_n, 2 * calls_n)]
                gc.collect()
                gc.disable()
                lib.fusedreg_cg_start()
                try:
                    for label, calls in zip(labels, (calls_n, 2 * calls_n)):
                        lib.fusedreg_cg_begin()
                        try:
                            for _ in range(calls):
                                fn()
                        finally:
                            lib.fusedreg_cg_end(label.encode())
                except Exception as exc:
                    emit({"id": k, "impl": name, "error": f"{type(exc).__name__}: {exc}"})
                else:
                    emit({"id": k, "impl": name, "labels": labels, "calls": calls_n})
                finally:
                    lib.fusedreg_cg_stop()
                    gc.enable()
            del inputs


# ----------------------------------------------------------------------------- the parent

def which_valgrind() -> str:
    """valgrind's path; raises CallgrindUnavailable without one."""
    path = shutil.which("valgrind")
    if path is None:
        raise CallgrindUnavailable("valgrind not found on PATH: instruction counts need valgrind's callgrind "
                                   "(e.g. apt-get install valgrind)")
    return path


def _build_helper(workdir: str) -> str:
    source, library = os.path.join(workdir, "cg_helper.c"), os.path.join(workdir, "cg_helper.so")
    with open(source, "w") as f:
        f.write(_HELPER_SOURCE)
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise CallgrindUnavailable("no C compiler (cc, or $CC) to build the callgrind client-request helper")
    proc = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", library, source],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise CallgrindUnavailable("could not build the callgrind client-request helper (valgrind/callgrind.h "
                                   "missing? it comes with valgrind's development files):\n"
                                   + proc.stderr.strip())
    return library


def _child_env() -> dict:
    # the child imports this very fusedreg, wherever it came from (a checkout on sys.path, site-packages)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONPATH=path)
    env.setdefault("FUSEDREG_CPU_CAPABILITY", "avx2")
    env.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    return env


def _valgrind_version(valgrind: str) -> str:
    proc = subprocess.run([valgrind, "--version"], capture_output=True, text=True)
    return proc.stdout.strip() or "valgrind (version unknown)"


def count(ops: Sequence[str] | None = None, dtypes=None, quick: bool = False, *,
          plan: list[dict] | None = None, keep: str | None = None) -> dict:
    """Count every planned measurement (default: plan_cases(ops, dtypes, quick)) in one valgrind
    child; return the results document. keep: a directory for the callgrind files (default: a
    temporary one, removed). Raises CallgrindUnavailable when counting cannot run here."""
    from .machine import machine_info

    from .. import _build

    valgrind = which_valgrind()
    plan = plan_cases(ops, dtypes, quick) if plan is None else plan
    if _build.unbuildable_reason("cpu") is None:
        _build.load_library("cpu")  # built here if need be: a build under valgrind would take ages
    started, load_start = time.monotonic(), _load_average()
    with tempfile.TemporaryDirectory(prefix="fusedreg-callgrind-") as scratch:
        workdir = keep or scratch
        os.makedirs(workdir, exist_ok=True)
        helper = _build_helper(workdir)
        plan_path, out_path = os.path.join(workdir, "plan.json"), os.path.join(workdir, "counted.jsonl")
        with open(plan_path, "w") as f:
            json.dump(plan, f)
        log_path = os.path.join(workdir, "valgrind.log")
        cmd = [valgrind, "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
               f"--callgrind-out-file={os.path.join(workdir, 'callgrind.out')}", f"--log-file={log_path}",
               sys.executable, "-m", "fusedreg.bench.callgrind", plan_path, out_path, helper]
        proc = subprocess.run(cmd, env=_child_env())
        records = []
        if os.path.exists(out_path):
            with open(out_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
        dumps = read_dumps(os.path.join(workdir, "callgrind.out*"))
        crash = None
        if proc.returncode != 0:
            with open(log_path, errors="replace") as f:
                tail = f.read().splitlines()[-15:]
            crash = f"the valgrind child exited with status {proc.returncode}:\n" + "\n".join(tail)
    doc = _document(plan, records, dumps, crash)
    doc.update(machine=machine_info("cpu"), valgrind=_valgrind_version(valgrind),
               command=" ".join(cmd[:5] + ["python ..."]), elapsed_s=round(time.monotonic() - started, 1),
               load_average={"start": load_start, "end": _load_average()})
    return doc


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _document(plan: list[dict], records: list[dict], dumps: dict[str, int], crash: str | None) -> dict:
    """The results document from the plan, the child's records and the dumps' counts."""
    head = records[0] if records and "on_valgrind" in records[0] else {}
    env = _child_env()
    results = [{"op": item["case"].split("/")[0], "case": item["case"].split("/", 1)[1],
                "size_label": item["size_label"], "dtype": item["dtype"], "elements": None,
                "subject": item["impls"][0],
                "impls": {name: {"ok": False, "error": crash or "not counted"} for name in item["impls"]}}
               for item in plan]
    for record in records[1 if head else 0:]:
        entry = results[record["id"]]
        if "elements" in record:
            entry["elements"] = record["elements"]
        elif "impl" not in record:
            failure = {"skipped": record["skipped"]} if "skipped" in record else {"error": record["error"]}
            entry["impls"] = {name: {"ok": False, **failure} for name in entry["impls"]}
        elif "error" in record:
            entry["impls"][record["impl"]] = {"ok": False, "error": record["error"]}
        elif all(label in dumps for label in record["labels"]):
            one, fixed = per_call(dumps[record["labels"][0]], dumps[record["labels"][1]], record["calls"])
            entry["impls"][record["impl"]] = {
                "ok": True, "instructions": one, "region_constant": fixed,
                "per_element": one / entry["elements"] if entry["elements"] else None}
    for entry in results:
        ours = entry["impls"][entry["subject"]]
        entry["ratios"] = {name: (r["instructions"] / ours["instructions"]
                                  if r.get("ok") and ours.get("ok") and ours["instructions"] > 0 else None)
                           for name, r in entry["impls"].items() if name != entry["subject"]}
    return {"kind": "callgrind instruction counts", "threads": head.get("threads", 1),
            "on_valgrind": bool(head.get("on_valgrind")), "torch_isa": head.get("torch_isa"),
            "fusedreg_isa": _fusedreg_level(head.get("cpu_level"), env["FUSEDREG_CPU_CAPABILITY"]),
            "env": {k: env[k] for k in ("FUSEDREG_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")},
            "calls": [CALLS, 2 * CALLS], "warmup_calls": WARMUP_CALLS, "results": results, "crash": crash}


def _fusedreg_level(supported: int | None, cap: str) -> str | None:
    """The level csrc/common/cpu_isa.h's cpu_isa() picks: the supported one, capped by the variable."""
    if supported is None:
        return None
    levels = {name: level for level, name in _ISA_NAMES.items()}
    return _ISA_NAMES[min(supported, levels.get(cap, supported))]


if __name__ == "__main__":  # the child, started by count() under valgrind
    _child(*sys.argv[1:4])
