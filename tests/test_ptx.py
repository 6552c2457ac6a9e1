"""Bit-exact device arithmetic (DESIGN §3, issue 13): the noise add W + σ_w·z rounds the product before the
add on the device, like the CPU kernel and the reference, instead of nvcc's default contraction into one
FMA. Checked on the PTX that nvcc emits for sm_90 (a few seconds; no GPU needed, only the CUDA toolkit,
which CI has since it compiles the CUDA kernels).

PTX ISA: "mul/add sequences with no rounding modifiers may be optimized to use fused-multiply-add
instructions"; an explicit .rn modifier is "treated conservatively" (never fused). So the noise add must
appear as mul.rn.f32 + add.rn.f32, and a control expression written naively must show an fma — proof
that the check can fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

PROBE = r"""
#include "cuda/perturb_device_kernel.cuh"
#include "cuda/perturb_kernel.cuh"
#include "nft_cuda/variation.h"

__global__ void probe_add_noise_f32(const float* w, const float* s, const float* z, float* o) {
  o[threadIdx.x] = nft_cuda::add_noise<float>(w[threadIdx.x], s[threadIdx.x], z[threadIdx.x]);
}
__global__ void probe_add_noise_f64(const double* w, const float* s, const float* z, double* o) {
  o[threadIdx.x] = nft_cuda::add_noise<double>(w[threadIdx.x], s[threadIdx.x], z[threadIdx.x]);
}
__global__ void probe_naive_control(const float* w, const float* s, const float* z, float* o) {
  o[threadIdx.x] = w[threadIdx.x] + s[threadIdx.x] * z[threadIdx.x];
}
__global__ void probe_device_madd(const double* a, const double* b, const double* c, double* o) {
  o[threadIdx.x] = nft_cuda::device::madd(a[threadIdx.x], b[threadIdx.x], c[threadIdx.x]);
}
__global__ void probe_f64_naive_fma(const double* a, const double* b, const double* c, double* o) {
  o[threadIdx.x] = a[threadIdx.x] * b[threadIdx.x] + c[threadIdx.x];
}
template __global__ void nft_cuda::perturb_device_kernel<float, 1>(const float*, float*, int64_t, int64_t,
                                                                   const int64_t*, const float*, const unsigned*,
                                                                   nft_cuda::device::Args);
template __global__ void nft_cuda::perturb_kernel<float>(const float*, float*, int64_t, int64_t, const int64_t*,
                                                         const float*, const unsigned*, float, float);
"""


def _nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, str]:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine; CI has one")
    d = tmp_path_factory.mktemp("ptx")
    src = d / "probe.cu"
    src.write_text(PROBE)
    out = d / "probe.ptx"
    cmd = [
        nvcc,
        "-std=c++17",
        "-arch=sm_90",
        "-O3",
        "-ptx",
        f"-I{CSRC}",
        f"-I{os.path.join(CSRC, 'include')}",
        f"-I{include_paths()[0]}",
        str(src),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bodies: dict[str, str] = {}
    name = None
    for line in out.read_text().splitlines():
        m = re.match(r"\.(?:visible|weak)?\s*\.entry\s+(\S+)\(", line)
        if m:
            name = m.group(1)
            bodies[name] = ""
        elif name is not None:
            bodies[name] += line + "\n"
    return bodies


def _body(ptx: dict[str, str], fragment: str) -> str:
    names = [n for n in ptx if fragment in n]
    assert len(names) == 1, f"{fragment}: entries {sorted(ptx)}"
    return ptx[names[0]]


def test_naive_expression_is_contracted(ptx):
    assert re.search(r"\bfma\.rn\.f32\b", _body(ptx, "probe_naive_control")), "control: nvcc no longer contracts"


@pytest.mark.parametrize("probe,add", [("probe_add_noise_f32", "add.rn.f32"), ("probe_add_noise_f64", "add.rn.f64")])
def test_noise_add_is_not_contracted(ptx, probe, add):
    body = _body(ptx, probe)
    assert not re.search(r"\bfma\.", body), f"{probe}: the noise add was contracted into an FMA"
    assert "mul.rn.f32" in body and add in body, f"{probe}: expected an explicitly rounded mul and add"


def test_perturb_kernel_rounds_the_product(ptx):
    body = _body(ptx, "perturb_kernel")
    # four lanes per thread, each one add_noise: explicitly rounded products and sums
    assert body.count("mul.rn.f32") >= 4 and body.count("add.rn.f32") >= 4


def test_device_model_madd_is_not_contracted(ptx):
    # device_models.h writes every x·y + z of the float64 device formulas as madd (issue 16).
    assert re.search(r"\bfma\.rn\.f64\b", _body(ptx, "probe_f64_naive_fma")), "control: nvcc no longer contracts"
    body = _body(ptx, "probe_device_madd")
    assert not re.search(r"\bfma\.", body) and "mul.rn.f64" in body and "add.rn.f64" in body


def test_perturb_device_kernel_compiles_for_sm90(ptx):
    body = _body(ptx, "perturb_device_kernel")
    assert "mul.rn.f64" in body and "add.rn.f64" in body  # the madd of the PCM formulas
