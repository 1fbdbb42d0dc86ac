"""Reading an output's shards for the gates, as Ray tasks: the integrity statistics, exact search, the sampled
documents, and the old side's vectors.

Each task reads a batch of committed shards (:func:`scan_batch`), each shard once and only after its file
and dead-letter file match their sha256 (:func:`reembed.repair.check_shard_files`; a path outside the output
is refused, never followed), and returns a :class:`ShardScan` of small, mergeable figures: counts, sums,
min/max, a histogram of norms, the damaged shards, and per search the exact top-k of the queries over its
shards. The driver merges them as they arrive (:meth:`ShardScan.merge`); no vector of the corpus reaches it.

Top-k merges exactly: every neighbour carries a key (its shard, then its rank in the shard's own top-k), and
a merge keeps the best scores with ties going to the smaller key, so any split of the shards into tasks,
finished in any order, gives the very result one stream over the shards in order gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.errors import StorageError, ValidationError
from reembed.indexes.exact import KnnHeap
from reembed.manifest import Manifest, ShardRefs, commits_of
from reembed.migrate.stores.base import is_store_uri
from reembed.repair import check_shard_files, map_shards
from reembed.storage import Location, list_inputs
from reembed.validation.gates import FAIL, NORM_EDGES, PASS, check_vectors

OLD_EMBEDDING = "old_embedding"
KEY_SPAN = 1 << 20  # a neighbour's merge key: shard * KEY_SPAN + its rank in the shard's own top-k
_NO_KEY = np.iinfo(np.int64).max
_COUNTS = ("rows", "non_finite", "zero", "bad_norm", "bad_dimension", "row_mismatch", "corrupt", "duplicate_ids")


@dataclass(frozen=True)
class Search:
    """Exact top-``k`` of ``queries`` over the vectors of ``column`` (shards whose column is not a
    fixed-size list without nulls, or not ``dim``-d when ``dim`` is given, are left out)."""

    column: str
    queries: np.ndarray
    k: int
    dim: int | None = None
    # A storage option's codec (:class:`reembed.validation.quantization.Codec`): its top-k by the option's
    # scores, with the exact scores beside them, instead of the exact top-k.
    codec: Any = None


@dataclass(frozen=True)
class ScanJob:
    """What a task does with each shard it reads (sent to the tasks once, through Ray's object store)."""

    dim: int
    normalized: bool = False
    norm_tol: float = 1e-3
    integrity: bool = True  # the integrity figures (off for the old side's searches)
    unique_ids: bool = True  # an id repeated inside a shard is a problem (the plan deduplicated the input)
    searches: tuple[Search, ...] = ()
    watch: frozenset = frozenset()  # ids whose presence is reported (labelled relevant documents)
    lookup: frozenset = frozenset()  # ids whose vectors of ``lookup_column`` are wanted
    lookup_column: str | None = None


@dataclass
class ShardScan:
    """The mergeable result of reading some shards (see the module's docstring)."""

    shards: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    problems: list[tuple[int, str]] = field(default_factory=list)
    damaged: list[dict[str, Any]] = field(default_factory=list)
    per_shard: list[dict[str, Any]] = field(default_factory=list)
    norm_sum: float = 0.0
    norm_count: int = 0
    norm_min: float | None = None
    norm_max: float | None = None
    norm_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(NORM_EDGES) - 1, np.int64))
    tops: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    found: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

    def merge(self, other: "ShardScan", job: ScanJob) -> "ShardScan":
        self.shards += other.shards
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.problems += other.problems
        self.damaged += other.damaged
        self.per_shard += other.per_shard
        self.norm_sum += other.norm_sum
        self.norm_count += other.norm_count
        self.norm_min = _pick(min, self.norm_min, other.norm_min)
        self.norm_max = _pick(max, self.norm_max, other.norm_max)
        self.norm_hist = self.norm_hist + other.norm_hist
        self.tops = [_merge_top(a, b, s.k) for a, b, s in zip(self._tops(job), other._tops(job), job.searches)]
        self.seen |= other.seen
        for i, (shard, v) in other.found.items():
            if i not in self.found or shard > self.found[i][0]:  # the last occurrence in shard order
                self.found[i] = (shard, v)
        return self

    def top(self, i: int, job: ScanJob) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of search ``i``, as :func:`reembed.indexes.exact.exact_knn` returns them."""
        scores, ids = self.merged(i, job)[:2]
        return scores, ids

    def merged(self, i: int, job: ScanJob) -> tuple:
        """Search ``i``'s merged result as the shards gave it: (scores, ids, keys) or, for a codec's search,
        (its scores, ids, keys, exact scores)."""
        return self._tops(job)[i] or _empty_top(job.searches[i])

    def _tops(self, job: ScanJob) -> list:
        return self.tops if self.tops else [None] * len(job.searches)


def scan_shards(loc: Location, items: ShardRefs | Iterable[tuple[int, int, dict[str, Any]]], job: ScanJob, *,
                total: int, workers: int | None = None, ray_address: str | None = None) -> ShardScan:
    """Every shard of ``items`` (:class:`ShardRefs`: each task reads its shards' records from the commit log;
    or ``(shard, commit seq, record)``) through :func:`scan_batch`, merged."""
    result = ShardScan()
    for part in map_shards(scan_batch, loc, items, job, total=total, workers=workers, ray_address=ray_address):
        result.merge(part, job)
    result.problems.sort(key=lambda p: p[0])  # stable: a shard's own problems keep their order
    result.damaged.sort(key=lambda d: d["shard"])
    result.per_shard.sort(key=lambda d: d["shard"])
    return result


def scan_batch(loc: Location, batch: ShardRefs | Sequence[tuple[int, int, dict[str, Any]]], job: ScanJob) -> ShardScan:
    """A Ray task: read each shard of ``batch`` once (checked against its sha256) and return its figures."""
    out = ShardScan()
    for shard, _, rec in commits_of(loc, batch, checked=False):  # paths checked as each file is read
        out.merge(_scan_shard(loc, shard, rec, job), job)
    return out


def integrity_gate(scan: ShardScan, dim: int, normalized: bool) -> dict[str, Any]:
    """The integrity gate from the merged figures."""
    problems = [p for _, p in scan.problems]
    c = scan.counts
    if problems:
        msg = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    else:
        msg = (f"{c['rows']} vectors in {scan.shards} shards: dimension {dim}, finite"
               + (", unit norm" if normalized else "") + " - all good")
    return {"status": FAIL if problems else PASS, "message": msg, **c, "shards": scan.shards, "problems": problems,
            "damaged": scan.damaged, "per_shard": scan.per_shard, "normalized": normalized, "dimension": dim,
            "norm": {"min": scan.norm_min, "max": scan.norm_max,
                     "mean": scan.norm_sum / scan.norm_count if scan.norm_count else None},
            "norm_histogram": {"edges": [round(float(e), 4) for e in NORM_EDGES], "counts": scan.norm_hist.tolist()}}


@dataclass(frozen=True)
class SampleJob:
    """What :func:`sample_batch` takes from each sampled shard."""

    dim: int
    old_column: str | None = None  # taken when the shard has it
    text_column: str | None = None


def sample_batch(loc: Location, batch: ShardRefs | Sequence[tuple[int, dict[str, Any], np.ndarray]], job: SampleJob,
                 want: dict[int, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """A Ray task: the rows at ``positions`` of each shard ``(shard, record, positions)`` (or of each shard of
    :class:`ShardRefs`, its record read here from the commit log, at ``want[shard]``): ids, vectors (old ones
    too, when the shard has them) and texts, plus the shard's column names. A shard that fails its checks
    gives none (the integrity gate reports it)."""
    out = []
    if isinstance(batch, ShardRefs):
        batch = [(shard, rec, want[shard]) for shard, _, rec in batch.commits(loc, checked=False)]
    for shard, rec, here in batch:
        row: dict[str, Any] = {"shard": shard, "columns": None, "ids": [], "new": None, "old": None, "texts": []}
        out.append(row)
        data, damage = check_shard_files(loc, shard, rec, hostile="raise")
        if damage is not None:
            continue
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowException):
            continue
        row["columns"] = table.column_names
        if S.ID not in table.column_names or S.EMBEDDING not in table.column_names:
            continue
        emb = table.column(S.EMBEDDING)
        if not pa.types.is_fixed_size_list(emb.type) or emb.null_count or emb.type.list_size != job.dim:
            continue
        here = here[here < table.num_rows]
        if not len(here):
            continue
        picked = table.take(pa.array(here))
        row["ids"] = picked.column(S.ID).to_pylist()
        row["new"] = S.embedding_matrix(picked.column(S.EMBEDDING))
        if job.old_column and job.old_column in table.column_names:
            row["old"] = S.embedding_matrix(picked.column(job.old_column))
        if job.text_column and job.text_column in table.column_names:
            row["texts"] = picked.column(job.text_column).to_pylist()
    return out


def committed(manifest: Manifest) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(shard, commit seq, record)`` of every committed shard, streamed from the commit log (records an
    older reembed kept in manifest.json first, seq -1)."""
    state = manifest.state()
    for name, rec in manifest.data["shards"].items():
        if int(name) not in state:
            yield int(name), -1, rec
    yield from state.iter_commits()


def committed_rows(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(shard numbers in order, rows of each) of the committed shards, from the log's arrays."""
    state = manifest.state()
    shards = state.shards
    rows = state.rows_of(shards)
    legacy = {int(k): int(v["rows"]) for k, v in manifest.data["shards"].items() if int(k) not in state}
    if legacy:
        shards = np.concatenate([shards, np.array(sorted(legacy), np.int64)])
        rows = np.concatenate([rows, np.array([legacy[s] for s in sorted(legacy)], np.int64)])
        order = np.argsort(shards, kind="stable")
        shards, rows = shards[order], rows[order]
    return shards.astype(np.int64), rows.astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# One shard


def _scan_shard(loc: Location, shard: int, rec: dict[str, Any], job: ScanJob) -> ShardScan:
    out = ShardScan(shards=1)
    data, damage = check_shard_files(loc, shard, rec, hostile="raise")
    name = loc.display(rec["path"])
    table = None
    if damage is None:
        try:
            table = pq.read_table(pa.BufferReader(data))
            missing = [c for c in (S.ID, S.EMBEDDING) if c not in table.column_names]
            if missing:
                raise StorageError(f"{name}: no {' or '.join(missing)} column; not a reembed shard")
        except (OSError, pa.ArrowException, StorageError) as e:
            msg = str(e) if isinstance(e, StorageError) else f"{name}: unreadable ({' '.join(str(e).split())[:200]})"
            damage = {"shard": shard, "path": str(rec["path"]), "reason": "unreadable", "message": msg}
            table = None
    if damage is not None:
        out.damaged.append(damage)
        out.problems.append((shard, damage["message"]))
        out.counts["corrupt"] += 1
        return out
    ids = table.column(S.ID).to_pylist()
    matrices: dict[str, np.ndarray | None] = {}  # each column decoded once, for the integrity and the searches
    if job.integrity:
        matrices[S.EMBEDDING] = _integrity(out, shard, name, rec, table, ids, job)
    if job.watch:
        out.seen.update(job.watch.intersection(ids))
    for search in job.searches:
        out.tops.append(_shard_top(shard, table, ids, search, matrices))
    if job.lookup and job.lookup_column in table.column_names:
        hit = [j for j, i in enumerate(ids) if i in job.lookup]
        if hit:
            vectors = S.embedding_matrix(table.column(job.lookup_column).take(pa.array(hit)))
            out.found.update((ids[j], (shard, np.array(v, np.float32))) for j, v in zip(hit, vectors))
    return out


def _integrity(out: ShardScan, shard: int, name: str, rec: dict[str, Any], table: pa.Table, ids: list,
               job: ScanJob) -> np.ndarray | None:
    """Add one shard's integrity figures to ``out``; returns its vectors (None if they are not a matrix)."""
    emb = table.column(S.EMBEDDING)
    matrix = None
    if table.num_rows != rec["rows"]:
        out.problems.append((shard, f"{name}: {table.num_rows} rows, the manifest says {rec['rows']}"))
        out.counts["row_mismatch"] += 1
    if not pa.types.is_fixed_size_list(emb.type):
        stats = {"rows": len(ids), "bad_dimension": len(ids), "dimension_seen": str(emb.type)}
    elif emb.null_count:
        stats = {"rows": len(ids), "non_finite": emb.null_count}
    else:
        matrix = S.embedding_matrix(emb)
        stats = check_vectors(ids, matrix, job.dim, job.normalized, job.norm_tol)
    for key in ("non_finite", "zero", "bad_norm", "bad_dimension"):
        v = stats.get(key, 0)
        out.counts[key] += v
        if v:
            what = {"non_finite": "NaN/inf or null vectors", "zero": "zero vectors",
                    "bad_norm": f"vectors whose norm is not 1 +- {job.norm_tol}",
                    "bad_dimension": f"vectors of dimension {stats.get('dimension_seen')} instead of {job.dim}"}[key]
            eg = stats.get(f"{key}_ids")
            out.problems.append((shard, f"{name}: {v} {what}" + (f" (ids {', '.join(eg)})" if eg else "")))
    repeated = len(ids) - len(set(ids))
    if repeated:
        out.counts["duplicate_ids"] += repeated
        if job.unique_ids:
            seen: set = set()
            eg = [i for i in ids if i in seen or seen.add(i)][:5]
            out.problems.append((shard, f"{name}: {repeated} ids repeated within the shard (ids {', '.join(map(str, eg))})"))
    out.counts["rows"] += len(ids)
    out.per_shard.append({"shard": shard, "rows": len(ids), **{k: stats.get(k) for k in ("norm_min", "norm_mean", "norm_max")}})
    if stats.get("norm_count"):
        out.norm_sum, out.norm_count = stats["norm_sum"], stats["norm_count"]
        out.norm_min, out.norm_max = stats["norm_min"], stats["norm_max"]
        out.norm_hist = np.asarray(stats["norm_hist"], np.int64)
    return matrix


def _shard_top(shard: int, table: pa.Table, ids: list, search: Search, matrices: dict[str, Any]):
    """The exact top-k of ``search`` over one shard, with merge keys; None where the shard has no usable
    vectors in that column. ``matrices``: columns already decoded."""
    if search.column not in table.column_names:
        return None
    col = table.column(search.column)
    if not pa.types.is_fixed_size_list(col.type) or col.null_count or (search.dim and col.type.list_size != search.dim):
        return None
    matrix = matrices.get(search.column)
    if search.codec is not None:
        matrix = matrix if matrix is not None else S.embedding_matrix(col)
        matrices[search.column] = matrix
        return search.codec.top(shard, ids, matrix, search.queries, search.k, KEY_SPAN)
    heap = KnnHeap(search.queries, search.k)
    heap.add(ids, matrix if matrix is not None else S.embedding_matrix(col))
    keys = np.where(heap.ids != None, shard * KEY_SPAN + np.arange(search.k), _NO_KEY)  # noqa: E711 (elementwise)
    return heap.scores, heap.ids, keys.astype(np.int64)


def _merge_top(a, b, k: int):
    """The top-``k`` of two keyed top-k results: best score first, ties to the smaller key."""
    if a is None or b is None:
        return a if b is None else b
    both = [np.concatenate([x, y], axis=1) for x, y in zip(a, b)]  # scores, ids, keys (, exact scores)
    order = np.lexsort((both[2], -both[0]), axis=1)[:, :k]
    return tuple(np.take_along_axis(x, order, axis=1) for x in both)


def _empty_top(search: Search):
    n = len(search.queries)
    if search.codec is not None:
        from reembed.validation.quantization import empty_top

        return empty_top(n, search.k)
    return (np.full((n, search.k), -np.inf, np.float32), np.full((n, search.k), None, object),
            np.full((n, search.k), _NO_KEY, np.int64))


def _pick(fn, a, b):
    return b if a is None else a if b is None else fn(a, b)


# ---------------------------------------------------------------------------------------------------
# The old side


class OldSide:
    """Where the old vectors come from: :meth:`lookup` (the vectors of some ids) and :meth:`knn` (exact
    top-k ids). Another reembed output is read by Ray tasks like the new one; an old store or an export
    folder is streamed by this process (one client, one reader)."""

    def __init__(self, stream: Callable[[], Iterator[tuple[list[str], np.ndarray]]] | None = None,
                 loc: Location | None = None, manifest: Manifest | None = None, column: str = S.EMBEDDING,
                 workers: int | None = None, ray_address: str | None = None):
        self.stream, self.loc, self.manifest, self.column = stream, loc, manifest, column
        self.workers, self.ray_address = workers, ray_address

    def lookup(self, ids: Sequence[str]) -> list[np.ndarray | None]:
        if self.stream is not None:
            return _lookup_vectors(self.stream(), ids)
        job = ScanJob(dim=0, integrity=False, lookup=frozenset(ids), lookup_column=self.column)
        found = self._scan(job).found
        return [found[i][1] if i in found else None for i in ids]

    def knn(self, queries: np.ndarray, k: int) -> np.ndarray:
        if self.stream is not None:
            from reembed.indexes.exact import exact_knn

            return exact_knn(queries, self.stream(), k)[1]
        job = ScanJob(dim=0, integrity=False, searches=(Search(self.column, queries, k),))
        return self._scan(job).top(0, job)[1]

    def _scan(self, job: ScanJob) -> ShardScan:
        refs = self.manifest.refs()
        return scan_shards(self.loc, refs, job, total=len(refs), workers=self.workers, ray_address=self.ray_address)


def old_side(old: str, loc: Location, workers: int | None = None, ray_address: str | None = None) -> OldSide:
    """The old store ``old``: a store URI, another reembed output, or an export folder (``id`` +
    ``old_embedding`` Parquet). A path is opened with the output's storage settings."""
    if is_store_uri(old):
        return OldSide(lambda: _store_batches(old))
    old_loc = Location.from_uri(old, loc.settings)
    other = Manifest.load(old_loc)
    if other is not None:
        return OldSide(loc=old_loc, manifest=other, workers=workers, ray_address=ray_address)
    return OldSide(lambda: _parquet_batches(old_loc))


def _parquet_batches(uri: str | Location) -> Iterator[tuple[list[str], np.ndarray]]:
    loc, files = list_inputs(uri, "*.parquet")
    for info in files:
        with loc.fs.open_input_file(info.path) as f:
            pf = pq.ParquetFile(f)
            if S.ID not in pf.schema_arrow.names or OLD_EMBEDDING not in pf.schema_arrow.names:
                raise ValidationError(f"{info.path}: an old-store export needs columns id and {OLD_EMBEDDING} "
                                      f"(has {', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(columns=[S.ID, OLD_EMBEDDING], batch_size=65_536):
                yield S.id_strings(batch.column(0))[0].to_pylist(), S.embedding_matrix(batch.column(1))


def _lookup_vectors(batches: Iterable[tuple[Sequence[str], np.ndarray]], ids: Sequence[str]) -> list[np.ndarray | None]:
    """The vectors of ``ids`` found in a stream (``None`` for ids it does not hold)."""
    want = {i: n for n, i in enumerate(ids)}
    out: list[np.ndarray | None] = [None] * len(ids)
    for block_ids, block in batches:
        for j, i in enumerate(block_ids):
            n = want.get(str(i))
            if n is not None:
                out[n] = np.array(block[j], dtype=np.float32)
    return out


def _store_batches(uri: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """Every (ids, vectors) page of an old vector store; the store is closed when the pages run out."""
    from reembed.migrate.stores import open_store

    with open_store(uri) as store:
        for b in store.batches():
            yield b.ids, b.vectors


def _old_manifest_model(old: str, settings: Any = None) -> str | None:
    if is_store_uri(old):
        return None
    m = Manifest.load(Location.from_uri(old, settings))
    return m.model["name"] if m is not None else None


def _stack(parts: list[np.ndarray], dim: int | None = None) -> np.ndarray:
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return np.zeros((0, dim or 0), np.float32)
    return np.vstack([np.atleast_2d(p) for p in parts]).astype(np.float32)
