"""A :class:`Location`: a filesystem, a root on it and the settings to reach it, with atomic publish."""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from reembed.errors import StorageError, VersionConflict
from reembed.storage.s3 import (Settings, _code, _s3, _s3_call, _s3_delete, _s3_delete_many, _s3_list, _s3_put,
                                _s3_uri, _split, explain)

_OBJECT_STORE_TYPES = {"s3", "gcs", "abfs"}

# S3 error codes that mean "slow down"; they are retried like any 5xx. Every other 4xx is final.


@dataclass(frozen=True)
class Location:
    """A filesystem and a root path on it; ``uri`` is what the user typed (for messages)."""

    fs: pafs.FileSystem
    root: str
    uri: str
    settings: Settings = Settings()

    @classmethod
    def from_uri(cls, uri: str, settings: Any = None) -> "Location":
        """The location of ``uri``; ``settings`` (a :class:`Settings` or the job's ``StorageConfig``) say
        where S3 is. They travel with the Location, into Ray tasks too: there is no process-wide setting."""
        settings = Settings.of(settings)
        return cls(*resolve(uri, settings), uri=uri, settings=settings)

    def child(self, *parts: str) -> "Location":
        """The location of a sub-folder, with the same filesystem and settings."""
        return Location(self.fs, self.path(*parts), self.display(*parts), self.settings)

    @property
    def is_object_store(self) -> bool:
        return self.fs.type_name in _OBJECT_STORE_TYPES

    @property
    def conditional_writes(self) -> bool:
        """Whether :meth:`read_versioned` / :meth:`write_if` are available (S3 If-Match / If-None-Match)."""
        return self.fs.type_name == "s3"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def contain(self, rel: Any) -> tuple[str | None, str]:
        """``rel``, a path read from a file (a manifest, an export summary), normalised, if it stays inside
        this location: ``(path, "")``; else ``(None, why)``. Refused: anything but a non-empty relative path,
        a URI (another bucket), an absolute or drive path, a ``..`` step, and on a local disk a symbolic link
        that leads out. The one containment rule every reader of an untrusted path uses."""
        if not isinstance(rel, str) or not rel.strip():
            return None, "points outside (it is not a path)"
        parts = rel.replace("\\", "/").split("/")
        if "://" in rel or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":") or ".." in parts:
            return None, "points outside (only paths relative to it are allowed)"
        norm = posixpath.normpath(rel)
        if self.fs.type_name == "local":
            root = os.path.realpath(self.root)
            real = os.path.realpath(os.path.join(root, norm))
            if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
                return None, f"leads outside through a symbolic link (to {real})"
        return norm, ""

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
        if self.fs.type_name == "s3":
            _s3_put(target, data, self.display(*parts), self.settings)
            return
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

    def publish(self, data: bytes, *parts: str, verify=None, exclusive: bool = False) -> None:
        """Write ``data`` at ``parts``, run ``verify(fs, path)`` on what was written, and leave nothing
        there if a check fails.

        Filesystems with rename: write under a temporary name in ``_tmp/`` beside the target, verify,
        move; a crash leaves only a temporary file, which :meth:`clean_tmp` removes on resume. S3 has no
        rename (and a copy of a large object costs as much as the write), but a PUT is atomic: the object
        goes straight to its final key, then its size and ``verify`` are checked, and it is deleted again
        if either fails. What it holds counts only once the caller records it (shards: in the manifest).
        ``exclusive`` makes the S3 PUT create-only (``If-None-Match: *``): an object already at the key,
        another job's, is never replaced; :class:`ObjectExistsError` says so.
        """
        target = self.path(*parts)
        if self.fs.type_name == "s3":
            _s3_put(target, data, self.display(*parts), self.settings, create_only=exclusive)
            try:
                written = self.fs.get_file_info(target).size
                if written != len(data):
                    raise StorageError(f"{self.display(*parts)}: stored {written} bytes of {len(data)}")
                if verify is not None:
                    verify(self.fs, target)
            except BaseException:
                _s3_delete(target, self.display(*parts), self.settings, quiet=True)
                raise
            return
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

    def read_versioned(self, *parts: str) -> tuple[bytes, str] | None:
        """The object's bytes and its version tag (S3 ETag), read in one request; None if absent."""
        bucket, key = _split(self.path(*parts))
        try:
            resp = _s3_call("get_object", self.display(*parts), self.settings, Bucket=bucket, Key=key)
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise explain(e, self.display(*parts), "read", self.settings) from e
        return resp["Body"].read(), resp["ETag"]

    def version(self, *parts: str) -> str | None:
        """The object's current version tag, or None if it does not exist."""
        bucket, key = _split(self.path(*parts))
        try:
            return _s3_call("head_object", self.display(*parts), self.settings, Bucket=bucket, Key=key)["ETag"]
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise explain(e, self.display(*parts), "check", self.settings) from e

    def write_if(self, data: bytes, *parts: str, version: str | None) -> str:
        """Write ``data`` only if the object is still at ``version`` (``If-Match``), or, with ``version``
        None, only if there is no object yet (``If-None-Match: *``). Returns the new version tag; raises
        :class:`VersionConflict` when someone else wrote first, and nothing is overwritten."""
        target = self.path(*parts)
        if version is None:
            return _s3_put(target, data, self.display(*parts), self.settings, create_only=True, conflict=VersionConflict)
        return _s3_put(target, data, self.display(*parts), self.settings, if_match=version, conflict=VersionConflict)

    def clean_tmp(self, *parts: str) -> int:
        """Remove temporary objects left in ``parts/_tmp/`` by a crashed attempt; returns how many."""
        leftovers = self.list(*parts, "_tmp", recursive=True)
        for info in leftovers:
            self.delete_path(info.path)
        return len(leftovers)

    def delete(self, *parts: str) -> None:
        self.delete_path(self.path(*parts))

    def delete_path(self, path: str) -> None:
        """Delete the file at ``path`` (a full path on this filesystem, as :meth:`list` returns); no error
        if it is already gone."""
        if self.fs.type_name == "s3":
            _s3_delete(path, _s3_uri(path), self.settings)
        else:
            _delete_quietly(self.fs, path)

    def delete_dir(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.type_name == "s3":
            _s3_delete_many([i.path for i in self.list(*parts, recursive=True)], self.display(*parts), self.settings)
            return
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def list(self, *parts: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """Files directly under ``parts`` (all levels if ``recursive``), sorted by path; none if missing."""
        if self.fs.type_name == "s3":
            return _s3_list(self.path(*parts), self.display(*parts), self.settings, recursive)
        sel = pafs.FileSelector(self.path(*parts), recursive=recursive, allow_not_found=True)
        infos = self.fs.get_file_info(sel)
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def resolve(uri: str, settings: Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI or local path to (filesystem, path)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].split("?", 1)[0].rstrip("/")
        bucket = path.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{uri}: no bucket in this URI (expected s3://BUCKET/PREFIX)")
        return _s3(bucket, settings or Settings()).fs, path
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid (a ValueError) for an unknown scheme
        raise StorageError(f"{uri}: cannot open this URI ({e})") from e
    return fs, path.rstrip("/") or path


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
