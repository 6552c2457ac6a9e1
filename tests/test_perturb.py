"""perturb (DESIGN §2, §4.1): W + σ_w·z against an independent float64 evaluation.

Every test runs on each device (CPU; CUDA when present) and, where it makes sense, on both
backends: "kernel" (nft_cuda.ops.perturb -> torch.ops.nft_cuda.perturb) and "reference"
(nft_cuda.reference.perturb called directly with the same rng and sigmas tensors).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, PRESET_FACTORS, band_mask, normal64, sigma_w64, ulp

from nft_cuda import Variation, _ext, ops, reference

BACKENDS = ["kernel", "reference"]
HALF_TYPES = (torch.float16, torch.bfloat16)
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}

needs_c = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded")


def make_rng(seed: int, offset: int, device) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def run(backend, weight, variation, rng, samples=1, sigmas=None):
    """perturb through ``backend`` with identical rng / sigma inputs."""
    if backend == "kernel":
        return ops.perturb(weight, variation, rng=rng, samples=samples, sigmas=sigmas)
    if sigmas is None:
        sig = torch.full((samples,), variation.sigma, dtype=torch.float32, device=weight.device)
    else:
        sig = torch.as_tensor(sigmas, dtype=torch.float32).to(weight.device)
    return reference.perturb(weight, rng, sig, variation.scale, variation.state_factor)


def expected_and_tolerance(weight, variation, seed, offset, samples, sigmas=None):
    """float64 W + σ_w·z (independent oracle) and the per-element tolerance, on CPU."""
    sig = [variation.sigma] * samples if sigmas is None else [float(s) for s in torch.as_tensor(sigmas).cpu()]
    sw = sigma_w64(weight, sig, variation.state_factor, variation.scale)
    z = normal64(weight.numel(), seed, offset, samples).view(sw.shape)
    w64 = weight.detach().cpu().double().unsqueeze(0)
    want = w64 + sw * z
    mag = torch.maximum(w64.abs().expand_as(want), want.abs())
    ulps = 1 if weight.dtype in HALF_TYPES else 2
    tol = ulps * ulp(mag, weight.dtype) + 1e-5 * sw
    return want, tol, sw, z


def assert_matches_oracle(out, weight, variation, seed, offset, samples, sigmas=None, what=""):
    want, tol, _, _ = expected_and_tolerance(weight, variation, seed, offset, samples, sigmas)
    assert out.shape == (samples, *weight.shape), f"{what}: shape {tuple(out.shape)}"
    assert out.dtype == weight.dtype, f"{what}: dtype {out.dtype}"
    err = (out.detach().cpu().double() - want).abs()
    bad = err > tol
    if bad.any():
        i = bad.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first flat index {i}: "
            f"got {out.detach().cpu().double().flatten()[i].item()!r}, want {want.flatten()[i].item()!r}, "
            f"err {err.flatten()[i].item():.3g} > tol {tol.flatten()[i].item():.3g}"
        )


def random_weight(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# values against the float64 oracle
# ---------------------------------------------------------------------------------------------

SHAPE_SAMPLES = [(shape, s) for shape in [(1,), (3,), (7, 13), (65, 33, 3, 3)] for s in range(1, 6)]
SHAPE_SAMPLES_IDS = [f"{'x'.join(map(str, shape))}-S{s}" for shape, s in SHAPE_SAMPLES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", list(PRESET_FACTORS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,samples", SHAPE_SAMPLES, ids=SHAPE_SAMPLES_IDS)
def test_perturb_matches_float64(shape, samples, dtype, preset, backend, device):
    v = Variation(0.1, preset)
    seed, offset = 1000 + len(shape), 2**32 - 2  # streams cross the lo32 boundary for S >= 3
    w = random_weight(shape, dtype, device, seed=len(shape))
    out = run(backend, w, v, make_rng(seed, offset, device), samples)
    assert out.device == w.device
    assert_matches_oracle(out, w, v, seed, offset, samples, what=f"{backend}/{device}/{dtype}/{preset}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_large_offset_wraps(backend, device):
    v = Variation(0.2, "FeFET2")
    seed, offset = 2**63 - 1, 2**63 - 2  # streams 2^63-2, 2^63-1, 2^63, 2^63+1
    w = random_weight((9, 11), torch.float32, device)
    out = run(backend, w, v, make_rng(seed, offset, device), 4)
    assert_matches_oracle(out, w, v, seed, offset, 4, what=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_per_sample_sigmas_tensor(dtype, backend, device):
    v = Variation(0.1, "RRAM4")
    w = random_weight((17, 5), dtype, device)
    sig = torch.tensor([0.0, 0.05, 0.3, 0.1], device=device)
    out = run(backend, w, v, make_rng(5, 6, device), 4, sigmas=sig)
    assert torch.equal(out[0], w), "sample with sigma_d = 0 must be W exactly"
    assert_matches_oracle(out, w, v, 5, 6, 4, sigmas=sig.cpu(), what=f"{backend}/{dtype}")


def test_per_sample_sigmas_list_and_float64_tensor(device):
    v = Variation(0.1, "FeFET6")
    w = random_weight((8, 9), torch.float32, device)
    r = make_rng(8, 9, device)
    a = ops.perturb(w, v, rng=r, samples=3, sigmas=[0.02, 0.0, 0.4])
    b = ops.perturb(w, v, rng=r, samples=3, sigmas=torch.tensor([0.02, 0.0, 0.4], dtype=torch.float64, device=device))
    c = ops.perturb(w, v, rng=r, samples=3, sigmas=torch.tensor([9, 0.02, 5, 0.0, 7, 0.4], device=device)[1::2])
    assert torch.equal(a, b) and torch.equal(a, c)
    assert_matches_oracle(a, w, v, 8, 9, 3, sigmas=[0.02, 0.0, 0.4])


def test_default_sigmas_equal_variation_sigma(device):
    v = Variation(0.07, "FeFET2")
    w = random_weight((6, 7), torch.float32, device)
    r = make_rng(1, 2, device)
    assert torch.equal(ops.perturb(w, v, rng=r, samples=2), ops.perturb(w, v, rng=r, samples=2, sigmas=[0.07, 0.07]))


@needs_c
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kernel_matches_reference_and_same_band(dtype, device):
    v = Variation(0.3, "FeFET6")
    w = random_weight((33, 31), dtype, device, seed=4)
    r = make_rng(77, 88, device)
    k = run("kernel", w, v, r, 3)
    ref = run("reference", w, v, r, 3)
    mag = torch.maximum(k.detach().cpu().double().abs(), ref.cpu().double().abs())
    sw = sigma_w64(w, [0.3] * 3, 6.0, v.scale)
    tol = 2 * ulp(mag, dtype) + 1e-5 * sw
    assert ((k.cpu().double() - ref.cpu().double()).abs() <= tol).all()
    # band decisions: the ratio of the noise to z picks sigma_base vs 6*sigma_base identically
    z = normal64(w.numel(), 77, 88, 3).view(sw.shape)
    keep = z.abs() > 0.25
    ratio_k = (k.cpu().double() - w.cpu().double()) / z
    ratio_r = (ref.cpu().double() - w.cpu().double()) / z
    base = sw.amin()
    in_k = (ratio_k > 2.5 * base)[keep]
    in_r = (ratio_r > 2.5 * base)[keep]
    assert torch.equal(in_k, in_r)
    assert torch.equal(in_k, band_mask(w).unsqueeze(0).expand_as(sw)[keep])


# ---------------------------------------------------------------------------------------------
# layouts and special inputs
# ---------------------------------------------------------------------------------------------


def _non_contiguous_weights(device):
    base = random_weight((20, 30), torch.float32, device, seed=9)
    return {
        "transposed": base.t(),
        "strided": base[::3, 1::2],
        "negative-step-like": base.flip(0)[:, 5:20],  # flip copies; slicing is a view
        "permuted-3d": random_weight((4, 5, 6), torch.float32, device).permute(2, 0, 1),
        "expanded": random_weight((1, 7), torch.float32, device).expand(5, 7),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["transposed", "strided", "negative-step-like", "permuted-3d", "expanded"])
def test_non_contiguous_weight(kind, backend, device):
    w = _non_contiguous_weights(device)[kind]
    v = Variation(0.15, "RRAM4")
    r = make_rng(42, 3, device)
    out = run(backend, w, v, r, 3)
    ref = run(backend, w.contiguous(), v, r, 3)
    assert out.shape == (3, *w.shape)
    assert torch.equal(out, ref), f"{kind}: noise must be keyed on the logical index"
    assert_matches_oracle(out, w, v, 42, 3, 3, what=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_weight(dtype, backend, device):
    w = random_weight((8, 3, 5, 5), dtype, device).to(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    v = Variation(0.1, "FeFET2")
    r = make_rng(3, 4, device)
    out = run(backend, w, v, r, 2)
    assert torch.equal(out, run(backend, w.contiguous(), v, r, 2))
    assert_matches_oracle(out, w, v, 3, 4, 2)


@needs_c
def test_non_contiguous_rng_and_sigmas(device):
    # rng / sigmas views (stride 2) must be read like their contiguous copies.
    w = random_weight((5, 3), torch.float32, device)
    v = Variation(0.1, "FeFET2")
    holder = torch.tensor([12345, -1, 678, -1], dtype=torch.int64, device=device)
    rng_view = holder[::2]
    assert not rng_view.is_contiguous()
    sig_holder = torch.tensor([0.1, -5.0, 0.2, -5.0], device=device)
    a = ops.perturb(w, v, rng=rng_view, samples=2)
    b = ops.perturb(w, v, rng=rng_view.contiguous(), samples=2)
    assert torch.equal(a, b), "non-contiguous rng tensor gives different noise"
    raw = torch.ops.nft_cuda.perturb(w, rng_view, sig_holder[::2], v.scale, v.state_factor)
    raw_c = torch.ops.nft_cuda.perturb(w, rng_view.contiguous(), sig_holder[::2].contiguous(), v.scale, v.state_factor)
    assert torch.equal(raw, raw_c), "raw op: non-contiguous rng/sigmas give different noise"
    assert_matches_oracle(a, w, v, 12345, 678, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,), (2, 0, 3)])
def test_empty_weight(shape, backend, device):
    w = torch.empty(shape, device=device)
    out = run(backend, w, Variation(0.1, "FeFET2"), make_rng(1, 1, device), 3)
    assert out.shape == (3, *shape) and out.dtype == w.dtype and out.device == w.device


@needs_c
def test_empty_weight_raw_op(device):
    w = torch.empty(0, 5, device=device, dtype=torch.float16)
    out = torch.ops.nft_cuda.perturb(w, make_rng(1, 1, device), torch.full((2,), 0.1, device=device), 0.7, 2.0)
    assert out.shape == (2, 0, 5) and out.dtype == torch.float16


def _bits(t):
    return t.contiguous().view(INT_VIEW[t.dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sigma_zero_returns_w_exactly(dtype, backend, device):
    w = random_weight((9, 7), dtype, device)
    w[0, :3] = -0.0
    w[1, :3] = 0.0
    for preset in PRESET_FACTORS:
        out = run(backend, w, Variation(0.0, preset), make_rng(2, 3, device), 3)
        for t in range(3):
            assert torch.equal(_bits(out[t]), _bits(w)), f"{preset}: sample {t} is not W bit for bit"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_all_zero_weight_returns_w_exactly(dtype, backend, device):
    w = torch.zeros(4, 6, dtype=dtype, device=device)
    w[::2] = -0.0
    assert (_bits(w) != 0).any(), "test setup: some entries must be -0.0"
    for preset in PRESET_FACTORS:
        out = run(backend, w, Variation(0.5, preset), make_rng(2, 3, device), 2)
        assert not out.isnan().any()
        for t in range(2):
            assert torch.equal(_bits(out[t]), _bits(w)), f"{preset}: sample {t} is not W bit for bit"


# ---------------------------------------------------------------------------------------------
# statistics and the state band
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", list(PRESET_FACTORS))
def test_noise_std_per_preset(preset, backend, device):
    n = 1 << 20
    g = torch.Generator().manual_seed(17)
    w = (torch.rand(n, generator=g) * 2 - 1).to(device)
    v = Variation(0.1, preset)
    out = run(backend, w, v, make_rng(31337, 5, device), 1)[0]
    sw = sigma_w64(w, [0.1], v.state_factor, v.scale)[0]
    e = (out.cpu().double() - w.cpu().double()) / sw
    assert abs(e.mean().item()) < 0.005, f"mean {e.mean().item()}"
    assert abs(e.std().item() - 1) < 0.01, f"std {e.std().item()}"
    band = band_mask(w)
    assert 0.4 < band.double().mean() < 0.6
    for name, sel in (("inside", band), ("outside", ~band)):
        s = e[sel].std().item()
        assert abs(s - 1) < 0.01, f"{preset} {name} band: std {s}"


def _edge_weights(dtype):
    """Weights with max|W| = 1 at the band edges and their dtype neighbours, with the expected band."""
    step = torch.float32 if dtype == torch.float64 else dtype  # |w| is compared as float32

    def nx(x, toward):
        return torch.nextafter(torch.tensor(x, dtype=step), torch.tensor(toward, dtype=step)).item()

    pattern = [
        (1.0, False),
        (0.25, False),
        (0.75, False),
        (-0.25, False),
        (-0.75, False),
        (nx(0.25, 1.0), True),
        (nx(0.75, 0.0), True),
        (-nx(0.25, 1.0), True),
        (-nx(0.75, 0.0), True),
        (nx(0.25, 0.0), False),
        (nx(0.75, 1.0), False),
        (0.5, True),
        (0.1, False),
        (0.9, False),
    ]
    vals = [p[0] for p in pattern] * 12
    inside = [p[1] for p in pattern] * 12
    return torch.tensor(vals, dtype=dtype), torch.tensor(inside)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", list(PRESET_FACTORS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_state_band_exact_edges(dtype, preset, backend, device):
    w_cpu, inside = _edge_weights(dtype)
    assert torch.equal(band_mask(w_cpu), inside), "test setup: oracle band disagrees with hand labels"
    w = w_cpu.to(device)
    v = Variation(0.5, preset)
    seed, offset = 606, 1
    out = run(backend, w, v, make_rng(seed, offset, device), 2)
    z = normal64(w.numel(), seed, offset, 2)
    ratio = (out.cpu().double() - w_cpu.double()) / z
    base = 0.5 * 1.0 * v.scale
    inner = base * v.state_factor
    keep = z.abs() > 0.3
    assert keep.sum() > 100
    got_inside = (ratio - inner).abs() < (ratio - base).abs()
    # every kept ratio is one of the two sigmas (to rounding of the output dtype)
    nearest = torch.where(got_inside, torch.full_like(ratio, inner), torch.full_like(ratio, base))
    rel = ((ratio - nearest).abs() / nearest)[keep]
    assert rel.max() < 0.1, f"noise/z is neither sigma_base nor s*sigma_base (rel err {rel.max():.3g})"
    if v.state_factor != 1.0:
        exp = inside.unsqueeze(0).expand_as(ratio)
        bad = (got_inside != exp) & keep
        assert not bad.any(), (
            f"{backend}/{dtype}/{preset}: wrong band for weights "
            f"{sorted(set(w_cpu[bad.nonzero()[:, 1]].double().tolist()))}"
        )


# ---------------------------------------------------------------------------------------------
# gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("samples", [1, 3])
def test_weight_gradient_straight_through(samples, dtype, backend, device):
    w = random_weight((6, 11), dtype, device).requires_grad_(True)
    v = Variation(0.2, "FeFET2")
    out = run(backend, w, v, make_rng(9, 10, device), samples)
    assert out.requires_grad
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(device)
    out.mul(g).sum().backward()
    assert w.grad is not None and w.grad.dtype == dtype and w.grad.shape == w.shape
    want = g.cpu().double().sum(0)
    # a sum of S terms in the weight dtype (or its accumulation type): <= S roundings of size |g|
    tol = samples * ulp(g.cpu().double().abs().sum(0), dtype)
    err = (w.grad.cpu().double() - want).abs()
    assert (err <= tol).all(), f"max grad error {err.max():.3g}"


def test_one_sample_weight_gradient_is_a_view_not_a_copy():
    # the straight-through gradient of one sample is dL/dW_noisy[0] itself: no sum, no new tensor
    from nft_cuda._registrations import _perturb_backward

    grad = torch.randn(1, 5, 4)
    one = _perturb_backward(None, grad)[0]
    assert one.shape == (5, 4) and one.data_ptr() == grad.data_ptr() and torch.equal(one, grad[0])
    grad3 = torch.randn(3, 5, 4)
    torch.testing.assert_close(_perturb_backward(None, grad3)[0], grad3.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_non_contiguous_weight(backend, device):
    base = random_weight((7, 9), torch.float32, device).requires_grad_(True)
    w = base.t()
    out = run(backend, w, Variation(0.2, "RRAM4"), make_rng(1, 2, device), 2)
    g = torch.randn(out.shape, dtype=torch.float64).float().to(device)
    out.mul(g).sum().backward()
    torch.testing.assert_close(base.grad.double().cpu(), g.double().sum(0).t().cpu(), rtol=1e-6, atol=1e-6)


def test_no_grad_output_when_weight_does_not_require_grad(device):
    out = ops.perturb(random_weight((3, 3), torch.float32, device), Variation(0.1), rng=make_rng(1, 1, device))
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    "shape,dtype,samples",
    [
        ((5,), torch.float32, 1),
        ((7, 13), torch.float32, 3),
        ((4, 3, 2, 2), torch.bfloat16, 2),
        ((9, 2), torch.float64, 5),
        ((6, 6), torch.float16, 2),
    ],
    ids=str,
)
def test_opcheck_perturb(shape, dtype, samples, requires_grad, device):
    w = random_weight(shape, dtype, device).requires_grad_(requires_grad)
    v = Variation(0.1, "FeFET2")
    sig = torch.linspace(0.0, 0.2, samples, device=device)
    torch.library.opcheck(torch.ops.nft_cuda.perturb.default, (w, make_rng(3, 4, device), sig, v.scale, v.state_factor))


@needs_c
def test_opcheck_rng_ops(device):
    counter = torch.randint(0, 2**32, (5, 4), dtype=torch.int64, device=device)
    key = torch.tensor([1, 2**32 - 1], dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.nft_cuda.philox4x32.default, (counter, key))
    torch.library.opcheck(torch.ops.nft_cuda.philox4x32.default, (counter.view(5, 1, 4), key))
    for numel, streams in [(0, 1), (5, 1), (1026, 3)]:
        torch.library.opcheck(torch.ops.nft_cuda.philox_normal.default, (make_rng(5, 6, device), numel, streams))


@needs_c
def test_compile_raw_op_fullgraph(device):
    v = Variation(0.1, "RRAM4")

    def f(w, r, s):
        return torch.ops.nft_cuda.perturb(w, r, s, v.scale, v.state_factor) * 2.0

    torch._dynamo.reset()
    w = random_weight((7, 13), torch.float32, device)
    r, s = make_rng(3, 5, device), torch.full((3,), 0.1, device=device)
    assert torch.equal(torch.compile(f, fullgraph=True)(w, r, s), f(w, r, s))


def test_compile_ops_perturb_fullgraph(device):
    v = Variation(0.1, "FeFET2")

    def f(w, r):
        return ops.perturb(w, v, rng=r, samples=3)

    torch._dynamo.reset()
    w = random_weight((7, 13), torch.float32, device)
    r = make_rng(3, 5, device)
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(w, r), f(w, r), rtol=0, atol=0)
    # a fresh rng value goes through the same compiled graph (rng is data, not a constant)
    r2 = make_rng(4, 5, device)
    torch.testing.assert_close(cf(w, r2), f(w, r2), rtol=0, atol=0)
    assert not torch.equal(cf(w, r2), cf(w, r))


# ---------------------------------------------------------------------------------------------
# reproducibility and streams
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_different_seed_differs(backend, device):
    w = random_weight((13, 7), torch.float32, device)
    v = Variation(0.1, "RRAM1")
    a = run(backend, w, v, make_rng(1, 2, device), 2)
    assert torch.equal(a, run(backend, w, v, make_rng(1, 2, device), 2))
    for other in [(2, 2), (1, 3), (1 + 2**32, 2), (1, 2 + 2**32)]:
        b = run(backend, w, v, make_rng(*other, device), 2)
        assert not torch.isclose(a, b).all(), f"(seed, offset)={other} gave the same noise as (1, 2)"
        assert (a != b).float().mean() > 0.99


def test_int_seed_offset_equals_rng_tensor(device):
    w = random_weight((13, 7), torch.float32, device)
    v = Variation(0.1, "FeFET6")
    for seed, offset in [(0, 0), (2**63 - 1, 2**63 - 1), (123, 2**40)]:
        assert torch.equal(
            ops.perturb(w, v, seed=seed, offset=offset, samples=2),
            ops.perturb(w, v, rng=make_rng(seed, offset, device), samples=2),
        )
    # offset defaults to 0 when only seed is given
    assert torch.equal(ops.perturb(w, v, seed=5), ops.perturb(w, v, rng=make_rng(5, 0, device)))


def test_default_rng_follows_manual_seed(device):
    w = random_weight((13, 7), torch.float32, device)
    v = Variation(0.1)
    torch.manual_seed(11)
    a = ops.perturb(w, v)
    b = ops.perturb(w, v)
    torch.manual_seed(11)
    assert torch.equal(ops.perturb(w, v), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 2**32 - 2, 2**63 - 3])
def test_sample_t_equals_offset_plus_t(offset, backend, device):
    w = random_weight((5, 9), torch.float32, device)
    v = Variation(0.2, "FeFET2")
    many = run(backend, w, v, make_rng(77, offset, device), 3)
    for t in range(3):
        one = run(backend, w, v, make_rng(77, offset + t, device), 1)
        assert torch.equal(many[t : t + 1], one), f"sample {t} != samples=1 at offset+{t}"


def test_samples_prefix_independent(device):
    w = random_weight((5, 9), torch.float64, device)
    v = Variation(0.2, "FeFET2")
    r = make_rng(3, 3, device)
    assert torch.equal(ops.perturb(w, v, rng=r, samples=5)[:2], ops.perturb(w, v, rng=r, samples=2))
