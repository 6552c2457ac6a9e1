"""The machinery of the resumable unit studies (studies/resumable.py), with stand-in units and trainings:
what is skipped, redone and reused, and what survives a kill. The studies that use it (fidelity, tails)
are run end to end in tests/test_fidelity_study.py and tests/test_reproduction.py."""

from __future__ import annotations

import json

import pytest

from studies import reproduce, resumable


def _spec(cfg: dict, unit: dict) -> dict:
    return {"lr": cfg["lr"], "arm": unit["arm"]}


def _units(*arms: str) -> list[dict]:
    return [{"key": f"{a}-k", "arm": a} for a in arms]


def _run(cfg, units, path, made: list, **kw):
    def do_unit(unit, shared):
        made.append(unit["key"])
        return {"key": unit["key"], "arm": unit["arm"], "spec": _spec(cfg, unit), "value": len(made)}

    logs: list[str] = []
    out = resumable.run_units(
        cfg, units, path, spec_of=_spec, do_unit=do_unit, describe=lambda r: f"v={r['value']}", log=logs.append, **kw
    )
    return out, logs


def test_units_are_appended_skipped_on_rerun_and_redone_when_their_spec_changes(tmp_path):
    path, cfg, made = tmp_path / "r.jsonl", {"lr": 1e-3}, []
    out, logs = _run(cfg, _units("a", "b", "c"), path, made, max_units=2)
    assert made == ["a-k", "b-k"] and [u["key"] for u in out["units"]] == ["a-k", "b-k"]
    assert logs[0] == f"0 of 3 units already in {path}; 3 to do" and logs[2] == "    v=1"
    out, logs = _run(cfg, _units("a", "b", "c"), path, made)
    assert made == ["a-k", "b-k", "c-k"] and logs[0].startswith("2 of 3 units already")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [("config" in rec) for rec in lines] == [True, False, False, True, False]  # one config line per run
    assert lines[0]["config"] == cfg and "environment" in lines[0] and out["environment"] == lines[3]["environment"]
    # Another lr changes every spec: the old records are superseded and every unit is redone.
    out, _ = _run({"lr": 2e-3}, _units("a", "b", "c"), path, made)
    assert made[3:] == ["a-k", "b-k", "c-k"] and [u["value"] for u in out["units"]] == [4, 5, 6]


def test_a_torn_last_line_is_dropped_and_a_missing_file_has_no_units(tmp_path):
    path, cfg = tmp_path / "r.jsonl", {"lr": 1e-3}
    assert resumable.load_results(path, _spec) == {"config": None, "environment": None, "units": []}
    _run(cfg, _units("a", "b"), path, [])
    with open(path, "a") as f:
        f.write('{"key": "c-k", "spec"')  # killed mid-write
    assert [u["key"] for u in resumable.load_results(path, _spec)["units"]] == ["a-k", "b-k"]


def test_a_recorded_training_is_reused_only_with_its_model_and_its_spec(tmp_path, monkeypatch):
    calls: list[str] = []

    def fake_train(cfg, item, out, progress):
        calls.append(item["name"])
        (out / "train" / item["name"]).mkdir(parents=True, exist_ok=True)
        return {"model_path": "m.pt", "n": len(calls)}

    monkeypatch.setattr(reproduce, "train_one", fake_train)
    item, spec = {"name": "t"}, {"lr": 1e-3}
    first, reused = resumable.train_or_reuse({}, item, spec, tmp_path, "rec.json", False, shared := {})
    assert (first["n"], reused) == (1, False) and json.loads((tmp_path / "train/t/rec.json").read_text())[
        "spec"
    ] == spec
    assert resumable.train_or_reuse({}, item, spec, tmp_path, "rec.json", False, shared) == (first, True)
    # A new process (empty shared): the record alone is not enough, the exported model must be there too.
    assert resumable.train_or_reuse({}, item, spec, tmp_path, "rec.json", False, {})[1] is False
    from nft_cuda.io import MODEL_FILE

    (tmp_path / "train" / "t" / MODEL_FILE).write_bytes(b"")
    again, reused = resumable.train_or_reuse({}, item, spec, tmp_path, "rec.json", False, {})
    assert (again["n"], reused) == (2, True)  # the record the retraining wrote
    # Other settings retrain.
    assert resumable.train_or_reuse({}, item, {"lr": 2e-3}, tmp_path, "rec.json", False, {})[0]["n"] == 3
    assert calls == ["t", "t", "t"]


@pytest.mark.parametrize(
    ("bad", "what"),
    [({"runs": 1}, "runs must be an int >= 2"), ({"sigmas": [0.3, 0]}, "sigmas must be positive"), ({}, "missing")],
)
def test_config_checks_name_the_bad_entry(bad, what):
    cfg = {"sigmas": [0.3], "runs": 100} | bad
    required = ("sigmas", "runs", "lr") if not bad else ("sigmas", "runs")
    with pytest.raises(ValueError, match=what):
        resumable.check_config("c.json", cfg, required)
    resumable.check_config("c.json", {"sigmas": [0.3], "runs": 2}, ("sigmas", "runs"))
