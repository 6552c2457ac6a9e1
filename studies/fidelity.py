"""The fidelity study (issue 24, docs/fidelity-study.md): in the authors' regime (their initialisation and
MNIST preprocessing), does noise injection collapse at σ_d = 0.35 while OVF escapes, and is an escape
explained by OVF's logit temperature or its BatchNorm statistics?

    python -m studies.fidelity run    [--config studies/fidelity.json] [--out runs/fidelity] [--results FILE]
                                      [--sigmas S ...] [--seeds N ...] [--max-units N] [--progress]
    python -m studies.fidelity report [--results docs/fidelity-study/results.jsonl] [--doc docs/fidelity-study.md]
                                      [--plot docs/fidelity-study/accuracy.png]
    python -m studies.fidelity plan   [--config ...]

A *unit* is one (arm, σ_d, seed): the training of that arm at σ_d (the clean arm: once per seed, at
σ_d = 0, shared by its σ_d) and its Monte-Carlo evaluation on ``runs`` common chips (chip r of every
model draws the same noise stream) over the test set, plus the clean model's prediction histogram.
``run`` does the units in the config's order (the most informative first: σ_d = 0.35, seed 0, every
arm; then seeds 1 and 2; then the next σ_d) and appends each finished unit, with its CPU time, to the results file (JSON
lines, committed); a rerun, in this session or a later one, skips the units already there with the
same settings, so the study is resumable across sessions. ``report`` recomputes the tables of the
page (between ``<!-- fidelity:begin -->`` and ``<!-- fidelity:end -->``) and the plot from the results
file alone.

The trainings and evaluations are studies.reproduce's (``train_one``, ``eval_one``), the results file,
the reuse of trainings and the loop over units studies.resumable's, so this runner only adds the grid,
the arms, the convergence criterion and the reading.
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
    "ARMS",
    "across_seeds",
    "converged",
    "load_config",
    "load_results",
    "main",
    "plan",
    "plot",
    "readings",
    "render_tables",
    "run",
    "unit_key",
]

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "fidelity.json"
BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"

#: The arms of the study: a name → the TrainConfig settings that make it (beyond model, data, σ_d, seed).
ARMS: dict[str, dict] = {
    "clean": {"method": "clean"},
    "noise": {"method": "noise"},
    "noise-t4": {"method": "noise", "temperature": 4.0},
    "ovf": {"method": "ovf"},
    "ovf-bnmain": {"method": "ovf", "ovf_bn_stats": "main"},
    "irs": {"method": "irs"},
    "ovf-b0": {"method": "ovf", "beta": 0.0},
    "irs-b0": {"method": "irs", "beta": 0.0},
}
ARM_NAMES = {
    "clean": "clean (W/O noise)",
    "noise": "noise injection",
    "noise-t4": "noise injection, CE(o/4)",
    "ovf": "OVF",
    "ovf-bnmain": "OVF, BN stats from main forward",
    "irs": "IRS",
    "ovf-b0": "OVF, β = 0",
    "irs-b0": "IRS, β = 0",
}
#: Config entries that shape a unit's result: a unit recorded with other values is redone.
_SHAPING = (
    "model",
    "dataset",
    "width",
    "epochs",
    "batch_size",
    "lr",
    "init",
    "preprocess",
    "device_model",
    "limit_train",
    "val_fraction",
    "runs",
    "eval_seed",
    "test_images",
)
_REQUIRED = _SHAPING + ("sigmas", "seeds", "arms", "instances_per_pass", "device", "convergence", "results")


# --------------------------------------------------------------------------------------------------
# Config, plan, convergence
# --------------------------------------------------------------------------------------------------


def load_config(path) -> dict:
    """The study config (JSON), checked: one clear ValueError naming the bad entry."""
    with open(path) as f:
        cfg = json.load(f)
    resumable.check_config(path, cfg, _REQUIRED)
    bad = [a for a in cfg["arms"] if a not in ARMS]
    if bad:
        raise ValueError(f"{path}: unknown arms {bad}; known: {', '.join(ARMS)}")
    crit = cfg["convergence"]
    if set(crit) != {"min_clean_accuracy", "max_class_share"}:
        raise ValueError(
            f"{path}: convergence needs exactly min_clean_accuracy and max_class_share, got {sorted(crit)}"
        )
    return cfg


def unit_key(arm: str, sigma: float, seed: int) -> str:
    return f"{arm}-s{sigma:g}-seed{seed}"


def _training_name(cfg: dict, arm: str, sigma: float, seed: int) -> str:
    if arm == "clean":  # trained once per seed, without noise
        return f"{cfg['model']}-{cfg['dataset']}-clean-seed{seed}"
    return f"{cfg['model']}-{cfg['dataset']}-{arm}-{cfg['device_model']}-s{sigma:g}-seed{seed}"


def plan(cfg: dict) -> list[dict]:
    """The units in the order ``run`` does them: per σ_d (config order: the headline 0.35 first), per
    seed, every arm, so the first σ_d's reading is complete before the next one starts."""
    units = []
    for sigma in cfg["sigmas"]:
        for seed in cfg["seeds"]:
            for arm in cfg["arms"]:
                units.append(
                    {"key": unit_key(arm, float(sigma), seed), "arm": arm, "sigma": float(sigma), "seed": seed}
                )
    return units


def unit_spec(cfg: dict, unit: dict) -> dict:
    """Everything that shapes a unit's result (a recorded unit with another spec is redone)."""
    return {k: cfg[k] for k in _SHAPING} | {"arm": unit["arm"], "sigma": unit["sigma"], "seed": unit["seed"]}


def converged(record: dict, criterion: dict) -> bool:
    """The study's convergence criterion (docs/fidelity-study.md): the trained model's clean test accuracy
    is at least ``min_clean_accuracy`` and no class takes more than ``max_class_share`` of its clean
    predictions on the test set (a collapsed model predicts one class)."""
    hist = record["prediction_histogram"]
    share = max(hist) / sum(hist)
    return record["clean_accuracy"] >= criterion["min_clean_accuracy"] and share <= criterion["max_class_share"]


# --------------------------------------------------------------------------------------------------
# Results file (JSON lines)
# --------------------------------------------------------------------------------------------------


def load_results(path) -> dict:
    """{"config": the config of the last run line, "environment": its stamp, "units": [records]} from a
    results file: the units made with that config's settings (records of an earlier config are
    superseded), the last record of each (:func:`studies.resumable.load_results`)."""
    return resumable.load_results(path, unit_spec)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _training_item(cfg: dict, unit: dict) -> dict:
    arm = ARMS[unit["arm"]]
    clean = unit["arm"] == "clean"
    return {
        "name": _training_name(cfg, unit["arm"], unit["sigma"], unit["seed"]),
        "model": cfg["model"],
        "dataset": cfg["dataset"],
        "sigma": 0.0 if clean else unit["sigma"],
        "device_model": cfg["device_model"],
        "seed": unit["seed"],
        "epochs": cfg["epochs"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["lr"],
        "width": cfg["width"],
        "init": cfg["init"],
        "preprocess": cfg["preprocess"],
        "val_fraction": cfg["val_fraction"],
        **arm,
    }


def _clean_predictions(cfg: dict, model_path: str) -> list[int]:
    """How many test images the trained model predicts as each class, noise off."""
    import torch

    from nft_cuda.eval.run import model_preprocess
    from nft_cuda.io import load_model
    from nft_cuda.nn import noise_mode

    model, payload = load_model(model_path, device=cfg["device"])
    x, _ = reproduce.study_test_set(cfg, cfg["dataset"], model_preprocess(payload))
    counts = torch.zeros(payload["model"]["num_classes"], dtype=torch.int64)
    model.eval()
    with torch.no_grad(), noise_mode(model, "off"):
        for i in range(0, x.shape[0], 500):
            pred = model(x[i : i + 500].to(cfg["device"])).argmax(dim=1).cpu()
            counts += torch.bincount(pred, minlength=counts.numel())
    return counts.tolist()


def _train(cfg: dict, item: dict, out: Path, progress: bool, shared: dict) -> tuple[dict, bool]:
    """(training record, reused): a training already made in ``out`` with the same settings (the clean
    model of another σ_d, or a unit interrupted during its evaluation) is reused."""
    spec = {k: cfg[k] for k in _SHAPING if k not in ("runs", "eval_seed")} | item
    return resumable.train_or_reuse(cfg, item, spec, out, "fidelity_training.json", progress, shared)


def _do_unit(cfg: dict, unit: dict, out: Path, progress: bool, shared: dict) -> dict:
    item = _training_item(cfg, unit)
    trained, reused = _train(cfg, item, out, progress, shared)
    point = {"name": unit["key"], "sigma": unit["sigma"], "device_model": cfg["device_model"]}
    ev = reproduce.with_cpu_time(reproduce.eval_one, cfg, point, trained["model_path"], cfg["dataset"], progress)
    c0 = time.process_time()
    hist = _clean_predictions(cfg, trained["model_path"])
    record = {
        "key": unit["key"],
        "spec": unit_spec(cfg, unit),
        "arm": unit["arm"],
        "sigma": unit["sigma"],
        "seed": unit["seed"],
        "training_name": item["name"],
        "training": {k: v for k, v in trained.items() if k != "model_path"} | {"reused": reused},
        "runs": ev["runs"],
        "num_inputs": ev["num_inputs"],
        "eval_seed": ev["seed"],
        "accuracy_mean": ev["accuracy_mean"],
        "ci95": ev["ci95"],
        "ekl": ev["ekl"],
        "clean_accuracy": ev["clean_accuracy"],
        "per_instance_accuracy": ev["per_instance_accuracy"],
        "prediction_histogram": hist,
        "eval_cpu_s": ev["cpu_s"] + time.process_time() - c0,
    }
    record["converged"] = converged(record, cfg["convergence"])
    record["cpu_s"] = record["eval_cpu_s"] + trained["cpu_s"]  # a shared clean training counts in each unit
    return record


def select_units(units: list[dict], cfg: dict, sigmas=None, seeds=None) -> list[dict]:
    """The units at the σ_d in ``sigmas`` and the seeds in ``seeds`` (each one of the config's; None: all),
    so that two processes can share a study. Units of other σ_d share no training but the clean model of
    their seed, which the second process reuses from ``out`` once it is there; units of other seeds share
    none (``python -m studies.fidelity run --sigmas 0.3 --seeds 2 --results B``)."""
    wanted = {}
    for name, given in (("sigmas", sigmas), ("seeds", seeds)):
        if given is None:
            continue
        known = {float(k) for k in cfg[name]}
        unknown = sorted(x for x in set(given) if float(x) not in known)
        if unknown:
            raise ValueError(f"--{name} {unknown} not in the config's {name} {cfg[name]}")
        wanted[name] = {float(x) for x in given}
    return [
        u
        for u in units
        if u["sigma"] in wanted.get("sigmas", (u["sigma"],)) and u["seed"] in wanted.get("seeds", (u["seed"],))
    ]


def _describe(record: dict) -> str:
    return (
        f"accuracy under variation {100 * record['accuracy_mean']:.2f} ± {100 * record['ci95']:.2f} %, "
        f"clean {100 * record['clean_accuracy']:.2f} %, converged {record['converged']}, "
        f"CPU {record['cpu_s']:.0f} s"
    )


def run(
    cfg: dict,
    out,
    *,
    results=None,
    progress: bool = False,
    log=print,
    max_units: int | None = None,
    sigmas=None,
    seeds=None,
) -> dict:
    """Do (or continue) the units of ``cfg`` not yet in the results file (default ``cfg["results"]``),
    appending each as it finishes; at most ``max_units`` of them, only those at ``sigmas`` and ``seeds`` when
    given (:func:`select_units`). Returns :func:`load_results`."""
    out = Path(out)
    return resumable.run_units(
        cfg,
        select_units(plan(cfg), cfg, sigmas, seeds),
        Path(results or cfg["results"]),
        spec_of=unit_spec,
        do_unit=lambda unit, shared: _do_unit(cfg, unit, out, progress, shared),
        describe=_describe,
        log=log,
        max_units=max_units,
    )


# --------------------------------------------------------------------------------------------------
# Reading criteria (written before the study ran: docs/fidelity-study.md, "Reading criteria")
# --------------------------------------------------------------------------------------------------

#: The thresholds of the reading (accuracy under variation, %, and percentage points).
COLLAPSED, ESCAPED, GAIN, SAME = 60.0, 85.0, 5.0, 2.0
#: Paired differences shown per (σ_d, seed): (arm, baseline arm).
PAIRS = (("ovf", "noise"), ("ovf", "noise-t4"), ("noise-t4", "noise"), ("ovf", "ovf-bnmain"), ("irs", "noise"))


def _chip_mean(unit: dict) -> float:
    return reproduce.mean_ci(unit["per_instance_accuracy"])[0]


def _by_cell(results: dict) -> dict:
    return {(u["arm"], u["sigma"], u["seed"]): u for u in results["units"]}


def readings(results: dict, sigma: float) -> dict:
    """The criteria at ``sigma`` over the seeds that have every arm they need: which of "confirms",
    "temperature artefact", "refutes" hold (none: "inconclusive"), and the BatchNorm reading."""
    cells = _by_cell(results)
    seeds = sorted({u["seed"] for u in results["units"]})
    acc = {
        seed: {arm: _chip_mean(cells[arm, sigma, seed]) for arm in ARMS if (arm, sigma, seed) in cells}
        for seed in seeds
    }
    main = [a for a in acc.values() if {"noise", "noise-t4", "ovf", "irs"} <= set(a)]
    out = {"seeds": len(main), "holds": [], "bn": None}
    if len(main) < 3:
        out["holds"] = ["incomplete"]
        return out
    most = math.ceil(2 * len(main) / 3)
    if (
        sum(a["noise"] < COLLAPSED and a["noise-t4"] < COLLAPSED and max(a["ovf"], a["irs"]) >= ESCAPED for a in main)
        >= most
    ):
        out["holds"].append("confirms")
    if all(a["ovf"] - a["noise"] >= GAIN and abs(a["ovf"] - a["noise-t4"]) <= SAME for a in main):
        out["holds"].append("temperature artefact")
    if sum(a["ovf"] - a["noise"] <= SAME for a in main) >= most:
        out["holds"].append("refutes")
    out["holds"] = out["holds"] or ["inconclusive"]
    bn = [a for a in main if "ovf-bnmain" in a]
    if len(bn) >= 3:
        if sum(a["ovf"] - a["ovf-bnmain"] >= GAIN for a in bn) >= math.ceil(2 * len(bn) / 3):
            out["bn"] = "BN statistics of the oriented forwards help"
        elif all(abs(a["ovf"] - a["ovf-bnmain"]) <= SAME for a in bn):
            out["bn"] = "BN statistics play no part"
        else:
            out["bn"] = "unclear"
    out["collapse"] = {arm: sum(a[arm] < COLLAPSED for a in main) for arm in ("noise", "noise-t4", "ovf", "irs")}
    return out


# --------------------------------------------------------------------------------------------------
# Tables and plot (recomputed from the results file)
# --------------------------------------------------------------------------------------------------


def _arms_present(cfg: dict, cells: dict) -> list[str]:
    return [a for a in cfg["arms"] if any(k[0] == a for k in cells)]


def _accuracy_rows(cfg: dict, cells: dict, sigmas: list[float], seeds: list[int]) -> list[str]:
    rows = []
    for arm in _arms_present(cfg, cells):
        cols = []
        for s in sigmas:
            per = [_chip_mean(cells[arm, s, seed]) for seed in seeds if (arm, s, seed) in cells]
            cols.append("–" if not per else f"{math.fsum(per) / len(per):.2f} ({' / '.join(f'{v:.1f}' for v in per)})")
        rows.append(f"| {ARM_NAMES[arm]} | " + " | ".join(cols) + " |")
    return rows


def _convergence_rows(cfg: dict, cells: dict, sigmas: list[float], seeds: list[int]) -> list[str]:
    rows = []
    for arm in _arms_present(cfg, cells):
        cols = []
        for s in sigmas:
            units = [cells[arm, s, seed] for seed in seeds if (arm, s, seed) in cells]
            ok = sum(converged(u, cfg["convergence"]) for u in units)
            cols.append("–" if not units else f"{ok}/{len(units)}")
        rows.append(f"| {ARM_NAMES[arm]} | " + " | ".join(cols) + " |")
    return rows


#: Two-sided 95 % quantiles of Student's t by degrees of freedom (standard table values): with three
#: seeds the normal 1.96 would understate the seed-to-seed interval by a factor of 2.2.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def across_seeds(diffs: list[float]) -> tuple[float, float] | None:
    """(mean, t-CI95 half-width) of per-seed differences: the CI of the mean difference over training
    seeds, which counts the seed-to-seed spread the per-seed chip CIs leave out. None below two seeds
    or beyond the table."""
    n = len(diffs)
    if n < 2 or n - 1 not in T975:
        return None
    mean = math.fsum(diffs) / n
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, T975[n - 1] * sd / math.sqrt(n)


def _paired_rows(cells: dict, sigmas: list[float], seeds: list[int]) -> list[str]:
    from nft_cuda.eval.paired import paired_difference

    rows = []
    for s in sigmas:
        per_pair: dict = {pair: [] for pair in PAIRS}
        for seed in seeds:
            cols = []
            for a, b in PAIRS:
                ua, ub = cells.get((a, s, seed)), cells.get((b, s, seed))
                if ua is None or ub is None:
                    cols.append("–")
                    continue
                d = paired_difference(ua["per_instance_accuracy"], ub["per_instance_accuracy"])
                per_pair[a, b].append(100 * d["mean"])
                cols.append(f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}")
            if any(c != "–" for c in cols):
                rows.append(f"| {s:g} | {seed} | " + " | ".join(cols) + " |")
        summaries = [across_seeds(per_pair[pair]) for pair in PAIRS]
        if any(summaries):
            cols = [
                "–" if x is None else f"{x[0]:+.2f} ± {x[1]:.2f} (n = {len(per_pair[pair])})"
                for pair, x in zip(PAIRS, summaries)
            ]
            rows.append(f"| {s:g} | seeds | " + " | ".join(cols) + " |")
    return rows


def arm_costs(results: dict) -> dict:
    """Per recorded arm: (units, trainings, mean training CPU s with each training counted once, mean
    evaluation CPU s), the Compute table's row and the basis of :func:`remaining`'s estimate."""
    by_arm: dict = {}
    for u in results["units"]:
        by_arm.setdefault(u["arm"], []).append(u)
    costs = {}
    for arm, units in by_arm.items():
        trainings = {u["training_name"]: u["training"]["cpu_s"] for u in units}
        train_mean = math.fsum(trainings.values()) / len(trainings)
        costs[arm] = (len(units), len(trainings), train_mean, math.fsum(u["eval_cpu_s"] for u in units) / len(units))
    return costs


def _compute_rows(cfg: dict, results: dict) -> list[str]:
    costs = arm_costs(results)
    rows = []
    for arm in _arms_present(cfg, _by_cell(results)):
        n, trainings, train_mean, eval_mean = costs[arm]
        rows.append(f"| {ARM_NAMES[arm]} | {n} | {trainings} | {train_mean:.0f} | {eval_mean:.0f} |")
    return rows


def total_cpu_s(results: dict) -> float:
    """CPU seconds of the recorded work: every training once (a clean model serves each σ_d) + every evaluation."""
    trainings = {u["training_name"]: u["training"]["cpu_s"] for u in results["units"]}
    return math.fsum(trainings.values()) + math.fsum(u["eval_cpu_s"] for u in results["units"])


def render_tables(results: dict) -> str:
    """The Markdown block of docs/fidelity-study.md, computed from ``results`` (:func:`load_results`)."""
    cfg, cells = results["config"], _by_cell(results)
    sigmas = sorted({u["sigma"] for u in results["units"]}, reverse=True)
    seeds = sorted({u["seed"] for u in results["units"]})
    runs = sorted({u["runs"] for u in results["units"]})
    inputs = sorted({u["num_inputs"] for u in results["units"]})
    head = "| arm | " + " | ".join(f"σ_d = {s:g}" for s in sigmas) + " |"
    rule = "|---|" + "---|" * len(sigmas)
    out = [
        f"Recomputed from `{cfg['results']}` by `python -m studies.fidelity report`: {len(results['units'])} of "
        f"{len(plan(cfg))} units ({cfg['model']} width {cfg['width']:g}, {cfg['epochs']} epoch(s), init "
        f"{cfg['init']}, preprocessing {cfg['preprocess']}, {cfg['device_model']}; "
        f"{'/'.join(map(str, runs))} common chips on {'/'.join(map(str, inputs))} test images; seeds "
        f"{', '.join(map(str, seeds))}).",
        "",
        f"**Accuracy under variation (%)**: mean over seeds of the {'/'.join(map(str, runs))}-chip mean (per seed in brackets)",
        "",
        head,
        rule,
        *_accuracy_rows(cfg, cells, sigmas, seeds),
        "",
        f"**Convergence** (seeds whose model converged: clean test accuracy ≥ "
        f"{100 * cfg['convergence']['min_clean_accuracy']:g} % and no class over "
        f"{100 * cfg['convergence']['max_class_share']:g} % of the clean predictions)",
        "",
        head,
        rule,
        *_convergence_rows(cfg, cells, sigmas, seeds),
        "",
        "**Paired differences** (percentage points, mean ± CI95 over the common chips; row *seeds*: the "
        "mean of the n per-seed differences ± Student's t CI95 over the seeds, which counts the "
        "seed-to-seed spread)",
        "",
        "| σ_d | seed | " + " | ".join(f"{ARM_NAMES[a]} − {ARM_NAMES[b]}" for a, b in PAIRS) + " |",
        "|---|---|" + "---|" * len(PAIRS),
        *_paired_rows(cells, sigmas, seeds),
        "",
        "**Reading** (the criteria above, applied mechanically)",
        "",
        "| σ_d | seeds with all arms | criteria that hold | BatchNorm arm |",
        "|---|---|---|---|",
    ]
    for s in sigmas:
        r = readings(results, s)
        out.append(f"| {s:g} | {r['seeds']} | {', '.join(r['holds'])} | {r['bn'] or '–'} |")
    out += [
        "",
        "**Compute** (CPU seconds per unit, one thread)",
        "",
        "| arm | units | trainings | training CPU s (mean) | evaluation CPU s (mean) |",
        "|---|---|---|---|---|",
        *_compute_rows(cfg, results),
        "",
        f"Total CPU time recorded: **{total_cpu_s(results) / 3600:.2f} h** (each training counted once).",
    ]
    return "\n".join(out) + "\n"


def plot(results: dict, path) -> None:
    """Accuracy under variation vs σ_d per arm: the mean over seeds (line) and each seed (dots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg, cells = results["config"], _by_cell(results)
    sigmas = sorted({u["sigma"] for u in results["units"]})
    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, arm in enumerate(_arms_present(cfg, cells)):
        color = f"C{i}"
        xs, means = [], []
        for s in sigmas:
            per = [_chip_mean(u) for (a, sig, _), u in sorted(cells.items()) if a == arm and sig == s]
            if per:
                xs.append(s + (i - 2.5) * 0.002)
                means.append(math.fsum(per) / len(per))
                ax.plot([xs[-1]] * len(per), per, ".", color=color, alpha=0.5)
        ax.plot(xs, means, "-o", color=color, label=ARM_NAMES[arm])
    ax.axhline(COLLAPSED, color="grey", lw=0.8, ls=":")
    ax.set_title(f"{cfg['model']} width {cfg['width']:g}, MNIST, paper init + preprocessing, {cfg['epochs']} ep.")
    ax.set_xlabel("σ_d (train = test)")
    ax.set_ylabel("accuracy under variation (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.fidelity", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="do the units not yet in the results file (resumable across sessions)")
    r.add_argument("--config", default=str(DEFAULT_CONFIG))
    r.add_argument("--out", default=os.path.join("runs", "fidelity"), help="training folders (default runs/fidelity)")
    r.add_argument("--results", help="results file (default: the config's 'results')")
    r.add_argument("--data-dir", dest="data_dir", help="data folder (default $NFT_DATA_DIR)")
    r.add_argument("--max-units", dest="max_units", type=int, help="stop after this many units")
    r.add_argument("--sigmas", type=float, nargs="+", help="only the units at these σ_d (a second process's share)")
    r.add_argument("--seeds", type=int, nargs="+", help="only the units of these seeds (a second process's share)")
    r.add_argument("--progress", action="store_true", help="progress bars")
    s = sub.add_parser("report", help="recompute the page's tables and plot from the results file")
    s.add_argument("--results", default="docs/fidelity-study/results.jsonl")
    s.add_argument("--doc", default="docs/fidelity-study.md")
    s.add_argument("--plot", default="docs/fidelity-study/accuracy.png")
    q = sub.add_parser("plan", help="list the units of a config, which are done, and the CPU time left")
    q.add_argument("--config", default=str(DEFAULT_CONFIG))
    q.add_argument("--results", help="results file (default: the config's 'results')")
    return p


def estimate_cpu_s(cfg: dict) -> float | None:
    """The config's time estimate (``cpu_s_per_unit``: arm → CPU seconds per unit, measured), if any."""
    per = cfg.get("cpu_s_per_unit")
    if not per:
        return None
    return math.fsum(per[u["arm"]] for u in plan(cfg))


def remaining(cfg: dict, results: dict) -> tuple[list[dict], float | None]:
    """(the units of ``cfg`` not yet in ``results``, their CPU seconds estimated from the recorded units):
    per arm, the mean of its recorded trainings (counted once) plus the mean evaluation; a clean unit whose
    seed's clean model is already trained costs its evaluation only. None when an arm to do has no record."""
    done = {u["key"] for u in results["units"]}
    todo = [u for u in plan(cfg) if u["key"] not in done]
    costs = arm_costs(results)
    trained_clean = {u["seed"] for u in results["units"] if u["arm"] == "clean"}
    total = 0.0
    for u in todo:
        if u["arm"] not in costs:
            return todo, None
        _, _, train, evaluation = costs[u["arm"]]
        if u["arm"] == "clean":
            if u["seed"] in trained_clean:
                train = 0.0
            trained_clean.add(u["seed"])
        total += train + evaluation
    return todo, total


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            cfg = load_config(args.config)
            if args.data_dir:
                cfg["data_dir"] = args.data_dir
            run(
                cfg,
                args.out,
                results=args.results,
                progress=args.progress,
                max_units=args.max_units,
                sigmas=args.sigmas,
                seeds=args.seeds,
            )
        elif args.command == "report":
            results = load_results(args.results)
            if not results["units"]:
                raise ValueError(f"{args.results} holds no finished unit")
            reproduce.update_doc(args.doc, results, render=render_tables, begin=BEGIN, end=END)
            plot(results, args.plot)
            print(render_tables(results))
            print(f"updated {args.doc} and {args.plot}")
        else:
            cfg = load_config(args.config)
            results = load_results(args.results or cfg["results"])
            todo, left = remaining(cfg, results)
            to_do = {u["key"] for u in todo}
            for u in plan(cfg):
                print(f"{u['key']:<24} {'to do' if u['key'] in to_do else 'done'}")
            est = estimate_cpu_s(cfg)
            print(f"{len(plan(cfg))} units" + (f", about {est / 3600:.1f} CPU hours (config estimate)" if est else ""))
            line = f"{len(todo)} to do (results: {args.results or cfg['results']})"
            print(line + (f", about {left / 3600:.1f} CPU hours at the recorded units' cost" if left else ""))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
