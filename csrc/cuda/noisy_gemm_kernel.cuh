// The fused variation-sampled matmul kernel (DESIGN §4.2, §4.3), free of ATen tensor types so that
// the same source runs on the GPU (launched from noisy_linear_cuda.cu) and on the CPU emulator
// (csrc/emu, tests/test_emulator.py).
//
// Forward:        out[s][m][n] = Σ_k A_s[m][k] · Wn_s[n][k] + bias[n]   (A_s = x, or x[s] per sample)
// Backward-input: dX[(s)][m][k] = Σ_(s) Σ_n dY_s[m][n] · Wn_s[n][k]      (summed over s for shared x)
// Snapshot:       A_s = flatten(adaptive_avg_pool2d(act_s, p)) formed in the A-tile loads.
#pragma once

#include <cstdint>

#include "mutation.cuh"
#include "noisy_tile.cuh"
#include "nft_cuda/intrinsics.cuh"
#include "nft_cuda/variation.h"

namespace nft_cuda {
namespace fused {

// kBackward = false: A = x [M, K] (rows m, reduction k), B column = weight row n, C = N columns.
// kBackward = true:  A = dY [M, N] (rows m, reduction n), B column = weight column k, C = K columns.
// a_sample_stride: elements between the A matrices of consecutive samples (0: shared x).
// reduce_samples: loop over all samples in one block and write one [M, C] output (shared-x dX);
// otherwise sample s = blockIdx.z writes out + s*M*C.
// kPooledA (forward only): A is the snapshot of act [M][C][H][W] pooled to geom.p x geom.p, formed in
// the A-tile loads; the reduction length k_w is C·p².
template <typename Op, typename x_t, typename w_t, bool kBackward, bool kPooledA>
__global__ void __launch_bounds__(kThreads)
    noisy_gemm_kernel(const x_t* __restrict__ a, int64_t a_sample_stride, const w_t* __restrict__ w,
                      const x_t* __restrict__ bias, x_t* __restrict__ out, int64_t m_rows, int64_t n_w,
                      int64_t k_w, int64_t samples, bool reduce_samples, const int64_t* __restrict__ rng,
                      const float* __restrict__ sigmas, const unsigned int* __restrict__ max_bits, float scale,
                      float state_factor, PoolGeom geom) {
  static_assert(!(kBackward && kPooledA), "the snapshot capture has no fused backward (dX goes through dSnapshot)");
  __shared__ Smem<Op> smem;
  const int64_t red = kBackward ? n_w : k_w;   // reduction length
  const int64_t cols = kBackward ? k_w : n_w;  // output columns
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * kWarpM;
  const int wn = (warp & 1) * kWarpN;

  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const float max_abs = intr::uint_as_float(*max_bits);

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
    const uint64_t stream = offset + static_cast<uint64_t>(s) + (kMutation == 2 ? 1u : 0u);
    const x_t* a_s = a + s * a_sample_stride;
    for (int64_t r0 = 0; r0 < red; r0 += kBK) {
      __syncthreads();  // every warp is done reading the previous slice
      if constexpr (kPooledA) {
        load_pooled_a_tile<Op>(smem, a_s, m_rows, geom, m0, r0);
      } else {
        load_a_tile<Op>(smem, a_s, m_rows, red, m0, r0);
      }
      if (kBackward) {
        // weight rows n in [r0, r0 + kBK) (reduction), columns k in [c0, c0 + kBN) (output)
        load_noisy_w_tile<Op, w_t, kBK, kBN, true>(smem, w, n_w, k_w, r0, c0, seed, stream, band);
      } else {
        // weight rows n in [c0, c0 + kBN) (output), columns k in [r0, r0 + kBK) (reduction)
        load_noisy_w_tile<Op, w_t, kBN, kBK, false>(smem, w, n_w, k_w, c0, r0, seed, stream, band);
      }
      if (kMutation != 5) __syncthreads();  // the tiles are complete
      mma_tile<Op>(smem, wm, wn, lane, acc);
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

// Launch geometry (host side), shared by the CUDA launcher and the emulator: blocks of kThreads,
// grid (x: 64-row blocks, y: 64-column blocks, z: samples, or 1 when the block loops over them).
struct GemmGrid {
  int64_t m, c, s;
};

inline GemmGrid gemm_grid(int64_t m_rows, int64_t cols, int64_t samples, bool reduce_samples) {
  return {(m_rows + kBM - 1) / kBM, (cols + kBN - 1) / kBN, reduce_samples ? 1 : samples};
}

}  // namespace fused
}  // namespace nft_cuda
