"""Benchmark results as a PNG: one panel per case, GB/s of each implementation and dtype, the copy
bandwidth as a dashed line.

A case whose sizes are plain element counts is a line per (implementation, dtype) against the
floor bytes (log scale), with the sizes whose bytes fit in the last-level cache shaded: there a CPU
can beat the (out-of-cache) copy bandwidth. A case whose sizes are shapes or parameter lists
(BatchNorm's NCHW / NHWC shapes, a model's parameters) has no order to draw a line along, so it is
grouped bars: one group per size, one bar per (implementation, dtype), in-cache sizes marked "c".
Every (implementation, dtype) pair has its own colour, and dtypes their own marker or hatch; the
legend sits below its panel, clear of the data.
"""
from __future__ import annotations

import math
import os
from itertools import groupby

from .machine import machine_label

__all__ = ["write_png"]

_DTYPE_MARKERS = ("o", "s", "^", "D", "v", "P")
_DTYPE_STYLES = ("-", "--", ":", "-.")
_DTYPE_HATCHES = ("", "//", "..", "xx")


def _numeric_sizes(entries) -> bool:
    return all(isinstance(e["size"], (int, float)) and not isinstance(e["size"], bool) for e in entries)


def _series(entries, impl_names, dtype_names):
    """(impl, dtype) pairs that have at least one result in these entries, in a stable order."""
    return [(name, dtype) for name in impl_names for dtype in dtype_names
            if any(e["dtype"] == dtype and e["impls"].get(name, {}).get("ok") for e in entries)]


def _line_panel(ax, entries, series, colour, dtype_names, cache_bytes):
    for name, dtype in series:
        points = sorted((e["bytes_moved"], e["impls"][name]["gbps"]) for e in entries
                        if e["dtype"] == dtype and e["impls"].get(name, {}).get("ok"))
        j = dtype_names.index(dtype)
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=colour[(name, dtype)], marker=_DTYPE_MARKERS[j % len(_DTYPE_MARKERS)],
                linestyle=_DTYPE_STYLES[j % len(_DTYPE_STYLES)], label=f"{name} ({dtype})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("floor bytes moved")
    if cache_bytes:
        lo = min(e["bytes_moved"] for e in entries)
        if lo <= cache_bytes:
            ax.axvspan(lo / 1.5, cache_bytes, color="0.85", alpha=0.5, linewidth=0,
                       label=f"fits in LLC ({cache_bytes / 2**20:.0f} MiB)")


def _bar_panel(ax, entries, series, colour, dtype_names):
    labels = list(dict.fromkeys(e["size_label"] for e in entries))
    in_cache = {e["size_label"] for e in entries if e.get("in_cache")}
    width = 0.8 / max(1, len(series))
    for i, (name, dtype) in enumerate(series):
        xs, ys = [], []
        for e in entries:
            r = e["impls"].get(name, {})
            if e["dtype"] == dtype and r.get("ok"):
                xs.append(labels.index(e["size_label"]) - 0.4 + width * (i + 0.5))
                ys.append(r["gbps"])
        j = dtype_names.index(dtype)
        ax.bar(xs, ys, width=width, color=colour[(name, dtype)], edgecolor="black", linewidth=0.3,
               hatch=_DTYPE_HATCHES[j % len(_DTYPE_HATCHES)], label=f"{name} ({dtype})")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([label + (" c" if label in in_cache else "") for label in labels],
                       rotation=30, ha="right", fontsize=7)
    ax.set_xlabel("size" + (" (c: fits in the last-level cache)" if in_cache else ""))


def write_png(doc: dict, path: str | os.PathLike) -> str | None:
    """Write the plot; return None, or a note saying why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); no plot written (pip install matplotlib)"
    if not doc["results"]:
        return "no results to plot"

    panels = [(key, list(entries)) for key, entries in
              groupby(doc["results"], key=lambda e: (e["op"], e["case"]))]
    impl_names = list(dict.fromkeys(n for _, es in panels for e in es for n in e["impls"]))
    dtype_names = list(dict.fromkeys(e["dtype"] for _, es in panels for e in es))
    palette = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors
    colour = {pair: palette[k % len(palette)] for k, pair in
              enumerate((name, dtype) for name in impl_names for dtype in dtype_names)}
    cache_bytes = doc.get("cache_bytes")

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 5.6 * rows), squeeze=False,
                             layout="constrained")
    copy_gbps = doc["copy_bandwidth"]["gbps"]
    for ax, ((op, case), entries) in zip(axes.flat, panels):
        series = _series(entries, impl_names, dtype_names)
        numeric = _numeric_sizes(entries)
        if numeric:
            _line_panel(ax, entries, series, colour, dtype_names, cache_bytes)
        else:
            _bar_panel(ax, entries, series, colour, dtype_names)
        ax.axhline(copy_gbps, color="black", linewidth=1, linestyle="--", label=f"copy {copy_gbps:.0f} GB/s")
        ax.set_ylabel("GB/s (floor bytes / median time)")
        ax.set_title(f"{op} / {case}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16 if numeric else -0.42), ncol=2,
                  frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    threads = doc.get("threads")
    fig.suptitle(f"fusedreg bench ({doc['device']}): {machine_label(doc['machine'])}"
                 + (f", {threads} thread{'s' * (threads != 1)}" if threads else ""), fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
