"""Results: the rows of a case, their ratios to baselines and the DESIGN §8 targets they are judged by."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from benchmarks.config import Config
from benchmarks.timing import Timing, time_group

#: DESIGN §8 targets: key → {device: (op, bound as DESIGN §8 writes it)}. "time" comparisons are
#: time(variant)/time(baseline) and want "≤"; "speedup" comparisons are time(baseline)/time(variant)
#: and want "≥".
TARGETS: dict[str, dict[str, tuple[str, str]]] = {
    "perturb_vs_copy": {"cpu": ("≤", "4"), "cuda": ("≤", "1.25")},
    "perturb_vs_reference": {"cpu": ("≥", "5"), "cuda": ("≥", "50")},
    "perturb_vs_compiled": {"cpu": ("≥", "1.0"), "cuda": ("≥", "1.5")},
    "linear_vs_clean": {"cpu": ("≤", "1.15"), "cuda": ("≤", "1.10")},
    "fused_vs_materialised": {"cuda": ("≥", "1.5")},
    "noise_step_vs_clean": {"cpu": ("≤", "1.10"), "cuda": ("≤", "1.10")},
    "ovf_vs_clean": {"cpu": ("≤", "4.2"), "cuda": ("≤", "4.2")},
    "ovf_vs_reference": {"cpu": ("≥", "1.0"), "cuda": ("≥", "20")},
    "mc_vs_clean": {"cpu": ("≤", "1.2"), "cuda": ("≤", "1.1")},
    "mc_vs_reference": {"cuda": ("≥", "10")},  # CPU: "—", shown unreachable (RESULTS.md)
    "layer_vs_peer": {"cpu": ("≥", "1.0"), "cuda": ("≥", "1.0")},  # noisy Linear/Conv fwd+bwd vs aihwkit-lightning
    "train_vs_peer": {"cpu": ("≥", "1.5"), "cuda": ("≥", "1.5")},  # training step vs aihwkit-lightning
    # not DESIGN §8: issue 27's goal for the noise-injection step of a small BERT/GPT-2/ViT (CPU only)
    "transformer_step_vs_clean": {"cpu": ("≤", "1.3")},
}


@dataclass
class Compare:
    """One ratio of a row to a baseline row of the same case."""

    baseline: str
    kind: str  # "time": t/t_baseline (lower is better); "speedup": t_baseline/t (higher is better)
    value: float
    target: str | None = None  # e.g. "≤ 4×"
    met: bool | None = None
    exact: bool = True  # the measured configuration is the one DESIGN §8 names
    target_key: str | None = None  # the key of TARGETS


@dataclass
class Row:
    case: str
    variant: str
    timing: Timing
    throughput: float | None = None
    unit: str | None = None  # "GB/s", "TFLOP/s", "img/s"
    ceiling: str | None = None  # which measured ceiling the throughput is compared with
    ceiling_pct: float | None = None
    compares: list[Compare] = field(default_factory=list)
    note: str = ""
    threads: int = 0  # torch intra-op threads when timed
    skipped: bool = False  # not run (an optional dependency is missing): no timing, the reason in ``note``

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("timing"))
        d.pop("name")
        return d


class Case:
    """Collects the rows of one case: time variants, attach ratios and DESIGN targets."""

    def __init__(self, cfg: Config, ceilings: dict | None = None):
        self.cfg = cfg
        self.ceilings = ceilings or {}
        self.rows: list[Row] = []

    def time(
        self,
        case: str,
        fns: dict,
        *,
        work: float | None = None,
        unit: str | None = None,
        ceiling: str | None = None,
        slow: bool = False,
        notes: dict | None = None,
        warmup: int | None = None,
    ) -> dict[str, Row]:
        """Time the variants ``fns`` (name → function) side by side (:func:`time_group`) and add one row
        each. ``work`` per call (bytes, FLOPs, images; a number or a dict per variant) gives the
        throughput in ``unit`` and, with ``ceiling`` (a key of the measured ceilings), its percentage.
        ``slow``: seconds-long calls, timed one call per round for ``cfg.slow_runs`` rounds or more while
        ``cfg.slow_budget`` lasts, after one warm-up call (``warmup`` overrides the warm-up count, e.g. 0
        when the checks already warmed up)."""
        cfg = self.cfg
        if slow:
            timings = time_group(
                fns,
                min_run_time=0.0,
                warmup=1 if warmup is None else warmup,
                rounds=cfg.slow_runs,
                budget=cfg.slow_budget,
            )
        else:
            timings = time_group(
                fns, min_run_time=cfg.min_run_time, warmup=cfg.warmup if warmup is None else warmup, rounds=cfg.min_runs
            )
        rows = {}
        for k, t in timings.items():
            row = Row(case, k, t, note=(notes or {}).get(k, ""), threads=torch.get_num_threads())
            w = work.get(k) if isinstance(work, dict) else work
            if w is not None and t.median_s > 0:
                scale = {"GB/s": 1e9, "TFLOP/s": 1e12, "GFLOP/s": 1e9}.get(unit, 1.0)
                row.throughput, row.unit = w / t.median_s / scale, unit
                if ceiling and self.ceilings.get(ceiling):
                    ref_value, ref_unit = self.ceilings[ceiling]
                    if ref_unit == unit:
                        row.ceiling, row.ceiling_pct = ceiling, 100.0 * row.throughput / ref_value
            rows[k] = self.add(row)
        return rows

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def compare(
        self,
        row: Row,
        base: Row,
        kind: str = "time",
        target: str | None = None,
        *,
        per: float = 1.0,
        exact: bool = True,
    ) -> Compare:
        """Attach time(row)/per / time(base) ("time") or its inverse ("speedup") to ``row``; ``target`` a
        key of :data:`TARGETS` (ignored where it names no value for this device)."""
        t = row.timing.median_s / per
        value = t / base.timing.median_s if kind == "time" else base.timing.median_s / t
        c = Compare(base.variant, kind, value, exact=exact and not self.cfg.threads_reduced)
        if target is not None and self.cfg.device in TARGETS[target]:
            op, text = TARGETS[target][self.cfg.device]
            bound = float(text)
            c.target, c.target_key = f"{op} {text}×", target
            if not math.isnan(value):
                c.met = value <= bound if op == "≤" else value >= bound
        row.compares.append(c)
        return c

    def compare_layer(self, rows: dict, noisy: str, clean_target: str | None = None) -> None:
        """The ratios of a layer case: ``rows[noisy]`` against clean (time; ``clean_target`` as :meth:`compare`),
        against the reference way and the compiled composite (speed-up), then those two against clean."""
        self.compare(rows[noisy], rows["clean"], "time", clean_target)
        baselines = [k for k in ("reference", "compiled") if k in rows]
        for base in baselines:
            self.compare(rows[noisy], rows[base], "speedup")
        for base in baselines:
            self.compare(rows[base], rows["clean"], "time")
