// The perturb kernel (DESIGN §4.1): W_noisy[t] = W + sigma_w * z_t for every sample t, a grid-stride
// sweep where each thread loads four weights (one Philox block) once and writes all S samples.
// ATen-free apart from the op-math type, so that the CPU emulator (csrc/emu) runs the same source.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/OpMathType.h>

#include "mutation.cuh"
#include "nft_cuda/intrinsics.cuh"
#include "nft_cuda/normal.h"
#include "nft_cuda/variation.h"

namespace nft_cuda {

template <typename scalar_t>
__global__ void perturb_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, int64_t n, int64_t samples,
                               const int64_t* __restrict__ rng, const float* __restrict__ sigmas,
                               const unsigned int* __restrict__ max_bits, float scale, float state_factor) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint64_t seed = static_cast<uint64_t>(intr::ld_global(rng[0]));
  const uint64_t offset = static_cast<uint64_t>(intr::ld_global(rng[1]));
  const float m = intr::uint_as_float(intr::ld_global(*max_bits));
  const int64_t nq = (n + 3) / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = 4 * q;
    const int count = n - base < 4 ? static_cast<int>(n - base) : 4;
    acc_t wv[4];
    float aw[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l < count) {
        const scalar_t x = intr::ld_global(w[base + l]);
        wv[l] = static_cast<acc_t>(x);
        aw[l] = fabsf(static_cast<float>(x));
      }
    }
    for (int64_t t = 0; t < samples; ++t) {
      const StateBand band = make_state_band(intr::ld_global(sigmas[t]), m, scale, state_factor);
      const Normal4 z = normal4(seed, offset + static_cast<uint64_t>(t), static_cast<uint64_t>(q));
      scalar_t* o = out + t * n + base;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (l < count)
          intr::st_global(o[l], static_cast<scalar_t>(add_noise<acc_t>(wv[l], sigma_w(band, aw[l]), z.z[l])));
      }
      if (kMutation == 7 && count < 4)
        intr::st_global(o[count], scalar_t(0));  // the tail block writes one element too many
    }
  }
}

}  // namespace nft_cuda
