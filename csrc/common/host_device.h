// FUSEDREG_HOST_DEVICE: marks a function that is compiled for both the host and the device.
//
// Under nvcc it expands to `__host__ __device__`, so the CUDA kernels and their host launchers call
// one definition; under the plain host compiler (the CPU backend) it expands to nothing. The shared
// element-wise formulas (Philox, the AdamW update, the clip power) live in headers marked with it,
// which is how every backend computes the same bits from one source.
#pragma once

#if defined(__CUDACC__)
#define FUSEDREG_HOST_DEVICE __host__ __device__
#else
#define FUSEDREG_HOST_DEVICE
#endif
