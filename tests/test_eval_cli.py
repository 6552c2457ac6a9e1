"""`nft eval` and `nft demo` end to end (subprocesses, as a user runs them)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import require_optional

from nft_cuda.train.trainer import TrainConfig, train

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _nft(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "nft_cuda", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(TrainConfig(method="noise", sigma=0.1, epochs=1, limit_train=256, limit_eval=128,
                               out=str(out), device="cpu"), progress=False, log=None)
    return result["model_path"]


def test_eval_writes_json_csv_png(checkpoint, tmp_path):
    require_optional("matplotlib")  # writes a plot
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    r = _nft("eval", checkpoint, "--sigma", "0,0.2", "--runs", "3", "--json", str(j), "--csv", str(c),
             "--plot", str(p), "--no-progress", "--batch-size", "500")
    assert r.returncode == 0, r.stderr
    report = json.loads(j.read_text())
    assert [x["sigma"] for x in report["results"]] == [0.0, 0.2]
    for x in report["results"]:
        for key in ("checkpoint", "sigma", "device_model", "runs", "accuracy_mean", "accuracy_std", "ci95",
                    "ci99", "ekl", "confidence"):
            assert key in x, key
        assert x["runs"] == 3 and 0 <= x["accuracy_mean"] <= 1
    assert report["results"][0]["accuracy_std"] == 0  # σ_d = 0: every instance is the clean model
    assert report["dataset"] == "embedded" and report["seed"] == 0 and "versions" in report
    rows = list(csv.DictReader(c.open()))
    assert len(rows) == 2
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert "accuracy" in r.stdout and "EKL" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["eval", "missing.pt"], "checkpoint not found"),
    (["eval", "CKPT", "--sigma", "-0.1"], "σ_d must be finite and >= 0"),
    (["eval", "CKPT", "--runs", "1"], "must be >= 2"),
    (["eval", "CKPT", "--sigma", "0:0.4"], "start:stop:step"),
])
def test_eval_bad_arguments_one_line(checkpoint, args, needle):
    r = _nft(*[checkpoint if a == "CKPT" else a for a in args])
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nft: error:"), r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr


def test_eval_not_a_model(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = _nft("eval", str(bad), "--runs", "2", "--sigma", "0.1")
    assert r.returncode == 1 and r.stderr.startswith("nft: error:") and "Traceback" not in r.stderr


def test_demo_runs_and_prints_table(tmp_path):
    require_optional("matplotlib")  # writes a plot
    r = _nft("demo", "--epochs", "1", "--runs", "2", "--methods", "noise,irs", "--out", str(tmp_path / "demo"),
             "--no-progress", "--device", "cpu", "--sigma", "0.2")
    assert r.returncode == 0, r.stderr
    assert "| noise |" in r.stdout and "| irs |" in r.stdout
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert {x["checkpoint"] for x in report["results"]} == {"noise", "irs"}
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000


def test_torchrun_eval_json_identical_to_one_process(checkpoint, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # CPU GEMMs/convolutions reduce in a thread-count-dependent order, so both runs use one thread per
    # process: then only the batching and the number of processes differ.
    common = ["--sigma", "0.1,0.3", "--runs", "10", "--no-progress", "--device", "cpu", "--batch-size", "500"]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "nft_cuda", "eval", checkpoint, *common, "--json", str(one),
                        "--instances-per-pass", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "nft_cuda", "eval", checkpoint, *common, "--json", str(two)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(one.read_text()) == json.loads(two.read_text())
