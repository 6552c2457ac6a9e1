"""Robustness metrics of a Monte-Carlo evaluation (DESIGN §6).

* :func:`expected_kl` — the epistemic uncertainty of R chip instances on N inputs,
  EKL = mean_n [H(p̄_n) − mean_r H(p_{r,n})] in nats (= mean_n mean_r KL(p_{r,n} ‖ p̄_n)),
  from a dense ``[R, N, C]`` probability tensor;
* :class:`EKLAccumulator` — the same value streamed instance by instance with memory
  O(inputs × classes), bit-reproducible whatever the batching and the number of processes;
* :func:`accuracy_stats` — mean, std, normal-approximation confidence intervals, min/max,
  percentiles and the low tail (:mod:`nft_cuda.eval.tails`) of the per-instance accuracies.

Determinism. Everything is computed in float64. The per-instance scalars (accuracy, summed
confidence, summed p·log p) are combined *exactly* (with :class:`fractions.Fraction`) and rounded
once, so their statistics do not depend on the order the instances were computed in. The only
float64 sum that is not exact is Σ_r p_r per input (``[N, C]``), needed by H(p̄); it is summed in a
fixed tree that does not depend on the execution: instances are grouped into fixed *blocks* of
``block_size`` consecutive instances (r // block_size), each block sums its instances in instance
order, and the block sums are folded into the total in block order. A process that evaluates whole
blocks can hand its block sums to another one (see :mod:`nft_cuda.eval.monte_carlo`), and the total is
bit-identical to the one of a single process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from nft_cuda import _args
from nft_cuda.eval.tails import tail_stats

__all__ = [
    "EKL_BLOCK",
    "PERCENTILES",
    "Z95",
    "Z99",
    "EKLAccumulator",
    "accuracy_stats",
    "entropy",
    "exact_mean",
    "expected_kl",
]

#: Instances per block of the fixed Σ_r p_r summation tree.
EKL_BLOCK = 8
#: Normal quantiles of the two-sided 95% / 99% confidence intervals (the reference's values).
Z95 = 1.96
Z99 = 2.576
#: Percentiles reported for the per-instance accuracy.
PERCENTILES = (5, 25, 50, 75, 95)


def _probs64(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of probabilities, got {probs.dtype}")
    return probs.to(torch.float64)


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy −Σ p·log p in nats along ``dim``, in float64, with 0·log 0 = 0 (``torch.xlogy``)."""
    p = _probs64(probs)
    return -torch.xlogy(p, p).sum(dim)


def expected_kl(probs: torch.Tensor) -> float:
    """Expected KL divergence (epistemic uncertainty) of R instances on N inputs, in nats.

    Args:
        probs: ``[R, N, C]`` (instances, inputs, classes) probabilities (rows summing to 1), any
            floating dtype and device; computed in float64.

    Returns:
        mean over inputs of H(p̄) − mean_r H(p_r), with p̄ the mean over instances — equal to
        mean_n mean_r KL(p_r ‖ p̄). ``torch.xlogy`` avoids 0·log 0 NaNs; the result is clamped at 0
        against round-off (it is ≥ 0 mathematically, by the concavity of H).
    """
    p = _probs64(probs)
    if p.dim() != 3:
        raise ValueError(f"probs must be [R, N, C] (instances, inputs, classes), got shape {list(p.shape)}")
    r, n, _ = p.shape
    if r == 0 or n == 0:
        raise ValueError(f"probs needs at least one instance and one input, got shape {list(p.shape)}")
    p_bar = p.mean(0)
    h_bar = entropy(p_bar).mean()
    h_inst = entropy(p).mean()
    return max(0.0, float(h_bar - h_inst))


def exact_mean(values: Sequence[float], denominator: int | None = None) -> float:
    """Σ values / denominator (default: len(values)) summed exactly, rounded once to float64: the
    same value for any order of ``values``; the mean of equal values is that value."""
    if denominator is None:
        denominator = len(values)
    if denominator <= 0:
        raise ValueError("exact_mean needs a positive denominator")
    total = sum((Fraction(float(v)) for v in values), Fraction(0))
    return float(total / denominator)


class EKLAccumulator:
    """Streaming expected KL divergence over R instances on a fixed set of N inputs.

    Memory O(N × C): the running Σ_r p_r per input in float64 (plus one ``[N, C]`` buffer per open
    block) and one float64 scalar Σ_n Σ_c p·log p per instance.

    Usage::

        acc = EKLAccumulator(num_inputs=N, num_classes=C)
        for r in range(R):                       # any order of instances and of row ranges
            for start, p in batches_of(r):       # p: [B, C] probabilities of rows start..start+B-1
                acc.update(r, p, start)
        ekl = acc.value()                        # == expected_kl(all probs) up to float64 round-off

    Summation order (see the module docstring): instance r goes to block r // block_size; a block sums
    its instances in the order they are given for each row (give them in instance order); the
    completed block sums are folded into the total in block order. A block is complete when all its
    rows have been given for ``block_size`` instances — or, for the last partial block, at
    :meth:`finish`. :meth:`take_block` / :meth:`put_block` move whole block sums between processes.

    Args:
        num_inputs: N.
        num_classes: C.
        device: where the ``[N, C]`` sums live (default CPU); updates are moved there.
        block_size: instances per block of the summation tree (default :data:`EKL_BLOCK`).
        auto_fold: fold a block as soon as it is complete (default). With False, blocks stay open
            until :meth:`take_block` / :meth:`put_block` or :meth:`finish` (what a process that
            exchanges block sums with others needs).
    """

    def __init__(
        self, num_inputs: int, num_classes: int, *, device=None, block_size: int = EKL_BLOCK, auto_fold: bool = True
    ):
        for name, v in (("num_inputs", num_inputs), ("num_classes", num_classes), ("block_size", block_size)):
            _args.check_positive_int(name, v)
        self.num_inputs = num_inputs
        self.num_classes = num_classes
        self.block_size = block_size
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.auto_fold = bool(auto_fold)
        self._total = torch.zeros(num_inputs, num_classes, dtype=torch.float64, device=self.device)
        self._blocks: dict[int, list] = {}  # block → [sum [N, C], rows given, complete]
        self._next_block = 0  # the next block to fold into the total
        self._plogp: dict[int, torch.Tensor] = {}  # instance → Σ_n Σ_c p log p (float64 scalar tensor)

    # -- streaming -------------------------------------------------------------------------------

    def update(self, instance: int, probs: torch.Tensor, start: int = 0) -> None:
        """Add the probabilities ``probs`` [B, C] of rows ``start .. start+B-1`` of ``instance``."""
        p = _probs64(probs).to(self.device)
        if p.dim() != 2 or p.shape[1] != self.num_classes:
            raise ValueError(f"probs must be [B, {self.num_classes}], got shape {list(p.shape)}")
        stop = start + p.shape[0]
        if start < 0 or stop > self.num_inputs:
            raise ValueError(f"rows {start}..{stop - 1} are outside the {self.num_inputs} inputs")
        b = instance // self.block_size
        if b < self._next_block:
            raise ValueError(f"instance {instance} belongs to block {b}, which is already folded")
        entry = self._blocks.get(b)
        if entry is None:
            entry = self._blocks[b] = [torch.zeros_like(self._total), 0, False]
        entry[0][start:stop] += p
        entry[1] += p.shape[0]
        entry[2] = self.auto_fold and entry[1] == self.block_size * self.num_inputs
        plogp = torch.xlogy(p, p).sum(-1).sum()
        prev = self._plogp.get(instance)
        self._plogp[instance] = plogp if prev is None else prev + plogp
        if entry[2] and self.auto_fold:
            self._fold()

    def _fold(self) -> None:
        """Fold complete blocks into the total, in block order."""
        while True:
            entry = self._blocks.get(self._next_block)
            if entry is None or not entry[2]:
                return
            self._total += entry[0]
            del self._blocks[self._next_block]
            self._next_block += 1

    def take_block(self, block: int) -> torch.Tensor:
        """Remove and return the ``[N, C]`` float64 sum of a block evaluated here (not yet folded)."""
        entry = self._blocks.pop(block, None)
        if entry is None:
            raise KeyError(f"block {block} is not open here")
        return entry[0]

    def put_block(self, block: int, block_sum: torch.Tensor) -> None:
        """Insert the complete ``[N, C]`` sum of a block (e.g. computed by another process) and fold
        every block that can be folded in order."""
        if block < self._next_block or block in self._blocks:
            raise ValueError(f"block {block} is already present")
        if tuple(block_sum.shape) != (self.num_inputs, self.num_classes):
            raise ValueError(
                f"a block sum must be [{self.num_inputs}, {self.num_classes}], got {list(block_sum.shape)}"
            )
        self._blocks[block] = [block_sum.to(self.device, torch.float64), None, True]
        self._fold()

    def add_instance_plogp(self, instance: int, value: float) -> None:
        """Record Σ_n Σ_c p·log p of an instance computed elsewhere."""
        if instance in self._plogp:
            raise ValueError(f"instance {instance} is already recorded")
        self._plogp[instance] = torch.tensor(float(value), dtype=torch.float64)

    def instance_plogp(self) -> dict[int, float]:
        """instance → Σ_n Σ_c p·log p (float64) of the instances recorded so far."""
        return {r: float(v) for r, v in sorted(self._plogp.items())}

    def finish(self) -> None:
        """Fold the remaining blocks (the last one may be partial) in block order."""
        for b in sorted(self._blocks):
            if b != self._next_block:
                raise RuntimeError(f"block {self._next_block} is missing (blocks {sorted(self._blocks)} are open)")
            entry = self._blocks.pop(b)
            self._total += entry[0]
            self._next_block += 1

    # -- result ----------------------------------------------------------------------------------

    @property
    def runs(self) -> int:
        return len(self._plogp)

    def probability_sum(self) -> torch.Tensor:
        """Σ_r p_r [N, C] (float64) after :meth:`finish`."""
        return self._total

    def value(self) -> float:
        """EKL in nats (folds the remaining blocks first); clamped at ≥ 0."""
        self.finish()
        r = self.runs
        if r == 0:
            raise ValueError("no instance was added")
        if sorted(self._plogp) != list(range(r)):
            missing = sorted(set(range(max(self._plogp) + 1)) - set(self._plogp))
            raise ValueError(f"instances must be 0..R-1; missing {missing[:10]}")
        p_bar = self._total / r
        h_bar = float(entropy(p_bar).sum().cpu())  # Σ_n H(p̄_n)
        # Σ_r Σ_n H(p_r,n) = −Σ_r plogp_r, summed exactly.
        h_inst = -sum((Fraction(float(v)) for v in self._plogp.values()), Fraction(0))
        n = self.num_inputs
        return max(0.0, h_bar / n - float(h_inst / (r * n)))


def accuracy_stats(accuracies: Sequence[float]) -> dict:
    """Statistics of the per-instance accuracies of one σ_d, in float64.

    Returns a dict with ``accuracy_mean``, ``accuracy_std`` (sample std, ddof=1), ``ci95`` =
    1.96·std/√R and ``ci99`` = 2.576·std/√R — the *normal approximation* of the confidence interval
    of the mean that the reference code reports, kept for comparability (for small R a Student-t
    interval would be wider) —, ``accuracy_min``, ``accuracy_max``, ``accuracy_percentiles``
    {"5", "25", "50", "75", "95"} (numpy's linear interpolation) and ``accuracy_tails`` {"1", "5", "10"}:
    the k-th percentile chip as an order statistic with its distribution-free CI95
    (:func:`nft_cuda.eval.tails.tail_stats`).

    The mean and the variance are computed exactly (rational arithmetic on the float64 values) and
    rounded once, so they do not depend on the order of the instances, and R equal accuracies give
    exactly that mean and std 0. With R = 1, std and the CIs are None (undefined for ddof=1).
    """
    vals = [float(a) for a in accuracies]
    r = len(vals)
    if r == 0:
        raise ValueError("accuracy_stats needs at least one accuracy")
    fr = [Fraction(v) for v in vals]
    total = sum(fr, Fraction(0))
    mean_exact = total / r
    if r > 1:
        var = sum(((f - mean_exact) ** 2 for f in fr), Fraction(0)) / (r - 1)
        std = math.sqrt(float(var))
        ci95 = Z95 * std / math.sqrt(r)
        ci99 = Z99 * std / math.sqrt(r)
    else:
        std = ci95 = ci99 = None
    arr = np.asarray(vals, dtype=np.float64)
    pct = np.percentile(arr, PERCENTILES)
    return {
        "accuracy_mean": float(mean_exact),
        "accuracy_std": std,
        "ci95": ci95,
        "ci99": ci99,
        "accuracy_min": float(arr.min()),
        "accuracy_max": float(arr.max()),
        "accuracy_percentiles": {str(q): float(v) for q, v in zip(PERCENTILES, pct)},
        "accuracy_tails": tail_stats(vals),
    }
