"""The performance history: one JSON file per run in benchmarks/history/, and comparing two runs.

``python -m benchmarks --json`` (no path) writes the run to ``benchmarks/history/<UTC time>-<commit>-
<device>-<quick|full>.json`` (the JSON of :func:`benchmarks.report.write_json`: environment with commit,
machine, versions and load; config; every row). ``python -m benchmarks --compare A.json B.json`` prints,
for every ratio both runs measured (same case, variant and baseline), its value in A and in B with the
spread the two rows' min–max times allow, and the change B / A; a change whose spreads do not overlap is
flagged "better" or "worse" (for a time ratio lower is better, for a speed-up higher).
"""

from __future__ import annotations

import json
import math
import os
import re

from benchmarks.config import TO_HISTORY

HISTORY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "history")


def history_path(env: dict, cfg: dict, directory: str | None = None) -> str:
    """A new file name in the history (``directory``, default :data:`HISTORY_DIR`) for a run with this
    environment and config."""
    directory = directory or HISTORY_DIR
    stamp = re.sub(r"[^0-9]", "", env.get("date", ""))[:12] or "unknown"
    commit = re.sub(r"[^0-9A-Za-z+]", "", str(env.get("commit", "unknown"))).replace("+", "-")
    base = f"{stamp[:8]}T{stamp[8:]}Z-{commit}-{cfg.get('device', 'cpu')}-{'quick' if cfg.get('quick') else 'full'}"
    path, n = os.path.join(directory, base + ".json"), 1
    while os.path.exists(path):  # two runs in one minute: keep both
        n += 1
        path = os.path.join(directory, f"{base}-{n}.json")
    return path


def json_path(arg: str | None, env: dict, cfg: dict) -> str | None:
    """Where ``--json [PATH]`` writes: PATH, a new history file (no PATH), or nowhere (no option)."""
    if arg != TO_HISTORY:
        return arg
    path = history_path(env, cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "results" not in data or "environment" not in data:
        raise SystemExit(
            f"{path}: not a benchmark run (no 'results'/'environment'); runs are written by python -m benchmarks --json"
        )
    return data


def _ratio_range(row: dict, base: dict, compare: dict) -> tuple[float, float]:
    """The range of a ratio that the two rows' min–max times allow (its value scaled, e.g. per sample)."""
    med = row["median_s"] / base["median_s"]
    if not med or math.isnan(med):
        return math.nan, math.nan
    k = compare["value"] / (med if compare["kind"] == "time" else 1 / med)
    lo, hi = row["min_s"] / base["max_s"], row["max_s"] / base["min_s"]
    if compare["kind"] == "speedup":
        lo, hi = 1 / hi, 1 / lo
    return k * lo, k * hi


def ratios(data: dict) -> dict[tuple[str, str, str, str], tuple[float, float, float]]:
    """(case, variant, kind, baseline) → (value, low, high) of every ratio of a run."""
    rows = {(r["case"], r["variant"]): r for r in data["results"]}
    out = {}
    for r in data["results"]:
        for c in r.get("compares", []):
            base = rows.get((r["case"], c["baseline"]))
            if base is None:
                continue
            lo, hi = _ratio_range(r, base, c)
            out[(r["case"], r["variant"], c["kind"], c["baseline"])] = (c["value"], lo, hi)
    return out


def _fmt(value: float, lo: float, hi: float) -> str:
    return f"{value:.3f} ({lo:.3f}–{hi:.3f})"


def compare_runs(a: dict, b: dict) -> tuple[list[str], list[list[str]]]:
    """The per-ratio change from run ``a`` to run ``b``: (notes on how the runs differ, table rows)."""
    notes = []
    ea, eb = a["environment"], b["environment"]
    for key in ("machine", "cpu_threads", "torch", "gpu"):
        if ea.get(key) != eb.get(key):
            notes.append(f"{key} differs: {ea.get(key)} → {eb.get(key)}")
    for key in ("device", "quick"):
        if a.get("config", {}).get(key) != b.get("config", {}).get(key):
            notes.append(f"config {key} differs: {a['config'].get(key)} → {b['config'].get(key)}")
    ra, rb = ratios(a), ratios(b)
    table = []
    for key in ra:
        if key not in rb:
            continue
        case, variant, kind, baseline = key
        va, la, ha = ra[key]
        vb, lb, hb = rb[key]
        change = vb / va if va else math.nan
        flag = ""
        if hb < la or lb > ha:  # the spreads do not overlap
            lower = hb < la
            flag = "**worse**" if lower == (kind == "speedup") else "better"
        what = "speed-up vs" if kind == "speedup" else "time ×"
        table.append([case, variant, f"{what} {baseline}", _fmt(va, la, ha), _fmt(vb, lb, hb), f"{change:.3f}", flag])
    only = len(set(ra) ^ set(rb))
    if only:
        notes.append(f"{only} ratio(s) measured in only one of the runs (not shown)")
    return notes, table


def compare_text(path_a: str, path_b: str) -> str:
    """The Markdown that ``--compare A B`` prints."""
    from benchmarks.report import markdown_table

    a, b = load(path_a), load(path_b)
    notes, table = compare_runs(a, b)
    head = [
        f"A: {path_a} (commit {a['environment'].get('commit')}, {a['environment'].get('date')})",
        f"B: {path_b} (commit {b['environment'].get('commit')}, {b['environment'].get('date')})",
    ]
    headers = ["case", "variant", "ratio", "A (spread)", "B (spread)", "B / A", "change"]
    lines = (
        head
        + [f"Note: {n}" for n in notes]
        + [
            "",
            markdown_table(headers, table),
            "",
            "spread: the range the two rows' min–max times allow; a change is flagged when the spreads "
            "of A and B do not overlap (time ratios: lower is better; speed-ups: higher).",
        ]
    )
    return "\n".join(lines) + "\n"
