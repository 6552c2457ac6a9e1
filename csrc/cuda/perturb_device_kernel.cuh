// The perturb_device kernel (issue 16): the device models' W'[t] for every sample t, a grid-stride
// sweep with the structure of perturb_kernel.cuh: each thread loads four weights (one Philox block)
// once, and for each sample generates each draw the model reads once for the block (draw_block) and
// applies the per-element function of include/nft_cuda/device_models.h (shared with the CPU kernel).
// ATen-free, so that the CPU emulator (csrc/emu) runs the same source.
#pragma once

#include <cmath>
#include <cstdint>

#include "nft_cuda/device_models.h"
#include "nft_cuda/intrinsics.cuh"

namespace nft_cuda {

// kKind == args.kind (the launcher dispatches on it): the draw loops unroll and the other models'
// branches of perturb_element fold away, so the draws stay in registers.
template <typename scalar_t, int kKind>
__global__ void perturb_device_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, int64_t n,
                                      int64_t samples, const int64_t* __restrict__ rng,
                                      const float* __restrict__ sigmas, const unsigned int* __restrict__ max_bits,
                                      device::Args args) {
  args.kind = kKind;
  const uint64_t seed = static_cast<uint64_t>(intr::ld_global(rng[0]));
  const uint64_t offset = static_cast<uint64_t>(intr::ld_global(rng[1]));
  const double m = static_cast<double>(intr::uint_as_float(intr::ld_global(*max_bits)));
  const int64_t nq = (n + 3) / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = 4 * q;
    const int count = n - base < 4 ? static_cast<int>(n - base) : 4;
    double wv[4];
#pragma unroll
    for (int l = 0; l < 4; ++l)
      wv[l] = l < count ? static_cast<double>(intr::ld_global(w[base + l])) : 0.0;
    for (int64_t t = 0; t < samples; ++t) {
      const device::Sample smp = device::make_sample(args, intr::ld_global(sigmas[t]));
      device::BlockDraws d{};  // draws this call does not use stay 0 (never read)
      device::draw_block<kKind>(args, seed, offset + static_cast<uint64_t>(t), static_cast<uint64_t>(q), d);
      scalar_t* o = out + t * n + base;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (l < count)
          intr::st_global(o[l], static_cast<scalar_t>(device::perturb_element(args, smp, wv[l], m, d.d[l])));
      }
    }
  }
}

}  // namespace nft_cuda
