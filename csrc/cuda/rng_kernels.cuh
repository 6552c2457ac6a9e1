// Kernels of the raw-RNG ops (DESIGN §3): philox4x32 (checking API) and philox_normal. ATen-free, so
// that the CPU emulator (csrc/emu) runs the same source; launched from rng_cuda.cu.
#pragma once

#include <cstdint>

#include "nft_cuda/intrinsics.cuh"
#include "nft_cuda/normal.h"
#include "nft_cuda/philox.h"

namespace nft_cuda {
namespace {  // one copy per translation unit (the .cu launcher, or the emulator)

__global__ void philox4x32_kernel(const int64_t* __restrict__ counter, const int64_t* __restrict__ key,
                                  int64_t* __restrict__ out, int64_t rows) {
  const uint32_t k0 = static_cast<uint32_t>(intr::ld_global(key[0]));
  const uint32_t k1 = static_cast<uint32_t>(intr::ld_global(key[1]));
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    PhiloxWords in;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      in.x[j] = static_cast<uint32_t>(intr::ld_global(counter[4 * r + j]));
    const PhiloxWords w = philox4x32_10(in, k0, k1);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      intr::st_global(out[4 * r + j], static_cast<int64_t>(w.x[j]));
  }
}

// The seed/offset pair is read on the device: no host synchronisation (DESIGN §3).
__global__ void philox_normal_kernel(const int64_t* __restrict__ rng, float* __restrict__ out, int64_t numel,
                                     int64_t streams) {
  const uint64_t seed = static_cast<uint64_t>(intr::ld_global(rng[0]));
  const uint64_t offset = static_cast<uint64_t>(intr::ld_global(rng[1]));
  const int64_t nq = (numel + 3) / 4;
  for (int64_t t = blockIdx.y; t < streams; t += gridDim.y) {  // grid.y is capped at 65535 streams
    for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nq;
         q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Normal4 z = normal4(seed, offset + static_cast<uint64_t>(t), static_cast<uint64_t>(q));
      float* row = out + t * numel + 4 * q;
      const int64_t count = numel - 4 * q < 4 ? numel - 4 * q : 4;
      for (int64_t l = 0; l < count; ++l)
        intr::st_global(row[l], z.z[l]);
    }
  }
}

}  // namespace
}  // namespace nft_cuda
