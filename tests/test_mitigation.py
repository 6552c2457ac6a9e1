"""Write-verify and per-chip BatchNorm recalibration on common chips (nft_cuda.eval.mitigation)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda.eval import mitigation
from nft_cuda.eval.mitigation import mitigated_chips, verify_masks
from nft_cuda.eval.monte_carlo import monte_carlo

V = nft_cuda.Variation(0.4)


def _data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=g) * 1.5
    y = torch.randint(0, 3, (n,), generator=g)
    return centres[y] + torch.randn(n, 8, generator=g), y


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    loader = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 400, 100)]
    return nft_cuda.convert(model, V), loader


def test_plain_chips_are_monte_carlos_chips(model_and_data, one_thread):
    model, loader = model_and_data
    plain = mitigated_chips(model, loader, 6, seed=3)
    (mc,) = monte_carlo(model, loader, V, runs=6, seed=3, progress=False)
    assert plain["per_instance_accuracy"] == mc["per_instance_accuracy"]


def test_full_verify_without_residual_is_the_clean_model(model_and_data):
    model, loader = model_and_data
    out = mitigated_chips(model, loader, 3, seed=0, verify_fraction=1.0, residual=0.0)
    with nft_cuda.noise_mode(model, "off"), torch.no_grad():
        clean = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader) / 400
    assert out["per_instance_accuracy"] == [clean] * 3


def test_verified_weights_formula(model_and_data):
    model, _ = model_and_data
    masks = verify_masks(model, 0.25, "magnitude")
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    with nft_cuda.nn.kept_noise_state(model):
        nft_cuda.set_instance(model, 1, 2)
        mitigation._chip_weights(layers, masks, 0.1)
        for layer, mask in zip(layers, masks):
            chip = layer.noisy_weight(layer.noise_state().instance_rng)
            w = layer.weight.detach()
            got = layer.sample_plan.weights[0]
            assert torch.equal(got[~mask], chip[~mask])
            assert torch.allclose(got[mask], w[mask] + 0.1 * (chip[mask] - w[mask]))


@pytest.mark.parametrize("rule", mitigation.VERIFY_RULES)
def test_masks_count_and_rule(model_and_data, rule):
    model, loader = model_and_data
    masks = verify_masks(model, 0.1, rule, batches=loader[:2])
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == math.floor(0.1 * total)
    assert [m.shape for m in masks] == [layer.weight.shape for _, layer in nft_cuda.noisy_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(masks, verify_masks(model, 0.1, rule, batches=loader[:2])))


def test_magnitude_picks_the_largest_weights(model_and_data):
    model, _ = model_and_data
    masks = verify_masks(model, 0.05, "magnitude")
    weights = torch.cat([layer.weight.detach().abs().reshape(-1) for _, layer in nft_cuda.noisy_layers(model)])
    chosen = torch.cat([m.reshape(-1) for m in masks])
    assert weights[chosen].min() >= weights[~chosen].max()


def test_saliency_verify_helps_on_the_same_chips(model_and_data, one_thread):
    model, loader = model_and_data
    plain = mitigated_chips(model, loader, 8, seed=0)
    verified = mitigated_chips(
        model, loader, 8, seed=0, verify_fraction=0.2, verify_rule="saliency", score_batches=loader
    )
    assert plain["accuracy_mean"] < 0.97  # σ_d 0.4 hurts this model
    assert verified["accuracy_mean"] > plain["accuracy_mean"]


def test_recalibration_recomputes_statistics_per_chip(model_and_data, one_thread):
    model, loader = model_and_data
    bn = model[1]
    before = copy.deepcopy(bn.state_dict())
    out = mitigated_chips(model, loader, 4, seed=0, recalibrate=2, calibration_loader=loader)
    assert out["recalibrate"] == 2 and len(out["per_instance_accuracy"]) == 4
    for k, v in bn.state_dict().items():  # the model's own statistics are back
        assert torch.equal(v, before[k]), k
    # The statistics a chip gets: the cumulative mean of its first layer's outputs over the two batches.
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    with nft_cuda.nn.kept_noise_state(model), torch.no_grad():
        nft_cuda.set_instance(model, 0, 0)
        mitigation._chip_weights(layers, None, 0.1)
        mitigation._recalibrate(model, loader[:2])
        h = torch.cat([model[0](x) for x, _ in loader[:2]])
        assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
        bn.load_state_dict(before)


def test_bad_arguments(model_and_data):
    model, loader = model_and_data
    with pytest.raises(ValueError, match="fraction"):
        verify_masks(model, 1.5)
    with pytest.raises(ValueError, match="unknown write-verify rule"):
        verify_masks(model, 0.1, "largest")
    with pytest.raises(ValueError, match="needs batches"):
        verify_masks(model, 0.1, "gradient")
    with pytest.raises(ValueError, match="calibration_loader"):
        mitigated_chips(model, loader, 2, seed=0, recalibrate=1)
    with pytest.raises(ValueError, match="runs"):
        mitigated_chips(model, loader, 0, seed=0)
    with pytest.raises(ValueError, match="residual"):
        mitigated_chips(model, loader, 1, seed=0, residual=2.0)
