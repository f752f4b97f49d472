"""`fusedreg bench --count-instructions` (fusedreg/bench/callgrind.py, callgrind_report.py): reading
callgrind's output, the N / 2N differencing, the results document, the plan, the CLI without
valgrind, and, where valgrind runs, one real count: repeatable and proportional to the elements of a
streaming op."""
import os
import shutil
import subprocess

import pytest
import torch

from fusedreg import cli
from fusedreg.bench import callgrind as cg
from fusedreg.bench import callgrind_report

# A dump as callgrind writes it for CALLGRIND_DUMP_STATS_AT("m3.1.8") (header, two functions, totals).
_DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  /usr/bin/python3 -m fusedreg.bench.callgrind plan.json out.jsonl helper.so
part: 3

desc: I1 cache: 
desc: D1 cache: 
desc: LL cache: 
desc: Timerange: Basic block 1000 - 2000
desc: Trigger: Client Request: m3.1.8

positions: line
events: Ir
summary: 123457

ob=(1) /usr/lib/libc.so.6
fl=(1) ???
fn=(1) memcpy
0 1000

ob=(2) /tmp/cg_helper.so
fl=(2) ???
fn=(2) fusedreg_cg_end
0 122457

totals: 123457
"""


def test_parse_counts_reads_label_and_totals():
    assert cg.parse_counts(_DUMP) == ("m3.1.8", 123457)


def test_parse_counts_falls_back_to_summary_and_ignores_other_triggers():
    text = _DUMP.replace("Client Request: m3.1.8", "Program termination").replace("totals: 123457\n", "")
    text = text.replace("summary: 123457", "summary: 99")
    assert cg.parse_counts(text) == (None, 99)


def test_parse_counts_rejects_files_without_instruction_counts():
    with pytest.raises(ValueError, match="totals"):
        cg.parse_counts(_DUMP.replace("totals: 123457", "").replace("summary: 123457", ""))
    with pytest.raises(ValueError, match="not Ir"):
        cg.parse_counts(_DUMP.replace("events: Ir", "events: Dr Ir"))


def test_read_dumps_maps_labels_to_counts(tmp_path):
    (tmp_path / "callgrind.out.1").write_text(_DUMP)
    (tmp_path / "callgrind.out.2").write_text(_DUMP.replace("m3.1.8", "m3.1.16").replace("123457", "246000"))
    (tmp_path / "callgrind.out").write_text(_DUMP.replace("Client Request: m3.1.8", "Program termination"))
    assert cg.read_dumps(str(tmp_path / "callgrind.out*")) == {"m3.1.8": 123457, "m3.1.16": 246000}


@pytest.mark.parametrize("calls", [1, 4, 7])
def test_per_call_cancels_the_region_constant(calls):
    fixed, one = 31_337, 700_001
    count_n, count_2n = fixed + calls * one, fixed + 2 * calls * one
    assert cg.per_call(count_n, count_2n, calls) == (one, fixed)


def test_per_call_rejects_no_calls():
    with pytest.raises(ValueError, match="calls"):
        cg.per_call(10, 20, 0)


def _plan_item(impls):
    return {"case": "dropout/fwd", "dtype": "float32", "size": 1000, "size_label": "1000", "impls": impls}


def test_document_differences_each_implementation_and_takes_ratios():
    plan = [_plan_item(["fusedreg[cpu]", "torch a", "torch b"])]
    records = [{"on_valgrind": 1, "torch_isa": "AVX2", "cpu_level": 1, "threads": 1},
               {"id": 0, "elements": 1000},
               {"id": 0, "impl": "fusedreg[cpu]", "labels": ["s4", "s8"], "calls": 4},
               {"id": 0, "impl": "torch a", "labels": ["a4", "a8"], "calls": 4},
               {"id": 0, "impl": "torch b", "error": "RuntimeError: boom"}]
    # subject: 10 per element + 500 per region; baseline a: 30 per element + 900 per region
    dumps = {"s4": 500 + 4 * 10_000, "s8": 500 + 8 * 10_000, "a4": 900 + 4 * 30_000, "a8": 900 + 8 * 30_000}
    doc = cg._document(plan, records, dumps, crash=None)
    entry = doc["results"][0]
    ours, theirs = entry["impls"]["fusedreg[cpu]"], entry["impls"]["torch a"]
    assert (ours["instructions"], ours["region_constant"], ours["per_element"]) == (10_000, 500, 10)
    assert (theirs["instructions"], theirs["per_element"]) == (30_000, 30)
    assert entry["ratios"] == {"torch a": 3.0, "torch b": None}
    assert entry["impls"]["torch b"] == {"ok": False, "error": "RuntimeError: boom"}
    assert doc["torch_isa"] == "AVX2" and doc["fusedreg_isa"] == "avx2" and doc["on_valgrind"]
    assert callgrind_report.failures(doc) == ["dropout/fwd float32 1000 torch b: RuntimeError: boom"]
    table = callgrind_report.format_table(dict(doc, machine={"cpu": "test cpu", "cpu_count": 2, "torch": "x"},
                                 valgrind="valgrind-x"))
    assert "3.00x" in table and "10.00" in table and "ERROR RuntimeError: boom" in table


def test_document_marks_what_a_crashed_child_did_not_count():
    plan = [_plan_item(["fusedreg[cpu]", "torch a"])] * 2
    records = [{"on_valgrind": 1, "torch_isa": "AVX2", "cpu_level": 1, "threads": 1},
               {"id": 0, "elements": 1000},
               {"id": 0, "impl": "fusedreg[cpu]", "labels": ["s4", "s8"], "calls": 4},
               {"id": 0, "impl": "torch a", "labels": ["a4", "a8"], "calls": 4}]
    dumps = {"s4": 40, "s8": 80}  # the child died before dumping a8
    doc = cg._document(plan, records, dumps, crash="the valgrind child exited with status -4")
    first, second = doc["results"]
    assert first["impls"]["fusedreg[cpu]"]["ok"] and first["impls"]["fusedreg[cpu]"]["instructions"] == 10
    assert not first["impls"]["torch a"]["ok"] and first["ratios"]["torch a"] is None
    assert all(r["error"].startswith("the valgrind child exited") for r in second["impls"].values())


def test_document_and_table_show_skipped_cases_as_not_failed():
    plan = [dict(_plan_item(["fusedreg[cpu]", "torch a"]), skipped="9000000 elements, above --quick's 2097152")]
    records = [{"on_valgrind": 1, "torch_isa": "AVX2", "cpu_level": 1, "threads": 1},
               {"id": 0, "skipped": plan[0]["skipped"]}]
    doc = cg._document(plan, records, {}, crash=None)
    assert all(r == {"ok": False, "skipped": plan[0]["skipped"]} for r in doc["results"][0]["impls"].values())
    assert callgrind_report.failures(doc) == []
    table = callgrind_report.format_table(dict(doc, machine={"cpu": "c", "cpu_count": 2, "torch": "x"},
                                               valgrind="valgrind-x"))
    assert "n/a: 9000000 elements, above --quick's 2097152" in table


@pytest.mark.parametrize("supported, cap, level", [(1, "avx2", "avx2"), (2, "avx2", "avx2"),
                                                   (1, "avx512", "avx2"), (2, "default", "default"),
                                                   (2, "bogus", "avx512")])
def test_fusedreg_level_follows_cpu_isa_h(supported, cap, level):
    assert cg._fusedreg_level(supported, cap) == level


def test_primary_elements():
    x = torch.zeros(3, 5)
    assert cg.primary_elements(x) == 15
    assert cg.primary_elements(([x, torch.zeros(7)], [x, torch.zeros(7)])) == 22  # AdamW: parameters
    assert cg.primary_elements(([x], -1.0)) == 15                                 # clip: gradients
    assert cg.primary_elements((torch.zeros(2, 4), x, torch.zeros(4))) == 8       # dropout_add: input
    with pytest.raises(ValueError, match="no tensor"):
        cg.primary_elements((1.0, 2.0))


def test_plan_pairs_fusedreg_cpu_with_torch_builtins_only():
    plan = cg.plan_cases(None, quick=True)
    ops = {item["case"].split("/")[0] for item in plan}
    assert ops >= {"dropout", "dropout_add", "adamw", "clip", "batch_norm"}
    for item in plan:
        subject, *baselines = item["impls"]
        assert subject.startswith("fusedreg[cpu]"), item
        assert baselines and all(name.startswith("torch ") for name in baselines), item
    keys = [(item["case"], item["dtype"]) for item in plan]
    assert len(keys) == len(set(keys)), "--quick counts one size per case and dtype"
    skipped = [int(item["skipped"].split()[0]) for item in plan if "skipped" in item]
    assert all(elements > cg.QUICK_MAX_ELEMENTS for elements in skipped)
    assert len(skipped) < len(plan)
    full = cg.plan_cases(["dropout"], dtypes=[torch.bfloat16])
    assert {item["dtype"] for item in full} == {"bfloat16"} and len(full) > len(
        cg.plan_cases(["dropout"], dtypes=[torch.bfloat16], quick=True))


def test_cli_without_valgrind_says_so_and_exits_3(monkeypatch, capsys):
    real_which = shutil.which
    monkeypatch.setattr(cg.shutil, "which",
                        lambda name, *a, **k: None if name == "valgrind" else real_which(name))
    assert cli.main(["bench", "--count-instructions", "dropout", "--quick"]) == 3
    assert "valgrind not found" in capsys.readouterr().err


def test_cli_rejects_cuda_and_threads():
    for extra in (["--device", "cuda"], ["--threads", "2"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", "--count-instructions", "dropout", *extra])
        assert exc.value.code == 2


# ----------------------------------------------------------------------------- a real count

def _can_count() -> str | None:
    if shutil.which("valgrind") is None:
        return "valgrind not installed"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return "no C compiler"
    proc = subprocess.run([compiler, "-E", "-x", "c", "-"], input="#include <valgrind/callgrind.h>\n",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return "valgrind/callgrind.h not found"
    return None


@pytest.fixture(scope="module")
def counted(cpu_library):
    """One valgrind child (~1 min on a loaded 2-core machine): dropout fwd float32 at 2^18, 2^19 and
    2^18 again, each counted from its own inputs and setup."""
    reason = _can_count()
    if reason:
        pytest.skip(reason)
    sizes = [2**18, 2**19, 2**18]
    plan = [dict(_plan_item(["fusedreg[cpu]", "torch nn.Dropout"] if k == 0 else ["fusedreg[cpu]"]),
                 size=size, size_label=str(size)) for k, size in enumerate(sizes)]
    return cg.count(plan=plan)


def test_real_count_runs_on_valgrind_at_avx2(counted):
    assert counted["crash"] is None and callgrind_report.failures(counted) == []
    assert counted["on_valgrind"] and counted["threads"] == 1
    assert counted["fusedreg_isa"] == "avx2" and counted["torch_isa"] == "AVX2"
    first = counted["results"][0]
    assert first["elements"] == 2**18
    # torch's dropout draws a mask with a Bernoulli per element and multiplies: many times fusedreg's work
    assert first["ratios"]["torch nn.Dropout"] > 2


def test_real_count_is_repeatable(counted):
    a, _, c = (e["impls"]["fusedreg[cpu]"]["instructions"] for e in counted["results"])
    assert abs(a - c) <= 0.005 * a, (a, c)


def test_real_count_is_proportional_to_elements(counted):
    """Twice the elements, twice the instructions, less the per-call constant (Python, dispatch:
    ~80k instructions, 3% of a call at 2^18): the ratio must lie in [1.90, 2.05]."""
    small, large, _ = (e["impls"]["fusedreg[cpu]"]["instructions"] for e in counted["results"])
    assert 1.90 <= large / small <= 2.05, (small, large)
