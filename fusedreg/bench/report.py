"""Benchmark results as a table (terminal and text file) and as a JSON file (the PNG is in plot.py)."""
from __future__ import annotations

import json
import os
import sys
from itertools import groupby

from .machine import machine_label

__all__ = ["format_table", "write_json", "write_text", "format_time", "format_bytes", "wide_bands",
           "slower_rows", "faulting", "exit_status"]

# Page faults per call from which a measurement is listed as paying for fresh memory (64 faults:
# 256 KiB of 4 KiB pages, tens of microseconds).
FAULTS_LISTED = 64


def format_time(ms: float | None) -> str:
    if ms is None:
        return "n/a"
    if ms < 1:
        return f"{ms * 1e3:.3g} us"
    if ms < 1000:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _band(r: dict) -> str:
    """The q20..q80 band as a percentage of the median, '!' when it is wide."""
    band = r.get("band")
    if band is None:
        return "-"
    return f"{100 * band:.0f}%" + (" !" if r.get("wide_band") else "")


def _speedup(entry: dict, name: str) -> str:
    ratio = entry["ratios"].get(name)
    if ratio is None:
        return "n/a"
    band = (entry.get("ratio_bands") or {}).get(name)
    return f"{ratio:.2f}x" + (f" ({band[0]:.2f}-{band[1]:.2f})" if band else "")


def _impl_row(entry: dict, name: str, r: dict, columns: set[str]) -> list[str]:
    if not r.get("ok"):
        why = f"n/a: {r['skipped']}" if "skipped" in r else f"ERROR {r.get('error', '')}"
        return [name, _short(why)]
    pct = f"{r['pct_copy_bw']:.0f}%" + (" c" if entry.get("in_cache") else "")
    row = [name, format_time(r["time_ms"]),
           f"{format_time(r['time_ms_q20'])} .. {format_time(r['time_ms_q80'])}", _band(r),
           f"{r['gbps']:.1f}", pct, "subject" if name == entry["subject"] else _speedup(entry, name)]
    if "graph" in columns:
        row.append(format_time(r["graph_time_ms"]) if "graph_time_ms" in r
                   else ("failed" if "graph_error" in r else "-"))
    if "memory" in columns:
        row.append(format_bytes(r.get("peak_memory_bytes")) if "peak_memory_bytes" in r else "-")
    return row


def _render(rows: list[list[str]]) -> list[str]:
    """Aligned columns; a row shorter than the header (n/a, error) lets its last cell run on."""
    n = len(rows[0])
    widths = [max(len(row[i]) for row in rows if len(row) == n) for i in range(n)]
    return ["  ".join([cell.ljust(w) for cell, w in zip(row[:-1], widths)] + [row[-1]]).rstrip()
            for row in rows]


def wide_bands(doc: dict) -> list[str]:
    """'case dtype size impl' of every measurement whose q20..q80 band is wide."""
    return [f"{e['op']}/{e['case']} {e['dtype']} {e['size_label']} {name}"
            for e in doc["results"] for name, r in e["impls"].items() if r.get("wide_band")]


def slower_rows(doc: dict) -> list[str]:
    """'case dtype size: baseline ratio' where the subject is slower than a baseline (ratio < 1)."""
    return [f"{e['op']}/{e['case']} {e['dtype']} {e['size_label']}: {name} {ratio:.2f}x"
            for e in doc["results"] for name, ratio in e["ratios"].items()
            if ratio is not None and ratio < 1]


def faulting(doc: dict) -> list[str]:
    """'case dtype size impl: N/call' of every measurement with FAULTS_LISTED or more page faults
    per call (median over its rounds)."""
    return [f"{e['op']}/{e['case']} {e['dtype']} {e['size_label']} {name}: {r['page_faults_per_call']:.0f}/call"
            for e in doc["results"] for name, r in e["impls"].items()
            if r.get("page_faults_per_call", 0) >= FAULTS_LISTED]


def format_table(doc: dict) -> str:
    bw = doc["copy_bandwidth"]
    threads = doc.get("threads", doc["machine"].get("torch_threads"))
    wide = doc.get("wide_band", 0.3)
    out = [f"fusedreg bench on {doc['device']}: {machine_label(doc['machine'])}",
           f"timer: {doc['timer']}{' (quick)' if doc['quick'] else ''}"
           + (", implementations interleaved round by round" if doc.get("interleaved") else "")
           + f"; threads: {threads}; copy bandwidth: {bw['gbps']:.1f} GB/s ({bw['method']})",
           "GB/s = floor bytes / median time; band = (q80 - q20) / median, '!' above "
           f"{100 * wide:.0f}% (too noisy to trust)",
           "speedup = baseline time / subject time (> 1: subject faster)"
           + (", the median of per-round paired ratios, their q20-q80 in brackets"
              if doc.get("interleaved") else "")]
    if doc.get("malloc"):
        out.append(f"malloc: {doc['malloc']}")
    load = doc.get("load_average") or {}
    if load.get("start") is not None:
        out.append(f"machine load: 1-min load average {load['start']:g} before the run, {load['end']:g} "
                   f"after, on {load['cores']} cores")
        if load["start"] > 0.5 * load["cores"] and threads and threads > 1:
            out.append("warning: other processes were using the cores before the run started: with "
                       f"{threads} threads a parallel region can wait for a thread the OS has "
                       "descheduled, and times then cluster at multiples of the scheduler's time slice "
                       "(~4-8 ms) whatever the kernel; trust only --threads 1 rows, or rerun on a quiet "
                       "machine")
    if doc.get("cache_bytes"):
        out.append(f"% copy marked c: the floor bytes fit in the {format_bytes(doc['cache_bytes'])} "
                   "last-level cache, so the case may run out of cache, above the (out-of-cache) copy "
                   "bandwidth")
    for module, error in doc.get("load_errors", {}).items():
        out.append(f"warning: fusedreg.bench.{module} failed to import: {_short(error, 200)}")
    for (op, case), entries in groupby(doc["results"], key=lambda e: (e["op"], e["case"])):
        entries = list(entries)
        columns = set()
        if any("graph_time_ms" in r or "graph_error" in r for e in entries for r in e["impls"].values()):
            columns.add("graph")
        if any("peak_memory_bytes" in r for e in entries for r in e["impls"].values()):
            columns.add("memory")
        header = ["size", "dtype", "implementation", "median", "q20 .. q80", "band", "GB/s", "% copy",
                  "speedup"]
        header += ["graph replay"] * ("graph" in columns) + ["peak memory"] * ("memory" in columns)
        rows = [header]
        for entry in entries:
            first = True
            for name, r in entry["impls"].items():
                lead = [entry["size_label"], entry["dtype"]] if first else ["", ""]
                rows.append(lead + _impl_row(entry, name, r, columns))
                first = False
        note = entries[0].get("note")
        out += ["", f"{op}/{case}" + (f" - {note}" if note else "")] + _render(rows)
    if not doc["results"]:
        out += ["", "no cases ran"]
    noisy = wide_bands(doc)
    if noisy:
        out += ["", f"{len(noisy)} measurement(s) with a band above {100 * wide:.0f}% (machine busy? "
                    "rerun, or compare their speedup brackets): " + "; ".join(noisy)]
    fresh = faulting(doc)
    if fresh:
        out += ["", f"{len(fresh)} measurement(s) faulting in fresh pages on every call (median page faults "
                    "per call): the allocator had handed an earlier call's memory back to the OS, and the "
                    "time includes touching it anew: " + "; ".join(fresh)]
    slower = slower_rows(doc)
    if slower:
        out += ["", f"{len(slower)} row(s) where the subject is slower than a baseline: " + "; ".join(slower)]
    return "\n".join(out)


def write_text(text: str, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def exit_status(failed: list[str]) -> int:
    """A bench command's exit status: 0, or 1 after listing the failures on stderr."""
    if not failed:
        return 0
    print(f"\n{len(failed)} failure(s):", file=sys.stderr)
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 1


def write_json(doc: dict, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
