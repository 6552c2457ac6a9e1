"""The reproduction study: do OVF and IRS beat noise-injection training under device variation?

    python -m studies.reproduce run    [--config studies/reproduction.json] [--out runs/study] [--no-progress]
    python -m studies.reproduce report [--results docs/reproduction/results.json] [--doc docs/reproduction.md]
                                       [--plot docs/reproduction/accuracy.png]
    python -m studies.reproduce plan   [--config ...]

The same runner serves other studies: a config names its model ("model", or per group), its time
budget ("budget_minutes", default 60) and where ``report`` writes ("report": results/doc/plot, default
the reproduction study's), e.g. studies/vit.json (docs/vit-study.md: the small ViT on Fashion-MNIST).

``run`` trains every model of the config and evaluates each with Monte-Carlo, as the paper does
(its reference code): each noise-trained model (noise injection, OVF, IRS) is trained and tested at the
same σ_d and device preset; the clean model of each (model, dataset) is trained once and swept over
every (σ_d, preset) of the config. Each finished training and evaluation is recorded in the output
folder as soon as it ends, and a training continues from its last epoch's checkpoint, so an
interrupted study re-run with the same command continues where it stopped (a changed config re-does only the items it changes). At the end ``results.json`` holds
everything: the config, the environment, each training (time, clean test accuracy) and each
evaluation point with its per-instance accuracies.

``report`` recomputes every table of docs/reproduction.md from a results.json (mean and CI95 from
the per-instance accuracies) and rewrites the block between the ``<!-- study:begin -->`` and
``<!-- study:end -->`` markers, and draws the plot. ``plan`` lists what ``run`` would do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = [
    "PAPER",
    "TRAIN_EXTRAS",
    "accuracy_cell",
    "add_run_command",
    "environment_stamp",
    "eval_one",
    "load_config",
    "main",
    "mean_ci",
    "plan",
    "render_tables",
    "report_paths",
    "run",
    "run_command",
    "study_test_set",
    "train_one",
    "update_doc",
    "with_cpu_time",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "reproduction.json"
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
_GROUP_OVERRIDES = ("model", "width", "lr", "epochs", "batch_size")
_METHOD_ORDER = ("clean", "noise", "ovf", "irs")
#: A config's optional "report" entries: the committed results, the doc with the study markers, the plot.
_REPORT_DEFAULTS = {
    "results": "docs/reproduction/results.json",
    "doc": "docs/reproduction.md",
    "plot": "docs/reproduction/accuracy.png",
}
_METHOD_NAMES = {"clean": "clean (W/O noise)", "noise": "noise injection", "ovf": "OVF", "irs": "IRS"}

#: The paper's VGG-8 / MNIST accuracies (%) at the σ_d of this study, digitised from the accuracy
#: figure published with the authors' code, and its EKL curve (×10⁻²; that figure does not name its
#: model and dataset). Device preset not stated (the code's default is RRAM1).
PAPER = {
    "accuracy": {
        0.2: {"clean": 73.98, "noise": 99.45, "ovf": 99.53, "irs": 99.47},
        0.3: {"clean": 45.42, "noise": 86.61, "ovf": 99.46, "irs": 90.19},
        0.35: {"clean": 35.40, "noise": 52.30, "ovf": 99.01, "irs": 58.28},
    },
    "ekl_e2": {
        0.2: {"clean": 0.721, "noise": 0.919, "ovf": 0.076, "irs": 0.065},
        0.3: {"clean": 0.194, "noise": 3.226, "ovf": 0.238, "irs": 0.289},
        0.35: {"clean": 0.016, "noise": 5.118, "ovf": 0.432, "irs": 0.362},
    },
}


# --------------------------------------------------------------------------------------------------
# Config and plan
# --------------------------------------------------------------------------------------------------


def load_config(path) -> dict:
    """The study config (JSON), checked: one clear ValueError naming the bad entry."""
    with open(path) as f:
        cfg = json.load(f)
    required = (
        "model",
        "width",
        "epochs",
        "batch_size",
        "lr",
        "runs",
        "instances_per_pass",
        "eval_seed",
        "device",
        "clean_seed",
        "groups",
    )
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing config entries {missing}")
    cfg.setdefault("limit_train", None)
    cfg.setdefault("test_images", None)
    if "model" in cfg:
        _check_model(path, cfg["model"])
    report = cfg.get("report", {})
    unknown = sorted(set(report) - set(_REPORT_DEFAULTS)) if isinstance(report, dict) else ["(not an object)"]
    if unknown:
        raise ValueError(f"{path}: 'report' has unknown entries {unknown}; known: {', '.join(_REPORT_DEFAULTS)}")
    if not (isinstance(cfg.get("budget_minutes", 60), (int, float)) and cfg.get("budget_minutes", 60) > 0):
        raise ValueError(f"{path}: budget_minutes must be a positive number, got {cfg['budget_minutes']!r}")
    if not isinstance(cfg["groups"], list) or not cfg["groups"]:
        raise ValueError(f"{path}: 'groups' must be a non-empty list")
    for i, g in enumerate(cfg["groups"]):
        for key in ("datasets", "sigmas", "device_model", "methods", "seeds"):
            if key not in g:
                raise ValueError(f"{path}: groups[{i}] lacks '{key}'")
        bad = [m for m in g["methods"] if m not in ("noise", "ovf", "irs")]
        if bad:
            raise ValueError(
                f"{path}: groups[{i}] has unknown methods {bad} (noise, ovf, irs; the clean model is always trained)"
            )
        if "model" in g:
            _check_model(path, g["model"])
        if any(not (isinstance(s, (int, float)) and s > 0) for s in g["sigmas"]):
            raise ValueError(f"{path}: groups[{i}] sigmas must be positive numbers, got {g['sigmas']}")
        _check_time_axis(path, i, g)
        _check_tiles(path, i, g)
    if cfg.get("noise_stream", 1) not in (1, 2):
        raise ValueError(f"{path}: noise_stream must be 1 or 2 (DESIGN §2), got {cfg['noise_stream']!r}")
    if not (isinstance(cfg["runs"], int) and cfg["runs"] >= 2):
        raise ValueError(f"{path}: runs must be an int >= 2 (a CI needs two instances), got {cfg['runs']!r}")
    return cfg


def _check_model(path, name) -> None:
    from nft_cuda.models import MODELS

    if name not in MODELS:
        raise ValueError(f"{path}: unknown model {name!r}; choose one of {', '.join(MODELS)}")


def report_paths(cfg: dict) -> dict:
    """Where ``report`` reads the results and writes the doc and the plot of a study: the config's
    ``report`` entries over the defaults of the reproduction study."""
    return {**_REPORT_DEFAULTS, **cfg.get("report", {})}


def _check_time_axis(path, i: int, g: dict) -> None:
    """A group's optional time axis (docs/device-models.md, "Study"): ``times`` (seconds after
    programming, each >= 0), ``drift_compensation`` (a list of true/false, default [false]) and
    ``compensation_rule`` (the rule of the compensated points, one of the PCM model's
    ``COMPENSATION_RULES``; default the model's, "one-hot")."""
    from nft_cuda.devices import COMPENSATION_RULES

    times = g.get("times")
    if times is not None and (
        not isinstance(times, list) or not times or any(not (isinstance(t, (int, float)) and t >= 0) for t in times)
    ):
        raise ValueError(f"{path}: groups[{i}] times must be a non-empty list of seconds >= 0, got {times!r}")
    comp = g.get("drift_compensation")
    if comp is not None and (times is None or not isinstance(comp, list) or not all(isinstance(c, bool) for c in comp)):
        raise ValueError(f"{path}: groups[{i}] drift_compensation must be a list of true/false beside 'times'")
    rule = g.get("compensation_rule")
    if rule is not None and (times is None or rule not in COMPENSATION_RULES):
        raise ValueError(
            f"{path}: groups[{i}] compensation_rule must be one of {', '.join(map(repr, COMPENSATION_RULES))} "
            f"beside 'times', got {rule!r}"
        )


def _check_tiles(path, i: int, g: dict) -> None:
    """A group's optional crossbar tiles (docs/device-models.md, "Tiles"): ``tiles``, the fields of
    :class:`nft_cuda.devices.Tiles` (``max_input_size``, ``max_output_size``, ``per_channel``), at least
    one split set; the device model of the group's trainings and evaluations then carries them."""
    from nft_cuda.devices import Tiles

    if "tiles" not in g:
        return
    try:
        tiles = Tiles.from_dict(g["tiles"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: groups[{i}] tiles: {exc}") from None
    if not tiles.active:
        raise ValueError(
            f"{path}: groups[{i}] tiles must set max_input_size, max_output_size or per_channel "
            f"(leave 'tiles' out for untiled layers), got {g['tiles']!r}"
        )


def _tiles_of(g: dict) -> dict:
    """``{"tiles": {...}}`` (every Tiles field) for a tiled group, else {}: the device options its
    trainings and evaluations add, so an untiled group's items (and their records) are unchanged."""
    from nft_cuda.devices import Tiles

    return {"tiles": Tiles.from_dict(g["tiles"]).to_dict()} if "tiles" in g else {}


def _tiles_suffix(options: dict) -> str:
    """The name suffix of tiled items, e.g. "-tiles512x512" ("inf": unlimited side, "-pc": per channel)."""
    if "tiles" not in options:
        return ""
    t = options["tiles"]
    size = f"{t['max_input_size'] or 'inf'}x{t['max_output_size'] or 'inf'}"
    return f"-tiles{size}" + ("-pc" if t["per_channel"] else "")


def _time_points(g: dict) -> list[dict]:
    """The (time, drift compensation[, its rule]) evaluation settings of a group: [{}] without a time
    axis. A compensated point names its rule (the group's ``compensation_rule``, else the PCM default)."""
    from nft_cuda.devices import PCM

    if g.get("times") is None:
        return [{}]
    rule = g.get("compensation_rule", PCM.compensation_rule)
    return [
        {"time_s": float(t), "drift_compensation": c, **({"compensation_rule": rule} if c else {})}
        for c in g.get("drift_compensation", [False])
        for t in g["times"]
    ]


def _time_suffix(point: dict) -> str:
    if not point:
        return ""
    return f"@t{point['time_s']:g}" + ("-dc" if point["drift_compensation"] else "")


def _setting(cfg: dict, group: dict, key: str):
    return group.get(key, cfg[key])


def _train_name(model: str, dataset: str, method: str, sigma: float, preset: str, seed: int) -> str:
    if method == "clean":
        return f"{model}-{dataset}-clean-seed{seed}"
    return f"{model}-{dataset}-{method}-{preset}-s{sigma:g}-seed{seed}"


def plan(cfg: dict) -> tuple[list[dict], list[dict]]:
    """(trainings, evaluations) of a config, in the order ``run`` does them (clean models first). A tiled
    group's noise-trained models and evaluation points carry its tiles (``device_options`` / ``tiles``)
    and a "-tiles…" name suffix; the clean model is trained once without noise and evaluated tiled."""
    trainings: dict[str, dict] = {}
    evals: dict[str, dict] = {}
    clean_points: dict[str, list] = {}
    for g in cfg["groups"]:
        hyper = {k: _setting(cfg, g, k) for k in _GROUP_OVERRIDES}
        tiles = _tiles_of(g)
        suffix = _tiles_suffix(tiles)
        for ds in g["datasets"]:
            clean = _train_name(hyper["model"], ds, "clean", 0.0, "RRAM1", cfg["clean_seed"])
            trainings.setdefault(
                clean,
                {
                    "name": clean,
                    "dataset": ds,
                    "method": "clean",
                    "sigma": 0.0,
                    "device_model": "RRAM1",
                    "seed": cfg["clean_seed"],
                    "group": g["name"],
                    **hyper,
                },
            )
            for sigma in g["sigmas"]:
                for when in _time_points(g):
                    point = (float(sigma), g["device_model"], json.dumps(when, sort_keys=True), json.dumps(tiles))
                    if point not in clean_points.setdefault(clean, []):
                        clean_points[clean].append(point)
                for seed in g["seeds"]:
                    for method in g["methods"]:
                        name = _train_name(hyper["model"], ds, method, sigma, g["device_model"], seed) + suffix
                        trainings.setdefault(
                            name,
                            {
                                "name": name,
                                "dataset": ds,
                                "method": method,
                                "sigma": float(sigma),
                                "device_model": g["device_model"],
                                **({"device_options": tiles} if tiles else {}),
                                "seed": seed,
                                "group": g["name"],
                                **hyper,
                            },
                        )
                        for when in _time_points(g):
                            evals.setdefault(
                                name + _time_suffix(when),
                                {"name": name + _time_suffix(when), "model": name, "sigma": float(sigma),
                                 "device_model": g["device_model"], **tiles, **when},
                            )  # fmt: skip
    clean_evals = []
    for clean, points in clean_points.items():
        for sigma, preset, when, tiles in points:
            when, tiles = json.loads(when), json.loads(tiles)
            name = f"{clean}@{preset}-s{sigma:g}{_tiles_suffix(tiles)}{_time_suffix(when)}"
            clean_evals.append({"name": name, "model": clean, "sigma": sigma, "device_model": preset, **tiles, **when})
    order = sorted(trainings.values(), key=lambda t: t["method"] != "clean")
    return order, clean_evals + list(evals.values())


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    from nft_cuda._files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def _done(path: Path, spec: dict):
    """The recorded result at ``path`` when it was made with ``spec``, else None."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("spec") == spec else None


def _environment() -> dict:
    from nft_cuda._files import environment

    return environment(Path(__file__).resolve().parent)


#: TrainConfig fields a training item may set beyond the ones every study sets (studies/fidelity.py:
#: the authors' init and preprocessing, the ablation arms; studies/tails.py: the kd teacher).
TRAIN_EXTRAS = ("init", "preprocess", "temperature", "ovf_scope", "ovf_bn_stats", "beta", "val_fraction", "teacher")


def _train_one(cfg: dict, t: dict, out: Path, progress: bool) -> dict:
    """Train ``t`` into ``out/train/<name>``, continuing the checkpoint a killed earlier process left
    there when it has the same settings (bit-identical to an uninterrupted run, nft_cuda.train.trainer),
    else from scratch. ``cpu_s_earlier`` is the CPU time of the epochs that process did (their wall
    time where its checkpoint predates per-epoch CPU time): :func:`_with_cpu_time` counts it in."""
    from nft_cuda.train.checkpoint import CheckpointError, has_checkpoint
    from nft_cuda.train.trainer import train

    folder = out / "train" / t["name"]
    config = _train_config(cfg, t, folder)
    result = None
    if has_checkpoint(folder):
        try:
            result = train(dataclasses.replace(config, resume=True, overwrite=False), progress=progress, log=None)
        except CheckpointError:  # unusable, or made with other settings: start again
            result = None
    if result is None:
        result = train(config, progress=progress, log=None)
    earlier = [r for r in result["history"] if result["resumed_from"] and r["epoch"] <= result["resumed_from"]]
    return {
        "time_s": result["time_s"],
        "test_acc_clean": result["test_acc_clean"],
        "test_acc_noisy": result["test_acc_noisy"],
        "best_epoch": result["best_epoch"],
        "best_val_acc": result["best_val_acc"],
        "sizes": result["sizes"],
        "model_path": result["model_path"],
        "resumed_from": result["resumed_from"],
        "cpu_s_earlier": math.fsum(r.get("epoch_cpu_s") or r["epoch_time_s"] for r in earlier),
    }


def _train_config(cfg: dict, t: dict, folder: Path):
    from nft_cuda.train.trainer import TrainConfig

    return TrainConfig(
        model=t["model"],
        dataset=t["dataset"],
        method=t["method"],
        sigma=t["sigma"],
        device_model=t["device_model"],
        epochs=t["epochs"],
        batch_size=t["batch_size"],
        lr=t["lr"],
        width=t["width"],
        seed=t["seed"],
        device=cfg["device"],
        data_dir=cfg.get("data_dir"),
        limit_train=cfg["limit_train"],
        limit_eval=cfg["test_images"],
        out=str(folder),
        overwrite=True,
        **{k: t[k] for k in (*TRAIN_EXTRAS, "device_options") if k in t},
    )


_TEST_SETS: dict = {}


def study_test_set(cfg: dict, dataset: str, preprocess: str = "standard"):
    """The (first ``cfg["test_images"]`` of the) test split, preprocessed as the model's training was;
    loaded once per process."""
    from nft_cuda.eval.run import load_test_set

    key = (dataset, cfg.get("data_dir"), cfg["test_images"], preprocess)
    if key not in _TEST_SETS:
        x, y = load_test_set(dataset, cfg.get("data_dir"), preprocess)
        n = cfg["test_images"] or y.shape[0]
        _TEST_SETS[key] = (x[:n], y[:n])
    return _TEST_SETS[key]


def _eval_one(cfg: dict, e: dict, model_path: str, dataset: str, progress: bool) -> dict:
    import torch

    from nft_cuda.devices import Tiles, make_device_model
    from nft_cuda.eval.monte_carlo import monte_carlo
    from nft_cuda.eval.run import TensorBatches, model_preprocess
    from nft_cuda.io import load_model
    from nft_cuda.variation import PRESETS, Variation

    device = torch.device(cfg["device"])
    model, payload = load_model(model_path, device=device)
    x, y = study_test_set(cfg, dataset, model_preprocess(payload))
    base = payload["variation"]
    tiles = {"tiles": Tiles.from_dict(e["tiles"])} if "tiles" in e else {}  # the point's crossbar tiles
    if e["device_model"] in PRESETS:
        bits = (base.get("weight_bits", 8), base.get("device_bits", 2))
        var = Variation(e["sigma"], e["device_model"], *bits, **tiles)
    else:  # another device model (docs/device-models.md), read at a time after programming
        var = make_device_model(e["device_model"], e["sigma"], **tiles)
    if "time_s" in e:
        var = var.at_time(e["time_s"])
        if e["drift_compensation"]:
            var = dataclasses.replace(var, drift_compensation=True, compensation_rule=e["compensation_rule"])
    t0 = time.perf_counter()
    res = monte_carlo(
        model,
        TensorBatches(x, y, 256),
        [var],
        cfg["runs"],
        seed=cfg["eval_seed"],
        instances_per_pass=cfg["instances_per_pass"],
        device=device,
        progress=progress,
        stream_version=noise_stream(cfg),
    )[0]
    res["time_s"] = time.perf_counter() - t0
    return res


def noise_stream(cfg: dict) -> int:
    """The noise stream version of a study's chips (DESIGN §2): the config's ``noise_stream``; a config
    without one is a study made before version 2, so its chips are version 1 and re-running it gives them."""
    return cfg.get("noise_stream", 1)


def run(cfg: dict, out, *, progress: bool = True, log=print) -> dict:
    """Run (or continue) the study of ``cfg`` in folder ``out``; returns and writes ``out/results.json``."""
    out = Path(out)
    trainings, evals = plan(cfg)
    total = len(trainings) + len(evals)
    t_start = time.perf_counter()
    trained: dict[str, dict] = {}
    cpu: list[float | None] = []  # CPU seconds of each item (None: recorded by an older runner)
    step = 0
    for t in trainings:
        step += 1
        path = out / "train" / t["name"] / "study_record.json"
        spec = {k: cfg[k] for k in ("limit_train", "test_images", "device")} | t
        rec = _done(path, spec)
        if rec is None:
            log(f"[{step}/{total}] train {t['name']} ({_elapsed(t_start)} elapsed)")
            rec = {"spec": spec, "result": _with_cpu_time(_train_one, cfg, t, out, progress)}
            _write_json(path, rec)
            res = rec["result"]
            log(f"    {res['time_s']:.0f} s, clean test accuracy {100 * res['test_acc_clean']:.2f} %")
        trained[t["name"]] = {**t, **rec["result"]}
        cpu.append(rec["result"].get("cpu_s"))
    points = []
    for e in evals:
        step += 1
        t = trained[e["model"]]
        path = out / "eval" / f"{e['name']}.json"
        spec = (
            {k: cfg[k] for k in ("runs", "eval_seed", "test_images", "instances_per_pass", "device", "noise_stream")
             if k in cfg}
            | e
            | {"trained": trainings_spec(t)}
        )  # fmt: skip
        rec = _done(path, spec)
        if rec is None:
            log(f"[{step}/{total}] eval {e['name']}: {cfg['runs']} chip instances ({_elapsed(t_start)} elapsed)")
            rec = {"spec": spec, "result": _with_cpu_time(_eval_one, cfg, e, t["model_path"], t["dataset"], progress)}
            _write_json(path, rec)
            r = rec["result"]
            log(
                f"    accuracy {100 * r['accuracy_mean']:.2f} ± {100 * r['ci95']:.2f} %, EKL {r['ekl']:.4f}, "
                f"{r['time_s']:.0f} s"
            )
        r = rec["result"]
        cpu.append(r.get("cpu_s"))
        points.append(_point(e, t, r))
    results = _results(cfg, trained, points, cpu)
    _write_json(out / "results.json", results)
    log(
        f"done: {total} items, {results['time_s']['total'] / 60:.1f} min of work "
        f"({results['time_s']['training'] / 60:.1f} training, {results['time_s']['evaluation'] / 60:.1f} Monte-Carlo); "
        f"this invocation {_elapsed(t_start)}; results: {out / 'results.json'}"
    )
    return results


def _point(e: dict, t: dict, r: dict) -> dict:
    """The results.json row of evaluation ``e`` of trained model ``t``, from its Monte-Carlo result ``r``."""
    return {
        "name": e["name"],
        "model": e["model"],
        "dataset": t["dataset"],
        "method": t["method"],
        "train_sigma": t["sigma"],
        "train_device_model": t["device_model"],
        "seed": t["seed"],
        "sigma": e["sigma"],
        "device_model": e["device_model"],
        "runs": r["runs"],
        "num_inputs": r["num_inputs"],
        "eval_seed": r["seed"],
        "accuracy_mean": r["accuracy_mean"],
        "ci95": r["ci95"],
        "ekl": r["ekl"],
        "confidence": r["confidence"],
        "clean_accuracy": r["clean_accuracy"],
        "time_s": r["time_s"],
        "per_instance_accuracy": r["per_instance_accuracy"],
        "noise_stream": r.get("noise_stream", 1),
        **({"tiles": e["tiles"]} if "tiles" in e else {}),
        **({"time_after_programming_s": e["time_s"], "drift_compensation": e["drift_compensation"],
            "compensation_rule": e.get("compensation_rule")} if "time_s" in e else {}),
    }  # fmt: skip


def _results(cfg: dict, trained: dict, points: list, cpu: list) -> dict:
    """results.json: the config, environment, trainings, evaluation rows and the time spent (CPU time
    only when every item recorded it)."""
    results = {
        "config": cfg,
        "environment": _environment(),
        "trainings": [{k: v for k, v in t.items() if k != "model_path"} for t in trained.values()],
        "evaluations": points,
        "time_s": {
            "training": sum(t["time_s"] for t in trained.values()),
            "evaluation": sum(p["time_s"] for p in points),
        },
    }
    results["time_s"]["total"] = results["time_s"]["training"] + results["time_s"]["evaluation"]
    if None not in cpu:
        results["time_s"]["cpu"] = sum(cpu)
    return results


def _with_cpu_time(fn, *args) -> dict:
    """``fn(*args)`` (a result dict) with ``cpu_s``, the CPU time this process spent in it (all threads)
    plus the result's ``cpu_s_earlier`` (work an earlier, killed process did towards it, as a resumed
    training reports): on a loaded machine the wall times include waiting for other work, the CPU time
    does not."""
    c0 = time.process_time()
    result = fn(*args)
    return {**result, "cpu_s": time.process_time() - c0 + result.get("cpu_s_earlier", 0.0)}


def trainings_spec(t: dict) -> dict:
    """What identifies a trained model (so an evaluation is redone when its model was retrained)."""
    return {k: t[k] for k in ("name", "time_s", "test_acc_clean")}


def _elapsed(t0: float) -> str:
    s = int(time.perf_counter() - t0)
    return f"{s // 60}:{s % 60:02d}"


# --------------------------------------------------------------------------------------------------
# Tables (recomputed from results.json) and the plot
# --------------------------------------------------------------------------------------------------


def _mean_ci(per: list[float]) -> tuple[float, float]:
    """Mean and CI95 (1.96·std/√R, std with ddof=1: the reference's normal approximation) in %."""
    r = len(per)
    mean = math.fsum(per) / r
    var = math.fsum((a - mean) ** 2 for a in per) / (r - 1)
    return 100 * mean, 100 * 1.96 * math.sqrt(var / r)


def _acc(p: dict) -> str:
    m, ci = _mean_ci(p["per_instance_accuracy"])
    return f"{m:.2f} ± {ci:.2f}"


#: The study reports' statistics, public for the other studies that reuse this runner (studies/pcm_time.py).
mean_ci = _mean_ci
accuracy_cell = _acc
#: One training / one Monte-Carlo point / the CPU-time wrapper / the environment stamp, public for the
#: studies that run their own grid with this runner's pieces (studies/fidelity.py).
train_one = _train_one
eval_one = _eval_one
with_cpu_time = _with_cpu_time
environment_stamp = _environment


def _find(points, **want):
    hits = [p for p in points if all(p[k] == v for k, v in want.items())]
    return hits[0] if len(hits) == 1 else None


def _sweep_rows(points, dataset: str, preset: str, sigmas, seed: int, cell) -> list[str]:
    rows = []
    for method in _METHOD_ORDER:
        cells = []
        for s in sigmas:
            want = dict(dataset=dataset, method=method, sigma=s, device_model=preset)
            if method != "clean":
                want.update(train_sigma=s, train_device_model=preset, seed=seed)
            p = _find(points, **want)
            cells.append("–" if p is None else cell(p))
        if any(c != "–" for c in cells):
            rows.append(f"| {_METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    return rows


def _paired_cell(a: dict | None, b: dict | None, paired_difference) -> str:
    """``a − b`` paired by chip (mean ± CI95, percentage points), or "–" without both on the same chips."""
    if a is None or b is None or len(a["per_instance_accuracy"]) != len(b["per_instance_accuracy"]):
        return "–"
    d = paired_difference(a["per_instance_accuracy"], b["per_instance_accuracy"])
    return f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}"


def render_tables(results: dict) -> str:
    """The Markdown tables of docs/reproduction.md, computed from ``results`` alone."""
    cfg, points = results["config"], results["evaluations"]
    out = _sweep_tables(results)
    out += _paired_table(points)
    for g in cfg["groups"][1:]:
        out += _group_tables(cfg, g, points)
    out += _cost_table(results)
    if "mnist" in cfg["groups"][0]["datasets"]:
        out += _beside_the_paper(cfg, points)
    return "\n".join(out).rstrip() + "\n"


def _sweep_tables(results: dict) -> list[str]:
    """The opening sentence, then accuracy and EKL over the σ_d sweep of the first group, per dataset."""
    cfg, points = results["config"], results["evaluations"]
    seed0 = cfg["clean_seed"]
    sweep = cfg["groups"][0]
    sigmas = [float(s) for s in sweep["sigmas"]]
    preset0 = sweep["device_model"]
    runs = {p["runs"] for p in points}
    inputs = {p["num_inputs"] for p in points}
    committed = report_paths(cfg)["results"]
    command = "python -m studies.reproduce report"
    if committed != _REPORT_DEFAULTS["results"]:
        command += f" --results {committed}"
    out = [
        f"Every number below is recomputed from `{committed}` by "
        f"`{command}`: accuracy is the mean over {'/'.join(map(str, sorted(runs)))} "
        f"simulated chips ± CI95 (1.96·std/√R) in %, each chip evaluated on the first "
        f"{'/'.join(map(str, sorted(inputs)))} test images; EKL is in nats ×10⁻².",
        "",
    ]
    head = "| method | " + " | ".join(f"σ_d = {s:g}" for s in sigmas) + " |"
    rule = "|---|" + "---|" * len(sigmas)
    for ds in sweep["datasets"]:
        out += [
            f"**Accuracy under variation (%), {ds}, {preset0}, seed {seed0}**",
            "",
            head,
            rule,
            *_sweep_rows(points, ds, preset0, sigmas, seed0, _acc),
            "",
            f"**EKL (×10⁻² nats), {ds}, {preset0}, seed {seed0}**",
            "",
            head,
            rule,
            *_sweep_rows(points, ds, preset0, sigmas, seed0, lambda p: f"{100 * p['ekl']:.3f}"),
            "",
        ]
    return out


def _paired_table(points: list) -> list[str]:
    """Noise injection minus clean, OVF and IRS minus noise injection, paired by chip."""
    from nft_cuda.eval.paired import paired_difference

    out = [
        "**Noise injection minus clean training, OVF and IRS minus noise injection, paired by chip** (percentage "
        "points, mean ± CI95 of the per-chip differences: chip i of every model draws the same noise stream)",
        "",
        "| dataset | preset | σ_d | seed | noise − clean | OVF − noise | IRS − noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p["method"] != "noise":
            continue
        key = dict(
            dataset=p["dataset"],
            sigma=p["sigma"],
            device_model=p["device_model"],
            seed=p["seed"],
            train_sigma=p["train_sigma"],
            train_device_model=p["train_device_model"],
        )
        clean = _find(points, method="clean", dataset=p["dataset"], sigma=p["sigma"], device_model=p["device_model"])
        pairs = [(p, clean)] + [(_find(points, method=m, **key), p) for m in ("ovf", "irs")]
        cells = [_paired_cell(a, b, paired_difference) for a, b in pairs]
        if cells[1:] != ["–", "–"]:
            out.append(
                f"| {p['dataset']} | {p['device_model']} | {p['sigma']:g} | {p['seed']} | " + " | ".join(cells) + " |"
            )
    out.append("")
    return out


def _group_tables(cfg: dict, g: dict, points: list) -> list[str]:
    """One table per (dataset, σ_d, seed) of a later group: its preset or seed beside the first group's."""
    seed0, preset0 = cfg["clean_seed"], cfg["groups"][0]["device_model"]
    out = []
    for ds in g["datasets"]:
        for s in g["sigmas"]:
            s = float(s)
            for seed in g["seeds"]:
                other = (g["device_model"], seed)
                if other == (preset0, seed0):
                    continue
                what = f"device preset {g['device_model']}" if g["device_model"] != preset0 else f"seed {seed}"
                out += [
                    f"**{what} vs {preset0} seed {seed0}: {ds}, σ_d = {s:g}** (accuracy %, EKL ×10⁻²)",
                    "",
                    f"| method | accuracy, {preset0} seed {seed0} | accuracy, {g['device_model']} seed {seed} "
                    f"| EKL, {preset0} seed {seed0} | EKL, {g['device_model']} seed {seed} |",
                    "|---|---|---|---|---|",
                ]
                for method in _METHOD_ORDER:
                    out += _comparison_row(points, method, ds, s, ((preset0, seed0), other), seed0)
                out.append("")
    return out


def _comparison_row(points: list, method: str, ds: str, s: float, settings: tuple, seed0: int) -> list[str]:
    """The row of ``method`` in a group table (none when neither setting has a point)."""
    pair = []
    for preset, sd in settings:
        if method == "clean" and sd != seed0:  # the clean model is trained once
            pair.append(None)
            continue
        want = dict(dataset=ds, method=method, sigma=s, device_model=preset)
        if method != "clean":
            want.update(train_sigma=s, train_device_model=preset, seed=sd)
        pair.append(_find(points, **want))
    if all(p is None for p in pair):
        return []
    accs = ["–" if p is None else _acc(p) for p in pair]
    ekls = ["–" if p is None else f"{100 * p['ekl']:.3f}" for p in pair]
    return [f"| {_METHOD_NAMES[method]} | {accs[0]} | {accs[1]} | {ekls[0]} | {ekls[1]} |"]


def _cost_table(results: dict) -> list[str]:
    """Training cost per method, then the total work (and CPU time when recorded)."""
    trainings = results["trainings"]
    out = [
        "**Training cost** (wall time per model on this machine; clean test accuracy of the exported model, σ_d = 0)",
        "",
        "| method | models | mean train time (s) | × noise injection | clean test accuracy (%, range) |",
        "|---|---|---|---|---|",
    ]
    by_method = {m: [t for t in trainings if t["method"] == m] for m in _METHOD_ORDER}
    noise_t = by_method["noise"] and math.fsum(t["time_s"] for t in by_method["noise"]) / len(by_method["noise"])
    for m in _METHOD_ORDER:
        ts = by_method[m]
        if not ts:
            continue
        mean_t = math.fsum(t["time_s"] for t in ts) / len(ts)
        ratio = f"{mean_t / noise_t:.2f}" if noise_t else "–"
        accs = [100 * t["test_acc_clean"] for t in ts]
        out.append(f"| {_METHOD_NAMES[m]} | {len(ts)} | {mean_t:.1f} | {ratio} | {min(accs):.2f}–{max(accs):.2f} |")
    tt = results["time_s"]
    out += [
        "",
        f"Total work: {tt['training'] / 60:.1f} min training + {tt['evaluation'] / 60:.1f} min Monte-Carlo = "
        f"**{tt['total'] / 60:.1f} min** ({results['environment'].get('cpu_count')} CPU cores, torch "
        f"{results['environment'].get('torch')}, commit {results['environment'].get('commit')}).",
        "",
    ]
    if "cpu" in tt:
        out += [
            f"CPU time of the run's process ({results['environment'].get('torch_threads')} intra-op thread(s)): "
            f"**{tt['cpu'] / 60:.1f} min**; the wall time above also includes waiting for other work on "
            "the machine.",
            "",
        ]
    return out


def _beside_the_paper(cfg: dict, points: list) -> list[str]:
    """Our MNIST sweep beside the paper's figure (the σ_d it reports)."""
    seed0 = cfg["clean_seed"]
    sweep = cfg["groups"][0]
    preset0 = sweep["device_model"]
    out = [
        f"**Beside the paper** (VGG-8 / MNIST, digitised from its figure; ours: {cfg['model']} width {cfg['width']:g}, "
        f"mnist, {preset0}; accuracy %, EKL ×10⁻²)",
        "",
        "| σ_d | method | paper accuracy | our accuracy | paper EKL | our EKL |",
        "|---|---|---|---|---|---|",
    ]
    for s in (float(s) for s in sweep["sigmas"]):
        if s not in PAPER["accuracy"]:
            continue
        for m in _METHOD_ORDER:
            want = dict(dataset="mnist", method=m, sigma=s, device_model=preset0)
            if m != "clean":
                want.update(train_sigma=s, train_device_model=preset0, seed=seed0)
            p = _find(points, **want)
            ours = "–" if p is None else _acc(p)
            ekl = "–" if p is None else f"{100 * p['ekl']:.3f}"
            out.append(
                f"| {s:g} | {_METHOD_NAMES[m]} | {PAPER['accuracy'][s][m]:.2f} | {ours} | "
                f"{PAPER['ekl_e2'][s][m]:.3f} | {ekl} |"
            )
    out.append("")
    return out


def update_doc(doc_path, results: dict, *, render=None, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between the study markers of ``doc_path`` with :func:`render_tables` (or another
    study's ``render`` between its own markers)."""
    text = Path(doc_path).read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{doc_path}: no '{begin}' … '{end}' block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    Path(doc_path).write_text(f"{head}{begin}\n{(render or render_tables)(results)}{end}{tail}")


def plot(results: dict, path) -> None:
    """Accuracy (CI95 bars) vs σ_d per method, one panel per dataset of the sweep group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg, points = results["config"], results["evaluations"]
    sweep = cfg["groups"][0]
    sigmas = [float(s) for s in sweep["sigmas"]]
    fig = Figure(figsize=(5 * len(sweep["datasets"]), 4))
    FigureCanvasAgg(fig)
    for i, ds in enumerate(sweep["datasets"]):
        ax = fig.add_subplot(1, len(sweep["datasets"]), i + 1)
        for m in _METHOD_ORDER:
            xs, ys, es = [], [], []
            for s in sigmas:
                want = dict(dataset=ds, method=m, sigma=s, device_model=sweep["device_model"])
                if m != "clean":
                    want.update(train_sigma=s, train_device_model=sweep["device_model"], seed=cfg["clean_seed"])
                p = _find(points, **want)
                if p is not None:
                    mean, ci = _mean_ci(p["per_instance_accuracy"])
                    xs.append(s), ys.append(mean), es.append(ci)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=_METHOD_NAMES[m])
        ax.set_title(f"{cfg['model']} (width {cfg['width']:g}) on {ds}, {sweep['device_model']}")
        ax.set_xlabel("σ_d (train = test)")
        ax.set_ylabel("accuracy under variation (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_run_command(sub, default_config, default_out: str) -> None:
    """The ``run`` subcommand of a study command line (this one and studies.pcm_time's)."""
    r = sub.add_parser("run", help="train and evaluate every model of the config (resumable)")
    r.add_argument(
        "--config", default=str(default_config), help=f"study config (default studies/{Path(default_config).name})"
    )
    r.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    r.add_argument(
        "--data-dir", dest="data_dir", help="data folder (default $NFT_DATA_DIR, else ~/.cache/nft_cuda/data)"
    )
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run_command(args) -> None:
    """``run``: the config of ``--config`` (its data folder replaced by ``--data-dir``) into ``--out``."""
    cfg = load_config(args.config)
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    run(cfg, args.out, progress=args.progress)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.reproduce", description=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True)
    add_run_command(sub, DEFAULT_CONFIG, os.path.join("runs", "study"))
    s = sub.add_parser("report", help="recompute the tables of a study's doc and its plot from results.json")
    s.add_argument("--results", default=_REPORT_DEFAULTS["results"])
    s.add_argument("--doc", help="default: the study config's report.doc (docs/reproduction.md)")
    s.add_argument("--plot", help="default: the study config's report.plot (docs/reproduction/accuracy.png)")
    q = sub.add_parser("plan", help="list the trainings and evaluations of a config")
    q.add_argument("--config", default=str(DEFAULT_CONFIG))
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            run_command(args)
        elif args.command == "report":
            with open(args.results) as f:
                results = json.load(f)
            paths = report_paths(results["config"])
            doc, figure = args.doc or paths["doc"], args.plot or paths["plot"]
            update_doc(doc, results)
            plot(results, figure)
            print(render_tables(results))
            print(f"updated {doc} and {figure}")
        else:
            trainings, evals = plan(load_config(args.config))
            for t in trainings:
                print(f"train {t['name']}")
            for e in evals:
                print(f"eval  {e['name']}")
            print(f"{len(trainings)} trainings, {len(evals)} Monte-Carlo points")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
