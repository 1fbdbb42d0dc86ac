"""Duplicate ids across the whole corpus, found by hash partitioning: no process holds every id.

Two rounds of small tasks, under the plan's work folder (``plan/`` beside the manifest):

1. one id task per Parquet file or JSON Lines range (:func:`partition_ids`) reads only its ids,
   canonicalised as the plan does (:func:`reembed.scan.canonical_ids`), hashes each into one of ``P``
   partitions and writes ``_ids/p-PPPP/<task>.parquet`` of ``(id, file, range_start, row)``;
2. one dedup task per partition (:func:`dedup_partition`) reads that partition's files (about 1/P of the
   ids), keeps the first occurrence of each id in plan order ``(file, row)`` and writes every later one to
   ``duplicates/part-PPPP.parquet`` as ``(file, row, id)`` sorted by ``(file, row)``, returning only its
   per-file duplicate counts.

Rows with a null id are left out: the read stage dead-letters them as ``null_id`` (as ``plan`` does).
With ``use_ray`` the tasks are Ray tasks; without it, the same functions run in this process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reembed.errors import ConfigError
from reembed.scan import RangeCount, jsonl_ids, parquet_ids, run_tasks
from reembed.storage import Location

log = logging.getLogger(__name__)

IDS_DIR = "_ids"
DUPLICATES_DIR = "duplicates"
MODES = ("hash", "none")
DUPLICATES_ROW_GROUP = 4096
"""Rows per row group of a duplicates part: a shard's reader fetches the one or two that hold its rows."""
DUPLICATES_SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("id", pa.string())])
_IDS_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.int32()), ("range_start", pa.int64()), ("row", pa.int64())])


@dataclass(frozen=True)
class IdTask:
    """One id-reading task: a Parquet file, or one byte range of a JSON Lines file (a ``.gz`` file is
    one range). ``path`` is relative to the input Location; ``file`` is the file's index in plan order."""

    file: int
    path: str
    format: str
    range_start: int = 0
    range_stop: int = 0

    @property
    def name(self) -> str:
        return f"f{self.file:07d}-b{self.range_start:015d}"


@dataclass(frozen=True)
class TaskIds:
    """What an id task tells the driver: its rows (and, for JSON Lines, the range's count)."""

    task: IdTask
    rows: int
    non_null: int
    partitions: tuple[int, ...]
    range: RangeCount | None = None


@dataclass
class DedupResult:
    partitions: int
    duplicates_by_file: dict[int, int] = field(default_factory=dict)
    tasks: list[TaskIds] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return sum(self.duplicates_by_file.values())


def find_duplicates(source: Location, tasks: Sequence[IdTask], id_column: str, work: Location,
                    partitions: int = 16, mode: str = "hash", use_ray: bool = False) -> DedupResult:
    """Run both rounds over ``tasks`` (in plan order) and return the per-file duplicate counts.

    ``work`` is the plan folder; ``duplicates/part-PPPP.parquet`` stay there (one per partition, empty
    ones too, so a reader knows there are ``partitions`` of them) and ``_ids/`` is removed at the end.
    ``mode="none"`` skips duplicate detection entirely: no id is read, no file is written.
    """
    if mode not in MODES:
        raise ConfigError(f"dedup mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if partitions < 1:
        raise ConfigError(f"dedup partitions must be at least 1, got {partitions}")
    if mode == "none":
        return DedupResult(partitions=0)
    t0 = time.monotonic()
    work.delete_dir(IDS_DIR)  # a crashed earlier attempt's leftovers would be counted twice
    results = _map(partition_ids, [(source, t, id_column, work, partitions) for t in tasks], use_ray)
    offsets = row_offsets(results)
    names: dict[int, list[tuple[str, int]]] = {p: [] for p in range(partitions)}
    for r in results:
        for p in r.partitions:
            names[p].append((r.task.name, offsets[(r.task.file, r.task.range_start)]))
    counts = _map(dedup_partition, [(work, p, names[p]) for p in range(partitions)], use_ray)
    by_file: dict[int, int] = {}
    for c in counts:
        for f, n in c.items():
            by_file[f] = by_file.get(f, 0) + n
    work.delete_dir(IDS_DIR)
    rows = sum(r.rows for r in results)
    secs = time.monotonic() - t0
    log.info("dedup: %d rows, %d duplicate ids, %d id tasks, %d partitions, %.1f s, %.0f rows/s",
             rows, sum(by_file.values()), len(results), partitions, secs, rows / max(secs, 1e-9))
    return DedupResult(partitions, dict(sorted(by_file.items())), list(results))


def partition_ids(source: Location, task: IdTask, id_column: str, work: Location, partitions: int) -> TaskIds:
    """Read one task's ids, hash them into ``partitions`` and write one small Parquet per partition
    that received any (``_ids/p-PPPP/<task>.parquet``). Row numbers are local to the task's range."""
    count = None
    if task.format == "parquet":
        ids = parquet_ids(source, task.path, id_column)
    else:
        count, ids = jsonl_ids(source, task.path, task.range_start, task.range_stop, id_column)
    rows = len(ids)
    row = np.arange(rows, dtype=np.int64)
    valid = ids.is_valid()
    ids, row = ids.filter(valid), row[np.asarray(valid, dtype=bool)]
    part = id_partitions(ids, partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    written = []
    for p in range(partitions):
        take = order[bounds[p]:bounds[p + 1]]
        if not len(take):
            continue
        table = pa.table([
            ids.take(pa.array(take)),
            pa.array(np.full(len(take), task.file, dtype=np.int32)),
            pa.array(np.full(len(take), task.range_start, dtype=np.int64)),
            pa.array(row[take]),
        ], schema=_IDS_SCHEMA)
        work.write_bytes(_parquet_bytes(table, stats=[]), IDS_DIR, _partition_dir(p), f"{task.name}.parquet")
        written.append(p)
    return TaskIds(task, rows, len(ids), tuple(written), count)


def dedup_partition(work: Location, partition: int, tasks: Iterable[tuple[str, int]]) -> dict[int, int]:
    """Find the repeated ids of one partition; write ``duplicates/part-PPPP.parquet`` and return
    ``{file index: duplicate rows}``.

    ``tasks`` names the id files written to this partition, each with the file row of its range's first
    row (0 for a Parquet file; the rows of the earlier ranges for a JSON Lines range).
    """
    import pyarrow.parquet as pq

    parts = []
    for name, offset in tasks:
        with work.fs.open_input_file(work.path(IDS_DIR, _partition_dir(partition), f"{name}.parquet")) as f:
            t = pq.read_table(f)
        row = pc.add(t.column("row"), pa.scalar(offset, pa.int64()))
        parts.append(pa.table({"file": t.column("file"), "row": row, "id": t.column("id")}, schema=DUPLICATES_SCHEMA))
    table = pa.concat_tables(parts) if parts else DUPLICATES_SCHEMA.empty_table()
    dups = first_wins(table)
    work.write_bytes(_parquet_bytes(dups, stats=["file", "row"]), DUPLICATES_DIR, duplicates_file(partition))
    if not dups.num_rows:
        return {}
    vc = pc.value_counts(dups.column("file"))
    return {int(f): int(n) for f, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())}


def first_wins(table: pa.Table) -> pa.Table:
    """The rows of ``(file, row, id)`` whose id appeared at an earlier ``(file, row)``, sorted by
    ``(file, row)``. Null ids are never duplicates."""
    table = table.filter(pc.is_valid(table.column("id")))
    if table.num_rows < 2:
        return DUPLICATES_SCHEMA.empty_table()
    table = table.sort_by([("id", "ascending"), ("file", "ascending"), ("row", "ascending")])
    ids = table.column("id").combine_chunks()
    repeat = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    mask = pa.concat_arrays([pa.array([False]), repeat.cast(pa.bool_())])
    return table.filter(mask).sort_by([("file", "ascending"), ("row", "ascending")]).cast(DUPLICATES_SCHEMA)


def row_offsets(results: Iterable[TaskIds]) -> dict[tuple[int, int], int]:
    """``(file, range_start) -> file row of the range's first row``: the rows of the file's earlier ranges."""
    offsets: dict[tuple[int, int], int] = {}
    seen: dict[int, int] = {}
    for r in sorted(results, key=lambda r: (r.task.file, r.task.range_start)):
        offsets[(r.task.file, r.task.range_start)] = seen.get(r.task.file, 0)
        seen[r.task.file] = seen.get(r.task.file, 0) + r.rows
    return offsets


def id_partitions(ids: pa.Array, partitions: int) -> np.ndarray:
    """The partition of each (non-null) string id: a hash of its UTF-8 bytes, the same in every process
    (Python's ``hash`` is salted per process, so it would split one id across partitions). One partition
    needs no hash (the plan of a corpus under :data:`reembed.plan.IDS_PER_PARTITION` ids)."""
    if partitions == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return (_string_hash(ids) % np.uint64(partitions)).astype(np.int64)


def duplicates_file(partition: int) -> str:
    return f"part-{partition:04d}.parquet"


# ---------------------------------------------------------------------------------------------------


def _partition_dir(p: int) -> str:
    return f"p-{p:04d}"


def _string_hash(ids: pa.Array) -> np.ndarray:
    """64-bit polynomial hash of each string's bytes, then mixed; vectorized over the Arrow buffers."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    ids = ids.cast(pa.large_string())
    n = len(ids)
    if not n:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + n + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]] if offsets[-1] > offsets[0] else np.zeros(0, np.uint8)
    lens = np.diff(offsets)
    starts = offsets[:-1] - offsets[0]
    h = np.zeros(n, dtype=np.uint64)
    if len(data):
        pos = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lens)
        with np.errstate(over="ignore"):
            powers = np.full(int(lens.max()), 1099511628211, dtype=np.uint64)
            powers[0] = 1
            powers = np.cumprod(powers)  # wraps modulo 2**64, as a hash should
            contrib = data.astype(np.uint64) * powers[pos]
            nonempty = lens > 0
            h[nonempty] = np.add.reduceat(contrib, starts[nonempty])
    with np.errstate(over="ignore"):
        h ^= lens.astype(np.uint64) * np.uint64(0x100000001B3)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


def _parquet_bytes(table: pa.Table, stats: list[str]) -> bytes:
    """Parquet with statistics on the ``stats`` columns only (a shard's reader selects duplicates row
    groups by ``file`` and ``row``; min/max ids would only grow the footer)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=DUPLICATES_ROW_GROUP, write_statistics=stats or False)
    return sink.getvalue().to_pybytes()


def _map(fn: Callable[..., Any], args: list[tuple], use_ray: bool) -> list[Any]:
    return run_tasks(fn, args, use_ray)
