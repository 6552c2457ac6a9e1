"""`nft eval` end to end (subprocesses, as a user runs them); `nft demo` is in test_demo.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import one_error_line, require_optional

from nft_cuda.train.trainer import TrainConfig, train

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _nft(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "nft_cuda", *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(
        TrainConfig(method="noise", sigma=0.1, epochs=1, limit_train=256, limit_eval=128, out=str(out), device="cpu"),
        progress=False,
        log=None,
    )
    return result["model_path"]


def test_eval_writes_json_csv_png(checkpoint, tmp_path):
    require_optional("matplotlib")  # writes a plot
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    r = _nft(
        "eval",
        checkpoint,
        "--sigma",
        "0,0.2",
        "--runs",
        "3",
        "--json",
        str(j),
        "--csv",
        str(c),
        "--plot",
        str(p),
        "--no-progress",
        "--batch-size",
        "500",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(j.read_text())
    assert [x["sigma"] for x in report["results"]] == [0.0, 0.2]
    for x in report["results"]:
        for key in (
            "checkpoint",
            "sigma",
            "device_model",
            "runs",
            "accuracy_mean",
            "accuracy_std",
            "ci95",
            "ci99",
            "ekl",
            "confidence",
        ):
            assert key in x, key
        assert x["runs"] == 3 and 0 <= x["accuracy_mean"] <= 1
    assert report["results"][0]["accuracy_std"] == 0  # σ_d = 0: every instance is the clean model
    assert report["dataset"] == "embedded" and report["seed"] == 0 and "versions" in report
    rows = list(csv.DictReader(c.open()))
    assert len(rows) == 2
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert "accuracy" in r.stdout and "EKL" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "missing.pt"], "checkpoint not found"),
        (["eval", "CKPT", "--sigma", "-0.1"], "σ_d must be finite and >= 0"),
        (["eval", "CKPT", "--runs", "1"], "must be >= 2"),
        (["eval", "CKPT", "--sigma", "0:0.4"], "start:stop:step"),
    ],
)
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


def test_eval_baseline_paired_table_json_csv(checkpoint, tmp_path):
    import shutil

    other = tmp_path / "same.pt"
    shutil.copyfile(checkpoint, other)  # the same weights on the same chips: every per-chip difference is 0
    j, c = tmp_path / "r.json", tmp_path / "r.csv"
    run = os.path.dirname(checkpoint)  # the baseline given as its run folder, labelled by it
    r = _nft(
        "eval",
        checkpoint,
        str(other),
        "--baseline",
        run,
        "--sigma",
        "0.2",
        "--runs",
        "3",
        "--json",
        str(j),
        "--csv",
        str(c),
        "--no-progress",
        "--batch-size",
        "500",
    )
    assert r.returncode == 0, r.stderr
    base = os.path.basename(run)
    report = json.loads(j.read_text())
    assert report["baseline"] == base
    assert f"paired differences to {base} on the same 3 chips" in r.stdout
    assert f"| same − {base} | 0.2 | +0.00 ± 0.00 |" in r.stdout and "no significant difference" in r.stdout
    paired = report["paired"]
    assert len(paired) == 1 and paired[0]["accuracy_difference"] == 0 and paired[0]["ekl_difference"] == 0
    rows = list(csv.DictReader(c.open()))
    assert [row["baseline"] for row in rows] == ["", base]
    assert rows[1]["accuracy_verdict"] == "no significant difference"
    bad = _nft("eval", checkpoint, "--baseline", str(other), "--sigma", "0.2", "--runs", "2")
    assert bad.returncode == 1 and "must be one of the evaluated checkpoints" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_torchrun_eval_json_identical_to_one_process(checkpoint, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # CPU GEMMs/convolutions reduce in a thread-count-dependent order, so both runs use one thread per
    # process: then only the batching and the number of processes differ.
    common = ["--sigma", "0.1,0.3", "--runs", "10", "--no-progress", "--device", "cpu", "--batch-size", "500"]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nft_cuda",
            "eval",
            checkpoint,
            *common,
            "--json",
            str(one),
            "--instances-per-pass",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "nft_cuda",
            "eval",
            checkpoint,
            *common,
            "--json",
            str(two),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(one.read_text()) == json.loads(two.read_text())


# --------------------------------------------------------------------------------------------------
# What a new user hits (in process: the same cli.main the `nft` script calls)
# --------------------------------------------------------------------------------------------------


def _main(capsys, *argv):
    from nft_cuda import cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_accepts_a_run_folder_labels_it_and_writes_readable_reports(checkpoint, tmp_path, capsys):
    require_optional("matplotlib")  # writes a plot
    run = os.path.dirname(checkpoint)
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    code, out, err = _main(
        capsys,
        "eval",
        run,
        "--sigma",
        "0.1",
        "--runs",
        "2",
        "--no-progress",
        "--json",
        str(j),
        "--csv",
        str(c),
        "--plot",
        str(p),
    )
    assert code == 0, err
    report = json.loads(j.read_text())
    assert report["checkpoints"][0]["path"] == checkpoint
    assert {r["checkpoint"] for r in report["results"]} == {os.path.basename(run)}  # not "model"
    umask = os.umask(0)
    os.umask(umask)
    for path in (j, c, p, checkpoint):
        assert (os.stat(path).st_mode & 0o777) == 0o666 & ~umask, path


def test_eval_of_a_training_checkpoint_names_the_model_beside_it(checkpoint, capsys):
    training_state = os.path.join(os.path.dirname(checkpoint), "checkpoint.pt")
    code, _, err = _main(capsys, "eval", training_state, "--sigma", "0.1", "--runs", "2", "--no-progress")
    assert code == 1
    line = one_error_line(err)
    assert f"evaluate the exported model {checkpoint}" in line


def test_eval_of_a_folder_without_a_model(tmp_path, capsys):
    code, _, err = _main(capsys, "eval", str(tmp_path), "--runs", "2")
    assert code == 1 and "is a folder without model.pt" in one_error_line(err)


def test_cuda_without_a_gpu_gives_one_message_in_train_and_eval(checkpoint, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "device 'cuda' was requested but CUDA is not available (use --device cpu or auto)"
    code, _, err = _main(capsys, "eval", checkpoint, "--device", "cuda", "--runs", "2", "--no-progress")
    assert code == 1 and one_error_line(err) == f"nft: error: {expected}"
    code, _, err = _main(
        capsys, "train", "--device", "cuda", "--epochs", "1", "--out", str(tmp_path / "t"), "--no-progress"
    )
    assert code == 1 and one_error_line(err) == f"nft: error: {expected}"


def test_interrupted_eval_says_the_same_command_continues(checkpoint, monkeypatch, capsys, tmp_path):
    import nft_cuda.eval.run as eval_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_run, "eval_checkpoints", interrupted)
    j = tmp_path / "r.json"
    code, _, err = _main(capsys, "eval", checkpoint, "--runs", "2", "--json", str(j))
    assert code == 130
    assert err.strip() == (
        f"nft: interrupted; the finished points are kept in {j}.partial.jsonl: run the same command again to continue"
    )
    code, _, err = _main(capsys, "eval", checkpoint, "--runs", "2")
    assert code == 130 and "add --json PATH" in err


@pytest.mark.parametrize(
    "text, values",
    [
        ("0:0.4:0.05", [round(0.05 * i, 10) for i in range(9)]),
        ("0:0.4:0.15", [0.0, 0.15, 0.3]),  # never past stop
        ("0.2:0.2:0.1", [0.2]),
        ("0 0.1, 0.2", [0.0, 0.1, 0.2]),
        ("0.3", [0.3]),
    ],
)
def test_parse_sigmas_values(text, values):
    from nft_cuda.eval.cli import parse_sigmas

    assert parse_sigmas(text) == values


@pytest.mark.parametrize(
    "text, needle",
    [
        ("0:0.4:0", "step of a sweep start:stop:step must be > 0"),
        ("0:0.4:-0.1", "must be > 0"),
        ("0.1:0.05:0.1", "needs start <= stop"),
        ("0.3:0:0.1", "needs start <= stop"),
        ("0,0.1,,0.2", "empty value"),
        ("0.1,0.1", "listed twice"),
        ("0:0.4", "start:stop:step"),
        ("a,b", "expected σ_d"),
    ],
)
def test_parse_sigmas_says_what_is_wrong(text, needle):
    import argparse

    from nft_cuda.eval.cli import parse_sigmas

    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        parse_sigmas(text)


@pytest.mark.parametrize(
    "paths, labels",
    [
        (["runs/try-noise/model.pt"], ["try-noise"]),
        (["runs/a/model.pt", "runs/b/model.pt"], ["a", "b"]),
        (["runs/x/model.pt", "old/x/model.pt"], ["runs/x", "old/x"]),
        (["a.pt", "b.pt"], ["a", "b"]),
        (["d1/m.pt", "d2/m.pt"], ["d1/m", "d2/m"]),
    ],
)
def test_labels_name_the_run_folder(paths, labels):
    from nft_cuda.eval.run import _labels

    assert _labels(paths) == labels


def test_plot_title_names_model_dataset_and_device_model():
    from nft_cuda.eval.report import _default_title

    report = {
        "model": {"name": "small"},
        "dataset": "embedded",
        "results": [{"device_model": "FeFET2"}, {"device_model": "FeFET2"}],
    }
    assert _default_title(report, report["results"]) == "model small · dataset embedded · device model FeFET2"


def test_eval_worst_case_table_and_json(checkpoint, tmp_path):
    j = tmp_path / "r.json"
    r = _nft(
        "eval",
        checkpoint,
        "--sigma",
        "0.2",
        "--runs",
        "2",
        "--worst-case",
        "0.5,3",
        "--worst-case-images",
        "64",
        "--worst-case-steps",
        "2",
        "--json",
        str(j),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "worst case within |z| <= κ (64 test images, 2 steps)" in r.stdout
    rows = json.loads(j.read_text())["worst_case"]
    assert [row["kappa"] for row in rows] == [0.5, 3.0]
    assert all(row["images"] == 64 and row["max_abs_z"] <= row["kappa"] and row["sigma"] == 0.2 for row in rows)
    bad = _nft("eval", checkpoint, "--worst-case", "0,1")
    assert bad.returncode == 2 and "every κ must be a finite number > 0" in bad.stderr
