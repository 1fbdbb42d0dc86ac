"""Counting input rows at scale: Parquet footers, JSON Lines byte ranges, gzipped JSON Lines.

Each function takes a :class:`reembed.storage.Location` and a path relative to it, so a Ray task that
calls it carries its storage settings with it and needs no process-wide state. None of them loops in
Python per row: Parquet rows come from the footer, JSON Lines rows from a numpy scan of the bytes
(newline positions; lines holding only ASCII whitespace are blank and are not rows, as in
the read stage).

A JSON Lines file is cut into byte ranges (:data:`RANGE_BYTES`). A range owns the lines that *start* in
it; :func:`count_jsonl_range` returns their number, so a plan segment is ``(file, range_start, skip,
rows)``: :func:`jsonl_slice` finds the range's first line, skips ``skip`` rows with the same
vectorized scan and locates only its ``rows`` lines (the read stage parses each of them). No per-row
offsets are stored anywhere.

A ``.jsonl.gz`` file cannot be split: it is one range, and :func:`gz_line_slices` decompresses it once
and locates the rows of every shard that reads from it.

Every scan reports the file's size and its mtime (filesystems) or ETag (S3), for a resume to refuse an
input that changed under its plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from reembed import cluster
from reembed.errors import InputError
from reembed.schema import id_strings
from reembed.storage import Location

log = logging.getLogger(__name__)

RANGE_BYTES = 64 * 1024 * 1024
"""Bytes of JSON Lines per counting range: one scan task's read."""

LINE = "_line"
"""Column of the parsed rows (:func:`_parse`): the row's 0-based line number in its file
(blank lines counted), given the ``first_line`` of its range."""

INVALID = "_invalid_json"
"""Column of the parsed rows (:func:`_parse`): the line is not a JSON object (its other
columns are null; the read stage dead-letters it as ``invalid_json``)."""

_CHUNK = 8 * 1024 * 1024  # bytes per read; a range is scanned in chunks of this size


@dataclass(frozen=True)
class FileStat:
    """What identifies one version of an input file: its size and its mtime (ns) or S3 ETag."""

    path: str
    size: int
    mtime_ns: int | None = None
    etag: str | None = None


@dataclass(frozen=True)
class ParquetCount:
    stat: FileStat
    rows: int
    row_groups: int
    columns: tuple[str, ...]


@dataclass(frozen=True)
class RangeCount:
    """The lines starting in ``[range_start, range_stop)`` of a JSON Lines file.

    ``first_line_start`` is the byte offset of the first of them (``range_stop`` or beyond when none
    starts there), ``rows`` the non-blank ones, ``lines`` all of them (blank too: summed over the earlier
    ranges they give a range's first line number). The file's first range (and a ``.gz`` file's only
    one) carries the file's :class:`FileStat`, taken before its bytes are read.
    """

    range_start: int
    range_stop: int
    first_line_start: int
    rows: int
    lines: int
    stat: FileStat | None = None


@dataclass(frozen=True)
class JsonlScan:
    stat: FileStat
    ranges: tuple[RangeCount, ...]

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.ranges)


def is_gzip(path: str) -> bool:
    return path.lower().endswith(".gz")


def stat_file(loc: Location, path: str) -> FileStat:
    """Size and mtime (or ETag on S3) of ``path`` under ``loc``; :class:`InputError` if it is missing."""
    info = loc.fs.get_file_info(loc.path(path))
    if info.type != pafs.FileType.File:
        raise InputError(f"{loc.display(path)}: no such input file (it was listed, then removed?); re-run the plan")
    etag = loc.version(path) if loc.fs.type_name == "s3" else None
    mtime = info.mtime_ns if info.mtime is not None else None
    return FileStat(path=path, size=info.size, mtime_ns=mtime, etag=etag)


def count_parquet(loc: Location, path: str) -> ParquetCount:
    """Rows of a Parquet file from its footer alone: no data page is read."""
    import pyarrow.parquet as pq

    stat = stat_file(loc, path)
    try:
        with loc.fs.open_input_file(loc.path(path)) as f:
            md = pq.read_metadata(f)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{loc.display(path)}: cannot read the Parquet footer ({type(e).__name__}: {e}); "
                         "fix or remove the file") from e
    return ParquetCount(stat, md.num_rows, md.num_row_groups, tuple(md.schema.to_arrow_schema().names))


def jsonl_ranges(size: int, range_bytes: int = RANGE_BYTES) -> list[tuple[int, int]]:
    """``[start, stop)`` byte ranges covering a file of ``size`` bytes (one empty range for an empty file)."""
    if range_bytes < 1:
        raise ValueError(f"range_bytes must be positive, got {range_bytes}")
    if size <= 0:
        return [(0, 0)]
    return [(s, min(s + range_bytes, size)) for s in range(0, size, range_bytes)]


def count_jsonl_range(loc: Location, path: str, range_start: int, range_stop: int) -> RangeCount:
    """Count the lines that start in ``[range_start, range_stop)`` of an uncompressed JSON Lines file.

    Reads the range, plus the rest of its last line (up to the next newline) when that line runs past
    ``range_stop``; never more.
    """
    stat = stat_file(loc, path) if range_start <= 0 else None
    with loc.fs.open_input_file(loc.path(path)) as f:
        size = f.size()
        first = _first_line_start(f, range_start, size)
        counter = _LineCounter()
        pos = first
        while pos < min(range_stop, size):
            chunk = f.read_at(min(_CHUNK, range_stop - pos), pos)
            counter.feed(chunk)
            pos += len(chunk)
        while counter.open and pos < size:  # finish the last line, which started in the range
            chunk = f.read_at(min(_CHUNK, size - pos), pos)
            nl = chunk.find(b"\n")
            counter.feed(chunk if nl < 0 else chunk[: nl + 1])
            pos += len(chunk)
    rows, lines = counter.finish()
    return RangeCount(range_start, range_stop, first, rows, lines, stat)


def scan_jsonl(loc: Location, path: str, range_bytes: int = RANGE_BYTES) -> JsonlScan:
    """Every range of one JSON Lines file, counted in this process (a ``.gz`` file: one range, read
    once). A distributed plan calls :func:`count_jsonl_range` / :func:`count_gz` as tasks instead."""
    if is_gzip(path):
        count = count_gz(loc, path)
        return JsonlScan(count.stat, (count,))
    stat = stat_file(loc, path)
    ranges = [count_jsonl_range(loc, path, s, e) for s, e in jsonl_ranges(stat.size, range_bytes)]
    return JsonlScan(ranges[0].stat, tuple(ranges))


def count_gz(loc: Location, path: str) -> RangeCount:
    """Count the rows of a gzipped JSON Lines file in one streaming pass (one range: ``(0, size)``)."""
    stat = stat_file(loc, path)
    counter = _LineCounter()
    with _open_gz(loc, path) as f:
        while chunk := f.read(_CHUNK):
            counter.feed(chunk)
    rows, lines = counter.finish()
    return RangeCount(0, stat.size, 0, rows, lines, stat)


@dataclass(frozen=True)
class LineSlice:
    """Non-blank lines of a JSON Lines buffer, located without parsing them: line ``i`` is
    ``buf[starts[i]:ends[i]]`` (newline excluded) and has 0-based line number ``numbers[i]`` in its file."""

    buf: bytes
    starts: np.ndarray
    ends: np.ndarray
    numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def lines(self) -> Iterable[tuple[int, bytes]]:
        """``(line number, line bytes)`` of each row."""
        buf = self.buf
        for s, e, n in zip(self.starts.tolist(), self.ends.tolist(), self.numbers.tolist()):
            yield n, buf[s:e]


def jsonl_slice(loc: Location, path: str, range_start: int, skip: int, rows: int, first_line: int = 0) -> LineSlice:
    """The ``rows`` documents of an uncompressed JSON Lines file after the first ``skip`` non-blank lines
    starting at or after ``range_start``, located but not parsed (the read stage parses each line); line
    numbers count from ``first_line`` at the range's first line. :class:`InputError` if the file holds
    fewer rows than asked (it changed since the plan)."""
    if rows <= 0:
        return LineSlice(b"", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    lines, buf = _locate(loc, path, range_start, skip, rows)
    return _slice(lines, buf, skip, rows, first_line)


def gz_line_slices(loc: Location, path: str, slices: Iterable[tuple[int, int]]) -> list[LineSlice]:
    """Decompress a gzipped JSON Lines file once and locate, for each ``(skip, rows)``, its rows (as
    :func:`jsonl_slice`); the slices share the one decompressed buffer."""
    with _open_gz(loc, path) as f:
        buf = f.read()
    lines = _Lines(buf, final=True)
    out = []
    for skip, rows in slices:
        if lines.rows < skip + rows:
            raise InputError(
                f"{loc.display(path)}: expected {skip + rows} documents, found {lines.rows}; "
                "the file changed since the plan was made (re-plan with --fresh)"
            )
        out.append(_slice(lines, buf, skip, rows, 0))
    return out


def _slice(lines: "_Lines", buf: bytes, skip: int, rows: int, first_line: int) -> LineSlice:
    lo, hi = skip, skip + rows
    return LineSlice(buf, lines.starts[lo:hi], lines.ends[lo:hi], lines.numbers[lo:hi] + first_line)


def _locate(loc: Location, path: str, range_start: int, skip: int, rows: int) -> tuple["_Lines", bytes]:
    """Read from the first line at or after ``range_start`` until ``skip + rows`` non-blank lines are in."""
    with loc.fs.open_input_file(loc.path(path)) as f:
        size = f.size()
        start = _first_line_start(f, range_start, size)
        buf = b""
        want = max(_CHUNK // 8, (skip + rows) * 256)
        while True:
            more = f.read_at(min(want, size - start - len(buf)), start + len(buf)) if start + len(buf) < size else b""
            buf += more
            at_eof = start + len(buf) >= size
            lines = _Lines(buf, final=at_eof)
            if lines.rows >= skip + rows or at_eof:
                break
            want = len(buf)  # double the read
    if lines.rows < skip + rows:
        raise InputError(
            f"{loc.display(path)}: expected {skip + rows} documents from byte {range_start}, found {lines.rows}; "
            "the file changed since the plan was made (re-plan with --fresh)"
        )
    return lines, buf


def _parse_located(ls: LineSlice, id_column: str | None) -> pa.Table:
    """:func:`_parse` of rows already located in their buffer."""
    rows = len(ls)
    piece = pa.py_buffer(ls.buf)[int(ls.starts[0]):int(ls.ends[-1])]
    table = _parse_fast(piece, rows, id_column)
    if table is None:
        table = _parse_slow(ls.buf, ls.starts, ls.ends, id_column)
    else:
        table = table.append_column(INVALID, pa.array(np.zeros(rows, dtype=bool)))
    return table.append_column(LINE, pa.array(ls.numbers, pa.int64()))


def parquet_ids(loc: Location, path: str, id_column: str) -> pa.Array:
    """The id column of a Parquet file (only that column is read), as canonical string ids."""
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(loc.path(path)) as f:
        ids = pq.ParquetFile(f).read(columns=[id_column]).column(0)
    return canonical_ids(ids, loc.display(path))


def jsonl_ids(loc: Location, path: str, range_start: int, range_stop: int, id_column: str) -> tuple[RangeCount, pa.Array]:
    """Count the rows starting in a range (as :func:`count_jsonl_range`) and return their canonical ids.

    A ``.gz`` file is one range: ``range_start``/``range_stop`` are ignored and the file is read once.
    """
    stat = stat_file(loc, path) if is_gzip(path) or range_start <= 0 else None
    if is_gzip(path):
        with _open_gz(loc, path) as f:
            buf = f.read()
        range_start, range_stop, first = 0, stat.size, 0
    else:
        with loc.fs.open_input_file(loc.path(path)) as f:
            size = f.size()
            first = _first_line_start(f, range_start, size)
            stop = min(range_stop, size)
            buf = f.read_at(stop - first, first) if first < stop else b""
            if buf and not buf.endswith(b"\n") and stop < size:  # the last line runs past the range
                pos = stop
                while pos < size:
                    chunk = f.read_at(min(_CHUNK, size - pos), pos)
                    nl = chunk.find(b"\n")
                    buf += chunk if nl < 0 else chunk[: nl + 1]
                    pos += len(chunk)
                    if nl >= 0:
                        break
    lines = _Lines(buf, final=True)
    ids = _ids_of(lines, buf, id_column, loc.display(path))
    return RangeCount(range_start, range_stop, first, lines.rows, lines.lines, stat), ids


def canonical_ids(ids: pa.Array | pa.ChunkedArray, where: str) -> pa.Array:
    """String ids of an Arrow id column (invalid ids are null here: they are never duplicates)."""
    return arrow_ids(ids, where)[0]


def canonical_json_ids(ids: pa.Array | pa.ChunkedArray, where: str) -> pa.Array:
    """String ids of a JSON id column as :func:`_parse` returns it, equal to
    :func:`reembed.schema.json_id` applied to each parsed value."""
    return json_ids(ids, where)[0]


def arrow_ids(ids: pa.Array | pa.ChunkedArray, where: str) -> tuple[pa.Array, np.ndarray]:
    """The one id canonicalisation for Arrow columns (:func:`reembed.schema.id_strings`): ``(ids,
    invalid)``; a column type that cannot hold ids is an :class:`InputError` naming ``where``."""
    try:
        return id_strings(ids)
    except TypeError as e:
        raise InputError(f"{where}: id column cannot hold ids ({e}); set input.id_column to a string or "
                         "number column") from e


def json_ids(ids: pa.Array | pa.ChunkedArray, where: str) -> tuple[pa.Array, np.ndarray]:
    """:func:`arrow_ids` for an id column parsed from JSON: objects and lists are invalid ids (as
    :func:`reembed.schema.json_id` says of each value), not a column error."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_nested(ids.type):
        return pa.nulls(len(ids), pa.string()), np.asarray(ids.is_valid(), dtype=bool)
    return arrow_ids(ids, where)



def run_tasks(fn: Callable[..., Any], args: list[tuple], use_ray: bool, num_cpus: float = 0.5) -> list[Any]:
    """``[fn(*a) for a in args]``, as Ray tasks of ``num_cpus`` each when ``use_ray`` (so a small machine
    keeps CPUs for the rest; Ray runs as many at once as the cluster's CPUs allow). A
    :class:`ReembedError` raised in a task comes out as itself, not wrapped by Ray."""
    if not use_ray:
        return [fn(*a) for a in args]
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=3, retry_exceptions=[OSError])(fn)
    return cluster.get([remote.remote(*a) for a in args])


# ---------------------------------------------------------------------------------------------------


class _LineCounter:
    """Counts lines and non-blank lines over bytes fed in order, without a Python loop per line."""

    def __init__(self) -> None:
        self.rows = 0
        self.lines = 0
        self.open = False  # a line has started and its newline has not been seen yet
        self._open_nonblank = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        b = np.frombuffer(chunk, dtype=np.uint8)
        nl = np.flatnonzero(b == 10)
        starts = np.concatenate(([0], nl + 1))
        starts = starts[starts < len(b)]
        nonblank = _nonblank(b, starts, np.concatenate((nl, [len(b)]))[:len(starts)])
        closed = len(nl)
        if closed:
            nonblank[0] |= self._open_nonblank
            self.rows += int(np.count_nonzero(nonblank[:closed]))
            self.lines += closed
            self.open = len(starts) > closed
            self._open_nonblank = bool(nonblank[closed]) if self.open else False
        else:
            self.open = True
            self._open_nonblank = self._open_nonblank or bool(nonblank[0])

    def finish(self) -> tuple[int, int]:
        """(rows, lines), counting an unterminated last line."""
        if self.open:
            return self.rows + int(self._open_nonblank), self.lines + 1
        return self.rows, self.lines


class _Lines:
    """The lines of a buffer that begins at a line start: where each non-blank one starts and ends
    (its newline excluded) and its 0-based line number. Unless ``final``, an unterminated last line is
    left out (more bytes may follow)."""

    def __init__(self, buf: bytes, final: bool) -> None:
        b = np.frombuffer(buf, dtype=np.uint8)
        nl = np.flatnonzero(b == 10)
        starts = np.concatenate(([0], nl + 1))
        ends = np.concatenate((nl, [len(b)]))
        keep = starts < len(b) if final else np.arange(len(starts)) < len(nl)
        starts, ends = starts[keep], ends[keep]
        nonblank = _nonblank(b, starts, ends)
        self.lines = len(starts)
        idx = np.flatnonzero(nonblank)
        self.starts, self.ends, self.numbers = starts[idx], ends[idx], idx
        self.rows = len(idx)


def _nonblank(b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each line ``b[starts[i]:ends[i]]`` holds a byte that is not whitespace. A line whose first
    byte is not whitespace (a JSON object's ``{``: nearly every line) is decided by that byte; only the
    others are scanned, so the cost is per line, not per byte."""
    if not len(starts):
        return np.zeros(0, dtype=bool)
    sized = ends > starts
    nonblank = sized & _non_space(b[np.minimum(starts, len(b) - 1)])
    doubt = np.flatnonzero(sized & ~nonblank)
    if len(doubt):
        lo, lens = starts[doubt], ends[doubt] - starts[doubt]
        at = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        nonblank[doubt] = np.logical_or.reduceat(_non_space(b[at]), np.cumsum(lens) - lens)
    return nonblank


def _non_space(b: np.ndarray) -> np.ndarray:
    """True where a byte is not what ``bytes.strip()`` strips (\\t \\n \\v \\f \\r and space). Two
    comparisons: uint8 arithmetic wraps, so ``b - 9 < 5`` holds for 9..13 only (a lookup table is 10x slower)."""
    return (b != 32) & ((b - np.uint8(9)) >= 5)


def _first_line_start(f, range_start: int, size: int) -> int:
    """Byte offset of the first line starting at or after ``range_start`` (``size`` if none)."""
    if range_start <= 0:
        return 0
    pos = range_start - 1  # range_start is a line start iff the byte before it is a newline
    while pos < size:
        chunk = f.read_at(min(64 * 1024, size - pos), pos)
        nl = chunk.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(chunk)
    return size


def _open_gz(loc: Location, path: str):
    """A decompressing stream: pyarrow decompresses by the ``.gz`` extension, so it is asked exactly
    once, explicitly, and the bytes are never decompressed a second time."""
    return loc.fs.open_input_stream(loc.path(path), compression="gzip")


def _parse(lines: _Lines, buf: bytes, skip: int, rows: int, first_line: int, id_column: str | None) -> pa.Table:
    return _parse_located(_slice(lines, buf, skip, rows, first_line), id_column)


def _parse_fast(piece: pa.Buffer, rows: int, id_column: str | None) -> pa.Table | None:
    """pyarrow's JSON reader over the whole piece, or None where its result could differ from parsing
    each line with ``json`` (an invalid line, bytes that are not UTF-8, a type change between lines,
    strings read as timestamps, two objects on one line, ids that are floats: Arrow reads 7 beside 7.5 as 7.0, ``json`` as 7)."""
    import pyarrow.json as pj

    if not _utf8(piece):
        return None
    try:
        table = pj.read_json(pa.BufferReader(piece), read_options=pj.ReadOptions(block_size=max(1 << 20, piece.size + 1)))
    except pa.ArrowException:
        return None
    if table.num_rows != rows or any(_inferred_from_string(f.type) for f in table.schema):
        return None
    if id_column in table.column_names and pa.types.is_floating(table.schema.field(id_column).type):
        return None
    return table


def _inferred_from_string(t: pa.DataType) -> bool:
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return True
    if pa.types.is_struct(t):
        return any(_inferred_from_string(f.type) for f in t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _inferred_from_string(t.value_type)
    return False


def _parse_slow(buf: bytes, starts: np.ndarray, ends: np.ndarray, id_column: str | None) -> pa.Table:
    """Line by line with ``json``: a line that is not a JSON object becomes a row of nulls flagged
    :data:`INVALID`; the id column, and a column whose values do not share one Arrow type, keep
    :func:`reembed.schema.json_id`'s string of each value (Arrow would turn 2 beside 7.5 into 2.0)."""
    from reembed.schema import json_id

    objs: list[dict] = []
    invalid: list[bool] = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        try:
            obj = json.loads(buf[s:e])
        except ValueError:
            obj = None
        ok = isinstance(obj, dict)
        objs.append(obj if ok else {})
        invalid.append(not ok)
    keys = list(dict.fromkeys(k for o in objs for k in o))
    cols: dict[str, Any] = {}
    for k in keys:
        values = [o.get(k) for o in objs]
        if k == id_column:
            cols[k] = pa.array([json_id(v)[0] for v in values], pa.string())
            continue
        try:
            cols[k] = pa.array(values)
        except (pa.ArrowException, TypeError, OverflowError):
            cols[k] = pa.array([json_id(v)[0] for v in values], pa.string())
    cols[INVALID] = pa.array(invalid, pa.bool_())
    return pa.table(cols)


def _ids_of(lines: _Lines, buf: bytes, id_column: str, where: str) -> pa.Array:
    """The canonical ids of every row of ``lines``: the id column alone where pyarrow can read it (the
    other fields are checked as JSON, not built), else from the whole parse (:func:`_parse`)."""
    if not lines.rows:
        return pa.array([], pa.string())
    piece = pa.py_buffer(buf)[int(lines.starts[0]):int(lines.ends[-1])]
    first = buf[int(lines.starts[0]):int(lines.ends[0])]
    ids = _parse_ids_fast(piece, lines.rows, id_column, first)
    if ids is None:
        table = _parse(lines, buf, 0, lines.rows, 0, id_column)
        if id_column not in table.column_names:
            return pa.nulls(lines.rows, pa.string())
        ids = table.column(id_column)
    return canonical_json_ids(ids, where)


def _parse_ids_fast(piece: pa.Buffer, rows: int, id_column: str, first: bytes) -> pa.ChunkedArray | None:
    """The id column of ``rows`` JSON objects, read by pyarrow with the other fields ignored, or None
    where :func:`_parse_fast` would not give the same: the id type is taken from the first row (a string
    or an integer; anything else -> None), and pyarrow refuses any row whose id has another type (7.5
    beside 7, a bool, an object), a line that is not JSON or not one object; invalid UTF-8 -> None."""
    import pyarrow.json as pj

    try:
        value = json.loads(first).get(id_column)
    except (ValueError, AttributeError):
        return None
    if isinstance(value, str):
        type_ = pa.string()
    elif isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
        type_ = pa.int64()
    else:
        return None
    if not _utf8(piece):
        return None
    options = pj.ParseOptions(explicit_schema=pa.schema([(id_column, type_)]), unexpected_field_behavior="ignore")
    try:
        table = pj.read_json(pa.BufferReader(piece), parse_options=options,
                             read_options=pj.ReadOptions(block_size=max(1 << 20, piece.size + 1)))
    except pa.ArrowException:
        return None
    return table.column(0) if table.num_rows == rows else None


def _utf8(piece: pa.Buffer) -> bool:
    """Whether the bytes are valid UTF-8 (pyarrow's JSON reader does not check; ``json`` refuses a line
    that is not, and the read stage dead-letters it as ``invalid_json``). Arrow's validation, no copy."""
    offsets = pa.py_buffer(np.array([0, piece.size], dtype=np.int64))
    try:
        pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, piece]).cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True
