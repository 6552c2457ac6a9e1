"""Hardware-aware training presets (nft_cuda.train.presets) and the ADC over the output bound they use:
each preset is the recipe its source states, trains from the command line, and explicit options win."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda import cli, mvm_ops
from nft_cuda.devices import MVM, PCM, InputRange, Tiles, Variation, device_model_from_dict
from nft_cuda.train import WeightClip
from nft_cuda.train.presets import HWA_PRESETS, preset

_TINY = ("--epochs", "1", "--limit-train", "64", "--limit-eval", "32", "--device", "cpu", "--no-progress")


def test_the_lightning_recipe_is_its_user_guides():
    p = preset("lightning-hwa")
    v = p.device()
    assert isinstance(v, Variation) and v.device_model == "RRAM1"
    assert v.sigma * v.scale == pytest.approx(0.05)  # ADD_NORMAL_PER_CHANNEL std_dev 0.05 of max|W_channel|
    assert v.tiles == Tiles(max_input_size=512, per_channel=True)
    learned = InputRange(init_value=3.0, init_batches=100, init_std_alpha=3.0, decay=0.001, min_unclipped=0.95)
    assert v.mvm == MVM(input_bits=8, output_bits=8, output_noise=0.01, output_bound=12.0, adc_range="bound",
                        learned_input_range=learned)  # fmt: skip
    assert p.weight_clip == WeightClip("gaussian-per-channel", sigma=2.5)


def test_the_aihwkit_preset_is_standard_hwa_training_preset():
    p = preset("aihwkit-standard-hwa")
    v = p.device()
    assert isinstance(v, PCM) and v.sigma == 1.0 and v.drift_compensation and v.compensation_rule == "one-hot"
    assert v.aihwkit_read  # aihwkit's read step: it reproduces aihwkit's PCM
    assert v.tiles == Tiles(max_input_size=512, per_channel=True)
    m = v.mvm
    assert (m.input_bits, m.output_bits, m.read_noise, m.output_noise, m.output_bound) == (8, 8, 0.0175, 0.04, 10.0)
    assert m.adc_range == "bound" and m.learned_input_range == InputRange()
    assert p.weight_clip == WeightClip()  # its FIXED_VALUE 1.0 acts on per-column-normalised weights: a no-op
    with pytest.raises(ValueError, match="unknown HWA preset 'ibm'; known: lightning-hwa, aihwkit-standard-hwa"):
        preset("ibm")


@pytest.mark.parametrize("name", list(HWA_PRESETS))
def test_each_preset_trains_from_the_command_line(name, tmp_path):
    out = tmp_path / name
    assert cli.main(["train", "--preset", name, "--out", str(out), *_TINY]) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    assert device_model_from_dict(payload["variation"]) == preset(name).device()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert WeightClip.from_dict(ckpt["config"]["weight_clip"]) == preset(name).weight_clip
    assert any(k.endswith("input_range") for k in payload["state_dict"])


def test_explicit_options_win_over_the_preset(tmp_path):
    out = tmp_path / "mixed"
    argv = ["train", "--preset", "lightning-hwa", "--adc-bits", "6", "--max-input-size", "256", "--sigma", "0.1"]
    assert cli.main([*argv, "--weight-clip", "gaussian", "--weight-clip-sigma", "3", "--out", str(out), *_TINY]) == 0
    v = device_model_from_dict(torch.load(out / "model.pt", weights_only=True)["variation"])
    base = preset("lightning-hwa").device()
    assert v.sigma == 0.1 and v.mvm.output_bits == 6 and v.mvm.input_bits == 8  # the rest of the MVM kept
    assert v.tiles == Tiles(max_input_size=256, per_channel=True) and v.mvm.output_noise == base.mvm.output_noise
    clip = torch.load(out / "checkpoint.pt", weights_only=True)["config"]["weight_clip"]
    assert WeightClip.from_dict(clip) == WeightClip("gaussian", sigma=3.0)


def test_the_adc_over_the_output_bound():
    torch.manual_seed(0)
    mvm = MVM(output_bits=4, output_bound=0.5, adc_range="bound")
    layer = nft_cuda.convert(nn.Sequential(nn.Linear(12, 5)), Variation(0.0, mvm=mvm))[0]
    x = torch.randn(7, 12)
    nft_cuda.set_instance(layer, seed=0, instance=0)
    with torch.no_grad():
        got = layer(x)
    r = 0.5 * layer.weight.detach().abs().max() * x.abs().max()  # β·max|W|·r_in (r_in: the chunk's max)
    y = (x @ layer.weight.detach().t()).clamp(-r, r)
    torch.testing.assert_close(got, mvm_ops.quantize(y, 4, r) + layer.bias.detach(), rtol=1e-6, atol=1e-6)
    tiled = nft_cuda.convert(nn.Sequential(nn.Linear(12, 5)), Variation(0.0, mvm=mvm, tiles=Tiles(per_channel=True)))[0]
    with torch.no_grad():
        tiled.weight.copy_(layer.weight)
        tiled.bias.copy_(layer.bias)
    nft_cuda.set_instance(tiled, seed=0, instance=0)
    with torch.no_grad():
        got = tiled(x)
    r = 0.5 * layer.weight.detach().abs().amax(1) * x.abs().max()  # per channel: each column's own bound
    y = (x @ layer.weight.detach().t()).clamp(-r, r)
    torch.testing.assert_close(got, mvm_ops.quantize(y, 4, r) + layer.bias.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="adc_range 'bound' needs an output_bound"):
        MVM(output_bits=8, adc_range="bound")
    with pytest.raises(ValueError, match="adc_range must be one of 'calibrated', 'bound'"):
        MVM(adc_range="fixed")
