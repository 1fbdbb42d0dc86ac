"""The shard writer: one complete shard's rows -> ``shards/part-NNNNN.eEEEE.parquet`` (+ its dead letters),
written under a temporary name, verified, published; the caller then commits the returned record.

In the job this runs on the workers, next to the vectors: the driver only routes block references
(:class:`ShardRouter`, from a few bytes per block that :func:`block_shards` reports) and, once a shard's
rows are all embedded, launches :func:`write_shard_from_blocks` as a Ray task on those blocks. The task
returns the small record the driver commits; no vector passes through the driver. ``EEEE`` is the epoch
of the job that wrote the file: a job fenced by a later claim can still finish a write, but under its
own epoch's name, never over a committed file.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.reuse import carry_forward
from reembed.texts import copy_in_shard
from reembed.manifest import read_recorded, shard_name, write_failed
from reembed.storage import Location, ObjectExistsError, StorageError

SHARDS = "shards"
DEAD_LETTER = "dead_letter"


class ShardRouter:
    """Tracks, on the driver, which blocks hold the rows of each pending shard, from per-block summaries
    ``{shard: rows}`` (blocks arrive in any order and grouping; a block may hold several shards and a
    shard span several blocks), and hands out a shard with its blocks once all its planned rows are in."""

    def __init__(self, expected: dict[int, int]):
        self.expected = dict(expected)
        self.blocks: dict[int, list[Any]] = {}
        self.count: dict[int, int] = {}

    def add(self, block: Any, summary: dict[int, int]) -> list[tuple[int, list[Any]]]:
        """Record that ``block`` holds ``summary[shard]`` rows of each shard; return the shards now
        complete, each with every block that holds some of its rows."""
        done = []
        for shard, rows in summary.items():
            shard = int(shard)
            if shard not in self.expected:
                raise RuntimeError(f"rows for shard {shard}, which is not pending in this run")
            self.blocks.setdefault(shard, []).append(block)
            self.count[shard] = self.count.get(shard, 0) + rows
            if self.count[shard] > self.expected[shard]:
                raise RuntimeError(f"shard {shard}: received {self.count[shard]} rows, planned {self.expected[shard]}")
            if self.count[shard] == self.expected[shard]:
                done.append((shard, self.blocks.pop(shard)))
                del self.expected[shard]
        return done

    def forget(self, shard: int, rows: int) -> None:
        """Expect ``shard`` again from scratch (its blocks were lost): it is recomputed in another pass."""
        self.blocks.pop(shard, None)
        self.count.pop(shard, None)
        self.expected[shard] = rows

    @property
    def incomplete(self) -> dict[int, int]:
        return {s: self.count.get(s, 0) for s in self.expected}


def block_shards(table: pa.Table) -> dict[int, int]:
    """``{shard: rows}`` of one embedded block: what the driver needs to route it (a few bytes)."""
    shards, counts = np.unique(table.column(S.SHARD).to_numpy(), return_counts=True)
    return {int(s): int(n) for s, n in zip(shards, counts)}


def shard_rows(shard: int, tables: list[pa.Table]) -> pa.Table:
    """The rows of ``shard`` out of the blocks that hold them (other shards' rows are left out)."""
    parts = []
    for table in tables:
        col = table.column(S.SHARD).to_numpy()
        mask = col == shard
        parts.append(table if mask.all() else table.filter(pa.array(mask)))
    return pa.concat_tables(parts)


def write_shard_from_blocks(loc: Location, shard: int, epoch: int | None, schema: pa.Schema,
                            *blocks: pa.Table) -> dict[str, Any]:
    """The body of the writer task: gather ``shard``'s rows from ``blocks`` (Ray resolves the block
    references to tables on the node it runs on), write, verify and publish them, and return the record
    to commit, with the writer's node and host:pid."""
    rec = write_shard(loc, shard, shard_rows(shard, list(blocks)), schema, epoch=epoch)
    rec["writer"] = writer_identity()
    return rec


def writer_identity() -> dict[str, str]:
    """Where this process runs: the Ray node id (when inside Ray) and ``host:pid``."""
    node = ""
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover (ray is a dependency; the writer also runs without it in tests)
        pass
    return {"node": node, "host_pid": f"{socket.gethostname()}:{os.getpid()}"}


def write_shard(loc: Location, shard: int, table: pa.Table, schema: pa.Schema, epoch: int | None = None) -> dict[str, Any]:
    """Write a complete shard and its dead letters; return the commit record. ``epoch`` (the job's, on
    the commit log) goes into the file names and the record.

    ``schema`` is the output's :func:`schema.shard_schema`: the shard is written with exactly these columns,
    and a table that does not fit it (a type, a null where none may be) is a bug upstream and raises
    ``TypeError`` before anything is written. A file that fails its check after the write (short, wrong row
    count) is never published; nor is one cut short by a full disk, which raises a one-line StorageError.
    """
    table = table.sort_by(S.POS)
    live_mask = pc.is_null(table.column(S.REASON))
    live = table.filter(live_mask)
    dead = table.filter(pc.invert(live_mask))
    moved = 0
    if S.MOVED in live.column_names:  # identical texts: these rows are written by their copy shard
        keep = pc.invert(live.column(S.MOVED))
        moved = live.num_rows - int(pc.sum(keep.cast(pa.int64())).as_py() or 0)
        live = live.filter(keep)
    live, reused = carry_forward(live)  # an incremental run: the --reuse output's vectors, bit for bit
    live, _ = copy_in_shard(live)  # identical texts of this shard: their leader's vector, bit for bit

    out = conform(live, schema, f"shard {shard}")
    name = shard_name(shard, epoch)
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
        "reused": reused,
        "deduplicated": int(pc.sum(live.column(S.COPIED)).as_py() or 0) if S.COPIED in live.column_names else 0,
    }
    if moved:
        record["moved"] = moved  # rows of this plan shard that a copy shard writes (reembed.texts)
    if epoch is not None:
        record["epoch"] = epoch
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
        if col.type != field.type and _narrower_vectors(col.type, field.type):
            col = col.cast(field.type)  # output.dtype float16: the Embedder's float32 rounded to nearest, here
        if col.type != field.type:
            raise TypeError(f"{what}: column {field.name!r} is {col.type}, the shard schema says {field.type}")
        if not field.nullable and col.null_count:
            raise TypeError(f"{what}: column {field.name!r} holds {col.null_count} null(s) and may hold none")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def _narrower_vectors(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether ``have`` is a float32 vector column that the schema stores as float16 of the same size."""
    return (pa.types.is_fixed_size_list(have) and pa.types.is_fixed_size_list(want)
            and have.list_size == want.list_size and have.value_type == pa.float32()
            and want.value_type == pa.float16())


def _publish(loc: Location, data: bytes, rows: int, folder: str, name: str) -> None:
    verify = _verifier(rows, loc.display(folder, name))
    try:
        try:
            loc.publish(data, folder, name, verify=verify, exclusive=True)
        except ObjectExistsError:
            if ".e" not in name:
                raise
            # Only this job writes under its epoch's name, and it commits a shard once: the object is an
            # earlier attempt of this very write (a retried task), uncommitted, and may be replaced.
            loc.publish(data, folder, name, verify=verify, exclusive=False)
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
