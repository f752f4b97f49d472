"""The table of `fusedreg bench --count-instructions` (terminal and text file) and the command itself;
the counting is in callgrind.py."""
from __future__ import annotations

import os
import sys
from itertools import groupby

from .callgrind import CallgrindUnavailable, count, plan_cases, which_valgrind
from .machine import machine_label
from .report import _render, exit_status, write_json, write_text

__all__ = ["format_table", "failures", "main"]


def _format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.4g}"


def failures(doc: dict) -> list[str]:
    """'case dtype size impl: error' for every implementation that was not counted."""
    return [f"{e['op']}/{e['case']} {e['dtype']} {e['size_label']} {name}: {r['error'].splitlines()[0]}"
            for e in doc["results"] for name, r in e["impls"].items() if "error" in r]


def format_table(doc: dict) -> str:
    env = doc["env"]
    out = [f"fusedreg bench --count-instructions on cpu: {machine_label(doc['machine'])}",
           f"{doc['valgrind']} callgrind, instructions executed (Ir) per call; one thread; "
           f"counted: {doc['calls'][1]} calls minus {doc['calls'][0]} calls, after {doc['warmup_calls']} "
           "uncounted ones",
           f"ISA: fusedreg {doc['fusedreg_isa']} (FUSEDREG_CPU_CAPABILITY={env['FUSEDREG_CPU_CAPABILITY']}), "
           f"torch {doc['torch_isa']} (ATEN_CPU_CAPABILITY={env['ATEN_CPU_CAPABILITY']}); valgrind's virtual "
           "CPU has no AVX-512, so both run AVX2 code here, whatever the machine has",
           "instr/elem = instructions per element of the primary operand (dropout's x, AdamW's parameters, "
           "clip's gradients, BatchNorm's input)",
           "ratio = baseline instructions / subject instructions (> 1: fusedreg executes fewer); "
           "instructions, not time: memory stalls and slow instructions do not show"]
    load = doc.get("load_average") or {}
    if doc.get("elapsed_s") is not None and load.get("start") is not None:
        out.append(f"counted in {doc['elapsed_s']:.0f} s, 1-min load average {load['start']:g} before and "
                   f"{load['end']:g} after (the load changes the run time, not the counts)")
    for key, entries in groupby(doc["results"], key=lambda e: f"{e['op']}/{e['case']}"):
        rows = [["size", "dtype", "implementation", "instr/call", "instr/elem", "ratio"]]
        for entry in entries:
            skips = {r.get("skipped") for r in entry["impls"].values()}
            if len(skips) == 1 and None not in skips:  # left out as a whole (--quick's size limit)
                rows.append([entry["size_label"], entry["dtype"], f"n/a: {skips.pop()}"])
                continue
            first = True
            for name, r in entry["impls"].items():
                lead = [entry["size_label"], entry["dtype"]] if first else ["", ""]
                first = False
                if not r.get("ok"):
                    why = (f"n/a: {r['skipped']}" if "skipped" in r
                           else "ERROR " + " ".join(r["error"].split()))
                    rows.append(lead + [name, why[:80]])
                    continue
                ratio = entry["ratios"].get(name)
                rows.append(lead + [name, _format_count(r["instructions"]),
                                    f"{r['per_element']:.2f}" if r["per_element"] is not None else "n/a",
                                    "subject" if name == entry["subject"]
                                    else (f"{ratio:.2f}x" if ratio is not None else "n/a")])
        out += ["", key] + _render(rows)
    if not doc["results"]:
        out += ["", "no cases counted"]
    fewer = [f"{e['op']}/{e['case']} {e['dtype']} {e['size_label']}: {name} {ratio:.2f}x"
             for e in doc["results"] for name, ratio in e["ratios"].items()
             if ratio is not None and ratio < 1]
    if fewer:
        out += ["", f"{len(fewer)} row(s) where a baseline executes fewer instructions: " + "; ".join(fewer)]
    if doc.get("crash"):
        out += ["", doc["crash"]]
    return "\n".join(out)


# ----------------------------------------------------------------------------- the command

def main(args, parser) -> int:
    """The CLI: 0 when everything was counted, 1 when something failed, 3 when counting cannot
    run here (no valgrind, headers or compiler: the message says which)."""
    from . import registry

    if args.device == "cuda":
        parser.error("--count-instructions counts the CPU cases; it takes no --device cuda")
    if args.threads not in (None, 1):
        parser.error("--count-instructions always runs one thread; drop --threads")
    registry.load_op_modules()
    unknown = [op for op in args.ops if op not in registry.known_ops()]
    if unknown:
        parser.error(f"unknown op {', '.join(map(repr, unknown))}; "
                     f"registered: {', '.join(registry.known_ops())}")
    try:
        which_valgrind()  # before planning: --quick makes every case's inputs to count their elements
        plan = plan_cases(args.ops, args.dtype, args.quick)
        if not plan:
            parser.error("no CPU case with a fusedreg[cpu] implementation matches these ops and dtypes")
        print(f"counting {len(plan)} case(s) under callgrind in one valgrind process (~1 min to start) ...",
              file=sys.stderr, flush=True)
        doc = count(plan=plan)
    except CallgrindUnavailable as exc:
        print(f"fusedreg bench --count-instructions: cannot count here: {exc}", file=sys.stderr)
        return 3
    table = format_table(doc)
    print(table, flush=True)
    json_path = args.json or os.path.join("bench-out", "callgrind-cpu.json")
    table_path = args.table or os.path.join("bench-out", "callgrind-cpu.txt")
    write_json(doc, json_path)
    write_text(table, table_path)
    print(f"\nwrote {json_path}\nwrote {table_path}\n({doc['elapsed_s']:.0f} s)")
    failed = failures(doc)
    return exit_status(failed)
