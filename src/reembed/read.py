"""The read stage: one plan shard -> one Arrow table of documents, each row checked and tagged.

Rows that cannot be embedded keep flowing with a reason code in ``_reason`` (one of
:data:`reembed.schema.REASONS`, the first that applies) so the shard writer can dead-letter them: the
ledger counts every input row exactly once. Ids and texts take the canonical forms of
:mod:`reembed.schema`, the same from Parquet and from JSON Lines.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from reembed import schema as S
from reembed.plan import InputError, passthrough_value, input_location, misfit, passthrough_schema
from reembed.storage import Location

log = logging.getLogger(__name__)


class ShardDatasource(Datasource):
    """A Ray Data datasource with one read task per pending plan shard.

    Each read task carries ``source``, a :class:`~reembed.storage.Location` on the input's filesystem
    (the one the plan was made from; by default the plan's input root, opened here on the driver), so
    the storage settings it was opened with travel with the task.
    """

    def __init__(self, plan: dict[str, Any], shard_ids: list[int], duplicates: pa.Table,
                 source: Location | None = None):
        self._plan = plan
        self._source = source or input_location(plan)
        self._shards = [plan["shards"][i] for i in shard_ids]
        by_file: dict[int, set[int]] = {}
        for f, r in zip(duplicates.column("file").to_pylist(), duplicates.column("row").to_pylist()):
            by_file.setdefault(f, set()).add(r)
        self._dups = by_file

    def estimate_inmemory_data_size(self) -> int | None:
        total_rows = max(1, self._plan["rows"])
        size = sum(f["size"] for f in self._plan["files"])
        return int(size * sum(s["rows"] for s in self._shards) / total_rows)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        plan = self._plan
        for shard in self._shards:
            files = {seg["file"] for seg in shard["segments"]}
            dups = {f: self._dups.get(f, set()) for f in files}
            meta = BlockMetadata(
                num_rows=shard["rows"],
                size_bytes=None,
                exec_stats=None,
                input_files=tuple(plan["files"][f]["uri"] for f in sorted(files)),
            )
            tasks.append(ReadTask(_reader(self._source, plan, shard, dups), meta))
        return tasks


def read_shard(plan: dict[str, Any], shard: dict[str, Any], dups: dict[int, set[int]],
               source: Location | None = None) -> pa.Table:
    """Read every segment of ``shard`` and return its documents in plan order, each with its
    ``_reason`` (null for rows to embed). ``dups`` maps a file index to its duplicate rows (indexes
    within the file, as :func:`reembed.plan.make_plan` found them)."""
    fs = (source or input_location(plan)).fs
    pschema = passthrough_schema(plan)
    parts = []
    for seg in shard["segments"]:
        f = plan["files"][seg["file"]]
        if f["format"] == "parquet":
            part, flags = _read_parquet_segment(fs, f, seg, plan, pschema)
        else:
            part, flags = _read_jsonl_segment(fs, f, seg, plan, pschema)
        parts.append(_mark(part, dups.get(seg["file"], set()), seg, flags))
    table = pa.concat_tables(parts)
    n = table.num_rows
    if n != shard["rows"]:
        raise InputError(
            f"shard {shard['shard']}: read {n} rows where the plan has {shard['rows']}; "
            "an input file changed since the plan was made (start a fresh output to re-plan)"
        )
    table = table.append_column(S.SHARD, pa.array(np.full(n, shard["shard"], dtype=np.int32)))
    table = table.append_column(S.POS, pa.array(np.arange(n, dtype=np.int64)))
    return table


def _reader(source: Location, plan: dict[str, Any], shard: dict[str, Any], dups: dict[int, set[int]]):
    def read() -> Iterable[pa.Table]:
        yield read_shard(plan, shard, dups, source)

    return read


def _read_parquet_segment(fs, f: dict, seg: dict, plan: dict, pschema: pa.Schema) -> tuple[pa.Table, dict[str, np.ndarray]]:
    id_col, text_col = plan["id_column"], plan["text_column"]
    cols = list(dict.fromkeys([id_col, text_col, *plan["passthrough"]]))
    start, stop = seg["start"], seg["stop"]
    with fs.open_input_file(f["path"]) as fh:
        pf = pq.ParquetFile(fh)
        md = pf.metadata
        groups, first = [], None
        offset = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                if first is None:
                    first = offset
            offset += n
        raw = pf.read_row_groups(groups, columns=cols) if groups else pf.schema_arrow.empty_table().select(cols)
    raw = raw.slice(start - (first or 0), stop - start)
    n = raw.num_rows
    try:
        ids, invalid_id = S.id_strings(raw.column(id_col))
        text, invalid_text = S.text_strings(raw.column(text_col))
    except TypeError as e:
        raise InputError(f"{f['uri']}: {e} (the file changed since the plan was made?)") from e
    table = pa.table({
        S.ID: ids,
        S.TEXT: text,
        S.REASON: pa.nulls(n, pa.string()),
        S.SOURCE_FILE: pa.array([f["uri"]] * n, pa.string()),
        S.SOURCE_ROW: pa.array(np.arange(start, stop, dtype=np.int64)),
    })
    for field in pschema:
        table = table.append_column(field, raw.column(field.name).cast(field.type))
    return table, {S.INVALID_ID: invalid_id, S.INVALID_TEXT: invalid_text}


def _read_jsonl_segment(fs, f: dict, seg: dict, plan: dict, pschema: pa.Schema) -> tuple[pa.Table, dict[str, np.ndarray]]:
    id_col, text_col = plan["id_column"], plan["text_column"]
    if f["path"].endswith(".gz"):
        import gzip

        with fs.open_input_stream(f["path"]) as fh:
            data = gzip.decompress(fh.read())[seg["byte_start"]:seg["byte_end"]]
    else:
        with fs.open_input_file(f["path"]) as fh:
            fh.seek(seg["byte_start"])
            data = fh.read(seg["byte_end"] - seg["byte_start"])
    ids, texts, rows = [], [], []
    invalid_json, invalid_id, invalid_text = [], [], []
    extra: dict[str, list] = {c: [] for c in plan["passthrough"]}
    line_no = seg["line"]
    for line in data.split(b"\n"):
        if not line.strip():
            line_no += 1
            continue
        try:
            obj = json.loads(line)
        except ValueError:  # also UnicodeDecodeError: a line that is not UTF-8
            obj = None
        invalid_json.append(not isinstance(obj, dict))
        if not isinstance(obj, dict):
            obj = {}
        doc_id, bad_id = S.json_id(obj.get(id_col))
        text = obj.get(text_col)
        invalid_text.append(text is not None and not isinstance(text, str))
        ids.append(doc_id)
        invalid_id.append(bad_id)
        texts.append(text if isinstance(text, str) else None)
        rows.append(line_no)
        for c in extra:
            extra[c].append(passthrough_value(obj, c, text_col))
        line_no += 1
    want = seg["stop"] - seg["start"]
    if len(ids) != want:
        raise InputError(f"{f['uri']}: expected {want} documents from line {seg['line']}, found {len(ids)}; the file changed since the plan was made")
    table = pa.table({
        S.ID: pa.array(ids, pa.string()),
        S.TEXT: pa.array(texts, pa.string()),
        S.REASON: pa.nulls(len(ids), pa.string()),
        S.SOURCE_FILE: pa.array([f["uri"]] * len(ids), pa.string()),
        S.SOURCE_ROW: pa.array(rows, pa.int64()),
    })
    for field in pschema:
        try:
            col = pa.array(extra[field.name], type=field.type)
        except (pa.ArrowException, TypeError) as e:
            row = misfit(extra[field.name], field.type)
            at = f" (line {rows[row]}: {extra[field.name][row]!r})" if row is not None else ""
            raise InputError(
                f"{f['uri']}: passthrough column {field.name!r} does not fit type {field.type}{at}; "
                f"make the column's values one type, or leave it out of input.passthrough ({e})"
            ) from e
        table = table.append_column(field, col)
    flags = {S.INVALID_JSON: np.array(invalid_json, dtype=bool), S.INVALID_ID: np.array(invalid_id, dtype=bool),
             S.INVALID_TEXT: np.array(invalid_text, dtype=bool)}
    return table, flags


def _mark(table: pa.Table, dup_rows: set[int], seg: dict, flags: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Fill ``_reason`` for the rows that cannot be embedded: each gets the first code of
    :data:`reembed.schema.REASONS` that applies.

    ``dup_rows`` are duplicate rows by index within the file (not JSON Lines line numbers), as the plan
    found them; ``flags`` holds what the segment reader saw per row (``invalid_json``, ``invalid_id``,
    ``invalid_text``). Null, blank and duplicate checks come from the table itself.
    """
    n = table.num_rows
    flags = dict(flags or {})
    unknown = set(flags) - set(S.REASONS)
    if unknown:
        raise ValueError(f"not dead-letter reason codes: {sorted(unknown)} (add them to schema.REASONS)")
    ids, text = table.column(S.ID), table.column(S.TEXT)
    dup = np.zeros(n, dtype=bool)
    dup_idx = [r - seg["start"] for r in dup_rows if seg["start"] <= r < seg["stop"]]
    dup[dup_idx] = True
    found = {
        S.NULL_ID: _mask(pc.is_null(ids)),
        S.DUPLICATE_ID: dup,
        S.NULL_TEXT: _mask(pc.is_null(text)),
        S.EMPTY_TEXT: _mask(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), False)),
        **flags,
    }
    reasons = np.full(n, None, dtype=object)
    open_ = np.ones(n, dtype=bool)
    for code in S.REASONS:
        hit = found.get(code)
        if hit is None:
            continue
        hit = open_ & hit
        reasons[hit] = code
        open_ &= ~hit
    return table.set_column(table.schema.get_field_index(S.REASON), S.REASON, pa.array(reasons, pa.string()))


def _mask(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(a.to_numpy(zero_copy_only=False), dtype=bool)

