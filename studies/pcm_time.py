"""The PCM time study: does a training method's robustness last a day, a month, a year after programming?

    python -m studies.pcm_time run    [--config studies/pcm_time.json] [--out runs/pcm-study] [--no-progress]
    python -m studies.pcm_time report [--results R --doc D --plot P [--block pcm-study]]

``run`` is the reproduction study's runner (:func:`studies.reproduce.run`: resumable, one record per
finished item) on a config whose group has a time axis: every model is evaluated under the PCM model
(docs/device-models.md) at each time after programming, without and with global drift compensation
(with the group's ``compensation_rule``: the committed study pins "all-ones", the rule it was made with).
Two committed studies share docs/pcm-study.md (:data:`STUDIES`): studies/pcm_time.json (all-ones rule,
untiled layers) and studies/pcm_time_tiles.json (one-hot rule, 512 × 512 crossbar tiles in training and
evaluation: the group's ``tiles``).

``report`` without ``--results`` recomputes both: each study's tables between its ``<!-- BLOCK:begin -->``
and ``<!-- BLOCK:end -->`` markers (``pcm-study``, ``pcm-study-tiles``) and its plot (the tiled one with the
untiled curves dashed beside it), then the table of new minus old, paired by chip, between the
``pcm-study-compare`` markers. With ``--results`` it renders that one results.json into ``--doc`` between
the ``--block`` markers (default ``pcm-study``) and draws ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from studies import reproduce

__all__ = ["STUDIES", "markers", "main", "plot", "render_comparison", "render_tables"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "pcm_time.json"
TILES_CONFIG = Path(__file__).resolve().parent / "pcm_time_tiles.json"
BEGIN, END = "<!-- pcm-study:begin -->", "<!-- pcm-study:end -->"
#: The committed PCM studies: (marker block, config, results, plot), the untiled all-ones study first;
#: the second names its results and plot in its config's "report" entries.
STUDIES = (
    ("pcm-study", DEFAULT_CONFIG, "docs/pcm-study/results.json", "docs/pcm-study/accuracy_vs_time.png"),
    ("pcm-study-tiles", TILES_CONFIG, "docs/pcm-study/results-tiles.json", "docs/pcm-study/accuracy_vs_time_tiles.png"),
)
DOC = "docs/pcm-study.md"
COMPARE = "pcm-study-compare"
_METHODS = ("clean", "noise", "ovf", "irs")
_NAMES = {"clean": "clean", "noise": "noise injection", "ovf": "OVF", "irs": "IRS"}


def _full_tiles(tiles: dict | None) -> dict | None:
    """A tiles dict with every field (as the rows record it), None untiled."""
    return {"max_input_size": None, "max_output_size": None, "per_channel": False, **tiles} if tiles else None


def _points(results: dict, method: str, compensated: bool, tiles="study") -> list[dict]:
    """The evaluations of one method at one drift-compensation setting, by time, with the study's tiles
    (its first group's; a later group is a control: pass its ``tiles``, None untiled)."""
    if tiles == "study":
        tiles = results["config"]["groups"][0].get("tiles")
    ps = [
        p
        for p in results["evaluations"]
        if p["method"] == method
        and p.get("drift_compensation") is compensated
        and "time_after_programming_s" in p
        and p.get("tiles") == _full_tiles(tiles)
    ]
    return sorted(ps, key=lambda p: p["time_after_programming_s"])


def _controls(results: dict) -> list[dict | None]:
    """The tiles settings of the study's later groups (controls for its clean model) unlike its first's."""
    first = _full_tiles(results["config"]["groups"][0].get("tiles"))
    out = []
    for g in results["config"]["groups"][1:]:
        t = _full_tiles(g.get("tiles"))
        if t != first and t not in out:
            out.append(t)
    return out


def _tiles_label(tiles: dict | None) -> str:
    if not tiles:
        return "untiled"
    return f"tiles {tiles.get('max_input_size') or '∞'}×{tiles.get('max_output_size') or '∞'}"


def _compensation(results: dict, compensated: bool) -> str:
    """The heading of one setting: "without global drift compensation", or "with" it and the rule(s) of
    its points (docs/device-models.md, "Global drift compensation")."""
    if not compensated:
        return "without global drift compensation"
    rules = sorted({str(p.get("compensation_rule")) for p in results["evaluations"] if p.get("drift_compensation")})
    return f"with global drift compensation ({', '.join(rules)} rule)"


def markers(block: str) -> tuple[str, str]:
    """The begin and end markers of a block of docs/pcm-study.md."""
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


def _tiles_note(group: dict) -> str:
    """How a study's layers map onto crossbars: "" untiled, else the tiles of its group."""
    t = group.get("tiles")
    if not t:
        return ""
    size = f"{t.get('max_input_size') or '∞'} inputs × {t.get('max_output_size') or '∞'} outputs"
    return f", every layer on crossbar tiles of at most {size} (in training and evaluation)"


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
    source = cfg.get("report", {}).get("results", STUDIES[0][2])
    out = [
        f"Recomputed from `{source}` by `python -m studies.pcm_time report`: "
        f"{cfg['model']} (width {cfg['width']:g}) on {', '.join(g['datasets'])}, trained for {cfg['epochs']} "
        f"epoch on {cfg['limit_train']} images under the PCM model at severity {', '.join(f'{s:g}' for s in g['sigmas'])} "
        f"(t = 0; the clean model without noise){_tiles_note(g)}, evaluated on the first {'/'.join(map(str, inputs))} test images "
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
        for tiles in _controls(results):  # the clean model on the same chips, otherwise tiled
            ps = {p["time_after_programming_s"]: p for p in _points(results, "clean", comp, tiles)}
            cells = [reproduce.accuracy_cell(ps[t]) if t in ps else "–" for t in times]
            out.append(f"| clean, {_tiles_label(tiles)} (control) | " + " | ".join(cells) + " |")
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
    if "cpu" in tt:
        out += [
            f"CPU time of the run's process ({env.get('torch_threads')} intra-op thread(s)): **{tt['cpu'] / 60:.1f} min**.",
            "",
        ]
    return "\n".join(out)


def _label(results: dict) -> str:
    """A study's short name: its compensation rule and tiles, e.g. "one-hot, tiles 512×512"."""
    g = results["config"]["groups"][0]
    return f"{g.get('compensation_rule', 'one-hot')}, {_tiles_label(g.get('tiles'))}"


def render_comparison(old: dict, new: dict) -> str:
    """The Markdown block "new minus old": per method, time and compensation setting, both accuracies and
    their difference paired by chip (chip r draws the same standard normals in both studies)."""
    from nft_cuda.eval.paired import paired_difference

    times = sorted({p["time_after_programming_s"] for p in new["evaluations"] if "time_after_programming_s" in p})
    out = [
        f"Recomputed from both results files by `python -m studies.pcm_time report`: accuracy (%) of the "
        f"{_label(old)} study → the {_label(new)} study, and in brackets the difference new − old paired by "
        "chip (percentage points, mean ± CI95 of the per-chip differences). Every model was retrained: the "
        "clean one with the same config and seed (intra-op threads "
        f"{old['environment'].get('torch_threads')} → {new['environment'].get('torch_threads')}, so not bit for "
        "bit the same weights), the noise-aware ones under the tiles.",
        "",
    ]
    head = "| method | " + " | ".join(_when(t) for t in times) + " |"
    for comp in (False, True):
        setting = "with" if comp else "without"
        out += [f"**{setting.capitalize()} global drift compensation**", "", head, "|---|" + "---|" * len(times)]
        for m in _METHODS:
            a = {p["time_after_programming_s"]: p for p in _points(old, m, comp)}
            b = {p["time_after_programming_s"]: p for p in _points(new, m, comp)}
            cells = []
            for t in times:
                if t not in a or t not in b:
                    cells.append("–")
                    continue
                d = paired_difference(b[t]["per_instance_accuracy"], a[t]["per_instance_accuracy"])
                ma, mb = (
                    reproduce.mean_ci(a[t]["per_instance_accuracy"])[0],
                    reproduce.mean_ci(b[t]["per_instance_accuracy"])[0],
                )
                cells.append(f"{ma:.2f} → {mb:.2f} ({100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f})")
            if any(c != "–" for c in cells):
                out.append(f"| {_NAMES[m]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out + _decomposition(old, new, times))


def _decomposition(old: dict, new: dict, times: list) -> list[str]:
    """The clean model's change split by a control of ``new`` (its clean model on the same chips with the
    old study's tiles): retrained model (+ rule) = control − old, tiles = new − control, paired by chip."""
    from nft_cuda.eval.paired import paired_difference

    base = old["config"]["groups"][0].get("tiles")
    if _full_tiles(base) not in _controls(new):
        return []
    out = [
        f"**The clean model, effect by effect** (new − old paired by chip, percentage points): the control "
        f"evaluates the new study's clean model {_tiles_label(base)} with the new rule on the same chips",
        "",
        "| difference | compensation | " + " | ".join(_when(t) for t in times) + " |",
        "|---|---|" + "---|" * len(times),
    ]
    for comp in (False, True):
        a = {p["time_after_programming_s"]: p for p in _points(old, "clean", comp)}
        c = {p["time_after_programming_s"]: p for p in _points(new, "clean", comp, base)}
        b = {p["time_after_programming_s"]: p for p in _points(new, "clean", comp)}
        what = "retrained model + one-hot rule" if comp else "retrained model (no α)"
        for label, x, y in ((f"{what}: control − old", c, a), ("tiles: new − control (same model)", b, c)):
            cells = []
            for t in times:
                if t not in x or t not in y:
                    cells.append("–")
                    continue
                d = paired_difference(x[t]["per_instance_accuracy"], y[t]["per_instance_accuracy"])
                cells.append(f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}")
            out.append(f"| {label} | {'with' if comp else 'without'} | " + " | ".join(cells) + " |")
    return [*out, ""]


def plot(results: dict, path, reference: dict | None = None) -> None:
    """Accuracy (CI95 band) against time after programming (log axis), one line per method; one panel
    without and one with drift compensation. ``reference``: another study's means drawn dashed beside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg = results["config"]
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=False)
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
            ref = _points(reference, m, comp) if reference is not None else []
            if ref:
                ax.plot([p["time_after_programming_s"] for p in ref],
                        [reproduce.mean_ci(p["per_instance_accuracy"])[0] for p in ref],
                        ls="--", lw=1, color=line.get_color(), label=f"{_NAMES[m]} ({_label(reference)})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("time after programming (s, log scale)")
        ax.set_title(_compensation(results, comp), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes:  # each panel on its own scale: the compensated curves lie within a few points
        ax.set_ylabel("accuracy under PCM (%, mean ± CI95)")
    what = f" ({_label(results)})" if cfg["groups"][0].get("tiles") else ""
    fig.suptitle(f"{cfg['model']} (width {cfg['width']:g}) on MNIST under the PCM model{what}: accuracy vs time")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.pcm_time", description=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True)
    reproduce.add_run_command(sub, DEFAULT_CONFIG, os.path.join("runs", "pcm-study"))
    s = sub.add_parser("report", help="recompute the tables of the studies and their plots from their results")
    s.add_argument("--results", help="one results.json (default: every committed study and their comparison)")
    s.add_argument("--doc", default=DOC)
    s.add_argument(
        "--plot", help="with --results: where to draw its plot (default docs/pcm-study/accuracy_vs_time.png)"
    )
    s.add_argument("--block", default="pcm-study", help="with --results: the marker block to fill (default pcm-study)")
    return p


def _report_all(doc: str) -> None:
    """Every committed study into its block of ``doc`` and its plot, then the comparison block."""
    loaded = []
    for block, _, results_path, plot_path in STUDIES:
        results = json.loads(Path(results_path).read_text())
        begin, end = markers(block)
        reproduce.update_doc(doc, results, render=render_tables, begin=begin, end=end)
        plot(results, plot_path, reference=loaded[0] if loaded else None)
        loaded.append(results)
        print(f"updated {doc} ({block}) and {plot_path}")
    begin, end = markers(COMPARE)
    reproduce.update_doc(doc, loaded[-1], render=lambda new: render_comparison(loaded[0], new), begin=begin, end=end)
    print(render_comparison(loaded[0], loaded[-1]))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            reproduce.run_command(args)
        elif args.results is None:
            _report_all(args.doc)
        else:
            results = json.loads(Path(args.results).read_text())
            begin, end = markers(args.block)
            reproduce.update_doc(args.doc, results, render=render_tables, begin=begin, end=end)
            plot(results, args.plot or STUDIES[0][3])
            print(render_tables(results))
            print(f"updated {args.doc} and {args.plot or STUDIES[0][3]}")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
