"""Crossbar tiles (nft_cuda.devices.tiles): each tile of a layer scales its conductances by its own max|W|,
with the same draws per element as the untiled layer; tiles off is today's result bit for bit."""

from __future__ import annotations

import dataclasses

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
    w[:512, :512] *= 4.0
    w[512:, 512:] *= 0.25
    return w


def _tile_slices(out=768, inp=1024, size=512):
    return [
        (slice(r, min(r + size, out)), slice(c, min(c + size, inp)))
        for r in range(0, out, size)
        for c in range(0, inp, size)
    ]


# ---- the config ------------------------------------------------------------------------------------


def test_tiles_config_is_checked_hashable_and_round_trips():
    assert not Tiles().active and TILES.active and Tiles(per_channel=True).active
    assert TILES.grid((768, 1024)) == (512, 512) and TILES.count((768, 1024)) == (2, 2)
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
    w[:, :4] *= 5.0  # channels 0-3 (the first tile of 4 channels = 36 inputs) larger
    v = Variation(0.1, tiles=Tiles(max_input_size=40))
    noise = (ops.perturb(w, v, rng=_rng())[0] - w) / (0.1 * v.scale)
    z = reference.draw_normal(_rng(), w.numel(), 1)[0].view(w.shape)
    for chans in (slice(0, 4), slice(4, 6)):
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
