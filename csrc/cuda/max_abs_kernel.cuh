// max|W| on the device (DESIGN §2), the kernel only (ATen-free: also run by the CPU emulator).
//
// The result is the float32 bit pattern of max|W| in a 4-byte device buffer that the caller zeroes
// first; blocks combine with an atomic max on the bits (non-negative floats order like their unsigned
// bits; NaN sorts above +inf, so a NaN weight propagates). Never read on the host.
#pragma once

#include <cmath>
#include <cstdint>

#include "nft_cuda/intrinsics.cuh"

namespace nft_cuda {

constexpr int kMaxAbsThreads = 256;  // block size of max_abs_kernel (its shared array holds one value per warp)

__device__ __forceinline__ float nan_max(float a, float b) {
  return (isnan(a) || a > b) ? a : b;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxAbsThreads)
    max_abs_kernel(const scalar_t* __restrict__ w, int64_t n, unsigned int* __restrict__ result_bits) {
  float m = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    m = nan_max(fabsf(static_cast<float>(intr::ld_global(w[i]))), m);
  }
  for (int delta = 16; delta > 0; delta >>= 1)
    m = nan_max(intr::shfl_down(m, delta), m);
  __shared__ float warp_max[kMaxAbsThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0)
    intr::st_shared(warp_max[warp], m);
  __syncthreads();
  if (warp == 0) {
    m = lane < static_cast<int>(blockDim.x >> 5) ? intr::ld_shared(warp_max[lane]) : 0.0f;
    for (int delta = 16; delta > 0; delta >>= 1)
      m = nan_max(intr::shfl_down(m, delta), m);
    if (lane == 0)
      intr::atomic_max_u32(result_bits, intr::float_as_uint(m));
  }
}

}  // namespace nft_cuda
