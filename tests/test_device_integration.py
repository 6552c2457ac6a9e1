"""Every part of the library with a device model other than the bit-sliced Gaussian (DESIGN §2.1): noisy
layers and instance mode, convert(per_layer=...), OVF/IRS, Monte-Carlo over time, exported models (and
legacy files), TrainConfig and eval_checkpoints' time axis."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda
from nft_cuda.devices import PCM, LogNormal, StuckAt, Variation
from nft_cuda.eval import monte_carlo
from nft_cuda.io import load_model, save_model
from nft_cuda.models import build_model
from nft_cuda.nn import instance_offset
from nft_cuda.train.config import TrainConfig, default_out
from nft_cuda.train.methods import build_method

run_module = importlib.import_module("nft_cuda.eval.run")

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 99


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


@pytest.mark.parametrize("model", [PCM(time=3600.0), PCM(time=60.0, drift_compensation=True), LogNormal(0.2)], ids=str)
def test_noisy_linear_instance_mode_is_one_chip(model):
    layer = nft_cuda.NoisyLinear(12, 5, variation=model)
    x = torch.randn(7, 12)
    layer.set_instance(SEED, 3)
    a, b = layer(x), layer(x)
    w = nft_cuda.ops.perturb(layer.weight.detach(), model, seed=SEED, offset=instance_offset(0, 3))[0]
    assert torch.equal(a, b)
    torch.testing.assert_close(a, F.linear(x, w, layer.bias), rtol=1e-6, atol=1e-6)
    layer.set_instance(SEED, 4)
    assert not torch.equal(layer(x), a)


def test_noisy_linear_train_mode_gradient_is_straight_through():
    layer = nft_cuda.NoisyLinear(12, 5, variation=StuckAt(p0=0.2, p1=0.2))
    x = torch.randn(4, 12)
    g = torch.randn(4, 5)
    torch.manual_seed(5)
    (layer(x) * g).sum().backward()
    assert torch.allclose(layer.weight.grad, g.t() @ x, rtol=1e-5, atol=1e-6)


def test_ops_noisy_linear_and_snapshot_linear_accept_any_model():
    model = PCM(time=100.0)
    w, x = torch.randn(5, 12), torch.randn(3, 12)
    out = nft_cuda.ops.noisy_linear(x, w, None, model, seed=1, offset=2, samples=2)
    wn = nft_cuda.ops.perturb(w, model, seed=1, offset=2, samples=2)
    torch.testing.assert_close(out, torch.stack([x @ wn[0].t(), x @ wn[1].t()]), rtol=1e-6, atol=1e-6)
    act = torch.randn(2, 3, 4, 4)
    snap = nft_cuda.ops.snapshot_linear(act, 2, w, None, model, seed=1, offset=2)
    pooled = F.adaptive_avg_pool2d(act, 2).flatten(1)
    torch.testing.assert_close(snap[0], pooled @ wn[0].t(), rtol=1e-6, atol=1e-6)


def test_convert_per_layer_with_a_pcm_layer():
    model = nft_cuda.convert(_mlp(), Variation(0.1), per_layer={"2": PCM(time=86400.0)})
    assert model[0].variation == Variation(0.1) and model[2].variation == PCM(time=86400.0)
    nft_cuda.set_instance(model, SEED, 0)
    x = torch.randn(3, 12)
    ell0, ell2 = nft_cuda.nn.name_key("0"), nft_cuda.nn.name_key("2")  # keys from the names (noise stream 2)
    w2 = nft_cuda.ops.perturb(model[2].weight.detach(), PCM(time=86400.0), seed=SEED, offset=instance_offset(ell2, 0))[
        0
    ]
    w0 = nft_cuda.ops.perturb(model[0].weight.detach(), Variation(0.1), seed=SEED, offset=instance_offset(ell0, 0))[0]
    want = F.linear(F.relu(F.linear(x, w0, model[0].bias)), w2, model[2].bias)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="device model"):
        nft_cuda.convert(_mlp(), Variation(0.1), per_layer={"2": "pcm"})


@pytest.mark.parametrize("name", ["ovf", "noise"])
def test_methods_train_a_step_with_pcm(name):
    method = build_method(name, PCM(), deltas=(0.3, 0.1) if name == "ovf" else None)
    model = method.prepare(_mlp())
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    loss, logits = method.loss(model, x, y)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (8, 5) and model[0].weight.grad is not None
    assert method.describe()["device"] == PCM().to_dict() and method.describe()["device_model"] == "pcm"


def test_irs_heads_use_the_backbone_model():
    method = build_method("irs", PCM(time=10.0), taps={"features.2": 2}, beta=0.01)
    assert method.head_variation == PCM(time=10.0)
    assert build_method("irs", Variation(0.2, "FeFET2"), taps={"a": 1}).head_variation == Variation(0.2, "RRAM1")


def test_monte_carlo_sweeps_time_and_skips_only_noiseless_models():
    model = nft_cuda.convert(_mlp(), PCM()).eval()
    x = torch.randn(20, 12)
    with nft_cuda.noise_mode(model, "off"):
        y = model(x).argmax(-1)
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    sweep = [PCM(sigma=0.0), PCM(sigma=0.0, time=1e7), PCM(time=1.0), PCM(time=3.15e7, drift_compensation=True)]
    res = monte_carlo(model, loader, sweep, 4, seed=SEED, progress=False)
    assert [r["time_s"] for r in res] == [0.0, 1e7, 1.0, 3.15e7]
    assert res[0]["per_instance_accuracy"] == [1.0] * 4 and res[0]["accuracy_std"] == 0
    assert PCM(sigma=0.0).noiseless and not PCM(sigma=0.0, time=1e7).noiseless
    assert res[1]["device"] == sweep[1].to_dict() and res[1]["device_model"] == "pcm"


def test_exported_model_round_trips_any_device_model(tmp_path):
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 0.5}
    pcm = PCM(time=3600.0, drift_compensation=True, compensation_rule="all-ones")
    backbone = nft_cuda.convert(build_model(**{"num_classes": 10, "in_channels": 1, "width": 0.5, **spec}), pcm)
    save_model(str(tmp_path / "m.pt"), backbone, spec=spec, variation=pcm, meta={"dataset": "embedded"})
    model, payload = load_model(str(tmp_path / "m.pt"))
    assert payload["variation"]["kind"] == "pcm" and payload["variation"]["compensation_rule"] == "all-ones"
    assert {layer.variation for _, layer in nft_cuda.noisy_layers(model)} == {pcm}


def test_legacy_exported_model_without_kind_loads(tmp_path):
    """A file written before device models: payload["variation"] = the four Variation fields, no "kind"."""
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 0.5}
    backbone = nft_cuda.convert(
        build_model(**{"num_classes": 10, "in_channels": 1, "width": 0.5, **spec}), Variation(0.2)
    )
    save_model(str(tmp_path / "m.pt"), backbone, spec=spec, variation=Variation(0.2), meta={"dataset": "embedded"})
    payload = torch.load(str(tmp_path / "m.pt"), weights_only=True)
    payload["variation"] = {"sigma": 0.2, "device_model": "FeFET2", "weight_bits": 8, "device_bits": 2}
    torch.save(payload, str(tmp_path / "legacy.pt"))
    model, _ = load_model(str(tmp_path / "legacy.pt"))
    assert {layer.variation for _, layer in nft_cuda.noisy_layers(model)} == {Variation(0.2, "FeFET2")}


def test_train_config_accepts_device_models():
    c = TrainConfig(device_model="PCM", device_options={"time": 60.0, "drift_compensation": True})
    assert c.device_model == "pcm" and c.sigma == 1.0
    assert c.variation() == PCM(time=60.0, drift_compensation=True)
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert str(default_out(c)).endswith("noise-small-embedded-pcm-s1")
    assert TrainConfig().sigma == 0.1 and TrainConfig().variation() == Variation(0.1)
    assert TrainConfig(device_model="stuck-at", device_options={"p0": 0.01}).variation() == StuckAt(p0=0.01)
    assert TrainConfig(device_model="lognormal", sigma=0.3).variation() == LogNormal(0.3)
    with pytest.raises(ValueError, match="p0 \\+ p1 must be <= 1"):
        TrainConfig(device_model="stuck-at", device_options={"p0": 0.7, "p1": 0.7})
    with pytest.raises(TypeError, match="time"):
        TrainConfig(device_model="lognormal", device_options={"time": 1.0})


def test_sweep_models_time_axis():
    base = Variation(0.1, "RRAM4").to_dict()
    legacy = {"sigma": 0.1, "device_model": "RRAM4", "weight_bits": 8, "device_bits": 2}
    assert run_module.sweep_models(legacy, [0.2]) == [(Variation(0.2, "RRAM4"), None)]
    got = run_module.sweep_models(base, [0.5, 1.0], "pcm", times=[1, 3600], drift_compensation=True)
    assert got == [
        (PCM(0.5, time=1.0, drift_compensation=True), 1.0),
        (PCM(0.5, time=3600.0, drift_compensation=True), 3600.0),
        (PCM(1.0, time=1.0, drift_compensation=True), 1.0),
        (PCM(1.0, time=3600.0, drift_compensation=True), 3600.0),
    ]
    assert run_module.sweep_models(base, [0.3], "lognormal", times=[5.0]) == [(LogNormal(0.3), 5.0)]
    with pytest.raises(ValueError, match="drift_compensation applies to the PCM model"):
        run_module.sweep_models(base, [0.3], drift_compensation=True)
    with pytest.raises(ValueError, match="time t"):
        run_module.sweep_models(base, [1.0], "pcm", times=[-1.0])


def test_eval_checkpoints_time_axis(tmp_path, monkeypatch):
    torch.manual_seed(0)
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 0.5}
    backbone = nft_cuda.convert(build_model(**{"num_classes": 10, "in_channels": 1, "width": 0.5, **spec}), PCM())
    save_model(str(tmp_path / "a.pt"), backbone, spec=spec, variation=PCM(), meta={"dataset": "embedded"})
    x = torch.randn(12, 1, 32, 32)
    y = torch.randint(0, 10, (12,))
    monkeypatch.setattr(run_module, "load_test_set", lambda name, data_dir=None: (x, y))
    json_path = str(tmp_path / "r.json")
    kwargs = dict(runs=2, seed=3, device="cpu", progress=False, batch_size=6, times=[1.0, 86400.0])
    report = run_module.eval_checkpoints([str(tmp_path / "a.pt")], [1.0], json_path=json_path, **kwargs)
    rows = report["results"]
    assert [(r["sigma"], r["time_s"], r["device"]["drift_compensation"]) for r in rows] == [
        (1.0, 1.0, False),
        (1.0, 86400.0, False),
    ]
    again = run_module.eval_checkpoints([str(tmp_path / "a.pt")], [1.0], drift_compensation=True, **kwargs)
    assert all(r["device"]["drift_compensation"] for r in again["results"])


@pytest.mark.parametrize("method", ["ovf", "irs"])
def test_train_then_evaluate_over_time_with_pcm(tmp_path, method):
    """End to end on the embedded data: train a tiny run under PCM, export, evaluate at three times with
    and without drift compensation (the Python face of `nft train/eval --device-model pcm --time`)."""
    from nft_cuda.train.trainer import train

    out = str(tmp_path / method)
    deltas = {"deltas": (0.6, 0.3)} if method == "ovf" else {}
    config = TrainConfig(
        method=method, device_model="pcm", epochs=1, limit_train=64, limit_eval=32, batch_size=32,
        device="cpu", out=out, width=0.5, **deltas,
    )  # fmt: skip
    train(config, progress=False, log=None)
    model, payload = load_model(out)
    assert payload["variation"] == PCM().to_dict()
    kwargs = dict(runs=2, seed=0, device="cpu", progress=False, times=[1.0, 3600.0, 3.15e7])
    rows = run_module.eval_checkpoints(out, [1.0], **kwargs)["results"]
    comp = run_module.eval_checkpoints(out, [1.0], drift_compensation=True, **kwargs)["results"]
    assert [r["time_s"] for r in rows] == [1.0, 3600.0, 3.15e7] == [r["time_s"] for r in comp]
    assert all(0.0 <= r["accuracy_mean"] <= 1.0 for r in rows + comp)
    assert rows[0]["per_instance_accuracy"] != rows[2]["per_instance_accuracy"] or rows[0]["ekl"] != rows[2]["ekl"]
