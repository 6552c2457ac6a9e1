// CUDA kernel of perturb (DESIGN §4.1): W_noisy[t] = W + sigma_w * z_t for every sample t.
//
// Two launches on the current stream, no host synchronisation:
//   1. max|W| in float32 (NaN-propagating) into a 4-byte device buffer via atomicMax on the bit
//      pattern (non-negative floats order like their unsigned bits; NaN sorts above +inf);
//   2. a grid-stride sweep: each thread loads four weights once and writes all S samples.
// sigma_d per sample, (seed, offset) and max|W| are read on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "launch_utils.cuh"
#include "max_abs.cuh"
#include "nft_cuda/normal.h"
#include "nft_cuda/variation.h"
#include "op_checks.h"

namespace nft_cuda {
namespace {

template <typename scalar_t>
__global__ void perturb_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, int64_t n,
                               int64_t samples, const int64_t* __restrict__ rng,
                               const float* __restrict__ sigmas, const unsigned int* __restrict__ max_bits,
                               float scale, float state_factor) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const float m = __uint_as_float(*max_bits);
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
        wv[l] = static_cast<acc_t>(w[base + l]);
        aw[l] = fabsf(static_cast<float>(w[base + l]));
      }
    }
    for (int64_t t = 0; t < samples; ++t) {
      const StateBand band = make_state_band(sigmas[t], m, scale, state_factor);
      const Normal4 z = normal4(seed, offset + static_cast<uint64_t>(t), static_cast<uint64_t>(q));
      scalar_t* o = out + t * n + base;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (l < count) o[l] = static_cast<scalar_t>(add_noise<acc_t>(wv[l], sigma_w(band, aw[l]), z.z[l]));
      }
    }
  }
}

at::Tensor perturb_cuda(const at::Tensor& weight, const at::Tensor& rng, const at::Tensor& sigmas,
                        double scale, double state_factor) {
  check_weight(weight, "perturb");
  check_rng(rng, weight, "perturb");
  check_sigmas(sigmas, weight, "perturb");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor sig = sigmas.contiguous();
  const at::Tensor r = rng.contiguous();
  const int64_t samples = sig.numel();
  const int64_t n = w.numel();

  std::vector<int64_t> out_shape{samples};
  out_shape.insert(out_shape.end(), w.sizes().begin(), w.sizes().end());
  at::Tensor out = at::empty(out_shape, w.options());
  if (n == 0 || samples == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor max_bits = at::empty({1}, w.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(max_bits.mutable_data_ptr(), 0, sizeof(unsigned int), stream));
  auto* max_ptr = static_cast<unsigned int*>(max_bits.mutable_data_ptr());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "perturb_cuda", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    max_abs_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(wp, n, max_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    perturb_kernel<scalar_t><<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(
        wp, out.mutable_data_ptr<scalar_t>(), n, samples, r.const_data_ptr<int64_t>(),
        sig.const_data_ptr<float>(), max_ptr, static_cast<float>(scale), static_cast<float>(state_factor));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CUDA, m) {
  m.impl("perturb", &perturb_cuda);
}

}  // namespace nft_cuda
