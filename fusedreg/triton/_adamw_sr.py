"""Stochastic rounding to bfloat16 for the Triton AdamW kernel: the random words of csrc/adamw.h's
stream and the rounding itself, by integer ops (the same bits as the cuda, cpu and reference
backends; compiled and interpreted kernels alike).

Layout (csrc/adamw.h states it in full): element e of tensor t lies in group j = e // 4, lane e % 4;
word pair 0 (A) = philox(counter = (j mod 2**32, j >> 32, t, 0), key = seed), pair 1 (B) the same
with counter word 3 = 1. One tl.philox call per group serves its four elements: a join/reshape
puts word k of group g on element 4g + k, as the dropout kernel does.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["sr_words", "round_bf16_stochastic"]


@triton.jit
def sr_words(seed, tensor_id, start, PAIR: tl.constexpr, BLOCK: tl.constexpr):
    """uint32 [BLOCK]: word pair PAIR of elements start .. start + BLOCK - 1 (start % 4 == 0)."""
    groups = start // 4 + tl.arange(0, BLOCK // 4)
    counter_lo = groups.to(tl.uint32)  # truncates: j mod 2**32
    counter_hi = (groups >> 32).to(tl.uint32)
    tensor = tl.zeros_like(counter_lo) + tensor_id.to(tl.uint32)
    pair = tl.full(counter_lo.shape, PAIR, tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, counter_lo, counter_hi, tensor, pair)
    # [BLOCK // 4, 2, 2] holding w(2a+b) at [g, a, b]; row-major flattening puts word k of group g
    # on element 4g + k
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])


@triton.jit
def round_bf16_stochastic(value, r16):
    """float32 -> bfloat16: (bits + r16) >> 16, NaN -> 0x7FC0 (unbiased: rounds away from zero with
    probability (low 16 bits) / 2**16; inf stays inf)."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + r16) >> 16
    rounded = tl.where(value != value, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
