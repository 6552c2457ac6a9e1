"""Models 4 and 5 (docs/device-models.md): converter quantisation, the bit-sliced weight grid and the
fresh per-MVM read noise, as ops (against float64 NumPy) and inside the noisy layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nft_cuda
from nft_cuda import mvm_ops, reference
from nft_cuda.devices.mvm import MVM
from nft_cuda.nn import calibrate_mvm

_MASK32 = 0xFFFFFFFF


def _model(sigma: float, **mvm) -> nft_cuda.Variation:
    return nft_cuda.Variation(sigma, mvm=MVM(**mvm))


# ------------------------------------------------------------------------------------------------
# The value object
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_bits": 0}, ValueError, "input_bits must be >= 1"),
        ({"output_bits": -3}, ValueError, "output_bits must be >= 1"),
        ({"input_bits": 1}, ValueError, "only the level 0"),
        ({"output_bits": 25}, ValueError, "<= 24"),
        ({"input_bits": 4.0}, TypeError, "input_bits must be an int"),
        ({"read_noise": -0.01}, ValueError, "read_noise must be a finite number >= 0"),
        ({"read_noise": float("nan")}, ValueError, "read_noise must be a finite number >= 0"),
        ({"weight_levels": 1}, TypeError, "weight_levels must be a bool"),
        ({"output_noise": -1.0}, ValueError, "output_noise must be a finite number >= 0"),
        ({"output_noise": "0.1"}, TypeError, "output_noise must be a real number"),
        ({"output_bound": 0.0}, ValueError, "output_bound must be a finite number > 0"),
        ({"output_bound": float("inf")}, ValueError, "output_bound must be a finite number > 0"),
    ],
)
def test_mvm_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        MVM(**kwargs)


def test_mvm_is_a_hashable_value_that_round_trips_through_a_dict():
    m = MVM(input_bits=6, output_bits=8, weight_levels=True, read_noise=0.02)
    assert m == MVM.from_dict(m.to_dict()) and hash(m) == hash(MVM.from_dict(m.to_dict()))
    assert m.active and m.around_gemm and not MVM().active
    assert not MVM(weight_levels=True).around_gemm
    assert str(m) == "MVM(DAC 6 b, ADC 8 b, weight levels, σ_r=0.02)"
    with pytest.raises(ValueError, match="unknown MVM field"):
        MVM.from_dict({"adc_bits": 4})
    hwa = MVM(output_noise=0.04, output_bound=12.0)
    assert hwa.around_gemm and MVM.from_dict(hwa.to_dict()) == hwa and str(hwa) == "MVM(σ_out=0.04, bound 12)"
    # the dict of an MVM without the output knobs is the dict every MVM had before they existed
    assert set(m.to_dict()) == {"input_bits", "output_bits", "weight_levels", "read_noise"}


# ------------------------------------------------------------------------------------------------
# Quantisation (model 4)
# ------------------------------------------------------------------------------------------------


def _quantize64(x: np.ndarray, bits: int, r: float) -> np.ndarray:
    n = 2 ** (bits - 1) - 1
    step = r / n
    return np.clip(np.round(x / step), -n, n) * step


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_quantize_gives_exactly_the_symmetric_levels_and_clips_at_the_range(bits):
    x = torch.linspace(-3.0, 3.0, 20001, dtype=torch.float64)
    r = 2.0
    q = mvm_ops.quantize(x, bits, r)
    n = 2 ** (bits - 1) - 1
    levels = torch.arange(-n, n + 1, dtype=torch.float64) * (r / n)
    assert torch.equal(torch.unique(q), levels)  # 2^b - 1 levels, 0 included, ±r the extremes
    np.testing.assert_array_equal(q.numpy(), _quantize64(x.numpy(), bits, r))
    assert torch.all(q[x >= r] == r) and torch.all(q[x <= -r] == -r)


def test_quantize_float32_matches_the_float64_oracle_and_defaults_to_the_tensors_max():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g)
    q = mvm_ops.quantize(x, 6)
    r = float(x.abs().max())
    ref = _quantize64(x.double().numpy(), 6, r)
    np.testing.assert_allclose(q.double().numpy(), ref, rtol=0, atol=r * 2**-22)
    assert float(q.abs().max()) == pytest.approx(r, rel=1e-6)


def test_quantize_of_a_zero_range_is_zero_and_its_gradient_is_straight_through():
    x = torch.zeros(5, requires_grad=True)
    assert torch.equal(mvm_ops.quantize(x, 4), torch.zeros(5))
    y = torch.tensor([-5.0, -0.3, 0.2, 7.0], requires_grad=True)
    mvm_ops.quantize(y, 3, 1.0).mul(torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(y.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # clipped ones included
    with pytest.raises(ValueError, match="bits must be an int >= 2"):
        mvm_ops.quantize(y, 1)


@pytest.mark.parametrize("weight_bits", [2, 4, 8])
def test_quantize_weight_puts_every_weight_on_the_bit_sliced_grid(weight_bits):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 33, generator=g, dtype=torch.float64)
    q = mvm_ops.quantize_weight(w, weight_bits)
    m = float(w.abs().max())
    step = m / (2**weight_bits - 1)
    k = q.numpy() / step
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    assert np.abs(np.round(k)).max() == 2**weight_bits - 1
    np.testing.assert_array_equal(np.round(k), np.round(w.numpy() / step))
    assert float((q - w).abs().max()) <= step / 2 + 1e-12


# ------------------------------------------------------------------------------------------------
# Read noise (model 5)
# ------------------------------------------------------------------------------------------------


def _read_normals64(seed: int, stream: int, counter: int, numel: int) -> np.ndarray:
    """float64 oracle of the read-noise normals: draw 8 of element (c << 34) | e (DESIGN §3 layout)."""
    nq = (numel + 3) // 4
    q = torch.arange(nq, dtype=torch.int64) + (counter << 32) + 8 * 2**56
    c = torch.stack([q & _MASK32, q >> 32, torch.full_like(q, stream & _MASK32), torch.full_like(q, stream >> 32)], 1)
    key = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64)
    x = np.floor(reference.philox4x32(c, key).numpy().astype(np.float64) / 512.0)
    u = (x + 0.5) * 2.0**-23
    r01, r23 = np.sqrt(-2 * np.log(u[:, 0])), np.sqrt(-2 * np.log(u[:, 2]))
    a01, a23 = 2 * np.pi * u[:, 1], 2 * np.pi * u[:, 3]
    z = np.stack([r01 * np.cos(a01), r01 * np.sin(a01), r23 * np.cos(a23), r23 * np.sin(a23)], 1)
    return z.reshape(-1)[:numel]


@pytest.mark.parametrize(("seed", "stream", "counter"), [(0, 0, 0), (123, (5 << 32) | 7, 3), (2**40 + 9, 1, 2**24 - 1)])
def test_read_noise_normals_follow_the_documented_counter_layout(seed, stream, counter):
    rng = torch.tensor([seed, stream], dtype=torch.int64)
    z = mvm_ops.read_noise_normals(rng, 1001, torch.tensor(counter))
    np.testing.assert_allclose(z.double().numpy(), _read_normals64(seed, stream, counter, 1001), rtol=0, atol=1e-5)
    wrapped = mvm_ops.read_noise_normals(rng, 1001, torch.tensor(counter + 2**24))
    assert torch.equal(z, wrapped)  # the counter is taken mod 2^24


def test_read_noise_normals_reject_an_output_too_large_for_the_stream():
    with pytest.raises(ValueError, match="at most 2\\^34"):
        mvm_ops.read_noise_normals(torch.zeros(2, dtype=torch.int64), 2**34 + 1, torch.tensor(0))


def test_read_noise_std_is_sigma_times_max_w_times_the_input_norm_on_a_million_outputs():
    torch.manual_seed(0)
    layer = nft_cuda.NoisyLinear(32, 1000, bias=True, variation=_model(0.0, read_noise=0.05))
    x = torch.randn(1024, 32) * torch.linspace(0.1, 3.0, 1024).unsqueeze(1)  # rows of very different norms
    layer.set_instance(seed=7, instance=0)
    with torch.no_grad():
        y = layer(x)
        clean = F.linear(x, layer.weight, layer.bias)
    m = float(layer.weight.detach().abs().max())
    z = ((y - clean).double() / (0.05 * m * x.double().norm(dim=1, keepdim=True))).flatten()
    assert z.numel() >= 1_000_000
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(1.0, abs=4 / math.sqrt(2 * z.numel()))
    assert float((z.abs() > 3).double().mean()) == pytest.approx(0.0027, abs=3e-4)  # Gaussian tails


def test_conv_read_noise_uses_each_receptive_fields_norm():
    torch.manual_seed(1)
    layer = nft_cuda.NoisyConv2d(
        4, 6, 3, padding=1, groups=2, padding_mode="reflect", variation=_model(0.0, read_noise=0.1)
    )
    x = torch.randn(2, 4, 9, 9)
    norms = layer.input_sq_norm(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    for g in range(2):
        patches = F.unfold(padded[:, 2 * g : 2 * g + 2], 3)  # [B, 2*9, 81]
        expect = (patches.double() ** 2).sum(1).view(2, 9, 9)
        for ch in range(3 * g, 3 * g + 3):
            torch.testing.assert_close(norms[:, ch].double(), expect, rtol=1e-5, atol=1e-5)
    layer.set_instance(seed=1, instance=2)
    with torch.no_grad():
        y = layer(x)
        clean = layer.clean_matmul(x) + layer.bias.view(-1, 1, 1)
    c = torch.tensor(0)
    rng = layer.forward_noise().rng
    z = mvm_ops.read_noise_normals(rng, y.numel(), c).view(y.shape)
    expect = clean + 0.1 * layer.weight.abs().max() * norms.sqrt() * z
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_read_noise_is_fresh_on_every_forward_and_reproducible_for_one_seed():
    torch.manual_seed(2)
    layer = nft_cuda.NoisyLinear(16, 8, variation=_model(0.1, read_noise=0.05))
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer.set_instance(seed=3, instance=1)
        first = [layer(x) for _ in range(3)]
        layer.set_instance(seed=3, instance=1)
        again = [layer(x) for _ in range(3)]
        layer.set_instance(seed=4, instance=1)
        other = layer(x)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(other, first[0])
    # the programming draw stays the chip's: without read noise two forwards are equal
    layer.variation = _model(0.1)
    layer.set_instance(seed=3, instance=1)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_train_mode_read_noise_follows_torch_manual_seed():
    layer = nft_cuda.NoisyLinear(16, 8, variation=_model(0.1, read_noise=0.05, input_bits=6))
    x = torch.randn(4, 16)
    torch.manual_seed(5)
    a = layer(x)
    c = layer(x)
    torch.manual_seed(5)
    b = layer(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(layer.mvm_counter()) == 0  # train mode: the fresh rng alone makes each draw fresh


# ------------------------------------------------------------------------------------------------
# The pipeline inside the layers
# ------------------------------------------------------------------------------------------------


def test_layer_pipeline_is_dac_then_matmul_then_adc_then_digital_bias():
    torch.manual_seed(3)
    layer = nft_cuda.NoisyLinear(20, 7, variation=_model(0.0, input_bits=4, output_bits=5))
    x = torch.randn(6, 20)
    layer.set_mvm_ranges(1.5, 4.0)
    with torch.no_grad():
        y = layer(x)
    xq = _quantize64(x.double().numpy(), 4, 1.5)
    yq = _quantize64(xq @ layer.weight.detach().double().numpy().T, 5, 4.0) + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(y.double().numpy(), yq, rtol=0, atol=1e-5)


def test_mode_off_and_an_inactive_mvm_equal_the_digital_layer_bit_for_bit():
    torch.manual_seed(4)
    lin = nft_cuda.NoisyLinear(12, 5, variation=_model(0.2, input_bits=3, output_bits=3, read_noise=0.5))
    conv = nft_cuda.NoisyConv2d(3, 4, 3, variation=_model(0.2, input_bits=3, weight_levels=True))
    x, xc = torch.randn(3, 12), torch.randn(2, 3, 7, 7)
    lin.mode = conv.mode = "off"
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert torch.equal(conv(xc), F.conv2d(xc, conv.weight, conv.bias))
    plain = nft_cuda.NoisyLinear(12, 5, variation=nft_cuda.Variation(0.2))
    ideal = nft_cuda.NoisyLinear(12, 5, variation=_model(0.2))
    ideal.load_state_dict(plain.state_dict())
    plain.set_instance(1, 0)
    ideal.set_instance(1, 0)
    assert torch.equal(plain(x), ideal(x))


def test_weight_levels_program_the_grid_before_the_chip_noise():
    torch.manual_seed(5)
    layer = nft_cuda.NoisyLinear(10, 6, variation=_model(0.1, weight_levels=True))
    rng = torch.tensor([9, 4], dtype=torch.int64)
    grid = mvm_ops.quantize_weight(layer.weight.detach(), 8)
    expect = nft_cuda.ops.perturb(grid, nft_cuda.Variation(0.1), rng=rng)[0]
    assert torch.equal(layer.noisy_weight(rng), expect)
    layer.variation = _model(0.0, weight_levels=True)
    x = torch.randn(3, 10)
    layer.set_instance(0, 0)
    assert torch.equal(layer(x), F.linear(x, grid, layer.bias))


def test_mvm_gradients_are_straight_through():
    torch.manual_seed(6)
    layer = nft_cuda.NoisyLinear(8, 4, variation=_model(0.0, input_bits=3, output_bits=3, read_noise=0.1))
    x = torch.randn(5, 8, requires_grad=True)
    layer.set_instance(0, 0)
    layer(x).sum().backward()
    ones = torch.ones(5, 4)
    torch.testing.assert_close(x.grad, ones @ layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, ones.t() @ mvm_ops.quantize(x.detach(), 3))


def test_a_sample_plan_runs_each_chunk_as_its_own_one_sample_forward():
    torch.manual_seed(7)
    layer = nft_cuda.NoisyLinear(8, 4, variation=_model(0.1, input_bits=5, output_bits=6, read_noise=0.05))
    x = torch.randn(3, 8)
    rng = torch.tensor([11, 20], dtype=torch.int64)
    sigmas = torch.tensor([0.1, 0.1], dtype=torch.float32)
    with torch.no_grad():
        layer.set_sample_plan(rng, sigmas)
        both = layer(torch.cat([x, x]))
        singles = []
        for t in range(2):
            layer.set_sample_plan(torch.tensor([11, 20 + t]), sigmas[:1])
            singles.append(layer(x))
    assert torch.equal(both, torch.cat(singles))


def test_calibrate_mvm_records_the_max_input_and_clean_output_of_each_layer():
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 16, 5))
    model = nft_cuda.convert(model, _model(0.1, input_bits=6, output_bits=6))
    batches = [torch.randn(4, 2, 6, 6), 3 * torch.randn(4, 2, 6, 6)]
    ranges = calibrate_mvm(model, batches)
    conv, lin = model[0], model[2]
    xs = torch.cat(batches)
    with torch.no_grad():
        h = torch.flatten(F.conv2d(xs, conv.weight, conv.bias), 1)
        expect_conv = (float(xs.abs().max()), float(F.conv2d(xs, conv.weight).abs().max()))
        expect_lin = (float(h.abs().max()), float(F.linear(h, lin.weight).abs().max()))
    assert ranges["0"] == pytest.approx(expect_conv, rel=1e-6)
    assert ranges["2"] == pytest.approx(expect_lin, rel=1e-6)
    assert float(conv.mvm_ranges[0]) == pytest.approx(expect_conv[0], rel=1e-6)
    assert conv.mode == "train"
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_mvm(model, [])
    with pytest.raises(ValueError, match="input_range must be a finite number >= 0"):
        lin.set_mvm_ranges(-1.0, None)


def test_layers_that_run_their_own_products_get_weight_levels_and_refuse_converters():
    torch.manual_seed(9)
    attn = nft_cuda.NoisyMultiheadAttention(8, 2, variation=_model(0.0, weight_levels=True))
    q = torch.randn(3, 1, 8)
    attn.eval()
    attn.set_instance(0, 0)
    attn.out_proj.set_instance(0, 0)
    with torch.no_grad():
        out, _ = attn(q, q, q)
        grid_in = mvm_ops.quantize_weight(attn.in_proj_weight, 8)
        grid_out = mvm_ops.quantize_weight(attn.out_proj.weight, 8)
        ref, _ = F.multi_head_attention_forward(
            q,
            q,
            q,
            8,
            2,
            grid_in,
            attn.in_proj_bias,
            None,
            None,
            False,
            0.0,
            grid_out,
            attn.out_proj.bias,
            training=False,
        )
    torch.testing.assert_close(out, ref)
    rnn = nft_cuda.NoisyGRU(4, 5, variation=_model(0.1, output_bits=6))
    with pytest.raises(NotImplementedError, match="NoisyGRU cannot apply the MVM effects"):
        rnn(torch.randn(2, 3, 4))
