"""Bad input raises TypeError / ValueError naming the argument (DESIGN §4, §9)."""

from __future__ import annotations

import pytest
import torch

from nft_cuda import Variation, _ext, ops, rng

needs_c = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded")

W = torch.randn(4, 5)
V = Variation(0.1, "FeFET2")
R = torch.tensor([1, 2], dtype=torch.int64)


def perturb(**overrides):
    kwargs = dict(weight=W, variation=V, rng=R)
    kwargs.update(overrides)
    weight = kwargs.pop("weight")
    variation = kwargs.pop("variation")
    return ops.perturb(weight, variation, **kwargs)


# ---------------------------------------------------------------------------------------------
# nft_cuda.ops.perturb
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_weight(dtype):
    with pytest.raises(TypeError, match="weight"):
        perturb(weight=W.to(dtype))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_weight(dtype):
    with pytest.raises(TypeError, match="weight"):
        perturb(weight=W.to(dtype))


@pytest.mark.parametrize("weight", [W.numpy(), W.tolist(), 1.0, None])
def test_non_tensor_weight(weight):
    with pytest.raises(TypeError, match="weight"):
        perturb(weight=weight)


@pytest.mark.parametrize("variation", [0.1, "RRAM1", None, {"sigma": 0.1}])
def test_variation_not_a_variation(variation):
    with pytest.raises(TypeError, match="variation"):
        perturb(variation=variation)


def test_variation_construction_errors():
    with pytest.raises(ValueError, match="sigma"):
        Variation(-0.1)
    with pytest.raises(ValueError, match="device_model"):
        Variation(0.1, "PCM9")
    with pytest.raises(ValueError, match="weight_bits"):
        Variation(0.1, weight_bits=7, device_bits=2)


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("value", [-1, 2**63, 2**64 + 5])
def test_seed_offset_out_of_range(name, value):
    kwargs = {"seed": 1, "offset": 0, name: value}
    with pytest.raises(ValueError, match=name):
        perturb(rng=None, **kwargs)


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("value", [1.0, "1", True, torch.tensor(1)])
def test_seed_offset_wrong_type(name, value):
    kwargs = {"seed": 1, "offset": 0, name: value}
    with pytest.raises(TypeError, match=name):
        perturb(rng=None, **kwargs)


def test_offset_without_seed():
    with pytest.raises(ValueError, match="seed"):
        perturb(rng=None, offset=3)


def test_seed_limits_accepted():
    assert perturb(rng=None, seed=2**63 - 1, offset=2**63 - 1).shape == (1, 4, 5)
    assert perturb(rng=None, seed=0, offset=0).shape == (1, 4, 5)


@pytest.mark.parametrize("bad", [R.int(), R.float(), R.to(torch.uint64) if hasattr(torch, "uint64") else R.int()])
def test_rng_wrong_dtype(bad):
    with pytest.raises(TypeError, match="rng"):
        perturb(rng=bad)


@pytest.mark.parametrize("bad", [torch.tensor([1, 2, 3]), torch.tensor([[1, 2]]), torch.tensor(1), torch.tensor([1])])
def test_rng_wrong_shape(bad):
    with pytest.raises(ValueError, match="rng"):
        perturb(rng=bad)


def test_rng_not_a_tensor():
    with pytest.raises(TypeError, match="rng"):
        perturb(rng=[1, 2])


def test_rng_on_another_device():
    with pytest.raises(ValueError, match="rng"):
        perturb(rng=torch.empty(2, dtype=torch.int64, device="meta"))


def test_rng_and_seed_both_given():
    with pytest.raises(ValueError, match="rng"):
        perturb(seed=1)
    with pytest.raises(ValueError, match="rng"):
        perturb(offset=1)


@pytest.mark.parametrize("sigmas", [torch.tensor([0.1, 0.2]), [0.1, 0.2], (0.1,), torch.tensor([[0.1, 0.2, 0.3]])])
def test_sigmas_wrong_length(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        perturb(samples=3, sigmas=sigmas)


@pytest.mark.parametrize(
    "sigmas", [torch.tensor([0.1, -0.2]), [0.1, -0.2], torch.tensor([0.1, float("nan")]), [float("inf"), 0.1]]
)
def test_sigmas_negative_or_non_finite(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        perturb(samples=2, sigmas=sigmas)


@pytest.mark.parametrize("sigmas", [torch.tensor([1, 2]), torch.tensor([True, False]), ["0.1", 0.2], 0.1, "ab"])
def test_sigmas_wrong_type(sigmas):
    with pytest.raises(TypeError, match="sigmas"):
        perturb(samples=2, sigmas=sigmas)


def test_sigmas_on_another_device():
    with pytest.raises(ValueError, match="sigmas"):
        perturb(samples=2, sigmas=torch.empty(2, device="meta"))


@pytest.mark.parametrize("samples", [0, -1])
def test_samples_not_positive(samples):
    with pytest.raises(ValueError, match="samples"):
        perturb(samples=samples)


@pytest.mark.parametrize("samples", [1.0, "2", None])
def test_samples_wrong_type(samples):
    with pytest.raises(TypeError, match="samples"):
        perturb(samples=samples)


# ---------------------------------------------------------------------------------------------
# raw torch.ops.nft_cuda.perturb (C++ TORCH_CHECK_TYPE / TORCH_CHECK_VALUE)
# ---------------------------------------------------------------------------------------------

SIG = torch.full((2,), 0.1)


def raw_perturb(w=W, r=R, s=SIG):
    return torch.ops.nft_cuda.perturb(w, r, s, V.scale, V.state_factor)


@needs_c
@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(w=W.int()), TypeError, "weight"),
        (dict(w=W.to(torch.complex64)), TypeError, "weight"),
        (dict(r=R.float()), TypeError, "rng"),
        (dict(r=R.int()), TypeError, "rng"),
        (dict(r=torch.tensor([1, 2, 3])), ValueError, "rng"),
        (dict(r=torch.tensor([[1, 2]])), ValueError, "rng"),
        (dict(s=SIG.double()), TypeError, "sigmas"),
        (dict(s=torch.tensor([1, 2])), TypeError, "sigmas"),
        (dict(s=SIG.view(1, 2)), ValueError, "sigmas"),
        (dict(s=torch.tensor(0.1)), ValueError, "sigmas"),
    ],
    ids=lambda x: str(x) if isinstance(x, str) else None,
)
def test_raw_perturb_checks(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        raw_perturb(**kwargs)


# ---------------------------------------------------------------------------------------------
# philox4x32 and normal
# ---------------------------------------------------------------------------------------------

KEY = torch.tensor([1, 2], dtype=torch.int64)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 5), (0,), ()])
def test_philox_counter_last_dim(shape):
    with pytest.raises(ValueError, match="counter"):
        rng.philox4x32(torch.zeros(shape, dtype=torch.int64), KEY)


@needs_c
@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 5)])
def test_raw_philox_counter_last_dim(shape):
    with pytest.raises(ValueError, match="counter"):
        torch.ops.nft_cuda.philox4x32(torch.zeros(shape, dtype=torch.int64), KEY)


@needs_c
def test_raw_philox_dtype_and_key_shape():
    c = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="counter"):
        torch.ops.nft_cuda.philox4x32(c.int(), KEY)
    with pytest.raises(TypeError, match="key"):
        torch.ops.nft_cuda.philox4x32(c, KEY.int())
    with pytest.raises(ValueError, match="key"):
        torch.ops.nft_cuda.philox4x32(c, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("bad", [-1, 2**32, 2**40, -(2**40)])
def test_philox_words_out_of_range(bad):
    c = torch.zeros(3, 4, dtype=torch.int64)
    c[1, 2] = bad
    with pytest.raises(ValueError, match="counter"):
        rng.philox4x32(c, KEY)
    k = KEY.clone()
    k[1] = bad
    with pytest.raises(ValueError, match="key"):
        rng.philox4x32(torch.zeros(3, 4, dtype=torch.int64), k)


def test_philox_wrong_types_and_key_shape():
    with pytest.raises(TypeError, match="counter"):
        rng.philox4x32(torch.zeros(1, 4, dtype=torch.int32), KEY)
    with pytest.raises(TypeError, match="counter"):
        rng.philox4x32([[0, 0, 0, 0]], KEY)
    with pytest.raises(TypeError, match="key"):
        rng.philox4x32(torch.zeros(1, 4, dtype=torch.int64), KEY.float())
    with pytest.raises(ValueError, match="key"):
        rng.philox4x32(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="key|counter"):
        rng.philox4x32(torch.zeros(1, 4, dtype=torch.int64), KEY.to("meta"))


@pytest.mark.parametrize("numel", [-1, -100])
def test_normal_negative_numel(numel):
    with pytest.raises(ValueError, match="numel"):
        rng.normal(numel, 1, 0)


@pytest.mark.parametrize("numel", [1.0, "3", None])
def test_normal_bad_numel_type(numel):
    with pytest.raises((TypeError, ValueError), match="numel"):
        rng.normal(numel, 1, 0)


@pytest.mark.parametrize(
    "name,value,exc",
    [
        ("seed", -1, ValueError),
        ("seed", 2**63, ValueError),
        ("offset", 2**63, ValueError),
        ("offset", -5, ValueError),
        ("seed", 1.5, TypeError),
        ("offset", "0", TypeError),
    ],
)
def test_normal_bad_seed_offset(name, value, exc):
    kwargs = {"seed": 1, "offset": 0, name: value}
    with pytest.raises(exc, match=name):
        rng.normal(4, **kwargs)


@pytest.mark.parametrize("streams,exc", [(0, ValueError), (-1, ValueError), (1.0, TypeError)])
def test_normal_bad_streams(streams, exc):
    with pytest.raises(exc, match="streams"):
        rng.normal(4, 1, 0, streams=streams)


@needs_c
def test_raw_philox_normal_checks():
    with pytest.raises(ValueError, match="numel"):
        torch.ops.nft_cuda.philox_normal(R, -1, 1)
    with pytest.raises(ValueError, match="streams"):
        torch.ops.nft_cuda.philox_normal(R, 4, 0)
    with pytest.raises(TypeError, match="rng"):
        torch.ops.nft_cuda.philox_normal(R.float(), 4, 1)
    with pytest.raises(ValueError, match="rng"):
        torch.ops.nft_cuda.philox_normal(torch.tensor([1, 2, 3]), 4, 1)
