"""Conversion loses nothing (nft_cuda.nn.base.retyped_copy): a subclass's attributes, extra buffers and
parameters, hooks and new-style parametrizations are carried over by convert and given back by strip;
old-style weight_norm / spectral_norm layers stay digital with a message saying what to use instead.
Each of these failed before conversion retyped layers (the layer was rebuilt as a plain NoisyLinear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import nft_cuda

V = nft_cuda.Variation(0.2, "RRAM1")


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass keeping nn.Linear's forward, with its own buffer, parameter and attribute."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out)
        self.register_buffer("calibration", torch.arange(float(n_out)))
        self.gain = nn.Parameter(torch.ones(n_out))
        self.tag = "kept"

    def describe(self) -> str:
        return f"{self.tag}:{self.out_features}"


def test_a_subclass_keeps_its_class_attributes_buffers_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 3))
    keys = list(model.state_dict())
    buffer, gain = model[0].calibration, model[0].gain
    nft_cuda.convert(model, V)
    layer = model[0]
    assert isinstance(layer, nft_cuda.NoisyLinear) and isinstance(layer, ScaledLinear)
    assert layer.tag == "kept" and layer.describe() == "kept:3"
    assert layer.calibration is buffer and layer.gain is gain
    assert list(model.state_dict()) == keys
    x = torch.randn(5, 4)
    rng = torch.tensor([1, 2])
    layer.set_sample_plan(rng)
    w = nft_cuda.ops.perturb(layer.weight.detach(), V, rng=rng)[0]
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=0, atol=1e-6)
    layer.set_sample_plan(None)
    nft_cuda.strip(model)
    assert type(model[0]) is ScaledLinear and model[0].calibration is buffer and model[0].tag == "kept"
    assert not hasattr(model[0], "_instance_rng") and list(model.state_dict()) == keys


def test_hooks_keep_firing_and_their_handles_keep_working():
    model = nn.Sequential(nn.Linear(4, 3), nn.Conv1d(1, 1, 1))
    calls = []
    pre = model[0].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    post = model[0].register_forward_hook(lambda m, a, o: calls.append("post"))
    model[0].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    nft_cuda.convert(model, V)
    assert isinstance(model[0], nft_cuda.NoisyLinear)
    x = torch.randn(2, 4, requires_grad=True)
    model[0](x).sum().backward()
    assert calls == ["pre", "post", "backward"]
    pre.remove()
    post.remove()  # a handle taken before convert removes the hook from the converted layer
    calls.clear()
    model[0](x)
    assert calls == []


def test_a_new_style_parametrization_is_carried_over_and_the_noise_acts_on_its_weight():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    parametrize.register_parametrization(lin, "weight", Double())
    original = lin.parametrizations.weight.original
    model = nn.Sequential(lin)
    nft_cuda.convert(model, V, strict=True)  # strict: nothing is left digital
    layer = model[0]
    assert isinstance(layer, nft_cuda.NoisyLinear) and parametrize.is_parametrized(layer, "weight")
    summary = nft_cuda.conversion_summary(model)
    assert summary.digital == () and [c.name for c in summary.converted] == ["0"]
    x = torch.randn(4, 3)
    rng = torch.tensor([3, 4])
    layer.set_sample_plan(rng)
    out = layer(x)
    w = nft_cuda.ops.perturb(2 * original.detach(), V, rng=rng)[0]  # the noise of the parametrized weight
    torch.testing.assert_close(out, F.linear(x, w, layer.bias), rtol=0, atol=1e-6)
    out.sum().backward()  # straight-through through the parametrization: d(2W)/dW = 2
    torch.testing.assert_close(original.grad, 2 * torch.ones(3, 1) * x.sum(0))
    layer.set_sample_plan(None)
    nft_cuda.strip(model)
    assert type(model[0]) is type(lin) and model[0].parametrizations.weight.original is original


def test_a_parametrized_layer_left_out_is_digital_for_its_layers_reason():
    lin = nn.Linear(3, 3)
    parametrize.register_parametrization(lin, "weight", nn.Identity())
    model = nn.Sequential(lin, nn.Linear(3, 2))
    nft_cuda.convert(model, V, exclude=["0"])
    (left,) = nft_cuda.conversion_summary(model).digital
    assert left.name == "0.parametrizations.weight.original" and "excluded by the user" in left.reason


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_old_style_weight_reparametrizations_stay_digital_with_a_clear_message(norm):
    lin = getattr(nn.utils, norm)(nn.Linear(4, 4))
    model = nn.Sequential(lin, nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=f"use torch.nn.utils.parametrizations.{norm}"):
        nft_cuda.convert(model, V)
    assert type(model[0]) is nn.Linear and isinstance(model[1], nft_cuda.NoisyLinear)
    model(torch.randn(2, 4))  # still runs (its hook recomputes the weight)
    reasons = {w.reason for w in nft_cuda.conversion_summary(model).unexpected}
    assert any(f"old-style torch.nn.utils.{norm}" in r for r in reasons), reasons
    with pytest.raises(ValueError, match="old-style"):
        nft_cuda.convert(nn.Sequential(getattr(nn.utils, norm)(nn.Linear(4, 4))), V, strict=True)


def test_a_meta_device_model_converts_without_allocating_and_loads_a_checkpoint():
    source = nn.Sequential(nn.Linear(4, 3), nn.Conv1d(1, 2, 3))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Conv1d(1, 2, 3))
    nft_cuda.convert(model, V)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    with nft_cuda.noise_mode(model, "off"):
        torch.testing.assert_close(model[0](torch.ones(1, 4)), source[0](torch.ones(1, 4)), rtol=0, atol=0)
    nft_cuda.set_instance(model, seed=0, instance=1)
    assert not torch.equal(model[0](torch.ones(1, 4)), source[0](torch.ones(1, 4)))
