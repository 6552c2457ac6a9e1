// Vectorised CPU normals and float32 perturb helpers (DESIGN §3, §4 "A SIMD CPU path ... may replace the scalar loop").
//
// Why this duplicates include/nft_cuda/{philox.h,normal.h}: those headers are the one shared
// definition of the per-element math, compiled by nvcc and by the host compiler, one element
// (one Philox block) at a time. On 2 CPU cores that scalar loop is compute-bound at ~4-5x the time
// of a copy (§8 asks for <= 4x), so the CPU kernels evaluate the *same formulas* eight Philox
// blocks at a time with AVX2+FMA intrinsics here (sixteen with AVX-512F, the same operations in
// the same order, so both widths give bit-identical normals):
//
//  - Philox4x32-10: the same rounds, constants and counter layout as philox.h; integer arithmetic,
//    so the words are bit-identical (tests/test_rng.py, tests/test_cpu_simd.py).
//  - u_j = ((x_j >> 9) + 0.5) * 2^-23: exact in float32, bit-identical to uniform_from_word.
//  - ln u: a vector logf (Cephes' minimax polynomial on [sqrt(1/2), sqrt(2)), <= ~2 ulp) instead
//    of std::log; sqrt is the correctly rounded vsqrtps, as std::sqrt.
//  - sin/cos(2 pi u_b): sincospi_host's reduction and polynomial coefficients, evaluated with FMA,
//    quadrant selection by bit masks instead of the switch.
//  - lane order 0..3 = (u0,u1) cos, (u0,u1) sin, (u2,u3) cos, (u2,u3) sin as in normal4().
//
// So the normals may differ from the scalar path in the last float32 bits (well inside the §3
// tolerance of 1e-5 absolute against float64; tests/test_cpu_simd.py checks both paths against
// float64 and against each other over millions of elements). Every lane runs the same
// instructions, so an element's normal depends only on (seed, stream, q), never on its position
// in a call, a chunk or a thread: calls of any length and any tiling agree bit for bit.
//
// The path is chosen at run time (CPUID via __builtin_cpu_supports): the functions carry
// __attribute__((target("avx2,fma"))) / target("avx512f"), so the rest of the extension keeps the
// baseline ISA and runs on any x86-64 (or non-x86) CPU through the scalar path. In the environment,
// NFT_CUDA_CPU_SIMD=0 forces the scalar path and NFT_CUDA_CPU_SIMD=avx2 caps the width at AVX2
// (read once per op call; used by the tests to compare the paths).
#pragma once

#include <cstdint>

namespace nft_cuda {
namespace cpu {

// z[4*i + l] = normal4(seed, stream, q0 + i).z[l] for 0 <= i < nblocks (4*nblocks floats).
using NormalsFn = void (*)(uint64_t seed, uint64_t stream, uint64_t q0, int64_t nblocks, float* z);

// The scalar path: normal4() from include/nft_cuda/normal.h, one block at a time.
void normals_scalar(uint64_t seed, uint64_t stream, uint64_t q0, int64_t nblocks, float* z);

// True when the AVX2+FMA path is compiled in and this CPU (and OS) supports it.
bool simd_supported();

// The kernel a CPU op should use for this call: the SIMD path when supported and not disabled by
// NFT_CUDA_CPU_SIMD=0, else the scalar path (AVX-512F when present, else AVX2+FMA). Call once per
// op call, outside parallel regions.
NormalsFn select_normals();

// float32 helpers of the perturb kernel, with the same SIMD/scalar selection. They restate
// variation.h (sigma_w, add_noise) and perturb_cpu.cpp's NaN-propagating max|W| lane-wise; the
// results are identical to the scalar code given the same normals (compare strictly, product
// rounded before the add, no FMA).
//
// o[i] = add_noise(w[i], sigma_w(band, |w[i]|), z[i]) for i < count.
using PerturbF32Fn = void (*)(const float* w, float* o, const float* z, int64_t count, float t_lo, float t_hi,
                              float sigma_base, float sigma_in);
// max |w[i]| over [0, n), starting from acc; NaN if acc or any w[i] is NaN.
using MaxAbsF32Fn = float (*)(const float* w, int64_t n, float acc);

void perturb_f32_scalar(const float* w, float* o, const float* z, int64_t count, float t_lo, float t_hi,
                        float sigma_base, float sigma_in);
float max_abs_f32_scalar(const float* w, int64_t n, float acc);

struct F32Kernels {
  PerturbF32Fn perturb;
  MaxAbsF32Fn max_abs;
};
F32Kernels select_f32_kernels();

}  // namespace cpu
}  // namespace nft_cuda
