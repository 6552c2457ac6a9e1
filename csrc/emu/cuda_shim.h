// The CUDA language on the host, for the CPU emulator (issue 13): included before the kernel sources
// (csrc/cuda/*.cuh) so that g++ compiles exactly the code nvcc compiles. Function qualifiers vanish,
// __shared__ variables become one static instance shared by the threads of the running block (blocks
// run one after another), the built-in index variables are set by the emulator's scheduler before it
// resumes a thread, and __syncthreads is the emulator's block barrier. Device intrinsics are not
// here: they live in include/nft_cuda/intrinsics.cuh, whose host branch calls the emulator.
#pragma once

#if defined(__CUDACC__)
#error "cuda_shim.h is for host compilers only"
#endif

#include <cmath>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::isnan;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace nft_emu {
// The running thread's indices and the launch geometry (emulator.cpp).
extern dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;
void syncthreads();
}  // namespace nft_emu

#define threadIdx (::nft_emu::g_thread_idx)
#define blockIdx (::nft_emu::g_block_idx)
#define blockDim (::nft_emu::g_block_dim)
#define gridDim (::nft_emu::g_grid_dim)

inline void __syncthreads() {
  nft_emu::syncthreads();
}
