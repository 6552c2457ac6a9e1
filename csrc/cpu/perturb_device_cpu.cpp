// CPU kernel of perturb_device (issue 16): the device models' noisy weight W'[t] for every sample t.
//
// Same structure as perturb_cpu.cpp: max|W| once, then one parallel sweep over chunks of Philox
// blocks; for each chunk and sample, each draw k the model reads is generated once per block into a
// small (L1-resident) buffer — normals in float64 rounded to float32 (normal4_f64: the reference's
// bits, scalar code), uniforms from the raw words — and the per-element function of
// include/nft_cuda/device_models.h (shared with the CUDA kernel) combines them.
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "max_abs_cpu.h"
#include "nft_cuda/device_models.h"
#include "op_checks.h"

namespace nft_cuda {
namespace {

constexpr int64_t kChunkBlocks = 64;

// draws[k][i] for the 4 * blocks elements of the chunk starting at block q0, for the model's draws k.
void chunk_draws(const device::Args& args, uint64_t seed, uint64_t stream, uint64_t q0, int64_t blocks,
                 float (*draws)[4 * kChunkBlocks]) {
  for (int k = device::first_draw(args.kind); k < device::end_draw(args.kind); ++k) {
    if (!device::draw_used(args, k))
      continue;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint64_t q = q0 + static_cast<uint64_t>(b);
      if (k < device::kFirstUniform) {
        const Normal4 z = normal4_draw(seed, stream, q, k);
        std::copy(z.z, z.z + 4, draws[k] + 4 * b);
      } else {
        const Uniform4 u = uniform4_draw(seed, stream, q, k);
        std::copy(u.u, u.u + 4, draws[k] + 4 * b);
      }
    }
  }
}

template <typename scalar_t>
void perturb_device_cpu_kernel(const scalar_t* w, scalar_t* out, int64_t n, const float* sigmas, int64_t samples,
                               const device::Args& args, float max_abs, uint64_t seed, uint64_t offset) {
  const int64_t nq = (n + 3) / 4;
  const int first = device::first_draw(args.kind), end = device::end_draw(args.kind);
  const double m = static_cast<double>(max_abs);
  at::parallel_for(0, nq, 256, [&](int64_t begin, int64_t stop) {
    alignas(64) float draws[device::kDraws][4 * kChunkBlocks];
    for (int64_t q0 = begin; q0 < stop; q0 += kChunkBlocks) {
      const int64_t blocks = std::min<int64_t>(kChunkBlocks, stop - q0);
      const int64_t base = 4 * q0;
      const int64_t count = std::min<int64_t>(4 * blocks, n - base);
      for (int64_t t = 0; t < samples; ++t) {
        const device::Sample smp = device::make_sample(args, sigmas[t]);
        chunk_draws(args, seed, offset + static_cast<uint64_t>(t), static_cast<uint64_t>(q0), blocks, draws);
        scalar_t* o = out + t * n + base;
        for (int64_t i = 0; i < count; ++i) {
          float d[device::kDraws] = {};  // draws this call does not use stay 0 (never read)
          for (int k = first; k < end; ++k) {
            if (device::draw_used(args, k))
              d[k] = draws[k][i];
          }
          o[i] = static_cast<scalar_t>(device::perturb_element(args, smp, static_cast<double>(w[base + i]), m, d));
        }
      }
    }
  });
}

at::Tensor perturb_device_cpu(const at::Tensor& weight, const at::Tensor& rng, const at::Tensor& sigmas, int64_t kind,
                              c10::ArrayRef<double> params) {
  check_weight(weight, "perturb_device");
  check_noise_args(rng, sigmas, weight, "perturb_device");
  check_device_model(kind, params, weight.numel());
  const PerturbCall c(weight, rng, sigmas);
  if (c.empty())
    return c.out;

  const int64_t* r = c.rng.const_data_ptr<int64_t>();
  const device::Args args = device::make_args(static_cast<int>(kind), params.data());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.w.scalar_type(), "perturb_device_cpu", [&] {
    const scalar_t* wp = c.w.const_data_ptr<scalar_t>();
    perturb_device_cpu_kernel(wp, c.out.mutable_data_ptr<scalar_t>(), c.n, c.sig.const_data_ptr<float>(), c.samples,
                              args, cpu::max_abs_cpu(wp, c.n), static_cast<uint64_t>(r[0]),
                              static_cast<uint64_t>(r[1]));
  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CPU, m) {
  m.impl("perturb_device", &perturb_device_cpu);
}

}  // namespace nft_cuda
