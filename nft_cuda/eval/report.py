"""Reports of a Monte-Carlo evaluation (DESIGN §6): JSON, CSV and a PNG plot.

A *report* is the JSON-able dict written by :func:`write_json`::

    {"results": [ {one dict per checkpoint × σ_d, as monte_carlo returns, plus "checkpoint"}, ... ],
     "model": ..., "dataset": ..., "seed": ..., "checkpoints": [...],
     "versions": {"nft_cuda": ..., "torch": ...}}

The execution strategy (instances per pass, number of processes, device) is not recorded: the numbers
do not depend on it (DESIGN §6), so two runs that differ only in it write the same file.
Floats are written with Python's shortest round-trip repr, so a JSON file reads back to the exact
float64 values. A statistic that is undefined (std and CIs with R = 1) is written as null.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence

import torch

__all__ = ["CSV_COLUMNS", "build_report", "plot_results", "read_json", "write_csv", "write_json"]

#: Columns of the CSV (one row per checkpoint × σ_d); percentiles flattened as accuracy_p5 ... p95.
CSV_COLUMNS = ("checkpoint", "sigma", "device_model", "runs", "seed", "num_inputs", "accuracy_mean",
               "accuracy_std", "ci95", "ci99", "accuracy_min", "accuracy_max", "accuracy_p5", "accuracy_p25",
               "accuracy_p50", "accuracy_p75", "accuracy_p95", "confidence", "ekl", "clean_accuracy")


def versions() -> dict:
    import nft_cuda

    return {"nft_cuda": nft_cuda.__version__, "torch": torch.__version__}


def build_report(results: Sequence[dict], *, model=None, dataset=None, seed=None, checkpoints=None,
                 **extra) -> dict:
    """The report dict: ``results`` plus the run's description and the library versions."""
    report = {"results": [dict(r) for r in results], "model": model, "dataset": dataset, "seed": seed}
    if checkpoints is not None:
        report["checkpoints"] = list(checkpoints)
    report.update(extra)
    report["versions"] = versions()
    return report


def _atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, text.encode("utf-8"))


def _atomic_write(path: str, data: bytes) -> None:
    """Temp file in the same folder, fsync'd, default permissions (not mkstemp's 0600), then renamed."""
    from nft_cuda.io import chmod_default

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj):
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(report, path: str) -> None:
    """Write a report (:func:`build_report`), or a bare list of results, as JSON (atomically)."""
    if not isinstance(report, dict):
        report = build_report(report)
    _atomic_write_text(path, json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _label(result: dict) -> str:
    return str(result.get("checkpoint", result.get("label", "model")))


def write_csv(results, path: str) -> None:
    """One row per checkpoint × σ_d (columns :data:`CSV_COLUMNS`; the per-instance accuracies are
    only in the JSON). ``results`` may be a report dict or a list of result dicts."""
    if isinstance(results, dict):
        results = results["results"]
    rows = []
    for r in results:
        pct = r.get("accuracy_percentiles", {})
        row = {c: r.get(c) for c in CSV_COLUMNS}
        row["checkpoint"] = _label(r)
        for q in (5, 25, 50, 75, 95):
            row[f"accuracy_p{q}"] = pct.get(str(q))
        rows.append({k: ("" if v is None else (repr(v) if isinstance(v, float) else v)) for k, v in row.items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(path, buf.getvalue())


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
    checkpoint × device model. The title names the model, dataset and device model (from a report
    dict; ``title`` replaces it). Needs matplotlib (``pip install nft_cuda[plot]``); draws with the Agg
    canvas directly, without pyplot, so matplotlib's global backend is left alone."""
    report = results if isinstance(results, dict) else None
    if report is not None:
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

    fig = Figure(figsize=(11, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax_acc, ax_ekl = fig.subplots(1, 2)
    for name, rs in curves.items():
        rs = sorted(rs, key=lambda r: r["sigma"])
        sig = [r["sigma"] for r in rs]
        acc = [100.0 * r["accuracy_mean"] for r in rs]
        err = [100.0 * (r["ci95"] or 0.0) for r in rs]
        ax_acc.errorbar(sig, acc, yerr=err, marker="o", capsize=3, label=name)
        ax_ekl.plot(sig, [r["ekl"] for r in rs], marker="o", label=name)
    runs = sorted({r["runs"] for r in results})
    ax_acc.set_xlabel("device variation σ_d")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title(f"accuracy, mean ± CI95 over {'/'.join(map(str, runs))} chip instances")
    ax_ekl.set_xlabel("device variation σ_d")
    ax_ekl.set_ylabel("EKL (nats)")
    ax_ekl.set_title("epistemic uncertainty (expected KL)")
    for ax in (ax_acc, ax_ekl):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    _atomic_write(path, png.getvalue())
