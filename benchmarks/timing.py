"""Timing: every figure is the median of repeated runs after warm-up, with the min–max spread.

The variants of one case are timed side by side, round by round (a block of calls of each per round), so a
change in the machine's load hits them alike and their ratios hold on a shared machine; CUDA is
synchronised around every block. (torch.utils.benchmark's ``blocked_autorange`` times one statement to
completion before the next, and its ``timeit`` adds warm-up calls to every block, which triples the cost
of seconds-long calls; hence this small loop.)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    name: str
    median_s: float
    min_s: float
    max_s: float
    runs: int


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed_block(fn, number: int) -> float:
    synchronize()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize()
    return (time.perf_counter() - t0) / number


def time_group(
    fns: dict, *, min_run_time: float = 1.0, warmup: int = 2, rounds: int = 3, budget: float = 0.0, max_rounds: int = 15
) -> dict[str, Timing]:
    """Median (min–max) seconds per call of each function in ``fns``, timed side by side.

    After ``warmup`` calls each (which also estimate the cost of a call), the variants are timed round by
    round, interleaved — a block of calls of each variant per round, ``rounds`` rounds — so a change of
    the machine's load hits every variant alike and the ratios between them stay meaningful on a shared
    machine. A block holds enough calls to last ``min_run_time / rounds`` (at least one), so each
    variant is timed for about ``max(min_run_time, rounds × one call)``. With a ``budget`` (seconds,
    for seconds-long calls) rounds continue past ``rounds`` until the timed calls of all variants
    together have taken ``budget``, up to ``max_rounds``. CUDA is synchronised around every block. A
    variant that runs out of memory gives NaN rather than a crash.
    """
    per_call: dict[str, float] = {}
    for k, fn in fns.items():
        try:  # the fastest warm-up call estimates a call (the first may include one-time costs)
            per_call[k] = min(_timed_block(fn, 1) for _ in range(warmup)) if warmup else 0.0
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            per_call[k] = math.nan
    number = {k: 1 if (not t or math.isnan(t)) else max(1, int(min_run_time / rounds / t)) for k, t in per_call.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    spent, done = 0.0, 0
    while done < rounds or (spent < budget and done < max_rounds):
        for k, fn in fns.items():
            if math.isnan(per_call[k]):
                continue
            try:
                t = _timed_block(fn, number[k])
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                per_call[k] = math.nan
                continue
            times[k].append(t)
            spent += t * number[k]
        done += 1
    out = {}
    for k, t in times.items():
        if math.isnan(per_call[k]) or not t:
            out[k] = Timing(k, math.nan, math.nan, math.nan, 0)
        else:
            out[k] = Timing(k, statistics.median(t), min(t), max(t), len(t))
    return out
