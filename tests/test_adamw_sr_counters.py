"""The CPU AdamW stochastic-rounding words (csrc/adamw.h's stream) at element indices no tensor in
the suite reaches.

Element e takes lane e % 4 of group j = e / 4, whose counter is (j mod 2**32, j >> 32, tensor id,
pair), so the high counter word is nonzero only past 2**34 elements, and the low word wraps inside a
SIMD register only there. Each level builds that counter its own way: the portable block loop calls
the scalar adamw_sr_words; the AVX2 one (sr_block_words_avx2, also used at the AVX-512 level by the
dtype pairs without an AVX-512 kernel) splits a 64-bit group into 32-bit lanes and carries the low
word into the high word per lane; the AVX-512 kernel (sr_words_avx512) keeps a group per 64-bit lane
and shifts the high word down. A small host program built with the host compiler calls, for every
level this CPU supports, the production generators with the arguments their loops pass:
sr_block_words (csrc/adamw_cpu_simd.h, as adamw_chunk_cpu calls it once per 64-element block) and
sr_words_avx512 (csrc/adamw_cpu_avx512.h, with adamw_loop_sr_avx512's groups: (first + i) / 4 plus
the lane, per 32-element step). The words must equal the reference's Philox
(fusedreg.reference.philox.philox4x32) under the layout of fusedreg/reference/adamw.py, for spans
around 2**34 and 2**35 elements (a register straddling the wrap, aligned and not), near the top of
int64, and at 0. Because the AVX-512 loop builds its group vector itself, its entry
adamw_chunk_avx512 also runs on tiny bfloat16 arrays whose first element is past 2**34: every
stochastically rounded output must be the reference's rounding of the scalar update's float value
with the reference's words. No tensor of that size is allocated.
"""
import random
import subprocess

import pytest
import torch

from conftest import build_host_program
from fusedreg.reference import philox as ref
from fusedreg.reference.adamw import stochastic_round_bf16

_HARNESS = r"""
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <vector>

#include "adamw_cpu_avx512.h"
#include "adamw_cpu_simd.h"

using namespace fusedreg;

static void print_row(const char* name, const std::vector<uint32_t>& words) {
  std::printf("%s", name);
  for (uint32_t w : words) std::printf(" %08" PRIx32, w);
  std::printf("\n");
}

// Words of elements [first, first + count) as adamw_chunk_cpu draws them: one sr_block_words per
// kBlock elements from `first`, at the level in sr.isa.
static std::vector<uint32_t> block_words(const SRStream& sr, uint32_t pair, int64_t count) {
  std::vector<uint32_t> words(count + kBlock);
  for (int64_t base = 0; base < count; base += kBlock) sr_block_words(sr, sr.first + base, pair, &words[base]);
  words.resize(count);
  return words;
}

#if defined(FUSEDREG_ADAMW_AVX512)
// The same words as adamw_loop_sr_avx512 draws them, 32 elements per step.
FUSEDREG_TARGET_AVX512 static std::vector<uint32_t> avx512_words(const PhiloxKeys& keys, uint32_t tensor_id,
                                                                 uint32_t pair, int64_t first, int64_t count) {
  std::vector<uint32_t> words(count + 32);
  const __m512i id = _mm512_set1_epi64(tensor_id), lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < count; i += 32) {
    const __m512i groups = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>((first + i) / 4)), lanes);
    __m512i lo, hi;
    sr_words_avx512(keys, groups, id, pair, lo, hi);
    _mm512_storeu_si512(&words[i], lo);
    _mm512_storeu_si512(&words[i + 16], hi);
  }
  words.resize(count);
  return words;
}

// adamw_chunk_avx512 (amsgrad, pure bfloat16, stochastic rounding) on n pseudo-random elements
// whose first is element `first` of the stream; prints the four outputs ("chunk", operand-major:
// param, exp_avg, exp_avg_sq, max_exp_avg_sq) and the scalar update's float values ("value").
static void chunk_outputs(uint64_t seed, uint32_t tensor_id, int64_t first, int n) {
  std::vector<c10::BFloat16> t[5];  // p, g, m, v, vmax
  uint64_t x = seed ^ first;
  for (int k = 0; k < 5; ++k) {
    for (int i = 0; i < n; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const float u = static_cast<float>(x >> 40) / 16777216.0f;  // [0, 1)
      c10::BFloat16 b;
      store_acc(b, k < 2 ? u - 0.5f : k == 2 ? 0.1f * (u - 0.5f) : 0.01f * u);
      t[k].push_back(b);
    }
  }
  const double row[kAdamWHparams] = {1e-2, 0.9, 0.999, 0.1, 1e-8};
  const AdamWScalars<float> s = adamw_scalars<float>(row, 3.0f, 1.0, 1.0, false);
  std::vector<uint32_t> values(4 * n);
  for (int i = 0; i < n; ++i) {  // each element's new values as the portable block loop computes them
    float p = to_acc(t[0][i]), m = to_acc(t[2][i]), v = to_acc(t[3][i]), vmax = to_acc(t[4][i]);
    const float second = adamw_moments<true, false>(p, to_acc(t[1][i]), m, v, vmax, s);
    const float out[4] = {adamw_param(p, m, std::sqrt(second), s), m, v, vmax};
    for (int k = 0; k < 4; ++k) values[k * n + i] = float_to_bits(out[k]);
  }
  adamw_chunk_avx512<true, true>(t[0].data(), t[1].data(), t[2].data(), t[3].data(), t[4].data(), n, s,
                                 philox_keys(seed), tensor_id, first);
  std::vector<uint32_t> outputs;
  for (int k : {0, 2, 3, 4}) {
    for (const c10::BFloat16& b : t[k]) outputs.push_back(b.x);
  }
  print_row("chunk", outputs);
  print_row("value", values);
}
#endif

// stdin: lines "words seed tensor_id pair first count" or "chunk seed tensor_id first count";
// stdout: "best L", then per words line one row per generator ("default", "avx2", "avx512-block",
// "avx512": name, then the words in hex), per chunk line the rows of chunk_outputs.
int main() {
  const CpuIsa best = cpu_isa_supported();
  std::printf("best %d\n", static_cast<int>(best));
  char mode[8];
  uint64_t seed;
  uint32_t tensor_id, pair = 0;
  int64_t first, count;
  while (std::scanf("%7s %" SCNu64 " %" SCNu32, mode, &seed, &tensor_id) == 3) {
    if (std::strcmp(mode, "words") == 0 && std::scanf("%" SCNu32, &pair) != 1) return 2;
    if (std::scanf("%" SCNd64 " %" SCNd64, &first, &count) != 2) return 2;
    const PhiloxKeys keys = philox_keys(seed);
    if (std::strcmp(mode, "chunk") == 0) {
#if defined(FUSEDREG_ADAMW_AVX512)
      if (best == CpuIsa::kAvx512) chunk_outputs(seed, tensor_id, first, static_cast<int>(count));
#endif
      continue;
    }
    const char* names[] = {"default", "avx2", "avx512-block"};
    for (int level = 0; level <= static_cast<int>(best); ++level) {
      SRStream sr;
      sr.keys = keys;
      sr.tensor_id = tensor_id;
      sr.first = first;
      sr.isa = static_cast<CpuIsa>(level);
      print_row(names[level], block_words(sr, pair, count));
    }
#if defined(FUSEDREG_ADAMW_AVX512)
    if (best == CpuIsa::kAvx512) print_row("avx512", avx512_words(keys, tensor_id, pair, first, count));
#endif
  }
  return 0;
}
"""

# (first element, count): the low counter word wraps between groups 2**32 - 1 and 2**32 (element
# 2**34): at a 16-group block boundary (where the production loops put it), inside an AVX2 vector
# and an AVX-512 step at lanes 4, 1 and 7, and just past it; again at 2**35 (high word 1 -> 2), far
# past it, near 2**62, where it wraps near the top of int64, and the last elements an int64 indexes
# (up to 2**63 - 1). Counts not a multiple of 32 leave a partial last step. (0, 96) is the control.
_SPANS = [
    (0, 96), (2**34 - 64, 128), (2**34 - 16, 64), (2**34 - 4, 40), (2**34 - 28, 36), (2**34 + 20, 52),
    (2**35 - 12, 100), (2**35 + 4000, 64), (2**62 - 36, 120), (2**63 - 2**34 - 16, 48), (2**63 - 160, 160),
]
_SEEDS = (0, 2**63 - 1, 2**64 - 1, random.Random(34).getrandbits(64))
_TENSOR_IDS = (0, 1, 2**32 - 1)
_CHUNK_SPANS = [(0, 45), (2**34 - 16, 45), (2**34 - 4, 64), (2**35 - 12, 29), (2**63 - 2**34 - 16, 40)]
_MASK32 = 0xFFFFFFFF


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_host_program(_HARNESS, tmp_path_factory.mktemp("adamw_sr"), link_torch=True)


def _run(harness, lines: list[str]) -> tuple[int, list[list[str]]]:
    run = subprocess.run([str(harness)], input="".join(line + "\n" for line in lines), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout.split("\n")
    return int(out[0].split()[1]), [line.split() for line in out[1:] if line]


def _reference_words(seed: int, tensor_id: int, pair: int, first: int, count: int) -> list[int]:
    """Words A (pair 0) or B (pair 1) of elements [first, first + count) of tensor `tensor_id`:
    word e % 4 of philox(counter = (j mod 2**32, j >> 32, tensor_id, pair), key = seed), j = e / 4."""
    j = torch.arange(first // 4, (first + count + 3) // 4, dtype=torch.int64)  # every span ends below 2**63
    counter = torch.stack([j & _MASK32, j >> 32, torch.full_like(j, tensor_id), torch.full_like(j, pair)], dim=-1)
    key = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64)
    return ref.philox4x32(counter, key).reshape(-1)[:count].tolist()


@pytest.mark.build
def test_every_level_gives_the_reference_words_where_the_high_counter_word_is_set(harness):
    cases = [(seed, tensor_id, pair, first, count) for first, count in _SPANS for seed in _SEEDS
             for tensor_id in _TENSOR_IDS for pair in (0, 1)]
    best, rows = _run(harness, [" ".join(map(str, ("words", *case))) for case in cases])
    # the block loop at each level, and the AVX-512 kernel's own generator where it runs
    paths = ["default", "avx2", "avx512-block"][:best + 1] + (["avx512"] if best == 2 else [])
    assert len(rows) == len(cases) * len(paths)
    for c, case in enumerate(cases):
        expected = _reference_words(*case)
        for p, path in enumerate(paths):
            row = rows[c * len(paths) + p]
            assert row[0] == path
            got = [int(w, 16) for w in row[1:]]
            assert got == expected, f"{path}: seed, tensor id, pair, first, count = {case}"


@pytest.mark.build
def test_avx512_kernel_rounds_with_the_reference_words_past_2_34_elements(harness):
    cases = [(seed, tensor_id, first, count) for first, count in _CHUNK_SPANS
             for seed, tensor_id in zip(_SEEDS, (0, 2**32 - 1, 1, 7))]
    best, rows = _run(harness, [" ".join(map(str, ("chunk", *case))) for case in cases])
    if best != 2:
        pytest.skip("CPU lacks avx512")
    assert len(rows) == 2 * len(cases)
    for c, (seed, tensor_id, first, count) in enumerate(cases):
        chunk, value = rows[2 * c], rows[2 * c + 1]
        assert chunk[0] == "chunk" and value[0] == "value"
        words = torch.tensor([int(w, 16) for w in value[1:]], dtype=torch.int64)
        values = (words - ((words >> 31) << 32)).to(torch.int32).view(torch.float32)  # uint32 as int32
        a, b = (torch.tensor(_reference_words(seed, tensor_id, pair, first, count)) for pair in (0, 1))
        # param: A's low half, exp_avg: A's high half, exp_avg_sq: B's low, max_exp_avg_sq: B's high
        bits = torch.cat([a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16])
        expected = stochastic_round_bf16(values, bits).view(torch.int16).to(torch.int64) & 0xFFFF
        got = [int(w, 16) for w in chunk[1:]]
        assert got == expected.tolist(), f"seed, tensor id, first, count = {(seed, tensor_id, first, count)}"
