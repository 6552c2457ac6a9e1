// Launch helpers shared by the CUDA translation units (device side only, no ATen tensors).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nft_cuda {

constexpr int kThreads = 256;

// Streaming multiprocessors of the current device (read once per process; 80 if the query fails).
inline int sm_count() {
  static int count = [] {
    int device = 0, n = 0;
    cudaGetDevice(&device);
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      n = 80;
    return n;
  }();
  return count;
}

// Enough blocks to fill the device a few times over; kernels use grid-stride loops, so any
// problem size works with 64-bit indices and no launch-size limit is ever hit.
inline unsigned int grid_for(int64_t work_items, int threads = kThreads) {
  const int64_t wanted = (work_items + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

}  // namespace nft_cuda
