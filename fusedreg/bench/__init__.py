"""Benchmarks behind `fusedreg bench`: cases registered per op, timed against baselines and against
the copy bandwidth measured in the same run.

  registry.py  Case / Impl / Skip / register: what a case is; imports the op modules
  <op>.py      one module per op (copy.py, dropout.py, ...) registering that op's cases
  timing.py    how callables are timed (do_bench / CUDA events / interleaved perf_counter rounds), peak memory
  copy.py      copy bandwidth (the yardstick) and the harness's own sanity case
  harness.py   runs cases into one results document
  machine.py   the machine a result came from
  report.py    the table (terminal and .txt) and JSON;  plot.py  PNG
"""
from .registry import Case, Impl, Skip, cases, known_ops, register, register_case

__all__ = ["Case", "Impl", "Skip", "cases", "known_ops", "register", "register_case"]
