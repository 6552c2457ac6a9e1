// Shared host code of the variation-sampled matmul (DESIGN §4.2) and of the snapshot capture (§4.3):
// argument checks, output shapes
// and the materialised path (perturb into a temporary, then ATen's GEMM) used by the CPU kernel and
// by the CUDA launcher for the dtypes the fused kernel does not cover (exact fp32, float64, ...).
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

namespace nft_cuda {

// Checks the forward arguments; returns (M rows per sample, N, K).
struct LinearDims {
  int64_t samples, m, n, k;
};
LinearDims check_noisy_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& rng, const at::Tensor& sigmas, bool shared_input);
// Checks the backward-input arguments (grad [S, ..., N]); returns (S, M, N, K).
LinearDims check_noisy_linear_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& rng,
                                       const at::Tensor& sigmas);

// [S, *x.shape[:-1], N] (shared) or [*x.shape[:-1], N] (per-sample x [S, ..., K]).
std::vector<int64_t> noisy_linear_out_shape(const at::Tensor& x, int64_t n, int64_t samples, bool shared_input);
// [*grad.shape[1:-1], K] (shared: summed over samples) or [*grad.shape[:-1], K].
std::vector<int64_t> noisy_linear_grad_input_shape(const at::Tensor& grad, int64_t k, bool shared_input);

// out[s] = x(s) · (perturb(weight)[s] cast to x's dtype)ᵀ + bias, via the perturb op and ATen's GEMM.
at::Tensor noisy_linear_materialized(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& rng,
                                     const at::Tensor& sigmas, double scale, double state_factor, bool shared_input);
// dX(s) = grad[s] · perturb(weight)[s]; summed over s when shared_input.
at::Tensor noisy_linear_backward_input_materialized(const at::Tensor& grad, const at::Tensor& weight,
                                                    const at::Tensor& rng, const at::Tensor& sigmas, double scale,
                                                    double state_factor, bool shared_input);

// ---- snapshot capture (DESIGN §4.3) -------------------------------------------------------------
// act [B, C, H, W] (shared_input) or [S, B, C, H, W]; the snapshot is adaptive_avg_pool2d(act, p)
// flattened C-major to [.., B, C·p·p] (PyTorch's window rule: rows floor(i·H/p) .. ceil((i+1)·H/p)).
struct SnapshotDims {
  int64_t samples, batch, c, h, w, pool, n;
};
SnapshotDims check_snapshot_linear(const at::Tensor& act, int64_t pool, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& rng,
                                   const at::Tensor& sigmas, bool shared_input);
// The snapshot itself: [B, C·p·p] or [S, B, C·p·p], act's dtype (ATen's adaptive_avg_pool2d).
at::Tensor pool_snapshot(const at::Tensor& act, int64_t pool);
// out [S, B, N] = noisy_linear_materialized(pool_snapshot(act), ...): the CPU kernel, and the CUDA
// launcher's path for dtypes the fused kernel does not cover.
at::Tensor snapshot_linear_materialized(const at::Tensor& act, int64_t pool, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& rng,
                                        const at::Tensor& sigmas, double scale, double state_factor, bool shared_input);

}  // namespace nft_cuda
