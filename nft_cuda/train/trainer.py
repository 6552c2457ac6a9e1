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
* every epoch: one pass over the training split (progress bar with the running loss and accuracy),
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
import hashlib
import io
import json
import math
import numbers
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "CheckpointWarning", "TrainConfig", "default_out",
           "evaluate", "export_backbone", "read_checkpoint", "train"]

CHECKPOINT_FORMAT = "nft_cuda.checkpoint/1"
CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint.prev.pt"
SIDECAR_SUFFIX = ".sha256"
MODEL_FILE = "model.pt"
METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_acc_noisy", "val_acc_clean", "best_epoch",
                   "best_val_acc", "epoch_time_s")

_OPTIMIZERS = ("adam", "sgd")
_SCHEDULERS = ("cosine", "none")
#: Fields that may differ between a checkpoint's config and the config that resumes it.
RESUME_MAY_DIFFER = ("data_dir", "device", "out", "num_workers", "resume", "overwrite")
_DEFAULT_DELTAS = (0.15, 0.10, 0.05)
_U63 = 2**63


class CheckpointError(ValueError):
    """No usable checkpoint to resume from, or a checkpoint that does not fit the run."""


class CheckpointWarning(UserWarning):
    """A checkpoint was unusable and the previous good one is used instead."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _real(name: str, value, *, minimum: float | None = None, strict: bool = False, maximum: float | None = None,
          max_strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    if maximum is not None and (value >= maximum if max_strict else value > maximum):
        raise ValueError(f"{name} must be {'<' if max_strict else '<='} {maximum:g}, got {value:g}")
    return value


def _int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    key = value.strip().lower()
    if key not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return key


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def _path_or_none(name: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {type(value).__name__}")
    value = os.fspath(value)
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


@dataclasses.dataclass
class TrainConfig:
    """Everything :func:`train` needs (validated and normalised on construction).

    Attributes:
        model: ``"small"`` (CPU-friendly, default), ``"vgg8"`` or ``"resnet18"``.
        dataset: ``"embedded"`` (default: a Fashion-MNIST slice shipped with the package, no download),
            ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"``.
        data_dir: the data folder (default ``$NFT_DATA_DIR``, else ``~/.cache/nft_cuda/data``).
        method: ``"clean"``, ``"noise"`` (noise injection, default), ``"ovf"`` or ``"irs"``.
        sigma: σ_d of training (≥ 0); 0.1 by default, the reference README's example.
        device_model: ``"RRAM1"``, ``"FeFET2"``, ``"RRAM4"`` or ``"FeFET6"``.
        beta: the feedback gain β of OVF/IRS (None: the DESIGN §5 default for model/dataset).
        deltas: OVF variation offsets δ_n, noisiest first.
        head_sigma: σ of the IRS heads (None: ``sigma``; the heads always use RRAM1).
        epochs: number of epochs (default 2: ``nft train --method ovf`` ends in about two minutes on
            two CPU cores).
        batch_size, lr: mini-batch size and learning rate.
        optimizer: ``"adam"`` (default, as the paper) or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum (ignored by Adam).
        scheduler: ``"cosine"`` (CosineAnnealingLR, T_max = epochs, stepped per epoch) or ``"none"``.
        weight_decay: L2 weight decay of the optimizer.
        val_fraction: share of the training split held out for model selection, in [0, 1).
        seed: the run's seed, in [0, 2^63).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        width: channel multiplier of the model.
        out: the run folder (None: ``runs/<method>-<model>-<dataset>-s<sigma>``, see :func:`default_out`).
        num_workers: DataLoader worker processes.
        resume: continue the run in ``out`` from its checkpoint.
        overwrite: start afresh in an ``out`` that already holds a run (its checkpoints are replaced).
        limit_train, limit_eval: debugging option — cap the number of training samples, and of
            validation and test samples (None: all).
    """

    model: str = "small"
    dataset: str = "embedded"
    data_dir: str | None = None
    method: str = "noise"
    sigma: float = 0.1
    device_model: str = "RRAM1"
    beta: float | None = None
    deltas: tuple[float, ...] = _DEFAULT_DELTAS
    head_sigma: float | None = None
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    width: float = 1.0
    out: str | None = None
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    limit_train: int | None = None
    limit_eval: int | None = None

    def __post_init__(self):
        from nft_cuda.data import canonical_name
        from nft_cuda.models import MODELS
        from nft_cuda.train.methods import METHODS
        from nft_cuda.variation import Variation

        self.model = _choice("model", self.model, tuple(MODELS))
        if not isinstance(self.dataset, str):
            raise TypeError(f"dataset must be a str, got {type(self.dataset).__name__}")
        self.dataset = canonical_name(self.dataset)
        self.data_dir = _path_or_none("data_dir", self.data_dir)
        self.method = _choice("method", self.method, tuple(METHODS))
        self.sigma = _real("sigma", self.sigma, minimum=0.0)
        if not isinstance(self.device_model, str):
            raise TypeError(f"device_model must be a str, got {type(self.device_model).__name__}")
        self.device_model = Variation(self.sigma, self.device_model).device_model
        if self.beta is not None:
            self.beta = _real("beta", self.beta, minimum=0.0)
            if self.method not in ("ovf", "irs"):
                raise ValueError(f"beta applies to method 'ovf' or 'irs', not '{self.method}'")
        if isinstance(self.deltas, (str, bytes)) or not isinstance(self.deltas, Sequence):
            raise TypeError(f"deltas must be a sequence of numbers, got {type(self.deltas).__name__}")
        self.deltas = tuple(_real(f"deltas[{i}]", d, minimum=0.0) for i, d in enumerate(self.deltas))
        if not self.deltas:
            raise ValueError("deltas must hold at least one value")
        if self.method != "ovf" and self.deltas != _DEFAULT_DELTAS:
            raise ValueError(f"deltas apply to method 'ovf', not '{self.method}'")
        if self.head_sigma is not None:
            self.head_sigma = _real("head_sigma", self.head_sigma, minimum=0.0)
            if self.method != "irs":
                raise ValueError(f"head_sigma applies to method 'irs', not '{self.method}'")
        self.epochs = _int("epochs", self.epochs, 1)
        self.batch_size = _int("batch_size", self.batch_size, 1)
        self.lr = _real("lr", self.lr, minimum=0.0, strict=True)
        self.optimizer = _choice("optimizer", self.optimizer, _OPTIMIZERS)
        self.momentum = _real("momentum", self.momentum, minimum=0.0, maximum=1.0, max_strict=True)
        self.scheduler = _choice("scheduler", self.scheduler, _SCHEDULERS)
        self.weight_decay = _real("weight_decay", self.weight_decay, minimum=0.0)
        self.val_fraction = _real("val_fraction", self.val_fraction, minimum=0.0, maximum=1.0, max_strict=True)
        self.seed = _int("seed", self.seed, 0, _U63 - 1)
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a str ('auto', 'cpu', 'cuda' or 'cuda:N'), "
                            f"got {type(self.device).__name__}")
        self.device = self.device.strip().lower()
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self.width = _real("width", self.width, minimum=0.0, strict=True)
        self.out = _path_or_none("out", self.out)
        self.num_workers = _int("num_workers", self.num_workers, 0)
        self.resume = _bool("resume", self.resume)
        self.overwrite = _bool("overwrite", self.overwrite)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.limit_train is not None:
            self.limit_train = _int("limit_train", self.limit_train, 1)
        if self.limit_eval is not None:
            self.limit_eval = _int("limit_eval", self.limit_eval, 1)

    def to_dict(self) -> dict:
        """Plain types only (lists for tuples): what the checkpoint stores."""
        d = dataclasses.asdict(self)
        d["deltas"] = list(self.deltas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def resolved_out(self) -> Path:
        return Path(self.out) if self.out is not None else default_out(self)


def default_out(config: TrainConfig) -> Path:
    """``runs/<method>-<model>-<dataset>-s<sigma>`` (relative to the working directory)."""
    return Path("runs") / f"{config.method}-{config.model}-{config.dataset}-s{config.sigma:g}"


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    """A seed in [0, 2^63) mixed from integers (numpy SeedSequence: well spread, platform-independent)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' was requested but CUDA is not available (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) present")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int):
    """Run a block with torch's RNG (CPU and ``device``) seeded with ``seed``; restore it afterwards."""
    devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsync'd temp file in the same folder and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _chmod_default(path) -> None:
    """Give a mkstemp file (mode 0600) the permissions a plain open() would have (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass


@contextlib.contextmanager
def _run_lock(out: Path):
    """An exclusive lock on ``out/.lock`` for the duration of a run (released by the OS even on SIGKILL),
    so two trainings never write the same run folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointError(f"another training is running in {out} (it holds {out / '.lock'})") from None
        yield
    finally:
        os.close(fd)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _check_checkpoint(path: Path) -> dict:
    """Verify ``path`` against its sidecar and load it weights-only; raise CheckpointError otherwise."""
    from nft_cuda.io import safe_load

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    side = _sidecar(path)
    if side.is_file():
        try:
            expected = side.read_text().split()[0].lower()
        except (OSError, IndexError, UnicodeDecodeError):
            raise CheckpointError(f"{side} is unreadable") from None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != expected:
            raise CheckpointError(f"{path} does not match its SHA-256 sidecar ({side.name}): the file is truncated "
                                  "or corrupt")
    else:
        warnings.warn(f"{path} has no SHA-256 sidecar ({side.name}); it cannot be verified, loading it anyway",
                      CheckpointWarning, stacklevel=3)
    try:
        ckpt = safe_load(str(path))
    except ValueError as exc:
        raise CheckpointError(_message(exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an nft_cuda training checkpoint (format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in ("config", "epoch", "model", "optimizer", "scheduler", "rng", "best", "history")
               if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    return ckpt


def read_checkpoint(out, *, warn: bool = True) -> tuple[dict, Path]:
    """The checkpoint to resume from in the run folder ``out`` and its path.

    ``checkpoint.pt`` when it exists, matches its SHA-256 sidecar and loads weights-only; otherwise
    ``checkpoint.prev.pt`` with a :class:`CheckpointWarning` (when ``warn``). Raises
    :class:`CheckpointError` naming both files when neither is usable.
    """
    out = Path(out)
    current, prev = out / CHECKPOINT, out / PREV_CHECKPOINT
    if not current.exists() and not prev.exists():
        raise CheckpointError(f"nothing to resume in {out}: no {CHECKPOINT} (start the run without --resume, "
                              "or point --out at the run folder)")
    problems = []
    for path in (current, prev):
        try:
            with warnings.catch_warnings():
                if not warn:
                    warnings.simplefilter("ignore", CheckpointWarning)
                ckpt = _check_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if path == prev and warn:
            warnings.warn(f"{problems[0]}; resuming from the previous good checkpoint {prev} "
                          f"(epoch {ckpt['epoch']}) instead", CheckpointWarning, stacklevel=2)
        return ckpt, path
    raise CheckpointError(f"cannot resume from {out}: " + "; ".join(problems))


def _serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_checkpoint(out: Path, payload: dict, rotate: bool) -> None:
    """Write checkpoint.pt and its sidecar; with ``rotate`` first keep the current (good) one as
    checkpoint.prev.pt. Every step is an atomic rename, so a crash at any point leaves a consistent
    (checkpoint, sidecar) pair in checkpoint.pt or in checkpoint.prev.pt."""
    current, prev = out / CHECKPOINT, out / PREV_CHECKPOINT
    data = _serialize(payload)
    digest = hashlib.sha256(data).hexdigest()
    if rotate and current.is_file() and _sidecar(current).is_file():
        for src, dst in ((_sidecar(current), _sidecar(prev)), (current, prev)):
            tmp = dst.with_name(f".tmp-{dst.name}")
            if tmp.exists():
                tmp.unlink()
            try:
                os.link(src, tmp)  # a second name for the same bytes: no copy, and src is never modified
            except OSError:
                import shutil

                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    _atomic_write_bytes(current, data)
    _atomic_write_bytes(_sidecar(current), f"{digest}  {CHECKPOINT}\n".encode())


# --------------------------------------------------------------------------------------------------
# Distributed (torchrun) support (DESIGN §7)
# --------------------------------------------------------------------------------------------------
#
# Under ``torchrun`` (WORLD_SIZE > 1) every rank runs :func:`train`. The model is *not* wrapped in
# DistributedDataParallel: OVF calls the model N+1 times per step (sequential mode) or once on a
# sample-stacked batch, IRS adds forward hooks and heads, and DDP's reducer expects exactly one forward
# per backward with a fixed set of used parameters (find_unused_parameters=False complains, True costs a
# graph walk per step and still assumes one forward). Instead every rank starts from rank 0's parameters
# and buffers, and after each backward the gradients are averaged with one all-reduce over a flat buffer
# in the fixed ``model.parameters()`` order. That works for any number of forward calls, keeps every
# rank's parameters (and optimizer states) identical, and is deterministic: same seed, same world size,
# same device → bit-identical weights. BatchNorm statistics stay per rank while training (as DDP without
# SyncBatchNorm); rank 0's buffers are broadcast before validation and checkpointing, so every rank holds
# the model rank 0 checkpoints.

_RANK_STREAM = 0x5EED_D1A7  # mixes the rank into the training-noise seed of ranks > 0


class _Group:
    """This process's place in a torchrun group; a single-process run is an inactive group of one."""

    def __init__(self, dist=None, rank: int = 0, world: int = 1, created: bool = False,
                 device: torch.device | None = None):
        self.dist, self.rank, self.world, self.created, self.device = dist, rank, world, created, device

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.created and self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()
        self.created = False

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (also a barrier)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        boxes = [None] * self.world
        self.dist.all_gather_object(boxes, obj)
        return boxes

    def broadcast_tensors(self, tensors) -> None:
        """Overwrite ``tensors`` with rank 0's values, in order."""
        if not self.active:
            return
        for t in tensors:
            self.dist.broadcast(t.data, src=0)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.dist.all_reduce(tensor)
        return tensor

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over the ranks (in place), in the order given.

        A parameter without a gradient on some rank but with one elsewhere takes zeros there; one without a
        gradient on every rank keeps ``grad=None`` (the optimizer then skips it, as in one process).
        """
        if not self.active or not params:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        self.sum_(present)
        used = [p for p, n in zip(params, present.tolist()) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in used:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            flat = _flatten_dense_tensors(grads)
            self.sum_(flat)
            flat.div_(self.world)
            for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)


def _join_group(device_name: str) -> _Group:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA, device
    ``cuda:LOCAL_RANK`` for ``auto``/``cuda``), or use one that is already initialised."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - builds without distributed support
        dist = None
    available = dist is not None and dist.is_available()
    initialised = available and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Group()
    if not available:
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available()):
        device_name = f"cuda:{local_rank}"
    device = _resolve_device(device_name)
    created = False
    if not initialised:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        created = True
    return _Group(dist, dist.get_rank(), dist.get_world_size(), created, device)


class _ShardSampler(torch.utils.data.Sampler):
    """One rank's contiguous slice of the epoch's permutation (drawn from ``generator``, the same on every
    rank); the remainder of ``n // world`` is dropped so every rank runs the same number of steps."""

    def __init__(self, n: int, rank: int, world: int, generator: torch.Generator):
        self.n, self.rank, self.world, self.generator = n, rank, world, generator
        self.per_rank = n // world

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator)
        return iter(perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist())


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _passthrough(batch):
    # TensorPairDataset.__getitems__ already returns the gathered (images, labels) batch.
    return batch


class _Data:
    def __init__(self, config: TrainConfig, device: torch.device, group: _Group | None = None):
        from torch.utils.data import DataLoader

        from nft_cuda.data import TensorPairDataset, get_spec, load_dataset, train_val_split

        self.spec = get_spec(config.dataset)
        train_x, train_y = load_dataset(config.dataset, config.data_dir, "train")
        test_x, test_y = load_dataset(config.dataset, config.data_dir, "test")
        tr_idx, va_idx = train_val_split(train_y.shape[0], config.val_fraction, config.seed, labels=train_y)
        if config.limit_train is not None:
            tr_idx = tr_idx[:config.limit_train]
        if config.limit_eval is not None:
            va_idx = va_idx[:config.limit_eval]
            test_x, test_y = test_x[:config.limit_eval], test_y[:config.limit_eval]
        self.input_shape = tuple(train_x.shape[1:])
        self.example = train_x[tr_idx[:2]]
        common = dict(num_workers=config.num_workers, collate_fn=_passthrough,
                      pin_memory=device.type == "cuda")
        # Every loader has its own generator, so iterating one never touches torch's global RNG.
        self.train_generator = torch.Generator()
        train_set = TensorPairDataset(train_x[tr_idx], train_y[tr_idx])
        if group is not None and group.active:
            # Each rank takes its slice of the same (seed, epoch) permutation; batch_size is per rank.
            n = int(tr_idx.numel())
            if n < group.world:
                raise ValueError(f"the training split has {n} sample(s), fewer than the {group.world} ranks "
                                 "(raise --limit-train or use fewer processes)")
            self.train = DataLoader(train_set, batch_size=config.batch_size,
                                    sampler=_ShardSampler(n, group.rank, group.world, self.train_generator),
                                    **common)
        else:
            self.train = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                                    generator=self.train_generator, **common)
        self.val = None
        if va_idx.numel():
            self.val = DataLoader(TensorPairDataset(train_x[va_idx], train_y[va_idx]), batch_size=config.batch_size,
                                  shuffle=False, generator=torch.Generator().manual_seed(0), **common)
        self.test = DataLoader(TensorPairDataset(test_x, test_y), batch_size=config.batch_size, shuffle=False,
                               generator=torch.Generator().manual_seed(0), **common)
        self.sizes = {"train": int(tr_idx.numel()), "val": int(va_idx.numel()), "test": int(test_y.shape[0])}


# --------------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    from nft_cuda.train.irs import IRSModel

    return model.backbone if isinstance(model, IRSModel) else model


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, noise: str = "off", *, seed: int | None = None,
             progress: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy of ``model`` (its backbone, for an IRS model) over ``loader`` in ``eval()`` mode.

    ``noise``: the noise mode of its noisy layers during the pass: ``"off"`` (clean) or ``"train"``
    (a fresh draw per batch). With ``seed`` the draws come from a forked RNG seeded with it (torch's
    global RNG is left as it was). The model's training flag and noise modes are restored.
    """
    from tqdm.auto import tqdm

    from nft_cuda.conversion import noise_mode

    device = torch.device(device)
    net = _backbone(model)
    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    rng = _forked_rng(device, seed) if seed is not None else contextlib.nullcontext()
    try:
        with rng, noise_mode(net, noise):
            for x, y in tqdm(loader, desc=desc, leave=False, disable=None if progress else True, file=sys.stderr,
                             dynamic_ncols=True):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                correct += (net(x).argmax(dim=1) == y).sum()
                total += y.numel()
    finally:
        net.train(was_training)
    return float(correct.item()) / total if total else float("nan")


def export_backbone(model: nn.Module, method, spec: dict) -> nn.Module:
    """A fresh plain copy of the trained backbone for export (CPU): ``build_model`` + ``convert`` with
    the method's variation, the backbone's weights loaded, noise mode train. The training model is
    left untouched (an IRS model keeps its hooks and heads)."""
    from nft_cuda.conversion import convert
    from nft_cuda.models import build_model

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    with torch.random.fork_rng(devices=[]):  # the fresh model's init must not advance the training RNG
        fresh = build_model(spec["name"], **kwargs)
    convert(fresh, method.variation)
    fresh.load_state_dict(_backbone(model).state_dict(), strict=True)
    return method.export(fresh)


def _build(config: TrainConfig, data: _Data, device: torch.device):
    from nft_cuda.models import build_model
    from nft_cuda.train.methods import build_method
    from nft_cuda.variation import Variation

    spec = {"name": config.model, "in_channels": data.spec.channels, "num_classes": data.spec.num_classes,
            "input_size": data.input_shape[-1], "width": config.width}
    variation = Variation(config.sigma, config.device_model)
    head_variation = None
    if config.method == "irs":
        head_variation = Variation(config.sigma if config.head_sigma is None else config.head_sigma, "RRAM1")
    method = build_method(config.method, variation, model_name=config.model, dataset=config.dataset,
                          beta=config.beta, deltas=config.deltas if config.method == "ovf" else None,
                          head_variation=head_variation)
    backbone = build_model(config.model, **{k: v for k, v in spec.items() if k != "name"})
    model = method.prepare(backbone, data.example, num_classes=data.spec.num_classes)
    model.to(device)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    scheduler = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return spec, method, model, optimizer, scheduler


def _check_resume_config(config: TrainConfig, saved: dict, path: Path) -> None:
    try:
        saved_cfg = TrainConfig.from_dict(dict(saved))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config is not valid here: {_message(exc)}") from None
    diffs = [f"{f.name}={getattr(saved_cfg, f.name)!r} (now {getattr(config, f.name)!r})"
             for f in dataclasses.fields(TrainConfig)
             if f.name not in RESUME_MAY_DIFFER and getattr(saved_cfg, f.name) != getattr(config, f.name)]
    if diffs:
        raise CheckpointError(f"cannot resume: {path} was trained with {', '.join(diffs)}; resume with the same "
                              "settings, or start a new run in another --out")


# --------------------------------------------------------------------------------------------------
# Metrics files
# --------------------------------------------------------------------------------------------------


def _json_safe(obj):
    """NaN/inf (e.g. the validation accuracy of a run without a validation split) → None: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_metrics(out: Path, history: list[dict]) -> None:
    rows = [_json_safe(row) for row in history]
    _atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRICS_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    _atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(config: TrainConfig, progress: bool = True, *, log: Callable[[str], None] | None = _print,
          stop_after: int | None = None) -> dict:
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
        stop_after = _int("stop_after", stop_after, 1)
    t_start = time.perf_counter()
    out = config.resolved_out()
    group = _join_group(config.device)  # inactive unless launched by torchrun with WORLD_SIZE > 1
    try:
        if not group.is_main:  # only rank 0 prints and shows progress bars
            log, progress = None, False
        say = log if log is not None else (lambda msg: None)
        device = group.device if group.active else _resolve_device(config.device)
        for split in ("train", "test"):  # a missing dataset fails before the run folder is created
            find_files(config.dataset, config.data_dir, split)
        if config.resume and not ((out / CHECKPOINT).exists() or (out / PREV_CHECKPOINT).exists()):
            read_checkpoint(out)  # raises "nothing to resume" without creating the folder
        if group.is_main:
            out.mkdir(parents=True, exist_ok=True)
        group.barrier()
        # Only rank 0 writes the run folder, so only it holds the lock.
        with _run_lock(out) if group.is_main else contextlib.nullcontext():
            return _train_locked(config, progress, say, stop_after, out, device, t_start, group)
    finally:
        group.close()


def _train_locked(config, progress, say, stop_after, out, device, t_start, group: _Group) -> dict:
    from tqdm.auto import tqdm

    from nft_cuda import __version__
    from nft_cuda.io import load_model, save_model

    main = group.is_main
    for stale in out.glob(".tmp-*") if main else ():  # temp files of a writer that was killed mid-write
        try:
            stale.unlink()
        except OSError:
            pass
    ckpt = ckpt_path = None
    if config.resume:  # every rank loads the checkpoint
        ckpt, ckpt_path = read_checkpoint(out, warn=main)
        _check_resume_config(config, ckpt["config"], ckpt_path)
    else:
        existing = [p.name for p in (out / CHECKPOINT, out / PREV_CHECKPOINT) if p.exists()]
        if existing and not config.overwrite:
            raise CheckpointError(f"{out} already holds a run ({', '.join(existing)}): resume it with --resume, "
                                  "replace it with --overwrite, or choose another --out")
        stale = [out / n for n in (CHECKPOINT, PREV_CHECKPOINT)]
        stale += [_sidecar(p) for p in stale] + [out / n for n in (MODEL_FILE, "metrics.jsonl", "metrics.csv",
                                                                  "summary.json")]
        for p in stale if main else ():  # --overwrite: nothing of the old run may be mistaken for the new one's
            if p.exists():
                p.unlink()

    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        torch.manual_seed(config.seed)
        data = _Data(config, device, group)
        spec, method, model, optimizer, scheduler = _build(config, data, device)
        params = list(model.parameters())
        if group.active:
            # Identical start on every rank (the seeded init already is; this makes it certain), then a
            # training-noise stream of its own for every rank but 0 (rank 0 keeps one process's stream).
            group.broadcast_tensors(params + list(model.buffers()))
            if group.rank > 0:
                torch.manual_seed(_derive_seed(config.seed, _RANK_STREAM, group.rank))

        start_epoch, history = 0, []
        best = {"epoch": 0, "val_acc": -1.0}
        rotate = False
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"], strict=True)
                optimizer.load_state_dict(ckpt["optimizer"])
                if scheduler is not None:
                    scheduler.load_state_dict(ckpt["scheduler"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{ckpt_path} does not fit this model: {_message(exc)}") from None
            start_epoch = int(ckpt["epoch"])
            history = list(ckpt["history"])
            best = dict(ckpt["best"])
            rng = ckpt["rng"]
            ranks = rng.get("ranks")
            if group.rank > 0 and (not isinstance(ranks, list) or len(ranks) != group.world):
                # a checkpoint of another world size: a fresh per-rank stream, seeded from the epoch
                torch.manual_seed(_derive_seed(config.seed, _RANK_STREAM, group.rank, start_epoch))
                rng = None
            elif group.rank > 0:
                rng = ranks[group.rank]
            if rng is not None:
                torch.set_rng_state(rng["torch"])
                if device.type == "cuda" and rng.get("cuda") is not None:
                    torch.cuda.set_rng_state(rng["cuda"], device)
            rotate = ckpt_path.name == CHECKPOINT  # never let a bad checkpoint.pt replace the good prev
            say(f"resuming {out} at epoch {start_epoch + 1}/{config.epochs} from {ckpt_path.name}")
            if start_epoch and not (out / MODEL_FILE).is_file():
                raise CheckpointError(f"{out / MODEL_FILE} (the exported best model) is missing; cannot resume")

        say(f"training {config.method} on {config.model}/{config.dataset} (σ={config.sigma:g}, "
            f"{config.device_model}) on {device}: {data.sizes['train']} train / {data.sizes['val']} val / "
            f"{data.sizes['test']} test samples, {config.epochs} epoch{'s' if config.epochs != 1 else ''} -> {out}")
        if group.active:
            say(f"distributed: {group.world} ranks ({group.dist.get_backend()}), {len(data.train.sampler)} training "
                f"samples per rank per epoch, batch size {config.batch_size} per rank")
        meta_common = {
            "method": method.describe(), "dataset": config.dataset, "classes": list(data.spec.classes),
            "normalization": {"mean": list(data.spec.mean), "std": list(data.spec.std)},
            "config": config.to_dict(), "nft_cuda_version": __version__, "torch_version": str(torch.__version__),
        }

        stopped = False
        done_here = 0
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            data.train_generator.manual_seed(_derive_seed(config.seed, epoch))
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            bar = tqdm(data.train, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                       disable=None if progress else True, file=sys.stderr, dynamic_ncols=True)
            for step, (x, y) in enumerate(bar, start=1):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                loss, logits = method.loss(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                group.average_gradients(params)
                optimizer.step()
                loss_sum += loss.detach().double() * y.numel()
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen += y.numel()
                if not bar.disable and (step % 10 == 0 or step == len(data.train)):
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
            bar.close()
            if group.active:  # the epoch's loss and accuracy over all ranks
                totals = group.sum_(torch.stack((loss_sum, correct.double(),
                                                 torch.tensor(float(seen), dtype=torch.float64, device=device))))
                loss_sum, correct, seen = totals[0], totals[1].round().long(), int(totals[2].item())
            train_loss = loss_sum.item() / max(seen, 1)
            if not math.isfinite(train_loss):
                raise RuntimeError(f"the training loss became {train_loss} in epoch {epoch}; lower the learning rate "
                                   f"(--lr {config.lr:g}) or σ")
            train_acc = correct.item() / max(seen, 1)
            if scheduler is not None:
                scheduler.step()

            rng_state = {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            rank_states = None
            if group.active:
                group.broadcast_tensors(list(model.buffers()))  # rank 0's BatchNorm statistics everywhere
                rank_states = group.gather_objects(rng_state)  # every rank's noise stream, for resuming
            val_noisy = val_clean = float("nan")
            if data.val is not None and main:  # validation on rank 0; the others wait below
                val_noisy = evaluate(model, data.val, device, "train", seed=_derive_seed(config.seed, epoch, 1),
                                     progress=progress, desc="val (noisy)")
                val_clean = evaluate(model, data.val, device, "off", progress=progress, desc="val (clean)")
            val_noisy, val_clean = group.broadcast_object((val_noisy, val_clean))
            improved = val_noisy > best["val_acc"] if data.val is not None else True  # no val split: the last
            if improved:
                best = {"epoch": epoch, "val_acc": val_noisy if data.val is not None else float("nan")}
            if improved and main:
                save_model(str(out / MODEL_FILE), export_backbone(model, method, spec), spec=spec,
                           variation=method.variation,
                           meta={**meta_common, "epoch": epoch, "val_acc_noisy": val_noisy,
                                 "val_acc_clean": val_clean})
                _chmod_default(out / MODEL_FILE)
            row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                   "val_acc_noisy": val_noisy, "val_acc_clean": val_clean, "best_epoch": best["epoch"],
                   "best_val_acc": best["val_acc"], "epoch_time_s": time.perf_counter() - t0}
            history.append(row)
            if main:
                _write_metrics(out, history)
            payload = None if not main else {
                "format": CHECKPOINT_FORMAT,
                "config": config.to_dict(),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state if rank_states is None else {**rng_state, "ranks": rank_states},
                "best": best,
                "history": history,
                "versions": {"nft_cuda": __version__, "torch": str(torch.__version__)},
            }
            if main:
                _write_checkpoint(out, payload, rotate)
            group.barrier()  # the checkpoint and model of this epoch are written before any rank goes on
            rotate = True
            val_text = (f"val acc noisy {val_noisy:.2%} / clean {val_clean:.2%}" if data.val is not None
                        else "no validation split")
            say(f"epoch {epoch}/{config.epochs}: loss {train_loss:.4f}, train acc {train_acc:.2%}, {val_text}, "
                f"lr {lr:.3g}, {row['epoch_time_s']:.1f} s{'  *best' if improved and data.val is not None else ''}")
            done_here += 1
            if stop_after is not None and done_here >= stop_after and epoch < config.epochs:
                stopped = True
                break

        result = {"out": str(out), "model_path": str(out / MODEL_FILE), "epochs": history[-1]["epoch"] if history
                  else 0, "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "history": history,
                  "resumed_from": start_epoch if ckpt is not None else None, "stopped": stopped,
                  "sizes": data.sizes, "test_acc_clean": None, "test_acc_noisy": None}
        if stopped:
            result["time_s"] = time.perf_counter() - t_start
            return result

        if main:  # test evaluation on rank 0; the others get its numbers
            exported, _ = load_model(str(out / MODEL_FILE), device=device)
            result["test_acc_clean"] = evaluate(exported, data.test, device, "off", progress=progress,
                                                desc="test (clean)")
            result["test_acc_noisy"] = evaluate(exported, data.test, device, "train",
                                                seed=_derive_seed(config.seed, 2**32), progress=progress,
                                                desc="test (noisy)")
        result["test_acc_clean"], result["test_acc_noisy"] = group.broadcast_object(
            (result["test_acc_clean"], result["test_acc_noisy"]))
        result["time_s"] = time.perf_counter() - t_start
        if not main:
            return result
        summary = {k: v for k, v in result.items() if k != "history"}
        summary["config"] = config.to_dict()
        _atomic_write_bytes(out / "summary.json", (json.dumps(_json_safe(summary), indent=2) + "\n").encode())
        chosen = (f"best epoch {best['epoch']} (val acc noisy {best['val_acc']:.2%})" if data.val is not None
                  else f"last epoch {best['epoch']} (no validation split)")
        say(f"{chosen}: test acc clean "
            f"{result['test_acc_clean']:.2%}, noisy {result['test_acc_noisy']:.2%}; model: {out / MODEL_FILE}")
        return result
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
