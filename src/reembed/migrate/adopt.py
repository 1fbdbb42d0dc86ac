"""Adopt an app's Qdrant collection: turn the name the app queries into an alias that ``swap`` and
``rollback`` can move.

    reembed adopt --store "qdrant:///srv/app/qdrant?collection=documents" --model sentence-transformers/all-MiniLM-L6-v2

Qdrant aliases cannot shadow a collection, and a collection cannot be renamed, so an app that predates
reembed (it queries the collection ``documents`` itself) cannot be swapped as it is. Adopting it:

1. copies ``documents`` into ``documents-v0`` (same point ids, vectors, payloads and payload indexes),
   page by page, in Ray tasks, and checks the copy holds every point. From a server, this process scrolls the
   point ids only (no payload, no vector) to find where every 8th page starts, and ``workers`` tasks copy those
   runs of pages at once, each with its own client. An embedded folder can be open in one process only: this
   process lets go of it and one task on this node copies every point, then this process opens it again;
   copying straight from the store (not from ``reembed export``'s parts) keeps every named and sparse vector;
2. queries both with a sample of the stored vectors and requires the same results;
3. deletes ``documents`` and at once creates the alias ``documents`` -> ``documents-v0``: between the two
   calls the name does not exist (Qdrant has no atomic "collection to alias"); that window is measured and
   reported, and an app query that lands in it gets "not found" and should be retried;
4. runs the same queries through the alias and requires the same results again.

Every step is resumable: a rerun after a crash finishes the copy (upserts by id are idempotent), and a
crash inside the window (the name deleted, no alias yet) is finished by creating the alias. With embedded
Qdrant the app cannot run during any of this anyway: the folder is locked by one process at a time.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import numpy as np

from reembed.errors import MigrationError
from reembed.indexes import qdrant as Q
from reembed.manifest import now
from reembed.cluster import worker_name

log = logging.getLogger(__name__)

KILL_ENV = "REEMBED_MIGRATE_KILL_AT"  # TEST HOOK: SIGKILL this process at the named point (see kill_point)
ADOPTED_FROM = "adopted_from"


def adopt(store: str, model: str | None = None, sample: int = 32, k: int = 10, page_size: int = 256,
          seed: int = 0, *, use_ray: bool = True, workers: int = 4, ray_address: str | None = None) -> dict[str, Any]:
    """Make the collection named by ``store`` (``qdrant://...?collection=NAME``) an alias to a versioned copy
    of itself; ``model`` (the app's query model) is recorded on the copy, so ``swap``/``rollback`` and
    ``versions`` can name it. Returns what was done, with the measured window.

    The points are copied by Ray tasks, not by this process: from a server, ``workers`` tasks at once, each
    scrolling its own run of pages (:func:`_copy_parallel`); an embedded folder (one process may open it) by
    one task on this node while this process has let go of the folder. ``use_ray=False`` copies here."""
    from reembed.migrate.stores.base import parse_uri
    from reembed.migrate.stores.qdrant import target_of_uri

    src = parse_uri(store)
    name = src.option("collection", "")
    if src.kind != "qdrant" or not name:
        raise MigrationError(f"{src.shown}: adopt takes a Qdrant collection, qdrant://PATH_OR_HOST?collection=NAME")
    target = target_of_uri(src)
    copier = _Copier(target, page_size, sample, seed, use_ray, workers, ray_address)
    try:
        return _adopt(copier, name, Q.describe(target), model, sample, k, page_size, seed)
    finally:
        copier.client.close()


def kill_point(point: str) -> None:
    """TEST HOOK: with ``REEMBED_MIGRATE_KILL_AT=<point>``, die here as a crash would (SIGKILL, no cleanup)."""
    if os.environ.get(KILL_ENV) == point:
        log.warning("fault injection (%s=%s): killing this process", KILL_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------


def _adopt(copier: "_Copier", name: str, where: str, model: str | None, sample: int, k: int, page_size: int,
           seed: int) -> dict[str, Any]:
    client = copier.client
    aliases = Q.aliases(client)
    names = set(Q.collections(client))
    if name in aliases:
        copy = aliases[name]
        meta = Q.metadata(client, copy).get(Q.META) or {}
        log.info("adopt: %s is already an alias (-> %s); nothing to do", name, copy)
        return {"alias": name, "collection": copy, "changed": False, "points": Q.count(client, copy),
                "model": meta.get("model"), "window_seconds": None}
    copies = [c for c in sorted(names) if (Q.metadata(client, c).get(Q.META) or {}).get(ADOPTED_FROM) == name]
    if name not in names:
        ready = [c for c in copies if (Q.metadata(client, c).get(Q.META) or {}).get("state") == "ready"]
        if not ready:
            raise MigrationError(f"{where}: no collection or alias named {name!r} (collections: "
                                 f"{', '.join(sorted(names)) or 'none'})")
        # A crash inside the window: the name was deleted, the alias not yet created.
        t0 = time.perf_counter()
        _alias(client, name, ready[0])
        log.warning("adopt: %s was missing (an earlier adopt stopped inside its window); alias -> %s created",
                    name, ready[0])
        meta = Q.metadata(client, ready[0]).get(Q.META) or {}
        return {"alias": name, "collection": ready[0], "changed": True, "points": Q.count(client, ready[0]),
                "model": meta.get("model"), "window_seconds": None, "resumed_window": True,
                "window": f"the name {name!r} was missing from an interrupted earlier run until now "
                          f"(alias created in {time.perf_counter() - t0:.3f} s)"}
    copy = copies[0] if copies else _copy_name(name, names, client)
    points = Q.count(client, name)
    _create_copy(client, name, copy, model)
    queries = copier.copy(name, copy)
    client = copier.client  # an embedded folder was let go of for the copying task, and opened again
    got = Q.count(client, copy)
    if got != points:
        raise MigrationError(f"{where}: the copy {copy} holds {got} points, {name} holds {points}; was the app "
                             "writing to it? Stop writes and run adopt again (the copy resumes)")
    before = _search(client, name, queries, k)
    _same(before, _search(client, copy, queries, k), f"{where}: {copy} answers {len(queries)} sample queries "
          f"differently from {name}; nothing was changed (the copy is kept: run adopt again)")
    meta = Q.metadata(client, copy).get(Q.META) or {}
    Q.set_metadata(client, copy, {Q.META: {**meta, "state": "ready", "rows": got, "adopted_at": now()}})
    kill_point("adopt-copied")

    t0 = time.perf_counter()
    client.delete_collection(name)
    kill_point("adopt-window")
    _alias(client, name, copy)
    window = time.perf_counter() - t0

    _same(before, _search(client, name, queries, k), f"{where}: through the alias {name} -> {copy}, {len(queries)} "
          f"sample queries answer differently than before; `reembed versions` shows the state")
    log.info("adopt: %s is now an alias -> %s (%d points; the name was missing for %.1f ms; %d sample queries "
             "answer the same before and after)", name, copy, got, window * 1e3, len(queries))
    return {"alias": name, "collection": copy, "changed": True, "points": got, "model": model,
            "window_seconds": round(window, 6), "queries_checked": len(queries), "same_results": True,
            "copied_by": copier.writers,
            "window": (f"the name {name!r} did not exist for {window * 1e3:.1f} ms, between deleting the collection "
                       f"and creating the alias (Qdrant cannot turn a collection into an alias atomically); a query "
                       "in that window gets 'not found' and should be retried")}


def _copy_name(name: str, names: set[str], client) -> str:
    """``<name>-v0`` (the collection as the app had it), or the next free version if that is taken."""
    first = Q.versioned(name, 0)
    return first if first not in names else Q.versioned(name, Q.next_version(client, name))


def _create_copy(client, name: str, copy: str, model: str | None) -> None:
    """``copy``, created like ``name`` (vectors, sparse vectors, payload indexes) if it is missing."""
    info = Q.call_with_retry(lambda: client.get_collection(name), what=f"read {name}")
    params = info.config.params
    if copy not in Q.collections(client):
        meta = {ADOPTED_FROM: name, "model": model, "dimension": Q.dimension(client, name), "state": "copying",
                "created_at": now(), "version": Q.version_of(name, copy)}
        client.create_collection(copy, vectors_config=params.vectors, sparse_vectors_config=params.sparse_vectors,
                                 metadata={Q.META: meta})
        for field, schema in (info.payload_schema or {}).items():
            client.create_payload_index(copy, field, field_schema=schema.data_type)


class _Copier:
    """Where adopt's copy runs (see :func:`adopt`), and the client this process holds around it."""

    def __init__(self, target: str, page_size: int, sample: int, seed: int, use_ray: bool, workers: int,
                 ray_address: str | None):
        self.target, self.page_size, self.sample, self.seed = target, page_size, sample, seed
        self.use_ray, self.workers, self.ray_address = use_ray, workers, ray_address
        self.client = Q.connect(target)
        self.writers: list[str] = []  # the processes that copied (host:pid)

    def copy(self, name: str, copy: str) -> list[Any]:
        """Every point of ``name`` into ``copy``; returns a sample of the stored vectors to query with."""
        job = (self.target, name, copy, self.page_size, self.sample, self.seed)
        if not self.use_ray:
            return self._done([_copy_points(self.client, *job[1:])])
        if Q.is_server(self.target):
            return self._done(_copy_parallel(self.client, job, self.workers, self.ray_address))
        self.client.close()  # one process at a time may open an embedded folder: the copying task's turn
        if Q.describe(self.target) in Q._EMBEDDED:  # still open here, for another user of this process
            log.warning("adopt: %s stays open in this process (another store uses it), so the copy runs here",
                        Q.describe(self.target))
            self.client = Q.connect(self.target)
            return self._done([_copy_points(self.client, *job[1:])])
        try:
            return self._done([_copy_single(job, self.ray_address)])
        finally:
            self.client = Q.connect(self.target)

    def _done(self, results: list[dict[str, Any]]) -> list[Any]:
        self.writers = sorted({r["worker"] for r in results})
        return _merged_sample(results, self.sample, self.seed)


def _copy_parallel(client, job: tuple, workers: int, ray_address: str | None,
                   pages_per_task: int = 8) -> list[dict[str, Any]]:
    """A server: this process scrolls the point ids only (no payload, no vector) to find where every
    ``pages_per_task``-th page starts; each Ray task scrolls its own run of pages from there (pages of the same
    size from the same offset are the same pages) and upserts them into the copy. Back come counts and samples."""
    from reembed.repair import map_shards

    _, name, _, page_size, _, _ = job
    runs = [(start, pages_per_task) for start in page_starts(client, name, page_size, pages_per_task)]
    results = list(map_shards(_copy_task, None, runs, job, total=len(runs), workers=workers, ray_address=ray_address,
                              options={"scheduling_strategy": "SPREAD"}))
    log.info("adopt: %s copied by %d Ray tasks (%d runs of %d pages)", name,
             len({r["worker"] for r in results}), len(runs), pages_per_task)
    return results


def page_starts(client, name: str, page_size: int, every: int) -> list[Any]:
    """The offsets (point ids; None for the first) where every ``every``-th page of ``page_size`` points of
    ``name`` starts, found by scrolling ids only. Scrolling ``every`` pages from each copies each point once."""
    starts, offset, pages = [], None, 0
    while True:
        if pages % every == 0:
            starts.append(offset)
        _, offset = Q.call_with_retry(lambda: client.scroll(name, limit=page_size, offset=offset, with_payload=False,
                                                            with_vectors=False), what=f"scroll {name}")
        pages += 1
        if offset is None:
            return starts


def _copy_task(_, runs: list[tuple[Any, int]], job: tuple) -> dict[str, Any]:
    target, name, copy, page_size, sample, seed = job
    client = Q.connect(target, grpc=True)
    try:
        out = [_copy_points(client, name, copy, page_size, sample, seed, start=start, pages=pages)
               for start, pages in runs]
    finally:
        client.close()
    return {"points": sum(r["points"] for r in out), "sample": [v for r in out for v in r["sample"]],
            "worker": out[0]["worker"] if out else worker_name()}


def _copy_single(job: tuple, ray_address: str | None) -> dict[str, Any]:
    """An embedded folder: one Ray task on this node (the folder is here) copies every point."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from reembed.cluster import get, init_ray

    init_ray(ray_address)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(_copy_embedded).options(num_cpus=1, scheduling_strategy=here, max_retries=0)
    result = get(task.remote(job))
    log.info("adopt: %s copied by one Ray task (%s): %d points", job[1], result["worker"], result["points"])
    return result


def _copy_embedded(job: tuple) -> dict[str, Any]:
    client = Q.connect(job[0])
    try:
        return _copy_points(client, *job[1:])
    finally:
        client.close()


def _merged_sample(results: list[dict[str, Any]], sample: int, seed: int) -> list[Any]:
    pool = [v for r in results for v in r["sample"]]
    if len(pool) <= sample:
        return pool
    pick = np.random.default_rng(seed).choice(len(pool), size=sample, replace=False)
    return [pool[i] for i in sorted(pick)]


def _copy_points(client, name: str, copy: str, page_size: int, sample: int, seed: int, start: Any = None,
                 pages: int | None = None) -> dict[str, Any]:
    """Copy the points of ``name`` into ``copy``, page by page from ``start`` (``pages`` of them, or to the
    end); returns ``{"points", "sample", "worker"}``, the sample a reservoir of the stored vectors."""
    from qdrant_client import models

    rng = np.random.default_rng(seed)
    reservoir: list[Any] = []
    seen = 0
    offset, done_pages = start, 0
    while True:
        points, offset = Q.call_with_retry(
            lambda: client.scroll(name, limit=page_size, offset=offset, with_payload=True, with_vectors=True),
            what=f"scroll {name}")
        if points:
            Q.call_with_retry(lambda: client.upsert(copy, points=[
                models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in points], wait=True),
                what=f"upsert into {copy}")
            for p in points:
                seen += 1
                if len(reservoir) < sample:
                    reservoir.append(p.vector)
                else:
                    j = int(rng.integers(0, seen))
                    if j < sample:
                        reservoir[j] = p.vector
        done_pages += 1
        if offset is None or (pages is not None and done_pages >= pages):
            return {"points": seen, "sample": reservoir, "worker": worker_name()}


def _search(client, collection: str, vectors: list[Any], k: int) -> list[list[tuple[str, float]]]:
    from qdrant_client import models

    reqs = []
    for v in vectors:
        using, query = (next(iter(v.items())) if isinstance(v, dict) else (None, v))
        reqs.append(models.QueryRequest(query=query, using=using, limit=k, with_payload=False))
    if not reqs:
        return []
    res = Q.call_with_retry(lambda: client.query_batch_points(collection, requests=reqs), what=f"query {collection}")
    return [[(str(p.id), float(p.score)) for p in r.points] for r in res]


def _same(a: list[list[tuple[str, float]]], b: list[list[tuple[str, float]]], message: str) -> None:
    """The same scores, rank by rank, and the same hits above the last score (points tied at the cut may
    differ: which of them make the top k is the store's choice)."""
    tol = 1e-5
    for x, y in zip(a, b):
        if len(x) != len(y) or any(abs(s - t) > tol for (_, s), (_, t) in zip(x, y)):
            raise MigrationError(message)
        cut = x[-1][1] + tol if x else 0.0
        if {i for i, s in x if s > cut} != {i for i, s in y if s > cut}:
            raise MigrationError(message)


def _alias(client, alias: str, collection: str) -> None:
    from qdrant_client import models

    client.update_collection_aliases(change_aliases_operations=[
        models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias))])
    if Q.aliases(client).get(alias) != collection:
        raise MigrationError(f"alias {alias!r} was not created (-> {collection}); run adopt again")
