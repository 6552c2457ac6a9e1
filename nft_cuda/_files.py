"""File plumbing shared by every module that writes results: atomic writes, file hashing, JSON-safe
values and the environment stamp of a run. One rule for each, so a model file, a checkpoint, a dataset
stamp, an evaluation report and a study's record are written, hashed and stamped the same way.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit",
    "default_mode",
    "environment",
    "fsync_dir",
    "json_safe",
    "sha256_file",
    "sha256_hex",
]

PathLike = str | os.PathLike


def default_mode() -> int:
    """The permissions a plain ``open()`` gives a new file (0666 & ~umask, e.g. 0644): a temp file of
    ``tempfile.mkstemp`` is 0600, which would hide results from the other users of a shared folder."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(directory: PathLike) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every file system allows it)."""
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


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(f)`` on a temp file in the same folder (created if needed), fsync'd,
    given the default permissions and renamed over ``path``: a crash leaves the old file or the new one,
    never a torn one, and no temp file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, default_mode())
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data) -> None:
    """:func:`atomic_write` of ``data`` (bytes-like)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write` of ``text`` as UTF-8, newlines as given."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def sha256_hex(data) -> str:
    """SHA-256 (hex) of bytes-like ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, block: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, ±inf: e.g. the validation accuracy of a run without a
    validation split) as None and every dict key as a string, so ``json.dumps(allow_nan=False)`` writes
    strict JSON. Lists and tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def commit(where: PathLike | None = None, *, mark_dirty: bool = False) -> str | None:
    """The short git commit of the checkout holding ``where`` (default: this package), or None; with
    ``mark_dirty``, suffixed ``+dirty`` when tracked files differ from it (a benchmark of uncommitted code)."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, cwd=cwd
        )
        sha = out.stdout.strip() or None
        if sha and mark_dirty:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=cwd,
            )
            sha += "+dirty" if status.stdout.strip() else ""
        return sha
    except (OSError, subprocess.SubprocessError):
        return None


def environment(where: PathLike | None = None) -> dict:
    """The environment stamp of a run: Python, torch, platform, CPU count, torch threads and commit."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit(where),
    }
