"""Input files -> a deterministic shard list.

The plan lists the input files in path order (files under hidden or underscore folders are not input:
see :func:`reembed.storage.list_inputs`), counts their rows, turns every id into its canonical string
(integers and integral floats -> ``"7"``, other floats -> their shortest ``repr``, strings unchanged,
NaN / infinities -> ``invalid_id``; the full rule is in :mod:`reembed.schema`), finds duplicate ids
across the whole corpus (the first occurrence in plan order wins; later ones are dead-lettered as
``duplicate_id``), and packs the rows into shards of ``shard_rows`` rows. The plan is stored in the
output's manifest, so a resumed job sees exactly the same shards whatever has changed under the input
URI since.

Every input row lands in exactly one shard: the read stage embeds it or dead-letters it with a reason
(:data:`reembed.schema.REASONS`), so input rows = embedded + dead-lettered.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed import storage
from reembed.config import InputConfig
from reembed.errors import InputError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


@dataclass
class FileScan:
    """What planning learns from one input file."""

    index: int
    path: str
    format: str
    size: int
    uri: str = ""  # for messages: the path as a URI (s3://bucket/key)
    rows: int = 0
    ids: pa.Array | None = None
    # JSONL only: for each row, its 0-based line number and the byte offset where that line starts,
    # plus the end offset of the file's last row (so a shard can read only its byte range).
    lines: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    end_offset: int = 0
    passthrough_schema: pa.Schema | None = None
    error: str | None = None


def make_plan(cfg: InputConfig, shard_rows: int, on_bad_file: str = "fail",
              source: storage.Location | None = None) -> tuple[dict[str, Any], pa.Table]:
    """Scan the input and return ``(plan, duplicates)``.

    ``plan`` is JSON-serialisable and goes into the manifest; ``duplicates`` is a table of
    (file, row, id) for every row that repeats an earlier id, to be stored beside it. ``source`` is
    ``cfg.uri`` opened as a Location with the job's storage settings (default: opened here).
    """
    t0 = time.monotonic()
    base, infos = storage.list_inputs(source or cfg.uri, cfg.pattern)
    scheme = cfg.uri.split("://", 1)[0] if "://" in cfg.uri else ""
    files, other = [], []
    for info in infos:
        fmt = _detect_format(info.path, cfg.format)
        if fmt is None:
            other.append(_display(scheme, info.path))
            continue
        files.append(FileScan(index=len(files), path=info.path, format=fmt, size=info.size,
                              uri=_display(scheme, info.path)))
    if not files:
        raise InputError(
            f"{cfg.uri}: no Parquet or JSON Lines files found (looked for {', '.join(PARQUET_SUFFIXES + JSONL_SUFFIXES)}); "
            "point input.uri at the data, or set input.format for files named otherwise"
        )
    if other:
        log.info("plan: %d file(s) are neither Parquet nor JSON Lines by name and are not input: %s%s",
                 len(other), ", ".join(other[:3]), " ..." if len(other) > 3 else "")

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        scans = list(pool.map(lambda f: _scan_file(base.fs, f, cfg, on_bad_file), files))

    bad = [{"path": s.uri, "error": s.error} for s in scans if s.error]
    good = [s for s in scans if not s.error]
    for b in bad:
        log.warning("skipping unreadable input file %s: %s", b["path"], b["error"])

    passthrough = _unify_passthrough(good, cfg)
    duplicates = _find_duplicates(good)
    shards = _pack(good, shard_rows)
    total = sum(s.rows for s in good)
    plan = {
        "input_uri": cfg.uri,
        "input_root": base.uri,  # the folder (or file) the input paths are under; a glob is resolved
        "scheme": scheme,
        "id_column": cfg.id_column,
        "text_column": cfg.text_column,
        "passthrough": list(cfg.passthrough),
        "passthrough_schema": _schema_to_b64(passthrough),
        "shard_rows": shard_rows,
        "rows": total,
        "files": [
            {"path": s.path, "uri": s.uri, "format": s.format, "size": s.size, "rows": s.rows}
            for s in good
        ],
        "bad_files": bad,
        "shards": shards,
        "duplicate_rows": duplicates.num_rows,
    }
    secs = time.monotonic() - t0
    log.info(
        "plan: %d files, %d rows, %d shards, %d duplicate ids, %d bad files, %.1f s",
        len(good), total, len(shards), duplicates.num_rows, len(bad), secs,
    )
    return plan, duplicates


def passthrough_schema(plan: dict[str, Any]) -> pa.Schema:
    """The Arrow types of the passthrough columns, unified over all input files."""
    return _schema_from_b64(plan["passthrough_schema"])


def input_location(plan: dict[str, Any]) -> storage.Location:
    """The input's :class:`~reembed.storage.Location` (its filesystem opens every path in the plan)."""
    return storage.Location.from_uri(plan.get("input_root") or plan["input_uri"])


def _detect_format(path: str, fmt: str) -> str | None:
    name = path.lower()
    if fmt != "auto":
        return fmt
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _display(scheme: str, path: str) -> str:
    return f"{scheme}://{path}" if scheme and scheme != "file" else path


def _scan_file(fs, scan: FileScan, cfg: InputConfig, on_bad_file: str) -> FileScan:
    display = scan.uri or scan.path
    try:
        if scan.format == "parquet":
            _scan_parquet(fs, scan, cfg)
        else:
            _scan_jsonl(fs, scan, cfg)
    except InputError:
        raise
    except (OSError, pa.ArrowException, ValueError, UnicodeDecodeError) as e:
        message = f"{type(e).__name__}: {e}"
        if on_bad_file == "skip":
            scan.error = message
            return scan
        raise InputError(
            f"{display}: cannot read this {scan.format} file ({message}); "
            "fix or remove it, or run with --on-bad-file skip to record it in the manifest and go on"
        ) from e
    return scan


def _scan_parquet(fs, scan: FileScan, cfg: InputConfig) -> None:
    where = scan.uri or scan.path
    with fs.open_input_file(scan.path) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        _check_columns(where, schema.names, cfg)
        text_type = schema.field(cfg.text_column).type
        if not S.is_text_type(text_type):
            raise InputError(
                f"{where}: text column {cfg.text_column!r} has type {text_type}, not string or binary; "
                "set input.text_column to the column that holds the documents"
            )
        scan.rows = pf.metadata.num_rows
        ids = pf.read(columns=[cfg.id_column]).column(0)
    try:
        scan.ids, _ = S.id_strings(ids)  # invalid ids are null here: they never count as duplicates
    except TypeError as e:
        raise InputError(f"{where}: id column {cfg.id_column!r} cannot hold ids ({e}); "
                         "set input.id_column to a string or number column") from e
    scan.passthrough_schema = pa.schema([schema.field(c) for c in cfg.passthrough])


def _scan_jsonl(fs, scan: FileScan, cfg: InputConfig) -> None:
    data = _read_all(fs, scan.path)
    ids: list[Any] = []
    keys: set[str] = set()
    line_no = 0
    pos = 0
    end = len(data)
    sample: list[dict] = []
    sample_lines: list[int] = []
    while pos < end:
        nl = data.find(b"\n", pos)
        stop = end if nl < 0 else nl
        line = data[pos:stop]
        if line.strip():
            scan.lines.append(line_no)
            scan.offsets.append(pos)
            scan.end_offset = stop + 1 if nl >= 0 else stop
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                keys.update(obj)
                ids.append(obj.get(cfg.id_column))
                if len(sample) < 1000:
                    sample.append({c: passthrough_value(obj, c, cfg.text_column) for c in cfg.passthrough})
                    sample_lines.append(line_no)
            else:
                ids.append(None)  # an invalid line; the read stage dead-letters it as invalid_json
        line_no += 1
        pos = stop + 1
    scan.rows = len(scan.lines)
    where = scan.uri or scan.path
    if scan.rows and not keys:
        raise InputError(f"{where}: no line is a JSON object; expected one document per line "
                         "(is this JSON Lines? set input.format if the name misleads)")
    if scan.rows:
        _check_columns(where, sorted(keys), cfg)
    scan.ids = pa.array([S.json_id(v)[0] for v in ids], pa.string())
    if cfg.passthrough and sample:
        scan.passthrough_schema = _sample_schema(where, sample, sample_lines, cfg.passthrough)


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


def _read_all(fs, path: str) -> bytes:
    if path.endswith(".gz"):
        import gzip

        with fs.open_input_stream(path) as f:
            return gzip.decompress(f.read())
    with fs.open_input_stream(path) as f:
        return f.read()


def _check_columns(path: str, found: list[str], cfg: InputConfig) -> None:
    needed = [cfg.id_column, cfg.text_column, *cfg.passthrough]
    missing = [c for c in needed if c not in found]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; columns found: {', '.join(map(repr, found))}"
            " (set input.id_column / input.text_column / input.passthrough to match)"
        )


def _unify_passthrough(scans: list[FileScan], cfg: InputConfig) -> pa.Schema:
    if not cfg.passthrough:
        return pa.schema([])
    schemas = [s.passthrough_schema for s in scans if s.passthrough_schema is not None]
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


def _type_clash(scans: list[FileScan], columns: tuple[str, ...]) -> str | None:
    """'column c is T in file A and U in file B' for the first passthrough column whose types clash."""
    for c in columns:
        seen: tuple[pa.DataType, str] | None = None
        for s in scans:
            if s.passthrough_schema is None:
                continue
            t = s.passthrough_schema.field(c).type
            if seen is None:
                seen = (t, s.uri or s.path)
                continue
            try:
                pa.unify_schemas([pa.schema([pa.field(c, seen[0])]), pa.schema([pa.field(c, t)])],
                                 promote_options="permissive")
            except pa.ArrowException:
                return f"column {c!r} is {seen[0]} in {seen[1]} and {t} in {s.uri or s.path}"
    return None


def _find_duplicates(scans: list[FileScan]) -> pa.Table:
    """Every (file, row) whose id already appeared earlier in plan order."""
    if not scans:
        return pa.table({"file": pa.array([], pa.int32()), "row": pa.array([], pa.int64()), "id": pa.array([], pa.string())})
    parts = []
    for s in scans:
        n = len(s.ids)
        parts.append(
            pa.table({
                "file": pa.array([s.index] * n, pa.int32()) if n else pa.array([], pa.int32()),
                "row": pa.array(range(n), pa.int64()),
                "id": s.ids,
            })
        )
    table = pa.concat_tables(parts)
    df = table.to_pandas()
    df = df[df["id"].notna()]
    dup = df[df.duplicated("id", keep="first")]
    return pa.Table.from_pandas(dup.reset_index(drop=True), schema=table.schema, preserve_index=False)


def _pack(scans: list[FileScan], shard_rows: int) -> list[dict[str, Any]]:
    """Pack file rows, in plan order, into shards of ``shard_rows`` rows (the last may be smaller)."""
    shards: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    filled = 0
    for s in scans:
        start = 0
        while start < s.rows:
            take = min(shard_rows - filled, s.rows - start)
            seg: dict[str, Any] = {"file": s.index, "start": start, "stop": start + take}
            if s.format == "jsonl":
                seg["line"] = s.lines[start]
                seg["byte_start"] = s.offsets[start]
                seg["byte_end"] = s.offsets[start + take] if start + take < s.rows else s.end_offset
            current.append(seg)
            filled += take
            start += take
            if filled == shard_rows:
                shards.append({"shard": len(shards), "rows": filled, "segments": current})
                current, filled = [], 0
    if current:
        shards.append({"shard": len(shards), "rows": filled, "segments": current})
    return shards


def _schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _schema_from_b64(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
