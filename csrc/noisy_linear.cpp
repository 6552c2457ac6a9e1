// Host side of the variation-sampled matmul shared by the CPU and CUDA kernels (see noisy_linear.h).
#include "noisy_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/adaptive_avg_pool2d.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>

#include "op_checks.h"

namespace nft_cuda {
namespace {

int64_t prod(at::IntArrayRef sizes, size_t begin, size_t end) {
  int64_t p = 1;
  for (size_t i = begin; i < end; ++i)
    p *= sizes[i];
  return p;
}

at::Tensor call_perturb(const at::Tensor& weight, const at::Tensor& rng, const at::Tensor& sigmas, double scale,
                        double state_factor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nft_cuda::perturb", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(weight, rng, sigmas, scale, state_factor);
}

void check_weight_2d(const at::Tensor& weight, const char* op) {
  check_weight(weight, op);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got ", weight.sizes());
}

// bias: [N] float on the weight's device, or absent.
// The checks every linear op starts with: a 2-D weight, the noise arguments and a float input
// (named `name` in messages) on the weight's device.
void check_linear_args(const at::Tensor& input, const char* name, const at::Tensor& weight, const at::Tensor& rng,
                       const at::Tensor& sigmas, const char* op) {
  check_weight_2d(weight, op);
  check_noise_args(rng, sigmas, weight, op);
  check_float_input(input, name, weight, op);
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& weight, const char* op) {
  if (!bias.has_value())
    return;
  const int64_t n = weight.size(0);
  TORCH_CHECK_TYPE(is_supported_float(bias->scalar_type()), op, ": bias must be a float tensor, got ",
                   bias->scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape [", n, "], got ",
                    bias->sizes());
  TORCH_CHECK_VALUE(bias->device() == weight.device(), op, ": bias is on ", bias->device(), " but weight is on ",
                    weight.device());
}

}  // namespace

LinearDims check_noisy_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& rng, const at::Tensor& sigmas, bool shared_input) {
  const char* op = "noisy_linear";
  check_linear_args(x, "x", weight, rng, sigmas, op);
  const int64_t samples = sigmas.numel();
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= (shared_input ? 1 : 2), op, ": x must be ",
                    shared_input ? "[..., in_features]" : "[samples, ..., in_features]", ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == k, op, ": x has ", x.size(-1), " features but weight expects ", k);
  if (!shared_input) {
    TORCH_CHECK_VALUE(x.size(0) == samples, op, ": with shared_input=False x must have samples=", samples,
                      " leading rows, got shape ", x.sizes());
  }
  check_bias(bias, weight, op);
  const auto xs = x.sizes();
  const int64_t m = prod(xs, shared_input ? 0 : 1, xs.size() - 1);
  return {samples, m, n, k};
}

LinearDims check_noisy_linear_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& rng,
                                       const at::Tensor& sigmas) {
  const char* op = "_noisy_linear_backward_input";
  check_linear_args(grad, "grad", weight, rng, sigmas, op);
  const int64_t samples = sigmas.numel();
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK_VALUE(grad.dim() >= 2 && grad.size(0) == samples && grad.size(-1) == n, op,
                    ": grad must have shape [samples=", samples, ", ..., ", n, "], got ", grad.sizes());
  const auto gs = grad.sizes();
  return {samples, prod(gs, 1, gs.size() - 1), n, k};
}

std::vector<int64_t> noisy_linear_out_shape(const at::Tensor& x, int64_t n, int64_t samples, bool shared_input) {
  std::vector<int64_t> shape;
  if (shared_input)
    shape.push_back(samples);
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n);
  return shape;
}

std::vector<int64_t> noisy_linear_grad_input_shape(const at::Tensor& grad, int64_t k, bool shared_input) {
  std::vector<int64_t> shape(grad.sizes().begin() + (shared_input ? 1 : 0), grad.sizes().end() - 1);
  shape.push_back(k);
  return shape;
}

at::Tensor noisy_linear_materialized(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& rng,
                                     const at::Tensor& sigmas, double scale, double state_factor, bool shared_input) {
  const LinearDims d = check_noisy_linear(x, weight, bias, rng, sigmas, shared_input);
  // The nested perturb/GEMM calls are an implementation detail of this kernel: no autograd here.
  const at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor wn = call_perturb(weight, rng, sigmas, scale, state_factor);  // [S, N, K], weight dtype
  if (wn.scalar_type() != x.scalar_type())
    wn = wn.to(x.scalar_type());
  const at::Tensor wt = wn.transpose(1, 2);                              // [S, K, N]
  at::Tensor out = shared_input ? at::matmul(x.reshape({d.m, d.k}), wt)  // [S, M, N] (broadcast)
                                : at::bmm(x.reshape({d.samples, d.m, d.k}), wt);
  if (bias.has_value())
    out.add_(bias->to(x.scalar_type()));
  return out.reshape(noisy_linear_out_shape(x, d.n, d.samples, shared_input));
}

at::Tensor noisy_linear_backward_input_materialized(const at::Tensor& grad, const at::Tensor& weight,
                                                    const at::Tensor& rng, const at::Tensor& sigmas, double scale,
                                                    double state_factor, bool shared_input) {
  const LinearDims d = check_noisy_linear_backward(grad, weight, rng, sigmas);
  const at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor wn = call_perturb(weight, rng, sigmas, scale, state_factor);
  if (wn.scalar_type() != grad.scalar_type())
    wn = wn.to(grad.scalar_type());
  at::Tensor dx = at::bmm(grad.reshape({d.samples, d.m, d.n}), wn);  // [S, M, K]
  if (shared_input)
    dx = at::sum(dx, {0});
  return dx.reshape(noisy_linear_grad_input_shape(grad, d.k, shared_input));
}

SnapshotDims check_snapshot_linear(const at::Tensor& act, int64_t pool, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& rng,
                                   const at::Tensor& sigmas, bool shared_input) {
  const char* op = "snapshot_linear";
  check_linear_args(act, "act", weight, rng, sigmas, op);
  TORCH_CHECK_VALUE(act.dim() == (shared_input ? 4 : 5), op, ": act must be ",
                    shared_input ? "[B, C, H, W]" : "[samples, B, C, H, W]", ", got ", act.sizes());
  TORCH_CHECK_VALUE(pool >= 1, op, ": pool must be >= 1, got ", pool);
  const int64_t samples = sigmas.numel();
  if (!shared_input) {
    TORCH_CHECK_VALUE(act.size(0) == samples, op, ": with shared_input=False act must have samples=", samples,
                      " leading rows, got shape ", act.sizes());
  }
  const int64_t c = act.size(-3), h = act.size(-2), w = act.size(-1);
  TORCH_CHECK_VALUE(h >= 1 && w >= 1, op, ": act must have non-empty spatial dims, got ", act.sizes());
  TORCH_CHECK_VALUE(c * pool * pool == weight.size(1), op, ": the snapshot has C*pool*pool = ", c * pool * pool,
                    " in_features but weight expects ", weight.size(1));
  const int64_t n = weight.size(0);
  check_bias(bias, weight, op);
  return {samples, act.size(-4), c, h, w, pool, n};
}

at::Tensor pool_snapshot(const at::Tensor& act, int64_t pool) {
  const int64_t c = act.size(-3), h = act.size(-2), w = act.size(-1);
  const auto sizes = act.sizes();
  const int64_t lead = prod(sizes, 0, sizes.size() - 3);
  const at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor pooled = at::adaptive_avg_pool2d(act.reshape({lead, c, h, w}), {pool, pool});
  std::vector<int64_t> shape(sizes.begin(), sizes.end() - 3);
  shape.push_back(c * pool * pool);
  return pooled.reshape(shape);
}

at::Tensor snapshot_linear_materialized(const at::Tensor& act, int64_t pool, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& rng,
                                        const at::Tensor& sigmas, double scale, double state_factor,
                                        bool shared_input) {
  check_snapshot_linear(act, pool, weight, bias, rng, sigmas, shared_input);
  return noisy_linear_materialized(pool_snapshot(act, pool), weight, bias, rng, sigmas, scale, state_factor,
                                   shared_input);
}

}  // namespace nft_cuda
