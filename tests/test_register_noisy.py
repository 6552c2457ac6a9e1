"""nft_cuda.register_noisy: a layer type the library does not know becomes convertible (nft_cuda.nn.generic)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda import ops
from nft_cuda.nn import NoisyModule, SamplePlan

V = nft_cuda.Variation(0.2)


class TransposedLinear(nn.Module):
    """Stores its weight as [in, out] and computes x @ w + b."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.w + self.b


def _apply(module, w, x):
    return x @ w + module.b


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), TransposedLinear(5, 4))


def _registered():
    return nft_cuda.register_noisy(TransposedLinear, weight="w", apply=_apply)


def test_strict_raises_until_the_type_is_registered():
    nft_cuda.nn.unregister_noisy(TransposedLinear)
    with pytest.raises(ValueError, match=r"2\.w \[5, 4\]: unsupported type TransposedLinear"):
        nft_cuda.convert(_model(), V, strict=True)
    noisy_cls = _registered()
    model = _model()
    keys = list(model.state_dict())
    nft_cuda.convert(model, V, strict=True)
    assert type(model[2]) is noisy_cls and isinstance(model[2], TransposedLinear)
    assert isinstance(model[2], NoisyModule) and list(model.state_dict()) == keys
    # keyed by its name (noise stream 2; before it: its position 1 among the noisy layers)
    assert model[2].weight is model[2].w and model[2].layer_index == nft_cuda.nn.name_key("2")
    s = nft_cuda.conversion_summary(model)
    assert [(c.name, c.noisy_type, c.weights) for c in s.converted][-1] == ("2", "NoisyTransposedLinear", ("2.w",))
    assert not s.digital
    assert "variation=" in repr(model[2])


def test_modes_match_the_plain_forward_and_the_oracle():
    _registered()
    model = _model()
    x = torch.randn(3, 6)
    with torch.no_grad():
        clean = model(x)
        nft_cuda.convert(model, V)
        with nft_cuda.noise_mode(model, "off"):
            assert torch.equal(model(x), clean)  # mode off: the class's own forward, bit for bit
        nft_cuda.set_instance(model, seed=5, instance=2)
        h = model[1](model[0](x))
        ell = nft_cuda.nn.name_key("2")  # the layer's key: from its name (noise stream 2; was its position 1)
        w_noisy = ops.perturb(model[2].w, V, seed=5, offset=(ell << 32) | 2)[0]
        assert torch.equal(model[2](h), h @ w_noisy + model[2].b)
        assert torch.equal(model[2].noisy_weight(), w_noisy)
    plain = nft_cuda.strip(model)
    assert type(plain[2]) is TransposedLinear and not hasattr(plain[2], "_mode")
    assert plain[2].w is model[2].w


def test_gradients_are_straight_through_and_the_noise_is_not_stored():
    _registered()
    layer = nft_cuda.convert(TransposedLinear(5, 4), V)
    x = torch.randn(3, 5, requires_grad=True)
    g = torch.randn(3, 4)
    rng = torch.tensor([11, 7], dtype=torch.int64)
    w_noisy = ops.perturb(layer.w.detach(), V, rng=rng)[0]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    layer.set_sample_plan(rng)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert not any(t.shape == w_noisy.shape and torch.equal(t, w_noisy) for t in saved)
    out.backward(g)
    x64, w64, g64 = x.detach().double(), w_noisy.double().requires_grad_(), g.double()
    x64.requires_grad_()
    (x64 @ w64).backward(g64)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.w.grad, w64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.b.grad, g.sum(0))


def test_sample_axis_gives_each_chunk_its_own_chip():
    _registered()
    layer = nft_cuda.convert(TransposedLinear(5, 4), V)
    x = torch.randn(2, 3, 5)
    rng = torch.tensor([9, 4], dtype=torch.int64)
    sigmas = torch.tensor([0.2, 0.4])
    layer.set_sample_plan(rng, sigmas)
    with torch.no_grad():
        both = layer(x.reshape(6, 5)).reshape(2, 3, 4)
    for t in range(2):
        layer.set_sample_plan(*SamplePlan(rng, sigmas).select(t)[:2])
        with torch.no_grad():
            assert torch.equal(both[t], layer(x[t]))
    layer.set_sample_plan(rng, sigmas)
    with pytest.raises(ValueError, match="multiple of 2"):
        layer(torch.randn(3, 5))


def test_registration_errors():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        nft_cuda.register_noisy(int, "w", _apply)
    with pytest.raises(TypeError, match="already a noisy layer"):
        nft_cuda.register_noisy(nft_cuda.NoisyLinear, "weight", _apply)
    with pytest.raises(ValueError, match="parameter name"):
        nft_cuda.register_noisy(TransposedLinear, "not a name", _apply)
    with pytest.raises(TypeError, match="callable"):
        nft_cuda.register_noisy(TransposedLinear, "w", None)

    class _Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.ones(2, 2))

    nft_cuda.register_noisy(_Other, "w", _apply)
    with pytest.raises(ValueError, match="registered with weight 'w', which is not one of its parameters"):
        nft_cuda.convert(_Other(), V)


def test_torch_compile_fullgraph_matches_eager():
    _registered()
    layer = nft_cuda.convert(TransposedLinear(5, 4), V)
    nft_cuda.set_instance(layer, seed=0, instance=1)
    x = torch.randn(3, 5, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)(x)
    compiled.sum().backward()
    grad = layer.w.grad.clone()
    layer.zero_grad()
    eager = layer(x)
    eager.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, layer.w.grad, rtol=1e-5, atol=1e-6)
