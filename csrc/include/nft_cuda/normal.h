// Standard normals from Philox words (DESIGN §3), shared by the CPU and CUDA kernels.
//
// u_j = ((x_j >> 9) + 0.5) * 2^-23 is exact in float32 and lies in (0, 1), so log(u) is finite.
// Box–Muller on (u0, u1) and (u2, u3): r = sqrt(-2 ln u_a), z = r cos(2π u_b), r sin(2π u_b).
// Lanes: 0 -> (u0,u1) cos, 1 -> (u0,u1) sin, 2 -> (u2,u3) cos, 3 -> (u2,u3) sin.
//
// The trigonometric part must not lose accuracy for u_b near 1 (2π u_b near 2π): CUDA uses
// sincospif (exact argument reduction, no local-memory slow path); the host evaluates the
// product and the sine/cosine in double, which is exact enough and has no slow path either.
#pragma once

#include <cmath>
#include <cstdint>

#include "nft_cuda/macros.h"
#include "nft_cuda/philox.h"

namespace nft_cuda {

NFT_INLINE float uniform_from_word(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// (r cos 2πu_b, r sin 2πu_b) with r = sqrt(-2 ln u_a).
NFT_INLINE void box_muller(float ua, float ub, float& z_cos, float& z_sin) {
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(ua));
  float s, c;
  sincospif(2.0f * ub, &s, &c);
#else
  const float r = std::sqrt(-2.0f * std::log(ua));
  const double angle = 6.283185307179586476925 * static_cast<double>(ub);
  const float s = static_cast<float>(std::sin(angle));
  const float c = static_cast<float>(std::cos(angle));
#endif
  z_cos = r * c;
  z_sin = r * s;
}

struct Normal4 {
  float z[4];
};

// The four normals of elements 4q .. 4q+3 of `stream`.
NFT_INLINE Normal4 normal4(uint64_t seed, uint64_t stream, uint64_t q) {
  const PhiloxWords w = philox_block(seed, stream, q);
  Normal4 n;
  box_muller(uniform_from_word(w.x[0]), uniform_from_word(w.x[1]), n.z[0], n.z[1]);
  box_muller(uniform_from_word(w.x[2]), uniform_from_word(w.x[3]), n.z[2], n.z[3]);
  return n;
}

}  // namespace nft_cuda
