"""`nft demo` (nft_cuda.demo): the main job end to end, its refusal to replace an earlier demo, and its
log when the output is not a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import require_optional

from nft_cuda.demo import UNDERTRAINED_POINTS, check_out, undertrained

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _nft(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "nft_cuda", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_demo_log_has_no_carriage_returns_and_reports_paired_verdicts(tmp_path):
    require_optional("matplotlib")  # the demo writes its plot
    out = tmp_path / "demo"
    # no --no-progress: the output goes to pipes, as in `nft demo > log 2>&1`
    r = _nft(
        "demo",
        "--epochs",
        "1",
        "--runs",
        "3",
        "--methods",
        "noise,irs",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--sigma",
        "0.2",
    )
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout and "\r" not in r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("epoch 1/1:") for line in lines)
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert "(baseline)" in rows["noise"]
    assert any(v in rows["irs"] for v in ("better", "worse", "no significant difference"))
    report = json.loads((out / "demo.json").read_text())
    assert report["baseline"] == "noise" and {p["checkpoint"] for p in report["paired"]} == {"irs"}
    assert (out / "demo.png").stat().st_size > 10_000

    again = _nft("demo", "--epochs", "1", "--runs", "3", "--methods", "noise,irs", "--out", str(out))
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and again.stderr.startswith("nft: error:")
    assert "already holds a demo" in again.stderr and "--overwrite" in again.stderr


def test_check_out_refuses_an_earlier_demo(tmp_path):
    check_out(tmp_path / "nothing", ["noise"], overwrite=False)
    (tmp_path / "a" / "ovf").mkdir(parents=True)
    (tmp_path / "a" / "ovf" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds a demo \(a ovf run\).*--overwrite"):
        check_out(tmp_path / "a", ["noise", "ovf"], overwrite=False)
    check_out(tmp_path / "a", ["noise"], overwrite=False)  # another method's folder is not this demo's
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "demo.json").write_text("{}")
    with pytest.raises(ValueError, match="demo.json"):
        check_out(tmp_path / "b", ["noise"], overwrite=False)
    check_out(tmp_path / "b", ["noise"], overwrite=True)


def test_refusal_happens_before_any_training(tmp_path):
    (tmp_path / "demo.csv").write_text("")
    r = _nft("demo", "--methods", "clean", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 1 and "already holds a demo (demo.csv)" in r.stderr
    assert r.stdout == "" and not (tmp_path / "clean").exists()


def test_undertrained_names_models_far_below_the_clean_one():
    gap = UNDERTRAINED_POINTS / 100
    accs = {"clean": 0.87, "noise": 0.87 - gap + 0.001, "ovf": 0.87 - gap, "irs": 0.70}
    assert undertrained(accs) == ["ovf", "irs"]
    assert undertrained({"noise": 0.5, "ovf": 0.9}) == []  # no clean model to compare with
