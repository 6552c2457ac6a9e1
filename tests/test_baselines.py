"""The competing training baselines of issue 29 (nft_cuda.train.methods): soft-orthogonality regularised
noise injection ("ortho") and right-censored noise injection ("trice"), each against a hand formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda
from nft_cuda import reference
from nft_cuda.train.methods import METHODS, CensoredNoise, NoiseInjection, OrthogonalNoise, build_method

V = nft_cuda.Variation(0.2)


def _model():
    torch.manual_seed(0)
    return nft_cuda.convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), V)


def test_ortho_loss_is_noise_injection_plus_the_penalty(one_thread):
    model = _model()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    method = OrthogonalNoise(V, lam=0.01, beta=0.5)
    torch.manual_seed(7)
    ce, _ = NoiseInjection(V).loss(model, x, y)
    torch.manual_seed(7)
    loss, _ = method.loss(model, x, y)
    conv = model[0].weight.reshape(4, -1)  # 4 ≤ 9: the Gram matrix of the rows
    lin = model[3].weight.reshape(3, -1)
    want = ((conv @ conv.t() - 0.5 * torch.eye(4)) ** 2).sum() + ((lin @ lin.t() - 0.5 * torch.eye(3)) ** 2).sum()
    assert loss.item() == pytest.approx(ce.item() + 0.01 * want.item(), rel=1e-6)
    loss.backward()
    assert model[3].weight.grad is not None


def test_ortho_penalty_uses_the_smaller_gram():
    w = torch.randn(6, 2)  # out > fan_in: Wᵀ·W
    layer = nft_cuda.NoisyLinear(2, 6, variation=V)
    with torch.no_grad():
        layer.weight.copy_(w)
    got = OrthogonalNoise(V).penalty(nn.Sequential(layer))
    assert got.item() == pytest.approx(((w.t() @ w - torch.eye(2)) ** 2).sum().item(), rel=1e-6)


def test_trice_weights_are_the_censored_draws(one_thread):
    model = _model()
    layer = model[3]
    rng = torch.tensor([11, 22], dtype=torch.int64)
    method = CensoredNoise(V, cut=0.5)
    got = method.censored_weight(layer, rng)[0]
    z = reference.draw_normal(rng, layer.weight.numel(), 1, 0)[0].view(layer.weight.shape)
    sw = V.sigma_w(layer.weight)
    want = layer.weight.detach() + (sw * z.clamp(-0.5, 0.5))
    assert torch.allclose(got, want, atol=1e-7)
    assert ((got - layer.weight).abs() <= 0.5 * sw + 1e-7).all()  # no deviation beyond the cut
    # A cut above every draw gives the reference noise of that stream exactly.
    free = CensoredNoise(V, cut=1e9).censored_weight(layer, rng)[0]
    assert torch.equal(free, reference.perturb(layer.weight, rng, torch.tensor([0.2]), V.scale, V.state_factor)[0])


def test_trice_loss_trains_straight_through(one_thread):
    model = _model()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    method = CensoredNoise(V, cut=1.0)
    torch.manual_seed(3)
    loss, logits = method.loss(model, x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item())
    loss.backward()
    assert model[0].weight.grad is not None and model[3].weight.grad.abs().sum() > 0
    assert all(layer.sample_plan is None for _, layer in nft_cuda.noisy_layers(model))  # plans removed


def test_registered_and_refusals():
    assert {"ortho", "trice"} <= set(METHODS)
    assert isinstance(build_method("ortho", V), OrthogonalNoise)
    assert isinstance(build_method("trice", V), CensoredNoise)
    with pytest.raises(ValueError, match="cut"):
        CensoredNoise(V, cut=0.0)
    with pytest.raises(ValueError, match="lam"):
        OrthogonalNoise(V, lam=-1.0)
    stuck = nft_cuda.devices.make_device_model("stuck-at", 1.0)
    model = nft_cuda.convert(nn.Sequential(nn.Linear(3, 2)), stuck)
    with pytest.raises(ValueError, match="normal draws"):
        CensoredNoise(stuck).loss(model, torch.randn(2, 3), torch.tensor([0, 1]))
