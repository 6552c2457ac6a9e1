// CUDA kernels of the variation-sampled matmul (DESIGN §4.2).
//
// Forward:        out[s][m][n] = Σ_k A_s[m][k] · Wn_s[n][k] + bias[n]   (A_s = x, or x[s] per sample)
// Backward-input: dX[(s)][m][k] = Σ_(s) Σ_n dY_s[m][n] · Wn_s[n][k]      (summed over s for shared x)
// Snapshot:       out[s][b][n] = Σ_r P_s[b][r] · Wn_s[n][r] + bias[n], P_s = flatten(adaptive_avg_pool2d(act_s, p))
//                 computed in the A-tile loads (DESIGN §4.3), never written to global memory;
// where Wn_s = perturb(W)[s] is generated inside the B-tile loads (noisy_tile.cuh), never written to
// global memory. One tiled GEMM per launch: 64 x 64 output tiles, 32-deep reduction slices, 4 warps,
// mma.sync on tensor cores (bf16 / fp16: m16n8k16; float32 with TF32 allowed: m16n8k8), fp32
// accumulation, bias in the epilogue, every tile edge bounds-checked, 64-bit global indexing.
// grid = (ceil(M/64), ceil(C/64), S x parts) with C the output columns (capped at 65535 in y and z: the
// kernel loops over the rest); the shared-x backward runs the sample loop inside each tile. Small grids
// (fewer than 2 blocks per SM) split each tile's reduction — over K, and over samples for the shared-x
// backward — into `parts` ranges summed by split_reduce_kernel in a fixed order (choose_splits).
//
// max|W| is reduced on the device first (max_abs.cuh) and read by the kernel: no host sync.
// Other dtype combinations (exact fp32, float64, weight dtype neither fp32 nor x's dtype) take the
// materialised path: perturb into a temporary, then cuBLAS (noisy_linear.cpp).
//
// ptxas -v, sm_90 (CUDA 13.0, -O3), recorded in docs/kernels.md: see there for the register counts;
// all variants: 0 bytes stack frame, 0 bytes spill stores/loads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdlib>

#include "launch_utils.cuh"
#include "max_abs.cuh"
#include "noisy_linear.h"
#include "noisy_gemm_kernel.cuh"
#include "op_checks.h"

namespace nft_cuda {
namespace {

using fused::noisy_gemm_kernel;

enum class Path { kFusedBf16, kFusedFp16, kFusedTf32, kMaterialized };

Path choose_path(at::ScalarType x_type, at::ScalarType w_type, bool allow_tf32) {
  if (x_type == at::kBFloat16 && (w_type == at::kFloat || w_type == at::kBFloat16))
    return Path::kFusedBf16;
  if (x_type == at::kHalf && (w_type == at::kFloat || w_type == at::kHalf))
    return Path::kFusedFp16;
  if (x_type == at::kFloat && w_type == at::kFloat && allow_tf32)
    return Path::kFusedTf32;
  return Path::kMaterialized;
}

// Reduction splits of the fused GEMM: choose_splits' heuristic, or NFT_CUDA_GEMM_SPLITS=<n> (n >= 1) to
// force a count (benchmarks/gpu_check.sh runs the split path with it).
int gemm_parts(int64_t m_rows, int64_t cols, int64_t red, int64_t samples, bool reduce_samples) {
  if (const char* env = std::getenv("NFT_CUDA_GEMM_SPLITS")) {
    const int forced = std::atoi(env);
    if (forced >= 1)
      return forced < fused::kMaxSplits ? forced : fused::kMaxSplits;
  }
  return fused::choose_splits(m_rows, cols, red, samples, reduce_samples, sm_count());
}

unsigned grid_dim(int64_t tiles, int64_t cap) {
  return static_cast<unsigned>(tiles < cap ? tiles : cap);
}

template <typename Op, typename x_t, typename w_t, bool kBackward, bool kPooledA>
void launch(const at::Tensor& a, int64_t a_sample_stride, const at::Tensor& w, const x_t* bias, at::Tensor& out,
            int64_t m_rows, int64_t samples, bool reduce_samples, const at::Tensor& rng, const at::Tensor& sigmas,
            double scale, double state_factor, cudaStream_t stream, const fused::PoolGeom& geom) {
  const int64_t n_w = w.size(0), k_w = w.size(1);
  const int64_t cols = kBackward ? k_w : n_w;
  const int parts = gemm_parts(m_rows, cols, kBackward ? n_w : k_w, samples, reduce_samples);
  const fused::GemmGrid g = fused::gemm_grid(m_rows, cols, samples, reduce_samples, parts);
  at::Tensor partial;  // fp32 partial sums of the split reduction
  if (parts > 1)
    partial = at::empty({g.s * parts, m_rows, cols}, w.options().dtype(at::kFloat));
  at::Tensor max_bits = at::empty({1}, w.options().dtype(at::kInt));
  auto* max_ptr = reinterpret_cast<unsigned int*>(max_bits.mutable_data_ptr<int32_t>());
  const w_t* wp = reinterpret_cast<const w_t*>(w.const_data_ptr());
  launch_max_abs<w_t>(wp, w.numel(), max_ptr, stream);
  // Tiles beyond the grid limits are covered by the kernel's grid-stride loops.
  const dim3 grid(grid_dim(g.m, 0x7fffffff), grid_dim(g.c, fused::kMaxGridYZ),
                  grid_dim(g.s * parts, fused::kMaxGridYZ));
  x_t* out_ptr = reinterpret_cast<x_t*>(out.mutable_data_ptr());
  float* partial_ptr = parts > 1 ? partial.mutable_data_ptr<float>() : nullptr;
  noisy_gemm_kernel<Op, x_t, w_t, kBackward, kPooledA><<<grid, fused::kThreads, 0, stream>>>(
      reinterpret_cast<const x_t*>(a.const_data_ptr()), a_sample_stride, wp, bias, out_ptr, partial_ptr, m_rows, n_w,
      k_w, samples, reduce_samples, parts, rng.const_data_ptr<int64_t>(), sigmas.const_data_ptr<float>(), max_ptr,
      static_cast<float>(scale), static_cast<float>(state_factor), geom);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (parts > 1) {
    fused::split_reduce_kernel<x_t>
        <<<grid_for(g.s * m_rows * cols), kThreads, 0, stream>>>(partial_ptr, bias, out_ptr, g.s, parts, m_rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs the fused GEMM for `path` (not kMaterialized): instantiates (compute op, x dtype, w dtype).
template <bool kBackward, bool kPooledA = false>
void run_fused(Path path, const at::Tensor& a, int64_t a_sample_stride, const at::Tensor& w, const at::Tensor& bias,
               at::Tensor& out, int64_t m_rows, int64_t samples, bool reduce_samples, const at::Tensor& rng,
               const at::Tensor& sigmas, double scale, double state_factor, cudaStream_t stream,
               const fused::PoolGeom& geom = {}) {
  const bool w_float = w.scalar_type() == at::kFloat;
#define NFT_LAUNCH(OP, XT, WT)                                                                                         \
  launch<OP, XT, WT, kBackward, kPooledA>(a, a_sample_stride, w, bias.defined() ? bias.const_data_ptr<XT>() : nullptr, \
                                          out, m_rows, samples, reduce_samples, rng, sigmas, scale, state_factor,      \
                                          stream, geom)
  switch (path) {
    case Path::kFusedBf16:
      if (w_float) {
        NFT_LAUNCH(fused::Bf16Op, c10::BFloat16, float);
      } else {
        NFT_LAUNCH(fused::Bf16Op, c10::BFloat16, c10::BFloat16);
      }
      break;
    case Path::kFusedFp16:
      if (w_float) {
        NFT_LAUNCH(fused::Fp16Op, c10::Half, float);
      } else {
        NFT_LAUNCH(fused::Fp16Op, c10::Half, c10::Half);
      }
      break;
    case Path::kFusedTf32:
      NFT_LAUNCH(fused::Tf32Op, float, float);
      break;
    default:
      TORCH_CHECK(false, "noisy_linear: internal error: no fused kernel for this dtype combination");
  }
#undef NFT_LAUNCH
}

at::Tensor noisy_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& rng, const at::Tensor& sigmas, double scale, double state_factor,
                             bool shared_input, bool allow_tf32) {
  const LinearDims d = check_noisy_linear(x, weight, bias, rng, sigmas, shared_input);
  const Path path = choose_path(x.scalar_type(), weight.scalar_type(), allow_tf32);
  if (path == Path::kMaterialized) {
    return noisy_linear_materialized(x, weight, bias, rng, sigmas, scale, state_factor, shared_input);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor sig = sigmas.contiguous();
  const at::Tensor r = rng.contiguous();
  at::Tensor out = at::empty({d.samples, d.m, d.n}, x.options());
  if (out.numel() > 0) {
    run_fused<false>(path, xc, shared_input ? 0 : d.m * d.k, wc, bc, out, d.m, d.samples, false, r, sig, scale,
                     state_factor, c10::cuda::getCurrentCUDAStream());
  }
  return out.view(noisy_linear_out_shape(x, d.n, d.samples, shared_input));
}

at::Tensor noisy_linear_backward_input_cuda(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& rng,
                                            const at::Tensor& sigmas, double scale, double state_factor,
                                            bool shared_input, bool allow_tf32) {
  const LinearDims d = check_noisy_linear_backward(grad, weight, rng, sigmas);
  const Path path = choose_path(grad.scalar_type(), weight.scalar_type(), allow_tf32);
  if (path == Path::kMaterialized) {
    return noisy_linear_backward_input_materialized(grad, weight, rng, sigmas, scale, state_factor, shared_input);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor sig = sigmas.contiguous();
  const at::Tensor r = rng.contiguous();
  const std::vector<int64_t> shape = noisy_linear_grad_input_shape(grad, d.k, shared_input);
  at::Tensor out = at::empty(shared_input ? std::vector<int64_t>{d.m, d.k} : std::vector<int64_t>{d.samples, d.m, d.k},
                             grad.options());
  if (out.numel() > 0) {
    // Every output element is written, also when the reduction is empty (N = 0 or S = 0): zeros.
    run_fused<true>(path, gc, d.m * d.n, wc, at::Tensor(), out, d.m, d.samples, shared_input, r, sig, scale,
                    state_factor, c10::cuda::getCurrentCUDAStream());
  }
  return out.view(shape);
}

at::Tensor snapshot_linear_cuda(const at::Tensor& act, int64_t pool, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& rng, const at::Tensor& sigmas,
                                double scale, double state_factor, bool shared_input, bool allow_tf32) {
  const SnapshotDims d = check_snapshot_linear(act, pool, weight, bias, rng, sigmas, shared_input);
  const Path path = choose_path(act.scalar_type(), weight.scalar_type(), allow_tf32);
  if (path == Path::kMaterialized) {
    return snapshot_linear_materialized(act, pool, weight, bias, rng, sigmas, scale, state_factor, shared_input);
  }
  TORCH_CHECK(pool <= 0x7fffffff && d.h <= 0x7fffffff && d.w <= 0x7fffffff,
              "snapshot_linear: pool and activation planes must be below 2^31 on CUDA");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor ac = act.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(act.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor sig = sigmas.contiguous();
  const at::Tensor r = rng.contiguous();
  at::Tensor out = at::empty({d.samples, d.batch, d.n}, act.options());
  if (out.numel() > 0) {
    const fused::PoolGeom geom{d.c, d.h, d.w, static_cast<int>(pool)};
    run_fused<false, true>(path, ac, shared_input ? 0 : d.batch * d.c * d.h * d.w, wc, bc, out, d.batch, d.samples,
                           false, r, sig, scale, state_factor, c10::cuda::getCurrentCUDAStream(), geom);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CUDA, m) {
  m.impl("noisy_linear", &noisy_linear_cuda);
  m.impl("_noisy_linear_backward_input", &noisy_linear_backward_input_cuda);
  m.impl("snapshot_linear", &snapshot_linear_cuda);
}

}  // namespace nft_cuda
