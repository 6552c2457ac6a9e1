// CUDA kernel of perturb (DESIGN §4.1): W_noisy[t] = W + sigma_w * z_t for every sample t.
//
// Two launches on the current stream, no host synchronisation:
//   1. max|W| in float32 (NaN-propagating) into a 4-byte device buffer via atomicMax on the bit
//      pattern (non-negative floats order like their unsigned bits; NaN sorts above +inf);
//   2. a grid-stride sweep: each thread loads four weights once and writes all S samples.
// sigma_d per sample, (seed, offset) and max|W| are read on the device.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "launch_utils.cuh"
#include "max_abs.cuh"
#include "perturb_kernel.cuh"
#include "op_checks.h"

namespace nft_cuda {
namespace {

at::Tensor perturb_cuda(const at::Tensor& weight, const at::Tensor& rng, const at::Tensor& sigmas, double scale,
                        double state_factor) {
  check_weight(weight, "perturb");
  check_noise_args(rng, sigmas, weight, "perturb");
  const c10::cuda::CUDAGuard guard(weight.device());
  const PerturbCall c(weight, rng, sigmas);
  if (c.empty())
    return c.out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor max_bits = at::empty({1}, c.w.options().dtype(at::kInt));
  auto* max_ptr = static_cast<unsigned int*>(max_bits.mutable_data_ptr());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.w.scalar_type(), "perturb_cuda", [&] {
    const scalar_t* wp = c.w.const_data_ptr<scalar_t>();
    launch_max_abs<scalar_t>(wp, c.n, max_ptr, stream);
    perturb_kernel<scalar_t><<<grid_for((c.n + 3) / 4), kThreads, 0, stream>>>(
        wp, c.out.mutable_data_ptr<scalar_t>(), c.n, c.samples, c.rng.const_data_ptr<int64_t>(),
        c.sig.const_data_ptr<float>(), max_ptr, static_cast<float>(scale), static_cast<float>(state_factor));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CUDA, m) {
  m.impl("perturb", &perturb_cuda);
}

}  // namespace nft_cuda
