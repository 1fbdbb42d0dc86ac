"""The index stage: a FAISS index and a Qdrant collection built at the same time from an output's committed
shards, as two Ray tasks that each stream the shards (nothing is gathered in the driver).

Progress lives in the manifest under ``stages.index``::

    "index": {
      "faiss":  {"status": "building" | "done", "version", "path", "sha256", "ids_path", "ids_sha256",
                 "ntotal", "params", "inputs", "request", "started_at", "finished_at", "seconds"},
      "qdrant": {"status": "loading" | "done" | "failed", "target", "name", "collection", "version", "build",
                 "shards", "resumed_shards", "writers", "transport", "count", "inputs", "started_at",
                 "finished_at", "seconds"},
      "faiss_history": [...], "qdrant_history": [...]     # earlier finished versions
    }

``inputs`` is a hash of the committed shards (their sha256 values) and the model fingerprint. A build whose
record is ``done`` for the same inputs and settings is left alone (a rerun changes nothing, not even the
manifest); a Qdrant load that was killed resumes with the shards it had not finished (point ids are
derived from document ids, so a half-uploaded shard is simply upserted again). A killed IVF build resumes
from the shard groups it published (:mod:`reembed.indexes.faiss_dist`: each group's partial index and a
create-only record); a flat or HNSW build starts over (it lives in memory until written).

The Qdrant record is written when a build starts and when it ends, never per shard: each shard loaded
leaves a create-only record under ``OUTPUT/_index/qdrant/<build>/`` (:mod:`reembed.indexes.progress`),
O(1) whatever the number of shards, which a resume lists once.

Each task writes its own part of ``stages.index``: it reloads the manifest, changes its key, and saves; a
save that lost the race (generation check) is retried on the fresh copy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from reembed import schema as S
from reembed.cluster import init_ray
from reembed.config import ConfigError, IndexConfig
from reembed.errors import InputError
from reembed.phases import human_seconds
from reembed.indexes import faiss as faiss_index
from reembed.indexes import qdrant as Q
from reembed.indexes.progress import Progress
from reembed.manifest import ConcurrentWriteError, Manifest, ManifestError, ShardRefs, inside_output
from reembed.storage import Location
from reembed.write import read_shard_table
from reembed.cluster import worker_name

log = logging.getLogger(__name__)

STAGE = "index"
EMBEDDED_PROBE_POINTS = 500  # points an embedded load times before saying how long it will take


def build_indexes(output: str | Location, cfg: IndexConfig, ray_address: str | None = None, use_ray: bool = True,
                  verify: bool = False) -> dict[str, Any]:
    """Build what ``cfg`` asks for (FAISS, Qdrant, or both in parallel) from the shards of ``output`` (a URI,
    or a Location, whose storage settings then travel with it into the build tasks).

    ``verify``: a finished FAISS build counts as up to date only once every file's whole sha256 matches
    (``reembed index --verify``); otherwise its recorded fingerprints are compared (size, mtime, first and
    last MiB) and a file is hashed whole only when they differ.

    Returns ``{"faiss": record, "qdrant": record}`` for the backends built or found up to date.
    """
    validate(cfg)
    loc = _location(output)  # a local root is absolute: the tasks may run in another working directory
    manifest = _load(loc)
    target = qdrant_target(loc, cfg)
    wanted = (["faiss"] if cfg.faiss != "none" else []) + (["qdrant"] if target else [])
    if not wanted:
        raise ConfigError("index: nothing to build (index.faiss is none and index.qdrant is none)")
    results: dict[str, Any] = {}
    todo = []
    for backend in wanted:
        current = faiss_current(loc, manifest, cfg, verify) if backend == "faiss" else qdrant_current(manifest, cfg, target)
        if current is not None:
            log.info("index %s: up to date (%s), nothing to do", backend, _what(backend, current))
            results[backend] = current
        else:
            todo.append(backend)
    if todo:
        t0 = time.monotonic()
        results.update(_run_parallel(loc, cfg, target, todo, ray_address) if use_ray
                       else _run_threads(loc, cfg, target, todo))
        for backend in todo:
            rec = results[backend]
            rows = rec.get("ntotal", rec.get("count", 0))
            secs = rec.get("seconds") or 0.0
            log.info("index %s: %d rows, %d bytes, %.1f s, %.1f rows/s (%s)", backend, rows, rec.get("bytes", 0),
                     secs, rows / secs if secs else 0.0, _what(backend, rec))
            if (rec.get("params") or {}).get("recall_warning"):
                log.warning("index %s: %s", backend, rec["params"]["recall_warning"])
        log.info("index: %s built in %.1f s", " and ".join(todo), time.monotonic() - t0)
    return results


run_index = build_indexes  # the name reembed.pipeline calls


def validate(cfg: IndexConfig) -> None:
    """Refuse index settings that cannot work, naming the key."""
    if cfg.batch_size < 1:
        raise ConfigError(f"index.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.upload_workers < 1:
        raise ConfigError(f"index.upload_workers must be >= 1, got {cfg.upload_workers}")
    if not 0 < cfg.recall_target <= 1:
        raise ConfigError(f"index.recall_target must be in (0, 1], got {cfg.recall_target}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.collection):
        raise ConfigError(f"index.collection must be a plain name (letters, digits, _ . -), got {cfg.collection!r}")
    try:
        faiss_index.parse_memory(cfg.faiss_memory)
    except ValueError as e:
        raise ConfigError(f"index.faiss_memory: {e}") from e


def qdrant_target(loc: Location, cfg: IndexConfig) -> str | None:
    """Where the collection goes: a server URL, a folder, or None for no Qdrant."""
    q = cfg.qdrant.strip()
    if q in ("", "none"):
        return None
    if q == "embedded":
        if loc.fs.type_name != "local":
            raise ConfigError(
                f"index.qdrant=embedded keeps Qdrant beside the output, but {loc.uri} is not a local folder: "
                "give index.qdrant a local folder or a Qdrant server URL"
            )
        return os.path.join(loc.root, "indexes", "qdrant")
    return q if Q.is_server(q) else os.path.abspath(os.path.expanduser(q))


# ---------------------------------------------------------------------------------------------------
# FAISS


def faiss_request(cfg: IndexConfig) -> dict[str, Any]:
    return {"kind": cfg.faiss, "memory": cfg.faiss_memory, "recall_target": cfg.recall_target}


def faiss_current(loc: Location, manifest: Manifest, cfg: IndexConfig, verify: bool = False) -> dict[str, Any] | None:
    """The FAISS record if a finished build of these inputs and settings is still on storage, intact: every
    file's fingerprint is checked, its whole sha256 when that differs or with ``verify`` (a damaged one is
    rebuilt, never reported up to date)."""
    rec = state_of(manifest).get("faiss")
    if not rec or rec.get("status") != "done":
        return None
    if rec.get("inputs") != inputs_key(manifest) or rec.get("request") != faiss_request(cfg):
        return None
    inside_output(loc, rec.get("path"), "stages.index.faiss.path")
    inside_output(loc, rec.get("ids_path"), "stages.index.faiss.ids_path")
    if rec.get("ivfdata_path") is not None:
        inside_output(loc, rec.get("ivfdata_path"), "stages.index.faiss.ivfdata_path")
    damaged = faiss_index.damaged_files(loc, rec, verify)
    if damaged:
        log.warning("FAISS v%s: %s missing or damaged (size or sha256 differs from the manifest); building it "
                    "again", rec.get("version"), ", ".join(damaged))
        return None
    return rec


def faiss_record(manifest: Manifest, version: int | None = None) -> dict[str, Any]:
    """The finished FAISS build to search: the given version, else the newest."""
    stage = state_of(manifest)
    done = [r for r in [*stage.get("faiss_history", []), stage.get("faiss")] if r and r.get("status") == "done"]
    if version is not None:
        done = [r for r in done if r["version"] == version]
    if not done:
        what = f"version {version} of the FAISS index" if version is not None else "a FAISS index"
        raise ManifestError(f"{manifest.loc.display('manifest.json')}: no finished build of {what}; run `reembed index` first")
    return max(done, key=lambda r: r["version"])


def run_faiss(output: str | Location, cfg: IndexConfig, workers: int | None = None, use_ray: bool = False,
              group_rows: int | None = None) -> dict[str, Any]:
    """Build, tune and publish the FAISS index; record it in the manifest (at the start and at the end only).

    Flat and HNSW are built in this process. IVF is built by :mod:`reembed.indexes.faiss_dist`: trained once
    on a sample, filled by ``workers`` Ray tasks (``use_ray``; default: one per CPU of the cluster) or
    group by group here, merged on disk; a killed IVF build resumes from the groups it had published.
    """
    started, t0 = _stamp(), time.monotonic()
    loc = _location(output)
    manifest = _load(loc)
    current = faiss_current(loc, manifest, cfg)
    if current is not None:
        return current
    rows, dim = rows_of(manifest), int(manifest.model["dimension"])
    plan = faiss_index.plan_index(rows, dim, cfg.faiss, cfg.faiss_memory)
    base = {"inputs": inputs_key(manifest), "request": faiss_request(cfg), "started_at": started}
    _record(loc, "faiss", {"status": "building", **base, "plan": asdict(plan)}, archive=True)
    log.info("FAISS: %s over %d vectors of %d-d (about %s): %s", plan.factory, rows, dim,
             faiss_index.human_bytes(plan.estimated_bytes), plan.reason)
    history = state_of(_load(loc)).get("faiss_history", [])
    if plan.kind == "ivf":
        from reembed.indexes import faiss_dist

        if use_ray and workers is None:
            import ray

            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        version = faiss_index.next_version(loc, [r["version"] for r in history])
        files, params = faiss_dist.build_ivf(
            loc, manifest.refs(), plan, version, inputs=base["inputs"],
            recall_target=cfg.recall_target, workers=workers or 1, use_ray=use_ray,
            group_rows=group_rows or faiss_dist.GROUP_ROWS)
    else:
        train = (faiss_index.sample_vectors(shard_tables(loc, manifest, [S.EMBEDDING]), rows, plan.train_size)
                 if plan.needs_training else None)  # sq8 / pq codecs: one streaming pass for their sample
        built = faiss_index.build(shard_tables(loc, manifest, [S.ID, S.EMBEDDING]), plan, train,
                                  recall_target=cfg.recall_target, exact_fallback=cfg.faiss == "auto")
        if built.ntotal != rows:
            raise ManifestError(f"FAISS index holds {built.ntotal} vectors, the manifest committed {rows}")
        version = faiss_index.next_version(loc, [r["version"] for r in history])
        files, params = faiss_index.write(loc, built, version), built.params
    if files["ntotal"] != rows:
        raise ManifestError(f"FAISS index holds {files['ntotal']} vectors, the manifest committed {rows}")
    rec = {"status": "done", **files, "params": params, "reason": plan.reason, **base, "finished_at": _stamp(),
           "seconds": round(time.monotonic() - t0, 3)}
    _record(loc, "faiss", rec)
    return rec


# ---------------------------------------------------------------------------------------------------
# Qdrant


def qdrant_current(manifest: Manifest, cfg: IndexConfig, target: str) -> dict[str, Any] | None:
    """The Qdrant record if a finished load of these inputs is still there with every point."""
    rec = state_of(manifest).get("qdrant")
    if not _same_qdrant(rec, manifest, cfg, target) or rec.get("status") != "done":
        return None
    client = Q.connect(target)
    try:
        if rec["collection"] not in Q.collections(client) or Q.count(client, rec["collection"]) != rows_of(manifest):
            log.warning("Qdrant %s: %s changed since it was built; loading a new version", Q.describe(target), rec["collection"])
            return None
    finally:
        client.close()
    return rec


def run_qdrant(output: str | Location, cfg: IndexConfig, target: str, use_ray: bool = False) -> dict[str, Any]:
    """Load (or resume loading) a versioned collection from the shards; verify its count; record it.

    The manifest's ``stages.index.qdrant`` is written at the start and at the end of a build, never per
    shard: each shard loaded leaves one create-only progress record (:class:`Progress`), and a resume lists
    them once and loads only the other shards. A server is loaded by ``cfg.upload_workers`` writers at once,
    each with its own client (gRPC when the server offers it) and its own disjoint shards: Ray tasks with
    ``use_ray`` (no vector passes through this process), else threads of this process. An embedded Qdrant
    allows one writer, this process; above :data:`~reembed.indexes.qdrant.EMBEDDED_MAX_POINTS` points it
    first measures its rate and says how long the load will take and how to use a server instead.
    """
    started, t0 = _stamp(), time.monotonic()
    loc = _location(output)
    manifest = _load(loc)
    rows = rows_of(manifest)
    client = Q.connect(target)
    try:
        state = _start_qdrant(loc, manifest, client, state_of(manifest).get("qdrant"), cfg, target, started)
        if state["status"] == "done":
            return state
        progress = Progress(loc, "qdrant", state["build"])
        committed = manifest.refs()  # numbers, seqs and rows: each writer reads its own shards' records
        loaded_before = np.isin(committed.shards, np.fromiter(progress.done(), np.int64))
        done = int(loaded_before.sum())
        todo = committed._take(np.flatnonzero(~loaded_before))
        if done:
            log.info("Qdrant %s: resuming %s: %d of %d shards already loaded, %d to load", Q.describe(target),
                     state["collection"], done, len(committed), len(todo))
        job = _QdrantLoad(loc, target, state["collection"], state["build"], cfg.batch_size,
                          tuple(manifest.plan.get("passthrough", [])))
        if Q.is_server(target):
            loaded = _load_server(job, client, todo, cfg.upload_workers, use_ray)
        else:
            loaded = _load_embedded(job, client, todo, rows)
        Q.end_bulk(client, state["collection"])
        got = Q.count(client, state["collection"])
        if got != rows:
            # Not resumable: the progress records say every shard is in, the collection disagrees.
            _record(loc, "qdrant", {**state, "status": "failed", "count": got, "finished_at": _stamp()})
            raise ManifestError(f"Qdrant {state['collection']} holds {got} points after loading, the manifest "
                                f"committed {rows}; rerun `reembed index` to load a new version")
        meta = {**_collection_meta(manifest, state["version"], cfg), **(Q.metadata(client, state["collection"]).get(Q.META) or {})}
        Q.set_metadata(client, state["collection"], {Q.META: {**meta, "state": "ready"}})
        state.update(status="done", count=got, shards=len(committed), resumed_shards=done, **loaded,
                     bytes=int(manifest.totals()["bytes"]), started_at=started,
                     finished_at=_stamp(), seconds=round(time.monotonic() - t0, 3))
        _record(loc, "qdrant", state)
        return state
    finally:
        client.close()


def _start_qdrant(loc: Location, manifest: Manifest, client, rec: dict[str, Any] | None, cfg: IndexConfig,
                  target: str, started: str) -> dict[str, Any]:
    """The build to continue (a finished one still intact, or an unfinished one of these inputs), else a
    new version, recorded in the manifest before its collection is created (a crash right after creating
    it resumes into it)."""
    rows, dim = rows_of(manifest), int(manifest.model["dimension"])
    resume = _same_qdrant(rec, manifest, cfg, target)
    if resume and rec["status"] == "done":
        if rec["collection"] in Q.collections(client) and Q.count(client, rec["collection"]) == rows:
            return rec
        resume = False
    if resume and rec["status"] == "loading" and rec.get("build"):
        state = dict(rec, batch_size=cfg.batch_size)
        if state["collection"] not in Q.collections(client):  # lost since: its progress records mean nothing
            cleared = Progress(loc, "qdrant", state["build"]).clear()
            log.warning("Qdrant %s: %s is gone; loading it again (%d progress records dropped)",
                        Q.describe(target), state["collection"], cleared)
            Q.create_collection(client, state["collection"], dim, _collection_meta(manifest, state["version"], cfg),
                                cfg.qdrant_quantization)
        return state
    version = Q.next_version(client, cfg.collection)
    collection = Q.versioned(cfg.collection, version)
    state = {"status": "loading", "target": Q.describe(target), "name": cfg.collection, "collection": collection,
             "version": version, "inputs": inputs_key(manifest), "build": f"{collection}.{uuid.uuid4().hex[:8]}",
             "batch_size": cfg.batch_size, "quantization": cfg.qdrant_quantization, "started_at": started}
    if cfg.qdrant_quantization == "binary" and dim < Q.BINARY_MIN_DIM:
        log.warning("Qdrant %s: binary quantization of %d-d vectors loses much recall (Qdrant recommends it for "
                    "%d-d and wider); `reembed validate --quantization` measures it; int8 keeps more",
                    Q.describe(target), dim, Q.BINARY_MIN_DIM)
    _record(loc, "qdrant", state, archive=True)
    Q.create_collection(client, collection, dim, _collection_meta(manifest, version, cfg), cfg.qdrant_quantization)
    return state


@dataclass(frozen=True)
class _QdrantLoad:
    """What a writer needs to load shards into the collection: small, so it travels into Ray tasks."""

    loc: Location
    target: str
    collection: str
    build: str
    batch_size: int
    passthrough: tuple[str, ...]

    def shard(self, client, shard: int, rec: dict[str, Any], table: pa.Table | None = None) -> int:
        """Upsert one shard (``table``: its rows not yet upserted, if some are) and mark it done."""
        t0 = time.monotonic()
        if table is None:
            table = read_shard(self.loc, shard, rec, [S.ID, S.EMBEDDING, *self.passthrough])
        n = Q.upload(client, self.collection, [table], self.batch_size, self.passthrough)
        Progress(self.loc, "qdrant", self.build).mark(shard, rows=rec["rows"], seconds=round(time.monotonic() - t0, 3))
        return n


def _load_embedded(job: _QdrantLoad, client, todo: ShardRefs, rows: int) -> dict[str, Any]:
    """Every pending shard by this process, the one writer an embedded Qdrant allows."""
    t0 = time.monotonic()
    left = int(todo.rows.sum())
    log.info("Qdrant %s: embedded Qdrant allows one writer: this process loads %d points (%d shards); a Qdrant "
             "server is loaded by --workers writers in parallel", Q.describe(job.target), left, len(todo))
    out: dict[str, Any] = {"writers": 1, "transport": "embedded"}
    records = todo.records(job.loc)
    if len(todo) and rows > Q.EMBEDDED_MAX_POINTS:
        out["estimate"] = _say_embedded_time(job, client, next(records), left, rows)
    for shard, rec in records:
        job.shard(client, shard, rec)
    out["load_seconds"] = round(time.monotonic() - t0, 3)
    return out


def _say_embedded_time(job: _QdrantLoad, client, first: tuple[int, dict[str, Any]], left: int,
                       rows: int) -> dict[str, Any]:
    """Load the first pending shard, timing its first points, and say how long the whole load will take."""
    shard, rec = first
    table = read_shard(job.loc, shard, rec, [S.ID, S.EMBEDDING, *job.passthrough])
    probe = table.slice(0, min(table.num_rows, max(job.batch_size, EMBEDDED_PROBE_POINTS)))
    t0 = time.monotonic()
    Q.upload(client, job.collection, [probe], job.batch_size, job.passthrough)
    rate = probe.num_rows / max(time.monotonic() - t0, 1e-6)
    eta = left / rate
    log.warning(
        "Qdrant %s: %d points is a lot for embedded Qdrant (qdrant-client's local mode, meant for tests and small "
        "data; above %d): at %.0f points/s, measured on the first %d, loading the %d left takes about %s. To load "
        "in parallel instead, point at a Qdrant server: reembed index %s --qdrant http://HOST:6333 (--workers N; "
        "QDRANT_API_KEY for its key). Going on with the embedded load.",
        Q.describe(job.target), rows, Q.EMBEDDED_MAX_POINTS, rate, probe.num_rows, left, human_seconds(eta),
        _output_uri(job.loc), )
    job.shard(client, shard, rec, table.slice(probe.num_rows))
    return {"points_per_s": round(rate, 1), "points": left, "seconds": round(eta, 1)}


def _load_server(job: _QdrantLoad, client, todo: ShardRefs | list[tuple[int, dict[str, Any]]], workers: int,
                 use_ray: bool) -> dict[str, Any]:
    """Every pending shard by ``workers`` writers, each with a disjoint share: Ray tasks, or threads here."""
    t0 = time.monotonic()
    workers = max(1, min(workers, len(todo)))
    out: dict[str, Any] = {"writers": workers}
    if not len(todo):
        out["transport"] = "grpc" if Q.uses_grpc(client) else "http"
    elif use_ray:
        import ray

        if not ray.is_initialized():
            init_ray(None)
        task = ray.remote(_qdrant_load_task).options(num_cpus=1, scheduling_strategy="SPREAD")
        # Round-robin shares: each writer gets early and late shards alike, so they finish together.
        refs = [task.remote(job, todo[i::workers]) for i in range(workers)]
        try:
            results = ray.get(refs)
        except BaseException:
            for ref in refs:  # a writer failed (or we were interrupted): stop the others; a rerun resumes
                ray.cancel(ref, force=True)
            raise
        out["transport"] = results[0]["transport"]
        out["writer_hosts"] = sorted({r["worker"] for r in results})
    else:
        grpc_client = Q.connect(job.target, grpc=True)
        try:
            out["transport"] = "grpc" if Q.uses_grpc(grpc_client) else "http"
            for _ in bounded_map(lambda item: job.shard(grpc_client, *item), _records(job.loc, todo), workers):
                pass
        finally:
            grpc_client.close()
    log.info("Qdrant %s: %d shards loaded by %d writers over %s in %.1f s", Q.describe(job.target), len(todo),
             workers, out["transport"], time.monotonic() - t0)
    out["load_seconds"] = round(time.monotonic() - t0, 3)
    return out


def _qdrant_load_task(job: _QdrantLoad, items: ShardRefs | list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One writer, as a Ray task: its own client (gRPC when offered), its shards (their records read here,
    from the commit log), a small summary back."""
    client = Q.connect(job.target, grpc=True)
    try:
        rows = sum(job.shard(client, shard, rec) for shard, rec in _records(job.loc, items))
        return {"rows": rows, "shards": len(items), "worker": worker_name(),
                "transport": "grpc" if Q.uses_grpc(client) else "http"}
    finally:
        client.close()


def _slim(rec: dict[str, Any]) -> dict[str, Any]:
    """What reading a shard needs of its commit record."""
    return {k: rec[k] for k in ("path", "sha256", "rows", "bytes") if k in rec}


def _records(loc: Location, items: ShardRefs | list[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(shard, record)`` of a writer's share: read from the commit log for ShardRefs, else as given."""
    return items.records(loc) if isinstance(items, ShardRefs) else iter(items)


def bounded_map(fn, items, workers: int) -> Iterator:
    """``fn(item)`` for each item on ``workers`` threads, yielding results as they finish (on the caller's
    thread) with at most ``workers`` items in flight, so at most that many shards are in memory."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    queue = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {pool.submit(fn, item) for item in itertools.islice(queue, workers)}
        while running:
            ready, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in ready:
                yield fut.result()
                running |= {pool.submit(fn, item) for item in itertools.islice(queue, 1)}


def _same_qdrant(rec: dict[str, Any] | None, manifest: Manifest, cfg: IndexConfig, target: str) -> bool:
    return bool(rec) and rec.get("inputs") == inputs_key(manifest) and rec.get("target") == Q.describe(target) \
        and rec.get("name") == cfg.collection and (rec.get("quantization") or "none") == cfg.qdrant_quantization


def _collection_meta(manifest: Manifest, version: int, cfg: IndexConfig) -> dict[str, Any]:
    m = manifest.model
    return {"model": m["name"], "revision": m.get("revision"), "dimension": m["dimension"],
            "fingerprint": m["fingerprint"], "output": _output_uri(manifest.loc), "rows": rows_of(manifest),
            "version": version, "quantization": cfg.qdrant_quantization, "created_at": _stamp(), "state": "loading"}


# ---------------------------------------------------------------------------------------------------
# Running both at once


def _run_parallel(loc: Location, cfg: IndexConfig, target: str | None, todo: list[str],
                  ray_address: str | None) -> dict[str, Any]:
    """Both builds as Ray tasks. The FAISS task takes a GPU when the cluster has a free one (faiss trains on
    it if faiss-gpu is installed); an embedded Qdrant task is pinned to this node, where its folder is. A
    server is loaded by ``cfg.upload_workers`` Ray tasks, which a thread of this process starts and waits
    for (it handles only small records: no vector comes here)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray(ray_address)
    refs = {}
    if "faiss" in todo:
        gpus = 1 if ray.available_resources().get("GPU", 0) >= 1 else 0
        refs["faiss"] = ray.remote(_faiss_task).options(num_cpus=1, num_gpus=gpus).remote(loc, cfg)
    waits = {name: (lambda r=ref: ray.get(r)) for name, ref in refs.items()}
    if "qdrant" in todo and Q.is_server(target):
        waits["qdrant"] = _in_thread(run_qdrant, loc, cfg, target, True)
    elif "qdrant" in todo:
        node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        refs["qdrant"] = ray.remote(run_qdrant).options(num_cpus=1, scheduling_strategy=node).remote(loc, cfg, target)
        waits["qdrant"] = lambda r=refs["qdrant"]: ray.get(r)
    try:
        return _gather(waits)
    except KeyboardInterrupt:
        # Stop the builds too: a rerun must not meet a leftover writer (embedded Qdrant allows only one).
        for ref in refs.values():
            ray.cancel(ref, force=True)
        raise


def _in_thread(fn, *args):
    """Start ``fn(*args)`` on a daemon thread (an interrupted driver does not wait for it); returns a
    function that waits for its result or raises its exception."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the waiter, which raises it
            box["error"] = e

    thread = threading.Thread(target=work, name=f"reembed-{getattr(fn, '__name__', 'task')}", daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    return wait


def _faiss_task(loc: Location, cfg: IndexConfig) -> dict[str, Any]:
    import faiss

    # Ray sets OMP_NUM_THREADS=1 in a 1-CPU task; the FAISS build is the CPU-heavy half of the stage (the
    # Qdrant upload mostly waits on the server), so it takes the node's cores.
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return run_faiss(loc, cfg, use_ray=True)


def _run_threads(loc: Location, cfg: IndexConfig, target: str | None, todo: list[str]) -> dict[str, Any]:
    """Both builds on threads of this process (no Ray)."""
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        futs = {}
        if "faiss" in todo:
            futs["faiss"] = pool.submit(run_faiss, loc, cfg)
        if "qdrant" in todo:
            futs["qdrant"] = pool.submit(run_qdrant, loc, cfg, target)
        return _gather({name: fut.result for name, fut in futs.items()})


def _gather(waits: dict[str, Any]) -> dict[str, Any]:
    """Wait for every build, then raise the first failure (after the others have finished)."""
    results, errors = {}, {}
    for name, get in waits.items():
        try:
            results[name] = get()
        except Exception as e:  # surfaced below, once every build has ended
            errors[name] = e
    if errors:
        first = next(iter(errors.values()))
        for name, e in errors.items():  # the first is raised (the CLI prints it); the others would be lost
            if e is not first:
                log.error("index %s failed too: %s", name, e)
        cause = getattr(first, "cause", None)  # a Ray task's own exception, unwrapped from RayTaskError
        raise (cause if isinstance(cause, Exception) else first) from first
    return results


# ---------------------------------------------------------------------------------------------------
# Manifest helpers


def shard_tables(loc: Location, manifest: Manifest, columns: list[str]) -> Iterator[pa.Table]:
    """Every committed shard in shard order, sha256-checked, one at a time (records streamed from the log)."""
    for shard, rec in manifest.refs().records(loc):
        yield read_shard(loc, shard, rec, columns)


def read_shard(loc: Location, shard: int, rec: dict[str, Any], columns: list[str] | None) -> pa.Table:
    """One committed shard through ``read_shard_table``: its path held inside the output, its sha256 checked."""
    return read_shard_table(loc, rec, columns=columns, verify=True, key=f"shards.{shard:05d}")


def inputs_key(manifest: Manifest) -> str:
    """What an index is built from: the committed shards (:meth:`Manifest.committed_digest`, from the commit
    log's arrays: no record is read) and the model."""
    blob = json.dumps({"fingerprint": manifest.model["fingerprint"], "shards": manifest.committed_digest()})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(loc: Location) -> Manifest:
    m = Manifest.load(loc)
    if m is None:
        raise ManifestError(f"{loc.display('manifest.json')}: not found; run `reembed run` on this output first")
    if not m.is_complete():
        raise ManifestError(
            f"{loc.display('manifest.json')}: {len(m.pending())} shards are not committed yet; indexes are built "
            "from a complete output (rerun `reembed run` to finish it)"
        )
    if rows_of(m) == 0:
        totals = m.totals()  # from the log's arrays: no record is read
        dead, reasons = totals["dead_lettered"], totals["reasons"]
        why = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "no input rows"
        raise InputError(f"{loc.uri}: nothing to index: the output holds 0 embedded rows ({dead} dead-lettered: "
                         f"{why}); fix the input (see `reembed status {loc.uri}`) and rerun `reembed run`")
    return m


def state_of(manifest: Manifest) -> dict[str, Any]:
    return (manifest.data.get("stages") or {}).get(STAGE) or {}


def rows_of(manifest: Manifest) -> int:
    """Rows embedded over the committed shards, from the commit log's arrays (no record is read)."""
    return int(manifest.totals()["embedded"])


def _record(loc: Location, backend: str, state: dict[str, Any], archive: bool = False) -> None:
    """Set ``stages.index.<backend>`` on the stored manifest, retrying a save that lost a race.

    ``archive``: keep the record being replaced in ``<backend>_history`` if it was a finished build.
    """
    for attempt in range(100):
        m = Manifest.load(loc)
        stage = dict(state_of(m))
        old = stage.get(backend)
        if archive and old and old.get("status") == "done":
            stage[f"{backend}_history"] = [*stage.get(f"{backend}_history", []), old]
        stage[backend] = dict(state)
        try:
            m.set_stage(STAGE, stage)
            return
        except ConcurrentWriteError:
            time.sleep(0.02 * (1 + attempt % 10))
    raise ManifestError(f"{loc.display('manifest.json')}: could not record index progress (kept changing)")


def _location(output: str | Location) -> Location:
    return output if isinstance(output, Location) else Location.from_uri(output)


def _output_uri(loc: Location) -> str:
    """The output as a URI that works from anywhere: absolute for a local folder."""
    return loc.root if loc.fs.type_name == "local" else loc.uri


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _what(backend: str, rec: dict[str, Any]) -> str:
    if backend == "faiss":
        p = rec.get("params", {})
        return (f"v{rec['version']} {p.get('factory')}, search {p.get('search')}, recall@10 {p.get('recall_at_10')}, "
                f"{rec['path']}")
    return f"{rec['collection']} at {rec['target']}, {rec.get('count')} points"
