// The inner loops of the CPU BatchNorm kernels (batch_norm.cpp, batch_norm_stats.cpp), compiled once
// per instruction-set level (csrc/common/cpu_isa.h) and picked at run time (batch_norm_cpu_isa.h).
//
// The sums use explicit GCC vectors (kLanes = 16 lanes as 1, 2 or 4 registers of the level's
// width), so that their order of additions is fixed by the layout alone and they do not depend on
// the auto-vectorizer (the elementwise loops are in batch_norm_cpu_apply.h). Loads widen to the
// accumulation type (bf16 by a 16-bit shift, no per-element call) and stores round like c10
// (cpu_vec.h). The same source is instantiated inside
// FUSEDREG_TARGET_AVX512 / _AVX2 functions and plain ones (SSE2), so the levels differ only in
// instruction selection; the compiler may contract a * b + c into one fused multiply-add where the
// level has it, which changes the last bit of some results (within the tolerances every test
// uses) but never the order of additions: results stay independent of the thread count.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "batch_norm_layout.h"
#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "common/dispatch.h"

namespace fusedreg {
namespace bn_cpu {

// 16-byte-aligned GCC vectors passed between functions change the ABI below AVX (-Wpsabi); these
// never cross a call (everything here is always_inline into one entry function per level).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FUSEDREG_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FUSEDREG_LAMBDA_INLINE
#endif

constexpr int kLanes = 16;             // independent partial sums per run (one AVX-512 register)
constexpr int64_t kCascadeBlock = 128;  // values (8 per lane) summed before sums are paired

template <typename scalar_t>
FUSEDREG_ALWAYS_INLINE acc_t<scalar_t> load(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return cpu_vec::bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
  } else {
    return static_cast<acc_t<scalar_t>>(p[i]);
  }
}

template <typename scalar_t>
FUSEDREG_ALWAYS_INLINE void store(scalar_t* p, int64_t i, acc_t<scalar_t> v) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    reinterpret_cast<uint16_t*>(p)[i] = cpu_vec::float_to_bf16_bits(v);
  } else {
    p[i] = static_cast<scalar_t>(v);
  }
}

// What a reduction sums per element: x - m (kShifted), (x - m)^2 (kSquares), or both dy and
// dy * (x - m) (kGrad, two sums).
enum class Term { kShifted, kSquares, kGrad };

template <Term kTerm>
constexpr int kSums = kTerm == Term::kGrad ? 2 : 1;

// kLanes lanes of acc as kSub GCC vectors of kBytes each: explicit vectors, so that the sums do
// not depend on the auto-vectorizer. Each level uses its register width (64 bytes for AVX-512, 32
// for AVX2, 16 for SSE2: a wider GCC vector than the target's registers compiles to spills); the
// lanes, and so the order of every addition, are the same at every width.
template <typename acc, int kBytes>
struct Lanes {
  typedef acc type __attribute__((vector_size(kBytes)));
  static constexpr int kPer = kBytes / static_cast<int>(sizeof(acc));  // lanes per vector
  static constexpr int kSub = kLanes / kPer;                          // vectors per kLanes lanes
};

// Lanes::kPer values from p, widened to acc.
template <int kBytes, typename scalar_t>
FUSEDREG_ALWAYS_INLINE typename Lanes<acc_t<scalar_t>, kBytes>::type load_vec(const scalar_t* p) {
  using acc = acc_t<scalar_t>;
  using V = typename Lanes<acc, kBytes>::type;
  constexpr int kPer = Lanes<acc, kBytes>::kPer;
  V v;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    using H = typename Lanes<uint16_t, kPer * 2>::type;
    using W = typename Lanes<uint32_t, kPer * 4>::type;
    H h;
    std::memcpy(&h, p, sizeof h);
    const W w = __builtin_convertvector(h, W) << 16;
    std::memcpy(&v, &w, sizeof v);
  } else {
    for (int l = 0; l < kPer; ++l) v[l] = static_cast<acc>(p[l]);
  }
  return v;
}

// out[k] = sum over the elements of channel c (its `outer` runs of `inner` contiguous values) of
// term(x, dy)[k]. Each run is read kLanes values at a time (its last, partial group padded with
// zeros, which add nothing) into vector accumulators shared by all the channel's runs; every
// kCascadeBlock / kLanes groups the accumulators join a binary tree of block sums (pairwise, so
// error grows with log n, not n), and the lanes are added in a fixed tree once per channel. The
// order of every addition depends only on the layout; a run costs no per-run reduction, so short
// runs (7x7 planes) stay cheap.
template <int kBytes, Term kTerm, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void channel_sum(const scalar_t* x, const scalar_t* dy, const BatchNormLayout& L, int64_t c,
                                        acc_t<scalar_t> m, acc_t<scalar_t>* out) {
  using acc = acc_t<scalar_t>;
  using V = typename Lanes<acc, kBytes>::type;
  constexpr int kPer = Lanes<acc, kBytes>::kPer, kSub = Lanes<acc, kBytes>::kSub;
  constexpr int K = kSums<kTerm>;
  constexpr int kGroupsPerBlock = static_cast<int>(kCascadeBlock / kLanes);
  V stack[64][2][kSub];  // stack[l]: the sums of 2**l blocks, pending their partner
  V s0[kSub] = {}, s1[kSub] = {};
  int groups = 0;
  int64_t block = 0;
  auto close_block = [&]() FUSEDREG_LAMBDA_INLINE {
    int level = 0;
    for (; (block >> level) & 1; ++level) {
      for (int h = 0; h < kSub; ++h) {
        s0[h] = stack[level][0][h] + s0[h];
        s1[h] = stack[level][1][h] + s1[h];
      }
    }
    for (int h = 0; h < kSub; ++h) {
      stack[level][0][h] = s0[h];
      stack[level][1][h] = s1[h];
      s0[h] = V{};
      s1[h] = V{};
    }
    groups = 0;
    ++block;
  };
  for (int64_t o = 0; o < L.outer; ++o) {
    const int64_t base = (o * L.channels + c) * L.inner;
    const scalar_t* xr = x + base;
    const scalar_t* gr = kTerm == Term::kGrad ? dy + base : nullptr;
    int64_t i = 0;
    for (; i + kLanes <= L.inner; i += kLanes) {
      for (int h = 0; h < kSub; ++h) {
        const V v = load_vec<kBytes>(xr + i + h * kPer) - m;
        if constexpr (kTerm == Term::kShifted) {
          s0[h] += v;
        } else if constexpr (kTerm == Term::kSquares) {
          s0[h] += v * v;
        } else {
          const V g = load_vec<kBytes>(gr + i + h * kPer);
          s0[h] += g;
          s1[h] += g * v;
        }
      }
      if (++groups == kGroupsPerBlock) close_block();
    }
    if (i < L.inner && base + i + kLanes <= L.numel()) {
      // the tail as whole vectors: the values past it belong to the tensor (other channels or
      // planes) and are selected away, not multiplied (they may be inf or NaN)
      const acc rem = static_cast<acc>(L.inner - i);
      for (int h = 0; h < kSub; ++h) {
        V lane;
        for (int l = 0; l < kPer; ++l) lane[l] = static_cast<acc>(h * kPer + l);
        const V v = lane < rem ? load_vec<kBytes>(xr + i + h * kPer) - m : V{};
        if constexpr (kTerm == Term::kShifted) {
          s0[h] += v;
        } else if constexpr (kTerm == Term::kSquares) {
          s0[h] += v * v;
        } else {
          const V g = lane < rem ? load_vec<kBytes>(gr + i + h * kPer) : V{};
          s0[h] += g;
          s1[h] += g * v;
        }
      }
      if (++groups == kGroupsPerBlock) close_block();
    } else if (i < L.inner) {  // the tensor's last values: element by element
      acc v[kLanes] = {}, g[kLanes] = {};
      for (int l = 0; i + l < L.inner; ++l) {
        v[l] = load(xr, i + l) - m;
        if constexpr (kTerm == Term::kGrad) g[l] = load(gr, i + l);
      }
      for (int h = 0; h < kSub; ++h) {
        V vv, gv;
        std::memcpy(&vv, v + h * kPer, sizeof vv);
        std::memcpy(&gv, g + h * kPer, sizeof gv);
        if constexpr (kTerm == Term::kShifted) {
          s0[h] += vv;
        } else if constexpr (kTerm == Term::kSquares) {
          s0[h] += vv * vv;
        } else {
          s0[h] += gv;
          s1[h] += gv * vv;
        }
      }
      if (++groups == kGroupsPerBlock) close_block();
    }
  }
  if (groups > 0) close_block();
  // the pending block sums, smallest first, then the lanes
  V t0[kSub] = {}, t1[kSub] = {};
  bool any = false;
  for (int level = 0; level < 64; ++level) {
    if ((block >> level) & 1) {
      for (int h = 0; h < kSub; ++h) {
        t0[h] = any ? stack[level][0][h] + t0[h] : stack[level][0][h];
        t1[h] = any ? stack[level][1][h] + t1[h] : stack[level][1][h];
      }
      any = true;
    }
  }
  acc l0[kLanes], l1[kLanes];
  std::memcpy(l0, t0, sizeof l0);
  std::memcpy(l1, t1, sizeof l1);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      l0[l] += l0[l + width];
      l1[l] += l1[l + width];
    }
  }
  out[0] = l0[0];
  if constexpr (K == 2) out[1] = l1[0];
}

// Rows [r, r_end) of columns [c, c + kVecs * kPer) added into p0 (and p1 for kGrad), the
// accumulators and m held in registers across the rows: one load and store of them per row group
// instead of per row (their store-to-load round trip per row was the loop's critical path).
template <int kBytes, Term kTerm, int kVecs, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void rows_sum_tile(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t r,
                                          int64_t r_end, int64_t c, const acc_t<scalar_t>* m,
                                          acc_t<scalar_t>* p0, acc_t<scalar_t>* p1) {
  using V = typename Lanes<acc_t<scalar_t>, kBytes>::type;
  constexpr int kPer = Lanes<acc_t<scalar_t>, kBytes>::kPer;
  V mv[kVecs], s0[kVecs], s1[kVecs];
  for (int t = 0; t < kVecs; ++t) {
    std::memcpy(&mv[t], m + c + t * kPer, sizeof(V));
    std::memcpy(&s0[t], p0 + c + t * kPer, sizeof(V));
    if constexpr (kTerm == Term::kGrad) std::memcpy(&s1[t], p1 + c + t * kPer, sizeof(V));
  }
  for (; r < r_end; ++r) {
    for (int t = 0; t < kVecs; ++t) {
      const V v = load_vec<kBytes>(x + r * C + c + t * kPer) - mv[t];
      if constexpr (kTerm == Term::kShifted) {
        s0[t] += v;
      } else if constexpr (kTerm == Term::kSquares) {
        s0[t] += v * v;
      } else {
        const V g = load_vec<kBytes>(dy + r * C + c + t * kPer);
        s0[t] += g;
        s1[t] += g * v;
      }
    }
  }
  for (int t = 0; t < kVecs; ++t) {
    std::memcpy(p0 + c + t * kPer, &s0[t], sizeof(V));
    if constexpr (kTerm == Term::kGrad) std::memcpy(p1 + c + t * kPer, &s1[t], sizeof(V));
  }
}

constexpr int kTileVecs = 4;        // vectors of columns per register tile
constexpr int64_t kRowGroup = 8;    // rows per register tile
constexpr int64_t kWideRowGroup = 8;  // rows per single-vector step of wide rows (8 streams read
                                      // 512-2048 channels 14-17% faster than 4 on Zen 4)
constexpr int64_t kRowWalkGroup = 16;  // rows per load and store of the row walk's sums

// The most vectors of columns a row may span for the row walk: its sums stay in the level's
// vector registers (32 with AVX-512, 16 below) with room for loads. kGrad's rows of up to that many
// vectors take two walks of one sum each (GradPart) where both sums would not fit.
template <int kBytes>
constexpr int kRowWalkVecs = kBytes == 64 ? 16 : 8;

// Which of kGrad's two sums a row walk adds: both, or only sum(dy) / only sum(dy * (x - m)).
enum class GradPart { kBoth, kDy, kDyXmu };

// Rows [r, r_end) of the first `vecs` vectors of columns (vecs <= kMax) added into p0 (and p1 for
// kGrad), each row read whole and in order while every column's sums stay in registers: memory is
// one forward stream. (A walk down a few rows a vector at a time, or a tile down the rows of part
// of a row, reads 2x slower from L3 on Zen 4: 1.2-1.3 ms against 0.6-0.7 ms for 25 MiB of
// 256-channel rows on one core.) The vector count is a run-time bound on an unrolled loop, so the
// sums keep fixed registers.
template <int kBytes, Term kTerm, int kMax, GradPart kPart, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void rows_sum_row_walk(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t r,
                                              int64_t r_end, int vecs, const acc_t<scalar_t>* m,
                                              acc_t<scalar_t>* p0, acc_t<scalar_t>* p1) {
  using V = typename Lanes<acc_t<scalar_t>, kBytes>::type;
  constexpr int kPer = Lanes<acc_t<scalar_t>, kBytes>::kPer;
  constexpr bool kFirst = kTerm != Term::kGrad || kPart != GradPart::kDyXmu;  // s0 (sum dy for kGrad)
  constexpr bool kSecond = kTerm == Term::kGrad && kPart != GradPart::kDy;    // s1
  V mv[kMax], s0[kMax], s1[kMax];
#pragma GCC unroll 16
  for (int t = 0; t < kMax; ++t) {
    if (t < vecs) {
      if constexpr (kTerm != Term::kGrad || kSecond) std::memcpy(&mv[t], m + t * kPer, sizeof(V));
      if constexpr (kFirst) std::memcpy(&s0[t], p0 + t * kPer, sizeof(V));
      if constexpr (kSecond) std::memcpy(&s1[t], p1 + t * kPer, sizeof(V));
    }
  }
  for (; r < r_end; ++r) {
#pragma GCC unroll 16
    for (int t = 0; t < kMax; ++t) {
      if (t < vecs) {
        if constexpr (kTerm == Term::kGrad) {
          const V g = load_vec<kBytes>(dy + r * C + t * kPer);
          if constexpr (kFirst) s0[t] += g;
          if constexpr (kSecond) s1[t] += g * (load_vec<kBytes>(x + r * C + t * kPer) - mv[t]);
        } else {
          const V v = load_vec<kBytes>(x + r * C + t * kPer) - mv[t];
          if constexpr (kTerm == Term::kShifted) {
            s0[t] += v;
          } else {
            s0[t] += v * v;
          }
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < kMax; ++t) {
    if (t < vecs) {
      if constexpr (kFirst) std::memcpy(p0 + t * kPer, &s0[t], sizeof(V));
      if constexpr (kSecond) std::memcpy(p1 + t * kPer, &s1[t], sizeof(V));
    }
  }
}

// Rows [r0, r1) of a [rows, C] matrix added into part (K arrays of C): part[k][c] += term, each
// column's terms added in row order; part, K x C accumulators, stays in L1. Three walks, the same
// additions in the same order:
// - rows of more than kTileVecs and at most kRowWalkVecs vectors: rows_sum_row_walk, groups of
//   kRowWalkGroup rows read row after row;
// - other narrow rows (at most 2 tiles of kTileVecs vectors): groups of kRowGroup rows, each tile of
//   columns accumulating down the group in registers (one load and store of part per group, not
//   per row: with a few vectors per row, that store-to-load round trip was the critical path);
//   the group is contiguous memory, read in order;
// - wider rows: groups of kWideRowGroup rows walked one vector of columns at a time (part loaded
//   and stored once per group), so memory is kWideRowGroup forward streams advancing a vector at
//   a time, which the hardware prefetcher follows (a tile walk down 8 rows jumped between rows).
// The last C % kPer columns go element by element in all three.
template <int kBytes, Term kTerm, typename scalar_t>
FUSEDREG_ALWAYS_INLINE void rows_sum_loop(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t r0, int64_t r1,
                                          const acc_t<scalar_t>* m, acc_t<scalar_t>* part) {
  using acc = acc_t<scalar_t>;
  constexpr int kPer = Lanes<acc, kBytes>::kPer;
  constexpr int kMaxRowVecs = kRowWalkVecs<kBytes>;
  acc* p0 = part;
  acc* p1 = part + C;
  const int64_t c_vec = C / kPer * kPer;
  const int64_t vecs = C / kPer;
  const bool row_walk = vecs > kTileVecs && vecs <= kMaxRowVecs;
  const bool narrow = !row_walk && C <= 2 * kTileVecs * kPer;
  const int64_t c_tiles = narrow ? C / (kTileVecs * kPer) * (kTileVecs * kPer) : 0;
  const int64_t group = row_walk ? kRowWalkGroup : narrow ? kRowGroup : kWideRowGroup;
  for (int64_t rg = r0; rg < r1; rg += group) {
    const int64_t rg_end = rg + group < r1 ? rg + group : r1;
    int64_t c = 0;
    if (row_walk) {
      const int n = static_cast<int>(vecs);
      if constexpr (kTerm != Term::kGrad) {
        rows_sum_row_walk<kBytes, kTerm, kMaxRowVecs, GradPart::kBoth>(x, dy, C, rg, rg_end, n, m, p0, p1);
      } else if (n <= kMaxRowVecs / 2) {
        rows_sum_row_walk<kBytes, kTerm, kMaxRowVecs / 2, GradPart::kBoth>(x, dy, C, rg, rg_end, n, m, p0, p1);
      } else {  // dy's rows of the group are in L1 for the second walk
        rows_sum_row_walk<kBytes, kTerm, kMaxRowVecs, GradPart::kDy>(x, dy, C, rg, rg_end, n, m, p0, p1);
        rows_sum_row_walk<kBytes, kTerm, kMaxRowVecs, GradPart::kDyXmu>(x, dy, C, rg, rg_end, n, m, p0, p1);
      }
      c = c_vec;
    }
    for (; c < c_tiles; c += kTileVecs * kPer) {
      rows_sum_tile<kBytes, kTerm, kTileVecs>(x, dy, C, rg, rg_end, c, m, p0, p1);
    }
    for (; c < c_vec; c += kPer) rows_sum_tile<kBytes, kTerm, 1>(x, dy, C, rg, rg_end, c, m, p0, p1);
    for (; c < C; ++c) {
      acc s0 = p0[c], s1 = acc(0);
      if constexpr (kTerm == Term::kGrad) s1 = p1[c];
      for (int64_t r = rg; r < rg_end; ++r) {
        const acc v = load(x, r * C + c) - m[c];
        if constexpr (kTerm == Term::kShifted) {
          s0 += v;
        } else if constexpr (kTerm == Term::kSquares) {
          s0 += v * v;
        } else {
          const acc g = load(dy, r * C + c);
          s0 += g;
          s1 += g * v;
        }
      }
      p0[c] = s0;
      if constexpr (kTerm == Term::kGrad) p1[c] = s1;
    }
  }
}

}  // namespace bn_cpu
}  // namespace fusedreg
