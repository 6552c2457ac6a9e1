"""Same seed, same device → bit-identical results (DESIGN §9): the training loss curve and weights,
and the evaluation JSON.

CPU always; CUDA when a GPU is present (benchmarks/gpu_check.sh), with
``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (the trainer itself
puts cuDNN in deterministic mode). IRS is not run on CUDA here: the backward of its adaptive average
pooling has no deterministic CUDA kernel (see docs/errors.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICES

import nft_cuda
from nft_cuda.eval.run import eval_checkpoints
from nft_cuda.io import safe_load, save_model
from nft_cuda.models import build_model
from nft_cuda.train.trainer import TrainConfig, train

#: per-epoch metrics that must repeat exactly (epoch_time_s and epoch_cpu_s are the only other columns)
CURVE = ("epoch", "lr", "train_loss", "train_acc", "val_acc_noisy", "val_acc_clean", "best_epoch", "best_val_acc")


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """CPU, and CUDA (when present) with deterministic algorithms for the duration of the test."""
    if request.param != "cuda":
        yield request.param
        return
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"
        elif isinstance(a[k], dict):
            _assert_same_tensors(a[k], b[k], f"{what}.{k}")
        else:
            assert a[k] == b[k], f"{what}: {k} differs"


@pytest.mark.parametrize("method", ["noise", "ovf"])
def test_training_is_bit_identical(tmp_path, method, device):
    """Two trainings with one seed: the same loss curve, validation and test accuracies, and bit-identical
    weights, optimizer state and exported model."""

    def run(name, seed=0, epochs=2):
        config = TrainConfig(
            method=method,
            sigma=0.2,
            epochs=epochs,
            seed=seed,
            limit_train=64,
            limit_eval=32,
            batch_size=32,
            width=0.5,
            device=device,
            out=str(tmp_path / name),
        )
        return train(config, progress=False, log=None)

    a, b = run("a"), run("b")
    curve_a = [[row[k] for k in CURVE] for row in a["history"]]
    curve_b = [[row[k] for k in CURVE] for row in b["history"]]
    assert len(curve_a) == 2 and curve_a == curve_b  # exact float equality, NaN-free
    assert (a["test_acc_clean"], a["test_acc_noisy"]) == (b["test_acc_clean"], b["test_acc_noisy"])
    ckpt_a, ckpt_b = safe_load(str(tmp_path / "a" / "checkpoint.pt")), safe_load(str(tmp_path / "b" / "checkpoint.pt"))
    _assert_same_tensors(ckpt_a["model"], ckpt_b["model"], "checkpoint model")
    _assert_same_tensors(ckpt_a["optimizer"]["state"], ckpt_b["optimizer"]["state"], "optimizer state")
    assert torch.equal(ckpt_a["rng"]["torch"], ckpt_b["rng"]["torch"])
    _assert_same_tensors(
        safe_load(a["model_path"])["state_dict"], safe_load(b["model_path"])["state_dict"], "exported model"
    )
    if method == "noise":  # not vacuous: another seed gives another run
        c = run("c", seed=1, epochs=1)
        assert c["history"][0]["train_loss"] != a["history"][0]["train_loss"]


def test_evaluation_json_is_bit_identical(tmp_path, device):
    """Two Monte-Carlo evaluations with one seed: equal report dicts and byte-identical JSON files;
    another evaluation seed gives other numbers."""
    torch.manual_seed(0)
    model = build_model("small", in_channels=1, num_classes=10, width=0.5)
    variation = nft_cuda.Variation(0.2, "FeFET2")
    nft_cuda.convert(model, variation)
    path = tmp_path / "model.pt"
    save_model(
        str(path),
        model,
        spec={"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 0.5},
        variation=variation,
        meta={"dataset": "embedded"},
    )

    def run(name, seed=7):
        json_path = tmp_path / f"{name}.json"
        report = eval_checkpoints(
            [str(path)],
            [0.0, 0.3],
            runs=3,
            seed=seed,
            device=device,
            progress=False,
            json_path=str(json_path),
            batch_size=500,
        )
        return report, json_path.read_bytes()

    (ra, ja), (rb, jb) = run("a"), run("b")
    assert ra == rb
    assert ja == jb
    results = json.loads(ja)["results"]
    assert [r["sigma"] for r in results] == [0.0, 0.3] and results[1]["accuracy_std"] > 0
    rc, _ = run("c", seed=8)
    assert rc["results"][1]["per_instance_accuracy"] != ra["results"][1]["per_instance_accuracy"]
