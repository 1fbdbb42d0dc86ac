"""The shard writer: one complete shard's rows -> ``shards/part-NNNNN.parquet`` (+ its dead letters),
written under a temporary name, verified, published; the caller then commits the returned record."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.manifest import read_recorded, shard_name, write_failed
from reembed.storage import Location, StorageError

SHARDS = "shards"
DEAD_LETTER = "dead_letter"


class ShardAssembler:
    """Collects the rows of each shard as they stream back from the actor pool, in any order and any
    grouping, and hands out a shard once all of its planned rows have arrived."""

    def __init__(self, expected: dict[int, int]):
        self.expected = dict(expected)
        self.parts: dict[int, list[pa.Table]] = {}
        self.count: dict[int, int] = {}

    def add(self, table: pa.Table) -> list[tuple[int, pa.Table]]:
        done = []
        shards = table.column(S.SHARD).to_numpy()
        for shard in np.unique(shards):
            shard = int(shard)
            if shard not in self.expected:
                raise RuntimeError(f"rows for shard {shard}, which is not pending in this run")
            part = table.filter(pa.array(shards == shard)) if len(np.unique(shards)) > 1 else table
            self.parts.setdefault(shard, []).append(part)
            self.count[shard] = self.count.get(shard, 0) + part.num_rows
            if self.count[shard] > self.expected[shard]:
                raise RuntimeError(f"shard {shard}: received {self.count[shard]} rows, planned {self.expected[shard]}")
            if self.count[shard] == self.expected[shard]:
                done.append((shard, pa.concat_tables(self.parts.pop(shard))))
                del self.expected[shard]
        return done

    @property
    def incomplete(self) -> dict[int, int]:
        return {s: self.count.get(s, 0) for s in self.expected}


def write_shard(loc: Location, shard: int, table: pa.Table, schema: pa.Schema) -> dict[str, Any]:
    """Write a complete shard and its dead letters; return the manifest record.

    ``schema`` is the output's :func:`schema.shard_schema`: the shard is written with exactly these columns,
    and a table that does not fit it (a type, a null where none may be) is a bug upstream and raises
    ``TypeError`` before anything is written. A file that fails its check after the write (short, wrong row
    count) is never published; nor is one cut short by a full disk, which raises a one-line StorageError.
    """
    table = table.sort_by(S.POS)
    live_mask = pc.is_null(table.column(S.REASON))
    live = table.filter(live_mask)
    dead = table.filter(pc.invert(live_mask))

    out = conform(live, schema, f"shard {shard}")
    name = shard_name(shard)
    data = _parquet_bytes(out)
    _publish(loc, data, out.num_rows, SHARDS, name)
    record: dict[str, Any] = {
        "path": f"{SHARDS}/{name}",
        "rows": out.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "truncated": int(pc.sum(live.column(S.TRUNCATED)).as_py() or 0),
        "tokens": int(pc.sum(live.column("_tokens")).as_py() or 0),
        "device_seconds": float(pc.sum(live.column("_device_s")).as_py() or 0.0),
        "dead_letters": dead.num_rows,
        "reasons": dict(Counter(dead.column(S.REASON).to_pylist())),
    }
    if dead.num_rows:
        dl = pa.table(
            [dead.column(S.ID), dead.column(S.REASON), dead.column(S.SOURCE_FILE), dead.column(S.SOURCE_ROW)],
            schema=S.DEAD_LETTER_SCHEMA,
        )
        dl_data = _parquet_bytes(dl)
        _publish(loc, dl_data, dl.num_rows, DEAD_LETTER, name)
        record.update(dead_letter_path=f"{DEAD_LETTER}/{name}", dead_letter_bytes=len(dl_data),
                      dead_letter_sha256=hashlib.sha256(dl_data).hexdigest())
    return record


def read_shard_table(loc: Location, record: dict[str, Any], columns: list[str] | None = None, verify: bool = True,
                     key: str = "a shard record") -> pa.Table:
    """Read one committed shard named by its manifest ``record``: the path must stay inside the output
    (:class:`ManifestError` otherwise) and the bytes must match the record's sha256 (:class:`ChecksumError`);
    ``verify=False`` skips only the checksum. ``key`` names the record in messages (``shards.00042``)."""
    data = read_recorded(loc, record, key, verify=verify)
    return pq.read_table(pa.BufferReader(data), columns=columns)


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """``table``'s columns named by ``schema``, as exactly that schema; ``TypeError`` if a column is
    missing, of another type, or holds nulls where the schema allows none."""
    cols = []
    for field in schema:
        if field.name not in table.column_names:
            raise TypeError(f"{what}: column {field.name!r} is missing (have {table.column_names})")
        col = table.column(field.name)
        if col.type != field.type:
            raise TypeError(f"{what}: column {field.name!r} is {col.type}, the shard schema says {field.type}")
        if not field.nullable and col.null_count:
            raise TypeError(f"{what}: column {field.name!r} holds {col.null_count} null(s) and may hold none")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def _publish(loc: Location, data: bytes, rows: int, folder: str, name: str) -> None:
    try:
        loc.publish(data, folder, name, verify=_verifier(rows, loc.display(folder, name)), exclusive=True)
    except OSError as e:
        raise write_failed(e, loc.display(folder, name)) from e


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _verifier(rows: int, display: str):
    def verify(fs, path: str) -> None:
        try:
            with fs.open_input_file(path) as f:
                md = pq.ParquetFile(f).metadata
        except pa.ArrowInvalid as e:
            raise StorageError(f"{display}: written file is not readable Parquet ({e})") from e
        if md.num_rows != rows:
            raise StorageError(f"{display}: written file has {md.num_rows} rows, expected {rows}")

    return verify
