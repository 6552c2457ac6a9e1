"""Input ranges learned during training (devices.InputRange, nft_cuda.nn.mvm): the clip, lightning's
gradients and decay against hand formulas, the data initialisation, one range per input tile, the state
(saved, exported, stripped) and a range that moves in `nft train`."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda import mvm_ops
from nft_cuda.devices import MVM, InputRange, Tiles, Variation
from nft_cuda.train import TrainConfig
from nft_cuda.train.trainer import train


def _layer(learned: InputRange, tiles=None, bits=None, sigma=0.0, shape=(6, 4)):
    torch.manual_seed(0)
    v = Variation(sigma, mvm=MVM(input_bits=bits, learned_input_range=learned), tiles=tiles)
    return nft_cuda.convert(nn.Sequential(nn.Linear(*shape)), v)[0]


def test_the_clip_and_its_gradients_are_lightnings():
    layer = _layer(InputRange(init_value=1.0, init_batches=0, decay=0.01, min_unclipped=0.5))
    x = torch.tensor([[0.5, 1.5, -2.0, 0.2, -0.3, 0.9], [1.0, -0.1, 0.4, -1.2, 3.0, 0.0]], requires_grad=True)
    c = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    (layer(x) * c).sum().backward()
    xc = x.detach().clamp(-1, 1)
    torch.testing.assert_close(layer(x).detach(), xc @ layer.weight.detach().t() + layer.bias.detach())
    g = c @ layer.weight.detach()  # dL/d(clipped x)
    upper, lower = x.detach() >= 1, x.detach() <= -1
    assert torch.equal(x.grad, g.masked_fill(upper | lower, 0))  # no gradient to a clipped input
    want = (g.clamp(max=0)[upper].sum() - g.clamp(min=0)[lower].sum()) * 1.0  # × r
    unclipped = 1 - float((upper | lower).float().mean())  # 8 of 12 pass: above 0.5, so the decay acts
    want = want + 0.01 * 1.0 * (unclipped > 0.5)
    torch.testing.assert_close(layer.input_range.grad, want.view(1))


def test_the_first_training_forwards_set_the_range_from_the_data():
    layer = _layer(InputRange(init_value=5.0, init_batches=2, init_std_alpha=3.0))
    xs = [torch.randn(8, 6) * s for s in (1.0, 2.0, 4.0)]
    layer.train()
    for x in xs:
        layer(x)
    want = (3.0 * xs[0].std() + 3.0 * xs[1].std()) / 2  # the running mean of α·std over 2 batches, then kept
    torch.testing.assert_close(layer.input_range.detach(), want.view(1))
    assert int(layer.input_range_updates) == 2
    layer.eval()
    layer(xs[0] * 10)
    torch.testing.assert_close(layer.input_range.detach(), want.view(1))  # evaluation never moves it


def test_one_range_per_input_tile_and_the_dac_over_it():
    layer = _layer(InputRange(init_value=1.0, init_batches=0), tiles=Tiles(max_input_size=4), bits=4, shape=(10, 3))
    assert layer.input_range.shape == (3,)  # inputs 0-3, 4-6, 7-9 (near-equal)
    with torch.no_grad():
        layer.input_range.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(5, 10) * 2
    with torch.no_grad():
        got = layer(x)
    want = layer.bias.detach().clone()
    for k, (a, b) in enumerate(((0, 4), (4, 7), (7, 10))):
        r = layer.input_range[k].detach()
        xk = mvm_ops.quantize(x[:, a:b].clamp(-r, r), 4, r)
        want = want + xk @ layer.weight.detach()[:, a:b].t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_ranges_are_state_saved_exported_and_stripped(tmp_path):
    from nft_cuda.io import load_model, save_model
    from nft_cuda.models import build_model

    v = Variation(0.1, mvm=MVM(learned_input_range=InputRange()))
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}
    model = nft_cuda.convert(build_model(**spec), v)
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    assert layers and all(any(p is layer.input_range for p in model.parameters()) for layer in layers)
    keys = [k for k in model.state_dict() if k.endswith(("input_range", "input_range_updates"))]
    assert len(keys) == 2 * len(layers)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.input_range.fill_(1.0 + i)
    save_model(str(tmp_path / "m.pt"), model, spec=spec, variation=v)
    loaded, _ = load_model(str(tmp_path / "m.pt"))
    assert [float(layer.input_range.detach()) for _, layer in nft_cuda.noisy_layers(loaded)] == [
        1.0 + i for i in range(len(layers))
    ]
    plain = nft_cuda.strip(model)
    assert not [k for k in plain.state_dict() if "input_range" in k]


def test_a_learned_range_moves_during_training(tmp_path):
    learned = {"init_value": 0.5, "init_batches": 0, "decay": 0.0}
    options = {"mvm": {"input_bits": 8, "learned_input_range": learned}}
    cfg = TrainConfig(out=str(tmp_path / "run"), device="cpu", limit_train=64, limit_eval=32, batch_size=16,
                      epochs=1, method="noise", device_options=options)  # fmt: skip
    train(cfg, progress=False, log=None)
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    ranges = {k: v for k, v in state.items() if k.endswith("input_range")}
    assert ranges and all(v.shape == (1,) for v in ranges.values())
    assert any(float(v) != 0.5 for v in ranges.values())  # a gradient reached it and the optimizer moved it


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="init_value must be a finite number > 0"):
        InputRange(init_value=0.0)
    with pytest.raises(ValueError, match="init_batches must be an int >= 0"):
        InputRange(init_batches=-1)
    with pytest.raises(ValueError, match="min_unclipped must be a fraction"):
        InputRange(min_unclipped=1.5)
    with pytest.raises(TypeError, match="learned_input_range must be an InputRange"):
        MVM(learned_input_range=3.0)
    assert MVM.from_dict(MVM(learned_input_range=InputRange(decay=0.0)).to_dict()).learned_input_range.decay == 0.0


def test_nft_train_learn_input_range_flag(tmp_path):
    from nft_cuda import cli

    out = tmp_path / "cli"
    argv = ["train", "--dac-bits", "8", "--learn-input-range", "--out", str(out), "--epochs", "1"]
    assert cli.main([*argv, "--limit-train", "64", "--limit-eval", "32", "--device", "cpu", "--no-progress"]) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["variation"]["mvm"]["learned_input_range"] == InputRange().__dict__
    assert any(k.endswith("input_range") for k in payload["state_dict"])
