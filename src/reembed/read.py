"""The read stage: plan shards -> Arrow tables of documents, each row checked and tagged.

Rows that cannot be embedded keep flowing with a reason code in ``_reason`` (one of
:data:`reembed.schema.REASONS`, the first that applies) so the shard writer can dead-letter them: the
ledger counts every input row exactly once. Ids and texts take the canonical forms of
:mod:`reembed.schema`, the same from Parquet and from JSON Lines.

A read task carries only its shard ids (as runs of consecutive shards), the plan folder's and the
input's Locations and a few plan fields (a few KB whatever the size of the plan); on the worker it reads
its own segments and duplicate rows from the plan's Parquet (:func:`reembed.plan_store.read_shard`) and
yields one table per shard. The shards that read one ``.gz`` file share one task, which decompresses the
file once. Consecutive shards share a task: :data:`SHARDS_PER_TASK` at least, and more so that there
are at most :data:`MAX_READ_TASKS` tasks. Ray Data ``ray.put``s every read task on the driver before the
first one starts (~10 ms each on a loaded machine: 480 s at 50,000 one-shard tasks), so the time to the
first block follows the task count, not the shard count; and its executor's driver CPU is mostly per task.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from reembed import plan_store, reuse, scan, texts
from reembed import schema as S
from reembed.plan import PLAN_DIR, InputError, input_location, misfit, passthrough_schema, passthrough_value
from reembed.storage import Location

log = logging.getLogger(__name__)

FIELDS = ("id_column", "text_column", "passthrough", "passthrough_schema", "reuse", "texts")
"""The plan summary's fields a read task carries (``reuse``: the summary of :func:`reembed.reuse.plan_reuse`,
absent unless the run reuses an earlier output; ``texts``: that of :func:`reembed.texts.plan_texts`, absent
when identical texts are not looked for across shards)."""
MAX_READ_TASKS = 2048
"""Read tasks of one dataset at most: above it, consecutive shards share a task (see the module's doc)."""
SHARDS_PER_TASK = 4
"""Shards a read task takes at least (when there are that many): Ray Data's executor costs the driver
~27 ms of CPU per read task on the 2-core VM, against ~4 ms per shard (bench/RESULTS.md, issue 12)."""
FILES_NAMED = 4
"""Input files a read task's metadata names (Ray Data's statistics only): its size stays O(1)."""


class ShardDatasource(Datasource):
    """A Ray Data datasource over the pending shards of a plan: read tasks of consecutive shards,
    ``per_task`` at least (default :data:`SHARDS_PER_TASK`) and at most ``max_tasks`` tasks (default
    :data:`MAX_READ_TASKS`); the shards that share a ``.gz`` file are always in one task.

    ``out`` is the output (the plan is under ``out/plan``); ``source`` a Location on the input's
    filesystem (by default the plan's input root, opened here), so the storage settings it was opened
    with travel with the tasks. ``index`` is :func:`reembed.plan_store.segment_index` if the caller has
    read it already.
    """

    def __init__(self, plan: dict[str, Any], out: Location, pending: list[int], source: Location | None = None,
                 index: pa.Table | None = None, max_tasks: int = MAX_READ_TASKS, per_task: int = SHARDS_PER_TASK,
                 earlier: Location | None = None):
        self._fields = {k: plan.get(k) for k in FIELDS}
        if self._fields["reuse"]:  # the --reuse output, opened with the job's storage settings
            self._fields["earlier"] = earlier or Location.from_uri(plan["reuse"]["uri"])
        self._plan_loc = out.child(PLAN_DIR)
        self._source = source or input_location(plan)
        index = index if index is not None else plan_store.segment_index(self._plan_loc, plan["shards"])
        files = plan_store.read_files(self._plan_loc).select(["file", "path", "uri", "size"])
        files = files.filter(pc.greater_equal(files.column("file"), 0)).sort_by("file")
        self._uris = files.column("uri").to_pylist()
        sizes = files.column("size").to_pylist()
        gz = {i for i, p in enumerate(files.column("path").to_pylist()) if scan.is_gzip(p)}
        groups, self._rows, self._files = _group(index, pending, gz)
        self._groups = pack_groups(groups, max_tasks, per_task)
        rows = max(1, plan["rows"])
        self._size = int(sum(sizes) * sum(self._rows.values()) / rows)

    @property
    def num_tasks(self) -> int:
        return len(self._groups)

    def estimate_inmemory_data_size(self) -> int | None:
        return self._size

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        for group in self._groups:
            files = sorted({f for s in group for f in self._files[s]})
            meta = BlockMetadata(num_rows=sum(self._rows[s] for s in group), size_bytes=None, exec_stats=None,
                                 input_files=tuple(self._uris[f] for f in files[:FILES_NAMED]))
            tasks.append(ReadTask(_reader(self._fields, self._plan_loc, shard_runs(group), self._source), meta))
        return tasks


def pack_groups(groups: list[list[int]], max_tasks: int = MAX_READ_TASKS, per_task: int = 1) -> list[list[int]]:
    """Consecutive ``groups`` (each a read task's shards, in shard order) packed into tasks of at most
    ``per_task`` shards, or more so that there are at most about ``max_tasks``; a group is never split."""
    if len(groups) > max_tasks:
        per_task = max(per_task, -(-sum(len(g) for g in groups) // max(1, max_tasks)))
    if per_task <= 1:
        return groups
    packed: list[list[int]] = []
    for g in groups:
        if packed and len(packed[-1]) + len(g) <= per_task:
            packed[-1].extend(g)
        else:
            packed.append(list(g))
    return packed


def shard_runs(shards: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """``shards`` (ascending) as runs ``(first, stop)`` of consecutive numbers: what a read task carries,
    a few bytes for a fresh run's consecutive shards however many."""
    runs: list[list[int]] = []
    for s in shards:
        if runs and runs[-1][1] == s:
            runs[-1][1] = s + 1
        else:
            runs.append([s, s + 1])
    return tuple((a, b) for a, b in runs)


def read_shards(fields: dict[str, Any], plan_loc: Location, shards: Iterable[int], source: Location) -> Iterator[pa.Table]:
    """Read each of ``shards`` (from the plan under ``plan_loc``) and yield its documents in plan order,
    each with its ``_reason`` (null for rows to embed), its shard and its position in the shard. A
    ``.gz`` file is decompressed once for all of them."""
    plans = plan_store.read_shards(plan_loc, shards)
    gz_slices: dict[str, list[tuple[int, int]]] = {}
    for sp in plans:
        paths = dict(zip(sp.files.column("file").to_pylist(), sp.files.column("path").to_pylist()))
        for seg in sp.segments.to_pylist():
            if scan.is_gzip(paths[seg["file"]]):
                gz_slices.setdefault(paths[seg["file"]], []).append((seg["start"], seg["rows"]))
    gz = {path: dict(zip(slices, scan.gz_line_slices(source, path, slices))) for path, slices in gz_slices.items()}
    pschema = passthrough_schema(fields)
    reusing = bool(fields.get("reuse")) and fields.get("earlier") is not None
    carried = reuse.shards_reuse(plan_loc, [sp.shard for sp in plans], fields["reuse"]["partitions"]) if reusing else {}
    moved = None
    if fields.get("texts") and plans:  # identical texts: the task's moved rows, each followers part read once
        moved = texts.followers(plan_loc, min(sp.shard for sp in plans), max(sp.shard for sp in plans),
                                int(fields["texts"]["partitions"]))
    for sp in plans:
        table = _read_one(fields, sp, source, pschema, gz)
        if moved is not None:
            table = texts.mark(table, moved)
        if reusing:
            table = reuse.attach(table, plan_loc, fields["reuse"], fields["earlier"], carried[sp.shard])
        yield table


def read_shard(fields: dict[str, Any], plan_loc: Location, shard: int, source: Location) -> pa.Table:
    """One shard's documents, as :func:`read_shards` yields them."""
    return next(iter(read_shards(fields, plan_loc, [shard], source)))


def _read_one(fields: dict[str, Any], sp: plan_store.ShardPlan, source: Location, pschema: pa.Schema,
              gz: dict[str, dict[tuple[int, int], scan.LineSlice]]) -> pa.Table:
    files = {f["file"]: f for f in sp.files.to_pylist()}
    dups: dict[int, set[int]] = {}
    for f, r in zip(sp.duplicates.column("file").to_pylist(), sp.duplicates.column("row").to_pylist()):
        dups.setdefault(f, set()).add(r)
    parts = []
    for seg in sp.segments.to_pylist():
        f = files[seg["file"]]
        if f["format"] == "parquet":
            part, flags = _read_parquet_segment(source, f, seg, fields, pschema)
        else:
            lines = gz[f["path"]][(seg["start"], seg["rows"])] if scan.is_gzip(f["path"]) else \
                scan.jsonl_slice(source, f["path"], seg["range_start"], seg["skip"], seg["rows"], seg["first_line"])
            part, flags = _read_jsonl_segment(lines, f, seg, fields, pschema)
        parts.append(_mark(part, dups.get(seg["file"], set()), seg, flags))
    table = pa.concat_tables(parts)
    n, want = table.num_rows, sp.rows
    if n != want:
        raise InputError(
            f"shard {sp.shard}: read {n} rows where the plan has {want}; "
            "an input file changed since the plan was made (re-plan with --fresh)"
        )
    table = table.append_column(S.SHARD, pa.array(np.full(n, sp.shard, dtype=np.int32)))
    table = table.append_column(S.POS, pa.array(np.arange(n, dtype=np.int64)))
    return table.append_column(S.TEXT_HASH, S.text_hashes(table.column(S.TEXT)))


def _reader(fields: dict[str, Any], plan_loc: Location, runs: tuple[tuple[int, int], ...], source: Location):
    # A partial of a module function pickles by reference: the task carries its arguments, not code.
    return functools.partial(_read_runs, fields, plan_loc, runs, source)


def _read_runs(fields: dict[str, Any], plan_loc: Location, runs: tuple[tuple[int, int], ...],
               source: Location) -> Iterator[pa.Table]:
    yield from read_shards(fields, plan_loc, (s for a, b in runs for s in range(a, b)), source)


def _group(index: pa.Table, pending: list[int], gz: set[int]) -> tuple[list[list[int]], dict[int, int], dict[int, set[int]]]:
    """Read-task groups of the pending shards (a shard alone, unless it shares a ``.gz`` file with
    others: then all of those, transitively), each shard's rows, and each shard's files."""
    want = set(pending)
    rows: dict[int, int] = {}
    files: dict[int, set[int]] = {}
    for s, f, r in zip(*(index.column(c).to_pylist() for c in ("shard", "file", "rows"))):
        if s in want:
            rows[s] = rows.get(s, 0) + r
            files.setdefault(s, set()).add(f)
    missing = want - set(rows)
    if missing:
        raise InputError(f"the plan has no shard {min(missing)}; the plan and the manifest disagree "
                         "(re-plan with --fresh)")
    parent = {s: s for s in pending}

    def root(s: int) -> int:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    owner: dict[int, int] = {}
    for s in sorted(pending):
        for f in files[s] & gz:
            if f in owner:
                parent[root(s)] = root(owner[f])
            else:
                owner[f] = s
    groups: dict[int, list[int]] = {}
    for s in sorted(pending):
        groups.setdefault(root(s), []).append(s)
    return sorted(groups.values()), rows, files


def _read_parquet_segment(source: Location, f: dict, seg: dict, plan: dict, pschema: pa.Schema) -> tuple[pa.Table, dict[str, np.ndarray]]:
    id_col, text_col = plan["id_column"], plan["text_column"]
    cols = list(dict.fromkeys([id_col, text_col, *plan["passthrough"]]))
    start, stop = seg["start"], seg["stop"]
    with source.fs.open_input_file(source.path(f["path"])) as fh:
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


def _read_jsonl_segment(lines: scan.LineSlice, f: dict, seg: dict, plan: dict, pschema: pa.Schema) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Parse each located line with ``json`` (so every row gets its own verdict: invalid JSON, id or
    text) and take the canonical id and text forms."""
    id_col, text_col = plan["id_column"], plan["text_column"]
    ids, texts, rows = [], [], []
    invalid_json, invalid_id, invalid_text = [], [], []
    extra: dict[str, list] = {c: [] for c in plan["passthrough"]}
    for line_no, line in lines.lines():
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
    want = seg["stop"] - seg["start"]
    if len(ids) != want:
        raise InputError(f"{f['uri']}: expected {want} documents from row {seg['start']}, found {len(ids)}; "
                         "the file changed since the plan was made (re-plan with --fresh)")
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

