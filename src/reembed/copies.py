"""The copy pass of corpus-wide identical texts (:mod:`reembed.texts`): once every regular shard is committed, the
copy shards are written by plain Ray tasks, each reading its followers' rows from the input and their leaders'
vectors from the committed leader shards; nothing goes to the Embedder. The driver handles records only."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reembed import read, scan, texts
from reembed import schema as S
from reembed.errors import InputError, ManifestError
from reembed.manifest import Manifest
from reembed.plan import PLAN_DIR
from reembed.plan_store import read_files
from reembed.storage import Location
from reembed.texts import COPIES, TEXTS_DIR, followers
from reembed.write import read_shard_table, write_shard, writer_identity

log = logging.getLogger(__name__)

COPY_CPUS = 0.25
"""CPUs of a copy task: it reads and writes, as a shard writer does."""


def run_copies(manifest: Manifest, pending: list[int], source: Location, schema: pa.Schema, index: pa.Table,
               commit: Callable[[int, dict[str, Any]], None], max_tasks: int = 4) -> int:
    """Write the ``pending`` copy shards of ``manifest``'s plan as Ray tasks, at most ``max_tasks`` at once, and
    ``commit(shard, record)`` each record as its task returns. Every regular shard must be committed (their
    files hold the leaders). An error is raised once the tasks already running are committed or failed.
    Returns the copy shards committed."""
    import ray

    from reembed import cluster

    plan = manifest.plan
    plan_loc = manifest.loc.child(PLAN_DIR)
    regular = manifest.shard_count - int(plan["texts"]["copies"])
    waiting = [s for s in manifest.pending() if s < regular]
    if waiting:
        raise RuntimeError(f"copy shards need every regular shard committed; {len(waiting)} are not "
                           f"(first {waiting[0]}): rerun to resume")
    files = read_files(plan_loc)
    gz = {f for f, p in zip(files.column("file").to_pylist(), files.column("path").to_pylist())
          if f >= 0 and scan.is_gzip(p)}
    tasks = copy_tasks(texts.read_copies(plan_loc), pending, index, gz)
    fields = {k: plan.get(k) for k in read.FIELDS}
    remote = ray.remote(num_cpus=COPY_CPUS, max_retries=3, retry_exceptions=[OSError])(write_copies)
    t0, done = time.monotonic(), 0
    running: list[Any] = []
    error: BaseException | None = None
    todo = list(tasks)
    while todo or running:
        while todo and len(running) < max_tasks and error is None:
            running.append(remote.remote(manifest.loc, fields, source, todo.pop(0), manifest.epoch, schema))
        if not running:
            break
        ready, running = ray.wait(running, num_returns=1)
        try:
            for shard, rec in cluster.get(ready[0]):
                commit(shard, rec)
                done += 1
        except Exception as e:  # commit what the running tasks still finish, then raise the first error
            if error is None:
                error = e
                todo.clear()
    if error is not None:
        raise error
    log.info("copies: %d copy shards written in %d tasks, %.1f s", done, len(tasks), time.monotonic() - t0)
    return done


def copy_tasks(copies: pa.Table, pending: Iterable[int], index: pa.Table, gz_files: set[int]) -> list[list[dict]]:
    """The pending copy shards grouped into tasks: one copy shard a task, except that copy shards whose origin
    shards share a ``.gz`` input file go together (the task decompresses it once). ``index`` is
    :func:`reembed.plan_store.segment_index`; ``gz_files`` the file indices of the ``.gz`` inputs."""
    want = set(pending)
    rows = [c for c in copies.to_pylist() if c["shard"] in want]
    gz_of: dict[int, set[int]] = {}
    if gz_files:
        for s, f in zip(index.column("shard").to_pylist(), index.column("file").to_pylist()):
            if f in gz_files:
                gz_of.setdefault(s, set()).add(f)
    tasks: list[list[dict]] = []
    last_gz: set[int] = set()
    for c in rows:  # in origin order: copies sharing a .gz file are neighbours
        mine = set().union(*(gz_of.get(s, set()) for s in range(c["origin_first"], c["origin_stop"]))) if gz_of else set()
        if tasks and mine & last_gz:
            tasks[-1].append(c)
            last_gz |= mine
        else:
            tasks.append([c])
            last_gz = mine
    return tasks


def write_copies(out: Location, fields: dict[str, Any], source: Location, copies: list[dict], epoch: int | None,
                 schema: pa.Schema) -> list[tuple[int, dict[str, Any]]]:
    """The copy task: write each of ``copies`` (rows of ``copies.parquet``) as a shard whose rows are its
    followers with their leaders' vectors; returns ``(shard, record)`` of each to commit. ``fields`` are the
    read task's plan fields (:data:`reembed.read.FIELDS`)."""
    plan_loc = out.child(PLAN_DIR)
    first, stop = min(c["origin_first"] for c in copies), max(c["origin_stop"] for c in copies)
    rows = followers(plan_loc, first, stop - 1, int(fields["texts"]["partitions"]))
    origins = sorted(set(rows.column("shard").to_pylist()))
    plain = {k: v for k, v in fields.items() if k not in ("texts", "reuse")}  # no marks, no --reuse vectors
    taken = []
    for table in read.read_shards(plain, plan_loc, origins, source):  # each origin shard's followers
        shard = int(table.column(S.SHARD)[0].as_py())
        mine = rows.filter(pc.equal(rows.column("shard"), shard))
        got = table.take(pa.array(mine.column("pos").to_numpy()))
        same = pc.and_(pc.equal(got.column(S.ID), mine.column("id")),
                       pc.equal(got.column(S.TEXT_HASH), mine.column("text_hash")))
        if got.column(S.REASON).null_count != got.num_rows or not pc.all(same).as_py():
            raise InputError(f"shard {shard}: the input no longer holds the texts this plan was made with; an input "
                             "file changed since the plan was made (re-plan with --fresh)")
        taken.append(got.drop_columns([S.TEXT]))
    found = pa.concat_tables(taken) if taken else None
    if found is None or found.num_rows != rows.num_rows:
        raise ManifestError(f"{plan_loc.display(TEXTS_DIR)}: copy shards {copies[0]['shard']}..{copies[-1]['shard']} "
                            "do not match their followers; start a fresh output to re-plan")
    vectors, truncated = leader_vectors(out, rows, Manifest.load(out))
    origin = rows.column("shard").to_numpy()
    records = []
    for c in copies:
        sel = np.flatnonzero((origin >= c["origin_first"]) & (origin < c["origin_stop"]))
        if len(sel) != c["rows"]:
            raise ManifestError(f"{plan_loc.display(TEXTS_DIR, COPIES)}: copy shard {c['shard']} plans {c['rows']} "
                                f"rows, its followers are {len(sel)}; start a fresh output to re-plan")
        n = len(sel)
        t = found.take(pa.array(sel))
        t = t.set_column(t.schema.get_field_index(S.SHARD), S.SHARD, pa.array(np.full(n, c["shard"], np.int32)))
        t = t.set_column(t.schema.get_field_index(S.POS), S.POS, pa.array(np.arange(n, dtype=np.int64)))
        t = t.append_column(S.EMBEDDING, S.embedding_array(vectors[sel]))
        t = t.append_column(S.TRUNCATED, pa.array(truncated[sel]))
        t = t.append_column(S.COPIED, pa.array(np.ones(n, dtype=bool)))
        t = t.append_column("_tokens", pa.array(np.zeros(n, np.int32)))
        t = t.append_column("_device_s", pa.array(np.zeros(n, np.float32)))
        rec = write_shard(out, int(c["shard"]), t, schema, epoch=epoch)
        rec["writer"] = writer_identity()
        records.append((int(c["shard"]), rec))
    return records


def leader_vectors(out: Location, rows: pa.Table, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """The vectors and truncation flags of the leaders of ``rows`` (a followers table), from the committed
    leader shards: each leader file read once (its sha256 checked), the leader row found by its text hash and
    checked by its id."""
    n = rows.num_rows
    vectors = np.zeros((n, int(manifest.model["dimension"])), dtype=np.float32)
    truncated = np.zeros(n, dtype=bool)
    leader_shard = rows.column("leader_shard").to_numpy()
    hashes = rows.column("text_hash").cast(pa.binary())
    for ls in np.unique(leader_shard).tolist():
        if ls not in manifest.committed:
            raise ManifestError(f"{out.uri}: shard {ls} holds leaders of identical texts and is not committed; "
                                "rerun to resume (regular shards are committed before copy shards)")
        rec = manifest.committed[ls]
        t = read_shard_table(out, rec, columns=[S.ID, S.TEXT_HASH, S.EMBEDDING, S.TRUNCATED], key=f"shards.{ls:05d}")
        sel = np.flatnonzero(leader_shard == ls)
        at = pc.index_in(hashes.take(pa.array(sel)), value_set=t.column(S.TEXT_HASH).combine_chunks().cast(pa.binary()))
        if at.null_count or not pc.all(pc.equal(t.column(S.ID).take(at), rows.column("leader_id").take(pa.array(sel)))).as_py():
            raise ManifestError(f"{out.display(rec['path'])}: does not hold the leader rows the plan names (their ids "
                                "and texts); the output changed under its plan: start a fresh output")
        vectors[sel] = S.embedding_matrix(t.column(S.EMBEDDING).take(at))
        truncated[sel] = t.column(S.TRUNCATED).take(at).to_numpy(zero_copy_only=False)
    return vectors, truncated
