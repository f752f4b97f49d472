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
//
// Device only (nvcc): load_widened / store_narrowed move kN consecutive values between memory and
// an array of the arithmetic type (float for 16-bit data), kVecN values per access. 16-bit data
// moves as 32-bit words of two values and converts with one instruction per value (bf16 -> fp32
// is a shift or a mask) or per pair (cvt.rn.{bf16,f16}x2.f32 rounds each half to nearest even,
// exactly as the one-value conversion does): the results are bit-identical to static_cast.
#pragma once

#include <cstddef>
#include <cstdint>

#include "host_device.h"

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

#if defined(__CUDACC__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

namespace fusedreg {

template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& v) {  // std::bit_cast rejects __half2 (not trivial)
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  memcpy(&to, &v, sizeof(To));
  return to;
}

__device__ __forceinline__ float2 unpack2(uint32_t w, c10::BFloat16) {
  return {__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u)};
}
__device__ __forceinline__ float2 unpack2(uint32_t w, c10::Half) { return __half22float2(bits_as<__half2>(w)); }
__device__ __forceinline__ uint32_t pack2(float a, float b, c10::BFloat16) {
  return bits_as<uint32_t>(__floats2bfloat162_rn(a, b));
}
__device__ __forceinline__ uint32_t pack2(float a, float b, c10::Half) {
  return bits_as<uint32_t>(__floats2half2_rn(a, b));
}

// kN values from p into v, kVecN per access (p aligned to kVecN values; kVecN == 1: element by
// element).
template <int kVecN, int kN, typename T, typename acc>
__device__ __forceinline__ void load_widened(const T* p, acc* v) {
#pragma unroll
  for (int q = 0; q < kN / kVecN; ++q) {
    if constexpr (sizeof(T) == 2 && kVecN >= 2) {
      const auto vec = load_vec<kVecN / 2>(reinterpret_cast<const uint32_t*>(p + q * kVecN));
#pragma unroll
      for (int j = 0; j < kVecN / 2; ++j) {
        const float2 f = unpack2(vec.val[j], T{});
        v[q * kVecN + 2 * j] = f.x;
        v[q * kVecN + 2 * j + 1] = f.y;
      }
    } else {
      const AlignedVec<T, kVecN> vec = load_vec<kVecN>(p + q * kVecN);
#pragma unroll
      for (int j = 0; j < kVecN; ++j) v[q * kVecN + j] = static_cast<acc>(vec.val[j]);
    }
  }
}

// kN values from v to p, rounded to T, kVecN per access.
template <int kVecN, int kN, typename T, typename acc>
__device__ __forceinline__ void store_narrowed(T* p, const acc* v) {
#pragma unroll
  for (int q = 0; q < kN / kVecN; ++q) {
    if constexpr (sizeof(T) == 2 && kVecN >= 2) {
      AlignedVec<uint32_t, kVecN / 2> vec;
#pragma unroll
      for (int j = 0; j < kVecN / 2; ++j) vec.val[j] = pack2(v[q * kVecN + 2 * j], v[q * kVecN + 2 * j + 1], T{});
      store_vec<kVecN / 2>(reinterpret_cast<uint32_t*>(p + q * kVecN), vec);
    } else {
      AlignedVec<T, kVecN> vec;
#pragma unroll
      for (int j = 0; j < kVecN; ++j) vec.val[j] = static_cast<T>(v[q * kVecN + j]);
      store_vec<kVecN>(p + q * kVecN, vec);
    }
  }
}

}  // namespace fusedreg
#endif  // __CUDACC__
