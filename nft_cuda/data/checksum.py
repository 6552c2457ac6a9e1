"""SHA-256 checks of dataset files, with a small verification cache ("stamp") next to the data.

The published hashes (``reference/datasets.md``) are of the *decompressed* IDX bytes, because Debian
re-gzips Fashion-MNIST and so its ``.gz`` files differ from upstream's while the content is identical.

Hashing 47 MB costs ~0.1 s, a gunzip more, so after a successful check we write
``.nft_cuda_verified.json`` in the file's folder, recording for each file name its size, its
modification time (ns) and the hash it was verified against. A later load skips the hash when all
three still match. This is a cache, not a security boundary: a file rewritten with the same size and
mtime would not be re-hashed; ``verify_dataset(..., use_cache=False)`` (or deleting the stamp) always
re-hashes. Unwritable folders (e.g. ``/usr/share/datasets``) simply get no stamp.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from nft_cuda._files import atomic_write_bytes, sha256_hex
from nft_cuda.data.errors import ChecksumError

__all__ = ["STAMP_NAME", "sha256_hex", "check_sha256", "stamp_valid", "write_stamp", "atomic_write_bytes"]

STAMP_NAME = ".nft_cuda_verified.json"
_STAMP_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


def check_sha256(data, expected: str, *, name: str, hint: str = "") -> str:
    """Hash ``data`` and raise :class:`ChecksumError` naming ``name`` unless it equals ``expected``."""
    got = sha256_hex(data)
    if got != expected.lower():
        extra = f" {hint}" if hint else ""
        raise ChecksumError(
            f"{name}: SHA-256 mismatch of the decompressed content: expected {expected}, got {got}. "
            f"The file is corrupt, truncated or not the official release.{extra}"
        )
    return got


def _stamp_path(path: Path) -> Path:
    return path.parent / STAMP_NAME


def _read_stamp(stamp: Path) -> dict:
    try:
        with open(stamp, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != _STAMP_VERSION or not isinstance(doc.get("files"), dict):
        return {}
    return doc["files"]


def stamp_valid(path: PathLike, expected_sha256: str) -> bool:
    """True when the stamp says ``path`` (same size and mtime) was verified against ``expected_sha256``."""
    path = Path(path)
    entry = _read_stamp(_stamp_path(path)).get(path.name)
    if not isinstance(entry, dict):
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return (
        entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and entry.get("sha256") == expected_sha256.lower()
    )


def write_stamp(path: PathLike, sha256: str) -> bool:
    """Record that ``path`` was verified against ``sha256``. Returns False (silently) if it cannot be written."""
    path = Path(path)
    stamp = _stamp_path(path)
    try:
        st = path.stat()
        files = _read_stamp(stamp)
        files[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256.lower()}
        doc = {"version": _STAMP_VERSION, "files": dict(sorted(files.items()))}
        atomic_write_bytes(stamp, (json.dumps(doc, indent=1) + "\n").encode())
        return True
    except OSError:
        return False
