"""The inter-process lock JIT builders of one library serialize on.

An flock()ed lock file: the kernel drops the lock when its holder dies, so a killed build never
blocks the next one (unlike a lock that is a file's existence, which a crash leaves behind). A live
but stuck holder makes waiters give up after FUSEDREG_BUILD_LOCK_TIMEOUT seconds (default 1800)
with a message naming the lock file; a waiter says once, after 2 s, that it is waiting.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["exclusive"]


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, error: Callable[[str], Exception]):
    """Hold lock_path (created with its directory if missing) exclusively for the block; `what`
    names the thing being built in messages. On timeout raises error(message)."""
    timeout = float(os.environ.get("FUSEDREG_BUILD_LOCK_TIMEOUT", "1800"))
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout:
                    raise error(
                        f"gave up after {timeout:.0f} s waiting for another process building {what}; "
                        f"it holds the lock file {lock_path}. If no such process is alive, delete "
                        f"that file (or raise FUSEDREG_BUILD_LOCK_TIMEOUT)") from None
                if not told and waited > 2:
                    print(f"fusedreg: waiting for another process building {what} (lock {lock_path})",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
