"""Dataset layer: IDX / CIFAR readers, checksums, the embedded slice, splits, loaders and fetching.

Real-data tests use ``$NFT_DATA_DIR`` if set, else ``./data`` of the repository (``tools/fetch_data.sh``
fills it). They skip when the files are absent, unless ``NFT_REQUIRE_REAL_DATA=1`` (set by CI after
fetching), in which case missing files are a failure.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nft_cuda.data import datasets as D
from nft_cuda.data import fetch as F
from nft_cuda.data.checksum import STAMP_NAME, atomic_write_bytes, stamp_valid
from nft_cuda.data.cifar import read_cifar_binary, write_cifar_binary
from nft_cuda.data.errors import (
    ChecksumError,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    UnknownDatasetError,
)
from nft_cuda.data.idx import parse_idx, read_idx, read_idx_pair, write_idx

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(1234)


def _imgs(n=5, h=28, w=28):
    return RNG.integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _labels(n=5, k=10):
    return RNG.integers(0, k, size=(n,), dtype=np.uint8)


def _idx_bytes(shape, code=0x08, payload=None):
    hdr = bytes([0, 0, code, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()
    n = int(np.prod(shape)) if shape else 0
    return hdr + (bytes(n) if payload is None else payload)


def _write_mnist_like(folder: Path, n_train=7, n_test=3, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if compress else ""
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = _imgs(n), _labels(n)
        write_idx(folder / f"{split}-images-idx3-ubyte{sfx}", x, compress=compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", y, compress=compress)
        data[split] = (x, y)
    return data


def _sha_of_idx(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------------------------
# IDX reader
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip_raw_and_gz(tmp_path, compress):
    x, y = _imgs(6, 28, 20), _labels(6)
    sfx = ".gz" if compress else ""
    write_idx(tmp_path / f"img{sfx}", x, compress=compress)
    write_idx(tmp_path / f"lab{sfx}", y, compress=compress)
    xi, yi = read_idx_pair(tmp_path / f"img{sfx}", tmp_path / f"lab{sfx}")
    assert xi.dtype == np.uint8 and xi.shape == (6, 28, 20) and np.array_equal(xi, x)
    assert yi.shape == (6,) and np.array_equal(yi, y)
    assert xi.flags.writeable


def test_idx_compression_detected_by_magic_not_suffix(tmp_path):
    x = _imgs(3)
    write_idx(tmp_path / "gz_without_suffix", x, compress=True)
    write_idx(tmp_path / "raw_with_suffix.gz", x, compress=False)
    assert np.array_equal(read_idx(tmp_path / "gz_without_suffix"), x)
    assert np.array_equal(read_idx(tmp_path / "raw_with_suffix.gz"), x)


def test_idx_empty_image_file_ok(tmp_path):
    write_idx(tmp_path / "e", np.zeros((0, 28, 28), np.uint8))
    assert read_idx(tmp_path / "e").shape == (0, 28, 28)


@pytest.mark.parametrize(
    "blob, pattern",
    [
        (b"\x00\x00", r"shorter than the 4-byte IDX header"),
        (b"\x01\x00\x08\x03" + bytes(12), r"bad magic 01 00 08 03"),
        (b"\x00\x07\x08\x01" + bytes(4), r"bad magic"),
        (_idx_bytes((2, 2, 2), code=0x0D, payload=bytes(32)), r"dtype code 0x0d \(float\)"),
        (_idx_bytes((2, 4)), r"2 dimension\(s\); expected 1 or 3"),
        (b"\x00\x00\x08\x03" + bytes(8), r"truncated IDX header"),
        (_idx_bytes((3, 4, 4), payload=bytes(47)), r"truncated IDX data.*3x4x4 = 48 bytes.*holds 47 \(1 missing\)"),
        (_idx_bytes((3, 4, 4), payload=bytes(50)), r"2 extra byte\(s\) after the IDX data"),
        (_idx_bytes((3, 0, 4)), r"zero item size"),
    ],
)
def test_idx_malformed_files_name_the_file(tmp_path, blob, pattern):
    p = tmp_path / "bad-images-idx3-ubyte"
    p.write_bytes(blob)
    with pytest.raises(DatasetFormatError, match=pattern) as ei:
        read_idx(p)
    assert str(p) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_idx_gzip_bytes_not_decompressed_hint():
    with pytest.raises(DatasetFormatError, match="gzip data that was not decompressed"):
        parse_idx(gzip.compress(_idx_bytes((1,), payload=b"\x01")), name="x")


def test_idx_corrupt_gzip(tmp_path):
    p = tmp_path / "t.gz"
    write_idx(p, _imgs(20), compress=True)
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(DatasetFormatError, match=r"corrupt gzip stream") as ei:
        read_idx(p)
    assert str(p) in str(ei.value)


def test_idx_ndim_restriction(tmp_path):
    write_idx(tmp_path / "lab", _labels(4))
    with pytest.raises(DatasetFormatError, match="expected 3"):
        read_idx(tmp_path / "lab", ndim=3)


def test_idx_pair_count_mismatch_names_both_files(tmp_path):
    write_idx(tmp_path / "img", _imgs(5))
    write_idx(tmp_path / "lab", _labels(4))
    with pytest.raises(DatasetFormatError, match=r"holds 4 labels but .* holds 5 images") as ei:
        read_idx_pair(tmp_path / "img", tmp_path / "lab")
    assert str(tmp_path / "img") in str(ei.value) and str(tmp_path / "lab") in str(ei.value)


def test_idx_pair_labels_out_of_range(tmp_path):
    y = np.array([0, 9, 10, 3, 200], np.uint8)
    write_idx(tmp_path / "img", _imgs(5))
    write_idx(tmp_path / "lab", y)
    with pytest.raises(DatasetFormatError, match=r"label 10 at index 2 is out of range 0..9 \(2 bad"):
        read_idx_pair(tmp_path / "img", tmp_path / "lab")


def test_idx_pair_wrong_rank(tmp_path):
    write_idx(tmp_path / "img", _imgs(5))
    write_idx(tmp_path / "lab", _labels(5))
    with pytest.raises(DatasetFormatError, match="expected 3"):
        read_idx_pair(tmp_path / "lab", tmp_path / "img")


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# Registry, folders, missing files
# ----------------------------------------------------------------------------------------------


def test_registry_and_aliases():
    assert D.available_datasets() == ["mnist", "fashion-mnist", "cifar10", "cifar100", "embedded"]
    for alias, name in [
        ("MNIST", "mnist"),
        ("Fashion_MNIST", "fashion-mnist"),
        ("fmnist", "fashion-mnist"),
        ("CIFAR-10", "cifar10"),
        ("cifar_100", "cifar100"),
    ]:
        assert D.canonical_name(alias) == name
    with pytest.raises(UnknownDatasetError, match="known datasets: mnist, fashion-mnist"):
        D.get_spec("imagenet")
    assert len(D.get_spec("cifar100").classes) == 100


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NFT_DATA_DIR", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    assert D.resolve_data_dir("~/x") == Path("~/x").expanduser()
    monkeypatch.delenv("NFT_DATA_DIR")
    assert D.default_data_dir() == Path.home() / ".cache" / "nft_cuda" / "data"


def test_bad_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        D.load_dataset("embedded", split="val")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_missing_idx_dataset_says_how_to_fetch(tmp_path, monkeypatch, name):
    monkeypatch.setitem(D.DATASETS, name, dataclasses.replace(D.DATASETS[name], system_dirs=()))
    with pytest.raises(DatasetNotFoundError) as ei:
        D.load_dataset(name, tmp_path, "test")
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, DatasetError)
    assert str(tmp_path / name / "t10k-images-idx3-ubyte") in msg
    assert f"nft data fetch {name}" in msg and "--data-dir" in msg


def test_missing_one_file_is_named(tmp_path):
    _write_mnist_like(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing \S+t10k-labels-idx1-ubyte \(raw or .gz\)"):
        D.load_dataset("mnist", tmp_path, "test", verify=False)


def test_data_dir_from_env(tmp_path, monkeypatch):
    _write_mnist_like(tmp_path / "mnist")
    monkeypatch.setenv("NFT_DATA_DIR", str(tmp_path))
    x, y = D.load_dataset("mnist", split="test", verify=False)
    assert x.shape == (3, 1, 32, 32)


def test_torchvision_layout_is_found(tmp_path):
    _write_mnist_like(tmp_path / "MNIST" / "raw", compress=True)
    x, _ = D.load_dataset("mnist", tmp_path, "train", verify=False)
    assert x.shape == (7, 1, 32, 32)


# ----------------------------------------------------------------------------------------------
# Loading IDX datasets, checksums and the verification stamp
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_checksum_mismatch_detected(tmp_path, compress):
    _write_mnist_like(tmp_path / "mnist", compress=compress)
    with pytest.raises(ChecksumError, match=r"SHA-256 mismatch.*expected ba891046") as ei:
        D.load_dataset("mnist", tmp_path, "train")
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte") in str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert not (tmp_path / "mnist" / STAMP_NAME).exists()


def test_verify_false_loads_pads_and_normalises(tmp_path):
    data = _write_mnist_like(tmp_path / "mnist", compress=True)
    x, y = D.load_dataset("mnist", tmp_path, "train", verify=False)
    raw, lab = data["train"]
    assert x.dtype == torch.float32 and x.shape == (7, 1, 32, 32)
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(lab.astype(np.int64)))
    m, s = 0.1307, 0.3081
    expect = (torch.from_numpy(raw).double() / 255 - m) / s
    torch.testing.assert_close(x[:, 0, 2:30, 2:30].double(), expect, rtol=0, atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.allclose(x[:, 0][:, border], torch.tensor(-m / s, dtype=torch.float32))
    x01, _ = D.load_dataset("mnist", tmp_path, "train", verify=False, normalize=False)
    assert float(x01.min()) >= 0 and float(x01.max()) <= 1


def test_raw_preferred_over_gz(tmp_path):
    _write_mnist_like(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    x, _ = D.load_dataset("mnist", tmp_path, "test", verify=False)
    assert x.shape[0] == 3


def test_verification_stamp(tmp_path, monkeypatch):
    data_dir = tmp_path
    _write_mnist_like(data_dir / "mnist")
    folder = data_dir / "mnist"
    spec = D.DATASETS["mnist"]
    for p in folder.iterdir():
        monkeypatch.setitem(spec.sha256, p.name, _sha_of_idx(p))
    D.load_dataset("mnist", data_dir, "test")
    stamp = folder / STAMP_NAME
    assert stamp.exists()
    img = folder / "t10k-images-idx3-ubyte"
    assert stamp_valid(img, spec.sha256[img.name])
    assert not stamp_valid(img, "0" * 64)  # a stamp vouches only for the hash it was made with

    calls = []
    real = D.check_sha256
    monkeypatch.setattr(D, "check_sha256", lambda *a, **k: calls.append(k["name"]) or real(*a, **k))
    D.load_dataset("mnist", data_dir, "test")
    assert calls == []  # cached: no re-hash
    os.utime(img, ns=(1, 1))  # same content, different mtime: must re-hash
    D.load_dataset("mnist", data_dir, "test")
    assert calls == [str(img)]
    # content changed behind the stamp's back (new mtime): detected
    raw = bytearray(img.read_bytes())
    raw[-1] ^= 0xFF
    img.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError):
        D.load_dataset("mnist", data_dir, "test")
    # verify_dataset re-hashes by default even with a valid stamp
    with pytest.raises(ChecksumError):
        D.verify_dataset("mnist", data_dir, splits=["test"])


def test_stamp_in_readonly_folder_is_skipped(tmp_path, monkeypatch):
    _write_mnist_like(tmp_path / "mnist")
    spec = D.DATASETS["mnist"]
    for p in (tmp_path / "mnist").iterdir():
        monkeypatch.setitem(spec.sha256, p.name, _sha_of_idx(p))
    monkeypatch.setattr(
        "nft_cuda.data.checksum.atomic_write_bytes", lambda *a, **k: (_ for _ in ()).throw(PermissionError("read-only"))
    )
    x, _ = D.load_dataset("mnist", tmp_path, "test")
    assert x.shape[0] == 3 and not (tmp_path / "mnist" / STAMP_NAME).exists()


def test_atomic_write_leaves_no_temp_on_error(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "f", object())
    assert list(tmp_path.iterdir()) == []
    atomic_write_bytes(tmp_path / "f", b"abc")
    assert (tmp_path / "f").read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["f"]


# ----------------------------------------------------------------------------------------------
# CIFAR binary
# ----------------------------------------------------------------------------------------------


def _cifar_records(n, label_ranges):
    imgs = RNG.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labs = np.stack([RNG.integers(0, k, size=n) for k in label_ranges], axis=1).astype(np.uint8)
    return imgs, labs


def test_cifar_reader_layout(tmp_path):
    imgs, labs = _cifar_records(4, (10,))
    p = tmp_path / "b.bin"
    write_cifar_binary(p, imgs, labs)
    assert p.stat().st_size == 4 * 3073
    raw = p.read_bytes()
    # record 1, green plane (offset 1024), row 3, column 5
    assert raw[3073 + 1 + 1024 + 3 * 32 + 5] == imgs[1, 1, 3, 5]
    x, y = read_cifar_binary(p)
    assert x.shape == (4, 3, 32, 32) and np.array_equal(x, imgs) and np.array_equal(y, labs[:, 0])
    x, y = read_cifar_binary(p, records=4)
    with pytest.raises(DatasetFormatError, match=r"expected 10000 records x 3073 bytes = 30730000 bytes, found 12292"):
        read_cifar_binary(p, records=10000)


def test_cifar100_fine_labels_and_ranges(tmp_path):
    imgs, labs = _cifar_records(5, (20, 100))
    p = tmp_path / "train.bin"
    write_cifar_binary(p, imgs, labs)
    x, y = read_cifar_binary(p, label_ranges=(20, 100))
    assert np.array_equal(y, labs[:, 1]) and np.array_equal(x, imgs)
    labs[2, 0] = 20  # coarse out of range
    write_cifar_binary(p, imgs, labs)
    with pytest.raises(DatasetFormatError, match=r"label byte 0 20 of record 2 is out of range 0..19"):
        read_cifar_binary(p, label_ranges=(20, 100))


@pytest.mark.parametrize("size", [0, 3072, 3073 * 2 + 1])
def test_cifar_wrong_size(tmp_path, size):
    p = tmp_path / "data_batch_1.bin"
    p.write_bytes(bytes(size))
    with pytest.raises(DatasetFormatError, match=r"not a positive multiple of the 3073-byte record") as ei:
        read_cifar_binary(p)
    assert str(p) in str(ei.value)


def test_cifar_bad_label(tmp_path):
    imgs, labs = _cifar_records(3, (10,))
    labs[1, 0] = 10
    write_cifar_binary(tmp_path / "t.bin", imgs, labs)
    with pytest.raises(DatasetFormatError, match=r"label 10 of record 1 is out of range 0..9"):
        read_cifar_binary(tmp_path / "t.bin")


def _write_cifar10(folder: Path, n: int):
    folder.mkdir(parents=True)
    out = {}
    for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        imgs, labs = _cifar_records(n, (10,))
        write_cifar_binary(folder / f, imgs, labs)
        out[f] = (imgs, labs[:, 0])
    return out


def test_cifar10_load_dataset_enforces_10000_records(tmp_path):
    _write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-bin", 2)
    with pytest.raises(DatasetFormatError, match=r"test_batch.bin: wrong size.*expected 10000 records"):
        D.load_dataset("cifar10", tmp_path, "test")


def test_cifar10_load_dataset_small(tmp_path, monkeypatch):
    spec = D.DATASETS["cifar10"]
    for f in spec.records:
        monkeypatch.setitem(spec.records, f, 3)
    files = _write_cifar10(tmp_path / "cifar-10-batches-bin", 3)  # the bare extracted folder is found too
    x, y = D.load_dataset("cifar10", tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and y.shape == (15,) and y.dtype == torch.int64
    imgs = np.concatenate([files[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    labs = np.concatenate([files[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    assert torch.equal(y, torch.from_numpy(labs.astype(np.int64)))
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), (torch.from_numpy(imgs).double() / 255 - mean) / std, rtol=0, atol=1e-5)
    xt, yt = D.load_dataset("cifar10", tmp_path, "test")
    assert xt.shape == (3, 3, 32, 32)


def test_cifar100_load_dataset_small(tmp_path, monkeypatch):
    spec = D.DATASETS["cifar100"]
    monkeypatch.setitem(spec.records, "test.bin", 4)
    folder = tmp_path / "cifar100" / "cifar-100-binary"
    folder.mkdir(parents=True)
    imgs, labs = _cifar_records(4, (20, 100))
    write_cifar_binary(folder / "test.bin", imgs, labs)
    x, y = D.load_dataset("cifar100", tmp_path, "test")
    assert x.shape == (4, 3, 32, 32) and torch.equal(y, torch.from_numpy(labs[:, 1].astype(np.int64)))
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-binary/train.bin"):
        D.load_dataset("cifar100", tmp_path, "train")


def test_cifar_missing_says_binary_release(tmp_path):
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as ei:
        D.load_dataset("cifar10", tmp_path, "test")
    msg = str(ei.value)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin") in msg
    assert "binary" in msg and "pickled release" in msg and "cifar-10-binary.tar.gz" in msg


# ----------------------------------------------------------------------------------------------
# Embedded slice
# ----------------------------------------------------------------------------------------------


def test_embedded_loads_balanced():
    x, y = D.load_dataset("embedded", split="train")
    assert x.shape == (6000, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 600))
    xt, yt = D.load_dataset("embedded", data_dir="/nonexistent", split="test")  # data_dir is ignored
    assert xt.shape == (1000, 1, 32, 32) and torch.equal(torch.bincount(yt, minlength=10), torch.full((10,), 100))
    assert abs(float(x.mean()) + 0.19) < 0.05 and abs(float(x.std()) - 0.94) < 0.05  # fashion stats, padded
    assert D.get_spec("embedded").mean == D.get_spec("fashion-mnist").mean


def test_embedded_checksum_verified(monkeypatch):
    blob = D.EMBEDDED_FILE.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == D.EMBEDDED_SHA256
    assert D.verify_dataset("embedded") == {str(D.EMBEDDED_FILE): D.EMBEDDED_SHA256}
    assert len(blob) < 3.2e6
    notice = (D.EMBEDDED_FILE.parent / "LICENSE").read_text()
    assert D.EMBEDDED_SHA256 in notice and "Zalando SE" in notice and "MIT" in notice
    monkeypatch.setattr(D, "EMBEDDED_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match="fashion_mnist_slice.npz"):
        D.load_dataset("embedded", split="test")
    x, _ = D.load_dataset("embedded", split="test", verify=False)
    assert x.shape[0] == 1000


def test_embedded_file_has_no_pickles():
    with np.load(D.EMBEDDED_FILE, allow_pickle=False) as z:
        assert sorted(z.files) == ["test_index", "train_index", "x_test", "x_train", "y_test", "y_train"]
        assert all(z[k].dtype != object for k in z.files)


def test_no_unpickling_anywhere_in_data_package():
    src = Path(D.__file__).parent
    pattern = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|torch\.load|\bdill\b|joblib")
    for f in sorted(src.glob("*.py")):
        for line in f.read_text().splitlines():
            if pattern.search(line):
                assert (
                    "never" in line.lower()
                    or "allow_pickle=False" in line
                    or line.lstrip().startswith("#")
                    or "pickled" in line.lower()
                ), f"{f.name}: {line}"


# ----------------------------------------------------------------------------------------------
# Validation split and loaders
# ----------------------------------------------------------------------------------------------


def test_train_val_split_deterministic_disjoint():
    tr, va = D.train_val_split(1000, 0.1, seed=3)
    tr2, va2 = D.train_val_split(1000, 0.1, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert tr.dtype == va.dtype == torch.int64 and va.numel() == 100 and tr.numel() == 900
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(1000))
    assert torch.all(tr[1:] > tr[:-1]) and torch.all(va[1:] > va[:-1])
    _, va3 = D.train_val_split(1000, 0.1, seed=4)
    assert not torch.equal(va, va3)


def test_train_val_split_edges_and_errors():
    assert D.train_val_split(10, 0.0)[1].numel() == 0
    assert D.train_val_split(10, 0.01)[1].numel() == 1  # at least one when val_fraction > 0
    assert D.train_val_split(2, 0.9)[1].numel() == 1  # at most n-1
    tr, va = D.train_val_split(0, 0.5)
    assert tr.numel() == va.numel() == 0
    for bad in (-0.1, 1.0, 2, "0.1", True):
        with pytest.raises(ValueError, match="val_fraction"):
            D.train_val_split(10, bad)
    with pytest.raises(ValueError, match="n must be"):
        D.train_val_split(-1)
    with pytest.raises(ValueError, match="seed"):
        D.train_val_split(10, 0.1, seed=1.5)


def test_train_val_split_stratified():
    labels = torch.arange(10).repeat_interleave(50)
    tr, va = D.train_val_split(500, 0.2, seed=0, labels=labels)
    assert torch.equal(torch.bincount(labels[va], minlength=10), torch.full((10,), 10))
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and tr.numel() + va.numel() == 500
    with pytest.raises(ValueError, match="labels has 3 entries"):
        D.train_val_split(4, 0.5, labels=[0, 1, 2])


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_make_loaders_embedded_reproducible():
    tr, va, te = D.make_loaders("embedded", batch_size=256, val_fraction=0.1, seed=7)
    assert (len(tr.dataset), len(va.dataset), len(te.dataset)) == (5400, 600, 1000)
    assert torch.equal(torch.bincount(va.dataset.labels, minlength=10), torch.full((10,), 60))
    b1 = _batches(tr)
    tr2, _, _ = D.make_loaders("embedded", batch_size=256, val_fraction=0.1, seed=7)
    b2 = _batches(tr2)
    assert len(b1) == len(b2) == 22
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(b1, b2))
    b1_epoch2 = _batches(tr)  # a new epoch reshuffles, reproducibly
    assert not torch.equal(b1[0][1], b1_epoch2[0][1])
    assert torch.equal(b1_epoch2[0][1], _batches(tr2)[0][1])
    tr3, _, _ = D.make_loaders("embedded", batch_size=256, val_fraction=0.1, seed=8)
    assert not torch.equal(b1[0][1], next(iter(tr3))[1])
    # validation and training come from the training split, disjointly; the test loader is the test split
    xt, yt = D.load_dataset("embedded", split="test")
    got = torch.cat([y for _, y in te])
    assert torch.equal(got, yt)
    xb, yb = next(iter(te))
    assert xb.shape == (256, 1, 32, 32) and torch.equal(xb, xt[:256])


def test_make_loaders_no_val_and_errors():
    tr, va, te = D.make_loaders("embedded", batch_size=1000, val_fraction=0.0, drop_last=True, eval_batch_size=500)
    assert va is None and len(tr.dataset) == 6000 and len(tr) == 6 and len(te) == 2
    with pytest.raises(ValueError, match="batch_size"):
        D.make_loaders("embedded", batch_size=0)


def test_tensor_pair_dataset():
    ds = D.TensorPairDataset(torch.arange(10).view(10, 1).float(), torch.arange(10))
    assert len(ds) == 10 and ds[3][1] == 3
    x, y = ds.__getitems__([4, 1])
    assert y.tolist() == [4, 1]
    with pytest.raises(ValueError, match="differ in length"):
        D.TensorPairDataset(torch.zeros(3, 1), torch.zeros(2))


# ----------------------------------------------------------------------------------------------
# fetch (offline: file:// mirrors and installed copies only)
# ----------------------------------------------------------------------------------------------


def test_fetch_rejects_bad_mirror_and_writes_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    _write_mnist_like(mirror, compress=True)
    with pytest.raises(F.FetchError, match=r"could not fetch mnist.*SHA-256 mismatch"):
        F.fetch("mnist", tmp_path / "data", quiet=True, sources=("url",), mirrors=[mirror.as_uri()])
    assert list((tmp_path / "data" / "mnist").iterdir()) == []


def test_fetch_unreachable_and_offline(tmp_path):
    with pytest.raises(F.FetchError, match="unreachable"):
        F.fetch("mnist", tmp_path, quiet=True, sources=("url",), mirrors=[(tmp_path / "none").as_uri()])
    with pytest.raises(F.FetchError, match="offline mode"):
        F.fetch("mnist", tmp_path, quiet=True, sources=("url",), offline=True)


def test_fetch_cannot_fetch_cifar_or_unknown(tmp_path):
    with pytest.raises(DatasetError, match="binary release"):
        F.fetch("cifar10", tmp_path, quiet=True)
    with pytest.raises(UnknownDatasetError):
        F.fetch("svhn", tmp_path, quiet=True)
    assert F.main(["svhn", "--data-dir", str(tmp_path), "--quiet"]) == 1


# ----------------------------------------------------------------------------------------------
# Real MNIST / Fashion-MNIST (must not skip silently in CI)
# ----------------------------------------------------------------------------------------------

KNOWN = {
    "mnist": {
        "train": ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]),
        "test": ([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),
    },
    "fashion-mnist": {
        "train": ([6000] * 10, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]),
        "test": ([1000] * 10, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
    },
}


def _real_data_dir(name: str) -> Path:
    env = os.environ.get("NFT_DATA_DIR", "").strip()
    root = Path(env) if env else REPO / "data"
    try:
        for split in ("train", "test"):
            D.find_files(name, root, split)
    except DatasetNotFoundError as e:
        if os.environ.get("NFT_REQUIRE_REAL_DATA", "").strip().lower() in ("1", "true", "yes", "on"):
            pytest.fail(f"NFT_REQUIRE_REAL_DATA is set but the real {name} files are missing: {e}")
        pytest.skip(
            f"real {name} not present in {root} (run tools/fetch_data.sh; set NFT_REQUIRE_REAL_DATA=1 "
            f"to make this a failure)"
        )
    return root


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_dataset(name):
    root = _real_data_dir(name)
    hashes = D.verify_dataset(name, root)  # full re-hash, no stamp
    spec = D.get_spec(name)
    assert sorted(hashes.values()) == sorted(spec.sha256.values())
    for split in ("train", "test"):
        x, y = D.load_dataset(name, root, split)
        counts, first = KNOWN[name][split]
        assert x.shape == (spec.split_sizes[split], 1, 32, 32) and x.dtype == torch.float32
        assert torch.bincount(y, minlength=10).tolist() == counts and y[:10].tolist() == first
        if split == "train":  # normalised with the dataset's own 28x28 statistics
            inner = x[:, 0, 2:30, 2:30]
            assert abs(float(inner.mean())) < 2e-3 and abs(float(inner.std()) - 1) < 2e-3


def test_embedded_is_an_exact_slice_of_the_official_files():
    root = _real_data_dir("fashion-mnist")
    with np.load(D.EMBEDDED_FILE, allow_pickle=False) as z:
        emb = {k: z[k] for k in z.files}
    for split in ("train", "test"):
        x, y = D.load_arrays("fashion-mnist", root, split)
        pos = emb[f"{split}_index"]
        assert np.array_equal(emb[f"x_{split}"], x[pos, 0]) and np.array_equal(emb[f"y_{split}"], y[pos])
        k = 600 if split == "train" else 100  # the first k of each class, in file order
        expect = np.sort(np.concatenate([np.flatnonzero(y == c)[:k] for c in range(10)]))
        assert np.array_equal(pos, expect)


def test_fetch_from_file_mirror_and_system_copy(tmp_path, monkeypatch):
    root = _real_data_dir("fashion-mnist")
    src = Path(D.find_files("fashion-mnist", root, "train")[0]).parent
    if not all((src / (b + ".gz")).is_file() for b in D.get_spec("fashion-mnist").sha256):
        pytest.skip("the real Fashion-MNIST copy is not gzipped; the mirror test needs .gz files")
    dest = F.fetch("fashion-mnist", tmp_path / "a", quiet=True, sources=("url",), mirrors=[src.as_uri()])
    assert dest == tmp_path / "a" / "fashion-mnist"
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [STAMP_NAME] + [b + ".gz" for b in D.get_spec("fashion-mnist").sha256]
    )
    # present and valid: nothing to do, no source consulted
    F.fetch("fashion-mnist", tmp_path / "a", quiet=True, sources=())
    # a corrupt file is replaced; a stale raw twin of a refetched .gz is removed
    bad = dest / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    twin = dest / "t10k-labels-idx1-ubyte"
    twin.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")  # valid IDX, wrong content: the loader would prefer it
    (dest / STAMP_NAME).unlink()
    spec = dataclasses.replace(D.DATASETS["fashion-mnist"], system_dirs=(str(src),))
    monkeypatch.setitem(D.DATASETS, "fashion-mnist", spec)
    F.fetch("fashion-mnist", tmp_path / "a", quiet=True, sources=("system",))
    assert not twin.exists() and bad.is_file()
    x, y = D.load_dataset("fashion-mnist", tmp_path / "a", "test")
    assert x.shape[0] == 10000 and torch.equal(y, D.load_dataset("fashion-mnist", root, "test").labels)


def test_split_loaders_is_the_one_builder_of_make_loaders_and_the_trainer(monkeypatch, tmp_path):
    """make_loaders and the trainer both batch through split_loaders; its run options (limits, a rank's
    shard) and its loaders leave torch's global RNG alone."""
    full = D.split_loaders("embedded", batch_size=500, val_fraction=0.1, seed=3)
    made = D.make_loaders("embedded", batch_size=500, val_fraction=0.1, seed=3)
    for a, b in zip(made.val, full.val):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert [torch.equal(a[1], b[1]) for a, b in zip(made.train, full.train)] == [True] * len(full.train)
    s = D.split_loaders("embedded", batch_size=100, val_fraction=0.1, seed=3, limit_train=250, limit_eval=40)
    assert s.sizes == {"train": 250, "val": 40, "test": 40} and len(s.train.dataset) == 250
    assert s.example.shape == (2, *s.input_shape) and torch.equal(s.example, full.example)
    state = torch.get_rng_state()
    for loader in (s.val, s.test):
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)
    shard = D.split_loaders("embedded", batch_size=50, val_fraction=0.1, limit_train=250, shard=(1, 2))
    assert len(shard.train.sampler) == 125
    with pytest.raises(ValueError, match="fewer than the 300 ranks"):
        D.split_loaders("embedded", batch_size=50, limit_train=250, shard=(0, 300))

    import nft_cuda.data
    from nft_cuda.train.trainer import TrainConfig, train

    calls = []
    real = nft_cuda.data.split_loaders
    monkeypatch.setattr(nft_cuda.data, "split_loaders", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    config = TrainConfig(epochs=1, limit_train=64, limit_eval=32, batch_size=32, device="cpu", out=str(tmp_path / "r"))
    result = train(config, progress=False, log=None)
    assert len(calls) == 1 and calls[0]["limit_train"] == 64 and result["sizes"] == {"train": 64, "val": 32, "test": 32}
