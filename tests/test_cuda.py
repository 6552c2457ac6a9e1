"""CUDA-only checks (skipped only when no GPU is present): CPU/CUDA agreement and no host sync."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, PRESET_FACTORS, band_mask, normal64, sigma_w64, ulp

from nft_cuda import Variation, _ext, ops, reference, rng

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

needs_c = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded")


def _rng(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


@needs_c
def test_cuda_kernels_registered():
    for op in _ext.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nft_cuda::{op}", "CUDA"), op
    assert _ext.use_kernel("perturb", torch.device("cuda"))


def test_words_cpu_vs_cuda_bit_identical():
    g = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, (100_003, 4), dtype=torch.int64, generator=g)
    counter[:1000] = 2**32 - 1 - torch.randint(0, 64, (1000, 4), generator=g)
    for key in ([0, 0], [2**32 - 1, 2**32 - 1], [0xA4093822, 0x299F31D0]):
        k = torch.tensor(key, dtype=torch.int64)
        cpu = rng.philox4x32(counter, k)
        dev = rng.philox4x32(counter.cuda(), k.cuda())
        assert dev.device.type == "cuda"
        assert torch.equal(dev.cpu(), cpu)
        assert torch.equal(reference.philox4x32(counter.cuda(), k.cuda()).cpu(), cpu)


@pytest.mark.parametrize("seed,offset", [(0, 0), (123, 2**32 - 1), (2**63 - 1, 2**63 - 2)])
def test_normals_cpu_vs_cuda(seed, offset):
    n = 300_001
    cpu = rng.normal(n, seed, offset, streams=3)
    dev = rng.normal(n, seed, offset, streams=3, device="cuda")
    assert dev.device.type == "cuda" and dev.dtype == torch.float32
    torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=1e-5)
    want = normal64(n, seed, offset, 3)
    err = (dev.cpu().double() - want).abs().max().item()
    assert err <= 1e-5, f"CUDA normals off the float64 formula by {err:.3g}"


def test_normals_cuda_many_blocks():
    # More work than one grid-stride pass covers (grid is capped at 16 blocks per SM).
    n = 1 << 24
    z = rng.normal(n, 5, 6, device="cuda")
    tail = normal64(4099, 5, 6)  # element independence: prefix of the long call
    torch.testing.assert_close(z[:, :4099].cpu().double(), tail, rtol=0, atol=1e-5)
    idx = torch.tensor([n - 1, n - 2, n // 2 + 3])
    last = rng.normal(n, 5, 6)[:, idx]
    torch.testing.assert_close(z[:, idx.cuda()].cpu(), last, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", list(PRESET_FACTORS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_perturb_cpu_vs_cuda(dtype, preset):
    v = Variation(0.3, preset)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(65, 33, 3, 3, generator=g, dtype=torch.float64).to(dtype)
    w.view(-1)[:64] = torch.tensor([1.0, 0.25, 0.75, 0.5] * 16, dtype=dtype) * w.abs().max()
    sig = torch.tensor([0.3, 0.0, 0.1])
    cpu = ops.perturb(w, v, seed=9, offset=2**63 - 2, samples=3, sigmas=sig)
    dev = ops.perturb(w.cuda(), v, seed=9, offset=2**63 - 2, samples=3, sigmas=sig.cuda())
    assert dev.device.type == "cuda" and dev.dtype == dtype and dev.shape == cpu.shape
    assert torch.equal(dev[1].cpu(), w), "sigma 0 sample must be W exactly"
    sw = sigma_w64(w, sig, v.state_factor, v.scale)
    mag = torch.maximum(cpu.double().abs(), dev.cpu().double().abs())
    tol = 2 * ulp(mag, dtype) + 2e-5 * sw
    err = (dev.cpu().double() - cpu.double()).abs()
    assert (err <= tol).all(), f"max CPU/CUDA difference {err.max():.3g}"
    # identical band decisions (visible when s != 1): noise/z close to sigma_base or s*sigma_base
    if v.state_factor != 1.0:
        z = normal64(w.numel(), 9, 2**63 - 2, 3).view(sw.shape)
        keep = (z.abs() > 0.3) & (sw > 0)
        base = sw[0].amin()
        for name, out in (("cpu", cpu), ("cuda", dev.cpu())):
            ratio = ((out.double() - w.double()) / z)[0]
            inside = (ratio - base * v.state_factor).abs() < (ratio - base).abs()
            assert torch.equal(inside[keep[0]], band_mask(w)[keep[0]]), f"{name} band decisions differ"


@needs_c
def test_negative_device_sigma_poisons_sample():
    w = torch.randn(5, 7, device="cuda")
    sig = torch.tensor([-0.1, 0.1], device="cuda")  # not checked on the device (no host read)
    out = ops.perturb(w, Variation(0.1), rng=_rng(1, 2, "cuda"), samples=2, sigmas=sig)
    assert out[0].isnan().all(), "negative sigma_d on the device must give NaN, not silently flipped noise"
    assert out[1].isfinite().all()


def test_no_host_sync_rng_tensor_forward_backward():
    v = Variation(0.1, "FeFET2")
    w = torch.randn(257, 129, device="cuda", requires_grad=True)
    r = _rng(7, 8, "cuda")
    sig = torch.tensor([0.1, 0.05, 0.2, 0.0], device="cuda")
    g = torch.randn(4, 257, 129, device="cuda")
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.perturb(w, v, rng=r, samples=4, sigmas=sig)
        out.mul(g).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()
    torch.testing.assert_close(w.grad, g.sum(0))


def test_no_host_sync_int_seed():
    v = Variation(0.1, "RRAM4")
    w = torch.randn(64, 33, device="cuda")
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = ops.perturb(w, v, seed=2**63 - 1, offset=12, samples=2)
        b = ops.perturb(w, v, samples=2)  # rng drawn with torch.randint on the device
    finally:
        torch.cuda.set_sync_debug_mode(old)
    assert torch.equal(a, ops.perturb(w, v, rng=_rng(2**63 - 1, 12, "cuda"), samples=2))
    assert b.shape == (2, 64, 33)


def test_cuda_output_on_weight_device_and_stream():
    w = torch.randn(10, 10, device="cuda")
    s = torch.cuda.Stream()
    r = _rng(1, 2, "cuda")
    ref = ops.perturb(w, Variation(0.1), rng=r)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        out = ops.perturb(w, Variation(0.1), rng=r)
    s.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    w = torch.randn(33, 17, device="cuda:1")
    out = ops.perturb(w, Variation(0.1, "FeFET2"), rng=_rng(3, 4, "cuda:1"), samples=2)
    assert out.device == w.device
    torch.testing.assert_close(
        out.cpu(), ops.perturb(w.cpu(), Variation(0.1, "FeFET2"), seed=3, offset=4, samples=2), rtol=1e-6, atol=1e-6
    )
