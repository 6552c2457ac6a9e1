"""``nft eval`` (registered into the ``nft`` CLI by nft_cuda.cli).

``nft eval CHECKPOINT [CHECKPOINT ...]`` runs the Monte-Carlo evaluation of exported models over a
σ_d sweep and writes JSON / CSV / PNG. Under ``torchrun --nproc_per_node=K -m nft_cuda eval ...``
the chip instances are sharded across the K processes and gathered: the JSON is bit-identical to a
one-process run.

``--baseline CHECKPOINT`` adds the paired differences of every other checkpoint to it on the same chips
(:mod:`nft_cuda.eval.paired`). ``nft demo`` lives in :mod:`nft_cuda.demo`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from nft_cuda import _args
from nft_cuda.devices import SEVERITY_SWEEP
from nft_cuda.eval.lm_cli import add_lm_options, run_lm_eval

__all__ = ["add_eval", "parse_sigmas"]

#: The devices' default severity sweep (:data:`nft_cuda.devices.SEVERITY_SWEEP`) as ``--sigma`` start:stop:step.
DEFAULT_SWEEP = f"{SEVERITY_SWEEP[0]:g}:{SEVERITY_SWEEP[-1]:g}:{SEVERITY_SWEEP[1] - SEVERITY_SWEEP[0]:g}"


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
        msg = (
            str(exc)
            if "σ_d" in str(exc) or "sweep" in str(exc)
            else (f"expected σ_d as 0.3, 0,0.1,0.2 or start:stop:step, got {text!r}")
        )
        raise argparse.ArgumentTypeError(msg) from None
    for v in values:
        if not (v >= 0 and v < float("inf")):
            raise argparse.ArgumentTypeError(f"σ_d must be finite and >= 0, got {v:g}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"σ_d {', '.join(f'{v:g}' for v in twice)} listed twice")
    return values


_int_in = _args.int_arg  # nft_cuda._args: one set of validators for every command

_runs = _int_in(2, why=" (a standard deviation needs two instances)")
_positive_int = _int_in(1)
_nonneg_int = _int_in(0, 2**63)


#: ``nft eval --stream-version``: which chips (DESIGN §2, docs/design-notes.md "Noise stream versions").
_STREAM_VERSION_HELP = (
    "noise stream version of the chips: 2 = layer keys from the layers' names, 1 = by position, the chips "
    "of results made before version 2 (default: each checkpoint's own; files without one are 1)"
)


def add_eval(subparsers) -> argparse.ArgumentParser:
    """Add ``nft eval`` to the ``nft`` parser (an entry of :data:`nft_cuda.cli.COMMANDS`)."""
    from nft_cuda.devices import MODEL_NAMES

    e = subparsers.add_parser(
        "eval",
        help="Monte-Carlo robustness evaluation of exported models (accuracy under variation, EKL)",
        description="Evaluate R simulated chip instances per σ_d of each exported model (OUT/model.pt of "
        "`nft train`) on the test split of its dataset.",
    )
    e.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="exported model files, or run folders of `nft train` (their model.pt)",
    )
    e.add_argument(
        "--sigma",
        type=parse_sigmas,
        default=None,
        help=f"σ_d (the device model's severity): one value, a list 0,0.1,0.2 or a sweep start:stop:step "
        f"(default {DEFAULT_SWEEP}; 1.0, the published noise, for pcm and stuck-at)",
    )
    e.add_argument(
        "--device-model",
        dest="device_model",
        type=_args.device_model_arg,
        metavar="MODEL",
        help=f"device model: {', '.join(MODEL_NAMES)} (default: each checkpoint's own; docs/device-models.md)",
    )
    e.add_argument(
        "--time",
        type=_args.times_arg,
        metavar="T1,T2,...",
        help="seconds after programming to evaluate at, e.g. 1,3600,86400,3.15e7 (the pcm model drifts; "
        "--plot then draws accuracy against time)",
    )
    _args.add_device_options(e.add_argument_group("device model options"), suppress=False)
    e.add_argument(
        "--output",
        type=_args.output_arg,
        metavar="NAME",
        help="where the logits are in the model's output: an attribute or key (logits), an index or an import "
        "path PKG.MOD:FN (default: each checkpoint's own, recorded by nft train --output)",
    )
    e.add_argument("--runs", type=_runs, default=100, help="chip instances per σ_d (default 100)")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="evaluation seed (default 0)")
    e.add_argument("--stream-version", type=int, choices=(1, 2), help=_STREAM_VERSION_HELP)
    e.add_argument(
        "--data-dir",
        dest="data_dir",
        metavar="DIR",
        help="data folder (default $NFT_DATA_DIR, else ~/.cache/nft_cuda/data)",
    )
    e.add_argument(
        "--instances-per-pass",
        dest="instances_per_pass",
        type=_positive_int,
        default=8,
        help="chip instances evaluated per pass (default 8; results do not depend on it)",
    )
    e.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=256, help="test batch size")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    _add_report_options(e)
    _add_worst_case_options(e)
    add_lm_options(e)
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    e.set_defaults(func=_run_eval)
    return e


def _kappas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}") from None
    if not values or any(not (v > 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"every κ must be a finite number > 0, got {text!r}")
    return values


def _add_worst_case_options(e) -> None:
    g = e.add_argument_group("worst case (nft_cuda.eval.worst_case)")
    g.add_argument(
        "--worst-case",
        dest="worst_case",
        type=_kappas,
        metavar="K1,K2,...",
        help="also search the worst chip with every draw in [-κ, κ] for each κ (projected gradient from chip 0 "
        "of --seed), at each checkpoint's device model and each --sigma: worst-case accuracy vs κ",
    )
    g.add_argument(
        "--worst-case-images",
        dest="worst_case_images",
        type=_positive_int,
        default=1000,
        help="test images the worst-case accuracy is measured on (the first N; default 1000)",
    )
    g.add_argument("--worst-case-steps", dest="worst_case_steps", type=_nonneg_int, default=20, help="PGD steps (20)")


def _worst_case_rows(paths: list[str], args, device) -> list[dict]:
    """One row per checkpoint × σ_d × κ of the worst-case search (``nft eval --worst-case``)."""
    from nft_cuda.eval.run import TensorBatches, load_with_test_set
    from nft_cuda.eval.worst_case import worst_case_curve
    from nft_cuda.nn import noisy_layers

    rows, test_sets = [], {}
    for path in paths:
        model, payload, _, (x, y) = load_with_test_set(path, device, args.data_dir, test_sets)
        n = args.worst_case_images
        loader = TensorBatches(x[:n], y[:n], batch_size=args.batch_size)
        output = args.output if args.output is not None else payload["model"].get("output")
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        for sigma in args.sigma or [None]:
            if sigma is not None:
                for _, layer in noisy_layers(model):
                    layer.variation = layer.variation.with_sigma(sigma)
            curve = worst_case_curve(
                model, loader, args.worst_case, seed=args.seed, steps=args.worst_case_steps, output=output
            )
            model_sigma = noisy_layers(model)[0][1].variation.sigma
            rows += [{"checkpoint": label, "sigma": model_sigma, "images": len(y[:n]), **r} for r in curve]
    return rows


def _worst_case_table(rows: list[dict]) -> str:
    lines = [
        "| checkpoint | σ_d | κ | worst-case accuracy | chip 0 accuracy | max abs z |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['checkpoint']} | {r['sigma']:g} | {r['kappa']:g} | {100 * r['accuracy']:.2f} % | "
            f"{100 * r['chip_accuracy']:.2f} % | {r['max_abs_z']:.3f} |"
        )
    return "\n".join(lines)


def _report_worst_case(paths: list[str], args, device) -> None:
    from nft_cuda.eval.report import read_json, write_json

    rows = _worst_case_rows(paths, args, device)
    print(f"\nworst case within |z| <= κ ({args.worst_case_images} test images, {args.worst_case_steps} steps):")
    print(_worst_case_table(rows))
    if args.json:
        report = read_json(args.json)
        report["worst_case"] = rows
        write_json(report, args.json)


def _add_report_options(e) -> None:
    """Where ``nft eval`` writes its report, and the paired comparison with a baseline."""
    e.add_argument(
        "--json",
        metavar="PATH",
        help="write the report as JSON (finished points are kept in PATH.partial.jsonl until then: "
        "a rerun continues an interrupted one)",
    )
    e.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="ignore the finished points of an interrupted run with the same --json and start afresh",
    )
    e.add_argument("--csv", metavar="PATH", help="write one row per checkpoint × σ_d as CSV")
    e.add_argument("--plot", metavar="PATH", help="write a PNG: accuracy (CI95 bars) and EKL vs σ_d")
    e.add_argument(
        "--baseline",
        metavar="CHECKPOINT",
        help="one of the checkpoints: compare every other one with it on the same simulated chips "
        "(paired differences of accuracy and EKL with CI95 and a verdict)",
    )


def _table(report: dict) -> str:
    from nft_cuda.eval.report import compensation_rule

    timed = any(r.get("time_s") for r in report["results"])  # a time after programming other than 0
    rows = [
        "| checkpoint | σ_d |"
        + (" t (s) |" if timed else "")
        + " accuracy (mean ± CI95) | std | EKL (nats) | confidence | p1 chip | p5 chip [CI95] | p10 chip |",
        "|---|---|" + ("---|" if timed else "") + "---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ci = r.get("ci95")
        acc = (
            f"{100 * r['accuracy_mean']:.2f} ± {100 * ci:.2f} %"
            if ci is not None
            else f"{100 * r['accuracy_mean']:.2f} %"
        )
        std = "" if r.get("accuracy_std") is None else f"{100 * r['accuracy_std']:.2f}"
        t = ""
        if timed:
            t = "" if r.get("time_s") is None else f"{r['time_s']:g}"
            rule = compensation_rule(r)
            t = f" {t}{f' (compensated, {rule})' if rule else ''} |"
        rows.append(
            f"| {r['checkpoint']} | {r['sigma']:g} |{t} {acc} | {std} | {r['ekl']:.4f} | {r['confidence']:.4f} |"
            f" {_tail_cells(r.get('accuracy_tails'))} |"
        )
    return "\n".join(rows)


def _tail_cells(tails: dict | None) -> str:
    """The p1, p5 (with its order-statistic CI95; '–' for a side R chips cannot bound) and p10 chips."""
    if not tails:
        return "– | – | –"

    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}"

    p5 = tails["5"]
    return f"{pct(tails['1']['value'])} | {pct(p5['value'])} [{pct(p5['ci_low'])}, {pct(p5['ci_high'])}] | " + pct(
        tails["10"]["value"]
    )


def _device_options(args) -> dict:
    """The device-model settings of the command line, the MVM effects as an MVM (they replace the
    checkpoint's MVM settings as a whole)."""
    from nft_cuda.devices import MVM

    options = _args.device_options_from_args(args)
    options.pop("drift_compensation", None)  # its own argument of eval_checkpoints
    if "mvm" in options:
        options["mvm"] = MVM.from_dict(options["mvm"])
    return options


def _run_eval(args) -> int:
    if args.lm:
        return run_lm_eval(args)
    from nft_cuda import distributed
    from nft_cuda._args import resolve_device
    from nft_cuda.eval.config import EvalConfig
    from nft_cuda.eval.run import eval_checkpoints, partial_path
    from nft_cuda.io import resolve_model_path

    paths = [resolve_model_path(p) for p in args.checkpoints]
    if args.device is not None:
        resolve_device(args.device)  # the one clear error for a missing GPU, before joining a group
    # Under torchrun: join the group; the backend follows --device (gloo for cpu, nccl for cuda).
    group = distributed.join(args.device or "auto")
    device = args.device
    if group.active and device is None:
        device = str(group.device)
    try:
        config = EvalConfig(
            sigmas=args.sigma,
            device_model=args.device_model,
            runs=args.runs,
            seed=args.seed,
            data_dir=args.data_dir,
            json_path=args.json,
            csv_path=args.csv,
            plot_path=args.plot,
            instances_per_pass=args.instances_per_pass,
            device=device,
            progress=args.progress,
            batch_size=args.batch_size,
            resume=args.resume,
            baseline=args.baseline,
            times=args.time,
            drift_compensation=args.drift_compensation,
            device_options=_device_options(args),
            output=args.output,
            stream_version=args.stream_version,
        )
        report = eval_checkpoints(paths, config=config)
    except KeyboardInterrupt:
        if args.json and not group.active:  # sharded runs keep no partial file
            sys.stderr.write(
                f"nft: interrupted; the finished points are kept in {partial_path(args.json)}: "
                "run the same command again to continue\n"
            )
        else:
            sys.stderr.write(
                "nft: interrupted; nothing was kept (add --json PATH to keep finished points for a rerun)\n"
            )
        return 130
    finally:
        group.close()
    if group.is_main:
        print(_table(report))
        if report.get("paired") is not None:
            from nft_cuda.eval.paired import paired_table

            print(f"\npaired differences to {report['baseline']} on the same {args.runs} chips:")
            print(paired_table(report["paired"]))
        if args.worst_case and not group.active:
            _report_worst_case(paths, args, device)
        for what, path in (("JSON", args.json), ("CSV", args.csv), ("plot", args.plot)):
            if path:
                print(f"{what}: {path}")
    return 0
