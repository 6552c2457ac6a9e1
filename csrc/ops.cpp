// The one place where every nft_cuda operator schema is declared.
//
// Kernels attach per dispatch key in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake
// (meta) kernels and autograd are registered from Python (nft_cuda/_registrations.py), so the ops
// work under torch.compile and pass torch.library.opcheck.
#include <Python.h>

#include <torch/library.h>

// `import nft_cuda._C` only needs to load this shared object so the static TORCH_LIBRARY
// initialisers run; the module itself is empty (no pybind11, no Python-version coupling).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace {

int64_t cuda_version() {
#ifdef NFT_CUDA_VERSION
  return NFT_CUDA_VERSION;
#else
  return -1;
#endif
}

}  // namespace

TORCH_LIBRARY(nft_cuda, m) {
  // Raw Philox4x32-10 blocks: counter int64 [..., 4], key int64 [2] (words in [0, 2^32)).
  m.def("philox4x32(Tensor counter, Tensor key) -> Tensor");
  // float32 [streams, numel]: DESIGN §3 normals of elements 0..numel-1, streams offset.. (rng = (seed, offset)).
  m.def("philox_normal(Tensor rng, int numel, int streams) -> Tensor");
  // [S, *weight.shape]: W + sigma_w * z for sample t < S = sigmas.numel() (DESIGN §2, §4.1).
  m.def("perturb(Tensor weight, Tensor rng, Tensor sigmas, float scale, float state_factor) -> Tensor");
  // [S, *weight.shape]: the device model `kind` (1 PCM, 2 LogNormal, 3 StuckAt; docs/device-models.md)
  // applied to the weight for sample t < S = sigmas.numel() at severity sigmas[t], with the model's
  // params (csrc/include/nft_cuda/device_models.h), all draws from the stream rng = (seed, offset).
  m.def("perturb_device(Tensor weight, Tensor rng, Tensor sigmas, int kind, float[] params) -> Tensor");
  // Variation-sampled matmul (DESIGN §4.2): out[s] = x(s) · (W + noise_s)ᵀ + bias for s < S = sigmas.numel(),
  // the noise of sample s being exactly perturb(weight, rng, sigmas)[s]. shared_input: x [..., K] for
  // every sample, out [S, ..., N]; else x [S, ..., K], out [S, ..., N]. out has x's dtype. allow_tf32
  // lets the CUDA kernel run float32 on TF32 tensor cores (the Python wrapper reads torch's setting).
  m.def(
      "noisy_linear(Tensor x, Tensor weight, Tensor? bias, Tensor rng, Tensor sigmas, float scale, "
      "float state_factor, bool shared_input, bool allow_tf32=False) -> Tensor");
  // dX of noisy_linear: grad [S, ..., N] -> grad[s] · W_noisy[s] (noise regenerated), summed over s
  // when shared_input ([..., K]), else [S, ..., K]. Has grad's dtype.
  m.def(
      "_noisy_linear_backward_input(Tensor grad, Tensor weight, Tensor rng, Tensor sigmas, float scale, "
      "float state_factor, bool shared_input, bool allow_tf32=False) -> Tensor");
  // IRS snapshot capture (DESIGN §4.3): noisy_linear(flatten(adaptive_avg_pool2d(act, pool)), ...) with act
  // [B, C, H, W] (shared_input) or [S, B, C, H, W], weight [N, C*pool*pool]; out [S, B, N], act's dtype. On
  // CUDA the pooling runs in the GEMM's A-operand loader, so the snapshot is never written.
  m.def(
      "snapshot_linear(Tensor act, int pool, Tensor weight, Tensor? bias, Tensor rng, Tensor sigmas, float scale, "
      "float state_factor, bool shared_input, bool allow_tf32=False) -> Tensor");
  // CUDA_VERSION the extension was compiled with, -1 for a CPU-only build.
  m.def("_cuda_version() -> int", &cuda_version);
}
