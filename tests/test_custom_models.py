"""Custom and third-party models in nft_cuda's own tools (docs/custom-models.md): the ``output=`` adapter
(training methods, IRS, monte_carlo, calibrate_mvm, nft train / nft eval) and model factories in
TrainConfig / ``nft train --model-factory``, with a timm ViT and a Hugging Face BERT (random weights, no
download; factories in examples/custom_models.py)."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import one_error_line, require_optional

import nft_cuda
from nft_cuda import cli
from nft_cuda.eval.monte_carlo import monte_carlo
from nft_cuda.io import load_model, safe_load
from nft_cuda.nn import calibrate_mvm
from nft_cuda.nn.custom import import_path_of, resolve_output
from nft_cuda.train.methods import IRS, OVF, NoiseInjection
from nft_cuda.train.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
VIT = "examples.custom_models:timm_vit"
BERT = "examples.custom_models:hf_bert"
TINY = ["--limit-train", "64", "--limit-eval", "32", "--batch-size", "32", "--epochs", "1", "--device", "cpu"]
EVAL = ["--sigma", "0.1", "--runs", "3", "--batch-size", "500", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch, one_thread):
    """The factories' module is found as a user's would be: its folder on the import path."""
    monkeypatch.syspath_prepend(str(ROOT))


# --------------------------------------------------------------------------------------------------
# The output adapter
# --------------------------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", ["logits", "features"])


def _model_output_class():
    """Hugging Face's SequenceClassifierOutput (transformers is a test dependency: tools/setup_env.sh)."""
    require_optional("transformers")
    from transformers.modeling_outputs import SequenceClassifierOutput

    return SequenceClassifierOutput


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: int = 0


def test_resolve_output_finds_the_logits_in_every_kind_of_output():
    SequenceClassifierOutput = _model_output_class()

    t = torch.randn(3, 4)
    assert resolve_output(None)(t) is t
    assert resolve_output("logits")(SequenceClassifierOutput(logits=t)) is t
    assert resolve_output("logits")({"logits": t, "aux": 1}) is t
    assert resolve_output("logits")(Pair(t, None)) is t
    assert resolve_output("logits")(Out(t)) is t
    assert resolve_output(0)((t, "aux")) is t
    assert resolve_output(-1)(["aux", t]) is t
    assert torch.equal(resolve_output(lambda o: 2 * o["x"])({"x": t}), 2 * t)
    assert resolve_output("torch:neg")(t).neg().equal(t)  # an import path names a callable


def test_a_bad_output_name_names_the_outputs_type_and_fields():
    SequenceClassifierOutput = _model_output_class()

    out = SequenceClassifierOutput(logits=torch.randn(2, 3))
    with pytest.raises(
        ValueError, match=r"output='logitz'.*SequenceClassifierOutput.*no field 'logitz'.*fields: logits"
    ):
        resolve_output("logitz")(out)
    with pytest.raises(ValueError, match=r"Pair.*fields: logits, features"):
        resolve_output("scores")(Pair(torch.zeros(1), None))
    with pytest.raises(TypeError, match=r"SequenceClassifierOutput \(fields: logits\), not a tensor.*pass output="):
        resolve_output(None)(out)
    with pytest.raises(TypeError, match=r"output='features' gave a NoneType"):
        resolve_output("features")(Pair(torch.zeros(1), None))
    with pytest.raises(ValueError, match=r"output=2: the model returned a tuple of 2"):
        resolve_output(2)((1, 2))
    with pytest.raises(ValueError, match="an index applies to a tuple or list output"):
        resolve_output(0)(torch.zeros(2, 3))


@pytest.mark.parametrize(
    "bad, error, needle",
    [
        (True, TypeError, "got bool"),
        (1.5, TypeError, "got float"),
        ("two words", ValueError, "attribute or key name"),
        ("nft_cuda.nowhere:f", ValueError, "cannot import module 'nft_cuda.nowhere'"),
        ("nft_cuda:nothing_here", ValueError, "has no attribute 'nothing_here'"),
        ("nft_cuda:__version__", TypeError, "not a callable"),
    ],
)
def test_bad_output_values_are_refused_at_once(bad, error, needle):
    with pytest.raises(error, match=needle):
        resolve_output(bad)


class DictNet(nn.Module):
    """A batchable CNN whose forward returns {"logits": ...} (as_dict), or the logits themselves."""

    def __init__(self, as_dict: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))
        self.as_dict = as_dict

    def forward(self, x):
        y = self.body(x)
        return {"logits": y, "hidden": x} if self.as_dict else y


def _twins(variation):
    torch.manual_seed(0)
    wrapped = nft_cuda.convert(DictNet(True), variation)
    plain = nft_cuda.convert(DictNet(False), variation)
    plain.load_state_dict(wrapped.state_dict())
    return wrapped, plain


@pytest.mark.parametrize("batched", [True, False])
def test_ovf_with_an_output_adapter_matches_the_plain_model(batched):
    v = nft_cuda.Variation(0.1)
    wrapped, plain = _twins(v)
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 5, (6,))
    losses = []
    for model, method in (
        (wrapped, OVF(v, 0.1, batched=batched, output="logits")),
        (plain, OVF(v, 0.1, batched=batched)),
    ):
        torch.manual_seed(1)
        losses.append(method.loss(model, x, y)[0])
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(1)
    noise = NoiseInjection(v, output="logits").loss(wrapped, x, y)[0]
    torch.manual_seed(1)
    assert torch.equal(noise, NoiseInjection(v).loss(plain, x, y)[0])
    with pytest.raises(TypeError, match="pass output="):
        NoiseInjection(v).loss(wrapped, x, y)


def test_irs_heads_take_the_backbones_logits_through_the_adapter():
    v = nft_cuda.Variation(0.1)
    wrapped, _ = _twins(v)
    irs = IRS(v, 0.01, {"body.1": 1}, hidden=8, output="logits")
    model = irs.prepare(wrapped, torch.randn(2, 1, 4, 4), num_classes=5)
    loss, logits = irs.loss(model, torch.randn(4, 1, 4, 4), torch.randint(0, 5, (4,)))
    assert logits.shape == (4, 5) and loss.isfinite()
    loss.backward()
    assert model.heads["body__1"].fc1.weight.grad is not None


def test_monte_carlo_with_an_output_adapter_equals_the_plain_model():
    v = nft_cuda.Variation(0.2)
    wrapped, plain = _twins(v)
    torch.manual_seed(3)
    loader = [(torch.randn(8, 1, 4, 4), torch.randint(0, 5, (8,))) for _ in range(2)]
    kw = dict(runs=4, seed=7, instances_per_pass=2, progress=False)
    a = monte_carlo(wrapped, loader, [v], output="logits", **kw)[0]
    b = monte_carlo(plain, loader, [v], **kw)[0]
    assert a["per_instance_accuracy"] == b["per_instance_accuracy"] and a["ekl"] == b["ekl"] and a["ekl"] > 0
    with pytest.raises(TypeError, match=r"a dict \(fields: logits, hidden\), not a tensor"):
        monte_carlo(wrapped, loader, [v], **kw)
    with pytest.raises(ValueError, match=r"no field 'probs'; its fields: logits, hidden"):
        monte_carlo(wrapped, loader, [v], output="probs", **kw)


def test_calibrate_mvm_takes_the_adapter_and_keyword_batches():
    SequenceClassifierOutput = _model_output_class()

    class Keyword(nn.Module):  # a Hugging Face-style forward: keyword inputs, a ModelOutput back
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, input_values):
            return SequenceClassifierOutput(logits=self.fc(input_values))

    v = nft_cuda.Variation(0.1, mvm=nft_cuda.devices.MVM(input_bits=8, output_bits=8))
    model = nft_cuda.convert(Keyword(), v)
    x = torch.randn(5, 4)
    ranges = calibrate_mvm(model, [{"input_values": x}], output="logits")
    assert ranges["fc"][0] == pytest.approx(float(x.abs().max()))
    with pytest.raises(ValueError, match="no field 'scores'"):
        calibrate_mvm(model, [{"input_values": x}], output="scores")


# --------------------------------------------------------------------------------------------------
# Model factories in TrainConfig
# --------------------------------------------------------------------------------------------------


def test_train_config_records_a_model_factory_as_its_import_path():
    from examples.custom_models import timm_vit

    c = TrainConfig(model_factory=timm_vit, model_kwargs={"depth": 1, "sizes": (1, 2)})
    assert (c.model, c.model_factory, c.model_kwargs) == ("custom", VIT, {"depth": 1, "sizes": [1, 2]})
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert str(c.resolved_out()) == "runs/noise-timm_vit-embedded-s0.1"
    assert import_path_of(timm_vit, "model_factory") == VIT


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(model_factory="examples.nothing:f"), ValueError, "cannot import module 'examples.nothing'"),
        (dict(model_factory="examples.custom_models:vit"), ValueError, "has no attribute 'vit'"),
        (dict(model_factory="examples.custom_models"), ValueError, "import path 'package.module:function'"),
        (dict(model_factory=lambda: nn.Linear(2, 2)), ValueError, "not a lambda"),
        (dict(model_factory=3), TypeError, "model_factory must be an import path"),
        (dict(model_factory=VIT, model="vgg8"), ValueError, "exclude each other"),
        (dict(model="custom"), ValueError, "needs a model_factory"),
        (dict(model_kwargs={"depth": 1}), ValueError, "model_kwargs apply to a model_factory"),
        (dict(model_factory=VIT, model_kwargs={"f": print}), TypeError, "JSON values"),
        (dict(model_factory=VIT, width=0.5), ValueError, "width applies to the built-in models"),
        (dict(model_factory=VIT, method="irs"), ValueError, "needs taps"),
        (dict(taps={"block1": 2}), ValueError, "taps apply to method 'irs'"),
        (dict(method="irs", taps={"block1": 0}), ValueError, "must be >= 1"),
        (dict(output=2.5), TypeError, "output must be None"),
    ],
)
def test_train_config_refuses_bad_factories_clearly(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        TrainConfig(**kwargs)


def test_a_factory_that_returns_no_module_is_named():
    with pytest.raises(TypeError, match=r"model_factory 'torch:zeros' returned a Tensor, not a torch.nn.Module"):
        nft_cuda.models.build_factory_model("torch:zeros", {"size": [2]})


# --------------------------------------------------------------------------------------------------
# nft train / nft eval with a timm ViT and a Hugging Face BERT
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def model_libs():
    """timm and transformers, the test dependencies of the third-party models (tools/setup_env.sh)."""
    require_optional("timm")
    require_optional("transformers")


def _nft(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "factory, kwargs, output, module",
    [
        (VIT, '{"depth": 1, "embed_dim": 16}', None, "VisionTransformer"),
        (BERT, '{"hidden": 16}', "logits", "ImageBert"),
    ],
    ids=["timm-vit", "hf-bert"],
)
def test_nft_train_and_eval_a_third_party_model(factory, kwargs, output, module, tmp_path, capsys, model_libs):
    runs = []
    for method in ("noise", "ovf"):
        out = tmp_path / method
        argv = ["train", "--model-factory", factory, "--model-kwargs", kwargs, "--method", method, "--out", str(out)]
        code, stdout, err = _nft(capsys, *argv, *(["--output", output] if output else []), *TINY, "--no-progress")
        assert code == 0, err
        assert "test acc clean" in stdout
        payload = safe_load(str(out / "model.pt"))
        spec = payload["model"]
        assert (spec["factory"], spec["kwargs"], spec.get("output")) == (factory, json.loads(kwargs), output)
        runs.append(str(out))
    model, _ = load_model(runs[1])
    assert type(model).__name__ == module and nft_cuda.noisy_layers(model)
    report = tmp_path / "report.json"
    code, stdout, err = _nft(capsys, "eval", *runs, *EVAL, "--json", str(report))
    assert code == 0, err
    results = json.loads(report.read_text())["results"]
    assert [r["checkpoint"] for r in results] == ["noise", "ovf"]
    for r in results:
        assert len(r["per_instance_accuracy"]) == 3 and 0 <= r["accuracy_mean"] <= 1 and r["ekl"] >= 0
    if output is not None:  # --output overrides the recorded adapter
        code, _, err = _nft(capsys, "eval", runs[0], *EVAL, "--output", "logitz")
        assert code == 1 and "no field 'logitz'; its fields: logits" in one_error_line(err)


def test_resume_rebuilds_the_factory_model_bit_identically(tmp_path, capsys, model_libs):
    common = dict(model_factory=VIT, model_kwargs={"embed_dim": 16}, method="ovf", epochs=2, limit_train=64,
                  limit_eval=32, batch_size=32, device="cpu")  # fmt: skip
    whole = train(TrainConfig(**common, out=str(tmp_path / "whole")), progress=False, log=None)
    train(TrainConfig(**common, out=str(tmp_path / "part")), progress=False, log=None, stop_after=1)
    code, stdout, err = _nft(capsys, "train", "--out", str(tmp_path / "part"), "--resume", "--no-progress")
    assert code == 0, err
    assert "resuming" in stdout
    a = safe_load(str(tmp_path / "whole" / "checkpoint.pt"))["model"]
    b = safe_load(str(tmp_path / "part" / "checkpoint.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["epochs"] == 2


def test_irs_with_taps_on_a_custom_model(tmp_path, model_libs):
    config = TrainConfig(
        model_factory=BERT, model_kwargs={"hidden": 16}, output="logits", method="irs",
        taps={"bert.bert.encoder.layer.0": 2}, epochs=1, limit_train=64, limit_eval=32, batch_size=32,
        device="cpu", out=str(tmp_path / "irs"),
    )  # fmt: skip
    result = train(config, progress=False, log=None)
    ckpt = safe_load(str(tmp_path / "irs" / "checkpoint.pt"))
    assert any(k.startswith("heads.") for k in ckpt["model"])  # the heads were trained
    exported, _ = load_model(result["model_path"])
    assert type(exported).__name__ == "ImageBert"  # the backbone only
    with pytest.raises(ValueError, match="no default IRS taps for model 'custom'; IRS needs taps"):
        nft_cuda.train.build_method("irs", nft_cuda.Variation(0.1), model_name="custom")


def test_nft_train_with_a_bad_output_name_gives_one_clear_line(tmp_path, capsys, model_libs):
    argv = ["train", "--model-factory", BERT, "--output", "logitz", "--out", str(tmp_path / "r"), *TINY]
    code, _, err = _nft(capsys, *argv, "--no-progress")
    assert code == 1
    line = one_error_line(err)
    assert "no field 'logitz'" in line and "SequenceClassifierOutput" in line and "its fields: logits" in line
    code, _, err = _nft(capsys, "train", "--model-factory", "examples.custom_models:nope", "--out", str(tmp_path / "s"))
    assert code == 1 and "has no attribute 'nope'" in one_error_line(err)
    assert not (tmp_path / "s").exists()


def test_nft_eval_names_a_factory_it_cannot_import(tmp_path, capsys, model_libs):
    config = TrainConfig(model_factory=VIT, model_kwargs={"embed_dim": 16}, epochs=1, limit_train=32, limit_eval=16,
                         batch_size=16, device="cpu", out=str(tmp_path / "vit"))  # fmt: skip
    path = train(config, progress=False, log=None)["model_path"]
    payload = torch.load(path, weights_only=True)
    payload["model"]["factory"] = "my_lab.models:vit"
    torch.save(payload, path)
    code, _, err = _nft(capsys, "eval", path, *EVAL)
    assert code == 1
    line = one_error_line(err)
    assert "cannot rebuild its model from the model factory 'my_lab.models:vit'" in line and "PYTHONPATH" in line
