"""The CPU mask generators (csrc/common/philox_simd.h) at counters no tensor in the suite reaches.

A group's counter is (j mod 2**32, j / 2**32, 0, 0) for group j = element / 4, so the high counter
word is nonzero only past 2**34 elements, and the low word wraps inside a SIMD register only
there. The AVX-512 and AVX2 generators build their counters from those two words separately (the
AVX-512 one folds the high word into specialised first rounds) and fall back to the scalar
generator where the low word would wrap inside one register. A small host program built with the
host compiler calls dropout_keep_bits at every level this CPU supports for `first` groups around
2**32, 2**33 and 2**63, aligned and not, and the words must equal the reference's Philox
(fusedreg.reference.philox.philox4x32). No tensor of that size is allocated.
"""
import subprocess

import pytest
import torch

from conftest import build_host_program
from fusedreg.reference import philox as ref

_HARNESS = r"""
#include <cinttypes>
#include <cstdio>
#include <vector>

#include "common/philox_simd.h"

using namespace fusedreg;

// stdin: lines "seed threshold first groups"; stdout: per line and level, "level w0 w1 ..." (hex)
int main() {
  uint64_t seed, first;
  uint32_t threshold;
  int64_t groups;
  const int best = static_cast<int>(cpu_isa_supported());
  std::printf("best %d\n", best);
  while (std::scanf("%" SCNu64 " %" SCNu32 " %" SCNu64 " %" SCNd64, &seed, &threshold, &first, &groups) == 4) {
    const PhiloxKeys keys = philox_keys(seed);
    for (int level = 0; level <= best; ++level) {
      std::vector<uint64_t> bits((groups + 15) / 16, ~uint64_t{0});
      dropout_keep_bits(static_cast<CpuIsa>(level), keys, threshold, first, groups, bits.data());
      std::printf("%d", level);
      for (uint64_t w : bits) std::printf(" %016" PRIx64, w);
      std::printf("\n");
    }
  }
  return 0;
}
"""

# (first group, groups): around the low word's wrap at 2**32 and 2**33 (block-aligned and not, so
# that a register straddles the wrap), tails shorter than a register, and the top of the range.
_SPANS = [
    (2**32 - 32, 64), (2**32 - 31, 64), (2**32 - 7, 23), (2**32 - 16, 16), (2**32 - 1, 3),
    (2**32, 40), (2**33 - 40, 80), (2**33 + 5, 37), (5 * 2**32 + 1000, 96), (2**62 - 20, 50),
    (2**63 - 48, 47), (0, 67), (2**31 - 9, 30),
]
_SEEDS = (0, 1234, 2**63 - 1, 2**64 - 1)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_host_program(_HARNESS, tmp_path_factory.mktemp("philox_simd"))


def _reference_words(seed: int, threshold: int, first: int, groups: int) -> list[int]:
    """The keep bits of groups [first, first + groups) as dropout_keep_bits lays them out: bit b of
    word w is element 64 w + b of the span (word k of group j is element 4 j + k)."""
    j = torch.arange(first, first + groups, dtype=torch.int64)  # every span ends below 2**63
    mask32 = 0xFFFFFFFF
    counter = torch.stack([j & mask32, (j >> 32) & mask32, torch.zeros_like(j), torch.zeros_like(j)], dim=-1)
    key = torch.tensor([seed & mask32, (seed >> 32) & mask32], dtype=torch.int64)
    keep = (ref.philox4x32(counter, key) >= threshold).reshape(-1).tolist()
    words = [0] * ((groups + 15) // 16)
    for e, kept in enumerate(keep):
        words[e // 64] |= int(kept) << (e % 64)
    return words


@pytest.mark.build
def test_every_level_gives_the_reference_bits_where_the_high_counter_word_is_set(harness):
    cases = [(seed, ref.dropout_threshold(p), first, groups)
             for i, (first, groups) in enumerate(_SPANS)
             for seed, p in ((_SEEDS[i % 4], 0.1), (_SEEDS[(i + 1) % 4], 0.5))]
    stdin = "".join(" ".join(map(str, case)) + "\n" for case in cases)
    run = subprocess.run([str(harness)], input=stdin, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.split("\n")
    best = int(lines[0].split()[1])
    rows = [line.split() for line in lines[1:] if line]
    assert len(rows) == len(cases) * (best + 1)
    for c, (seed, threshold, first, groups) in enumerate(cases):
        expected = _reference_words(seed, threshold, first, groups)
        for level in range(best + 1):
            row = rows[c * (best + 1) + level]
            assert int(row[0]) == level
            got = [int(w, 16) for w in row[1:]]
            assert got == expected, f"level {level}, seed {seed}, first {first}, groups {groups}"
