"""`fusedreg env | build | bench` (also `python -m fusedreg ...`).

env    what this machine offers fusedreg: versions, GPU, toolkit, cache, each backend usable or why
       not. Builds nothing, so it is safe to run first when something is wrong.
build  builds the C++/CUDA libraries now, with progress, instead of on first use.
bench  times the registered benchmark cases (fusedreg/bench/) and writes a table (text), JSON and a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time

__all__ = ["main", "build_parser"]

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


def _dtype(name: str):
    import torch

    key = name.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {name!r} (choose from {', '.join(sorted(set(_DTYPES.values())))})")
    return getattr(torch, _DTYPES[key])


# ----------------------------------------------------------------------------- env

def _first_line(cmd: list[str], pick: str | None = None) -> str | None:
    """The first output line of `cmd` (the first containing `pick`, if given), or None."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        for line in lines:
            if pick is None or pick in line:
                return line
    return None


# Each probe yields (label, value) rows lazily, so slow ones (nvcc) show up as they finish, and runs
# on its own, so one that breaks does not hide the others' rows.

def _env_system():
    import platform

    import torch

    import fusedreg
    from fusedreg.bench import machine

    yield "fusedreg", f"{fusedreg.__version__} ({os.path.dirname(fusedreg.__file__)})"
    yield "python", f"{platform.python_version()} ({sys.executable})"
    yield "platform", f"{platform.system()} {platform.release()} {platform.machine()}"
    yield "cpu", f"{machine.cpu_model()}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    yield "torch", f"{torch.__version__} ({build})"


def _env_gpu():
    import torch

    from fusedreg.bench import machine

    if not torch.cuda.is_available():
        yield "CUDA device", "no CUDA device"
        return
    for i in range(torch.cuda.device_count()):
        info = machine.gpu_info(i)
        yield f"cuda:{i}", (f"{info['gpu']}, compute capability {info['gpu_capability']}, "
                            f"{info['gpu_memory_gib']} GiB, {info['gpu_sm_count']} SMs")
    api = machine.cuda_driver_api()
    yield "driver", (machine.nvidia_driver() or "unknown (nvidia-smi not found)") + (
        f", supports CUDA {api}" if api else "")


def _env_tools():
    from fusedreg import _build
    from fusedreg.bench import machine

    home = _build.cuda_home()
    if home:
        nvcc = _first_line([os.path.join(home, "bin", "nvcc"), "--version"], pick="release")
        yield "CUDA toolkit", f"{home} ({nvcc or 'nvcc version unknown'})"
        yield "arch list", _build.cuda_arch_list()
    else:
        yield "CUDA toolkit", "not found (no nvcc with include/cuda_runtime.h; set CUDA_HOME)"
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    yield "C++ compiler", f"{cxx} ({_first_line([cxx, '--version'])})" if cxx else "not found"
    ninja = shutil.which("ninja")
    yield "ninja", f"{_first_line([ninja, '--version'])} ({ninja})" if ninja else "not found (pip install ninja)"
    interpret = os.environ.get("TRITON_INTERPRET")
    yield "triton", (machine.triton_version() or "not importable") + (
        f", TRITON_INTERPRET={interpret}" if interpret else "")
    try:
        import matplotlib
        yield "matplotlib", f"{matplotlib.__version__} (bench plots)"
    except ImportError:
        yield "matplotlib", "not installed: `fusedreg bench` writes no PNG"


def _env_fusedreg():
    from fusedreg import _build, backends

    yield "cache dir", str(_build.cache_root())
    yield "version key", _build.version_key()
    for kind in ("cpu", "cuda"):
        status, detail = _build.library_status(kind)
        yield f"fusedreg_{kind}", f"{status}: {detail}"
    yield "backends", ""
    for name, (usable, reason) in backends.available().items():
        yield f"  {name}", f"{'usable' if usable else 'UNUSABLE':<9} {reason}"
    yield "selected", f"{backends.get_backend()} (fusedreg.set_backend, use_backend, FUSEDREG_BACKEND)"


def _cmd_env(args) -> int:
    status = 0
    for probe in (_env_system, _env_gpu, _env_tools, _env_fusedreg):
        try:
            for label, value in probe():
                print(f"{label:<14} {value}".rstrip(), flush=True)
        except Exception as exc:
            print(f"{'error':<14} {probe.__name__.removeprefix('_env_')}: {type(exc).__name__}: {exc}",
                  flush=True)
            status = 1
    return status


# ----------------------------------------------------------------------------- build

def _cmd_build(args) -> int:
    from fusedreg import _build

    explicit = [kind for kind in ("cpu", "cuda") if getattr(args, kind)]
    status = 0
    for kind in explicit or ["cpu", "cuda"]:
        name = f"fusedreg_{kind}"
        reason = _build.unbuildable_reason(kind)
        if reason is not None:
            if explicit:
                print(f"{name}: cannot build: {reason}", file=sys.stderr, flush=True)
                status = 1
            else:
                print(f"{name}: skipped: {reason}", flush=True)
            continue
        before, _ = _build.library_status(kind)
        print(f"{name}: {'loading' if before in ('built', 'prebuilt', 'loaded') else 'building'} ...",
              flush=True)
        start = time.monotonic()
        try:
            path = _build.load_library(kind, verbose=True)
        except _build.BuildError as exc:
            print(f"{name}: FAILED after {time.monotonic() - start:.1f} s\n{exc}", file=sys.stderr, flush=True)
            status = 1
            continue
        what = "already built" if before in ("built", "prebuilt", "loaded") else "built"
        print(f"{name}: ok, {what}, loaded in {time.monotonic() - start:.1f} s -> {path}", flush=True)
    return status


# ----------------------------------------------------------------------------- bench

def _cmd_bench(args, parser: argparse.ArgumentParser) -> int:
    if args.static:  # no GPU, no timing: reads the CUDA kernels' sm_90 SASS
        if args.ops:
            parser.error("--static reports every CUDA kernel; it takes no OP")
        from fusedreg.bench import static_sass

        return static_sass.main(args.json, args.dtype)
    if args.count_instructions:  # no timing: instructions per call under valgrind's callgrind
        from fusedreg.bench import callgrind_report

        return callgrind_report.main(args, parser)

    import torch

    from fusedreg.bench import harness, plot, registry, report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (try --device cpu)")
    load_errors = registry.load_op_modules()
    known = registry.known_ops()
    if args.list:
        for case in registry.cases():
            print(f"{case.key:<28} devices {','.join(case.devices):<9} {case.note}")
        return 0
    unknown = [op for op in args.ops if op not in known]
    if unknown:
        hints = [f"fusedreg.bench.{m} failed to import: {e}" for m, e in load_errors.items() if m in unknown]
        parser.error(f"unknown op {', '.join(map(repr, unknown))}; registered: {', '.join(known)}"
                     + "".join(f"\n  {h}" for h in hints))
    selected = registry.cases(args.ops, device)
    if not any(args.dtype is None or set(args.dtype) & set(case.dtypes) for case in selected):
        parser.error(f"no benchmark case of {', '.join(args.ops) or 'any op'} runs on {device}"
                     + (f" in {', '.join(str(d).removeprefix('torch.') for d in args.dtype)}"
                        if args.dtype else ""))

    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    doc = harness.run(args.ops, device, args.dtype, quick=args.quick, min_elements=args.min_elements,
                      compiled=not args.no_compile, budget_s=args.budget, threads=args.threads,
                      steady_malloc=not args.system_malloc)
    table = report.format_table(doc)
    print(table, flush=True)
    if doc["left_out_by_budget"]:
        print(f"\ntime budget of {args.budget:g} s reached: {len(doc['left_out_by_budget'])} measurement(s) "
              f"left out: {', '.join(doc['left_out_by_budget'])}", flush=True)
    json_path = args.json or os.path.join("bench-out", f"bench-{device}.json")
    plot_path = args.plot or os.path.join("bench-out", f"bench-{device}.png")
    table_path = args.table or os.path.join("bench-out", f"bench-{device}.txt")
    report.write_json(doc, json_path)
    print(f"\nwrote {json_path}")
    report.write_text(table, table_path)
    print(f"wrote {table_path}")
    note = plot.write_png(doc, plot_path)
    print(f"plot: {note}" if note else f"wrote {plot_path}")

    failed = harness.failures(doc)
    if not args.ops:  # a whole-suite run that lost an op module did not run everything
        failed += [f"fusedreg.bench.{m} failed to import: {e}" for m, e in load_errors.items()]
    return report.exit_status(failed)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedreg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fusedreg: fused dropout, AdamW, global-norm clipping and BatchNorm for PyTorch.",
        epilog="examples:\n  fusedreg env\n  fusedreg build --cuda\n"
               "  fusedreg bench dropout adamw --dtype bfloat16 --quick")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("env", help="show versions, GPU, toolkit and backend availability (builds nothing)")

    build = sub.add_parser("build", help="build the C++/CUDA libraries now, with progress",
                           description="Build the C++/CUDA libraries now (default: every one that can "
                                       "build here; one that cannot is skipped with the reason).")
    which = build.add_mutually_exclusive_group()
    which.add_argument("--cuda", action="store_true", help="build only fusedreg_cuda (fail if it cannot build)")
    which.add_argument("--cpu", action="store_true", help="build only fusedreg_cpu (fail if it cannot build)")

    bench = sub.add_parser("bench", help="time the benchmark cases; table (text), JSON and PNG",
                           description="Time fusedreg against PyTorch per op, size and dtype; report GB/s "
                                       "and % of the copy bandwidth measured in the same run.")
    bench.add_argument("ops", nargs="*", metavar="OP", help="ops to run (default: all; see --list)")
    bench.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", nargs="+", type=_dtype, metavar="DTYPE",
                       help="only these dtypes (float32, bfloat16, float16, float64)")
    bench.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing")
    bench.add_argument("--min-elements", type=int, default=0, metavar="N",
                       help="only sizes of at least N elements (e.g. 67108864 for 2**26)")
    bench.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="start no new measurement after SECONDS; what was measured is still written")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="torch threads for the run (default: every core this process may use); "
                            "named in the table header")
    bench.add_argument("--system-malloc", action="store_true",
                       help="CPU: time under the C library's default malloc policy (by default glibc keeps "
                            "freed memory in the process during the run, so that no call pays for pages "
                            "an earlier call's free handed back to the OS); named in the table header")
    bench.add_argument("--json", metavar="PATH", help="default: bench-out/bench-<device>.json")
    bench.add_argument("--table", metavar="PATH", help="the printed table, as text; default: "
                                                        "bench-out/bench-<device>.txt")
    bench.add_argument("--plot", metavar="PATH", help="default: bench-out/bench-<device>.png")
    bench.add_argument("--list", action="store_true", help="list the registered cases and exit")
    bench.add_argument("--static", action="store_true",
                       help="no timing: registers, spills, 128-bit access and SASS instructions per element "
                            "of the CUDA kernels (sm_90, via cuobjdump) against the H200 issue budget; "
                            "--json PATH also writes PATH's .md table")
    bench.add_argument("--count-instructions", action="store_true",
                       help="no timing: instructions per call of fusedreg[cpu] and the torch baselines under "
                            "valgrind's callgrind (one thread, AVX2), load-independent; with --quick the "
                            "smallest size of each case only; table and JSON default to "
                            "bench-out/callgrind-cpu.txt / .json")
    bench.set_defaults(bench_parser=bench)  # so bench's errors print bench's usage
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "env":
        return _cmd_env(args)
    if args.command == "build":
        return _cmd_build(args)
    return _cmd_bench(args, args.bench_parser)
