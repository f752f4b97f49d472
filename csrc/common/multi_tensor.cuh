// Multi-tensor apply: one kernel launch over whole lists of tensors (apex's multi_tensor_apply, with
// the chunk table passed by value).
//
// Given Depth parallel lists (AdamW: params, grads, exp_avgs, exp_avg_sqs, Depth 4) whose i-th
// tensors pair up element by element, every tensor is cut into chunks of chunk_size elements and
// one kernel is launched whose blocks each process one (tensor, chunk). The table that tells a block
// its chunk (MultiTensorTable) is a kernel argument: it travels inside the launch, so there is no
// host-to-device copy and no sync, and a CUDA graph captures it by value. When the table fills
// (kMaxTensors tensors or kMaxBlocks chunks), it is launched and refilled; a tensor may then
// continue in the next launch.
//
// Sizing: CUDA >= 12.1 on sm_70+ allows 32764 bytes of kernel parameters. The table takes all of
// it but kFunctorParamBytes (left to the functor): 256 tensors, and per launch 23488 chunks at
// Depth 1 down to 15296 at Depth 5. GPT-2 124M (148 tensors, 1995 chunks of 65536 elements) is one
// launch. Each block finds its tensor through a 1-byte slot per block, so blocks are cheap and
// tensors, the scarcer resource for models with many small parameters, get most of the bytes.
// Trade-off: a ~30 KB argument block adds some launch latency over apex's 4 KB, for one launch
// where apex makes a dozen.
//
// Host section (plain C++, compiled into the CPU library too, so both walk the same chunks):
//   MultiTensorTable<Depth>         the table; chunk_of(block) decodes a block (host and device)
//   MultiTensorChunk                what a block works on: tensor, chunk, element range, partial slot
//   for_each_table<Depth>(lists, chunk_size, on_table)   fills tables, calls on_table per full one
//   chunk_offsets(tensors, chunk_size)  where each tensor's chunks sit in the call's chunk order
// CUDA section (nvcc only):
//   multi_tensor_apply<Depth, BLOCK>(chunk_size, lists, functor)
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/vec.cuh"

namespace fusedreg {

constexpr int64_t kMaxKernelParamBytes = 32764;
constexpr int64_t kFunctorParamBytes = 2048;

// One block's work. Chunks are numbered per call in tensor-major order ("global_chunk"), so a
// kernel that writes one partial result per block can index a buffer of total-chunk length and a
// later pass can find tensor i's partials at [chunk_offsets[i], chunk_offsets[i + 1]).
struct MultiTensorChunk {
  int slot;              // the tensor's entry in this table (index into addresses / numels)
  int64_t tensor;        // the tensor's index in the lists
  int64_t chunk;         // the chunk's index within its tensor
  int64_t begin;         // first element of the chunk
  int64_t size;          // elements in the chunk: chunk_size, or fewer for a tensor's last chunk
  int64_t global_chunk;  // the chunk's index among all chunks of the call
};

template <int Depth>
struct MultiTensorTable {
  static constexpr int kMaxTensors = 256;  // slots are stored in one byte
  static constexpr int64_t kBytesPerTensor = 8 * Depth + 8 + 3 * 4;
  static constexpr int64_t kHeaderBytes = 2 * 8 + 2 * 4;
  static constexpr int kMaxBlocks = static_cast<int>(
      (kMaxKernelParamBytes - kFunctorParamBytes - kHeaderBytes - kMaxTensors * kBytesPerTensor) / 64 * 64);
  static_assert(Depth >= 1 && kMaxBlocks >= 4096, "Depth too large for one kernel-argument table");

  void* addresses[Depth][kMaxTensors];  // data pointer of list d's tensor in each slot
  int64_t numels[kMaxTensors];
  int64_t chunk_size;
  int64_t global_chunk_base;            // global_chunk of block 0
  int32_t tensor_index[kMaxTensors];    // slot -> index in the lists
  int32_t first_block[kMaxTensors];     // slot -> first block working on it
  int32_t first_chunk[kMaxTensors];     // slot -> that block's chunk index within the tensor
  int32_t num_tensors;
  int32_t num_blocks;
  uint8_t block_slot[kMaxBlocks];       // block -> slot

  FUSEDREG_HOST_DEVICE MultiTensorChunk chunk_of(int block) const {
    MultiTensorChunk c;
    c.slot = block_slot[block];
    c.tensor = tensor_index[c.slot];
    c.chunk = first_chunk[c.slot] + (block - first_block[c.slot]);
    c.begin = c.chunk * chunk_size;
    c.size = numels[c.slot] - c.begin < chunk_size ? numels[c.slot] - c.begin : chunk_size;
    c.global_chunk = global_chunk_base + block;
    return c;
  }

  // List `list`'s data for this chunk, as T.
  template <typename T>
  FUSEDREG_HOST_DEVICE T* chunk_data(int list, const MultiTensorChunk& c) const {
    return static_cast<T*>(addresses[list][c.slot]) + c.begin;
  }
};

inline int64_t num_chunks(int64_t numel, int64_t chunk_size) {
  return (numel + chunk_size - 1) / chunk_size;
}

// Exclusive prefix sum of chunk counts: n + 1 entries, the last one the call's total chunk count.
inline std::vector<int64_t> chunk_offsets(at::TensorList tensors, int64_t chunk_size) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    offsets[i + 1] = offsets[i] + num_chunks(tensors[i].numel(), chunk_size);
  }
  return offsets;
}

// Fills MultiTensorTables with every chunk of `lists` and calls on_table(const table&) for each
// one (full, or the last), in chunk order; the table is reused after on_table returns. Empty
// tensors get no slot. Checks what the chunk walk relies on: equal list lengths, one device, and
// for every i, lists[d][i] non-overlapping and dense with lists[0][i]'s numel and layout
// (same_layout: so a chunk covers the same elements in every list). Callers check dtypes and name their arguments
// first; these messages speak of list positions.
template <int Depth, typename OnTable>
void for_each_table(const std::array<at::TensorList, Depth>& lists, int64_t chunk_size,
                    OnTable&& on_table) {
  using Table = MultiTensorTable<Depth>;
  TORCH_CHECK(chunk_size > 0 && chunk_size % kVecBytes == 0,
              "multi-tensor apply: chunk_size must be a positive multiple of 16, got ", chunk_size);
  const size_t n = lists[0].size();
  for (int d = 1; d < Depth; ++d) {
    TORCH_CHECK(lists[d].size() == n, "multi-tensor apply: list ", d, " has ", lists[d].size(),
                " tensors, list 0 has ", n);
  }
  Table table{};
  table.chunk_size = chunk_size;
  int64_t global_chunk = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& lead = lists[0][i];
    for (int d = 0; d < Depth; ++d) {
      const at::Tensor& t = lists[d][i];
      TORCH_CHECK(t.device() == lists[0][0].device(), "multi-tensor apply: list ", d, "[", i,
                  "] is on ", t.device(), ", expected ", lists[0][0].device());
      TORCH_CHECK(t.numel() == lead.numel(), "multi-tensor apply: list ", d, "[", i, "] has ",
                  t.numel(), " elements, list 0[", i, "] has ", lead.numel());
      if (t.numel() == 0) continue;
      TORCH_CHECK(t.is_non_overlapping_and_dense(), "multi-tensor apply: list ", d, "[", i,
                  "] must be non-overlapping and dense, got strides ", t.strides());
      TORCH_CHECK(same_layout(t, lead), "multi-tensor apply: list ", d, "[", i, "] has sizes ", t.sizes(),
                  " and strides ", t.strides(), ", list 0[", i, "] has ", lead.sizes(), " and ",
                  lead.strides(), " (strides may differ only on dimensions of size 1)");
    }
    const int64_t chunks = num_chunks(lead.numel(), chunk_size);
    TORCH_CHECK(chunks <= INT32_MAX, "multi-tensor apply: tensor ", i, " has too many chunks");
    for (int64_t chunk = 0; chunk < chunks;) {
      if (table.num_tensors == Table::kMaxTensors || table.num_blocks == Table::kMaxBlocks) {
        on_table(std::as_const(table));
        table.global_chunk_base = global_chunk;
        table.num_tensors = 0;
        table.num_blocks = 0;
      }
      const int slot = table.num_tensors++;
      for (int d = 0; d < Depth; ++d) table.addresses[d][slot] = lists[d][i].data_ptr();
      table.numels[slot] = lead.numel();
      table.tensor_index[slot] = static_cast<int32_t>(i);
      table.first_block[slot] = table.num_blocks;
      table.first_chunk[slot] = static_cast<int32_t>(chunk);
      const int64_t taken = std::min<int64_t>(chunks - chunk, Table::kMaxBlocks - table.num_blocks);
      std::fill_n(table.block_slot + table.num_blocks, taken, static_cast<uint8_t>(slot));
      table.num_blocks += static_cast<int32_t>(taken);
      chunk += taken;
      global_chunk += taken;
    }
  }
  if (table.num_blocks > 0) on_table(std::as_const(table));
}

}  // namespace fusedreg

#if defined(__CUDACC__)

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "multi_tensor.cuh passes up to 32764 bytes of kernel arguments, which needs sm_70 or newer"
#endif
#if CUDART_VERSION < 12010
#error "multi_tensor.cuh passes up to 32764 bytes of kernel arguments, which needs CUDA 12.1 or newer"
#endif

namespace fusedreg {

// __grid_constant__ lets the functor take the table by reference without a per-thread copy of it.
template <int Depth, int BLOCK, typename Functor>
__global__ void __launch_bounds__(BLOCK)
    multi_tensor_apply_kernel(const __grid_constant__ MultiTensorTable<Depth> table, const Functor functor) {
  functor(table.chunk_of(static_cast<int>(blockIdx.x)), table);
}

// Runs `functor` once per (tensor, chunk) of `lists` with BLOCK threads per chunk, in as few
// launches as the table allows, on the current stream of lists[0][0]'s device. Returns nothing and
// mutates only what the functor writes. The functor is copied into every launch and provides
//   __device__ void operator()(const MultiTensorChunk& chunk, const MultiTensorTable<Depth>& table) const
// reading list d's elements [0, chunk.size) at table.chunk_data<T>(d, chunk); it picks its own
// vector or scalar path (vec.cuh). Checks as for_each_table; an empty list launches nothing.
template <int Depth, int BLOCK = 256, typename Functor>
void multi_tensor_apply(int64_t chunk_size, const std::array<at::TensorList, Depth>& lists,
                        const Functor& functor) {
  static_assert(sizeof(MultiTensorTable<Depth>) + sizeof(Functor) <= kMaxKernelParamBytes,
                "table + functor exceed the 32764-byte kernel-argument limit");
  static_assert(sizeof(Functor) <= kFunctorParamBytes, "functor exceeds kFunctorParamBytes");
  if (lists[0].empty()) return;
  TORCH_CHECK(lists[0][0].is_cuda(), "multi-tensor apply: tensors must be CUDA tensors, got ",
              lists[0][0].device());
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_each_table<Depth>(lists, chunk_size, [&](const MultiTensorTable<Depth>& table) {
    multi_tensor_apply_kernel<Depth, BLOCK, Functor><<<table.num_blocks, BLOCK, 0, stream>>>(table, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fusedreg

#endif  // __CUDACC__
