"""The plan as Parquet beside the manifest, read a shard at a time.

``plan/files.parquet``     one row per input file: index, path, uri, format, size, mtime/ETag, rows,
                           duplicate rows (what a resume compares to refuse changed input)
``plan/segments/part-NNNNN.parquet``  one row per segment: (shard, file, start, stop, range_start, skip,
                           rows, first_line), :data:`SHARDS_PER_PART` shards a file, sorted by shard in small
                           row groups (so a file's footer stays small however many shards the plan has)
``plan/duplicates/``       ``part-PPPP.parquet`` of (file, row, id), written by :mod:`reembed.dedup`

A read task calls :func:`read_shard`: its shard names its segments file, whose row-group statistics of
``shard`` (and of ``file``/``row`` in the duplicates) pick the few row groups it needs, so it reads a few KB
whatever the size of the plan.
:func:`pack_shards` turns per-file / per-range row counts into segments as a stream: its memory is
O(1) per unit, never O(documents).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from reembed.dedup import DUPLICATES_DIR, DUPLICATES_SCHEMA, duplicates_file
from reembed.errors import ManifestError
from reembed.storage import Location

log = logging.getLogger(__name__)

FILES = "files.parquet"
SEGMENTS_DIR = "segments"
SHARDS_PER_PART = 1024
"""Shards per segments file: part of the plan's format (each file records it; a reader refuses another)."""
SEGMENT_ROW_GROUP = 256
"""Segments per row group: a shard's read fetches one or two of these (~ a few KB)."""
FILE_ROW_GROUP = 1024

FILES_SCHEMA = pa.schema([
    ("file", pa.int32()), ("path", pa.string()), ("uri", pa.string()), ("format", pa.string()),
    ("size", pa.int64()), ("mtime_ns", pa.int64()), ("etag", pa.string()), ("rows", pa.int64()),
    ("dup_rows", pa.int64()),
])
SEGMENTS_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("file", pa.int32()), ("start", pa.int64()), ("stop", pa.int64()),
    ("range_start", pa.int64()), ("skip", pa.int64()), ("rows", pa.int64()), ("first_line", pa.int64()),
])
_PARTITIONS_KEY = b"reembed.dedup_partitions"
_SHARDS_PER_PART_KEY = b"reembed.shards_per_part"


@dataclass(frozen=True)
class Unit:
    """Rows of one Parquet file, or of one JSON Lines range, in plan order.

    ``first_line`` is the line number of the range's first line (JSON Lines; 0 for Parquet)."""

    file: int
    rows: int
    range_start: int = 0
    first_line: int = 0


@dataclass
class ShardPlan:
    """What one read task needs: its segments, their files, and the duplicate rows inside them."""

    shard: int
    segments: pa.Table
    files: pa.Table
    duplicates: pa.Table
    row_groups_read: dict[str, list[int]]

    @property
    def rows(self) -> int:
        return int(pc.sum(self.segments.column("rows")).as_py() or 0)


def pack_shards(units: Iterable[Unit], shard_rows: int) -> Iterator[dict[str, int]]:
    """Pack rows, in plan order, into shards of ``shard_rows`` rows (the last may be smaller), yielding
    segments as they close. A segment is the rows ``[start, stop)`` of its file, found in the file as
    ``skip`` rows past the first line at or after ``range_start``: one segment per file per shard,
    since a reader may run on past the end of the range it starts in."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    shard, filled = 0, 0
    file, file_row = None, 0
    pending: dict[str, int] | None = None
    for u in units:
        if u.file != file:
            file, file_row = u.file, 0
        taken = 0
        while taken < u.rows:
            take = min(shard_rows - filled, u.rows - taken)
            start = file_row + taken
            if pending and pending["shard"] == shard and pending["file"] == u.file and pending["stop"] == start:
                pending["stop"] += take
                pending["rows"] += take
            else:
                if pending:
                    yield pending
                pending = {"shard": shard, "file": u.file, "start": start, "stop": start + take,
                           "range_start": u.range_start, "skip": taken, "rows": take, "first_line": u.first_line}
            taken += take
            filled += take
            if filled == shard_rows:
                shard, filled = shard + 1, 0
        file_row += u.rows
    if pending:
        yield pending


def jsonl_units(file: int, ranges: Iterable[Any]) -> Iterator[Unit]:
    """The :class:`Unit` of each range of one JSON Lines file (``scan.RangeCount`` in byte order), with
    the line number each range starts at: the lines of the ranges before it."""
    line = 0
    for r in ranges:
        yield Unit(file, r.rows, r.range_start, line)
        line += r.lines


def write_files(plan: Location, files: Iterable[dict[str, Any]]) -> int:
    """Write ``files.parquet`` (rows in file-index order); returns how many files."""
    table = pa.Table.from_pylist(list(files), schema=FILES_SCHEMA).sort_by("file")
    plan.write_bytes(_parquet_bytes(table, FILE_ROW_GROUP, stats=["file"]), FILES)
    return table.num_rows


def segments_file(shard: int) -> str:
    """The segments file holding ``shard``, relative to the plan folder."""
    return f"{SEGMENTS_DIR}/part-{shard // SHARDS_PER_PART:05d}.parquet"


def write_segments(plan: Location, segments: Iterable[dict[str, int]], dedup_partitions: int = 0,
                   row_group: int = SEGMENT_ROW_GROUP) -> tuple[int, int]:
    """Write ``segments/part-*.parquet`` from a stream of segments in shard order (as :func:`pack_shards`
    yields them); returns ``(segments, shards)``. Memory: one file's segments. ``dedup_partitions`` says
    how many ``duplicates/part-*`` files :func:`read_shard` must consult (0: duplicate detection was off)."""
    schema = SEGMENTS_SCHEMA.with_metadata({_PARTITIONS_KEY: str(dedup_partitions).encode(),
                                            _SHARDS_PER_PART_KEY: str(SHARDS_PER_PART).encode()})
    n, shards, last = 0, 0, -1
    part: list[dict[str, int]] = []
    for seg in segments:
        if seg["shard"] < last:
            raise ValueError(f"segments out of shard order: shard {seg['shard']} after {last}")
        if part and segments_file(seg["shard"]) != segments_file(part[0]["shard"]):
            _write_part(plan, part, schema, row_group)
            part = []
        if seg["shard"] != last:
            shards += 1
            last = seg["shard"]
        part.append(seg)
        n += 1
    if part or not n:
        _write_part(plan, part, schema, row_group)
    return n, shards


def segment_files(shards: int) -> list[str]:
    """The segments files of a plan of ``shards`` shards (one, empty, for a plan with none)."""
    return [segments_file(k * SHARDS_PER_PART) for k in range(max(1, -(-shards // SHARDS_PER_PART)))]


def segment_index(plan: Location, shards: int) -> pa.Table:
    """``(shard, file, rows)`` of every segment, read from the segments files' three int columns: the
    driver's O(segments) view of the plan (rows per shard, the files a shard reads)."""
    import pyarrow.parquet as pq

    parts = []
    for name in segment_files(shards):
        with plan.fs.open_input_file(plan.path(name)) as f:
            parts.append(pq.read_table(f, columns=["shard", "file", "rows"]))
    return pa.concat_tables(parts) if parts else SEGMENTS_SCHEMA.empty_table().select(["shard", "file", "rows"])


def shard_rows(index: pa.Table, shards: Iterable[int]) -> dict[int, int]:
    """``{shard: rows}`` for ``shards``, from :func:`segment_index`."""
    want = set(shards)
    rows: dict[int, int] = {s: 0 for s in want}
    for s, r in zip(index.column("shard").to_pylist(), index.column("rows").to_pylist()):
        if s in want:
            rows[s] += r
    return rows


def read_shard(plan: Location, shard: int) -> ShardPlan:
    """One shard's segments, the ``files.parquet`` rows of their files, and the duplicates among their
    rows; only the row groups whose statistics can hold them are read."""
    return read_shards(plan, [shard])[0]


def read_shards(plan: Location, shards: Iterable[int]) -> list[ShardPlan]:
    """:func:`read_shard` of each of ``shards`` (a read task's), each plan file opened once for all of
    them: a task of K shards reads each ``duplicates/part-*`` file once, not K times."""
    import pyarrow.parquet as pq

    shards = list(shards)
    if not shards:
        return []
    read: dict[str, list[int]] = {}
    by_part: dict[str, list[int]] = {}
    for shard in shards:
        by_part.setdefault(segments_file(shard), []).append(shard)
    parts, partitions = [], 0
    for name, in_part in by_part.items():
        if not plan.exists(name):
            raise ManifestError(f"{plan.display(name)}: missing, so the plan has no shard {in_part[0]}; the plan and "
                                "the manifest disagree (start a fresh output to re-plan)")
        with plan.fs.open_input_file(plan.path(name)) as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            if int(meta.get(_SHARDS_PER_PART_KEY, b"0")) != SHARDS_PER_PART:
                raise ManifestError(f"{plan.display(name)}: written with {meta.get(_SHARDS_PER_PART_KEY, b'?').decode()} "
                                    f"shards a file, this version reads {SHARDS_PER_PART}; re-plan with this version")
            partitions = int(meta.get(_PARTITIONS_KEY, b"0"))
            table, read[name] = _read_range(pf, "shard", min(in_part), max(in_part))
        table = table.cast(SEGMENTS_SCHEMA)
        table = table.filter(pc.is_in(table.column("shard"), pa.array(in_part, pa.int64())))
        missing = set(in_part) - set(table.column("shard").to_pylist())
        if missing:
            raise ManifestError(f"{plan.display(name)}: the plan has no shard {min(missing)}; the plan and the "
                                "manifest disagree (start a fresh output to re-plan)")
        parts.append(table)
    segments = pa.concat_tables(parts)
    file_ids = sorted(set(segments.column("file").to_pylist()))
    with plan.fs.open_input_file(plan.path(FILES)) as f:
        files, read[FILES] = _read_range(pq.ParquetFile(f), "file", file_ids[0], file_ids[-1])
    files = files.filter(pc.is_in(files.column("file"), pa.array(file_ids, pa.int32())))
    dups = []
    for p in range(partitions):
        name = f"{DUPLICATES_DIR}/{duplicates_file(p)}"
        with plan.fs.open_input_file(plan.path(DUPLICATES_DIR, duplicates_file(p))) as f:
            table, read[name] = _read_segment_rows(pq.ParquetFile(f), segments)
        dups.append(table)
    duplicates = (pa.concat_tables(dups).sort_by([("file", "ascending"), ("row", "ascending")])
                  if dups else DUPLICATES_SCHEMA.empty_table())
    out = []
    for shard in shards:
        mine = segments.filter(pc.equal(segments.column("shard"), shard))
        mine_files = files.filter(pc.is_in(files.column("file"), mine.column("file")))
        out.append(ShardPlan(shard, mine, mine_files, _rows_in(duplicates, mine) if len(shards) > 1 else duplicates,
                             read))
    return out


def read_files(plan: Location) -> pa.Table:
    """All of ``files.parquet`` (O(files): for the driver's change check on resume)."""
    import pyarrow.parquet as pq

    with plan.fs.open_input_file(plan.path(FILES)) as f:
        return pq.read_table(f).cast(FILES_SCHEMA)


# ---------------------------------------------------------------------------------------------------


def _read_range(pf, column: str, lo: int, hi: int) -> tuple[pa.Table, list[int]]:
    """Rows of the row groups whose ``column`` statistics overlap ``[lo, hi]``, and which groups."""
    idx = pf.schema_arrow.get_field_index(column)
    groups = []
    for g in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(g).column(idx).statistics
        if st is None or not st.has_min_max or (st.min <= hi and st.max >= lo):
            groups.append(g)
    table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    return table.filter(pc.and_(pc.greater_equal(table.column(column), lo), pc.less_equal(table.column(column), hi))), groups


def _read_segment_rows(pf, segments: pa.Table) -> tuple[pa.Table, list[int]]:
    """Duplicate rows inside ``segments``, from a file sorted by (file, row): a row group is read only
    if its (file, row) statistics can hold one of the segments' rows."""
    fi = pf.schema_arrow.get_field_index("file")
    ri = pf.schema_arrow.get_field_index("row")
    spans = list(zip(*(segments.column(c).to_pylist() for c in ("file", "start", "stop"))))
    groups = []
    for g in range(pf.metadata.num_row_groups):
        rg = pf.metadata.row_group(g)
        if not rg.num_rows:
            continue
        fs, rs = rg.column(fi).statistics, rg.column(ri).statistics
        if fs is None or rs is None or not (fs.has_min_max and rs.has_min_max):
            groups.append(g)
            continue
        # sorted by (file, row): the group's first key is >= (min file, min row), its last <= (max file, max row)
        lo, hi = (fs.min, rs.min), (fs.max, rs.max)
        if any(lo <= (f, stop - 1) and (f, start) <= hi for f, start, stop in spans):
            groups.append(g)
    table = (pf.read_row_groups(groups) if groups else DUPLICATES_SCHEMA.empty_table()).cast(DUPLICATES_SCHEMA)
    return _rows_in(table, segments), groups


def _rows_in(table: pa.Table, segments: pa.Table) -> pa.Table:
    """The rows of ``table`` (file, row, ...) inside one of ``segments``' ``[start, stop)`` of its file."""
    keep = pa.array([False] * table.num_rows, pa.bool_())
    for f, start, stop in zip(*(segments.column(c).to_pylist() for c in ("file", "start", "stop"))):
        hit = pc.and_(pc.equal(table.column("file"), f),
                      pc.and_(pc.greater_equal(table.column("row"), start), pc.less(table.column("row"), stop)))
        keep = pc.or_(keep, hit)
    return table.filter(keep)


def _write_part(plan: Location, part: list[dict[str, int]], schema: pa.Schema, row_group: int) -> None:
    table = pa.Table.from_pylist(part, schema=schema)
    name = segments_file(part[0]["shard"]) if part else segments_file(0)
    plan.write_bytes(_parquet_bytes(table, row_group, stats=["shard"]), name)


def _parquet_bytes(table: pa.Table, row_group: int, stats: list[str]) -> bytes:
    """Parquet with statistics on the ``stats`` columns only: those a reader selects row groups by.
    (Statistics of the string columns would only make every reader's footer bigger.)"""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group, write_statistics=stats)
    return sink.getvalue().to_pybytes()
