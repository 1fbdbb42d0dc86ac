"""Duplicate ids across the whole corpus, found by hash partitioning: no process holds every id.

Two rounds of small tasks, under the plan's work folder (``plan/`` beside the manifest):

1. one id task per group of consecutive Parquet files / JSON Lines ranges (:func:`group_tasks`: about
   ``partitions x`` :data:`SLICE_IDS` ids a task, so each partition gets a slice of that many from each
   task, however small the files) reads only their ids, canonicalised as the plan does
   (:func:`reembed.scan.canonical_ids`), hashes each into one of ``P`` partitions (a vectorized 64-bit
   hash over the Arrow buffers, :func:`id_partitions`) and writes ONE Arrow IPC file
   ``_ids/<first task>.arrow`` of ``(id, file, range_start, row)`` holding one record batch per
   partition, in partition order (empty ones too);
2. one dedup task per partition (:func:`dedup_partition`) reads its batch of every id file (the IPC
   footer points at it: nothing else of the file is read), about 1/P of the ids, keeps the first
   occurrence of each id in plan order ``(file, row)`` and writes every later one to
   ``duplicates/part-PPPP.parquet`` as ``(file, row, id)`` sorted by ``(file, row)``, returning only its
   per-file duplicate counts. The batches arrive in plan order, so "first" is a hash table's order of
   first insertion (``dictionary_encode``), not a sort.

So the round writes (number of id tasks) files, not (tasks x partitions), and reads each once per
partition at the batch it needs. Rows with a null id are left out: the read stage dead-letters them as
``null_id`` (as ``plan`` does). With ``use_ray`` the tasks are Ray tasks; without it, the same functions
run in this process.
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
SLICE_IDS = 20_000
"""Ids an id task aims to give each partition: an id task covers about ``partitions x SLICE_IDS`` ids."""
TASK_IDS_MIN = 200_000
TASK_IDS_MAX = 4_000_000
"""Bounds of the ids one id task reads (~40 bytes each in memory: at most ~160 MB)."""
_IDS_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.int32()), ("range_start", pa.int64()), ("row", pa.int64())])
_OFFSETS = "_offsets.arrow"


@dataclass(frozen=True)
class IdTask:
    """One id-reading unit: a Parquet file, or one byte range of a JSON Lines file (a ``.gz`` file is
    one range). ``path`` is relative to the input Location; ``file`` is the file's index in plan order;
    ``rows`` its rows if the caller counted them (-1: unknown), which lets :func:`group_tasks` put many
    small units in one task."""

    file: int
    path: str
    format: str
    range_start: int = 0
    range_stop: int = 0
    rows: int = -1

    @property
    def name(self) -> str:
        return f"f{self.file:07d}-b{self.range_start:015d}"


@dataclass(frozen=True)
class TaskIds:
    """What an id task tells the driver about one unit: its rows (and, for JSON Lines, the range's
    count); ``partitions``: those its task's id file has rows for."""

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
                    partitions: int = 16, mode: str = "hash", use_ray: bool = False,
                    task_ids: int | None = None) -> DedupResult:
    """Run both rounds over ``tasks`` (in plan order) and return the per-file duplicate counts.

    ``work`` is the plan folder; ``duplicates/part-PPPP.parquet`` stay there (one per partition, empty
    ones too, so a reader knows there are ``partitions`` of them) and ``_ids/`` is removed at the end.
    ``mode="none"`` skips duplicate detection entirely: no id is read, no file is written. ``task_ids``:
    the ids one id task aims at (default: :func:`task_size`).
    """
    if mode not in MODES:
        raise ConfigError(f"dedup mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if partitions < 1:
        raise ConfigError(f"dedup partitions must be at least 1, got {partitions}")
    if mode == "none":
        return DedupResult(partitions=0)
    t0 = time.monotonic()
    work.delete_dir(IDS_DIR)  # a crashed earlier attempt's leftovers would be counted twice
    groups = group_tasks(tasks, task_ids or task_size(partitions))
    per_group = _map(partition_id_group, [(source, g, id_column, work, partitions) for g in groups], use_ray)
    results = [r for rs in per_group for r in rs]
    offsets = row_offsets(results)
    moved = {k: v for k, v in offsets.items() if v}  # ranges past a file's first: O(input bytes / range)
    if moved:
        keys = sorted(moved)
        table = pa.table({"file": pa.array([k[0] for k in keys], pa.int32()),
                          "range_start": pa.array([k[1] for k in keys], pa.int64()),
                          "offset": pa.array([moved[k] for k in keys], pa.int64())})
        work.write_bytes(_ipc_bytes(table.schema, [table]), IDS_DIR, _OFFSETS)
    names: dict[int, list[tuple[str, int]]] = {p: [] for p in range(partitions)}
    for g, rs in zip(groups, per_group):
        for p in sorted({p for r in rs for p in r.partitions}):
            names[p].append((g[0].name, 0))
    counts = _map(dedup_partition, [(work, p, names[p], bool(moved)) for p in range(partitions)], use_ray)
    by_file: dict[int, int] = {}
    for c in counts:
        for f, n in c.items():
            by_file[f] = by_file.get(f, 0) + n
    work.delete_dir(IDS_DIR)
    rows = sum(r.rows for r in results)
    secs = time.monotonic() - t0
    log.info("dedup: %d rows, %d duplicate ids, %d id tasks, %d partitions, %.1f s, %.0f rows/s",
             rows, sum(by_file.values()), len(groups), partitions, secs, rows / max(secs, 1e-9))
    return DedupResult(partitions, dict(sorted(by_file.items())), list(results))


def task_size(partitions: int) -> int:
    """The ids one id task aims at: ``partitions x`` :data:`SLICE_IDS`, within
    [:data:`TASK_IDS_MIN`, :data:`TASK_IDS_MAX`]."""
    return min(TASK_IDS_MAX, max(TASK_IDS_MIN, partitions * SLICE_IDS))


def group_tasks(tasks: Sequence[IdTask], ids: int) -> list[tuple[IdTask, ...]]:
    """Consecutive ``tasks`` grouped into id tasks of about ``ids`` rows each (a unit is never split; a
    unit of unknown rows is a task of its own)."""
    groups: list[list[IdTask]] = []
    filled = 0
    for t in tasks:
        if t.rows < 0 or not groups or filled + t.rows > ids or groups[-1][-1].rows < 0:
            groups.append([t])
            filled = max(t.rows, 0)
        else:
            groups[-1].append(t)
            filled += t.rows
    return [tuple(g) for g in groups]


def partition_id_group(source: Location, tasks: Sequence[IdTask], id_column: str, work: Location,
                       partitions: int) -> list[TaskIds]:
    """Read the ids of ``tasks`` (consecutive units, in plan order), hash them into ``partitions`` and
    write ``_ids/<first task's name>.arrow``: one record batch per partition, in partition order, rows
    in plan order within each. Row numbers are local to each unit's range."""
    parts, found = [], []
    for task in tasks:
        count = None
        if task.format == "parquet":
            ids = parquet_ids(source, task.path, id_column)
        else:
            count, ids = jsonl_ids(source, task.path, task.range_start, task.range_stop, id_column)
        rows = len(ids)
        valid = ids.is_valid()
        row = np.arange(rows, dtype=np.int64)
        if ids.null_count:
            ids, row = ids.filter(valid), row[np.asarray(valid, dtype=bool)]
        n = len(ids)
        parts.append(pa.table([ids, pa.array(np.full(n, task.file, dtype=np.int32)),
                               pa.array(np.full(n, task.range_start, dtype=np.int64)), pa.array(row)],
                              schema=_IDS_SCHEMA))
        found.append((task, rows, n, count))
    table = pa.concat_tables(parts) if parts else _IDS_SCHEMA.empty_table()
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=_IDS_SCHEMA)
    part = id_partitions(batch.column(0), partitions)
    if partitions > 1:
        # Stable: rows keep plan order within a partition. uint16 keys sort by radix in numpy.
        order = np.argsort(part.astype(np.uint16 if partitions <= 1 << 16 else np.int64), kind="stable")
        batch = batch.take(pa.array(order))
        bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    else:
        bounds = np.array([0, batch.num_rows])
    batches = [batch.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])) for p in range(partitions)]
    work.write_bytes(_ipc_bytes(_IDS_SCHEMA, batches), IDS_DIR, f"{tasks[0].name}.arrow")
    written = tuple(p for p in range(partitions) if bounds[p + 1] > bounds[p])
    return [TaskIds(t, rows, n, written, count) for t, rows, n, count in found]


def partition_ids(source: Location, task: IdTask, id_column: str, work: Location, partitions: int) -> TaskIds:
    """:func:`partition_id_group` of one unit (its id file is ``_ids/<task.name>.arrow``)."""
    return partition_id_group(source, [task], id_column, work, partitions)[0]


def read_id_batch(work: Location, name: str, partition: int) -> pa.RecordBatch:
    """Partition ``partition``'s rows of the id file ``name`` (a task's name): that batch alone is read."""
    with work.fs.open_input_file(work.path(IDS_DIR, f"{name}.arrow")) as f:
        return pa.ipc.open_file(f).get_batch(partition)


def dedup_partition(work: Location, partition: int, tasks: Iterable[tuple[str, int]],
                    ranges_moved: bool = False) -> dict[int, int]:
    """Find the repeated ids of one partition; write ``duplicates/part-PPPP.parquet`` and return
    ``{file index: duplicate rows}``.

    ``tasks`` names the id files that have rows in this partition, in plan order, each with a row offset
    added to all its rows (0 when ``ranges_moved``: the offsets of JSON Lines ranges past a file's first
    are then read from ``_ids/_offsets.arrow``, which :func:`find_duplicates` writes).
    """
    batches, offsets = [], []
    for name, offset in tasks:
        b = read_id_batch(work, name, partition)
        if b.num_rows:
            batches.append(b)
            offsets.append(np.full(b.num_rows, offset, dtype=np.int64))
    table = pa.Table.from_batches(batches, _IDS_SCHEMA).combine_chunks() if batches else _IDS_SCHEMA.empty_table()
    n = table.num_rows
    first = np.ones(n, dtype=bool)
    if n > 1:
        # The rows are in plan order and a hash table numbers distinct values in order of first
        # appearance: a row is a first occurrence iff its number exceeds every number before it.
        codes = pc.dictionary_encode(table.column("id")).chunk(0).indices.to_numpy()
        top = np.maximum.accumulate(codes)
        first[1:] = top[1:] > top[:-1]
    dup = np.flatnonzero(~first)
    row = table.column("row").to_numpy()[dup] + (np.concatenate(offsets)[dup] if offsets else 0)
    dups = pa.table({"file": table.column("file").take(pa.array(dup)), "row": pa.array(row, pa.int64()),
                     "id": table.column("id").take(pa.array(dup))}, schema=DUPLICATES_SCHEMA)
    if ranges_moved and dups.num_rows:
        dups = _add_range_offsets(work, dups, table.column("range_start").take(pa.array(dup)))
    dups = dups.sort_by([("file", "ascending"), ("row", "ascending")])
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


def id_partitions(ids: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition of each (non-null) string id: a hash of its UTF-8 bytes, the same in every process
    (Python's ``hash`` is salted per process, so it would split one id across partitions). One partition
    needs no hash (the plan of a corpus under :data:`reembed.plan.IDS_PER_PARTITION` ids)."""
    if partitions == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return (_string_hash(ids) % np.uint64(partitions)).astype(np.int64)


def duplicates_file(partition: int) -> str:
    return f"part-{partition:04d}.parquet"


# ---------------------------------------------------------------------------------------------------


_MUL = np.uint64(0x9E3779B97F4A7C15)
_MASKS = np.array([(1 << (8 * r)) - 1 for r in range(9)], dtype=np.uint64)  # the low r bytes of a word


def _string_hash(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string's bytes, 8 bytes at a time: the ids ordered longest first, so the
    ids still long enough at word ``k`` are a prefix and each step is a few vectorized operations over
    it (the longest id / 8 steps); a murmur3 finalizer mixes the result."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    n = len(ids)
    if not n:
        return np.zeros(0, dtype=np.uint64)
    wide = pa.types.is_large_string(ids.type) or pa.types.is_large_binary(ids.type)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64 if wide else np.int32)[ids.offset:ids.offset + n + 1]
    offsets = offsets.astype(np.int64)
    base, end = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(end - base + 8, dtype=np.uint8)
    if end > base:
        padded[:end - base] = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[base:end]
    # Every byte position as the start of a little-endian 64-bit word (unaligned loads, no copy).
    words = np.ndarray(shape=(end - base + 1,), dtype="<u8", buffer=padded, strides=(1,))
    lens, pos = np.diff(offsets), offsets[:-1] - base
    longest = int(lens.max())
    order = None
    if longest != int(lens.min()):
        key = (longest - lens).astype(np.uint16 if longest < 1 << 16 else np.int64)
        order = np.argsort(key, kind="stable")
        lens, pos = lens[order], pos[order]
    with np.errstate(over="ignore"):
        h = lens.astype(np.uint64) * _MUL
        k = 0
        while (m := int(np.count_nonzero(lens > 8 * k)) if order is not None else (n if longest > 8 * k else 0)):
            left = lens[:m] - 8 * k
            w = words[pos[:m] + 8 * k] & _MASKS[np.minimum(left, 8)]
            x = (h[:m] ^ w) * _MUL
            h[:m] = x ^ (x >> np.uint64(29))
            k += 1
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    if order is not None:
        out = np.empty_like(h)
        out[order] = h
        return out
    return h


def _add_range_offsets(work: Location, dups: pa.Table, range_start: pa.ChunkedArray) -> pa.Table:
    """``dups`` with each row's JSON Lines range offset (``_ids/_offsets.arrow``) added to its row."""
    with work.fs.open_input_file(work.path(IDS_DIR, _OFFSETS)) as f:
        t = pa.ipc.open_file(f).read_all()
    moved = dict(zip(zip(t.column("file").to_pylist(), t.column("range_start").to_pylist()),
                     t.column("offset").to_pylist()))
    keys = np.stack([dups.column("file").to_numpy(), range_start.to_numpy()], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    add = np.array([moved.get((int(f), int(r)), 0) for f, r in uniq], dtype=np.int64)[inverse.reshape(-1)]
    row = dups.column("row").to_numpy() + add
    return dups.set_column(1, "row", pa.array(row, pa.int64()))


def _ipc_bytes(schema: pa.Schema, batches: Iterable[pa.Table | pa.RecordBatch]) -> bytes:
    """An Arrow IPC file of ``batches``, one record batch each (an empty one too): readers fetch one by
    its index through the file's footer."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        for b in batches:
            if isinstance(b, pa.Table):
                b = b.combine_chunks().to_batches()[0] if b.num_rows else pa.RecordBatch.from_pylist([], schema=schema)
            w.write_batch(b)
    return sink.getvalue().to_pybytes()


def _parquet_bytes(table: pa.Table, stats: list[str]) -> bytes:
    """Parquet with statistics on the ``stats`` columns only (a shard's reader selects duplicates row
    groups by ``file`` and ``row``; min/max ids would only grow the footer)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=DUPLICATES_ROW_GROUP, write_statistics=stats or False)
    return sink.getvalue().to_pybytes()


def _map(fn: Callable[..., Any], args: list[tuple], use_ray: bool) -> list[Any]:
    return run_tasks(fn, args, use_ray)
