"""Benchmark results as a terminal table and as a JSON file (the PNG is in plot.py)."""
from __future__ import annotations

import json
import os
from itertools import groupby

from .machine import machine_label

__all__ = ["format_table", "write_json", "format_time", "format_bytes"]


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


def _impl_row(entry: dict, name: str, r: dict, columns: set[str]) -> list[str]:
    if not r.get("ok"):
        why = f"n/a: {r['skipped']}" if "skipped" in r else f"ERROR {r.get('error', '')}"
        return [name, _short(why)]
    ratio = entry["ratios"].get(name)
    row = [name, format_time(r["time_ms"]),
           f"{format_time(r['time_ms_q20'])} .. {format_time(r['time_ms_q80'])}",
           f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.0f}%",
           "subject" if name == entry["subject"] else ("n/a" if ratio is None else f"{ratio:.2f}x")]
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


def format_table(doc: dict) -> str:
    bw = doc["copy_bandwidth"]
    out = [f"fusedreg bench on {doc['device']}: {machine_label(doc['machine'])}",
           f"timer: {doc['timer']}{' (quick)' if doc['quick'] else ''}; "
           f"copy bandwidth: {bw['gbps']:.1f} GB/s ({bw['method']})",
           "GB/s = floor bytes / median time; speedup = baseline time / subject time (> 1: subject faster)"]
    for module, error in doc.get("load_errors", {}).items():
        out.append(f"warning: fusedreg.bench.{module} failed to import: {_short(error, 200)}")
    for (op, case), entries in groupby(doc["results"], key=lambda e: (e["op"], e["case"])):
        entries = list(entries)
        columns = set()
        if any("graph_time_ms" in r or "graph_error" in r for e in entries for r in e["impls"].values()):
            columns.add("graph")
        if any("peak_memory_bytes" in r for e in entries for r in e["impls"].values()):
            columns.add("memory")
        header = ["size", "dtype", "implementation", "median", "q20 .. q80", "GB/s", "% copy", "speedup"]
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
    return "\n".join(out)


def write_json(doc: dict, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
