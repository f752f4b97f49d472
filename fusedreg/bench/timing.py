"""How one callable is timed, and its peak memory.

CUDA: triton.testing.do_bench when importable (it flushes L2 before every repetition, so small
sizes are not timed out of cache), else CUDA events with the same L2 flush. CPU: perf_counter
around batches of calls, and `CpuTimer.time_interleaved` for a case's implementations together:
rounds in which every implementation runs one batch, in an order that changes from round to round
(balanced_orders: each implementation runs right after each other one equally often), so that a
burst of load from other processes lands on subject and baselines alike and the ratio of each
round's pair of times stays meaningful when the times themselves swing. All report the
median and the 20th/80th percentiles in ms. The CPU timer also counts the page faults of each
batch (the process's minor faults, all threads): a call whose output lands on memory the allocator
had handed back to the OS faults in every page afresh (~6,400 faults for 25 MiB, over a millisecond
on the 2-core VM), and whether it does depends on the process's allocation history, not the kernel.
"""
from __future__ import annotations

import math
import statistics
import time

try:
    import resource
except ImportError:  # not on Windows: no fault counts there
    resource = None
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Measurement", "Timer", "make_timer", "peak_memory_bytes", "quantiles", "minor_page_faults",
           "WIDE_BAND"]

# A q20..q80 band wider than this fraction of the median marks a measurement as noisy.
WIDE_BAND = 0.3
# Interleaved rounds a measurement gets however slow its slowest implementation is.
_MIN_ROUNDS = 5


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n implementations for successive rounds, a Williams design: over the list each
    implementation runs right after each other one equally often (once for even n, twice for odd
    n). What one call leaves behind (caches full of its data, threads parked or spinning) changes
    the time of the next; a plain rotation makes the one listed first follow the one listed last
    in most rounds, so a slow, memory-hungry baseline would slow the subject more than the others."""
    first, low, high = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...: successive differences all distinct
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(i + shift) % n for i in first] for shift in range(n)]
    return orders if n % 2 == 0 or n == 1 else orders + [order[::-1] for order in orders]


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int | None = None


def quantiles(samples_ms: list[float]) -> Measurement:
    """Median, 20th and 80th percentile (nearest rank) of some samples."""
    ordered = sorted(samples_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return Measurement(statistics.median(ordered), at(0.2), at(0.8), len(ordered))


class Timer:
    """time(fn) -> Measurement on one device; `graph(fn)` times CUDA-graph replays of fn."""

    name = "timer"

    def time(self, fn: Callable[[], Any]) -> Measurement:
        raise NotImplementedError

    def graph(self, fn: Callable[[], Any]) -> Measurement:
        raise NotImplementedError("CUDA graphs exist only on CUDA devices")


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (every thread), where the OS counts them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


class CpuTimer(Timer):
    name = "time.perf_counter"

    def __init__(self, budget_s: float, min_samples: int, max_samples: int = 200):
        self.budget_s = budget_s
        self.min_samples = min_samples
        self.max_samples = max_samples
        # name -> page faults per call of each round of the last time_interleaved (empty lists
        # where the OS keeps no count)
        self.page_faults: dict[str, list[float]] = {}

    def time_interleaved(self, fns: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        """Per-round times in ms of each callable, timed together: round r runs one batch of every
        callable, in the order balanced_orders gives round r. Samples of one round are aligned across
        callables (index r), for paired ratios. Each callable gets about budget_s in all, at least
        min_samples rounds and at most max_samples."""
        names = list(fns)
        inner, once = {}, {}
        for name in names:
            fns[name]()  # first call pays for lazy initialisation and allocator growth
            start = time.perf_counter()
            fns[name]()
            once[name] = max(time.perf_counter() - start, 1e-7)
            # Calls shorter than ~100 us are batched so perf_counter's own cost stays negligible.
            inner[name] = max(1, math.ceil(1e-4 / once[name]))
        per_round = sum(once[n] * inner[n] for n in names)
        rounds = int(self.budget_s * len(names) / per_round)
        rounds = min(self.max_samples, max(self.min_samples, rounds))
        deadline = time.perf_counter() + self.budget_s * len(names)
        samples: dict[str, list[float]] = {name: [] for name in names}
        self.page_faults = {name: [] for name in names}
        orders = balanced_orders(len(names))
        for r in range(rounds):
            for name in (names[i] for i in orders[r % len(orders)]):
                fn, reps = fns[name], inner[name]
                faults = minor_page_faults()
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                samples[name].append((time.perf_counter() - start) / reps * 1e3)
                if faults is not None:
                    self.page_faults[name].append((minor_page_faults() - faults) / reps)
            now = time.perf_counter()
            if now > deadline and r + 1 >= self.min_samples:
                break
            # an implementation far slower than the budget (an eager reference at the largest
            # size) stops the rounds early, with a band that is still a band
            if now > deadline + 3 * self.budget_s * len(names) and r + 1 >= _MIN_ROUNDS:
                break
        return samples

    def time(self, fn):
        fn()  # first call pays for lazy initialisation and allocator growth
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        # Calls shorter than ~100 us are batched so perf_counter's own cost stays negligible.
        inner = max(1, math.ceil(1e-4 / once))
        samples = int(self.budget_s / (once * inner))
        samples = min(self.max_samples, max(self.min_samples, samples))
        times = [once * 1e3] if inner == 1 else []
        deadline = time.perf_counter() + self.budget_s
        while len(times) < samples:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            end = time.perf_counter()
            times.append((end - start) / inner * 1e3)
            # The first calls can be unrepresentatively fast (e.g. a core stolen on a shared VM
            # stalls later parallel regions); the wall-clock budget holds regardless.
            if end > deadline and len(times) >= self.min_samples:
                break
        return quantiles(times)


class _CudaTimerBase(Timer):
    def __init__(self, quick: bool):
        self.warmup_ms = 10 if quick else 25
        self.rep_ms = 30 if quick else 100

    def graph(self, fn):
        """Capture one call of fn into a CUDA graph and time its replays (no launch overhead)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside capture, as torch.cuda.graphs requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.time(graph.replay)


class TritonTimer(_CudaTimerBase):
    name = "triton.testing.do_bench"

    def time(self, fn):
        from triton.testing import do_bench

        median, q20, q80 = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                    quantiles=[0.5, 0.2, 0.8])
        return Measurement(median, q20, q80)


class CudaEventTimer(_CudaTimerBase):
    name = "cuda events"

    def __init__(self, quick: bool):
        super().__init__(quick)
        self._flush = None

    def time(self, fn):
        if self._flush is None:  # larger than any L2 so far (H100: 50 MiB)
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(min(1000, max(1, int(self.warmup_ms / estimate)))):
            fn()
        reps = min(1000, max(10, int(self.rep_ms / estimate)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for begin, finish in events:
            self._flush.zero_()
            begin.record()
            fn()
            finish.record()
        torch.cuda.synchronize()
        return quantiles([begin.elapsed_time(finish) for begin, finish in events])


def make_timer(device: str, quick: bool) -> Timer:
    if device == "cpu":
        # At least 11 interleaved rounds even in a quick run: q20 and q80 are then the 3rd and
        # 9th samples, not the extremes, and a noisy case shows as a wide band.
        return CpuTimer(budget_s=0.1, min_samples=11) if quick else CpuTimer(budget_s=0.5, min_samples=21)
    try:
        import triton.testing  # noqa: F401
    except Exception:
        return CudaEventTimer(quick)
    return TritonTimer(quick)


def peak_memory_bytes(fn: Callable[[], Any], device: str) -> int | None:
    """Memory allocated on top of what was live before, at its peak during one call (CUDA only:
    the caching allocator's statistics have no CPU counterpart)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
