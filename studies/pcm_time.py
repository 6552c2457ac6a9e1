"""The PCM time study: does a training method's robustness last a day, a month, a year after programming?

    python -m studies.pcm_time run    [--config studies/pcm_time.json] [--out runs/pcm-study] [--no-progress]
    python -m studies.pcm_time report [--results docs/pcm-study/results.json] [--doc docs/pcm-study.md]
                                      [--plot docs/pcm-study/accuracy_vs_time.png]

``run`` is the reproduction study's runner (:func:`studies.reproduce.run`: resumable, one record per
finished item) on a config whose group has a time axis: every model is evaluated under the PCM model
(docs/device-models.md) at each time after programming, without and with global drift compensation
(with the group's ``compensation_rule``: the committed study pins "all-ones", the rule it was made with).
``report`` recomputes the tables of docs/pcm-study.md (between the
``<!-- pcm-study:begin -->`` and ``<!-- pcm-study:end -->`` markers) from results.json and draws the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from studies import reproduce

__all__ = ["main", "plot", "render_tables"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "pcm_time.json"
BEGIN, END = "<!-- pcm-study:begin -->", "<!-- pcm-study:end -->"
_METHODS = ("clean", "noise", "ovf", "irs")
_NAMES = {"clean": "clean", "noise": "noise injection", "ovf": "OVF", "irs": "IRS"}


def _points(results: dict, method: str, compensated: bool) -> list[dict]:
    """The evaluations of one method at one drift-compensation setting, by time."""
    ps = [
        p
        for p in results["evaluations"]
        if p["method"] == method and p.get("drift_compensation") is compensated and "time_after_programming_s" in p
    ]
    return sorted(ps, key=lambda p: p["time_after_programming_s"])


def _compensation(results: dict, compensated: bool) -> str:
    """The heading of one setting: "without global drift compensation", or "with" it and the rule(s) of
    its points (docs/device-models.md, "Global drift compensation")."""
    if not compensated:
        return "without global drift compensation"
    rules = sorted({str(p.get("compensation_rule")) for p in results["evaluations"] if p.get("drift_compensation")})
    return f"with global drift compensation ({', '.join(rules)} rule)"


def _when(t: float) -> str:
    for unit, s in (("year", 3.15e7), ("month", 2.6e6), ("day", 86400.0), ("h", 3600.0)):
        if t >= s * 0.999:
            return f"{t / s:.3g} {unit}"
    return f"{t:g} s"


def render_tables(results: dict) -> str:
    """The Markdown block of the study, computed from ``results`` alone."""
    cfg = results["config"]
    times = sorted({p["time_after_programming_s"] for p in results["evaluations"] if "time_after_programming_s" in p})
    runs = sorted({p["runs"] for p in results["evaluations"]})
    inputs = sorted({p["num_inputs"] for p in results["evaluations"]})
    g = cfg["groups"][0]
    out = [
        f"Recomputed from `docs/pcm-study/results.json` by `python -m studies.pcm_time report`: "
        f"{cfg['model']} (width {cfg['width']:g}) on {', '.join(g['datasets'])}, trained for {cfg['epochs']} "
        f"epoch on {cfg['limit_train']} images under the PCM model at severity {', '.join(f'{s:g}' for s in g['sigmas'])} "
        f"(t = 0; the clean model without noise), evaluated on the first {'/'.join(map(str, inputs))} test images "
        f"of {'/'.join(map(str, runs))} simulated chips per point (mean ± CI95, %). Chip r is the same draw "
        "(programming noise, drift exponents, 1/f noise) for every model and time.",
        "",
    ]
    head = "| method | " + " | ".join(_when(t) for t in times) + " |"
    rule = "|---|" + "---|" * len(times)
    for comp in (False, True):
        out += [f"**Accuracy (%), {_compensation(results, comp)}**", "", head, rule]
        for m in _METHODS:
            ps = {p["time_after_programming_s"]: p for p in _points(results, m, comp)}
            if ps:
                cells = [reproduce.accuracy_cell(ps[t]) if t in ps else "–" for t in times]
                out.append(f"| {_NAMES[m]} | " + " | ".join(cells) + " |")
        out.append("")
    tt = results["time_s"]
    env = results["environment"]
    out += [
        "Training: "
        + ", ".join(
            f"{_NAMES[t['method']]} {t['time_s']:.0f} s (clean test accuracy {100 * t['test_acc_clean']:.2f} %)"
            for t in results["trainings"]
        )
        + ".",
        "",
        f"Total work: {tt['training'] / 60:.1f} min training + {tt['evaluation'] / 60:.1f} min Monte-Carlo = "
        f"**{tt['total'] / 60:.1f} min** ({env.get('cpu_count')} CPU cores, torch {env.get('torch')}, "
        f"commit {env.get('commit')}).",
        "",
    ]
    return "\n".join(out)


def plot(results: dict, path) -> None:
    """Accuracy (CI95 band) against time after programming (log axis), one line per method; one panel
    without and one with drift compensation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg = results["config"]
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, comp in zip(axes, (False, True)):
        for m in _METHODS:
            ps = _points(results, m, comp)
            if not ps:
                continue
            t = [p["time_after_programming_s"] for p in ps]
            stats = [reproduce.mean_ci(p["per_instance_accuracy"]) for p in ps]
            mean = [s[0] for s in stats]
            line = ax.plot(t, mean, marker="o", label=_NAMES[m])[0]
            ax.fill_between(t, [a - c for a, c in stats], [a + c for a, c in stats], color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("time after programming (s, log scale)")
        ax.set_title(_compensation(results, comp))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy under PCM (%, mean ± CI95)")
    fig.suptitle(f"{cfg['model']} (width {cfg['width']:g}) on MNIST under the PCM model: accuracy vs time")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.pcm_time", description=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True)
    reproduce.add_run_command(sub, DEFAULT_CONFIG, os.path.join("runs", "pcm-study"))
    s = sub.add_parser("report", help="recompute the tables of the study and its plot from results.json")
    s.add_argument("--results", default=os.path.join("docs", "pcm-study", "results.json"))
    s.add_argument("--doc", default=os.path.join("docs", "pcm-study.md"))
    s.add_argument("--plot", default=os.path.join("docs", "pcm-study", "accuracy_vs_time.png"))
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            reproduce.run_command(args)
        else:
            results = json.loads(Path(args.results).read_text())
            reproduce.update_doc(args.doc, results, render=render_tables, begin=BEGIN, end=END)
            plot(results, args.plot)
            print(render_tables(results))
            print(f"updated {args.doc} and {args.plot}")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
