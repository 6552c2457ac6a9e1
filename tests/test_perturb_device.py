"""The perturb_device kernels (issue 16, csrc/include/nft_cuda/device_models.h) against float64 oracles.

Draws come from the multi-draw counter layout (draw k of element e: block (e >> 2) + k·2^56, lane e & 3):
the uniforms are exact in float32 on every backend, so StuckAt is compared bit for bit; LogNormal's draw 0
is perturb's normal stream, so it is compared bit for bit with the kernel's own philox_normal; PCM's
normals are evaluated in float64 here and the kernels' float32 normals differ from them by up to ~1e-5
(DESIGN §3), so PCM is compared within the propagated normal tolerance plus one ulp of the result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, philox_counters, philox_key, ulp

from nft_cuda import _ext, reference

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded")

OPS = torch.ops.nft_cuda
U64 = 2**64
PCM, LOGNORMAL, STUCK_AT = 1, 2, 3
# [t, G, c0, c1, c2, t0, t_read, drift_scale, read_scale]
PCM_DEFAULTS = [0.0, 25.0, 0.26348, 1.9650, -1.1731, 20.0, 250e-9, 1.0, 1.0]
Z_TOL = 1e-5  # |float32 kernel normal - float64 normal| (DESIGN §3)


def pcm_params(t: float, **over) -> list[float]:
    names = ["t", "g_max", "c0", "c1", "c2", "t0", "t_read", "drift_scale", "read_scale"]
    p = dict(zip(names, PCM_DEFAULTS), t=t)
    p.update(over)
    return [float(p[n]) for n in names]


def rng_tensor(seed: int, offset: int, device="cpu") -> torch.Tensor:
    return torch.tensor([seed, offset if offset < 2**63 else offset - U64], dtype=torch.int64, device=device)


# ---- float64 oracle of the draws and the per-element formulas (docs/device-models.md) ---------------


def draw_words(n: int, seed: int, stream: int, k: int) -> np.ndarray:
    """float64 [n, ...] raw words of draw k: block counter (e >> 2) + k·2^56 (hi word + k·2^24)."""
    c = philox_counters(n, stream)
    c[:, 1] += k << 24
    words = reference.philox4x32(c, philox_key(seed)).numpy().astype(np.float64)
    return words


def uniforms64(n: int, seed: int, stream: int, k: int) -> np.ndarray:
    u = (np.floor(draw_words(n, seed, stream, k) / 512.0) + 0.5) * 2.0**-23
    return u.reshape(-1)[:n]


def normals64(n: int, seed: int, stream: int, k: int) -> np.ndarray:
    u = (np.floor(draw_words(n, seed, stream, k) / 512.0) + 0.5) * 2.0**-23
    r01, r23 = np.sqrt(-2.0 * np.log(u[:, 0])), np.sqrt(-2.0 * np.log(u[:, 2]))
    a01, a23 = 2.0 * np.pi * u[:, 1], 2.0 * np.pi * u[:, 3]
    z = np.stack([r01 * np.cos(a01), r01 * np.sin(a01), r23 * np.cos(a23), r23 * np.sin(a23)], axis=1)
    return z.reshape(-1)[:n].astype(np.float32).astype(np.float64)  # draws are float32 on every backend


def pcm_conductance(g, s, z_prog, z_nu, z_read, p):
    t, g_max, c0, c1, c2, t0, t_read, drift_scale, read_scale = p
    r = g / g_max
    gd = np.maximum(g + s * (c0 + c1 * r + c2 * r * r) * z_prog, 0.0)
    if t > 0 and drift_scale > 0:
        lr = np.log(np.maximum(r, 1e-7))
        mu = np.clip(-0.0155 * lr + 0.0244, 0.049, 0.1)
        sd = np.clip(-0.0125 * lr - 0.0059, 0.008, 0.045)
        gd = gd * ((t + t0) / t0) ** (-drift_scale * np.abs(mu + sd * z_nu))
    big_l = math.log((t + t_read) / (2 * t_read))
    if big_l > 0 and read_scale > 0:
        q_s = np.minimum(0.0088 / np.maximum(r**0.65, 1e-3), 0.2)
        gd = gd + read_scale * np.abs(gd) * q_s * math.sqrt(big_l) * z_read
    return gd


def stuck_conductance(g, s, u, p):
    p0 = min(s * p[0], 1.0)
    p1 = min(s * p[1], 1.0 - p0)
    return np.where(u < p0, 0.0, np.where(u < p0 + p1, 1.0, g))


def oracle64(w: np.ndarray, m: float, s: float, kind: int, p, d: dict) -> np.ndarray:
    """float64 W' of one sample: w, m = max|W|, severity s, d[k] = draw k (float64 arrays)."""
    if m == 0:
        return w.copy()
    if kind == LOGNORMAL:
        return w * np.exp(s * d[0])
    g_max = p[1] if kind == PCM else 1.0
    gp, gn = g_max * np.maximum(w, 0) / m, g_max * np.maximum(-w, 0) / m
    if kind == PCM:
        fp, fn = pcm_conductance(gp, s, d[0], d[2], d[4], p), pcm_conductance(gn, s, d[1], d[3], d[5], p)
    else:
        fp, fn = stuck_conductance(gp, s, d[6], p), stuck_conductance(gn, s, d[7], p)
    delta = (fp - gp) - (fn - gn)
    return np.where(delta == 0, w, w + delta * m / g_max)


DRAWS = {PCM: range(6), LOGNORMAL: range(1), STUCK_AT: range(6, 8)}


def oracle_draws(kind, n, seed, stream):
    return {k: (uniforms64 if k >= 6 else normals64)(n, seed, stream, k) for k in DRAWS[kind]}


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
    "pcm-1y": (PCM, pcm_params(3.15e7, drift_scale=1.5, read_scale=2.0)),
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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_lognormal_draws_perturbs_normal_stream(dtype):
    # Draw 0 is perturb's normal stream (philox_normal of the same kernel path), so W·exp(s·z) is exact.
    w = weights(dtype, (5, 7, 3))
    sig = torch.tensor([0.3, 0.0, 1.0])
    got = OPS.perturb_device(w, rng_tensor(11, 2**32 - 1), sig, LOGNORMAL, [])
    z = OPS.philox_normal(rng_tensor(11, 2**32 - 1), w.numel(), 3).double()
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
        p = pcm_params(t, drift_scale=0.0, read_scale=0.0)
        assert torch.equal(OPS.perturb_device(w, rng_tensor(3, 4), sig, PCM, p)[0], w)
    # t > 0 drifts the weights even at severity 0: every non-zero weight shrinks in magnitude.
    drifted = OPS.perturb_device(w, rng_tensor(3, 4), sig, PCM, pcm_params(3.15e7, read_scale=0.0))[0]
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
    (PCM, [1.0], "takes 9 params"),
    (LOGNORMAL, [0.1], "takes 0 params"),
    (STUCK_AT, [0.5], "takes 2 params"),
    (PCM, pcm_params(-1.0), "time t must be >= 0"),
    (PCM, pcm_params(1.0, g_max=0.0), "g_max, t0 and t_read must be > 0"),
    (PCM, pcm_params(1.0, read_scale=-1.0), "read_scale must be >= 0"),
    (PCM, pcm_params(float("inf")), "must be finite"),
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
