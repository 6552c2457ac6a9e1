// Vectorised CPU normals: see cpu_simd.h for why this restates normal.h's formulas.
// Plain C++ (no ATen), so it can also be compiled into a stand-alone micro-benchmark.
#include "cpu_simd.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "nft_cuda/normal.h"
#include "nft_cuda/philox.h"
#include "nft_cuda/poly.h"
#include "nft_cuda/variation.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(NFT_CUDA_NO_SIMD)
#define NFT_CPU_AVX2 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define NFT_CPU_AVX2 0
#endif

// The noisy add rounds its product before adding (DESIGN §3), so the perturb lanes are compiled with
// FMA contraction off (GCC would fuse _mm256_mul_ps + _mm256_add_ps); clang contracts only within one
// expression, which these lanes never write. The normals use explicit FMA intrinsics, unaffected.
#if defined(__GNUC__) && !defined(__clang__)
#define NFT_NO_CONTRACT_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"fp-contract=off\")")
#define NFT_NO_CONTRACT_END _Pragma("GCC pop_options")
#else
#define NFT_NO_CONTRACT_BEGIN
#define NFT_NO_CONTRACT_END
#endif

namespace nft_cuda {
namespace cpu {

void normals_scalar(uint64_t seed, uint64_t stream, uint64_t q0, int64_t nblocks, float* z) {
  for (int64_t i = 0; i < nblocks; ++i) {
    const Normal4 n = normal4(seed, stream, q0 + static_cast<uint64_t>(i));
    z[4 * i + 0] = n.z[0];
    z[4 * i + 1] = n.z[1];
    z[4 * i + 2] = n.z[2];
    z[4 * i + 3] = n.z[3];
  }
}

void perturb_f32_scalar(const float* w, float* o, const float* z, int64_t count, float t_lo, float t_hi,
                        float sigma_base, float sigma_in) {
  StateBand band;
  band.t_lo = t_lo;
  band.t_hi = t_hi;
  band.sigma_base = sigma_base;
  band.sigma_in = sigma_in;
  for (int64_t i = 0; i < count; ++i)
    o[i] = add_noise<float>(w[i], sigma_w(band, std::fabs(w[i])), z[i]);
}

float max_abs_f32_scalar(const float* w, int64_t n, float acc) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(acc))
      return acc;
    const float a = std::fabs(w[i]);
    if (std::isnan(a))
      return a;
    acc = a > acc ? a : acc;
  }
  return acc;
}

namespace {
bool simd_disabled_by_env() {
  const char* env = std::getenv("NFT_CUDA_CPU_SIMD");
  return env != nullptr && env[0] == '0' && env[1] == '\0';
}
bool avx2_requested_by_env() {
  const char* env = std::getenv("NFT_CUDA_CPU_SIMD");
  return env != nullptr && std::strcmp(env, "avx2") == 0;
}
}  // namespace

#if NFT_CPU_AVX2

#define NFT_AVX2 __attribute__((target("avx2,fma")))
#define NFT_LANE __attribute__((always_inline)) inline

// The lane templates (cpu_simd_lanes.h) are compiled once per width inside a target region, so that
// they may inline that width's intrinsics.
#if defined(__clang__)
#define NFT_TARGET_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define NFT_TARGET_AVX512_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f\"))), apply_to = function)")
#define NFT_TARGET_END _Pragma("clang attribute pop")
#else
#define NFT_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define NFT_TARGET_AVX512_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")")
#define NFT_TARGET_END _Pragma("GCC pop_options")
#endif

namespace {

NFT_TARGET_AVX2_BEGIN
// Eight lanes: masks are all-ones float lanes (cmp_ps), selected with blendv.
struct Avx2 {
  using F = __m256;
  using I = __m256i;
  using M = __m256;
  static constexpr int kLanes = 8;
  static NFT_LANE I set1i(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static NFT_LANE I loadi(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static NFT_LANE I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static NFT_LANE I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
  static NFT_LANE I andi(I a, I b) { return _mm256_and_si256(a, b); }
  static NFT_LANE I ori(I a, I b) { return _mm256_or_si256(a, b); }
  static NFT_LANE I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  template <int N>
  static NFT_LANE I srli(I a) {
    return _mm256_srli_epi32(a, N);
  }
  template <int N>
  static NFT_LANE I slli(I a) {
    return _mm256_slli_epi32(a, N);
  }
  // hi/lo 32 bits of the products m * a (m broadcast): vpmuludq on the even and odd lanes.
  static NFT_LANE void mulhilo(I m, I a, I& hi, I& lo) {
    const I pe = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6 as 64-bit products
    const I po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
    lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  }
  static NFT_LANE F set1(float x) { return _mm256_set1_ps(x); }
  static NFT_LANE F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static NFT_LANE void storeu(float* p, F a) { _mm256_storeu_ps(p, a); }
  static NFT_LANE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static NFT_LANE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static NFT_LANE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static NFT_LANE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }    // a * b + c
  static NFT_LANE F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
  static NFT_LANE F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static NFT_LANE F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static NFT_LANE F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static NFT_LANE I to_int(F a) { return _mm256_cvtps_epi32(a); }
  static NFT_LANE I bits(F a) { return _mm256_castps_si256(a); }
  static NFT_LANE F from_bits(I a) { return _mm256_castsi256_ps(a); }
  static NFT_LANE F xor_bits(F a, I b) { return _mm256_xor_ps(a, _mm256_castsi256_ps(b)); }
  static NFT_LANE M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static NFT_LANE M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static NFT_LANE M nonzero(F a) { return _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_UQ); }
  static NFT_LANE M both(M a, M b) { return _mm256_and_ps(a, b); }
  static NFT_LANE M odd(I a) {
    const I one = _mm256_set1_epi32(1);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(a, one), one));
  }
  static NFT_LANE F select(M k, F if_clear, F if_set) { return _mm256_blendv_ps(if_clear, if_set, k); }
  static NFT_LANE I inc_where(M k, I a) { return _mm256_sub_epi32(a, _mm256_castps_si256(k)); }  // mask is -1
  // 4x8 -> 8x4 transpose: z[4*i + l] = z_l[i].
  static NFT_LANE void store_transposed(float* z, F z0, F z1, F z2, F z3) {
    const F t0 = _mm256_unpacklo_ps(z0, z1);  // z0 z1 of blocks 0,1 | 4,5
    const F t1 = _mm256_unpackhi_ps(z0, z1);  // blocks 2,3 | 6,7
    const F t2 = _mm256_unpacklo_ps(z2, z3);
    const F t3 = _mm256_unpackhi_ps(z2, z3);
    const F r0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));  // 0 | 4
    const F r1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));  // 1 | 5
    const F r2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));  // 2 | 6
    const F r3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));  // 3 | 7
    _mm256_storeu_ps(z + 0, _mm256_permute2f128_ps(r0, r1, 0x20));
    _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
    _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(r0, r1, 0x31));
    _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(r2, r3, 0x31));
  }
};
namespace avx2 {
#include "cpu_simd_lanes.h"
}  // namespace avx2
NFT_TARGET_END

NFT_TARGET_AVX512_BEGIN
// Sixteen lanes (AVX-512F): masks are __mmask16 bits; three-way xor is one ternarylogic. Mirrors Avx2
// name for name on purpose: the traits are the only per-width code (the lane logic is shared).
struct Avx512 {
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  static NFT_LANE I set1i(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static NFT_LANE I loadi(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static NFT_LANE I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static NFT_LANE I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
  static NFT_LANE I andi(I a, I b) { return _mm512_and_si512(a, b); }
  static NFT_LANE I ori(I a, I b) { return _mm512_or_si512(a, b); }
  static NFT_LANE I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }  // a ^ b ^ c
  template <int N>
  static NFT_LANE I srli(I a) {
    return _mm512_srli_epi32(a, N);
  }
  template <int N>
  static NFT_LANE I slli(I a) {
    return _mm512_slli_epi32(a, N);
  }
  static NFT_LANE void mulhilo(I m, I a, I& hi, I& lo) {
    const I pe = _mm512_mul_epu32(a, m);
    const I po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  }
  static NFT_LANE F set1(float x) { return _mm512_set1_ps(x); }
  static NFT_LANE F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static NFT_LANE void storeu(float* p, F a) { _mm512_storeu_ps(p, a); }
  static NFT_LANE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static NFT_LANE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static NFT_LANE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static NFT_LANE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static NFT_LANE F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static NFT_LANE F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static NFT_LANE F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static NFT_LANE F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static NFT_LANE I to_int(F a) { return _mm512_cvtps_epi32(a); }
  static NFT_LANE I bits(F a) { return _mm512_castps_si512(a); }
  static NFT_LANE F from_bits(I a) { return _mm512_castsi512_ps(a); }
  static NFT_LANE F xor_bits(F a, I b) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), b)); }
  static NFT_LANE M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static NFT_LANE M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static NFT_LANE M nonzero(F a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ); }
  static NFT_LANE M both(M a, M b) { return a & b; }
  static NFT_LANE M odd(I a) { return _mm512_test_epi32_mask(a, _mm512_set1_epi32(1)); }
  static NFT_LANE F select(M k, F if_clear, F if_set) { return _mm512_mask_blend_ps(k, if_clear, if_set); }
  static NFT_LANE I inc_where(M k, I a) { return _mm512_mask_add_epi32(a, k, a, _mm512_set1_epi32(1)); }
  // 4x16 -> 16x4: within each 128-bit lane as in Avx2, then a 4x4 transpose of the lanes.
  static NFT_LANE void store_transposed(float* z, F z0, F z1, F z2, F z3) {
    const F t0 = _mm512_unpacklo_ps(z0, z1);
    const F t1 = _mm512_unpackhi_ps(z0, z1);
    const F t2 = _mm512_unpacklo_ps(z2, z3);
    const F t3 = _mm512_unpackhi_ps(z2, z3);
    const F r0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));  // 0|4|8|12
    const F r1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));  // 1|5|9|13
    const F r2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));  // 2|6|10|14
    const F r3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));  // 3|7|11|15
    const F a = _mm512_shuffle_f32x4(r0, r1, 0x44);                                                 // 0 4 1 5
    const F b = _mm512_shuffle_f32x4(r2, r3, 0x44);                                                 // 2 6 3 7
    const F c = _mm512_shuffle_f32x4(r0, r1, 0xEE);                                                 // 8 12 9 13
    const F d = _mm512_shuffle_f32x4(r2, r3, 0xEE);                                                 // 10 14 11 15
    _mm512_storeu_ps(z + 0, _mm512_shuffle_f32x4(a, b, 0x88));                                      // 0 1 2 3
    _mm512_storeu_ps(z + 16, _mm512_shuffle_f32x4(a, b, 0xDD));                                     // 4 5 6 7
    _mm512_storeu_ps(z + 32, _mm512_shuffle_f32x4(c, d, 0x88));                                     // 8 9 10 11
    _mm512_storeu_ps(z + 48, _mm512_shuffle_f32x4(c, d, 0xDD));                                     // 12 13 14 15
  }
};
namespace avx512 {
#include "cpu_simd_lanes.h"
}  // namespace avx512
NFT_TARGET_END

NFT_AVX2 float max_abs_f32_avx2(const float* w, int64_t n, float acc) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m0 = _mm256_setzero_ps(), m1 = m0, nan0 = m0, nan1 = m0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a0 = _mm256_and_ps(_mm256_loadu_ps(w + i), abs_mask);
    const __m256 a1 = _mm256_and_ps(_mm256_loadu_ps(w + i + 8), abs_mask);
    m0 = _mm256_max_ps(m0, a0);
    m1 = _mm256_max_ps(m1, a1);
    nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps(a0, a0, _CMP_UNORD_Q));
    nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps(a1, a1, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(_mm256_or_ps(nan0, nan1)) != 0)
    return max_abs_f32_scalar(w, n, acc);  // that NaN
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  for (int l = 0; l < 8; ++l)
    acc = max_abs_f32_scalar(lanes + l, 1, acc);
  return max_abs_f32_scalar(w + i, n - i, acc);
}

}  // namespace

bool avx512_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

bool simd_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// NFT_CUDA_CPU_SIMD: unset or anything else = the widest supported path, "0" = scalar,
// "avx2" = at most AVX2 (for comparing the widths).
NormalsFn select_normals() {
  if (!simd_supported() || simd_disabled_by_env())
    return &normals_scalar;
  return avx512_supported() && !avx2_requested_by_env() ? &avx512::normals<Avx512> : &avx2::normals<Avx2>;
}

F32Kernels select_f32_kernels() {
  if (!simd_supported() || simd_disabled_by_env())
    return {&perturb_f32_scalar, &max_abs_f32_scalar};
  if (avx512_supported() && !avx2_requested_by_env())
    return {&avx512::perturb<Avx512>, &max_abs_f32_avx2};
  return {&avx2::perturb<Avx2>, &max_abs_f32_avx2};
}

#else  // no x86 SIMD path in this build

bool simd_supported() {
  return false;
}
NormalsFn select_normals() {
  return &normals_scalar;
}
F32Kernels select_f32_kernels() {
  return {&perturb_f32_scalar, &max_abs_f32_scalar};
}

#endif

}  // namespace cpu
}  // namespace nft_cuda
