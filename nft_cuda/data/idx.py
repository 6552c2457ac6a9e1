"""Strict reader for IDX files (the MNIST / Fashion-MNIST container format), raw or gzip-compressed.

IDX layout: two zero bytes, a dtype code, the number of dimensions ``ndim``, then ``ndim`` big-endian
uint32 sizes, then the data in C order. Only the unsigned-byte dtype (code ``0x08``) is accepted, with
``ndim`` 1 (labels) or 3 (images). Compression is detected from the gzip magic bytes ``1f 8b`` (the
``.gz`` suffix is only a hint), so a decompressed file that kept its ``.gz`` name still loads.

Every check raises :class:`~nft_cuda.data.errors.DatasetFormatError` naming the file: bad magic,
unsupported dtype or rank, truncated header, header sizes that disagree with the payload size (short
or extra bytes), corrupt gzip streams, and, for image/label pairs, mismatched counts and labels out of
range. Nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np

from nft_cuda.data.errors import DatasetFormatError

__all__ = [
    "read_idx",
    "read_idx_pair",
    "parse_idx",
    "read_decompressed",
    "check_labels",
    "check_pair",
    "is_gzip",
    "write_idx",
]

PathLike = Union[str, "os.PathLike[str]"]

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08
_DTYPE_NAMES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float", 0x0E: "double"}


def is_gzip(path: PathLike) -> bool:
    """True when the file starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def read_decompressed(path: PathLike) -> bytearray:
    """The file's bytes, gunzipped when it is a gzip file (detected by magic bytes).

    Raises :class:`DatasetFormatError` naming the file for a corrupt or truncated gzip stream.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == _GZIP_MAGIC:
            try:
                with gzip.GzipFile(fileobj=f, mode="rb") as g:
                    return bytearray(g.read())
            except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
                raise DatasetFormatError(f"{path}: corrupt gzip stream ({type(e).__name__}: {e})") from e
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        n = f.readinto(buf)
        if n != size:
            raise DatasetFormatError(f"{path}: short read ({n} of {size} bytes)")
        return buf


def parse_idx(
    data: bytes | bytearray | memoryview, *, name: str = "<bytes>", ndim: int | Sequence[int] | None = None
) -> np.ndarray:
    """Parse decompressed IDX bytes into a uint8 array (a view of ``data``: writable iff ``data`` is).

    ``ndim`` restricts the accepted rank (default: 1 or 3). ``name`` is used in error messages.
    """
    allowed = (1, 3) if ndim is None else ((ndim,) if isinstance(ndim, int) else tuple(ndim))
    mv = memoryview(data)
    n = len(mv)
    if n < 4:
        raise DatasetFormatError(f"{name}: not an IDX file: {n} bytes, shorter than the 4-byte IDX header")
    b0, b1, code, rank = mv[0], mv[1], mv[2], mv[3]
    if b0 != 0 or b1 != 0:
        hint = " (looks like gzip data that was not decompressed)" if bytes(mv[:2]) == _GZIP_MAGIC else ""
        raise DatasetFormatError(
            f"{name}: not an IDX file: bad magic {bytes(mv[:4]).hex(' ')}; the first two bytes must be 00 00{hint}"
        )
    if code != _UBYTE:
        what = _DTYPE_NAMES.get(code, "unknown")
        raise DatasetFormatError(
            f"{name}: unsupported IDX dtype code 0x{code:02x} ({what}); only 0x08 (unsigned byte) is supported"
        )
    if rank not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise DatasetFormatError(f"{name}: IDX file has {rank} dimension(s); expected {want}")
    header = 4 + 4 * rank
    if n < header:
        raise DatasetFormatError(
            f"{name}: truncated IDX header: {rank} dimension(s) need {header} header bytes, the file has {n}"
        )
    dims = tuple(int(d) for d in np.frombuffer(mv, dtype=">u4", count=rank, offset=4))
    if rank > 1 and any(d == 0 for d in dims[1:]):
        raise DatasetFormatError(f"{name}: IDX header has a zero item size {dims}")
    expected = int(np.prod(dims, dtype=np.int64)) if rank else 0
    actual = n - header
    shape = "x".join(str(d) for d in dims)
    if actual < expected:
        raise DatasetFormatError(
            f"{name}: truncated IDX data: the header says {shape} = {expected} bytes, "
            f"the file holds {actual} ({expected - actual} missing)"
        )
    if actual > expected:
        raise DatasetFormatError(
            f"{name}: {actual - expected} extra byte(s) after the IDX data: the header says {shape} = "
            f"{expected} bytes, the file holds {actual}"
        )
    return np.frombuffer(mv, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def read_idx(path: PathLike, *, ndim: int | Sequence[int] | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) as a writable uint8 numpy array of the header's shape.

    ``ndim`` restricts the accepted rank (default 1 or 3). Raises :class:`DatasetFormatError` naming the
    file for any malformation, :class:`FileNotFoundError` when it is missing.
    """
    return parse_idx(read_decompressed(path), name=os.fspath(path), ndim=ndim)


def check_labels(labels: np.ndarray, num_classes: int, *, name: str = "<labels>") -> None:
    """Raise :class:`DatasetFormatError` unless every label is in ``0 .. num_classes-1``."""
    if labels.size == 0:
        return
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise DatasetFormatError(
            f"{name}: label {int(labels.reshape(-1)[i])} at index {i} is out of range 0..{num_classes - 1} "
            f"({bad.size} bad label(s) in all)"
        )


def check_pair(
    images: np.ndarray, labels: np.ndarray, *, images_name: str, labels_name: str, num_classes: int = 10
) -> None:
    """Check an image/label pair: rank 3 images, rank 1 labels, equal counts, labels in range."""
    if images.ndim != 3:
        raise DatasetFormatError(f"{images_name}: expected a 3-dimensional image file, got shape {images.shape}")
    if labels.ndim != 1:
        raise DatasetFormatError(f"{labels_name}: expected a 1-dimensional label file, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"label count mismatch: {labels_name} holds {labels.shape[0]} labels but {images_name} holds "
            f"{images.shape[0]} images"
        )
    check_labels(labels, num_classes, name=labels_name)


def read_idx_pair(images_path: PathLike, labels_path: PathLike, *, num_classes: int = 10):
    """Read an images file (rank 3) and its labels file (rank 1) and check they agree.

    Returns ``(images uint8 [N, H, W], labels uint8 [N])``.
    """
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    check_pair(
        images, labels, images_name=os.fspath(images_path), labels_name=os.fspath(labels_path), num_classes=num_classes
    )
    return images, labels


def write_idx(path: PathLike, array: np.ndarray, *, compress: bool = False) -> None:
    """Write a uint8 array of rank 1 or 3 as an IDX file (gzip with a zero timestamp if ``compress``).

    Used by tests and by ``tools/make_embedded_dataset.py``; not atomic.
    """
    a = np.ascontiguousarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"write_idx: array must be uint8, got {a.dtype}")
    header = bytes([0, 0, _UBYTE, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    payload = header + a.tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)
