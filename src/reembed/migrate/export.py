"""Export (back up) the old vector store in reembed's input format: the backup *is* the job's input.

    reembed export --from "chroma:///data/chroma?collection=docs" --to s3://bucket/backup/docs/

writes ``part-00000.parquet``, ``part-00001.parquet``, ... with the columns ``id`` (string), ``text``
(string, null where the store kept none), one column per metadata key, and ``old_embedding``
(``fixed_size_list<float32>[dim]``), plus ``_export.json`` (source, rows, dimension, metric, parts with
sha256). ``reembed run --input`` that folder reads the parts and skips the ``_``-prefixed summary.
The sources are the stores of :mod:`reembed.migrate.stores`.

Chroma, Qdrant (embedded) and FAISS are exercised for real by the tests. Pinecone and Weaviate are
written against their official clients (``pinecone`` >= 5, ``weaviate-client`` >= 4) but no server of
either was available when this was written, so those two paths have not been run against a live store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.errors import ExportError
from reembed.indexes.qdrant import PAYLOAD_COLUMN, POINT_ID_COLUMN
from reembed.manifest import now
from reembed.migrate.stores import STORES, Batch, parse_uri
from reembed.migrate.parts import EXPORT_META
from reembed.migrate.stores.base import OLD_EMBEDDING, TEXT
from reembed.storage import Location, StorageError

log = logging.getLogger(__name__)

# The app's own point id and payload, kept so the new collection is written with both unchanged.
S_PAYLOAD, S_POINT_ID = PAYLOAD_COLUMN, POINT_ID_COLUMN
_RESERVED = (S.ID, TEXT, OLD_EMBEDDING, S_PAYLOAD, S_POINT_ID)


def export(uri: str, to: str | Location, page_size: int = 1000, part_rows: int = 100_000,
           overwrite: bool = False) -> dict[str, Any]:
    """Export every document of the store at ``uri`` into ``to``; returns the ``_export.json`` summary."""
    src = parse_uri(uri)
    out = to if isinstance(to, Location) else Location.from_uri(to)
    t0 = time.monotonic()
    with STORES[src.kind].from_uri(src) as store:
        info = store.describe()
        layout = dict(store.detect_layout()) if hasattr(store, "detect_layout") else {}
        _prepare_target(out, overwrite)
        writer = PartWriter(out, part_rows)
        missing_text = 0
        id_kinds: set[str] = set()
        for batch in store.batches(page_size):
            missing_text += sum(t is None for t in batch.texts)
            id_kinds.update(id_kind(p) for p in (batch.point_ids or ()))
            writer.add(batch)
    if layout or id_kinds:
        layout.update(id_kind="/".join(sorted(id_kinds)) or None, json_columns=sorted(writer.json_columns),
                      point_ids=S_POINT_ID in writer.columns, payload=S_PAYLOAD in writer.columns)
    parts = writer.close()
    out.delete_dir("_tmp")  # publish's staging folder, empty once every part is in place
    rows = sum(p["rows"] for p in parts)
    secs = time.monotonic() - t0
    summary = {
        "format": 1,
        "source": src.shown,  # for people: never opened again, so no credentials can follow it
        "kind": src.kind,
        "collection": store.collection,
        **info,
        "dimension": writer.dim,
        "rows": rows,
        "text_missing": missing_text,
        "columns": writer.schema.names if writer.schema is not None else [],
        "layout": layout or None,
        "parts": parts,
        "exported_at": now(),
        "seconds": round(secs, 3),
    }
    out.write_bytes(json.dumps(summary, indent=1).encode(), EXPORT_META)
    size = sum(p["bytes"] for p in parts)
    log.info("export: %d rows, %d bytes, %.1f s, %.1f rows/s (%s -> %s, %d parts, %d without text)",
             rows, size, secs, rows / secs if secs else 0.0, summary["source"], out.display(), len(parts), missing_text)
    if missing_text:
        where = f" (looked in {layout['kind']} field {layout['text_field']!r})" if layout.get("text_field") else ""
        log.warning("%d of %d documents have no text in the store%s; `reembed run` will dead-letter them (null_text); "
                    "if the text is under another field, export again with ?text_field=NAME", missing_text, rows, where)
    return summary


def id_kind(point_id: Any) -> str:
    """``uuid``, ``int`` or ``string``: how a store keys its points (Qdrant allows uuids and unsigned ints)."""
    text = str(point_id)
    if text.isdigit():
        return "int"
    try:
        uuid.UUID(text)
        return "uuid"
    except ValueError:
        return "string"


class PartWriter:
    """Buffers batches into Parquet parts of ``part_rows`` rows, published atomically.

    Metadata keys become columns. A key that first appears in a later part, or a column whose type widens
    (int -> float, anything mixed -> string), makes :meth:`close` rewrite the earlier parts to the final
    schema, so every part of an export has the same columns and types.
    """

    def __init__(self, loc: Location, part_rows: int = 100_000):
        if part_rows < 1:
            raise ExportError(f"rows per part must be >= 1, got {part_rows}")
        self.loc = loc
        self.part_rows = part_rows
        self.dim: int | None = None
        self.schema: pa.Schema | None = None
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._parts: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self.json_columns: set[str] = set()
        self.columns: set[str] = set()

    def add(self, batch: Batch) -> None:
        if not len(batch):
            return
        dim = batch.vectors.shape[1]
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise ExportError(f"document {batch.ids[0]!r} has a {dim}-d vector, earlier ones {self.dim}-d")
        dupes = [i for i in batch.ids if i in self._seen]
        if dupes:
            log.warning("export: %d repeated ids (first %r); `reembed run` dead-letters the repeats", len(dupes), dupes[0])
        self._seen.update(batch.ids)
        table = batch_table(batch, self.json_columns)
        self.columns.update(table.column_names)
        while table.num_rows:
            room = self.part_rows - self._buffered
            head, table = table.slice(0, room), table.slice(room)
            self._buffer.append(head)
            self._buffered += head.num_rows
            if self._buffered == self.part_rows:
                self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._buffered:
            self._flush()
        for part in self._parts:
            if part.pop("_schema") != self.schema:
                table = pq.read_table(pa.BufferReader(self.loc.read_bytes(part["path"])))
                self._publish(conform(table, self.schema), part)
        return self._parts

    def _flush(self) -> None:
        schema = self.schema or self._buffer[0].schema
        for t in self._buffer:
            schema = unify(schema, t.schema)
        self.schema = schema
        table = pa.concat_tables([conform(t, schema) for t in self._buffer])
        self._buffer, self._buffered = [], 0
        part = {"path": f"part-{len(self._parts):05d}.parquet"}
        self._publish(table, part)
        self._parts.append(part)

    def _publish(self, table: pa.Table, part: dict[str, Any]) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        rows = table.num_rows

        def verify(fs, path: str) -> None:
            with fs.open_input_file(path) as f:
                got = pq.ParquetFile(f).metadata.num_rows
            if got != rows:
                raise StorageError(f"{self.loc.display(part['path'])}: written file has {got} rows, expected {rows}")

        self.loc.publish(data, part["path"], verify=verify)
        part.update(rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), _schema=table.schema)


def batch_table(batch: Batch, json_columns: set[str] | None = None) -> pa.Table:
    """A batch as an Arrow table: id, text, metadata columns (sorted by name), ``_payload`` and ``_point_id``
    where the store gives them, old_embedding. Metadata columns holding nested values (JSON strings) are
    added to ``json_columns``."""
    keys = sorted({k for m in batch.metadata for k in m})
    columns: dict[str, pa.Array] = {S.ID: pa.array(batch.ids, pa.string()), TEXT: pa.array(batch.texts, pa.string())}
    for key in keys:
        name = f"meta_{key}" if key in _RESERVED else key
        values = [m.get(key) for m in batch.metadata]
        if json_columns is not None and any(isinstance(v, (dict, list, tuple)) for v in values):
            json_columns.add(name)
        columns[name] = metadata_column(values)
    if batch.point_ids is not None:
        columns[S_POINT_ID] = pa.array([str(p) for p in batch.point_ids], pa.string())
    if batch.payloads is not None:
        columns[S_PAYLOAD] = pa.array([json.dumps(p, ensure_ascii=False, default=str) for p in batch.payloads], pa.string())
    columns[OLD_EMBEDDING] = S.embedding_array(batch.vectors)
    return pa.table(columns)


def metadata_column(values: Sequence[Any]) -> pa.Array:
    """Scalars keep their type; nested values become JSON strings (the export summary lists those columns
    under ``layout.json_columns``; the exact payload travels in ``_payload``); a column of mixed types
    becomes strings."""
    values = [json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def unify(a: pa.Schema, b: pa.Schema) -> pa.Schema:
    """The schema both ``a`` and ``b`` conform to: union of columns, widened types, strings when types clash;
    id and text first, old_embedding last."""
    fields: dict[str, pa.Field] = {f.name: f for f in a}
    for f in b:
        if f.name not in fields:
            fields[f.name] = f
        elif fields[f.name].type != f.type:
            if f.name == OLD_EMBEDDING:
                raise ExportError(f"old_embedding type changed from {fields[f.name].type} to {f.type}")
            try:
                fields[f.name] = pa.unify_schemas([pa.schema([fields[f.name]]), pa.schema([f])],
                                                  promote_options="permissive").field(f.name)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                fields[f.name] = pa.field(f.name, pa.string())
    meta = sorted(n for n in fields if n not in _RESERVED)
    kept = [fields[n] for n in (S_PAYLOAD, S_POINT_ID) if n in fields]
    return pa.schema([fields[S.ID], fields[TEXT], *[fields[n] for n in meta], *kept, fields[OLD_EMBEDDING]])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones null, others cast."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _prepare_target(out: Location, overwrite: bool) -> None:
    existing = [i.path for i in out.list() if os.path.basename(i.path).startswith("part-") or i.path.endswith(EXPORT_META)]
    if not existing:
        return
    if not overwrite:
        raise ExportError(f"{out.display()}: already holds an export ({len(existing)} files); pass --overwrite to "
                          "replace it, or export somewhere else")
    for path in existing:
        out.fs.delete_file(path)
