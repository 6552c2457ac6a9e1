// The SIMD lane code of cpu_simd.cpp, written once for both widths: templates over a vector-traits
// struct V (Avx2 or Avx512 there) that names the few operations whose idiom differs per width.
// Deliberately no include guard: cpu_simd.cpp includes this file once per width, inside that width's
// namespace and target region (GCC/clang cannot inline AVX intrinsics into a function without the
// target, so the templates must be defined where the target applies). Every width runs the same
// operations in the same order (same FMAs), so the widths give bit-identical results.

// philox4x32_10 (philox.h) on V::kLanes counters at once; c[j] holds word j of each counter.
template <class V>
NFT_LANE void philox(typename V::I c[4], uint32_t k0, uint32_t k1) {
  using I = typename V::I;
  const I m0 = V::set1i(kPhiloxM0), m1 = V::set1i(kPhiloxM1);
  I c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int round = 0; round < 10; ++round) {
    I hi0, lo0, hi1, lo1;
    V::mulhilo(m0, c0, hi0, lo0);
    V::mulhilo(m1, c2, hi1, lo1);
    c0 = V::xor3(hi1, c1, V::set1i(k0));
    c1 = lo1;
    c2 = V::xor3(hi0, c3, V::set1i(k1));
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
template <class V>
NFT_LANE typename V::F uniform(typename V::I x) {
  return V::mul(V::add(V::to_float(V::template srli<9>(x)), V::set1(0.5f)), V::set1(1.1920928955078125e-07f));
}

// ln(u) for normal, positive, finite u (here u in [2^-24, 1)): u = 2^e * m with m in
// [sqrt(1/2), sqrt(2)), ln u = e ln2 + ln(1 + x), x = m - 1 (exact), the Cephes logf minimax
// polynomial for ln(1 + x) and ln2 split into 0.693359375 - 2.12194440e-4 (exact e * hi part).
template <class V>
NFT_LANE typename V::F log(typename V::F u) {
  using F = typename V::F;
  using I = typename V::I;
  const I bits = V::bits(u);
  I e = V::subi(V::template srli<23>(bits), V::set1i(127));
  F m = V::from_bits(V::ori(V::andi(bits, V::set1i(0x007FFFFF)), V::set1i(0x3F800000)));
  const typename V::M big = V::gt(m, V::set1(1.41421356237f));  // m in [1, 2): halve it, e += 1
  m = V::select(big, m, V::mul(m, V::set1(0.5f)));
  e = V::inc_where(big, e);
  const F fe = V::to_float(e);
  const F x = V::sub(m, V::set1(1.0f));
  const F z = V::mul(x, x);
  F p = V::set1(poly::kLogP[0]);
  for (int i = 1; i < poly::kLogTerms; ++i)
    p = V::fmadd(p, x, V::set1(poly::kLogP[i]));
  F y = V::mul(V::mul(p, x), z);
  y = V::fmadd(fe, V::set1(poly::kLn2Lo), y);
  y = V::fnmadd(z, V::set1(0.5f), y);
  return V::fmadd(fe, V::set1(poly::kLn2Hi), V::add(x, y));
}

// sincospi_host (normal.h) for x in (0, 2): same exact reduction and coefficients; the quadrant
// switch becomes a swap mask (j odd) and two sign flips (s: j & 2, c: (j + 1) & 2).
template <class V>
NFT_LANE void sincospi(typename V::F x, typename V::F& s, typename V::F& c) {
  using F = typename V::F;
  using I = typename V::I;
  const F j = V::round(V::add(x, x));
  const F y = V::fnmadd(V::set1(0.5f), j, x);  // exact
  const F y2 = V::mul(y, y);
  F sp = V::set1(poly::kSinPi[poly::kSinPiTerms - 1]);
  for (int i = poly::kSinPiTerms - 2; i >= 0; --i)
    sp = V::fmadd(sp, y2, V::set1(poly::kSinPi[i]));
  sp = V::mul(sp, y);
  F cp = V::set1(poly::kCosPi[poly::kCosPiTerms - 1]);
  for (int i = poly::kCosPiTerms - 2; i >= 0; --i)
    cp = V::fmadd(cp, y2, V::set1(poly::kCosPi[i]));
  const I q = V::to_int(j);  // j is an integer in [0, 4]
  const typename V::M swap = V::odd(q);
  const I two = V::set1i(2);
  const I s_sign = V::template slli<30>(V::andi(q, two));
  const I c_sign = V::template slli<30>(V::andi(V::addi(q, V::set1i(1)), two));
  s = V::xor_bits(V::select(swap, sp, cp), s_sign);
  c = V::xor_bits(V::select(swap, cp, sp), c_sign);
}

// box_muller (normal.h): (r cos 2 pi ub, r sin 2 pi ub), r = sqrt(-2 ln ua).
template <class V>
NFT_LANE void box_muller(typename V::F ua, typename V::F ub, typename V::F& zc, typename V::F& zs) {
  const typename V::F r = V::sqrt(V::mul(V::set1(-2.0f), log<V>(ua)));
  typename V::F s, c;
  sincospi<V>(V::add(ub, ub), s, c);
  zc = V::mul(r, c);
  zs = V::mul(r, s);
}

// The 4 * V::kLanes normals of blocks q0 .. q0 + kLanes - 1, element-major (z[4*i + l]).
template <class V>
NFT_LANE void normals_group(uint64_t seed, uint64_t stream, uint64_t q0, float* z) {
  alignas(64) uint32_t lo[V::kLanes], hi[V::kLanes];
  for (int i = 0; i < V::kLanes; ++i) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    lo[i] = static_cast<uint32_t>(q);
    hi[i] = static_cast<uint32_t>(q >> 32);
  }
  typename V::I c[4] = {V::loadi(lo), V::loadi(hi), V::set1i(static_cast<uint32_t>(stream)),
                        V::set1i(static_cast<uint32_t>(stream >> 32))};
  philox<V>(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  typename V::F z0, z1, z2, z3;  // lane l of each block
  box_muller<V>(uniform<V>(c[0]), uniform<V>(c[1]), z0, z1);
  box_muller<V>(uniform<V>(c[2]), uniform<V>(c[3]), z2, z3);
  V::store_transposed(z, z0, z1, z2, z3);
}

// The entry points (select_normals / select_f32_kernels take their addresses), so not forced inline.
template <class V>
void normals(uint64_t seed, uint64_t stream, uint64_t q0, int64_t nblocks, float* z) {
  int64_t i = 0;
  for (; i + V::kLanes <= nblocks; i += V::kLanes)
    normals_group<V>(seed, stream, q0 + static_cast<uint64_t>(i), z + 4 * i);
  if (i < nblocks) {  // a partial group: the same lane code, only the needed blocks kept
    alignas(64) float tmp[4 * V::kLanes];
    normals_group<V>(seed, stream, q0 + static_cast<uint64_t>(i), tmp);
    std::memcpy(z + 4 * i, tmp, sizeof(float) * 4 * static_cast<size_t>(nblocks - i));
  }
}

NFT_NO_CONTRACT_BEGIN
// perturb_f32_scalar on V::kLanes lanes: the same comparisons and a rounded product.
template <class V>
NFT_LANE typename V::F perturb_group(typename V::F wv, typename V::F zv, typename V::F lo, typename V::F hi,
                                     typename V::F sb, typename V::F si) {
  using F = typename V::F;
  const F aw = V::from_bits(V::andi(V::bits(wv), V::set1i(0x7FFFFFFF)));
  const F sw = V::select(V::both(V::gt(aw, lo), V::lt(aw, hi)), sb, si);
  const F prod = V::mul(sw, zv);  // rounded: contraction is off here (NFT_NO_CONTRACT_BEGIN)
  const F noisy = V::add(wv, prod);
  return V::select(V::nonzero(sw), wv, noisy);  // sw == 0: w unchanged
}

template <class V>
void perturb(const float* w, float* o, const float* z, int64_t count, float t_lo, float t_hi, float sigma_base,
             float sigma_in) {
  using F = typename V::F;
  const F lo = V::set1(t_lo), hi = V::set1(t_hi);
  const F sb = V::set1(sigma_base), si = V::set1(sigma_in);
  int64_t i = 0;
  for (; i + V::kLanes <= count; i += V::kLanes)
    V::storeu(o + i, perturb_group<V>(V::loadu(w + i), V::loadu(z + i), lo, hi, sb, si));
  if (i < count) {  // the tail through the same lane code
    alignas(64) float wt[V::kLanes] = {}, zt[V::kLanes] = {}, ot[V::kLanes];
    const size_t rest = static_cast<size_t>(count - i);
    std::memcpy(wt, w + i, sizeof(float) * rest);
    std::memcpy(zt, z + i, sizeof(float) * rest);
    V::storeu(ot, perturb_group<V>(V::loadu(wt), V::loadu(zt), lo, hi, sb, si));
    std::memcpy(o + i, ot, sizeof(float) * rest);
  }
}
NFT_NO_CONTRACT_END
