"""Weight clipping of hardware-aware training (nft_cuda/train/weight_clip.py, docs/hwa-training.md).

Each kind against a hand-written formula on known tensors (plain Python arithmetic, not torch.std),
which tensors it touches (noisy crossbar weights only; several-weight, parametrized and shared weights),
the config object, and the trainer / ``nft train`` integration: clipping after every optimizer step,
recorded and restored on resume, and no clipping by default (the training of before, bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import one_error_line
from torch.nn.utils import parametrize

import nft_cuda
from nft_cuda import cli
from nft_cuda.train import WeightClip, clip_bound, clip_weights
from nft_cuda.train import weight_clip as weight_clip_module
from nft_cuda.train.checkpoint import CheckpointError
from nft_cuda.train.trainer import TrainConfig, read_checkpoint, train

V = nft_cuda.Variation(0.1, "RRAM1")
TINY = dict(limit_train=64, limit_eval=32, batch_size=32)
CLI_TINY = ["--limit-train", "64", "--limit-eval", "32", "--batch-size", "32", "--device", "cpu", "--no-progress"]


# --------------------------------------------------------------------------------------------------
# Hand-written formulas
# --------------------------------------------------------------------------------------------------


def _sample_std(values: list[float]) -> float:
    """sqrt(Σ(v − mean)² / (n − 1)): the sample std, as aihwkit's weight clipper computes it."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _clamped(values: list[float], bound: float) -> list[float]:
    return [min(max(v, -bound), bound) for v in values]


def _known(shape, scale=1.0) -> torch.Tensor:
    """A known, asymmetric tensor: values spread over roughly [-1.3, 2.1]·scale, one outlier per row."""
    n = math.prod(shape)
    vals = [scale * (((7 * i) % 11) / 5.0 - 1.0 + (1.1 if i % 13 == 5 else 0.0)) for i in range(n)]
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


def _noisy_linear(weight: torch.Tensor, bias: bool = True) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(torch.linspace(-5.0, 5.0, weight.shape[0], dtype=torch.float64))
    return nft_cuda.convert(layer, V)


def test_fixed_clamps_to_the_value():
    w = _known((4, 6))
    layer = _noisy_linear(w)
    clip_weights(layer, WeightClip("fixed", value=0.7))
    assert layer.weight.flatten().tolist() == _clamped(w.flatten().tolist(), 0.7)


def test_gaussian_clamps_to_sigma_times_the_layer_std():
    w = _known((5, 7))
    layer = _noisy_linear(w)
    values = w.flatten().tolist()
    bound = 1.5 * _sample_std(values)
    assert 0 < bound < max(abs(v) for v in values)  # the bound clips something
    clip_weights(layer, WeightClip("gaussian", sigma=1.5))
    assert layer.weight.flatten().tolist() == pytest.approx(_clamped(values, bound), rel=1e-12, abs=0)
    assert float(clip_bound(w, WeightClip("gaussian", sigma=1.5))[0]) == pytest.approx(bound, rel=1e-12)


def test_gaussian_per_channel_clamps_each_row_of_a_linear():
    w = _known((4, 9))
    layer = _noisy_linear(w)
    clip_weights(layer, WeightClip("gaussian-per-channel", sigma=1.2))
    for i, row in enumerate(w.tolist()):
        assert layer.weight[i].tolist() == pytest.approx(_clamped(row, 1.2 * _sample_std(row)), rel=1e-12, abs=0)
    # Different rows got different bounds (it is not the layer's one bound).
    bounds = clip_bound(w, WeightClip("gaussian-per-channel", sigma=1.2))[0]
    assert bounds.shape == (4, 1) and len(set(bounds.flatten().tolist())) == 4


def test_gaussian_per_channel_flattens_a_conv_kernel_per_output_channel():
    w = _known((3, 2, 3, 3), scale=0.5)
    conv = nn.Conv2d(2, 3, 3).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    conv = nft_cuda.convert(conv, V)
    bias = conv.bias.detach().clone()
    clip_weights(conv, WeightClip("gaussian-per-channel", sigma=1.0))
    for o in range(3):
        row = w[o].flatten().tolist()
        got = conv.weight[o].flatten().tolist()
        assert got == pytest.approx(_clamped(row, _sample_std(row)), rel=1e-12, abs=0)
    assert torch.equal(conv.bias, bias)


def test_a_constant_row_or_a_one_element_row_is_left_as_it_is():
    w = _known((3, 5))
    w[1] = 0.8  # std 0: aihwkit's clipper clips only with a positive bound
    layer = _noisy_linear(w)
    clip_weights(layer, WeightClip("gaussian-per-channel", sigma=1.0))
    assert layer.weight[1].tolist() == [0.8] * 5
    assert not torch.equal(layer.weight[0], w[0])
    column = _noisy_linear(_known((4, 1)))  # one weight per output channel: std undefined
    before = column.weight.detach().clone()
    clip_weights(column, WeightClip("gaussian-per-channel", sigma=1.0))
    assert torch.equal(column.weight, before)
    const = _noisy_linear(torch.full((2, 3), -2.0, dtype=torch.float64))
    clip_weights(const, WeightClip("gaussian", sigma=2.5))
    assert const.weight.tolist() == [[-2.0] * 3] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights_are_clipped_in_their_dtype(dtype):
    w = _known((4, 8)).to(dtype)
    layer = nft_cuda.convert(nn.Linear(8, 4).to(dtype), V)
    with torch.no_grad():
        layer.weight.copy_(w)
    clip_weights(layer, WeightClip("gaussian", sigma=1.0))
    bound = _sample_std(w.double().flatten().tolist())
    assert layer.weight.dtype == dtype
    expected = torch.tensor(_clamped(w.double().flatten().tolist(), bound)).to(dtype).reshape(4, 8)
    assert torch.equal(layer.weight.detach(), expected)


# --------------------------------------------------------------------------------------------------
# Which tensors are touched
# --------------------------------------------------------------------------------------------------


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)  # stays digital (embeddings=False)
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)  # excluded: digital
        self.out = nn.Linear(3, 2)

    def forward(self, idx):
        return self.out(self.head(torch.relu(self.bn(self.fc1(self.emb(idx).mean(1))))))


def _scaled_mixed() -> nn.Module:
    torch.manual_seed(0)
    model = _Mixed()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20.0)  # every tensor, biases and digital ones included, far beyond the bound
    return nft_cuda.convert(model, V, exclude=["head"])


@pytest.mark.parametrize(
    "clip",
    [WeightClip("fixed", value=0.1), WeightClip("gaussian", sigma=1.0), WeightClip("gaussian-per-channel", sigma=1.0)],
)
def test_only_noisy_crossbar_weights_change(clip):
    model = _scaled_mixed()
    assert [n for n, _ in nft_cuda.noisy_layers(model)] == ["fc1", "out"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    clip_weights(model, clip)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc1.weight", "out.weight"]
    assert all(p is dict(model.named_parameters())[n] for n, p in params.items())  # the same Parameters
    for name in ("fc1", "out"):
        w0 = before[f"{name}.weight"]
        (bound,) = clip_bound(w0, clip)
        assert torch.equal(after[f"{name}.weight"], torch.maximum(torch.minimum(w0, bound), -bound))


def test_none_touches_nothing_and_leaves_the_version_counters():
    model = _scaled_mixed()
    versions = [p._version for p in model.parameters()]
    assert clip_weights(model, WeightClip()) is model
    assert [p._version for p in model.parameters()] == versions


def test_attention_in_projection_is_one_crossbar_and_out_proj_its_own_layer():
    torch.manual_seed(1)
    mha = nft_cuda.convert(nn.Sequential(nn.MultiheadAttention(4, 2, kdim=3, vdim=5)), V)[0]
    assert [n for n, _ in nft_cuda.noisy_layers(mha)] == ["", "out_proj"]
    with torch.no_grad():
        for p in mha.parameters():
            p.mul_(5.0)
    names = mha.crossbar_weight_names()
    assert names == ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    clip_weights(mha, WeightClip("gaussian", sigma=1.0))
    joint = [v for n in names for v in before[n].flatten().tolist()]  # one std over q, k and v together
    bound = _sample_std(joint)
    for n in names:
        assert mha.state_dict()[n].flatten().tolist() == pytest.approx(
            _clamped(before[n].flatten().tolist(), bound), rel=1e-6, abs=0
        )
    out_w = before["out_proj.weight"].flatten().tolist()
    assert mha.out_proj.weight.flatten().tolist() == pytest.approx(_clamped(out_w, _sample_std(out_w)), rel=1e-6)
    for k in ("in_proj_bias", "out_proj.bias"):
        assert torch.equal(mha.state_dict()[k], before[k])


def test_recurrent_weights_are_clipped_per_row_of_each():
    torch.manual_seed(2)
    lstm = nft_cuda.convert(nn.LSTM(3, 4, num_layers=2), V)
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    clip_weights(lstm, WeightClip("gaussian-per-channel", sigma=0.8))
    for k, w0 in before.items():
        got = lstm.state_dict()[k]
        if k.startswith("bias_"):
            assert torch.equal(got, w0), k
            continue
        for i, row in enumerate(w0.tolist()):
            assert got[i].tolist() == pytest.approx(_clamped(row, 0.8 * _sample_std(row)), rel=1e-6, abs=0), k


def test_a_shared_weight_is_clipped_once():
    torch.manual_seed(3)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nft_cuda.convert(nn.Sequential(a, b), V)
    w0 = a.weight.detach().clone().double()
    clip_weights(model, WeightClip("gaussian", sigma=1.0))
    values = w0.flatten().tolist()
    # Clipping twice would clip again at the smaller std of the clipped tensor.
    assert model[1].weight.flatten().tolist() == pytest.approx(_clamped(values, _sample_std(values)), rel=1e-6)


class _Double(nn.Module):
    def forward(self, x):
        return 2.0 * x

    def right_inverse(self, w):
        return w / 2.0


def test_a_parametrized_weight_is_clipped_as_the_weight_the_noise_sees():
    torch.manual_seed(4)
    layer = nn.Linear(5, 3)
    parametrize.register_parametrization(layer, "weight", _Double())
    layer = nft_cuda.convert(layer, V)
    w0 = layer.weight.detach().clone()  # the parametrized weight: 2·original
    clip_weights(layer, WeightClip("fixed", value=0.3))
    assert torch.allclose(layer.weight, w0.clamp(-0.3, 0.3))
    assert torch.allclose(layer.parametrizations.weight.original, w0.clamp(-0.3, 0.3) / 2)


# --------------------------------------------------------------------------------------------------
# The config object
# --------------------------------------------------------------------------------------------------


def test_weight_clip_config_normalises_round_trips_and_is_hashable():
    clip = WeightClip("Gaussian_Per_Channel", sigma=3)
    assert (clip.kind, clip.sigma, clip.value) == ("gaussian-per-channel", 3.0, None)
    assert WeightClip.from_dict(clip.to_dict()) == clip and WeightClip.from_dict(None) == WeightClip()
    assert json.loads(json.dumps(clip.to_dict())) == clip.to_dict()
    assert len({clip, WeightClip("gaussian-per-channel", sigma=3.0), WeightClip()}) == 2
    assert not WeightClip().enabled and WeightClip("fixed", value=1).enabled
    assert str(WeightClip("fixed", value=0.5)) == "fixed ±0.5" and str(clip) == "gaussian-per-channel ±3·std"
    with pytest.raises(dataclasses.FrozenInstanceError):
        clip.sigma = 1.0


def test_weight_clip_config_refusals():
    cases = [
        (dict(kind="layer"), ValueError, "weight clip kind must be one of none, fixed, gaussian"),
        (dict(kind=3), TypeError, "weight clip kind must be a str"),
        (dict(kind="fixed"), ValueError, "'fixed' needs a value"),
        (dict(kind="gaussian"), ValueError, "'gaussian' needs a sigma"),
        (dict(kind="gaussian-per-channel"), ValueError, "'gaussian-per-channel' needs a sigma"),
        (dict(kind="gaussian", sigma=2.0, value=1.0), ValueError, "value applies to kind 'fixed', not 'gaussian'"),
        (dict(kind="none", value=1.0), ValueError, "value applies to kind 'fixed', not 'none'"),
        (dict(kind="fixed", value=1.0, sigma=2.0), ValueError, "sigma applies to kind 'gaussian'"),
        (dict(kind="fixed", value=0.0), ValueError, "weight clip value must be > 0"),
        (dict(kind="gaussian", sigma=-1.0), ValueError, "weight clip sigma must be > 0"),
        (dict(kind="gaussian", sigma=math.nan), ValueError, "weight clip sigma must be finite"),
        (dict(kind="fixed", value=True), TypeError, "weight clip value must be a real number"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            WeightClip(**kwargs)
    with pytest.raises(ValueError, match="unknown weight clip field"):
        WeightClip.from_dict({"kind": "fixed", "value": 1.0, "alpha": 2})
    with pytest.raises(TypeError, match="weight_clip must be a WeightClip, a dict or None"):
        TrainConfig(weight_clip="gaussian")
    with pytest.raises(ValueError, match="needs a sigma"):
        TrainConfig(weight_clip={"kind": "gaussian"})
    with pytest.raises(TypeError, match="model must be"):
        clip_weights("model", WeightClip())
    with pytest.raises(TypeError, match="clip must be a WeightClip"):
        clip_weights(nn.Linear(2, 2), {"kind": "fixed", "value": 1.0})
    with pytest.raises(TypeError, match=r"weights\[0\] must be a floating-point torch.Tensor"):
        clip_bound(torch.ones(2, 2, dtype=torch.int64), WeightClip("gaussian", sigma=1.0))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _config(tmp_path, name="run", **kw):
    return TrainConfig(out=str(tmp_path / name), device="cpu", **{**TINY, **kw})


def _crossbar_keys() -> list[str]:
    """State-dict keys of the crossbar weights of the small model."""
    from nft_cuda.models import build_model

    model = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10), V)
    return [f"{n}.weight" for n, _ in nft_cuda.noisy_layers(model)]


def test_no_clipping_by_default_is_the_training_of_before(tmp_path, monkeypatch):
    """The default never calls the clipper, and an explicit WeightClip() trains the same weights; a clipped
    run differs (so the comparison can fail)."""
    calls = []
    real = weight_clip_module.clip_checked  # the trainer's entry (clip_weights after its argument checks)
    monkeypatch.setattr(weight_clip_module, "clip_checked", lambda *a: calls.append(a) or real(*a))
    train(_config(tmp_path, "default", epochs=2), progress=False, log=None)
    assert calls == []
    train(_config(tmp_path, "none", epochs=2, weight_clip=WeightClip()), progress=False, log=None)
    train(_config(tmp_path, "fixed", epochs=2, weight_clip=WeightClip("fixed", value=0.05)), progress=False, log=None)
    a, b, c = (read_checkpoint(tmp_path / n, warn=False)[0] for n in ("default", "none", "fixed"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["config"]["weight_clip"] == {"kind": "none", "value": None, "sigma": None}
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in _crossbar_keys())


def test_trainer_clips_after_every_optimizer_step(tmp_path, monkeypatch):
    """Every optimizer step is followed by one clip of the training model, and after it every noisy
    crossbar weight lies within the bound computed from the weights the step left."""
    clip = WeightClip("gaussian-per-channel", sigma=1.5)
    steps, checks = [], []
    real_step = torch.optim.Adam.step

    def counting_step(self, *a, **kw):
        steps.append(len(checks))
        return real_step(self, *a, **kw)

    def checking_clip(model, clip_):
        layers = nft_cuda.noisy_layers(model)
        bounds = [clip_bound([getattr(l, n) for n in l.crossbar_weight_names()], clip_) for _, l in layers]
        weight_clip_module_real(model, clip_)
        ok = all(
            bool((getattr(l, n).abs() <= b).all())
            for (_, l), bs in zip(layers, bounds)
            for n, b in zip(l.crossbar_weight_names(), bs)
        )
        checks.append((clip_, ok, len(layers)))

    weight_clip_module_real = weight_clip_module.clip_checked  # the trainer's entry
    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    monkeypatch.setattr(weight_clip_module, "clip_checked", checking_clip)
    result = train(_config(tmp_path, epochs=2, weight_clip=clip), progress=False, log=None)
    per_epoch = math.ceil(result["sizes"]["train"] / TINY["batch_size"])
    assert len(steps) == len(checks) == 2 * per_epoch
    assert steps == list(range(len(steps)))  # clip k follows step k, before step k + 1
    assert all(c == clip and ok and n == len(_crossbar_keys()) for c, ok, n in checks)


def test_nft_train_weight_clip_bounds_records_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "2", "--out", str(out), "--weight-clip", "fixed", "--weight-clip-value", "0.05"]
    assert cli.main([*args, *CLI_TINY]) == 0
    assert "weight clipping after every optimizer step: fixed ±0.05" in capsys.readouterr().out
    ckpt, _ = read_checkpoint(out, warn=False)
    keys = _crossbar_keys()
    for k in keys:
        assert ckpt["model"][k].abs().max() <= 0.05, k
    assert max(float(ckpt["model"][k].abs().max()) for k in keys) == pytest.approx(0.05)  # the bound is reached
    assert any(float(v.abs().max()) > 0.05 for k, v in ckpt["model"].items() if k.endswith(".bias"))  # untouched
    recorded = {"kind": "fixed", "value": 0.05, "sigma": None}
    assert ckpt["config"]["weight_clip"] == recorded
    assert json.loads((out / "summary.json").read_text())["config"]["weight_clip"] == recorded
    exported = nft_cuda.io.safe_load(str(out / "model.pt"))
    assert exported["meta"]["config"]["weight_clip"] == recorded
    assert all(exported["state_dict"][k].abs().max() <= 0.05 for k in keys)
    # A resume takes the setting from the checkpoint; another setting is refused.
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "weight clipping after every optimizer step: fixed ±0.05" in capsys.readouterr().out
    again = ["--weight-clip", "gaussian", "--weight-clip-sigma", "2"]
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress", *again]) == 1
    assert "weight_clip=" in one_error_line(capsys.readouterr().err)


def test_a_clipped_run_resumes_bit_identically(tmp_path):
    clip = WeightClip("gaussian", sigma=1.0)
    train(_config(tmp_path, "full", epochs=2, weight_clip=clip), progress=False, log=None)
    train(_config(tmp_path, "part", epochs=2, weight_clip=clip), progress=False, log=None, stop_after=1)
    resumed = train(_config(tmp_path, "part", epochs=2, weight_clip=clip, resume=True), progress=False, log=None)
    assert resumed["resumed_from"] == 1
    a, b = (read_checkpoint(tmp_path / n, warn=False)[0] for n in ("full", "part"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(CheckpointError, match="weight_clip"):
        train(_config(tmp_path, "part", epochs=2, resume=True), progress=False, log=None)


def test_nft_train_weight_clip_argument_errors(tmp_path, capsys):
    out = tmp_path / "bad"
    cases = [
        (["--weight-clip", "fixed"], "needs a value"),
        (["--weight-clip", "gaussian"], "needs a sigma"),
        (["--weight-clip", "gaussian", "--weight-clip-sigma", "2", "--weight-clip-value", "1"], "value applies"),
        (["--weight-clip", "fixed", "--weight-clip-value", "1", "--weight-clip-sigma", "2"], "sigma applies"),
        (["--weight-clip-sigma", "2"], "--weight-clip-sigma needs --weight-clip"),
        (["--weight-clip-value", "0.1"], "--weight-clip-value needs --weight-clip"),
    ]
    for extra, message in cases:
        assert cli.main(["train", "--epochs", "1", "--out", str(out), *CLI_TINY, *extra]) == 1, extra
        assert message in one_error_line(capsys.readouterr().err), extra
    assert not out.exists()
    for extra in (["--weight-clip", "layer"], ["--weight-clip", "fixed", "--weight-clip-value", "-1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["train", "--out", str(out), *extra])
        assert exc.value.code == 2
    capsys.readouterr()
