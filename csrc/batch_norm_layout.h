// BatchNormLayout: the three numbers the CPU and CUDA BatchNorm kernels address a dense input by
// (how tensors are brought into that layout, and the rule itself, are batch_norm.h's). A header of
// its own, free of ATen, so that the CUDA kernel files (batch_norm.cuh) need no tensor headers:
// those, not the kernels, were most of each file's compile time.
#pragma once

#include <cstdint>

namespace fusedreg {

// Element (o, c, s) of a dense input is at (o * channels + c) * inner + s.
struct BatchNormLayout {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
  int64_t per_channel() const { return outer * inner; }  // n: values reduced per channel
  int64_t numel() const { return outer * channels * inner; }
};

}  // namespace fusedreg
