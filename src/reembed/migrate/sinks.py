"""Publish an output's new vectors into the app's vector store: ``reembed publish OUTPUT --to STORE_URI``.

    reembed publish s3://corpus/emb/mpnet/ --to "chroma:///srv/chroma?collection=docs"          # -> docs_v2
    reembed publish s3://corpus/emb/mpnet/ --to "chroma:///srv/chroma?collection=docs" --swap   # and rename
    reembed publish OUTPUT --to "pinecone://my-index?namespace=docs"                           # -> docs_v2
    reembed publish OUTPUT --to "weaviate://localhost:8080/Docs"                              # -> Docs_v2

**Same ids and payload as the source export.** Each committed shard's rows are written with their id (the
store's own id, as ``reembed export`` read it), the ``text`` column in the store's text field (Chroma's
document, Pinecone's / Weaviate's ``text_field``, default ``text``), and every other passthrough column as
metadata (``meta_text`` / ``meta_id`` back to ``text`` / ``id``, nulls left out). So run the job with
``--passthrough text,<metadata columns>``; without a text column the store gets vectors and metadata only
(a warning says so).

**Versioned names.** The vectors go into a new versioned name beside the app's: collection ``docs_v2`` in
Chroma, namespace ``docs_v2`` in Pinecone (a namespace costs nothing and is chosen per query; the index must
already exist with the new dimension), collection ``Docs_v2`` in Weaviate. ``N`` is one more than any version
present. The app's name is never written. Chroma and Pinecone have no aliases: for Pinecone the app switches
its namespace; for Chroma ``--swap`` renames (Chroma renames a collection in place, keeping its data): the
app's ``docs`` becomes ``docs_v<old>`` (``docs_v0`` for a collection reembed did not make: the backup),
then ``docs_v2`` becomes ``docs``. For the few milliseconds between the two renames no collection is
called ``docs``; the summary gives the measured window. ``--rollback`` renames back. Weaviate (>= 1.32) moves a
collection alias in one call (see :mod:`reembed.migrate.stores.weaviate`).

**Written by Ray tasks, resumable.** This process only picks the name, schedules the writers and checks the
count: no vector passes through it. A server (HTTP Chroma, Pinecone, Weaviate) is written by Ray tasks over
batches of shards, ``workers`` at once, each with its own client, reading its shards from the output itself. A
local Chroma folder allows one writing process (each process keeps its own HNSW copy of the folder, and a second
writer corrupts it), so one Ray actor on this node (the folder is here) writes it shard by shard; afterwards this
process drops chromadb's cached view of the folder (:meth:`ChromaStore.written_elsewhere`), which would not see
the actor's writes. The store's key (``CHROMA_API_KEY`` ...) is read by each writer from its own process environment, as the
Qdrant loaders do (a local Ray's workers inherit this process's; a cluster's nodes get it from their own
secret): it never goes into a task's arguments or Ray's runtime_env, which Ray shows in its dashboard and job
records.
Each writer upserts one shard at a time in batches of ``batch_size``. Progress is create-only marker objects
under ``OUTPUT/_sinks/<name>/``: ``target.json`` (the versioned name, written create-only before the name is
created, so a killed publish resumes into the same one) and ``done/part-00042.json`` per finished shard (rows,
seconds and the writer's ``host:pid``, a few bytes written atomically, O(1) per shard). A rerun skips the shards
with a marker; an upsert is idempotent by id, so a shard cut off half way is simply written again. The count is
checked against the output's rows at the end. ``use_ray=False`` (``--no-ray``) writes from this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
import pyarrow as pa

from reembed import schema as S
from reembed.errors import MigrationError, ObjectExistsError
from reembed.manifest import Manifest, ShardRefs, now
from reembed.migrate.stores.base import OLD_EMBEDDING, TEXT, parse_uri
from reembed.storage import Location
from reembed.cluster import worker_name

log = logging.getLogger(__name__)

SINKS_DIR = "_sinks"
TARGET = "target.json"
DONE = "done"
COMPLETE = "complete.json"
# Columns of a shard that are neither text nor metadata.
_NOT_METADATA = {S.ID, S.EMBEDDING, TEXT, OLD_EMBEDDING, "truncated", S.TEXT_HASH}
# Export renames metadata keys that collide with its own columns (``text`` -> ``meta_text``): undone here.
_RESERVED_META = {f"meta_{k}": k for k in (S.ID, TEXT, OLD_EMBEDDING)}


def publish(output: str | Location, to: str, *, batch_size: int = 256, workers: int = 4, swap: bool = False,
            use_ray: bool = True, ray_address: str | None = None) -> dict[str, Any]:
    """Write every committed shard of ``output`` into a versioned name of the store at ``to``; returns the summary.

    The shards are written by Ray tasks (``workers`` at once; one writer actor on this node for a local Chroma
    folder); this process only picks the name, schedules the writers and checks the count. ``use_ray=False``
    writes them in this process instead (small outputs, debugging)."""
    if batch_size < 1 or workers < 1:
        raise MigrationError(f"batch size and workers must be >= 1, got {batch_size} and {workers}")
    t0 = time.monotonic()
    loc = output if isinstance(output, Location) else Location.from_uri(output)
    manifest = _complete_manifest(loc)
    src = parse_uri(to)
    sink = sink_class(src.kind)
    rows = int(manifest.totals()["embedded"])  # from the commit log's arrays: no record is read here
    dim, normalized = int(manifest.model["dimension"]), bool(manifest.model.get("normalize"))
    state_dir = f"{SINKS_DIR}/{sink_name(src, manifest)}"
    about = {"model": manifest.model.get("name"), "fingerprint": manifest.model.get("fingerprint"), "dimension": dim}

    complete = _read_json(loc, f"{state_dir}/{COMPLETE}")
    if complete is not None:  # published before (and maybe swapped since): nothing to write
        summary = {**complete, "rows_written": 0, "shards_resumed": complete["shards"], "seconds": 0.0}
        if swap:
            summary["swap"] = sink.swap(src, complete["collection"])
        log.info("publish: %s already published into %s %s", loc.display(), src.shown, complete["collection"])
        return summary
    target = _read_json(loc, f"{state_dir}/{TARGET}")
    if target is None:
        name, version = next_version(sink.taken_names(src), sink.base_name(src))
        target = {"uri": src.shown, "kind": src.kind, "collection": name, "version": version,
                  "base": sink.base_name(src), "rows": rows, "started_at": now(), **about}
        try:  # recorded before the name is created: a killed publish resumes into the same collection
            loc.publish(json.dumps(target, indent=1).encode(), f"{state_dir}/{TARGET}", exclusive=True)
        except ObjectExistsError:  # another publish of the same output and store got there first
            target = _read_json(loc, f"{state_dir}/{TARGET}")
        loc.delete_dir(f"{state_dir}/_tmp")  # publish's staging folder, empty once the file is in place
    opened = {"dim": dim, "normalized": normalized, "about": {**about, "version": target["version"]}}
    with sink.open_target(src, target["collection"], **opened):  # created here, once, before any writer runs
        pass
    committed = manifest.refs()  # numbers, seqs and rows: each writer reads its own shards' records
    written_before = np.isin(committed.shards, np.fromiter(_done_shards(loc, state_dir), np.int64))
    done = int(written_before.sum())
    todo = committed._take(np.flatnonzero(~written_before))
    if done:
        log.info("publish %s: resuming, %d of %d shards already written", target["collection"], done,
                 done + len(todo))
    columns = _columns(manifest)
    if TEXT not in columns:
        log.warning("publish: %s carries no text column; the store gets vectors and metadata only (run the job "
                    "with --passthrough text,...)", loc.display())
    job = SinkWrite(loc, to, target["collection"], opened, state_dir, tuple(columns), batch_size)
    if not use_ray:
        results = [job.write(loc, todo)] if len(todo) else []
    elif sink.concurrent(src):
        results = _write_parallel(job, todo, workers, ray_address)
    else:
        try:
            results = _write_single(job, todo, ray_address)
        finally:  # written by another process, finished or not: what this process has cached is stale
            sink.written_elsewhere(src)
    written = sum(r["rows"] for r in results)
    with sink.open_target(src, target["collection"], **opened) as store:
        count = store.count()
    if count != rows:
        raise MigrationError(f"{src.shown}: {target['collection']} holds {count} documents after publishing, the "
                             f"output has {rows}; another writer may be using it - publish into a new name")
    summary = {**target, "count": count, "rows_written": written, "shards": len(committed),
               "shards_resumed": done, "writers": sorted({r["worker"] for r in results}),
               "seconds": round(time.monotonic() - t0, 3)}
    if swap:
        summary["swap"] = sink.swap(src, target["collection"])
    loc.write_bytes(json.dumps({**summary, "finished_at": now()}, indent=1).encode(), f"{state_dir}/{COMPLETE}")
    secs = summary["seconds"]
    log.info("publish: %d rows (%d written now), %.1f s, %.1f rows/s -> %s %s", rows, written, secs,
             written / secs if secs else 0.0, src.shown, target["collection"])
    return summary


@dataclass(frozen=True)
class SinkWrite:
    """What a writer needs to write shards into the target: small, so it travels into Ray tasks (the store URI
    carries no secret; a key comes from the writer's own process environment)."""

    loc: Location
    uri: str
    collection: str
    opened: dict[str, Any]  # dim, normalized, about: open_target's keywords
    state_dir: str
    columns: tuple[str, ...]
    batch_size: int

    def open(self):
        src = parse_uri(self.uri)
        return sink_class(src.kind).open_target(src, self.collection, **self.opened)

    def write(self, loc: Location, items: ShardRefs | list[tuple[int, dict[str, Any]]], store=None) -> dict[str, Any]:
        """Write each shard of ``items`` (read here, one at a time, from ``loc``; for :class:`ShardRefs` their
        records too, from the commit log) and mark it done; returns ``{"rows", "shards", "worker"}``.
        ``store``: an open target to reuse (the single writer's)."""
        from reembed.indexes.build import _records, read_shard

        own = store is None
        store = self.open() if own else store
        rows = 0
        try:
            for shard, rec in _records(loc, items):
                t0 = time.monotonic()
                table = read_shard(loc, shard, rec, list(self.columns))
                for ids, texts, vectors, metas in documents(table, self.batch_size):
                    store.upsert(ids, texts, vectors, metas)
                _mark_done(loc, self.state_dir, shard, table.num_rows, time.monotonic() - t0)
                rows += table.num_rows
        finally:
            if own:
                store.close()
        return {"rows": rows, "shards": len(items), "worker": worker_name()}


class SingleWriter:
    """The one writer of a store that allows one (a local Chroma folder), as a Ray actor: it keeps the store
    open and is fed shards a batch at a time."""

    def __init__(self, job: SinkWrite):
        self.job = job
        self.store = job.open()

    def write(self, items: ShardRefs | list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        return self.job.write(self.job.loc, items, self.store)

    def close(self) -> None:
        self.store.close()


def rollback(to: str) -> dict[str, Any]:
    """Undo the last ``--swap`` on the store at ``to`` (Chroma: rename the names back)."""
    src = parse_uri(to)
    return sink_class(src.kind).rollback(src)


def documents(table: pa.Table, batch_size: int) -> Iterator[tuple[list[str], list[str | None], np.ndarray, list[dict]]]:
    """(ids, texts, vectors, metadata) batches of one shard, under the export's payload rules."""
    meta_cols = [c for c in table.column_names if c not in _NOT_METADATA]
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        ids = part.column(S.ID).to_pylist()
        texts = part.column(TEXT).to_pylist() if TEXT in part.column_names else [None] * len(ids)
        vectors = S.embedding_matrix(part.column(S.EMBEDDING))
        cols = {_RESERVED_META.get(c, c): part.column(c).to_pylist() for c in meta_cols}
        metas = [{k: v[i] for k, v in cols.items() if v[i] is not None} for i in range(len(ids))]
        yield ids, texts, vectors, metas


def sink_name(src, manifest: Manifest) -> str:
    """The folder under ``_sinks/`` for this store and this state of the output: kind, base name, and a hash of
    the target URI and the committed shards (a changed output or another store gets its own progress)."""
    from reembed.indexes.build import inputs_key

    where = src.shown
    if "alias" in src.options:  # which alias a --swap moves is not what was written: left out of the key
        parts = urlsplit(where)
        where = parts._replace(query=urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "alias"])).geturl()
    key = hashlib.sha256(f"{where}\n{inputs_key(manifest)}".encode()).hexdigest()[:12]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", sink_class(src.kind).base_name(src)).strip("-") or "default"
    return f"{src.kind}-{base}-{key}"


def sink_class(kind: str):
    from reembed.migrate.stores import ChromaStore, PineconeStore, WeaviateStore

    sinks = {"chroma": ChromaStore, "pinecone": PineconeStore, "weaviate": WeaviateStore}
    if kind not in sinks:
        raise MigrationError(f"publishing into {kind} is not done here: publish into chroma://, pinecone:// or "
                             "weaviate:// (for Qdrant use `reembed index --qdrant`)")
    return sinks[kind]


def next_version(existing: Sequence[str], base: str, sep: str = "_v") -> tuple[str, int]:
    """``base + sep + N`` with N one more than any version of ``base`` in ``existing`` (1 for the first)."""
    pattern = re.compile(re.escape(base + sep) + r"(\d+)$")
    versions = [int(m.group(1)) for name in existing if (m := pattern.match(name))]
    version = max(versions, default=0) + 1
    return f"{base}{sep}{version}", version


# ---------------------------------------------------------------------------------------------------
# Helpers


def _write_parallel(job: SinkWrite, todo: ShardRefs, workers: int,
                    ray_address: str | None) -> list[dict[str, Any]]:
    """A server: Ray tasks over batches of shards, ``workers`` at once, each with its own client."""
    from reembed.repair import map_shards

    if not len(todo):
        return []
    options = {"scheduling_strategy": "SPREAD"}
    return list(map_shards(_write_task, job.loc, todo, job, total=len(todo), workers=workers,
                           ray_address=ray_address, options=options))


def _write_task(loc: Location, items: ShardRefs, job: SinkWrite) -> dict[str, Any]:
    return job.write(loc, items)


def _write_single(job: SinkWrite, todo: ShardRefs, ray_address: str | None,
                  per_call: int = 16) -> list[dict[str, Any]]:
    """A local Chroma folder: Chroma allows one writing process per folder (each process keeps its own copy of
    the HNSW index; two writers corrupt it), so one actor, on this node (the folder is here), writes every
    shard in turn, ``per_call`` shards per call. Only shard numbers and commit seqs go to it (it reads the
    records from the commit log); the vectors never come here."""
    from reembed.cluster import on_this_node
    from reembed.repair import _batches

    if not len(todo):
        return []
    return on_this_node(SingleWriter, (job,), _batches(todo, per_call), lambda w, batch: w.write.remote(batch),
                        num_cpus=1, ray_address=ray_address)


def _complete_manifest(loc: Location) -> Manifest:
    from reembed.indexes.build import _load

    return _load(loc)


def _columns(manifest: Manifest) -> list[str]:
    passthrough = [c for c in manifest.plan.get("passthrough", []) if c not in (S.ID, S.EMBEDDING)]
    return [S.ID, S.EMBEDDING, *passthrough]


def _done_shards(loc: Location, state_dir: str) -> set[int]:
    done = set()
    for info in loc.list(f"{state_dir}/{DONE}"):
        m = re.search(r"part-(\d+)\.json$", info.path)
        if m:
            done.add(int(m.group(1)))
    return done


def _mark_done(loc: Location, state_dir: str, shard: int, rows: int, seconds: float) -> None:
    # Written whole or not at all; a second writer of the same marker writes the same fact (and its own pid).
    body = {"rows": rows, "seconds": round(seconds, 3), "worker": worker_name(), "at": now()}
    loc.write_bytes(json.dumps(body).encode(), f"{state_dir}/{DONE}/part-{shard:05d}.json")


def _read_json(loc: Location, rel: str) -> dict[str, Any] | None:
    if not loc.exists(rel):
        return None
    try:
        return json.loads(loc.read_bytes(rel))
    except ValueError as e:
        raise MigrationError(f"{loc.display(rel)}: not readable JSON ({e}); delete {loc.display(SINKS_DIR)} to "
                             "publish from the start") from e
