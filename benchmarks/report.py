"""Reports: the summary table (Markdown) and the JSON of a run, and reading a saved run back."""

from __future__ import annotations

import json
import math

from benchmarks.results import Compare, Row
from benchmarks.timing import Timing
from nft_cuda import _files


def fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "nan"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_timing(t: Timing) -> str:
    if math.isnan(t.median_s):
        return "nan (OOM)"
    return f"{fmt_time(t.median_s)} ({fmt_time(t.min_s)}–{fmt_time(t.max_s)})"


def _fmt_ratio(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _fmt_compare(c: Compare) -> str:
    if c.kind == "time":
        return f"{_fmt_ratio(c.value)}× {c.baseline}"
    return f"speed-up {_fmt_ratio(c.value)}× vs {c.baseline}"


def _fmt_target(c: Compare) -> str:
    if c.target is None:
        return ""
    return c.target if c.kind == "time" else f"{c.target} vs {c.baseline}"


def _fmt_met(c: Compare) -> str:
    if c.met is None:
        return ""
    s = "yes" if c.met else "**no**"
    return s if c.exact else f"({s})"


def _fmt_throughput(r: Row) -> str:
    if r.throughput is None or math.isnan(r.throughput):
        return ""
    v = r.throughput
    s = f"{v:.3g} {r.unit}" if v < 1000 else f"{v:,.0f} {r.unit}"
    if r.ceiling_pct is not None:
        s += f" ({r.ceiling_pct:.0f}% of {r.ceiling})"
    return s


SUMMARY_HEADERS = ["case", "variant", "median (min–max)", "throughput", "ratio", "DESIGN §8 target", "met?"]


def summary_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        targeted = [c for c in r.compares if c.target]
        out.append(
            [
                r.case,
                r.variant + (f" ({r.note})" if r.note else ""),
                "—" if r.skipped else fmt_timing(r.timing),
                _fmt_throughput(r),
                "; ".join(_fmt_compare(c) for c in r.compares),
                "; ".join(_fmt_target(c) for c in targeted),
                "; ".join(_fmt_met(c) for c in targeted),
            ]
        )
    return out


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    return markdown_table(SUMMARY_HEADERS, summary_rows(rows))


def write_json(path: str, env: dict, results: list, **extra) -> None:
    payload = {"environment": env, **extra, "results": [r.to_dict() if isinstance(r, Row) else r for r in results]}
    # Rewritten after every case: atomically, so an interrupted run leaves its last complete state. NaN stays a
    # number here (Python's JSON reads it back), unlike the library's reports (_files.json_safe: null).
    _files.atomic_write_text(path, json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")


def rows_from_json(data: dict) -> list[Row]:
    """The rows of a JSON written by :func:`write_json` (to re-render its table)."""
    rows = []
    for r in data["results"]:
        t = Timing(r["variant"], r["median_s"], r["min_s"], r["max_s"], r["runs"])
        rows.append(
            Row(
                r["case"],
                r["variant"],
                t,
                r.get("throughput"),
                r.get("unit"),
                r.get("ceiling"),
                r.get("ceiling_pct"),
                [Compare(**c) for c in r.get("compares", [])],
                r.get("note", ""),
                r.get("threads", 0),
                r.get("skipped", False),
            )
        )
    return rows


PEER_HEADERS = [
    "case",
    "nft_cuda",
    "aihwkit-lightning",
    "reference",
    "compiled",
    "clean",
    "speed-up vs peer",
    "DESIGN §8",
    "met?",
]


def peer_summary_rows(rows: list[Row], peer: str) -> list[list[str]]:
    """One line per case where the peer ran: the medians of nft_cuda's variant, the peer (its Triton path
    where it ran, the row DESIGN §8 judges), the reference way, the compiled composite and clean, and
    nft_cuda's speed-up vs the peer."""
    by_case: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.variant] = r
    out = []
    for case, variants in by_case.items():
        for r in variants.values():
            c = next((c for c in r.compares if c.baseline.startswith(peer) and c.target), None)
            if c is None:
                continue
            cell = lambda k: fmt_time(variants[k].timing.median_s) if k in variants else "—"  # noqa: E731
            out.append(
                [
                    case,
                    f"{fmt_time(r.timing.median_s)} ({r.variant})",
                    cell(c.baseline),
                    cell("reference"),
                    cell("compiled"),
                    cell("clean"),
                    f"{_fmt_ratio(c.value)}×",
                    _fmt_target(c),
                    _fmt_met(c),
                ]
            )
    return out


def peer_summary_table(rows: list[Row], peer: str) -> str:
    """:func:`peer_summary_rows` as Markdown ("" when the peer ran in no case)."""
    body = peer_summary_rows(rows, peer)
    return markdown_table(PEER_HEADERS, body) if body else ""
