"""The one random stream (DESIGN §3): Philox words, normals, independence, streams, moments."""

from __future__ import annotations

import pytest
import torch
from conftest import normal64

import nft_cuda
from nft_cuda import _ext, reference, rng

KAT = [
    # (counter, key, expected words): Random123 known-answer vectors for philox4x32_10.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

SEEDS_OFFSETS = [
    (0, 0),
    (1, 0),
    (123456789, 42),
    (0xDEADBEEFCAFEF00D & (2**63 - 1), 2**32 - 1),  # offset crosses the lo32 word boundary
    (2**63 - 1, 2**63 - 1),  # stream wraps past 2^63 (int64 sign) for t >= 1
    (2**62 + 17, 2**63 - 3),
]


def _hex(words):
    return [f"{int(w):08x}" for w in words]


def _random_words(gen, shape):
    """int64 words in [0, 2^32), a third of them within 1024 of 2^32 - 1, some exactly 0 / 2^32-1."""
    full = torch.randint(0, 2**32, shape, dtype=torch.int64, generator=gen)
    near_top = 2**32 - 1 - torch.randint(0, 1024, shape, dtype=torch.int64, generator=gen)
    pick = torch.randint(0, 3, shape, generator=gen)
    out = torch.where(pick == 0, near_top, full)
    out.view(-1)[:4] = 2**32 - 1
    out.view(-1)[4:8] = 0
    return out


# ---------------------------------------------------------------------------------------------
# (1) Known-answer vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["rng.philox4x32", "reference.philox4x32"])
@pytest.mark.parametrize("case", range(len(KAT)))
def test_philox_known_answers(impl, case, device):
    counter, key, expected = KAT[case]
    fn = rng.philox4x32 if impl == "rng.philox4x32" else reference.philox4x32
    c = torch.tensor([counter], dtype=torch.int64, device=device)
    k = torch.tensor(key, dtype=torch.int64, device=device)
    out = fn(c, k)
    assert out.dtype == torch.int64 and out.shape == (1, 4)
    assert _hex(out[0].tolist()) == _hex(expected), f"{impl} on {device}: KAT {case} mismatch"


def test_philox_batch_shape_and_kat_rows():
    # Leading batch dims are kept; each row is an independent block.
    c = torch.tensor([k[0] for k in KAT[:1]] * 6, dtype=torch.int64).view(2, 3, 4)
    k = torch.tensor(KAT[0][1], dtype=torch.int64)
    out = rng.philox4x32(c, k)
    assert out.shape == (2, 3, 4)
    for row in out.view(-1, 4).tolist():
        assert _hex(row) == _hex(KAT[0][2])


# ---------------------------------------------------------------------------------------------
# (2) compiled CPU kernel == reference, bit for bit
# ---------------------------------------------------------------------------------------------


def _require_c():
    if not _ext.HAS_C:
        pytest.skip("compiled extension not loaded")


def test_philox_kernel_matches_reference_random_words():
    _require_c()
    gen = torch.Generator().manual_seed(7)
    for trial in range(32):
        counter = _random_words(gen, (512, 4))
        key = _random_words(gen, (2,)) if trial else torch.tensor([2**32 - 1, 2**32 - 2])
        got = torch.ops.nft_cuda.philox4x32(counter, key)
        want = reference.philox4x32(counter, key)
        assert got.dtype == torch.int64
        assert ((got >= 0) & (got < 2**32)).all(), "words must be in [0, 2^32)"
        mismatch = (got != want).any(-1).nonzero().flatten()
        assert mismatch.numel() == 0, (
            f"trial {trial}: {mismatch.numel()} blocks differ, first counter "
            f"{_hex(counter[mismatch[0]].tolist())} key {_hex(key.tolist())}: "
            f"kernel {_hex(got[mismatch[0]].tolist())} vs reference {_hex(want[mismatch[0]].tolist())}"
        )


def test_philox_kernel_non_contiguous_counter():
    _require_c()
    gen = torch.Generator().manual_seed(11)
    counter = _random_words(gen, (4, 64))[:, ::4].t()  # [16, 4], non-contiguous
    key = _random_words(gen, (2,))
    assert not counter.is_contiguous()
    assert torch.equal(torch.ops.nft_cuda.philox4x32(counter, key), reference.philox4x32(counter.contiguous(), key))


def test_philox_empty_counter(device):
    c = torch.empty(0, 4, dtype=torch.int64, device=device)
    k = torch.zeros(2, dtype=torch.int64, device=device)
    assert rng.philox4x32(c, k).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# (3) CUDA words == CPU words
# ---------------------------------------------------------------------------------------------


def test_philox_device_matches_cpu(device):
    gen = torch.Generator().manual_seed(3)
    counter = _random_words(gen, (4096, 4))
    key = _random_words(gen, (2,))
    cpu = rng.philox4x32(counter, key)
    dev = rng.philox4x32(counter.to(device), key.to(device)).cpu()
    assert torch.equal(dev, cpu), f"{device} words differ from CPU words"


# ---------------------------------------------------------------------------------------------
# (4) normals vs an independent float64 evaluation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
@pytest.mark.parametrize("numel", [0, 1, 3, 5, 1025])
def test_normal_matches_float64_formula(seed, offset, numel, device):
    streams = 3
    z = rng.normal(numel, seed, offset, streams=streams, device=device)
    assert z.dtype == torch.float32 and z.shape == (streams, numel)
    assert z.device.type == device
    want = normal64(numel, seed, offset, streams)
    err = (z.cpu().double() - want).abs()
    assert err.numel() == 0 or err.max() <= 1e-5, f"max |z - z64| = {err.max():.3g} (seed={seed}, offset={offset})"


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS[:4] + [(5, 2**63 - 2)])
def test_reference_normal_matches_float64_formula(seed, offset):
    r = torch.tensor([seed, offset], dtype=torch.int64)
    z = reference.philox_normal(r, 1027, 4)
    assert z.dtype == torch.float32 and z.shape == (4, 1027)
    torch.testing.assert_close(z.double(), normal64(1027, seed, offset, 4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_normal_kernel_matches_reference(seed, offset, device):
    _require_c()
    r = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    got = torch.ops.nft_cuda.philox_normal(r, 4099, 3)
    want = reference.philox_normal(r.cpu(), 4099, 3)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)


def test_normal_large_sample_vs_float64():
    # 256k elements: the kernel's float32 Box–Muller stays within 1e-5 everywhere (tails included).
    z = rng.normal(1 << 18, 99, 7)
    want = normal64(1 << 18, 99, 7)
    err = (z.double() - want).abs().max().item()
    assert err <= 1e-5, f"max error {err:.3g}"


def test_normal_device_matches_cpu(device):
    for seed, offset in SEEDS_OFFSETS:
        cpu = rng.normal(2051, seed, offset, streams=2)
        dev = rng.normal(2051, seed, offset, streams=2, device=device).cpu()
        torch.testing.assert_close(dev, cpu, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (5) element independence and streams
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 3, 5, 6, 1025])
def test_element_independent_of_call_length(numel, device):
    long = rng.normal(4099, 31, 8, streams=2, device=device)
    short = rng.normal(numel, 31, 8, streams=2, device=device)
    assert torch.equal(short, long[:, :numel]), "element e must not depend on the call's numel"


@pytest.mark.parametrize("seed,offset", [(17, 0), (2**40 + 3, 2**32 - 2), (9, 2**63 - 4)])
def test_stream_t_equals_offset_plus_t(seed, offset, device):
    streams = 3
    many = rng.normal(777, seed, offset, streams=streams, device=device)
    for t in range(streams):
        one = rng.normal(777, seed, offset + t, streams=1, device=device)
        assert torch.equal(many[t : t + 1], one), f"stream {t} != offset+{t}"


def test_streams_wrap_mod_2_64(device):
    # offset 2^63-1 with 4 streams reaches 2^63 .. 2^63+2 (negative as int64): the float64 oracle
    # uses (offset + t) mod 2^64 explicitly.
    z = rng.normal(9, 1, 2**63 - 1, streams=4, device=device).cpu().double()
    torch.testing.assert_close(z, normal64(9, 1, 2**63 - 1, 4), rtol=0, atol=1e-5)
    assert not torch.equal(z[0], z[1]) and not torch.equal(z[1], z[2])


def test_distinct_keys_and_streams_differ():
    a = rng.normal(64, 1, 0)
    assert not torch.equal(a, rng.normal(64, 2, 0))
    assert not torch.equal(a, rng.normal(64, 1, 1))
    assert torch.equal(a, rng.normal(64, 1, 0))


# ---------------------------------------------------------------------------------------------
# (6) moments
# ---------------------------------------------------------------------------------------------


def test_normal_moments():
    n = 1 << 20
    z = rng.normal(n, 2024, 5).double().flatten()
    mean, std = z.mean().item(), z.std().item()
    assert abs(mean) < 5 / n**0.5, f"mean {mean}"
    assert abs(std - 1) < 5e-3, f"std {std}"
    frac1 = (z.abs() < 1).double().mean().item()
    assert abs(frac1 - 0.682689) < 3e-3, f"P(|z|<1) = {frac1}"
    # every lane (cos/sin of both pairs) is standard normal on its own, and cos/sin are uncorrelated
    lanes = z.view(-1, 4)
    for lane in range(4):
        assert abs(lanes[:, lane].mean()) < 0.01 and abs(lanes[:, lane].std() - 1) < 0.01, f"lane {lane}"
    corr = torch.corrcoef(lanes.t())
    off_diag = corr - torch.eye(4, dtype=corr.dtype)
    assert off_diag.abs().max() < 0.01, f"lane correlation {off_diag.abs().max():.3g}"


def test_normal_default_device_is_cpu():
    assert rng.normal(4, 0, 0).device.type == "cpu"


def test_module_exports():
    assert nft_cuda.rng.philox4x32 is rng.philox4x32 and nft_cuda.rng.normal is rng.normal


@pytest.mark.parametrize("seed, offset", SEEDS_OFFSETS)
def test_normals_of_blocks_match_the_reference_blocks(seed, offset):
    """The read/output-noise normals (compiled Philox rounds, PyTorch Box–Muller) equal the pure-PyTorch
    blocks bit for bit, at block counters near 2^32, with a draw offset, and wrapped past 2^63."""
    _require_c()
    r = torch.tensor([seed, offset], dtype=torch.int64)
    for base in (0, 2**32 - 3, (9 << reference.DRAW_SHIFT) + (5 << 32), 2**63 - 2):
        q = torch.arange(600, dtype=torch.int64) + base  # wraps to negative int64 past 2^63, read as uint64
        got = rng.normals_of_blocks(r, q)
        assert got.dtype == torch.float32 and got.shape == (600, 4)
        assert torch.equal(got, reference.philox_normal_blocks(r, q)), (seed, offset, base)
