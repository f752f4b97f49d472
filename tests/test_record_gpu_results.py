"""benchmarks/record_gpu_results.py on a synthetic gpu_check output directory: a small bench document
in the harness's schema (checked by rendering it with the real report code), a junit XML, clean and
dirty sanitizer logs, and a README with the markers. No GPU and no benchmark run needed."""
import importlib.util
import json
from pathlib import Path

import pytest

from fusedreg.bench.report import format_table

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("record_gpu_results",
                                              REPO / "benchmarks" / "record_gpu_results.py")
rgr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rgr)

MACHINE = {"device": "cuda", "fusedreg": "0.1.0", "python": "3.11.7", "platform": "Linux 6.8 x86_64",
           "cpu": "Intel Xeon", "cpu_count": 16, "torch": "2.9.1+cu128", "torch_threads": 16,
           "cuda": "12.8", "triton": "3.5.1", "gpu": "NVIDIA H200", "gpu_capability": "9.0",
           "gpu_memory_gib": 139.8, "gpu_sm_count": 132, "driver": "580.95.05", "cuda_driver_api": "13.0"}
NAMED = ("NVIDIA H200", "580.95.05", "2.9.1+cu128", "12.8", "3.5.1")  # every file must carry these
COPY_GBPS = 4000.0


def _impl(time_ms, bytes_moved, **extra):
    gbps = bytes_moved / (time_ms * 1e-3) / 1e9
    return {"ok": True, "time_ms": time_ms, "time_ms_q20": time_ms * 0.98, "time_ms_q80": time_ms * 1.02,
            "gbps": gbps, "pct_copy_bw": 100 * gbps / COPY_GBPS, **extra}


def _entry(op, case, dtype, size, bytes_moved, impls):
    subject = next(iter(impls))
    base = impls[subject].get("time_ms")
    return {"op": op, "case": case, "note": "", "size": size, "size_label": str(size), "dtype": dtype,
            "bytes_moved": bytes_moved, "floor_time_ms": bytes_moved / (COPY_GBPS * 1e9) * 1e3,
            "subject": subject, "impls": impls,
            "ratios": {n: (r["time_ms"] / base if r.get("ok") and base else None)
                       for n, r in impls.items() if n != subject}}


def fake_bench(quick=True):
    b1, b2, b3 = 2 * 2**28 * 2, 2 * 2**26 * 2, 28 * 2**26
    results = [
        _entry("copy", "copy_", "float32", 2**28, 2**31, {"torch copy_": _impl(0.54, 2**31),
                                                          "torch clone": _impl(0.55, 2**31)}),
        _entry("dropout", "fwd", "bfloat16", 2**26, b2, {
            "fusedreg[cuda]": _impl(0.08, b2), "fusedreg[triton]": _impl(0.09, b2),
            "torch nn.Dropout": _impl(0.16, b2)}),
        _entry("dropout", "fwd", "bfloat16", 2**28, b1, {
            "fusedreg[cuda]": _impl(0.30, b1), "fusedreg[triton]": _impl(0.25, b1),
            "torch nn.Dropout": _impl(0.60, b1), "torch.compile(F.dropout)": _impl(0.40, b1),
            "reference (eager)": _impl(0.20, b1)}),  # neither counts as a built-in
        _entry("adamw", "single", "float32", 2**26, b3, {
            "fusedreg[cuda]": _impl(0.50, b3),
            "fusedreg[triton]": {"ok": False, "error": "RuntimeError: out of resources"},
            "torch AdamW (default)": _impl(2.0, b3), "torch AdamW(fused=True)": _impl(1.0, b3)}),
    ]
    return {"schema": 1, "machine": dict(MACHINE), "device": "cuda", "quick": quick, "timer": "do_bench",
            "ops": ["copy", "dropout", "adamw"],
            "copy_bandwidth": {"bytes": 2**31, "time_ms": 0.537, "time_ms_q20": 0.53, "time_ms_q80": 0.54,
                               "gbps": COPY_GBPS, "method": "dst.copy_(src), float32, 1 GiB each"},
            "load_errors": {}, "results": results,
            "left_out_by_budget": [] if quick else ["clip/one tensor float32 1048576"], "elapsed_s": 12.0}


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="6" time="42.5">
<testcase classname="tests.test_dropout" name="test_fwd[cuda-cuda-bfloat16]" time="0.1"/>
<testcase classname="tests.test_dropout" name="test_fwd[cuda-triton-bfloat16]" time="0.1">
  <failure message="assert False">trace</failure></testcase>
<testcase classname="tests.test_adamw" name="test_step[default-cuda-triton]" time="0">
  <skipped type="pytest.skip" message="n/a">n/a</skipped></testcase>
<testcase classname="tests.test_clip" name="test_clip[cuda-cuda]" time="0">
  <error message="setup failed">trace</error></testcase>
<testcase classname="tests.test_clip" name="test_clip[cuda-reference]" time="0.1"/>
<testcase classname="tests.test_adamw" name="test_capture_needs_capturable" time="0.1"/>
</testsuite></testsuites>
"""
MEMCHECK = """========= COMPUTE-SANITIZER
........................................................................ [100%]
120 passed, 3 deselected in 50.20s
========= ERROR SUMMARY: 0 errors
"""
RACECHECK = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at dropout_fwd_kernel+0x1a0
========= ERROR SUMMARY: 2 errors
==== 1 failed, 119 passed in 61.0s ====
========= ERROR SUMMARY: 1 error
"""
TIER1_LOG = """fusedreg gpu_check tier 1: 2026-12-01 10:00:00 UTC
| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0     |

=== summary (tier 1, 300 s)
env        PASS       5s
tests      FAIL      120s  exit 1
gpu_check tier 1: FAILED (details in /x)
"""
README = (f"# fusedreg\n\nIntro.\n\n## GPU results\n\n{rgr.BEGIN}\nold table\n{rgr.END}\n\n"
          "## Install\n\nText.\n")


@pytest.fixture
def outdir(tmp_path):
    d = tmp_path / "gpu-out"
    d.mkdir()
    (d / "bench-quick.json").write_text(json.dumps(fake_bench()))
    (d / "bench-quick.png").write_bytes(b"\x89PNG\r\n\x1a\n check's own plot")
    return d


@pytest.fixture
def readme(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README)
    return path


@pytest.fixture
def fake_plot(monkeypatch):
    """Replaces the matplotlib plot (seconds) with a stub recording what it was asked to plot."""
    docs = []

    def write_png(doc, path):
        docs.append(doc)
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setattr(rgr, "write_png", write_png)
    return docs


def run(outdir, tmp_path, readme, *extra):
    return rgr.main([str(outdir), "--date", "2026-12-01", "--results-dir", str(tmp_path / "results"),
                     "--readme", str(readme), *extra])


def test_fake_bench_is_in_the_harness_schema():
    assert "NVIDIA H200" in format_table(fake_bench())  # the real report code reads it


def test_records_everything(outdir, tmp_path, readme, capsys, monkeypatch):
    (outdir / "bench-full.json").write_text(json.dumps(fake_bench(quick=False)))
    (outdir / "tests-gpu.xml").write_text(JUNIT)
    (outdir / "sanitizer-memcheck.log").write_text(MEMCHECK)
    (outdir / "sanitizer-racecheck.log").write_text(RACECHECK)
    (outdir / "gpu_check-tier1.log").write_text(TIER1_LOG)
    assert run(outdir, tmp_path, readme) == 0  # the real plot: its title must name the machine
    stem = tmp_path / "results" / "nvidia-h200-2026-12-01"
    assert str(stem) + ".json" in capsys.readouterr().out

    record = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert record["plot"] == "re-plotted from bench-quick.json"
    for text in NAMED:
        assert text in md and text in json.dumps(record["machine"])
    assert record["copy_bandwidth"]["gbps"] == COPY_GBPS
    assert set(record["bench"]) == {"quick", "full"} and record["bench"]["quick"] == fake_bench()

    tests = record["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"], tests["errors"]) == (3, 1, 1, 1)
    assert tests["per_backend"]["cuda"] == {"passed": 1, "failed": 0, "skipped": 0, "errors": 1}
    assert tests["per_backend"]["triton"] == {"passed": 0, "failed": 1, "skipped": 1, "errors": 0}
    assert tests["per_backend"]["reference"]["passed"] == tests["per_backend"]["other"]["passed"] == 1
    assert tests["time_s"] == 42.5
    assert "tests.test_dropout::test_fwd[cuda-triton-bfloat16] (failed)" in tests["not_passed"]

    memcheck, racecheck = record["sanitizer"]["memcheck"], record["sanitizer"]["racecheck"]
    assert (memcheck["verdict"], memcheck["errors"]) == ("clean", 0)
    assert memcheck["tests"] == "120 passed, 3 deselected in 50.20s"
    assert (racecheck["verdict"], racecheck["errors"]) == ("errors", 3)  # summed over processes
    assert racecheck["tests"] == "1 failed, 119 passed in 61.0s"
    assert record["gpu_check"]["tier1"][1:] == ["tests FAIL 120s exit 1", "gpu_check tier 1: FAILED"]

    # the table: the faster fusedreg backend against the fastest "torch ..." built-in
    assert ("| dropout / fwd | bfloat16 | 268435456 | 3579 (89%) | 4295 (107%) | torch nn.Dropout | 600 us "
            "| 2.40x (triton) |") in md
    assert ("| adamw / single | float32 | 67108864 | 3758 (94%) | error | torch AdamW(fused=True) | 1 ms "
            "| 2.00x (cuda) |") in md
    assert "copy / copy_" not in md and "RuntimeError: out of resources" in md
    assert "memcheck: **clean**" in md and "racecheck: **errors** (ERROR SUMMARY: 3 errors" in md
    assert "Left out by the time budget: 1" in md and "![quick benchmark on NVIDIA H200]" in md

    text = readme.read_text()
    before, _, rest = text.partition(rgr.BEGIN)
    section, _, after = rest.partition(rgr.END)
    assert before == README.partition(rgr.BEGIN)[0] and after == README.partition(rgr.END)[2]
    assert "old table" not in section and "results/nvidia-h200-2026-12-01.md" in section
    for name in NAMED:
        assert name in section
    assert ("| dropout fwd | bfloat16 | 268435456 | 4295 (107%), triton "
            "| 2.40x vs torch nn.Dropout |") in section
    assert "| dropout fwd | bfloat16 | 67108864 |" not in section  # only the largest size of each case
    assert "compute-sanitizer memcheck clean; racecheck errors" in section
    assert "(passed/ran: cuda 1/2, triton 0/1, reference 1/1, other 1/1)" in section

    monkeypatch.setattr(rgr, "write_png", lambda doc, path: Path(path).write_bytes(b"\x89PNG") and None)
    assert run(outdir, tmp_path, readme) == 0  # a second run replaces its own section
    assert readme.read_text() == text


def test_plot_title_names_the_machine(outdir, tmp_path, readme, fake_plot):
    assert run(outdir, tmp_path, readme) == 0
    (doc,) = fake_plot
    title = f"{doc['device']}: {rgr.machine_label(doc['machine'])}"  # what write_png puts in its title
    for name in NAMED:
        assert name in title


def test_optional_files_may_be_missing(outdir, tmp_path, readme, fake_plot):
    bench = fake_bench()
    del bench["machine"]["driver"]
    (outdir / "bench-quick.json").write_text(json.dumps(bench))
    (outdir / "gpu_check-tier1.log").write_text(TIER1_LOG)  # the driver comes from nvidia-smi's banner
    assert run(outdir, tmp_path, readme) == 0
    record = json.loads((tmp_path / "results" / "nvidia-h200-2026-12-01.json").read_text())
    assert record["tests"] is None and record["sanitizer"] == {} and set(record["bench"]) == {"quick"}
    assert record["machine"]["driver"] == "580.95.05"
    md = (tmp_path / "results" / "nvidia-h200-2026-12-01.md").read_text()
    assert "tests-gpu.xml is missing" in md and "Not run (no tier-2 sanitizer logs)" in md
    assert "compute-sanitizer not run" in readme.read_text()


def test_falls_back_to_the_checks_plot(outdir, tmp_path, readme, monkeypatch, capsys):
    monkeypatch.setattr(rgr, "write_png", lambda doc, path: "matplotlib is not installed")
    assert run(outdir, tmp_path, readme) == 0
    png = tmp_path / "results" / "nvidia-h200-2026-12-01.png"
    assert png.read_bytes() == (outdir / "bench-quick.png").read_bytes()
    assert "re-plotting failed: matplotlib is not installed" in capsys.readouterr().err


def test_missing_bench_quick_is_an_error(outdir, tmp_path, readme, capsys):
    (outdir / "bench-quick.json").unlink()
    assert run(outdir, tmp_path, readme) == 1
    assert f"{outdir / 'bench-quick.json'} not found" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and readme.read_text() == README


@pytest.mark.parametrize("text", ["# no markers\n", f"{rgr.END}\n{rgr.BEGIN}\n",
                                  f"{rgr.BEGIN}\n{rgr.END}\n{rgr.BEGIN}\n{rgr.END}\n"])
def test_readme_without_one_pair_of_markers_is_an_error(outdir, tmp_path, readme, capsys, text):
    readme.write_text(text)
    assert run(outdir, tmp_path, readme) == 1
    err = capsys.readouterr().err
    assert rgr.BEGIN in err and str(readme) in err and "nothing was written" in err
    assert not (tmp_path / "results").exists() and readme.read_text() == text


def test_a_cpu_bench_is_not_a_gpu_result(outdir, tmp_path, readme, capsys):
    bench = fake_bench()
    bench["device"] = "cpu"
    del bench["machine"]["gpu"]
    (outdir / "bench-quick.json").write_text(json.dumps(bench))
    assert run(outdir, tmp_path, readme) == 1
    assert "not on a GPU" in capsys.readouterr().err


def test_bad_date_is_refused(outdir, tmp_path, readme):
    with pytest.raises(SystemExit) as exc:
        run(outdir, tmp_path, readme, "--date", "01/12/2026")
    assert exc.value.code == 2
