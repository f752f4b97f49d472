"""The JIT build: real libraries compile and load; cache, stamp, lock and error behaviour on a tiny
stand-in source tree (built in subprocesses, since a loaded library cannot be unloaded)."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fusedreg import _build

REPO = Path(__file__).resolve().parent.parent

TINY_SOURCE = textwrap.dedent("""
    #include <torch/library.h>
    #include <ATen/ATen.h>
    #include "common/answer.h"
    TORCH_LIBRARY(fusedreg_buildtest, m) { m.def("answer(Tensor x) -> Tensor"); }
    TORCH_LIBRARY_IMPL(fusedreg_buildtest, CPU, m) {
      m.impl("answer", [](const at::Tensor& x) { return x + ANSWER; });
    }
""")


def _tiny_tree(root: Path, answer: int = 42) -> Path:
    (root / "common").mkdir(parents=True, exist_ok=True)
    (root / "common" / "answer.h").write_text(f"#pragma once\n#define ANSWER {answer}\n")
    (root / "tiny.cpp").write_text(TINY_SOURCE)
    return root


LOAD_TINY = ("import torch; from fusedreg import _build; _build.load_library('cpu'); "
             "print('ANSWER', int(torch.ops.fusedreg_buildtest.answer(torch.zeros(1)).item()))")


def _run(code: str, csrc: Path, cache: Path, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, FUSEDREG_CSRC_DIR=str(csrc), FUSEDREG_CACHE_DIR=str(cache),
                    PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=600)


def _needs_cpu_toolchain():
    reason = _build.unbuildable_reason("cpu")
    if reason:
        pytest.skip(reason)


@pytest.mark.build
def test_cpu_library_builds_and_registers_kernels():
    _needs_cpu_toolchain()
    path = _build.load_library("cpu")
    assert path.is_file()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedreg::_philox4x32", "CPU")
    assert _build.library_status("cpu")[0] == "loaded"


@pytest.mark.build
def test_cuda_library_compiles_and_links():
    reason = _build.unbuildable_reason("cuda")
    if reason:
        pytest.skip(reason)
    path = _build.load_library("cuda")  # loading needs no GPU: only the CUDA runtime library
    assert path.is_file()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedreg::_philox4x32", "CUDA")


@pytest.mark.build
def test_cache_stamp_rebuild_and_killed_build(tmp_path):
    _needs_cpu_toolchain()
    csrc, cache = _tiny_tree(tmp_path / "csrc"), tmp_path / "cache"
    first = _run(LOAD_TINY, csrc, cache)
    assert first.returncode == 0, first.stderr
    assert "ANSWER 42" in first.stdout and "fusedreg: building fusedreg_cpu" in first.stderr
    assert "fusedreg: built fusedreg_cpu in" in first.stderr
    # the cache directory is keyed by torch/CUDA/Python versions
    assert (cache / _build.version_key() / "fusedreg_cpu" / "fusedreg_cpu.stamp").is_file()

    again = _run(LOAD_TINY, csrc, cache)
    assert again.returncode == 0 and "ANSWER 42" in again.stdout
    assert "building" not in again.stderr  # stamp matches: loaded as is

    _tiny_tree(csrc, answer=7)  # a header change must rebuild
    changed = _run(LOAD_TINY, csrc, cache)
    assert "building" in changed.stderr and "ANSWER 7" in changed.stdout

    # a build killed midway leaves no stamp and a truncated library newer than its sources
    build_dir = cache / _build.version_key() / "fusedreg_cpu"
    (build_dir / "fusedreg_cpu.stamp").unlink()
    (build_dir / "fusedreg_cpu.so").write_bytes(b"\x7fELF truncated")
    recovered = _run(LOAD_TINY, csrc, cache)
    assert recovered.returncode == 0, recovered.stderr
    assert "building" in recovered.stderr and "ANSWER 7" in recovered.stdout


@pytest.mark.build
def test_concurrent_first_use_builds_once(tmp_path):
    _needs_cpu_toolchain()
    csrc, cache = _tiny_tree(tmp_path / "csrc"), tmp_path / "cache"
    env = dict(os.environ, FUSEDREG_CSRC_DIR=str(csrc), FUSEDREG_CACHE_DIR=str(cache),
               PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_TINY], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert all("ANSWER 42" in out for out, _ in outputs)
    assert sum("fusedreg: building" in err for _, err in outputs) == 1


@pytest.mark.build
def test_build_error_names_the_log(tmp_path):
    _needs_cpu_toolchain()
    csrc = _tiny_tree(tmp_path / "csrc")
    (csrc / "tiny.cpp").write_text("this is not C++;\n")
    code = ("from fusedreg import _build\n"
            "try:\n    _build.load_library('cpu')\n"
            "except _build.BuildError as e:\n    print('LOG', e.log_path); print(e)\n")
    result = _run(code, csrc, tmp_path / "cache")
    assert "LOG " in result.stdout, result.stderr
    log = Path(result.stdout.split("LOG ", 1)[1].split()[0])
    assert log.is_file() and "tiny.cpp" in log.read_text()
    assert "error" in result.stdout.lower()


def test_lock_held_by_live_process_times_out_naming_the_file(tmp_path, monkeypatch):
    import fcntl

    lock = tmp_path / "x.lock"
    monkeypatch.setenv("FUSEDREG_BUILD_LOCK_TIMEOUT", "0.5")
    with open(lock, "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(_build.BuildError, match=str(lock)):
            with _build._exclusive(lock, "something"):
                pass


def test_lock_of_killed_process_is_released(tmp_path, monkeypatch):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,time; f=open({str(lock)!r},'w'); "
                               "fcntl.flock(f.fileno(), fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    monkeypatch.setenv("FUSEDREG_BUILD_LOCK_TIMEOUT", "10")
    start = time.monotonic()
    with _build._exclusive(lock, "something"):
        pass
    assert time.monotonic() - start < 5


def test_import_builds_and_imports_nothing_heavy(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys, fusedreg, torch; x = torch.ops.fusedreg.dropout_fwd; "
            "print(sorted(m for m in ('triton', 'torch.utils.cpp_extension') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, FUSEDREG_CACHE_DIR=str(cache), PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not cache.exists()


def test_default_arch_is_hopper_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert f"{major}.{minor}" in _build.cuda_arch_list()
    else:
        assert _build.cuda_arch_list() == "9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert _build.cuda_arch_list() == "8.0;9.0"


def test_max_jobs_is_bounded_by_cores(monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    assert 1 <= _build._max_jobs() <= (os.cpu_count() or 1)
    monkeypatch.setenv("MAX_JOBS", "3")
    assert _build._max_jobs() == 3
