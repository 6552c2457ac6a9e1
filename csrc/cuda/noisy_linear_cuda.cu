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
// grid = (ceil(M/64), ceil(C/64), S) with C the output columns; the shared-x backward runs the sample
// loop inside the kernel (grid.z = 1) so the sum over samples needs no extra memory.
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

#include "launch_utils.cuh"
#include "max_abs.cuh"
#include "noisy_linear.h"
#include "noisy_tile.cuh"
#include "op_checks.h"

namespace nft_cuda {
namespace {

using fused::kBK;
using fused::kBM;
using fused::kBN;
using fused::kMTiles;
using fused::kNTiles;

// kBackward = false: A = x [M, K] (rows m, reduction k), B column = weight row n, C = N columns.
// kBackward = true:  A = dY [M, N] (rows m, reduction n), B column = weight column k, C = K columns.
// a_sample_stride: elements between the A matrices of consecutive samples (0: shared x).
// reduce_samples: loop over all samples in one block and write one [M, C] output (shared-x dX);
// otherwise sample s = blockIdx.z writes out + s*M*C.
// kPooledA (forward only): A is the snapshot of act [M][C][H][W] pooled to geom.p x geom.p, formed in
// the A-tile loads; the reduction length k_w is C·p².
template <typename Op, typename x_t, typename w_t, bool kBackward, bool kPooledA>
__global__ void __launch_bounds__(fused::kThreads)
    noisy_gemm_kernel(const x_t* __restrict__ a, int64_t a_sample_stride, const w_t* __restrict__ w,
                      const x_t* __restrict__ bias, x_t* __restrict__ out, int64_t m_rows, int64_t n_w,
                      int64_t k_w, int64_t samples, bool reduce_samples, const int64_t* __restrict__ rng,
                      const float* __restrict__ sigmas, const unsigned int* __restrict__ max_bits, float scale,
                      float state_factor, fused::PoolGeom geom) {
  static_assert(!(kBackward && kPooledA), "the snapshot capture has no fused backward (dX goes through dSnapshot)");
  __shared__ fused::Smem<Op> smem;
  const int64_t red = kBackward ? n_w : k_w;   // reduction length
  const int64_t cols = kBackward ? k_w : n_w;  // output columns
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * fused::kWarpM;
  const int wn = (warp & 1) * fused::kWarpN;

  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const float max_abs = __uint_as_float(*max_bits);

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.0f;

  const int64_t s_begin = reduce_samples ? 0 : static_cast<int64_t>(blockIdx.z);
  const int64_t s_end = reduce_samples ? samples : s_begin + 1;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const StateBand band = make_state_band(sigmas[s], max_abs, scale, state_factor);
    const uint64_t stream = offset + static_cast<uint64_t>(s);
    const x_t* a_s = a + s * a_sample_stride;
    for (int64_t r0 = 0; r0 < red; r0 += kBK) {
      __syncthreads();  // every warp is done reading the previous slice
      if constexpr (kPooledA) {
        fused::load_pooled_a_tile<Op>(smem, a_s, m_rows, geom, m0, r0);
      } else {
        fused::load_a_tile<Op>(smem, a_s, m_rows, red, m0, r0);
      }
      if (kBackward) {
        // weight rows n in [r0, r0 + kBK) (reduction), columns k in [c0, c0 + kBN) (output)
        fused::load_noisy_w_tile<Op, w_t, kBK, kBN, true>(smem, w, n_w, k_w, r0, c0, seed, stream, band);
      } else {
        // weight rows n in [c0, c0 + kBN) (output), columns k in [r0, r0 + kBK) (reduction)
        fused::load_noisy_w_tile<Op, w_t, kBN, kBK, false>(smem, w, n_w, k_w, c0, r0, seed, stream, band);
      }
      __syncthreads();
      fused::mma_tile<Op>(smem, wm, wn, lane, acc);
    }
  }

  // Epilogue: accumulator (mi, ni, j) holds row wm + 16 mi + g (+8 for j >= 2), column wn + 8 ni + 2t + (j & 1).
  const int g = lane >> 2, t = lane & 3;
  x_t* o = out + (reduce_samples ? 0 : s_begin * m_rows * cols);
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t row = m0 + wm + mi * 16 + g + (j >= 2 ? 8 : 0);
        const int64_t col = c0 + wn + ni * 8 + 2 * t + (j & 1);
        if (row < m_rows && col < cols) {
          float v = acc[mi][ni][j];
          if (bias != nullptr) v += static_cast<float>(bias[col]);
          o[row * cols + col] = static_cast<x_t>(v);
        }
      }
    }
  }
}

enum class Path { kFusedBf16, kFusedFp16, kFusedTf32, kMaterialized };

Path choose_path(at::ScalarType x_type, at::ScalarType w_type, bool allow_tf32) {
  if (x_type == at::kBFloat16 && (w_type == at::kFloat || w_type == at::kBFloat16)) return Path::kFusedBf16;
  if (x_type == at::kHalf && (w_type == at::kFloat || w_type == at::kHalf)) return Path::kFusedFp16;
  if (x_type == at::kFloat && w_type == at::kFloat && allow_tf32) return Path::kFusedTf32;
  return Path::kMaterialized;
}

template <typename Op, typename x_t, typename w_t, bool kBackward, bool kPooledA>
void launch(const at::Tensor& a, int64_t a_sample_stride, const at::Tensor& w, const x_t* bias, at::Tensor& out,
            int64_t m_rows, int64_t samples, bool reduce_samples, const at::Tensor& rng, const at::Tensor& sigmas,
            double scale, double state_factor, cudaStream_t stream, const fused::PoolGeom& geom) {
  const int64_t n_w = w.size(0), k_w = w.size(1);
  const int64_t cols = kBackward ? k_w : n_w;
  const int64_t grid_m = (m_rows + kBM - 1) / kBM;
  const int64_t grid_c = (cols + kBN - 1) / kBN;
  const int64_t grid_s = reduce_samples ? 1 : samples;
  TORCH_CHECK(grid_m <= 0x7fffffff && grid_c <= 65535 && grid_s <= 65535,
              "noisy_linear: problem too large for one launch (rows ", m_rows, ", columns ", cols, ", samples ",
              samples, ")");
  at::Tensor max_bits = at::empty({1}, w.options().dtype(at::kInt));
  auto* max_ptr = reinterpret_cast<unsigned int*>(max_bits.mutable_data_ptr<int32_t>());
  const w_t* wp = reinterpret_cast<const w_t*>(w.const_data_ptr());
  launch_max_abs<w_t>(wp, w.numel(), max_ptr, stream);
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_c), static_cast<unsigned>(grid_s));
  noisy_gemm_kernel<Op, x_t, w_t, kBackward, kPooledA><<<grid, fused::kThreads, 0, stream>>>(
      reinterpret_cast<const x_t*>(a.const_data_ptr()), a_sample_stride, wp, bias,
      reinterpret_cast<x_t*>(out.mutable_data_ptr()), m_rows, n_w, k_w, samples, reduce_samples,
      rng.const_data_ptr<int64_t>(), sigmas.const_data_ptr<float>(), max_ptr, static_cast<float>(scale),
      static_cast<float>(state_factor), geom);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the fused GEMM for `path` (not kMaterialized): instantiates (compute op, x dtype, w dtype).
template <bool kBackward, bool kPooledA = false>
void run_fused(Path path, const at::Tensor& a, int64_t a_sample_stride, const at::Tensor& w, const at::Tensor& bias,
               at::Tensor& out, int64_t m_rows, int64_t samples, bool reduce_samples, const at::Tensor& rng,
               const at::Tensor& sigmas, double scale, double state_factor, cudaStream_t stream,
               const fused::PoolGeom& geom = {}) {
  const bool w_float = w.scalar_type() == at::kFloat;
#define NFT_LAUNCH(OP, XT, WT)                                                                                   \
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
  TORCH_CHECK(pool <= 0x7fffffff, "snapshot_linear: pool too large");
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
