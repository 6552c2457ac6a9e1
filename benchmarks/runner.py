"""Running cases: the ceilings, then each case (a failed one reported, the others still run), and the
command line shared by the bench modules."""

from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import asdict

import torch

from benchmarks import config, environment, history, report
from benchmarks.ceilings import measure_ceilings
from benchmarks.config import Config
from benchmarks.results import Row


def run_cases(
    cfg: Config, cases: dict, names: list[str], *, ceilings: bool = True, log=print, after_case=None
) -> tuple[dict, list[Row], list[dict]]:
    """Measure the ceilings, then each named case (a function of (cfg, ceilings) returning its rows).

    A case that fails (a correctness check, an error) is reported and skipped; the others still run.
    ``after_case(ceilings, rows, failures)`` is called after each case (to save partial results).
    Returns (ceilings, rows, failures); a failure is {"case", "error"}.
    """
    rows: list[Row] = []
    failures: list[dict] = []
    ceil: dict = {}
    if ceilings:
        t0 = time.perf_counter()
        config.adapt_threads(cfg, log)
        ceil, crow = measure_ceilings(cfg)
        rows += crow
        log(f"[bench] ceiling: {time.perf_counter() - t0:.1f} s", flush=True)
    for name in names:
        t0 = time.perf_counter()
        config.adapt_threads(cfg, log)
        try:
            rows += cases[name](cfg, ceil)
        except Exception as exc:  # report, keep going: one broken case must not hide the others
            traceback.print_exc()
            failures.append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
            log(
                f"[bench] {name}: FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {exc}",
                flush=True,
            )
            if after_case is not None:
                after_case(ceil, rows, failures)
            continue
        log(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if after_case is not None:
            after_case(ceil, rows, failures)
    if cfg.auto_threads:
        torch.set_num_threads(config.DEFAULT_THREADS)
        cfg.threads_reduced = ""
    return ceil, rows, failures


def cli_main(description: str, cases, argv=None, extra_args=None) -> tuple[argparse.Namespace, list[Row]]:
    """The CLI of one bench module: its cases (a dict name → case function, or a function of the parsed
    arguments giving one) with the suite's options, printed as the summary table."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_common_args(p)
    if extra_args:
        extra_args(p)
    a = p.parse_args(argv)
    if callable(cases):
        cases = cases(a)
    cfg = config.config_from_args(a)
    env = environment.environment()
    print(environment.env_line(env), flush=True)
    names = list(cases) if not a.only else config.parse_only(a.only, cases)
    ceil, rows, failures = run_cases(cfg, cases, names, ceilings=not a.no_ceiling)
    print()
    print(report.summary_table(rows))
    path = history.json_path(a.json, env, asdict(cfg))
    if path:
        report.write_json(path, env, rows, config=asdict(cfg), ceilings=ceil, failures=failures)
    if failures:
        raise SystemExit(f"failed: {', '.join(f['case'] for f in failures)}")
    return a, rows
