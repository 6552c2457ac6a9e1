"""The fidelity study runner (studies/fidelity.py, docs/fidelity-study.md): resumable units appended to a
results file, the convergence criterion, the reading criteria and the tables, recomputed from a small
results file written here (and from the committed one when it exists)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from studies import fidelity

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "fidelity-study" / "results.jsonl"
CRITERION = {"min_clean_accuracy": 0.5, "max_class_share": 0.5}


def _tiny_config(tmp_path) -> dict:
    cfg = json.loads((REPO / "studies" / "fidelity.json").read_text())
    cfg.update(
        dataset="embedded",
        width=0.0625,
        epochs=1,
        batch_size=32,
        limit_train=64,
        test_images=48,
        runs=3,
        instances_per_pass=3,
        sigmas=[0.3, 0.2],
        seeds=[0],
        arms=["clean", "noise"],
        results=str(tmp_path / "results.jsonl"),
    )
    return cfg


def test_run_appends_units_and_resumes(tmp_path, one_thread):
    cfg = _tiny_config(tmp_path)
    logs: list[str] = []
    fidelity.run(cfg, tmp_path / "runs", log=logs.append, max_units=3)
    first = fidelity.load_results(cfg["results"])
    assert [u["key"] for u in first["units"]] == ["clean-s0.3-seed0", "noise-s0.3-seed0", "clean-s0.2-seed0"]
    # The clean model is trained once per seed and serves every σ_d.
    assert [u["training"]["reused"] for u in first["units"]] == [False, False, True]
    logs.clear()
    fidelity.run(cfg, tmp_path / "runs", log=logs.append)
    assert logs[0].startswith("3 of 4 units already in")
    done = fidelity.load_results(cfg["results"])["units"]
    assert [u["key"] for u in done] == [u["key"] for u in fidelity.plan(cfg)]
    for u in done:
        assert len(u["per_instance_accuracy"]) == 3 and u["num_inputs"] == 48
        assert sum(u["prediction_histogram"]) == 48
        assert u["cpu_s"] > 0 and u["eval_cpu_s"] > 0
        assert u["spec"]["init"] == "paper" and u["spec"]["preprocess"] == "paper"
        assert u["converged"] == fidelity.converged(u, CRITERION)
    # A torn last line (a kill mid-write) is dropped, the rest kept.
    with open(cfg["results"], "a") as f:
        f.write('{"key": "noise-s0.2')
    assert len(fidelity.load_results(cfg["results"])["units"]) == 4


def test_a_second_process_takes_other_sigmas_and_reuses_the_clean_model(tmp_path, one_thread):
    cfg = _tiny_config(tmp_path)
    assert [u["key"] for u in fidelity.select_units(fidelity.plan(cfg), cfg, [0.2])] == [
        "clean-s0.2-seed0",
        "noise-s0.2-seed0",
    ]
    with pytest.raises(ValueError, match=r"--sigmas \[0.25\] not in the config"):
        fidelity.select_units(fidelity.plan(cfg), cfg, [0.25])
    fidelity.run(cfg, tmp_path / "runs", log=lambda _: None, sigmas=[0.3])
    second = tmp_path / "second.jsonl"
    fidelity.run(cfg, tmp_path / "runs", results=second, log=lambda _: None, sigmas=[0.2])
    units = fidelity.load_results(second)["units"]
    assert [u["key"] for u in units] == ["clean-s0.2-seed0", "noise-s0.2-seed0"]
    assert [u["training"]["reused"] for u in units] == [True, False]  # the clean model of the first process
    merged = tmp_path / "merged.jsonl"
    merged.write_text(Path(cfg["results"]).read_text() + second.read_text())
    assert sorted(u["key"] for u in fidelity.load_results(merged)["units"]) == sorted(
        u["key"] for u in fidelity.plan(cfg)
    )


def test_a_second_process_can_take_whole_seeds():
    cfg = {"sigmas": [0.3, 0.2], "seeds": [0, 1, 2], "arms": ["clean", "noise"]}
    units = fidelity.plan(cfg)
    assert [u["key"] for u in fidelity.select_units(units, cfg, [0.3], [2])] == ["clean-s0.3-seed2", "noise-s0.3-seed2"]
    assert [u["key"] for u in fidelity.select_units(units, cfg, seeds=[0, 1])] == [
        f"{arm}-s{s:g}-seed{seed}" for s in (0.3, 0.2) for seed in (0, 1) for arm in ("clean", "noise")
    ]
    assert fidelity.select_units(units, cfg) == units
    with pytest.raises(ValueError, match=r"--seeds \[3\] not in the config's seeds"):
        fidelity.select_units(units, cfg, seeds=[3])
    args = fidelity._parser().parse_args(["run", "--sigmas", "0.3", "--seeds", "2"])
    assert (args.sigmas, args.seeds) == ([0.3], [2])


def test_convergence_criterion():
    good = {"clean_accuracy": 0.9, "prediction_histogram": [10] * 10}
    assert fidelity.converged(good, CRITERION)
    assert not fidelity.converged({**good, "clean_accuracy": 0.49}, CRITERION)
    one_class = {"clean_accuracy": 0.6, "prediction_histogram": [60, 40] + [0] * 8}
    assert not fidelity.converged(one_class, CRITERION)


def _unit(arm: str, sigma: float, seed: int, chips: list[float], clean: float = 0.95) -> dict:
    return {
        "key": fidelity.unit_key(arm, sigma, seed),
        "arm": arm,
        "sigma": sigma,
        "seed": seed,
        "training_name": f"{arm}-{sigma}-{seed}" if arm != "clean" else f"clean-{seed}",
        "training": {"cpu_s": 100.0, "reused": False},
        "runs": len(chips),
        "num_inputs": 10000,
        "per_instance_accuracy": chips,
        "clean_accuracy": clean,
        "prediction_histogram": [1000] * 10 if clean > 0.5 else [10000] + [0] * 9,
        "eval_cpu_s": 10.0,
    }


def _synthetic(levels: dict[str, float], seeds=(0, 1, 2), sigma=0.35) -> dict:
    cfg = json.loads((REPO / "studies" / "fidelity.json").read_text())
    units = []
    for seed in seeds:
        for arm, level in levels.items():
            chips = [level + 0.01 * ((r + seed) % 3 - 1) for r in range(4)]
            unit = _unit(arm, sigma, seed, chips, clean=0.95 if level >= 0.6 else 0.11)
            units.append({**unit, "spec": fidelity.unit_spec(cfg, unit)})
    return {"config": cfg, "units": units}


def test_readings_follow_the_written_criteria():
    paper_like = {"noise": 0.52, "noise-t4": 0.55, "ovf": 0.99, "ovf-bnmain": 0.985, "irs": 0.58}
    r = fidelity.readings(_synthetic(paper_like), 0.35)
    assert r["holds"] == ["confirms"] and r["bn"] == "BN statistics play no part" and r["seeds"] == 3
    temperature = {"noise": 0.80, "noise-t4": 0.88, "ovf": 0.89, "ovf-bnmain": 0.80, "irs": 0.85}
    r = fidelity.readings(_synthetic(temperature), 0.35)
    assert r["holds"] == ["temperature artefact"] and r["bn"] == "BN statistics of the oriented forwards help"
    same = {"noise": 0.12, "noise-t4": 0.12, "ovf": 0.13, "irs": 0.12}
    assert fidelity.readings(_synthetic(same), 0.35)["holds"] == ["refutes"]
    assert fidelity.readings(_synthetic(same, seeds=(0, 1)), 0.35)["holds"] == ["incomplete"]


def test_remaining_units_and_their_cost_come_from_the_recorded_ones(capsys, tmp_path):
    results = _synthetic({"clean": 0.3, "noise": 0.5, "ovf": 0.6}, seeds=(0,))
    results["units"][2]["training"]["cpu_s"] = 300.0  # ovf trains 3x as long; every evaluation 10 s
    cfg = {**results["config"], "arms": ["clean", "noise", "ovf"], "sigmas": [0.35, 0.25], "seeds": [0, 1]}
    todo, left = fidelity.remaining(cfg, results)
    assert len(todo) == 9 and todo[0]["key"] == "clean-s0.35-seed1"
    # σ 0.35 seed 1: 110 + 110 + 310; σ 0.25, seeds 0 and 1: the clean models exist (10 each) + 110 + 310.
    assert left == pytest.approx(530 + 430 + 430)
    assert fidelity.remaining({**cfg, "arms": ["clean", "irs"]}, results)[1] is None  # no IRS record yet
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"config": cfg}, *results["units"]]) + "\n")
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps(cfg))
    assert fidelity.main(["plan", "--config", str(conf), "--results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "clean-s0.35-seed0        done" in out and "ovf-s0.25-seed1          to do" in out
    assert "9 to do" in out and "about 0.4 CPU hours at the recorded units' cost" in out


def test_tables_are_recomputed_from_the_results():
    results = _synthetic(
        {"clean": 0.30, "noise": 0.52, "noise-t4": 0.55, "ovf": 0.99, "ovf-bnmain": 0.985, "irs": 0.58}
    )
    text = fidelity.render_tables(results)
    # OVF: chip offsets 0.01·((r + seed) % 3 − 1) sum to −1, 0, +1 (×0.01) over the 4 chips of seeds
    # 0, 1, 2 → chip means 98.75, 99.00, 99.25 %, their mean 99.00.
    assert "| OVF | 99.00 (98.8 / 99.0 / 99.2) |" in text
    # Paired OVF − noise: the chip offsets cancel, 47 pp exactly, CI 0.
    assert "| 0.35 | 0 | +47.00 ± 0.00 |" in text
    assert "| noise injection | 0/3 |" in text and "| OVF | 3/3 |" in text
    assert "| 0.35 | 3 | confirms | BN statistics play no part |" in text
    # Total CPU: 18 trainings × 100 s + 18 evaluations × 10 s (the clean model once per seed: 3 trainings).
    assert f"**{(18 * 100 + 18 * 10) / 3600:.2f} h**" in text


def test_paired_table_summarises_the_seeds_with_students_t():
    results = _synthetic({"noise": 0.52, "ovf": 0.99})
    for u in results["units"]:
        if u["arm"] == "ovf" and u["seed"] == 2:
            u["per_instance_accuracy"] = [v + 0.03 for v in u["per_instance_accuracy"]]
    text = fidelity.render_tables(results)
    # Per seed OVF − noise = 47, 47, 50 pp: mean 48, sd √3, t(2 df) 4.303 · √3 / √3 = 4.30.
    assert "| 0.35 | 2 | +50.00 ± 0.00 |" in text
    assert "| 0.35 | seeds | +48.00 ± 4.30 (n = 3) |" in text
    assert fidelity.across_seeds([1.0]) is None
    # Two seeds: sd √2, t(1 df) 12.706 · √2 / √2.
    assert fidelity.across_seeds([1.0, 3.0]) == pytest.approx((2.0, 12.706))


def test_report_command_rewrites_the_page_block(tmp_path):
    results = _synthetic({"noise": 0.52, "noise-t4": 0.55, "ovf": 0.99, "irs": 0.58})
    path = tmp_path / "results.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"config": results["config"]}) + "\n")
        for u in results["units"]:
            f.write(json.dumps(u) + "\n")
    with open(path, "a") as f:  # a unit of another config (here: other epochs) is superseded
        f.write(json.dumps({**results["units"][0], "key": "ovf-s0.3-seed0", "sigma": 0.3, "spec": {}}) + "\n")
    assert len(fidelity.load_results(path)["units"]) == len(results["units"])
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{fidelity.BEGIN}\nSTALE BLOCK\n{fidelity.END}\nend\n")
    assert fidelity.main(["report", "--results", str(path), "--doc", str(doc), "--plot", str(tmp_path / "p.png")]) == 0
    text = doc.read_text()
    assert "STALE BLOCK" not in text and "| 0.35 | 3 | confirms |" in text and (tmp_path / "p.png").stat().st_size > 0


def test_configs_are_valid_and_cover_the_design(tmp_path):
    cfg = fidelity.load_config(REPO / "studies" / "fidelity.json")
    assert cfg["init"] == cfg["preprocess"] == "paper" and cfg["runs"] == 100 and cfg["test_images"] is None
    assert len(cfg["seeds"]) >= 3 and sorted(cfg["sigmas"]) == [0.25, 0.3, 0.35]
    assert cfg["arms"] == ["clean", "noise", "noise-t4", "ovf", "ovf-bnmain", "irs"]
    units = fidelity.plan(cfg)
    assert len(units) == 54 and [u["key"] for u in units[:6]] == [f"{a}-s0.35-seed0" for a in cfg["arms"]]
    assert units[6]["key"] == "clean-s0.35-seed1" and units[18]["key"] == "clean-s0.3-seed0"
    gpu = fidelity.load_config(REPO / "studies" / "fidelity_gpu.json")
    assert (gpu["width"], gpu["epochs"], gpu["device"]) == (1.0, 200, "cuda")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cfg, "arms": ["nope"]}))
    with pytest.raises(ValueError, match="unknown arms"):
        fidelity.load_config(bad)


def test_committed_results_recompute_the_page():
    """The committed results (the study grows them unit by unit; rerun ``report`` after new units) give
    exactly the page's block, with the settings and compute of every unit recorded."""
    results = fidelity.load_results(COMMITTED)
    assert results["units"], "the committed results file holds no unit"
    cfg = results["config"]
    assert cfg["init"] == "paper" and cfg["preprocess"] == "paper"
    for u in results["units"]:
        assert u["runs"] == 100 and u["num_inputs"] == 10000 and u["cpu_s"] > 0
        assert u["spec"] == fidelity.unit_spec(cfg, u)
        assert math.isclose(u["training"]["cpu_s"] + u["eval_cpu_s"], u["cpu_s"])
    page = (REPO / "docs" / "fidelity-study.md").read_text()
    block = page.split(fidelity.BEGIN, 1)[1].split(fidelity.END, 1)[0]
    assert block.strip() == fidelity.render_tables(results).strip()


def test_committed_results_hold_the_whole_grid():
    """Issue 24's grid is complete in the committed results: every arm × σ_d × seed of the config (the
    six methods, σ_d 0.25 / 0.30 / 0.35, at least 3 seeds), each a record made with the config's settings."""
    results = fidelity.load_results(COMMITTED)
    cfg = results["config"]
    assert {"clean", "noise", "noise-t4", "ovf", "ovf-bnmain", "irs"} <= set(cfg["arms"])
    assert {0.25, 0.3, 0.35} <= {float(s) for s in cfg["sigmas"]} and len(cfg["seeds"]) >= 3
    missing = {u["key"] for u in fidelity.plan(cfg)} - {u["key"] for u in results["units"]}
    assert not missing, f"units missing from the committed results: {sorted(missing)}"
