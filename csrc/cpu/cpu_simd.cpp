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
#define NFT_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

namespace {

// hi/lo 32 bits of the eight products m * a (m broadcast): vpmuludq on the even and odd lanes.
NFT_AVX2_INLINE void mulhilo8(__m256i m, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6 as 64-bit products
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

// philox4x32_10 (philox.h) on eight counters at once; c[j] holds word j of each counter.
NFT_AVX2_INLINE void philox8(__m256i c[4], uint32_t k0, uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, hi0, lo0);
    mulhilo8(m1, c2, hi1, lo1);
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), vk0);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), vk1);
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  c[0] = c0;
  c[1] = c1;
  c[2] = c2;
  c[3] = c3;
}

// uniform_from_word: ((x >> 9) + 0.5) * 2^-23, every step exact in float32.
NFT_AVX2_INLINE __m256 uniform8(__m256i x) {
  const __m256 k = _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 9));
  return _mm256_mul_ps(_mm256_add_ps(k, _mm256_set1_ps(0.5f)), _mm256_set1_ps(1.1920928955078125e-07f));
}

// ln(u) for normal, positive, finite u (here u in [2^-24, 1)): u = 2^e * m with m in
// [sqrt(1/2), sqrt(2)), ln u = e ln2 + ln(1 + x), x = m - 1 (exact), the Cephes logf minimax
// polynomial for ln(1 + x) and ln2 split into 0.693359375 - 2.12194440e-4 (exact e * hi part).
NFT_AVX2_INLINE __m256 log8(__m256 u) {
  const __m256i bits = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);  // m in [1, 2)
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // mask is -1 where halved: e += 1
  const __m256 fe = _mm256_cvtepi32_ps(e);
  const __m256 x = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(poly::kLogP[0]);
  for (int i = 1; i < poly::kLogTerms; ++i)
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(poly::kLogP[i]));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, x), z);
  y = _mm256_fmadd_ps(fe, _mm256_set1_ps(poly::kLn2Lo), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  const __m256 r = _mm256_add_ps(x, y);
  return _mm256_fmadd_ps(fe, _mm256_set1_ps(poly::kLn2Hi), r);
}

// sincospi_host (normal.h) for x in (0, 2): same exact reduction and coefficients; the quadrant
// switch becomes a swap mask (j odd) and two sign flips (s: j & 2, c: (j + 1) & 2).
NFT_AVX2_INLINE void sincospi8(__m256 x, __m256& s, __m256& c) {
  const __m256 j = _mm256_round_ps(_mm256_add_ps(x, x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), j, x);  // exact
  const __m256 y2 = _mm256_mul_ps(y, y);
  __m256 sp = _mm256_set1_ps(poly::kSinPi[poly::kSinPiTerms - 1]);
  for (int i = poly::kSinPiTerms - 2; i >= 0; --i)
    sp = _mm256_fmadd_ps(sp, y2, _mm256_set1_ps(poly::kSinPi[i]));
  sp = _mm256_mul_ps(sp, y);
  __m256 cp = _mm256_set1_ps(poly::kCosPi[poly::kCosPiTerms - 1]);
  for (int i = poly::kCosPiTerms - 2; i >= 0; --i)
    cp = _mm256_fmadd_ps(cp, y2, _mm256_set1_ps(poly::kCosPi[i]));
  const __m256i q = _mm256_cvtps_epi32(j);  // j is an integer in [0, 4]
  const __m256 swap =
      _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256i two = _mm256_set1_epi32(2);
  const __m256 s_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(q, two), 30));
  const __m256 c_sign =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), two), 30));
  s = _mm256_xor_ps(_mm256_blendv_ps(sp, cp, swap), s_sign);
  c = _mm256_xor_ps(_mm256_blendv_ps(cp, sp, swap), c_sign);
}

// box_muller (normal.h): (r cos 2 pi ub, r sin 2 pi ub), r = sqrt(-2 ln ua).
NFT_AVX2_INLINE void box_muller8(__m256 ua, __m256 ub, __m256& zc, __m256& zs) {
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(ua)));
  __m256 s, c;
  sincospi8(_mm256_add_ps(ub, ub), s, c);
  zc = _mm256_mul_ps(r, c);
  zs = _mm256_mul_ps(r, s);
}

// The 32 normals of blocks q0 .. q0+7, element-major (z[4*i + l]).
NFT_AVX2_INLINE void normals8(uint64_t seed, uint64_t stream, uint64_t q0, float* z) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int i = 0; i < 8; ++i) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    lo[i] = static_cast<uint32_t>(q);
    hi[i] = static_cast<uint32_t>(q >> 32);
  }
  __m256i c[4];
  c[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  c[1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  c[2] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream)));
  c[3] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32)));
  philox8(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  __m256 z0, z1, z2, z3;  // lane l of blocks 0..7
  box_muller8(uniform8(c[0]), uniform8(c[1]), z0, z1);
  box_muller8(uniform8(c[2]), uniform8(c[3]), z2, z3);
  // 4x8 -> 8x4 transpose: out[4*i + l] = z_l[i].
  const __m256 t0 = _mm256_unpacklo_ps(z0, z1);  // z0 z1 of blocks 0,1 | 4,5
  const __m256 t1 = _mm256_unpackhi_ps(z0, z1);  // blocks 2,3 | 6,7
  const __m256 t2 = _mm256_unpacklo_ps(z2, z3);
  const __m256 t3 = _mm256_unpackhi_ps(z2, z3);
  const __m256 r0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));  // 0 | 4
  const __m256 r1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));  // 1 | 5
  const __m256 r2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));  // 2 | 6
  const __m256 r3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));  // 3 | 7
  _mm256_storeu_ps(z + 0, _mm256_permute2f128_ps(r0, r1, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
  _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(r0, r1, 0x31));
  _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(r2, r3, 0x31));
}

NFT_AVX2 void normals_avx2(uint64_t seed, uint64_t stream, uint64_t q0, int64_t nblocks, float* z) {
  int64_t i = 0;
  for (; i + 8 <= nblocks; i += 8)
    normals8(seed, stream, q0 + static_cast<uint64_t>(i), z + 4 * i);
  if (i < nblocks) {  // a partial group: the same eight-lane code, only the needed blocks kept
    alignas(32) float tmp[32];
    normals8(seed, stream, q0 + static_cast<uint64_t>(i), tmp);
    std::memcpy(z + 4 * i, tmp, sizeof(float) * 4 * static_cast<size_t>(nblocks - i));
  }
}

NFT_NO_CONTRACT_BEGIN
// perturb_f32_scalar on eight lanes: the same comparisons and a rounded product.
NFT_AVX2_INLINE __m256 perturb8(__m256 wv, __m256 zv, __m256 lo, __m256 hi, __m256 sb, __m256 si) {
  const __m256 aw = _mm256_and_ps(wv, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
  const __m256 in = _mm256_and_ps(_mm256_cmp_ps(aw, lo, _CMP_GT_OQ), _mm256_cmp_ps(aw, hi, _CMP_LT_OQ));
  const __m256 sw = _mm256_blendv_ps(sb, si, in);
  const __m256 prod = _mm256_mul_ps(sw, zv);  // rounded: contraction is off here (NFT_NO_CONTRACT_BEGIN)
  const __m256 noisy = _mm256_add_ps(wv, prod);
  return _mm256_blendv_ps(wv, noisy, _mm256_cmp_ps(sw, _mm256_setzero_ps(), _CMP_NEQ_UQ));  // sw == 0: w
}

NFT_AVX2 void perturb_f32_avx2(const float* w, float* o, const float* z, int64_t count, float t_lo, float t_hi,
                               float sigma_base, float sigma_in) {
  const __m256 lo = _mm256_set1_ps(t_lo), hi = _mm256_set1_ps(t_hi);
  const __m256 sb = _mm256_set1_ps(sigma_base), si = _mm256_set1_ps(sigma_in);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(o + i, perturb8(_mm256_loadu_ps(w + i), _mm256_loadu_ps(z + i), lo, hi, sb, si));
  }
  if (i < count) {  // the tail through the same lane code
    alignas(32) float wt[8] = {}, zt[8] = {}, ot[8];
    const size_t rest = static_cast<size_t>(count - i);
    std::memcpy(wt, w + i, sizeof(float) * rest);
    std::memcpy(zt, z + i, sizeof(float) * rest);
    _mm256_store_ps(ot, perturb8(_mm256_load_ps(wt), _mm256_load_ps(zt), lo, hi, sb, si));
    std::memcpy(o + i, ot, sizeof(float) * rest);
  }
}
NFT_NO_CONTRACT_END

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

// ---- AVX-512F: the same lane code as above on sixteen lanes (twice the work per instruction).
// Every function below mirrors its eight-lane namesake operation for operation (same FMAs, same
// order), so both widths give bit-identical normals; masks replace the blendv/and-mask idioms.

#define NFT_AVX512 __attribute__((target("avx512f")))
#define NFT_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

NFT_AVX512_INLINE void mulhilo16(__m512i m, __m512i a, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

NFT_AVX512_INLINE void philox16(__m512i c[4], uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(m0, c0, hi0, lo0);
    mulhilo16(m1, c2, hi1, lo1);
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
    c1 = lo1;
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  c[0] = c0;
  c[1] = c1;
  c[2] = c2;
  c[3] = c3;
}

NFT_AVX512_INLINE __m512 uniform16(__m512i x) {
  const __m512 k = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 9));
  return _mm512_mul_ps(_mm512_add_ps(k, _mm512_set1_ps(0.5f)), _mm512_set1_ps(1.1920928955078125e-07f));
}

NFT_AVX512_INLINE __m512 log16(__m512 u) {
  const __m512i bits = _mm512_castps_si512(u);
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(127));
  __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)), _mm512_set1_epi32(0x3F800000)));
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
  const __m512 fe = _mm512_cvtepi32_ps(e);
  const __m512 x = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(poly::kLogP[0]);
  for (int i = 1; i < poly::kLogTerms; ++i)
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(poly::kLogP[i]));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, x), z);
  y = _mm512_fmadd_ps(fe, _mm512_set1_ps(poly::kLn2Lo), y);
  y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
  const __m512 r = _mm512_add_ps(x, y);
  return _mm512_fmadd_ps(fe, _mm512_set1_ps(poly::kLn2Hi), r);
}

NFT_AVX512_INLINE void sincospi16(__m512 x, __m512& s, __m512& c) {
  const __m512 j = _mm512_roundscale_ps(_mm512_add_ps(x, x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), j, x);
  const __m512 y2 = _mm512_mul_ps(y, y);
  __m512 sp = _mm512_set1_ps(poly::kSinPi[poly::kSinPiTerms - 1]);
  for (int i = poly::kSinPiTerms - 2; i >= 0; --i)
    sp = _mm512_fmadd_ps(sp, y2, _mm512_set1_ps(poly::kSinPi[i]));
  sp = _mm512_mul_ps(sp, y);
  __m512 cp = _mm512_set1_ps(poly::kCosPi[poly::kCosPiTerms - 1]);
  for (int i = poly::kCosPiTerms - 2; i >= 0; --i)
    cp = _mm512_fmadd_ps(cp, y2, _mm512_set1_ps(poly::kCosPi[i]));
  const __m512i q = _mm512_cvtps_epi32(j);
  const __mmask16 swap = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512i two = _mm512_set1_epi32(2);
  const __m512i s_sign = _mm512_slli_epi32(_mm512_and_si512(q, two), 30);
  const __m512i c_sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), two), 30);
  s = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(swap, sp, cp)), s_sign));
  c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(swap, cp, sp)), c_sign));
}

NFT_AVX512_INLINE void box_muller16(__m512 ua, __m512 ub, __m512& zc, __m512& zs) {
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(ua)));
  __m512 s, c;
  sincospi16(_mm512_add_ps(ub, ub), s, c);
  zc = _mm512_mul_ps(r, c);
  zs = _mm512_mul_ps(r, s);
}

// The 64 normals of blocks q0 .. q0+15, element-major.
NFT_AVX512_INLINE void normals16(uint64_t seed, uint64_t stream, uint64_t q0, float* z) {
  alignas(64) uint32_t lo[16], hi[16];
  for (int i = 0; i < 16; ++i) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    lo[i] = static_cast<uint32_t>(q);
    hi[i] = static_cast<uint32_t>(q >> 32);
  }
  __m512i c[4];
  c[0] = _mm512_load_si512(lo);
  c[1] = _mm512_load_si512(hi);
  c[2] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream)));
  c[3] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32)));
  philox16(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  __m512 z0, z1, z2, z3;
  box_muller16(uniform16(c[0]), uniform16(c[1]), z0, z1);
  box_muller16(uniform16(c[2]), uniform16(c[3]), z2, z3);
  // 4x16 -> 16x4: within each 128-bit lane as in normals8, then a 4x4 transpose of the lanes.
  const __m512 t0 = _mm512_unpacklo_ps(z0, z1);
  const __m512 t1 = _mm512_unpackhi_ps(z0, z1);
  const __m512 t2 = _mm512_unpacklo_ps(z2, z3);
  const __m512 t3 = _mm512_unpackhi_ps(z2, z3);
  const __m512 r0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));  // 0|4|8|12
  const __m512 r1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));  // 1|5|9|13
  const __m512 r2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));  // 2|6|10|14
  const __m512 r3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));  // 3|7|11|15
  const __m512 a = _mm512_shuffle_f32x4(r0, r1, 0x44);                                                 // 0 4 1 5
  const __m512 b = _mm512_shuffle_f32x4(r2, r3, 0x44);                                                 // 2 6 3 7
  const __m512 cc = _mm512_shuffle_f32x4(r0, r1, 0xEE);                                                // 8 12 9 13
  const __m512 d = _mm512_shuffle_f32x4(r2, r3, 0xEE);                                                 // 10 14 11 15
  _mm512_storeu_ps(z + 0, _mm512_shuffle_f32x4(a, b, 0x88));                                           // 0 1 2 3
  _mm512_storeu_ps(z + 16, _mm512_shuffle_f32x4(a, b, 0xDD));                                          // 4 5 6 7
  _mm512_storeu_ps(z + 32, _mm512_shuffle_f32x4(cc, d, 0x88));                                         // 8 9 10 11
  _mm512_storeu_ps(z + 48, _mm512_shuffle_f32x4(cc, d, 0xDD));                                         // 12 13 14 15
}

NFT_AVX512 void normals_avx512(uint64_t seed, uint64_t stream, uint64_t q0, int64_t nblocks, float* z) {
  int64_t i = 0;
  for (; i + 16 <= nblocks; i += 16)
    normals16(seed, stream, q0 + static_cast<uint64_t>(i), z + 4 * i);
  if (i < nblocks) {
    alignas(64) float tmp[64];
    normals16(seed, stream, q0 + static_cast<uint64_t>(i), tmp);
    std::memcpy(z + 4 * i, tmp, sizeof(float) * 4 * static_cast<size_t>(nblocks - i));
  }
}

NFT_NO_CONTRACT_BEGIN
NFT_AVX512_INLINE __m512 perturb16(__m512 wv, __m512 zv, __m512 lo, __m512 hi, __m512 sb, __m512 si) {
  const __m512 aw = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(wv), _mm512_set1_epi32(0x7FFFFFFF)));
  const __mmask16 in = _mm512_cmp_ps_mask(aw, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(aw, hi, _CMP_LT_OQ);
  const __m512 sw = _mm512_mask_blend_ps(in, sb, si);
  const __m512 prod = _mm512_mul_ps(sw, zv);  // rounded: contraction is off here (NFT_NO_CONTRACT_BEGIN)
  const __m512 noisy = _mm512_add_ps(wv, prod);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(sw, _mm512_setzero_ps(), _CMP_NEQ_UQ), wv, noisy);
}

NFT_AVX512 void perturb_f32_avx512(const float* w, float* o, const float* z, int64_t count, float t_lo, float t_hi,
                                   float sigma_base, float sigma_in) {
  const __m512 lo = _mm512_set1_ps(t_lo), hi = _mm512_set1_ps(t_hi);
  const __m512 sb = _mm512_set1_ps(sigma_base), si = _mm512_set1_ps(sigma_in);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    _mm512_storeu_ps(o + i, perturb16(_mm512_loadu_ps(w + i), _mm512_loadu_ps(z + i), lo, hi, sb, si));
  }
  if (i < count) {  // the tail through the same lane code, masked
    const __mmask16 k = static_cast<__mmask16>((1u << (count - i)) - 1u);
    const __m512 r = perturb16(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, z + i), lo, hi, sb, si);
    _mm512_mask_storeu_ps(o + i, k, r);
  }
}
NFT_NO_CONTRACT_END

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
  return avx512_supported() && !avx2_requested_by_env() ? &normals_avx512 : &normals_avx2;
}

F32Kernels select_f32_kernels() {
  if (!simd_supported() || simd_disabled_by_env())
    return {&perturb_f32_scalar, &max_abs_f32_scalar};
  if (avx512_supported() && !avx2_requested_by_env())
    return {&perturb_f32_avx512, &max_abs_f32_avx2};
  return {&perturb_f32_avx2, &max_abs_f32_avx2};
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
