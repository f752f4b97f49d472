"""Benchmark results as a PNG: one panel per case, GB/s against size, the copy bandwidth as a line.

The x axis is the case's floor bytes rather than its size so that every case (a numel, a shape, a
parameter list) gets the same kind of axis, and dtypes of one case line up by traffic.
"""
from __future__ import annotations

import math
import os
from itertools import groupby

from .machine import machine_label

__all__ = ["write_png"]

_DTYPE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


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
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    copy_gbps = doc["copy_bandwidth"]["gbps"]
    for ax, ((op, case), entries) in zip(axes.flat, panels):
        for i, name in enumerate(impl_names):
            for j, dtype in enumerate(dtype_names):
                points = sorted((e["bytes_moved"], e["impls"][name]["gbps"]) for e in entries
                                if e["dtype"] == dtype and e["impls"].get(name, {}).get("ok"))
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colors[i % len(colors)], marker=_MARKERS[i % len(_MARKERS)],
                        linestyle=_DTYPE_STYLES[j % len(_DTYPE_STYLES)], label=f"{name} ({dtype})")
        ax.axhline(copy_gbps, color="black", linewidth=1, linestyle="--",
                   label=f"copy {copy_gbps:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("floor bytes moved")
        ax.set_ylabel("GB/s (floor bytes / median time)")
        ax.set_title(f"{op} / {case}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"fusedreg bench ({doc['device']}): {machine_label(doc['machine'])}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
