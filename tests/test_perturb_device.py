"""The perturb_device kernels (issue 16, csrc/include/nft_cuda/device_models.h) against
reference.perturb_device and the float64 numpy oracle (tests/device_oracle.py).

Draws come from the multi-draw counter layout (draw k of element e: block (e >> 2) + k·2^56, lane e & 3).
Uniforms are exact in float32 on every backend; the device models' normals are Box–Muller in float64
rounded once to float32 on every backend (normal4_f64), so the kernels' draws are the reference's bits
(up to a float64 libm ulp landing on a float32 rounding boundary, ~1e-8 per normal). Hence: StuckAt,
LogNormal and PCM with 16/32-bit weights equal the reference bit for bit; float64 weights differ only by
the float64 libm (exp, log, pow) — a few ulps, ≤ 1e-15·max|W|. Against the numpy oracle (its own operation
order and libm): within one ulp of the result plus the effect of one float32 ulp in any normal.
"""

from __future__ import annotations

import math

import device_oracle as oracle
import numpy as np
import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, philox_counters, philox_key, ulp

from nft_cuda import _ext, reference
from nft_cuda.devices import PCM as PCM_MODEL

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded")

OPS = torch.ops.nft_cuda
U64 = 2**64
PCM, LOGNORMAL, STUCK_AT = 1, 2, 3
Z_TOL = 5e-7  # one float32 ulp of |z| < 8: a normal rounded the other way (see the docstring)


def pcm_params(t: float, **options) -> list[float]:
    """[t, G, c0, c1, c2, t0, t_read, drift_scale, read_scale, aihwkit_read] of nft_cuda.devices.PCM."""
    return PCM_MODEL(time=t, **options).kernel_params()


def with_param(params: list[float], index: int, value: float) -> list[float]:
    """params with one entry replaced (values the Python models refuse, for the kernels' own checks)."""
    return [value if i == index else p for i, p in enumerate(params)]


def rng_tensor(seed: int, offset: int, device="cpu") -> torch.Tensor:
    return torch.tensor([seed, offset if offset < 2**63 else offset - U64], dtype=torch.int64, device=device)


# ---- float64 oracle (tests/device_oracle.py) fed with draws from the raw Philox words ---------------


def draw_words(n: int, seed: int, stream: int, k: int) -> np.ndarray:
    """uint32 words [blocks, 4] of draw k: block counter (e >> 2) + k·2^56 (its hi word + k·2^24)."""
    c = philox_counters(n, stream)
    c[:, 1] += k << 24
    return reference.philox4x32(c, philox_key(seed)).numpy().astype(np.uint64)


def draw64(n: int, seed: int, stream: int, k: int) -> np.ndarray:
    """Draw k of elements 0..n-1 as float64: uniforms (k >= 6) exactly, normals rounded to float32 as
    every backend's draws are (the kernels' own float32 Box–Muller differs by up to Z_TOL)."""
    words = draw_words(n, seed, stream, k)
    if k >= 6:
        return oracle.uniform_from_words(words).reshape(-1)[:n]
    return oracle.normals_from_words(words).reshape(-1)[:n].astype(np.float32).astype(np.float64)


def oracle64(w: np.ndarray, m: float, s: float, kind: int, p, d: dict) -> np.ndarray:
    """float64 W' of one sample: w, m = max|W|, severity s, d[k] = draw k."""
    if kind == PCM:
        return oracle.pcm(w, m, s, p, [d[k] for k in range(6)])
    if kind == LOGNORMAL:
        return oracle.lognormal(w, m, s, d[0])
    return oracle.stuck_at(w, m, s, p, d[6], d[7])


DRAWS = {PCM: range(6), LOGNORMAL: range(1), STUCK_AT: range(6, 8)}


def oracle_draws(kind, n, seed, stream):
    return {k: draw64(n, seed, stream, k) for k in DRAWS[kind]}


def expected_and_tolerance(weight, seed, offset, sigmas, kind, params):
    """float64 [S, *shape] oracle W' and the per-element tolerance: the oracle's change when any one
    normal moves by Z_TOL (the kernels' float32 normals), plus one ulp of the result in the weight's dtype."""
    w = weight.detach().cpu().double().reshape(-1).numpy()
    m = float(weight.detach().cpu().abs().float().max()) if w.size else 0.0
    want, tol = [], []
    for t, s in enumerate(sigmas):
        d = oracle_draws(kind, w.size, seed, (offset + t) % U64)
        y = oracle64(w, m, float(s), kind, params, d)
        spread = np.zeros_like(y)
        for k in (k for k in d if k < 6):
            for sign in (1, -1):
                moved = {**d, k: d[k] + sign * Z_TOL}
                spread = np.maximum(spread, np.abs(oracle64(w, m, float(s), kind, params, moved) - y))
        want.append(y)
        tol.append(spread * len([k for k in d if k < 6]))
    shape = (len(sigmas), *weight.shape)
    want = torch.from_numpy(np.stack(want)).view(shape)
    return want, torch.from_numpy(np.stack(tol)).view(shape) + ulp(want, weight.dtype)


def weights(dtype, shape=(37, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 3.0, -3.0], dtype=torch.float64)  # zeros, tiny, max|W|
    return w.to(dtype)


def assert_within(got, want, tol, what):
    err = (got.cpu().double() - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst err {err.max():.3g}"


# ---- CPU kernel against the oracle ------------------------------------------------------------------

CASES = {
    "pcm-t0": (PCM, pcm_params(0.0)),
    "pcm-1h": (PCM, pcm_params(3600.0)),
    "pcm-1y": (PCM, pcm_params(3.15e7, drift_scale=1.5, read_noise_scale=2.0)),
    "pcm-drift-only": (PCM, pcm_params(3600.0, read_noise_scale=0.0)),  # only some draws generated
    "pcm-read-only": (PCM, pcm_params(3600.0, drift_scale=0.0)),
    "pcm-aihwkit-read-t0": (PCM, pcm_params(0.0, aihwkit_read=True)),
    "pcm-aihwkit-read-1y": (PCM, pcm_params(3.15e7, read_noise_scale=3.0, aihwkit_read=True)),
    "stuck-at": (STUCK_AT, [0.1, 0.05]),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("offset", [5, 2**32 - 1, U64 - 2])
def test_cpu_kernel_matches_the_oracle(dtype, case, offset):
    kind, params = CASES[case]
    w = weights(dtype)
    sig = torch.tensor([1.0, 0.0, 2.5])
    got = OPS.perturb_device(w, rng_tensor(7, offset), sig, kind, params)
    assert got.dtype == dtype and got.shape == (3, *w.shape)
    want, tol = expected_and_tolerance(w, 7, offset, sig.tolist(), kind, params)
    if kind == STUCK_AT:  # uniforms are exact: the same bits on every backend
        assert torch.equal(got, want.to(dtype)), case
    assert_within(got, want, tol, case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", [*CASES, "lognormal"])
def test_kernel_matches_reference_perturb_device(device, dtype, case):
    kind, params = CASES.get(case, (LOGNORMAL, []))
    w = weights(dtype, (173, 61)).to(device)
    sig = torch.tensor([1.0, 0.0, 2.5], device=device)
    r = rng_tensor(3, 2**32 - 1, device)
    got = OPS.perturb_device(w, r, sig, kind, params)
    ref = reference.perturb_device(w, r, sig, kind, params)
    assert got.device == w.device and got.dtype == ref.dtype and got.shape == ref.shape
    if dtype == torch.float64 and kind != STUCK_AT:  # float64 libm (exp, log, pow) differs by ulps
        m = float(w.abs().max())
        err = (got - ref).abs().cpu()
        assert (err <= 4 * ulp(ref, dtype) + 1e-15 * m).all(), f"{case}: max err {err.max():.3g}"
    else:
        assert torch.equal(got, ref), f"{case}: {int((got != ref).sum())} elements differ"
    # severity 0 at t = 0 (or a time-independent model): the weight; aihwkit's read step reads at t + t0
    if kind != PCM or (params[0] == 0 and not params[9]):
        assert torch.equal(got[1], w) and torch.equal(ref[1], w)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_lognormal_draw_is_the_reference_normal_stream(dtype):
    # Draw 0 is the normal stream of perturb (§3.1), evaluated in float64 and rounded to float32 as
    # reference.philox_normal does; W·exp(s·z) with the host libm's exp is then exact on every dtype.
    w = weights(dtype, (5, 7, 3))
    sig = torch.tensor([0.3, 0.0, 1.0])
    r = rng_tensor(11, 2**32 - 1)
    got = OPS.perturb_device(w, r, sig, LOGNORMAL, [])
    z = reference.philox_normal(r, w.numel(), 3).double()
    assert (z - OPS.philox_normal(r, w.numel(), 3).double()).abs().max() <= 1e-5  # perturb's own z (DESIGN §3)
    wd = w.double().reshape(-1)
    for t, s in enumerate(sig.tolist()):
        want = torch.tensor([wi * math.exp(s * zi) for wi, zi in zip(wd.tolist(), z[t].tolist())], dtype=torch.float64)
        assert torch.equal(got[t].reshape(-1), want.to(dtype)), f"sample {t}"


@pytest.mark.parametrize("kind,params", [(PCM, pcm_params(0.0)), (LOGNORMAL, []), (STUCK_AT, [0.3, 0.2])])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_zero_severity_returns_the_weight_exactly(kind, params, dtype):
    w = weights(dtype)
    out = OPS.perturb_device(w, rng_tensor(1, 2), torch.zeros(2), kind, params)
    assert torch.equal(out[0], w) and torch.equal(out[1], w)
    assert torch.equal(out.signbit(), w.expand_as(out).signbit())  # signed zeros kept
    zero = torch.zeros(3, 4, dtype=dtype)  # max|W| = 0: the weight itself
    assert torch.equal(OPS.perturb_device(zero, rng_tensor(1, 2), torch.ones(2), kind, params)[1], zero)


def test_pcm_time_zero_and_no_noise_scales_return_the_weight():
    w = weights(torch.float32)
    sig = torch.tensor([0.0])
    for t in (0.0, 3600.0, 3.15e7):
        p = pcm_params(t, drift_scale=0.0, read_noise_scale=0.0)
        assert torch.equal(OPS.perturb_device(w, rng_tensor(3, 4), sig, PCM, p)[0], w)
    # t > 0 drifts the weights even at severity 0: every non-zero weight shrinks in magnitude.
    drifted = OPS.perturb_device(w, rng_tensor(3, 4), sig, PCM, pcm_params(3.15e7, read_noise_scale=0.0))[0]
    nz = w != 0
    assert ((drifted.abs() < w.abs()) | ~nz).all() and (torch.sign(drifted) == torch.sign(w))[nz].all()


def test_negative_severity_poisons_the_sample_with_nan():
    w = weights(torch.float32)
    for kind, params in ((PCM, pcm_params(1.0)), (LOGNORMAL, []), (STUCK_AT, [0.1, 0.1])):
        out = OPS.perturb_device(w, rng_tensor(1, 2), torch.tensor([-0.5, 0.5]), kind, params)
        assert out[0].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 1001])
def test_prefix_property_and_sizes_not_multiple_of_four(numel):
    # Noise is keyed on the logical index: a prefix of a longer weight draws the same noise.
    long = weights(torch.float32, (1003,), seed=2)
    w = long[:numel].clone()
    w[0] = long.abs().max()  # same max|W|
    long = long.clone()
    long[0] = w[0]
    sig = torch.tensor([1.0, 2.0])
    for kind, params in ((PCM, pcm_params(86400.0)), (LOGNORMAL, []), (STUCK_AT, [0.2, 0.3])):
        a = OPS.perturb_device(w, rng_tensor(5, 6), sig, kind, params)
        b = OPS.perturb_device(long, rng_tensor(5, 6), sig, kind, params)
        assert torch.equal(a, b[:, :numel])


def test_thread_count_does_not_change_the_noise():
    w = weights(torch.float32, (300, 77))
    sig = torch.tensor([1.0, 0.5])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.perturb_device(w, rng_tensor(5, 6), sig, PCM, pcm_params(100.0))
        torch.set_num_threads(max(n, 2))
        many = OPS.perturb_device(w, rng_tensor(5, 6), sig, PCM, pcm_params(100.0))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


def test_straight_through_gradient():
    w = weights(torch.float64, (4, 6)).requires_grad_(True)
    out = OPS.perturb_device(w, rng_tensor(1, 2), torch.tensor([1.0, 2.0, 0.5]), PCM, pcm_params(60.0))
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(w.grad, g.sum(0))


def test_opcheck():
    w = weights(torch.float32, (3, 5))
    args = (w, rng_tensor(1, 2), torch.tensor([1.0, 0.5]), STUCK_AT, [0.1, 0.2])
    torch.library.opcheck(OPS.perturb_device, args)


# ---- errors -------------------------------------------------------------------------------------------

BAD = [
    (0, [], "bit-sliced Gaussian runs on perturb"),
    (4, [], "kind must be 1"),
    (PCM, [1.0], "takes 10 params"),
    (LOGNORMAL, [0.1], "takes 0 params"),
    (STUCK_AT, [0.5], "takes 2 params"),
    (PCM, with_param(pcm_params(1.0), 0, -1.0), "time t must be >= 0"),
    (PCM, with_param(pcm_params(1.0), 1, 0.0), "g_max, t0 and t_read must be > 0"),
    (PCM, with_param(pcm_params(1.0), 8, -1.0), "read_scale must be >= 0"),
    (PCM, with_param(pcm_params(1.0), 9, 0.5), "aihwkit_read must be 0 or 1"),
    (PCM, with_param(pcm_params(1.0), 2, float("inf")), "must be finite"),
    (STUCK_AT, [1.5, 0.0], r"must lie in \[0, 1\]"),
    (STUCK_AT, [-0.1, 0.0], r"must lie in \[0, 1\]"),
    (STUCK_AT, [0.6, 0.5], "p0 \\+ p1 must be <= 1"),
    (STUCK_AT, [float("nan"), 0.5], "must be finite"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,params,match", BAD)
def test_bad_model_arguments_raise(device, kind, params, match):
    w = torch.ones(3, device=device)
    with pytest.raises(ValueError, match=match):
        OPS.perturb_device(w, rng_tensor(1, 2, device), torch.ones(1, device=device), kind, params)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_tensors_raise(device):
    w = torch.ones(3, device=device)
    r = rng_tensor(1, 2, device)
    s = torch.ones(1, device=device)
    with pytest.raises(TypeError, match="weight must be float32"):
        OPS.perturb_device(w.int(), r, s, LOGNORMAL, [])
    with pytest.raises(TypeError, match="rng must be an int64"):
        OPS.perturb_device(w, r.int(), s, LOGNORMAL, [])
    with pytest.raises(ValueError, match="sigmas must be 1-D"):
        OPS.perturb_device(w, r, s.view(1, 1), LOGNORMAL, [])


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_2_pow_58_elements_raise(device):
    huge = torch.zeros(1, device=device).expand(2**58 + 1)  # a view: nothing is allocated
    with pytest.raises(ValueError, match="at most 2\\^58"):
        OPS.perturb_device(huge, rng_tensor(1, 2, device), torch.ones(1, device=device), LOGNORMAL, [])
