"""Incremental re-embedding: ``reembed run --input NEW --output OUT2 --reuse OUT1`` carries OUT1's vectors
forward for the rows whose text did not change, and embeds only the new and changed ones.

Every shard a job writes holds :data:`reembed.schema.TEXT_HASH` (blake2b-128 of the text). The reuse join is
planned once, with the rest of the plan, by hash partitioning on the id (as :mod:`reembed.dedup`), so no
process holds the ids of either side:

1. one key task per group of NEW's plan shards reads them as the read stage will (canonical ids, dead-letter
   reasons, text hashes) and writes the rows that will be embedded as ``_reuse_ids/new/p-PPPP/g-SSSSSSS.parquet``
   of ``(id, shard, pos, text_hash)``;
2. one key task per group of OUT1's committed shards reads only their ``id`` and ``text_hash`` columns and
   writes ``_reuse_ids/old/p-PPPP/g-SSSSSSS.parquet`` of ``(id, old_path, old_row, text_hash)``;
3. one join task per partition writes ``plan/reuse/part-PPPP.parquet``: ``(shard, pos, old_path, old_row)``
   of the NEW rows whose id is in OUT1 with the same text hash, sorted by ``(shard, pos)`` in small row groups,
   and ``plan/gone/part-PPPP.parquet``: the ids of OUT1 that NEW does not embed (an anti-join), and returns
   only counts. The parts are part of the plan (recorded with their sha256), so a resumed run reuses exactly
   the same rows.

At run time a read task reads its shards' rows of the reuse parts, each part opened once for all its shards
(row-group statistics on ``shard``: :func:`shards_reuse`), then each shard's rows' vectors from the OUT1 shard
files that hold them (only those files, on the worker), checking that
each old row still has the same id and text hash, and marks the rows :data:`~reembed.schema.REUSED`. The
Embedder skips them; the shard writer (:func:`carry_forward`) writes the old vectors, bit for bit.

OUT1 must have the same model fingerprint (name, revision, dimension, normalization, pooling, precision,
max_seq_length) as this run, else :class:`OutputRefused`; an OUT1 written before shards had a text hash is
refused too (its texts are not in it to hash). Only OUT1's committed shards are reused.

``reembed index --prune-from COLLECTION`` (:func:`prune`) deletes the gone ids from a Qdrant collection of
OUT1: Ray tasks over the ``gone`` parts for a server, one Ray actor for an embedded folder; counts only come
back to the driver.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reembed import schema as S
from reembed.dedup import id_partitions
from reembed.errors import ConfigError, InputError, ManifestError, OutputRefused
from reembed.scan import run_tasks
from reembed.storage import Location
from reembed.cluster import worker_name

if TYPE_CHECKING:
    from reembed.manifest import ShardRefs

log = logging.getLogger(__name__)

REUSE_DIR = "reuse"
GONE_DIR = "gone"
KEYS_DIR = "_reuse_ids"
SHARDS_PER_TASK = 8
"""Shards per key task (NEW's plan shards, or OUT1's committed shards)."""
IDS_PER_PARTITION = 2_000_000
"""Ids (NEW's rows + OUT1's) per join partition: one task joins about that many."""
MAX_PARTITIONS = 1024
TASKS_PER_WRITER = 4
"""Pruning a server: the gone parts go in about this many tasks per writer (``index.upload_workers``)."""
ROW_GROUP = 4096
"""Rows per row group of a reuse part: a shard's read task fetches the one or two that hold its rows."""
REUSE_SCHEMA = pa.schema([("shard", pa.int64()), ("pos", pa.int64()), ("old_path", pa.string()),
                          ("old_row", pa.int64())])
GONE_SCHEMA = pa.schema([("id", pa.string())])
_NEW_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.int64()), ("pos", pa.int64()),
                         ("text_hash", S.text_hash_type())])
_OLD_SCHEMA = pa.schema([("id", pa.string()), ("old_path", pa.string()), ("old_row", pa.int64()),
                         ("text_hash", S.text_hash_type())])
FINGERPRINT_KEYS = ("name", "revision", "dimension", "normalize", "pooling", "dtype", "max_seq_length")


def open_earlier(earlier: Location, model: dict[str, Any], out: Location | None = None):
    """OUT1's :class:`~reembed.manifest.Manifest`, refused unless its vectors are interchangeable with this
    run's: the same model fingerprint, and shards that record their texts' hashes."""
    from reembed.manifest import Manifest, inside_output

    if out is not None and earlier.uri.rstrip("/") == out.uri.rstrip("/"):
        raise ConfigError(f"--reuse {earlier.uri}: is this run's own --output; name the output of an earlier run")
    m = Manifest.load(earlier)
    if m is None:
        raise ManifestError(f"--reuse {earlier.uri}: no manifest.json there (not a reembed output); "
                            "name the output of an earlier run")
    stored = m.model
    if stored["fingerprint"] != model["fingerprint"]:
        diffs = [f"{k}: {stored.get(k)!r} -> {model.get(k)!r}" for k in FINGERPRINT_KEYS if stored.get(k) != model.get(k)]
        raise OutputRefused(
            f"--reuse {earlier.uri}: its vectors were made with fingerprint {stored['fingerprint']} and this job "
            f"has {model['fingerprint']} ({'; '.join(diffs) or 'other settings'}); vectors of different models or "
            "settings must not be mixed: run without --reuse to embed everything")
    first = next(iter(m.committed.items()), None)
    if first is not None:
        import pyarrow.parquet as pq

        shard, rec = first
        path = inside_output(earlier, rec["path"], f"shards.{shard:05d}.path")
        with earlier.fs.open_input_file(earlier.path(path)) as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if S.TEXT_HASH not in names:
            raise OutputRefused(
                f"--reuse {earlier.uri}: its shards have no {S.TEXT_HASH} column (written by a reembed before "
                "incremental runs), so unchanged texts cannot be told apart; run without --reuse this once")
    return m


def plan_reuse(earlier: Location, old, plan: dict[str, Any], work: Location,
               read_shards: Callable[[list[int]], Iterable[pa.Table]], use_ray: bool = False) -> dict[str, Any]:
    """Plan the reuse of ``old`` (OUT1's Manifest, from :func:`open_earlier`) for the plan ``plan`` whose
    folder is ``work``; ``read_shards(shards)`` yields NEW's shards as the read stage reads them. Writes
    ``reuse/`` and ``gone/`` under ``work`` and returns the summary the manifest keeps (``plan["reuse"]``)."""
    t0 = time.monotonic()
    for folder in (KEYS_DIR, REUSE_DIR, GONE_DIR):  # an interrupted earlier attempt's leftovers
        work.delete_dir(folder)
    committed = old.refs()  # OUT1's shard numbers and commit seqs: each key task reads its shards' records
    old_rows = int(old.totals()["embedded"])
    partitions = max(1, min(MAX_PARTITIONS, -(-(plan["rows"] + old_rows) // IDS_PER_PARTITION)))
    new_groups = _chunks(range(plan["shards"]), SHARDS_PER_TASK)  # ranges: a task carries two numbers
    new = run_tasks(new_keys, [(read_shards, work, g, partitions) for g in new_groups], use_ray)
    old_groups = committed.chunks(SHARDS_PER_TASK)
    olds = run_tasks(old_keys, [(earlier, work, g, partitions) for g in old_groups], use_ray)
    names_new: dict[int, list[str]] = {p: [] for p in range(partitions)}
    names_old: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for g, written in zip(new_groups, new):
        for p in written:
            names_new[p].append(_group_name(g[0]))
    for g, written in zip(old_groups, olds):
        for p in written:
            names_old[p].append(_group_name(g.first))
    counts = run_tasks(join_partition, [(work, p, names_new[p], names_old[p]) for p in range(partitions)], use_ray)
    work.delete_dir(KEYS_DIR)
    summary = {
        "uri": earlier.uri,
        "fingerprint": old.model["fingerprint"],
        "partitions": partitions,
        "dimension": int(old.model["dimension"]),
        "old_rows": old_rows,
        "old_complete": old.is_complete(),
        "reusable": sum(c["reusable"] for c in counts),
        "changed": sum(c["changed"] for c in counts),
        "gone": sum(c["gone"] for c in counts),
    }
    log.info("reuse: %d of %d planned rows carried forward from %s, %d changed texts, %d ids gone, "
             "%d partitions, %.1f s", summary["reusable"], plan["rows"], earlier.uri, summary["changed"],
             summary["gone"], partitions, time.monotonic() - t0)
    if not summary["old_complete"]:
        log.warning("reuse: %s is not complete; only its committed shards are reused", earlier.uri)
    return summary


def new_keys(read_shards: Callable[[list[int]], Iterable[pa.Table]], work: Location, shards: list[int],
             partitions: int) -> tuple[int, ...]:
    """Key task over NEW's plan ``shards``: the rows to embed as ``(id, shard, pos, text_hash)``, by partition."""
    parts = []
    for table in read_shards(list(shards)):
        live = table.filter(pc.is_null(table.column(S.REASON)))
        parts.append(pa.table([live.column(S.ID), live.column(S.SHARD).cast(pa.int64()), live.column(S.POS),
                               live.column(S.TEXT_HASH)], schema=_NEW_SCHEMA))
    return _write_partitions(work, "new", _group_name(shards[0]), pa.concat_tables(parts), partitions)


def old_keys(earlier: Location, work: Location, group: "ShardRefs | list[tuple[int, str]]",
             partitions: int) -> tuple[int, ...]:
    """Key task over OUT1's committed shards ``group`` (:class:`~reembed.manifest.ShardRefs`, whose records
    it reads from OUT1's commit log, or ``(shard, path)``): ``(id, old_path, old_row, text_hash)``."""
    import pyarrow.parquet as pq

    from reembed.manifest import ShardRefs, inside_output

    if isinstance(group, ShardRefs):
        group = [(shard, inside_output(earlier, rec["path"], f"shards.{shard:05d}.path"))
                 for shard, rec in group.records(earlier)]
    parts = []
    for _, path in group:
        with earlier.fs.open_input_file(earlier.path(path)) as f:
            pf = pq.ParquetFile(f)
            if S.TEXT_HASH not in pf.schema_arrow.names:
                raise OutputRefused(f"--reuse {earlier.display(path)}: this shard has no {S.TEXT_HASH} column "
                                    "(written by a reembed before incremental runs); run without --reuse this once")
            t = pf.read(columns=[S.ID, S.TEXT_HASH])
        n = t.num_rows
        parts.append(pa.table([t.column(S.ID), pa.array([path], pa.string()).take(pa.array(np.zeros(n, np.int64))),
                               pa.array(np.arange(n, dtype=np.int64)), t.column(S.TEXT_HASH)], schema=_OLD_SCHEMA))
    table = pa.concat_tables(parts) if parts else _OLD_SCHEMA.empty_table()
    return _write_partitions(work, "old", _group_name(group[0][0]), table, partitions)


def join_partition(work: Location, partition: int, new_names: list[str], old_names: list[str]) -> dict[str, int]:
    """Join one partition: write ``reuse/part-PPPP.parquet`` (NEW rows whose id is in OUT1 with the same
    text hash) and ``gone/part-PPPP.parquet`` (OUT1 ids NEW does not embed); return the counts."""
    new = _read_keys(work, "new", partition, new_names, _NEW_SCHEMA)
    old = _read_keys(work, "old", partition, old_names, _OLD_SCHEMA)
    old_side = old.rename_columns(["id", "old_path", "old_row", "old_hash"])
    matched = new.join(old_side, keys="id", join_type="inner")
    same = pc.equal(matched.column("text_hash"), matched.column("old_hash"))
    reuse = matched.filter(same).select(["shard", "pos", "old_path", "old_row"]).sort_by(
        [("shard", "ascending"), ("pos", "ascending"), ("old_path", "ascending"), ("old_row", "ascending")])
    if reuse.num_rows > 1:  # an id twice in OUT1 (planned with dedup off): the first old row is carried
        shard, pos = reuse.column("shard").to_numpy(), reuse.column("pos").to_numpy()
        first = np.ones(len(shard), dtype=bool)
        first[1:] = (shard[1:] != shard[:-1]) | (pos[1:] != pos[:-1])
        reuse = reuse.filter(pa.array(first))
    gone = old.select(["id"]).join(new.select(["id"]), keys="id", join_type="left anti").sort_by("id")
    work.write_bytes(_parquet_bytes(reuse.cast(REUSE_SCHEMA), ["shard"]), REUSE_DIR, part_file(partition))
    work.write_bytes(_parquet_bytes(gone.cast(GONE_SCHEMA), []), GONE_DIR, part_file(partition))
    changed = pc.count_distinct(matched.filter(pc.invert(same)).column("id")).as_py() if matched.num_rows else 0
    return {"reusable": reuse.num_rows, "changed": int(changed), "gone": gone.num_rows}


def attach(table: pa.Table, plan_loc: Location, reuse: dict[str, Any], earlier: Location,
           rows: pa.Table | None = None) -> pa.Table:
    """One shard's documents (as the read stage yields them) with :data:`~reembed.schema.REUSED` and
    :data:`~reembed.schema.OLD_EMBEDDING` / ``OLD_TRUNCATED`` filled from OUT1 for the rows the plan
    carries forward. Reads only the OUT1 shard files that hold those rows; each old row must still have the
    row's id and text hash (:class:`InputError` otherwise). ``rows``: the shard's rows of the reuse parts,
    if the caller has them (:func:`shards_reuse`, once for a read task's shards); else they are read here."""
    import pyarrow.parquet as pq

    n, dim = table.num_rows, int(reuse["dimension"])
    reused = np.zeros(n, dtype=bool)
    vectors = np.zeros((n, dim), dtype=np.float32)
    truncated = np.zeros(n, dtype=bool)
    if rows is None and n:
        rows = shard_reuse(plan_loc, int(table.column(S.SHARD)[0].as_py()), int(reuse["partitions"]))
    if rows is not None and rows.num_rows:
        ids, hashes = table.column(S.ID), table.column(S.TEXT_HASH)
        paths, which = np.unique(np.array(rows.column("old_path").to_pylist(), dtype=object), return_inverse=True)
        pos_all, old_all = rows.column("pos").to_numpy(), rows.column("old_row").to_numpy()
        for k, path in enumerate(paths.tolist()):  # one pass over the rows, not one per old file
            take = np.flatnonzero(which == k)
            pos, old_row = pos_all[take], old_all[take]
            with earlier.fs.open_input_file(earlier.path(path)) as f:
                t = pq.ParquetFile(f).read(columns=[S.ID, S.EMBEDDING, S.TRUNCATED, S.TEXT_HASH])
            t = t.take(pa.array(old_row))
            same = pc.and_(pc.equal(t.column(S.ID), ids.take(pa.array(pos))),
                           pc.equal(t.column(S.TEXT_HASH), hashes.take(pa.array(pos))))
            if not pc.all(same).as_py():
                bad = int(np.flatnonzero(~same.to_numpy(zero_copy_only=False))[0])
                raise InputError(
                    f"{earlier.display(path)}: row {int(old_row[bad])} no longer holds id "
                    f"{ids[int(pos[bad])].as_py()!r} with the text this run was planned with; the --reuse output "
                    "changed since the plan was made: rerun with --fresh to plan the reuse again")
            vectors[pos] = S.embedding_matrix(t.column(S.EMBEDDING))
            truncated[pos] = t.column(S.TRUNCATED).to_numpy(zero_copy_only=False)
            reused[pos] = True
    table = table.append_column(S.REUSED, pa.array(reused))
    table = table.append_column(S.OLD_EMBEDDING, S.embedding_array(vectors))
    return table.append_column(S.OLD_TRUNCATED, pa.array(truncated))


def shard_reuse(plan_loc: Location, shard: int, partitions: int) -> pa.Table:
    """``(shard, pos, old_path, old_row)`` of one shard's carried-forward rows, from the reuse parts (only
    the row groups whose ``shard`` statistics can hold it)."""
    return shards_reuse(plan_loc, [shard], partitions)[shard]


def shards_reuse(plan_loc: Location, shards: Iterable[int], partitions: int) -> dict[int, pa.Table]:
    """:func:`shard_reuse` of each of ``shards`` (a read task's), each reuse part opened once for all of them
    (as :func:`reembed.plan_store.read_shards` reads the plan): a row group is read if its ``shard``
    statistics can hold one of ``shards``, so a task of consecutive shards reads about its own rows."""
    import pyarrow.parquet as pq

    want = np.unique(np.fromiter(shards, dtype=np.int64))
    if not len(want):
        return {}
    parts = []
    for p in range(partitions):
        with plan_loc.fs.open_input_file(plan_loc.path(REUSE_DIR, part_file(p))) as f:
            parts.append(_read_shards_of(pq.ParquetFile(f), want))
    rows = pa.concat_tables(parts) if parts else REUSE_SCHEMA.empty_table()
    rows = rows.filter(pc.is_in(rows.column("shard"), pa.array(want))).sort_by([("shard", "ascending"),
                                                                                ("pos", "ascending")])
    shard = rows.column("shard").to_numpy()
    bounds = np.searchsorted(shard, np.append(want, want[-1] + 1))
    return {int(s): rows.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i, s in enumerate(want)}


def carry_forward(live: pa.Table) -> tuple[pa.Table, int]:
    """The shard writer's step for an incremental run: the rows marked :data:`~reembed.schema.REUSED` take
    their old vector and truncation flag, bit for bit. Returns the table and how many rows were reused."""
    if S.REUSED not in live.column_names:
        return live, 0
    reused = live.column(S.REUSED).to_numpy(zero_copy_only=False).astype(bool)
    count = int(reused.sum())
    if not count:
        return live, 0
    vectors = S.embedding_matrix(live.column(S.EMBEDDING)).copy()
    vectors[reused] = S.embedding_matrix(live.column(S.OLD_EMBEDDING))[reused]
    truncated = live.column(S.TRUNCATED).to_numpy(zero_copy_only=False).copy()
    truncated[reused] = live.column(S.OLD_TRUNCATED).to_numpy(zero_copy_only=False)[reused]
    live = live.set_column(live.schema.get_field_index(S.EMBEDDING), S.EMBEDDING, S.embedding_array(vectors))
    live = live.set_column(live.schema.get_field_index(S.TRUNCATED), S.TRUNCATED, pa.array(truncated))
    return live, count


def gone_ids(out: Location, plan: dict[str, Any]) -> Iterator[pa.Array]:
    """The ids of the ``--reuse`` output that this output does not hold, one partition's at a time (each
    a sorted string array); nothing for an output planned without ``--reuse``."""
    from reembed.manifest import read_recorded

    reuse = plan.get("reuse")
    if not reuse:
        return
    for i, rec in enumerate(plan["store"]["gone"]):
        yield _part_ids(read_recorded(out, rec, f"plan.store.gone[{i}]"))


def part_file(partition: int) -> str:
    return f"part-{partition:04d}.parquet"


# ---------------------------------------------------------------------------------------------------


def _chunks(items: list | range, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _group_name(first: int) -> str:
    return f"g-{first:07d}.parquet"


def _write_partitions(work: Location, side: str, name: str, table: pa.Table, partitions: int) -> tuple[int, ...]:
    part = id_partitions(table.column("id"), partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    written = []
    for p in range(partitions):
        take = order[bounds[p]:bounds[p + 1]]
        if len(take):
            work.write_bytes(_parquet_bytes(table.take(pa.array(take)), []), KEYS_DIR, side, f"p-{p:04d}", name)
            written.append(p)
    return tuple(written)


def _read_keys(work: Location, side: str, partition: int, names: list[str], schema: pa.Schema) -> pa.Table:
    import pyarrow.parquet as pq

    parts = []
    for name in names:
        with work.fs.open_input_file(work.path(KEYS_DIR, side, f"p-{partition:04d}", name)) as f:
            parts.append(pq.read_table(f).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _read_shards_of(pf, want: np.ndarray) -> pa.Table:
    """The row groups of a reuse part whose ``shard`` statistics can hold one of ``want`` (sorted)."""
    idx = pf.schema_arrow.get_field_index("shard")
    groups = []
    for g in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(g).column(idx).statistics
        if st is None or not st.has_min_max:
            groups.append(g)
            continue
        first = np.searchsorted(want, st.min)  # the first wanted shard >= the group's smallest
        if first < len(want) and want[first] <= st.max:
            groups.append(g)
    return (pf.read_row_groups(groups) if groups else REUSE_SCHEMA.empty_table()).cast(REUSE_SCHEMA)


def _parquet_bytes(table: pa.Table, stats: list[str]) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP, write_statistics=stats or False)
    return sink.getvalue().to_pybytes()


def prune(out: Location, target: str, collection: str, batch_size: int = 1000, *, use_ray: bool = True,
          ray_address: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Delete the ids of ``out``'s gone list (the ids of its ``--reuse`` output it does not hold) from an
    existing Qdrant ``collection`` (a name or an alias) at ``target``: the way to bring a collection of the
    earlier output up to date in place. Returns ``{"collection", "target", "gone", "deleted", "count",
    "writers"}``.

    The gone ids never pass through this process: a server is pruned by Ray tasks over the plan's ``gone``
    parts (about :data:`TASKS_PER_WRITER` per one of ``workers``, run as the cluster's CPUs allow, each with
    its own client, each deleting its own parts' ids in batches of ``batch_size``); embedded Qdrant (a folder)
    allows one process, so one Ray actor on this node prunes it, fed the parts' records a batch at a time (as
    :mod:`reembed.migrate.sinks` publishes into a local Chroma folder). This process gets counts only.
    ``use_ray=False`` (``--no-ray``) deletes from this process."""
    from reembed.errors import QdrantError, UsageError
    from reembed.indexes import qdrant as Q
    from reembed.manifest import Manifest

    t0 = time.monotonic()
    m = Manifest.load(out)
    if m is None:
        raise ManifestError(f"{out.uri}: no manifest.json here (not a reembed output)")
    if not m.plan.get("reuse"):
        raise UsageError(f"{out.uri}: planned without --reuse, so it lists no gone ids; --prune-from needs the "
                         "output of a `reembed run --reuse` run")
    client = Q.connect(target)
    try:
        if collection not in Q.collections(client) and collection not in Q.aliases(client):
            raise QdrantError(f"{Q.describe(target)}: no collection or alias {collection!r} to prune; name one "
                              "that `reembed versions` lists")
        before = Q.count(client, collection)
        embedded = Q.is_embedded(client)
    finally:
        client.close()  # an embedded folder takes one process at a time: the actor opens it next
    job = Prune(target, collection, batch_size)
    parts = list(enumerate(m.plan["store"]["gone"]))
    if not use_ray:
        results = [job.delete(out, parts)] if parts else []
    elif embedded:
        results = _prune_single(out, job, parts, ray_address)
    else:
        from reembed.cluster import init_ray

        init_ray(ray_address)
        per_task = max(1, -(-len(parts) // (TASKS_PER_WRITER * max(1, workers or 1))))
        results = run_tasks(_prune_task, [(out, group, job) for group in _chunks(parts, per_task)], use_ray=True)
    client = Q.connect(target)
    try:
        after = Q.count(client, collection)
    finally:
        client.close()
    gone = sum(r["gone"] for r in results)
    log.info("prune: %d gone ids of %s deleted from %s (%d points -> %d) by %d writer(s), %.1f s", before - after,
             out.uri, collection, before, after, len({r["worker"] for r in results}), time.monotonic() - t0)
    return {"collection": collection, "target": Q.describe(target), "gone": gone, "deleted": before - after,
            "count": after, "writers": sorted({r["worker"] for r in results})}


@dataclass(frozen=True)
class Prune:
    """What a pruning writer needs: small, so it travels into Ray tasks (``target`` carries no secret; a key
    comes from the writer's own process environment, as for every Qdrant client here)."""

    target: str
    collection: str
    batch_size: int = 1000

    def delete(self, out: Location, parts: list[tuple[int, dict[str, str]]], client=None) -> dict[str, Any]:
        """Delete the ids of the ``gone`` parts ``parts`` (``(index, record)``, each read here and checked
        against its sha256) in batches; returns ``{"gone", "parts", "worker"}``. ``client``: an open client
        to use (the single writer's)."""
        from qdrant_client import models

        from reembed.indexes import qdrant as Q
        from reembed.manifest import read_recorded

        own = client is None
        client = Q.connect(self.target) if own else client
        gone = 0
        try:
            for i, rec in parts:
                ids = _part_ids(read_recorded(out, rec, f"plan.store.gone[{i}]"))
                for start in range(0, len(ids), self.batch_size):
                    selector = models.PointIdsList(points=[Q.point_id(x) for x in
                                                           ids.slice(start, self.batch_size).to_pylist()])
                    Q.call_with_retry(lambda: client.delete(self.collection, points_selector=selector, wait=True),
                                      what=f"delete from {self.collection}")
                gone += len(ids)
        finally:
            if own:
                client.close()
        return {"gone": gone, "parts": len(parts), "worker": worker_name()}


class SinglePruner:
    """The one writer of an embedded Qdrant folder, as a Ray actor: it keeps the folder open and is fed the
    gone parts' records a batch at a time."""

    def __init__(self, job: Prune):
        from reembed.indexes import qdrant as Q

        self.job = job
        self.client = Q.connect(job.target)

    def delete(self, out: Location, parts: list[tuple[int, dict[str, str]]]) -> dict[str, Any]:
        return self.job.delete(out, parts, self.client)

    def close(self) -> None:
        self.client.close()


def _part_ids(data: bytes) -> pa.Array:
    """The ``id`` column of a ``gone`` part's Parquet bytes (sorted: the join task wrote it so)."""
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data), columns=["id"]).column("id").combine_chunks()


def _prune_task(out: Location, parts: list[tuple[int, dict[str, str]]], job: Prune) -> dict[str, Any]:
    return job.delete(out, parts)


def _prune_single(out: Location, job: Prune, parts: list[tuple[int, dict[str, str]]], ray_address: str | None,
                  per_call: int = 16) -> list[dict[str, Any]]:
    """Embedded Qdrant: one actor, on this node (the folder is here), deletes every part's ids in turn,
    ``per_call`` parts per call. Only the parts' records go to it; the ids never come here."""
    from reembed.cluster import on_this_node

    if not parts:
        return []
    return on_this_node(SinglePruner, (job,), _chunks(parts, per_call), lambda p, batch: p.delete.remote(out, batch),
                        num_cpus=0.5, ray_address=ray_address)


