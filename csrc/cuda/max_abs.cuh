// max|W| on the device (DESIGN §2): shared by perturb and the fused noisy matmul.
//
// The result is the float32 bit pattern of max|W| in a 4-byte device buffer that the caller zeroes
// first (cudaMemsetAsync); blocks combine with atomicMax on the bits (non-negative floats order
// like their unsigned bits; NaN sorts above +inf, so a NaN weight propagates). Never read on the host.
#pragma once

#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "launch_utils.cuh"

namespace nft_cuda {
namespace {

__device__ __forceinline__ float nan_max(float a, float b) {
  return (isnan(a) || a > b) ? a : b;
}

template <typename scalar_t>
__global__ void max_abs_kernel(const scalar_t* __restrict__ w, int64_t n, unsigned int* __restrict__ result_bits) {
  float m = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    m = nan_max(fabsf(static_cast<float>(w[i])), m);
  }
  for (int delta = 16; delta > 0; delta >>= 1) m = nan_max(__shfl_down_sync(0xffffffffu, m, delta), m);
  __shared__ float warp_max[kThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < (blockDim.x >> 5) ? warp_max[lane] : 0.0f;
    for (int delta = 16; delta > 0; delta >>= 1) m = nan_max(__shfl_down_sync(0xffffffffu, m, delta), m);
    if (lane == 0) atomicMax(result_bits, __float_as_uint(m));
  }
}

// Zeroes `result_bits` and launches the reduction on `stream` (kThreads threads per block).
template <typename scalar_t>
void launch_max_abs(const scalar_t* w, int64_t n, unsigned int* result_bits, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMemsetAsync(result_bits, 0, sizeof(unsigned int), stream));
  max_abs_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(w, n, result_bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace nft_cuda
