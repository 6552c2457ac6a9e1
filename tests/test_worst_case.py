"""The worst-case chip search (nft_cuda.eval.worst_case) and the normal-draw perturbation it climbs
(nft_cuda.reference.perturb_with_normals)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import DEVICES

import nft_cuda
from nft_cuda import reference
from nft_cuda.devices import make_device_model
from nft_cuda.eval.monte_carlo import monte_carlo
from nft_cuda.eval.worst_case import worst_case, worst_case_curve

SIGMA = 0.1


def _blobs(n: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=g) * 2.0
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + torch.randn(n, 16, generator=g), y


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on four Gaussian blobs (clean accuracy ≈ 95 %)."""
    torch.manual_seed(0)
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    loader = [(x[i : i + 200], y[i : i + 200]) for i in range(0, 600, 200)]
    return model, loader


def _noisy(model, device, variation=None):
    import copy

    m = copy.deepcopy(model).to(device)
    return nft_cuda.convert(m, variation or nft_cuda.Variation(SIGMA))


@pytest.mark.parametrize(
    "model",
    [
        nft_cuda.Variation(0.3, "FeFET2"),
        make_device_model("pcm", 1.0, time=3600.0),
        make_device_model("lognormal", 0.2),
    ],
    ids=str,
)
def test_stream_draws_give_the_reference_weights(model):
    w = torch.randn(9, 13)
    rng = torch.tensor([5, 77], dtype=torch.int64)
    d = reference.NORMAL_DRAWS[model.KERNEL_ID]
    z = torch.stack([reference.draw_normal(rng, w.numel(), 1, k)[0].view(w.shape) for k in range(d)])
    got = reference.perturb_with_normals(w, model, z)
    if model.KERNEL_ID == 0:
        sig = torch.tensor([model.sigma])
        want = reference.perturb(w, rng, sig, model.scale, model.state_factor)[0]
    else:
        want = reference.perturb_device(w, rng, torch.tensor([model.sigma]), model.KERNEL_ID, model.kernel_params())[0]
    assert torch.equal(got, want)


def test_normals_are_differentiable():
    w = torch.randn(4, 5)
    z = torch.zeros(1, 4, 5, requires_grad=True)
    out = reference.perturb_with_normals(w, nft_cuda.Variation(0.2), z)
    (out.sum()).backward()
    sw = nft_cuda.Variation(0.2).sigma_w(w)
    assert torch.allclose(z.grad[0], sw)  # d(W + σ_w z)/dz = σ_w


def test_bad_normals_shape_and_stuck_at():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="normals must have shape"):
        reference.perturb_with_normals(w, make_device_model("pcm", 1.0), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="uniforms"):
        reference.perturb_with_normals(w, make_device_model("stuck-at", 1.0), torch.zeros(1, 3, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_worst_case_is_far_below_the_p1_chip(trained, device, one_thread):
    model, loader = trained
    noisy = _noisy(model, device)
    loader = [(x.to(device), y) for x, y in loader]
    (mc,) = monte_carlo(noisy, loader, nft_cuda.Variation(SIGMA), runs=100, seed=0, progress=False)
    p1 = mc["accuracy_tails"]["1"]["value"]
    found = worst_case(noisy, loader, kappa=3.0, seed=0, instance=3, steps=8)
    assert found["max_abs_z"] <= 3.0  # within the bound
    # Chip 3 itself, evaluated through the worst-case path, is Monte-Carlo's chip 3 (the reference path).
    assert found["chip_accuracy"] == pytest.approx(mc["per_instance_accuracy"][3], abs=1 / 600)
    assert found["accuracy"] < p1 - 0.3, (found, p1)
    # The model is left as it was: noise mode train, no sample plan.
    assert all(layer.sample_plan is None and layer.mode == "train" for _, layer in nft_cuda.noisy_layers(noisy))


def test_curve_falls_with_kappa(trained, one_thread):
    model, loader = trained
    curve = worst_case_curve(_noisy(model, "cpu"), loader, [0.5, 2.0, 4.0], steps=6)
    accs = [c["accuracy"] for c in curve]
    assert accs[0] >= accs[1] >= accs[2]
    assert [c["kappa"] for c in curve] == [0.5, 2.0, 4.0]
    assert all(c["max_abs_z"] <= c["kappa"] for c in curve)


@pytest.mark.parametrize("variation", [make_device_model("pcm", 1.0), make_device_model("lognormal", 0.3)], ids=str)
def test_other_device_models(trained, variation, one_thread):
    model, loader = trained
    found = worst_case(_noisy(model, "cpu", variation), loader, kappa=2.0, steps=3)
    assert found["accuracy"] <= found["chip_accuracy"] + 1e-12 or found["accuracy"] < 1.0
    assert found["max_abs_z"] <= 2.0


def test_zero_steps_is_the_clipped_chip(trained):
    model, loader = trained
    found = worst_case(_noisy(model, "cpu"), loader, kappa=100.0, steps=0)
    assert found["accuracy"] == found["chip_accuracy"]  # nothing clipped, nothing climbed


@pytest.mark.parametrize("kappa", [0, -1, float("inf"), "2", True])
def test_bad_kappa(trained, kappa):
    model, loader = trained
    with pytest.raises(ValueError, match="kappa"):
        worst_case(_noisy(model, "cpu"), loader, kappa=kappa)


def test_refusals(trained):
    model, loader = trained
    with pytest.raises(ValueError, match="no noisy layer"):
        worst_case(model, loader, kappa=1.0)
    with pytest.raises(ValueError, match="normal draws"):
        worst_case(_noisy(model, "cpu", make_device_model("stuck-at", 1.0)), loader, kappa=1.0)
    with pytest.raises(ValueError, match="steps"):
        worst_case(_noisy(model, "cpu"), loader, kappa=1.0, steps=-1)
