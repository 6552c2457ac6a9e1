"""The "How to add ..." recipes of docs/architecture.md, each followed once here step by step, so a
recipe that no longer works fails a test. Each test names the recipe's steps in its comments."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda
from nft_cuda import set_noise_mode
from nft_cuda.nn import generic, registry
from nft_cuda.train import TrainConfig
from nft_cuda.train.methods import METHODS, NoiseInjection, build_method
from nft_cuda.train.trainer import train

V = nft_cuda.Variation(0.2, "RRAM1")


# --------------------------------------------------------------------------------------------------
# How to add a layer type (a new family in nft_cuda/nn/)
# --------------------------------------------------------------------------------------------------


# Step 1: the noisy class, built on the machinery below it (generic.RetypedNoisy keeps every attribute of
# the plain module; straight_through_samples draws the noisy weight of the forward's noise;
# sample_chunks / cat_samples handle a sample axis; recomputed redraws the noise in backward).
class NoisyBilinear(generic.RetypedNoisy, nn.Bilinear):
    """nn.Bilinear whose [out, in1, in2] weight is one crossbar tensor."""

    _plain = nn.Bilinear

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        noise = self.forward_noise()
        if noise is None:  # mode off: the plain forward, bit-identical
            return nn.Bilinear.forward(self, x1, x2)

        def noisy_forward(a, b):
            weights = generic.straight_through_samples(self, noise)
            samples = weights.shape[0]
            parts = zip(generic.sample_chunks(a, samples), generic.sample_chunks(b, samples))
            return generic.cat_samples([F.bilinear(p, q, weights[t], self.bias) for t, (p, q) in enumerate(parts)])

        return generic.recomputed(noisy_forward, x1, x2)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Bilinear(5, 4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.mix(x[:, :5], x[:, 5:]))


@pytest.fixture
def bilinear_registered():
    # Step 2: register it (in the family's file, at import: registry.register_class(plain, noisy)).
    registry.register_class(nn.Bilinear, NoisyBilinear)
    try:
        yield
    finally:
        registry.unregister_class(nn.Bilinear)


def test_a_layer_type_added_by_the_recipe(bilinear_registered):
    torch.manual_seed(0)
    model = _Pair()
    x = torch.randn(6, 9)
    clean = model(x)
    # Step 3: convert finds it through the registry, shares the parameters and keys it.
    weight = model.mix.weight
    nft_cuda.convert(model, V)
    assert type(model.mix) is NoisyBilinear and model.mix.weight is weight
    assert [n for n, _ in nft_cuda.noisy_layers(model)] == ["mix", "head"]
    assert nft_cuda.conversion_summary(model).unexpected == ()
    # Step 4: the checks every family's tests make.
    with nft_cuda.noise_mode(model, "off"):
        assert torch.equal(model(x), clean)  # mode off is the plain forward
    rng = torch.tensor([3, 7])
    model.mix.set_sample_plan(rng)
    with nft_cuda.noise_mode(model, "off"), torch.no_grad():
        model.mix.mode = "train"
        got = model.mix(x[:, :5], x[:, 5:])
    w = nft_cuda.ops.perturb(weight.detach(), V, rng=rng)[0]  # the noise is exactly ops.perturb's
    torch.testing.assert_close(got, F.bilinear(x[:, :5], x[:, 5:], w, model.mix.bias), rtol=0, atol=1e-6)
    model.mix.set_sample_plan(rng, torch.tensor([0.2, 0.3]))  # a sample axis of 2: chunk t, stream t
    two = model.mix(torch.cat([x[:, :5]] * 2), torch.cat([x[:, 5:]] * 2))
    w2 = nft_cuda.ops.perturb(weight.detach(), V, rng=rng, samples=2, sigmas=torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(two[6:], F.bilinear(x[:, :5], x[:, 5:], w2[1], model.mix.bias), rtol=0, atol=1e-5)
    model.mix.set_sample_plan(None)
    model.mix.mode = "train"
    model(x).sum().backward()  # straight-through: the clean weight gets a gradient
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # Step 5: strip gives the plain class back with the same parameters.
    nft_cuda.strip(model)
    assert type(model.mix) is nn.Bilinear and model.mix.weight is weight


def test_without_the_registration_the_layer_stays_digital_with_a_reason():
    model = nft_cuda.convert(_Pair(), V)
    assert type(model.mix) is nn.Bilinear
    (left,) = nft_cuda.conversion_summary(model).unexpected
    assert left.name == "mix.weight" and "unsupported type Bilinear" in left.reason


# --------------------------------------------------------------------------------------------------
# How to add a compiled kernel: every operator of csrc/ops.cpp has each piece the recipe lists.
# --------------------------------------------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Operators whose pure-PyTorch twin is not a reference function of the same name, and what it is.
_REFERENCE_ELSEWHERE = {
    "snapshot_linear": "adaptive_avg_pool2d + reference.noisy_linear (ops.snapshot_linear's fallback)",
}


def _schemas() -> list[str]:
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    return [n for n in re.findall(r'm\.def\(\s*"([A-Za-z0-9_]+)\(', text) if n != "_cuda_version"]


def _impls(folder: str, pattern: str) -> set[str]:
    names = set()
    for path in (ROOT / "csrc" / folder).glob(pattern):
        names |= set(re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', path.read_text()))
    return names


def test_every_compiled_op_has_each_piece_of_the_kernel_recipe():
    ops = _schemas()
    assert {"perturb", "perturb_device", "noisy_linear", "philox_normal"} <= set(ops)
    registrations = (ROOT / "nft_cuda" / "_registrations.py").read_text()
    python_face = (ROOT / "nft_cuda" / "ops.py").read_text() + (ROOT / "nft_cuda" / "rng.py").read_text()
    reference = nft_cuda.reference
    missing = []
    for op in ops:
        pieces = {
            "CPU kernel (csrc/cpu)": op in _impls("cpu", "*.cpp"),
            "CUDA kernel (csrc/cuda)": op in _impls("cuda", "*.cu"),
            "fake kernel (_registrations.py)": f'register_fake("nft_cuda::{op}")' in registrations,
            "caller (ops.py / rng.py / _registrations.py)": f"torch.ops.nft_cuda.{op}(" in python_face + registrations,
            "pure-PyTorch twin (reference.py)": hasattr(reference, op.lstrip("_")) or op in _REFERENCE_ELSEWHERE,
        }
        missing += [f"{op}: {piece}" for piece, ok in pieces.items() if not ok]
    assert missing == []


def test_the_kernel_recipe_check_sees_a_missing_piece(monkeypatch):
    monkeypatch.delattr(nft_cuda.reference, "perturb")
    with pytest.raises(AssertionError, match="perturb: pure-PyTorch twin"):
        test_every_compiled_op_has_each_piece_of_the_kernel_recipe()


# --------------------------------------------------------------------------------------------------
# How to add a training method
# --------------------------------------------------------------------------------------------------


class LabelSmoothedNoise(NoiseInjection):
    """Step 1 of the recipe: a Method subclass with a name and a loss (here: noise injection with label
    smoothing 0.1), its settings in describe()."""

    name = "smooth"
    calls = 0

    def loss(self, model, x, y):
        set_noise_mode(model, self.noise)
        logits = self.logits_of(model(x))
        LabelSmoothedNoise.calls += 1
        return F.cross_entropy(logits, y, label_smoothing=0.1), logits

    def describe(self) -> dict:
        return {**super().describe(), "label_smoothing": 0.1}


def test_a_training_method_added_by_the_recipe(tmp_path, monkeypatch, one_thread):
    # Step 2: register it in METHODS (build_method, TrainConfig and `nft train --method` read that table).
    monkeypatch.setitem(METHODS, "smooth", LabelSmoothedNoise)
    method = build_method("smooth", V)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    model = nft_cuda.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), V)
    torch.manual_seed(0)
    loss, logits = method.loss(model, x, y)
    torch.manual_seed(0)
    with nft_cuda.noise_mode(model, "train"):
        want = F.cross_entropy(model(x), y, label_smoothing=0.1)
    assert torch.equal(loss, want)  # Step 3: a test of the loss against the formula
    # Step 4: the whole loop runs it: nft train's config accepts the name, the trainer calls the loss,
    # the run records the method's describe().
    LabelSmoothedNoise.calls = 0
    config = TrainConfig(
        out=str(tmp_path / "run"), device="cpu", method="smooth", epochs=1, limit_train=64, limit_eval=32, batch_size=32
    )
    train(config, progress=False, log=None)
    assert LabelSmoothedNoise.calls == 2  # 64 samples / batch 32, one epoch
    assert (tmp_path / "run" / "model.pt").is_file()


# --------------------------------------------------------------------------------------------------
# How to add a device model: every model of the table has each piece of the recipe.
# --------------------------------------------------------------------------------------------------


def test_every_device_model_has_each_piece_of_the_device_model_recipe():
    from nft_cuda.devices import DEVICE_MODELS, DeviceModel, device_model_from_dict, make_device_model

    header = (ROOT / "csrc" / "include" / "nft_cuda" / "device_models.h").read_text()
    doc = (ROOT / "docs" / "device-models.md").read_text()
    missing = []
    for row in DEVICE_MODELS:
        cls = row.model
        model = make_device_model(row.name, 0.1)
        pieces = {
            "a frozen DeviceModel dataclass with a kind": issubclass(cls, DeviceModel) and bool(cls.kind),
            "to_dict / device_model_from_dict round trip": device_model_from_dict(model.to_dict()) == model,
            "documented in docs/device-models.md": cls.__name__ in doc,
        }
        if cls is not nft_cuda.Variation:  # the per-element function of a non-Gaussian model
            pieces["reference.perturb_device knows its KERNEL_ID"] = cls.KERNEL_ID in nft_cuda.reference.DEVICE_PARAMS
            pieces["kernel_params has as many values as perturb_device takes"] = len(model.kernel_params()) == (
                nft_cuda.reference.DEVICE_PARAMS.get(cls.KERNEL_ID, -1)
            )
            pieces["csrc/include/nft_cuda/device_models.h has a case"] = (
                re.search(rf"k{re.escape(cls.__name__)}\b", header, flags=re.IGNORECASE) is not None
            )
        missing += [f"{row.name}: {piece}" for piece, ok in pieces.items() if not ok]
    assert missing == []
