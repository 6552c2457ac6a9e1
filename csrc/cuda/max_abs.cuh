// Launch of the device max|W| (max_abs_kernel.cuh), shared by perturb and the fused noisy matmul.
#pragma once

#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "launch_utils.cuh"
#include "max_abs_kernel.cuh"

namespace nft_cuda {
namespace {

// Zeroes `result_bits` and launches the reduction on `stream`.
template <typename scalar_t>
void launch_max_abs(const scalar_t* w, int64_t n, unsigned int* result_bits, cudaStream_t stream) {
  static_assert(kMaxAbsThreads == kThreads, "max_abs_kernel runs with the common block size");
  C10_CUDA_CHECK(cudaMemsetAsync(result_bits, 0, sizeof(unsigned int), stream));
  max_abs_kernel<scalar_t><<<grid_for(n), kMaxAbsThreads, 0, stream>>>(w, n, result_bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace nft_cuda
