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
from reembed.manifest import shard_name
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


def write_shard(loc: Location, shard: int, table: pa.Table, passthrough: list[str]) -> dict[str, Any]:
    """Write a complete shard and its dead letters; return the manifest record."""
    table = table.sort_by(S.POS)
    live_mask = pc.is_null(table.column(S.REASON))
    live = table.filter(live_mask)
    dead = table.filter(pc.invert(live_mask))

    out = pa.table(
        [live.column(S.ID), live.column(S.EMBEDDING), live.column(S.TRUNCATED), *[live.column(c) for c in passthrough]],
        names=[S.ID, S.EMBEDDING, S.TRUNCATED, *passthrough],
    )
    name = shard_name(shard)
    data = _parquet_bytes(out)
    loc.publish(data, SHARDS, name, verify=_verifier(out.num_rows, loc.display(SHARDS, name)), exclusive=True)
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
        loc.publish(dl_data, DEAD_LETTER, name, verify=_verifier(dl.num_rows, loc.display(DEAD_LETTER, name)),
                    exclusive=True)
        record.update(dead_letter_path=f"{DEAD_LETTER}/{name}", dead_letter_bytes=len(dl_data),
                      dead_letter_sha256=hashlib.sha256(dl_data).hexdigest())
    return record


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _verifier(rows: int, display: str):
    def verify(fs, path: str) -> None:
        with fs.open_input_file(path) as f:
            md = pq.ParquetFile(f).metadata
        if md.num_rows != rows:
            raise StorageError(f"{display}: written file has {md.num_rows} rows, expected {rows}")

    return verify


def read_shard_table(loc: Location, record: dict[str, Any], columns: list[str] | None = None, verify: bool = False) -> pa.Table:
    """Read one committed shard, optionally checking its sha256 against the manifest record first."""
    data = loc.read_bytes(record["path"])
    if verify and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise StorageError(f"{loc.display(record['path'])}: sha256 does not match the manifest (corrupt or replaced)")
    return pq.read_table(pa.BufferReader(data), columns=columns)
