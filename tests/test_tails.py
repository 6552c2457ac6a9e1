"""The low tail of the chip distribution (nft_cuda.eval.tails): percentiles, order-statistic CIs, paired
differences, and their place in reports, CSVs and paired comparisons."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from nft_cuda.eval import metrics, paired, report
from nft_cuda.eval.tails import order_statistic_ranks, percentile, percentile_difference, tail_stats


def _binomial_tail_below(r: int, p: Fraction, rank: int) -> Fraction:
    """P(Bin(r, p) ≤ rank − 1) = P(x_(rank) > ξ_p), summed term by term (the test's own oracle)."""
    return sum((Fraction(math.comb(r, i)) * p**i * (1 - p) ** (r - i) for i in range(rank)), Fraction(0))


@pytest.mark.parametrize("r", [10, 30, 100, 250])
@pytest.mark.parametrize("k", [1, 5, 10, 50])
def test_ranks_are_the_exact_equal_tailed_ones(r, k):
    p, half = Fraction(k, 100), Fraction(1, 40)
    low, high = order_statistic_ranks(r, k)
    # Lower bound: P(x_(l) > ξ_p) ≤ α/2, and l + 1 would break it (or no rank qualifies at all).
    if low is None:
        assert _binomial_tail_below(r, p, 1) > half
    else:
        assert _binomial_tail_below(r, p, low) <= half
        assert low == r or _binomial_tail_below(r, p, low + 1) > half
    # Upper bound: P(x_(u) < ξ_p) = P(B ≥ u) ≤ α/2, and u − 1 would break it.
    if high is None:
        assert 1 - _binomial_tail_below(r, p, r) > half
    else:
        assert 1 - _binomial_tail_below(r, p, high) <= half
        assert high == 1 or 1 - _binomial_tail_below(r, p, high - 1) > half


def test_known_ranks():
    # The classic distribution-free 95 % interval of the median of 100 values is [x_(40), x_(61)].
    assert order_statistic_ranks(100, 50) == (40, 61)
    # 100 chips bound the 1st percentile from above only: 0.99^100 = 0.37 > 0.025.
    assert order_statistic_ranks(100, 1) == (None, 4)
    assert order_statistic_ranks(100, 5) == (1, 11)


def test_float_path_matches_exact_ranks(monkeypatch):
    from nft_cuda.eval import tails

    exact = [order_statistic_ranks(400, k) for k in (1, 5, 10)]
    monkeypatch.setattr(tails, "EXACT_BINOMIAL_MAX", 10)
    assert [order_statistic_ranks(400, k) for k in (1, 5, 10)] == exact


def test_interval_covers_the_true_quantile_as_stated():
    # Uniform chips: the true p-quantile is p. Coverage over 4000 simulated sets of 100 chips ≥ 95 % − noise.
    rng = np.random.default_rng(1)
    draws = np.sort(rng.random((4000, 100)), axis=1)
    low, high = order_statistic_ranks(100, 10)
    covered = (draws[:, low - 1] <= 0.10) & (draws[:, high - 1] >= 0.10)
    assert covered.mean() >= 0.94


def test_percentile_is_an_order_statistic():
    values = [0.9, 0.5, 0.7, 0.1, 0.3]
    assert percentile(values, 20) == 0.1  # ⌈0.2·5⌉ = 1: the worst chip
    assert percentile(values, 21) == 0.3
    assert percentile(values, 50) == 0.5
    assert percentile(list(range(100)), 5) == 4.0


@pytest.mark.parametrize("k", [0, 100, -1, "5", True])
def test_bad_percentile(k):
    with pytest.raises(ValueError, match="percentile k"):
        percentile([0.1, 0.2], k)


def test_bad_values():
    with pytest.raises(ValueError, match="at least one"):
        tail_stats([])
    with pytest.raises(ValueError, match="finite"):
        tail_stats([0.1, float("nan")])
    with pytest.raises(ValueError, match="same chips"):
        percentile_difference([0.1, 0.2], [0.1], 5)


def test_tail_stats_fields():
    t = tail_stats([i / 100 for i in range(100)])
    assert set(t) == {"1", "5", "10"}
    assert t["5"] == {
        "value": 0.04,
        "ci_low": 0.0,
        "ci_high": 0.10,
        "rank": 5,
        "ci_ranks": [1, 11],
        "confidence": 0.95,
    }
    assert t["1"]["ci_low"] is None and t["1"]["ci_high"] == 0.03


def test_percentile_difference_paired():
    rng = np.random.default_rng(3)
    a = rng.random(200)
    shifted = percentile_difference(a + 0.05, a, 5)
    assert shifted["difference"] == pytest.approx(0.05)
    assert shifted["ci_low"] == pytest.approx(0.05) and shifted["ci_high"] == pytest.approx(0.05)
    assert shifted["reliable"]
    other = percentile_difference(rng.random(200), a, 5)
    assert other["ci_low"] <= other["difference"] <= other["ci_high"] and other["ci_low"] < other["ci_high"]
    assert percentile_difference(a[:30], a[:30] + 1, 5)["reliable"] is False  # 1.5 chips expected in the tail
    assert percentile_difference(a, a + 0.1, 10) == percentile_difference(a, a + 0.1, 10)  # reproducible


def test_accuracy_stats_carry_tails():
    accs = [i / 50 for i in range(50)]
    s = metrics.accuracy_stats(accs)
    assert s["accuracy_tails"] == tail_stats(accs)
    assert metrics.accuracy_stats(accs[::-1])["accuracy_tails"] == s["accuracy_tails"]


def _result(name, accs):
    return {
        "checkpoint": name,
        "sigma": 0.2,
        "device_model": "RRAM1",
        "runs": len(accs),
        "seed": 0,
        "num_inputs": 100,
        "per_instance_accuracy": accs,
        "ekl": 0.0,
        "confidence": 1.0,
        **metrics.accuracy_stats(accs),
    }


def test_paired_entries_and_csv_carry_tail_differences(tmp_path):
    base = [0.5 + i / 1000 for i in range(100)]
    better = [a + 0.02 for a in base]
    results = [_result("base", base), _result("better", better)]
    (entry,) = paired.compare(results, "base")
    assert entry["tail_differences"]["5"]["difference"] == pytest.approx(0.02)
    assert entry["tail_p5_difference"] == pytest.approx(0.02)
    assert "+2.00 [+2.00, +2.00]" in paired.paired_table([entry])
    path = tmp_path / "r.csv"
    report.write_csv({"results": results, "paired": [entry]}, str(path))
    header, base_row, better_row = path.read_text().splitlines()
    columns = header.split(",")
    assert columns[-len(paired.PAIRED_COLUMNS) :] == list(paired.PAIRED_COLUMNS)
    for col in report.TAIL_COLUMNS:
        assert col in columns
    row = dict(zip(columns, better_row.split(",")))
    assert float(row["tail_p5"]) == better[4] and float(row["tail_p5_ci_high"]) == better[10]
    assert row["tail_p1_ci_low"] == ""  # 100 chips cannot bound the 1st percentile from below
    assert float(row["tail_p5_difference"]) == pytest.approx(0.02)


def test_eval_table_shows_tails():
    from nft_cuda.eval.cli import _table

    accs = [i / 100 for i in range(100)]
    text = _table({"results": [_result("m", accs)]})
    assert "p5 chip [CI95]" in text.splitlines()[0]
    assert "| 0.00 | 4.00 [0.00, 10.00] | 9.00 |" in text
    old = _result("m", accs)
    del old["accuracy_tails"]  # a result written before tails were reported
    assert "| – | – | – |" in _table({"results": [old]})
