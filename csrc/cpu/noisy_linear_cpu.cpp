// CPU kernels of the variation-sampled matmul (DESIGN §4.2) and the snapshot capture (§4.3, pool then
// the same matmul): perturb into a temporary (the C++
// perturb kernel, same noise as every backend) then ATen's GEMM. The temporary lives only inside
// the call; backward regenerates it from rng.
#include <torch/library.h>

#include "noisy_linear.h"

namespace nft_cuda {
namespace {

at::Tensor noisy_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& rng, const at::Tensor& sigmas, double scale, double state_factor,
                            bool shared_input, bool /*allow_tf32*/) {
  return noisy_linear_materialized(x, weight, bias, rng, sigmas, scale, state_factor, shared_input);
}

at::Tensor noisy_linear_backward_input_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& rng,
                                           const at::Tensor& sigmas, double scale, double state_factor,
                                           bool shared_input, bool /*allow_tf32*/) {
  return noisy_linear_backward_input_materialized(grad, weight, rng, sigmas, scale, state_factor, shared_input);
}

at::Tensor snapshot_linear_cpu(const at::Tensor& act, int64_t pool, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& rng, const at::Tensor& sigmas,
                               double scale, double state_factor, bool shared_input, bool /*allow_tf32*/) {
  return snapshot_linear_materialized(act, pool, weight, bias, rng, sigmas, scale, state_factor, shared_input);
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CPU, m) {
  m.impl("noisy_linear", &noisy_linear_cpu);
  m.impl("_noisy_linear_backward_input", &noisy_linear_backward_input_cpu);
  m.impl("snapshot_linear", &snapshot_linear_cpu);
}

}  // namespace nft_cuda
