"""Side by side with aihwkit-lightning (issue 26): the same HWA configuration in both libraries, on the same
weights and inputs, gives the same per-channel weight noise, weight clipping, output noise and output bound.

The peer (``pip install --no-deps aihwkit-lightning==2.1.0``, installed by the set-up) is configured as
``benchmarks/peer.py`` does, with ``TorchInferenceRPUConfig`` and its PyTorch path (no Triton). Its formulas,
read in its installed source (``nn/modules/torch_utils/torch_linear.py``, ``nn/modules/linear.py`` and
``conv.py``), per input slice k of ``mapping.max_input_size`` inputs:

* ``ADD_NORMAL_PER_CHANNEL``: W + std_dev·max|W_row,k|·z; ``ADD_NORMAL``: W + std_dev·max|W_k|·z;
* ``clip_weights`` (``AnalogOptimizer``'s step post-hook): clamp to ±sigma·W.std() (``LAYER_GAUSSIAN``) or
  ±sigma·W.view(out, −1).std(1) (``LAYER_GAUSSIAN_PER_CHANNEL``), n − 1 std;
* ``forward.out_noise`` (training only): + out_noise·max|W_k|·r_k/√T·z per output of slice k (max|W_row,k|
  with ``out_noise_per_channel``);
* ``forward.out_bound``: each slice's output clamped to ±out_bound·max|W_k|·r_k.

Statistics are compared within 5 standard errors of the sample std (σ/√(2(n − 1)) for n Gaussian
samples), per row or column: with ≤ 256 compared stds a false failure has odds below 10⁻⁴, and each test
also checks that the other normalisation (per tensor for per channel, no /√T, ...) would fail it.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

import nft_cuda
from nft_cuda.devices import MVM, Tiles
from nft_cuda.devices.tiles import tile_max
from nft_cuda.train import WeightClip, clip_weights

with contextlib.redirect_stdout(io.StringIO()):  # its import prints a line when Triton cannot be used
    pytest.importorskip(
        "aihwkit_lightning.nn",
        reason="aihwkit-lightning is not installed (pip install --no-deps aihwkit-lightning==2.1.0)",
    )

from aihwkit_lightning.nn import AnalogConv2d, AnalogLinear  # noqa: E402
from aihwkit_lightning.optim import AnalogOptimizer  # noqa: E402
from aihwkit_lightning.simulator.configs import (  # noqa: E402
    TorchInferenceRPUConfig,
    WeightClipType,
    WeightNoiseInjectionType,
)

#: Standard errors a measured std may lie from the expected one (module docstring).
Z = 5.0


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    monkeypatch.delenv("AIHWKIT_USE_TRITON", raising=False)
    torch.manual_seed(0)


def _std_se(std: torch.Tensor, n: int) -> torch.Tensor:
    """Standard error of a sample std of n Gaussian samples of true std ``std``."""
    return std / math.sqrt(2 * (n - 1))


def _peer_config(*, max_input_size=None, input_range=None, **forward):
    """The peer's config: every non-ideality off (benchmarks/peer.py's defaults) except those given; a fixed,
    not learned input range r when ``input_range`` is given (no initialisation from data)."""
    cfg = TorchInferenceRPUConfig()
    cfg.mapping.max_input_size = -1 if max_input_size is None else max_input_size
    for name, value in forward.items():
        setattr(cfg.forward, name, value)
    if input_range is not None:
        ir = cfg.pre_post.input_range
        ir.enable, ir.learn_input_range, ir.init_from_data, ir.init_value = True, False, 0, input_range
    return cfg


def _peer_linear(weight, cfg, bias=None):
    layer = AnalogLinear(weight.shape[1], weight.shape[0], bias=bias is not None, rpu_config=cfg)
    layer.set_weights_and_biases(weight, bias)
    return layer


def _nft_linear(weight, variation, bias=None):
    layer = nft_cuda.NoisyLinear(weight.shape[1], weight.shape[0], bias=bias is not None, variation=variation)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _used_weight(layer) -> torch.Tensor:
    """The weight one (training) forward used, read through the identity input (no bias)."""
    with torch.no_grad():
        return layer(torch.eye(layer.weight.shape[1])).t()


# --------------------------------------------------------------------------------------------------
# 1. Per-channel (and per-tensor) weight noise
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_input_size", [None, 512])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_noise_matches_lightning(per_channel, max_input_size):
    """std of (W_noisy − W)/m per (row, input tile), m the max|W| the noise scales with (per row of the tile
    for per-channel noise, of the tile otherwise): σ_d·scale in both, and equal to each other."""
    out, inp, draws = 64, 1024, 16
    w = torch.randn(out, inp) * torch.logspace(-1, 0, out)[:, None]  # rows of max|W| from 0.1 to 1 (×)
    w[:, :512] *= 0.5  # the two input tiles of a row: different max|W|
    variation = nft_cuda.Variation(0.1, "RRAM1", tiles=Tiles(max_input_size=max_input_size, per_channel=per_channel))
    s = variation.sigma * variation.scale  # the peer's std_dev (benchmarks/peer.py noise_std)
    cfg = _peer_config(max_input_size=max_input_size)
    kind = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL if per_channel else WeightNoiseInjectionType.ADD_NORMAL
    cfg.modifier.noise_type, cfg.modifier.std_dev = kind, s
    layers = {"nft_cuda": _nft_linear(w, variation).train(), "lightning": _peer_linear(w, cfg).train()}
    tiles = 1 if max_input_size is None else inp // max_input_size
    other = tile_max(w, Tiles(max_input_size=max_input_size, per_channel=not per_channel))
    m = tile_max(w, variation.tiles)
    assert not torch.equal(m, other)
    std, wrong = {}, {}
    for name, layer in layers.items():
        noise = torch.stack([_used_weight(layer) - w for _ in range(draws)])  # [R, O, I]
        torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=0)  # noise not written into W
        per_tile = lambda t: t.view(draws, out, tiles, -1).permute(1, 2, 0, 3).reshape(out, tiles, -1)  # noqa: E731
        std[name] = per_tile(noise / m).std(-1)  # [O, T]
        wrong[name] = per_tile(noise / other).std(-1)
    se = _std_se(torch.tensor(s), draws * inp // tiles)
    for name in layers:
        assert ((std[name] - s).abs() <= Z * se).all(), (name, (std[name] / s).min(), (std[name] / s).max())
        assert ((wrong[name] - s).abs() > Z * se).any()  # the other normalisation is caught
    assert ((std["nft_cuda"] - std["lightning"]).abs() <= Z * math.sqrt(2) * se).all()


# --------------------------------------------------------------------------------------------------
# 2. Weight clipping after the optimizer step
# --------------------------------------------------------------------------------------------------


def _clip_pair(make, kind, sigma=2.0):
    """(the peer's weight after an AnalogOptimizer SGD step, nft_cuda's after the same SGD step and
    clip_weights), from the same weight and gradient; and the weight before clipping."""
    clean = make()
    with torch.no_grad():
        clean.weight.mul_(torch.randn_like(clean.weight).exp())  # heavy tails: the clip bites
    cfg = TorchInferenceRPUConfig()
    cfg.clip.type, cfg.clip.sigma = getattr(WeightClipType, kind.upper().replace("-", "_")), sigma
    cls = AnalogConv2d if isinstance(clean, torch.nn.Conv2d) else AnalogLinear
    peer = cls.from_digital(clean, cfg)
    model = nft_cuda.convert(torch.nn.Sequential(clean), nft_cuda.Variation(0.1, "RRAM1"))
    grad = torch.randn_like(peer.weight)
    peer.weight.grad, model[0].weight.grad = grad.clone(), grad.clone()
    AnalogOptimizer(torch.optim.SGD, peer.analog_layers, peer.parameters(), lr=0.1).step()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    before = model[0].weight.detach().clone()
    clip_weights(model, WeightClip(kind.replace("layer-", "").lower(), sigma=sigma))
    return peer.weight.detach(), model[0].weight.detach(), before


@pytest.mark.parametrize("kind", ["layer-gaussian", "layer-gaussian-per-channel"])
@pytest.mark.parametrize(
    "make", [lambda: torch.nn.Linear(300, 40), lambda: torch.nn.Conv2d(8, 16, 3, padding=1)], ids=["linear", "conv"]
)
def test_weight_clipping_matches_lightning(make, kind):
    """LAYER_GAUSSIAN / LAYER_GAUSSIAN_PER_CHANNEL through the peer's AnalogOptimizer step vs clip_weights
    with WeightClip("gaussian" / "gaussian-per-channel"): the same weights, bit for bit."""
    torch.manual_seed(1)
    peer, ours, before = _clip_pair(make, kind)
    assert torch.equal(peer, ours)
    assert 0.01 < (ours != before).float().mean() < 0.2  # the clip bites
    torch.manual_seed(1)
    other = _clip_pair(make, "layer-gaussian" if kind.endswith("channel") else "layer-gaussian-per-channel")[1]
    assert not torch.equal(other, ours)  # the two kinds differ on this weight


def test_weight_clipping_documented_differences():
    """The peer has no FIXED_VALUE kind; a constant row (std 0) is zeroed by the peer, left by nft_cuda."""
    assert "FIXED_VALUE" not in WeightClipType.__members__
    w = torch.randn(4, 16)
    w[2] = 0.3
    cfg = TorchInferenceRPUConfig()
    cfg.clip.type, cfg.clip.sigma = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL, 2.0
    peer = _peer_linear(w, cfg)
    peer.clip_weights()
    model = torch.nn.Sequential(_nft_linear(w, nft_cuda.Variation(0.1, "RRAM1")))
    clip_weights(model, WeightClip("gaussian-per-channel", sigma=2.0))
    assert torch.equal(peer.weight[2], torch.zeros(16)) and torch.equal(model[0].weight[2], w[2])
    rows = [0, 1, 3]
    assert torch.equal(peer.weight[rows], model[0].weight[rows])


# --------------------------------------------------------------------------------------------------
# 3. Output noise and output bound, per input tile
# --------------------------------------------------------------------------------------------------

OUT, INP, R = 32, 1024, 2.0


def _tile_weight():
    """[32, 1024] whose four 256-input tiles have different max|W| (and rows different ones per tile)."""
    w = torch.randn(OUT, INP) * torch.linspace(0.5, 1.0, OUT)[:, None]
    w[:, 256:512] *= 3.0
    w[:, 768:] *= 0.3
    return w


def _inputs(batch):
    return (torch.rand(batch, INP) * 2 - 1) * R * 0.999  # inside the input range: the peer clamps at ±r


def _mvm_pair(w, max_input_size, per_channel=False, bias=None, *, out_noise=0.0, out_bound=None):
    cfg = _peer_config(
        max_input_size=max_input_size,
        input_range=R,
        out_noise=out_noise,
        out_noise_per_channel=per_channel,
        out_bound=out_bound or 0.0,
    )
    tiles = Tiles(max_input_size=max_input_size, per_channel=per_channel)
    mvm = MVM(output_noise=out_noise, output_bound=out_bound)
    nft = _nft_linear(w, nft_cuda.Variation(0.0, "RRAM1", tiles=tiles, mvm=mvm), bias)  # no weight noise
    nft.set_mvm_ranges(R, None)
    peer = _peer_linear(w, cfg, bias)
    assert torch.equal(peer.input_range.detach(), torch.full((len(peer.in_sizes),), R))
    return nft, peer


@pytest.mark.parametrize(
    "max_input_size, per_channel",
    [(256, False), (256, True), (None, False)],
    ids=["4-tiles", "4-tiles-per-channel", "1-tile"],
)
def test_output_noise_matches_lightning(max_input_size, per_channel):
    """std of y − y_clean per output column = σ·r·sqrt(mean_k m_k²), m_k the max|W| of input tile k (of the
    column's row in tile k with per-channel output noise): the T tiles' σ·m_k·r/√T added."""
    sigma, batch = 0.05, 4096
    w = _tile_weight()
    nft, peer = _mvm_pair(w, max_input_size, per_channel, out_noise=sigma)
    tiles = 1 if max_input_size is None else INP // max_input_size
    per_row = w.abs().view(OUT, tiles, -1).amax(-1)  # [O, T]
    m = per_row if per_channel else per_row.amax(0, keepdim=True).expand(OUT, tiles)
    want = sigma * R * m.square().mean(1).sqrt()
    x = _inputs(batch)
    clean = x @ w.t()
    se = _std_se(want, batch)
    got = {}
    for name, layer in (("nft_cuda", nft), ("lightning", peer)):
        with torch.no_grad():
            got[name] = (layer.train()(x) - clean).std(0)
        assert ((got[name] - want).abs() <= Z * se).all(), (name, (got[name] / want).min(), (got[name] / want).max())
        if tiles > 1:  # without the /√T the noise would be 2× as large
            assert ((got[name] - want * math.sqrt(tiles)).abs() > Z * se).all()
    assert ((got["nft_cuda"] - got["lightning"]).abs() <= Z * math.sqrt(2) * se).all()
    assert torch.equal(peer.input_range.detach(), torch.full((tiles,), R))  # not learned, not re-initialised


def test_output_bound_matches_lightning():
    """forward.out_bound β vs MVM(output_bound=β) on 4 input tiles, noise off: each tile's partial sum
    clamped at ±β·max|W_k|·r, then summed and the bias added — the same outputs, train and eval mode."""
    beta = 2.0
    w, bias = _tile_weight(), torch.randn(OUT)
    nft, peer = _mvm_pair(w, 256, bias=bias, out_bound=beta)
    x = _inputs(256)
    partial = torch.einsum("bti,oti->bto", x.view(-1, 4, 256), w.view(OUT, 4, 256))
    bound = beta * w.abs().view(OUT, 4, 256).amax((0, 2)) * R  # [T]
    clipped = (partial.abs() > bound[None, :, None]).float().mean()
    assert 0.1 < clipped < 0.9  # the bound bites on every tile, not on every output
    want = partial.clamp(-bound[None, :, None], bound[None, :, None]).sum(1) + bias
    scale = want.abs().max().item()
    for mode in ("train", "eval"):
        with torch.no_grad():
            got = {name: getattr(layer, mode)()(x) for name, layer in (("nft_cuda", nft), ("lightning", peer))}
        for name, y in got.items():
            torch.testing.assert_close(y, want, rtol=0, atol=1e-6 * scale, msg=f"{name} ({mode})")
        torch.testing.assert_close(got["nft_cuda"], got["lightning"], rtol=0, atol=1e-6 * scale)


def test_documented_difference_input_clamp_and_the_same_uneven_tiles():
    """(1) A documented difference (docs/device-models.md, Tiles): the peer clamps every input to ±r once an
    input range is on; nft_cuda clips only in the DAC (input_bits) or a learned range, so with exact inputs
    an input beyond r passes. (2) A size that is not a multiple of max_input_size: both split it into
    near-equal tiles (aihwkit's TileModuleArray too)."""
    w = _tile_weight()
    nft, peer = _mvm_pair(w, 256, out_bound=100.0)  # a bound that never bites
    x = _inputs(64) * 2  # half the inputs beyond ±r
    with torch.no_grad():
        scale = (x @ w.t()).abs().max().item()
        torch.testing.assert_close(peer.eval()(x), nft(x.clamp(-R, R)), rtol=0, atol=1e-6 * scale)
        assert (peer(x) - nft(x)).abs().max() > 0.1 * scale
    cfg = _peer_config(max_input_size=512)
    assert AnalogLinear(1000, 8, rpu_config=cfg).in_sizes == [500, 500]
    assert Tiles(max_input_size=512).split((8, 1000))[1] == (500, 500)  # the same near-equal split
    w = _tile_weight()[:, :1000] * torch.linspace(0.2, 3.0, 1000)  # 1000 inputs, large weights at the end
    nft, peer = _mvm_pair(w, 512, out_bound=2.0)  # the bound bites, tile by tile
    x = (torch.rand(64, 1000) * 2 - 1) * R * 0.999
    with torch.no_grad():
        scale = (x @ w.t()).abs().max().item()
        torch.testing.assert_close(nft(x), peer.eval()(x), rtol=0, atol=1e-5 * scale)
