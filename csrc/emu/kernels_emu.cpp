// The CUDA kernels of csrc/cuda, compiled for the host from the same sources nvcc builds, and launched
// through the emulator (emulator.h). A C ABI for tests/emulator.py (ctypes); every function returns 0
// on success, or -1 with the message in emu_last_error(). Pointers are host tensors' data.
//
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. GEMM compute ops: 0 bf16, 1 fp16, 2 tf32.
// NFT_EMU_GEMM_ONLY_BF16 (set by the mutation builds) keeps only the bf16 / fp32-weight GEMM, so
// that each mutant compiles quickly.
#include "emu/cuda_shim.h"  // first: the CUDA language on the host

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>
#include <vector>

#include "cuda/max_abs_kernel.cuh"
#include "cuda/noisy_gemm_kernel.cuh"
#include "cuda/perturb_device_kernel.cuh"
#include "cuda/perturb_kernel.cuh"
#include "cuda/rng_kernels.cuh"
#include "emu/emulator.h"

namespace {

using namespace nft_cuda;

enum DType { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

template <typename F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32:
      return f(float{});
#ifndef NFT_EMU_GEMM_ONLY_BF16
    case kF64:
      return f(double{});
    case kF16:
      return f(c10::Half{});
    case kBF16:
      return f(c10::BFloat16{});
#endif
    default:
      return -2;
  }
}

int status(bool ok) {
  return ok ? 0 : -1;
}

// The allocation of `count` elements at p, for the launch's bounds check (emulator.h).
template <typename T>
nft_emu::Buffer in(const char* name, const T* p, int64_t count) {
  return {p, static_cast<size_t>(count) * sizeof(T), name, false};
}
template <typename T>
nft_emu::Buffer inout(const char* name, T* p, int64_t count) {
  return {p, static_cast<size_t>(count) * sizeof(T), name, true};
}

// The launch geometry the CUDA launchers use for the grid-stride kernels is grid_for() (a multiple of
// the SM count); the emulator takes the block count from the caller so tests can force several
// grid-stride iterations per thread.
template <typename scalar_t>
bool run_max_abs(const scalar_t* w, int64_t n, unsigned* bits, unsigned blocks) {
  *bits = 0;
  return nft_emu::launch(dim3{blocks, 1, 1}, dim3{kMaxAbsThreads, 1, 1}, {in("w", w, n), inout("max_bits", bits, 1)},
                         [&] { max_abs_kernel<scalar_t>(w, n, bits); });
}

// Grid and split choices of one emulated GEMM launch. parts = 0: choose_splits() for sm_count SMs.
// grid_cap: the most blocks launched per grid dimension (the CUDA launcher uses 2^31-1, 65535, 65535);
// smaller caps make the kernel's grid-stride tile loops run.
struct LaunchShape {
  int parts;
  int sm_count;
  unsigned grid_cap[3];
};

unsigned capped(int64_t tiles, unsigned cap) {
  return static_cast<unsigned>(tiles < cap ? tiles : cap);
}

// The allocations of perturb and perturb_device: W [n], out [samples][n] and the per-call scalars.
template <typename scalar_t>
std::vector<nft_emu::Buffer> perturb_buffers(const scalar_t* w, scalar_t* out, int64_t n, int64_t samples,
                                             const int64_t* rng, const float* sigmas, const unsigned* max_bits) {
  return {in("w", w, n), inout("out", out, samples * n), in("rng", rng, 2), in("sigmas", sigmas, samples),
          in("max_bits", max_bits, 1)};
}

template <typename Op, typename x_t, typename w_t, bool kBackward, bool kPooledA>
bool run_gemm(const void* a, int64_t a_sample_stride, const void* w, const void* bias, void* out, int64_t m_rows,
              int64_t n_w, int64_t k_w, int64_t samples, bool reduce_samples, const int64_t* rng, const float* sigmas,
              float scale, float state_factor, const fused::PoolGeom& geom, const LaunchShape& shape, int* parts_used) {
  unsigned max_bits = 0;
  const w_t* wp = static_cast<const w_t*>(w);
  if (!run_max_abs<w_t>(wp, n_w * k_w, &max_bits, 2))
    return false;
  const int64_t cols = kBackward ? k_w : n_w;
  const int parts = shape.parts > 0 ? shape.parts
                                    : fused::choose_splits(m_rows, cols, kBackward ? n_w : k_w, samples, reduce_samples,
                                                           shape.sm_count);
  *parts_used = parts;
  const fused::GemmGrid g = fused::gemm_grid(m_rows, cols, samples, reduce_samples, parts);
  std::vector<float> partial(parts > 1 ? static_cast<size_t>(g.s * parts * m_rows * cols) : 0,
                             std::numeric_limits<float>::quiet_NaN());  // unwritten partials would show
  float* pp = parts > 1 ? partial.data() : nullptr;
  const x_t* bp = static_cast<const x_t*>(bias);
  x_t* op = static_cast<x_t*>(out);
  const dim3 grid{capped(g.m, shape.grid_cap[0]), capped(g.c, shape.grid_cap[1]),
                  capped(g.s * parts, shape.grid_cap[2])};
  const int64_t out_numel = (reduce_samples ? 1 : samples) * m_rows * cols;
  const int64_t a_rows_numel = m_rows * (kPooledA ? geom.c * geom.h * geom.w : (kBackward ? n_w : k_w));
  const int64_t a_numel = a_sample_stride > 0 ? samples * a_sample_stride : a_rows_numel;  // 0: one shared A
  const std::vector<nft_emu::Buffer> buffers{in("a", static_cast<const x_t*>(a), a_numel),
                                             in("w", wp, n_w * k_w),
                                             in("bias", bp, bp != nullptr ? cols : 0),
                                             inout("out", op, out_numel),
                                             inout("partial", pp, static_cast<int64_t>(partial.size())),
                                             in("rng", rng, 2),
                                             in("sigmas", sigmas, samples),
                                             in("max_bits", &max_bits, 1)};
  const bool ok = nft_emu::launch(grid, dim3{fused::kThreads, 1, 1}, buffers, [&] {
    fused::noisy_gemm_kernel<Op, x_t, w_t, kBackward, kPooledA>(static_cast<const x_t*>(a), a_sample_stride, wp, bp, op,
                                                                pp, m_rows, n_w, k_w, samples, reduce_samples, parts,
                                                                rng, sigmas, &max_bits, scale, state_factor, geom);
  });
  if (!ok || parts == 1)
    return ok;
  // The GEMM's counters are kept (the reduction has no mma and no shared memory).
  return nft_emu::launch(
      dim3{3, 1, 1}, dim3{64, 1, 1}, buffers,
      [&] { fused::split_reduce_kernel<x_t>(pp, bp, op, g.s, parts, m_rows, cols); }, /*keep_counters=*/true);
}

template <typename Op, typename x_t, typename w_t>
bool run_gemm_mode(int mode, const void* a, int64_t a_sample_stride, const void* w, const void* bias, void* out,
                   int64_t m_rows, int64_t n_w, int64_t k_w, int64_t samples, bool reduce_samples, const int64_t* rng,
                   const float* sigmas, float scale, float state_factor, const fused::PoolGeom& geom,
                   const LaunchShape& shape, int* parts_used) {
  switch (mode) {
    case 0:
      return run_gemm<Op, x_t, w_t, false, false>(a, a_sample_stride, w, bias, out, m_rows, n_w, k_w, samples,
                                                  reduce_samples, rng, sigmas, scale, state_factor, geom, shape,
                                                  parts_used);
    case 1:
      return run_gemm<Op, x_t, w_t, true, false>(a, a_sample_stride, w, bias, out, m_rows, n_w, k_w, samples,
                                                 reduce_samples, rng, sigmas, scale, state_factor, geom, shape,
                                                 parts_used);
    default:
      return run_gemm<Op, x_t, w_t, false, true>(a, a_sample_stride, w, bias, out, m_rows, n_w, k_w, samples,
                                                 reduce_samples, rng, sigmas, scale, state_factor, geom, shape,
                                                 parts_used);
  }
}

}  // namespace

extern "C" {

const char* emu_last_error() {
  return nft_emu::last_error().c_str();
}

int emu_mutation() {
  return nft_cuda::kMutation;
}

// Counters of the last op (emulator.h): mma instructions, completed block barriers, warp shuffles,
// shared-memory store requests / wavefronts, load requests / wavefronts, global bytes loaded / stored.
void emu_counters(int64_t* out) {
  const nft_emu::Counters& c = nft_emu::counters();
  const int64_t values[] = {c.mma,
                            c.barriers,
                            c.shfl,
                            c.smem_store_requests,
                            c.smem_store_wavefronts,
                            c.smem_load_requests,
                            c.smem_load_wavefronts,
                            c.global_load_bytes,
                            c.global_store_bytes};
  for (int i = 0; i < 9; ++i)
    out[i] = values[i];
}

// Shared-memory counters per access site of the last launch: out[3*i .. 3*i+2] = (store, requests,
// wavefronts) for i < min(sites, capacity); returns the number of sites.
int emu_site_counters(int64_t* out, int capacity) {
  const auto& sites = nft_emu::site_counters();
  for (int i = 0; i < static_cast<int>(sites.size()) && i < capacity; ++i) {
    out[3 * i] = sites[i].store;
    out[3 * i + 1] = sites[i].requests;
    out[3 * i + 2] = sites[i].wavefronts;
  }
  return static_cast<int>(sites.size());
}

int emu_philox4x32(const int64_t* counter, const int64_t* key, int64_t* out, int64_t rows, unsigned blocks,
                   unsigned threads) {
  return status(nft_emu::launch(dim3{blocks, 1, 1}, dim3{threads, 1, 1},
                                {in("counter", counter, 4 * rows), in("key", key, 2), inout("out", out, 4 * rows)},
                                [&] { philox4x32_kernel(counter, key, out, rows); }));
}

// grid_y: the most blocks in y (one per stream up to it; the kernel loops over the rest).
int emu_philox_normal(const int64_t* rng, float* out, int64_t numel, int64_t streams, unsigned blocks, unsigned threads,
                      unsigned grid_y) {
  return status(nft_emu::launch(dim3{blocks, capped(streams, grid_y), 1}, dim3{threads, 1, 1},
                                {in("rng", rng, 2), inout("out", out, streams * numel)},
                                [&] { philox_normal_kernel(rng, out, numel, streams); }));
}

int emu_max_abs(int dtype, const void* w, int64_t n, unsigned* bits, unsigned blocks) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return status(run_max_abs<scalar_t>(static_cast<const scalar_t*>(w), n, bits, blocks));
  });
}

// max|W| then perturb, as perturb_cuda launches them.
int emu_perturb(int dtype, const void* w, void* out, int64_t n, int64_t samples, const int64_t* rng,
                const float* sigmas, float scale, float state_factor, unsigned blocks, unsigned threads) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* wp = static_cast<const scalar_t*>(w);
    unsigned max_bits = 0;
    if (!run_max_abs<scalar_t>(wp, n, &max_bits, blocks))
      return -1;
    scalar_t* op = static_cast<scalar_t*>(out);
    return status(nft_emu::launch(
        dim3{blocks, 1, 1}, dim3{threads, 1, 1}, perturb_buffers(wp, op, n, samples, rng, sigmas, &max_bits),
        [&] { perturb_kernel<scalar_t>(wp, op, n, samples, rng, sigmas, &max_bits, scale, state_factor); }));
  });
}

// max|W| then perturb_device, as perturb_device_cuda launches them (the model's constants on the host).
int emu_perturb_device(int dtype, const void* w, void* out, int64_t n, int64_t samples, const int64_t* rng,
                       const float* sigmas, int kind, const double* params, unsigned blocks, unsigned threads) {
  const device::Args args = device::make_args(kind, params);
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* wp = static_cast<const scalar_t*>(w);
    unsigned max_bits = 0;
    if (!run_max_abs<scalar_t>(wp, n, &max_bits, blocks))
      return -1;
    scalar_t* op = static_cast<scalar_t*>(out);
    return device::dispatch_kind(kind, [&](auto k) {
      return status(nft_emu::launch(
          dim3{blocks, 1, 1}, dim3{threads, 1, 1}, perturb_buffers(wp, op, n, samples, rng, sigmas, &max_bits), [&] {
            perturb_device_kernel<scalar_t, decltype(k)::value>(wp, op, n, samples, rng, sigmas, &max_bits, args);
          }));
    });
  });
}

// max|W| then the fused GEMM (and the split reduction), as noisy_linear_cuda launches them. mode:
// 0 forward, 1 backward-input, 2 snapshot forward (A = act [m_rows][pool_c][pool_h][pool_w] pooled to
// pool x pool). parts = 0: the launcher's heuristic for sm_count SMs; *parts_used reports the choice.
int emu_noisy_gemm(int op, int w_dtype, int mode, const void* a, int64_t a_sample_stride, const void* w, int64_t n_w,
                   int64_t k_w, const void* bias, void* out, int64_t m_rows, int64_t samples, int reduce_samples,
                   const int64_t* rng, const float* sigmas, float scale, float state_factor, int64_t pool_c,
                   int64_t pool_h, int64_t pool_w, int pool, int parts, int sm_count, const unsigned* grid_cap,
                   int* parts_used) {
  const fused::PoolGeom geom{pool_c, pool_h, pool_w, pool};
  const LaunchShape shape{parts, sm_count, {grid_cap[0], grid_cap[1], grid_cap[2]}};
#define NFT_EMU_GEMM(OP, XT, WT)                                                                              \
  status(run_gemm_mode<fused::OP, XT, WT>(mode, a, a_sample_stride, w, bias, out, m_rows, n_w, k_w, samples,  \
                                          reduce_samples != 0, rng, sigmas, scale, state_factor, geom, shape, \
                                          parts_used))
  if (op == 0 && w_dtype == kF32)
    return NFT_EMU_GEMM(Bf16Op, c10::BFloat16, float);
#ifndef NFT_EMU_GEMM_ONLY_BF16
  if (op == 0 && w_dtype == kBF16)
    return NFT_EMU_GEMM(Bf16Op, c10::BFloat16, c10::BFloat16);
  if (op == 1 && w_dtype == kF32)
    return NFT_EMU_GEMM(Fp16Op, c10::Half, float);
  if (op == 1 && w_dtype == kF16)
    return NFT_EMU_GEMM(Fp16Op, c10::Half, c10::Half);
  if (op == 2 && w_dtype == kF32)
    return NFT_EMU_GEMM(Tf32Op, float, float);
#endif
#undef NFT_EMU_GEMM
  return -2;
}

}  // extern "C"
