"""The command line: `python -m fusedreg env | build | bench` and the benchmark registry behind it."""
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fusedreg import _build, cli
from fusedreg.backends import BACKENDS
from fusedreg.bench import plot, registry

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fusedreg", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("env", "build", "bench"):
        assert command in proc.stdout


def test_env_names_every_backend_and_builds_nothing(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = run_cli("env", env_extra={"FUSEDREG_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    backend_lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    for name in BACKENDS:
        assert name in backend_lines, proc.stdout
        assert "usable" in backend_lines[name] or "UNUSABLE" in backend_lines[name]
    assert "torch" in proc.stdout and str(cache) in proc.stdout
    assert list(cache.iterdir()) == [], "`fusedreg env` must not build or create anything"


def test_bench_copy_quick_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "res" / "b.json", tmp_path / "b.png"
    proc = run_cli("bench", "copy", "--quick", "--device", "cpu", "--dtype", "float32",
                   "--json", str(out_json), "--plot", str(out_png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch copy_" in proc.stdout and "GB/s" in proc.stdout

    doc = json.loads(out_json.read_text())
    assert doc["device"] == "cpu"
    for key in ("torch", "cpu", "python", "cpu_count"):
        assert doc["machine"].get(key), key
    assert "hostname" not in json.dumps(doc["machine"]).lower()
    assert doc["copy_bandwidth"]["gbps"] > 0 and doc["copy_bandwidth"]["bytes"] >= 2**26
    assert doc["results"] and {e["op"] for e in doc["results"]} == {"copy"}
    assert {e["dtype"] for e in doc["results"]} == {"float32"}
    for entry in doc["results"]:
        subject = entry["impls"][entry["subject"]]
        assert subject["ok"] and subject["gbps"] > 0 and subject["time_ms"] > 0
        assert subject["time_ms_q20"] <= subject["time_ms"] <= subject["time_ms_q80"]
        assert subject["pct_copy_bw"] == pytest.approx(100 * subject["gbps"] / doc["copy_bandwidth"]["gbps"])
        assert subject["peak_memory_bytes"] is None  # no allocator statistics on CPU
        clone = entry["impls"]["torch clone"]
        # paired per-round ratios (interleaved timing): their median sits inside their own band
        low, high = entry["ratio_bands"]["torch clone"]
        assert 0 < low <= entry["ratios"]["torch clone"] <= high
        for r in (subject, clone):
            assert r["samples"] >= 11 and r["band"] == pytest.approx(
                (r["time_ms_q80"] - r["time_ms_q20"]) / r["time_ms"])
            assert r["wide_band"] == (r["band"] > 0.3)
    assert doc["threads"] >= 1 and doc["interleaved"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["bench", "--device", "tpu"], "invalid choice"),
    (["bench", "--dtype", "float7"], "unknown dtype 'float7'"),
    (["bench", "no_such_op", "--device", "cpu"], "unknown op 'no_such_op'"),
    (["bench", "copy", "--device", "cpu", "--dtype", "float64"], "no benchmark case of copy"),
    (["build", "--cuda", "--cpu"], "not allowed with"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_nonzero_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_default_outputs_go_to_bench_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "copy", "--quick", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bench-out" / "bench-cpu.json").read_text())["results"]
    assert (tmp_path / "bench-out" / "bench-cpu.png").stat().st_size > 0
    table = (tmp_path / "bench-out" / "bench-cpu.txt").read_text()
    assert table == capsys.readouterr().out.split("\nwrote ")[0].rstrip("\n") + "\n"
    assert "copy/copy_" in table and "threads: " in table and "band" in table


def test_bench_threads_option_sets_and_restores_the_thread_count(tmp_path, capsys):
    before = torch.get_num_threads()
    assert cli.main(["bench", "copy", "--quick", "--device", "cpu", "--dtype", "float32", "--threads", "1",
                     "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"),
                     "--table", str(tmp_path / "b.txt")]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["threads"] == 1 and doc["machine"]["torch_threads"] == 1
    load = doc["load_average"]
    assert load["cores"] >= 1 and load["start"] is None or load["start"] >= 0
    assert "threads: 1;" in (tmp_path / "b.txt").read_text()
    assert torch.get_num_threads() == before
    with pytest.raises(SystemExit):
        cli.main(["bench", "copy", "--device", "cpu", "--threads", "0"])
    assert "--threads must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_steady_malloc_keeps_freed_memory_and_the_bench_names_its_policy(tmp_path):
    """Nine 8 MiB tensors allocated, touched and freed together, round after round, under
    steady_malloc: after 8 unmeasured rounds the median round faults (almost) no page in, the
    freed memory having stayed in the process. glibc's own policy hands a freed heap top above
    twice the largest block it has seen mapped back to the OS, so in a fresh process the same
    rounds fault ~16,000 pages each; whether it does depends on what the process allocated before
    (import order, earlier tests), so that side is not asserted. The rounds run in a fresh
    process, as the bench does. The bench's table header and JSON name the policy, and
    --system-malloc leaves glibc's own."""
    pages = 9 * 8 * 2**20 // 4096
    code = textwrap.dedent("""
        import torch
        from fusedreg.bench import cpu_malloc
        from fusedreg.bench.timing import minor_page_faults

        def round_faults():
            before = minor_page_faults()
            tensors = [torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(9)]
            del tensors
            return minor_page_faults() - before

        with cpu_malloc.steady_malloc() as policy:
            for _ in range(8):
                round_faults()
            print(policy)
            print(sorted(round_faults() for _ in range(11))[5])  # the median round
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    policy, faults = proc.stdout.strip().splitlines()[-2:]
    assert policy.startswith("glibc malloc with fixed thresholds")
    assert int(faults) < pages / 100

    for flags, expected in (([], "glibc malloc with fixed thresholds"), (["--system-malloc"], "the C library's default")):
        assert cli.main(["bench", "copy", "--quick", "--device", "cpu", "--dtype", "float32", *flags,
                         "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"),
                         "--table", str(tmp_path / "b.txt")]) == 0
        assert json.loads((tmp_path / "b.json").read_text())["malloc"].startswith(expected)
        assert f"malloc: {expected}" in (tmp_path / "b.txt").read_text()


def test_progress_counts_measurements_and_estimates_the_rest(monkeypatch):
    from fusedreg.bench import harness

    monkeypatch.setattr(registry, "_CASES", {})
    registry.register(registry.Case(
        op="fake", name="p", make=lambda size, dtype, device: torch.ones(size),
        bytes_moved=lambda size, dtype: 8 * size, impls={"subject": lambda x: (lambda: x * 2)},
        sizes=[4, 8, 16], dtypes=[torch.float32, torch.bfloat16]))
    monkeypatch.setattr(harness, "copy_bandwidth", lambda device, timer, quick: {
        "bytes": 1, "time_ms": 1.0, "time_ms_q20": 1.0, "time_ms_q80": 1.0, "gbps": 1.0, "method": "fake"})
    lines = []
    harness.run(["fake"], "cpu", quick=True, progress=lines.append)
    steps = [line for line in lines if line.startswith("[")]
    assert [s.split("]")[0] for s in steps] == [f"[{k}/6" for k in range(1, 7)]
    assert "left)" not in steps[0] and all("left)" in s for s in steps[1:])


def test_plot_draws_shapes_as_bars_and_counts_as_lines(tmp_path, monkeypatch):
    """Cases sized by shapes (BatchNorm) must not be joined by a line across unrelated shapes."""
    import matplotlib.axes

    drawn = {"plot": 0, "bar": 0}
    for kind in drawn:
        original = getattr(matplotlib.axes.Axes, kind)

        def counting(self, *args, _kind=kind, _original=original, **kwargs):
            drawn[_kind] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(matplotlib.axes.Axes, kind, counting)

    def entry(op, size, label, dtype):
        r = {"ok": True, "gbps": 1.0, "time_ms": 1.0}
        return {"op": op, "case": "c", "size": size, "size_label": label, "dtype": dtype,
                "bytes_moved": 1024, "in_cache": True, "impls": {"ours": r, "theirs": dict(r)}}

    results = [entry("counts", n, str(n), d) for d in ("float32", "bfloat16") for n in (1, 2)]
    results += [entry("shapes", [2, 3, s, "nchw"], f"2x3x{s}", d) for d in ("float32", "bfloat16")
                for s in (4, 5)]
    doc = {"results": results, "copy_bandwidth": {"gbps": 1.0}, "device": "cpu", "threads": 1,
           "machine": {"cpu": "x", "cpu_count": 1, "torch": "t"}, "cache_bytes": 2048}
    assert plot.write_png(doc, tmp_path / "p.png") is None
    assert drawn == {"plot": 4, "bar": 4}  # (ours, theirs) x (float32, bfloat16), each way once


def test_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    note = plot.write_png({"results": []}, tmp_path / "x.png")
    assert "matplotlib" in note and not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- build command

@pytest.fixture
def fake_build(monkeypatch):
    """_build with kind -> unbuildable reason / build outcome chosen by the test; nothing compiles."""
    state = {"reasons": {}, "fail": set(), "built": []}

    def load_library(kind, verbose=False):
        assert verbose, "`fusedreg build` must show progress"
        if kind in state["fail"]:
            raise _build.BuildError(f"building fusedreg_{kind} failed: boom", "/tmp/x/build.log")
        state["built"].append(kind)
        return Path(f"/tmp/fusedreg_{kind}.so")

    monkeypatch.setattr(_build, "unbuildable_reason", lambda kind: state["reasons"].get(kind))
    monkeypatch.setattr(_build, "library_status", lambda kind: ("not built", ""))
    monkeypatch.setattr(_build, "load_library", load_library)
    return state


def test_build_skips_what_cannot_build_here(fake_build, capsys):
    fake_build["reasons"]["cuda"] = "no CUDA toolkit found"
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert fake_build["built"] == ["cpu"]
    assert "fusedreg_cuda: skipped: no CUDA toolkit found" in out and "fusedreg_cpu: ok" in out


def test_build_explicit_cuda_that_cannot_build_fails(fake_build, capsys):
    fake_build["reasons"]["cuda"] = "no CUDA toolkit found"
    assert cli.main(["build", "--cuda"]) == 1
    assert "no CUDA toolkit found" in capsys.readouterr().err
    assert fake_build["built"] == []


def test_build_failure_exits_1_with_the_log_path(fake_build, capsys):
    fake_build["fail"].add("cpu")
    assert cli.main(["build"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "/tmp/x/build.log" in captured.err
    assert fake_build["built"] == ["cuda"]  # one failure does not stop the other library


# ----------------------------------------------------------------------------- registry

def test_registry_tolerates_a_broken_op_module():
    errors = registry.load_op_modules(["copy", "no_such_module"])
    assert "no_such_module" in errors and "copy" not in errors
    assert "copy" in registry.known_ops()


def test_case_selects_impls_and_sizes_per_device_and_quick():
    case = registry.Case(
        op="t", name="c", make=lambda size, dtype, device: None, bytes_moved=lambda size, dtype: size,
        impls={"subject": lambda x: (lambda: None),
               "gpu only": registry.Impl(lambda x: (lambda: None), devices=("cuda",)),
               "compiled": registry.Impl(lambda x: (lambda: None), quick=("cuda",))},
        sizes={"cuda": [1, 2, 3], "cpu": [4, 5]}, quick_sizes=[9])
    assert list(case.impls_for("cpu", quick=False)) == ["subject", "compiled"]
    assert list(case.impls_for("cpu", quick=True)) == ["subject"]
    assert list(case.impls_for("cuda", quick=True)) == ["subject", "gpu only", "compiled"]
    assert case.sizes_for("cpu", quick=False) == [4, 5] and case.sizes_for("cuda", quick=True) == [9]
    with pytest.raises(ValueError):
        registry.Case(op="t", name="c", make=None, bytes_moved=None, impls={}, sizes=[1])


def test_cuda_shaped_results_render(monkeypatch, tmp_path):
    """The graph-replay and peak-memory paths, which only a GPU exercises for real, with a fake
    timer: what lands in the JSON, the table and the plot."""
    from fusedreg.bench import harness, report
    from fusedreg.bench.timing import Measurement

    class FakeTimer:
        name = "fake"

        def time(self, fn):
            fn()
            return Measurement(2.0, 1.5, 2.5)

        def graph(self, fn):
            if fn.__name__ == "uncapturable":
                raise RuntimeError("operation not permitted when stream is capturing")
            return Measurement(1.0, 0.9, 1.1)

    def setup(name):
        def make_fn(x):
            def fn():
                return x * 2
            fn.__name__ = name
            return fn
        return make_fn

    def broken(x):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(registry, "_CASES", {})
    registry.register(registry.Case(
        op="fake", name="graph", make=lambda size, dtype, device: torch.ones(size),
        bytes_moved=lambda size, dtype: 2e9 * size,  # 2 GB per unit: 1000 GB/s at 2 ms
        impls={"subject": setup("capturable"), "baseline": setup("uncapturable"),
               "broken": broken, "n/a here": registry.Impl(setup("x"), devices=("cpu",))},
        sizes=[1, 2], dtypes=[torch.float32], devices=("cuda",), cuda_graph=True, measure_memory=True))
    monkeypatch.setattr(harness, "make_timer", lambda device, quick: FakeTimer())
    monkeypatch.setattr(harness, "copy_bandwidth", lambda device, timer, quick: {
        "bytes": 2**30, "time_ms": 1.0, "time_ms_q20": 1.0, "time_ms_q80": 1.0, "gbps": 2000.0,
        "method": "fake"})
    monkeypatch.setattr(harness, "machine_info", lambda device: {
        "device": device, "gpu": "Fake GPU", "torch": "x", "cuda": "13.0", "driver": "1"})
    monkeypatch.setattr(harness, "peak_memory_bytes", lambda fn, device: 3 * 2**20)

    doc = harness.run(["fake"], "cuda", quick=True, progress=lambda line: None)
    entry = doc["results"][0]
    assert list(entry["impls"]) == ["subject", "baseline", "broken"]
    subject, baseline = entry["impls"]["subject"], entry["impls"]["baseline"]
    assert subject["gbps"] == pytest.approx(1000) and subject["pct_copy_bw"] == pytest.approx(50)
    assert subject["graph_time_ms"] == 1.0 and subject["peak_memory_bytes"] == 3 * 2**20
    assert "capturing" in baseline["graph_error"] and baseline["ok"]
    assert entry["ratios"] == {"baseline": pytest.approx(1.0), "broken": None}
    assert harness.failures(doc) == [f"fake/graph float32 {n} broken: RuntimeError: kernel exploded"
                                     for n in (1, 2)]

    table = report.format_table(doc)
    assert "graph replay" in table and "3.0 MiB" in table and "failed" in table
    assert "ERROR RuntimeError: kernel exploded" in table and "Fake GPU" in table
    assert plot.write_png(doc, tmp_path / "fake.png") is None
    assert json.loads(json.dumps(doc)) == doc


def test_bench_filters_sizes_compiled_baselines_and_stops_at_its_budget(monkeypatch):
    """--min-elements, --no-compile and --budget: what a time-boxed GPU check relies on."""
    from fusedreg.bench import harness

    monkeypatch.setattr(registry, "_CASES", {})
    registry.register(registry.Case(
        op="fake", name="sizes", make=lambda size, dtype, device: torch.ones(2),
        bytes_moved=lambda size, dtype: 8,
        impls={"subject": lambda x: (lambda: x * 2), "torch.compile(x)": lambda x: (lambda: x * 3)},
        sizes=[16, (4, 4, "nc"), 8, (2, 3, "nhwc")], dtypes=[torch.float32]))
    monkeypatch.setattr(harness, "copy_bandwidth", lambda device, timer, quick: {
        "bytes": 1, "time_ms": 1.0, "time_ms_q20": 1.0, "time_ms_q80": 1.0, "gbps": 1.0, "method": "fake"})

    doc = harness.run(["fake"], "cpu", quick=True, progress=lambda line: None,
                      min_elements=16, compiled=False)
    assert [e["size"] for e in doc["results"]] == [16, [4, 4, "nc"]]
    assert all(list(e["impls"]) == ["subject"] for e in doc["results"])
    assert doc["left_out_by_budget"] == []

    doc = harness.run(["fake"], "cpu", quick=True, progress=lambda line: None, budget_s=0.0)
    assert doc["results"] == [] and len(doc["left_out_by_budget"]) == 4
