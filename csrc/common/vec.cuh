// 16-byte vector loads and stores for memory-bound kernels.
//
// AlignedVec<T, N>      N values of T with the alignment of the whole vector, so one load or store
//                       of it is a single 16-byte transaction (ld.global.v4) on the GPU.
// vec_size<T>()         16 / sizeof(T): 4 floats, 8 halves/bfloat16s, 2 doubles.
// load_vec / store_vec  the access itself; the pointer must be aligned to the vector size.
// is_aligned(p, bytes)  host- and device-side test a launcher or kernel uses to pick the vector
// all_aligned(bytes, p...) path: vectors when every pointer (and the element offset) allows it,
//                       otherwise a scalar loop. Tails shorter than a vector are always scalar.
//
// Trade-off: the vector path needs every operand aligned; one misaligned operand (a view starting
// at an odd offset) sends the whole range to the scalar path rather than peeling a prologue, which
// keeps kernels simple. Kernels should map elements to threads identically on both paths, so that
// results do not depend on where a tensor happens to start.
//
// Compiles with the host compiler too (the functions are plain casts), so host code may share it.
#pragma once

#include <cstddef>
#include <cstdint>

#ifndef FUSEDREG_HOST_DEVICE
#if defined(__CUDACC__)
#define FUSEDREG_HOST_DEVICE __host__ __device__
#else
#define FUSEDREG_HOST_DEVICE
#endif
#endif

namespace fusedreg {

constexpr int kVecBytes = 16;

template <typename T>
constexpr int vec_size() {
  static_assert(kVecBytes % sizeof(T) == 0, "element size must divide 16 bytes");
  return static_cast<int>(kVecBytes / sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

template <int N, typename T>
FUSEDREG_HOST_DEVICE inline AlignedVec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const AlignedVec<T, N>*>(p);
}

template <int N, typename T>
FUSEDREG_HOST_DEVICE inline void store_vec(T* p, const AlignedVec<T, N>& v) {
  *reinterpret_cast<AlignedVec<T, N>*>(p) = v;
}

FUSEDREG_HOST_DEVICE inline bool is_aligned(const void* p, size_t bytes = kVecBytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename... Ptrs>
FUSEDREG_HOST_DEVICE inline bool all_aligned(size_t bytes, const Ptrs*... ptrs) {
  return (is_aligned(ptrs, bytes) && ...);
}

}  // namespace fusedreg
