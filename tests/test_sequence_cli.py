"""`nft train --model vit|lstm` with every method on the embedded data, and `nft eval` of both (tiny
budgets: a few batches each)."""

from __future__ import annotations

import json

import pytest

from nft_cuda import cli
from nft_cuda.io import load_model
from nft_cuda.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # fast on a shared 2-core machine

TINY = ["--limit-train", "64", "--limit-eval", "32", "--batch-size", "32", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("method", ["clean", "noise", "ovf", "irs"])
@pytest.mark.parametrize("model", ["vit", "lstm"])
def test_train_every_method_on_the_embedded_data(model, method, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", model, "--method", method, "--sigma", "0.2", "--epochs", "1", "--out", str(out)]
    assert cli.main([*argv, *TINY]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == model and summary["config"]["method"] == method
    exported, payload = load_model(str(out / "model.pt"))
    plain = build_model(model, in_channels=1, num_classes=10)
    assert set(exported.state_dict()) == set(plain.state_dict())  # IRS heads are not exported
    assert payload["model"]["name"] == model


@pytest.mark.parametrize("model", ["vit", "lstm"])
def test_eval_runs_monte_carlo_on_both_models(model, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", model, "--method", "noise", "--epochs", "1", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    report_path = tmp_path / "r.json"
    argv = ["eval", str(out), "--sigma", "0,0.2", "--runs", "3", "--json", str(report_path), "--device", "cpu"]
    assert cli.main([*argv, "--instances-per-pass", "2", "--no-progress"]) == 0, capsys.readouterr().err
    results = json.loads(report_path.read_text())["results"]
    assert [r["sigma"] for r in results] == [0.0, 0.2]
    noisy = results[1]
    assert noisy["runs"] == 3 and len(noisy["per_instance_accuracy"]) == 3
    assert len(set(noisy["per_instance_accuracy"])) > 1 or noisy["ci95"] == 0.0
    assert all(0.0 <= a <= 1.0 for a in noisy["per_instance_accuracy"])
