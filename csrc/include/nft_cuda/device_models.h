// Per-element weight functions of the device models beyond the bit-sliced Gaussian (issue 16;
// formulas, parameters and sources: docs/device-models.md), written once for the CPU kernel
// (csrc/cpu/perturb_device_cpu.cpp), the CUDA kernel (csrc/cuda/perturb_device_kernel.cuh) and the
// emulator. The pure-PyTorch twin (reference.perturb_device) and the numpy oracle
// (tests/device_oracle.py) follow the same operations in the same order:
//
//   m = max|W| (float32, cast to double); w, the draws and every product in double; the result is
//   rounded once to the weight's dtype by the caller. m == 0 returns w.
//   Differential pair (PCM, StuckAt): g+ = (G·max(w,0))/m, g- = (G·max(-w,0))/m, r = g/G;
//   w' = w + ((gf+ - g+) - (gf- - g-))·m / G, and w itself when that difference is 0, so that zero
//   perturbations (severity 0 and t = 0) return the weight bit for bit, signed zeros included.
//
// Draws (Note [nft Philox counter layout], multi-draw layout): draw k of element e comes from block
// draw_counter(e >> 2, k), lane e & 3, as a normal (normal4) for k < 6 and a uniform
// (uniform_from_word of the raw word) for k = 6, 7:
//   PCM: 0/1 programming z of g+/g-, 2/3 drift-exponent z of g+/g-, 4/5 read-noise z of g+/g-;
//   LogNormal: 0; StuckAt: 6/7 fault uniform of g+/g-.
// max / min / clamp below propagate NaN (a NaN weight or max|W| gives NaN, like torch.clamp), and a
// negative or NaN severity (reachable only through an unchecked sigmas tensor) poisons the sample with
// NaN, as the Gaussian's make_state_band does. Every x·y + z is written madd(x, y, z) (rounded product,
// then rounded sum) so that nvcc cannot contract it into an FMA the CPU and PyTorch do not use.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "nft_cuda/macros.h"
#include "nft_cuda/normal.h"
#include "nft_cuda/variation.h"

namespace nft_cuda {
namespace device {

// KERNEL_ID of the Python models (nft_cuda/devices); 0 (the bit-sliced Gaussian) has its own ops.
enum Kind : int { kBitSlicedGaussian = 0, kPcm = 1, kLogNormal = 2, kStuckAt = 3 };

constexpr int kDraws = 8;         // draw indices k = 0 .. 7 of the table above
constexpr int kFirstUniform = 6;  // k >= 6: uniforms, else normals
constexpr int kMaxParams = 10;

// Length of the params list of `kind`, or -1 for a kind perturb_device does not serve.
NFT_INLINE constexpr int param_count(int kind) {
  return kind == kPcm ? 10 : (kind == kLogNormal ? 0 : (kind == kStuckAt ? 2 : -1));
}

// The draws [first_draw, end_draw) a model may read; draw_used narrows them to those of one call.
NFT_INLINE constexpr int first_draw(int kind) {
  return kind == kStuckAt ? kFirstUniform : 0;
}
NFT_INLINE constexpr int end_draw(int kind) {
  return kind == kPcm ? 6 : (kind == kLogNormal ? 1 : kDraws);
}

// Kernel arguments, passed by value: the model and its per-call constants (make_args, on the host).
struct Args {
  int kind;
  double g_max;        // G (PCM), 1 (StuckAt)
  double c0, c1, c2;   // PCM programming-noise polynomial
  double drift_scale;  // PCM
  double read_scale;   // PCM
  double drift_base;   // PCM: (t + t0) / t0
  double sqrt_read;    // PCM: sqrt(L), L = ln((t_r + t_read) / (2 t_read)), t_r = t (t + t0 with aihwkit_read)
  bool drift;          // PCM: t > 0 and drift_scale > 0
  bool read;           // PCM: L > 0 and read_scale > 0
  bool aihwkit_read;   // PCM: aihwkit's read step (t + t0 in L, Q_s at the programmed g, g_f clamped at 0)
  double p0, p1;       // StuckAt
};

// params (validated by the op): PCM [t, G, c0, c1, c2, t0, t_read, drift_scale, read_scale, aihwkit_read];
// LogNormal []; StuckAt [p0, p1]. Host only: both launchers evaluate the constants with the host libm.
inline Args make_args(int kind, const double* p) {
  Args a{};
  a.kind = kind;
  a.g_max = 1.0;
  if (kind == kPcm) {
    const double t = p[0], t0 = p[5], t_read = p[6];
    a.g_max = p[1];
    a.c0 = p[2];
    a.c1 = p[3];
    a.c2 = p[4];
    a.drift_scale = p[7];
    a.read_scale = p[8];
    a.drift = t > 0.0 && a.drift_scale > 0.0;
    a.drift_base = (t + t0) / t0;
    a.aihwkit_read = p[9] != 0.0;
    const double t_r = a.aihwkit_read ? t + t0 : t;
    const double log_read = std::log((t_r + t_read) / (2.0 * t_read));
    a.read = log_read > 0.0 && a.read_scale > 0.0;
    a.sqrt_read = a.read ? std::sqrt(log_read) : 0.0;
  } else if (kind == kStuckAt) {
    a.p0 = p[0];
    a.p1 = p[1];
  }
  return a;
}

NFT_INLINE double madd(double x, double y, double z) {
  return add_rn(mul_rn(x, y), z);
}

NFT_INLINE double max_nan(double x, double lo) {
  return x < lo ? lo : x;
}
NFT_INLINE double min_nan(double x, double hi) {
  return x > hi ? hi : x;
}
NFT_INLINE double clamp_nan(double x, double lo, double hi) {
  return min_nan(max_nan(x, lo), hi);
}

// Whether draw k is read with these arguments: PCM reads its drift draws (2, 3) only when drift is
// on and its read-noise draws (4, 5) only when read noise is on (skipping a draw changes no other).
NFT_INLINE bool draw_used(const Args& a, int k) {
  if (a.kind == kPcm && (k == 2 || k == 3))
    return a.drift;
  if (a.kind == kPcm && (k == 4 || k == 5))
    return a.read;
  return true;
}

// Per-sample constants: the severity s and StuckAt's effective probabilities
// p0' = min(s·p0, 1), p1' = min(s·p1, 1 - p0').
struct Sample {
  double s;
  double p0, p1;
};

NFT_INLINE Sample make_sample(const Args& a, float sigma) {
  Sample smp;
  smp.s = sigma >= 0.0f ? static_cast<double>(sigma) : NAN;
  smp.p0 = min_nan(smp.s * a.p0, 1.0);
  smp.p1 = min_nan(smp.s * a.p1, 1.0 - smp.p0);
  return smp;
}

// PCM: the conductance read at time t of a device programmed to g (docs/device-models.md).
NFT_INLINE double pcm_conductance(const Args& a, double s, double g, float z_prog, float z_nu, float z_read) {
  const double r = g / a.g_max;
  const double sigma_p = s * madd(a.c2, r * r, madd(a.c1, r, a.c0));
  const double g_prog = max_nan(madd(sigma_p, static_cast<double>(z_prog), g), 0.0);
  double gd = g_prog;
  if (a.drift) {
    const double log_r = log(max_nan(r, 1e-7));
    const double mu = clamp_nan(madd(-0.0155, log_r, 0.0244), 0.049, 0.1);
    const double sd = clamp_nan(madd(-0.0125, log_r, -0.0059), 0.008, 0.045);
    const double nu = a.drift_scale * fabs(madd(sd, static_cast<double>(z_nu), mu));
    gd = gd * pow(a.drift_base, -nu);
  }
  if (a.read) {
    const double r_q = a.aihwkit_read ? g_prog / a.g_max : r;  // aihwkit: Q_s of the programmed device
    const double q_s = min_nan(0.0088 / max_nan(pow(r_q, 0.65), 1e-3), 0.2);
    gd = madd(((a.read_scale * fabs(gd)) * q_s) * a.sqrt_read, static_cast<double>(z_read), gd);
  }
  return a.aihwkit_read ? max_nan(gd, 0.0) : gd;
}

// StuckAt: stuck at g_min = 0 when u < p0', at g_max when p0' <= u < p0' + p1', else g.
NFT_INLINE double stuck_conductance(const Sample& smp, double g_max, double g, float u) {
  const double uu = static_cast<double>(u);
  return uu < smp.p0 ? 0.0 : (uu < smp.p0 + smp.p1 ? g_max : g);
}

// The perturbed weight (double, before the one rounding to the weight's dtype) of a weight w,
// m = max|W|, and d[k] = draw k of this element (only the model's draws are read).
NFT_INLINE double perturb_element(const Args& a, const Sample& smp, double w, double m, const float* d) {
  if (!(smp.s >= 0.0))
    return NAN;
  if (m == 0.0)
    return w;
  if (a.kind == kLogNormal)
    return w * exp(smp.s * static_cast<double>(d[0]));
  const double gp = (a.g_max * max_nan(w, 0.0)) / m;
  const double gn = (a.g_max * max_nan(-w, 0.0)) / m;
  double fp, fn;
  if (a.kind == kPcm) {
    fp = pcm_conductance(a, smp.s, gp, d[0], d[2], d[4]);
    fn = pcm_conductance(a, smp.s, gn, d[1], d[3], d[5]);
  } else {
    fp = stuck_conductance(smp, a.g_max, gp, d[6]);
    fn = stuck_conductance(smp, a.g_max, gn, d[7]);
  }
  const double delta = (fp - gp) - (fn - gn);
  return delta == 0.0 ? w : add_rn(w, (delta * m) / a.g_max);
}

// Calls f(std::integral_constant<int, kind>{}) for the kinds perturb_device serves (host only; the
// CUDA kernel is instantiated per kind so that its draw loops unroll into registers).
template <typename F>
inline auto dispatch_kind(int kind, F&& f) {
  switch (kind) {
    case kPcm:
      return f(std::integral_constant<int, kPcm>{});
    case kLogNormal:
      return f(std::integral_constant<int, kLogNormal>{});
    default:
      return f(std::integral_constant<int, kStuckAt>{});
  }
}

// All draws of model kKind for the block of elements 4q .. 4q+3 in `stream`: d[l][k] = draw k of lane l
// (each Philox block generated once).
struct BlockDraws {
  float d[4][kDraws];
};

template <int kKind>
NFT_INLINE void draw_block(const Args& a, uint64_t seed, uint64_t stream, uint64_t q, BlockDraws& out) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = first_draw(kKind); k < end_draw(kKind); ++k) {
    if (!draw_used(a, k))
      continue;
    if (k >= kFirstUniform) {
      const Uniform4 u = uniform4_draw(seed, stream, q, k);
      for (int l = 0; l < 4; ++l)
        out.d[l][k] = u.u[l];
    } else {
      const Normal4 z = normal4_draw(seed, stream, q, k);
      for (int l = 0; l < 4; ++l)
        out.d[l][k] = z.z[l];
    }
  }
}

}  // namespace device
}  // namespace nft_cuda
