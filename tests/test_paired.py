"""Paired comparisons on common chips (nft_cuda.eval.paired, nft eval --baseline)."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import require_optional

import nft_cuda
from nft_cuda.eval import eval_checkpoints, monte_carlo
from nft_cuda.eval.paired import NO_DIFFERENCE, PAIRED_COLUMNS, compare, paired_difference, unpaired_ci95
from nft_cuda.models import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_eval import SEED, make_data, make_model, set_instance_probs

SPEC = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _direct(values, baseline):
    """The textbook float64 computation: mean and 1.96·std(ddof=1)/√R of the per-chip differences."""
    d = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return d.mean(), 1.96 * d.std(ddof=1) / math.sqrt(len(d))


def test_paired_difference_matches_direct_float64():
    rng = np.random.default_rng(0)
    chips = rng.normal(0.0, 0.05, 50)  # what chip r does to both models
    a = np.clip(0.8 + chips + rng.normal(0, 0.01, 50), 0, 1)
    b = np.clip(0.82 + chips + rng.normal(0, 0.01, 50), 0, 1)
    got = paired_difference(b.tolist(), a.tolist())
    mean, ci = _direct(b, a)
    assert got["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert got["ci95"] == pytest.approx(ci, rel=1e-12)
    assert got["low"] == pytest.approx(mean - ci) and got["high"] == pytest.approx(mean + ci)
    assert got["verdict"] == "better"
    assert paired_difference(a.tolist(), b.tolist())["verdict"] == "worse"
    # correlated chips: the paired CI is several times narrower than the unpaired one
    assert got["ci95"] < unpaired_ci95(b.tolist(), a.tolist()) / 3
    # the order of the chips does not change anything (exact sums)
    perm = rng.permutation(50)
    assert paired_difference(b[perm].tolist(), a[perm].tolist()) == got


def test_verdicts_and_edge_cases():
    assert paired_difference([0.5, 0.6, 0.4], [0.5, 0.4, 0.6])["verdict"] == NO_DIFFERENCE
    same = paired_difference([0.9] * 4, [0.7] * 4)  # σ_d = 0: every chip the clean model, exact difference
    assert same["ci95"] == 0.0 and same["verdict"] == "better" and same["mean"] == pytest.approx(0.2)
    assert paired_difference([0.7] * 4, [0.7] * 4)["verdict"] == NO_DIFFERENCE
    one = paired_difference([0.9], [0.7])
    assert one["std"] is None and one["ci95"] is None and one["verdict"] is None
    assert paired_difference([1.0, 2.0], [0.0, 0.5], words=("higher", "lower"))["verdict"] == "higher"
    with pytest.raises(ValueError, match="same chips"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="at least one chip"):
        paired_difference([], [])


def test_per_instance_kl_is_the_per_chip_ekl():
    """KL_r = mean_n KL(p_r ‖ p̄) from the dense probabilities; its mean is the EKL; batching-invariant."""
    model = make_model()
    x, _, loader = make_data(model)
    var = nft_cuda.Variation(0.3, "FeFET2")
    probs, _ = set_instance_probs(model, x, SEED, 10, var)
    p_bar = probs.mean(0)
    direct = (torch.xlogy(probs, probs) - torch.xlogy(probs, p_bar)).sum(-1).mean(-1)
    ref = None
    for s, fold in ((1, False), (4, True), (8, False)):
        res = monte_carlo(
            model, loader, [var], 10, seed=SEED, instances_per_pass=s, fold=fold, progress=False, per_instance_kl=True
        )[0]
        torch.testing.assert_close(
            torch.tensor(res["per_instance_kl"], dtype=torch.float64), direct, rtol=1e-5, atol=1e-7
        )
        assert math.fsum(res["per_instance_kl"]) / 10 == pytest.approx(res["ekl"], rel=1e-12)
        ref = ref or res
        assert res == ref, (s, fold)
    plain = monte_carlo(model, loader, [var], 10, seed=SEED, progress=False)[0]
    assert "per_instance_kl" not in plain and plain == {k: v for k, v in ref.items() if k != "per_instance_kl"}


def _checkpoints(tmp_path, monkeypatch, shift=0.05):
    """Baseline a and a slightly different b (same architecture), and a test set both are evaluated on."""
    from nft_cuda.eval import run as run_module
    from nft_cuda.io import save_model

    a = make_model()
    b = make_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(shift * p.abs().mean() * torch.randn(p.shape, generator=g))
    x, y, _ = make_data(a, n=40)
    paths = []
    for name, m in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"{name}.pt"))
        save_model(paths[-1], m, spec=SPEC, variation=nft_cuda.Variation(0.1), meta={"dataset": "embedded"})
    monkeypatch.setattr(run_module, "load_test_set", lambda name, data_dir=None: (x, y))
    return paths


def test_eval_checkpoints_with_baseline(tmp_path, monkeypatch):
    require_optional("matplotlib")  # writes the plot's paired panel
    paths = _checkpoints(tmp_path, monkeypatch)
    out = {k: str(tmp_path / f"r.{k}") for k in ("json", "csv", "png")}
    report = eval_checkpoints(
        paths[::-1],
        [0.0, 0.3],
        "RRAM1",
        24,
        7,
        None,
        out["json"],
        out["csv"],
        out["png"],
        4,
        "cpu",
        False,
        batch_size=16,
        baseline=paths[0],
    )
    assert report["baseline"] == "a" and [r["checkpoint"] for r in report["results"]] == ["b", "b", "a", "a"]
    results = {(r["checkpoint"], r["sigma"]): r for r in report["results"]}
    assert [(p["checkpoint"], p["sigma"]) for p in report["paired"]] == [("b", 0.0), ("b", 0.3)]
    for p in report["paired"]:
        a, b = results[("a", p["sigma"])], results[("b", p["sigma"])]
        mean, ci = _direct(b["per_instance_accuracy"], a["per_instance_accuracy"])
        assert p["accuracy_difference"] == pytest.approx(mean, abs=1e-15)
        assert p["accuracy_difference_ci95"] == pytest.approx(ci, rel=1e-12, abs=1e-15)
        assert p["accuracy_difference"] == pytest.approx(b["accuracy_mean"] - a["accuracy_mean"], abs=1e-15)
        kl_mean, kl_ci = _direct(b["per_instance_kl"], a["per_instance_kl"])
        assert p["ekl_difference"] == pytest.approx(kl_mean, abs=1e-15)
        assert p["ekl_difference"] == pytest.approx(b["ekl"] - a["ekl"], abs=1e-12)
        assert p["ekl_difference_ci95"] == pytest.approx(kl_ci, rel=1e-12, abs=1e-15)
    noisy = report["paired"][1]
    # chip r carries the same noise in a and b: the paired CI is narrower than the unpaired one
    assert 0 < noisy["accuracy_difference_ci95"] < noisy["accuracy_difference_ci95_unpaired"]
    with open(out["json"]) as f:
        assert json.load(f)["paired"] == json.loads(json.dumps(report["paired"]))
    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-len(PAIRED_COLUMNS) :] == list(PAIRED_COLUMNS)
    assert [r["baseline"] for r in rows] == ["a", "a", "", ""]
    assert float(rows[1]["accuracy_difference_ci95"]) == noisy["accuracy_difference_ci95"]
    assert rows[1]["accuracy_verdict"] == noisy["accuracy_verdict"]
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the same evaluation without a baseline gives the same results, less per_instance_kl
    plain = eval_checkpoints(paths[::-1], [0.0, 0.3], "RRAM1", 24, 7, device="cpu", progress=False, batch_size=16)
    assert plain["results"] == [{k: v for k, v in r.items() if k != "per_instance_kl"} for r in report["results"]]
    assert compare(report["results"], "a") == report["paired"]


def test_baseline_refusals(tmp_path, monkeypatch):
    from nft_cuda.io import load_model, save_model

    paths = _checkpoints(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="must be one of the evaluated checkpoints"):
        eval_checkpoints(paths[1:], [0.2], runs=2, device="cpu", progress=False, baseline=paths[0])
    model, _ = load_model(paths[1])
    fefet = str(tmp_path / "fefet.pt")
    save_model(fefet, model, spec=SPEC, variation=nft_cuda.Variation(0.1, "FeFET2"), meta={"dataset": "embedded"})
    with pytest.raises(ValueError, match="chips differ"):  # each checkpoint's own device model: not the same chips
        eval_checkpoints([paths[0], fefet], [0.2], runs=2, device="cpu", progress=False, baseline="a")
    half = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10, width=0.5), nft_cuda.Variation(0.1))
    narrow = str(tmp_path / "narrow.pt")
    save_model(
        narrow, half, spec={**SPEC, "width": 0.5}, variation=nft_cuda.Variation(0.1), meta={"dataset": "embedded"}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eval_checkpoints([paths[0], narrow], [0.2], runs=2, device="cpu", progress=False, baseline="a")
    assert any("different noisy layers" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="different runs"):
        compare(
            [
                {
                    "checkpoint": "a",
                    "sigma": 0.1,
                    "device_model": "RRAM1",
                    "runs": 2,
                    "seed": 0,
                    "num_inputs": 4,
                    "per_instance_accuracy": [0.5, 0.5],
                },
                {
                    "checkpoint": "b",
                    "sigma": 0.1,
                    "device_model": "RRAM1",
                    "runs": 3,
                    "seed": 0,
                    "num_inputs": 4,
                    "per_instance_accuracy": [0.5, 0.5, 0.5],
                },
            ],
            "a",
        )
