"""Input listing and the preflight check that runs before any model or GPU work."""

from __future__ import annotations

import fnmatch
import logging
import posixpath
import time
import uuid
from dataclasses import replace
from typing import Any

import pyarrow.fs as pafs

from reembed.errors import StorageError
from reembed.storage.location import Location
from reembed.storage.s3 import Settings, _code, _s3_call, _split, explain

log = logging.getLogger(__name__)


def list_inputs(uri: str | Location, pattern: str = "*", settings: Any = None) -> tuple[Location, list[pafs.FileInfo]]:
    """The input files under ``uri``, sorted by path: a single file, a folder (recursively, file names
    filtered by ``pattern``), or a glob in the last path component (``s3://b/docs/*.parquet``). Given a
    :class:`Location`, its filesystem (and the settings it was opened with) is used for everything; the
    returned Location is on the same filesystem, rooted at the folder (or file) the files are under.

    An existing path is a path, never a glob: a folder named ``data[2024]`` is that folder. Only a last
    component that does not exist and contains ``*``, ``?`` or ``[`` is a glob, matched against file
    names under its parent (recursively). As Spark, Hive and pyarrow datasets do, files whose path below the input
    root has a component starting with ``.`` or ``_`` (``.ipynb_checkpoints/``, ``_temporary/``,
    ``.git/``, ``_SUCCESS``) are not input; one INFO line counts them and names the first few. A file
    named directly is read whatever its name. ``settings`` apply to a URI (a Location has its own).
    """

    def info_of(loc: Location) -> pafs.FileInfo:
        try:
            return loc.fs.get_file_info(loc.root)
        except OSError as e:
            raise explain(e, uri, "list", loc.settings) from e

    loc = uri if isinstance(uri, Location) else Location.from_uri(uri, settings)
    uri = loc.uri
    info = info_of(loc)
    glob = None
    if info.type == pafs.FileType.NotFound:
        base_uri, glob = _split_glob(uri)
        if glob is None:
            raise StorageError(f"{uri}: input not found (no such file, folder or prefix)")
        loc = replace(loc, root=posixpath.dirname(loc.root.rstrip("/")), uri=base_uri)
        info = info_of(loc)
        if info.type != pafs.FileType.Directory:
            raise StorageError(f"{uri}: input not found (no file matches {glob!r}, and {base_uri} is not a folder)")
    elif info.type == pafs.FileType.File:
        return loc, [info]
    try:
        files = loc.list(recursive=True)
    except OSError as e:
        raise explain(e, uri, "list", loc.settings) from e
    match = glob or pattern
    root = loc.root.rstrip("/") + "/"
    # A pattern that itself starts with . or _ asks for such file names; their folders still count.
    named_hidden = match.startswith((".", "_"))
    picked, hidden = [], []
    for f in files:
        if not fnmatch.fnmatch(posixpath.basename(f.path), match):
            continue
        rel = f.path[len(root):] if f.path.startswith(root) else posixpath.basename(f.path)
        parts = rel.split("/")
        if any(part.startswith((".", "_")) for part in (parts[:-1] if named_hidden else parts)):
            hidden.append(rel)
        else:
            picked.append(f)
    if hidden:
        log.info("input: %d file(s) under hidden or underscore paths in %s are not input (as in Spark and "
                 "pyarrow): %s%s", len(hidden), uri, ", ".join(hidden[:3]), " ..." if len(hidden) > 3 else "")
    if not picked:
        also = f" outside hidden or underscore paths ({len(hidden)} inside, which are never input)" if hidden else ""
        raise StorageError(f"{uri}: no input files match {match!r}{also}")
    return loc, picked


def preflight(input_uri: str, output_uri: str, settings: Any = None) -> None:
    """Check, in a few requests and before any model or GPU work, that the input can be listed and the
    output written; raise a one-line :class:`StorageError` naming the URI and the likely cause."""
    t0 = time.monotonic()
    settings = Settings.of(settings)
    _check_input(input_uri, settings)
    _check_output(output_uri, settings)
    log.debug("preflight: input and output reachable (%.2f s)", time.monotonic() - t0)


def _check_input(uri: str, settings: Settings) -> None:
    base_uri, _ = _split_glob(uri)
    loc = Location.from_uri(base_uri, settings)
    if loc.fs.type_name != "s3":
        try:
            info = loc.fs.get_file_info(loc.root)
        except OSError as e:
            raise explain(e, uri, "list", settings) from e
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: input not found (no such file, folder or prefix)")
        return
    bucket, key = _split(loc.root)
    prefix = f"{key}/" if key else ""
    try:
        page = _s3_call("list_objects_v2", uri, settings, attempts=min(3, settings.max_attempts),
                        Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as e:
        raise explain(e, uri, "list", settings) from e
    if page.get("KeyCount", 0):
        return
    if not key:
        raise StorageError(f"{uri}: bucket {bucket!r} is empty; no input to read")
    try:
        _s3_call("head_object", uri, settings, Bucket=bucket, Key=key)
    except Exception as e:
        if _code(e) in ("404", "NoSuchKey", "NotFound"):
            raise StorageError(f"{uri}: no object or prefix {key!r} in bucket {bucket!r} (check the path; "
                               "S3 keys are case-sensitive)") from e
        raise explain(e, uri, "read", settings) from e


def _check_output(uri: str, settings: Settings) -> None:
    loc = Location.from_uri(uri, settings)
    if loc.fs.type_name != "s3":
        return
    bucket, key = _split(loc.root)
    attempts = min(3, settings.max_attempts)
    try:
        _s3_call("list_objects_v2", uri, settings, attempts=attempts, Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
    except Exception as e:
        raise explain(e, uri, "list", settings) from e
    probe = posixpath.join(key, f".reembed-write-check-{uuid.uuid4().hex[:12]}")
    try:
        _s3_call("put_object", uri, settings, attempts=attempts, Bucket=bucket, Key=probe, Body=b"")
    except Exception as e:
        raise explain(e, uri, "write", settings) from e
    try:
        _s3_call("delete_object", uri, settings, attempts=attempts, Bucket=bucket, Key=probe)
    except Exception as e:
        raise explain(e, uri, "delete", settings) from e


def _split_glob(uri: str) -> tuple[str, str | None]:
    """``(parent, last component)`` when the last component has glob characters, else ``(uri, None)``.
    Only the string: :func:`list_inputs` first checks whether the literal path exists."""
    head, tail = posixpath.split(uri.rstrip("/"))
    if any(c in tail for c in "*?["):
        return head, tail
    return uri, None
