"""The copy pass of corpus-wide identical texts (:mod:`reembed.texts`), once every regular shard is committed.

Two rounds of Ray tasks; the driver handles records and file names only:

1. **gather**: one task per range of leader shards (about :data:`GATHER_ROWS` needed vectors) reads the
   ``texts/leaders/`` rows of its leaders (row-group statistics), each committed leader file once (its sha256
   checked; the leader row found by its text hash and checked by its id), and writes ``_copies/eEEEEEE/g-SSSSSSS.arrow``:
   for every :data:`CHUNK_ROWS` vectors, one Arrow IPC record batch per copy task, ``(text_hash, embedding,
   truncated)`` of the texts that task needs (empty batches too, so batch ``chunk x tasks + k`` is task ``k``'s);
2. **copy**: one task per group of consecutive copy shards (at most :data:`MAX_COPY_TASKS`; the copy shards of
   one ``.gz`` file together) reads its batches of every gather file, its followers' rows from the input (their
   ids and passthrough columns; each origin shard once) and writes its copy shards; nothing goes to the Embedder.

So each leader file is read once per pass and each vector moves once, whatever the spread of the repeats: the
vectors are shuffled to the copy shards (as :mod:`reembed.dedup` shuffles ids), not fetched by each copy shard
from every leader file it touches. A job's gather files are under its epoch (``_copies/eEEEEEE/``): rebuilt by every
run that has copy shards pending, removed when they are committed; a job removes the folders of earlier epochs,
never a later one's (the job that fenced it may be using them).
"""

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
from reembed.texts import COPIES, TEXTS_DIR, followers, leader_rows
from reembed.write import read_shard_table, write_shard, writer_identity

log = logging.getLogger(__name__)

COPY_CPUS = 0.25
"""CPUs of a gather or copy task: it reads and writes, as a shard writer does."""
GATHERED = "_copies"
"""The gather round's files, under the output (rebuilt by each run that copies; removed once done)."""
GATHER_ROWS = 1_000_000
"""Vectors one gather task aims at (it holds :data:`CHUNK_ROWS` of them at a time)."""
CHUNK_ROWS = 100_000
"""Vectors a gather task holds before it writes them out (~400 MB at 1024-d float32)."""
MAX_COPY_TASKS = 1024
"""Copy tasks at most: a gather file holds one batch per copy task per chunk, so its footer and the files a
copy task opens stay small."""


def run_copies(manifest: Manifest, pending: list[int], source: Location, schema: pa.Schema, index: pa.Table,
               commit: Callable[[int, dict[str, Any]], None], max_tasks: int = 4) -> int:
    """Write the ``pending`` copy shards of ``manifest``'s plan and ``commit(shard, record)`` each record as its
    task returns (at most ``max_tasks`` copy tasks at once). Every regular shard must be committed (their files
    hold the leaders). An error is raised once the tasks already running are committed or failed. Returns the
    copy shards committed."""
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
    tasks = read.pack_groups(copy_tasks(texts.read_copies(plan_loc), pending, index, gz), MAX_COPY_TASKS)
    starts = np.array([t[0]["origin_first"] for t in tasks], dtype=np.int64)
    stops = np.array([t[-1]["origin_stop"] for t in tasks], dtype=np.int64)
    t0 = time.monotonic()
    work = gather_folder(manifest.loc, manifest.epoch)
    groups = gather_groups(texts.moved_counts(plan_loc, "leads"))
    partitions = int(plan["texts"]["partitions"])
    gather = ray.remote(num_cpus=COPY_CPUS, max_retries=3, retry_exceptions=[OSError])(gather_task)
    names = [gather_name(first) for first, _ in groups]
    cluster.get([gather.remote(manifest.loc, work, partitions, first, last, starts, stops,
                               int(manifest.model["dimension"])) for first, last in groups])
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
            running.append(remote.remote(manifest.loc, fields, source, task, manifest.epoch, schema, work, names,
                                         k, len(tasks)))
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


def gather_groups(leads: dict[int, int], rows: int = GATHER_ROWS) -> list[tuple[int, int]]:
    """Ranges ``(first, last)`` of leader shards (inclusive) whose needed vectors ``leads[shard]`` come to about
    ``rows`` each (a shard is never split)."""
    groups: list[list[int]] = []
    filled = 0
    for shard in sorted(leads):
        if groups and filled + leads[shard] <= rows:
            groups[-1][1] = shard
            filled += leads[shard]
        else:
            groups.append([shard, shard])
            filled = leads[shard]
    return [(a, b) for a, b in groups]


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
                stops: np.ndarray, dim: int) -> int:
    """The gather task over leader shards ``first..last``: the vectors the copy tasks need from them, written
    to ``work`` (:func:`gather_folder`) as ``g-<first>.arrow`` as :data:`CHUNK_ROWS`-vector chunks of one batch per copy task (task ``k``
    has follower shards ``starts[k] <= shard < stops[k]``). Returns the chunks written."""
    rows = leader_rows(out.child(PLAN_DIR), first, last, partitions)
    shard = rows.column("shard").to_numpy()
    k = np.searchsorted(starts, shard, side="right") - 1
    keep = (k >= 0) & (shard < stops[np.maximum(k, 0)])  # follower shards of copy shards pending now
    rows, k = rows.filter(pa.array(keep)), k[keep]
    schema = pa.schema([("text_hash", S.text_hash_type()), (S.EMBEDDING, pa.list_(pa.float32(), dim)),
                        (S.TRUNCATED, pa.bool_())])
    tasks = len(starts)
    manifest = Manifest.load(out)
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
            vectors, truncated = leader_vectors(out, manifest, ls, rows.take(pa.array(sel)))
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
                 schema: pa.Schema, work: Location, gathered: list[str], task: int,
                 tasks: int) -> list[tuple[int, dict[str, Any]]]:
    """The copy task ``task`` (of ``tasks``): write each of ``copies`` (rows of ``copies.parquet``) as a shard
    whose rows are its followers with their leaders' vectors, taken from its batches of the ``gathered`` files
    under ``work``;
    returns ``(shard, record)`` of each to commit. ``fields`` are the read task's plan fields
    (:data:`reembed.read.FIELDS`)."""
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


def leader_vectors(out: Location, manifest: Manifest, shard: int, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The vectors and truncation flags of ``rows``' leaders (``texts/leaders/`` rows of leader shard ``shard``),
    from its committed file (read once, its sha256 checked): each leader row found by its text hash and checked
    by its id."""
    if shard not in manifest.committed:
        raise ManifestError(f"{out.uri}: shard {shard} holds leaders of identical texts and is not committed; "
                            "rerun to resume (regular shards are committed before copy shards)")
    rec = manifest.committed[shard]
    t = read_shard_table(out, rec, columns=[S.ID, S.TEXT_HASH, S.EMBEDDING, S.TRUNCATED], key=f"shards.{shard:05d}")
    at = pc.index_in(rows.column("text_hash").cast(pa.binary()),
                     value_set=t.column(S.TEXT_HASH).combine_chunks().cast(pa.binary()))
    if at.null_count or not pc.all(pc.equal(t.column(S.ID).take(at), rows.column("leader_id"))).as_py():
        raise ManifestError(f"{out.display(rec['path'])}: does not hold the leader rows the plan names (their ids "
                            "and texts); the output changed under its plan: start a fresh output")
    return S.embedding_matrix(t.column(S.EMBEDDING).take(at)), t.column(S.TRUNCATED).take(at).to_numpy(zero_copy_only=False)
