"""Exceptions raised by the dataset layer.

Every error names the file (or folder) it is about and, where the user can act, says what to do.
They subclass the matching built-in exception so that generic handlers keep working:

- :class:`DatasetNotFoundError` is a :class:`FileNotFoundError` (missing files),
- :class:`DatasetFormatError` and :class:`ChecksumError` are :class:`ValueError` (bad content),
- :class:`UnknownDatasetError` is a :class:`ValueError` (a name not in the registry).
"""

from __future__ import annotations

__all__ = ["DatasetError", "DatasetNotFoundError", "DatasetFormatError", "ChecksumError", "UnknownDatasetError"]


class DatasetError(Exception):
    """Base class of every error raised by :mod:`nft_cuda.data`."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file is missing. The message names the expected path(s) and how to get the data."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


class DatasetFormatError(DatasetError, ValueError):
    """A dataset file exists but its content is malformed (header, size, label range, ...)."""


class ChecksumError(DatasetError, ValueError):
    """A dataset file's SHA-256 does not match the published value."""


class UnknownDatasetError(DatasetError, ValueError):
    """The dataset name is not in the registry."""
