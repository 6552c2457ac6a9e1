"""The tail study (issue 29, docs/tail-study.md): which training method wins the mean, the low tail and the
worst case of the chip distribution, and what write-verify and BatchNorm recalibration add, on common chips?

    python -m studies.tails run    [--config studies/tails.json] [--out runs/tail-study] [--results FILE]
                                   [--max-units N] [--progress]
    python -m studies.tails report [--results docs/tail-study/results.jsonl] [--doc docs/tail-study.md]
    python -m studies.tails plan   [--config ...]

A *unit* is one (model, training method, σ_d): the training of that method at σ_d (the clean model: once
per model, without noise; the kd teacher is that clean model) and its evaluation at σ_d on the config's
``runs`` chips under every mitigation setting (write-verify fraction p, BatchNorm recalibration on/off:
:func:`nft_cuda.eval.mitigation.mitigated_chips`), plus the worst chip found within ‖z‖∞ ≤ κ for each κ
(:func:`nft_cuda.eval.worst_case.worst_case`, started from chip 0). Chip r is the same draw for every
method and setting of a model (one seed), so every comparison is paired. ``run`` does the units in plan
order (per model, per σ_d, clean first) and appends each finished one to the results file (JSON lines,
committed), so an interrupted run continues where it stopped. ``report`` recomputes the page's tables
and its reading (between ``<!-- tail-study:begin -->`` and ``<!-- tail-study:end -->``) from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from studies import reproduce, resumable

__all__ = [
    "METHODS",
    "load_config",
    "load_results",
    "main",
    "plan",
    "render_tables",
    "run",
    "setting_key",
    "unit_spec",
]

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "tails.json"
BEGIN, END = "<!-- tail-study:begin -->", "<!-- tail-study:end -->"
METHODS = ("clean", "noise", "ovf", "irs", "kd", "trice", "ortho")
NAMES = {
    "clean": "clean",
    "noise": "noise injection",
    "ovf": "OVF",
    "irs": "IRS",
    "kd": "KD (clean teacher)",
    "trice": "TRICE-style",
    "ortho": "ortho (CorrectNet)",
}
#: Config entries that shape a unit's result: a unit recorded with other values is redone.
_SHAPING = (
    "models",
    "dataset",
    "device_model",
    "epochs",
    "batch_size",
    "lr",
    "limit_train",
    "val_fraction",
    "seed",
    "test_images",
    "runs",
    "eval_seed",
    "settings",
    "verify_rule",
    "residual",
    "recalibrate_batches",
    "calibration_batch_size",
    "kappas",
    "worst_case_steps",
    "attack_batches",
)
_REQUIRED = _SHAPING + ("sigmas", "methods", "device", "eval_batch_size", "results")


# --------------------------------------------------------------------------------------------------
# Config and plan
# --------------------------------------------------------------------------------------------------


def _check_settings(path, settings) -> None:
    if not isinstance(settings, list) or not settings:
        raise ValueError(f"{path}: settings must be a non-empty list of [verify fraction, recalibrate]")
    for s in settings:
        ok = isinstance(s, list) and len(s) == 2 and isinstance(s[1], bool)
        if not ok or isinstance(s[0], bool) or not isinstance(s[0], (int, float)) or not 0 <= s[0] <= 1:
            raise ValueError(f"{path}: a setting is [verify fraction in [0, 1], recalibrate true/false], got {s!r}")
    if [0, False] not in settings:
        raise ValueError(f"{path}: settings need [0, false] (no mitigation), the reference of every comparison")


def load_config(path) -> dict:
    """The study config (JSON), checked: one clear ValueError naming the bad entry."""
    with open(path) as f:
        cfg = json.load(f)
    resumable.check_config(path, cfg, _REQUIRED)
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"{path}: unknown methods {bad}; known: {', '.join(METHODS)}")
    if "kd" in cfg["methods"] and "clean" not in cfg["methods"]:
        raise ValueError(f"{path}: method kd distils the clean model: methods need 'clean' too")
    if not isinstance(cfg["models"], dict) or not cfg["models"]:
        raise ValueError(f'{path}: models must map a model name to its settings, e.g. {{"small": {{"width": 0.5}}}}')
    if any(not (isinstance(k, (int, float)) and k > 0) for k in cfg["kappas"]):
        raise ValueError(f"{path}: kappas must be positive numbers (bounds on |z|), got {cfg['kappas']}")
    _check_settings(path, cfg["settings"])
    return cfg


def setting_key(fraction: float, recalibrate: bool) -> str:
    """``p0``, ``p1``, ``p5`` (write-verify of 0 / 1 / 5 % of the weights), ``+bn`` with BN recalibration."""
    return f"p{100 * fraction:g}" + ("+bn" if recalibrate else "")


def unit_key(model: str, method: str, sigma: float) -> str:
    return f"{model}-{method}-s{sigma:g}"


def plan(cfg: dict) -> list[dict]:
    """The units in the order ``run`` does them: per model, per σ_d, every method with clean first (the kd
    teacher), so one model's σ_d is complete before the next starts."""
    methods = sorted(cfg["methods"], key=METHODS.index)
    return [
        {"key": unit_key(model, method, float(sigma)), "model": model, "method": method, "sigma": float(sigma)}
        for model in cfg["models"]
        for sigma in cfg["sigmas"]
        for method in methods
    ]


def unit_spec(cfg: dict, unit: dict) -> dict:
    """Everything that shapes a unit's result (a recorded unit with another spec is redone)."""
    return {k: cfg[k] for k in _SHAPING} | {k: unit[k] for k in ("model", "method", "sigma")}


# --------------------------------------------------------------------------------------------------
# Results file (JSON lines)
# --------------------------------------------------------------------------------------------------


def load_results(path) -> dict:
    """{"config": the config of the last run line, "environment": its stamp, "units": [records]}: the units
    made with that config's settings, the last record of each (:func:`studies.resumable.load_results`)."""
    return resumable.load_results(path, unit_spec)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _training_name(unit: dict) -> str:
    if unit["method"] == "clean":  # trained once per model, without noise
        return f"{unit['model']}-clean"
    return f"{unit['model']}-{unit['method']}-s{unit['sigma']:g}"


def _training_item(cfg: dict, unit: dict, out: Path) -> dict:
    clean = unit["method"] == "clean"
    item = {
        "name": _training_name(unit),
        "model": unit["model"],
        "dataset": cfg["dataset"],
        "method": unit["method"],
        "sigma": 0.0 if clean else unit["sigma"],
        "device_model": cfg["device_model"],
        "seed": cfg["seed"],
        "epochs": cfg["epochs"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["lr"],
        "width": cfg["models"][unit["model"]]["width"],
        "val_fraction": cfg["val_fraction"],
    }
    if unit["method"] == "kd":
        item["teacher"] = str(out / "train" / f"{unit['model']}-clean")
    return item


def _train(cfg: dict, unit: dict, out: Path, progress: bool, shared: dict) -> tuple[dict, bool]:
    """(training record, reused): a training already in ``out`` with the same settings is reused (the
    clean model of another σ_d, a unit interrupted during its evaluation). A kd training's settings
    include its teacher's record, so a retrained teacher retrains its students."""
    item = _training_item(cfg, unit, out)
    spec = {k: cfg[k] for k in ("limit_train", "test_images", "device")} | item
    if unit["method"] == "kd":
        teacher = shared[f"{unit['model']}-clean"]["result"]
        spec["teacher_record"] = {k: teacher[k] for k in ("time_s", "test_acc_clean")}
    return resumable.train_or_reuse(cfg, item, spec, out, "tails_training.json", progress, shared)


def _at_sigma(model, payload: dict, sigma: float) -> None:
    """Every noisy layer of ``model`` at σ_d = ``sigma`` of the config's preset, the file's bit widths."""
    from nft_cuda import Variation, noisy_layers

    base = payload["variation"]
    var = Variation(sigma, base["device_model"], base.get("weight_bits", 8), base.get("device_bits", 2))
    for _, layer in noisy_layers(model):
        layer.variation = var


def _calibration_batches(cfg: dict, preprocess: str) -> list:
    """The first ``recalibrate_batches`` batches of the training split (the BN recalibration data)."""
    from nft_cuda.data import load_dataset

    n = cfg["recalibrate_batches"] * cfg["calibration_batch_size"]
    x, y = load_dataset(cfg["dataset"], cfg.get("data_dir"), "train", preprocess=preprocess)
    size = cfg["calibration_batch_size"]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _clean_accuracy(model, loader) -> float:
    import torch

    from nft_cuda import noise_mode

    correct = total = 0
    model.eval()
    with torch.no_grad(), noise_mode(model, "off"):
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += y.numel()
    return correct / total


def _evaluate(cfg: dict, unit: dict, model_path: str) -> dict:
    """Every mitigation setting on the ``runs`` common chips, and the worst chip per κ, at the unit's σ_d."""
    from nft_cuda.eval.mitigation import mitigated_chips
    from nft_cuda.eval.run import TensorBatches, model_preprocess
    from nft_cuda.eval.worst_case import worst_case
    from nft_cuda.io import load_model

    model, payload = load_model(model_path, device=cfg["device"])
    _at_sigma(model, payload, unit["sigma"])
    preprocess = model_preprocess(payload)
    x, y = reproduce.study_test_set(cfg, cfg["dataset"], preprocess)
    loader = TensorBatches(x, y, cfg["eval_batch_size"])
    calib = _calibration_batches(cfg, preprocess)
    settings = {}
    for fraction, recal in cfg["settings"]:
        t0 = time.perf_counter()
        res = mitigated_chips(
            model,
            loader,
            cfg["runs"],
            seed=cfg["eval_seed"],
            verify_fraction=float(fraction),
            verify_rule=cfg["verify_rule"],
            residual=cfg["residual"],
            recalibrate=len(calib) if recal else 0,
            calibration_loader=calib if recal else None,
        )
        settings[setting_key(fraction, recal)] = {
            "verify_fraction": float(fraction),
            "recalibrate": recal,
            "per_instance_accuracy": res["per_instance_accuracy"],
            "time_s": time.perf_counter() - t0,
        }
    worst = []
    for kappa in cfg["kappas"]:
        w = worst_case(
            model,
            loader,
            kappa=float(kappa),
            seed=cfg["eval_seed"],
            instance=0,
            steps=cfg["worst_case_steps"],
            attack_batches=cfg["attack_batches"],
        )
        worst.append({k: w[k] for k in ("kappa", "accuracy", "chip_accuracy", "max_abs_z", "steps", "step_size")})
    return {"clean_accuracy": _clean_accuracy(model, loader), "num_inputs": int(y.shape[0]), "settings": settings,
            "worst_case": worst}  # fmt: skip


def _do_unit(cfg: dict, unit: dict, out: Path, progress: bool, shared: dict) -> dict:
    if unit["method"] == "kd":  # the teacher's record first (trained now, or found in out)
        _train(cfg, {**unit, "method": "clean"}, out, progress, shared)
    t0 = time.perf_counter()
    trained, reused = _train(cfg, unit, out, progress, shared)
    c0 = time.process_time()
    ev = _evaluate(cfg, unit, trained["model_path"])
    return {
        "key": unit["key"],
        "spec": unit_spec(cfg, unit),
        **{k: unit[k] for k in ("model", "method", "sigma")},
        "training_name": _training_name(unit),
        "training": {k: v for k, v in trained.items() if k != "model_path"} | {"reused": reused},
        **ev,
        "eval_cpu_s": time.process_time() - c0,
        "wall_s": time.perf_counter() - t0,
    }


def _describe(record: dict) -> str:
    plain = record["settings"][setting_key(0, False)]["per_instance_accuracy"]
    worst = ", ".join(f"{100 * w['accuracy']:.1f}" for w in record["worst_case"])
    return (
        f"clean {100 * record['clean_accuracy']:.1f} %, chips {100 * math.fsum(plain) / len(plain):.2f} %, "
        f"worst {worst} %, "
        f"train {record['training']['cpu_s']:.0f} s{' (reused)' if record['training']['reused'] else ''}, "
        f"eval {record['eval_cpu_s']:.0f} s CPU, {record['wall_s']:.0f} s wall"
    )


def run(cfg: dict, out, *, results=None, progress: bool = False, log=print, max_units: int | None = None) -> dict:
    """Do (or continue) the units of ``cfg`` not yet in the results file (default ``cfg["results"]``),
    appending each as it finishes; at most ``max_units`` of them. Returns :func:`load_results`."""
    out = Path(out)
    return resumable.run_units(
        cfg,
        plan(cfg),
        Path(results or cfg["results"]),
        spec_of=unit_spec,
        do_unit=lambda unit, shared: _do_unit(cfg, unit, out, progress, shared),
        describe=_describe,
        log=log,
        max_units=max_units,
    )


# --------------------------------------------------------------------------------------------------
# Tables and reading (recomputed from the results file)
# --------------------------------------------------------------------------------------------------

#: The metrics the reading ranks the methods by: the mean chip and the 1st / 5th percentile chip.
_RANKED = (("mean", None), ("p1", 1), ("p5", 5))


def _chips(unit: dict, setting: str = "p0") -> list[float]:
    return unit["settings"][setting]["per_instance_accuracy"]


def _metric(unit: dict, metric: str, setting: str = "p0") -> float:
    from nft_cuda.eval.tails import percentile

    chips = _chips(unit, setting)
    return math.fsum(chips) / len(chips) if metric == "mean" else percentile(chips, dict(_RANKED)[metric])


def _difference(a: dict, b: dict, metric: str, setting: str = "p0") -> tuple[float, float, float, bool]:
    """(difference, CI95 low, high, reliable) of ``metric`` between units a and b on their common chips:
    the paired mean difference, or the paired bootstrap of the percentile difference."""
    from nft_cuda.eval.paired import paired_difference
    from nft_cuda.eval.tails import percentile_difference

    x, y = _chips(a, setting), _chips(b, setting)
    if metric == "mean":
        d = paired_difference(x, y)
        return d["mean"], d["low"], d["high"], True
    d = percentile_difference(x, y, dict(_RANKED)[metric])
    return d["difference"], d["ci_low"], d["ci_high"], d["reliable"]


def _pp(v: float) -> str:
    return f"{100 * v:+.1f}"


def winners(units: list[dict], metric: str, setting: str = "p0") -> dict:
    """The best method by ``metric`` and the methods that do not differ from it (the paired CI95 of best −
    other reaches 0): {"best", "ties", "runner_up" (method, difference, low, high, reliable) or None}."""
    ranked = sorted(units, key=lambda u: (-_metric(u, metric, setting), METHODS.index(u["method"])))
    best, ties, closest = ranked[0], [], None
    for other in ranked[1:]:
        d = _difference(best, other, metric, setting)
        if closest is None:
            closest = (other["method"], *d)
        if d[1] <= 0:
            ties.append(other["method"])
    return {"best": best["method"], "ties": ties, "runner_up": closest}


def _winner_cell(w: dict) -> str:
    if w["runner_up"] is None:  # one method only (a partial results file)
        return f"{NAMES[w['best']]} (alone)"
    if not w["ties"]:
        method, diff, low, high, reliable = w["runner_up"]
        ci = f"{_pp(diff)} [{_pp(low)}, {_pp(high)}] pp over {NAMES[method]}" + ("" if reliable else ", unreliable")
        return f"**{NAMES[w['best']]}** ({ci})"
    return f"no difference: {NAMES[w['best']]} (highest), " + ", ".join(NAMES[m] for m in w["ties"])


def _tail_cell(unit: dict, k: int) -> str:
    from nft_cuda.eval.tails import tail_stats

    t = tail_stats(_chips(unit), [k])[f"{k:g}"]
    low = "–" if t["ci_low"] is None else f"{100 * t['ci_low']:.1f}"
    high = "–" if t["ci_high"] is None else f"{100 * t['ci_high']:.1f}"
    return f"{100 * t['value']:.1f} [{low}, {high}]"


def _accuracy_rows(cfg: dict, units: list[dict]) -> list[str]:
    rows = []
    for u in units:
        mean, ci = reproduce.mean_ci(_chips(u))
        worst = " | ".join(f"{100 * w['accuracy']:.1f}" for w in u["worst_case"])
        rows.append(
            f"| {NAMES[u['method']]} | {100 * u['clean_accuracy']:.1f} | {mean:.2f} ± {ci:.2f} | {_tail_cell(u, 1)} | "
            f"{_tail_cell(u, 5)} | {worst} |"
        )
    return rows


def _settings_of(cfg: dict) -> list[str]:
    return [setting_key(f, r) for f, r in cfg["settings"]]


def _setting_name(key: str) -> str:
    fraction, _, bn = key.partition("+")
    name = "none" if fraction == "p0" else f"write-verify {fraction[1:]} %"
    return (name + " + BN recal" if name != "none" else "BN recal") if bn else name


def _mitigation_rows(cfg: dict, units: list[dict]) -> list[str]:
    rows = []
    for u in units:
        cells = [f"{reproduce.mean_ci(_chips(u))[0]:.2f}"]
        for key in _settings_of(cfg)[1:]:
            d, low, high, _ = _difference({"settings": {"a": u["settings"][key]}}, {"settings": {"a": u["settings"]["p0"]}},
                                          "mean", "a")  # fmt: skip
            cells.append(f"{reproduce.mean_ci(_chips(u, key))[0]:.2f} ({_pp(d)} [{_pp(low)}, {_pp(high)}])")
        rows.append(f"| {NAMES[u['method']]} | " + " | ".join(cells) + " |")
    return rows


def _groups(results: dict) -> list[tuple[str, float, list[dict]]]:
    """(model, σ_d, its units in method order) for every (model, σ_d) with results."""
    cfg = results["config"]
    out = []
    for model in cfg["models"]:
        for sigma in cfg["sigmas"]:
            us = [u for u in results["units"] if u["model"] == model and u["sigma"] == float(sigma)]
            if us:
                out.append((model, float(sigma), sorted(us, key=lambda u: METHODS.index(u["method"]))))
    return out


def _worst_winner(units: list[dict], i: int) -> str:
    top = max(u["worst_case"][i]["accuracy"] for u in units)
    best = [NAMES[u["method"]] for u in units if u["worst_case"][i]["accuracy"] == top]
    return f"{', '.join(best)} ({100 * top:.1f})"


def _summary_rows(cfg: dict, groups) -> list[str]:
    rows = []
    for model, sigma, us in groups:
        cells = [_winner_cell(winners(us, m)) for m, _ in _RANKED]
        cells += [_worst_winner(us, i) for i in range(len(cfg["kappas"]))]
        cells += [_winner_cell(winners(us, "mean", key)) for key in _settings_of(cfg)[1:]]
        rows.append(f"| {model} | {sigma:g} | " + " | ".join(cells) + " |")
    return rows


def _mitigation_reading(cfg: dict, groups) -> list[str]:
    """One line per setting: for how many (model, σ_d, method) its paired mean gain is above / below 0."""
    lines = []
    for key in _settings_of(cfg)[1:]:
        up = down = same = 0
        for _, _, us in groups:
            for u in us:
                _, low, high, _ = _difference({"settings": {"a": u["settings"][key]}},
                                              {"settings": {"a": u["settings"]["p0"]}}, "mean", "a")  # fmt: skip
                up, down, same = up + (low > 0), down + (high < 0), same + (low <= 0 <= high)
        lines.append(
            f"- {_setting_name(key)} vs none (paired mean, CI95): higher in {up}, lower in {down}, no difference "
            f"in {same} of {up + down + same} (model, σ_d, method) cells."
        )
    return lines


def _compute_line(results: dict) -> str:
    trainings = {u["training_name"]: u["training"]["cpu_s"] for u in results["units"]}
    train_s, eval_s = math.fsum(trainings.values()), math.fsum(u["eval_cpu_s"] for u in results["units"])
    wall = math.fsum(u["wall_s"] for u in results["units"])
    env = results.get("environment") or {}
    return (
        f"Compute: {train_s / 60:.1f} min training (each model once) + {eval_s / 60:.1f} min evaluation CPU time; "
        f"{wall / 60:.1f} min wall for the units recorded ({env.get('cpu_count')} CPU cores shared, torch threads "
        f"{env.get('torch_threads')}, torch {env.get('torch')}, commit {env.get('commit')})."
    )


def render_tables(results: dict) -> str:
    """The Markdown block of docs/tail-study.md, computed from ``results`` (:func:`load_results`)."""
    cfg, groups = results["config"], _groups(results)
    kappas = ", ".join(f"κ = {k:g}" for k in cfg["kappas"])
    inputs = sorted({u["num_inputs"] for u in results["units"]})
    out = [
        f"Recomputed from `{cfg['results']}` by `python -m studies.tails report`: {len(results['units'])} of "
        f"{len(plan(cfg))} units; {cfg['runs']} common chips per model (seed {cfg['eval_seed']}) on the first "
        f"{'/'.join(map(str, inputs))} test images; accuracies in %.",
        "",
    ]
    worst_head = " | ".join(f"worst, {k}" for k in kappas.split(", "))
    for model, sigma, us in groups:
        out += [
            f"### {model} (width {cfg['models'][model]['width']:g}), σ_d = {sigma:g}",
            "",
            f"| method | clean | mean ± CI95 | p1 [CI95] | p5 [CI95] | {worst_head} |",
            "|---|---|---|---|---|" + "---|" * len(cfg["kappas"]),
            *_accuracy_rows(cfg, us),
            "",
            "Mitigations on the same chips: mean, and in brackets the paired difference to no mitigation (pp, CI95).",
            "",
            "| method | none | " + " | ".join(_setting_name(k) for k in _settings_of(cfg)[1:]) + " |",
            "|---|---|" + "---|" * (len(cfg["settings"]) - 1),
            *_mitigation_rows(cfg, us),
            "",
        ]
    out += [
        "### Which method wins which metric",
        "",
        "A winner is named when the paired CI95 of its lead over every other method excludes 0 (the lead over "
        "the closest one shown); otherwise the methods whose paired CI reaches 0 are listed as no difference. "
        "p1: the paired bootstrap of a 1st-percentile difference is unreliable at 100 chips (one chip expected "
        "below it), so a p1 winner is marked so. Worst case: one search per method from chip 0, no CI (the "
        "highest value is listed, ties included).",
        "",
        "| model | σ_d | mean | p1 | p5 | "
        + " | ".join(f"worst, {k}" for k in kappas.split(", "))
        + " | "
        + " | ".join(f"mean, {_setting_name(k)}" for k in _settings_of(cfg)[1:])
        + " |",
        "|---|---|---|---|---|" + "---|" * (len(cfg["kappas"]) + len(cfg["settings"]) - 1),
        *_summary_rows(cfg, groups),
        "",
        *_mitigation_reading(cfg, groups),
        "",
        _compute_line(results),
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.tails", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="do the units not yet in the results file (resumable)")
    r.add_argument("--config", default=str(DEFAULT_CONFIG))
    r.add_argument(
        "--out", default=os.path.join("runs", "tail-study"), help="training folders (default runs/tail-study)"
    )
    r.add_argument("--results", help="results file (default: the config's 'results')")
    r.add_argument("--data-dir", dest="data_dir", help="data folder (default $NFT_DATA_DIR)")
    r.add_argument("--max-units", dest="max_units", type=int, help="stop after this many units")
    r.add_argument("--progress", action="store_true", help="progress bars")
    s = sub.add_parser("report", help="recompute the page's tables and reading from the results file")
    s.add_argument("--results", default=os.path.join("docs", "tail-study", "results.jsonl"))
    s.add_argument("--doc", default=os.path.join("docs", "tail-study.md"))
    q = sub.add_parser("plan", help="list the units of a config")
    q.add_argument("--config", default=str(DEFAULT_CONFIG))
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            cfg = load_config(args.config)
            if args.data_dir:
                cfg["data_dir"] = args.data_dir
            run(cfg, args.out, results=args.results, progress=args.progress, max_units=args.max_units)
        elif args.command == "report":
            results = load_results(args.results)
            if not results["units"]:
                raise ValueError(f"{args.results} holds no finished unit")
            reproduce.update_doc(args.doc, results, render=render_tables, begin=BEGIN, end=END)
            print(render_tables(results))
            print(f"updated {args.doc}")
        else:
            cfg = load_config(args.config)
            for u in plan(cfg):
                print(u["key"])
            print(f"{len(plan(cfg))} units")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
