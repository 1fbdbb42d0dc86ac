"""URIs to pyarrow filesystems, listing, and atomic publish.

Every URI pyarrow understands goes through the same code path: a local path or ``file://`` by default,
``s3://``, ``gs://``, ``abfs://`` and ``hdfs://`` alike. Credentials are never part of a URI or a config:
pyarrow (and boto3 where used) read them from the standard chains on each node.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_OBJECT_STORE_TYPES = {"s3", "gcs", "abfs"}


class StorageError(RuntimeError):
    """A URI cannot be reached, listed, read or written. The message names the URI."""


@dataclass(frozen=True)
class Location:
    """A filesystem and a root path on it; ``uri`` is what the user typed (for messages)."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def from_uri(cls, uri: str) -> "Location":
        return cls(*resolve(uri), uri=uri)

    @property
    def is_object_store(self) -> bool:
        return self.fs.type_name in _OBJECT_STORE_TYPES

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def display(self, *parts: str) -> str:
        """A URI for messages: the user's URI with ``parts`` appended."""
        return posixpath.join(self.uri.rstrip("/"), *parts) if parts else self.uri

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def size(self, *parts: str) -> int:
        return self.fs.get_file_info(self.path(*parts)).size

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Publish ``data`` at ``parts`` so that no reader ever sees it half-written.

        On a local or POSIX-like filesystem the bytes go to a temporary sibling that is then renamed over
        the target (atomic within one filesystem). An object store PUT is already all-or-nothing, so the
        object is written in place.
        """
        target = self.path(*parts)
        parent = posixpath.dirname(target)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        if self.is_object_store:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, target)
        except BaseException:
            _delete_quietly(self.fs, tmp)
            raise

    def publish(self, data: bytes, *parts: str, verify=None) -> None:
        """Write ``data`` under a temporary name in ``_tmp/`` beside the target, run ``verify(fs, tmp_path)``
        on what was written, then move it to the target. A crash leaves only a temporary object, which
        :meth:`clean_tmp` removes on resume."""
        target = self.path(*parts)
        tmp_dir = posixpath.join(posixpath.dirname(target), "_tmp")
        tmp = posixpath.join(tmp_dir, f"{posixpath.basename(target)}.{uuid.uuid4().hex[:12]}")
        self.fs.create_dir(tmp_dir, recursive=True)
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            written = self.fs.get_file_info(tmp).size
            if written != len(data):
                raise StorageError(f"{self.display(*parts)}: wrote {written} bytes of {len(data)}")
            if verify is not None:
                verify(self.fs, tmp)
            self.fs.move(tmp, target)
        except BaseException:
            _delete_quietly(self.fs, tmp)
            raise

    def clean_tmp(self, *parts: str) -> int:
        """Remove temporary objects left in ``parts/_tmp/`` by a crashed attempt; returns how many."""
        leftovers = self.list(*parts, "_tmp", recursive=True)
        for info in leftovers:
            _delete_quietly(self.fs, info.path)
        return len(leftovers)

    def delete(self, *parts: str) -> None:
        _delete_quietly(self.fs, self.path(*parts))

    def delete_dir(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def list(self, *parts: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """Files directly under ``parts`` (all levels if ``recursive``), sorted by path; none if missing."""
        sel = pafs.FileSelector(self.path(*parts), recursive=recursive, allow_not_found=True)
        infos = self.fs.get_file_info(sel)
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI or local path to (filesystem, path)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid (a ValueError) for an unknown scheme
        raise StorageError(f"{uri}: cannot open this URI ({e})") from e
    return fs, path.rstrip("/") or path


def list_inputs(uri: str, pattern: str = "*") -> tuple[Location, list[pafs.FileInfo]]:
    """The input files under ``uri``: a single file, a folder (recursively, filtered by ``pattern``),
    or a glob in the last path component (``s3://b/docs/*.parquet``)."""
    glob = None
    base_uri = uri
    head, tail = posixpath.split(uri.rstrip("/"))
    if any(c in tail for c in "*?["):
        base_uri, glob = head, tail
    loc = Location.from_uri(base_uri)
    try:
        info = loc.fs.get_file_info(loc.root)
    except OSError as e:
        raise StorageError(f"{uri}: cannot list input ({e})") from e
    if info.type == pafs.FileType.File and glob is None:
        return loc, [info]
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: input not found (no such file, folder or prefix)")
    try:
        files = loc.list(recursive=True)
    except OSError as e:
        raise StorageError(f"{uri}: cannot list input ({e})") from e
    match = glob or pattern
    picked = [
        f for f in files
        if fnmatch.fnmatch(posixpath.basename(f.path), match)
        and not posixpath.basename(f.path).startswith((".", "_"))
    ]
    if not picked:
        raise StorageError(f"{uri}: no input files match {match!r}")
    return loc, picked


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
