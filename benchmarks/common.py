"""Shared pieces of the benchmarks: configuration, timing, the reference way, checks, targets, reports.

Timing: every figure is the median of repeated runs after warm-up, with the min–max spread. The
variants of one case are timed side by side, round by round (a block of calls of each per round), so a
change in the machine's load hits them alike and their ratios hold on a shared machine; CUDA is
synchronised around every block. (torch.utils.benchmark's ``blocked_autorange`` times one statement
to completion before the next, and its ``timeit`` adds warm-up calls to every block, which triples
the cost of seconds-long calls; hence this small loop.)

"Reference way" (DESIGN §8): the paper code's method written in plain PyTorch — max|W| read back to
the host (``.item()``, one synchronisation per layer per forward), the state-band mask,
``torch.normal`` on the host, copied to the weight's device, added, then ``F.linear``/``F.conv2d``;
per layer, per forward. "Compiled": ``torch.compile`` of that composite without the host read (the
noise from ``randn_like``). "Clean": the same layer or step with no noise at all (the floor).

Importing this module sets ``NFT_CUDA_STRICT=1`` before ``nft_cuda`` is imported, so a missing kernel
is an error rather than a silently timed pure-PyTorch fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

os.environ.setdefault("NFT_CUDA_STRICT", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_cuda  # noqa: E402

#: The variation every benchmark uses: σ_d = 0.1 on the two-state-factor preset, so the state-band
#: mask matters (RRAM1 would make both bands equal).
VARIATION = nft_cuda.Variation(0.1, "FeFET2")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class Config:
    """What a run measures and how long it times each figure.

    quick: fewer repeats, shorter runs, and smaller or fewer shapes where the full ones are slow on a
    2-core CPU (each case says which); the ``exact`` flag of a comparison says whether the measured
    configuration is the one DESIGN §8 names.
    """

    device: str = "cpu"
    quick: bool = False
    numel: int = 4 * 2**20  # perturb's weight
    compile: bool = True  # time torch.compile baselines (the perturb one always, layers' in full runs)
    auto_threads: bool = False  # quick CPU runs: one thread for a case when the machine is busy
    threads_reduced: str = ""  # why the current case runs on one thread (then no comparison is "exact")

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def warmup(self) -> int:
        return 1 if self.quick else 2

    @property
    def min_run_time(self) -> float:
        """Seconds of timed calls per variant (spread over the rounds)."""
        return 0.2 if self.quick else 1.0

    @property
    def min_runs(self) -> int:
        """Rounds: timed blocks per variant (calls longer than the budget are repeated this often)."""
        return 3 if self.quick else 5

    @property
    def slow_runs(self) -> int:
        """Fewest rounds of seconds-long calls (training steps, Monte-Carlo evaluations): one call of
        each variant per round."""
        return 3

    @property
    def slow_budget(self) -> float:
        """Seconds of timed seconds-long calls per case, all variants together: more rounds (up to 15)
        while the budget lasts."""
        return 6.0 if self.quick else 60.0

    @property
    def flop_unit(self) -> str:
        return "TFLOP/s" if self.cuda else "GFLOP/s"

    @property
    def compile_layers(self) -> bool:
        """torch.compile baselines of the layer cases: full runs only (each costs a cold compile)."""
        return self.compile and not self.quick


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


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


def time_group(fns: dict, *, min_run_time: float = 1.0, warmup: int = 2, rounds: int = 3,
               budget: float = 0.0, max_rounds: int = 15) -> dict[str, Timing]:
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


def time_fn(name: str, fn, *, min_run_time: float = 1.0, warmup: int = 2, min_runs: int = 3) -> Timing:
    """Median (min–max) seconds per call of one function (see :func:`time_group`)."""
    t = time_group({name: fn}, min_run_time=min_run_time, warmup=warmup, rounds=min_runs)[name]
    return t


# --------------------------------------------------------------------------------------------------
# The reference way and the compiled composite (DESIGN §8)
# --------------------------------------------------------------------------------------------------


def reference_noise(w: torch.Tensor, variation: nft_cuda.Variation, sigma: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference's device-variation noise for weight ``w``, on ``w``'s device (a constant: no grad).

    max|W| read to the host, the state-band mask, ``torch.normal`` on the host, copied to the device —
    as :func:`nft_cuda.eval.reference_loop.reference_perturb_` (same draws for the same generator).
    """
    v = variation if sigma is None else variation.with_sigma(sigma)
    w = w.detach()
    m = w.abs().max().item()  # host read: one synchronisation per layer per forward
    base = v.sigma * m * v.scale
    aw = w.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * v.state_factor, base).cpu()
    return torch.normal(torch.zeros_like(std), std, generator=generator).to(w.device)


def reference_weight(w: torch.Tensor, variation: nft_cuda.Variation, sigma: float | None = None) -> torch.Tensor:
    """W + reference noise (differentiable in W: the noise is a constant, as in the reference)."""
    return w + reference_noise(w, variation, sigma).to(w.dtype)


def reference_linear(x, w, b, variation: nft_cuda.Variation):
    return F.linear(x, reference_weight(w, variation), b)


def reference_conv2d(x, w, b, variation: nft_cuda.Variation, padding=1):
    return F.conv2d(x, reference_weight(w, variation), b, padding=padding)


def compile_fresh(fn):
    """``torch.compile(fn)`` with dynamo's caches cleared first, and hitting the recompile limit made an
    error: past it dynamo would silently run ``fn`` eagerly and the "compiled" figure would be eager."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn)


def composite_weight(w: torch.Tensor, sigma: float, scale: float, s: float) -> torch.Tensor:
    """The reference composite without the host read (what torch.compile is given): max|W| and the
    mask on the device, noise from ``randn_like``; straight-through in W."""
    wd = w.detach()
    m = wd.abs().amax()
    base = sigma * m * scale
    aw = wd.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * s, base)
    return w + std * torch.randn_like(wd)


def composite_linear(x, w, b, sigma: float, scale: float, s: float):
    return F.linear(x, composite_weight(w, sigma, scale, s), b)


def composite_conv2d(x, w, b, sigma: float, scale: float, s: float):
    return F.conv2d(x, composite_weight(w, sigma, scale, s), b, padding=1)


class _ReferenceNoisy:
    """Mixin: the layer's forward uses W + reference noise at ``self.sigma`` (drawn per forward)."""

    variation: nft_cuda.Variation
    sigma: float

    def noisy_weight(self) -> torch.Tensor:
        return reference_weight(self.weight, self.variation, self.sigma)


class ReferenceLinear(_ReferenceNoisy, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.noisy_weight(), self.bias)


class ReferenceConv2d(_ReferenceNoisy, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.noisy_weight(), self.bias)


def reference_convert(model: nn.Module, variation: nft_cuda.Variation) -> nn.Module:
    """Swap every plain ``nn.Linear``/``nn.Conv2d`` of ``model`` (in place) for its reference-way twin,
    keeping the parameters. Set ``layer.sigma`` of the returned layers to change σ_d per forward."""
    for _name, child in list(model.named_children()):
        if type(child) in (nn.Linear, nn.Conv2d):
            child.__class__ = ReferenceLinear if type(child) is nn.Linear else ReferenceConv2d
            child.variation, child.sigma = variation, variation.sigma
        else:
            reference_convert(child, variation)
    return model


def reference_layers(model: nn.Module) -> list[_ReferenceNoisy]:
    return [m for m in model.modules() if isinstance(m, _ReferenceNoisy)]


# --------------------------------------------------------------------------------------------------
# Correctness checks (run before timing)
# --------------------------------------------------------------------------------------------------


class CheckError(AssertionError):
    """A variant failed its correctness check; it is not timed."""


def check_noise_std(noisy: torch.Tensor, w: torch.Tensor, variation: nft_cuda.Variation, name: str,
                    tol: float = 0.03) -> None:
    """(W_noisy − W)/σ_w has unit standard deviation (DESIGN §2 noise model)."""
    ratio = ((noisy.float() - w.float()) / variation.sigma_w(w.float())).std().item()
    if not abs(ratio - 1.0) <= tol:
        raise CheckError(f"{name}: std of (W_noisy - W)/sigma_w is {ratio:.4f}, expected 1 ± {tol}")


def check_close(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise CheckError(f"{name}: {exc}") from None


def check_rel_err(got: torch.Tensor, want: torch.Tensor, name: str, tol: float) -> float:
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
    if not err <= tol:
        raise CheckError(f"{name}: relative error {err:.2e} > {tol:.0e}")
    return err


def gemm_tol(cfg: Config) -> float:
    """Relative tolerance between two float32 GEMMs/convolutions of the same operands: tight on CPU;
    on CUDA cuDNN may use TF32 (torch's default for convolutions) and other algorithms."""
    return 5e-3 if cfg.cuda else 1e-4


def check_deviation(outs: dict[str, torch.Tensor], clean: torch.Tensor, case: str, tol: float = 0.25) -> None:
    """Every noisy variant moves the clean output by the same relative amount (same noise law): the
    relative deviations ‖y − y_clean‖/‖y_clean‖ agree within ``tol`` (relative) and are non-zero."""
    dev = {k: ((v.float() - clean.float()).norm() / clean.float().norm()).item() for k, v in outs.items()}
    lo, hi = min(dev.values()), max(dev.values())
    if not (lo > 0 and hi <= lo * (1 + tol)):
        raise CheckError(f"{case}: relative deviation from the clean output differs between variants: "
                         + ", ".join(f"{k} {v:.3e}" for k, v in dev.items()))


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CheckError(f"{name}: non-finite values")


# --------------------------------------------------------------------------------------------------
# DESIGN §8 targets
# --------------------------------------------------------------------------------------------------

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
    "mc_vs_reference": {"cpu": ("≥", "3"), "cuda": ("≥", "10")},
}


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


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

    def time(self, case: str, fns: dict, *, work: float | None = None, unit: str | None = None,
             ceiling: str | None = None, slow: bool = False, notes: dict | None = None,
             warmup: int | None = None) -> dict[str, Row]:
        """Time the variants ``fns`` (name → function) side by side (:func:`time_group`) and add one row
        each. ``work`` per call (bytes, FLOPs, images; a number or a dict per variant) gives the
        throughput in ``unit`` and, with ``ceiling`` (a key of the measured ceilings), its percentage.
        ``slow``: seconds-long calls, timed one call per round for ``cfg.slow_runs`` rounds or more while
        ``cfg.slow_budget`` lasts, after one warm-up call (``warmup`` overrides the warm-up count, e.g. 0
        when the checks already warmed up)."""
        cfg = self.cfg
        if slow:
            timings = time_group(fns, min_run_time=0.0, warmup=1 if warmup is None else warmup,
                                 rounds=cfg.slow_runs, budget=cfg.slow_budget)
        else:
            timings = time_group(fns, min_run_time=cfg.min_run_time, warmup=cfg.warmup if warmup is None else warmup,
                                 rounds=cfg.min_runs)
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

    def compare(self, row: Row, base: Row, kind: str = "time", target: str | None = None, *, per: float = 1.0,
                exact: bool = True) -> Compare:
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


def fmt_ms(t: Timing) -> str:  # kept for older callers
    return fmt_timing(t)


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
        out.append([
            r.case, r.variant + (f" ({r.note})" if r.note else ""), fmt_timing(r.timing), _fmt_throughput(r),
            "; ".join(_fmt_compare(c) for c in r.compares),
            "; ".join(_fmt_target(c) for c in targeted), "; ".join(_fmt_met(c) for c in targeted),
        ])
    return out


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    return markdown_table(SUMMARY_HEADERS, summary_rows(rows))


# --------------------------------------------------------------------------------------------------
# Ceilings: copy bandwidth and a clean GEMM's FLOP/s on this machine
# --------------------------------------------------------------------------------------------------


def measure_ceilings(cfg: Config) -> tuple[dict, list[Row]]:
    """The hardware floor the throughputs are compared with: a plain copy's bandwidth (64 MiB float32
    into a preallocated buffer, read + write) and a clean square float32 GEMM's FLOP/s (torch defaults;
    bf16 too on CUDA). A ceiling is what the machine can do, so its figure is the best round (the
    fastest), not the median."""
    case = Case(cfg)
    dev = cfg.dev
    src = torch.randn(16 * 2**20, device=dev)
    dst = torch.empty_like(src)  # preallocated: the bandwidth, not the allocator's page faults
    fns = {"copy 64 MiB": lambda: dst.copy_(src)}
    work = {"copy 64 MiB": 2 * src.numel() * 4}
    units = {"copy 64 MiB": "GB/s"}
    keys = {"copy 64 MiB": "copy"}
    sizes = [("fp32", torch.float32, 8192 if cfg.cuda else (1024 if cfg.quick else 2048))]
    if cfg.cuda:
        sizes.append(("bf16", torch.bfloat16, 8192))
    for label, dtype, n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        name = f"GEMM {label} {n}³"
        fns[name] = lambda a=a, b=b: a @ b
        work[name], units[name], keys[name] = 2.0 * n**3, cfg.flop_unit, f"GEMM {label}"
    ceilings = {}
    for name, fn in fns.items():
        row = case.time("ceiling", {name: fn}, work=work[name], unit=units[name], notes={name: "best round"})[name]
        scale = {"GB/s": 1e9, "TFLOP/s": 1e12, "GFLOP/s": 1e9}[units[name]]
        if row.timing.min_s > 0:
            row.throughput = work[name] / row.timing.min_s / scale
        ceilings[keys[name]] = (row.throughput, units[name])
    return ceilings, case.rows


# --------------------------------------------------------------------------------------------------
# Environment and output
# --------------------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment() -> dict:
    info = nft_cuda.backend_info()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {_cpu_model()}",
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "nft_cuda": nft_cuda.__version__,
        "commit": git_commit(),
        "extension": {"cuda_compiled": info.get("cuda_compiled"), "cuda_version": info.get("cuda_version"),
                      "strict": info.get("strict"),
                      "perturb": info.get("ops", {}).get("perturb")},
    }
    return env


def env_line(env: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items() if k != "extension")


def write_json(path: str, env: dict, results: list, **extra) -> None:
    payload = {"environment": env, **extra, "results": [r.to_dict() if isinstance(r, Row) else r for r in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str, allow_nan=True)
        f.write("\n")


def rows_from_json(data: dict) -> list[Row]:
    """The rows of a JSON written by :func:`write_json` (to re-render its table)."""
    rows = []
    for r in data["results"]:
        t = Timing(r["variant"], r["median_s"], r["min_s"], r["max_s"], r["runs"])
        rows.append(Row(r["case"], r["variant"], t, r.get("throughput"), r.get("unit"), r.get("ceiling"),
                        r.get("ceiling_pct"), [Compare(**c) for c in r.get("compares", [])], r.get("note", ""),
                        r.get("threads", 0)))
    return rows


def as_dict(t: Timing) -> dict:
    return asdict(t)


@contextlib.contextmanager
def matmul_precision(device: str, mode: str):
    """fp32 matmul precision on CUDA for ``mode`` "tf32" (TF32 allowed) or anything else (ieee)."""
    if device != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    old = mm.fp32_precision
    mm.fp32_precision = "tf32" if mode == "tf32" else "ieee"
    try:
        yield
    finally:
        mm.fp32_precision = old


def run_cases(cfg: Config, cases: dict, names: list[str], *, ceilings: bool = True, log=print,
              after_case=None) -> tuple[dict, list[Row], list[dict]]:
    """Measure the ceilings, then each named case (a function of (cfg, ceilings) returning its rows).

    A case that fails (a correctness check, an error) is reported and skipped; the others still run.
    ``after_case(ceilings, rows, failures)`` is called after each case (to save partial results).
    Returns (ceilings, rows, failures); a failure is {"case", "error"}.
    """
    import traceback

    rows: list[Row] = []
    failures: list[dict] = []
    ceil: dict = {}
    if ceilings:
        t0 = time.perf_counter()
        adapt_threads(cfg, log)
        ceil, crow = measure_ceilings(cfg)
        rows += crow
        log(f"[bench] ceiling: {time.perf_counter() - t0:.1f} s", flush=True)
    for name in names:
        t0 = time.perf_counter()
        adapt_threads(cfg, log)
        try:
            rows += cases[name](cfg, ceil)
        except Exception as exc:  # report, keep going: one broken case must not hide the others
            traceback.print_exc()
            failures.append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
            log(f"[bench] {name}: FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {exc}",
                flush=True)
            if after_case is not None:
                after_case(ceil, rows, failures)
            continue
        log(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if after_case is not None:
            after_case(ceil, rows, failures)
    if cfg.auto_threads:
        torch.set_num_threads(_DEFAULT_THREADS)
        cfg.threads_reduced = ""
    return ceil, rows, failures


def cli_main(description: str, cases, argv=None, extra_args=None) -> tuple[argparse.Namespace, list[Row]]:
    """The CLI of one bench module: its cases (a dict name → case function, or a function of the parsed
    arguments giving one) with the suite's options, printed as the summary table."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    if extra_args:
        extra_args(p)
    a = p.parse_args(argv)
    if callable(cases):
        cases = cases(a)
    cfg = config_from_args(a)
    env = environment()
    print(env_line(env), flush=True)
    names = list(cases) if not a.only else parse_only(a.only, cases)
    ceil, rows, failures = run_cases(cfg, cases, names, ceilings=not a.no_ceiling)
    print()
    print(summary_table(rows))
    if a.json:
        write_json(a.json, env, rows, config=asdict(cfg), ceilings=ceil, failures=failures)
    if failures:
        raise SystemExit(f"failed: {', '.join(f['case'] for f in failures)}")
    return a, rows


def add_common_args(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter runs, smaller shapes where slow")
    p.add_argument("--only", help="comma-separated case names")
    p.add_argument("--numel", type=int, default=4 * 2**20, help="elements of perturb's weight (default 4M)")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile baseline")
    p.add_argument("--no-ceiling", action="store_true", help="skip measuring the copy/GEMM ceilings")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", help="write the results as JSON to this path")


def thread_contention(samples: int = 7) -> float:
    """Time of a small parallel op with torch's threads / with one thread (median of ``samples``).

    About 0.5 on an idle 2-core machine. Well above 1 when other processes keep the cores busy: every
    parallel region then waits for a descheduled OpenMP thread, which makes small ops many times
    slower (8–150× measured with two busy-looping processes on the 2-core development machine)."""
    n = torch.get_num_threads()
    if n < 2:
        return 0.0
    x = torch.randn(1 << 18)

    def run(k: int) -> float:
        torch.set_num_threads(k)
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(20):
                torch.exp(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    try:
        run(n)
        t1, tn = run(1), run(n)
    finally:
        torch.set_num_threads(n)
    return tn / t1


_DEFAULT_THREADS = torch.get_num_threads()


def adapt_threads(cfg: Config, log=print) -> None:
    """Quick CPU runs (``cfg.auto_threads``): before each case, torch's threads, or one thread when
    :func:`thread_contention` finds them slower than one (a busy machine); the reason is kept in
    ``cfg.threads_reduced`` and that case's comparisons are marked as not the DESIGN configuration."""
    if not cfg.auto_threads:
        return
    torch.set_num_threads(_DEFAULT_THREADS)
    cfg.threads_reduced = ""
    ratio = thread_contention(samples=5)
    if ratio >= 1.0:
        cfg.threads_reduced = (f"{_DEFAULT_THREADS} threads were {ratio:.1f}× slower than 1 on a parallel op "
                               "(busy machine): 1 thread")
        torch.set_num_threads(1)
        log(f"[bench] {cfg.threads_reduced}", flush=True)


def config_from_args(a) -> Config:
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if a.numel < 1024 or a.numel % 1024:
        raise SystemExit(f"--numel must be a positive multiple of 1024, got {a.numel}")
    cfg = Config(device=a.device, quick=a.quick, numel=a.numel, compile=not a.no_compile)
    # A quick run must finish in minutes on a busy machine too, where torch's threads wait for each other
    # and small ops run many times slower than on one thread (see adapt_threads). Full runs, and runs
    # given --threads, keep their threads.
    cfg.auto_threads = a.quick and a.device == "cpu" and not a.threads and torch.get_num_threads() > 1
    return cfg


def parse_only(only: str, cases: dict) -> list[str]:
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
    return names
