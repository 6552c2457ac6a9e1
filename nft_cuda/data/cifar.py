"""Reader for the CIFAR-10 / CIFAR-100 *binary* release (never the pickled "python" release).

A binary file is a sequence of fixed-size records: ``label_bytes`` label bytes then 3072 pixel bytes,
the 32x32 red plane, then green, then blue, each row-major (so a record reshapes to CHW directly).

- CIFAR-10 (``cifar-10-batches-bin/``): 1 label byte (0..9); ``data_batch_1.bin`` .. ``data_batch_5.bin``
  and ``test_batch.bin`` hold 10000 records each (30,730,000 bytes).
- CIFAR-100 (``cifar-100-binary/``): 2 label bytes, coarse (0..19) then fine (0..99); ``train.bin`` holds
  50000 records, ``test.bin`` 10000 (3074 bytes each).

Files are checked by exact size and label range; errors name the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np

from nft_cuda.data.errors import DatasetFormatError

__all__ = ["PIXELS", "read_cifar_binary", "write_cifar_binary"]

PIXELS = 3 * 32 * 32

PathLike = Union[str, "os.PathLike[str]"]


def read_cifar_binary(
    path: PathLike, *, label_ranges: Sequence[int] = (10,), use_label: int = -1, records: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR binary file.

    Args:
        path: the ``.bin`` file.
        label_ranges: number of classes of each label byte, in record order: ``(10,)`` for CIFAR-10,
            ``(20, 100)`` for CIFAR-100 (coarse, fine). Its length is the number of label bytes.
        use_label: which label byte to return (default the last one: CIFAR-100's fine label).
        records: the exact number of records the file must hold; ``None`` accepts any positive
            whole number of records (for small synthetic files).

    Returns:
        ``(images uint8 [N, 3, 32, 32], labels uint8 [N])``.
    """
    name = os.fspath(path)
    nlab = len(label_ranges)
    if nlab < 1:
        raise ValueError("read_cifar_binary: label_ranges must name at least one label byte")
    if not -nlab <= use_label < nlab:
        raise ValueError(f"read_cifar_binary: use_label={use_label} is not one of the {nlab} label byte(s)")
    record = nlab + PIXELS
    size = os.path.getsize(name)
    if records is not None:
        if size != records * record:
            raise DatasetFormatError(
                f"{name}: wrong size for a CIFAR binary file: expected {records} records x {record} bytes = "
                f"{records * record} bytes, found {size} bytes"
            )
    elif size == 0 or size % record:
        raise DatasetFormatError(
            f"{name}: wrong size for a CIFAR binary file: {size} bytes is not a positive multiple of the "
            f"{record}-byte record ({nlab} label byte(s) + {PIXELS} pixel bytes)"
        )
    raw = np.fromfile(name, dtype=np.uint8)
    if raw.size != size:
        raise DatasetFormatError(f"{name}: short read ({raw.size} of {size} bytes)")
    raw = raw.reshape(-1, record)
    for j, classes in enumerate(label_ranges):
        col = raw[:, j]
        bad = np.flatnonzero(col >= classes)
        if bad.size:
            i = int(bad[0])
            which = f"label byte {j}" if nlab > 1 else "label"
            raise DatasetFormatError(
                f"{name}: {which} {int(col[i])} of record {i} is out of range 0..{classes - 1} "
                f"({bad.size} bad record(s) in all); is this the right CIFAR variant?"
            )
    labels = raw[:, range(nlab)[use_label]].copy()
    images = np.ascontiguousarray(raw[:, nlab:]).reshape(-1, 3, 32, 32)
    return images, labels


def write_cifar_binary(path: PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``images`` uint8 [N, 3, 32, 32] and ``labels`` uint8 [N, label_bytes] (or [N]) as a binary file.

    For tests and tooling; not atomic.
    """
    images = np.asarray(images, dtype=np.uint8).reshape(len(images), PIXELS)
    labels = np.asarray(labels, dtype=np.uint8).reshape(len(images), -1)
    np.concatenate([labels, images], axis=1).tofile(os.fspath(path))
