"""The ``nft`` command line: argument errors, train / resume, the data command, the plugin registry."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_error_line

from nft_cuda import cli
from nft_cuda.train.trainer import TrainConfig

TINY = ["--limit-train", "64", "--limit-eval", "32", "--batch-size", "32", "--device", "cpu", "--no-progress"]


def _nft(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "nft_cuda", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


# --------------------------------------------------------------------------------------------------
# Through `python -m nft_cuda` (what the `nft` console script runs)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, what",
    [
        (["train", "--sigma", "-0.5"], "--sigma"),
        (["train", "--model", "lenet"], "--model"),
    ],
)
def test_bad_arguments_give_one_line(args, what, tmp_path):
    r = _nft(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert what in one_error_line(r.stderr)
    assert not (tmp_path / "runs").exists()


def test_runtime_error_one_line_and_debug_traceback(tmp_path):
    r = _nft("train", "--out", str(tmp_path / "nothing"), "--resume", cwd=tmp_path)
    assert r.returncode == 1
    assert "nothing to resume" in one_error_line(r.stderr)
    r = _nft("train", "--out", str(tmp_path / "nothing"), "--resume", "--debug", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


# --------------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------------


def _error(capsys, argv, code):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == code
    return one_error_line(capsys.readouterr().err)


def test_argument_errors_in_process(capsys):
    assert "--epochs" in _error(capsys, ["train", "--epochs", "0"], 2)
    assert "--deltas" in _error(capsys, ["train", "--deltas", "0.1,x"], 2)
    assert "--dataset" in _error(capsys, ["train", "--dataset", "imagenet"], 2)
    assert "--device-model" in _error(capsys, ["train", "--device-model", "PCM9"], 2)
    assert "required" in _error(capsys, [], 2)
    assert "mnist" in _error(capsys, ["data", "fetch", "cifar10"], 2)
    # Errors found by TrainConfig (not by argparse) are one line too, exit status 1.
    assert cli.main(["train", "--method", "noise", "--beta", "0.1", "--out", "x"]) == 1
    assert "beta applies" in one_error_line(capsys.readouterr().err)


def test_help_and_version(capsys):
    for argv in (["--help"], ["train", "--help"], ["data", "fetch", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    assert "nft_cuda" in capsys.readouterr().out


def test_config_from_args_defaults_and_overrides():
    parser = cli.build_parser()
    config = cli.train_config_from_args(parser.parse_args(["train"]))
    assert config == TrainConfig()
    args = parser.parse_args(
        [
            "train",
            "--method",
            "ovf",
            "--sigma",
            "0.2",
            "--deltas",
            "0.3,0.2",
            "--beta",
            "0.01",
            "--device-model",
            "FeFET6",
            "--epochs",
            "4",
            "--optimizer",
            "sgd",
            "--seed",
            "7",
        ]
    )
    config = cli.train_config_from_args(args)
    assert (
        config.method,
        config.sigma,
        config.deltas,
        config.beta,
        config.device_model,
        config.epochs,
        config.optimizer,
        config.seed,
    ) == ("ovf", 0.2, (0.3, 0.2), 0.01, "FeFET6", 4, "sgd", 7)
    assert str(config.resolved_out()) == str(Path("runs") / "ovf-small-embedded-s0.2")


def test_train_and_resume_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "irs", "--epochs", "1", "--out", str(out), *TINY]) == 0
    stdout = capsys.readouterr().out
    assert "test acc clean" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method"] == "irs" and summary["epochs"] == 1
    # --resume needs only --out: the settings come from the checkpoint.
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    # A setting that contradicts the checkpoint is refused in one line.
    assert cli.main(["train", "--out", str(out), "--resume", "--sigma", "0.3"]) == 1
    assert "sigma" in one_error_line(capsys.readouterr().err)
    # Starting again in a used folder needs --overwrite.
    assert cli.main(["train", "--epochs", "1", "--out", str(out), *TINY]) == 1
    assert "--overwrite" in one_error_line(capsys.readouterr().err)


def test_data_fetch_calls_fetch(monkeypatch, tmp_path, capsys):
    import nft_cuda.data.fetch as fetch_module

    calls = []

    def fake_fetch(name, data_dir=None, quiet=False, *, force=False, offline=False):
        calls.append((name, data_dir, quiet, force, offline))
        return Path(data_dir) / name

    monkeypatch.setattr(fetch_module, "fetch", fake_fetch)
    assert cli.main(["data", "fetch", "mnist", "fashion-mnist", "--data-dir", str(tmp_path), "--offline"]) == 0
    assert calls == [("mnist", str(tmp_path), False, False, True), ("fashion-mnist", str(tmp_path), False, False, True)]
    assert str(tmp_path / "mnist") in capsys.readouterr().out

    def failing_fetch(name, data_dir=None, quiet=False, **kw):
        raise fetch_module.FetchError("could not fetch mnist file(s) x\ny")

    monkeypatch.setattr(fetch_module, "fetch", failing_fetch)
    assert cli.main(["data", "fetch", "mnist"]) == 1
    assert "could not fetch mnist" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["before-first-checkpoint", "after-a-checkpoint"])
def test_interrupted_train_gives_advice_that_works(checkpointed, tmp_path, monkeypatch, capsys):
    """Ctrl-C before the first checkpoint: no --resume advice (it would fail with "nothing to resume")."""
    import nft_cuda.train.trainer as trainer

    out = tmp_path / "int5"

    def interrupted(config, progress=True):
        out.mkdir(parents=True, exist_ok=True)
        if checkpointed:
            (out / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert cli.main(["train", "--method", "noise", "--epochs", "3", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    if checkpointed:
        assert err == f"nft: interrupted; continue with: nft train --out {out} --resume"
    else:
        assert "--resume" not in err and "nothing to resume" in err and "same command again" in err


def test_every_command_is_registered_directly_with_debug():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "data", "eval", "demo"} <= set(sub.choices)
    assert not hasattr(cli, "PLUGIN_MODULES")  # no import-by-name plugin list: eval's commands are wired in
    # --debug is available on eval's commands too.
    assert parser.parse_args(["eval", "model.pt", "--debug"]).debug is True
