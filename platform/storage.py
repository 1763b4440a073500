"""Storage: every path is a URL resolved once through fsspec.

A local folder, ``file://``, ``memory://`` and ``s3://`` all go the same way:
``resolve(url, storage_options)`` gives an fsspec filesystem and a path on it.
Writes that readers must never see half-done go through ``write_atomic``: the
bytes land under a temporary name first, then move to the final name (a rename
on local disks, a server-side copy on S3, both all-or-nothing for readers).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from scribeline.platform.errors import StorageError

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Location:
    """A URL resolved to a filesystem and a path on it."""

    fs: fsspec.AbstractFileSystem
    path: str
    url: str

    def child(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        url = self.url.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, url)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise StorageError(f"cannot read {self.url}: {err}") from err


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve ``url`` (a folder path or any fsspec URL) to a ``Location``."""
    if not url:
        raise StorageError("an empty URL was given; pass a folder path or s3://...")
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise StorageError(
            f"cannot open {url!r}: {err}. Use a local folder, file://, memory:// "
            "or s3://bucket/prefix."
        ) from err
    return Location(fs, path.rstrip("/") or path, url)


def write_atomic(loc: Location, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that readers see all of it or nothing.

    The bytes go to ``.tmp-<name>-<random>`` in the same folder, then move to the
    final name. On any failure the temporary object is removed and a
    ``StorageError`` names the URL.
    """
    folder, name = posixpath.split(loc.path)
    tmp = posixpath.join(folder, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
    fs = loc.fs
    try:
        fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, loc.path)
    except Exception as err:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # the original error is the one to report
            logger.debug("could not remove %s after a failed write", tmp)
        raise StorageError(
            f"cannot write {loc.url}: {type(err).__name__}: {err}. Check that the "
            "location exists and is writable (bucket name, credentials, endpoint)."
        ) from err


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
