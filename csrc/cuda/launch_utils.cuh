// Launch helpers shared by the CUDA translation units (device side only, no ATen tensors).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nft_cuda {

constexpr int kThreads = 256;

// Enough blocks to fill the device a few times over; kernels use grid-stride loops, so any
// problem size works with 64-bit indices and no launch-size limit is ever hit.
inline unsigned int grid_for(int64_t work_items, int threads = kThreads) {
  static int sm_count = [] {
    int device = 0, count = 0;
    cudaGetDevice(&device);
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) count = 80;
    return count;
  }();
  const int64_t wanted = (work_items + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count) * 16;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

}  // namespace nft_cuda
