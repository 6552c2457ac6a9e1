"""``nft eval`` and ``nft demo`` (registered into the ``nft`` CLI by nft_cuda.cli's plugin hook).

``nft eval CHECKPOINT [CHECKPOINT ...]`` runs the Monte-Carlo evaluation of exported models over a
σ_d sweep and writes JSON / CSV / PNG. Under ``torchrun --nproc_per_node=K -m nft_cuda eval ...``
the chip instances are sharded across the K processes and gathered: the JSON is bit-identical to a
one-process run.

``nft demo`` is the project's main job on the embedded dataset, with no download: it trains the
small model clean, with noise injection, OVF and IRS at one σ_d, evaluates each with Monte-Carlo,
prints a comparison table and writes the plot.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

__all__ = ["parse_sigmas", "register"]

DEFAULT_SWEEP = "0:0.4:0.05"


def _sweep(text: str) -> list[float]:
    """start:stop:step, stop included when the steps reach it (to 1e-9 of a step), never passed."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"a sweep is start:stop:step, got {text!r}")
    start, stop, step = (float(p) for p in parts)
    if not step > 0:
        raise ValueError(f"the step of a sweep start:stop:step must be > 0, got {parts[2].strip()!r}")
    if not stop >= start:
        raise ValueError(f"a sweep start:stop:step needs start <= stop, got {text!r}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > 10000:
        raise ValueError(f"the sweep {text!r} has {count} values; at most 10000")
    return [round(start + i * step, 10) for i in range(count)]


def parse_sigmas(text: str) -> list[float]:
    """σ_d values from "0.3", "0,0.1,0.2" (or space-separated) or a sweep "start:stop:step" (stop included).

    Raises argparse.ArgumentTypeError saying what is wrong: a step <= 0, start > stop, an empty list
    item, a value listed twice, a negative or non-finite σ_d."""
    text = text.strip()
    try:
        if ":" in text:
            values = _sweep(text)
        else:
            items = re.split(r"\s*,\s*|\s+", text)
            if "" in items:
                raise ValueError(f"empty value in the σ_d list {text!r}")
            values = [float(p) for p in items]
    except ValueError as exc:
        msg = str(exc) if "σ_d" in str(exc) or "sweep" in str(exc) else (
            f"expected σ_d as 0.3, 0,0.1,0.2 or start:stop:step, got {text!r}")
        raise argparse.ArgumentTypeError(msg) from None
    for v in values:
        if not (v >= 0 and v < float("inf")):
            raise argparse.ArgumentTypeError(f"σ_d must be finite and >= 0, got {v:g}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"σ_d {', '.join(f'{v:g}' for v in twice)} listed twice")
    return values


def _int_in(minimum: int, maximum: int | None = None, why: str = ""):
    """An argparse type: an int in [minimum, maximum) (``why`` explains the lower bound)."""
    from nft_cuda.cli import _int

    at_least = _int(minimum)

    def parse(text: str) -> int:
        try:
            value = at_least(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc}{why}") from None
        if maximum is not None and value >= maximum:
            raise argparse.ArgumentTypeError(f"must be < {maximum}, got {text}")
        return value

    return parse


_runs = _int_in(2, why=" (a standard deviation needs two instances)")
_positive_int = _int_in(1)
_nonneg_int = _int_in(0, 2**63)


def register(subparsers) -> None:
    from nft_cuda.variation import PRESETS

    e = subparsers.add_parser(
        "eval", help="Monte-Carlo robustness evaluation of exported models (accuracy under variation, EKL)",
        description="Evaluate R simulated chip instances per σ_d of each exported model (OUT/model.pt of "
                    "`nft train`) on the test split of its dataset.")
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="exported model files, or run folders of `nft train` (their model.pt)")
    e.add_argument("--sigma", type=parse_sigmas, default=parse_sigmas(DEFAULT_SWEEP),
                   help=f"σ_d: one value, a list 0,0.1,0.2 or a sweep start:stop:step (default {DEFAULT_SWEEP})")
    e.add_argument("--device-model", dest="device_model", choices=list(PRESETS),
                   help="device variation model (default: each checkpoint's own)")
    e.add_argument("--runs", type=_runs, default=100, help="chip instances per σ_d (default 100)")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="evaluation seed (default 0)")
    e.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                   help="data folder (default $NFT_DATA_DIR, else ~/.cache/nft_cuda/data)")
    e.add_argument("--instances-per-pass", dest="instances_per_pass", type=_positive_int, default=8,
                   help="chip instances evaluated per pass (default 8; results do not depend on it)")
    e.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=256, help="test batch size")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    e.add_argument("--json", metavar="PATH",
                   help="write the report as JSON (finished points are kept in PATH.partial.jsonl until then: "
                        "a rerun continues an interrupted one)")
    e.add_argument("--no-resume", dest="resume", action="store_false",
                   help="ignore the finished points of an interrupted run with the same --json and start afresh")
    e.add_argument("--csv", metavar="PATH", help="write one row per checkpoint × σ_d as CSV")
    e.add_argument("--plot", metavar="PATH", help="write a PNG: accuracy (CI95 bars) and EKL vs σ_d")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    e.set_defaults(func=_run_eval)

    d = subparsers.add_parser(
        "demo", help="train the small model clean / noise / OVF / IRS on the embedded data and compare them",
        description="The main job of nft_cuda on the embedded Fashion-MNIST slice (no download): train the "
                    "small model with each method at one σ_d, evaluate each with Monte-Carlo and compare.")
    d.add_argument("--sigma", type=float, default=0.3, help="σ_d of training and evaluation (default 0.3)")
    d.add_argument("--device-model", dest="device_model", choices=list(PRESETS), default="RRAM1",
                   help="device variation model (default RRAM1)")
    d.add_argument("--methods", default="clean,noise,ovf,irs",
                   help="comma-separated methods to compare (default clean,noise,ovf,irs)")
    d.add_argument("--epochs", type=_positive_int, default=3, help="training epochs per method (default 3)")
    d.add_argument("--runs", type=_runs, default=30, help="chip instances per σ_d (default 30)")
    d.add_argument("--seed", type=_nonneg_int, default=0, help="seed (default 0)")
    d.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default runs/demo)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    d.set_defaults(func=_run_demo)


def _init_distributed():
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when launched by torchrun."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist


def _table(report: dict) -> str:
    rows = ["| checkpoint | σ_d | accuracy (mean ± CI95) | std | EKL (nats) | confidence |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        ci = r.get("ci95")
        acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * ci:.2f} %" if ci is not None else f"{100 * r['accuracy_mean']:.2f} %"
        std = "" if r.get("accuracy_std") is None else f"{100 * r['accuracy_std']:.2f}"
        rows.append(f"| {r['checkpoint']} | {r['sigma']:g} | {acc} | {std} | {r['ekl']:.4f} | {r['confidence']:.4f} |")
    return "\n".join(rows)


def _run_eval(args) -> int:
    from nft_cuda._args import resolve_device
    from nft_cuda.eval.run import eval_checkpoints, partial_path
    from nft_cuda.io import resolve_model_path

    paths = [resolve_model_path(p) for p in args.checkpoints]
    device = None if args.device is None else str(resolve_device(args.device))  # before joining a group
    dist = _init_distributed()
    if dist is not None and device is None:
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    try:
        report = eval_checkpoints(paths, args.sigma, args.device_model, args.runs, args.seed,
                                  args.data_dir, args.json, args.csv, args.plot, args.instances_per_pass, device,
                                  args.progress, batch_size=args.batch_size, resume=args.resume)
    except KeyboardInterrupt:
        if args.json and dist is None:  # sharded runs keep no partial file
            sys.stderr.write(f"nft: interrupted; the finished points are kept in {partial_path(args.json)}: "
                             "run the same command again to continue\n")
        else:
            sys.stderr.write("nft: interrupted; nothing was kept (add --json PATH to keep finished points "
                             "for a rerun)\n")
        return 130
    finally:
        if dist is not None:
            dist.destroy_process_group()
    if dist is None or int(os.environ.get("RANK", "0")) == 0:
        print(_table(report))
        for what, path in (("JSON", args.json), ("CSV", args.csv), ("plot", args.plot)):
            if path:
                print(f"{what}: {path}")
    return 0


def _run_demo(args) -> int:
    from nft_cuda.eval.run import eval_checkpoints
    from nft_cuda.train.methods import METHODS
    from nft_cuda.train.trainer import TrainConfig, train

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not args.sigma >= 0:
        raise ValueError(f"--sigma must be >= 0, got {args.sigma}")
    t_start = time.perf_counter()
    trained = []
    for method in methods:
        print(f"== training '{method}' at σ_d = {args.sigma:g} ({args.device_model}), {args.epochs} epochs")
        config = TrainConfig(model="small", dataset="embedded", method=method, sigma=args.sigma,
                             device_model=args.device_model, epochs=args.epochs, seed=args.seed,
                             device=args.device, out=os.path.join(args.out, method), overwrite=True)
        result = train(config, progress=args.progress)
        trained.append((method, result))

    print(f"== Monte-Carlo evaluation: {args.runs} chip instances per σ_d")
    sweep = sorted({0.0, round(args.sigma / 2, 10), float(args.sigma)})
    paths = [result["model_path"] for _, result in trained]
    json_path = os.path.join(args.out, "demo.json")
    plot_path = os.path.join(args.out, "demo.png")
    device = None if args.device == "auto" else args.device
    report = eval_checkpoints(paths, sweep, args.device_model, args.runs, args.seed, None, json_path,
                              os.path.join(args.out, "demo.csv"), plot_path, device=device, progress=args.progress,
                              labels=methods)

    at_sigma = {r["checkpoint"]: r for r in report["results"] if r["sigma"] == float(args.sigma)}
    rows = [f"\nσ_d = {args.sigma:g} ({args.device_model}), small model, embedded Fashion-MNIST test slice, "
            f"{args.runs} chip instances per σ_d",
            "| method | clean test acc | accuracy under variation (mean ± CI95) | EKL (nats) | train time |",
            "|---|---|---|---|---|"]
    for method, result in trained:
        r = at_sigma[method]
        ci = r["ci95"] or 0.0
        rows.append(f"| {method} | {100 * result['test_acc_clean']:.2f} % | {100 * r['accuracy_mean']:.2f} ± "
                    f"{100 * ci:.2f} % | {r['ekl']:.4f} | {result['time_s']:.0f} s |")
    print("\n".join(rows))
    print(f"\nreport: {json_path}\nplot:   {plot_path}\ntotal:  {time.perf_counter() - t_start:.0f} s")
    return 0
