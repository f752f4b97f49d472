// The element bookkeeping of the CUDA dropout kernel (dropout_kernel.cuh): which elements a thread
// takes (its edge element, its units) and which Philox group and word feed each element of a unit.
// Plain host/device C++ on top of common/philox.h, so that tests emulate every thread of a launch on
// the CPU and compare its keep bits with the mask definition.
//
// A unit is kUnit consecutive elements of a segment starting at element m, whose Philox words are
// those of elements m .. m + kUnit - 1 of the layout: element i takes word i % 4 of group i / 4. On
// the fast kernel m is a multiple of 4, so the unit's kUnit / 4 groups are exactly its words. On the
// vector kernel m = 4 * g + skew with one skew for every unit of a launch (lead % 4): the unit
// straddles kUnit / 4 + 1 groups, and element j takes flat word j + skew of them, picked with two
// selects (skew & 1, then skew & 2) instead of an indexed register array (which would live in local
// memory). A longer unit amortizes that extra group: 3 calls per 8 elements, 5 per 16.
#pragma once

#include <cstdint>

#include "common/philox.h"

#if defined(__CUDA_ARCH__)
#define FUSEDREG_DROPOUT_UNROLL _Pragma("unroll")
#else
#define FUSEDREG_DROPOUT_UNROLL
#endif

namespace fusedreg {

// Philox groups a unit of kUnit elements (a multiple of 4) touches: kUnit / 4 when it starts on a
// group boundary, one more when it may start `skew` words into its first group (kSkewed).
template <int kUnit, bool kSkewed>
constexpr int unit_groups() {
  static_assert(kUnit % kDropoutElemsPerGroup == 0, "a unit covers whole groups");
  return kUnit / kDropoutElemsPerGroup + (kSkewed ? 1 : 0);
}

// The keep words of the unit whose first element is word `skew` (< 4; 0 unless kSkewed) of Philox
// group `first`: w[j] is the word of the unit's element j. The groups are computed unconditionally
// (a branch around the last one makes nvcc split every multiply of the others into IMAD.HI + IMAD).
template <int kUnit, bool kSkewed>
FUSEDREG_HOST_DEVICE inline void unit_words(const PhiloxKeys& keys, uint64_t first, uint32_t skew, uint32_t* w) {
  constexpr int kWords = unit_groups<kUnit, kSkewed>() * kDropoutElemsPerGroup;
  uint32_t flat[kWords];
  FUSEDREG_DROPOUT_UNROLL
  for (int g = 0; g < kWords / kDropoutElemsPerGroup; ++g) {
    const Philox4x32Words words = dropout_group_words(keys, first + g);
    FUSEDREG_DROPOUT_UNROLL
    for (int k = 0; k < kDropoutElemsPerGroup; ++k) flat[g * kDropoutElemsPerGroup + k] = words.w[k];
  }
  if constexpr (kSkewed) {  // flat[j + skew]: by 1 word if skew & 1, then by 2 if skew & 2
    FUSEDREG_DROPOUT_UNROLL
    for (int j = 0; j + 1 < kWords; ++j) flat[j] = (skew & 1) ? flat[j + 1] : flat[j];
    FUSEDREG_DROPOUT_UNROLL
    for (int j = 0; j < kUnit; ++j) flat[j] = (skew & 2) ? flat[j + 2] : flat[j];
  }
  FUSEDREG_DROPOUT_UNROLL
  for (int j = 0; j < kUnit; ++j) w[j] = flat[j];
}

// Word k (< 4) of a group, by selects (see unit_words).
FUSEDREG_HOST_DEVICE inline uint32_t group_word(const Philox4x32Words& w, uint32_t k) {
  return k == 0 ? w.w[0] : k == 1 ? w.w[1] : k == 2 ? w.w[2] : w.w[3];
}

// The Philox group of segment element m, the segment's first element being in group
// (group_hi, group_lo) (see dropout_segment: the low word never carries).
FUSEDREG_HOST_DEVICE inline uint64_t segment_group(uint32_t group_lo, uint32_t group_hi, uint32_t m) {
  return (static_cast<uint64_t>(group_hi) << 32) | (group_lo + m / kDropoutElemsPerGroup);
}

// Elements a thread takes: units of kUnit elements from `lead` to `body_end` (a whole number of
// units past lead), thread t's first at lead + t * kUnit, then one grid (threads * kUnit) further
// each time; the edges [0, lead) and [body_end, n) one per thread t of the grid, in that order.
// edge_element returns n when thread t has none.
FUSEDREG_HOST_DEVICE inline uint32_t edge_element(uint32_t t, uint32_t lead, uint32_t body_end, uint32_t n) {
  if (t >= lead + (n - body_end)) return n;
  return t < lead ? t : body_end + (t - lead);
}

template <int kUnit>
FUSEDREG_HOST_DEVICE inline uint32_t first_unit(uint32_t t, uint32_t lead) {
  return lead + t * kUnit;
}

}  // namespace fusedreg
