"""Identical texts across the whole corpus are embedded once (``plan.dedup_texts``, on by default).

Planned with the rest of the plan, by hash partitioning on the text hash (:data:`reembed.schema.TEXT_HASH`,
blake2b-128), as :mod:`reembed.dedup` does for ids, so no process holds the corpus's hashes:

1. one key task per group of plan shards reads them as the read stage will and writes the rows that will be
   embedded as ``_text_keys/<first shard>.arrow``: ``(text_hash, shard, pos, id)``, one Arrow IPC record batch
   per partition, rows in plan order within each;
2. one task per partition reads its batch of every key file (in plan order) and finds, for each text, its
   **leader**: the first row in plan order ``(shard, pos)``. Every later row of that text is a **follower**.
   The followers whose leader is in another shard are written to ``plan/texts/part-PPPP.parquet`` as
   ``(shard, pos, id, leader_shard, leader_id, text_hash)`` sorted by ``(shard, pos)`` in small row groups
   (a shard's read task fetches the one or two that hold its rows); the task returns per-shard counts only.

The driver then packs those followers, in plan order, into **copy shards** numbered after the plan's shards
(``plan["shards"]`` .. ``+ copies``; ``plan/texts/copies.parquet``: ``(shard, origin_first, origin_stop, rows)``
with whole origin shards' followers per copy shard, at most ``shard_rows`` rows) and plans the copy pass's tasks
(:func:`plan_copy_pass`: ``tasks.parquet``, ranges of copy shards, and ``gather.parquet``, ranges of leader shards),
so that the run's driver reads O(tasks) rows, never a row per copy shard.

At run time:

* a regular shard's read task marks its moved followers (:func:`mark`: :data:`~reembed.schema.MOVED`) and its
  followers whose leader is in the same shard (:data:`~reembed.schema.LEADER_POS`, found from the shard's own
  text hashes: the rule is the plan's, so it needs no plan file). The Embedder skips both; the shard writer
  drops the moved rows (they are written by their copy shard) and gives each in-shard follower its leader's
  vector bit for bit (:func:`copy_in_shard`). So every regular shard holds its leaders, and
  all leaders are embedded in the first pass.
* once every regular shard is committed, a second pass (:mod:`reembed.copies`) writes the copy shards with plain
  Ray tasks: gather tasks read each committed leader file once and shuffle the needed vectors to the copy tasks
  (``texts/leaders/part-PPPP.parquet`` lists them by leader shard); each copy task reads its followers' rows
  from the input (their ids and passthrough columns; the origin shards of a ``.gz`` file together, decompressed
  once) and writes its shards: nothing goes to the Embedder. A resume runs the pending regular shards first,
  then the pending copy shards.

With ``--reuse`` (planned first), a row carried forward from the earlier output is never a follower: it keeps its
old vector bit for bit even where its text first occurs elsewhere (its followers, if any, take that vector).

Every input row is still in exactly one committed shard: a moved follower is counted by its copy shard (its
regular shard's record says how many it ``moved`` out). Copied rows count as ``deduplicated`` in the commit
records, the summary and the cost report.

Cost: the key tasks read the corpus once more at planning (as ``--reuse`` does); the copy pass reads each leader
file once and the followers' origin shards again (docs/SCALE.md).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reembed import schema as S
from reembed.errors import InputError
from reembed.storage import Location

log = logging.getLogger(__name__)

TEXTS_DIR = "texts"
LEADERS_DIR = "leaders"
"""Under ``texts/``: the moved followers again, by leader shard (``(leader_shard, text_hash, leader_id, shard)``,
one row per text and follower shard): what the copy pass's gather tasks read."""
KEYS_DIR = "_text_keys"
COPIES = "copies.parquet"
MOVED_COUNTS = "moved.parquet"
TASKS = "tasks.parquet"
"""The copy pass's copy tasks (:data:`TASKS_SCHEMA`, one row a task): what the run's driver reads of the copy
shards, O(tasks)."""
GATHER = "gather.parquet"
"""The copy pass's gather tasks: ranges ``(first, last)`` of leader shards (:func:`gather_groups`)."""
PLAN_FILES = (COPIES, MOVED_COUNTS, TASKS, GATHER)
"""The files under ``plan/texts/`` besides the partitions' parts (their sha256 go in the plan's store)."""
MAX_COPY_TASKS = 1024
"""Copy tasks at most: a gather file holds one batch per copy task per chunk, so its footer and the files a
copy task opens stay small."""
GATHER_ROWS = 1_000_000
"""Vectors one gather task aims at (it holds :data:`reembed.copies.CHUNK_ROWS` of them at a time)."""
EMBED_S_PER_ROW = {"cuda": 0.24e-3, "cpu": 0.044}
"""``plan.dedup_texts: auto``'s embedding cost per row, in seconds of one device (a GPU; on CPU, one core): the
H100 running the BGE-large architecture (4,251 docs/s, bench/RESULTS.md; a smaller model is faster, so auto errs
towards embedding) and all-MiniLM-L6-v2 on a 2-core CPU (45.8 docs/s)."""
COPY_CPU_S_PER_ROW = 1.2e-3
"""The copy pass's CPU seconds per copied row (gather + copy; bench/copy_pass_cost.py)."""
COPY_CPU_S_PER_TASK = 0.6
"""The copy pass's CPU seconds per gather or copy task, whatever its rows (bench/copy_pass_cost.py)."""
SHARDS_PER_TASK = 8
"""Plan shards per key task."""
HASHES_PER_PARTITION = 2_000_000
"""Rows per text partition: one task finds the leaders of about that many."""
MAX_PARTITIONS = 1024
ROW_GROUP = 4096
"""Rows per row group of a followers part: a shard's read task fetches the one or two that hold its rows."""
FOLLOWERS_SCHEMA = pa.schema([("shard", pa.int64()), ("pos", pa.int64()), ("id", pa.string()),
                              ("leader_shard", pa.int64()), ("leader_id", pa.string()),
                              ("text_hash", S.text_hash_type())])
COPIES_SCHEMA = pa.schema([("shard", pa.int64()), ("origin_first", pa.int64()), ("origin_stop", pa.int64()),
                          ("rows", pa.int64())])
TASKS_SCHEMA = pa.schema([("task", pa.int64()), ("first", pa.int64()), ("stop", pa.int64()),
                          ("origin_first", pa.int64()), ("origin_stop", pa.int64()), ("rows", pa.int64())])
"""A copy task: copy shards ``first <= shard < stop``, their followers in plan shards ``origin_first <= shard <
origin_stop``, ``rows`` of them."""
GATHER_SCHEMA = pa.schema([("first", pa.int64()), ("last", pa.int64())])
MOVED_SCHEMA = pa.schema([("shard", pa.int64()), ("moved", pa.int64()), ("leads", pa.int64())])
LEADERS_SCHEMA = pa.schema([("leader_shard", pa.int64()), ("text_hash", S.text_hash_type()), ("leader_id", pa.string()),
                            ("shard", pa.int64())])
_KEYS_SCHEMA = pa.schema([("text_hash", S.text_hash_type()), ("shard", pa.int64()), ("pos", pa.int64()),
                          ("id", pa.string()), ("reused", pa.bool_())])


def plan_texts(plan: dict[str, Any], work: Location, read_shards: Callable[[list[int]], Iterable[pa.Table]],
               use_ray: bool = False, partitions: int | None = None) -> dict[str, Any]:
    """Find the corpus's repeated texts for the plan ``plan`` whose folder is ``work``; ``read_shards(shards)``
    yields the plan's shards as the read stage reads them. Writes ``texts/`` under ``work`` and returns the
    summary the manifest keeps (``plan["texts"]``): partitions, copy shards, follower counts."""
    t0 = time.monotonic()
    for folder in (KEYS_DIR, TEXTS_DIR):  # an interrupted earlier attempt's leftovers
        work.delete_dir(folder)
    shards = int(plan["shards"])
    if partitions is None:
        partitions = max(1, min(MAX_PARTITIONS, -(-int(plan["rows"]) // HASHES_PER_PARTITION)))
    groups = [list(range(a, min(a + SHARDS_PER_TASK, shards))) for a in range(0, shards, SHARDS_PER_TASK)]
    reuse_parts = int(plan["reuse"]["partitions"]) if plan.get("reuse") else 0  # planned first (--reuse)
    written = _map(key_task, [(read_shards, work, g, partitions, reuse_parts) for g in groups], use_ray)
    names: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for g, parts in zip(groups, written):
        for p in parts:
            names[p].append(_key_name(g[0]))
    moved = np.zeros(shards, dtype=np.int64)
    leads = np.zeros(shards, dtype=np.int64)
    rows = in_shard = 0
    for result in _map(partition_task, [(work, p, names[p], shards) for p in range(partitions)], use_ray,
                       stream=True):
        moved += result["moved"]
        leads += result["leads"]
        rows += result["rows"]
        in_shard += result["in_shard"]
    work.delete_dir(KEYS_DIR)
    from reembed.plan_store import _parquet_bytes

    has = np.flatnonzero(moved | leads)
    counts = pa.table({"shard": pa.array(has, pa.int64()), "moved": pa.array(moved[has], pa.int64()),
                       "leads": pa.array(leads[has], pa.int64())}, schema=MOVED_SCHEMA)
    work.write_bytes(_parquet_bytes(counts, ROW_GROUP, ["shard"]), TEXTS_DIR, MOVED_COUNTS)
    copies, tasks, gathers = plan_copy_pass(work, shards, int(plan["shard_rows"]), moved, leads)
    summary = {"partitions": partitions, "copies": copies, "copy_tasks": tasks, "gather_tasks": gathers, "rows": rows,
               "followers": int(moved.sum()) + in_shard, "moved": int(moved.sum()), "in_shard": in_shard}
    secs = time.monotonic() - t0
    log.info("texts: %d rows, %d repeat an earlier text (%d in another shard: %d copy shards in %d copy tasks), "
             "%d partitions, %.1f s, %.0f rows/s", rows, summary["followers"], summary["moved"], copies, tasks,
             partitions, secs, rows / max(secs, 1e-9))
    return summary


def plan_copy_pass(work: Location, shards: int, shard_rows: int, moved: np.ndarray | None = None,
                   leads: np.ndarray | None = None) -> tuple[int, int, int]:
    """The copy pass's plan, made once with the rest of the plan so that the run's driver holds O(tasks):
    ``texts/copies.parquet`` (the copy shards, :func:`pack_copies`), ``texts/tasks.parquet`` (the copy tasks:
    ranges of copy shards, those sharing a ``.gz`` input file together, at most :data:`MAX_COPY_TASKS`) and
    ``texts/gather.parquet`` (the gather tasks: ranges of leader shards, :func:`gather_groups`). ``moved`` and
    ``leads`` are the per-plan-shard counts (read from ``texts/moved.parquet`` when not given: an output
    planned before the tasks were). Returns ``(copy shards, copy tasks, gather tasks)``. The planning driver
    holds the plan's per-shard counts here (an int64 a shard, as it does to sum the partition tasks' results)."""
    from reembed.plan_store import _parquet_bytes, read_files, segment_index

    if moved is None or leads is None:  # copies.parquet is there (and in the plan's checked files): kept
        copies = read_copies(work)
        leads = np.zeros(shards, np.int64)
        for s, n in moved_counts(work, "leads").items():
            leads[s] = n
    else:
        copies = pa.Table.from_pylist(list(pack_copies(moved, shards, shard_rows)), schema=COPIES_SCHEMA)
        work.write_bytes(_parquet_bytes(copies, ROW_GROUP, ["shard"]), TEXTS_DIR, COPIES)
    files = read_files(work)
    gz = {f for f, p in zip(files.column("file").to_pylist(), files.column("path").to_pylist())
          if f >= 0 and _is_gzip(p)}
    index = segment_index(work, shards) if gz and copies.num_rows else None
    tasks = copy_task_table(copies, index, gz, MAX_COPY_TASKS)
    work.write_bytes(_parquet_bytes(tasks, ROW_GROUP, ["first"]), TEXTS_DIR, TASKS)
    has = np.flatnonzero(leads)
    groups = gather_groups(dict(zip(has.tolist(), leads[has].tolist())))
    gather = pa.table({"first": pa.array([a for a, _ in groups], pa.int64()),
                       "last": pa.array([b for _, b in groups], pa.int64())}, schema=GATHER_SCHEMA)
    work.write_bytes(_parquet_bytes(gather, ROW_GROUP, ["first"]), TEXTS_DIR, GATHER)
    return copies.num_rows, tasks.num_rows, gather.num_rows


def decide(summary: dict[str, Any], device: str, devices: int, cpus: int,
           embed_s_per_row: float | None = None) -> dict[str, Any]:
    """``plan.dedup_texts: auto``: whether the copy pass of the counted repeats (``summary``, from
    :func:`plan_texts`) costs less than the embedding it saves, in seconds of the cluster's wall time:

    * saved: ``moved`` rows (the followers whose leader is in another shard: the in-shard repeats are copied
      either way) x ``embed_s_per_row`` (seconds of one device, a GPU or on CPU one core; default
      :data:`EMBED_S_PER_ROW` of ``device``) / ``devices``;
    * spent: ``moved`` x :data:`COPY_CPU_S_PER_ROW` + (copy tasks + gather tasks) x
      :data:`COPY_CPU_S_PER_TASK`, CPU seconds spread over the cluster's ``cpus``.

    Copy when saved > spent. Returns the decision with its numbers (what the plan stores and the log says)."""
    if embed_s_per_row is None:
        embed_s_per_row = EMBED_S_PER_ROW.get(device, EMBED_S_PER_ROW["cuda"])
    per_row = float(embed_s_per_row)
    moved = int(summary.get("moved", 0))
    tasks = int(summary.get("copy_tasks", 0)) + int(summary.get("gather_tasks", 0))
    saved = moved * per_row / max(1, int(devices))
    spent = (moved * COPY_CPU_S_PER_ROW + tasks * COPY_CPU_S_PER_TASK) / max(1, int(cpus))
    return {"mode": "auto", "dedup": bool(moved) and saved > spent, "rows_saved": moved,
            "embed_s_per_row": per_row, "device": device, "devices": int(devices), "cpus": int(cpus),
            "saved_s": round(saved, 3), "copy_pass_s": round(spent, 3), "copy_tasks": tasks,
            "counts": {k: summary.get(k) for k in ("rows", "followers", "moved", "in_shard", "copies")}}


def copy_task_table(copies: pa.Table, index: pa.Table | None, gz_files: set[int],
                    max_tasks: int | None = None) -> pa.Table:
    """The copy tasks (:data:`TASKS_SCHEMA`) over ``copies`` (rows of ``copies.parquet``, in shard order): one
    copy shard a task, except that copy shards whose origin shards share a ``.gz`` input file go together (the
    task decompresses it once), then consecutive tasks packed so that there are at most about ``max_tasks``
    (:func:`reembed.read.pack_groups`' rule; default :data:`MAX_COPY_TASKS`). ``index`` is
    :func:`reembed.plan_store.segment_index` (needed only with ``gz_files``, the file indices of the ``.gz``
    inputs)."""
    max_tasks = MAX_COPY_TASKS if max_tasks is None else max_tasks
    shard = copies.column("shard").to_numpy()
    first = copies.column("origin_first").to_numpy()
    stop = copies.column("origin_stop").to_numpy()
    n = len(shard)
    if not n:
        return TASKS_SCHEMA.empty_table()
    joins = np.zeros(n, dtype=bool)  # joins[i]: copy shard i goes with copy shard i - 1
    if gz_files and index is not None and n > 1:
        seg_shard = index.column("shard").to_numpy().astype(np.int64)
        seg_file = index.column("file").to_numpy().astype(np.int64)
        gz = np.isin(seg_file, np.fromiter(gz_files, np.int64))
        if gz.any():
            order = np.lexsort((seg_shard[gz], seg_file[gz]))
            f, s = seg_file[gz][order], seg_shard[gz][order]
            at = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
            lo, hi = np.minimum.reduceat(s, at), np.maximum.reduceat(s, at)
            # reach[s]: the last shard of a .gz file that starts at or before shard s (-1: none)
            reach = np.full(int(max(hi.max(), stop.max())) + 1, -1, dtype=np.int64)
            np.maximum.at(reach, lo, hi)
            reach = np.maximum.accumulate(reach)
            # a .gz file read by copy shard i - 1 and copy shard i spans from its origins to i's first origin
            joins[1:] = reach[stop[:-1] - 1] >= first[1:]
    starts = np.flatnonzero(~joins)  # the groups that must stay whole
    sizes = np.diff(np.r_[starts, n])
    per_task = -(-n // max(1, max_tasks)) if len(starts) > max_tasks else 1
    task_of_group = np.zeros(len(starts), dtype=np.int64)
    if per_task > 1:
        k, filled = 0, 0
        for g, size in enumerate(sizes.tolist()):
            if g and filled + size > per_task:
                k, filled = k + 1, 0
            task_of_group[g] = k
            filled += size
    else:
        task_of_group = np.arange(len(starts), dtype=np.int64)
    task = np.repeat(task_of_group, sizes)
    at = np.flatnonzero(np.r_[True, task[1:] != task[:-1]])
    rows = copies.column("rows").to_numpy()
    return pa.table({"task": pa.array(np.arange(len(at)), pa.int64()),
                     "first": pa.array(shard[at], pa.int64()),
                     "stop": pa.array(np.maximum.reduceat(shard, at) + 1, pa.int64()),
                     "origin_first": pa.array(np.minimum.reduceat(first, at), pa.int64()),
                     "origin_stop": pa.array(np.maximum.reduceat(stop, at), pa.int64()),
                     "rows": pa.array(np.add.reduceat(rows, at), pa.int64())}, schema=TASKS_SCHEMA)


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


def key_task(read_shards: Callable[[list[int]], Iterable[pa.Table]], work: Location, shards: list[int],
             partitions: int, reuse_parts: int = 0) -> tuple[int, ...]:
    """Key task over plan ``shards``: the rows to embed as ``(text_hash, shard, pos, id, reused)``, hashed into
    ``partitions`` by their text hash; returns the partitions it wrote rows for. ``reuse_parts``: the plan's
    ``--reuse`` partitions (0: none), whose rows carried forward are marked ``reused`` (never a follower)."""
    from reembed.dedup import _ipc_bytes

    carried = {}
    if reuse_parts:
        from reembed.reuse import shards_reuse

        carried = shards_reuse(work, shards, reuse_parts)
    parts = []
    for table in read_shards(list(shards)):
        live = table.filter(pc.is_null(table.column(S.REASON)))
        reused = np.zeros(live.num_rows, dtype=bool)
        rows = carried.get(int(table.column(S.SHARD)[0].as_py())) if table.num_rows else None
        if rows is not None and rows.num_rows and live.num_rows:
            reused = pc.is_in(live.column(S.POS), value_set=rows.column("pos")).to_numpy(zero_copy_only=False)
        parts.append(pa.table([live.column(S.TEXT_HASH), live.column(S.SHARD).cast(pa.int64()), live.column(S.POS),
                               live.column(S.ID), pa.array(reused, pa.bool_())], schema=_KEYS_SCHEMA))
    table = pa.concat_tables(parts).combine_chunks() if parts else _KEYS_SCHEMA.empty_table()
    part = hash_partitions(table.column("text_hash"), partitions)
    order = np.argsort(part, kind="stable")  # stable: rows keep plan order within a partition
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    table = table.take(pa.array(order))
    batches = [table.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])) for p in range(partitions)]
    work.write_bytes(_ipc_bytes(_KEYS_SCHEMA, batches), KEYS_DIR, _key_name(shards[0]))
    return tuple(p for p in range(partitions) if bounds[p + 1] > bounds[p])


def partition_task(work: Location, partition: int, names: list[str], shards: int) -> dict[str, Any]:
    """One partition's leaders and followers: writes ``texts/part-PPPP.parquet`` (the followers whose leader
    is in another shard) and returns ``{"rows", "in_shard", "moved"}`` (``moved``: per plan shard, an array)."""
    batches = []
    for name in names:  # in plan order: the key files are named by their first shard
        with work.fs.open_input_file(work.path(KEYS_DIR, name)) as f:
            b = pa.ipc.open_file(f).get_batch(partition)
        if b.num_rows:
            batches.append(b)
    table = pa.Table.from_batches(batches, _KEYS_SCHEMA).combine_chunks() if batches else _KEYS_SCHEMA.empty_table()
    leader = leaders(table.column("text_hash"))
    shard = table.column("shard").to_numpy()
    # A row carried forward from the --reuse output keeps its own vector (bit for bit): never a follower,
    # though a later row of its text may follow it (its shard file then holds that vector).
    follower = (leader != np.arange(len(leader))) & ~table.column("reused").to_numpy(zero_copy_only=False)
    moved = follower & (shard[leader] != shard)
    take = pa.array(np.flatnonzero(moved))
    lead = pa.array(leader[moved])
    out = pa.table([table.column("shard").take(take), table.column("pos").take(take), table.column("id").take(take),
                    table.column("shard").take(lead), table.column("id").take(lead),
                    table.column("text_hash").take(take)], schema=FOLLOWERS_SCHEMA)
    out = out.sort_by([("shard", "ascending"), ("pos", "ascending")])
    from reembed.plan_store import _parquet_bytes

    work.write_bytes(_parquet_bytes(out, ROW_GROUP, ["shard"]), TEXTS_DIR, part_file(partition))
    # By leader shard, one row per text and follower shard (a copy shard needs a text's vector once).
    by_leader = out.select(["leader_shard", "text_hash", "leader_id", "shard"]).sort_by(
        [("leader_shard", "ascending"), ("shard", "ascending")])
    if by_leader.num_rows > 1:
        key = pc.binary_join_element_wise(by_leader.column("text_hash").cast(pa.binary()),
                                          by_leader.column("shard").cast(pa.string()).cast(pa.binary()), b"/")
        first = leaders(key.combine_chunks() if isinstance(key, pa.ChunkedArray) else key)
        by_leader = by_leader.filter(pa.array(first == np.arange(len(first))))
    work.write_bytes(_parquet_bytes(by_leader.cast(LEADERS_SCHEMA), ROW_GROUP, ["leader_shard"]), TEXTS_DIR,
                     LEADERS_DIR, part_file(partition))
    lead_shard = by_leader.column("leader_shard").to_numpy()
    return {"rows": table.num_rows, "in_shard": int((follower & ~moved).sum()),
            "moved": np.bincount(shard[moved], minlength=shards).astype(np.int64),
            "leads": np.bincount(lead_shard, minlength=shards).astype(np.int64)}


def leaders(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each row (in plan order), the index of the first row with the same text hash (itself for a leader)."""
    n = len(hashes)
    if not n:
        return np.zeros(0, dtype=np.int64)
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    # A hash table numbers distinct values in order of first appearance: value k first appears at the k-th
    # row whose number exceeds every number before it.
    codes = pc.dictionary_encode(hashes.cast(pa.binary())).indices.to_numpy()
    top = np.maximum.accumulate(codes)
    first = np.ones(n, dtype=bool)
    first[1:] = top[1:] > top[:-1]
    return np.flatnonzero(first)[codes]


def pack_copies(moved: np.ndarray, first_copy: int, shard_rows: int) -> Iterator[dict[str, int]]:
    """Copy shards from the moved followers per plan shard (``moved[s]``): the followers of whole plan shards,
    in plan order, at most ``shard_rows`` rows a copy shard, numbered from ``first_copy``."""
    shard, open_ = first_copy, None
    for s in np.flatnonzero(moved).tolist():
        n = int(moved[s])
        if open_ is not None and open_["rows"] + n > shard_rows:
            yield open_
            shard, open_ = shard + 1, None
        if open_ is None:
            open_ = {"shard": shard, "origin_first": s, "origin_stop": s + 1, "rows": 0}
        open_["origin_stop"] = s + 1
        open_["rows"] += n
    if open_ is not None:
        yield open_


def mark(table: pa.Table, followers_rows: pa.Table) -> pa.Table:
    """One regular shard's documents (as the read stage yields them) with :data:`~reembed.schema.MOVED` (rows a
    copy shard writes) and :data:`~reembed.schema.LEADER_POS` (the position of the row whose vector a row takes,
    -1 for rows embedded or dead-lettered as usual). ``followers_rows`` holds (at least) the shard's rows of the
    followers parts (:func:`followers`)."""
    n = table.num_rows
    moved = np.zeros(n, dtype=bool)
    if n:
        shard = int(table.column(S.SHARD)[0].as_py())
        rows = followers_rows.filter(pc.equal(followers_rows.column("shard"), shard))
        if rows.num_rows:
            pos = rows.column("pos").to_numpy()
            if pos.max() >= n:
                raise InputError(f"shard {shard}: the plan moves row {int(pos.max())} of {n}; an input file changed "
                                 "since the plan was made (re-plan with --fresh)")
            got = table.take(pa.array(pos))
            same = pc.and_(pc.equal(got.column(S.TEXT_HASH), rows.column("text_hash")),
                           pc.equal(got.column(S.ID), rows.column("id")))
            if got.column(S.REASON).null_count != got.num_rows or not pc.all(same).as_py():
                raise InputError(f"shard {shard}: the input no longer holds the texts this plan was made with; "
                                 "an input file changed since the plan was made (re-plan with --fresh)")
            moved[pos] = True
    leader_pos = in_shard_leaders(table, moved)
    table = table.append_column(S.MOVED, pa.array(moved))
    return table.append_column(S.LEADER_POS, pa.array(leader_pos, pa.int64()))


def in_shard_leaders(table: pa.Table, moved: np.ndarray) -> np.ndarray:
    """For each row, the position of the first earlier live row of the shard with the same text (-1: none,
    or the row is dead-lettered or moved). Rows are in position order."""
    n = table.num_rows
    out = np.full(n, -1, dtype=np.int64)
    live = np.asarray(pc.is_null(table.column(S.REASON)).to_numpy(zero_copy_only=False), dtype=bool) & ~moved
    idx = np.flatnonzero(live)
    if len(idx) > 1:
        lead = leaders(table.column(S.TEXT_HASH).take(pa.array(idx)))
        follower = lead != np.arange(len(idx))
        out[idx[follower]] = idx[lead[follower]]
    return out


def copy_in_shard(live: pa.Table) -> tuple[pa.Table, int]:
    """The shard writer's step: each row with a :data:`~reembed.schema.LEADER_POS` (and not carried forward from
    a ``--reuse`` output) takes its leader's vector and truncation flag, bit for bit, and is marked
    :data:`~reembed.schema.COPIED`. ``live`` holds the shard's written rows in position order (the leaders are
    among them). Returns the table and how many rows were copied."""
    if S.LEADER_POS not in live.column_names:
        return live, 0
    lead = live.column(S.LEADER_POS).to_numpy()
    take = lead >= 0
    if S.REUSED in live.column_names:
        take &= ~live.column(S.REUSED).to_numpy(zero_copy_only=False).astype(bool)
    count = int(take.sum())
    if not count:
        return live, 0
    pos = live.column(S.POS).to_numpy()
    src = np.searchsorted(pos, lead[take])
    if not np.array_equal(pos[np.minimum(src, len(pos) - 1)], lead[take]):
        raise RuntimeError("a row's leader is not among its shard's written rows")  # a bug upstream
    rows = np.flatnonzero(take)
    vectors = S.embedding_matrix(live.column(S.EMBEDDING)).copy()
    vectors[rows] = vectors[src]
    truncated = live.column(S.TRUNCATED).to_numpy(zero_copy_only=False).copy()
    truncated[rows] = truncated[src]
    copied = (live.column(S.COPIED).to_numpy(zero_copy_only=False).astype(bool).copy()
              if S.COPIED in live.column_names else np.zeros(live.num_rows, dtype=bool))
    copied[rows] = True
    live = live.set_column(live.schema.get_field_index(S.EMBEDDING), S.EMBEDDING, S.embedding_array(vectors))
    live = live.set_column(live.schema.get_field_index(S.TRUNCATED), S.TRUNCATED, pa.array(truncated))
    if S.COPIED in live.column_names:
        live = live.set_column(live.schema.get_field_index(S.COPIED), S.COPIED, pa.array(copied))
    else:
        live = live.append_column(S.COPIED, pa.array(copied))
    return live, count


def followers(plan_loc: Location, first: int, last: int, partitions: int) -> pa.Table:
    """The moved followers of plan shards ``first..last`` (inclusive), sorted by ``(shard, pos)``, from the
    followers parts (only the row groups whose ``shard`` statistics can hold them)."""
    import pyarrow.parquet as pq

    from reembed.plan_store import _read_range

    parts = []
    for p in range(partitions):
        with plan_loc.fs.open_input_file(plan_loc.path(TEXTS_DIR, part_file(p))) as f:
            table, _ = _read_range(pq.ParquetFile(f), "shard", first, last)
        parts.append(table.cast(FOLLOWERS_SCHEMA))
    if not parts:
        return FOLLOWERS_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by([("shard", "ascending"), ("pos", "ascending")])


def read_copies(plan_loc: Location, first: int | None = None, stop: int | None = None) -> pa.Table:
    """``copies.parquet``: ``(shard, origin_first, origin_stop, rows)`` of the copy shards ``first <= shard <
    stop`` (only the row groups whose statistics can hold them: what a copy task reads), or of every copy shard
    (O(copy shards): for tests and benches, never the run's driver)."""
    import pyarrow.parquet as pq

    from reembed.plan_store import _read_range

    with plan_loc.fs.open_input_file(plan_loc.path(TEXTS_DIR, COPIES)) as f:
        if first is None:
            return pq.read_table(f).cast(COPIES_SCHEMA)
        table, _ = _read_range(pq.ParquetFile(f), "shard", first, stop - 1)
    return table.cast(COPIES_SCHEMA)


def read_tasks(plan_loc: Location) -> pa.Table:
    """``tasks.parquet``: the copy tasks (:data:`TASKS_SCHEMA`), at most about :data:`MAX_COPY_TASKS` rows."""
    return _read_small(plan_loc, TASKS, TASKS_SCHEMA)


def read_gather(plan_loc: Location) -> list[tuple[int, int]]:
    """``gather.parquet``: the gather tasks' ranges ``(first, last)`` of leader shards."""
    t = _read_small(plan_loc, GATHER, GATHER_SCHEMA)
    return list(zip(t.column("first").to_pylist(), t.column("last").to_pylist()))


def moved_counts(plan_loc: Location, column: str = "moved") -> dict[int, int]:
    """``{plan shard: rows its copy shards write}`` of the shards that have any; ``column="leads"``: the
    vectors of its leaders the copy shards need (one per text and follower shard)."""
    import pyarrow.parquet as pq

    with plan_loc.fs.open_input_file(plan_loc.path(TEXTS_DIR, MOVED_COUNTS)) as f:
        t = pq.read_table(f)
    return {s: n for s, n in zip(t.column("shard").to_pylist(), t.column(column).to_pylist()) if n}


def moved_rows(plan_loc: Location, shards: Sequence[int]) -> int:
    """The rows that plan shards ``shards`` move out to copy shards, summed from the counts' columns (no
    per-shard Python objects)."""
    import pyarrow.parquet as pq

    with plan_loc.fs.open_input_file(plan_loc.path(TEXTS_DIR, MOVED_COUNTS)) as f:
        t = pq.read_table(f, columns=["shard", "moved"])
    want = np.isin(t.column("shard").to_numpy(), np.asarray(shards, dtype=np.int64))
    return int(t.column("moved").to_numpy()[want].sum())


def leader_rows(plan_loc: Location, first: int, last: int, partitions: int) -> pa.Table:
    """The rows of the ``texts/leaders/`` parts whose leader is in plan shards ``first..last`` (only the row
    groups whose ``leader_shard`` statistics can hold them), sorted by leader shard."""
    import pyarrow.parquet as pq

    from reembed.plan_store import _read_range

    parts = []
    for p in range(partitions):
        with plan_loc.fs.open_input_file(plan_loc.path(TEXTS_DIR, LEADERS_DIR, part_file(p))) as f:
            table, _ = _read_range(pq.ParquetFile(f), "leader_shard", first, last)
        parts.append(table.cast(LEADERS_SCHEMA))
    if not parts:
        return LEADERS_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by([("leader_shard", "ascending"), ("shard", "ascending")])


def hash_partitions(hashes: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition of each text hash: its first 8 bytes (already uniform: blake2b) modulo ``partitions``."""
    n = len(hashes)
    if partitions == 1 or not n:
        return np.zeros(n, dtype=np.int64)
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    raw = np.frombuffer(hashes.buffers()[1], dtype=np.uint8)[hashes.offset * S.TEXT_HASH_BYTES:
                                                              (hashes.offset + n) * S.TEXT_HASH_BYTES]
    words = raw.reshape(n, S.TEXT_HASH_BYTES)[:, :8].copy().view("<u8").reshape(n)
    return (words % np.uint64(partitions)).astype(np.int64)


def part_file(partition: int) -> str:
    return f"part-{partition:04d}.parquet"


# ---------------------------------------------------------------------------------------------------


def _read_small(plan_loc: Location, name: str, schema: pa.Schema) -> pa.Table:
    import pyarrow.parquet as pq

    with plan_loc.fs.open_input_file(plan_loc.path(TEXTS_DIR, name)) as f:
        return pq.read_table(f).cast(schema)


def _is_gzip(path: str) -> bool:
    from reembed.scan import is_gzip

    return is_gzip(path)


def _key_name(first: int) -> str:
    return f"s-{first:07d}.arrow"


def _map(fn: Callable[..., Any], args: list[tuple], use_ray: bool, stream: bool = False) -> Iterable[Any]:
    """``fn(*a)`` for each of ``args`` (Ray tasks when ``use_ray``); with ``stream``, results as they finish,
    so the driver holds one at a time."""
    from reembed.scan import run_tasks

    if not (use_ray and stream):
        return run_tasks(fn, args, use_ray)
    return _streamed(fn, args)


def _streamed(fn: Callable[..., Any], args: list[tuple]) -> Iterator[Any]:
    import ray

    from reembed import cluster

    remote = ray.remote(num_cpus=0.5, max_retries=3, retry_exceptions=[OSError])(fn)
    refs = [remote.remote(*a) for a in args]
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        yield cluster.get(done[0])
