"""The benchmark's CPU timer: interleaved rounds in a balanced order, paired ratios, page faults."""
import sys
import time
from collections import Counter

import pytest
import torch

from fusedreg.bench import harness, registry
from fusedreg.bench.timing import CpuTimer, balanced_orders


def recorder(calls):
    """call(name): a callable that appends name to calls and takes longer than a timer batch
    (~100 us), so each round runs it exactly once."""
    def call(name):
        def fn():
            calls.append(name)
            time.sleep(2e-4)
        return fn
    return call


@pytest.mark.skipif(sys.platform != "linux", reason="minor page faults as Linux counts them")
def test_interleaved_timing_counts_page_faults_per_call_and_lists_the_faulting(tmp_path):
    """A callable touching fresh anonymous memory on every call (as an output tensor does when the
    allocator returned the previous one's pages to the OS) is counted at about one fault per page;
    one reusing its buffer at none; the table lists the first only."""
    import mmap

    from fusedreg.bench import report

    pages = 512
    kept = bytearray(pages * mmap.PAGESIZE)

    def fresh():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            for page in range(pages):
                m[page * mmap.PAGESIZE] = 1

    def reused():
        for page in range(pages):
            kept[page * mmap.PAGESIZE] = 1

    timer = CpuTimer(budget_s=0.0, min_samples=5, max_samples=5)
    samples = timer.time_interleaved({"fresh": fresh, "reused": reused})
    assert [len(timer.page_faults[n]) for n in samples] == [len(samples[n]) for n in samples] == [5, 5]
    assert sorted(timer.page_faults["fresh"])[2] >= pages  # the median round
    assert sorted(timer.page_faults["reused"])[2] < 1

    case = registry.Case(op="o", name="c", note="", sizes={"cpu": [1]}, dtypes=(torch.float32,),
                         make=lambda size, dtype, device: None, bytes_moved=lambda size, dtype: 1,
                         impls={"fresh": registry.Impl(lambda inputs: fresh),
                                "reused": registry.Impl(lambda inputs: reused)})
    results, _ = harness._measure_case(case, case.impls, None, "cpu", timer, 1.0, 1)
    assert results["fresh"]["page_faults_per_call"] >= pages
    assert results["reused"]["page_faults_per_call"] < 1
    entry = {"op": "o", "case": "c", "size_label": "1", "dtype": "float32", "subject": "fresh",
             "impls": results, "ratios": {"reused": 1.0}, "ratio_bands": {"reused": None}}
    doc = {"results": [entry]}
    assert report.faulting(doc) == [f"o/c float32 1 fresh: {results['fresh']['page_faults_per_call']:.0f}/call"]


def test_interleaved_timing_pairs_rounds_and_flags_wide_bands(monkeypatch):
    """The CPU timer runs every implementation once per round, in an order that alternates; the
    harness's ratios are medians of per-round ratios, so load that slows one round slows both sides."""
    from fusedreg.bench import report

    calls = []
    call = recorder(calls)

    timer = CpuTimer(budget_s=0.0, min_samples=4, max_samples=4)
    samples = timer.time_interleaved({"a": call("a"), "b": call("b")})
    assert [len(v) for v in samples.values()] == [4, 4] and min(samples["a"]) >= 0.2
    assert calls[4:] == ["a", "b", "b", "a"] * 2  # after two warm-up calls each; alternating order
    # far over budget: min_samples gives way to 5 rounds
    calls.clear()
    samples = CpuTimer(budget_s=0.0, min_samples=9, max_samples=9).time_interleaved({"a": call("a")})
    assert len(samples["a"]) == 5

    impls = {"subject": {"ok": True, "time_ms": 2.0}, "base": {"ok": True, "time_ms": 3.0}}
    # base is 1.5x slower in every round, while both swing 10x between rounds
    ours = [1.0, 10.0, 1.0, 10.0, 1.0, 10.0, 1.0]
    ratios, bands = harness._ratios(impls, "subject", {"subject": ours, "base": [1.5 * t for t in ours]})
    assert ratios["base"] == pytest.approx(1.5) and bands["base"] == pytest.approx([1.5, 1.5])
    ratios, bands = harness._ratios(impls, "subject", None)  # no samples: ratio of the medians
    assert ratios["base"] == pytest.approx(1.5) and bands["base"] is None

    wide = harness._result(harness.quantiles(ours), copy_gbps=1.0, bytes_moved=10**6)
    narrow = harness._result(harness.quantiles([1.0, 1.1, 1.0, 1.05, 1.0]), copy_gbps=1.0, bytes_moved=10**6)
    assert wide["wide_band"] and not narrow["wide_band"]
    entry = {"op": "o", "case": "c", "size_label": "s", "dtype": "float32", "subject": "subject",
             "impls": {"subject": wide, "base": narrow}, "ratios": {"base": 0.5},
             "ratio_bands": {"base": [0.4, 0.6]}, "in_cache": True, "note": ""}
    doc = {"results": [entry], "copy_bandwidth": {"gbps": 1.0, "method": "m"}, "device": "cpu",
           "machine": {"cpu": "x", "cpu_count": 2, "torch": "t"}, "timer": "t", "quick": True,
           "threads": 2, "interleaved": True, "cache_bytes": 2**25}
    table = report.format_table(doc)
    assert "threads: 2" in table and " !" in table and "0.50x (0.40-0.60)" in table
    assert "machine load" not in table  # not recorded: nothing said
    doc["load_average"] = {"start": 0.2, "end": 2.1, "cores": 2}
    assert "load average 0.2 before the run, 2.1 after, on 2 cores" in report.format_table(doc)
    assert "warning: other processes" not in report.format_table(doc)
    doc["load_average"]["start"] = 3.5
    assert "warning: other processes" in report.format_table(doc)
    doc["threads"] = 1
    assert "warning: other processes" not in report.format_table(doc)
    doc["threads"] = 2
    assert report.wide_bands(doc) == ["o/c float32 s subject"]
    assert report.slower_rows(doc) == ["o/c float32 s: base 0.50x"]
    assert "c  " in table.split("0.50x")[0].splitlines()[-1]  # in-cache % copy marked


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_let_each_implementation_follow_each_other_equally_often(n):
    """With a plain rotation the implementation listed first follows the one listed last in most
    rounds; a Williams design makes every ordered pair adjacent equally often."""
    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    pairs = {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(follows) == pairs
    assert set(follows.values()) <= {1 if n % 2 == 0 else 2}


def test_interleaved_rounds_follow_the_balanced_orders():
    calls = []
    call = recorder(calls)

    rounds = 6
    timer = CpuTimer(budget_s=10.0, min_samples=rounds, max_samples=rounds)
    names = ["s", "t", "u"]
    samples = timer.time_interleaved({n: call(n) for n in names})
    assert [len(samples[n]) for n in names] == [rounds] * 3
    assert calls[2 * len(names):] == [names[i] for order in balanced_orders(3) for i in order]


def test_an_unpaired_reference_is_timed_after_the_paired_rounds_and_compared_by_medians():
    """An eager reference (Impl.paired False) never runs between the subject's and the baselines'
    rounds, so its traffic through memory cannot slow one of them; its speed-up is the ratio of
    medians, without a band."""
    calls = []
    call = recorder(calls)
    impls = {name: registry.Impl(lambda inputs, fn=call(name): fn) for name in ("subject", "torch")}
    impls["reference"] = registry.Impl(lambda inputs, fn=call("reference"): fn, paired=False)
    case = registry.Case(op="o", name="c", note="", sizes={"cpu": [1]}, dtypes=(torch.float32,),
                         make=lambda size, dtype, device: None, bytes_moved=lambda size, dtype: 1,
                         impls=impls)
    timer = CpuTimer(budget_s=0.0, min_samples=5, max_samples=5)
    results, samples = harness._measure_case(case, impls, None, "cpu", timer, 1.0, 1)
    assert all(results[name]["ok"] for name in impls)
    assert samples["reference"] is None and len(samples["subject"]) == len(samples["torch"]) == 5
    last_paired = max(i for i, name in enumerate(calls) if name != "reference")
    timed_reference = [i for i, name in enumerate(calls) if name == "reference"][3:]  # set-up, warm-up
    assert timed_reference and min(timed_reference) > last_paired
    ratios, bands = harness._ratios(results, "subject", samples)
    assert bands["reference"] is None and bands["torch"] is not None
    assert ratios["reference"] == pytest.approx(results["reference"]["time_ms"] / results["subject"]["time_ms"])
