"""The CPU benchmark's malloc policy: no call pays for pages an earlier call handed back.

glibc's malloc adapts its thresholds to the process's history: a freed block above the mmap
threshold goes back to the OS (munmap), the threshold then rises to that block's size, and the
heap's top is trimmed once its free space exceeds twice the threshold. Which of a benchmark's
calls then faults its output's pages in afresh (~6,400 faults for 25 MiB, over a millisecond on
the 2-core VM) depends on what the other implementations allocated before it, not on the kernel:
torch's channels_last BatchNorm forward ran 1.4 ms in one process and 7.7-8.8 ms with 5,000-6,200
faults per call in another. Fixed thresholds (the mallopt calls below) end the adaptation:
allocations under 32 MiB come from the heap and freed memory stays in the process, as with a
caching allocator (jemalloc, tcmalloc). Larger blocks are still mapped per allocation (32 MiB is
glibc's ceiling for the threshold), for every implementation alike, and the table lists the
measurements that still fault on every call.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform

__all__ = ["steady_malloc", "SYSTEM_DEFAULT"]

SYSTEM_DEFAULT = "the C library's default"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems (larger values are refused)
_KEEP = 2**30                     # trim threshold: the heap's free top is never handed back below it
_GLIBC_INITIAL = 128 * 2**10      # glibc's initial thresholds, restored on exit


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def steady_malloc():
    """Within the block, glibc's malloc keeps freed memory (fixed thresholds, see the module's
    docstring); yields the policy's description for the results, or SYSTEM_DEFAULT where the C
    library is not glibc (nothing changed). On exit the thresholds are glibc's initial values
    again (fixed, not adaptive) and the heap's free memory is handed back (malloc_trim)."""
    libc = _glibc()
    if libc is None:
        yield SYSTEM_DEFAULT
        return
    try:
        fixed = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
        yield ("glibc malloc with fixed thresholds: blocks under 32 MiB from the heap, freed memory kept "
               "in the process (no call faults in pages an earlier call's free handed back)"
               if fixed else SYSTEM_DEFAULT)
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_INITIAL)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_INITIAL)
        libc.malloc_trim(0)
