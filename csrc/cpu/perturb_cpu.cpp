// CPU kernel of perturb (DESIGN §4.1): W_noisy[t] = W + sigma_w * z_t for every sample t.
//
// max|W| is reduced here (in float32, NaN-propagating, like torch.amax), then one parallel sweep
// reads each chunk of weights once and writes all S samples from it. The per-element math
// (Philox, Box–Muller, sigma_w) comes from include/nft_cuda, shared with the CUDA kernel; the
// normals come 16 (AVX-512F) or 8 (AVX2+FMA) Philox blocks at a time from cpu_simd.h when the
// CPU has it (same words, normals within the §3 tolerance), else from normal4(); for float32 the
// add and max|W| are vectorised there too (results identical to the scalar code given the normals).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_simd.h"
#include "max_abs_cpu.h"
#include "nft_cuda/normal.h"
#include "nft_cuda/variation.h"
#include "op_checks.h"

namespace nft_cuda {
namespace {

// Blocks of four elements per chunk: the normals of one chunk and sample go to a small buffer
// (L1-resident) and are then added to the chunk's weights; W is read once for all samples.
constexpr int64_t kChunkBlocks = 64;

template <typename scalar_t>
void perturb_cpu_kernel(const scalar_t* w, scalar_t* out, int64_t n, const std::vector<StateBand>& bands, uint64_t seed,
                        uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t samples = static_cast<int64_t>(bands.size());
  const int64_t nq = (n + 3) / 4;
  const cpu::NormalsFn normals = cpu::select_normals();  // SIMD or scalar, same noise (cpu_simd.h)
  const cpu::PerturbF32Fn perturb_f32 = cpu::select_f32_kernels().perturb;
  at::parallel_for(0, nq, 1024, [&](int64_t begin, int64_t end) {
    alignas(64) float z[4 * kChunkBlocks];
    for (int64_t q0 = begin; q0 < end; q0 += kChunkBlocks) {
      const int64_t blocks = std::min<int64_t>(kChunkBlocks, end - q0);
      const int64_t base = 4 * q0;
      const int64_t count = std::min<int64_t>(4 * blocks, n - base);
      const scalar_t* wc = w + base;
      for (int64_t t = 0; t < samples; ++t) {
        const StateBand band = bands[t];
        normals(seed, offset + static_cast<uint64_t>(t), static_cast<uint64_t>(q0), blocks, z);
        scalar_t* o = out + t * n + base;
        if constexpr (std::is_same_v<scalar_t, float>) {
          perturb_f32(wc, o, z, count, band.t_lo, band.t_hi, band.sigma_base, band.sigma_in);
        } else {
          for (int64_t i = 0; i < count; ++i) {
            const acc_t wv = static_cast<acc_t>(wc[i]);
            const float aw = std::fabs(static_cast<float>(wc[i]));
            o[i] = static_cast<scalar_t>(add_noise<acc_t>(wv, sigma_w(band, aw), z[i]));
          }
        }
      }
    }
  });
}

at::Tensor perturb_cpu(const at::Tensor& weight, const at::Tensor& rng, const at::Tensor& sigmas, double scale,
                       double state_factor) {
  check_weight(weight, "perturb");
  check_noise_args(rng, sigmas, weight, "perturb");
  const PerturbCall c(weight, rng, sigmas);
  if (c.empty())
    return c.out;
  const int64_t* r = c.rng.const_data_ptr<int64_t>();
  const uint64_t seed = static_cast<uint64_t>(r[0]);
  const uint64_t offset = static_cast<uint64_t>(r[1]);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.w.scalar_type(), "perturb_cpu", [&] {
    const scalar_t* wp = c.w.const_data_ptr<scalar_t>();
    const float m = cpu::max_abs_cpu(wp, c.n);
    std::vector<StateBand> bands(c.samples);
    const float* sp = c.sig.const_data_ptr<float>();
    for (int64_t t = 0; t < c.samples; ++t) {
      bands[t] = make_state_band(sp[t], m, static_cast<float>(scale), static_cast<float>(state_factor));
    }
    perturb_cpu_kernel(wp, c.out.mutable_data_ptr<scalar_t>(), c.n, bands, seed, offset);
  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CPU, m) {
  m.impl("perturb", &perturb_cpu);
}

}  // namespace nft_cuda
