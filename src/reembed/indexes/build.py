"""The index stage: a FAISS index and a Qdrant collection built at the same time from an output's committed
shards, as two Ray tasks that each stream the shards (nothing is gathered in the driver).

Progress lives in the manifest under ``stages.index``::

    "index": {
      "faiss":  {"status": "building" | "done", "version", "path", "sha256", "ids_path", "ids_sha256",
                 "ntotal", "params", "inputs", "request", "started_at", "finished_at", "seconds"},
      "qdrant": {"status": "creating" | "loading" | "done", "target", "name", "collection", "version",
                 "shards_done", "rows_done", "count", "inputs", "started_at", "finished_at", "seconds"},
      "faiss_history": [...], "qdrant_history": [...]     # earlier finished versions
    }

``inputs`` is a hash of the committed shards (their sha256 values) and the model fingerprint. A build whose
record is ``done`` for the same inputs and settings is left alone (a rerun changes nothing, not even the
manifest); a Qdrant load that was killed resumes with the shards it had not finished (point ids are
derived from document ids, so a half-uploaded shard is simply upserted again); a killed FAISS build starts
over (it lives in memory until written).

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
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from typing import Any, Iterator

import pyarrow as pa

from reembed import schema as S
from reembed.cluster import init_ray
from reembed.config import ConfigError, IndexConfig
from reembed.errors import InputError
from reembed.indexes import faiss as faiss_index
from reembed.indexes import qdrant as Q
from reembed.manifest import ConcurrentWriteError, Manifest, ManifestError, inside_output
from reembed.storage import Location
from reembed.write import read_shard_table

log = logging.getLogger(__name__)

STAGE = "index"


def build_indexes(output: str | Location, cfg: IndexConfig, ray_address: str | None = None, use_ray: bool = True) -> dict[str, Any]:
    """Build what ``cfg`` asks for (FAISS, Qdrant, or both in parallel) from the shards of ``output`` (a URI,
    or a Location, whose storage settings then travel with it into the build tasks).

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
        current = faiss_current(loc, manifest, cfg) if backend == "faiss" else qdrant_current(manifest, cfg, target)
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


def faiss_current(loc: Location, manifest: Manifest, cfg: IndexConfig) -> dict[str, Any] | None:
    """The FAISS record if a finished build of these inputs and settings is still on storage, intact: every
    file's size and sha256 are checked (a damaged one is rebuilt, never reported up to date)."""
    rec = state_of(manifest).get("faiss")
    if not rec or rec.get("status") != "done":
        return None
    if rec.get("inputs") != inputs_key(manifest) or rec.get("request") != faiss_request(cfg):
        return None
    inside_output(loc, rec.get("path"), "stages.index.faiss.path")
    inside_output(loc, rec.get("ids_path"), "stages.index.faiss.ids_path")
    if rec.get("ivfdata_path") is not None:
        inside_output(loc, rec.get("ivfdata_path"), "stages.index.faiss.ivfdata_path")
    damaged = faiss_index.damaged_files(loc, rec)
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
            loc, sorted(manifest.committed.items()), plan, version, inputs=base["inputs"],
            recall_target=cfg.recall_target, workers=workers or 1, use_ray=use_ray,
            group_rows=group_rows or faiss_dist.GROUP_ROWS)
    else:
        built = faiss_index.build(shard_tables(loc, manifest, [S.ID, S.EMBEDDING]), plan, None,
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


def run_qdrant(output: str | Location, cfg: IndexConfig, target: str) -> dict[str, Any]:
    """Load (or resume loading) a versioned collection from the shards; verify its count; record it."""
    started, t0 = _stamp(), time.monotonic()
    loc = _location(output)
    manifest = _load(loc)
    rows, dim = rows_of(manifest), int(manifest.model["dimension"])
    rec = state_of(manifest).get("qdrant")
    client = Q.connect(target)
    try:
        resume = _same_qdrant(rec, manifest, cfg, target)
        if resume and rec["status"] == "done":
            if rec["collection"] in Q.collections(client) and Q.count(client, rec["collection"]) == rows:
                return rec
            resume = False
        if resume and rec["status"] in ("creating", "loading"):
            state = dict(rec)
            if state["collection"] not in Q.collections(client):
                Q.create_collection(client, state["collection"], dim, _collection_meta(manifest, state["version"]))
                state["shards_done"], state["rows_done"] = [], 0
            log.info("Qdrant %s: resuming %s, %d of %d shards already loaded", Q.describe(target),
                     state["collection"], len(state.get("shards_done", [])), len(manifest.committed))
        else:
            version = Q.next_version(client, cfg.collection)
            state = {"status": "creating", "target": Q.describe(target), "name": cfg.collection,
                     "collection": Q.versioned(cfg.collection, version), "version": version,
                     "inputs": inputs_key(manifest), "shards_done": [], "rows_done": 0}
            # Recorded before creating, so a crash right after creation resumes into the same collection.
            _record(loc, "qdrant", state, archive=True)
            Q.create_collection(client, state["collection"], dim, _collection_meta(manifest, version))
        state.update(status="loading", started_at=started, batch_size=cfg.batch_size)
        _record(loc, "qdrant", state)
        _load_shards(loc, manifest, client, state, cfg, workers=cfg.upload_workers if Q.is_server(target) else 1)
        Q.end_bulk(client, state["collection"])
        got = Q.count(client, state["collection"])
        if got != rows:
            raise ManifestError(f"Qdrant {state['collection']} holds {got} points after loading, the manifest committed {rows}")
        meta = {**_collection_meta(manifest, state["version"]), **(Q.metadata(client, state["collection"]).get(Q.META) or {})}
        Q.set_metadata(client, state["collection"], {Q.META: {**meta, "state": "ready"}})
        state.update(status="done", count=got, bytes=sum(r["bytes"] for r in manifest.committed.values()),
                     finished_at=_stamp(), seconds=round(time.monotonic() - t0, 3))
        _record(loc, "qdrant", state)
        return state
    finally:
        client.close()


def _load_shards(loc: Location, manifest: Manifest, client, state: dict[str, Any], cfg: IndexConfig, workers: int) -> None:
    """Upload the shards not yet in ``state["shards_done"]``, ``workers`` at a time, recording each."""
    passthrough = list(manifest.plan.get("passthrough", []))
    columns = [S.ID, S.EMBEDDING, *passthrough]
    done = set(state.get("shards_done", []))
    todo = [(s, rec) for s, rec in sorted(manifest.committed.items()) if s not in done]

    def one(item: tuple[int, dict[str, Any]]) -> tuple[int, int]:
        shard, rec = item
        table = read_shard(loc, shard, rec, columns)
        return shard, Q.upload(client, state["collection"], [table], cfg.batch_size, passthrough)

    for shard, n in bounded_map(one, todo, workers):
        done.add(shard)
        state["shards_done"] = sorted(done)
        state["rows_done"] = state.get("rows_done", 0) + n
        _record(loc, "qdrant", state)


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
        and rec.get("name") == cfg.collection


def _collection_meta(manifest: Manifest, version: int) -> dict[str, Any]:
    m = manifest.model
    return {"model": m["name"], "revision": m.get("revision"), "dimension": m["dimension"],
            "fingerprint": m["fingerprint"], "output": _output_uri(manifest.loc), "rows": rows_of(manifest),
            "version": version, "created_at": _stamp(), "state": "loading"}


# ---------------------------------------------------------------------------------------------------
# Running both at once


def _run_parallel(loc: Location, cfg: IndexConfig, target: str | None, todo: list[str],
                  ray_address: str | None) -> dict[str, Any]:
    """Both builds as Ray tasks. The FAISS task takes a GPU when the cluster has a free one (faiss trains on
    it if faiss-gpu is installed); an embedded Qdrant task is pinned to this node, where its folder is."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray(ray_address)
    refs = {}
    if "faiss" in todo:
        gpus = 1 if ray.available_resources().get("GPU", 0) >= 1 else 0
        refs["faiss"] = ray.remote(_faiss_task).options(num_cpus=1, num_gpus=gpus).remote(loc, cfg)
    if "qdrant" in todo:
        opts: dict[str, Any] = {"num_cpus": 1}
        if not Q.is_server(target):
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        refs["qdrant"] = ray.remote(run_qdrant).options(**opts).remote(loc, cfg, target)
    try:
        return _gather({name: (lambda r=ref: ray.get(r)) for name, ref in refs.items()})
    except KeyboardInterrupt:
        # Stop the builds too: a rerun must not meet a leftover writer (embedded Qdrant allows only one).
        for ref in refs.values():
            ray.cancel(ref, force=True)
        raise


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
    """Every committed shard in shard order, sha256-checked, one at a time."""
    for shard, rec in sorted(manifest.committed.items()):
        yield read_shard(loc, shard, rec, columns)


def read_shard(loc: Location, shard: int, rec: dict[str, Any], columns: list[str] | None) -> pa.Table:
    """One committed shard through ``read_shard_table``: its path held inside the output, its sha256 checked."""
    return read_shard_table(loc, rec, columns=columns, verify=True, key=f"shards.{shard:05d}")


def inputs_key(manifest: Manifest) -> str:
    """What an index is built from: the committed shards' bytes and the model."""
    shards = [[s, rec["sha256"], rec["rows"]] for s, rec in sorted(manifest.committed.items())]
    blob = json.dumps({"fingerprint": manifest.model["fingerprint"], "shards": shards})
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
        dead = sum(rec.get("dead_letters", 0) for rec in m.committed.values())
        reasons: dict[str, int] = {}
        for rec in m.committed.values():
            for why, n in (rec.get("reasons") or {}).items():
                reasons[why] = reasons.get(why, 0) + n
        why = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "no input rows"
        raise InputError(f"{loc.uri}: nothing to index: the output holds 0 embedded rows ({dead} dead-lettered: "
                         f"{why}); fix the input (see `reembed status {loc.uri}`) and rerun `reembed run`")
    return m


def state_of(manifest: Manifest) -> dict[str, Any]:
    return (manifest.data.get("stages") or {}).get(STAGE) or {}


def rows_of(manifest: Manifest) -> int:
    return sum(rec["rows"] for rec in manifest.committed.values())


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
