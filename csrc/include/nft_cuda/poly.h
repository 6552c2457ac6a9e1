// Polynomial coefficients of the host normals (DESIGN §3), one table for the scalar path (normal.h,
// sincospi_host) and for both SIMD widths (cpu/cpu_simd_lanes.h, one lane code for AVX2 and AVX-512):
// the same float constants, evaluated in the same Horner order (the SIMD lanes with FMA, hence their
// last-bit freedom).
#pragma once

namespace nft_cuda {
namespace poly {

// sin(πy) ≈ y·(S0 + y²·(S1 + y²·(S2 + y²·(S3 + y²·S4)))) for |y| <= 1/4 (Taylor, degree 9).
constexpr int kSinPiTerms = 5;
constexpr float kSinPi[kSinPiTerms] = {3.14159265358979f, -5.16771278004997f, 2.55016403987735f, -0.599264529320792f,
                                       0.0821458866111282f};

// cos(πy) ≈ C0 + y²·(C1 + y²·(C2 + y²·(C3 + y²·(C4 + y²·C5)))) for |y| <= 1/4 (Taylor, degree 10).
constexpr int kCosPiTerms = 6;
constexpr float kCosPi[kCosPiTerms] = {
    1.0f, -4.93480220054468f, 4.05871212641677f, -1.33526276885459f, 0.235330630358893f, -0.0258068913900141f};

// ln(1 + x) = x - x²/2 + x³·P(x) for x in [sqrt(1/2) - 1, sqrt(2) - 1): Cephes' logf minimax P,
// highest power first (P(x) = ((kLogP[0]·x + kLogP[1])·x + ...)·x + kLogP[8]); ln 2 split so that
// e·kLn2Hi is exact. Used by the SIMD lanes (the scalar path calls std::log).
constexpr int kLogTerms = 9;
constexpr float kLogP[kLogTerms] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                                    -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                    2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

}  // namespace poly
}  // namespace nft_cuda
