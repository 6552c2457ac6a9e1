"""Monte-Carlo robustness evaluation (DESIGN §2 instance mode, §6, §7): nft_cuda.eval.

Small model (nft_cuda.models "small", 1×32×32, 10 classes) on random inputs whose labels are the clean
model's predictions, so noisy instances lose accuracy by different amounts. Tolerances of DESIGN §6
for "matches": float32 values rtol 1e-5 / atol 1e-6, predictions equal except where the top-2 margin is
below 1e-4.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import require_optional

import nft_cuda
from nft_cuda.eval import (
    EKLAccumulator,
    accuracy_stats,
    build_report,
    eval_checkpoints,
    expected_kl,
    instance_logits,
    monte_carlo,
    plot_results,
    write_csv,
    write_json,
)

mc_module = importlib.import_module("nft_cuda.eval.monte_carlo")  # the module (the package exports the function)
from nft_cuda.models import build_model

RTOL, ATOL, MARGIN = 1e-5, 1e-6, 1e-4
SEED = 1234
#: The chips of noise stream version 1 (keys by position): a model with a module inserted before a noisy
#: layer has the same chips as without it only there (in version 2 the inserted module renames the layer).
V1 = {"stream_version": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(extra: nn.Module | None = None, *, seed: int = 0) -> nn.Module:
    """The small model, noisy, in eval mode, with a sharpened classifier (distinct predictions)."""
    torch.manual_seed(seed)
    model = build_model("small", in_channels=1, num_classes=10)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(8.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    if extra is not None:
        model.classifier.insert(1, extra)
    return nft_cuda.convert(model, nft_cuda.Variation(0.1)).eval()


def make_data(model: nn.Module, n: int = 40, batch: int = 16, *, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=g)
    with torch.no_grad(), nft_cuda.noise_mode(model, "off"):
        y = model(x).argmax(-1)
    loader = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    return x, y, loader


def set_instance_probs(model, x, seed, runs, variation):
    """[R, N, C] float64 probabilities and [R, N, C] float32 logits, one instance at a time."""
    saved = [(layer, layer.variation, layer.mode) for _, layer in nft_cuda.noisy_layers(model)]
    try:
        for layer, _, _ in saved:
            layer.variation = variation
        logits = []
        with torch.no_grad():
            for r in range(runs):
                nft_cuda.set_instance(model, seed, r)
                logits.append(model(x))
    finally:
        for layer, var, mode in saved:
            layer._mode = mode
            layer._variation = var
    logits = torch.stack(logits)
    return torch.softmax(logits.double(), -1), logits


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def random_probs(r, n, c, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(r, n, c, generator=g, dtype=torch.float64) ** 3
    if zeros:
        p[torch.rand(r, n, c, generator=g) < 0.2] = 0.0
        p[..., 0] += 1e-3  # keep every row non-zero
    return p / p.sum(-1, keepdim=True)


def test_expected_kl_equals_mean_kl_to_the_mean():
    p = random_probs(6, 9, 5)
    pn = p.numpy()
    p_bar = pn.mean(0)
    kl = np.zeros((6, 9))
    for r in range(6):
        for i in range(9):
            for c in range(5):
                if pn[r, i, c] > 0:
                    kl[r, i] += pn[r, i, c] * math.log(pn[r, i, c] / p_bar[i, c])
    direct = kl.mean()
    assert direct > 0
    ekl = expected_kl(p)
    assert isinstance(ekl, float) and math.isfinite(ekl)
    assert ekl == pytest.approx(direct, rel=1e-12, abs=1e-15)
    assert expected_kl(p.float()) == pytest.approx(direct, rel=1e-6)  # any dtype, computed in float64


def test_expected_kl_zero_when_instances_agree():
    one = random_probs(1, 7, 4)
    same = one.expand(5, 7, 4).clone()
    assert expected_kl(same) == pytest.approx(0.0, abs=1e-12)
    assert expected_kl(same) >= 0.0
    onehot = torch.zeros(3, 4, 6, dtype=torch.float64)
    onehot[..., 2] = 1.0  # 0·log 0 everywhere else: no NaN
    assert expected_kl(onehot) == 0.0
    with pytest.raises(ValueError, match=r"\[R, N, C\]"):
        expected_kl(torch.rand(3, 4))


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_streaming_accumulator_equals_expected_kl(block_size):
    runs, n, c = 7, 10, 4
    p = random_probs(runs, n, c, seed=3)
    acc = EKLAccumulator(n, c, block_size=block_size)
    # rows in uneven batches; several instances interleaved per batch (as a multi-instance pass)
    for r0 in range(0, runs, 3):
        for start, stop in ((0, 4), (4, 5), (5, 10)):
            for r in range(r0, min(r0 + 3, runs)):
                acc.update(r, p[r, start:stop], start)
    assert acc.runs == runs
    assert acc.value() == pytest.approx(expected_kl(p), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(acc.probability_sum(), p.sum(0), rtol=1e-14, atol=1e-15)


def test_accumulator_block_exchange_is_bit_identical():
    """Blocks computed by two 'processes' and exchanged in block order give the one-process total."""
    runs, n, c, bs = 11, 6, 3, 4
    p = random_probs(runs, n, c, seed=5, zeros=False)
    one = EKLAccumulator(n, c, block_size=bs)
    for r in range(runs):
        one.update(r, p[r], 0)
    ref = one.value()
    ranks = [EKLAccumulator(n, c, block_size=bs, auto_fold=False) for _ in range(2)]
    owner = {b: b % 2 for b in range(3)}
    for r in range(runs):
        ranks[owner[r // bs]].update(r, p[r, :2], 0)
        ranks[owner[r // bs]].update(r, p[r, 2:], 2)
    for b in range(3):
        t = ranks[owner[b]].take_block(b)
        for acc in ranks:
            acc.put_block(b, t.clone())
    plogp = {**ranks[0].instance_plogp(), **ranks[1].instance_plogp()}
    for k, acc in enumerate(ranks):
        for r in range(runs):
            if owner[r // bs] != k:
                acc.add_instance_plogp(r, plogp[r])
        assert acc.value() == ref
        assert torch.equal(acc.probability_sum(), one.probability_sum())


def test_accuracy_stats_formulas():
    g = np.random.default_rng(0)
    accs = list(g.uniform(0.6, 0.9, size=13))
    s = accuracy_stats(accs)
    arr = np.asarray(accs)
    std = arr.std(ddof=1)
    assert s["accuracy_mean"] == pytest.approx(arr.mean(), rel=1e-15)
    assert s["accuracy_std"] == pytest.approx(std, rel=1e-13)
    assert s["ci95"] == pytest.approx(1.96 * std / math.sqrt(13), rel=1e-13)
    assert s["ci99"] == pytest.approx(2.576 * std / math.sqrt(13), rel=1e-13)
    assert s["accuracy_min"] == arr.min() and s["accuracy_max"] == arr.max()
    assert set(s["accuracy_percentiles"]) == {"5", "25", "50", "75", "95"}
    for q, v in s["accuracy_percentiles"].items():
        assert v == np.percentile(arr, float(q))
    # order-independent (exact sums) and exact for equal values
    assert accuracy_stats(accs[::-1]) == {**s, "accuracy_percentiles": s["accuracy_percentiles"]}
    same = accuracy_stats([0.1] * 3)
    assert same["accuracy_mean"] == 0.1 and same["accuracy_std"] == 0.0 and same["ci95"] == 0.0
    single = accuracy_stats([0.5])
    assert single["accuracy_std"] is None and single["ci95"] is None


# ------------------------------------------------------------------------------------------------
# Monte-Carlo
# ------------------------------------------------------------------------------------------------


def test_instance_logits_match_set_instance():
    model = make_model()
    x, _, _ = make_data(model, n=12)
    var = nft_cuda.Variation(0.3, "FeFET2")
    _, ref = set_instance_probs(model, x, SEED, 7, var)
    with torch.no_grad():
        got = torch.cat(
            [
                instance_logits(model, x, seed=SEED, instances=range(0, 4), variation=var),
                instance_logits(model, x, seed=SEED, instances=range(4, 7), variation=var),
            ]
        )
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    assert not torch.equal(ref[0], ref[1])  # instances differ
    assert all(layer.mode == "train" for _, layer in nft_cuda.noisy_layers(model))  # state restored


@pytest.mark.parametrize("fold", [True, False])
def test_batched_monte_carlo_matches_one_at_a_time(fold):
    model = make_model()
    x, y, loader = make_data(model)
    runs = 10
    vars_ = [nft_cuda.Variation(0.15), nft_cuda.Variation(0.3, "FeFET2")]
    results = monte_carlo(model, loader, vars_, runs, seed=SEED, instances_per_pass=4, fold=fold, progress=False)
    for var, res in zip(vars_, results):
        probs, logits = set_instance_probs(model, x, SEED, runs, var)
        pred = logits.argmax(-1)
        correct = (pred == y).sum(1)
        # a prediction may differ only where the top-2 margin is < 1e-4: bound the accuracy difference
        slack = (top2_margin(logits) < MARGIN).sum(1)
        got = torch.tensor(res["per_instance_accuracy"], dtype=torch.float64) * len(y)
        assert ((got - correct).abs() <= slack).all()
        assert res["per_instance_accuracy"] == [c / len(y) for c in correct.tolist()]  # no tie here
        assert res["confidence"] == pytest.approx(float(probs.amax(-1).mean()), rel=RTOL, abs=ATOL)
        assert res["ekl"] == pytest.approx(expected_kl(probs), rel=RTOL, abs=ATOL)
        assert res["ekl"] > 0 and res["accuracy_std"] > 0
        assert res["clean_accuracy"] == 1.0 and res["accuracy_mean"] < 1.0
        assert res["sigma"] == var.sigma and res["device_model"] == var.device_model
        assert res["runs"] == runs and res["seed"] == SEED and res["num_inputs"] == len(y)
        assert res["ci95"] == 1.96 * res["accuracy_std"] / math.sqrt(runs)
        assert res["ci99"] == 2.576 * res["accuracy_std"] / math.sqrt(runs)


def test_results_independent_of_instances_per_pass():
    model = make_model()
    _, _, loader = make_data(model, n=24, batch=10)
    vars_ = [nft_cuda.Variation(0.0), nft_cuda.Variation(0.25, "RRAM4")]
    ref = monte_carlo(model, loader, vars_, 11, seed=SEED, instances_per_pass=1, progress=False)
    for s, fold in ((3, False), (8, False), (16, False), (1, True), (3, True), (8, True)):
        got = monte_carlo(model, loader, vars_, 11, seed=SEED, instances_per_pass=s, fold=fold, progress=False)
        assert got == ref, (s, fold)
        assert json.dumps(got) == json.dumps(ref)


def test_sigma_zero_is_the_clean_model():
    model = make_model()
    _, y, loader = make_data(model)
    (res,) = monte_carlo(model, loader, nft_cuda.Variation(0.0, "FeFET6"), 5, seed=SEED, progress=False)
    assert res["runs"] == 5 and res["sigma"] == 0.0
    assert res["accuracy_std"] == 0.0 and res["ci95"] == 0.0 and res["ci99"] == 0.0
    assert res["accuracy_mean"] == res["clean_accuracy"] == 1.0
    assert res["per_instance_accuracy"] == [1.0] * 5
    assert res["ekl"] == 0.0
    with torch.no_grad(), nft_cuda.noise_mode(model, "off"):
        conf = torch.softmax(model(torch.cat([b[0] for b in loader])).double(), -1).amax(-1).mean()
    assert res["confidence"] == pytest.approx(float(conf), rel=RTOL)  # batch 40 vs 16: float32 op order


class _RowMixer(nn.Module):
    """An unknown leaf: the sample axis cannot vouch for it (here it is harmless: x + 0)."""

    def forward(self, x):
        return x + 0.0


def test_fallback_warns_once_and_matches_batched(monkeypatch):
    model = make_model(_RowMixer())
    _, _, loader = make_data(model, n=20, batch=10)
    vars_ = [nft_cuda.Variation(0.2), nft_cuda.Variation(0.3)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        slow = monte_carlo(model, loader, vars_, 6, seed=SEED, instances_per_pass=4, fold=True, progress=False)
    msgs = [str(w.message) for w in rec if "one instance at a time" in str(w.message)]
    assert len(msgs) == 1 and "classifier.1" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not folded by default on CPU: nothing to warn about
        assert monte_carlo(model, loader, vars_, 6, seed=SEED, instances_per_pass=4, progress=False) == slow
    monkeypatch.setattr(mc_module, "unbatchable_modules", lambda m: [])
    fast = monte_carlo(model, loader, vars_, 6, seed=SEED, instances_per_pass=4, fold=True, progress=False)
    for a, b in zip(slow, fast):
        assert a["per_instance_accuracy"] == b["per_instance_accuracy"]
        for k in ("ekl", "confidence", "accuracy_mean"):
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=ATOL)


def test_dropout_in_eval_mode_is_batched():
    model = make_model(nn.Dropout(0.5))
    model.train()  # monte_carlo switches to eval(): dropout is then the identity
    _, _, loader = make_data(model.eval(), n=16)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = monte_carlo(model, loader, nft_cuda.Variation(0.2), 4, seed=SEED, fold=True, progress=False, **V1)
    plain = make_model()
    ref = monte_carlo(plain, loader, nft_cuda.Variation(0.2), 4, seed=SEED, fold=True, progress=False, **V1)
    assert res == ref
    assert all(m.training for m in model.modules())  # training flags restored


def test_model_state_restored():
    model = make_model()
    _, _, loader = make_data(model, n=8)
    nft_cuda.set_instance(model, 99, 3)
    layers = nft_cuda.noisy_layers(model)
    before = [(l.mode, l.variation, l.instance, l._instance_rng.clone()) for _, l in layers]
    monte_carlo(model, loader, [nft_cuda.Variation(0.4, "RRAM4")], 3, seed=SEED, progress=False)
    after = [(l.mode, l.variation, l.instance, l._instance_rng.clone()) for _, l in layers]
    for (m0, v0, i0, b0), (m1, v1, i1, b1) in zip(before, after):
        assert (m0, v0, i0) == (m1, v1, i1) and torch.equal(b0, b1)
    assert all(layer._sample_plan is None for _, layer in layers)


def test_bad_loaders_and_arguments():
    model = make_model()
    x, y, loader = make_data(model, n=8)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        monte_carlo(model, shuffled, nft_cuda.Variation(0.1), 2, seed=0, progress=False)

    class Flipping:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            yy = y if self.calls == 1 else (y + 1) % 10
            return iter([(x, yy)])

    with pytest.raises(ValueError, match="same labels in the same order"):
        monte_carlo(model, Flipping(), nft_cuda.Variation(0.1), 2, seed=0, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        monte_carlo(model, iter(loader), nft_cuda.Variation(0.1), 2, seed=0, progress=False)
    with pytest.raises(ValueError, match="runs"):
        monte_carlo(model, loader, nft_cuda.Variation(0.1), 0, seed=0, progress=False)
    with pytest.raises(TypeError, match="variations"):
        monte_carlo(model, loader, [0.1], 2, seed=0, progress=False)
    with pytest.raises(ValueError, match="no noisy layers"):
        monte_carlo(nft_cuda.strip(make_model()), loader, nft_cuda.Variation(0.1), 2, seed=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        monte_carlo(model, loader, nft_cuda.Variation(0.1), 2, seed=-1, progress=False)


# ------------------------------------------------------------------------------------------------
# Reports and checkpoints
# ------------------------------------------------------------------------------------------------


def _fake_results():
    out = []
    for label, drop in (("ovf", 0.02), ("noise", 0.05)):
        for k, sigma in enumerate((0.0, 0.1, 0.2, 0.3)):
            accs = [0.9 - drop * k * (1 + 0.1 * math.sin(i)) for i in range(20)]
            res = {
                "checkpoint": label,
                "sigma": sigma,
                "device_model": "RRAM1",
                "runs": 20,
                "seed": 0,
                "num_inputs": 100,
                **accuracy_stats(accs),
                "confidence": 0.9 - 0.1 * k,
                "ekl": 0.01 * k * k * (1 + drop),
                "clean_accuracy": 0.9,
                "per_instance_accuracy": accs,
            }
            out.append(res)
    return out


def test_reports(tmp_path):
    results = _fake_results()
    report = build_report(results, model={"name": "small"}, dataset="embedded", seed=0)
    write_json(report, str(tmp_path / "r.json"))
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["results"] == results
    assert back["versions"] == {"nft_cuda": nft_cuda.__version__, "torch": torch.__version__}
    assert back["model"] == {"name": "small"} and back["dataset"] == "embedded" and back["seed"] == 0
    write_csv(report, str(tmp_path / "r.csv"))
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 8 and rows[1]["checkpoint"] == "ovf" and float(rows[1]["sigma"]) == 0.1
    assert float(rows[1]["accuracy_mean"]) == results[1]["accuracy_mean"]
    assert float(rows[1]["accuracy_p95"]) == results[1]["accuracy_percentiles"]["95"]
    require_optional("matplotlib")
    plot_results(report, str(tmp_path / "r.png"), title="test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_checkpoints(tmp_path, monkeypatch):
    require_optional("matplotlib")  # writes a plot
    from nft_cuda.eval import run as run_module
    from nft_cuda.io import save_model

    model = make_model()
    x, y, _ = make_data(model, n=24)
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}
    save_model(
        str(tmp_path / "a.pt"),
        model,
        spec=spec,
        variation=nft_cuda.Variation(0.1),
        meta={"dataset": "embedded", "method": "ovf"},
    )
    monkeypatch.setattr(run_module, "load_test_set", lambda name, data_dir=None: (x, y))
    paths = {k: str(tmp_path / f"out.{k}") for k in ("json", "csv", "png")}
    report = eval_checkpoints(
        [str(tmp_path / "a.pt")],
        [0.0, 0.2],
        "FeFET2",
        4,
        7,
        None,
        paths["json"],
        paths["csv"],
        paths["png"],
        2,
        "cpu",
        False,
        batch_size=10,
    )
    assert [r["sigma"] for r in report["results"]] == [0.0, 0.2]
    assert all(r["checkpoint"] == "a" and r["device_model"] == "FeFET2" for r in report["results"])
    assert report["dataset"] == "embedded" and report["model"] == spec and report["seed"] == 7
    assert json.loads(open(paths["json"]).read()) == json.loads(json.dumps(report))
    assert os.path.getsize(paths["png"]) > 0 and len(open(paths["csv"]).read().splitlines()) == 3
    direct = monte_carlo(
        model,
        [(x[i : i + 10], y[i : i + 10]) for i in range(0, 24, 10)],
        [nft_cuda.Variation(0.0, "FeFET2"), nft_cuda.Variation(0.2, "FeFET2")],
        4,
        seed=7,
        progress=False,
    )
    assert [{k: v for k, v in r.items() if k != "checkpoint"} for r in report["results"]] == direct


def test_monte_carlo_takes_its_settings_as_one_eval_config():
    """config=EvalConfig(...) gives the results of the same settings as arguments; a setting given both
    ways, or a call with neither runs/seed nor a config, is refused naming it."""
    from nft_cuda.eval import EvalConfig

    model = make_model()
    _, _, loader = make_data(model, n=24, batch=10)
    sweep = [nft_cuda.Variation(0.0), nft_cuda.Variation(0.2)]
    kw = dict(instances_per_pass=2, progress=False, per_instance_kl=True)
    direct = monte_carlo(model, loader, sweep, 5, seed=SEED, **kw)
    config = EvalConfig(runs=5, seed=SEED, **kw)
    assert monte_carlo(model, loader, sweep, config=config) == direct
    other = monte_carlo(model, loader, sweep, config=EvalConfig(runs=5, seed=SEED + 1, **kw))
    assert other[1]["per_instance_accuracy"] != direct[1]["per_instance_accuracy"]  # the config is read
    with pytest.raises(TypeError, match="runs, seed given both in config and as arguments"):
        monte_carlo(model, loader, sweep, 5, seed=SEED, config=config)
    with pytest.raises(TypeError, match="fold given both"):
        monte_carlo(model, loader, sweep, fold=True, config=config)
    with pytest.raises(TypeError, match="needs runs and seed"):
        monte_carlo(model, loader, sweep, 5)
    with pytest.raises(TypeError, match="config must be an nft_cuda.eval.EvalConfig"):
        monte_carlo(model, loader, sweep, config={"runs": 5, "seed": 0})


def test_eval_config_is_checked_normalised_and_frozen():
    import dataclasses

    from nft_cuda.eval import EvalConfig

    c = EvalConfig(sigmas=0.1, times=[1, 3600], labels=["a"], device_options=None)
    assert c.sigmas == (0.1,) and c.times == (1.0, 3600.0) and c.labels == ("a",) and c.device_options == {}
    for bad, match in (
        ({"runs": 0}, "runs must be >= 1"),
        ({"runs": 2**32 + 1}, "at most 2"),
        ({"seed": -1}, "seed must be in"),
        ({"instances_per_pass": 0}, "instances_per_pass"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"sigmas": []}, "sigmas must hold at least one"),
        ({"times": ()}, "times must hold at least one"),
    ):
        with pytest.raises(ValueError, match=match):
            EvalConfig(**bad)
    with pytest.raises(TypeError, match="device_options must be a dict"):
        EvalConfig(device_options=[("p0", 0.1)])
    for name in ("runs", "instances_per_pass", "batch_size"):  # the package's one positive-int check
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            EvalConfig(**{name: 2.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.runs = 3
    assert dataclasses.replace(c, runs=3).runs == 3 and c.runs == 100


def test_eval_checkpoints_with_a_config_equals_the_keyword_call(tmp_path, monkeypatch):
    from nft_cuda.eval import EvalConfig
    from nft_cuda.eval import run as run_module
    from nft_cuda.io import save_model

    model = make_model()
    x, y, _ = make_data(model, n=20)
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}
    for name in ("a", "b"):
        save_model(str(tmp_path / f"{name}.pt"), model, spec=spec, variation=nft_cuda.Variation(0.1),
                   meta={"dataset": "embedded", "method": "noise"})  # fmt: skip
    monkeypatch.setattr(run_module, "load_test_set", lambda name, data_dir=None: (x, y))
    paths = [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    kw = dict(runs=3, seed=2, device="cpu", progress=False, batch_size=8, baseline=paths[0])
    by_keywords = eval_checkpoints(paths, [0.2], **kw)
    by_config = eval_checkpoints(paths, config=EvalConfig(sigmas=[0.2], **kw))
    assert by_config == by_keywords and by_config["baseline"] == "a" and by_config["paired"]
    with pytest.raises(TypeError, match="sigmas given both"):
        eval_checkpoints(paths, [0.2], config=EvalConfig(**kw))


# ------------------------------------------------------------------------------------------------
# Scale-out: 2 processes with gloo give the JSON of one process (DESIGN §7). Runs in CI (< 60 s).
# ------------------------------------------------------------------------------------------------

_DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import test_eval as t
    import nft_cuda
    from nft_cuda.eval import monte_carlo

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    model = t.make_model()
    _, _, loader = t.make_data(model, n=24, batch=10)
    variations = [nft_cuda.Variation(0.0), nft_cuda.Variation(0.2), nft_cuda.Variation(0.3, "FeFET2")]
    results = monte_carlo(model, loader, variations, 21, seed=t.SEED, instances_per_pass=int(sys.argv[2]),
                          fold=sys.argv[3] == "fold", progress=False, per_instance_kl=True)
    rank = dist.get_rank() if distributed else 0
    with open(sys.argv[1] + f".rank{{rank}}", "w") as f:
        json.dump(results, f)
    if distributed:
        dist.destroy_process_group()
""")


def test_two_process_gloo_matches_one_process(tmp_path):
    script = tmp_path / "mc_dist.py"
    script.write_text(_DIST_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), str(one), "3", "seq"], check=True, env=env, timeout=120)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(two),
            "8",
            "fold",
        ],
        check=True,
        env=env,
        timeout=120,
    )
    ref = (tmp_path / "one.json.rank0").read_text()
    assert json.loads(ref)[1]["ekl"] > 0 and len(json.loads(ref)[1]["per_instance_kl"]) == 21
    assert (tmp_path / "two.json.rank0").read_text() == ref
    assert (tmp_path / "two.json.rank1").read_text() == ref
