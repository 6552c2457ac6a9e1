"""Crossbar tiles (nft_cuda.devices.tiles): each tile of a layer scales its conductances by its own max|W|,
with the same draws per element as the untiled layer; tiles off is today's result bit for bit."""

from __future__ import annotations

import dataclasses
import math

import device_oracle as oracle
import numpy as np
import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda import ops, reference
from nft_cuda.devices import PCM, LogNormal, StuckAt, Tiles, Variation, device_model_from_dict
from nft_cuda.devices.tiles import tile_max

RNG = (20261206, 9)
TILES = Tiles(max_input_size=512, max_output_size=512)


def _rng():
    return torch.tensor(RNG, dtype=torch.int64)


def _weight(out=768, inp=1024, seed=0):
    """A weight whose four 512×512 tiles have clearly different max|W|."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[:384, :512] *= 4.0  # the four 384 × 512 tiles of 768 × 1024 (near-equal splits, as aihwkit)
    w[384:, 512:] *= 0.25
    return w


def _edges(sizes):
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [slice(a, a + n) for a, n in zip(starts, sizes)]


def _tile_slices(out=768, inp=1024, tiles=TILES):
    rows, cols = tiles.split((out, inp))
    return [(r, c) for r in _edges(rows) for c in _edges(cols)]


# ---- the config ------------------------------------------------------------------------------------


def test_tiles_config_is_checked_hashable_and_round_trips():
    assert not Tiles().active and TILES.active and Tiles(per_channel=True).active
    assert TILES.split((768, 1024)) == ((384, 384), (512, 512)) and TILES.count((768, 1024)) == (2, 2)
    assert TILES.split((32, 1000))[1] == (500, 500)  # near-equal, as aihwkit's and lightning's get_split_sizes
    assert Tiles(max_input_size=40).split((6, 10, 3, 3))[1] == (36, 27, 27)  # whole kernels: 4 + 3 + 3 channels
    assert Tiles(max_input_size=100).grid((8, 3, 5, 5)) == (8, 75)  # whole 5×5 kernels: 3 channels of 25
    assert Tiles(per_channel=True).grid((8, 16)) == (1, 16)
    with pytest.raises(ValueError, match="smaller than one kernel"):
        Tiles(max_input_size=20).grid((8, 3, 5, 5))
    with pytest.raises(ValueError, match="max_input_size must be >= 1"):
        Tiles(max_input_size=0)
    with pytest.raises(TypeError, match="max_output_size must be an int"):
        Tiles(max_output_size=2.5)
    with pytest.raises(TypeError, match="per_channel must be True or False"):
        Tiles(per_channel=1)
    with pytest.raises(TypeError, match="tiles must be an nft_cuda.devices.Tiles"):
        Variation(0.1, tiles={"max_input_size": 4})
    for model in (
        Variation(0.1, tiles=TILES),
        PCM(time=10.0, tiles=Tiles(per_channel=True)),
        StuckAt(p0=0.1, tiles=TILES),
    ):
        assert device_model_from_dict(model.to_dict()) == model and model != dataclasses.replace(model, tiles=None)
        assert len({model, dataclasses.replace(model, tiles=None)}) == 2  # hashable, tiles part of the key
    # an untiled model's dict is the dict every model had before tiles existed
    assert "tiles" not in Variation(0.1).to_dict() and device_model_from_dict(Variation(0.1).to_dict()).tiles is None
    assert nft_cuda.devices.make_device_model("rram1", 0.1, tiles=TILES.to_dict()).tiles == TILES


def test_tile_max_of_each_element_is_its_tiles():
    w = _weight()
    m = tile_max(w, TILES)
    for rows, cols in _tile_slices():
        assert torch.equal(m[rows, cols], w[rows, cols].abs().amax().expand(m[rows, cols].shape))
    rows = tile_max(w, Tiles(per_channel=True))
    assert torch.equal(rows, w.abs().amax(1, keepdim=True).expand(w.shape))


# ---- the noise of a tiled layer -------------------------------------------------------------------------


def test_1024x768_linear_runs_as_four_tiles_each_with_its_own_noise_scale():
    w = _weight()
    v = Variation(0.1, "RRAM1")
    tiled_out = ops.perturb(w, Variation(0.1, "RRAM1", tiles=TILES), rng=_rng())[0]
    z = reference.draw_normal(_rng(), w.numel(), 1)[0].view(w.shape)  # the layer's draws, untiled indices
    maxima = []
    for rows, cols in _tile_slices():
        m = w[rows, cols].abs().amax()
        maxima.append(float(m))
        want = w[rows, cols] + (0.1 * v.scale) * m * z[rows, cols]  # W + σ_d·scale·max|W_tile|·z
        torch.testing.assert_close(tiled_out[rows, cols], want, rtol=1e-6, atol=1e-6 * float(m))
        noise = (tiled_out[rows, cols] - w[rows, cols]) / (0.1 * v.scale)
        assert float(noise.std()) == pytest.approx(float(m), rel=0.02)
    assert len(maxima) == 4 and max(maxima) > 10 * min(maxima)


@pytest.mark.parametrize("model", [Variation(0.2, "RRAM4"), LogNormal(0.3), StuckAt(p0=0.05, p1=0.1), PCM(time=3600.0)])
def test_tiles_off_is_bit_identical(model):
    w = _weight(96, 80)
    for off in (None, Tiles()):
        got = ops.perturb(w, model.__class__(**{**_fields(model), "tiles": off}), rng=_rng(), samples=3)
        assert torch.equal(got, ops.perturb(w, model, rng=_rng(), samples=3))


def _fields(model):
    return {k: v for k, v in model.to_dict().items() if k != "kind"}


def _oracle_tile(model, w, rows, cols, samples):
    """The float64 oracle of one tile: the layer's draws at the tile's elements, the tile's own max|W|."""
    n = w.numel()
    block = w[rows, cols].double().numpy()
    m = float(w[rows, cols].abs().amax())
    s = np.full((samples, 1, 1), model.sigma)
    if isinstance(model, PCM):
        z = [
            reference.draw_normal(_rng(), n, samples, k).view(samples, *w.shape)[:, rows, cols].double().numpy()
            for k in range(6)
        ]
        return oracle.pcm(block, m, s, model.kernel_params(), z)
    u = [
        reference.draw_uniform(_rng(), n, samples, k).view(samples, *w.shape)[:, rows, cols].double().numpy()
        for k in (6, 7)
    ]
    return oracle.stuck_at(block, m, s, model.kernel_params(), *u)


@pytest.mark.parametrize("model", [PCM(sigma=1.5, time=3.15e7, tiles=TILES), StuckAt(p0=0.05, p1=0.1, tiles=TILES)])
def test_device_models_map_each_tile_to_its_own_conductance_range(model):
    w = _weight(700, 600)
    got = ops.perturb(w, model, rng=_rng(), samples=2).double()
    for rows, cols in _tile_slices(700, 600):
        want = torch.from_numpy(_oracle_tile(model, w, rows, cols, 2))
        m = float(w[rows, cols].abs().amax())
        torch.testing.assert_close(got[:, rows, cols], want, rtol=1e-5, atol=1e-5 * m)


def test_per_channel_noise_follows_each_outputs_max():
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(2)) * torch.logspace(-1, 1, 64)[:, None]
    v = Variation(0.1, tiles=Tiles(per_channel=True))
    noise = (ops.perturb(w, v, rng=_rng(), samples=4) - w) / (0.1 * v.scale)
    z = reference.draw_normal(_rng(), w.numel(), 4).view(4, *w.shape)
    torch.testing.assert_close(noise, z * w.abs().amax(1, keepdim=True), rtol=1e-4, atol=1e-4)


def test_drift_compensation_is_one_alpha_per_tile():
    w = _weight(600, 700)
    model = PCM(time=3.15e7, drift_compensation=True, tiles=TILES)
    comp = ops.perturb(w, model, rng=_rng(), samples=2).double()
    raw = ops.perturb(w, PCM(time=3.15e7, tiles=TILES), rng=_rng(), samples=2).double()
    t0 = ops.perturb(w, PCM(time=0.0, tiles=TILES), rng=_rng(), samples=2).double()
    alphas = []
    for rows, cols in _tile_slices(600, 700):
        alpha = t0[:, rows, cols].abs().sum((1, 2)) / raw[:, rows, cols].abs().sum((1, 2))  # one-hot rule, per tile
        torch.testing.assert_close(comp[:, rows, cols], raw[:, rows, cols] * alpha[:, None, None], rtol=1e-6, atol=1e-7)
        alphas.append(alpha)
    assert len({round(float(a[0]), 6) for a in alphas}) == 4  # the tiles' gains differ


def test_conv_tiles_hold_whole_kernels():
    w = torch.randn(10, 6, 3, 3, generator=torch.Generator().manual_seed(4))
    w[:, :3] *= 5.0  # channels 0-2 (the first of two tiles of 3 channels of 9 inputs) larger
    v = Variation(0.1, tiles=Tiles(max_input_size=40))
    noise = (ops.perturb(w, v, rng=_rng())[0] - w) / (0.1 * v.scale)
    z = reference.draw_normal(_rng(), w.numel(), 1)[0].view(w.shape)
    for chans in (slice(0, 3), slice(3, 6)):
        torch.testing.assert_close(noise[:, chans], z[:, chans] * w[:, chans].abs().amax(), rtol=1e-4, atol=1e-4)


# ---- the layers and the other paths that read max|W| ----------------------------------------------------


def test_a_tiled_noisy_linear_trains_with_straight_through_gradients():
    v = Variation(0.1, tiles=TILES)
    layer = nft_cuda.convert(nn.Linear(1024, 768), v)
    with torch.no_grad():
        layer.weight.copy_(_weight())
    nft_cuda.set_instance(layer, seed=5, instance=3)
    x = torch.randn(4, 1024, requires_grad=True)
    out = layer(x)
    w_chip = layer.noisy_weights(layer._instance_rng, torch.tensor([0.1]))[0]
    torch.testing.assert_close(out, x @ w_chip.t() + layer.bias, rtol=1e-5, atol=1e-4)
    out.sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(4, 768).t() @ x.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(4, 768) @ w_chip, rtol=1e-5, atol=1e-4)
    fused = ops.noisy_linear(x.detach(), layer.weight, layer.bias, v, rng=layer._instance_rng)[0]
    torch.testing.assert_close(fused, out.detach(), rtol=1e-5, atol=1e-4)  # ops.noisy_linear: tiled too


def test_normal_draw_perturbation_and_weight_levels_are_per_tile():
    w = _weight(600, 520)
    for model in (Variation(0.2, tiles=TILES), PCM(time=100.0, tiles=TILES)):
        draws = reference.NORMAL_DRAWS[model.KERNEL_ID]
        z = torch.stack([reference.draw_normal(_rng(), w.numel(), 1, k)[0].view(w.shape) for k in range(draws)])
        got = reference.perturb_with_normals(w, model, z)  # the worst-case search's and TRICE's chips
        torch.testing.assert_close(
            got, ops.perturb(w, model, rng=_rng())[0], rtol=1e-6, atol=1e-7 * float(w.abs().max())
        )
    from nft_cuda.nn.mvm import programmed

    levels = Variation(0.0, mvm=nft_cuda.devices.MVM(weight_levels=True), tiles=TILES)
    grid = programmed(w, levels)
    for rows, cols in _tile_slices(600, 520):
        step = float(w[rows, cols].abs().amax()) / 255  # the 8-bit grid over the tile's own max|W|
        q = grid[rows, cols] / step
        torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-3)


# ---- converters, read and output noise per tile (nft_cuda.nn.mvm) ----------------------------------------

from nft_cuda import mvm_ops  # noqa: E402
from nft_cuda.devices import MVM  # noqa: E402


def _tiled_linear(mvm, sigma=0.1):
    torch.manual_seed(0)
    layer = nft_cuda.convert(nn.Linear(1024, 768), Variation(sigma, tiles=TILES, mvm=mvm))
    with torch.no_grad():
        layer.weight.copy_(_weight() * 0.05)
    return layer


def _chip(layer):
    """The layer's chip 0 (instance mode) and its noisy weight."""
    nft_cuda.set_instance(layer, seed=1, instance=0)
    return layer.noisy_weights(layer._instance_rng, torch.tensor([layer.variation.sigma]))[0]


OUT_TILES = [(0, 384), (384, 768)]


def test_converters_act_per_tile_with_calibrated_ranges():
    layer = _tiled_linear(MVM(input_bits=8, output_bits=6))
    x = torch.randn(6, 1024)
    ranges = nft_cuda.nn.calibrate_mvm(layer, [x, 2 * x[:3]])
    r_in, r_out = layer.mvm_ranges
    assert r_in.shape == (2,) and r_out.shape == (2, 2) and ranges[""] == (r_in.tolist(), r_out.tolist())
    for k in range(2):  # r_in: max|x_k| over the batches; r_out: max |x_k·W_kjᵀ| (clean weights)
        xs = torch.cat([x, 2 * x[:3]])[:, 512 * k : 512 * (k + 1)]
        assert float(r_in[k]) == pytest.approx(float(xs.abs().max()))
        for j, (a, b) in enumerate(OUT_TILES):
            want = (xs @ layer.weight[a:b, 512 * k : 512 * (k + 1)].t()).abs().max()
            assert float(r_out[k, j]) == pytest.approx(float(want.detach()), rel=1e-5)
    assert len({round(float(v), 4) for v in r_out.flatten()}) == 4  # four tiles, four ADC ranges
    w = _chip(layer)
    with torch.no_grad():
        got = layer(x)
    want = torch.zeros(6, 768)
    for k in range(2):
        xk = mvm_ops.quantize(x[:, 512 * k : 512 * (k + 1)], 8, r_in[k])
        yk = xk @ w[:, 512 * k : 512 * (k + 1)].t()
        for j, (a, b) in enumerate(OUT_TILES):
            want[:, a:b] += mvm_ops.quantize(yk[:, a:b], 6, r_out[k, j])
    torch.testing.assert_close(got, want + layer.bias.detach(), rtol=1e-5, atol=1e-5)


def test_output_noise_has_the_configured_std_per_tile():
    sigma_out = 0.1
    layer = _tiled_linear(MVM(output_noise=sigma_out), sigma=0.0)  # no weight noise: what is left is the output noise
    x = torch.randn(4096, 1024)
    nft_cuda.nn.calibrate_mvm(layer, [x])
    r_in = layer.mvm_ranges[0]
    nft_cuda.set_instance(layer, seed=2, instance=0)
    with torch.no_grad():
        noise = layer(x) - (x @ layer.weight.t() + layer.bias)
    stream = layer._instance_rng
    z = mvm_ops.read_noise_normals(stream, 2 * 4096 * 768, torch.zeros((), dtype=torch.int64), 9).view(2, 4096, 768)
    want = torch.zeros(4096, 768)
    for k in range(2):
        for a, b in OUT_TILES:
            m = layer.weight[a:b, 512 * k : 512 * (k + 1)].detach().abs().max()
            scale = sigma_out * m * r_in[k] / math.sqrt(2)  # lightning's out_noise: max|W_tile|·r_in/√T
            want[:, a:b] += scale * z[k, :, a:b]
            if k == 0:
                per_tile_std = float(scale)
                assert float(z[k, :, a:b].std() * per_tile_std) == pytest.approx(per_tile_std, rel=0.01)
    torch.testing.assert_close(noise, want, rtol=1e-4, atol=1e-5)


def test_read_noise_and_output_bound_per_tile():
    layer = _tiled_linear(MVM(read_noise=0.05, output_bound=0.3), sigma=0.0)
    x = torch.randn(8, 1024)
    nft_cuda.nn.calibrate_mvm(layer, [x])
    r_in = layer.mvm_ranges[0]
    nft_cuda.set_instance(layer, seed=3, instance=0)
    with torch.no_grad():
        got = layer(x)
    z = mvm_ops.read_noise_normals(layer._instance_rng, 2 * 8 * 768, torch.zeros((), dtype=torch.int64)).view(2, 8, 768)
    want = torch.zeros(8, 768)
    clipped = 0
    for k in range(2):
        xk = x[:, 512 * k : 512 * (k + 1)]
        for a, b in OUT_TILES:
            wk = layer.weight[a:b, 512 * k : 512 * (k + 1)].detach()
            m = wk.abs().max()
            yk = xk @ wk.t() + 0.05 * m * xk.norm(dim=1, keepdim=True) * z[k, :, a:b]  # σ_r·max|W_tile|·‖x_k‖·z
            bound = 0.3 * m * r_in[k]
            clipped += int((yk.abs() > bound).sum())
            want[:, a:b] += yk.clamp(-bound, bound)
    assert clipped > 0
    torch.testing.assert_close(got, want + layer.bias.detach(), rtol=1e-5, atol=1e-5)


def test_untiled_output_noise_and_bound_are_one_tile():
    torch.manual_seed(0)
    layer = nft_cuda.convert(nn.Linear(40, 9), Variation(0.0, mvm=MVM(output_noise=0.2, output_bound=0.5)))
    x = torch.randn(5, 40)
    nft_cuda.set_instance(layer, seed=4, instance=1)
    with torch.no_grad():
        got = layer(x)
    m, r = layer.weight.detach().abs().max(), x.abs().max()
    z = mvm_ops.read_noise_normals(layer._instance_rng, 5 * 9, torch.zeros((), dtype=torch.int64), 9).view(5, 9)
    bound = 0.5 * m * r
    want = (x @ layer.weight.detach().t() + 0.2 * m * r * z).clamp(-bound, bound) + layer.bias.detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tiled_conv_converters_equal_the_per_channel_block_formula():
    torch.manual_seed(0)
    mvm = MVM(input_bits=6, output_bits=6, read_noise=0.05, output_noise=0.02)
    conv = nft_cuda.convert(
        nn.Conv2d(10, 6, 3, padding=1, padding_mode="reflect"), Variation(0.1, tiles=Tiles(40, 4), mvm=mvm)
    )
    x = torch.randn(2, 10, 5, 5)
    nft_cuda.nn.calibrate_mvm(conv, [x])
    r_in, r_out = conv.mvm_ranges
    assert r_in.shape == (3,) and r_out.shape == (3, 2)  # 4 + 3 + 3 channels of 9 inputs; 3 + 3 outputs
    w = _chip(conv)
    with torch.no_grad():
        got = conv(x)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    stream, zero = conv._instance_rng, torch.zeros((), dtype=torch.int64)
    z_read = mvm_ops.read_noise_normals(stream, 3 * 2 * 6 * 25, zero).view(3, 2, 6, 5, 5)
    z_out = mvm_ops.read_noise_normals(stream, 3 * 2 * 6 * 25, zero, 9).view(3, 2, 6, 5, 5)
    want = torch.zeros(2, 6, 5, 5)
    for k, chans in enumerate((slice(0, 4), slice(4, 7), slice(7, 10))):
        xk = mvm_ops.quantize(xp[:, chans], 6, r_in[k])
        yk = torch.nn.functional.conv2d(xk, w[:, chans])
        sq = torch.nn.functional.conv2d(xk * xk, torch.ones(1, xk.shape[1], 3, 3))
        for j, outs in enumerate((slice(0, 3), slice(3, 6))):
            m = conv.weight[outs, chans].detach().abs().max()
            y = (
                yk[:, outs]
                + 0.05 * m * sq.sqrt() * z_read[k, :, outs]
                + 0.02 * m * r_in[k] / math.sqrt(3) * z_out[k, :, outs]
            )
            want[:, outs] += mvm_ops.quantize(y, 6, r_out[k, j])
    torch.testing.assert_close(got, want + conv.bias.detach().view(1, -1, 1, 1), rtol=1e-4, atol=1e-4)


def test_tiled_mvm_trains_and_bad_ranges_are_refused():
    layer = _tiled_linear(MVM(input_bits=8, output_bits=8, output_noise=0.05))
    x = torch.randn(3, 1024, requires_grad=True)
    layer(x).square().sum().backward()  # mode train: straight-through through the converters and tiles
    assert x.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"tensor of shape \[2, 2\] \(one per tile\)"):
        layer.set_mvm_ranges(1.0, torch.ones(3))
    layer.set_mvm_ranges(2.0, 3.0)  # a number: every tile
    assert torch.equal(layer.mvm_ranges[1], torch.full((2, 2), 3.0))
    grouped = nft_cuda.convert(nn.Conv2d(4, 4, 3, groups=2), Variation(0.1, tiles=Tiles(9), mvm=MVM(input_bits=8)))
    with pytest.raises(NotImplementedError, match="groups=1 convolutions only"):
        grouped(torch.randn(1, 4, 5, 5))


def test_drift_compensation_acts_after_the_adc_per_tile():
    """With converters on, α multiplies each tile's digital output after the ADC (aihwkit's post_forward),
    so the ADC quantises the drifted chip's own output; without converters α scales the weights (same
    result, exactly linear)."""
    torch.manual_seed(0)
    pcm = PCM(time=3.15e7, drift_compensation=True, tiles=TILES, mvm=MVM(output_bits=5))
    layer = nft_cuda.convert(nn.Sequential(nn.Linear(1024, 768)), pcm)[0]
    with torch.no_grad():
        layer.weight.copy_(_weight() * 0.05)
    x = torch.randn(4, 1024)
    nft_cuda.nn.calibrate_mvm(layer, [x])
    r_out = layer.mvm_ranges[1]
    nft_cuda.set_instance(layer, seed=1, instance=0)
    with torch.no_grad():
        got = layer(x)
    drifted, alpha = ops.drift_split(layer.weight.detach(), pcm, rng=layer._instance_rng)
    assert alpha.shape == (1, 2, 2) and len({round(float(a), 6) for a in alpha.flatten()}) == 4
    want = layer.bias.detach().expand(4, 768).clone()
    for k in range(2):
        for j, (a, b) in enumerate(OUT_TILES):
            yk = x[:, 512 * k : 512 * (k + 1)] @ drifted[0, a:b, 512 * k : 512 * (k + 1)].t()
            want[..., a:b] = want[..., a:b] + float(alpha[0, j, k]) * mvm_ops.quantize(yk, 5, r_out[k, j])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    compensated = ops.perturb(layer.weight.detach(), pcm, rng=layer._instance_rng)[0]
    assert (compensated - drifted[0] * 1.0).abs().max() > 0  # α really differs from 1
    # α·W_t is the compensated chip of the weight path (no converters)
    for j, (a, b) in enumerate(OUT_TILES):
        for k in range(2):
            block = (slice(a, b), slice(512 * k, 512 * (k + 1)))
            torch.testing.assert_close(compensated[block], (alpha[0, j, k] * drifted[0][block].double()).float())
    untiled = nft_cuda.convert(
        nn.Sequential(nn.Linear(40, 9)), PCM(time=3.15e7, drift_compensation=True, mvm=MVM(output_bits=5))
    )[0]
    x = torch.randn(6, 40)
    nft_cuda.nn.calibrate_mvm(untiled, [x])
    nft_cuda.set_instance(untiled, seed=2, instance=3)
    with torch.no_grad():
        got = untiled(x)
    drifted, alpha = ops.drift_split(untiled.weight.detach(), untiled.variation, rng=untiled._instance_rng)
    want = float(alpha[0]) * mvm_ops.quantize(x @ drifted[0].t(), 5, untiled.mvm_ranges[1]) + untiled.bias.detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
