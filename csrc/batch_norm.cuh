// What the CUDA BatchNorm files share. The op is split by kernel family, each kernel next to the
// launcher that instantiates it:
//   batch_norm.cu         the six ops: argument handling, path choice, per-device caches, registration
//   batch_norm_onchip.cu  on-chip kernels (slice cached in shared memory, one launch)
//   batch_norm_stats.cu   split-path reduction + finalize kernels (statistics, backward sums)
//   batch_norm_elemt.cu   elementwise kernels (y or dx from per-channel coefficients)
// batch_norm.cu's header describes the layout, the paths and their trade-offs.
//
// Why split: the 120 kernel instantiations in one file were the longest unit of the CUDA build;
// apart, they compile in parallel. The launchers are templates declared here and explicitly
// instantiated per dtype in their kernels' file (FUSEDREG_BN_FOR_EACH_DTYPE). They take raw
// pointers (Operands), not tensors, so that the kernel files need no ATen tensor headers, which
// took each file longer to compile than its kernels.
// Only what two or more files need lives here: the walks, unit loads/stores, the block reduction,
// the elementwise formula, argument structs and host helpers, all in fusedreg::bn (types crossing
// files need external linkage); kernels stay in their files' anonymous namespaces.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "batch_norm_layout.h"
#include "common/dispatch.h"
#include "common/vec.cuh"

namespace fusedreg {
namespace bn {

constexpr int kThreads = 256;        // split-path and elementwise blocks
constexpr int kUnroll = 4;           // units loaded before any is used
constexpr int kRowBx = 32;           // column threads of a rows block (at most)

template <typename acc>
__device__ __forceinline__ acc inv_sqrt(acc v) {
  return acc(1) / sqrt(v);  // IEEE sqrt and division (no fast math), like 1 / torch.sqrt
}

// q = a / b, returns a - q * b, for 0 <= a < 2^53 and 0 < b. 32-bit division when both fit;
// otherwise a float64 reciprocal estimate (within one of the quotient) corrected with integer
// arithmetic, which avoids the called 64-bit division routine and the spills around the call.
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& q) {
  if (((a | b) >> 31) == 0) {
    q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    return a - q * b;
  }
  q = static_cast<int64_t>(static_cast<double>(a) * __drcp_rn(static_cast<double>(b)));
  int64_t r = a - q * b;
  if (r < 0) {
    --q;
    r += b;
  } else if (r >= b) {
    ++q;
    r -= b;
  }
  return r;
}

// ----------------------------------------------------------------------------- reduction state

template <typename acc>
struct Pair {
  acc a, b;
  __device__ static Pair merge(const Pair& x, const Pair& y) { return {x.a + y.a, x.b + y.b}; }
};

// Combines st[s] across the threads of one column (t = ty * bx + tx, bx and kBlock powers of two)
// with a fixed tree in `scratch` ([kBlock]); every thread gets its column's result. bx == 1
// reduces the whole block.
template <int kBlock, int kSlots, typename State>
__device__ void column_reduce(State (&st)[kSlots], State* scratch, int bx) {
  const int t = threadIdx.x;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    scratch[t] = st[s];
    __syncthreads();
    for (int stride = kBlock / 2; stride >= bx; stride /= 2) {
      if (t < stride) scratch[t] = State::merge(scratch[t], scratch[t + stride]);
      __syncthreads();
    }
    st[s] = scratch[t & (bx - 1)];
    __syncthreads();
  }
}

// ----------------------------------------------------------------------------- walks

// The units one thread visits, in order: `count` of them, offset() of the current one, advance().
// Planes: channel c's units u in [lo, hi), unit u = (o = u / upp, j = u % upp) at
// (o * C + c) * inner + j * V; thread t takes u = lo + t, lo + t + kBlock, ...
template <int kBlock, int V>
struct PlaneWalk {
  int64_t count, o, j, upp, d_o, d_j, plane_stride, base;
  __device__ PlaneWalk(int64_t lo, int64_t hi, int64_t c, int64_t C, int64_t inner) {
    const int64_t u = lo + threadIdx.x;
    count = u < hi ? (hi - u + kBlock - 1) / kBlock : 0;
    upp = inner / V;
    j = divmod(u, upp, o);
    d_j = divmod(kBlock, upp, d_o);
    plane_stride = C * inner;
    base = c * inner;
  }
  __device__ int64_t offset() const { return o * plane_stride + base + j * V; }
  __device__ void advance() {
    j += d_j;
    o += d_o;
    if (j >= upp) {
      j -= upp;
      ++o;
    }
  }
};

// Rows: the unit of columns c0 .. c0 + V - 1 in rows lo + ty, lo + ty + by, ... < hi.
struct RowWalk {
  int64_t count, off, step;
  __device__ RowWalk(int64_t lo, int64_t hi, int64_t c0, int64_t C, int ty, int by, bool active) {
    const int64_t r = lo + ty;
    count = active && r < hi ? (hi - r + by - 1) / by : 0;
    off = r * C + c0;
    step = static_cast<int64_t>(by) * C;
  }
  __device__ int64_t offset() const { return off; }
  __device__ void advance() { off += step; }
};

template <typename acc, int V, typename scalar_t>
__device__ __forceinline__ void load_unit(const scalar_t* p, int64_t off, acc (&v)[V]) {
  const AlignedVec<scalar_t, V> raw = load_vec<V>(p + off);
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = static_cast<acc>(raw.val[i]);
}

template <typename acc, int V, typename scalar_t>
__device__ __forceinline__ void store_unit(scalar_t* p, int64_t off, const acc (&v)[V]) {
  AlignedVec<scalar_t, V> raw;
#pragma unroll
  for (int i = 0; i < V; ++i) raw.val[i] = static_cast<scalar_t>(v[i]);
  store_vec<V>(p + off, raw);
}

// store_unit with a 16-byte unit written by one st.global.v4 (a plain weak store, the STG.E.128 an
// unsplit store_vec compiles to), same alignment precondition. For the loops where NVVM splits
// store_vec's AlignedVec store into per-value STGs (rows elementwise, the on-chip planes last pass
// once unrolled). Elsewhere store_unit stays: there store_vec is one STG.E.128 already, and the
// asm (opaque to NVVM, a memory clobber) costs a few instructions.
template <typename acc, int V, typename scalar_t>
__device__ __forceinline__ void store_unit_v4(scalar_t* p, int64_t off, const acc (&v)[V]) {
  AlignedVec<scalar_t, V> raw;
#pragma unroll
  for (int i = 0; i < V; ++i) raw.val[i] = static_cast<scalar_t>(v[i]);
  if constexpr (sizeof(raw) == sizeof(uint4)) {
    const uint4 w = bits_as<uint4>(raw);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                 :: "l"(__cvta_generic_to_global(p + off)), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
                 : "memory");
  } else {
    store_vec<V>(p + off, raw);
  }
}

// Slot of value i of a unit: planes have one channel per unit (slot 0), rows V (slot i).
template <bool kRows>
__device__ __forceinline__ constexpr int slot_of(int i) { return kRows ? i : 0; }

// ----------------------------------------------------------------------------- elementwise formulas

enum class Pass { kForward, kBackward, kBackwardEval };

template <typename acc>
struct CoefArgs {
  const acc* mean;    // [C]
  const acc* invstd;  // [C]: invstd, or the variance when from_var
  const acc* weight;  // [C] or null (1)
  const acc* shift;   // [C] or null (0): bias (forward); sum or mean of dy (backward)
  const acc* dot;     // [C]: sum or mean of dy * (x - mean) (training backward)
  acc count;          // shift and dot (backward) are divided by it: n for sums, 1 for means
  acc eps;            // from_var only
  bool from_var;
  acc* mean_out;      // eval forward: the block (0, 0) writes mean and invstd here (else null)
  acc* invstd_out;
};

// out = (x - m) * a + b (forward), (dy - b - (x - m) * k) * a (backward), dy * a (eval backward)
template <typename acc>
struct Coefs {
  acc m, a, b, k;
};

template <Pass kPass, typename acc>
__device__ __forceinline__ acc apply(const Coefs<acc>& k, acc x, acc g) {
  if constexpr (kPass == Pass::kForward) {
    return (x - k.m) * k.a + k.b;
  } else if constexpr (kPass == Pass::kBackward) {
    return (g - k.b - (x - k.m) * k.k) * k.a;
  } else {
    return g * k.a;
  }
}

// ----------------------------------------------------------------------------- launch arguments

// The per-element operands of one launch: BatchNormOperands' data (batch_norm.h), all in one dense
// layout; dy and out are null when the op has none.
template <typename scalar_t>
struct Operands {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* out;
  BatchNormLayout layout;
};

template <typename acc>
struct FinalizeArgs {
  int64_t C, inner, splits, n;  // n: values per channel (> 0 for moments)
  acc eps, keep, momentum;      // keep = 1 - momentum
  acc* first_out;               // moments: mean; grad: sum(dy)
  acc* second_out;              // moments: invstd (var when out_var); grad: sum(dy * (x - mean))
  bool out_var;
  acc* running_mean;            // moments, optional, updated in place
  acc* running_var;
  const acc* invstd;            // grad, optional: then grad_weight = second * invstd ...
  acc* grad_weight;             // ... is written here
};

template <typename acc>
struct OnchipArgs {
  int64_t C, inner, outer;
  int64_t cache_elems;     // elements of the x cache (the dy cache follows it)
  int bx;                  // rows: column threads per block (1 for planes)
  acc eps, keep, momentum;
  const acc* weight;       // [C] or null
  const acc* bias;         // forward: [C] or null
  acc* running_mean;       // forward: [C] or null, updated in place
  acc* running_var;
  acc* mean;               // forward: out [C]; backward: in
  acc* invstd;             // forward: out [C]; backward: in
  acc* grad_weight;        // backward: out [C]
  acc* grad_bias;          // backward: out [C]
  bool training;           // backward
};

// ----------------------------------------------------------------------------- host helpers

// Per-device queries, cached (batch_norm.cu).
int sm_count();
// Blocks of `kernel` resident on one SM of the current device at `threads` threads (and `smem`
// dynamic bytes), queried once per device, kernel and size: a grid-stride kernel launched with
// more would run a mostly idle wave. Per device: GPUs of one process may differ, and the answer
// for smem beyond 48 KiB depends on onchip_capacity's attribute, which is per device.
int resident_per_sm(const void* kernel, int threads, size_t smem = 0);
// Dynamic shared memory an on-chip kernel may use on the current device (opt-in maximum less its
// static shared memory), allowed on the kernel once per device: a function attribute set on one
// device does not carry over to another, where launching with more than 48 KiB then fails.
int64_t onchip_capacity(const void* kernel);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p *= 2;
  return p;
}

// Column threads of a rows block: enough for C (in units of V channels), at most kRowBx.
inline int rows_bx(int64_t C, int V, int block) {
  return static_cast<int>(std::min<int64_t>({kRowBx, next_pow2(ceil_div(C, V)), block}));
}

// f(std::integral_constant<int, V>) with V = 16-byte vectors when `vec`, else single values.
template <typename scalar_t, typename F>
void with_vec(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, vec_size<scalar_t>()>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// 16-byte units are usable when the unit extent (C for rows, inner for planes) is a multiple of
// the vector and every pointer is 16-byte aligned: then every unit is.
template <typename scalar_t>
bool vectorizable(const BatchNormLayout& L, std::initializer_list<const void*> ptrs) {
  const int64_t extent = L.inner == 1 ? L.channels : L.inner;
  if (extent % vec_size<scalar_t>() != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned(p)) return false;
  }
  return true;
}

// ----------------------------------------------------------------------------- launchers

// Each launcher is defined next to its kernels and instantiated there for every dtype of
// FUSEDREG_DISPATCH_FLOATING, in its order (a missing one is an undefined symbol when the library
// loads).
#define FUSEDREG_BN_FOR_EACH_DTYPE(M) M(double) M(float) M(at::Half) M(at::BFloat16)

// Split path (batch_norm_stats.cu). Contract: launches on the current stream the reduction and
// finalize kernels over ops.x, or (kGrad) the sums of dy and dy * (x - mean[c]) over ops.x and
// ops.dy; fills fin.C/inner/splits/n, writes the [C] statistics-dtype outputs fin points to and,
// for moments, updates the running statistics it points to in place. Needs ops.layout.numel() > 0.
// Allocates the [3 * splits * C] partials; never syncs.
template <typename scalar_t, bool kGrad>
void launch_split_reduce(const Operands<scalar_t>& ops, const acc_t<scalar_t>* mean,
                         FinalizeArgs<acc_t<scalar_t>> fin);

// Elementwise pass (batch_norm_elemt.cu). Contract: writes ops.out from ops.x and/or ops.dy (as
// kPass needs: kBackwardEval never reads x) and co's per-channel coefficients; with co.mean_out
// set (eval forward) also writes mean and invstd there. Launches nothing for an empty tensor;
// never syncs.
template <typename scalar_t, Pass kPass>
void launch_elementwise(const Operands<scalar_t>& ops, const CoefArgs<acc_t<scalar_t>>& co);

// On-chip path (batch_norm_onchip.cu). Contract: when the block's slice fits in shared memory and
// the blocks fill at least half the GPU (or the whole tensor is small), launches one kernel that
// writes ops.out and args' outputs (forward: mean, invstd, running statistics in place; backward:
// grad_weight, grad_bias) and returns true; else launches nothing and returns false. Needs
// ops.layout.numel() > 0; never syncs.
template <typename scalar_t, bool kBackward>
bool try_onchip(const Operands<scalar_t>& ops, OnchipArgs<acc_t<scalar_t>> args);

}  // namespace bn
}  // namespace fusedreg
