"""Input files -> a deterministic shard plan, stored as Parquet beside the manifest (``OUTPUT/plan/``).

The plan lists the input files in path order (files under hidden or underscore folders are not input:
see :func:`reembed.storage.list_inputs`), counts their rows (Parquet footers; JSON Lines byte ranges
with a vectorized newline scan, :mod:`reembed.scan`), turns every id into its canonical string
(:func:`arrow_ids` / :func:`json_ids`: integers and integral floats -> ``"7"``, other floats -> their
shortest ``repr``, strings unchanged, NaN / infinities -> ``invalid_id``; the full rule is in
:mod:`reembed.schema`), finds duplicate ids across the whole corpus by hash partitioning
(:mod:`reembed.dedup`; the first occurrence in plan order wins, later ones are dead-lettered as
``duplicate_id``; ``plan.dedup: none`` turns this off), and packs the rows into shards of ``shard_rows``
rows (:mod:`reembed.plan_store`). Counting and dedup run as Ray tasks when ``use_ray`` (in this
process otherwise); the driver holds O(files + ranges) small records, never ids or per-row offsets.

What :func:`make_plan` returns, and the manifest stores, is a small summary: counts, the settings, and
the paths + sha256 of the plan's Parquet files. Each file's size and mtime (ETag on S3) is in
``plan/files.parquet``, so a resume refuses an input that changed under its plan (:func:`check_input`).

Every input row lands in exactly one shard: the read stage embeds it or dead-letters it with a reason
(:data:`reembed.schema.REASONS`), so input rows = embedded + dead-lettered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from reembed import dedup as D
from reembed import plan_store
from reembed import scan
from reembed import schema as S
from reembed import storage
from reembed.config import InputConfig
from reembed.errors import InputChanged, InputError
from reembed.scan import arrow_ids, json_ids  # noqa: F401 (the id canonicalisation, re-exported)

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
PLAN_DIR = "plan"
"""The plan's folder under the output."""
SAMPLE_ROWS = 1000
"""Rows at the start of a JSON Lines file whose keys are checked and whose passthrough types are inferred."""
BAD_FILES_KEPT = 100
"""Bad files named in the manifest (all of them are counted)."""
IDS_PER_PARTITION = 2_000_000
"""Ids per dedup partition (one task sorts that many: ~100 MB); the partition count follows the corpus."""
MAX_PARTITIONS = 1024


@dataclass(frozen=True)
class ScanTask:
    """One counting task: a Parquet file, one byte range of a JSON Lines file, or a whole ``.gz`` file.
    ``pos`` is the file's position in the listing; ``path`` is relative to the input Location."""

    pos: int
    path: str
    format: str
    range_start: int = 0
    range_stop: int = 0


@dataclass(frozen=True)
class ScanResult:
    task: ScanTask
    rows: int = 0
    range: scan.RangeCount | None = None
    stat: scan.FileStat | None = None
    passthrough_schema: pa.Schema | None = None
    error: str | None = None


def make_plan(cfg: InputConfig, shard_rows: int, work: storage.Location, on_bad_file: str = "fail",
              source: storage.Location | None = None, dedup: str = "hash", use_ray: bool = False,
              partitions: int | None = None, range_bytes: int = scan.RANGE_BYTES) -> dict[str, Any]:
    """Scan the input, write the plan's Parquet files under ``work`` (``OUTPUT/plan``) and return the
    plan's summary for the manifest.

    ``source`` is ``cfg.uri`` opened as a Location with the job's storage settings (default: opened
    here); it travels into every task. ``dedup`` is ``"hash"`` or ``"none"`` (no id is read);
    ``partitions`` its hash partitions (default: one per :data:`IDS_PER_PARTITION` rows).
    """
    t0 = time.monotonic()
    if dedup not in D.MODES:
        raise InputError(f"plan.dedup = {dedup!r} is unknown; use one of {', '.join(D.MODES)}")
    base, infos = storage.list_inputs(source or storage.Location.from_uri(cfg.uri), cfg.pattern)
    base = _folder(base, infos)
    scheme = cfg.uri.split("://", 1)[0] if "://" in cfg.uri else ""
    listed, other = _input_files(base, infos, cfg.format)
    if not listed:
        raise InputError(
            f"{cfg.uri}: no Parquet or JSON Lines files found (looked for {', '.join(PARQUET_SUFFIXES + JSONL_SUFFIXES)}); "
            "point input.uri at the data, or set input.format for files named otherwise"
        )
    if other:
        log.info("plan: %d file(s) are neither Parquet nor JSON Lines by name and are not input: %s%s",
                 len(other), ", ".join(other[:3]), " ..." if len(other) > 3 else "")

    tasks = []
    for pos, (rel, fmt, size, _) in enumerate(listed):
        if fmt == "parquet" or scan.is_gzip(rel):
            tasks.append(ScanTask(pos, rel, fmt, 0, size))
        else:
            tasks += [ScanTask(pos, rel, fmt, a, b) for a, b in scan.jsonl_ranges(size, range_bytes)]
    results = scan.run_tasks(scan_unit, [(base, t, cfg, on_bad_file) for t in tasks], use_ray)

    by_pos: dict[int, list[ScanResult]] = {}
    for r in results:
        by_pos.setdefault(r.task.pos, []).append(r)
    good, bad = [], []
    for pos, (rel, fmt, size, info) in enumerate(listed):
        parts = sorted(by_pos[pos], key=lambda r: r.task.range_start)
        errors = [r.error for r in parts if r.error]
        if errors:
            log.warning("skipping unreadable input file %s: %s", base.display(rel), errors[0])
            bad.append({"path": base.display(rel), "rel": rel, "error": errors[0], "size": size,
                        "mtime_ns": info.mtime_ns if info.mtime is not None else None})
            continue
        good.append((rel, fmt, parts, info))

    passthrough = _unify_passthrough([(base.display(rel), p[0].passthrough_schema) for rel, _, p, _ in good], cfg)
    id_tasks, units, files = [], [], []
    for i, (rel, fmt, parts, info) in enumerate(good):
        stat = parts[0].stat
        rows = sum(r.rows for r in parts)
        # The mtime a resume compares is the listing's (the same call then and now); the ETag is the task's.
        mtime = info.mtime_ns if info.mtime is not None else stat.mtime_ns
        files.append({"file": i, "path": rel, "uri": base.display(rel), "format": fmt, "size": stat.size,
                      "mtime_ns": mtime, "etag": stat.etag, "rows": rows, "dup_rows": 0})
        if fmt == "parquet":
            units.append(plan_store.Unit(i, rows))
            id_tasks.append(D.IdTask(i, rel, fmt, rows=rows))
        else:
            units += plan_store.jsonl_units(i, [r.range for r in parts])
            id_tasks += [D.IdTask(i, rel, fmt, r.task.range_start, r.task.range_stop, rows=r.rows) for r in parts]
    for b in bad:
        files.append({"file": -1, "path": b["rel"], "uri": b["path"], "format": "bad", "size": b["size"],
                      "mtime_ns": b["mtime_ns"], "etag": None, "rows": 0, "dup_rows": 0})

    work.delete_dir()  # a plan left by an attempt that died before its manifest was saved
    if partitions is None:
        rows = sum(f["rows"] for f in files)
        partitions = max(1, min(MAX_PARTITIONS, -(-rows // IDS_PER_PARTITION)))
    found = D.find_duplicates(base, id_tasks, cfg.id_column, work, partitions=partitions, mode=dedup, use_ray=use_ray)
    for f in files:
        if f["file"] >= 0:
            f["dup_rows"] = found.duplicates_by_file.get(f["file"], 0)
    plan_store.write_files(work, files)
    segments, shards = plan_store.write_segments(work, plan_store.pack_shards(units, shard_rows),
                                                 dedup_partitions=found.partitions)
    total = sum(f["rows"] for f in files)
    store = {
        "files": _record(work, plan_store.FILES),
        "segments": [_record(work, n) for n in plan_store.segment_files(shards)],
        "duplicates": [_record(work, D.DUPLICATES_DIR, D.duplicates_file(p)) for p in range(found.partitions)],
    }
    plan = {
        "input_uri": cfg.uri,
        "input_root": base.uri,  # the folder the input paths are relative to; a glob is resolved
        "scheme": scheme,
        "id_column": cfg.id_column,
        "text_column": cfg.text_column,
        "passthrough": list(cfg.passthrough),
        "passthrough_schema": _schema_to_b64(passthrough),
        "pattern": cfg.pattern,
        "format": cfg.format,
        "shard_rows": shard_rows,
        "rows": total,
        "shards": shards,
        "segments": segments,
        "files": len(good),
        "bytes": sum(f["size"] for f in files if f["file"] >= 0),
        "bad_file_count": len(bad),
        "bad_files": [{"path": b["path"], "error": b["error"]} for b in bad[:BAD_FILES_KEPT]],
        "duplicate_rows": found.duplicates,
        "dedup": dedup,
        "dedup_partitions": found.partitions,
        "store": store,
    }
    secs = time.monotonic() - t0
    log.info(
        "plan: %d files, %d rows, %d shards, %d duplicate ids (dedup %s), %d bad files, %d scan tasks, %.1f s",
        len(good), total, shards, found.duplicates, dedup, len(bad), len(tasks), secs,
    )
    return plan


def check_input(plan: dict[str, Any], files: pa.Table, source: storage.Location) -> None:
    """Refuse to resume when the input changed under the plan: a planned file modified (size, mtime or
    ETag) or removed is an :class:`InputError` naming it; files added since are a warning (they are not
    embedded by this resume). ``files`` is ``plan/files.parquet``; ``source`` opens the input URI.

    Both sides are walked in path order, as a merge: nothing beyond the two listings is held.
    """
    base, infos = storage.list_inputs(source, plan.get("pattern", "*"))
    base = _folder(base, infos)
    listed, _ = _input_files(base, infos, plan.get("format", "auto"))
    planned = files.sort_by("path").to_pylist()
    added: list[str] = []
    etags: list[tuple[str, str]] = []
    i = j = 0
    fix = "re-plan with --fresh (the output's shards are discarded), or restore the file"
    while i < len(planned) or j < len(listed):
        p = planned[i] if i < len(planned) else None
        now = listed[j] if j < len(listed) else None
        if now is None or (p is not None and p["path"] < now[0]):
            raise InputChanged(f"{base.display(p['path'])}: removed from the input since the plan was made; {fix}")
        if p is None or now[0] < p["path"]:
            added.append(base.display(now[0]))
            j += 1
            continue
        if p["format"] != "bad":
            info = now[3]
            if info.size != p["size"] or (p["mtime_ns"] is not None and info.mtime_ns is not None
                                          and info.mtime_ns != p["mtime_ns"]):
                what = f"size {p['size']} -> {info.size}" if info.size != p["size"] else "modification time changed"
                raise InputChanged(f"{base.display(p['path'])}: modified since the plan was made ({what}); {fix}")
            if p["etag"] is not None:
                etags.append((p["path"], p["etag"]))
        i += 1
        j += 1
    if etags:  # an object rewritten within the same second at the same size: only its ETag tells
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            now_tags = list(pool.map(lambda pe: base.version(pe[0]), etags))
        for (path, tag), now_tag in zip(etags, now_tags):
            if now_tag != tag:
                raise InputChanged(f"{base.display(path)}: modified since the plan was made (ETag {tag} -> {now_tag}); {fix}")
    if added:
        log.warning("input: %d file(s) were added since the plan was made and are NOT embedded by this resume "
                    "(re-plan with --fresh to include them): %s%s", len(added), ", ".join(added[:3]),
                    " ..." if len(added) > 3 else "")


def scan_unit(source: storage.Location, task: ScanTask, cfg: InputConfig, on_bad_file: str) -> ScanResult:
    """Count one task's rows; the first range of a file also checks its columns and types. A file that
    cannot be read is an :class:`InputError`, or with ``on_bad_file="skip"`` a result with ``error``."""
    display = source.display(task.path)
    try:
        if task.format == "parquet":
            return _scan_parquet(source, task, cfg)
        return _scan_jsonl(source, task, cfg)
    except InputError:
        raise
    except (OSError, pa.ArrowException, ValueError, UnicodeDecodeError, EOFError) as e:
        message = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if on_bad_file == "skip":
            return ScanResult(task, error=message)
        raise InputError(
            f"{display}: cannot read this {task.format} file ({message}); "
            "fix or remove it, or run with --on-bad-file skip to record it in the manifest and go on"
        ) from e


def json_id(value: Any) -> str | None:
    """The canonical string of one JSON id value (None for null and invalid ids)."""
    return S.json_id(value)[0]


def passthrough_schema(plan: dict[str, Any]) -> pa.Schema:
    """The Arrow types of the passthrough columns, unified over all input files."""
    return _schema_from_b64(plan["passthrough_schema"])


def input_location(plan: dict[str, Any], settings: Any = None) -> storage.Location:
    """The input's :class:`~reembed.storage.Location` (every path in ``files.parquet`` is relative to it)."""
    return storage.Location.from_uri(plan.get("input_root") or plan["input_uri"], settings)


def _folder(base: storage.Location, infos: list) -> storage.Location:
    """The folder the listed files are relative to: ``base`` itself, or a single file's parent."""
    if len(infos) == 1 and infos[0].path.rstrip("/") == base.root.rstrip("/"):
        return replace(base, root=posixpath.dirname(base.root.rstrip("/")), uri=posixpath.dirname(base.uri.rstrip("/")))
    return base


def _input_files(base: storage.Location, infos: list, fmt: str) -> tuple[list[tuple], list[str]]:
    """``(relative path, format, size, info)`` of each input file in path order, and the others' URIs."""
    root = base.root.rstrip("/") + "/"
    listed, other = [], []
    for info in infos:
        rel = info.path[len(root):] if info.path.startswith(root) else posixpath.basename(info.path)
        f = _detect_format(rel, fmt)
        if f is None:
            other.append(base.display(rel))
            continue
        listed.append((rel, f, info.size, info))
    listed.sort(key=lambda t: t[0])
    return listed, other


def _record(work: storage.Location, *parts: str) -> dict[str, str]:
    """``{"path", "sha256"}`` of a plan file, its path relative to the output (``plan/...``)."""
    h = hashlib.sha256()
    with work.fs.open_input_stream(work.path(*parts)) as f:
        # Arrow buffers, not bytes: pyarrow's read(n) allocates n bytes up front, even for a small file.
        while (chunk := f.read_buffer(8 << 20)).size:
            h.update(chunk)
    return {"path": posixpath.join(PLAN_DIR, *parts), "sha256": h.hexdigest()}


def _detect_format(path: str, fmt: str) -> str | None:
    name = path.lower()
    if fmt != "auto":
        return fmt
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _scan_parquet(source: storage.Location, task: ScanTask, cfg: InputConfig) -> ScanResult:
    where = source.display(task.path)
    stat = scan.stat_file(source, task.path)
    with source.fs.open_input_file(source.path(task.path)) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        rows = pf.metadata.num_rows
    _check_columns(where, schema.names, cfg)
    text_type = schema.field(cfg.text_column).type
    if not S.is_text_type(text_type):
        raise InputError(
            f"{where}: text column {cfg.text_column!r} has type {text_type}, not string or binary; "
            "set input.text_column to the column that holds the documents"
        )
    id_type = schema.field(cfg.id_column).type
    try:
        S.id_strings(pa.array([], id_type))
    except TypeError as e:
        raise InputError(f"{where}: id column {cfg.id_column!r} cannot hold ids ({e}); "
                         "set input.id_column to a string or number column") from e
    return ScanResult(task, rows, stat=stat, passthrough_schema=pa.schema([schema.field(c) for c in cfg.passthrough]))


def _scan_jsonl(source: storage.Location, task: ScanTask, cfg: InputConfig) -> ScanResult:
    if scan.is_gzip(task.path):
        count = scan.count_gz(source, task.path)
    else:
        count = scan.count_jsonl_range(source, task.path, task.range_start, task.range_stop)
    result = ScanResult(task, count.rows, range=count, stat=count.stat)
    if task.range_start > 0 or not count.rows:
        return result
    return replace(result, passthrough_schema=_sample(source, task.path, min(SAMPLE_ROWS, count.rows), cfg))


def _sample(source: storage.Location, path: str, rows: int, cfg: InputConfig) -> pa.Schema | None:
    """Check the first ``rows`` documents of a JSON Lines file: at least one is a JSON object, the
    configured columns are among their keys; infer the passthrough columns' types from them."""
    where = source.display(path)
    if scan.is_gzip(path):
        lines = scan.gz_line_slices(source, path, [(0, rows)])[0]
    else:
        lines = scan.jsonl_slice(source, path, 0, 0, rows)
    keys: set[str] = set()
    sample: list[dict] = []
    sample_lines: list[int] = []
    for line_no, line in lines.lines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # an invalid line; the read stage dead-letters it as invalid_json
        if isinstance(obj, dict):
            keys.update(obj)
            sample.append({c: passthrough_value(obj, c, cfg.text_column) for c in cfg.passthrough})
            sample_lines.append(line_no)
    if not keys:
        raise InputError(f"{where}: no line is a JSON object; expected one document per line "
                         "(is this JSON Lines? set input.format if the name misleads)")
    _check_columns(where, sorted(keys), cfg)
    if cfg.passthrough and sample:
        return _sample_schema(where, sample, sample_lines, cfg.passthrough)
    return None


def passthrough_value(obj: dict, column: str, text_column: str) -> Any:
    """A JSON passthrough value; the text column passes through as the text that is embedded (a string
    or null), so a row whose text is not a string is dead-lettered, not a type clash."""
    value = obj.get(column)
    if column == text_column and not isinstance(value, str):
        return None
    return value


def _sample_schema(where: str, sample: list[dict], lines: list[int], columns: tuple[str, ...]) -> pa.Schema:
    """The Arrow types of the passthrough columns, inferred from the first rows of a JSON Lines file."""
    fields = []
    for c in columns:
        values = [row[c] for row in sample]
        try:
            fields.append(pa.field(c, pa.array(values).type))
        except (pa.ArrowException, TypeError) as e:
            first = next((v for v in values if v is not None), None)
            row = misfit(values, pa.array([first]).type)
            at = f"line {lines[row]}: {values[row]!r}" if row is not None else "several lines"
            raise InputError(
                f"{where}: passthrough column {c!r} mixes types ({at}, after {first!r}); make its values one "
                f"type, or leave it out of input.passthrough ({e})"
            ) from e
    return pa.schema(fields)


def misfit(values: list, type_: pa.DataType) -> int | None:
    """The index of the first value that is not of Arrow type ``type_`` (None: they all fit)."""
    for i, v in enumerate(values):
        try:
            pa.array([v], type=type_)
        except (pa.ArrowException, TypeError):
            return i
    return None


def _check_columns(path: str, found: list[str], cfg: InputConfig) -> None:
    needed = [cfg.id_column, cfg.text_column, *cfg.passthrough]
    missing = [c for c in needed if c not in found]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; columns found: {', '.join(map(repr, found))}"
            " (set input.id_column / input.text_column / input.passthrough to match)"
        )


def _unify_passthrough(scans: list[tuple[str, pa.Schema | None]], cfg: InputConfig) -> pa.Schema:
    """One schema for the passthrough columns from each file's ``(uri, schema)``."""
    if not cfg.passthrough:
        return pa.schema([])
    schemas = [s for _, s in scans if s is not None]
    if not schemas:
        return pa.schema([pa.field(c, pa.string()) for c in cfg.passthrough])
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except pa.ArrowException as e:
        raise InputError(f"{cfg.uri}: passthrough columns have incompatible types across files "
                         f"({_type_clash(scans, cfg.passthrough) or e}); make them one type, or leave them "
                         "out of input.passthrough") from e
    fields = []
    for c in cfg.passthrough:
        f = unified.field(c)
        fields.append(pa.field(c, pa.string()) if pa.types.is_null(f.type) else f.with_nullable(True))
    return pa.schema(fields)


def _type_clash(scans: list[tuple[str, pa.Schema | None]], columns: tuple[str, ...]) -> str | None:
    """'column c is T in file A and U in file B' for the first passthrough column whose types clash."""
    for c in columns:
        seen: tuple[pa.DataType, str] | None = None
        for uri, schema in scans:
            if schema is None:
                continue
            t = schema.field(c).type
            if seen is None:
                seen = (t, uri)
                continue
            try:
                pa.unify_schemas([pa.schema([pa.field(c, seen[0])]), pa.schema([pa.field(c, t)])],
                                 promote_options="permissive")
            except pa.ArrowException:
                return f"column {c!r} is {seen[0]} in {seen[1]} and {t} in {uri}"
    return None


def _schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _schema_from_b64(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
