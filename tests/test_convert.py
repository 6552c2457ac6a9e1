"""convert / strip / noise-mode helpers (nft_cuda.conversion) on nested models with a ResNet block."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda import NoisyConv1d, NoisyConv2d, NoisyLinear, NoisyModule, Variation, ops

V = Variation(0.1)
V2 = Variation(0.2, "RRAM4")
V3 = Variation(0.05, "FeFET6")


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, written out."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),  # features.0: the first layer
            nn.ReLU(),
            nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, padding_mode="reflect"),
                nn.Conv2d(8, 8, (3, 2), padding="same", groups=2, bias=False, padding_mode="circular"),
            ),
            BasicBlock(
                8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
            ),
            nn.Conv2d(16, 16, 3, padding=1, padding_mode="replicate"),
        )
        self.seq = nn.Conv1d(16, 4, 3, padding=1)
        self.heads = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 10)),
                "b": nn.Linear(4, 3),  # the last layer
            }
        )

    def forward(self, x):
        f = self.features(x)
        s = self.seq(f.flatten(2)).mean(-1)
        return self.heads["a"](f) + self.heads["b"](s).sum(-1, keepdim=True)


LAYERS = [
    "features.0",
    "features.2.0",
    "features.2.1",
    "features.3.conv1",
    "features.3.conv2",
    "features.3.downsample.0",
    "features.4",
    "seq",
    "heads.a.1",
    "heads.a.3",
    "heads.b",
]


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    model = Net().to(dtype).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model, torch.randn(4, 3, 8, 8, dtype=dtype)


def _noisy_names(model):
    return [n for n, _ in nft_cuda.noisy_layers(model)]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(sd, ref):
    assert list(sd.keys()) == list(ref.keys())
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


# ----------------------------------------------------------------------------------------------------------
# Off mode = the original model; strip gives it back
# ----------------------------------------------------------------------------------------------------------


def test_off_mode_identical_and_strip():
    model, x = _net()
    ref = model(x)
    sd = _snapshot(model)
    params = dict(model.named_parameters())
    assert nft_cuda.convert(model, V) is model
    assert _noisy_names(model) == LAYERS
    expected_types = {n: (NoisyLinear if "heads" in n else NoisyConv1d if n == "seq" else NoisyConv2d) for n in LAYERS}
    for name, layer in nft_cuda.noisy_layers(model):
        assert type(layer) is expected_types[name] and layer.mode == "train" and layer.variation == V
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    _assert_same_state(model.state_dict(), sd)

    noisy = model(x)
    assert not torch.allclose(noisy, ref)
    nft_cuda.set_noise_mode(model, "off")
    assert torch.equal(model(x), ref)

    plain = nft_cuda.strip(model)
    assert plain is model
    assert not any(isinstance(m, NoisyModule) for m in model.modules())
    for name in LAYERS:
        assert type(model.get_submodule(name)) in (nn.Linear, nn.Conv1d, nn.Conv2d)
    conv = model.get_submodule("features.2.1")
    assert (conv.groups, conv.padding, conv.padding_mode, conv.bias) == (2, "same", "circular", None)
    assert model.get_submodule("features.2.0").dilation == (2, 2)
    _assert_same_state(model.state_dict(), sd)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(model(x), ref)
    assert model.state_dict().keys() == Net().state_dict().keys()


def test_convert_mode_off_keeps_dtype_and_training_flag():
    model, x = _net(torch.float64)
    model.train()
    model.features[0].eval()
    with torch.no_grad():
        ref = model(x)
    model, x2 = _net(torch.float64)
    model.train()
    model.features[0].eval()
    nft_cuda.convert(model, V, mode="off")
    assert all(layer.mode == "off" and layer.weight.dtype == torch.float64 for _, layer in nft_cuda.noisy_layers(model))
    assert not model.features[0].training and model.features[4].training
    with torch.no_grad():
        assert torch.equal(model(x2), ref)


def test_noisy_model_trains_and_reproduces():
    model, x = _net()
    model.train()
    nft_cuda.convert(model, V)
    torch.manual_seed(5)
    y1 = model(x)
    y1.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    model.zero_grad()
    torch.manual_seed(5)
    y2 = model(x)
    y2.square().mean().backward()
    assert torch.equal(y1, y2)
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert not torch.allclose(model(x), y1)  # a new forward: new noise


# ----------------------------------------------------------------------------------------------------------
# Filters and per-layer variations
# ----------------------------------------------------------------------------------------------------------


def test_exclude_first_and_last():
    model, x = _net()
    ref = model(x)
    nft_cuda.convert(model, V, exclude=["features.0", "heads.b"])
    assert _noisy_names(model) == LAYERS[1:-1]
    assert type(model.features[0]) is nn.Conv2d and type(model.heads["b"]) is nn.Linear
    nft_cuda.set_noise_mode(model, "off")
    assert torch.equal(model(x), ref)


def test_include_globs_and_prefixes():
    model, _ = _net()
    nft_cuda.convert(model, V, include=["heads"])  # a prefix selects everything below it
    assert _noisy_names(model) == ["heads.a.1", "heads.a.3", "heads.b"]
    model, _ = _net()
    nft_cuda.convert(model, V, include="features.3.*", exclude=["*.downsample"])
    assert _noisy_names(model) == ["features.3.conv1", "features.3.conv2"]
    model, _ = _net()
    nft_cuda.convert(model, V, include=["features.*.0", "seq"])  # fnmatch: * also crosses dots
    assert _noisy_names(model) == ["features.2.0", "features.3.downsample.0", "seq"]


def test_per_layer_variations():
    model, _ = _net()
    nft_cuda.convert(
        model,
        V,
        exclude=["features.0"],
        per_layer={"heads.*": V2, "heads.b": V3, "features.3.conv1": V3, "features.2": V2},
    )
    expected = {n: V for n in LAYERS[1:]}
    expected.update(
        {
            "heads.a.1": V2,
            "heads.a.3": V2,
            "heads.b": V3,
            "features.3.conv1": V3,
            "features.2.0": V2,
            "features.2.1": V2,
        }
    )
    assert {n: m.variation for n, m in nft_cuda.noisy_layers(model)} == expected
    # converting again updates the variation of layers already noisy
    nft_cuda.convert(model, V2, include=["seq"])
    assert model.seq.variation == V2 and model.features[4].variation == V
    assert type(model.features[0]) is nn.Conv2d


def test_unknown_names_and_bad_types():
    model, _ = _net()
    with pytest.raises(ValueError, match=r"include 'features\.9'.*exclude 'head'.*per_layer 'nope\.\*'") as err:
        nft_cuda.convert(model, V, include=["features.9", "heads"], exclude=["head"], per_layer={"nope.*": V2})
    assert "features.3.conv1" in str(err.value)  # lists the layer names
    with pytest.raises(ValueError, match="left out by include/exclude"):
        nft_cuda.convert(model, V, exclude=["heads"], per_layer={"heads.b": V2})
    assert not _noisy_names(model)  # a failed convert changes nothing
    with pytest.raises(TypeError, match="model"):
        nft_cuda.convert(object(), V)
    with pytest.raises(TypeError, match="variation"):
        nft_cuda.convert(model, 0.1)
    with pytest.raises(TypeError, match="include"):
        nft_cuda.convert(model, V, include=[0])
    with pytest.raises(TypeError, match="exclude"):
        nft_cuda.convert(model, V, exclude=3)
    with pytest.raises(TypeError, match="per_layer"):
        nft_cuda.convert(model, V, per_layer=["heads.b"])
    with pytest.raises(TypeError, match=r"per_layer\['heads.b'\]"):
        nft_cuda.convert(model, V, per_layer={"heads.b": 0.2})
    with pytest.raises(ValueError, match="mode"):
        nft_cuda.convert(model, V, mode="instance")
    with pytest.raises(TypeError, match="model"):
        nft_cuda.strip("model")


def test_shared_module_lone_layer_and_mha():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    nft_cuda.convert(model, V)
    assert isinstance(model[0], NoisyLinear) and model[0] is model[2]
    nft_cuda.strip(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2] and model[0].weight is lin.weight

    noisy = nft_cuda.convert(lin, V)
    assert isinstance(noisy, NoisyLinear) and noisy.weight is lin.weight
    assert type(nft_cuda.strip(noisy)) is nn.Linear

    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: both convert together
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 2)})
    nft_cuda.convert(model, V)
    assert _noisy_names(model) == ["attn", "attn.out_proj", "fc"]


# ----------------------------------------------------------------------------------------------------------
# Instance mode over a model, mode helpers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_set_instance_layer_offsets(version):
    """Layer ℓ of chip 7 uses offset (ℓ << 32) | 7: ℓ = its position among the noisy layers in noise stream
    version 1 (the assertion before version 2), ℓ = name_key(its name) in version 2."""
    model, x = _net()
    nft_cuda.convert(model, V, exclude=["features.0"], per_layer={"heads.b": V2}, stream_version=version)
    assert nft_cuda.set_instance(model, seed=99, instance=7) is model
    weights = []
    for idx, (name, layer) in enumerate(nft_cuda.noisy_layers(model)):
        ell = idx if version == 1 else nft_cuda.nn.name_key(name)
        assert layer.layer_index == ell and layer.mode == "instance" and layer.stream_version == version
        w = layer.noisy_weight()
        expected = ops.perturb(layer.weight.detach(), layer.variation, seed=99, offset=(ell << 32) | 7)[0]
        assert torch.equal(w, expected), name
        weights.append(w)
    # two layers of the same shape get different noise (different ℓ)
    d1, d2 = (model.get_submodule(n) for n in ("features.3.conv2", "features.4"))
    assert not torch.allclose(d1.noisy_weight() - d1.weight, d2.noisy_weight() - d2.weight)

    y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)  # fixed over forwards
    torch.testing.assert_close(model(torch.cat([x, x[:1]]))[: len(x)], y1, rtol=1e-5, atol=1e-6)  # and batches
    nft_cuda.set_instance(model, 99, 8)
    y3 = model(x)
    assert not torch.allclose(y3, y1)
    nft_cuda.set_instance(model, 99, 7)
    assert torch.equal(model(x), y1)
    nft_cuda.set_noise_mode(model, "train")
    assert not torch.allclose(model(x), y1)
    nft_cuda.set_noise_mode(model, "instance")  # back to the instance already set
    assert torch.equal(model(x), y1)


def test_mode_helpers_validate_and_restore():
    model, x = _net()
    nft_cuda.convert(model, V)
    with pytest.raises(ValueError, match="unknown noise mode"):
        nft_cuda.set_noise_mode(model, "eval")
    with pytest.raises(ValueError, match="set_instance"):
        nft_cuda.set_noise_mode(model, "instance")
    with pytest.raises(ValueError, match="instance"):
        nft_cuda.set_instance(model, 0, -1)
    with pytest.raises(TypeError, match="seed"):
        nft_cuda.set_instance(model, 0.5, 1)
    assert all(m.mode == "train" for _, m in nft_cuda.noisy_layers(model))
    model.heads["b"].mode = "off"
    with nft_cuda.noise_mode(model, "off"):
        assert all(m.mode == "off" for _, m in nft_cuda.noisy_layers(model))
        clean = model(x)
    assert model.heads["b"].mode == "off" and model.features[0].mode == "train"
    nft_cuda.set_noise_mode(model, "off")
    assert torch.equal(model(x), clean)


def test_a_converted_root_has_its_children_converted_too():
    """A lone nn.MultiheadAttention is itself the converted root: its out_proj is converted as inside a
    container (it was left digital before), and strip restores both."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 2)
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        clean = plain(x, x, x)[0]
    layer = nft_cuda.convert(plain, Variation(0.1))
    assert [n for n, _ in nft_cuda.noisy_layers(layer)] == ["", "out_proj"]
    assert isinstance(layer.out_proj, NoisyLinear) and not nft_cuda.conversion_summary(layer).unexpected
    back = nft_cuda.strip(layer)
    assert type(back) is nn.MultiheadAttention
    assert type(back.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        assert torch.equal(back(x, x, x)[0], clean)
