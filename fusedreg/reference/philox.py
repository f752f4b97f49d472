"""Philox4x32-10 and the dropout mask layout in eager PyTorch: the oracle for csrc/common/philox.h
and for Triton's tl.philox / tl.randint4x.

Algorithm (see csrc/common/philox.h for the layout's rationale): ten rounds of
    (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))
with the key bumped by (W0, W1) between rounds. Element i of a dropout mask takes word i % 4 of
philox(counter = (j mod 2**32, j >> 32, 0, 0), key = (seed mod 2**32, seed >> 32)), j = i // 4,
and is kept iff that word >= floor(p * 2**32).

Words are uint32 values held in int64 tensors (torch has no full uint32 arithmetic). A 32x32-bit
product needs 64 bits, which int64 cannot hold and whose overflow a C++ kernel must not rely on, so
products are formed from 16-bit limbs and every intermediate stays below 2**49.
"""
from __future__ import annotations

import struct

import torch

__all__ = ["philox4x32", "dropout_keep", "dropout_threshold", "dropout_scale",
           "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
ELEMS_PER_GROUP = 4  # one Philox call serves four dropout elements

_MASK32 = 0xFFFFFFFF
_GROUPS_PER_CHUNK = 1 << 21  # bounds the reference's temporary memory (~20 int64 tensors of this)


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * x for a uint32 constant m and uint32 words x (int64)."""
    lo_part = m * (x & 0xFFFF)      # < 2**48
    hi_part = m * (x >> 16)         # < 2**48; the product is hi_part * 2**16 + lo_part
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return hi, lo


def _philox_rounds(c0, c1, c2, c3, k0, k1):
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of counter [..., 4] under key [..., 2] (int64 tensors; the low 32 bits of each
    element are the word, the leading dimensions broadcast). Returns int64 [..., 4] in [0, 2**32)."""
    if counter.dtype != torch.int64 or counter.dim() == 0 or counter.shape[-1] != 4:
        raise ValueError(f"counter must be an int64 tensor of shape [..., 4], got {counter.dtype} "
                         f"{tuple(counter.shape)}")
    if key.dtype != torch.int64 or key.dim() == 0 or key.shape[-1] != 2:
        raise ValueError(f"key must be an int64 tensor of shape [..., 2], got {key.dtype} {tuple(key.shape)}")
    c = (counter & _MASK32).unbind(-1)
    k = (key & _MASK32).unbind(-1)
    return torch.stack(_philox_rounds(*c, *k), dim=-1)


def dropout_threshold(p: float) -> int:
    """floor(p * 2**32) for 0 <= p < 1 (exact: p * 2**32 is exact in double); keep iff word >= it."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_threshold needs 0 <= p < 1, got p={p}")
    return int(p * 4294967296.0)


def dropout_scale(p: float, dtype: torch.dtype = torch.float32) -> float:
    """1 / (1 - p) computed in double, rounded once to float32 unless `dtype` is float64."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_scale needs 0 <= p < 1, got p={p}")
    scale = 1.0 / (1.0 - p)
    if dtype == torch.float64:
        return scale
    return struct.unpack("f", struct.pack("f", scale))[0]


def _seed_key(seed: int) -> tuple[int, int]:
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    return seed & _MASK32, (seed >> 32) & _MASK32  # two's complement bits of a negative int64 seed


def dropout_keep(seed: int, numel: int, p: float, device=None) -> torch.Tensor:
    """Keep mask (bool [numel]) of elements 0..numel-1 in memory order under the shared layout."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if p == 1.0:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    threshold = dropout_threshold(p)
    k0, k1 = _seed_key(int(seed))
    groups = -(-numel // ELEMS_PER_GROUP)
    chunks = []
    for start in range(0, groups, _GROUPS_PER_CHUNK):
        j = torch.arange(start, min(start + _GROUPS_PER_CHUNK, groups), dtype=torch.int64, device=device)
        zero = torch.zeros_like(j)
        words = torch.stack(_philox_rounds(j & _MASK32, j >> 32, zero, zero, k0, k1), dim=-1)
        chunks.append(words.reshape(-1) >= threshold)
    if not chunks:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return torch.cat(chunks)[:numel]
