// Argument checks (and the perturb output shape) shared by the CPU and CUDA launchers (host only; uses ATen).
//
// User-facing preconditions use TORCH_CHECK_TYPE / TORCH_CHECK_VALUE so they surface in Python as
// TypeError / ValueError naming the argument (DESIGN §4). The Python wrappers in nft_cuda/ops.py
// check first with friendlier messages; these guard direct torch.ops callers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "nft_cuda/device_models.h"

namespace nft_cuda {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK_TYPE(is_supported_float(weight.scalar_type()), op,
                   ": weight must be float32, float64, float16 or bfloat16, got ", weight.scalar_type());
}

inline void check_rng(const at::Tensor& rng, const at::Tensor& like, const char* op) {
  TORCH_CHECK_TYPE(rng.scalar_type() == at::kLong, op, ": rng must be an int64 tensor, got ", rng.scalar_type());
  TORCH_CHECK_VALUE(rng.dim() == 1 && rng.numel() == 2, op, ": rng must have shape [2] holding (seed, offset), got ",
                    rng.sizes());
  TORCH_CHECK_VALUE(rng.device() == like.device(), op, ": rng is on ", rng.device(), " but weight is on ",
                    like.device());
}

inline void check_sigmas(const at::Tensor& sigmas, const at::Tensor& like, const char* op) {
  TORCH_CHECK_TYPE(sigmas.scalar_type() == at::kFloat, op, ": sigmas must be float32, got ", sigmas.scalar_type());
  TORCH_CHECK_VALUE(sigmas.dim() == 1, op, ": sigmas must be 1-D (one sigma_d per sample), got ", sigmas.sizes());
  TORCH_CHECK_VALUE(sigmas.device() == like.device(), op, ": sigmas is on ", sigmas.device(), " but weight is on ",
                    like.device());
}

// The noise arguments every noisy op takes: the stream (rng) and the per-sample sigmas.
inline void check_noise_args(const at::Tensor& rng, const at::Tensor& sigmas, const at::Tensor& weight,
                             const char* op) {
  check_rng(rng, weight, op);
  check_sigmas(sigmas, weight, op);
}

// A float activation-like input (x, grad, act) that must live beside the weight.
inline void check_float_input(const at::Tensor& t, const char* name, const at::Tensor& weight, const char* op) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == weight.device(), op, ": ", name, " is on ", t.device(), " but weight is on ",
                    weight.device());
}

// perturb's output: one copy of the weight per sample, [samples, *weight.shape].
inline std::vector<int64_t> per_sample_shape(const at::Tensor& weight, int64_t samples) {
  std::vector<int64_t> shape{samples};
  shape.insert(shape.end(), weight.sizes().begin(), weight.sizes().end());
  return shape;
}

// The prepared call of a perturb-like op (perturb and perturb_device, CPU and CUDA launchers alike):
// contiguous weight, sigmas and rng, and the output [samples, *weight.shape]. On CUDA it is built under
// the device guard, so the copies and the output land on the weight's device.
struct PerturbCall {
  at::Tensor w, sig, rng, out;
  int64_t samples, n;

  PerturbCall(const at::Tensor& weight, const at::Tensor& rng_in, const at::Tensor& sigmas)
      : w(weight.contiguous()), sig(sigmas.contiguous()), rng(rng_in.contiguous()), samples(sig.numel()), n(w.numel()) {
    out = at::empty(per_sample_shape(w, samples), w.options());
  }

  bool empty() const { return n == 0 || samples == 0; }
};

// perturb_device's model arguments (docs/device-models.md) and its element limit: the multi-draw
// counter layout (philox.h) holds elements e < 2^58.
inline void check_device_model(int64_t kind, c10::ArrayRef<double> params, int64_t numel) {
  const char* op = "perturb_device";
  TORCH_CHECK_VALUE(kind == device::kPcm || kind == device::kLogNormal || kind == device::kStuckAt, op,
                    ": kind must be 1 (PCM), 2 (LogNormal) or 3 (StuckAt), got ", kind,
                    kind == device::kBitSlicedGaussian ? " (the bit-sliced Gaussian runs on perturb)" : "");
  const int64_t want = device::param_count(static_cast<int>(kind));
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == want, op, ": kind ", kind, " takes ", want, " params, got ",
                    params.size());
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_VALUE(std::isfinite(params[i]), op, ": params[", i, "] must be finite, got ", params[i]);
  if (kind == device::kPcm) {
    TORCH_CHECK_VALUE(params[0] >= 0.0, op, ": PCM time t must be >= 0 seconds, got ", params[0]);
    TORCH_CHECK_VALUE(params[1] > 0.0 && params[5] > 0.0 && params[6] > 0.0, op,
                      ": PCM g_max, t0 and t_read must be > 0, got ", params[1], ", ", params[5], ", ", params[6]);
    TORCH_CHECK_VALUE(params[7] >= 0.0 && params[8] >= 0.0, op, ": PCM drift_scale and read_scale must be >= 0, got ",
                      params[7], ", ", params[8]);
    TORCH_CHECK_VALUE(params[9] == 0.0 || params[9] == 1.0, op, ": PCM aihwkit_read must be 0 or 1, got ", params[9]);
  } else if (kind == device::kStuckAt) {
    TORCH_CHECK_VALUE(params[0] >= 0.0 && params[0] <= 1.0 && params[1] >= 0.0 && params[1] <= 1.0, op,
                      ": StuckAt probabilities p0, p1 must lie in [0, 1], got ", params[0], ", ", params[1]);
    TORCH_CHECK_VALUE(params[0] + params[1] <= 1.0, op, ": StuckAt p0 + p1 must be <= 1, got ", params[0], " + ",
                      params[1]);
  }
  TORCH_CHECK_VALUE(static_cast<uint64_t>(numel) <= kMaxDrawElements, op, ": weight has ", numel,
                    " elements; the device models' noise stream holds at most 2^58");
}

inline void check_counter_key(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK_TYPE(counter.scalar_type() == at::kLong, "philox4x32: counter must be int64, got ",
                   counter.scalar_type());
  TORCH_CHECK_TYPE(key.scalar_type() == at::kLong, "philox4x32: key must be int64, got ", key.scalar_type());
  TORCH_CHECK_VALUE(counter.dim() >= 1 && counter.size(-1) == 4, "philox4x32: counter must have shape [..., 4], got ",
                    counter.sizes());
  TORCH_CHECK_VALUE(key.dim() == 1 && key.numel() == 2, "philox4x32: key must have shape [2], got ", key.sizes());
  TORCH_CHECK_VALUE(counter.device() == key.device(), "philox4x32: counter is on ", counter.device(), " but key is on ",
                    key.device());
}

inline void check_normal_args(const at::Tensor& rng, int64_t numel, int64_t streams) {
  check_rng(rng, rng, "philox_normal");
  TORCH_CHECK_VALUE(numel >= 0, "philox_normal: numel must be >= 0, got ", numel);
  TORCH_CHECK_VALUE(streams >= 1, "philox_normal: streams must be >= 1, got ", streams);
}

}  // namespace nft_cuda
