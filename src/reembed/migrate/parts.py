"""The parts of an export folder, read back: the one reader (``read_parts``) and the one rule for paths its
``_export.json`` names (``inside``). Writing them is :mod:`reembed.migrate.export`."""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from reembed.errors import ExportError
from reembed.storage import Location

EXPORT_META = "_export.json"


def read_parts(loc: Location) -> Iterator[tuple[str, pa.Table]]:
    """(where, table) for each part of an export folder: the parts ``_export.json`` lists, each of which must
    lie inside the folder and match its sha256, or, without a summary, every ``*.parquet`` file there."""
    if not loc.exists(EXPORT_META):
        for info in loc.list():
            if info.path.endswith(".parquet") and not posixpath.basename(info.path).startswith(("_", ".")):
                with loc.fs.open_input_file(info.path) as f:
                    yield info.path, pq.read_table(f)
        return
    try:
        summary = json.loads(loc.read_bytes(EXPORT_META))
        parts = summary["parts"]
        listed = [(p["path"], p["sha256"]) for p in parts]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{loc.display(EXPORT_META)}: not an export summary ({type(e).__name__}: {e}); "
                          "export again") from e
    for rel, sha in listed:
        rel = inside(loc, rel, EXPORT_META)
        data = loc.read_bytes(rel)
        if hashlib.sha256(data).hexdigest() != sha:
            raise ExportError(f"{loc.display(rel)}: sha256 does not match {EXPORT_META} (corrupt or replaced); "
                              "export again")
        yield loc.display(rel), pq.read_table(pa.BufferReader(data))


def inside(loc: Location, rel: Any, source: str) -> str:
    """``rel`` (a path read from the file ``source``) as a path inside ``loc``, or a one-line refusal."""
    norm, why = loc.contain(rel)
    if norm is None:
        raise ExportError(f"{loc.display(source)}: part path {rel!r} {why.replace('outside', f'outside {loc.display()}', 1)}; "
                          "refusing to read it (the file was edited or is hostile); export again")
    return norm
