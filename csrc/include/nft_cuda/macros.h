// Portability macros shared by the C++ (CPU) and CUDA translation units.
//
// Everything under include/nft_cuda/ is plain C++ that compiles both with the host compiler and
// with nvcc: per-element math is written once here and called from csrc/cpu/*.cpp and
// csrc/cuda/*.cu, so the CPU and CUDA kernels cannot drift apart. No ATen tensor types here.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NFT_HOST_DEVICE __host__ __device__
#define NFT_INLINE __host__ __device__ __forceinline__
#else
#define NFT_HOST_DEVICE
#define NFT_INLINE inline
#endif
