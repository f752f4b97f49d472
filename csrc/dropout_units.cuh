// The element bookkeeping of the CUDA dropout kernel (dropout_kernel.cuh): which elements a thread
// takes (its edge element, its units) and which Philox group and word feed each element of a unit.
// Plain host/device C++ on top of common/philox.h, so that tests emulate every thread of a launch on
// the CPU and compare its keep bits with the mask definition.
//
// A unit is kUnit consecutive elements of a segment starting at element m, whose Philox words are
// those of elements m .. m + kUnit - 1 of the layout: element i takes word i % 4 of group i / 4. On
// the fast kernel m is a multiple of 4, so the unit's kUnit / 4 groups are exactly its words. On the
// vector kernel m = 4 * g + skew with one skew for every unit of a launch (lead % 4): a unit with a
// nonzero skew straddles kUnit / 4 + 1 groups, and element j takes flat word j + skew of them. The
// skew is a template argument (with_skew dispatches once per thread), so the words land in place
// without selects: with a runtime skew, two selects per word (an indexed register array would
// live in local memory) cost as much as a fifth of the unit's Philox calls. A longer unit
// amortizes the extra group: 3 calls per 8 elements, 5 per 16.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/philox.h"

#if defined(__CUDA_ARCH__)
#define FUSEDREG_DROPOUT_UNROLL _Pragma("unroll")
#else
#define FUSEDREG_DROPOUT_UNROLL
#endif

namespace fusedreg {

// Philox groups a unit of kUnit elements (a multiple of 4) starting kSkew (< 4) words into its
// first group touches.
template <int kUnit, int kSkew>
constexpr int unit_groups() {
  static_assert(kUnit % kDropoutElemsPerGroup == 0 && kSkew >= 0 && kSkew < kDropoutElemsPerGroup, "unit");
  return kUnit / kDropoutElemsPerGroup + (kSkew != 0 ? 1 : 0);
}

// The keep words of the unit whose first element is word kSkew of Philox group `first`: w[j] is
// the word of the unit's element j.
template <int kUnit, int kSkew>
FUSEDREG_HOST_DEVICE inline void unit_words(const PhiloxKeys& keys, uint64_t first, uint32_t* w) {
  constexpr int kGroups = unit_groups<kUnit, kSkew>();
  uint32_t flat[kGroups * kDropoutElemsPerGroup];
  FUSEDREG_DROPOUT_UNROLL
  for (int g = 0; g < kGroups; ++g) {
    const Philox4x32Words words = dropout_group_words(keys, first + g);
    FUSEDREG_DROPOUT_UNROLL
    for (int k = 0; k < kDropoutElemsPerGroup; ++k) flat[g * kDropoutElemsPerGroup + k] = words.w[k];
  }
  FUSEDREG_DROPOUT_UNROLL
  for (int j = 0; j < kUnit; ++j) w[j] = flat[j + kSkew];
}

// f(std::integral_constant<int, skew>{}) for a runtime skew <= kMaxSkew (< 4): one instantiation
// of f per skew a kernel can see (16 bytes hold 2, 4 or 8 elements: skews up to 1, 3, 3).
template <int kMaxSkew, typename F>
FUSEDREG_HOST_DEVICE inline void with_skew(uint32_t skew, F&& f) {
  static_assert(kMaxSkew >= 0 && kMaxSkew < kDropoutElemsPerGroup, "skew");
  if (skew == 0) {
    f(std::integral_constant<int, 0>{});
  } else if constexpr (kMaxSkew >= 1) {
    if (skew == 1) {
      f(std::integral_constant<int, 1>{});
    } else if constexpr (kMaxSkew >= 2) {
      if (skew == 2) {
        f(std::integral_constant<int, 2>{});
      } else if constexpr (kMaxSkew >= 3) {
        f(std::integral_constant<int, 3>{});
      }
    }
  }
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
