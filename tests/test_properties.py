"""Property-based tests (hypothesis): the compiled kernels against their pure-PyTorch twins.

Over random shapes (1-4 dims, sizes 0..17, at most 5000 elements), layouts (contiguous, transposed,
sliced with steps, expanded, channels_last for 4-D), dtypes (float32, float64, float16, bfloat16),
σ_d in [0, 0.5] (0 included, per-sample too), the four presets, 1..4 samples and seeds/offsets over
[0, 2^63) with the extremes near 2^63 - 1 (so offset + t passes 2^63 and wraps as a uint64):

* Philox words: ``torch.ops.nft_cuda.philox4x32`` equals ``reference.philox4x32`` bit for bit;
* normals: ``philox_normal`` within 1e-5 absolute of the twin (DESIGN §3);
* perturb: within 1e-5·σ_w + 2 ulp(W) (in the weight dtype) of the twin, σ_w = 0 gives W exactly,
  and the result does not depend on the weight's memory layout (bit for bit on one device);
* noisy_linear and its input gradient: within the relative Frobenius tolerances of
  test_noisy_linear.py (1e-5 for float32/float64, 2e-2 for bfloat16/float16).

Each property runs on CPU (C++ kernel vs twin) and, when a GPU is present, on CUDA (CUDA kernel vs
twin and vs the C++ kernel): benchmarks/gpu_check.sh runs this file with the rest of the suite.

Reproducibility: ``derandomize=True`` draws the examples from a fixed seed derived from each test
function, so every run checks the same examples (no flakiness, no example database needed);
``max_examples`` bounds the run (the file takes well under 40 s on two CPU cores).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, require_optional, ulp

require_optional("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nft_cuda import PRESETS, Variation, _ext, reference

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded: nothing to compare")

PROFILE = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
U63 = 2**63
MAX_NUMEL = 5000
MAX_SIZE = 17

#: (x dtype, weight dtype) of noisy_linear -> relative Frobenius tolerance (as test_noisy_linear.py).
LINEAR_MODES = {
    (torch.float32, torch.float32): 1e-5,
    (torch.float64, torch.float64): 1e-5,
    (torch.bfloat16, torch.bfloat16): 2e-2,
    (torch.bfloat16, torch.float32): 2e-2,
    (torch.float16, torch.float16): 2e-2,
    (torch.float16, torch.float32): 2e-2,
}


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

#: seeds and offsets: anywhere in [0, 2^63), with the ends (0 and just below 2^63) drawn often.
seeds = st.one_of(st.integers(0, U63 - 1), st.integers(U63 - 8, U63 - 1), st.integers(0, 3))
#: σ_d in [0, 0.5], exactly 0 now and then.
sigma_values = st.tuples(st.integers(0, 9), st.floats(1e-4, 0.5, allow_nan=False, allow_infinity=False)).map(
    lambda t: 0.0 if t[0] == 5 else t[1]
)
presets = st.sampled_from(sorted(PRESETS))
dtypes = st.sampled_from(DTYPES)


@st.composite
def shapes(draw, min_dims=1, max_dims=4, max_size=MAX_SIZE, max_numel=MAX_NUMEL):
    """1-4 dims of sizes 1..17 with at most ``max_numel`` elements (each size bounded by what is left),
    one of them set to 0 now and then."""
    ndim = draw(st.integers(min_dims, max_dims))
    dims: list[int] = []
    for _ in range(ndim):
        hi = min(max_size, max_numel // math.prod(dims))
        dims.append(draw(st.integers(1, hi)))
    if ndim and draw(st.integers(0, 11)) == 5:  # empty now and then (an inner value: hypothesis favours the ends)
        dims[draw(st.integers(0, ndim - 1))] = 0
    return tuple(dims)


@st.composite
def tensors(draw, shape, dtype):
    """A CPU tensor of logical ``shape`` and ``dtype`` in one of several layouts (a recipe, built later)."""
    ndim = len(shape)
    layouts = (
        ["contiguous", "sliced", "expanded"]
        + (["transposed"] if ndim >= 2 else [])
        + (["channels_last"] if ndim == 4 else [])
    )
    layout = draw(st.sampled_from(layouts))
    recipe = {
        "shape": tuple(shape),
        "dtype": dtype,
        "layout": layout,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "scale": draw(st.sampled_from([1e-3, 1.0, 50.0])),
        "zeros": draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
    }
    if layout == "transposed":
        i = draw(st.integers(0, ndim - 2))
        recipe["dims"] = (i, draw(st.integers(i + 1, ndim - 1)))
    elif layout == "sliced":
        top = 3 if ndim <= 2 else 2
        recipe["steps"] = tuple(draw(st.integers(1, top)) for _ in shape)
        recipe["starts"] = tuple(draw(st.integers(0, 2)) for _ in shape)
    elif layout == "expanded":
        recipe["dim"] = draw(st.integers(0, ndim - 1))
    return recipe


def build(recipe: dict, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(recipe["seed"])
    shape, layout = recipe["shape"], recipe["layout"]

    def values(s):
        t = torch.randn(s, generator=g, dtype=torch.float64) * recipe["scale"]
        if recipe["zeros"]:
            t = torch.where(torch.rand(s, generator=g, dtype=torch.float64) < recipe["zeros"], 0.0, t)
        return t.to(recipe["dtype"]).to(device)

    if layout == "contiguous":
        t = values(shape)
    elif layout == "channels_last":
        t = values(shape).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        i, j = recipe["dims"]
        base = list(shape)
        base[i], base[j] = base[j], base[i]
        t = values(base).transpose(i, j)
    elif layout == "sliced":
        base = [s0 + (n - 1) * step + 1 if n else s0 for n, step, s0 in zip(shape, recipe["steps"], recipe["starts"])]
        t = values(base)[tuple(slice(s0, None, step) for step, s0 in zip(recipe["steps"], recipe["starts"]))]
    else:  # expanded: stride 0 along one dim
        d = recipe["dim"]
        base = list(shape)
        base[d] = 1
        t = values(base).expand(shape)
    assert t.shape == shape and t.dtype == recipe["dtype"], (t.shape, shape)
    return t


def rng_tensor(seed: int, offset: int, device="cpu") -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().to(torch.float64)
    ref = ref.detach().cpu().to(torch.float64)
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def devices():
    return pytest.mark.parametrize("device", DEVICES)


# --------------------------------------------------------------------------------------------------
# Philox words and normals
# --------------------------------------------------------------------------------------------------


@devices()
@settings(max_examples=150, **PROFILE)
@given(
    lead=shapes(min_dims=0, max_dims=3, max_numel=1250),
    word_seed=st.integers(0, 2**32 - 1),
    extremes=st.booleans(),
    key=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    strided=st.booleans(),
)
def test_philox_words_bit_identical(device, lead, word_seed, extremes, key, strided):
    g = torch.Generator().manual_seed(word_seed)
    shape = (*lead, 4)
    words = torch.randint(0, 2**32, (*lead, 8 if strided else 4), generator=g, dtype=torch.int64)
    if extremes and words.numel():
        mask = torch.rand(words.shape, generator=g) < 0.3
        words = torch.where(mask, torch.where(torch.rand(words.shape, generator=g) < 0.5, 0, 2**32 - 1), words)
    counter = words[..., ::2] if strided else words
    assert counter.shape == shape
    k = torch.tensor(key, dtype=torch.int64)
    want = reference.philox4x32(counter, k)
    got = torch.ops.nft_cuda.philox4x32(counter.to(device), k.to(device))
    assert got.dtype == torch.int64 and got.shape == shape
    assert torch.equal(got.cpu(), want)
    if device != "cpu":
        assert torch.equal(got.cpu(), torch.ops.nft_cuda.philox4x32(counter, k))


@devices()
@settings(max_examples=100, **PROFILE)
@given(numel=st.integers(0, MAX_NUMEL), streams=st.integers(1, 4), seed=seeds, offset=seeds)
def test_philox_normal_matches_twin(device, numel, streams, seed, offset):
    r = rng_tensor(seed, offset)
    want = reference.philox_normal(r, numel, streams)
    got = torch.ops.nft_cuda.philox_normal(r.to(device), numel, streams)
    assert got.shape == (streams, numel) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)
    if device != "cpu":
        torch.testing.assert_close(got.cpu(), torch.ops.nft_cuda.philox_normal(r, numel, streams), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# perturb
# --------------------------------------------------------------------------------------------------


@st.composite
def perturb_cases(draw):
    dtype = draw(dtypes)
    recipe = draw(tensors(draw(shapes()), dtype))
    samples = draw(st.integers(1, 4))
    per_sample = draw(st.booleans())
    sigmas = [draw(sigma_values) for _ in range(samples)] if per_sample else [draw(sigma_values)] * samples
    return recipe, draw(presets), sigmas, draw(seeds), draw(seeds)


def _assert_perturb_close(out, ref, weight, sw, what):
    """|out - ref| <= 1e-5·σ_w + 2 ulp in the weight dtype (elementwise, float64 on the CPU)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    o = out.detach().cpu().to(torch.float64)
    r = ref.detach().cpu().to(torch.float64)
    mag = torch.maximum(o.abs(), r.abs())
    tol = 2 * ulp(mag, weight.dtype) + 1e-5 * sw
    err = (o - r).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = bad.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at flat index {i}: "
            f"{o.flatten()[i].item()!r} vs {r.flatten()[i].item()!r}, tol {tol.flatten()[i].item():.3g}"
        )


@devices()
@settings(max_examples=250, **PROFILE)
@given(case=perturb_cases())
def test_perturb_matches_twin(device, case):
    recipe, preset, sigmas, seed, offset = case
    v = Variation(sigmas[0], preset)
    w_cpu = build(recipe)
    r = rng_tensor(seed, offset)
    sig = torch.tensor(sigmas, dtype=torch.float32)
    ref = reference.perturb(w_cpu, r, sig, v.scale, v.state_factor)
    sw = reference.sigma_w(w_cpu, sig, v.scale, v.state_factor).to(torch.float64)
    assert ref.shape == (len(sigmas), *w_cpu.shape)

    w = build(recipe, device)
    out = torch.ops.nft_cuda.perturb(w, r.to(device), sig.to(device), v.scale, v.state_factor)
    _assert_perturb_close(out, ref, w_cpu, sw, f"{device} kernel vs twin")
    # σ_w = 0 (σ_d = 0 or max|W| = 0): W exactly, on both
    exact = sw == 0
    w_b = w_cpu.unsqueeze(0).expand_as(ref)
    assert torch.equal(out.cpu()[exact], w_b[exact]) and torch.equal(ref[exact], w_b[exact])
    # the memory layout does not matter: bit for bit the same as the contiguous copy
    again = torch.ops.nft_cuda.perturb(w.contiguous(), r.to(device), sig.to(device), v.scale, v.state_factor)
    assert torch.equal(out, again)
    if device != "cpu":
        cpu_kernel = torch.ops.nft_cuda.perturb(w_cpu, r, sig, v.scale, v.state_factor)
        _assert_perturb_close(out, cpu_kernel, w_cpu, sw, f"{device} kernel vs CPU kernel")


# --------------------------------------------------------------------------------------------------
# noisy_linear (forward) and its input gradient
# --------------------------------------------------------------------------------------------------


@st.composite
def linear_cases(draw):
    xdt, wdt = draw(st.sampled_from(sorted(LINEAR_MODES, key=str)))
    n, k = draw(shapes(min_dims=2, max_dims=2, max_numel=MAX_SIZE**2))
    samples = draw(st.integers(1, 4))
    shared = draw(st.booleans())
    lead = draw(shapes(min_dims=1, max_dims=2, max_size=9, max_numel=40))
    x_shape = (*lead, k) if shared else (samples, *lead, k)
    w_recipe = draw(tensors((n, k), wdt))
    w_recipe["scale"] = 1.0 / math.sqrt(max(k, 1))
    x_recipe = draw(tensors(x_shape, xdt))
    x_recipe["scale"] = 1.0
    bias = draw(st.booleans())
    sigmas = [draw(sigma_values) for _ in range(samples)]
    return dict(
        xdt=xdt,
        wdt=wdt,
        x=x_recipe,
        w=w_recipe,
        bias=bias,
        seed=draw(st.integers(0, 2**32 - 1)),
        samples=samples,
        shared=shared,
        sigmas=sigmas,
        preset=draw(presets),
        rng=(draw(seeds), draw(seeds)),
    )


def _linear_inputs(case, device):
    x = build(case["x"], device)
    w = build(case["w"], device)
    b = None
    if case["bias"]:
        g = torch.Generator().manual_seed(case["seed"])
        b = torch.randn(w.shape[0], generator=g).to(device=device, dtype=case["xdt"])
    return x, w, b


@devices()
@settings(max_examples=160, **PROFILE)
@given(case=linear_cases())
def test_noisy_linear_matches_twin(device, case):
    tol = LINEAR_MODES[(case["xdt"], case["wdt"])]
    v = Variation(case["sigmas"][0], case["preset"])
    sig = torch.tensor(case["sigmas"], dtype=torch.float32)
    r = rng_tensor(*case["rng"])
    x_cpu, w_cpu, b_cpu = _linear_inputs(case, "cpu")
    ref = reference.noisy_linear(x_cpu, w_cpu, b_cpu, r, sig, v.scale, v.state_factor, case["shared"])
    x, w, b = _linear_inputs(case, device)
    out = torch.ops.nft_cuda.noisy_linear(
        x, w, b, r.to(device), sig.to(device), v.scale, v.state_factor, case["shared"], False
    )
    assert out.shape == ref.shape and out.dtype == case["xdt"]
    assert rel_err(out, ref) <= tol, f"{device}: rel err {rel_err(out, ref):.3g} > {tol}"
    if device != "cpu":
        cpu_kernel = torch.ops.nft_cuda.noisy_linear(
            x_cpu, w_cpu, b_cpu, r, sig, v.scale, v.state_factor, case["shared"], False
        )
        assert rel_err(out, cpu_kernel) <= tol

    # the input gradient: dX = dY · W_noisy (summed over samples when x is shared)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    grad_cpu = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(case["xdt"])
    want = reference.noisy_linear_backward_input(grad_cpu, w_cpu, r, sig, v.scale, v.state_factor, case["shared"])
    got = torch.ops.nft_cuda._noisy_linear_backward_input(
        grad_cpu.to(device), w, r.to(device), sig.to(device), v.scale, v.state_factor, case["shared"], False
    )
    assert got.shape == want.shape == x_cpu.shape
    assert rel_err(got, want) <= tol, f"{device} dX: rel err {rel_err(got, want):.3g} > {tol}"
