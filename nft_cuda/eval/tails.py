"""The tail of the chip distribution: k-th percentile accuracy with distribution-free confidence intervals.

The mean over simulated chips says how a typical chip does; a product ships every chip, so the low tail
matters too: the accuracy that 99 % (95 %, 90 %) of the chips reach. This module reports it.

Estimate. For R per-chip accuracies x_1 .. x_R and a level p = k / 100, the k-th percentile is the order
statistic x_(j) with j = max(1, ⌈p·R⌉) (the empirical quantile: the smallest value whose share of chips at
or below it is at least p). It is one of the measured chips, never an interpolation between two.

Confidence interval (distribution-free). Let ξ_p be the true p-quantile of the chip distribution and
B = #{r : x_r < ξ_p} ~ Binomial(R, p). Then P(x_(l) ≤ ξ_p ≤ x_(u)) ≥ P(l ≤ B ≤ u − 1) for ranks l < u,
whatever the distribution (equality for a continuous one; accuracies on a finite test set are discrete,
and ties only make the interval wider, so the coverage stays at least the nominal one). The interval is
equal-tailed: l is the largest rank with P(B ≤ l − 1) ≤ α/2 and u the smallest with P(B ≥ u) ≤ α/2,
α = 1 − confidence. When no rank satisfies a side — too few chips for that tail — that bound is
``None`` (unbounded): at R = 100 the 1st percentile has no 95 % lower bound, since even the worst
chip lies above ξ_0.01 with probability 0.99^100 = 0.37. The binomial sums are exact (rational
arithmetic), so the ranks are the exact ones.

Paired difference. For two checkpoints evaluated on common chips (same seed, device model and test set:
:mod:`nft_cuda.eval.paired`), the difference of their k-th percentiles q_B − q_A comes with a paired
bootstrap interval: the chips are resampled jointly (chip r keeps its pair of accuracies) with a fixed
generator, so the interval is reproducible. A bootstrap of an extreme quantile is unreliable when few
chips lie in the tail; the entry says ``reliable: False`` when p·R < 5 (fewer than five chips expected
below the percentile).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from nft_cuda._args import check_positive_int

__all__ = [
    "TAIL_PERCENTILES",
    "order_statistic_ranks",
    "percentile",
    "percentile_difference",
    "tail_stats",
]

#: Percentiles reported for the low tail of the per-chip accuracy.
TAIL_PERCENTILES = (1, 5, 10)
#: Bootstrap resamples of a paired percentile difference, and the generator's seed.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Below this many chips expected under the percentile (p·R), a bootstrap interval is flagged unreliable.
MIN_TAIL_CHIPS = 5


def _check(values: Sequence[float], k: float) -> tuple[np.ndarray, Fraction]:
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        raise ValueError("a percentile needs at least one value")
    if not np.isfinite(arr).all():
        raise ValueError("the values must be finite")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 100:
        raise ValueError(f"the percentile k must be a number in (0, 100), got {k!r}")
    return arr, Fraction(k) / 100


def _rank(p: Fraction, r: int) -> int:
    return max(1, math.ceil(p * r))


def percentile(values: Sequence[float], k: float) -> float:
    """The k-th percentile of ``values``: the order statistic x_(j), j = max(1, ⌈k/100·R⌉)."""
    arr, p = _check(values, k)
    return float(np.sort(arr)[_rank(p, arr.size) - 1])


#: Up to this many values the binomial sums are exact rationals; above, float64 in log space (the ranks
#: could then differ from the exact ones only where a tail probability is within ~1e-12 of α/2).
EXACT_BINOMIAL_MAX = 1000


def _binomial_cdf(r: int, p: Fraction) -> list:
    """cdf[i] = P(B ≤ i) for B ~ Binomial(r, p), i = 0 .. r (exact up to EXACT_BINOMIAL_MAX values)."""
    if r <= EXACT_BINOMIAL_MAX:
        terms = [math.comb(r, i) * p**i * (1 - p) ** (r - i) for i in range(r + 1)]
        start = Fraction(0)
    else:
        lp, lq = math.log(p), math.log1p(-float(p))
        terms = [
            math.exp(math.lgamma(r + 1) - math.lgamma(i + 1) - math.lgamma(r - i + 1) + i * lp + (r - i) * lq)
            for i in range(r + 1)
        ]
        start = 0.0
    cdf, total = [], start
    for t in terms:
        total += t
        cdf.append(total)
    return cdf


def order_statistic_ranks(r: int, k: float, confidence: float = 0.95) -> tuple[int | None, int | None]:
    """The 1-based ranks (l, u) of the equal-tailed distribution-free CI of the k-th percentile of R
    values (see the module docstring); ``None`` for a side that R values cannot bound."""
    check_positive_int("the number of values", r)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    _, p = _check([0.0], k)
    half = (1 - Fraction(confidence)) / 2
    cdf = _binomial_cdf(r, p)
    # P(B ≤ l − 1) = cdf[l − 1] ≤ α/2: the largest such l ≥ 1.
    lows = [low for low in range(1, r + 1) if cdf[low - 1] <= half]
    # P(B ≥ u) = 1 − cdf[u − 1] ≤ α/2: the smallest such u ≤ r.
    highs = [high for high in range(1, r + 1) if 1 - cdf[high - 1] <= half]
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _bound(sorted_values: np.ndarray, rank: int | None) -> float | None:
    return None if rank is None else float(sorted_values[rank - 1])


def tail_stats(values: Sequence[float], ks: Sequence[float] = TAIL_PERCENTILES, confidence: float = 0.95) -> dict:
    """Per k in ``ks``: {"value", "ci_low", "ci_high", "rank", "ci_ranks", "confidence"} of the k-th
    percentile of ``values`` (the keys of the returned dict are ``str(k)``)."""
    out = {}
    for k in ks:
        arr, p = _check(values, k)
        ordered = np.sort(arr)
        lo, hi = order_statistic_ranks(arr.size, k, confidence)
        rank = _rank(p, arr.size)
        out[f"{k:g}"] = {
            "value": float(ordered[rank - 1]),
            "ci_low": _bound(ordered, lo),
            "ci_high": _bound(ordered, hi),
            "rank": rank,
            "ci_ranks": [lo, hi],
            "confidence": confidence,
        }
    return out


def percentile_difference(
    values: Sequence[float], baseline: Sequence[float], k: float, confidence: float = 0.95
) -> dict:
    """The k-th percentile of ``values`` minus that of ``baseline`` (the same chips, in the same order),
    with a paired bootstrap interval: {"difference", "ci_low", "ci_high", "reliable"}."""
    a, p = _check(values, k)
    b, _ = _check(baseline, k)
    if a.size != b.size:
        raise ValueError(f"paired values need the same chips: {a.size} vs {b.size} values")
    rank = _rank(p, a.size)
    diff = float(np.sort(a)[rank - 1] - np.sort(b)[rank - 1])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, a.size, size=(BOOTSTRAP_RESAMPLES, a.size))
    boot = np.sort(a[idx], axis=1)[:, rank - 1] - np.sort(b[idx], axis=1)[:, rank - 1]
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {
        "difference": diff,
        "ci_low": float(low),
        "ci_high": float(high),
        "reliable": bool(p * a.size >= MIN_TAIL_CHIPS),
    }
