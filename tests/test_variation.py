"""The Variation value object (DESIGN §2): presets, scale, immutability, validation, state band."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import FLOAT_DTYPES, PRESET_FACTORS

import nft_cuda
from nft_cuda import Variation


def _nextafter(x: float, toward: float, dtype: torch.dtype) -> float:
    t = torch.tensor([x], dtype=dtype)
    return float(torch.nextafter(t, torch.tensor([toward], dtype=dtype)).item())


# ---------------------------------------------------------------------------------------------
# presets and scale
# ---------------------------------------------------------------------------------------------


def test_presets_state_factors():
    assert dict(nft_cuda.PRESETS) == PRESET_FACTORS
    for name, s in PRESET_FACTORS.items():
        v = Variation(0.1, name)
        assert v.device_model == name and v.state_factor == s


def test_defaults():
    v = Variation(0.1)
    assert (v.device_model, v.weight_bits, v.device_bits) == ("RRAM1", 8, 2)
    assert v.devices_per_weight == 4
    assert isinstance(v.sigma, float) and v.sigma == 0.1


@pytest.mark.parametrize("name,s", list(PRESET_FACTORS.items()))
def test_scale_8_2_bits(name, s):
    v = Variation(0.3, name)
    want = math.sqrt(4369) / 85 / math.sqrt(0.4 * s * s + 0.6)
    assert v.scale == pytest.approx(want, rel=1e-12)


def test_scale_rram1_value():
    assert Variation(0.1).scale == pytest.approx(0.777628, abs=5e-7)
    assert Variation(0.1).scale == pytest.approx(math.sqrt(4369) / 85, rel=1e-12)


@pytest.mark.parametrize(
    "wb,db,ratio",
    [
        (8, 2, math.sqrt(4369) / 85),
        (4, 1, math.sqrt(85) / 15),
        (8, 4, math.sqrt(257) / 17),
        (8, 8, 1.0),
        (6, 2, math.sqrt(1 + 16 + 256) / (1 + 4 + 16)),
    ],
)
def test_scale_other_bit_widths(wb, db, ratio):
    for name, s in PRESET_FACTORS.items():
        v = Variation(0.1, name, weight_bits=wb, device_bits=db)
        assert v.devices_per_weight == wb // db
        assert v.scale == pytest.approx(ratio / math.sqrt(0.4 * s * s + 0.6), rel=1e-12)


def test_immutable():
    v = Variation(0.1, "RRAM4")
    for field, value in [("sigma", 0.2), ("device_model", "RRAM1"), ("weight_bits", 4), ("device_bits", 1)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(v, field, value)
    assert v == Variation(0.1, "RRAM4") and hash(v) == hash(Variation(0.1, "rram4"))


def test_with_sigma_returns_new_value():
    v = Variation(0.1, "FeFET6", weight_bits=4, device_bits=1)
    w = v.with_sigma(0.25)
    assert w is not v and v.sigma == 0.1
    assert (w.sigma, w.device_model, w.weight_bits, w.device_bits) == (0.25, "FeFET6", 4, 1)
    with pytest.raises(ValueError, match="sigma"):
        v.with_sigma(-1.0)


@pytest.mark.parametrize(
    "given,canonical",
    [
        ("rram1", "RRAM1"),
        ("RRAM1", "RRAM1"),
        ("fefet2", "FeFET2"),
        ("FEFET2", "FeFET2"),
        ("Rram4", "RRAM4"),
        ("fEfEt6", "FeFET6"),
    ],
)
def test_preset_names_case_insensitive(given, canonical):
    v = Variation(0.1, given)
    assert v.device_model == canonical
    assert v.state_factor == PRESET_FACTORS[canonical]
    assert v == Variation(0.1, canonical)


def test_sigma_accepts_real_numbers():
    assert Variation(0).sigma == 0.0 and isinstance(Variation(0).sigma, float)
    assert Variation(np.float64(0.2)).sigma == 0.2
    assert Variation(np.float32(0.5)).sigma == 0.5


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [-0.1, -1e-300, float("nan"), float("inf"), float("-inf")])
def test_bad_sigma_value(sigma):
    with pytest.raises(ValueError, match="sigma"):
        Variation(sigma)


@pytest.mark.parametrize("sigma", ["0.1", None, [0.1], True, 1j])
def test_bad_sigma_type(sigma):
    with pytest.raises(TypeError, match="sigma"):
        Variation(sigma)


@pytest.mark.parametrize("name", ["PCM3", "rram", "", "RRAM 1"])
def test_unknown_preset(name):
    with pytest.raises(ValueError) as info:
        Variation(0.1, name)
    msg = str(info.value)
    assert "device_model" in msg
    for valid in PRESET_FACTORS:
        assert valid in msg, f"error message should list {valid}: {msg}"


def test_preset_not_a_string():
    with pytest.raises(TypeError, match="device_model"):
        Variation(0.1, 4)


@pytest.mark.parametrize("wb,db", [(7, 2), (8, 3), (2, 4)])
def test_weight_bits_not_multiple(wb, db):
    with pytest.raises(ValueError, match="weight_bits"):
        Variation(0.1, weight_bits=wb, device_bits=db)


@pytest.mark.parametrize(
    "kw",
    [
        dict(weight_bits=8.0),
        dict(device_bits=2.0),
        dict(weight_bits="8"),
        dict(device_bits=None),
        dict(weight_bits=True),
    ],
)
def test_bits_not_int(kw):
    name = next(iter(kw))
    with pytest.raises(TypeError, match=name):
        Variation(0.1, **kw)


@pytest.mark.parametrize("kw", [dict(weight_bits=0), dict(device_bits=0), dict(device_bits=-2)])
def test_bits_not_positive(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Variation(0.1, **kw)


# ---------------------------------------------------------------------------------------------
# sigma_w and the strict state band (float32 decisions)
# ---------------------------------------------------------------------------------------------


def _edge_case(dtype):
    """Weights with max|W| = 1 at the band edges 0.25 / 0.75 and their dtype neighbours.

    Returns (weight, expected in-band mask) with the expectation written out by hand. For float64
    the neighbours are float32 ones (|w| is rounded to float32 before the comparison, so float64
    neighbours of 0.25/0.75 are on the edge; _float64_cast_case covers those).
    """
    step = torch.float32 if dtype == torch.float64 else dtype
    nx = lambda x, toward: _nextafter(x, toward, step)  # noqa: E731
    cases = [
        (1.0, False),  # the max itself
        (-1.0, False),
        (0.25, False),  # exactly t_lo: strict
        (0.75, False),  # exactly t_hi: strict
        (-0.25, False),
        (-0.75, False),
        (nx(0.25, 1.0), True),  # just inside
        (nx(0.75, 0.0), True),
        (-nx(0.25, 1.0), True),
        (-nx(0.75, 0.0), True),
        (nx(0.25, 0.0), False),  # just outside
        (nx(0.75, 1.0), False),
        (-nx(0.75, 1.0), False),
        (0.5, True),
        (-0.5, True),
        (0.0, False),
        (-0.0, False),
    ]
    w = torch.tensor([c[0] for c in cases], dtype=dtype)
    return w, torch.tensor([c[1] for c in cases])


def _float32_threshold_cases(dtype):
    """max|W| whose 0.75·m is not exact in float32: the thresholds are the float32 products.

    m = 1 + 2^-23: 0.75·m = 0.75 + 1.5 ulp rounds (ties to even) up to 0.75 + 2 ulp.
    m = 1 + 3·2^-23: 0.75·m = 0.75 + 4.5 ulp rounds down to 0.75 + 4 ulp, so the weight
    t_hi = 0.75 + 4 ulp (below the exact 0.75·m) is *outside* the strict float32 band.
    """
    ulp = 2.0**-24  # spacing of float32 in [0.5, 1)
    down = lambda x: torch.nextafter(x, torch.zeros_like(x))  # noqa: E731
    up = lambda x: torch.nextafter(x, torch.full_like(x, 2.0))  # noqa: E731
    out = []
    for k, t_hi_expected in [(1, 0.75 + 2 * ulp), (3, 0.75 + 4 * ulp)]:
        m = torch.tensor(1.0 + k * 2.0**-23, dtype=torch.float32)
        t_lo = m * torch.tensor(0.25, dtype=torch.float32)  # exact
        t_hi = m * torch.tensor(0.75, dtype=torch.float32)
        assert t_hi.item() == t_hi_expected
        vals = torch.stack([m, t_lo, t_hi, down(t_hi), up(t_hi), up(t_lo), down(t_lo)]).to(dtype)
        out.append((vals, torch.tensor([False, False, False, True, False, True, False])))
    return out


def _float64_cast_case():
    """float64 weights are compared after rounding |w| to float32 (not in float64)."""
    m = 1.0 + 2.0**-30  # rounds to 1.0 in float32 -> t_lo = 0.25, t_hi = 0.75
    vals = [
        m,
        0.75 + 2.0**-32,  # < 0.75·m in float64, but rounds to 0.75 in float32: outside
        0.75 - 2.0**-32,  # rounds to 0.75: outside
        0.25 + 2.0**-34,  # rounds to 0.25: outside
        _nextafter(0.25, 1.0, torch.float64),  # float64 neighbours of the edges: on the edge
        _nextafter(0.75, 0.0, torch.float64),
        0.25 + 2.0**-20,  # clearly inside
        0.75 - 2.0**-20,
    ]
    expected = [False, False, False, False, False, False, True, True]
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(expected)


def _band_cases(dtype):
    cases = [_edge_case(dtype)]
    if dtype in (torch.float32, torch.float64):
        cases.extend(_float32_threshold_cases(dtype))
    if dtype == torch.float64:
        cases.append(_float64_cast_case())
    return cases


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("preset", list(PRESET_FACTORS))
def test_sigma_w_strict_band(preset, dtype):
    v = Variation(0.2, preset)
    s = v.state_factor
    for weight, inside in _band_cases(dtype):
        sw = v.sigma_w(weight)
        assert sw.dtype == torch.float32 and sw.shape == weight.shape
        m = float(weight.abs().to(torch.float32).max())
        base = torch.tensor(0.2, dtype=torch.float32) * m * torch.tensor(v.scale, dtype=torch.float32)
        inner = base * torch.tensor(s, dtype=torch.float32)
        want = torch.where(inside, inner, base)
        # The band decision must be exact (float32 rule); magnitudes to float32 rounding.
        if s != 1.0:
            got_inside = (sw - inner).abs() < (sw - base).abs()
            bad = (got_inside != inside).nonzero().flatten().tolist()
            assert not bad, (
                f"{preset} {dtype}: wrong band for weights {[float(weight[i]) for i in bad]} "
                f"(max {m!r}; got inside={[bool(got_inside[i]) for i in bad]})"
            )
        torch.testing.assert_close(sw, want, rtol=2e-7, atol=0)
        # float64 formula for the magnitudes
        want64 = 0.2 * m * v.scale * (1.0 + inside.double() * (s - 1.0))
        torch.testing.assert_close(sw.double(), want64, rtol=1e-6, atol=0)


def test_sigma_w_zero_weights_and_zero_sigma():
    w = torch.tensor([0.0, -0.0, 0.0])
    assert torch.equal(Variation(0.3, "FeFET6").sigma_w(w), torch.zeros(3))
    w = torch.randn(10)
    assert torch.equal(Variation(0.0, "RRAM4").sigma_w(w), torch.zeros(10))


def test_sigma_w_shape_and_detach():
    w = torch.randn(3, 4, 5, requires_grad=True)
    sw = Variation(0.1, "FeFET2").sigma_w(w)
    assert sw.shape == (3, 4, 5) and not sw.requires_grad


def test_str_mentions_model_and_sigma():
    s = str(Variation(0.05, "fefet2"))
    assert "FeFET2" in s and "0.05" in s
