"""The read stage: one plan shard -> one Arrow table of documents, each row checked and tagged.

Rows that cannot be embedded keep flowing with a reason code in ``_reason`` so the shard writer can
dead-letter them: the ledger counts every input row exactly once.
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
from reembed import storage
from reembed.plan import InputError, json_id, passthrough_schema

log = logging.getLogger(__name__)


class ShardDatasource(Datasource):
    """A Ray Data datasource with one read task per pending plan shard."""

    def __init__(self, plan: dict[str, Any], shard_ids: list[int], duplicates: pa.Table):
        self._plan = plan
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
            tasks.append(ReadTask(_reader(plan, shard, dups), meta))
        return tasks


def _reader(plan: dict[str, Any], shard: dict[str, Any], dups: dict[int, set[int]]):
    settings = storage.settings()  # S3 endpoint and region from the job config; credentials stay on each node

    def read() -> Iterable[pa.Table]:
        storage.configure(settings)
        yield read_shard(plan, shard, dups)

    return read


def read_shard(plan: dict[str, Any], shard: dict[str, Any], dups: dict[int, set[int]]) -> pa.Table:
    """Read every segment of ``shard`` and return its documents in plan order."""
    fs, _ = storage.resolve(plan["input_uri"].rsplit("*", 1)[0] if "*" in plan["input_uri"] else plan["input_uri"])
    pschema = passthrough_schema(plan)
    parts = []
    for seg in shard["segments"]:
        f = plan["files"][seg["file"]]
        if f["format"] == "parquet":
            part = _read_parquet_segment(fs, f, seg, plan, pschema)
        else:
            part = _read_jsonl_segment(fs, f, seg, plan, pschema)
        parts.append(_mark(part, dups.get(seg["file"], set()), seg))
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


def _read_parquet_segment(fs, f: dict, seg: dict, plan: dict, pschema: pa.Schema) -> pa.Table:
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
    text = raw.column(text_col)
    reasons = pa.nulls(n, pa.string())
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type) or pa.types.is_null(text.type)):
        try:
            text = pc.cast(text, pa.string())
        except pa.ArrowException:
            text = pa.nulls(n, pa.string())
            reasons = pa.array([S.INVALID_TEXT] * n, pa.string())
    table = pa.table({
        S.ID: _as_string(raw.column(id_col)),
        S.TEXT: pc.cast(text, pa.string()) if not pa.types.is_string(text.type) else text,
        S.REASON: reasons,
        S.SOURCE_FILE: pa.array([f["uri"]] * n, pa.string()),
        S.SOURCE_ROW: pa.array(np.arange(start, stop, dtype=np.int64)),
    })
    for field in pschema:
        table = table.append_column(field, raw.column(field.name).cast(field.type))
    return table


def _read_jsonl_segment(fs, f: dict, seg: dict, plan: dict, pschema: pa.Schema) -> pa.Table:
    id_col, text_col = plan["id_column"], plan["text_column"]
    if f["path"].endswith(".gz"):
        import gzip

        with fs.open_input_stream(f["path"]) as fh:
            data = gzip.decompress(fh.read())[seg["byte_start"]:seg["byte_end"]]
    else:
        with fs.open_input_file(f["path"]) as fh:
            fh.seek(seg["byte_start"])
            data = fh.read(seg["byte_end"] - seg["byte_start"])
    ids, texts, reasons, rows = [], [], [], []
    extra: dict[str, list] = {c: [] for c in plan["passthrough"]}
    line_no = seg["line"]
    for line in data.split(b"\n"):
        if not line.strip():
            line_no += 1
            continue
        reason = None
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            obj, reason = {}, S.INVALID_JSON
        text = obj.get(text_col)
        if text is not None and not isinstance(text, str):
            text, reason = None, reason or S.INVALID_TEXT
        ids.append(json_id(obj.get(id_col)))
        texts.append(text)
        reasons.append(reason)
        rows.append(line_no)
        for c in extra:
            extra[c].append(obj.get(c))
        line_no += 1
    want = seg["stop"] - seg["start"]
    if len(ids) != want:
        raise InputError(f"{f['uri']}: expected {want} documents from line {seg['line']}, found {len(ids)}; the file changed since the plan was made")
    table = pa.table({
        S.ID: pa.array(ids, pa.string()),
        S.TEXT: pa.array(texts, pa.string()),
        S.REASON: pa.array(reasons, pa.string()),
        S.SOURCE_FILE: pa.array([f["uri"]] * len(ids), pa.string()),
        S.SOURCE_ROW: pa.array(rows, pa.int64()),
    })
    for field in pschema:
        try:
            col = pa.array(extra[field.name], type=field.type)
        except (pa.ArrowException, TypeError) as e:
            raise InputError(f"{f['uri']}: passthrough column {field.name!r} does not fit type {field.type} ({e})") from e
        table = table.append_column(field, col)
    return table


def _mark(table: pa.Table, dup_rows: set[int], seg: dict) -> pa.Table:
    """Fill ``_reason`` for rows that cannot be embedded (the first reason that applies wins)."""
    n = table.num_rows
    reasons = table.column(S.REASON).to_pylist()
    ids = table.column(S.ID)
    text = table.column(S.TEXT)
    null_id = pc.is_null(ids).to_pylist()
    null_text = pc.is_null(text).to_pylist()
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), False).to_pylist()
    # Duplicates are keyed by row index within the file (not line number for JSONL).
    dup_idx = {r - seg["start"] for r in dup_rows if seg["start"] <= r < seg["stop"]}
    for i in range(n):
        if reasons[i] is not None:
            continue
        if null_id[i]:
            reasons[i] = S.NULL_ID
        elif i in dup_idx:
            reasons[i] = S.DUPLICATE_ID
        elif null_text[i]:
            reasons[i] = S.NULL_TEXT
        elif blank[i]:
            reasons[i] = S.EMPTY_TEXT
    return table.set_column(table.schema.get_field_index(S.REASON), S.REASON, pa.array(reasons, pa.string()))


def _as_string(ids: pa.ChunkedArray) -> pa.Array:
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if pa.types.is_string(ids.type):
        return ids
    if pa.types.is_null(ids.type):
        return pa.nulls(len(ids), pa.string())
    return pc.cast(ids, pa.string())
