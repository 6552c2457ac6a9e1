"""The training loop behind ``nft train`` (DESIGN §5, §9).

:class:`TrainConfig` holds every setting (validated on construction); :func:`train` runs a whole
training and returns its summary::

    from nft_cuda.train.trainer import TrainConfig, train
    result = train(TrainConfig(method="ovf", sigma=0.1, epochs=2, out="runs/ovf"))
    result["test_acc_noisy"], result["model_path"]

What a run does:

* ``torch.manual_seed(seed)``, then model, noisy layers and (IRS) heads are built, so one seed gives one
  initialisation; the training split's batch order of epoch ``e`` comes from a generator seeded with
  a hash of ``(seed, e)``, so it does not depend on what happened before (resuming at an epoch
  boundary continues exactly);
* every epoch: one pass over the training split (progress bar with the running loss and accuracy;
  with ``weight_clip`` the crossbar weights of every noisy layer, IRS heads included, are clipped after
  every optimizer step, :func:`nft_cuda.train.clip_weights`),
  then the validation split is evaluated twice with the backbone in ``eval()`` mode (BatchNorm running
  statistics): *noisy* (noise mode ``train``: a fresh draw per batch, as the reference's in-training
  evaluation) and *clean* (noise off). The noisy evaluation draws from a forked RNG seeded from
  ``(seed, e)``, so it neither disturbs nor depends on the training stream;
* the model with the best noisy validation accuracy (never the test set, unlike the reference) is
  exported with :func:`nft_cuda.io.save_model` to ``out/model.pt``: the backbone with its noisy layers,
  never the IRS heads. With ``val_fraction=0`` the last epoch is exported;
* per-epoch metrics go to ``out/metrics.jsonl`` and ``out/metrics.csv`` (rewritten atomically from
  the checkpoint's history, so an interrupted epoch never leaves a duplicate row);
* a checkpoint ``out/checkpoint.pt`` is written atomically every epoch with a SHA-256 sidecar
  ``checkpoint.pt.sha256``; the previous good one is kept as ``checkpoint.prev.pt`` (+ sidecar). It
  holds the config, the epoch, the model's ``state_dict`` (IRS heads included), the optimizer and
  scheduler states, the RNG states (torch CPU, and CUDA when used), the best-so-far record and the
  metrics history — only tensors, numbers, strings, lists and dicts, read back with
  ``torch.load(weights_only=True)``;
* at the end the exported model is reloaded and evaluated on the test split, clean and noisy; the
  summary is returned and written to ``out/summary.json``.

Resuming (``resume=True``) reads ``checkpoint.pt`` (falling back to ``checkpoint.prev.pt`` with a
:class:`CheckpointWarning` when it is missing, truncated, does not match its sidecar or is not a safe
weights-only file), checks that the config matches the checkpoint's (only ``data_dir``, ``device``,
``out``, ``num_workers``, ``resume`` and ``overwrite`` may differ), restores everything and continues:
on the same device and torch build the final weights are bit-identical to an uninterrupted run. On
CUDA, cuDNN is put in deterministic mode for the duration of :func:`train`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nft_cuda import _args
from nft_cuda._args import resolve_device
from nft_cuda._files import atomic_write_bytes, json_safe
from nft_cuda.distributed import RANK_STREAM, Group, join
from nft_cuda.io import MODEL_FILE
from nft_cuda.train.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    PREV_CHECKPOINT,
    CheckpointError,
    CheckpointWarning,
    check_resumable,
    checkpoint_stream_version,
    error_message,
    read_checkpoint,
    run_lock,
    sidecar_path,
    write_checkpoint,
)
from nft_cuda.train.config import RESUME_MAY_DIFFER, TrainConfig, default_out

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointWarning",
    "TrainConfig",
    "default_out",
    "evaluate",
    "export_backbone",
    "read_checkpoint",
    "train",
]

METRICS_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_acc_noisy",
    "val_acc_clean",
    "best_epoch",
    "best_val_acc",
    "epoch_time_s",
    "epoch_cpu_s",
)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    """A seed in [0, 2^63) mixed from integers (numpy SeedSequence: well spread, platform-independent)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int):
    """Run a block with torch's RNG (CPU and ``device``) seeded with ``seed``; restore it afterwards."""
    devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class _Data:
    """The run's loaders (the data tier's :func:`nft_cuda.data.split_loaders`), its dataset's spec and
    normalisation, and the training batches' augmentation."""

    def __init__(self, config: TrainConfig, device: torch.device, group: Group | None = None):
        from nft_cuda.data import get_spec, normalization, split_loaders

        self.spec = get_spec(config.dataset)
        self.mean, self.std = normalization(config.dataset, config.preprocess)
        split = split_loaders(
            config.dataset,
            config.data_dir,
            config.batch_size,
            config.val_fraction,
            config.seed,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            preprocess=config.preprocess,
            limit_train=config.limit_train,
            limit_eval=config.limit_eval,
            # Under torchrun each rank takes its slice of the same (seed, epoch) permutation.
            shard=(group.rank, group.world) if group is not None and group.active else None,
        )
        self.train, self.val, self.test = split.train, split.val, split.test
        self.train_generator, self.sizes = split.train_generator, split.sizes
        self.input_shape, self.example = split.input_shape, split.example
        # Training batches only; the border is each channel's normalised black, as a zero-padded image.
        self.augment = None
        if config.augments():
            from nft_cuda.data.augment import CropFlip

            self.augment = CropFlip(4, fill=[-m / sd for m, sd in zip(self.mean, self.std)])


# --------------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    from nft_cuda.train.irs import IRSModel

    return model.backbone if isinstance(model, IRSModel) else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device,
    noise: str = "off",
    *,
    seed: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    output=None,
) -> float:
    """Top-1 accuracy of ``model`` (its backbone, for an IRS model) over ``loader`` in ``eval()`` mode.

    ``noise``: the noise mode of its noisy layers during the pass: ``"off"`` (clean) or ``"train"``
    (a fresh draw per batch). With ``seed`` the draws come from a forked RNG seeded with it (torch's
    global RNG is left as it was). The model's training flag and noise modes are restored. ``output``:
    where the logits are in the model's output (:func:`nft_cuda.nn.custom.resolve_output`).
    """
    from tqdm.auto import tqdm

    from nft_cuda.nn import noise_mode
    from nft_cuda.nn.custom import resolve_output

    logits_of = resolve_output(output)
    device = torch.device(device)
    net = _backbone(model)
    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    rng = _forked_rng(device, seed) if seed is not None else contextlib.nullcontext()
    try:
        with rng, noise_mode(net, noise):
            for x, y in tqdm(
                loader, desc=desc, leave=False, disable=None if progress else True, file=sys.stderr, dynamic_ncols=True
            ):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                correct += (logits_of(net(x)).argmax(dim=1) == y).sum()
                total += y.numel()
    finally:
        net.train(was_training)
    return float(correct.item()) / total if total else float("nan")


def export_backbone(model: nn.Module, method, spec: dict) -> nn.Module:
    """A fresh plain copy of the trained backbone for export (CPU): ``build_from_spec`` (a built-in
    model or the model factory) + ``convert`` with the method's variation, the backbone's weights
    loaded, noise mode train. The training model is left untouched (an IRS model keeps its hooks and
    heads)."""
    from nft_cuda.models import build_from_spec
    from nft_cuda.nn import convert

    with torch.random.fork_rng(devices=[]):  # the fresh model's init must not advance the training RNG
        fresh = build_from_spec(spec)
    convert(fresh, method.variation)
    fresh.load_state_dict(_backbone(model).state_dict(), strict=True)
    return method.export(fresh)


def _model_spec(config: TrainConfig, data: _Data) -> dict:
    """What the exported model records to rebuild the model (:func:`nft_cuda.models.build_from_spec`): a
    built-in model's name and data shape, or the model factory's import path and kwargs (with the data
    shape for reference); the output adapter when there is one."""
    shape = {
        "in_channels": data.spec.channels,
        "num_classes": data.spec.num_classes,
        "input_size": data.input_shape[-1],
    }
    if config.model_factory is None:
        spec = {"name": config.model, **shape, "width": config.width, "init": config.init}
    else:
        spec = {"name": config.model, "factory": config.model_factory, "kwargs": dict(config.model_kwargs), **shape}
    if config.output is not None:
        spec["output"] = config.output
    return spec


def _build(config: TrainConfig, data: _Data, device: torch.device):
    from nft_cuda.models import build_from_spec
    from nft_cuda.train.methods import build_method

    spec = _model_spec(config, data)
    method = build_method(
        config.method,
        config.variation(),
        model_name=config.model,
        dataset=config.dataset,
        beta=config.beta,
        deltas=config.deltas if config.method == "ovf" else None,
        taps=config.taps,
        head_sigma=config.head_sigma,
        output=config.output,
        temperature=config.temperature,
        ovf_scope=config.ovf_layer_scope(),
        ovf_bn_stats=config.ovf_bn_stats,
        teacher=config.teacher,
        kd_alpha=config.kd_alpha,
        kd_temperature=config.kd_temperature,
    )
    backbone = build_from_spec(spec)
    model = method.prepare(backbone, data.example, num_classes=data.spec.num_classes)
    model.to(device)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    scheduler = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return spec, method, model, optimizer, scheduler


def _check_resume_config(config: TrainConfig, saved: dict, path: Path) -> None:
    try:
        saved_cfg = TrainConfig.from_dict(dict(saved))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config is not valid here: {error_message(exc)}") from None
    diffs = [
        f"{f.name}={getattr(saved_cfg, f.name)!r} (now {getattr(config, f.name)!r})"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUME_MAY_DIFFER and getattr(saved_cfg, f.name) != getattr(config, f.name)
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume: {path} was trained with {', '.join(diffs)}; resume with the same "
            "settings, or start a new run in another --out"
        )


# --------------------------------------------------------------------------------------------------
# Metrics files
# --------------------------------------------------------------------------------------------------


def _write_metrics(out: Path, history: list[dict]) -> None:
    rows = [json_safe(row) for row in history]
    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRICS_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    progress: bool = True,
    *,
    log: Callable[[str], None] | None = _print,
    stop_after: int | None = None,
) -> dict:
    """Train as ``config`` says (see the module docstring) and return the summary.

    Args:
        config: a :class:`TrainConfig`.
        progress: show tqdm progress bars (only on a terminal: tqdm's ``disable=None``).
        log: called with one line per epoch and a final line (default: print to stdout); None: silent.
        stop_after: debugging/testing option: return after this many epochs of *this* call have been
            checkpointed, as if the run had been interrupted (no final evaluation).

    Returns:
        a dict: ``out``, ``model_path``, ``epochs`` (completed), ``best_epoch``, ``best_val_acc``
        (noisy), ``test_acc_clean``, ``test_acc_noisy`` (of the exported best model), ``history``
        (per-epoch metrics), ``resumed_from`` (the epoch the run resumed at, or None), ``stopped``
        (True when ``stop_after`` ended it), ``sizes`` (samples per split), ``time_s``.

    Raises:
        ValueError / TypeError: bad config; CheckpointError (a ValueError): nothing usable to resume,
        or a run already in ``out`` without ``resume``/``overwrite``; DatasetNotFoundError (a
        FileNotFoundError): missing data; RuntimeError: the loss became non-finite.
    """
    from nft_cuda.data import find_files

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if stop_after is not None:
        stop_after = _args.check_int("stop_after", stop_after, 1)
    t_start = time.perf_counter()
    out = config.resolved_out()
    group = join(config.device)  # inactive unless launched by torchrun with WORLD_SIZE > 1
    try:
        if not group.is_main:  # only rank 0 prints and shows progress bars
            log, progress = None, False
        say = log if log is not None else (lambda msg: None)
        device = group.device if group.active else resolve_device(config.device)
        for split in ("train", "test"):  # a missing dataset fails before the run folder is created
            find_files(config.dataset, config.data_dir, split)
        if config.resume:
            check_resumable(out)  # "nothing to resume" before the folder is created (read once, later)
        if group.is_main:
            out.mkdir(parents=True, exist_ok=True)
        group.barrier()
        # Only rank 0 writes the run folder, so only it holds the lock.
        with run_lock(out) if group.is_main else contextlib.nullcontext():
            return _train_locked(config, progress, say, stop_after, out, device, t_start, group)
    finally:
        group.close()


@dataclasses.dataclass
class _Run:
    """Everything one training run carries from epoch to epoch (built by :func:`_start_run`)."""

    config: TrainConfig
    out: Path
    device: torch.device
    group: Group
    say: Callable[[str], None]
    progress: bool
    data: _Data
    spec: dict
    method: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list
    start_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"epoch": 0, "val_acc": -1.0})
    rotate: bool = False  # whether the next checkpoint write first keeps the current one as checkpoint.prev.pt
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.group.is_main


def _train_locked(config, progress, say, stop_after, out, device, t_start, group: Group) -> dict:
    """The training loop: prepare the run folder, restore, then per epoch train, validate and save;
    finally test the exported best model."""
    ckpt, ckpt_path = _prepare_run_folder(config, out, group.is_main)
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        run = _start_run(config, out, device, group, say, progress)
        if ckpt is not None:
            _restore(run, ckpt, ckpt_path)
        _announce(run)
        stopped, done_here = False, 0
        for epoch in range(run.start_epoch + 1, config.epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            lr, train_loss, train_acc = _train_epoch(run, epoch)
            rng_state, rank_states = _rng_states(run)
            val_noisy, val_clean, improved = _validate(run, epoch)
            row = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_acc_noisy": val_noisy,
                "val_acc_clean": val_clean,
                "best_epoch": run.best["epoch"],
                "best_val_acc": run.best["val_acc"],
                "epoch_time_s": time.perf_counter() - t0,
                # this process's CPU time (all threads): on a shared machine the wall time includes waiting
                "epoch_cpu_s": time.process_time() - c0,
            }
            _save(run, epoch, row, improved, rng_state, rank_states)
            done_here += 1
            if stop_after is not None and done_here >= stop_after and epoch < config.epochs:
                stopped = True
                break
        result = {
            "out": str(out),
            "model_path": str(out / MODEL_FILE),
            "epochs": run.history[-1]["epoch"] if run.history else 0,
            "best_epoch": run.best["epoch"],
            "best_val_acc": run.best["val_acc"],
            "history": run.history,
            "resumed_from": run.start_epoch if ckpt is not None else None,
            "stopped": stopped,
            "sizes": run.data.sizes,
            "test_acc_clean": None,
            "test_acc_noisy": None,
        }
        if not stopped:
            _final_test(run, result)
        result["time_s"] = time.perf_counter() - t_start
        if not stopped and run.main:
            _write_summary(run, result)
        return result
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags


def _prepare_run_folder(config: TrainConfig, out: Path, main: bool):
    """Clear what a killed writer left, then either read the checkpoint to resume (every rank) or make
    sure the folder holds no run (``--overwrite`` removes the old one's files). Returns (checkpoint,
    its path), both None for a fresh run."""
    for stale in out.glob(".tmp-*") if main else ():  # temp files of a writer that was killed mid-write
        try:
            stale.unlink()
        except OSError:
            pass
    if config.resume:  # every rank loads the checkpoint
        ckpt, ckpt_path = read_checkpoint(out, warn=main)
        _check_resume_config(config, ckpt["config"], ckpt_path)
        return ckpt, ckpt_path
    existing = [p.name for p in (out / CHECKPOINT, out / PREV_CHECKPOINT) if p.exists()]
    if existing and not config.overwrite:
        raise CheckpointError(
            f"{out} already holds a run ({', '.join(existing)}): resume it with --resume, "
            "replace it with --overwrite, or choose another --out"
        )
    stale = [out / n for n in (CHECKPOINT, PREV_CHECKPOINT)]
    stale += [sidecar_path(p) for p in stale] + [
        out / n for n in (MODEL_FILE, "metrics.jsonl", "metrics.csv", "summary.json")
    ]
    for p in stale if main else ():  # --overwrite: nothing of the old run may be mistaken for the new one's
        if p.exists():
            p.unlink()
    return None, None


def _start_run(config: TrainConfig, out: Path, device, group: Group, say, progress) -> _Run:
    """Seed, load the data, build model / method / optimizer; under torchrun give every rank rank 0's
    parameters and every rank but 0 a training-noise stream of its own."""
    from nft_cuda import __version__

    torch.manual_seed(config.seed)
    data = _Data(config, device, group)
    spec, method, model, optimizer, scheduler = _build(config, data, device)
    params = list(model.parameters())
    if group.active:
        # Identical start on every rank (the seeded init already is; this makes it certain), then a
        # training-noise stream of its own for every rank but 0 (rank 0 keeps one process's stream).
        group.broadcast_tensors(params + list(model.buffers()))
        if group.rank > 0:
            torch.manual_seed(_derive_seed(config.seed, RANK_STREAM, group.rank))
    meta = {
        "method": method.describe(),
        "dataset": config.dataset,
        "classes": list(data.spec.classes),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "preprocess": config.preprocess,
        "config": config.to_dict(),
        "nft_cuda_version": __version__,
        "torch_version": str(torch.__version__),
    }
    return _Run(
        config, out, device, group, say, progress, data, spec, method, model, optimizer, scheduler, params, meta=meta
    )


def _restore(run: _Run, ckpt: dict, ckpt_path: Path) -> None:
    """Continue from a checkpoint: model, optimizer, scheduler, history, best and this rank's RNG."""
    config, group, out = run.config, run.group, run.out
    try:
        run.model.load_state_dict(ckpt["model"], strict=True)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{ckpt_path} does not fit this model: {error_message(exc)}") from None
    run.start_epoch = int(ckpt["epoch"])
    run.history = list(ckpt["history"])
    run.best = dict(ckpt["best"])
    rng = ckpt["rng"]
    ranks = rng.get("ranks")
    if group.rank > 0 and (not isinstance(ranks, list) or len(ranks) != group.world):
        # a checkpoint of another world size: a fresh per-rank stream, seeded from the epoch
        torch.manual_seed(_derive_seed(config.seed, RANK_STREAM, group.rank, run.start_epoch))
        rng = None
    elif group.rank > 0:
        rng = ranks[group.rank]
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if run.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], run.device)
    run.rotate = ckpt_path.name == CHECKPOINT  # never let a bad checkpoint.pt replace the good prev
    run.say(f"resuming {out} at epoch {run.start_epoch + 1}/{config.epochs} from {ckpt_path.name}")
    if run.start_epoch and not (out / MODEL_FILE).is_file():
        raise CheckpointError(f"{out / MODEL_FILE} (the exported best model) is missing; cannot resume")


def _announce(run: _Run) -> None:
    config, data, group = run.config, run.data, run.group
    run.say(
        f"training {config.method} on {config.model_factory or config.model}/{config.dataset} (σ={config.sigma:g}, "
        f"{config.device_model}) on {run.device}: {data.sizes['train']} train / {data.sizes['val']} val / "
        f"{data.sizes['test']} test samples, {config.epochs} epoch{'s' if config.epochs != 1 else ''} -> {run.out}"
    )
    if config.weight_clip.enabled:
        run.say(f"weight clipping after every optimizer step: {config.weight_clip}")
    if group.active:
        run.say(
            f"distributed: {group.world} ranks ({group.dist.get_backend()}), {len(data.train.sampler)} training "
            f"samples per rank per epoch, batch size {config.batch_size} per rank"
        )


def _train_epoch(run: _Run, epoch: int) -> tuple[float, float, float]:
    """One pass over the training split (gradients averaged over the ranks); returns (lr, loss, accuracy)
    of the epoch over all ranks, and steps the scheduler."""
    from tqdm.auto import tqdm

    from nft_cuda.train.weight_clip import clip_checked

    config, data, device, group, optimizer = run.config, run.data, run.device, run.group, run.optimizer
    run.model.train()
    data.train_generator.manual_seed(_derive_seed(config.seed, epoch))
    # Augmentation draws from its own (seed, epoch, rank) stream: resuming at an epoch boundary
    # replays it exactly, and it never touches the noise or batch-order streams.
    aug_generator = torch.Generator().manual_seed(_derive_seed(config.seed, epoch, 2, group.rank))
    lr = optimizer.param_groups[0]["lr"]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = tqdm(
        data.train,
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
        disable=None if run.progress else True,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for step, (x, y) in enumerate(bar, start=1):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if data.augment is not None:
            x = data.augment(x, aug_generator)
        loss, logits = run.method.loss(run.model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        group.average_gradients(run.params)
        optimizer.step()
        if config.weight_clip.enabled:  # hardware-aware clipping of the crossbar weights (weight_clip.py)
            clip_checked(run.model, config.weight_clip)
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen += y.numel()
        if not bar.disable and (step % 10 == 0 or step == len(data.train)):
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
    bar.close()
    if group.active:  # the epoch's loss and accuracy over all ranks
        totals = group.sum_(
            torch.stack((loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)))
        )
        loss_sum, correct, seen = totals[0], totals[1].round().long(), int(totals[2].item())
    train_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(train_loss):
        raise RuntimeError(
            f"the training loss became {train_loss} in epoch {epoch}; lower the learning rate (--lr {config.lr:g}) or σ"
        )
    if run.scheduler is not None:
        run.scheduler.step()
    return lr, train_loss, correct.item() / max(seen, 1)


def _rng_states(run: _Run):
    """(this rank's RNG state, every rank's or None): what a resume needs to continue the noise streams.
    Also gives every rank rank 0's BatchNorm statistics, so all hold the model rank 0 checkpoints."""
    device, group = run.device, run.group
    rng_state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    rank_states = None
    if group.active:
        group.broadcast_tensors(list(run.model.buffers()))
        rank_states = group.gather_objects(rng_state)
    return rng_state, rank_states


def _validate(run: _Run, epoch: int) -> tuple[float, float, bool]:
    """Noisy and clean validation accuracy (rank 0; the others get its numbers), and whether the epoch
    is the new best (without a validation split: always, so the last epoch is exported). Exports the
    best model."""
    config, data, device = run.config, run.data, run.device
    val_noisy = val_clean = float("nan")
    if data.val is not None and run.main:  # validation on rank 0; the others wait below
        val_noisy = evaluate(
            run.model,
            data.val,
            device,
            "train",
            seed=_derive_seed(config.seed, epoch, 1),
            progress=run.progress,
            desc="val (noisy)",
            output=config.output,
        )
        val_clean = evaluate(
            run.model, data.val, device, "off", progress=run.progress, desc="val (clean)", output=config.output
        )
    val_noisy, val_clean = run.group.broadcast_object((val_noisy, val_clean))
    improved = val_noisy > run.best["val_acc"] if data.val is not None else True  # no val split: the last
    if improved:
        run.best = {"epoch": epoch, "val_acc": val_noisy if data.val is not None else float("nan")}
    if improved and run.main:
        from nft_cuda.io import save_model

        # The training backbone itself: the file holds its state_dict, noisy layers and keys, which a
        # rebuilt copy would only repeat (the IRS heads are not part of the backbone).
        save_model(
            str(run.out / MODEL_FILE),
            _backbone(run.model),
            spec=run.spec,
            variation=run.method.variation,
            meta={**run.meta, "epoch": epoch, "val_acc_noisy": val_noisy, "val_acc_clean": val_clean},
        )
    return val_noisy, val_clean, improved


def _save(run: _Run, epoch: int, row: dict, improved: bool, rng_state, rank_states) -> None:
    """Record the epoch: metrics files and the checkpoint (rank 0), then a barrier so no rank goes on
    before they are written; log one line."""
    from nft_cuda import __version__

    run.history.append(row)
    if run.main:
        _write_metrics(run.out, run.history)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": run.config.to_dict(),
            "epoch": epoch,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "rng": rng_state if rank_states is None else {**rng_state, "ranks": rank_states},
            "best": run.best,
            "history": run.history,
            "versions": {"nft_cuda": __version__, "torch": str(torch.__version__)},
            "noise_stream": checkpoint_stream_version(_backbone(run.model)),
        }
        write_checkpoint(run.out, payload, run.rotate)
    run.group.barrier()  # the checkpoint and model of this epoch are written before any rank goes on
    run.rotate = True
    has_val = run.data.val is not None
    val_text = (
        f"val acc noisy {row['val_acc_noisy']:.2%} / clean {row['val_acc_clean']:.2%}"
        if has_val
        else "no validation split"
    )
    run.say(
        f"epoch {epoch}/{run.config.epochs}: loss {row['train_loss']:.4f}, train acc {row['train_acc']:.2%}, "
        f"{val_text}, lr {row['lr']:.3g}, {row['epoch_time_s']:.1f} s{'  *best' if improved and has_val else ''}"
    )


def _final_test(run: _Run, result: dict) -> None:
    """Clean and noisy test accuracy of the exported best model (rank 0; the others get its numbers)."""
    from nft_cuda.io import load_model

    config, device, data = run.config, run.device, run.data
    if run.main:
        exported, _ = load_model(str(run.out / MODEL_FILE), device=device)
        result["test_acc_clean"] = evaluate(
            exported, data.test, device, "off", progress=run.progress, desc="test (clean)", output=config.output
        )
        result["test_acc_noisy"] = evaluate(
            exported,
            data.test,
            device,
            "train",
            seed=_derive_seed(config.seed, 2**32),
            progress=run.progress,
            desc="test (noisy)",
            output=config.output,
        )
    result["test_acc_clean"], result["test_acc_noisy"] = run.group.broadcast_object(
        (result["test_acc_clean"], result["test_acc_noisy"])
    )


def _write_summary(run: _Run, result: dict) -> None:
    summary = {k: v for k, v in result.items() if k != "history"}
    summary["config"] = run.config.to_dict()
    atomic_write_bytes(run.out / "summary.json", (json.dumps(json_safe(summary), indent=2) + "\n").encode())
    best = run.best
    chosen = (
        f"best epoch {best['epoch']} (val acc noisy {best['val_acc']:.2%})"
        if run.data.val is not None
        else f"last epoch {best['epoch']} (no validation split)"
    )
    run.say(
        f"{chosen}: test acc clean "
        f"{result['test_acc_clean']:.2%}, noisy {result['test_acc_noisy']:.2%}; model: {run.out / MODEL_FILE}"
    )
