"""Evaluate exported checkpoints over a σ_d sweep and write the reports (the body of ``nft eval``).

Nothing finished is lost on interruption: when a JSON report path is given, every finished
(checkpoint, σ_d) point is appended to ``<json>.partial.jsonl`` as soon as it ends, keyed on the
checkpoint file's SHA-256 and every setting that shapes the result. The same call run again skips
those points, so its report is byte-identical to an uninterrupted run's; the file is removed once the
report is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import torch

from nft_cuda import _args
from nft_cuda._args import resolve_device
from nft_cuda._files import json_safe, sha256_file
from nft_cuda.devices import (
    MVM,
    PCM,
    SEVERITY_SWEEP,
    DeviceModel,
    Variation,
    device_model_from_dict,
    lookup,
    make_device_model,
    severity_sweep,
)
from nft_cuda.distributed import current as current_group
from nft_cuda.eval.config import EvalConfig, config_or_keywords
from nft_cuda.eval.monte_carlo import monte_carlo
from nft_cuda.eval.paired import check_pairable, compare
from nft_cuda.eval.report import build_report, plot_results, plot_time, write_csv, write_json
from nft_cuda.io import MODEL_FILE, resolve_model_path
from nft_cuda.nn import NOISE_STREAM_VERSION, check_stream_version
from nft_cuda.nn import stream_version as model_stream_version

__all__ = [
    "DEFAULT_SIGMAS",
    "EvalConfig",
    "TensorBatches",
    "eval_checkpoints",
    "load_test_set",
    "model_preprocess",
    "partial_path",
    "sweep_models",
]

#: The severity sweep of a model without a default severity (the σ_d of the bit-sliced Gaussian presets,
#: the σ of LogNormal): ``nft eval``'s default ``--sigma 0:0.4:0.05``. Models that have a default severity
#: (PCM and StuckAt: 1.0, the published noise) are evaluated at it instead. The devices' table holds it
#: (:data:`nft_cuda.devices.SEVERITY_SWEEP`); this is its name in the evaluation.
DEFAULT_SIGMAS = SEVERITY_SWEEP


class TensorBatches:
    """A re-iterable of (inputs, labels) batches over two tensors, in order (no shuffling)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
        _args.check_positive_int("batch_size", batch_size)
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return -(-self.labels.shape[0] // self.batch_size)

    def __iter__(self):
        for i in range(0, self.labels.shape[0], self.batch_size):
            yield self.images[i : i + self.batch_size], self.labels[i : i + self.batch_size]


def load_test_set(dataset: str, data_dir=None, preprocess: str = "standard") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, C, 32, 32], labels int64 [N]) of the test split of ``dataset``, preprocessed
    as ``preprocess`` (:func:`nft_cuda.data.load_dataset`)."""
    from nft_cuda.data import load_dataset

    x, y = load_dataset(dataset, data_dir, split="test", preprocess=preprocess)
    return x, y


def model_preprocess(payload: dict) -> str:
    """How an exported model's inputs were preprocessed (``meta["preprocess"]``; files written before
    the option: ``"standard"``), so its test set is preprocessed the same way."""
    return (payload.get("meta", {}) or {}).get("preprocess", "standard")


def partial_path(json_path: str) -> str:
    """Where :func:`eval_checkpoints` keeps the finished points of an unfinished report."""
    return f"{json_path}.partial.jsonl"


class _FinishedPoints:
    """The (checkpoint, σ_d) results of earlier, interrupted calls: one JSON line per point, appended and
    fsync'ed as each point ends. A torn last line (a kill mid-write) is dropped on load. ``path=None``
    disables it (no JSON report, or under torch.distributed where ranks need not share a filesystem)."""

    def __init__(self, path: str | None, resume: bool):
        self.path, self.done = path, {}
        if path is None:
            return
        if not resume:
            self.clear()
            return
        good = []
        try:
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        self.done[rec["key"]] = rec["result"]
                    except (ValueError, KeyError, TypeError):
                        break  # a torn or foreign line: keep what came before it
                    good.append(line if line.endswith("\n") else line + "\n")
        except FileNotFoundError:
            return
        with open(path, "w") as f:  # rewrite without the torn tail, so appends start on a fresh line
            f.writelines(good)

    def get(self, key: str):
        return self.done.get(key)

    def add(self, key: str, result: dict) -> dict:
        """Keep ``result`` (appended to the file at once); returns it."""
        if self.path is None:
            return result
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "result": json_safe(result)}, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return result

    def clear(self) -> None:
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


def _label_parts(path: str) -> list[str]:
    """Folders and name of a checkpoint, the ``model.pt`` of a run folder named by its folder."""
    folder, name = os.path.split(os.path.abspath(path))
    parts = [p for p in folder.split(os.sep) if p]
    if name != MODEL_FILE or not parts:
        parts.append(os.path.splitext(name)[0])
    return parts


def _labels(paths: list[str]) -> list[str]:
    """Short unique names: the run folder's name for ``OUT/model.pt``, else the file name without its
    extension; where names clash, as many parent folders as it takes to tell them apart."""
    parts = [_label_parts(p) for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = {label for label in labels if labels.count(label) > 1}
        grown = [i for i, label in enumerate(labels) if label in clashing and depth[i] < len(parts[i])]
        if not grown:
            return labels
        for i in grown:
            depth[i] += 1


def _summary(values: dict):
    """One value if all checkpoints agree, else {label: value}."""
    distinct = []
    for v in values.values():
        if v not in distinct:
            distinct.append(v)
    return distinct[0] if len(distinct) == 1 else dict(values)


def eval_checkpoints(
    paths,
    sigmas: Sequence[float] | None = None,
    device_model: str | None = None,
    runs: int = 100,
    seed: int = 0,
    data_dir=None,
    json_path: str | None = None,
    csv_path: str | None = None,
    plot_path: str | None = None,
    instances_per_pass: int = 8,
    device=None,
    progress: bool = True,
    *,
    batch_size: int = 256,
    fold: bool | None = None,
    distributed: bool | None = None,
    labels: Sequence[str] | None = None,
    resume: bool = True,
    baseline: str | None = None,
    times: Sequence[float] | None = None,
    drift_compensation: bool | None = None,
    device_options: dict | None = None,
    output=None,
    stream_version: int | None = None,
    config: EvalConfig | None = None,
) -> dict:
    """Monte-Carlo evaluation of exported models (:func:`nft_cuda.io.load_model`) on the test split of
    their dataset (``payload["meta"]["dataset"]``), for each σ_d of ``sigmas``.

    Args:
        paths: one path or a list of exported model files or run folders of ``nft train`` (their model.pt).
        sigmas: the severity sweep (σ_d for the bit-sliced Gaussian; see docs/device-models.md); None
            (the default): the evaluated model's default severity (1.0 for PCM and StuckAt), else
            :data:`DEFAULT_SIGMAS`.
        device_model: the device model: a preset (RRAM1, FeFET2, RRAM4, FeFET6: with the checkpoint's
            bit widths) or "pcm", "lognormal", "stuck-at" (default: each checkpoint's own model).
        times: seconds after programming, a second sweep axis (each severity × each time; every
            result row carries ``time_s``). Time-independent models give the same chips at every time.
        drift_compensation: PCM only: override the model's global drift compensation.
        device_options: other fields of the model (the named one, else each checkpoint's own), e.g.
            ``{"mvm": MVM(...)}`` or ``{"p0": 0.01}``; a field the model lacks is refused naming it.
        runs, seed, instances_per_pass, progress: as :func:`~nft_cuda.eval.monte_carlo`.
        data_dir: the data folder (see :mod:`nft_cuda.data`).
        json_path, csv_path, plot_path: where to write the report (JSON), the table (CSV) and the plot
            (PNG); None skips it. Under torch.distributed only rank 0 writes.
        device: where to evaluate (default: CUDA when available, else CPU).
        batch_size: test batch size.
        fold, distributed: as :func:`~nft_cuda.eval.monte_carlo`.
        labels: the checkpoints' names in the report (default: the run folder's name for ``OUT/model.pt``,
            else the file name; parent folders are added where names clash).
        resume: with ``json_path``, reuse the points an interrupted call with the same settings finished
            (see the module docstring); False discards them and starts afresh.
        baseline: one of ``paths`` (or its label): compare every other checkpoint with it chip by chip
            (:mod:`nft_cuda.eval.paired`): the report gains ``baseline`` and ``paired`` (one entry per
            other checkpoint × σ_d: accuracy and EKL differences, CI95, verdicts) and every result
            ``per_instance_kl``. Refused when the chips differ (device model or bit widths, test set).
        output: the output adapter of every checkpoint (:func:`nft_cuda.nn.custom.resolve_output`; default:
            each checkpoint's own, ``payload["model"]["output"]``, recorded by ``nft train --output``).
        stream_version: the noise stream version of the chips (DESIGN §2; ``nft eval --stream-version``):
            default each checkpoint's own (files written before version 2 are version 1), else 1 or 2
            for every checkpoint. Every result records it as ``noise_stream``.
        config: all of these settings as one :class:`~nft_cuda.eval.EvalConfig` (its fields are the
            argument names), instead of the arguments: ``eval_checkpoints(paths, config=EvalConfig(...))``.
            A setting given both in ``config`` and as an argument is refused.

    Returns:
        The report dict (see :mod:`nft_cuda.eval.report`): ``results`` holds one entry per
        checkpoint × σ_d, each with a ``checkpoint`` label (see ``labels``).
    """
    settings = dict(sigmas=sigmas, device_model=device_model, runs=runs, seed=seed, data_dir=data_dir,
                    json_path=json_path, csv_path=csv_path, plot_path=plot_path,
                    instances_per_pass=instances_per_pass, device=device, progress=progress,
                    batch_size=batch_size, fold=fold, distributed=distributed, labels=labels, resume=resume,
                    baseline=baseline, times=times, drift_compensation=drift_compensation,
                    device_options=device_options, output=output, stream_version=stream_version)  # fmt: skip
    paths, config = _resolved(paths, config_or_keywords(eval_checkpoints, config, settings))
    sharded = config.distributed is not False and current_group().active
    json_path = config.json_path if not sharded else None
    finished = _FinishedPoints(partial_path(json_path) if json_path else None, config.resume)
    test_sets: dict[tuple[str, str], tuple] = {}
    chips: dict[str, tuple] = {}
    results, checkpoints = [], []
    # The baseline goes first, so a checkpoint that cannot be paired with it is refused before it is evaluated.
    for path, label in sorted(zip(paths, config.labels), key=lambda pl: pl[1] != config.baseline):
        rows, checkpoint = _eval_checkpoint(path, label, config, finished, test_sets, chips)
        results += rows
        checkpoints.append(checkpoint)
    report = _report(results, checkpoints, config)
    if _is_writer(config.distributed):
        _write_outputs(report, finished, config)
    return report


def _resolved(paths, config: EvalConfig) -> tuple[list[str], EvalConfig]:
    """eval_checkpoints' paths (a list of model files) and its config with the device resolved, every
    checkpoint labelled, the baseline given as its label, the stream version checked, and the chips'
    KL kept when there is a baseline to compare with."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [resolve_model_path(p) for p in paths]
    if not paths:
        raise ValueError("eval_checkpoints needs at least one checkpoint path")
    device = resolve_device("auto" if config.device is None else str(config.device))
    labels = config.labels
    if labels is None:
        labels = _labels(paths)
    elif len(labels) != len(paths) or len(set(labels)) != len(labels):
        raise ValueError(f"labels must name each of the {len(paths)} checkpoints once, got {list(labels)}")
    version = None if config.stream_version is None else check_stream_version(config.stream_version)
    baseline = _baseline_label(config.baseline, paths, labels)
    config = dataclasses.replace(
        config,
        device=device,
        labels=tuple(labels),
        baseline=baseline,
        stream_version=version,
        per_instance_kl=config.per_instance_kl or baseline is not None,
    )
    return paths, config


def _eval_checkpoint(path: str, label: str, config: EvalConfig, finished, test_sets: dict, chips: dict):
    """(result rows, report entry) of one checkpoint: its sweep, each point reused from ``finished`` or
    evaluated; its chips are recorded in ``chips`` and checked to pair with the baseline's."""
    model, payload, dataset, (x, y) = _load_with_test_set(path, config.device, config.data_dir, test_sets)
    meta = payload.get("meta", {}) or {}
    spec = dict(payload["model"])
    base = payload["variation"]
    variations = sweep_models(
        base, config.sigmas, config.device_model, config.times, config.drift_compensation, config.device_options
    )
    chips[label] = _chips(variations[0][0], dataset, model, config.stream_version)
    if config.baseline is not None and label != config.baseline:
        check_pairable(label, *chips[label], config.baseline, *chips[config.baseline])
    adapter = config.output if config.output is not None else spec.get("output")
    setting = {
        "checkpoint_sha256": sha256_file(path) if finished.path else None,
        "dataset": dataset,
        "test_size": int(y.shape[0]),
        "runs": config.runs,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "noise_stream": config.stream_version or model_stream_version(model) or NOISE_STREAM_VERSION,
        **({"per_instance_kl": True} if config.per_instance_kl else {}),
        **({"output": adapter} if isinstance(adapter, (str, int)) else {}),
    }
    loader = TensorBatches(x, y, config.batch_size)
    points = _points(model, loader, variations, finished, setting, dataclasses.replace(config, output=adapter))
    rows = [{"checkpoint": label, **r} for r in points]
    checkpoint = {"checkpoint": label, "path": path, "model": spec, "dataset": dataset,
                  "method": meta.get("method"), "trained_variation": dict(base)}  # fmt: skip
    return rows, checkpoint


def sweep_models(base: dict, sigmas, device_model=None, times=None, drift_compensation=None, options=None) -> list:
    """[(model, time or None)] of one checkpoint's sweep, severities outermost: ``base`` is the checkpoint's
    stored model (``payload["variation"]``), the rest as :func:`eval_checkpoints`."""
    trained = device_model_from_dict(dict(base))
    options = dict(options or {})
    if sigmas is None:
        sigmas = default_sigmas(trained if device_model is None else make_device_model(device_model, 0.0))
    if device_model is None:  # the checkpoint's own model, its other fields replaced by the options
        models = [_with_options(trained, options).with_sigma(s) for s in sigmas]
    elif isinstance(trained, Variation) and lookup(device_model).preset is not None:
        preset = lookup(device_model).preset
        models = [_with_options(Variation(s, preset, trained.weight_bits, trained.device_bits), options)
                  for s in sigmas]  # fmt: skip
    else:
        models = [_with_options(make_device_model(device_model, s), options) for s in sigmas]
    if drift_compensation is not None:
        if not all(isinstance(m, PCM) for m in models):
            raise ValueError(f"drift_compensation applies to the PCM model, not '{models[0].name}'")
        models = [dataclasses.replace(m, drift_compensation=_args.check_bool("drift_compensation", drift_compensation))
                  for m in models]  # fmt: skip
    if "compensation_rule" in options and not all(getattr(m, "drift_compensation", False) for m in models):
        raise ValueError(
            "compensation_rule has no effect: the model does not compensate drift (add drift_compensation=True, "
            "--drift-compensation)"
        )
    if times is None:
        return [(m, None) for m in models]
    times = [float(t) for t in ([times] if isinstance(times, (int, float)) else times)]
    if not times:
        raise ValueError("times must hold at least one time after programming")
    return [(m.at_time(t), t) for m in models for t in times]


def default_sigmas(model: DeviceModel) -> list[float]:
    """The severity sweep used when none is given: the model class's default severity if it has one
    (PCM, StuckAt), else :data:`DEFAULT_SIGMAS`."""
    return severity_sweep(model)


def _with_options(model: DeviceModel, options: dict) -> DeviceModel:
    """``model`` with the fields in ``options`` replaced (an ``mvm`` dict becomes an MVM); a field the
    model does not have is refused naming it and the model's settings."""
    if not options:
        return model
    fields = {f.name for f in dataclasses.fields(model)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"the {model.name} device model has no setting {', '.join(unknown)} "
            f"(its settings: {', '.join(sorted(fields - {'sigma'}))})"
        )
    if isinstance(options.get("mvm"), dict):
        options = {**options, "mvm": MVM.from_dict(options["mvm"])}
    return dataclasses.replace(model, **options)


def _chips(variation: DeviceModel, dataset: str, model, stream_version: int | None) -> tuple:
    """What makes chip r the same chip in two checkpoints: the device model (bit widths, parameters) but
    not its severity or time, and the noise stream version, the test set, and the noisy layers' shapes
    (checked by :func:`nft_cuda.eval.paired.check_pairable`)."""
    from nft_cuda.nn import noisy_layers

    if isinstance(variation, Variation):
        device = (variation.device_model, variation.weight_bits, variation.device_bits)
    else:
        device = (variation.name, json.dumps(variation.with_sigma(0.0).at_time(0.0).to_dict(), sort_keys=True))
    version = stream_version or model_stream_version(model) or NOISE_STREAM_VERSION
    return (*device, f"noise stream {version}"), dataset, [tuple(m.weight.shape) for _, m in noisy_layers(model)]


def _report(results: list, checkpoints: list, config: EvalConfig) -> dict:
    """The report of eval_checkpoints: results and checkpoints back in the order of ``config.labels``
    (the baseline was evaluated first), and with a baseline its paired comparisons."""
    labels, baseline = config.labels, config.baseline
    order = {label: i for i, label in enumerate(labels)}
    results.sort(key=lambda r: order[r["checkpoint"]])
    checkpoints.sort(key=lambda c: order[c["checkpoint"]])
    extra = {} if baseline is None else {"baseline": baseline, "paired": compare(results, baseline)}
    return build_report(
        results,
        model=_summary({c["checkpoint"]: c["model"] for c in checkpoints}),
        dataset=_summary({c["checkpoint"]: c["dataset"] for c in checkpoints}),
        seed=config.seed,
        checkpoints=checkpoints,
        **extra,
    )


def _points(model, loader, variations, finished, setting: dict, config: EvalConfig) -> list[dict]:
    """The Monte-Carlo result of each (model, time) of :func:`sweep_models`, one point at a time so each is
    kept as soon as it ends; a point an interrupted call finished with the same ``setting`` is reused.
    ``config``: the chips' settings (:func:`~nft_cuda.eval.monte_carlo` reads its chip fields)."""
    out = []
    for var, time_s in variations:
        if isinstance(var, Variation) and time_s is None:  # the key of reports before device models
            point = [var.sigma, var.device_model, var.weight_bits, var.device_bits]
        else:
            point = {"device": var.to_dict(), "time_s": time_s}
        key = json.dumps({**setting, "variation": point}, sort_keys=True)
        r = finished.get(key)
        if r is None:
            r = monte_carlo(model, loader, [var], config=config)[0]
            r = finished.add(key, r if time_s is None else {**r, "time_s": time_s})
        out.append(r)
    return out


def _load_with_test_set(path: str, device, data_dir, test_sets: dict):
    """(model, payload, dataset name, (images, labels)) of an exported model and the test split of its
    dataset (loaded once per (dataset, preprocessing) into ``test_sets``), checked to fit each other."""
    from nft_cuda.io import load_model

    model, payload = load_model(path, device=device)
    dataset = (payload.get("meta", {}) or {}).get("dataset")
    if not dataset:
        raise ValueError(f"{path}: the checkpoint does not name its dataset (payload['meta']['dataset'])")
    preprocess = model_preprocess(payload)
    if (dataset, preprocess) not in test_sets:
        # The standard preprocessing is load_test_set's default (so a substitute loader without the argument works).
        extra = {} if preprocess == "standard" else {"preprocess": preprocess}
        test_sets[dataset, preprocess] = load_test_set(dataset, data_dir, **extra)
    x, y = test_sets[dataset, preprocess]
    spec = payload["model"]
    if x.shape[1] != spec.get("in_channels", x.shape[1]):
        raise ValueError(
            f"{path}: model '{spec.get('name')}' takes {spec.get('in_channels')} input channels "
            f"but the {dataset} test set has {x.shape[1]}"
        )
    return model, payload, dataset, (x, y)


def _write_outputs(report: dict, finished, config: EvalConfig) -> None:
    """Write the report's files (the writing process only); the finished points go once the JSON is in."""
    if config.json_path:
        write_json(report, config.json_path)
        finished.clear()
    if config.csv_path:
        write_csv(report, config.csv_path)
    if config.plot_path:  # several times after programming: accuracy against time, else against σ_d
        times = {r.get("time_s") for r in report["results"]}
        (plot_time if len(times) > 1 else plot_results)(report, config.plot_path)


def _baseline_label(baseline, paths: list[str], labels) -> str | None:
    """The label of ``baseline``, given as one of ``paths`` (the same file, or its run folder) or as a label."""
    if baseline is None:
        return None
    baseline = os.fspath(baseline)
    target = os.path.join(baseline, MODEL_FILE) if os.path.isdir(baseline) else baseline
    for path, label in zip(paths, labels):
        if baseline == label or os.path.realpath(target) == os.path.realpath(path):
            return label
    raise ValueError(f"the baseline {baseline} must be one of the evaluated checkpoints ({', '.join(paths)})")


def _is_writer(distributed) -> bool:
    """Whether this process writes the files: the only process, or rank 0 of an evaluation sharded
    over an initialised process group."""
    return distributed is False or current_group().is_main


#: The public name of :func:`_load_with_test_set` (used by ``nft eval --worst-case``).
load_with_test_set = _load_with_test_set
