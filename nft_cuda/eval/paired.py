"""Paired comparisons of models on common chips: is model B more robust than baseline A?

Why pairing is valid. In a Monte-Carlo evaluation chip instance r of noisy layer ℓ draws the noise
stream (seed, (ℓ << 32) | r) (:mod:`nft_cuda.eval.monte_carlo`), whatever the model's weights. So when
two checkpoints are evaluated with the same seed, σ_d, device model and bit widths, chip r of A and chip
r of B are *the same simulated chip* (the same standard normals z scaled by the same σ_w rule) carrying
two different sets of weights: common random numbers. The per-chip difference d_r = m_B,r − m_A,r
removes what the chips share (a chip that hurts A tends to hurt B), so its spread — and the confidence
interval of its mean — is smaller than the two independent CIs suggest, by as much as the two models
react alike to a chip (15–30 % for the demo's independently trained models, docs/demo.md). The
chips r = 0 .. R−1 are independent draws, so the d_r are i.i.d. and the usual interval of a mean
applies: mean(d) ± 1.96·std(d)/√R (the normal approximation DESIGN §6 uses for every CI95 of the
project; for small R a Student-t interval is wider, by 4 % at R = 30).

When it is not. Chips differ between the two evaluations when the seed, σ_d, the device model or the
bit widths differ (then σ_w or the normals differ): :func:`check_pairable` refuses such pairs, since the
difference would mix the models with the chips. The test set must be the same too. Models whose noisy
layers differ in number or shape receive the same streams on different weight tensors: the chips are
no longer the same in any physical sense, the d_r are still i.i.d. (the interval stays valid) but no
longer sharper; :func:`check_pairable` warns. Checkpoints evaluated in different ``nft eval`` calls
pair only if every setting above matches (compare the reports' ``seed`` and results).

Per-chip EKL. The EKL (DESIGN §6) is defined over the chip ensemble: EKL = mean_n [H(p̄_n) − mean_r
H(p_r,n)] = mean_r KL_r with KL_r = mean_n KL(p_r,n ‖ p̄_n), p̄ the mean over chips. We use KL_r as the
per-chip EKL (``per_instance_kl`` of :func:`~nft_cuda.eval.monte_carlo`): its mean is the EKL, and
KL_r − EKL is exactly the influence of chip r on the EKL estimate (the derivative of H(p̄) with respect
to p_r is −(log p̄ + 1), whose contribution sums with −H(p_r) to KL_r − EKL), so std(KL_B − KL_A)/√R is
the delta-method (infinitesimal-jackknife) standard error of the EKL difference. It treats p̄ as
known, which ignores terms of order 1/R.

Verdicts. Accuracy: "better" when the CI95 of mean(d) lies above 0, "worse" below 0, "no significant
difference" when it spans 0. EKL: "lower" / "higher" / "no significant difference" — lower EKL means
the chips agree more with each other, which is not "better" by itself (a collapsed model agrees too).

Tails. Each entry also carries ``tail_differences``: for k = 1, 5, 10 the difference of the two models'
k-th percentile chips with a paired bootstrap CI95 (:func:`nft_cuda.eval.tails.percentile_difference`;
flagged unreliable when fewer than five chips are expected in the tail). A method can win on the mean
and lose on the worst chips; this is where it shows.

Everything is float64; the per-chip differences, their mean and variance are computed exactly
(rational arithmetic) and rounded once, so the result does not depend on the order of the chips.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from fractions import Fraction

from nft_cuda.eval.metrics import Z95
from nft_cuda.eval.tails import TAIL_PERCENTILES, percentile_difference

__all__ = [
    "NO_DIFFERENCE",
    "PAIRED_COLUMNS",
    "check_pairable",
    "compare",
    "paired_difference",
    "paired_table",
    "plot_paired",
    "unpaired_ci95",
]

NO_DIFFERENCE = "no significant difference"
#: Columns the CSV of a report with a baseline gains (empty on the baseline's own rows).
PAIRED_COLUMNS = (
    "baseline",
    "accuracy_difference",
    "accuracy_difference_ci95",
    "accuracy_difference_ci95_unpaired",
    "accuracy_verdict",
    "ekl_difference",
    "ekl_difference_ci95",
    "ekl_verdict",
    *(f"tail_p{k}_difference{part}" for k in TAIL_PERCENTILES for part in ("", "_ci_low", "_ci_high")),
)


def _mean_var(values: Sequence[Fraction]) -> tuple[Fraction, Fraction | None]:
    r = len(values)
    mean = sum(values, Fraction(0)) / r
    var = sum(((v - mean) ** 2 for v in values), Fraction(0)) / (r - 1) if r > 1 else None
    return mean, var


def _verdict(low: float | None, high: float | None, words: tuple[str, str]) -> str | None:
    if low is None:
        return None
    if low > 0:
        return words[0]
    if high < 0:
        return words[1]
    return NO_DIFFERENCE


def paired_difference(
    values: Sequence[float], baseline: Sequence[float], *, words: tuple[str, str] = ("better", "worse")
) -> dict:
    """Statistics of the per-chip differences d_r = values[r] − baseline[r] (chip r of both).

    Returns ``mean``, ``std`` (ddof=1), ``ci95`` = 1.96·std/√R, ``low`` / ``high`` (mean ∓ ci95) and
    ``verdict``: ``words[0]`` when low > 0, ``words[1]`` when high < 0, else "no significant
    difference". With R = 1 the std, the CI and the verdict are None.
    """
    if len(values) != len(baseline):
        raise ValueError(f"a paired difference needs the same chips: {len(values)} vs {len(baseline)} values")
    if not values:
        raise ValueError("a paired difference needs at least one chip")
    diffs = [Fraction(float(v)) - Fraction(float(b)) for v, b in zip(values, baseline)]
    mean, var = _mean_var(diffs)
    std = ci = low = high = None
    if var is not None:
        std = math.sqrt(float(var))
        ci = Z95 * std / math.sqrt(len(diffs))
        low, high = float(mean) - ci, float(mean) + ci
    return {
        "mean": float(mean),
        "std": std,
        "ci95": ci,
        "low": low,
        "high": high,
        "verdict": _verdict(low, high, words),
    }


def unpaired_ci95(values: Sequence[float], baseline: Sequence[float]) -> float | None:
    """The CI95 of mean(values) − mean(baseline) as if the chips were independent:
    1.96·√(s_a²/R_a + s_b²/R_b) — what two separate CIs imply, for comparison with the paired one."""
    parts = []
    for vals in (values, baseline):
        _, var = _mean_var([Fraction(float(v)) for v in vals])
        if var is None:
            return None
        parts.append(float(var) / len(vals))
    return Z95 * math.sqrt(parts[0] + parts[1])


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def check_pairable(
    label: str,
    variation: tuple,
    dataset: str,
    layer_shapes,
    baseline_label: str,
    baseline_variation: tuple,
    baseline_dataset: str,
    baseline_layer_shapes,
) -> None:
    """Refuse (ValueError) a pair whose chips differ; warn when the noisy layers differ (see the module
    docstring). ``variation``: (device_model, weight_bits, device_bits); ``layer_shapes``: the noisy
    layers' weight shapes in order."""
    if variation != baseline_variation:
        raise ValueError(
            f"cannot pair '{label}' with baseline '{baseline_label}': their chips differ (device model "
            f"and bit widths {variation} vs {baseline_variation}); evaluate both with the same "
            "--device-model and bit widths"
        )
    if dataset != baseline_dataset:
        raise ValueError(
            f"cannot pair '{label}' with baseline '{baseline_label}': different test sets "
            f"({dataset} vs {baseline_dataset})"
        )
    if list(layer_shapes) != list(baseline_layer_shapes):
        warnings.warn(
            f"'{label}' and baseline '{baseline_label}' have different noisy layers: chip r does not "
            "carry the same noise in both, so the paired interval is valid but no sharper than the "
            "unpaired one",
            stacklevel=3,
        )


def _tail_differences(values: Sequence[float], baseline: Sequence[float]) -> dict:
    """Per tail percentile k: the paired difference of the k-th percentile chip (nft_cuda.eval.tails)."""
    return {str(k): percentile_difference(values, baseline, k) for k in TAIL_PERCENTILES}


def compare(results: Sequence[dict], baseline: str) -> list[dict]:
    """One paired entry per (checkpoint ≠ baseline, σ_d, device model) of ``results`` (report entries
    with ``checkpoint`` and ``per_instance_accuracy``, and ``per_instance_kl`` for the EKL difference),
    against the baseline's entry with the same σ_d, device model and time after programming (``time_s``,
    when the results carry one), in the order of ``results``."""
    base = {(r["sigma"], r["device_model"], r.get("time_s")): r for r in results if r["checkpoint"] == baseline}
    if not base:
        raise ValueError(f"baseline '{baseline}' is not among the results")
    out = []
    for r in results:
        a = base.get((r["sigma"], r["device_model"], r.get("time_s")))
        if r["checkpoint"] == baseline or a is None:
            continue
        for key in ("runs", "seed", "num_inputs"):
            if r.get(key) != a.get(key):
                raise ValueError(
                    f"cannot pair '{r['checkpoint']}' with baseline '{baseline}' at σ_d {r['sigma']:g}: "
                    f"different {key} ({r.get(key)} vs {a.get(key)})"
                )
        acc = paired_difference(r["per_instance_accuracy"], a["per_instance_accuracy"])
        entry = {
            "checkpoint": r["checkpoint"],
            "baseline": baseline,
            "sigma": r["sigma"],
            "device_model": r["device_model"],
            "runs": r["runs"],
            "accuracy_difference": acc["mean"],
            "accuracy_difference_std": acc["std"],
            "accuracy_difference_ci95": acc["ci95"],
            "accuracy_difference_ci95_unpaired": unpaired_ci95(r["per_instance_accuracy"], a["per_instance_accuracy"]),
            "accuracy_verdict": acc["verdict"],
            "ekl_difference": None,
            "ekl_difference_ci95": None,
            "ekl_verdict": None,
        }
        if r.get("time_s") is not None:
            entry["time_s"] = r["time_s"]
        entry["tail_differences"] = _tail_differences(r["per_instance_accuracy"], a["per_instance_accuracy"])
        for k, tail in entry["tail_differences"].items():
            entry[f"tail_p{k}_difference"] = tail["difference"]
            entry[f"tail_p{k}_difference_ci_low"] = tail["ci_low"]
            entry[f"tail_p{k}_difference_ci_high"] = tail["ci_high"]
        if r.get("per_instance_kl") is not None and a.get("per_instance_kl") is not None:
            ekl = paired_difference(r["per_instance_kl"], a["per_instance_kl"], words=("higher", "lower"))
            entry.update(ekl_difference=ekl["mean"], ekl_difference_ci95=ekl["ci95"], ekl_verdict=ekl["verdict"])
        out.append(entry)
    return out


def _signed(value: float | None, ci: float | None, scale: float, digits: int) -> str:
    if value is None:
        return "–"
    text = f"{scale * value:+.{digits}f}"
    return text if ci is None else f"{text} ± {scale * ci:.{digits}f}"


def _tail_cell(tail: dict | None) -> str:
    if tail is None:
        return "–"
    text = f"{100 * tail['difference']:+.2f} [{100 * tail['ci_low']:+.2f}, {100 * tail['ci_high']:+.2f}]"
    return text if tail["reliable"] else f"{text} (few chips)"


def paired_table(paired: Sequence[dict]) -> str:
    """A Markdown table of :func:`compare`'s entries: differences to the baseline with CI95 and verdicts."""
    rows = [
        (
            "| checkpoint − baseline | σ_d | Δ accuracy (pp, paired CI95) | unpaired CI95 | verdict "
            "| Δ EKL (nats, CI95) | EKL verdict | Δ p5 chip (pp, bootstrap CI95) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in paired:
        unpaired = p["accuracy_difference_ci95_unpaired"]
        rows.append(
            f"| {p['checkpoint']} − {p['baseline']} | {p['sigma']:g} | "
            f"{_signed(p['accuracy_difference'], p['accuracy_difference_ci95'], 100, 2)} | "
            f"{'–' if unpaired is None else f'± {100 * unpaired:.2f}'} | {p['accuracy_verdict'] or '–'} | "
            f"{_signed(p['ekl_difference'], p['ekl_difference_ci95'], 1, 4)} | {p['ekl_verdict'] or '–'} | "
            f"{_tail_cell(p.get('tail_differences', {}).get('5'))} |"
        )
    return "\n".join(rows)


def plot_paired(ax, paired: Sequence[dict], colors: dict | None = None) -> None:
    """Draw the accuracy difference to the baseline vs σ_d with its paired CI95 as a band, one curve per
    checkpoint × device model, on the matplotlib axes ``ax`` (``colors``: curve name → colour, to match
    the other panels)."""
    curves: dict[str, list[dict]] = {}
    models = {p["device_model"] for p in paired}
    for p in paired:
        name = p["checkpoint"] if len(models) == 1 else f"{p['checkpoint']} ({p['device_model']})"
        curves.setdefault(name, []).append(p)
    for name, ps in curves.items():
        ps = sorted(ps, key=lambda p: p["sigma"])
        sig = [p["sigma"] for p in ps]
        mean = [100.0 * p["accuracy_difference"] for p in ps]
        ci = [100.0 * (p["accuracy_difference_ci95"] or 0.0) for p in ps]
        (line,) = ax.plot(sig, mean, marker="o", label=name, color=(colors or {}).get(name))
        ax.fill_between(
            sig, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], color=line.get_color(), alpha=0.2
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    baseline = paired[0]["baseline"] if paired else "baseline"
    ax.set_xlabel("device variation σ_d")
    ax.set_ylabel(f"accuracy − {baseline} (pp)")
    ax.set_title(f"paired difference to {baseline} on the same chips (CI95 band)")
