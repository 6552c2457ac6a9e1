// max|W| of a CPU weight in float32, NaN-propagating like torch.amax (DESIGN §4.1), shared by the
// CPU kernels that scale noise by max|W| (perturb_cpu.cpp, perturb_device_cpu.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <ATen/Parallel.h>

#include "cpu_simd.h"

namespace nft_cuda {
namespace cpu {

inline float nan_max(float a, float b) {
  if (std::isnan(a))
    return a;
  if (std::isnan(b))
    return b;
  return a > b ? a : b;
}

template <typename scalar_t>
float max_abs_cpu(const scalar_t* w, int64_t n) {
  const MaxAbsF32Fn max_abs_f32 = select_f32_kernels().max_abs;
  return at::parallel_reduce(
      0, n, 32768, 0.0f,
      [&](int64_t begin, int64_t end, float acc) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          return max_abs_f32(w + begin, end - begin, acc);
        } else {
          for (int64_t i = begin; i < end; ++i)
            acc = nan_max(acc, std::fabs(static_cast<float>(w[i])));
          return acc;
        }
      },
      nan_max);
}

}  // namespace cpu
}  // namespace nft_cuda
