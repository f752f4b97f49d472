"""The CUDA dropout kernel's element bookkeeping (csrc/dropout_units.cuh), emulated on the host.

A small C++ program built with the host compiler runs every thread of a launch the way
dropout_kernel.cuh does (edge elements, then grid-stride units whose keep words come from
unit_words for the skew with_skew picks), over the segment dropout.h's dropout_segment gives the launcher. It checks that every
element is taken exactly once and that its keep bit is the layout's (word i % 4 of group i / 4),
and prints the masks of segments at the tensor's start, which must equal the reference's
(fusedreg.reference.philox.dropout_keep). No GPU is needed.
"""
import subprocess

import pytest
import torch

from conftest import build_host_program
from fusedreg.reference import philox as ref

_HARNESS = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "dropout.h"
#include "dropout_units.cuh"

using namespace fusedreg;

constexpr uint32_t kThreadsPerBlock = 256;  // dropout_kernel.cuh's kThreads

// Every thread of a launch over the segment at `base` of an n-element tensor, as the kernel walks
// it; keep[i] for each segment element, taken[i] how many threads took it.
template <int kUnit, int kMaxSkew>
void emulate(uint64_t seed, uint32_t threshold, int64_t n, int64_t lead, int64_t base, uint32_t blocks,
             std::vector<int>& keep, std::vector<int>& taken) {
  const DropoutSegment seg = dropout_segment(n, lead, kUnit, base);
  const PhiloxKeys keys = philox_keys(seed);
  const auto count = static_cast<uint32_t>(seg.count), seg_lead = static_cast<uint32_t>(seg.lead);
  const auto body_end = static_cast<uint32_t>(seg.body_end);
  const uint32_t skew = seg_lead % kDropoutElemsPerGroup;
  const uint32_t threads = blocks * kThreadsPerBlock, step = threads * kUnit;
  keep.assign(count, 0);
  taken.assign(count, 0);
  for (uint32_t t = 0; t < threads; ++t) {
    const uint32_t e = edge_element(t, seg_lead, body_end, count);
    if (e != count) {
      const Philox4x32Words w = dropout_group_words(keys, segment_group(seg.group_lo, seg.group_hi, e));
      keep[e] = dropout_keep(group_word(w, e % kDropoutElemsPerGroup), threshold);
      ++taken[e];
    }
    with_skew<kMaxSkew>(skew, [&](auto kSkew) {
      for (uint32_t m = first_unit<kUnit>(t, seg_lead); m < body_end; m += step) {
        uint32_t w[kUnit];
        unit_words<kUnit, decltype(kSkew)::value>(keys, segment_group(seg.group_lo, seg.group_hi, m), w);
        for (int j = 0; j < kUnit; ++j) {
          keep[m + j] = dropout_keep(w[j], threshold);
          ++taken[m + j];
        }
      }
    });
  }
}

// Lines of: kind seed p n lead base blocks; kind 0..3 = units of 4, 8 (on group boundaries: the
// fast kernel), 8, 16 (any skew: the vector kernel, dispatched per thread as it does). Prints the mask of segments at base 0, checks
// every segment against the layout definition.
int main() {
  int kind;
  unsigned long long seed;
  double p;
  long long n, lead, base;
  unsigned blocks;
  int failures = 0;
  while (std::cin >> kind >> seed >> p >> n >> lead >> base >> blocks) {
    const uint32_t threshold = dropout_threshold(p);
    std::vector<int> keep, taken;
    switch (kind) {
      case 0: emulate<4, 0>(seed, threshold, n, lead, base, blocks, keep, taken); break;
      case 1: emulate<8, 0>(seed, threshold, n, lead, base, blocks, keep, taken); break;
      case 2: emulate<8, 3>(seed, threshold, n, lead, base, blocks, keep, taken); break;
      default: emulate<16, 3>(seed, threshold, n, lead, base, blocks, keep, taken); break;
    }
    std::string mask;
    int bad = 0;
    for (size_t i = 0; i < keep.size(); ++i) {
      const uint64_t e = static_cast<uint64_t>(base) + i;
      const bool want = dropout_keep(dropout_group_words(seed, e / 4).w[e % 4], threshold);
      bad += taken[i] != 1 || keep[i] != static_cast<int>(want);
      mask += keep[i] ? '1' : '0';
    }
    if (bad) std::printf("FAIL kind %d n %lld lead %lld base %lld blocks %u: %d elements\n", kind, n, lead, base,
                         blocks, bad);
    failures += bad != 0;
    std::printf("mask %s\n", base == 0 ? mask.c_str() : "-");
  }
  std::printf(failures ? "failures %d\n" : "ok\n", failures);
  return failures != 0;
}
"""

SEEDS = (0, 1234, 2**63 - 1, 2**64 - 1)
SEGMENT = 2**31


def _cases():
    """(kind, seed, p, n, lead, base, blocks): every lead its kernel can run with (units on group
    boundaries need lead % 4 == 0; skewed ones take any, 0..7 for 16-bit data),
    sizes below one unit, odd tails, several grid steps, later segments (high Philox groups)."""
    cases = []
    sizes = (1, 3, 7, 8, 15, 16, 17, 23, 31, 100, 257, 4099, 3 * 256 * 16 + 11)
    for kind, leads in ((0, (0,)), (1, (0, 4)), (2, range(4)), (3, range(8))):
        for lead in leads:
            for n in sizes:
                for blocks in (1, 3):
                    cases.append((kind, SEEDS[(n + lead) % 4], (0.1, 0.5, 0.9)[n % 3], n, lead, 0, blocks))
    for kind, leads in ((1, (0, 4)), (3, (0, 3, 5))):  # segments beyond 2**31: the last 5000 elements
        for lead in leads:
            for k in (1, 3, 40):
                cases.append((kind, SEEDS[k % 4], 0.5, k * SEGMENT + 5000, lead, k * SEGMENT, 2))
    return cases


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_host_program(_HARNESS, tmp_path_factory.mktemp("dropout_units"), link_torch=True)


def _run(harness, cases):
    stdin = "".join(" ".join(map(str, case)) + "\n" for case in cases)
    run = subprocess.run([str(harness)], input=stdin, capture_output=True, text=True, timeout=900)
    return run.returncode, run.stdout.split("\n")


@pytest.mark.build
def test_every_thread_of_a_launch_takes_its_elements_with_the_layouts_keep_bits(harness):
    cases = _cases()
    rc, lines = _run(harness, cases)
    assert rc == 0 and lines[-2] == "ok", "\n".join(line for line in lines if line.startswith("FAIL"))[-4000:]
    masks = [line.split()[1] for line in lines if line.startswith("mask ")]
    assert len(masks) == len(cases)
    checked = 0
    for (kind, seed, p, n, lead, base, blocks), mask in zip(cases, masks):
        if base:
            continue
        signed = seed - 2**64 if seed >= 2**63 else seed
        want = "".join("1" if k else "0" for k in ref.dropout_keep(signed, n, p).tolist())
        assert mask == want, (kind, seed, p, n, lead, blocks)
        checked += 1
    assert checked == sum(1 for case in cases if case[5] == 0) > 300

