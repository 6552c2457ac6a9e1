// CUDA kernels of the raw-RNG ops: philox4x32 (checking API) and philox_normal (DESIGN §3).
// Same per-element math as csrc/cpu/rng_cpu.cpp, from include/nft_cuda.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.cuh"
#include "rng_kernels.cuh"
#include "op_checks.h"

namespace nft_cuda {
namespace {

at::Tensor philox4x32_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_counter_key(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options());
  const int64_t rows = c.numel() / 4;
  if (rows == 0)
    return out;
  philox4x32_kernel<<<grid_for(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.const_data_ptr<int64_t>(), k.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox_normal_cuda(const at::Tensor& rng, int64_t numel, int64_t streams) {
  check_normal_args(rng, numel, streams);
  const c10::cuda::CUDAGuard guard(rng.device());
  const at::Tensor r = rng.contiguous();
  at::Tensor out = at::empty({streams, numel}, rng.options().dtype(at::kFloat));
  if (numel == 0)
    return out;
  const dim3 grid(grid_for((numel + 3) / 4), static_cast<unsigned int>(streams < 65535 ? streams : 65535));
  philox_normal_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(), numel, streams);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CUDA, m) {
  m.impl("philox4x32", &philox4x32_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
}

}  // namespace nft_cuda
