"""Training checkpoints: atomic writes with a SHA-256 sidecar, a kept previous good checkpoint, safe
(weights-only) reads with fallback, and the run-folder lock (DESIGN §9).

Every checkpoint records ``noise_stream``, the noise stream version of the model's layer keys (DESIGN §2;
:func:`checkpoint_stream_version`); a checkpoint without it was written under version 1."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch

from nft_cuda._files import atomic_write_bytes, sha256_file, sha256_hex
from nft_cuda.nn import NOISE_STREAM_VERSION, stream_version

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointWarning",
    "PREV_CHECKPOINT",
    "checkpoint_stream_version",
    "has_checkpoint",
    "read_checkpoint",
]

CHECKPOINT_FORMAT = "nft_cuda.checkpoint/1"
CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint.prev.pt"
SIDECAR_SUFFIX = ".sha256"


def checkpoint_stream_version(model: torch.nn.Module) -> int:
    """The ``noise_stream`` entry of a checkpoint of ``model``: the stream version its noisy layers were
    keyed with by :func:`nft_cuda.convert`, else the current :data:`~nft_cuda.nn.keys.NOISE_STREAM_VERSION`."""
    return stream_version(model) or NOISE_STREAM_VERSION


class CheckpointError(ValueError):
    """No usable checkpoint to resume from, or a checkpoint that does not fit the run."""


class CheckpointWarning(UserWarning):
    """A checkpoint was unusable and the previous good one is used instead."""


@contextlib.contextmanager
def run_lock(out: Path):
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


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def error_message(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _check_checkpoint(path: Path) -> dict:
    """Verify ``path`` against its sidecar and load it weights-only; raise CheckpointError otherwise."""
    from nft_cuda.io import safe_load

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    side = sidecar_path(path)
    if side.is_file():
        try:
            expected = side.read_text().split()[0].lower()
        except (OSError, IndexError, UnicodeDecodeError):
            raise CheckpointError(f"{side} is unreadable") from None
        if sha256_file(path) != expected:
            raise CheckpointError(
                f"{path} does not match its SHA-256 sidecar ({side.name}): the file is truncated or corrupt"
            )
    else:
        warnings.warn(
            f"{path} has no SHA-256 sidecar ({side.name}); it cannot be verified, loading it anyway",
            CheckpointWarning,
            stacklevel=3,
        )
    try:
        ckpt = safe_load(str(path))
    except ValueError as exc:
        raise CheckpointError(error_message(exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an nft_cuda training checkpoint (format {CHECKPOINT_FORMAT!r})")
    missing = [
        k for k in ("config", "epoch", "model", "optimizer", "scheduler", "rng", "best", "history") if k not in ckpt
    ]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    return ckpt


def has_checkpoint(out) -> bool:
    """Whether the run folder ``out`` holds a checkpoint to resume from (current or previous)."""
    out = Path(out)
    return (out / CHECKPOINT).exists() or (out / PREV_CHECKPOINT).exists()


def check_resumable(out) -> None:
    """Raise :class:`CheckpointError` when the run folder ``out`` holds no checkpoint at all (without
    reading one: the trainer checks this before it creates or locks the folder)."""
    if not has_checkpoint(out):
        raise CheckpointError(
            f"nothing to resume in {out}: no {CHECKPOINT} (start the run without --resume, "
            "or point --out at the run folder)"
        )


def read_checkpoint(out, *, warn: bool = True) -> tuple[dict, Path]:
    """The checkpoint to resume from in the run folder ``out`` and its path.

    ``checkpoint.pt`` when it exists, matches its SHA-256 sidecar and loads weights-only; otherwise
    ``checkpoint.prev.pt`` with a :class:`CheckpointWarning` (when ``warn``). Raises
    :class:`CheckpointError` naming both files when neither is usable.
    """
    out = Path(out)
    current, prev = out / CHECKPOINT, out / PREV_CHECKPOINT
    check_resumable(out)
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
            warnings.warn(
                f"{problems[0]}; resuming from the previous good checkpoint {prev} (epoch {ckpt['epoch']}) instead",
                CheckpointWarning,
                stacklevel=2,
            )
        return ckpt, path
    raise CheckpointError(f"cannot resume from {out}: " + "; ".join(problems))


def _serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_checkpoint(out: Path, payload: dict, rotate: bool) -> None:
    """Write checkpoint.pt and its sidecar; with ``rotate`` first keep the current (good) one as
    checkpoint.prev.pt. Every step is an atomic rename, so a crash at any point leaves a consistent
    (checkpoint, sidecar) pair in checkpoint.pt or in checkpoint.prev.pt."""
    current, prev = out / CHECKPOINT, out / PREV_CHECKPOINT
    data = _serialize(payload)
    digest = sha256_hex(data)
    if rotate and current.is_file() and sidecar_path(current).is_file():
        for src, dst in ((sidecar_path(current), sidecar_path(prev)), (current, prev)):
            tmp = dst.with_name(f".tmp-{dst.name}")
            if tmp.exists():
                tmp.unlink()
            try:
                os.link(src, tmp)  # a second name for the same bytes: no copy, and src is never modified
            except OSError:
                import shutil

                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    atomic_write_bytes(current, data)
    atomic_write_bytes(sidecar_path(current), f"{digest}  {CHECKPOINT}\n".encode())
