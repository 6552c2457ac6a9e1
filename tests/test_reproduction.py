"""The reproduction study (studies/reproduce.py, docs/reproduction.md).

The committed tables must be exactly what ``report`` recomputes from the committed JSON, and the
JSON's own aggregates must agree with its per-instance accuracies. The study machinery runs end to end
on a micro config (small model, embedded data, a few chips) and resumes without redoing work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import require_optional

ROOT = Path(__file__).resolve().parent.parent
#: The committed studies run by studies/reproduce.py: their configs (which name their doc and results).
STUDIES = [ROOT / "studies" / "reproduction.json", ROOT / "studies" / "vit.json"]


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from studies import reproduce

    return reproduce


def _micro_config(**over) -> dict:
    cfg = {
        "model": "small",
        "width": 0.5,
        "epochs": 1,
        "batch_size": 64,
        "lr": 1e-3,
        "limit_train": 192,
        "test_images": 48,
        "runs": 3,
        "instances_per_pass": 2,
        "eval_seed": 5,
        "device": "cpu",
        "clean_seed": 0,
        "groups": [
            {
                "name": "sweep",
                "datasets": ["embedded"],
                "sigmas": [0.2, 0.3],
                "device_model": "RRAM1",
                "methods": ["noise", "ovf", "irs"],
                "seeds": [0],
            },
            {
                "name": "preset",
                "datasets": ["embedded"],
                "sigmas": [0.3],
                "device_model": "FeFET2",
                "methods": ["noise"],
                "seeds": [0],
            },
            {
                "name": "seed",
                "datasets": ["embedded"],
                "sigmas": [0.3],
                "device_model": "RRAM1",
                "methods": ["noise"],
                "seeds": [1],
            },
        ],
    }
    cfg.update(over)
    return cfg


def _committed(study, config: Path) -> tuple[dict, Path]:
    """(results, doc path) of a committed study; its results were made with the committed config."""
    paths = study.report_paths(study.load_config(config))
    results = json.loads((ROOT / paths["results"]).read_text())
    assert results["config"] == study.load_config(config), f"{paths['results']} was not made with {config.name}"
    return results, ROOT / paths["doc"]


@pytest.mark.parametrize("config", STUDIES, ids=lambda p: p.stem)
def test_committed_tables_recompute_from_committed_json(study, config):
    results, doc = _committed(study, config)
    text = doc.read_text()
    block = text.split(study.BEGIN, 1)[1].split(study.END, 1)[0]
    assert block.strip() == study.render_tables(results).strip(), (
        f"{doc.name} is stale: run `python -m studies.reproduce report --results {study.report_paths(results['config'])['results']}`"
    )


@pytest.mark.parametrize("config", STUDIES, ids=lambda p: p.stem)
def test_committed_json_is_consistent(study, config):
    results, _ = _committed(study, config)
    cfg = results["config"]
    trainings, evals = study.plan(cfg)
    assert sorted(t["name"] for t in results["trainings"]) == sorted(t["name"] for t in trainings)
    assert sorted(p["name"] for p in results["evaluations"]) == sorted(e["name"] for e in evals)
    for p in results["evaluations"]:
        per = p["per_instance_accuracy"]
        assert len(per) == p["runs"] >= 100
        mean = math.fsum(per) / len(per)
        std = math.sqrt(math.fsum((a - mean) ** 2 for a in per) / (len(per) - 1))
        assert p["accuracy_mean"] == pytest.approx(mean, abs=1e-12)
        assert p["ci95"] == pytest.approx(1.96 * std / math.sqrt(len(per)), abs=1e-12)
        if p["method"] != "clean":  # each noise-trained model is tested at its own σ_d and preset
            assert (p["sigma"], p["device_model"]) == (p["train_sigma"], p["train_device_model"])
    # the measured run fits the stated budget
    assert results["time_s"]["total"] <= 60 * cfg.get("budget_minutes", 60)


def test_committed_config_plan(study):
    cfg = study.load_config(ROOT / "studies" / "reproduction.json")
    trainings, evals = study.plan(cfg)
    sigmas = {t["sigma"] for t in trainings if t["method"] != "clean"}
    assert len(sigmas) <= 3
    assert {t["device_model"] for t in trainings} == {"RRAM1", "FeFET2"}
    assert {t["seed"] for t in trainings} == {0, 1}
    assert {t["dataset"] for t in trainings} == {"mnist", "fashion-mnist"}
    assert cfg["runs"] >= 100
    clean = [t for t in trainings if t["method"] == "clean"]
    assert len(clean) == 2 and trainings[:2] == clean
    # the clean model of each dataset is swept over every (σ_d, preset) of its dataset
    for c in clean:
        points = {(e["sigma"], e["device_model"]) for e in evals if e["model"] == c["name"]}
        want = {
            (t["sigma"], t["device_model"])
            for t in trainings
            if t["method"] != "clean" and t["dataset"] == c["dataset"]
        }
        assert points == want
    study.load_config(ROOT / "studies" / "full_scale.json")  # the GPU config is valid too


def test_vit_study_config_plan(study):
    """The ViT study: clean / noise / OVF / IRS at two σ_d (RRAM1), 100 chips each, ≤ 20 minutes."""
    cfg = study.load_config(ROOT / "studies" / "vit.json")
    trainings, evals = study.plan(cfg)
    assert {t["model"] for t in trainings} == {"vit"} and {t["dataset"] for t in trainings} == {"fashion-mnist"}
    assert [t["method"] for t in trainings] == ["clean"] + ["noise", "ovf", "irs"] * 2
    assert len({t["sigma"] for t in trainings if t["method"] != "clean"}) == 2
    assert {e["device_model"] for e in evals} == {"RRAM1"} and len(evals) == 8
    assert cfg["runs"] >= 100 and cfg["budget_minutes"] <= 20
    assert study.report_paths(cfg)["doc"] == "docs/vit-study.md"


def test_micro_study_runs_reports_and_resumes(study, tmp_path, monkeypatch):
    require_optional("matplotlib")  # writes a plot
    cfg = _micro_config()
    lines = []
    results = study.run(cfg, tmp_path / "out", progress=False, log=lines.append)
    assert len(results["trainings"]) == 9 and len(results["evaluations"]) == 11
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["evaluations"] == json.loads(json.dumps(results["evaluations"]))
    for p in results["evaluations"]:
        assert len(p["per_instance_accuracy"]) == 3 and p["num_inputs"] == 48
    # every item records the CPU time of the run's process beside its wall time
    assert all(t["cpu_s"] > 0 for t in results["trainings"])
    assert 0 < results["time_s"]["cpu"] and "CPU time of the run's process" in study.render_tables(results)

    # the report fills the marked block of a doc, recomputed from the results alone
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n{study.BEGIN}\nold\n{study.END}\nafter\n")
    study.update_doc(doc, on_disk)
    text = doc.read_text()
    assert "old" not in text and text.endswith("after\n") and "| noise injection |" in text
    study.plot(on_disk, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000

    # a second run redoes nothing; a changed evaluation setting redoes only the evaluations
    def no_training(*a, **k):
        raise AssertionError("retrained a finished model")

    monkeypatch.setattr(study, "_train_one", no_training)
    again = study.run(cfg, tmp_path / "out", progress=False, log=lines.append)
    assert again["evaluations"] == results["evaluations"]
    more = study.run(_micro_config(runs=4), tmp_path / "out", progress=False, log=lines.append)
    assert all(len(p["per_instance_accuracy"]) == 4 for p in more["evaluations"])


def test_training_continues_the_checkpoint_a_killed_process_left(study, tmp_path, one_thread):
    """A study training killed mid-run resumes from its checkpoint (same weights as an uninterrupted
    one, the earlier epochs' CPU time counted); a checkpoint made with other settings is replaced."""
    import torch

    from nft_cuda.io import safe_load
    from nft_cuda.train.trainer import train

    cfg = _micro_config()
    item = {
        "name": "t",
        "model": "small",
        "dataset": "embedded",
        "method": "noise",
        "sigma": 0.3,
        "device_model": "RRAM1",
        "epochs": 2,
        "batch_size": 64,
        "lr": 1e-3,
        "width": 0.5,
        "seed": 0,
    }
    whole = study.train_one(cfg, item, tmp_path / "whole", False)
    assert whole["resumed_from"] is None and whole["cpu_s_earlier"] == 0

    killed = study._train_config(cfg, item, tmp_path / "cut" / "train" / "t")
    assert train(killed, progress=False, log=None, stop_after=1)["stopped"]
    cut = study.with_cpu_time(study.train_one, cfg, item, tmp_path / "cut", False)
    assert cut["resumed_from"] == 1 and 0 < cut["cpu_s_earlier"] < cut["cpu_s"]
    weights = [safe_load(Path(r["model_path"]))["state_dict"] for r in (whole, cut)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    other = study._train_config(cfg, item | {"lr": 5e-4}, tmp_path / "other" / "train" / "t")
    train(other, progress=False, log=None, stop_after=1)
    assert study.train_one(cfg, item, tmp_path / "other", False)["resumed_from"] is None


def test_config_and_doc_errors(study, tmp_path, capsys):
    bad = _micro_config()
    del bad["groups"][0]["sigmas"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"groups\[0\] lacks 'sigmas'"):
        study.load_config(path)
    path.write_text(json.dumps(_micro_config(runs=1)))
    with pytest.raises(ValueError, match="runs must be"):
        study.load_config(path)
    bad = _micro_config()
    bad["groups"][0]["methods"] = ["clean"]
    path.write_text(json.dumps(bad))
    assert study.main(["plan", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "unknown methods" in err and len(err.strip().splitlines()) == 1
    path.write_text(json.dumps(_micro_config(model="transformer")))
    with pytest.raises(ValueError, match="unknown model 'transformer'; choose one of"):
        study.load_config(path)
    path.write_text(json.dumps(_micro_config(report={"table": "x.md"})))
    with pytest.raises(ValueError, match=r"'report' has unknown entries \['table'\]"):
        study.load_config(path)
    doc = tmp_path / "doc.md"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="study:begin"):
        study.update_doc(doc, {})


# --------------------------------------------------------------------------------------------------
# The PCM time study (studies/pcm_time.py, docs/pcm-study.md): the same runner with a time axis
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def pcm_study(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from studies import pcm_time

    return pcm_time


def _pcm_group(**over) -> dict:
    group = {"name": "pcm", "datasets": ["embedded"], "sigmas": [1.0], "device_model": "pcm",
             "methods": ["noise"], "seeds": [0], "times": [1, 3.15e7], "drift_compensation": [False, True]}  # fmt: skip
    group.update(over)
    return group


def test_pcm_time_config_plan_and_errors(study, tmp_path):
    cfg = study.load_config(ROOT / "studies" / "pcm_time.json")
    trainings, evals = study.plan(cfg)
    assert [t["method"] for t in trainings] == ["clean", "noise", "ovf", "irs"]
    assert {t["device_model"] for t in trainings if t["method"] != "clean"} == {"pcm"}
    times = {(e["time_s"], e["drift_compensation"]) for e in evals}
    assert {t for t, _ in times} == {1.0, 3600.0, 86400.0, 2.6e6, 3.15e7} and len(evals) == 4 * 5 * 2
    # the committed study was made with the all-ones compensation rule, and its config pins it
    assert {e.get("compensation_rule") for e in evals if e["drift_compensation"]} == {"all-ones"}
    assert all("compensation_rule" not in e for e in evals if not e["drift_compensation"])
    # untiled: no tiles in any item, so the records of the committed run still match their specs
    assert all("tiles" not in e for e in evals) and all("device_options" not in t for t in trainings)
    path = tmp_path / "bad.json"
    for bad, needle in (({"times": [-1]}, "times must be"), ({"drift_compensation": [1]}, "drift_compensation"),
                        ({"compensation_rule": "ones"}, "compensation_rule must be one of 'one-hot', 'all-ones'"),
                        ({"times": None, "drift_compensation": None, "compensation_rule": "all-ones"}, "compensation_rule must be"),
                        ({"tiles": 512}, r"groups\[0\] tiles: a Tiles dict must be a dict"),
                        ({"tiles": {"max_input": 512}}, r"groups\[0\] tiles: unknown Tiles field\(s\) max_input"),
                        ({"tiles": {"max_input_size": 0}}, r"groups\[0\] tiles: max_input_size must be >= 1"),
                        ({"tiles": {"max_output_size": 1.5}}, "max_output_size must be an int"),
                        ({"tiles": {}}, "tiles must set max_input_size, max_output_size or per_channel")):  # fmt: skip
        path.write_text(json.dumps(_micro_config(groups=[_pcm_group(**bad)])))
        with pytest.raises(ValueError, match=needle):
            study.load_config(path)


def test_pcm_tiles_config_plan(study):
    """The re-run study: the committed config with the one-hot rule and 512 × 512 tiles in training and
    evaluation, the same models, seed, chips and times otherwise."""
    old = study.load_config(ROOT / "studies" / "pcm_time.json")
    cfg = study.load_config(ROOT / "studies" / "pcm_time_tiles.json")
    same = (
        "model",
        "width",
        "epochs",
        "batch_size",
        "lr",
        "limit_train",
        "test_images",
        "runs",
        "eval_seed",
        "clean_seed",
    )
    assert {k: cfg[k] for k in same} == {k: old[k] for k in same}
    (g, control_group), (g0,) = cfg["groups"], old["groups"]
    assert {k: g[k] for k in ("datasets", "sigmas", "methods", "seeds", "times", "drift_compensation")} == {
        k: g0[k] for k in ("datasets", "sigmas", "methods", "seeds", "times", "drift_compensation")
    }
    assert (g["compensation_rule"], g["tiles"]) == ("one-hot", {"max_input_size": 512, "max_output_size": 512})
    assert control_group["methods"] == [] and "tiles" not in control_group
    trainings, evals = study.plan(cfg)
    tiles = {"max_input_size": 512, "max_output_size": 512, "per_channel": False}
    assert trainings[0]["name"] == "vgg8-mnist-clean-seed0" and "device_options" not in trainings[0]
    assert all(t["device_options"] == {"tiles": tiles} and t["name"].endswith("-tiles512x512") for t in trainings[1:])
    tiled = [e for e in evals if "tiles" in e]
    assert len(tiled) == 4 * 5 * 2 and all(e["tiles"] == tiles and "-tiles512x512" in e["name"] for e in tiled)
    # the control: the same clean model untiled with the same rule, at every time (no training of its own)
    control = [e for e in evals if "tiles" not in e]
    assert len(control) == 5 * 2 and {e["model"] for e in control} == {"vgg8-mnist-clean-seed0"}
    assert {e["compensation_rule"] for e in evals if e["drift_compensation"]} == {"one-hot"}


def test_pcm_study_tiles_split_the_layers_the_page_names():
    """docs/pcm-study.md: at 512 × 512 only block6 (576 inputs) and classifier.1 (1024) of the MNIST VGG-8
    at width 0.125 (MNIST is fed as 32 × 32, as the study's models are built) span two input tiles; at
    256 × 256 four layers would."""
    import math

    from nft_cuda.devices import Tiles
    from nft_cuda.models import build_model

    model = build_model("vgg8", in_channels=1, num_classes=10, input_size=32, width=0.125)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() >= 2}
    split = {
        a: {n: Tiles(a, a).count(s) for n, s in shapes.items() if Tiles(a, a).count(s) != (1, 1)} for a in (512, 256)
    }
    assert split[512] == {"block6.0.weight": (1, 2), "classifier.1.weight": (1, 2)}
    assert (math.prod(shapes["block6.0.weight"][1:]), math.prod(shapes["classifier.1.weight"][1:])) == (576, 1024)
    assert set(split[256]) == {"block4.0.weight", "block5.0.weight", "block6.0.weight", "classifier.1.weight"}
    assert max(s[0] for s in shapes.values()) <= 512  # no output split at 512


def test_pcm_micro_study_runs_and_reports(study, pcm_study, tmp_path):
    require_optional("matplotlib")  # writes a plot
    cfg = _micro_config(groups=[_pcm_group()])
    results = study.run(cfg, tmp_path / "out", progress=False, log=lambda *a: None)
    points = results["evaluations"]
    assert len(points) == 2 * 2 * 2  # clean and noise × 2 times × with/without compensation
    assert {(p["time_after_programming_s"], p["drift_compensation"]) for p in points} == {
        (1.0, False), (3.15e7, False), (1.0, True), (3.15e7, True)
    }  # fmt: skip
    assert all(p["device_model"] == "pcm" and len(p["per_instance_accuracy"]) == 3 for p in points)
    # a group without compensation_rule compensates with the PCM default; the rule reaches the chips
    assert {p["compensation_rule"] for p in points if p["drift_compensation"]} == {"one-hot"}
    assert {p["compensation_rule"] for p in points if not p["drift_compensation"]} == {None}
    other = study.run(_micro_config(groups=[_pcm_group(compensation_rule="all-ones")]), tmp_path / "all-ones",
                      progress=False, log=lambda *a: None)["evaluations"]  # fmt: skip
    by_name = {p["name"]: p for p in points}
    assert {p["compensation_rule"] for p in other if p["drift_compensation"]} == {"all-ones"}
    for p in other:  # the same chips: equal without compensation, another α with it (1 year)
        if not p["drift_compensation"]:
            assert (p["per_instance_accuracy"], p["ekl"]) == (by_name[p["name"]]["per_instance_accuracy"],
                                                             by_name[p["name"]]["ekl"])  # fmt: skip
        elif p["time_after_programming_s"] > 3e7:
            assert p["ekl"] != by_name[p["name"]]["ekl"]
    doc = tmp_path / "doc.md"
    doc.write_text(f"# PCM\n{pcm_study.BEGIN}\nold\n{pcm_study.END}\n")
    assert pcm_study.main(["report", "--results", str(tmp_path / "out" / "results.json"), "--doc", str(doc),
                           "--plot", str(tmp_path / "t.png")]) == 0  # fmt: skip
    text = doc.read_text()
    assert (
        "old" not in text and "with global drift compensation (one-hot rule)" in text and "| noise injection |" in text
    )
    assert "1 year" in text and (tmp_path / "t.png").stat().st_size > 1000


def test_pcm_micro_study_with_tiles(study, pcm_study, tmp_path, one_thread):
    """A tiled group: its models train under the tiles, its rows carry them, and on the same chips the
    same clean model reads differently tiled (per-tile conductance scales); beside an untiled group in
    one config nothing collides."""
    require_optional("matplotlib")  # writes a plot
    tiles = {"max_input_size": 64, "max_output_size": 64}  # splits 3 of the small model's 5 layers
    quiet = dict(progress=False, log=lambda *a: None)
    untiled = study.run(_micro_config(groups=[_pcm_group()]), tmp_path / "untiled", **quiet)
    control = _pcm_group(name="control", methods=[])  # the clean model untiled on the same chips
    tiled = study.run(_micro_config(groups=[_pcm_group(tiles=tiles), control]), tmp_path / "tiled", **quiet)
    full = {**tiles, "per_channel": False}
    rows = {p["name"]: p for p in tiled["evaluations"]}
    assert all(p["tiles"] == full for n, p in rows.items() if "-tiles64x64" in n)
    assert all("tiles" not in p for p in untiled["evaluations"])
    for p in untiled["evaluations"]:  # the control is the untiled evaluation of the same clean model
        if p["method"] == "clean":
            assert "tiles" not in rows[p["name"]] and rows[p["name"]]["ekl"] == p["ekl"]
    noise = next(t for t in tiled["trainings"] if t["method"] == "noise")
    assert noise["device_options"] == {"tiles": full}
    summary = json.loads((tmp_path / "tiled" / "train" / noise["name"] / "summary.json").read_text())
    assert summary["config"]["device_options"] == {"tiles": full}  # trained under the tiles
    clean = {p["name"].replace("-tiles64x64", ""): p for n, p in rows.items() if "-tiles64x64@" in n}
    for p in untiled["evaluations"]:
        if p["method"] == "clean":  # the same model and chips, other per-tile scales
            assert p["ekl"] != clean[p["name"]]["ekl"]
    text = pcm_study.render_comparison(untiled, tiled)
    assert "one-hot, untiled study → the one-hot, tiles 64×64 study" in text and text.count("| clean |") == 2
    # the clean model's change split by the control: retraining (here none: +0.00 ± 0.00) and tiles
    assert "| retrained model (no α): control − old | without | +0.00 ± 0.00 | +0.00 ± 0.00 |" in text
    assert text.count("| tiles: new − control (same model) |") == 2
    assert "| clean, untiled (control) |" in pcm_study.render_tables(tiled)
    begin, end = pcm_study.markers("pcm-study-tiles")
    doc = tmp_path / "doc.md"
    doc.write_text(f"# PCM\n{begin}\nold\n{end}\n")
    assert pcm_study.main(["report", "--results", str(tmp_path / "tiled" / "results.json"), "--doc", str(doc),
                           "--plot", str(tmp_path / "t.png"), "--block", "pcm-study-tiles"]) == 0  # fmt: skip
    assert "old" not in doc.read_text() and "crossbar tiles of at most 64 inputs × 64 outputs" in doc.read_text()
    both = _micro_config(groups=[_pcm_group(), _pcm_group(name="tiled", tiles=tiles)])
    trainings, evals = study.plan(both)
    assert [t["method"] for t in trainings].count("clean") == 1 and len(trainings) == 3
    assert len({e["name"] for e in evals}) == len(evals) == 2 * 2 * 2 * 2


@pytest.mark.parametrize("block", ["pcm-study", "pcm-study-tiles"])
def test_committed_pcm_study_recomputes_from_its_json(study, pcm_study, block):
    _, config, results_path, _ = next(s for s in pcm_study.STUDIES if s[0] == block)
    results = json.loads((ROOT / results_path).read_text())
    text = (ROOT / "docs" / "pcm-study.md").read_text()
    begin, end = pcm_study.markers(block)
    block_text = text.split(begin, 1)[1].split(end, 1)[0]
    assert block_text.strip() == pcm_study.render_tables(results).strip(), (
        "docs/pcm-study.md is stale: run `python -m studies.pcm_time report`"
    )
    trainings, evals = study.plan(results["config"])
    assert sorted(p["name"] for p in results["evaluations"]) == sorted(e["name"] for e in evals)
    for p in results["evaluations"]:
        mean, ci = study.mean_ci(p["per_instance_accuracy"])
        assert (
            100 * p["accuracy_mean"] == pytest.approx(mean, abs=1e-9) and len(p["per_instance_accuracy"]) == p["runs"]
        )
    # made with exactly the committed config, 100 chips per point, and the measured run fits its budget:
    # 20 minutes for the untiled study (run on a quiet machine), the config's budget_minutes for the tiled one
    assert results["config"] == json.loads(config.read_text())
    assert results["config"]["runs"] >= 100
    budget = 20 if block == "pcm-study" else results["config"]["budget_minutes"]
    assert results["time_s"]["total"] <= budget * 60
    tiles = results["config"]["groups"][0].get("tiles")
    tiled = [p for p in results["evaluations"] if "-tiles" in p["name"]]
    assert all(p["tiles"] == {**tiles, "per_channel": False} for p in tiled) if tiles else tiled == []
    assert all("tiles" not in p for p in results["evaluations"] if "-tiles" not in p["name"])


def test_committed_pcm_studies_comparison_recomputes(pcm_study):
    old, new = (json.loads((ROOT / s[2]).read_text()) for s in pcm_study.STUDIES)
    text = (ROOT / "docs" / "pcm-study.md").read_text()
    begin, end = pcm_study.markers(pcm_study.COMPARE)
    assert text.split(begin, 1)[1].split(end, 1)[0].strip() == pcm_study.render_comparison(old, new).strip()
    # the same chips: every point of both studies was drawn with the same seed on as many chips
    assert {(p["eval_seed"], p["runs"], p["num_inputs"]) for p in old["evaluations"] + new["evaluations"]} == {
        (old["config"]["eval_seed"], 100, 1000)
    }


# --------------------------------------------------------------------------------------------------
# The tail study (studies/tails.py, docs/tail-study.md): units of studies/resumable.py, JSON lines appended
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tail_study(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from studies import tails

    return tails


def _tail_micro_config(tmp_path, **over) -> dict:
    cfg = json.loads((ROOT / "studies" / "tails.json").read_text())
    cfg.update(
        models={"small": {"width": 0.25}},
        dataset="embedded",
        sigmas=[0.2],
        methods=["kd", "clean", "noise"],  # plan order puts clean (the teacher) first
        limit_train=64,
        test_images=24,
        eval_batch_size=12,
        runs=3,
        calibration_batch_size=8,
        worst_case_steps=2,
        results=str(tmp_path / "results.jsonl"),
    )
    cfg.update(over)
    return cfg


def test_tail_study_config_plan_and_errors(tail_study, tmp_path):
    cfg = tail_study.load_config(ROOT / "studies" / "tails.json")
    units = tail_study.plan(cfg)
    assert len(units) == len(cfg["models"]) * len(cfg["sigmas"]) * len(cfg["methods"]) == 28
    assert {u["method"] for u in units} == set(tail_study.METHODS)
    for model in cfg["models"]:
        for sigma in cfg["sigmas"]:
            order = [u["method"] for u in units if u["model"] == model and u["sigma"] == sigma]
            assert order.index("clean") < order.index("kd")  # the teacher is trained first
    assert cfg["runs"] >= 100 and [0, False] in cfg["settings"]
    assert {f for f, _ in cfg["settings"]} == {0, 0.01, 0.05} and {r for _, r in cfg["settings"]} == {False, True}
    assert [tail_study.setting_key(f, r) for f, r in cfg["settings"]] == ["p0", "p1", "p5", "p0+bn"]
    for bad, what in [
        ({"methods": ["noise", "dropout"]}, "unknown methods"),
        ({"methods": ["noise", "kd"]}, "need 'clean'"),
        ({"sigmas": [0.2, 0.0]}, "sigmas"),
        ({"runs": 1}, "runs"),
        ({"kappas": [-1]}, "kappas"),
        ({"settings": [[0.01, False]]}, r"\[0, false\]"),
        ({"settings": [[0, False], [2, True]]}, "verify fraction"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=what):
            tail_study.load_config(path)
    del cfg["kappas"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing config entries"):
        tail_study.load_config(path)


def test_tail_study_micro_runs_resumes_and_reports(tail_study, tmp_path, one_thread):
    cfg = _tail_micro_config(tmp_path)
    out = tmp_path / "out"
    first = tail_study.run(cfg, out, log=lambda m: None, max_units=2)
    assert sorted(u["method"] for u in first["units"]) == ["clean", "noise"]
    done = tail_study.run(cfg, out, log=lambda m: None)  # resumes: only kd is left
    assert sorted(u["method"] for u in done["units"]) == ["clean", "kd", "noise"]
    lines = [json.loads(line) for line in Path(cfg["results"]).read_text().splitlines()]
    assert sum("key" in rec for rec in lines) == 3  # nothing redone
    kd = next(u for u in done["units"] if u["method"] == "kd")
    summary = json.loads((out / "train" / "small-kd-s0.2" / "summary.json").read_text())
    assert summary["config"]["teacher"] == str(out / "train" / "small-clean")
    for u in done["units"]:
        assert set(u["settings"]) == {"p0", "p1", "p5", "p0+bn"}
        assert all(len(s["per_instance_accuracy"]) == 3 for s in u["settings"].values())
        assert [w["kappa"] for w in u["worst_case"]] == cfg["kappas"]
        assert all(w["max_abs_z"] <= w["kappa"] + 1e-6 for w in u["worst_case"])
    assert kd["training"]["reused"] is False
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Tails\n{tail_study.BEGIN}\nold\n{tail_study.END}\n")
    assert tail_study.main(["report", "--results", cfg["results"], "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "| KD (clean teacher) |" in text and "Which method wins which metric" in text


def _unit(method: str, chips: list[float]) -> dict:
    return {"method": method, "settings": {"p0": {"per_instance_accuracy": chips}}}


def test_tail_study_winner_is_named_only_when_the_paired_ci_excludes_zero(tail_study):
    import random

    rng = random.Random(0)
    base = [0.8 + 0.05 * rng.random() for _ in range(100)]
    ahead = [b + 0.01 for b in base]  # the same chips, 1 pp better on every one
    jitter = [b + rng.choice((-0.01, 0.01)) for b in base]  # as often better as worse
    w = tail_study.winners([_unit("noise", base), _unit("ovf", ahead)], "mean")
    assert w["best"] == "ovf" and w["ties"] == [] and w["runner_up"][1] == pytest.approx(0.01)
    assert "**OVF**" in tail_study._winner_cell(w)
    w = tail_study.winners([_unit("noise", base), _unit("irs", jitter)], "mean")
    assert set([w["best"], *w["ties"]]) == {"noise", "irs"}
    assert tail_study._winner_cell(w).startswith("no difference")
    w = tail_study.winners([_unit("noise", base), _unit("ovf", ahead)], "p5")
    assert w["best"] == "ovf"


def test_committed_tail_study_recomputes_from_its_json(tail_study):
    results = tail_study.load_results(ROOT / "docs" / "tail-study" / "results.jsonl")
    text = (ROOT / "docs" / "tail-study.md").read_text()
    block = text.split(tail_study.BEGIN, 1)[1].split(tail_study.END, 1)[0]
    assert block.strip() == tail_study.render_tables(results).strip(), (
        "docs/tail-study.md is stale: run `python -m studies.tails report`"
    )
    cfg = results["config"]
    assert cfg == json.loads((ROOT / "studies" / "tails.json").read_text())
    assert sorted(u["key"] for u in results["units"]) == sorted(u["key"] for u in tail_study.plan(cfg))
    for u in results["units"]:  # every setting on the same number of chips
        assert {len(s["per_instance_accuracy"]) for s in u["settings"].values()} == {cfg["runs"]}
