// CUDA launcher of perturb_device (issue 16): max|W| (max_abs.cuh), then the grid-stride kernel of
// perturb_device_kernel.cuh, both on the current stream with no host synchronisation. The model's
// per-call constants (device::make_args) are evaluated here on the host, as the CPU kernel does.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.cuh"
#include "max_abs.cuh"
#include "op_checks.h"
#include "perturb_device_kernel.cuh"

namespace nft_cuda {
namespace {

at::Tensor perturb_device_cuda(const at::Tensor& weight, const at::Tensor& rng, const at::Tensor& sigmas, int64_t kind,
                               c10::ArrayRef<double> params) {
  check_weight(weight, "perturb_device");
  check_noise_args(rng, sigmas, weight, "perturb_device");
  check_device_model(kind, params, weight.numel());
  const c10::cuda::CUDAGuard guard(weight.device());
  const PerturbCall c(weight, rng, sigmas);
  if (c.empty())
    return c.out;

  const device::Args args = device::make_args(static_cast<int>(kind), params.data());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor max_bits = at::empty({1}, c.w.options().dtype(at::kInt));
  auto* max_ptr = static_cast<unsigned int*>(max_bits.mutable_data_ptr());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.w.scalar_type(), "perturb_device_cuda", [&] {
    const scalar_t* wp = c.w.const_data_ptr<scalar_t>();
    launch_max_abs<scalar_t>(wp, c.n, max_ptr, stream);
    device::dispatch_kind(args.kind, [&](auto kind) {
      perturb_device_kernel<scalar_t, decltype(kind)::value><<<grid_for((c.n + 3) / 4), kThreads, 0, stream>>>(
          wp, c.out.mutable_data_ptr<scalar_t>(), c.n, c.samples, c.rng.const_data_ptr<int64_t>(),
          c.sig.const_data_ptr<float>(), max_ptr, args);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CUDA, m) {
  m.impl("perturb_device", &perturb_device_cuda);
}

}  // namespace nft_cuda
