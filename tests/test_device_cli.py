"""`nft train --device-model pcm` and `nft eval --time ...` end to end on the embedded data (tiny budgets,
in process: the same cli.main the `nft` script calls), their plot, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_error_line, require_optional

from nft_cuda import cli
from nft_cuda.devices import PCM, StuckAt


def _main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


_TINY = ("--epochs", "1", "--limit-train", "128", "--limit-eval", "64", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def pcm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcm")
    code = cli.main(["train", "--device-model", "PCM", "--sigma", "1.5", "--out", str(out), *_TINY])
    assert code == 0
    return out


def test_train_with_the_pcm_model_exports_it(pcm_run):
    payload = torch.load(pcm_run / "model.pt", weights_only=True)
    stored = payload["variation"]
    assert stored["kind"] == "pcm" and stored["sigma"] == 1.5 and stored["time"] == 0.0
    config = torch.load(pcm_run / "checkpoint.pt", weights_only=True)["config"]
    assert config["device_model"] == "pcm"


def test_train_takes_stuck_at_rates_and_mvm_flags(tmp_path, capsys):
    out = tmp_path / "stuck"
    argv = ["train", "--device-model", "stuck-at", "--sigma", "1", "--p0", "0.01", "--p1", "0.02"]
    code, _, err = _main(capsys, *argv, "--dac-bits", "6", "--read-noise", "0.01", "--out", str(out), *_TINY)
    assert code == 0, err
    from nft_cuda.devices import device_model_from_dict

    model = device_model_from_dict(torch.load(out / "model.pt", weights_only=True)["variation"])
    assert isinstance(model, StuckAt) and (model.p0, model.p1) == (0.01, 0.02)
    assert model.mvm.input_bits == 6 and model.mvm.read_noise == 0.01 and model.mvm.output_bits is None


def test_eval_time_sweep_with_and_without_drift_compensation_and_its_plot(pcm_run, tmp_path, capsys):
    require_optional("matplotlib")  # writes a plot
    j, c, p = tmp_path / "t.json", tmp_path / "t.csv", tmp_path / "t.png"
    times = "1,3600,3.15e7"
    argv = ["eval", str(pcm_run), "--sigma", "1", "--time", times, "--runs", "2", "--no-progress"]
    code, out, err = _main(capsys, *argv, "--json", str(j), "--csv", str(c), "--plot", str(p))
    assert code == 0, err
    results = json.loads(j.read_text())["results"]
    assert [r["time_s"] for r in results] == [1.0, 3600.0, 3.15e7]
    assert all(r["device_model"] == "pcm" and r["device"]["drift_compensation"] is False for r in results)
    assert results[0]["accuracy_mean"] != results[-1]["accuracy_mean"] or results[0]["ekl"] != results[-1]["ekl"]
    assert "| t (s) |" in out and "3.15e+07" in out
    header = c.read_text().splitlines()[0].split(",")
    assert "time_s" in header and "drift_compensation" in header
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = _main(capsys, *argv, "--drift-compensation", "--json", str(tmp_path / "dc.json"))
    assert code == 0, err
    compensated = json.loads((tmp_path / "dc.json").read_text())["results"]
    assert all(r["device"]["drift_compensation"] is True for r in compensated) and "(compensated, one-hot)" in out
    assert all(r["device"]["compensation_rule"] == "one-hot" for r in compensated)  # the default rule
    # the same chips, rescaled per layer: the outputs (here their mean confidence) change
    assert [r["confidence"] for r in compensated] != [r["confidence"] for r in results]


def test_eval_compensation_rule_option(pcm_run, tmp_path, capsys):
    argv = ["eval", str(pcm_run), "--sigma", "1", "--time", "3.15e7", "--runs", "2", "--no-progress",
            "--drift-compensation"]  # fmt: skip
    got = {}
    for rule in ("one-hot", "all-ones"):
        j, c = tmp_path / f"{rule}.json", tmp_path / f"{rule}.csv"
        code, out, err = _main(capsys, *argv, "--compensation-rule", rule, "--json", str(j), "--csv", str(c))
        assert code == 0, err
        (r,) = json.loads(j.read_text())["results"]
        assert r["device"]["drift_compensation"] is True and r["device"]["compensation_rule"] == rule
        assert f"(compensated, {rule})" in out
        header, row = c.read_text().splitlines()
        assert dict(zip(header.split(","), row.split(",")))["compensation_rule"] == rule
        got[rule] = r
    # the same chips (seed, programming and drift draws), two estimates of α: the outputs differ
    assert got["one-hot"]["confidence"] != got["all-ones"]["confidence"]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--compensation-rule", "ones"])
    assert exc.value.code == 2 and "invalid choice: 'ones'" in one_error_line(capsys.readouterr().err)
    code, _, err = _main(capsys, "eval", str(pcm_run), "--device-model", "lognormal", "--compensation-rule",
                         "all-ones", "--runs", "2", "--no-progress")  # fmt: skip
    assert code != 0 and "the lognormal device model has no setting compensation_rule" in one_error_line(err)
    code, _, err = _main(capsys, "eval", str(pcm_run), "--compensation-rule", "all-ones", "--runs", "2",
                         "--no-progress")  # fmt: skip
    assert code != 0 and "compensation_rule has no effect: the model does not compensate" in one_error_line(err)


def test_eval_of_a_gaussian_checkpoint_under_pcm(pcm_run, tmp_path, capsys):
    from nft_cuda.eval.run import eval_checkpoints

    report = eval_checkpoints([str(pcm_run)], [1.0], "pcm", runs=2, progress=False, device="cpu", times=[0.0, 86400.0])
    assert [r["time_s"] for r in report["results"]] == [0.0, 86400.0]
    assert PCM().at_time(86400.0).time == 86400.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--time", "1,-5"], "a time after programming must be a finite number >= 0 s, got -5"),
        (["--time", "1,1"], "time 1 listed twice"),
        (["--device-model", "pcn"], "unknown device_model 'pcn' (did you mean 'pcm'?)"),
        (["--dac-bits", "1"], "must be >= 2"),
        (["--read-noise", "-0.1"], "must be >= 0"),
    ],
)
def test_eval_device_arguments_fail_with_one_line(pcm_run, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", str(pcm_run), "--runs", "2", *args])
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert needle in line


def test_an_option_the_model_lacks_is_refused_naming_it(pcm_run, capsys):
    code, _, err = _main(capsys, "eval", str(pcm_run), "--device-model", "lognormal", "--drift-compensation",
                         "--runs", "2", "--no-progress")  # fmt: skip
    assert code != 0
    assert "drift_compensation applies to the PCM model, not 'lognormal'" in one_error_line(err)
    code, _, err = _main(capsys, "eval", str(pcm_run), "--p0", "0.1", "--runs", "2", "--no-progress")
    assert code != 0 and "the pcm device model has no setting p0" in one_error_line(err)
    with pytest.raises(SystemExit):
        cli.main(["train", "--device-model", "stuck-ta", *_TINY])
    assert "did you mean 'stuck-at'?" in one_error_line(capsys.readouterr().err)


def test_eval_without_sigma_uses_the_model_s_default_severity(pcm_run, tmp_path, capsys):
    """PCM's severity is a multiplier of the published noise: without --sigma, a PCM evaluation runs at 1.0,
    not at the σ_d sweep of the Gaussian presets (which stays their default)."""
    from nft_cuda.eval.cli import DEFAULT_SWEEP, parse_sigmas
    from nft_cuda.eval.run import DEFAULT_SIGMAS, default_sigmas

    j = tmp_path / "d.json"
    code, _, err = _main(capsys, "eval", str(pcm_run), "--runs", "2", "--no-progress", "--json", str(j))
    assert code == 0, err
    assert [r["sigma"] for r in json.loads(j.read_text())["results"]] == [1.0]
    assert parse_sigmas(DEFAULT_SWEEP) == list(DEFAULT_SIGMAS)
    from nft_cuda import Variation
    from nft_cuda.devices import LogNormal

    assert default_sigmas(Variation(0.3)) == default_sigmas(LogNormal(0.1)) == list(DEFAULT_SIGMAS)
    assert default_sigmas(StuckAt(p0=0.01)) == default_sigmas(PCM()) == [1.0]


def test_tiles_and_converters_train_and_evaluate_over_time_end_to_end(tmp_path, capsys):
    require_optional("matplotlib")  # writes a plot
    out = tmp_path / "tiled"
    hwa = ["--max-input-size", "64", "--max-output-size", "32", "--dac-bits", "8", "--adc-bits", "8"]
    hwa += ["--output-noise", "0.02", "--output-bound", "10"]
    code, _, err = _main(capsys, "train", "--device-model", "pcm", "--sigma", "1", *hwa, "--out", str(out), *_TINY)
    assert code == 0, err
    from nft_cuda.devices import MVM, Tiles, device_model_from_dict

    model = device_model_from_dict(torch.load(out / "model.pt", weights_only=True)["variation"])
    assert model.tiles == Tiles(max_input_size=64, max_output_size=32)
    assert model.mvm == MVM(input_bits=8, output_bits=8, output_noise=0.02, output_bound=10.0)
    j, p = tmp_path / "t.json", tmp_path / "t.png"
    argv = ["eval", str(out), "--sigma", "1", "--time", "1,3.15e7", "--drift-compensation", "--runs", "2"]
    code, _, err = _main(capsys, *argv, "--no-progress", "--json", str(j), "--plot", str(p))
    assert code == 0, err
    results = json.loads(j.read_text())["results"]
    assert [r["time_s"] for r in results] == [1.0, 3.15e7]
    assert all(
        r["device"]["tiles"] == model.tiles.to_dict() and r["device"]["mvm"] == model.mvm.to_dict() for r in results
    )
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        cli.main(["train", "--output-bound", "0", "--out", str(tmp_path / "bad"), *_TINY])
    assert "argument --output-bound: must be > 0, got 0" in capsys.readouterr().err


def test_eval_aihwkit_read_option(pcm_run, tmp_path, capsys):
    """--aihwkit-read: the PCM chips read with aihwkit's read step; at t = 0 it adds read noise, so the same
    chips give other outputs than the default read step, and the flag is recorded in the results."""
    argv = ["eval", str(pcm_run), "--sigma", "1", "--time", "0", "--runs", "2", "--no-progress"]
    got = {}
    for name, extra in (("library", ()), ("aihwkit", ("--aihwkit-read",))):
        j = tmp_path / f"{name}.json"
        code, _, err = _main(capsys, *argv, *extra, "--json", str(j))
        assert code == 0, err
        (got[name],) = json.loads(j.read_text())["results"]
    assert got["library"]["device"]["aihwkit_read"] is False and got["aihwkit"]["device"]["aihwkit_read"] is True
    assert got["library"]["confidence"] != got["aihwkit"]["confidence"]
