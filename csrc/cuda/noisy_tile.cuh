// Building blocks of the fused variation-sampled matmul (DESIGN §4.2), device side only:
//   * compute-type traits (bf16 / fp16: mma.sync m16n8k16; tf32: m16n8k8), fp32 accumulation;
//   * the noisy W-tile generator: reads W (any float dtype), adds the §3 noise of stream `stream`
//     keyed on the logical element index e = n*K + k (normal4 of q = e >> 2, lane e & 3), applies the
//     state band, and stores the tile to shared memory in the compute type — never to global memory.
//
// Shared-memory tiles are [rows][kBK + pad] with the GEMM's reduction index contiguous, for both the
// A operand (rows = output rows) and the B operand (rows = output columns), so the fragment loads
// are the same for the forward (reduction over K) and the backward-input GEMM (reduction over N).
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>

#include "mutation.cuh"
#include "nft_cuda/intrinsics.cuh"
#include "nft_cuda/normal.h"
#include "nft_cuda/variation.h"

namespace nft_cuda {
namespace fused {

// Tile shape: 64 x 64 output tile, 32-deep reduction slices, 4 warps in a 2 x 2 layout, each warp
// owning a 32 x 32 sub-tile = 2 (m16) x 4 (n8) mma tiles.
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpM = 32;
constexpr int kWarpN = 32;
constexpr int kMTiles = kWarpM / 16;  // 2
constexpr int kNTiles = kWarpN / 8;   // 4

// ---- compute types --------------------------------------------------------------------------------

struct Bf16Op {
  using smem_t = uint16_t;        // raw bf16 bits
  static constexpr int kPad = 8;  // row stride 40 halves = 20 words: conflict-free fragments
  static constexpr int kStepK = 16;
  __device__ __forceinline__ static smem_t convert(float v) { return intr::to_bf16_bits(v); }
};

struct Fp16Op {
  using smem_t = uint16_t;  // raw fp16 bits
  static constexpr int kPad = 8;
  static constexpr int kStepK = 16;
  __device__ __forceinline__ static smem_t convert(float v) { return intr::to_f16_bits(v); }
};

struct Tf32Op {
  using smem_t = uint32_t;        // tf32 bit pattern (float with the low 13 mantissa bits rounded off)
  static constexpr int kPad = 4;  // row stride 36 words: conflict-free fragments
  static constexpr int kStepK = 8;
  __device__ __forceinline__ static smem_t convert(float v) { return intr::to_tf32(v); }
};

// 16-byte aligned: the 16-bit tiles are read as 32-bit words (two adjacent reduction elements).
template <typename Op>
struct alignas(16) Smem {
  typename Op::smem_t a[kBM][kBK + Op::kPad];  // A tile: [output row][reduction]
  typename Op::smem_t b[kBN][kBK + Op::kPad];  // B tile: [output column][reduction]
};

static_assert(((kBK + Bf16Op::kPad) * sizeof(uint16_t)) % 4 == 0, "16-bit tile rows must keep 32-bit alignment");
static_assert(sizeof(Smem<Bf16Op>) == sizeof(Smem<Fp16Op>), "fp16 tiles are read through the bf16 layout");

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) {
  return intr::ld_shared(*reinterpret_cast<const uint32_t*>(p));
}

// acc[mi][ni][4] += A(warp rows) · B(warp cols) over one kBK slice held in shared memory.
// Fragment layouts: PTX ISA "Matrix fragments for mma.m16n8k16" (f16/bf16) and "mma.m16n8k8" (tf32).
__device__ __forceinline__ void mma_slice(const Smem<Bf16Op>& s, int wm, int wn, int lane,
                                          float (&acc)[kMTiles][kNTiles][4], bool is_bf16) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    uint32_t a[kMTiles][4], b[kNTiles][2];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
      const int r = wm + mi * 16 + g;
      a[mi][0] = ld32(&s.a[r][kk + 2 * t]);
      a[mi][1] = ld32(&s.a[r + 8][kk + 2 * t]);
      a[mi][2] = ld32(&s.a[r][kk + 2 * t + 8]);
      a[mi][3] = ld32(&s.a[r + 8][kk + 2 * t + 8]);
      if (kMutation == 1) {
        const uint32_t swapped = a[mi][1];
        a[mi][1] = a[mi][2];
        a[mi][2] = swapped;
      }
    }
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
      const int c = wn + ni * 8 + g;
      b[ni][0] = ld32(&s.b[c][kk + 2 * t]);
      b[ni][1] = ld32(&s.b[c][kk + 2 * t + 8]);
    }
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
        if (is_bf16) {
          intr::mma_bf16_16816(acc[mi][ni], a[mi], b[ni]);
        } else {
          intr::mma_f16_16816(acc[mi][ni], a[mi], b[ni]);
        }
      }
    }
  }
}

template <typename Op>
__device__ __forceinline__ void mma_tile(const Smem<Op>& s, int wm, int wn, int lane,
                                         float (&acc)[kMTiles][kNTiles][4]);

template <>
__device__ __forceinline__ void mma_tile<Bf16Op>(const Smem<Bf16Op>& s, int wm, int wn, int lane,
                                                 float (&acc)[kMTiles][kNTiles][4]) {
  mma_slice(s, wm, wn, lane, acc, true);
}

template <>
__device__ __forceinline__ void mma_tile<Fp16Op>(const Smem<Fp16Op>& s, int wm, int wn, int lane,
                                                 float (&acc)[kMTiles][kNTiles][4]) {
  // Same layout as bf16 (both 16-bit): reinterpret the shared tile.
  mma_slice(reinterpret_cast<const Smem<Bf16Op>&>(s), wm, wn, lane, acc, false);
}

template <>
__device__ __forceinline__ void mma_tile<Tf32Op>(const Smem<Tf32Op>& s, int wm, int wn, int lane,
                                                 float (&acc)[kMTiles][kNTiles][4]) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 8) {
    uint32_t a[kMTiles][4], b[kNTiles][2];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
      const int r = wm + mi * 16 + g;
      a[mi][0] = intr::ld_shared(s.a[r][kk + t]);
      a[mi][1] = intr::ld_shared(s.a[r + 8][kk + t]);
      a[mi][2] = intr::ld_shared(s.a[r][kk + t + 4]);
      a[mi][3] = intr::ld_shared(s.a[r + 8][kk + t + 4]);
    }
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
      const int c = wn + ni * 8 + g;
      b[ni][0] = intr::ld_shared(s.b[c][kk + t]);
      b[ni][1] = intr::ld_shared(s.b[c][kk + t + 4]);
    }
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
        intr::mma_tf32_1688(acc[mi][ni], a[mi], b[ni]);
      }
    }
  }
}

// ---- loaders --------------------------------------------------------------------------------------

// s.a[i][r] = A[m0 + i][r0 + r] of a row-major [rows, red] matrix, zero outside it.
template <typename Op, typename in_t>
__device__ __forceinline__ void load_a_tile(Smem<Op>& s, const in_t* __restrict__ a, int64_t rows, int64_t red,
                                            int64_t m0, int64_t r0) {
  for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads) {
    const int i = idx / kBK, r = idx % kBK;
    const int64_t gm = m0 + i, gr = r0 + r;
    const float v = (gm < rows && gr < red) ? static_cast<float>(intr::ld_global(a[gm * red + gr])) : 0.0f;
    intr::st_shared(s.a[i][r], Op::convert(v));
  }
}

// Geometry of the snapshot capture (DESIGN §4.3): act planes [C][H][W] per row, pool p x p.
struct PoolGeom {
  int64_t c, h, w;
  int p;
};

// The pooling window of one snapshot column r (channel c, cell (pi, pj)): act rows [h0, h1), columns
// [w0, w1) of plane c. count = 0 marks a column outside the snapshot. 32-bit bounds (the launcher
// checks H, W < 2^31) keep the loader's registers low.
struct PoolWindow {
  int64_t plane;  // c·H·W
  int32_t h0, h1, w0, w1;
  int32_t count;
};

__device__ __forceinline__ PoolWindow pool_window(const PoolGeom& g, int64_t col) {
  const int64_t pp = static_cast<int64_t>(g.p) * g.p;
  PoolWindow wd{0, 0, 0, 0, 0, 0};
  if (col >= g.c * pp)
    return wd;
  const int64_t c = col / pp;
  const int64_t cell = col - c * pp;
  const int64_t pi = cell / g.p, pj = cell - pi * g.p;
  wd.plane = c * g.h * g.w;
  wd.h0 = static_cast<int32_t>((pi * g.h) / g.p);
  wd.h1 = static_cast<int32_t>(((pi + 1) * g.h + (kMutation == 4 ? 0 : g.p - 1)) / g.p);  // ceil((pi+1)·H/p)
  wd.w0 = static_cast<int32_t>((pj * g.w) / g.p);
  wd.w1 = static_cast<int32_t>(((pj + 1) * g.w + g.p - 1) / g.p);
  wd.count = (wd.h1 - wd.h0) * (wd.w1 - wd.w0);
  return wd;
}

// s.a[i][r] = snapshot[m0 + i][r0 + r], the snapshot being adaptive_avg_pool2d(act, p) flattened
// C-major (r = c·p² + pi·p + pj) and computed here from act [rows][C][H][W] (contiguous): the mean
// over PyTorch's window, rows floor(pi·H/p) .. ceil((pi+1)·H/p) and likewise for columns, summed in
// fp32 (rows, then columns). Zero outside [rows, C·p²]. The slice's 32 windows are worked out once
// (64-bit divisions by 32 threads) into shared memory, then every thread sums its elements from the
// table. The snapshot never exists in global memory; each column block of the GEMM re-pools its rows
// from act, which stays in L2 (the IRS taps are a few MB at most). Contains a barrier: call from
// every thread of the block.
template <typename Op, typename in_t>
__device__ __forceinline__ void load_pooled_a_tile(Smem<Op>& s, const in_t* __restrict__ act, int64_t rows,
                                                   const PoolGeom& g, int64_t m0, int64_t r0) {
  __shared__ PoolWindow windows[kBK];
  if (threadIdx.x < kBK)
    intr::st_shared(windows[threadIdx.x], pool_window(g, r0 + threadIdx.x));
  __syncthreads();  // the table is complete (its previous readers passed the slice's first barrier)
  for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads) {
    const int i = idx / kBK, r = idx % kBK;
    const int64_t gm = m0 + i;
    const PoolWindow wd = intr::ld_shared(windows[r]);
    float v = 0.0f;
    if (gm < rows && wd.count > 0) {
      const in_t* plane = act + gm * g.c * g.h * g.w + wd.plane;
      float sum = 0.0f;
      for (int32_t h = wd.h0; h < wd.h1; ++h) {
        const in_t* row = plane + h * g.w;
        for (int32_t w = wd.w0; w < wd.w1; ++w)
          sum += static_cast<float>(intr::ld_global(row[w]));
      }
      v = sum / static_cast<float>(wd.count);
    }
    intr::st_shared(s.a[i][r], Op::convert(v));
  }
}

// The noisy W tile of weight rows [nb, nb + RN) and columns [kb, kb + CK) of W [n_rows, k_cols]
// (row-major, contiguous): value (nl, kl) = perturb(W)[stream][nb + nl][kb + kl] rounded to w_t (as
// perturb's output) and then to the compute type; zero outside W. kTransposed = false stores it at
// s.b[nl][kl] (forward: B column = weight row n, reduction = k); true at s.b[kl][nl] (backward-input:
// B column = k, reduction = n).
//
// Noise: each task owns one Philox block q and writes the (up to four) elements e = 4q + lane of one
// weight row that fall in the tile; rows of K elements need not start at a multiple of 4, so a row's
// CK elements touch at most CK/4 + 1 blocks.
template <typename Op, typename w_t, int RN, int CK, bool kTransposed>
__device__ __forceinline__ void load_noisy_w_tile(Smem<Op>& s, const w_t* __restrict__ w, int64_t n_rows,
                                                  int64_t k_cols, int64_t nb, int64_t kb, uint64_t seed,
                                                  uint64_t stream, const StateBand& band) {
  using acc_t = at::opmath_type<w_t>;
  static_assert(CK % 4 == 0, "CK must be a multiple of 4");
  // Zero the positions outside W (disjoint from the positions written below: no race). A tile inside W
  // has none: the block-uniform test skips the loop (~20 instructions per weight element on sm_90).
  const bool inside = nb + RN <= n_rows && kb + CK <= k_cols;
  for (int idx = threadIdx.x; idx < RN * CK && !inside; idx += kThreads) {
    const int nl = idx / CK, kl = idx % CK;
    if (nb + nl >= n_rows || kb + kl >= k_cols) {
      if (kTransposed) {
        intr::st_shared(s.b[kl][nl], Op::convert(0.0f));
      } else {
        intr::st_shared(s.b[nl][kl], Op::convert(0.0f));
      }
    }
  }
  constexpr int kGroups = CK / 4 + 1;
  const int64_t k_end = (kb + CK < k_cols) ? kb + CK : k_cols;
  for (int task = threadIdx.x; task < RN * kGroups; task += kThreads) {
    // Forward: consecutive threads take consecutive Philox blocks of one weight row (coalesced reads;
    // stores along a tile row). Transposed: consecutive threads take the same block of consecutive
    // weight rows, so a warp's stores s.b[kl][nl] run along a tile row (nl) instead of down a column
    // (kl four rows apart per thread, ~8-way bank conflicts: tests/test_emulator.py counts them).
    const int nl = kTransposed ? task % RN : task / kGroups;
    const int gi = kTransposed ? task / RN : task % kGroups;
    const int64_t n = nb + nl;
    if (n >= n_rows || kb >= k_end)
      continue;
    const int64_t row = n * k_cols;
    const int64_t e_begin = row + kb, e_end = row + k_end;
    const int64_t q = (e_begin >> 2) + gi;
    if (4 * q >= e_end)
      continue;
    const Normal4 z = normal4(seed, stream, static_cast<uint64_t>(q));
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = 4 * q + l;
      if (e < e_begin || e >= e_end)
        continue;
      const int kl = static_cast<int>(e - e_begin);
      const w_t wv = intr::ld_global(w[e]);
      const w_t noisy = static_cast<w_t>(add_noise<acc_t>(
          static_cast<acc_t>(wv), sigma_w(band, fabsf(static_cast<float>(wv))), z.z[kMutation == 3 ? (l ^ 1) : l]));
      const typename Op::smem_t v = Op::convert(static_cast<float>(noisy));
      if (kTransposed) {
        intr::st_shared(s.b[kl][nl], v);
      } else {
        intr::st_shared(s.b[nl][kl], v);
      }
    }
  }
}

}  // namespace fused
}  // namespace nft_cuda
