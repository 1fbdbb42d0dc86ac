"""Streaming an output's shards (and an old store) for the gates: the integrity pass, exact-search
batches, and the old side's vectors. Shards are read only through ``reembed.indexes.build.read_shard``:
path held inside the output, sha256 checked."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.errors import StorageError, ValidationError
from reembed.indexes.build import read_shard
from reembed.migrate.stores.base import is_store_uri
from reembed.manifest import Manifest
from reembed.storage import Location, list_inputs
from reembed.validation.gates import FAIL, PASS, Settings, check_vectors

OLD_EMBEDDING = "old_embedding"


def _integrity_pass(loc: Location, records: list[tuple[int, dict]], dim: int, normalized: bool, settings: Settings,
                    positions: np.ndarray, want_old: bool, watch: set[str] = frozenset(), text_column: str | None = None):
    """Stream every shard once: the integrity gate, the sampled rows' vectors (new, and old when the shards
    carry them) and texts (``text_column``), and which of the ``watch`` ids (labelled relevant documents) the
    output holds."""
    problems: list[str] = []
    per_shard = []
    totals = {"rows": 0, "non_finite": 0, "zero": 0, "bad_norm": 0, "bad_dimension": 0, "row_mismatch": 0, "corrupt": 0}
    sample_ids: list[str] = []
    sample_new, sample_old, sample_texts = [], [], []
    seen: set[str] = set()
    start = 0
    cols = [S.ID, S.EMBEDDING] + ([OLD_EMBEDDING] if want_old else []) + ([text_column] if text_column else [])
    for shard, rec in records:
        name = loc.display(rec["path"])
        try:
            table = read_shard(loc, shard, rec, None)  # then checked: a shard may lack a column
            table = table.select([c for c in cols if c in table.column_names])
            missing = [c for c in (S.ID, S.EMBEDDING) if c not in table.column_names]
            if missing:
                raise StorageError(f"{name}: no {' or '.join(missing)} column; not a reembed shard")
        except (OSError, pa.ArrowException, StorageError) as e:  # StorageError: sha256 mismatch, missing file
            problems.append(str(e) if isinstance(e, StorageError) else f"{name}: unreadable ({e})")
            totals["corrupt"] += 1
            start += rec["rows"]
            continue
        ids = table.column(S.ID).to_pylist()
        if watch:
            seen.update(watch.intersection(ids))
        emb = table.column(S.EMBEDDING)
        if table.num_rows != rec["rows"]:
            problems.append(f"{name}: {table.num_rows} rows, the manifest says {rec['rows']}")
            totals["row_mismatch"] += 1
        if not pa.types.is_fixed_size_list(emb.type):
            stats = {"rows": len(ids), "bad_dimension": len(ids), "dimension_seen": str(emb.type)}
            matrix = None
        elif emb.null_count:
            stats = {"rows": len(ids), "non_finite": emb.null_count}
            matrix = None
        else:
            matrix = S.embedding_matrix(emb)
            stats = check_vectors(ids, matrix, dim, normalized, settings.norm_tol)
            if stats.get("bad_dimension"):
                matrix = None
        for key in ("non_finite", "zero", "bad_norm", "bad_dimension"):
            v = stats.get(key, 0)
            totals[key] += v
            if v:
                what = {"non_finite": "NaN/inf or null vectors", "zero": "zero vectors",
                        "bad_norm": f"vectors whose norm is not 1 +- {settings.norm_tol}",
                        "bad_dimension": f"vectors of dimension {stats.get('dimension_seen')} instead of {dim}"}[key]
                eg = stats.get(f"{key}_ids")
                problems.append(f"{name}: {v} {what}" + (f" (ids {', '.join(eg)})" if eg else ""))
        totals["rows"] += len(ids)
        per_shard.append({"shard": shard, "rows": len(ids), **{k: stats.get(k) for k in ("norm_min", "norm_mean", "norm_max")}})
        # Sampled rows of this shard.
        here = positions[(positions >= start) & (positions < start + rec["rows"])] - start
        if matrix is not None and len(here):
            here = here[here < len(ids)]
            sample_ids.extend(ids[i] for i in here)
            sample_new.append(matrix[here])
            if want_old:
                sample_old.append(S.embedding_matrix(table.column(OLD_EMBEDDING))[here])
            if text_column and text_column in table.column_names:
                texts = table.column(text_column).to_pylist()
                sample_texts.extend(texts[i] for i in here)
        start += rec["rows"]
    status = FAIL if problems else PASS
    msg = (f"{totals['rows']} vectors in {len(records)} shards: dimension {dim}, finite"
           + (", unit norm" if normalized else "") + " - all good") if not problems else "; ".join(problems[:5]) + (
        f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    gate = {"status": status, "message": msg, **totals, "shards": len(records), "problems": problems,
            "per_shard": per_shard, "normalized": normalized, "dimension": dim}
    new = _stack(sample_new, dim)
    old = list(_stack(sample_old)) if want_old else None
    return gate, sample_ids, new, old, seen, sample_texts


def _shard_batches(loc: Location, records: list[tuple[int, dict]], column: str,
                   dim: int | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, vectors) per shard; shards the integrity gate fails (unreadable, wrong type or dimension) are skipped."""
    for shard, rec in records:
        try:
            table = read_shard(loc, shard, rec, [S.ID, column])
        except (OSError, pa.ArrowException, StorageError):  # the integrity gate reports it
            continue
        emb = table.column(column)
        if not pa.types.is_fixed_size_list(emb.type) or emb.null_count or (dim and emb.type.list_size != dim):
            continue
        yield table.column(S.ID).to_pylist(), S.embedding_matrix(emb)


def _shards_have(loc: Location, records: list[tuple[int, dict]], column: str) -> bool:
    """Whether the first committed shard has ``column`` (read, like every shard, through ``read_shard``)."""
    if not records:
        return False
    shard, rec = records[0]
    try:
        return column in read_shard(loc, shard, rec, None).column_names
    except (OSError, pa.ArrowException, StorageError):
        return False


def _old_source(old: str | None, loc: Location, records: list[tuple[int, dict]]) -> Callable[[], Iterator[tuple[list[str], np.ndarray]]]:
    """A re-iterable stream of (ids, old vectors). A path is opened with the output's storage settings."""
    if old is None:
        return lambda: _shard_batches(loc, records, OLD_EMBEDDING)
    if is_store_uri(old):
        return lambda: _store_batches(old)
    old_loc = Location.from_uri(old, loc.settings)
    other = Manifest.load(old_loc)
    if other is not None:
        recs = sorted(other.committed.items())
        return lambda: _shard_batches(old_loc, recs, S.EMBEDDING)
    return lambda: _parquet_batches(old_loc)


def _parquet_batches(uri: str | Location) -> Iterator[tuple[list[str], np.ndarray]]:
    loc, files = list_inputs(uri, "*.parquet")
    for info in files:
        with loc.fs.open_input_file(info.path) as f:
            pf = pq.ParquetFile(f)
            if S.ID not in pf.schema_arrow.names or OLD_EMBEDDING not in pf.schema_arrow.names:
                raise ValidationError(f"{info.path}: an old-store export needs columns id and {OLD_EMBEDDING} "
                                      f"(has {', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(columns=[S.ID, OLD_EMBEDDING], batch_size=65_536):
                yield S.id_strings(batch.column(0))[0].to_pylist(), S.embedding_matrix(batch.column(1))


def _lookup_vectors(batches: Iterable[tuple[Sequence[str], np.ndarray]], ids: Sequence[str]) -> list[np.ndarray | None]:
    """The vectors of ``ids`` found in a stream (``None`` for ids it does not hold)."""
    want = {i: n for n, i in enumerate(ids)}
    out: list[np.ndarray | None] = [None] * len(ids)
    for block_ids, block in batches:
        for j, i in enumerate(block_ids):
            n = want.get(str(i))
            if n is not None:
                out[n] = np.array(block[j], dtype=np.float32)
    return out


def _store_batches(uri: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """Every (ids, vectors) page of an old vector store; the store is closed when the pages run out."""
    from reembed.migrate.stores import open_store

    with open_store(uri) as store:
        for b in store.batches():
            yield b.ids, b.vectors


def _old_manifest_model(old: str, settings: Any = None) -> str | None:
    if is_store_uri(old):
        return None
    m = Manifest.load(Location.from_uri(old, settings))
    return m.model["name"] if m is not None else None


def _stack(parts: list[np.ndarray], dim: int | None = None) -> np.ndarray:
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return np.zeros((0, dim or 0), np.float32)
    return np.vstack([np.atleast_2d(p) for p in parts]).astype(np.float32)
