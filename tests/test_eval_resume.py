"""An interrupted Monte-Carlo evaluation (``eval_checkpoints`` / ``nft eval --json``) loses nothing: the
finished (checkpoint, σ_d) points are kept next to the report and a rerun with the same settings skips
them, giving a byte-identical report."""

from __future__ import annotations

import json

import pytest

from nft_cuda.eval import run as eval_run
from nft_cuda.train.trainer import TrainConfig, train

SIGMAS = [0.1, 0.2, 0.3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(
        TrainConfig(method="noise", sigma=0.1, epochs=1, limit_train=128, limit_eval=64, out=str(out), device="cpu"),
        progress=False,
        log=None,
    )
    return result["model_path"]


class _Counting:
    """monte_carlo that counts its calls and raises KeyboardInterrupt on call number ``stop_at``."""

    def __init__(self, stop_at=None):
        self.real, self.calls, self.stop_at = eval_run.monte_carlo, 0, stop_at

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def _eval(checkpoint, json_path, runs=3, **kw):
    return eval_run.eval_checkpoints(
        [checkpoint], SIGMAS, runs=runs, json_path=str(json_path), progress=False, device="cpu", **kw
    )


def test_interrupted_eval_resumes_to_the_identical_report(checkpoint, tmp_path, monkeypatch):
    _eval(checkpoint, tmp_path / "fresh.json")
    fresh = (tmp_path / "fresh.json").read_bytes()
    assert not (tmp_path / "fresh.json.partial.jsonl").exists()  # removed once the report is written

    target = tmp_path / "r.json"
    interrupted = _Counting(stop_at=3)
    monkeypatch.setattr(eval_run, "monte_carlo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _eval(checkpoint, target)
    partial = tmp_path / "r.json.partial.jsonl"
    assert not target.exists() and len(partial.read_text().splitlines()) == 2
    with partial.open("a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a write

    resumed = _Counting()
    monkeypatch.setattr(eval_run, "monte_carlo", resumed)
    _eval(checkpoint, target)
    assert resumed.calls == 1  # only the unfinished σ_d
    assert target.read_bytes() == fresh
    assert not partial.exists()


def test_changed_settings_or_no_resume_recompute(checkpoint, tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    monkeypatch.setattr(eval_run, "monte_carlo", _Counting(stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        _eval(checkpoint, target)

    other_runs = _Counting(stop_at=2)  # another --runs: none of the finished points applies
    monkeypatch.setattr(eval_run, "monte_carlo", other_runs)
    with pytest.raises(KeyboardInterrupt):
        _eval(checkpoint, target, runs=4)
    assert other_runs.calls == 2

    afresh = _Counting()
    monkeypatch.setattr(eval_run, "monte_carlo", afresh)
    report = _eval(checkpoint, target, resume=False)
    assert afresh.calls == len(SIGMAS) and [r["runs"] for r in report["results"]] == [3, 3, 3]
    assert json.loads(target.read_text())["results"][0]["sigma"] == SIGMAS[0]


def test_no_json_keeps_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eval_run.eval_checkpoints([checkpoint], [0.2], runs=2, progress=False, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_one_point_per_call_equals_one_sweep_call(checkpoint):
    """eval_checkpoints evaluates σ_d points one call each (to keep each as it ends): the same results as
    one monte_carlo call over the whole sweep."""
    from nft_cuda.eval.monte_carlo import monte_carlo
    from nft_cuda.io import load_model
    from nft_cuda.variation import Variation

    model, _ = load_model(checkpoint)
    x, y = eval_run.load_test_set("embedded")
    loader = eval_run.TensorBatches(x[:200], y[:200], 64)
    variations = [Variation(s, "FeFET2") for s in SIGMAS]
    together = monte_carlo(model, loader, variations, 4, seed=9, progress=False)
    apart = [monte_carlo(model, loader, [v], 4, seed=9, progress=False)[0] for v in variations]
    assert together == apart


def test_reports_models_and_checkpoints_carry_the_noise_stream_version(checkpoint, tmp_path):
    """DESIGN §2: every report result, exported model and training checkpoint records its noise stream
    version; ``--stream-version 1`` evaluates the chips of version 1 and is a setting of its own."""
    import os

    from nft_cuda import cli
    from nft_cuda.io import safe_load
    from nft_cuda.train.checkpoint import read_checkpoint

    ckpt, _ = read_checkpoint(os.path.dirname(checkpoint), warn=False)
    assert ckpt["noise_stream"] == 2 and safe_load(checkpoint)["noise_stream"] == 2
    v2 = _eval(checkpoint, tmp_path / "v2.json", runs=2)
    assert [r["noise_stream"] for r in json.loads((tmp_path / "v2.json").read_text())["results"]] == [2, 2, 2]
    path = tmp_path / "v1.json"
    assert cli.main(["eval", checkpoint, "--sigma", "0.1,0.2,0.3", "--runs", "2", "--device", "cpu",
                     "--stream-version", "1", "--json", str(path), "--no-progress"]) == 0  # fmt: skip
    v1 = json.loads(path.read_text())["results"]
    assert [r["noise_stream"] for r in v1] == [1, 1, 1]
    assert [r["per_instance_accuracy"] for r in v1] != [r["per_instance_accuracy"] for r in v2["results"]]
    assert v1 == _eval(checkpoint, tmp_path / "again.json", runs=2, stream_version=1)["results"]
