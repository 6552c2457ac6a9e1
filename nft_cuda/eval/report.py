"""Reports of a Monte-Carlo evaluation (DESIGN §6): JSON, CSV and a PNG plot.

A *report* is the JSON-able dict written by :func:`write_json`::

    {"results": [ {one dict per checkpoint × σ_d, as monte_carlo returns, plus "checkpoint"}, ... ],
     "model": ..., "dataset": ..., "seed": ..., "checkpoints": [...],
     "versions": {"nft_cuda": ..., "torch": ...}}

plus, when evaluated against a baseline, ``"baseline": label`` and ``"paired": [...]`` (one entry per other
checkpoint × σ_d: the per-chip differences to the baseline, see :mod:`nft_cuda.eval.paired`).

The execution strategy (instances per pass, number of processes, device) is not recorded: the numbers
do not depend on it (DESIGN §6), so two runs that differ only in it write the same file.
Floats are written with Python's shortest round-trip repr, so a JSON file reads back to the exact
float64 values. A statistic that is undefined (std and CIs with R = 1) is written as null.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import torch

from nft_cuda._files import atomic_write_bytes, atomic_write_text, json_safe
from nft_cuda.eval.tails import TAIL_PERCENTILES

__all__ = [
    "CSV_COLUMNS",
    "COMPENSATION_COLUMNS",
    "TAIL_COLUMNS",
    "compensation_rule",
    "drift_compensated",
    "build_report",
    "plot_results",
    "plot_time",
    "read_json",
    "write_csv",
    "write_json",
]

#: The low-tail columns of the CSV: the k-th percentile chip (an order statistic) and its
#: distribution-free CI95 bounds (empty where R chips cannot bound that side), k = 1, 5, 10.
TAIL_COLUMNS = tuple(f"tail_p{k}{part}" for k in TAIL_PERCENTILES for part in ("", "_ci_low", "_ci_high"))
#: Columns of the CSV (one row per checkpoint × σ_d); percentiles flattened as accuracy_p5 ... p95
#: (numpy's interpolation), then the tail columns.
CSV_COLUMNS = (
    "checkpoint",
    "sigma",
    "device_model",
    "time_s",
    "runs",
    "seed",
    "num_inputs",
    "accuracy_mean",
    "accuracy_std",
    "ci95",
    "ci99",
    "accuracy_min",
    "accuracy_max",
    "accuracy_p5",
    "accuracy_p25",
    "accuracy_p50",
    "accuracy_p75",
    "accuracy_p95",
    *TAIL_COLUMNS,
    "confidence",
    "ekl",
    "clean_accuracy",
)


#: Columns the CSV adds when results carry a drift-compensation flag (PCM models): the flag and the
#: compensation rule of the compensated rows (empty on the others).
COMPENSATION_COLUMNS = ("drift_compensation", "compensation_rule")


def drift_compensated(result: dict) -> bool | None:
    """Whether a result's device model compensates drift (PCM), None for a model without the setting."""
    return (result.get("device") or {}).get("drift_compensation")


def compensation_rule(result: dict) -> str | None:
    """The drift-compensation rule of a compensated result ("one-hot", "all-ones"; a result written before
    the rule existed: "all-ones", the only rule then), None when the result is not compensated."""
    if not drift_compensated(result):
        return None
    return (result.get("device") or {}).get("compensation_rule", "all-ones")


def versions() -> dict:
    import nft_cuda

    return {"nft_cuda": nft_cuda.__version__, "torch": torch.__version__}


def build_report(results: Sequence[dict], *, model=None, dataset=None, seed=None, checkpoints=None, **extra) -> dict:
    """The report dict: ``results`` plus the run's description and the library versions."""
    report = {"results": [dict(r) for r in results], "model": model, "dataset": dataset, "seed": seed}
    if checkpoints is not None:
        report["checkpoints"] = list(checkpoints)
    report.update(extra)
    report["versions"] = versions()
    return report


def write_json(report, path: str) -> None:
    """Write a report (:func:`build_report`), or a bare list of results, as JSON (atomically)."""
    if not isinstance(report, dict):
        report = build_report(report)
    atomic_write_text(path, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _label(result: dict) -> str:
    return str(result.get("checkpoint", result.get("label", "model")))


def _tail_cells(result: dict) -> dict:
    """The :data:`TAIL_COLUMNS` of one result (empty for a result written before tails were reported)."""
    cells = {}
    for k in TAIL_PERCENTILES:
        tail = (result.get("accuracy_tails") or {}).get(str(k), {})
        cells[f"tail_p{k}"] = tail.get("value")
        cells[f"tail_p{k}_ci_low"] = tail.get("ci_low")
        cells[f"tail_p{k}_ci_high"] = tail.get("ci_high")
    return cells


def write_csv(results, path: str) -> None:
    """One row per checkpoint × σ_d (columns :data:`CSV_COLUMNS`; the per-instance accuracies are
    only in the JSON). ``results`` may be a report dict or a list of result dicts. A report with a
    baseline adds the :data:`~nft_cuda.eval.paired.PAIRED_COLUMNS` (empty on the baseline's rows)."""
    from nft_cuda.eval.paired import PAIRED_COLUMNS

    paired = {}
    if isinstance(results, dict):
        paired = {
            (p["checkpoint"], p["sigma"], p["device_model"], p.get("time_s")): p for p in results.get("paired") or ()
        }
        results = results["results"]
    compensation = COMPENSATION_COLUMNS if any(drift_compensated(r) is not None for r in results) else ()
    columns = CSV_COLUMNS + compensation + (PAIRED_COLUMNS if paired else ())
    rows = []
    for r in results:
        pct = r.get("accuracy_percentiles", {})
        p = paired.get((_label(r), r.get("sigma"), r.get("device_model"), r.get("time_s")), {})
        row = {c: p.get(c) if c in PAIRED_COLUMNS else r.get(c) for c in columns}
        row["checkpoint"] = _label(r)
        if compensation:
            row["drift_compensation"] = drift_compensated(r)
            row["compensation_rule"] = compensation_rule(r)
        for q in (5, 25, 50, 75, 95):
            row[f"accuracy_p{q}"] = pct.get(str(q))
        row.update(_tail_cells(r))
        rows.append({k: ("" if v is None else (repr(v) if isinstance(v, float) else v)) for k, v in row.items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _default_title(report: dict | None, results: Sequence[dict]) -> str:
    """What was evaluated: model, dataset and device model(s), so a plot read alone says it."""
    parts = []
    model = (report or {}).get("model")
    if isinstance(model, dict) and model.get("name"):
        parts.append(f"model {model['name']}")
    dataset = (report or {}).get("dataset")
    if isinstance(dataset, str):
        parts.append(f"dataset {dataset}")
    elif isinstance(dataset, dict):
        parts.append("datasets " + ", ".join(sorted(set(map(str, dataset.values())))))
    device_models = sorted({str(r.get("device_model")) for r in results if r.get("device_model")})
    if device_models:
        parts.append(("device model " if len(device_models) == 1 else "device models ") + ", ".join(device_models))
    return " · ".join(parts)


def plot_results(results, path: str, *, title: str | None = None) -> None:
    """PNG with two panels: accuracy vs σ_d with CI95 error bars, and EKL vs σ_d; one curve per
    checkpoint × device model. A report with a baseline adds a third panel: the paired accuracy
    difference to the baseline with its CI95 band (:func:`nft_cuda.eval.paired.plot_paired`). The
    title names the model, dataset and device model (from a report dict; ``title`` replaces it). Needs
    matplotlib (``pip install nft_cuda[plot]``); draws with the Agg canvas directly, without pyplot, so
    matplotlib's global backend is left alone."""
    report = results if isinstance(results, dict) else None
    paired = None
    if report is not None:
        paired = report.get("paired") or None
        results = report["results"]
    if title is None:
        title = _default_title(report, results)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or nft_cuda[plot])") from exc

    curves: dict[str, list[dict]] = {}
    labels = {_label(r) for r in results}
    models = {r.get("device_model") for r in results}
    for r in results:
        name = _label(r)
        if len(models) > 1:
            name = f"{name} ({r.get('device_model')})" if len(labels) > 1 else str(r.get("device_model"))
        curves.setdefault(name, []).append(r)

    fig = Figure(figsize=(16.5 if paired else 11, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if paired else 2)
    ax_acc, ax_ekl = axes[0], axes[1]
    colors = {}
    for name, rs in curves.items():
        rs = sorted(rs, key=lambda r: r["sigma"])
        sig = [r["sigma"] for r in rs]
        acc = [100.0 * r["accuracy_mean"] for r in rs]
        err = [100.0 * (r["ci95"] or 0.0) for r in rs]
        colors[name] = ax_acc.errorbar(sig, acc, yerr=err, marker="o", capsize=3, label=name).lines[0].get_color()
        ax_ekl.plot(sig, [r["ekl"] for r in rs], marker="o", label=name)
    if paired:
        from nft_cuda.eval.paired import plot_paired

        plot_paired(axes[2], paired, colors)
    runs = sorted({r["runs"] for r in results})
    ax_acc.set_xlabel("device variation σ_d")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title(f"accuracy, mean ± CI95 over {'/'.join(map(str, runs))} chip instances")
    ax_ekl.set_xlabel("device variation σ_d")
    ax_ekl.set_ylabel("EKL (nats)")
    ax_ekl.set_title("epistemic uncertainty (expected KL)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())


def _time_curves(results: Sequence[dict]) -> dict[str, list[dict]]:
    """The results of each line of :func:`plot_time`: one per checkpoint, split by σ_d, device model and
    drift compensation where those vary."""
    vary = {key: len({r.get(key) for r in results}) > 1 for key in ("checkpoint", "sigma", "device_model")}
    vary["drift_compensation"] = len({(drift_compensated(r), compensation_rule(r)) for r in results}) > 1
    curves: dict[str, list[dict]] = {}
    for r in results:
        parts = [_label(r)] if vary["checkpoint"] or not any(vary.values()) else []
        if vary["sigma"]:
            parts.append(f"σ={r['sigma']:g}")
        if vary["device_model"]:
            parts.append(str(r.get("device_model")))
        if vary["drift_compensation"]:
            parts.append(f"drift-compensated ({compensation_rule(r)})" if drift_compensated(r) else "uncompensated")
        curves.setdefault(", ".join(parts), []).append(r)
    return curves


def plot_time(results, path: str, *, title: str | None = None) -> None:
    """PNG: accuracy (mean, CI95 band) and EKL against the time after programming (``time_s``, log axis;
    symmetric-log when t = 0 is among the times), one line per checkpoint (split by σ_d, device model and
    drift compensation where they vary). What ``nft eval --plot`` writes for a ``--time`` sweep of several
    times. Needs matplotlib; draws on the Agg canvas without pyplot."""
    report = results if isinstance(results, dict) else None
    results = report["results"] if report is not None else list(results)
    if any("time_s" not in r for r in results):
        raise ValueError("plot_time needs results with 'time_s' (evaluate with nft eval --time ...)")
    if title is None:
        title = _default_title(report, results)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or nft_cuda[plot])") from exc

    fig = Figure(figsize=(11, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax_acc, ax_ekl = fig.subplots(1, 2)
    for name, rs in _time_curves(results).items():
        rs = sorted(rs, key=lambda r: r["time_s"])
        t = [r["time_s"] for r in rs]
        acc = [100.0 * r["accuracy_mean"] for r in rs]
        ci = [100.0 * (r.get("ci95") or 0.0) for r in rs]
        line = ax_acc.plot(t, acc, marker="o", label=name)[0]
        ax_acc.fill_between(t, [a - c for a, c in zip(acc, ci)], [a + c for a, c in zip(acc, ci)],
                            color=line.get_color(), alpha=0.2)  # fmt: skip
        ax_ekl.plot(t, [r["ekl"] for r in rs], marker="o", color=line.get_color(), label=name)
    zero = any(r["time_s"] <= 0 for r in results)
    runs = sorted({r["runs"] for r in results})
    for ax in (ax_acc, ax_ekl):
        if zero:
            ax.set_xscale("symlog", linthresh=1.0)
        else:
            ax.set_xscale("log")
        ax.set_xlabel("time after programming (s, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title(f"accuracy, mean with CI95 band over {'/'.join(map(str, runs))} chips")
    ax_ekl.set_ylabel("EKL (nats)")
    ax_ekl.set_title("epistemic uncertainty (expected KL)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())
