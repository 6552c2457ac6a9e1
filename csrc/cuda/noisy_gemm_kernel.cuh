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

// Launch geometry, shared by the CUDA launcher, the kernel and the emulator. Work is a grid of tiles:
// m (64-row blocks) x c (64-column blocks) x s (samples, or 1 when a tile loops over them: shared-x
// backward) x parts (splits of the reduction). The kernel loops over tiles beyond the launched grid,
// so any size runs with grid.y, grid.z <= 65535.
struct GemmGrid {
  int64_t m, c, s;
  int parts;
};

constexpr int kMaxGridYZ = 65535;
constexpr int kMaxSplits = 32;
constexpr int64_t kMinSplitSlices = 4;  // each split keeps >= 4 slices of 32 (128-deep reductions)

NFT_HOST_DEVICE inline GemmGrid gemm_grid(int64_t m_rows, int64_t cols, int64_t samples, bool reduce_samples,
                                          int parts) {
  return {(m_rows + kBM - 1) / kBM, (cols + kBN - 1) / kBN, reduce_samples ? 1 : samples, parts};
}

// Reduction slices of one tile: every (sample, 32-deep slice) pair it accumulates.
NFT_HOST_DEVICE inline int64_t gemm_units(int64_t red, int64_t samples, bool reduce_samples) {
  return (reduce_samples ? samples : 1) * ((red + kBK - 1) / kBK);
}

// Split heuristic (split-K, and split over samples for the shared-x backward): when the tiles alone
// would give fewer than two blocks per SM, split each tile's reduction into `parts` ranges so the grid
// reaches about 2 x sm_count blocks, keeping >= kMinSplitSlices slices per range and at most
// kMaxSplits ranges. Partial sums go to an fp32 workspace and split_reduce_kernel adds them in a fixed
// order: results are deterministic for a given shape and SM count.
inline int choose_splits(int64_t m_rows, int64_t cols, int64_t red, int64_t samples, bool reduce_samples,
                         int sm_count) {
  const GemmGrid g = gemm_grid(m_rows, cols, samples, reduce_samples, 1);
  const int64_t tiles = g.m * g.c * g.s;
  const int64_t target = 2 * static_cast<int64_t>(sm_count);
  if (tiles <= 0 || tiles >= target)
    return 1;
  int64_t parts = (target + tiles - 1) / tiles;
  const int64_t by_depth = gemm_units(red, samples, reduce_samples) / kMinSplitSlices;
  parts = parts < by_depth ? parts : by_depth;
  parts = parts < kMaxSplits ? parts : kMaxSplits;
  return parts < 1 ? 1 : static_cast<int>(parts);
}

// One output tile: rows [mb·64, +64), columns [cb·64, +64), sample block sb, reduction part `part` of
// `parts`. kBackward, kPooledA, a_sample_stride, reduce_samples: see noisy_gemm_kernel.
template <typename Op, typename x_t, typename w_t, bool kBackward, bool kPooledA>
__device__ __forceinline__ void gemm_tile(Smem<Op>& smem, const x_t* __restrict__ a, int64_t a_sample_stride,
                                          const w_t* __restrict__ w, const x_t* __restrict__ bias,
                                          x_t* __restrict__ out, float* __restrict__ partial, int64_t m_rows,
                                          int64_t n_w, int64_t k_w, int64_t samples, bool reduce_samples, int64_t mb,
                                          int64_t cb, int64_t sb, int part, int parts, uint64_t seed, uint64_t offset,
                                          const float* __restrict__ sigmas, float max_abs, float scale,
                                          float state_factor, const PoolGeom& geom) {
  const int64_t red = kBackward ? n_w : k_w;   // reduction length
  const int64_t cols = kBackward ? k_w : n_w;  // output columns
  const int64_t m0 = mb * kBM;
  const int64_t c0 = cb * kBN;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * kWarpM;
  const int wn = (warp & 1) * kWarpN;

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        acc[mi][ni][j] = 0.0f;

  // Units u = (sample, slice) pairs in sample-major order; this part takes [u_begin, u_end).
  const int64_t s_first = reduce_samples ? 0 : sb;
  const int64_t n_slices = (red + kBK - 1) / kBK;
  const int64_t units = gemm_units(red, samples, reduce_samples);
  const int64_t u_begin = units * part / parts, u_end = units * (part + 1) / parts;
  for (int64_t u = u_begin; u < u_end; ++u) {
    const int64_t s = s_first + u / n_slices;
    const int64_t r0 = (u % n_slices) * kBK;
    const StateBand band = make_state_band(intr::ld_global(sigmas[s]), max_abs, scale, state_factor);
    const uint64_t stream = offset + static_cast<uint64_t>(s) + (kMutation == 2 ? 1u : 0u);
    const x_t* a_s = a + s * a_sample_stride;
    if (kMutation != 6)
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
    if (kMutation != 5)
      __syncthreads();  // the tiles are complete
    mma_tile<Op>(smem, wm, wn, lane, acc);
  }

  // Epilogue: accumulator (mi, ni, j) holds row wm + 16 mi + g (+8 for j >= 2), column wn + 8 ni + 2t + (j & 1).
  // One part: bias, rounding and store here. Several: fp32 partial sums to partial[sb][part] (no bias).
  const int g = lane >> 2, t = lane & 3;
  const int64_t plane = m_rows * cols;
  x_t* o = out + (reduce_samples ? 0 : sb * plane);
  float* po = parts > 1 ? partial + (sb * parts + part) * plane : nullptr;
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
          if (parts > 1) {
            intr::st_global(po[row * cols + col], v);
          } else {
            if (bias != nullptr)
              v += static_cast<float>(intr::ld_global(bias[col]));
            intr::st_global(o[row * cols + col], static_cast<x_t>(v));
          }
        }
      }
    }
  }
}

// kBackward = false: A = x [M, K] (rows m, reduction k), B column = weight row n, C = N columns.
// kBackward = true:  A = dY [M, N] (rows m, reduction n), B column = weight column k, C = K columns.
// a_sample_stride: elements between the A matrices of consecutive samples (0: shared x).
// reduce_samples: each tile loops over all samples and writes one [M, C] output (shared-x dX);
// otherwise sample block s writes out + s*M*C.
// kPooledA (forward only): A is the snapshot of act [M][C][H][W] pooled to geom.p x geom.p, formed in
// the A-tile loads; the reduction length k_w is C·p².
// parts > 1: each tile's units are split into `parts` ranges (choose_splits) whose fp32 sums go to
// partial [S'][parts][M][C] (S' = 1 for reduce_samples, else S); split_reduce_kernel finishes.
// Grid: x over 64-row blocks, y over 64-column blocks, z over (sample block, part); each loops with
// the grid stride, so a launch capped at 65535 in y and z still covers every tile.
template <typename Op, typename x_t, typename w_t, bool kBackward, bool kPooledA>
__global__ void __launch_bounds__(kThreads)
    noisy_gemm_kernel(const x_t* __restrict__ a, int64_t a_sample_stride, const w_t* __restrict__ w,
                      const x_t* __restrict__ bias, x_t* __restrict__ out, float* __restrict__ partial, int64_t m_rows,
                      int64_t n_w, int64_t k_w, int64_t samples, bool reduce_samples, int parts,
                      const int64_t* __restrict__ rng, const float* __restrict__ sigmas,
                      const unsigned int* __restrict__ max_bits, float scale, float state_factor, PoolGeom geom) {
  static_assert(!(kBackward && kPooledA), "the snapshot capture has no fused backward (dX goes through dSnapshot)");
  __shared__ Smem<Op> smem;
  const uint64_t seed = static_cast<uint64_t>(intr::ld_global(rng[0]));
  const uint64_t offset = static_cast<uint64_t>(intr::ld_global(rng[1]));
  const float max_abs = intr::uint_as_float(intr::ld_global(*max_bits));
  const GemmGrid g = gemm_grid(m_rows, kBackward ? k_w : n_w, samples, reduce_samples, parts);
  for (int64_t z = blockIdx.z; z < g.s * parts; z += gridDim.z) {
    for (int64_t cb = blockIdx.y; cb < g.c; cb += gridDim.y) {
      for (int64_t mb = blockIdx.x; mb < g.m; mb += gridDim.x) {
        gemm_tile<Op, x_t, w_t, kBackward, kPooledA>(
            smem, a, a_sample_stride, w, bias, out, partial, m_rows, n_w, k_w, samples, reduce_samples, mb, cb,
            z / parts, static_cast<int>(z % parts), parts, seed, offset, sigmas, max_abs, scale, state_factor, geom);
      }
    }
  }
}

// out[sb][m][c] = Σ_part partial[sb][part][m][c] (in part order: deterministic) + bias[c], rounded to x_t.
template <typename x_t>
__global__ void split_reduce_kernel(const float* __restrict__ partial, const x_t* __restrict__ bias,
                                    x_t* __restrict__ out, int64_t sample_blocks, int parts, int64_t m_rows,
                                    int64_t cols) {
  const int64_t plane = m_rows * cols;
  const int64_t total = sample_blocks * plane;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sb = i / plane, rc = i - sb * plane;
    const float* p = partial + sb * parts * plane + rc;
    float v = 0.0f;
    for (int k = 0; k < parts; ++k)
      v += intr::ld_global(p[k * plane]);
    if (bias != nullptr)
      v += static_cast<float>(intr::ld_global(bias[rc % cols]));
    intr::st_global(out[i], static_cast<x_t>(v));
  }
}

}  // namespace fused
}  // namespace nft_cuda
