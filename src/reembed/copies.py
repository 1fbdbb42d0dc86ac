"""The copy pass of corpus-wide identical texts (:mod:`reembed.texts`), once every regular shard is committed.

Two rounds of Ray tasks, planned with the rest of the plan (``plan/texts/tasks.parquet`` and ``gather.parquet``,
:func:`reembed.texts.plan_copy_pass`); the driver holds those O(tasks) ranges, the commit log's arrays and file
names, never a copy shard's row or a commit record:

1. **gather**: one task per range of leader shards (about :data:`GATHER_ROWS` needed vectors) reads the
   ``texts/leaders/`` rows of its leaders (row-group statistics), each committed leader file once (its sha256
   checked; the leader row found by its text hash and checked by its id), and writes ``_copies/eEEEEEE/g-SSSSSSS.arrow``:
   for every :data:`CHUNK_ROWS` vectors, one Arrow IPC record batch per copy task, ``(text_hash, embedding,
   truncated)`` of the texts that task needs (empty batches too, so batch ``chunk x tasks + k`` is task ``k``'s);
2. **copy**: one task per group of consecutive copy shards (at most :data:`MAX_COPY_TASKS`; the copy shards of
   one ``.gz`` file together) reads its batches of every gather file, its followers' rows from the input (their
   ids and passthrough columns; each origin shard once) and writes its copy shards not yet committed (a resume
   hands it the committed ones of its range); nothing goes to the Embedder.

So each leader file is read once per pass and each vector moves once, whatever the spread of the repeats: the
vectors are shuffled to the copy shards (as :mod:`reembed.dedup` shuffles ids), not fetched by each copy shard
from every leader file it touches. A job's gather files are under its epoch (``_copies/eEEEEEE/``): rebuilt by every
run that has copy shards pending, removed when they are committed; a job removes the folders of earlier epochs,
never a later one's (the job that fenced it may be using them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reembed import read, texts
from reembed import schema as S
from reembed.errors import InputError, ManifestError
from reembed.manifest import Manifest
from reembed.plan import PLAN_DIR
from reembed.storage import Location
from reembed.texts import COPIES, TEXTS_DIR, followers, leader_rows
from reembed.texts import GATHER_ROWS, MAX_COPY_TASKS, gather_groups  # noqa: F401 (planned in texts since copies15)
from reembed.write import read_shard_table, write_shard, writer_identity

log = logging.getLogger(__name__)

COPY_CPUS = 0.25
"""CPUs of a gather or copy task: it reads and writes, as a shard writer does."""
GATHERED = "_copies"
"""The gather round's files, under the output (rebuilt by each run that copies; removed once done)."""
CHUNK_ROWS = 100_000
"""Vectors a gather task holds before it writes them out (~400 MB at 1024-d float32)."""


@dataclass(frozen=True)
class CopyTask:
    """One copy task as the driver hands it out: copy shards ``first <= shard < stop`` (one row of
    ``texts/tasks.parquet``), whose followers are in plan shards ``origin_first <= shard < origin_stop``, and
    ``done``: those of its copy shards already committed (a resume skips them), numbers only."""

    first: int
    stop: int
    origin_first: int
    origin_stop: int
    done: tuple[int, ...] = ()


def run_copies(manifest: Manifest, source: Location, schema: pa.Schema,
               commit: Callable[[int, dict[str, Any]], None], max_tasks: int = 4) -> int:
    """Write the pending copy shards of ``manifest``'s plan and ``commit(shard, record)`` each record as its
    task returns (at most ``max_tasks`` copy tasks at once). Every regular shard must be committed (their files
    hold the leaders). An error is raised once the tasks already running are committed or failed. Returns the
    copy shards committed.

    The driver holds O(tasks): the copy tasks and gather ranges planned in ``plan/texts/`` (``tasks.parquet``,
    ``gather.parquet``) and, from the commit log's arrays, which copy shards are committed; it reads no copy
    shard's row and no commit record (each task reads its own)."""
    import ray

    from reembed import cluster

    plan = manifest.plan
    plan_loc = manifest.loc.child(PLAN_DIR)
    tasks, refs = pending_tasks(manifest)
    if not tasks:
        return 0
    starts = np.array([t.origin_first for t in tasks], dtype=np.int64)
    stops = np.array([t.origin_stop for t in tasks], dtype=np.int64)
    t0 = time.monotonic()
    work = gather_folder(manifest.loc, manifest.epoch)
    groups = texts.read_gather(plan_loc)
    partitions = int(plan["texts"]["partitions"])
    gather = ray.remote(num_cpus=COPY_CPUS, max_retries=3, retry_exceptions=[OSError])(gather_task)
    names = [gather_name(first) for first, _ in groups]
    cluster.get([gather.remote(manifest.loc, work, partitions, first, last, starts, stops,
                               int(manifest.model["dimension"]), _refs_between(refs, first, last))
                 for first, last in groups])
    t1 = time.monotonic()
    fields = {k: plan.get(k) for k in read.FIELDS}
    remote = ray.remote(num_cpus=COPY_CPUS, max_retries=3, retry_exceptions=[OSError])(write_copies)
    done = 0
    running: list[Any] = []
    error: BaseException | None = None
    todo = list(enumerate(tasks))
    while todo or running:
        while todo and len(running) < max_tasks and error is None:
            k, task = todo.pop(0)
            running.append(remote.remote(manifest.loc, fields, source, with_done(task, refs.shards), manifest.epoch,
                                         schema, work, names, k, len(tasks)))
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
    work.delete_dir()
    root = manifest.loc.child(GATHERED)
    if not root.list(recursive=True):  # no other job's gather files either
        root.delete_dir()
    log.info("copies: %d copy shards in %d tasks from %d gather tasks; gather %.1f s, copy %.1f s", done,
             len(tasks), len(groups), t1 - t0, time.monotonic() - t1)
    return done


def pending_tasks(manifest: Manifest) -> tuple[list[CopyTask], Any]:
    """The copy tasks with a copy shard to write (each with the copy shards of its range already committed)
    and :class:`~reembed.manifest.ShardRefs` of the committed shards (what the gather tasks read the leaders'
    records by). From ``texts/tasks.parquet`` and the commit log's arrays: O(tasks) Python objects (an output
    planned before the tasks file was gets it written now). Every regular shard must be committed."""
    plan = manifest.plan
    plan_loc = manifest.loc.child(PLAN_DIR)
    regular = int(plan["shards"])
    refs = manifest.refs(legacy=False)
    committed = np.asarray(refs.shards, dtype=np.int64)
    have = int(np.searchsorted(committed, regular))  # committed regular shards (the numbers are unique, sorted)
    if have < regular:
        gaps = np.flatnonzero(committed[:have] != np.arange(have))
        first = int(gaps[0]) if len(gaps) else have
        raise RuntimeError(f"copy shards need every regular shard committed; {regular - have} are not "
                           f"(first {first}): rerun to resume")
    if not plan_loc.exists(texts.TEXTS_DIR, texts.TASKS):  # planned by a reembed before the tasks file
        log.warning("%s: planned before the copy tasks were; planning them now", plan_loc.display(texts.TEXTS_DIR))
        texts.plan_copy_pass(plan_loc, regular, int(plan["shard_rows"]))
    table = texts.read_tasks(plan_loc)
    out = []
    for first, stop, of, os_ in zip(*(table.column(c).to_pylist()
                                      for c in ("first", "stop", "origin_first", "origin_stop"))):
        lo, hi = np.searchsorted(committed, [first, stop])
        if hi - lo < stop - first:
            out.append(CopyTask(first, stop, of, os_))
    return out, refs


def with_done(task: CopyTask, committed: np.ndarray) -> CopyTask:
    """``task`` with the copy shards of its range in ``committed`` (sorted shard numbers): set as the task is
    submitted, so the driver holds them for the running tasks only."""
    lo, hi = np.searchsorted(committed, [task.first, task.stop])
    return replace(task, done=tuple(committed[lo:hi].tolist()))


def _refs_between(refs: Any, first: int, last: int) -> Any:
    """The slice of ``refs`` (ShardRefs, in shard order) of shards ``first..last``."""
    lo, hi = np.searchsorted(refs.shards, [first, last + 1])
    return refs[int(lo):int(hi)]


def gather_folder(out: Location, epoch: int | None) -> Location:
    """This job's folder for the gather round, ``_copies/eEEEEE/``, emptied; the folders of earlier epochs (a
    killed run's, a fenced job's) are removed, a later epoch's (the job that fenced this one) are left alone."""
    root = out.child(GATHERED)
    prefix = root.path().rstrip("/") + "/"
    mine = int(epoch or 0)
    seen = {info.path[len(prefix):].split("/", 1)[0] for info in root.list(recursive=True)
            if info.path.startswith(prefix)}
    for name in seen:
        if not (name.startswith("e") and name[1:].isdigit()) or int(name[1:]) <= mine:
            root.delete_dir(name)
    return root.child(f"e{mine:06d}")


def gather_name(first: int) -> str:
    return f"g-{first:07d}.arrow"


def gather_task(out: Location, work: Location, partitions: int, first: int, last: int, starts: np.ndarray,
                stops: np.ndarray, dim: int, leaders: Any) -> int:
    """The gather task over leader shards ``first..last``: the vectors the copy tasks need from them, written
    to ``work`` (:func:`gather_folder`) as ``g-<first>.arrow`` as :data:`CHUNK_ROWS`-vector chunks of one batch per copy task (task ``k``
    has follower shards ``starts[k] <= shard < stops[k]``); ``leaders``: ShardRefs of the committed shards
    ``first..last`` (their records are read here). Returns the chunks written."""
    rows = leader_rows(out.child(PLAN_DIR), first, last, partitions)
    shard = rows.column("shard").to_numpy()
    k = np.searchsorted(starts, shard, side="right") - 1
    keep = (k >= 0) & (shard < stops[np.maximum(k, 0)])  # follower shards of copy shards pending now
    rows, k = rows.filter(pa.array(keep)), k[keep]
    schema = pa.schema([("text_hash", S.text_hash_type()), (S.EMBEDDING, pa.list_(pa.float32(), dim)),
                        (S.TRUNCATED, pa.bool_())])
    tasks = len(starts)
    records = dict(leaders.records(out))
    sink = pa.BufferOutputStream()
    chunks = 0
    with pa.ipc.new_file(sink, schema) as w:
        held: list[tuple[np.ndarray, pa.Table]] = []

        def flush() -> None:
            nonlocal chunks
            which = np.concatenate([h[0] for h in held]) if held else np.zeros(0, np.int64)
            table = pa.concat_tables([h[1] for h in held]) if held else schema.empty_table()
            order = np.argsort(which, kind="stable")
            table, which = table.take(pa.array(order)), which[order]
            bounds = np.searchsorted(which, np.arange(tasks + 1))
            for t in range(tasks):
                piece = table.slice(int(bounds[t]), int(bounds[t + 1] - bounds[t]))
                if piece.num_rows > 1:  # a text needed by two origin shards of one task: once
                    lead = texts.leaders(piece.column("text_hash"))
                    piece = piece.filter(pa.array(lead == np.arange(len(lead))))
                w.write_batch(piece.combine_chunks().to_batches()[0] if piece.num_rows
                              else pa.RecordBatch.from_pylist([], schema=schema))
            held.clear()
            chunks += 1

        count = 0
        leader_shard = rows.column("leader_shard").to_numpy()
        for ls in np.unique(leader_shard).tolist():
            sel = np.flatnonzero(leader_shard == ls)
            vectors, truncated = leader_vectors(out, records.get(ls), ls, rows.take(pa.array(sel)))
            held.append((k[sel], pa.table([rows.column("text_hash").take(pa.array(sel)),
                                           pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
                                           pa.array(truncated)], schema=schema)))
            count += len(sel)
            if count >= CHUNK_ROWS:
                flush()
                count = 0
        if held or not chunks:
            flush()
    work.write_bytes(sink.getvalue().to_pybytes(), gather_name(first))
    return chunks


def write_copies(out: Location, fields: dict[str, Any], source: Location, job: CopyTask, epoch: int | None,
                 schema: pa.Schema, work: Location, gathered: list[str], task: int,
                 tasks: int) -> list[tuple[int, dict[str, Any]]]:
    """The copy task ``task`` (of ``tasks``): write each copy shard of ``job`` not yet committed (its rows of
    ``copies.parquet``, read here) as a shard whose rows are its followers with their leaders' vectors, taken
    from its batches of the ``gathered`` files under ``work``; returns ``(shard, record)`` of each to commit.
    ``fields`` are the read task's plan fields (:data:`reembed.read.FIELDS`)."""
    plan_loc = out.child(PLAN_DIR)
    skip = set(job.done)
    copies = [c for c in texts.read_copies(plan_loc, job.first, job.stop).to_pylist() if c["shard"] not in skip]
    if not copies:
        return []
    rows = followers(plan_loc, copies[0]["origin_first"], copies[-1]["origin_stop"] - 1,
                     int(fields["texts"]["partitions"]))
    origin = rows.column("shard").to_numpy()
    mine = np.zeros(len(origin), dtype=bool)  # the followers of the copy shards written now
    for c in copies:
        mine |= (origin >= c["origin_first"]) & (origin < c["origin_stop"])
    if not mine.all():
        rows = rows.filter(pa.array(mine))
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
    vectors, truncated = gathered_vectors(work, gathered, task, tasks, rows)
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


def gathered_vectors(work: Location, names: list[str], task: int, tasks: int,
                     rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The vectors and truncation flags of ``rows``' texts (a followers table), from copy task ``task``'s
    batches of the gather files ``names``."""
    pieces = []
    for name in names:
        with work.fs.open_input_file(work.path(name)) as f:
            reader = pa.ipc.open_file(f)
            for c in range(reader.num_record_batches // tasks):
                b = reader.get_batch(c * tasks + task)
                if b.num_rows:
                    pieces.append(b)
    if not pieces:
        raise ManifestError(f"{work.uri}: no gathered vectors for copy task {task}; rerun to resume")
    table = pa.Table.from_batches(pieces).combine_chunks()
    at = pc.index_in(rows.column("text_hash").cast(pa.binary()), value_set=table.column("text_hash").cast(pa.binary()))
    if at.null_count:
        raise ManifestError(f"{work.uri}: {at.null_count} of copy task {task}'s texts were not gathered; rerun to resume")
    return (S.embedding_matrix(table.column(S.EMBEDDING).take(at)),
            table.column(S.TRUNCATED).take(at).to_numpy(zero_copy_only=False))


def leader_vectors(out: Location, rec: dict[str, Any] | None, shard: int,
                   rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The vectors and truncation flags of ``rows``' leaders (``texts/leaders/`` rows of leader shard ``shard``,
    whose commit record is ``rec``), from its committed file (read once, its sha256 checked): each leader row
    found by its text hash and checked by its id."""
    if rec is None:
        raise ManifestError(f"{out.uri}: shard {shard} holds leaders of identical texts and is not committed; "
                            "rerun to resume (regular shards are committed before copy shards)")
    t = read_shard_table(out, rec, columns=[S.ID, S.TEXT_HASH, S.EMBEDDING, S.TRUNCATED], key=f"shards.{shard:05d}")
    at = pc.index_in(rows.column("text_hash").cast(pa.binary()),
                     value_set=t.column(S.TEXT_HASH).combine_chunks().cast(pa.binary()))
    if at.null_count or not pc.all(pc.equal(t.column(S.ID).take(at), rows.column("leader_id"))).as_py():
        raise ManifestError(f"{out.display(rec['path'])}: does not hold the leader rows the plan names (their ids "
                            "and texts); the output changed under its plan: start a fresh output")
    return S.embedding_matrix(t.column(S.EMBEDDING).take(at)), t.column(S.TRUNCATED).take(at).to_numpy(zero_copy_only=False)
