// CPU kernels of the raw-RNG ops: philox4x32 (checking API) and philox_normal (DESIGN §3).
#include <algorithm>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_simd.h"
#include "nft_cuda/normal.h"
#include "nft_cuda/philox.h"
#include "op_checks.h"

namespace nft_cuda {
namespace {

at::Tensor philox4x32_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_counter_key(counter, key);
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options());
  const int64_t rows = c.numel() / 4;
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t* kp = k.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const uint32_t k0 = static_cast<uint32_t>(kp[0]);
  const uint32_t k1 = static_cast<uint32_t>(kp[1]);
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      PhiloxWords in;
      for (int j = 0; j < 4; ++j)
        in.x[j] = static_cast<uint32_t>(cp[4 * r + j]);
      const PhiloxWords w = philox4x32_10(in, k0, k1);
      for (int j = 0; j < 4; ++j)
        op[4 * r + j] = static_cast<int64_t>(w.x[j]);
    }
  });
  return out;
}

at::Tensor philox_normal_cpu(const at::Tensor& rng, int64_t numel, int64_t streams) {
  check_normal_args(rng, numel, streams);
  const at::Tensor r = rng.contiguous();
  const uint64_t seed = static_cast<uint64_t>(r.const_data_ptr<int64_t>()[0]);
  const uint64_t offset = static_cast<uint64_t>(r.const_data_ptr<int64_t>()[1]);
  at::Tensor out = at::empty({streams, numel}, rng.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  const int64_t nq = (numel + 3) / 4;
  const int64_t full = numel / 4;  // blocks written in place; a trailing partial block goes via tmp
  const cpu::NormalsFn normals = cpu::select_normals();  // SIMD or scalar, same noise (cpu_simd.h)
  for (int64_t t = 0; t < streams; ++t) {
    float* row = op + t * numel;
    const uint64_t stream = offset + static_cast<uint64_t>(t);
    at::parallel_for(0, nq, 2048, [&](int64_t begin, int64_t end) {
      const int64_t stop = std::min(end, full);
      if (stop > begin)
        normals(seed, stream, static_cast<uint64_t>(begin), stop - begin, row + 4 * begin);
      if (end > full) {  // this range holds the partial block q = full
        float tmp[4];
        normals(seed, stream, static_cast<uint64_t>(full), 1, tmp);
        for (int64_t l = 0; l < numel - 4 * full; ++l)
          row[4 * full + l] = tmp[l];
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nft_cuda, CPU, m) {
  m.impl("philox4x32", &philox4x32_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace nft_cuda
