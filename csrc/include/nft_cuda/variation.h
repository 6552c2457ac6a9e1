// Per-element standard deviation of the device-variation model (DESIGN §2).
//
//   sigma_base = sigma_d * max|W| * scale,   scale = sqrt(A)/B / sqrt(0.4 s^2 + 0.6)
//   sigma_w    = sigma_base * s  if t_lo < |w| < t_hi (strict), else sigma_base
//
// m = max|W| is a float32; t_lo = 0.25f*m and t_hi = 0.75f*m are computed once per tensor and
// |w| is cast to float32 before comparing, so every backend (CPU, CUDA, pure PyTorch) makes the
// same state-band decision at the edges: no per-element division, no fast-math reciprocal.
// The products are evaluated in this exact order in every backend.
#pragma once

#include <cmath>

#include "nft_cuda/macros.h"

namespace nft_cuda {

struct StateBand {
  float t_lo;
  float t_hi;
  float sigma_base;  // sigma outside the band
  float sigma_in;    // sigma inside the band: sigma_base * s
};

// sigma_d < 0 (only reachable through an unchecked device tensor) poisons the sample with NaN
// rather than silently flipping the sign of the noise.
NFT_INLINE StateBand make_state_band(float sigma_d, float max_abs, float scale, float state_factor) {
  StateBand b;
  b.t_lo = 0.25f * max_abs;
  b.t_hi = 0.75f * max_abs;
  b.sigma_base = sigma_d < 0.0f ? NAN : (sigma_d * max_abs) * scale;
  b.sigma_in = b.sigma_base * state_factor;
  return b;
}

NFT_INLINE float sigma_w(const StateBand& b, float abs_w) {
  return (abs_w > b.t_lo && abs_w < b.t_hi) ? b.sigma_in : b.sigma_base;
}

// Round-to-nearest multiply and add that no compiler may contract into one fused multiply-add:
// nvcc contracts a * b + c into an FMA by default, which rounds the product differently from the
// CPU kernel and the reference. The host compilers of the CPU kernels build with FMA contraction
// off (x86-64 baseline ISA: no FMA instruction; the SIMD path rounds the product explicitly).
// The float and double overloads below are near-twins on purpose: each names its own CUDA intrinsic
// (the double ones serve the device models' float64 math, device_models.h).
NFT_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

NFT_INLINE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

NFT_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

NFT_INLINE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// W_noisy = W + sigma_w * z in the weight's accumulation type (float for half types): the product
// is rounded to float32 first, then added (DESIGN §3), on every backend. A zero sigma returns w
// untouched (sigma_d = 0 or max|W| = 0 must give W exactly, signed zeros too).
template <typename acc_t>
NFT_INLINE acc_t add_noise(acc_t w, float sw, float z) {
  return sw == 0.0f ? w : add_rn(w, static_cast<acc_t>(mul_rn(sw, z)));
}

}  // namespace nft_cuda
