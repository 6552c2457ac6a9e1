// Standard normals from Philox words (DESIGN §3), shared by the CPU and CUDA kernels.
//
// u_j = ((x_j >> 9) + 0.5) * 2^-23 is exact in float32 and lies in (0, 1), so log(u) is finite.
// Box–Muller on (u0, u1) and (u2, u3): r = sqrt(-2 ln u_a), z = r cos(2π u_b), r sin(2π u_b).
// Lanes: 0 -> (u0,u1) cos, 1 -> (u0,u1) sin, 2 -> (u2,u3) cos, 3 -> (u2,u3) sin.
//
// The trigonometric part must not lose accuracy for u_b near 1 (2π u_b near 2π): CUDA uses
// sincospif (exact argument reduction, no local-memory slow path); the host uses the float
// polynomial sincospi_host below, exact argument reduction included.
#pragma once

#include <cmath>
#include <cstdint>

#include "nft_cuda/macros.h"
#include "nft_cuda/philox.h"
#include "nft_cuda/poly.h"

namespace nft_cuda {

NFT_INLINE float uniform_from_word(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

#if !defined(__CUDA_ARCH__)
// sin(πx) and cos(πx) for x in (0, 2) on the host, with exact argument reduction: x = 2u is a
// multiple of 2^-23, so y = x - j/2 (j = nearest quadrant) is exact and |y| <= 1/4; the Taylor
// polynomials of sin(πy) (degree 9) and cos(πy) (degree 10; coefficients in poly.h, shared with the
// SIMD lanes) are then accurate to ~1e-9, well below float32 rounding. Float-only arithmetic keeps the
// scalar loop cheap.
inline void sincospi_host(float x, float& s, float& c) {
  const float j = std::nearbyint(2.0f * x);
  const float y = x - 0.5f * j;
  const float y2 = y * y;
  using poly::kCosPi;
  using poly::kSinPi;
  const float sp = y * (kSinPi[0] + y2 * (kSinPi[1] + y2 * (kSinPi[2] + y2 * (kSinPi[3] + y2 * kSinPi[4]))));
  const float cp =
      kCosPi[0] + y2 * (kCosPi[1] + y2 * (kCosPi[2] + y2 * (kCosPi[3] + y2 * (kCosPi[4] + y2 * kCosPi[5]))));
  switch (static_cast<int>(j) & 3) {
    case 0:
      s = sp;
      c = cp;
      break;
    case 1:
      s = cp;
      c = -sp;
      break;
    case 2:
      s = -sp;
      c = -cp;
      break;
    default:
      s = -cp;
      c = sp;
      break;
  }
}
#endif

// (r cos 2πu_b, r sin 2πu_b) with r = sqrt(-2 ln u_a).
NFT_INLINE void box_muller(float ua, float ub, float& z_cos, float& z_sin) {
  float s, c;
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(ua));
  sincospif(2.0f * ub, &s, &c);
#else
  const float r = std::sqrt(-2.0f * std::log(ua));
  sincospi_host(2.0f * ub, s, c);
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

// The normals of a block evaluated in float64 and rounded once to float32: the operations of the
// pure-PyTorch twin (reference.philox_normal, reference.draw_normal) in the same order, so every
// backend gets the same float32 normal bit for bit (unless a float64 result within a libm ulp lands
// on a float32 rounding boundary: ~1e-8 per normal). On the device, sincospi(2u) replaces
// sin/cos(fl(2π)·u): same value to ~1 float64 ulp, and no Payne–Hanek slow path (which would give the
// kernel a stack frame). The device models use these (their math is float64 anyway); the Gaussian ops
// keep the faster float32 normal4 above (DESIGN §3 tolerance).
NFT_INLINE Normal4 normal4_f64(PhiloxWords w) {
  double u[4];
  for (int l = 0; l < 4; ++l)
    u[l] = (static_cast<double>(w.x[l] >> 9) + 0.5) * 1.1920928955078125e-07;  // exact
  Normal4 n;
  for (int p = 0; p < 4; p += 2) {
    const double r = sqrt(-2.0 * log(u[p]));
    double s, c;
#if defined(__CUDA_ARCH__)
    sincospi(2.0 * u[p + 1], &s, &c);
#else
    constexpr double kTwoPi = 2.0 * 3.141592653589793;  // 2.0 * math.pi, folded as Python folds it
    const double a = kTwoPi * u[p + 1];
    s = sin(a);
    c = cos(a);
#endif
    n.z[p] = static_cast<float>(r * c);
    n.z[p + 1] = static_cast<float>(r * s);
  }
  return n;
}

// Draw k of elements 4q .. 4q+3 (Note [nft Philox counter layout], multi-draw layout): the four
// normals (normal4_f64) of block draw_counter(q, k), or its four uniforms u = uniform_from_word(x_l).
NFT_INLINE Normal4 normal4_draw(uint64_t seed, uint64_t stream, uint64_t q, int k) {
  return normal4_f64(philox_block(seed, stream, draw_counter(q, k)));
}

struct Uniform4 {
  float u[4];
};

NFT_INLINE Uniform4 uniform4_draw(uint64_t seed, uint64_t stream, uint64_t q, int k) {
  const PhiloxWords w = philox_block(seed, stream, draw_counter(q, k));
  Uniform4 u;
  for (int l = 0; l < 4; ++l)
    u.u[l] = uniform_from_word(w.x[l]);
  return u;
}

}  // namespace nft_cuda
