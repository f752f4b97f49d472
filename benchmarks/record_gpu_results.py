"""Turns the output directory of `benchmarks/gpu_check.sh` into committed results:

    python benchmarks/record_gpu_results.py OUTDIR [--date YYYY-MM-DD]
        [--results-dir benchmarks/results] [--readme README.md]

writes <results-dir>/<gpu>-<date>.json, .md and .png (e.g. nvidia-h200-2026-12-01.*) and rewrites
the README's section between `<!-- gpu-results:begin -->` and `<!-- gpu-results:end -->`.

Inputs (flat files in OUTDIR): bench-quick.json is required, since it names the machine; tier 1's
tests-gpu.xml and log, and tier 2's sanitizer logs and bench-full.json, are used when present, so
a tier that did not run (or ran out of time) still leaves a record of what did. Every output names
the GPU, driver, torch, CUDA and Triton: a number without its machine cannot be compared later.

The README gets the largest size of each (op, case, dtype) from the quick benchmark: that one runs
on every check, at sizes far beyond L2, where bandwidth is what is being claimed; the full
benchmark is time-boxed and may stop part way, so it goes only into the .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import fusedreg  # noqa: F401
except ImportError:  # a source checkout without pip install, as on the GPU machine
    sys.path.insert(0, str(REPO))
from fusedreg.bench.machine import machine_label  # noqa: E402
from fusedreg.bench.plot import write_png  # noqa: E402
from fusedreg.bench.report import format_time  # noqa: E402

BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
BACKENDS = ("cuda", "triton")  # always listed; reference/other only when a test falls there
OUTCOMES = ("passed", "failed", "skipped", "errors")


class RecordError(Exception):
    """Something the user must fix before anything is written."""


def gpu_slug(gpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def machine_line(m: dict) -> str:
    return (f"{m['gpu']}, driver {m.get('driver') or 'unknown'}, torch {m.get('torch')}, "
            f"CUDA {m.get('cuda') or 'unknown'}, triton {m.get('triton') or 'not installed'}")


def load_bench(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"cannot read {path}: {exc}") from exc
    missing = [k for k in ("machine", "copy_bandwidth", "results") if k not in doc]
    if missing:
        raise RecordError(f"{path} is not a `fusedreg bench --json` document (no {', '.join(missing)})")
    return doc


# --- tests ---------------------------------------------------------------------------------------

def backend_of_test(name: str) -> str:
    """Which backend a test case exercises, from its parameter id ("test_x[cuda-triton-bf16]").
    The device comes first in the ids, so "triton" or "reference" decides before "cuda" does."""
    tokens = name.partition("[")[2].rstrip("]").split("-")
    if "triton" in tokens:
        return "triton"
    if "reference" in tokens:
        return "reference"
    if any(t == "cuda" or t.startswith("cuda:") for t in tokens):
        return "cuda"
    return "other"


def parse_junit(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise RecordError(f"cannot parse {path}: {exc}") from exc
    totals = dict.fromkeys(OUTCOMES, 0)
    per_backend = {b: dict.fromkeys(OUTCOMES, 0) for b in BACKENDS}
    not_passed = []
    for case in root.iter("testcase"):
        # an error (setup/teardown) outranks a failure, which outranks a skip (xfail is a skip)
        kind = next((k for tag, k in (("error", "errors"), ("failure", "failed"),
                                      ("skipped", "skipped")) if case.find(tag) is not None), "passed")
        name = case.get("name", "")
        totals[kind] += 1
        per_backend.setdefault(backend_of_test(name), dict.fromkeys(OUTCOMES, 0))[kind] += 1
        if kind in ("failed", "errors"):
            not_passed.append(f"{case.get('classname', '')}::{name} ({kind.rstrip('s')})")
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    time_s = sum(float(s.get("time", 0) or 0) for s in suites)
    return {**totals, "per_backend": per_backend, "time_s": round(time_s, 1), "not_passed": not_passed}


# --- logs ----------------------------------------------------------------------------------------

_PYTEST_LINE = re.compile(r"^=*\s*((?:\d+ [a-z]+, )*\d+ [a-z]+ in [\d.]+s\b.*?|no tests ran in .*?)"
                          r"\s*=*\s*$", re.M)


def parse_sanitizer(path: Path) -> dict:
    """compute-sanitizer's verdict ("ERROR SUMMARY: N errors"; one per process it followed) and the
    pytest summary of the run underneath. No verdict line: the run did not finish (or never began)."""
    text = path.read_text(errors="replace")
    counts = [int(n) for n in re.findall(r"^=+ ERROR SUMMARY: (\d+) errors?", text, re.M)]
    tests = _PYTEST_LINE.findall(text)
    out = {"log": path.name, "tests": tests[-1] if tests else None}
    if counts:
        total = sum(counts)
        out.update(verdict="clean" if total == 0 else "errors", errors=total,
                   summary=f"ERROR SUMMARY: {total} error{'' if total == 1 else 's'}")
    else:
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "empty log")
        out.update(verdict="no verdict", errors=None,
                   summary=f"no ERROR SUMMARY line; last line: {last[:160]}")
    return out


def check_steps(log: Path) -> list[str]:
    """The step lines of gpu_check.sh's closing summary (PASS / FAIL / TIMEOUT / SKIP per step)."""
    lines = log.read_text(errors="replace").splitlines()
    start = max((i for i, ln in enumerate(lines) if ln.startswith("=== summary")), default=None)
    if start is None:
        return ["(no summary: the script did not finish)"]
    # the closing line names the GPU machine's output directory: not worth committing
    return [re.sub(r" \(details in .*\)$", "", " ".join(ln.split()))
            for ln in lines[start + 1:] if ln.strip()]


# --- bench tables --------------------------------------------------------------------------------

def gpu_backends(doc: dict) -> list[str]:
    names = (n for e in doc["results"] for n in e["impls"])
    return list(dict.fromkeys(n for n in names if n.startswith("fusedreg[") and n != "fusedreg[cpu]"))


def best_torch(entry: dict) -> tuple[str, dict] | None:
    """PyTorch's fastest built-in: "torch ..." names only, so neither torch.compile nor the
    reference counts - the question is what a user gets without fusedreg and without compiling."""
    ok = [(n, r) for n, r in entry["impls"].items() if n.startswith("torch ") and r.get("ok")]
    return min(ok, key=lambda nr: nr[1]["time_ms"]) if ok else None


def best_ours(entry: dict, backends: list[str]) -> tuple[str, dict] | None:
    ok = [(n, entry["impls"][n]) for n in backends if entry["impls"].get(n, {}).get("ok")]
    return min(ok, key=lambda nr: nr[1]["time_ms"]) if ok else None


def _short_backend(name: str) -> str:
    return name.removeprefix("fusedreg[").removesuffix("]")


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r.get("ok"):
        return "n/a" if "skipped" in r else "error"
    gbps = r["gbps"]  # small launch-bound cases run at a few GB/s: keep 3 digits there
    return f"{gbps:.0f} ({r['pct_copy_bw']:.0f}%)" if gbps >= 100 else f"{gbps:.3g} ({r['pct_copy_bw']:.0f}%)"


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def results_table(doc: dict) -> list[str]:
    backends = gpu_backends(doc)
    header = ["op / case", "dtype", "size"] + [f"{n} GB/s (% copy)" for n in backends]
    header += ["PyTorch's best built-in", "its time", "fusedreg speedup"]
    rows = [header, ["---"] * len(header)]
    for e in doc["results"]:
        if not any(n in e["impls"] for n in backends):
            continue  # the harness's own copy case: no fusedreg implementation to compare
        ours, theirs = best_ours(e, backends), best_torch(e)
        speedup = (f"{theirs[1]['time_ms'] / ours[1]['time_ms']:.2f}x ({_short_backend(ours[0])})"
                   if ours and theirs else "n/a")
        rows.append([f"{e['op']} / {e['case']}", e["dtype"], e["size_label"]]
                    + [_cell(e["impls"].get(n)) for n in backends]
                    + ([theirs[0], format_time(theirs[1]["time_ms"])] if theirs else ["none ran", "-"])
                    + [speedup])
    lines = ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    errors = [f"- {e['op']}/{e['case']} {e['dtype']} {e['size_label']} {n}: {r['error'][:200]}"
              for e in doc["results"] for n, r in e["impls"].items() if r.get("error")]
    if errors:
        lines += ["", f"Implementations that raised ({len(errors)}):", ""] + errors
    if doc.get("left_out_by_budget"):
        lines += ["", f"Left out by the time budget: {len(doc['left_out_by_budget'])} measurements "
                      f"({', '.join(doc['left_out_by_budget'][:8])}"
                      f"{', ...' if len(doc['left_out_by_budget']) > 8 else ''})."]
    return lines


def compact_table(doc: dict) -> list[str]:
    """Largest size of each (op, case, dtype): the faster fusedreg backend against torch's best."""
    backends, largest = gpu_backends(doc), {}
    for e in doc["results"]:
        if any(n in e["impls"] for n in backends):
            key = (e["op"], e["case"], e["dtype"])
            if key not in largest or e["bytes_moved"] > largest[key]["bytes_moved"]:
                largest[key] = e
    rows = ["| case | dtype | size | fusedreg GB/s (% copy) | speedup over PyTorch's best built-in |",
            "|---|---|---|---|---|"]
    for e in largest.values():
        ours, theirs = best_ours(e, backends), best_torch(e)
        mine = f"{_cell(ours[1])}, {_short_backend(ours[0])}" if ours else "error"
        vs = (f"{theirs[1]['time_ms'] / ours[1]['time_ms']:.2f}x vs {theirs[0]}"
              if ours and theirs else "n/a")
        rows.append("| " + " | ".join(_md(c) for c in (f"{e['op']} {e['case']}", e["dtype"],
                                                        e["size_label"], mine, vs)) + " |")
    return rows


# --- outputs -------------------------------------------------------------------------------------

def _tests_summary(tests: dict | None) -> str:
    if tests is None:
        return "no test results (tests-gpu.xml missing)"
    per = ", ".join(f"{b} {c['passed']}/{c['passed'] + c['failed'] + c['errors']}"
                    for b, c in tests["per_backend"].items() if b in BACKENDS or any(c.values()))
    return (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped (passed/ran: {per})")


def _sanitizer_summary(sanitizer: dict) -> str:
    if not sanitizer:
        return "compute-sanitizer not run (no tier-2 logs)"
    return "compute-sanitizer " + "; ".join(
        f"{tool} {v['verdict']}" + ("" if v["verdict"] == "clean" else f" ({v['summary']})")
        for tool, v in sanitizer.items())


def write_markdown(path: Path, record: dict, png: Path | None) -> None:
    m, tests, quick = record["machine"], record["tests"], record["bench"]["quick"]
    out = [f"# fusedreg on {m['gpu']}, {record['date']}", "",
           f"Machine: {machine_line(m)}; {m.get('gpu_memory_gib', '?')} GiB, compute capability "
           f"{m.get('gpu_capability', '?')}, fusedreg {m.get('fusedreg', '?')}, "
           f"python {m.get('python', '?')}.", "",
           f"Copy bandwidth (the yardstick, measured in the quick run): "
           f"{record['copy_bandwidth']['gbps']:.0f} GB/s.", "",
           "## Tests (`pytest -m \"gpu and not huge\"`)", ""]
    if tests is None:
        out.append("No test results: tests-gpu.xml is missing (see the tier-1 steps below).")
    else:
        out += ["| backend | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
        out += [f"| {b} | {c['passed']} | {c['failed']} | {c['errors']} | {c['skipped']} |"
                for b, c in tests["per_backend"].items() if b in BACKENDS or any(c.values())]
        out.append("| all | " + " | ".join(str(tests[k]) for k in ("passed", "failed", "errors", "skipped"))
                   + " |")
        if tests["not_passed"]:
            out += ["", "Failed:", ""] + [f"- `{t}`" for t in tests["not_passed"][:50]]
    out += ["", "## compute-sanitizer", ""]
    if not record["sanitizer"]:
        out.append("Not run (no tier-2 sanitizer logs).")
    for tool, v in record["sanitizer"].items():
        out.append(f"- {tool}: **{v['verdict']}** ({v['summary']}; tests: {v['tests'] or 'no summary line'})")
    for tier, steps in record["gpu_check"].items():
        out += ["", f"gpu_check {tier} steps:", "", "```"] + steps + ["```"]
    for kind, doc in record["bench"].items():
        if doc["machine"].get("gpu") != m["gpu"] or doc["machine"].get("torch") != m.get("torch"):
            out += ["", f"Note: bench-{kind}.json was measured on {machine_label(doc['machine'])}."]
        out += ["", f"## Benchmark: {kind} (bench-{kind}.json, timer {doc.get('timer', '?')}, copy bandwidth "
                    f"{doc['copy_bandwidth']['gbps']:.0f} GB/s)", "",
                "GB/s = floor bytes / median time; % copy = of the copy bandwidth of the same run; speedup "
                "= PyTorch's best built-in time / the faster fusedreg backend's time.", ""]
        out += results_table(doc)
    if png is not None:
        out += ["", f"![quick benchmark on {m['gpu']}]({png.name})"]
    path.write_text("\n".join(out) + "\n")


def readme_with_section(text: str, readme: Path, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise RecordError(f"{readme} needs exactly one '{BEGIN}' followed by one '{END}' line; "
                          f"add them where the GPU results belong (nothing was written)")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def readme_block(record: dict, md_link: str) -> str:
    m = record["machine"]
    head = (f"Measured on {machine_line(m)}, {record['date']}. GPU tests: {_tests_summary(record['tests'])}. "
            f"{_sanitizer_summary(record['sanitizer'])}. Largest size of each case from the quick "
            f"benchmark; copy bandwidth {record['copy_bandwidth']['gbps']:.0f} GB/s. "
            f"All numbers: [{md_link}]({md_link}).")
    return "\n".join([head, ""] + compact_table(record["bench"]["quick"]))


def record_results(outdir: Path, date: str, results_dir: Path, readme: Path) -> list[Path]:
    quick_path = outdir / "bench-quick.json"
    if not quick_path.is_file():
        raise RecordError(f"{quick_path} not found: run `benchmarks/gpu_check.sh --tier 1 {outdir}` "
                          f"on a GPU machine first")
    quick = load_bench(quick_path)
    machine = dict(quick["machine"])
    if not machine.get("gpu"):
        raise RecordError(f"{quick_path} was measured on {quick.get('device', '?')}, not on a GPU")
    tier1 = outdir / "gpu_check-tier1.log"
    if not machine.get("driver") and tier1.is_file():  # nvidia-smi's banner is in the log
        found = re.search(r"Driver Version:\s*([\d.]+)", tier1.read_text(errors="replace"))
        machine["driver"] = found.group(1) if found else None
    try:
        readme_text = readme.read_text()
    except OSError as exc:
        raise RecordError(f"cannot read {readme}: {exc}") from exc
    readme_with_section(readme_text, readme, "")  # check the markers before writing anything

    bench = {"quick": quick}
    if (outdir / "bench-full.json").is_file():
        bench["full"] = load_bench(outdir / "bench-full.json")
    xml = outdir / "tests-gpu.xml"
    record = {
        "date": date, "machine": machine, "copy_bandwidth": quick["copy_bandwidth"],
        "tests": parse_junit(xml) if xml.is_file() else None,
        "sanitizer": {tool: parse_sanitizer(outdir / f"sanitizer-{tool}.log")
                      for tool in ("memcheck", "racecheck") if (outdir / f"sanitizer-{tool}.log").is_file()},
        "gpu_check": {f"tier{t}": check_steps(outdir / f"gpu_check-tier{t}.log")
                      for t in (1, 2) if (outdir / f"gpu_check-tier{t}.log").is_file()},
        "bench": bench,
    }

    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{gpu_slug(machine['gpu'])}-{date}"
    png = stem.with_suffix(".png")
    # write_png titles the figure "fusedreg bench (<device>): <machine_label>", which has no Triton
    # version: carry it in the device part so the title names all five.
    plot_doc = {**quick, "machine": machine,
                "device": f"{quick.get('device', 'cuda')}, triton {machine.get('triton') or 'not installed'}"}
    try:
        note = write_png(plot_doc, png)
    except Exception as exc:  # a plot is worth less than the record: fall back, keep going
        note = f"{type(exc).__name__}: {exc}"
    if note is not None:
        if (outdir / "bench-quick.png").is_file():
            shutil.copyfile(outdir / "bench-quick.png", png)
            record["plot"] = f"bench-quick.png as written by the check (re-plotting failed: {note})"
        else:
            png, record["plot"] = None, f"no plot: {note}; bench-quick.png missing"
        print(f"warning: {record['plot']}", file=sys.stderr)
    else:
        record["plot"] = "re-plotted from bench-quick.json"

    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(md_path, record, png)
    link = Path(os.path.relpath(md_path.resolve(), readme.resolve().parent)).as_posix()
    readme.write_text(readme_with_section(readme_text, readme, readme_block(record, link)))
    return [p for p in (json_path, md_path, png, readme) if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Record a gpu_check.sh output directory as benchmarks/results/<gpu>-<date>.json, "
                    ".md and .png, and update the README's GPU results section.")
    parser.add_argument("outdir", type=Path, help="the directory gpu_check.sh wrote into")
    parser.add_argument("--date", help="YYYY-MM-DD in the file names (default: today, UTC)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    try:
        date = (datetime.date.fromisoformat(args.date) if args.date
                else datetime.datetime.now(datetime.timezone.utc).date()).isoformat()
    except ValueError:
        parser.error(f"--date {args.date!r} is not YYYY-MM-DD")
    try:
        written = record_results(args.outdir, date, args.results_dir, args.readme)
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
