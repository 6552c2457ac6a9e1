"""The sample axis of noisy layers (nft_cuda.sample_axis): S noise samples in one pass equal S
one-sample forwards on streams offset + t, values, gradients and BatchNorm statistics included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda.nn import stacked
from nft_cuda.sample_axis import sample_plan, unbatchable_modules

TOL = dict(rtol=1e-5, atol=1e-6)
# Gradients: the conv bias of _model feeds a BatchNorm, so its true gradient is 0 and what is left is
# float32 rounding of sums of O(10) terms (~1e-6, in either sample-axis mode, depending on the input).
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def _model(v):
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6)
    )
    return nft_cuda.convert(m, v)


def _plans(model, rng, sigmas):
    return {layer: (rng, sigmas) for _, layer in nft_cuda.noisy_layers(model)}


@pytest.mark.parametrize("calls", stacked.SAMPLE_AXIS_MODES)
@pytest.mark.parametrize("samples", [1, 3])
def test_batched_equals_sequential(samples, calls):
    with stacked.sample_axis_calls(calls):
        _batched_equals_sequential(samples)


def _batched_equals_sequential(samples):
    v = nft_cuda.Variation(0.2, "FeFET2")
    a, b = _model(v), _model(v)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 2, 5, 5)
    rng = torch.tensor([11, 2**40 + 7])
    sigmas = torch.tensor([0.2, 0.35, 0.3][:samples])

    xa = x.repeat(samples, 1, 1, 1).requires_grad_()
    with sample_plan(a, _plans(a, rng, sigmas), samples):
        out_a = a(xa)
    out_a.square().sum().backward()

    xb = x.clone().requires_grad_()
    outs = []
    for t in range(samples):
        rng_t = torch.stack((rng[0], rng[1] + t))
        with sample_plan(b, _plans(b, rng_t, sigmas[t : t + 1]), 1):
            outs.append(b(xb))
    torch.cat(outs).square().sum().backward()

    torch.testing.assert_close(out_a, torch.cat(outs), **TOL)
    torch.testing.assert_close(xa.grad.view(samples, *x.shape).sum(0), xb.grad, **GRAD_TOL)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **GRAD_TOL, msg=name)
    bn_a, bn_b = a[1], b[1]
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean, **TOL)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var, **TOL)
    assert int(bn_a.num_batches_tracked) == int(bn_b.num_batches_tracked) == samples


def test_chunk_noise_is_perturb_stream():
    v = nft_cuda.Variation(0.3, "RRAM4")
    layer = nft_cuda.NoisyLinear(7, 3, variation=v)
    rng = torch.tensor([5, 9])
    sigmas = torch.tensor([0.3, 0.1])
    x = torch.randn(4, 7)
    with torch.no_grad(), sample_plan(layer, {layer: (rng, sigmas)}, 2):
        out = layer(torch.cat([x, x]))
    w = nft_cuda.ops.perturb(layer.weight.detach(), v, rng=rng, samples=2, sigmas=sigmas)
    for t in range(2):
        torch.testing.assert_close(out[4 * t : 4 * t + 4], x @ w[t].T + layer.bias.detach(), **TOL)


def test_plan_restored_and_bn_unpatched():
    v = nft_cuda.Variation(0.1)
    m = _model(v)
    with sample_plan(m, _plans(m, torch.tensor([1, 2]), torch.tensor([0.1, 0.1])), 2):
        assert "forward" in m[1].__dict__
    assert "forward" not in m[1].__dict__
    assert all(layer._sample_plan is None for _, layer in nft_cuda.noisy_layers(m))


def test_batch_not_multiple_of_samples():
    v = nft_cuda.Variation(0.1)
    layer = nft_cuda.NoisyLinear(3, 2, variation=v)
    with pytest.raises(ValueError, match="multiple of 2"):
        with sample_plan(layer, {layer: (torch.tensor([1, 2]), torch.tensor([0.1, 0.1]))}, 2):
            layer(torch.randn(3, 3))


def test_unbatchable_modules():
    m = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.ReLU(), nn.Dropout(0.0))
    assert unbatchable_modules(m) == ["1"]
    m.eval()
    assert unbatchable_modules(m) == []

    class Odd(nn.Module):
        def forward(self, x):
            return x - x.mean(0)

    assert unbatchable_modules(nn.Sequential(nn.Linear(2, 2), Odd())) == ["1"]
