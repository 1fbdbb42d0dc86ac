"""FAISS IVF built by many workers, the way faiss's distributed recipe (``benchs/distributed_ondisk``) and
autofaiss do it. Four steps, each a function a Ray task runs (or this process, one after another):

* **sample** (:func:`sample_group`): one task per shard group draws the group's share of a seeded uniform
  sample of the corpus (the sample size is split over the groups exactly, multivariate-hypergeometric, so
  the union is a uniform sample without replacement); a shard holding none of the picks is not read.
* **train** (:func:`train`): one task, on a GPU when faiss sees one, trains the coarse quantizer (and PQ,
  and the SQ8 re-ranking codes) on the sample, draws the tuning queries from it, and publishes
  ``trained.faiss`` and ``queries.npz``.
* **add** (:func:`add_group`): one task per group adds the group's shards into a copy of the trained, empty
  index. A vector's faiss id is its row's position in shard order, known from the committed row counts, so
  no worker talks to another. The task publishes the partial index, the group's ids (Parquet) and the
  exact neighbours of the tuning queries among its rows, then its record ``gNNNNN.json``, create-only: the
  group's O(1) progress record. A rerun skips every group whose record and files (sha256) are intact.
* **merge** (:func:`merge`): one task merges the partial inverted lists on disk
  (``faiss.contrib.ondisk.merge_ondisk``, ``OnDiskInvertedLists``) into ``index-vN.faiss`` plus
  ``index-vN.ivfdata``, appends the groups' ids into ``index-vN.ids.parquet`` (row i = faiss id i), merges
  the groups' exact neighbours (top-k merges exactly), tunes ``nprobe`` (and the re-ranking ``k_factor``)
  and publishes the files: renamed into place on a local output, multipart uploads on S3.

The work lives under ``indexes/faiss/_build/<key>/``, the key naming the inputs, the index and the groups,
so a rerun after a crash finds exactly its own partial work. No process holds the corpus, all the ids or
the inverted lists: the trainer holds the sample (within the memory budget, see ``plan_index``), a worker
one group's partial index, the merger the centroids, the mapped lists and (with ``Refine(SQ8)``, chosen
only when it fits the budget) the re-ranking codes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.errors import ManifestError, StorageError
from reembed.manifest import ShardRefs
from reembed.indexes.exact import DEPTH, KnnHeap, normalize
from reembed.indexes.faiss import (FOLDER, IDS_ROW_GROUP, K, FaissPlan, file_record, file_sha256, local_scratch,
                                   new_index, publish_file, tune, tuning_queries, held_out, _check,
                                   _shortfall, _tuned_on)
from reembed.storage import Location
from reembed.write import read_shard_table
from reembed.cluster import worker_name

log = logging.getLogger(__name__)

BUILD = f"{FOLDER}/_build"
GROUP_ROWS = 1_000_000  # rows per group at most: about 4 GiB of 1024-d shards to read, minutes of work
MIN_GROUPS = 16  # at least this many groups (when there are as many shards), so several workers share the work
QUERIES = 600


@dataclass(frozen=True)
class Group:
    """Consecutive committed shards, added by one task; ``offset`` is the faiss id of its first row.
    ``shards``: :class:`~reembed.manifest.ShardRefs` (the task reads the records from the commit log), or
    ``(shard, record)`` pairs."""

    group: int
    offset: int
    rows: int
    shards: Any

    @property
    def name(self) -> str:
        return f"g{self.group:05d}"

    @property
    def first(self) -> int:
        return self.shards.first if isinstance(self.shards, ShardRefs) else self.shards[0][0]

    @property
    def last(self) -> int:
        return self.shards.last if isinstance(self.shards, ShardRefs) else self.shards[-1][0]

    def records(self, loc: Location):
        """``(shard, record)`` of the group's shards, in order (read here, in the task, for ShardRefs)."""
        return self.shards.records(loc) if isinstance(self.shards, ShardRefs) else iter(self.shards)


def build_ivf(loc: Location, shards: "ShardRefs | Sequence[tuple[int, dict[str, Any]]]", plan: FaissPlan, version: int, *,
              inputs: str = "", recall_target: float = 0.95, workers: int = 1, use_ray: bool = False,
              group_rows: int = GROUP_ROWS, seed: int = 0, queries: int = QUERIES) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, tune and publish the IVF index of ``plan`` over the committed ``shards`` (:class:`ShardRefs`, or
    ``(shard, record)`` in shard order) as ``index-v{version}``; returns (its files' record, the build's
    params). With ShardRefs each task reads its own shards' records: none passes through this process.

    ``use_ray``: the steps run as Ray tasks, ``workers`` of them at a time; else one after another here.
    """
    t0 = time.monotonic()
    groups = groups_of(shards, group_rows)
    key = build_key(inputs, plan, groups, seed, queries)
    folder = f"{BUILD}/{key}"
    _drop_other_builds(loc, key)
    run = _RayRunner(workers) if use_ray else _Serial()
    log.info("FAISS %s: %d vectors in %d groups, %s", plan.factory, plan.rows, len(groups),
             f"{workers} Ray worker(s)" if use_ray else "in this process")
    trained = _intact_record(loc, f"{folder}/train.json", {"factory": plan.factory})
    if trained is None:
        counts = sample_counts([g.rows for g in groups], plan.train_size, seed)
        parts = run.map(sample_group, [(loc, g, int(n), seed) for g, n in zip(groups, counts) if n], fetch=False)
        trained = run.train(loc, folder, plan, queries, seed, parts)
    else:
        log.info("FAISS %s: the trained index of an earlier attempt is intact; not training again", plan.factory)
    train_s = time.monotonic() - t0
    records = run.map(add_group, [(loc, folder, plan, g, trained) for g in groups], fetch=True)
    reused = sum(1 for r in records if r.get("reused"))
    add_s = time.monotonic() - t0 - train_s
    files, params = run.call(merge, loc, folder, plan, records, trained, version, recall_target)
    loc.delete_dir(folder)
    _remove_empty_local_dirs(loc, BUILD, f"{FOLDER}/_tmp")
    peak = {"train": trained.get("peak_rss_bytes"), "add": max(r.get("peak_rss_bytes") or 0 for r in records),
            "merge": params.pop("peak_rss_bytes", None)}
    fresh = [r for r in records if not r.get("reused")]
    cpu = {"train": trained.get("cpu_seconds"), "add": round(sum(r.get("cpu_seconds") or 0 for r in fresh), 3),
           "merge": params.pop("merge_cpu_seconds", None)}  # process CPU (all threads) of each step's tasks
    params.update(workers=workers if use_ray else 1, groups=len(groups), groups_reused=reused,
                  sample=trained["sample"], device=trained["device"], train_seconds=round(train_s, 3),
                  add_seconds=round(add_s, 3), seconds=round(time.monotonic() - t0, 3), peak_rss_bytes=peak, cpu_seconds=cpu,
                  add_processes=len({r.get("writer") for r in records if not r.get("reused")}))
    return files, params


def groups_of(shards: "ShardRefs | Sequence[tuple[int, dict[str, Any]]]", group_rows: int = GROUP_ROWS,
              min_groups: int = MIN_GROUPS) -> list[Group]:
    """Split the shards (in order) into consecutive groups of about equal rows: at most ``group_rows`` rows
    each, and at least ``min_groups`` groups when there are that many shards. Depends on the shards only
    (never on the number of workers), so a rerun with other workers finds the same groups."""
    rows = shards.rows.tolist() if isinstance(shards, ShardRefs) else [int(rec["rows"]) for _, rec in shards]
    total = sum(rows)
    n = max(1, min(len(shards), max(min_groups, -(-total // max(1, group_rows)))))
    out, start, offset, acc = [], 0, 0, 0
    for i, r in enumerate(rows):
        acc += r
        last = i == len(rows) - 1
        # close the group once its share of rows is reached (and leave one shard per group still to come)
        if last or (acc >= total * (len(out) + 1) / n and len(rows) - i - 1 >= n - len(out) - 1):
            block = shards[start:i + 1] if isinstance(shards, ShardRefs) else tuple(shards[start:i + 1])
            size = sum(rows[start:i + 1])
            out.append(Group(len(out), offset, size, block))
            offset += size
            start = i + 1
    return out


def build_key(inputs: str, plan: FaissPlan, groups: Sequence[Group], seed: int, queries: int) -> str:
    """What a build's partial work depends on: the inputs, the index, the groups, the seeds."""
    layout = [[g.offset, g.rows, g.first, g.last] for g in groups]
    blob = json.dumps({"inputs": inputs, "plan": asdict(plan) | {"reason": ""}, "groups": layout, "seed": seed,
                       "queries": queries}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_counts(rows: Sequence[int], size: int, seed: int = 0) -> np.ndarray:
    """How many of a uniform sample of ``size`` rows (without replacement) fall in each group of ``rows``."""
    size = min(int(size), int(sum(rows)))
    return np.random.default_rng([seed, 1]).multivariate_hypergeometric(np.asarray(rows, dtype=np.int64), size)


# ---------------------------------------------------------------------------------------------------
# The steps (each runs in a Ray task, or in this process)


def sample_group(loc: Location, group: Group, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rows of ``group`` drawn uniformly (seeded by the group): (normalized vectors, faiss ids)."""
    picks = np.sort(np.random.default_rng([seed, 2, group.group]).choice(group.rows, size=count, replace=False))
    parts, offset = [], 0
    for shard, rec in group.records(loc):
        lo, hi = np.searchsorted(picks, [offset, offset + int(rec["rows"])])
        if hi > lo:  # a shard holding none of the picks is not read
            x = S.embedding_matrix(_read_shard(loc, shard, rec, [S.EMBEDDING]).column(S.EMBEDDING))
            parts.append(normalize(x[picks[lo:hi] - offset]))
        offset += int(rec["rows"])
    return np.concatenate(parts), picks + group.offset


def train(loc: Location, folder: str, plan: FaissPlan, queries: int, seed: int, *parts) -> dict[str, Any]:
    """Train the index on the sample ``parts`` (:func:`sample_group`'s results), on a GPU when faiss has one;
    publish it with the tuning queries; return the record (also published as ``train.json``)."""
    import faiss

    t0, c0 = time.monotonic(), time.process_time()
    x = np.concatenate([p[0] for p in parts])
    pos = np.concatenate([p[1] for p in parts])
    index = new_index(plan)
    device = "cpu"
    if faiss.get_num_gpus():
        # k-means on the GPU (the costly part); the index itself stays on the CPU for writing.
        faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(plan.dim))
        device = "cuda"
    xq, exclude = tuning_queries(x, pos, queries, np.random.default_rng(seed + 1))
    index.train(held_out(x, pos, exclude))
    if device == "cuda":
        faiss.extract_index_ivf(index).clustering_index = None
    with local_scratch(loc) as tmp:
        faiss.write_index(index, os.path.join(tmp, "trained.faiss"))
        trained = publish_file(loc, os.path.join(tmp, "trained.faiss"), f"{folder}/trained.faiss")
        np.savez(os.path.join(tmp, "queries.npz"), xq=xq, exclude=exclude.astype(np.int64))
        qfile = publish_file(loc, os.path.join(tmp, "queries.npz"), f"{folder}/queries.npz")
    record = {"factory": plan.factory, "sample": int(len(x)), "device": device, "files": {"trained": trained, "queries": qfile},
              "seconds": round(time.monotonic() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3),
              **_whoami()}
    _create_record(loc, f"{folder}/train.json", record)
    log.info("FAISS %s: trained on %d vectors on %s in %.1f s", plan.factory, len(x), device, record["seconds"])
    return record


def add_group(loc: Location, folder: str, plan: FaissPlan, group: Group, trained: dict[str, Any]) -> dict[str, Any]:
    """Add ``group``'s shards into a copy of the trained index; publish the partial index, its ids and the
    exact neighbours of the tuning queries among its rows, then the group's record (create-only). A group
    whose record and files are already intact is not redone (``"reused": True``)."""
    import faiss

    rel = f"{folder}/{group.name}.json"
    expect = {"trained_sha256": trained["files"]["trained"]["sha256"], "offset": group.offset, "rows": group.rows}
    done = _intact_record(loc, rel, expect)
    if done is not None:
        return {**done, "reused": True}
    t0, c0 = time.monotonic(), time.process_time()
    index = _read_faiss(loc, trained["files"]["trained"])
    xq, _ = _queries(loc, trained)
    heap = KnnHeap(xq, DEPTH * K + 1)
    ivf = faiss.extract_index_ivf(index)
    refine = faiss.downcast_index(index).refine_index if plan.refine else None
    ids: list[pa.Array] = []
    offset = group.offset
    for shard, rec in group.records(loc):
        table = _read_shard(loc, shard, rec, [S.ID, S.EMBEDDING])
        x = normalize(S.embedding_matrix(table.column(S.EMBEDDING)))
        if x.shape[1] != plan.dim:
            raise ValueError(f"shard {shard} holds {x.shape[1]}-d vectors, the index expects {plan.dim}")
        positions = np.arange(offset, offset + len(x), dtype=np.int64)
        ivf.add_with_ids(x, positions)
        if refine is not None:  # re-ranking codes are found by position: groups are appended in order
            refine.add(x)
        heap.add(positions, x)
        ids.extend(table.column(S.ID).chunks)
        offset += len(x)
    index.ntotal = ivf.ntotal
    knn_ids = np.where(heap.ids == None, -1, heap.ids).astype(np.int64)  # noqa: E711 (elementwise)
    with local_scratch(loc) as tmp:
        files = {}
        faiss.write_index(index, os.path.join(tmp, "part.faiss"))
        files["index"] = publish_file(loc, os.path.join(tmp, "part.faiss"), f"{folder}/{group.name}.faiss")
        pq.write_table(pa.table({S.ID: pa.chunked_array(ids, pa.string())}), os.path.join(tmp, "ids.parquet"))
        files["ids"] = publish_file(loc, os.path.join(tmp, "ids.parquet"), f"{folder}/{group.name}.ids.parquet")
        np.savez(os.path.join(tmp, "knn.npz"), ids=knn_ids, scores=heap.scores)
        files["knn"] = publish_file(loc, os.path.join(tmp, "knn.npz"), f"{folder}/{group.name}.knn.npz")
    record = {**expect, "group": group.group, "shards": [group.first, group.last],
              "ntotal": int(index.ntotal), "files": files, "seconds": round(time.monotonic() - t0, 3),
              "cpu_seconds": round(time.process_time() - c0, 3), **_whoami()}
    if record["ntotal"] != group.rows:
        raise ManifestError(f"{loc.display(rel)}: {record['ntotal']} vectors added, the commit records say {group.rows}")
    publish_group(loc, rel, record)
    return record


def publish_group(loc: Location, rel: str, record: dict[str, Any]) -> None:
    """A group's record, create-only: the moment the group counts as done."""
    _create_record(loc, rel, record)


def merge(loc: Location, folder: str, plan: FaissPlan, records: Sequence[dict[str, Any]], trained: dict[str, Any],
          version: int, recall_target: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge the groups' partial indexes on disk into ``index-v{version}`` (+ ``.ivfdata`` and the id map),
    tune its search setting on the merged exact neighbours, publish; returns (files record, params)."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    t0, c0 = time.monotonic(), time.process_time()
    records = sorted(records, key=lambda r: r["group"])
    name = f"index-v{version}"
    rows = sum(r["rows"] for r in records)
    with local_scratch(loc) as tmp:
        partials = [_local_file(loc, r["files"]["index"], tmp) for r in records]
        index = _read_faiss(loc, trained["files"]["trained"])
        data_tmp = os.path.join(tmp, f"{name}.ivfdata")
        with _c_stdout_to_stderr():  # OnDiskInvertedLists printf()s each resize
            merge_ondisk(index, partials, data_tmp)
        if plan.refine:
            refine = faiss.downcast_index(index).refine_index
            for path in partials:
                part = faiss.read_index(path, faiss.IO_FLAG_MMAP)  # owns what downcast_index() merely points at
                refine.merge_from(faiss.downcast_index(part).refine_index)
                del part
            if refine.ntotal != index.ntotal:
                raise ManifestError(f"{loc.display(folder)}: {refine.ntotal} re-ranking codes for {index.ntotal} vectors")
        if index.ntotal != rows:
            raise ManifestError(f"{loc.display(folder)}: the merged index holds {index.ntotal} vectors, the groups {rows}")
        xq, exclude = _queries(loc, trained)
        heap = _merged_neighbours(loc, records, len(xq), DEPTH * K + 1)
        setting, got, off = tune(index, plan, xq, exclude, heap, recall_target)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        lists.filename = f"{name}.ivfdata"  # only its name: a reader maps the copy beside the index file
        faiss.write_index(index, os.path.join(tmp, f"{name}.faiss"))
        del index, lists
        ids_tmp = os.path.join(tmp, f"{name}.ids.parquet")
        with pq.ParquetWriter(ids_tmp, pa.schema([(S.ID, pa.string())]), compression="zstd") as writer:
            for r in records:  # one group's ids in memory at a time
                table = pq.read_table(_local_file(loc, r["files"]["ids"], tmp))
                if table.num_rows != r["rows"]:
                    raise ManifestError(f"{loc.display(r['files']['ids']['path'])}: {table.num_rows} ids, "
                                        f"the group holds {r['rows']} vectors")
                writer.write_table(table.select([S.ID]).cast(pa.schema([(S.ID, pa.string())])),
                                   row_group_size=IDS_ROW_GROUP)  # looked up by row group (faiss.IdMap)
        ids = publish_file(loc, ids_tmp, f"{FOLDER}/{name}.ids.parquet")
        data = publish_file(loc, data_tmp, f"{FOLDER}/{name}.ivfdata")
        files = publish_file(loc, os.path.join(tmp, f"{name}.faiss"), f"{FOLDER}/{name}.faiss")  # last: the index
    record = {"version": version, **file_record("", files), **file_record("ids_", ids),
              **file_record("ivfdata_", data), "ntotal": rows}
    params = {**asdict(plan), "planned_factory": plan.factory, "metric": "inner_product", "normalized": True,
              "ondisk": True, "search": setting, "recall_at_10": got, "recall_target": recall_target,
              "recall_met": got >= recall_target, **_shortfall(plan, got, recall_target),
              "tuning_queries": int(len(xq)), **_tuned_on(xq, off), "merge_seconds": round(time.monotonic() - t0, 3),
              "merge_cpu_seconds": round(time.process_time() - c0, 3),
              "peak_rss_bytes": _whoami()["peak_rss_bytes"]}
    return record, params


# ---------------------------------------------------------------------------------------------------
# Running the steps


class _Serial:
    """The steps one after another in this process."""

    def map(self, fn: Callable, argsets: list[tuple], fetch: bool) -> list:
        return [fn(*args) for args in argsets]

    def train(self, loc, folder, plan, queries, seed, parts) -> dict[str, Any]:
        return train(loc, folder, plan, queries, seed, *parts)

    def call(self, fn: Callable, *args):
        return fn(*args)


class _RayRunner:
    """The steps as Ray tasks, at most ``workers`` at a time; results stay in the object store unless
    ``fetch`` (the samples go from the sampling tasks to the training task without passing through here)."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))

    def map(self, fn: Callable, argsets: list[tuple], fetch: bool) -> list:
        import ray

        task = ray.remote(_in_task(fn)).options(num_cpus=1)
        refs, running = [], []
        for args in argsets:
            if len(running) >= self.workers:
                _, running = ray.wait(running, num_returns=1, fetch_local=False)
            refs.append(task.remote(*args))
            running.append(refs[-1])
        if fetch:
            return ray.get(refs)
        if refs:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
        return refs

    def train(self, loc, folder, plan, queries, seed, parts) -> dict[str, Any]:
        import ray

        if ray.get_gpu_ids():  # this task holds the GPU: train here (the parts come to the trainer anyway)
            return train(loc, folder, plan, queries, seed, *ray.get(parts))
        gpus = 1 if ray.available_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(_in_task(train, all_cores=True)).options(num_cpus=1, num_gpus=gpus)
        return ray.get(task.remote(loc, folder, plan, queries, seed, *parts))

    def call(self, fn: Callable, *args):
        import ray

        return ray.get(ray.remote(_in_task(fn, all_cores=True)).options(num_cpus=1).remote(*args))


def _in_task(fn: Callable, all_cores: bool = False) -> Callable:
    """``fn`` as a task body. Ray sets OMP_NUM_THREADS=1 in a 1-CPU task, right for the many add tasks; the
    single training and merging tasks run alone and take the node's cores."""
    def run(*args):
        import faiss

        faiss.omp_set_num_threads((os.cpu_count() or 1) if all_cores else 1)
        return fn(*args)

    run.__name__ = run.__qualname__ = f"faiss_{fn.__name__}"
    return run


# ---------------------------------------------------------------------------------------------------
# Records and files


def _create_record(loc: Location, rel: str, record: dict[str, Any]) -> None:
    """Publish a small JSON record create-only: conditional PUT on S3, a hard link on a local disk."""
    body = json.dumps(record, sort_keys=True).encode()
    from reembed.errors import VersionConflict

    try:
        if loc.conditional_writes:
            loc.write_if(body, rel, version=None)
            return
        if loc.fs.type_name == "local":
            target = loc.path(rel)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(body)
            try:
                os.link(tmp, target)
            finally:
                os.unlink(tmp)
            return
    except (VersionConflict, FileExistsError) as e:
        raise StorageError(f"{loc.display(rel)}: written meanwhile by another build of the same index; run one "
                           "`reembed index` at a time on an output") from e
    if loc.exists(rel):
        raise StorageError(f"{loc.display(rel)}: written meanwhile by another build of the same index")
    loc.write_bytes(body, rel)


def _intact_record(loc: Location, rel: str, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``rel`` if it says ``expect`` and every file it names has its recorded size and sha256;
    else None, and a record that fails is removed (its work is done again)."""
    if not loc.exists(rel):
        return None
    try:
        record = json.loads(loc.read_bytes(rel))
        bad = [k for k, v in expect.items() if record.get(k) != v]
        bad += [f["path"] for f in record["files"].values() if not loc.exists(f["path"])
                or loc.size(f["path"]) != f["bytes"] or file_sha256(loc, f["path"])[0] != f["sha256"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        bad = [f"unreadable ({e})"]
    if bad:
        log.warning("%s: not intact (%s); doing this part again", loc.display(rel), ", ".join(map(str, bad)))
        loc.delete(rel)
        return None
    return record


def _read_shard(loc: Location, shard: int, rec: dict[str, Any], columns: list[str]) -> pa.Table:
    table = read_shard_table(loc, rec, columns=columns, verify=True, key=f"shards.{shard:05d}")
    if table.num_rows != int(rec["rows"]):
        raise ManifestError(f"{loc.display(rec['path'])}: {table.num_rows} rows, its commit record says {rec['rows']}")
    return table


def _local_file(loc: Location, f: dict[str, Any], tmp: str) -> str:
    """A local path holding the recorded file ``f`` (``path``, ``sha256``), its sha256 checked: the file itself
    on a local output, else a download into ``tmp``."""
    from reembed.indexes.faiss import _file_sha256, download_file

    if loc.fs.type_name == "local":
        local = loc.path(f["path"])
    else:
        local = os.path.join(tmp, os.path.basename(f["path"]))
        download_file(loc, f["path"], local)
    _check(_file_sha256(local)[0], f["sha256"], loc.display(f["path"]))
    return local


def _read_faiss(loc: Location, f: dict[str, Any]):
    import faiss

    data = loc.read_bytes(f["path"])
    _check(hashlib.sha256(data).hexdigest(), f["sha256"], loc.display(f["path"]))
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _queries(loc: Location, trained: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    import io

    f = trained["files"]["queries"]
    data = loc.read_bytes(f["path"])
    _check(hashlib.sha256(data).hexdigest(), f["sha256"], loc.display(f["path"]))
    z = np.load(io.BytesIO(data), allow_pickle=False)
    return z["xq"], z["exclude"]


class _Neighbours:
    """The exact top-k of the tuning queries over the whole corpus, merged from the groups' top-k."""

    def __init__(self, n: int, k: int):
        self.scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), -1, dtype=np.int64)

    def merge(self, ids: np.ndarray, scores: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores], axis=1)
        i = np.concatenate([self.ids, ids], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :self.scores.shape[1]]
        self.scores, self.ids = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def _merged_neighbours(loc: Location, records: Sequence[dict[str, Any]], n: int, k: int):
    import io

    out = _Neighbours(n, k)
    for r in records:
        f = r["files"]["knn"]
        data = loc.read_bytes(f["path"])
        _check(hashlib.sha256(data).hexdigest(), f["sha256"], loc.display(f["path"]))
        z = np.load(io.BytesIO(data), allow_pickle=False)
        out.merge(z["ids"], z["scores"])
    ids = out.ids.astype(object)
    ids[out.ids < 0] = None
    out.ids = ids
    return out


def _drop_other_builds(loc: Location, key: str) -> None:
    """Partial work of a build of other inputs or settings can never be used again: remove it."""
    for info in loc.list(BUILD, recursive=True):
        rel = info.path[len(loc.path(BUILD)) + 1:]
        if rel.split("/", 1)[0] != key:
            loc.delete_path(info.path)
    if loc.fs.type_name == "local" and os.path.isdir(loc.path(BUILD)):
        for entry in os.listdir(loc.path(BUILD)):
            if entry != key and not os.listdir(loc.path(BUILD, entry)):
                os.rmdir(loc.path(BUILD, entry))


def _remove_empty_local_dirs(loc: Location, *rels: str) -> None:
    if loc.fs.type_name == "local":
        for rel in rels:
            try:
                os.rmdir(loc.path(rel))
            except OSError:  # not there, or not empty (another build's files): left alone
                pass


def _whoami() -> dict[str, Any]:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"writer": worker_name(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


@contextmanager
def _c_stdout_to_stderr():
    """Send what C code writes to stdout (faiss's printf) to stderr meanwhile: stdout is the CLI's output."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
