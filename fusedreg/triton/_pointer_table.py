"""Pointer tables of multi-tensor Triton launches, built once per set of tensors and then reused.

A pointer table is one int64 tensor on the tensors' device that a kernel reads to find its work
(n tensors, L lists of them, P programs, one per chunk of a non-empty tensor):

    [0, L*n)                 data addresses, row r = list r (row-major [L, n])
    [L*n, L*n + n)           numels of the tensors of list 0 (their counterparts have as many)
    [L*n + n, L*n + 2n)      vector flag per tensor: 1 when every address of its `vector_rows` is
                             16-byte aligned, so the kernel may use 16-byte accesses on it
    [L*n + 2n, .. + P)       program -> tensor
    [L*n + 2n + P, .. + P)   program -> chunk of that tensor

Trade-off: building a table costs Python work per tensor and a host-to-device copy, so tables are
cached by what determines their contents (addresses, sizes, device): a training loop whose tensors
keep their storage builds one table once. The copy is pinned and non-blocking (no host sync),
ordered on the stream of the call that builds it; a first use on another stream must be ordered
after that one, as for any tensor shared between streams. A CUDA graph reads its table on every
replay, so tables used while capturing are kept for the life of the process instead of taking part
in the LRU eviction (8 * (L + 2) bytes per tensor on the device, its key a few hundred on the host),
and a table cannot be built during capture (the copy's host buffer would not outlive it): the
launch must have run once with the same tensors before capture.
"""
from __future__ import annotations

import itertools
import operator
from typing import Hashable, NamedTuple, Sequence

import torch

from .._layout import is_dense, same_layout

__all__ = ["PointerTable", "TableCache", "table_key", "key_addresses", "layouts_match", "vector_flags", "build"]

VECTOR_BYTES = 16

_data_ptr = torch.Tensor.data_ptr
_nbytes = operator.attrgetter("nbytes")
_contiguous = torch.Tensor.is_contiguous


class PointerTable(NamedTuple):
    table: torch.Tensor          # int64, on the device: the layout above
    programs: int                # P: programs to launch
    n_tensors: int               # n
    vector: tuple[bool, ...]     # the vector flags, on the host (what the table holds)


def table_key(lists: Sequence[Sequence[torch.Tensor]]) -> tuple:
    """(device, dtype of lists[0][0], L, every address list by list, every byte size list by list):
    what a table's contents depend on, and what a cached table's checks are tied to. Built with one
    C-level map per list and attribute: on a cache hit this is most of a launcher's host time."""
    key = [lists[0][0].device, lists[0][0].dtype, len(lists)]
    for lst in lists:
        key += map(_data_ptr, lst)
    for lst in lists:
        key += map(_nbytes, lst)
    return tuple(key)


def key_addresses(key: tuple) -> list[tuple[int, ...]]:
    """The addresses of a table_key, one row (tuple) per list."""
    rows = key[2]
    n = (len(key) - 3) // (2 * rows)
    return [key[3 + r * n:3 + (r + 1) * n] for r in range(rows)]


def layouts_match(lists: Sequence[Sequence[torch.Tensor]], vector_rows: int) -> bool:
    """Whether every tensor of lists[0] is dense and every tensor of lists[1:vector_rows] walks memory
    as its lists[0] counterpart, for tensors of equal numels (the caller checked shapes, or a
    table_key their byte sizes): contiguous ones do, so only the columns holding a non-contiguous
    tensor get the full test (same_layout)."""
    if all(all(map(_contiguous, lst)) for lst in lists[:vector_rows]):
        return True
    contiguous = [list(map(_contiguous, lst)) for lst in lists[:vector_rows]]
    firsts = lists[0]
    for i, column in enumerate(zip(*contiguous)):
        if not all(column):
            first = firsts[i]
            if not is_dense(first) or not all(same_layout(lst[i], first) for lst in lists[1:vector_rows]):
                return False
    return True


def vector_flags(addresses: Sequence[Sequence[int]]) -> list[bool]:
    """Per tensor i: whether addresses[r][i] is 16-byte aligned in every row r, i.e. whether every
    operand the kernel vector-loads for tensor i may be accessed 16 bytes at a time (a misaligned
    16-byte access is a fatal, sticky CUDA error). OR-ing a column's addresses keeps every low bit
    set in any of them, in C-level maps."""
    merged = addresses[0]
    for row in addresses[1:]:
        merged = map(operator.or_, merged, row)
    return [a & (VECTOR_BYTES - 1) == 0 for a in merged]


def build(addresses: Sequence[Sequence[int]], numels: Sequence[int], vector_rows: int, chunk: int,
          device: torch.device) -> PointerTable:
    """The table of the module docstring for L = len(addresses) rows of n addresses and n numels; the
    vector flags look at the first `vector_rows` rows only (later rows hold scalars the kernel
    reads one element at a time, e.g. step counters). Python lists, one conversion: torch's small
    CPU ops (arange, repeat_interleave) cost more here, and far more on a loaded machine."""
    n = len(numels)
    if any(len(row) != n for row in addresses):
        raise ValueError(f"every address row must have {n} entries, got {[len(row) for row in addresses]}")
    vector = vector_flags(addresses[:vector_rows])
    chunks = [-(-numel // chunk) for numel in numels]
    program_tensor = [i for i, c in enumerate(chunks) for _ in range(c)]
    program_chunk = [k for c in chunks for k in range(c)]
    values = [a for row in addresses for a in row]
    values += numels
    values += map(int, vector)
    values += program_tensor
    values += program_chunk
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        # pinned + non_blocking: queued on the current stream, the host does not wait for it;
        # the caching host allocator keeps the pinned buffer until the copy has run
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    return PointerTable(table, len(program_tensor), n, tuple(vector))


class TableCache:
    """PointerTables by a key that determines their contents, the least recently used evicted beyond
    `capacity`; entries looked up during CUDA graph capture are never evicted (the graph reads them
    on every replay). A hit costs one dict lookup: keys are long tuples, hashed and compared in full,
    so recency is a counter on the entry rather than a reordering (a second lookup)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: dict[Hashable, list] = {}   # key -> [PointerTable, last use, kept]
        self._clock = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, capturing: bool = False) -> PointerTable | None:
        slot = self._entries.get(key)
        if slot is None:
            return None
        slot[1] = next(self._clock)
        slot[2] = slot[2] or capturing
        return slot[0]

    def put(self, key: Hashable, entry: PointerTable) -> None:
        self._entries[key] = [entry, next(self._clock), False]
        evictable = [(slot[1], k) for k, slot in self._entries.items() if not slot[2]]
        evictable.sort(key=lambda pair: pair[0])
        for _, k in evictable[:max(0, len(evictable) - self.capacity)]:
            del self._entries[k]

    def clear(self) -> None:
        """Forget every table, kept ones too (only safe once no captured graph will replay)."""
        self._entries.clear()
