"""``nft demo``: the project's main job on the embedded dataset, with no download.

It trains the small model clean, with noise injection, OVF and IRS at one σ_d, evaluates every model on
the same simulated chips (Monte-Carlo, chip r draws the same noise in every model), and prints per
method its clean test accuracy, its accuracy under variation, its EKL and its paired difference to
noise injection with a verdict (:mod:`nft_cuda.eval.paired`). A model whose clean test accuracy is
more than :data:`UNDERTRAINED_POINTS` below the clean model's is named as undertrained, so a
comparison is never read without that caveat.

The settings (:data:`EPOCHS`, :data:`LR`) come from the measurements in docs/demo.md. Output: one
line per finished stage (training epoch, model, evaluation); progress bars only on a terminal, so a
log file holds no carriage returns. A rerun refuses to replace an earlier demo in ``--out`` unless
``--overwrite`` is given, as ``nft train`` does.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["EPOCHS", "LR", "UNDERTRAINED_POINTS", "add_demo", "check_out", "run_demo", "undertrained"]

#: Training epochs per method and learning rate (Adam, cosine schedule): see docs/demo.md.
EPOCHS = 10
LR = 1e-3
#: A model whose clean test accuracy is this many points (or more) below the clean model's is undertrained.
UNDERTRAINED_POINTS = 3.0
#: The files a demo writes in its output folder (besides one run folder per method).
OUTPUTS = ("demo.json", "demo.csv", "demo.png")
BASELINE = "noise"


def _print(msg: str) -> None:
    print(msg, flush=True)  # flushed, so a log file keeps stdout and stderr lines in order


def add_demo(subparsers) -> argparse.ArgumentParser:
    """Add ``nft demo`` to the ``nft`` parser (an entry of :data:`nft_cuda.cli.COMMANDS`)."""
    from nft_cuda._args import int_arg
    from nft_cuda.variation import PRESETS

    d = subparsers.add_parser(
        "demo",
        help="train the small model clean / noise / OVF / IRS on the embedded data and compare them",
        description="The main job of nft_cuda on the embedded Fashion-MNIST slice (no download): train the "
        "small model with each method at one σ_d, evaluate each on the same simulated chips and "
        "compare them with noise injection.",
    )
    d.add_argument("--sigma", type=_sigma, default=0.3, help="σ_d of training and evaluation (default 0.3)")
    d.add_argument(
        "--device-model",
        dest="device_model",
        choices=list(PRESETS),
        default="RRAM1",
        help="device variation model (default RRAM1)",
    )
    d.add_argument(
        "--methods",
        default="clean,noise,ovf,irs",
        help="comma-separated methods to compare (default clean,noise,ovf,irs)",
    )
    d.add_argument("--epochs", type=int_arg(1), default=EPOCHS, help=f"training epochs per method (default {EPOCHS})")
    d.add_argument(
        "--runs",
        type=int_arg(2, why=" (a standard deviation needs two instances)"),
        default=30,
        help="chip instances per σ_d (default 30)",
    )
    d.add_argument("--seed", type=int_arg(0, 2**63), default=0, help="seed (default 0)")
    d.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default runs/demo)")
    d.add_argument("--overwrite", action="store_true", help="replace a demo already in --out")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    d.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (there are none anyway when the output is not a terminal)",
    )
    d.set_defaults(func=_main)
    return d


def _sigma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"σ_d must be finite and >= 0, got {text}")
    return value


def _main(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_demo(
        methods=methods,
        sigma=args.sigma,
        device_model=args.device_model,
        epochs=args.epochs,
        runs=args.runs,
        seed=args.seed,
        out=args.out,
        device=args.device,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    return 0


def check_out(out, methods: Sequence[str], overwrite: bool) -> None:
    """Refuse (ValueError, one line) an ``out`` that holds an earlier demo, unless ``overwrite``: its report
    files, or a training run in a method's folder (:func:`nft_cuda.train.checkpoint.has_checkpoint`)."""
    from nft_cuda.train.checkpoint import has_checkpoint

    if overwrite:
        return
    out = Path(out)
    found = [name for name in OUTPUTS if (out / name).exists()]
    found += [f"a {m} run" for m in methods if has_checkpoint(out / m)]
    if found:
        raise ValueError(
            f"{out} already holds a demo ({', '.join(found)}): replace it with --overwrite, or choose another --out"
        )


def undertrained(clean_accuracy: dict[str, float], reference: str = "clean") -> list[str]:
    """The methods whose clean test accuracy is :data:`UNDERTRAINED_POINTS` or more below the
    ``reference`` model's (none when the reference was not trained)."""
    if reference not in clean_accuracy:
        return []
    floor = clean_accuracy[reference] - UNDERTRAINED_POINTS / 100
    return [m for m, acc in clean_accuracy.items() if m != reference and acc <= floor]


def run_demo(
    methods: Sequence[str] = ("clean", "noise", "ovf", "irs"),
    *,
    sigma: float = 0.3,
    device_model: str = "RRAM1",
    epochs: int = EPOCHS,
    lr: float = LR,
    runs: int = 30,
    seed: int = 0,
    out="runs/demo",
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    log=_print,
) -> dict:
    """Train, evaluate and compare (see the module docstring); returns ``{"trained": {method: train
    summary}, "report": the eval report, "undertrained": [methods]}``. Prints with ``log``."""
    from nft_cuda.eval.run import eval_checkpoints
    from nft_cuda.train.methods import METHODS
    from nft_cuda.train.trainer import TrainConfig, train

    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must name each of {', '.join(METHODS)} at most once, got {methods}")
    if not 0 <= sigma < math.inf:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    check_out(out, methods, overwrite)
    t_start = time.perf_counter()
    trained = {}
    for method in methods:
        log(
            f"== training '{method}' at σ_d = {sigma:g} ({device_model}), {epochs} epoch{'s' * (epochs != 1)}, "
            f"lr {lr:g}"
        )
        config = TrainConfig(
            model="small",
            dataset="embedded",
            method=method,
            sigma=sigma,
            device_model=device_model,
            epochs=epochs,
            lr=lr,
            seed=seed,
            device=device,
            out=os.path.join(out, method),
            overwrite=True,
        )
        trained[method] = train(config, progress=progress, log=log)

    baseline = BASELINE if BASELINE in methods and len(methods) > 1 else None
    sweep = sorted({0.0, round(sigma / 2, 10), float(sigma)})
    log(
        f"== Monte-Carlo evaluation: {runs} simulated chips per σ_d in {', '.join(f'{s:g}' for s in sweep)}, "
        f"the same chips for every model"
    )
    report = eval_checkpoints(
        [trained[m]["model_path"] for m in methods],
        sweep,
        device_model,
        runs,
        seed,
        None,
        os.path.join(out, "demo.json"),
        os.path.join(out, "demo.csv"),
        os.path.join(out, "demo.png"),
        device=None if device == "auto" else device,
        progress=progress,
        labels=methods,
        baseline=baseline,
    )
    weak = undertrained({m: trained[m]["test_acc_clean"] for m in methods})
    log("\n".join(_summary_lines(report, trained, sigma, device_model, runs, baseline, weak)))
    log(
        f"\nreport: {os.path.join(out, 'demo.json')}\nplot:   {os.path.join(out, 'demo.png')}\n"
        f"total:  {time.perf_counter() - t_start:.0f} s"
    )
    return {"trained": trained, "report": report, "undertrained": weak}


def _summary_lines(report, trained, sigma, device_model, runs, baseline, weak) -> list[str]:
    at_sigma = {r["checkpoint"]: r for r in report["results"] if r["sigma"] == float(sigma)}
    paired = {p["checkpoint"]: p for p in report.get("paired") or () if p["sigma"] == float(sigma)}
    vs = f" vs {baseline}" if baseline else ""
    lines = [
        (
            f"\nσ_d = {sigma:g} ({device_model}), small model, embedded Fashion-MNIST test slice, "
            f"{runs} simulated chips (the same chips for every model)"
        ),
        (
            f"| method | clean test acc | accuracy under variation (mean ± CI95) | EKL (nats) | Δ accuracy{vs} "
            f"(pp, paired CI95) | verdict | Δ EKL{vs} (nats, paired CI95) | train time |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, result in trained.items():
        r, p = at_sigma[method], paired.get(method)
        diff = verdict = ekl_diff = "–"
        if p is not None:
            diff = f"{100 * p['accuracy_difference']:+.2f} ± {100 * p['accuracy_difference_ci95']:.2f}"
            verdict = p["accuracy_verdict"]
            ekl_diff = f"{p['ekl_difference']:+.4f} ± {p['ekl_difference_ci95']:.4f}"
        elif method == baseline:
            diff = "(baseline)"
        flag = " (undertrained)" if method in weak else ""
        lines.append(
            f"| {method} | {100 * result['test_acc_clean']:.2f} %{flag} | {100 * r['accuracy_mean']:.2f} ± "
            f"{100 * (r['ci95'] or 0.0):.2f} % | {r['ekl']:.4f} | {diff} | {verdict} | {ekl_diff} | "
            f"{result['time_s']:.0f} s |"
        )
    if baseline:
        lines.append(
            f"\nΔ = method − {baseline} on the same chip, averaged over the chips; the verdict is 'better' "
            "or 'worse' when the paired CI95 excludes 0, else 'no significant difference'."
        )
    if weak:
        names = ", ".join(f"{m} {100 * trained[m]['test_acc_clean']:.2f} %" for m in weak)
        lines.append(
            f"note: undertrained by the {UNDERTRAINED_POINTS:g}-point rule (clean test accuracy "
            f"{UNDERTRAINED_POINTS:g} points or more below the clean model's "
            f"{100 * trained['clean']['test_acc_clean']:.2f} %): {names} — their comparison reflects their "
            "training as well as their method (see docs/demo.md)"
        )
    return lines
