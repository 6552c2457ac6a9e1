#!/usr/bin/env python
"""Regenerate nft_cuda/data/embedded/fashion_mnist_slice.npz from the official Fashion-MNIST files.

    .venv/bin/python tools/make_embedded_dataset.py [--data-dir DIR] [--train-per-class 600]
                                                    [--test-per-class 100] [--out PATH]

Selection (deterministic, no randomness): the first ``train-per-class`` images of each class in the
official training file and the first ``test-per-class`` of each class in the official test file, kept
in file order. The source files are verified by the SHA-256 of their decompressed bytes first.

The .npz holds uint8 arrays ``x_train [N, 28, 28]``, ``y_train [N]``, ``x_test``, ``y_test`` and the
int32 positions ``train_index`` / ``test_index`` of the selected images in the official files. It is
written byte-reproducibly (fixed zip timestamps, sorted entries, deflate level 9), so rerunning the
script with the same numpy/zlib gives the same SHA-256. Afterwards, update EMBEDDED_SHA256 in
nft_cuda/data/datasets.py and the hash in nft_cuda/data/embedded/LICENSE (the script prints it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nft_cuda.data.datasets import load_arrays  # noqa: E402


def first_per_class(labels: np.ndarray, k: int, num_classes: int = 10) -> np.ndarray:
    """Positions of the first ``k`` samples of each class, in file order."""
    picks = []
    for c in range(num_classes):
        pos = np.flatnonzero(labels == c)[:k]
        if pos.size < k:
            raise SystemExit(f"class {c} has only {pos.size} samples, need {k}")
        picks.append(pos)
    return np.sort(np.concatenate(picks))


def write_npz_reproducible(path: Path, arrays: dict) -> bytes:
    """An .npz (readable by np.load) whose bytes depend only on the arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(arrays):
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy.getvalue(), compresslevel=9)
    blob = buf.getvalue()
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    return blob


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data-dir",
        default=str(ROOT / "data"),
        help="folder holding fashion-mnist/ (default: ./data of the repository)",
    )
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "nft_cuda" / "data" / "embedded" / "fashion_mnist_slice.npz"))
    args = ap.parse_args()

    arrays = {}
    for split, k in (("train", args.train_per_class), ("test", args.test_per_class)):
        x, y = load_arrays("fashion-mnist", args.data_dir, split, verify=True, use_cache=False)
        pos = first_per_class(y, k)
        arrays[f"x_{split}"] = x[pos, 0].astype(np.uint8)
        arrays[f"y_{split}"] = y[pos].astype(np.uint8)
        arrays[f"{split}_index"] = pos.astype(np.int32)
        print(f"{split}: {pos.size} images, per class {np.bincount(y[pos], minlength=10).tolist()}")

    out = Path(args.out)
    blob = write_npz_reproducible(out, arrays)
    print(f"wrote {out} ({len(blob):,} bytes)")
    print(f"SHA-256 {hashlib.sha256(blob).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
