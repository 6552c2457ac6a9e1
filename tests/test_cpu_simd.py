"""The vectorised CPU path (csrc/cpu/cpu_simd.{h,cpp}) against the scalar path and float64.

The CPU kernels pick an AVX2+FMA implementation at run time when the CPU has it; the environment
variable NFT_CUDA_CPU_SIMD=0 (read on every op call) forces the scalar path built from the shared
headers (include/nft_cuda/normal.h). DESIGN §3/§4: the SIMD path may replace the scalar loop if it
gives the same Philox words and normals within 1e-5 of the float64 formula. Here both paths are run
on the same streams over millions of elements and compared with each other and with float64; the
perturb helpers (state band, add, max|W|) must agree exactly given the normals.
"""

from __future__ import annotations

import pytest
import torch
from conftest import band_mask, normal64

from nft_cuda import Variation, _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded")


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def test_avx512_and_avx2_widths_agree_bit_for_bit(monkeypatch):
    # Sixteen-lane and eight-lane code perform the same operations in the same order.
    r = torch.tensor([77, 2**32 - 2], dtype=torch.int64)
    monkeypatch.setenv("NFT_CUDA_CPU_SIMD", "avx2")
    narrow = torch.ops.nft_cuda.philox_normal(r, (1 << 19) + 5, 2)
    monkeypatch.delenv("NFT_CUDA_CPU_SIMD")
    wide = torch.ops.nft_cuda.philox_normal(r, (1 << 19) + 5, 2)
    assert torch.equal(narrow, wide)


def _both_paths(monkeypatch, fn):
    """(simd, scalar) results of fn(); simd is the default path, scalar forced by the env switch."""
    monkeypatch.delenv("NFT_CUDA_CPU_SIMD", raising=False)
    simd = fn()
    monkeypatch.setenv("NFT_CUDA_CPU_SIMD", "0")
    scalar = fn()
    monkeypatch.delenv("NFT_CUDA_CPU_SIMD")
    return simd, scalar


@pytest.mark.parametrize("seed,offset", [(99, 7), (2**63 - 1, 2**63 - 1), (0xDEADBEEF, 2**32 - 1)])
def test_simd_normals_match_scalar_and_float64(monkeypatch, seed, offset):
    numel, streams = (1 << 20) + 3, 2  # 2M normals, a partial block and a partial group of eight
    r = torch.tensor([seed, offset], dtype=torch.int64)
    simd, scalar = _both_paths(monkeypatch, lambda: torch.ops.nft_cuda.philox_normal(r, numel, streams))
    want = normal64(numel, seed, offset, streams)
    err_simd = (simd.double() - want).abs().max().item()
    err_scalar = (scalar.double() - want).abs().max().item()
    assert err_simd <= 1e-5, f"SIMD normals: max |z - z64| = {err_simd:.3g}"
    assert err_scalar <= 1e-5, f"scalar normals: max |z - z64| = {err_scalar:.3g}"
    # Both are float32 evaluations of one formula: they differ by a few float32 ulps at most.
    assert (simd - scalar).abs().max().item() <= 2e-6
    if _cpu_has_avx2_fma():  # the switch really selects two implementations
        assert not torch.equal(simd, scalar), "NFT_CUDA_CPU_SIMD=0 did not change the path"


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 31, 32, 33, 129, 8195])
def test_simd_normals_independent_of_call_length_and_start(numel):
    # Every element is computed by the same lane code wherever it falls in a group of eight.
    r = torch.tensor([31, 8], dtype=torch.int64)
    long = torch.ops.nft_cuda.philox_normal(r, 40000, 1)
    short = torch.ops.nft_cuda.philox_normal(r, numel, 1)
    assert torch.equal(short, long[:, :numel])


@pytest.mark.parametrize("samples", [1, 3])
def test_simd_perturb_matches_scalar(monkeypatch, samples):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(999, 1031, generator=g)  # odd: partial blocks, groups of eight and chunks
    w.view(-1)[::97] = 0.0
    w.view(-1)[5] = -w.abs().max()  # the maximum is negative: |w| is taken
    v = Variation(0.1, "FeFET6")
    sig = torch.tensor([0.1, 0.0, 0.05][:samples], dtype=torch.float32)
    rng = torch.tensor([12345, 6], dtype=torch.int64)

    def perturb():
        return torch.ops.nft_cuda.perturb(w, rng, sig, v.scale, v.state_factor)

    simd, scalar = _both_paths(monkeypatch, perturb)
    z_simd, z_scalar = _both_paths(monkeypatch, lambda: torch.ops.nft_cuda.philox_normal(rng, w.numel(), samples))
    m = w.abs().max()
    inside = band_mask(w).view(-1)
    for t in range(samples):
        base = (sig[t] * m) * torch.tensor(v.scale, dtype=torch.float32)
        sw = torch.where(inside, base * torch.tensor(v.state_factor, dtype=torch.float32), base)
        for out, z in ((simd, z_simd), (scalar, z_scalar)):
            # Given its own normals, each path is W + round(σ_w·z) exactly (same band, no FMA).
            want = torch.where(sw == 0, w.view(-1), w.view(-1) + sw * z[t])
            assert torch.equal(out[t].view(-1), want)
        diff = (simd[t] - scalar[t]).abs().view(-1)
        assert (diff <= 2e-6 * sw + 2 * torch.finfo(torch.float32).eps * w.abs().view(-1) + 1e-30).all()
    if samples > 1:
        assert torch.equal(simd[1], w), "sigma_d = 0: W exactly"


def test_simd_max_abs_nan_and_inf(monkeypatch):
    v = Variation(0.1, "RRAM4")
    sig = torch.tensor([0.1], dtype=torch.float32)
    rng = torch.tensor([1, 2], dtype=torch.int64)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(70001)
        w[40000] = bad

        def perturb():
            return torch.ops.nft_cuda.perturb(w, rng, sig, v.scale, v.state_factor)

        simd, scalar = _both_paths(monkeypatch, perturb)
        torch.testing.assert_close(simd, scalar, rtol=0, atol=0, equal_nan=True)
