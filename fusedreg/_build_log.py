"""The build log of a JIT build: ninja's output captured to a file, its progress echoed.

ninja writes to file descriptor 1 of the building process, below Python's sys.stdout, so the log is
taken by redirecting the descriptor itself; a reader thread echoes the "[k/n] file" lines, which is
all a user needs to see that a minutes-long build is moving.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

__all__ = ["ninja_output_to", "first_error"]


@contextlib.contextmanager
def ninja_output_to(log_path: Path, echo_progress: bool):
    """Send fd 1 (where ninja writes) to the log; optionally echo ninja's [k/n] lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    log = open(log_path, "w")
    os.dup2(log.fileno(), 1)
    stop = threading.Event()

    def echo():
        with open(log_path) as reader:
            while True:
                line = reader.readline()
                if line:
                    if line.startswith("["):
                        os.write(saved, f"  {line.split(' ', 1)[0]} {_short(line)}\n".encode())
                elif stop.is_set():
                    return
                else:
                    time.sleep(0.2)

    thread = threading.Thread(target=echo, daemon=True) if echo_progress else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        stop.set()
        if thread:
            thread.join(timeout=5)
        os.close(saved)
        log.close()


def _short(ninja_line: str) -> str:
    """'[2/5] /usr/bin/nvcc ... -c /x/csrc/dropout.cu -o dropout.cuda.o' -> 'dropout.cu'."""
    words = ninja_line.split()
    if "-c" in words and words.index("-c") + 1 < len(words):
        return os.path.basename(words[words.index("-c") + 1])
    return "linking" if " -shared " in ninja_line else words[-1] if words else ""


def first_error(log_path: Path) -> str | None:
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if "error" in line.lower() and len(line) < 400:
                return line.strip()
    return None
