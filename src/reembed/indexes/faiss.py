"""FAISS: one index over every committed shard, built by streaming the shards one at a time.

Inner product on L2-normalized vectors (cosine), so scores mean the same as in Qdrant. Index types:

* ``flat``  exact search (``IndexFlatIP``);
* ``hnsw``  ``HNSW{M}``, no training;
* ``ivf``   ``IVF{nlist},Flat``, or ``IVF{nlist},PQ{m}x{bits}`` re-ranked by a refine stage (``Refine(SQ8)``)
  when full vectors do not fit the memory budget (or ``pq=True``);
* ``auto``  picks one of those from the corpus size and the memory budget, as autofaiss does.

IVF indexes are trained on a uniform sample (one streaming pass), then every index is filled shard by shard.
After building, the search setting (``efSearch``, ``nprobe``, refine ``k_factor``) is tuned on sampled
vectors until recall@10 against exact search reaches the target, and stored in the index file, so a plain
``index.search`` uses it. The exact neighbours of the sampled queries are accumulated while the shards
stream past (faiss ``contrib/exhaustive_search.py``'s ``ResultHeap``), never from a second copy of the data.

Files: ``OUTPUT/indexes/faiss/index-vN.faiss`` and ``index-vN.ids.parquet`` (row i holds the document id
of vector i). Their sha256 values go into the manifest and are checked before every load: faiss's reader
trusts its input, and a corrupt file can crash the process instead of raising.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import posixpath
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.storage import Location, StorageError
from reembed.errors import ChecksumError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw")
FOLDER = "indexes/faiss"
K = 10  # recall@K is what the search setting is tuned for
_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
_NPROBE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096, 8192)
_K_FACTORS = (4, 8, 16, 32)
_VERSION_RE = re.compile(r"^index-v(\d+)\.faiss$")


@dataclass(frozen=True)
class FaissPlan:
    """What to build: the faiss factory string and the numbers behind it."""

    kind: str  # flat | hnsw | ivf
    factory: str
    dim: int
    rows: int
    nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 0
    refine: str = ""  # "" | "SQ8" | "Flat"
    hnsw_m: int = 0
    train_size: int = 0
    estimated_bytes: int = 0
    budget_bytes: int = 0

    @property
    def needs_training(self) -> bool:
        return self.kind == "ivf"


@dataclass
class FaissBuild:
    """A built index, its position -> document id map, and what was measured while building it."""

    index: Any
    ids: pa.ChunkedArray  # chunked: a single string array overflows past 2 GiB of ids
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


# ---------------------------------------------------------------------------------------------------
# Choosing the index


def plan_index(rows: int, dim: int, kind: str = "auto", memory: str | int = "16G", pq: bool | None = None,
               hnsw_m: int = 32) -> FaissPlan:
    """Pick the index for ``rows`` vectors of ``dim`` under a memory budget.

    ``auto`` follows autofaiss's ``get_optimal_index_keys_v2``: exact search under 1,000 vectors; HNSW
    under 10,000, or while an HNSW graph with M >= 8 fits the budget; IVF-Flat below a million vectors if
    it fits; IVF-PQ (with SQ8 re-ranking when that fits too) otherwise.
    """
    if kind not in KINDS:
        raise ValueError(f"FAISS index type must be one of {', '.join(KINDS)}, got {kind!r}")
    if rows < 1:
        raise ValueError("cannot build a FAISS index over 0 vectors")
    budget = parse_memory(memory)
    if kind == "auto":
        fit_m = int(((budget / (4 * rows)) - dim) / 2)  # HNSW costs about 4 * (dim + 2M) bytes per vector
        if rows < 1_000:
            kind = "flat"
        elif rows < 10_000 or fit_m >= 8:
            kind, hnsw_m = "hnsw", max(8, min(fit_m, hnsw_m))
        elif rows < 1_000_000 and _ivf_bytes(rows, dim, _nlist(rows), 0, 0, "") <= budget:
            kind, pq = "ivf", False
        else:
            kind, pq = "ivf", True
    if kind == "flat":
        return FaissPlan("flat", "Flat", dim, rows, estimated_bytes=4 * dim * rows, budget_bytes=budget)
    if kind == "hnsw":
        est = rows * (4 * dim + 8 * hnsw_m)
        return FaissPlan("hnsw", f"HNSW{hnsw_m}", dim, rows, hnsw_m=hnsw_m, estimated_bytes=est, budget_bytes=budget)
    nlist = _nlist(rows)
    if pq is None:
        pq = _ivf_bytes(rows, dim, nlist, 0, 0, "") > budget
    if not pq:
        return FaissPlan("ivf", f"IVF{nlist},Flat", dim, rows, nlist=nlist,
                         train_size=_train_size(rows, nlist, 0, dim, budget),
                         estimated_bytes=_ivf_bytes(rows, dim, nlist, 0, 0, ""), budget_bytes=budget)
    bits = 8 if rows >= 39 * 256 else 6 if rows >= 39 * 64 else 4
    choices = [m for m in (96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and m <= max(1, dim // 2)]
    pick = None
    for refine in ("SQ8", ""):  # re-ranking with 8-bit scalar codes first, if it fits
        for m in choices:
            if _ivf_bytes(rows, dim, nlist, m, bits, refine) <= budget:
                pick = (m, refine)
                break
        if pick:
            break
    if pick is None:
        pick = (choices[-1], "")
        log.warning("FAISS: even IVF-PQ%d needs %s, over the %s budget; building it anyway", pick[0],
                    human_bytes(_ivf_bytes(rows, dim, nlist, pick[0], bits, "")), human_bytes(budget))
    m, refine = pick
    factory = f"IVF{nlist},PQ{m}x{bits}" + (f",Refine({refine})" if refine else "")
    return FaissPlan("ivf", factory, dim, rows, nlist=nlist, pq_m=m, pq_bits=bits, refine=refine,
                     train_size=_train_size(rows, nlist, bits, dim, budget),
                     estimated_bytes=_ivf_bytes(rows, dim, nlist, m, bits, refine), budget_bytes=budget)


def parse_memory(value: str | int | float) -> int:
    """``"16G"``, ``"512MB"``, ``"1.5GiB"`` or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise ValueError(f"memory budget {value!r}: expected a size like 16G, 512M or 1.5GiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _nlist(rows: int) -> int:
    """Inverted lists: about 4 * sqrt(n) as a power of two (autofaiss), with at least 39 training points
    per centroid (faiss warns below that)."""
    if rows < 1_000_000:
        n = 2 ** round(math.log2(4 * math.sqrt(rows)))
    elif rows < 10_000_000:
        n = 16_384
    elif rows < 300_000_000:
        n = 65_536
    else:
        n = 2**17
    return max(1, min(n, rows // 39))


def _ivf_bytes(rows: int, dim: int, nlist: int, m: int, bits: int, refine: str) -> int:
    code = 4 * dim if m == 0 else math.ceil(m * bits / 8)
    extra = {"": 0, "SQ8": dim, "Flat": 4 * dim}[refine]
    return rows * (code + 8 + extra) + nlist * dim * 4


def _train_size(rows: int, nlist: int, bits: int, dim: int, budget: int) -> int:
    want = max(64 * nlist, 39 * 2**bits if bits else 0)
    cap = max(39 * nlist, budget // (8 * dim))  # the sample must not cost more than half the budget
    return int(min(rows, want, cap))


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ---------------------------------------------------------------------------------------------------
# Building


def sample_vectors(tables: Iterable[pa.Table], rows: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of ``size`` of the ``rows`` vectors streamed from ``tables``, normalized, and the
    sampled rows' positions in that stream (the positions they get in the index)."""
    size = min(size, rows)
    picks = np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
    parts, offset = [], 0
    for table in tables:
        n = table.num_rows
        lo, hi = np.searchsorted(picks, [offset, offset + n])
        if hi > lo:
            x = S.embedding_matrix(table.column(S.EMBEDDING))
            parts.append(x[picks[lo:hi] - offset])
        offset += n
    if offset != rows:
        raise ValueError(f"the shards hold {offset} vectors, the manifest says {rows}")
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return _normalized(sample), picks


def build(tables: Iterable[pa.Table], plan: FaissPlan, train: tuple[np.ndarray, np.ndarray] | None = None,
          recall_target: float = 0.95, queries: int = 500, seed: int = 0, use_gpu: bool | None = None) -> FaissBuild:
    """Build the index of ``plan`` from ``tables`` (each with ``id`` and ``embedding`` columns), added in order.

    ``train`` is ``sample_vectors``'s (vectors, positions), required for IVF. Returns the index with its
    search setting tuned to ``recall_target`` (recall@10 against exact search on sampled vectors).
    """
    import faiss

    t0 = time.monotonic()
    dim = plan.dim
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    gpus = faiss.get_num_gpus() if use_gpu is not False else 0
    device = "cpu"
    rng = np.random.default_rng(seed + 1)
    heap = xq = qpos = None
    if plan.needs_training:
        if train is None:
            raise ValueError(f"{plan.factory} needs a training sample (sample_vectors)")
        x_train, pos = train
        if gpus:
            # k-means on the GPU (the costly part); the index itself stays on the CPU for writing.
            faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
            device = "cuda"
        index.train(x_train)
        pick = rng.choice(len(x_train), size=min(queries, len(x_train)), replace=False)
        xq, qpos = x_train[pick], pos[pick]
        heap = faiss.ResultHeap(len(xq), K + 1, keep_max=True)
    train_s = time.monotonic() - t0

    ids: list[pa.Array] = []
    offset = 0
    for table in tables:
        x = _normalized(S.embedding_matrix(table.column(S.EMBEDDING)))
        if x.shape[1] != dim:
            raise ValueError(f"shard vectors have dimension {x.shape[1]}, the index expects {dim}")
        index.add(x)
        if heap is not None:  # exact neighbours of the sampled queries, accumulated as the shards pass
            kk = min(K + 1, len(x))
            D, I = faiss.knn(xq, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(D, I + offset)
        ids.extend(table.column(S.ID).chunks)
        offset += len(x)
    if offset == 0:
        raise ValueError("no vectors to index")
    add_s = time.monotonic() - t0 - train_s

    if plan.kind == "hnsw":  # exact neighbours straight from the graph's own flat storage
        qpos = np.sort(rng.choice(offset, size=min(queries, offset), replace=False))
        storage = faiss.downcast_index(faiss.downcast_index(index).storage)
        xq = storage.reconstruct_batch(qpos)
        _, gt = storage.search(xq, min(K + 1, offset))
    elif heap is not None:
        heap.finalize()
        gt = heap.I
    setting, recall = _tune(index, plan, xq, qpos, gt if xq is not None else None, recall_target)
    params = {
        **asdict(plan), "metric": "inner_product", "normalized": True, "device": device,
        "search": setting, "recall_at_10": recall, "recall_target": recall_target,
        "tuning_queries": 0 if xq is None else len(xq), "train_seconds": round(train_s, 3),
        "add_seconds": round(add_s, 3), "seconds": round(time.monotonic() - t0, 3),
    }
    return FaissBuild(index, pa.chunked_array(ids), params)


def _tune(index, plan: FaissPlan, xq, qpos, gt, target: float) -> tuple[dict[str, Any], float]:
    """The cheapest search setting whose recall@10 on the sampled queries reaches ``target``.

    Each query is a vector of the index itself; its own position is left out of both result lists, so the
    recall measured is the one a fresh query would see. A setting passes when the lower end of the
    estimate's ~95% interval (mean - 2 standard errors) reaches the target, not just the mean.
    Returns (setting, mean recall).
    """
    import faiss

    if plan.kind == "flat" or xq is None:
        return {}, 1.0

    def passes() -> tuple[bool, float]:
        _, found = index.search(xq, K + 1)
        per_query = _recall(found, gt, qpos)
        mean = float(per_query.mean())
        low = mean - 2 * float(per_query.std()) / math.sqrt(len(per_query))
        return low >= target, round(mean, 4)

    best: tuple[dict[str, Any], float] = ({}, 0.0)
    if plan.kind == "hnsw":
        hnsw = faiss.downcast_index(index).hnsw
        for ef in _EF_SEARCH:
            hnsw.efSearch = ef
            ok, r = passes()
            best = ({"efSearch": ef}, r)
            if ok:
                return best
    else:
        ivf = faiss.extract_index_ivf(index)
        nprobes = [p for p in _NPROBE if p < plan.nlist] + [plan.nlist]
        refine = faiss.downcast_index(index) if plan.refine else None
        for kf in _K_FACTORS if refine is not None else (None,):
            if refine is not None:
                refine.k_factor = float(kf)
            for p in nprobes:
                ivf.nprobe = p
                ok, r = passes()
                best = ({"nprobe": p, **({"k_factor": kf} if kf else {})}, r)
                if ok:
                    return best
    log.warning("FAISS %s: recall@10 %.3f at the widest search setting %s, below the target %.2f",
                plan.factory, best[1], best[0], target)
    return best


def _recall(found: np.ndarray, truth: np.ndarray, qpos: np.ndarray) -> np.ndarray:
    """Per-query recall@10 of ``found`` against ``truth``, each query's own position left out."""
    out = np.zeros(len(found))
    for row, (f, t, q) in enumerate(zip(found, truth, qpos)):
        fs = [i for i in f if i != q and i >= 0][:K]
        ts = [i for i in t if i != q and i >= 0][:K]
        out[row] = len(set(fs) & set(ts)) / len(ts) if ts else 1.0
    return out


def _normalized(x: np.ndarray) -> np.ndarray:
    """A float32 copy with rows scaled to unit length (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.size:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x


# ---------------------------------------------------------------------------------------------------
# Files


def next_version(loc: Location, recorded: Sequence[int] = ()) -> int:
    """One more than the highest version written under ``indexes/faiss/`` or recorded in the manifest."""
    seen = list(recorded)
    for info in loc.list(FOLDER):
        m = _VERSION_RE.match(posixpath.basename(info.path))
        if m:
            seen.append(int(m.group(1)))
    return max(seen, default=0) + 1


def write(loc: Location, built: FaissBuild, version: int) -> dict[str, Any]:
    """Publish ``index-vN.faiss`` and its id map under ``indexes/faiss/``; returns their manifest record."""
    import faiss

    loc.clean_tmp(FOLDER)
    name = f"index-v{version}"
    ids_bytes = _parquet_bytes(pa.table({S.ID: built.ids}))
    ids_path = f"{FOLDER}/{name}.ids.parquet"
    loc.publish(ids_bytes, ids_path)
    path = f"{FOLDER}/{name}.faiss"
    if loc.fs.type_name == "local":
        # Straight to a file: serializing to bytes first would hold a second copy of the index in memory.
        tmp = loc.path(FOLDER, "_tmp", f"{name}.faiss.{uuid.uuid4().hex[:12]}")
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        try:
            faiss.write_index(built.index, tmp)
            digest, size = _file_sha256(tmp)
            os.replace(tmp, loc.path(path))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        data = faiss.serialize_index(built.index).tobytes()
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        loc.publish(data, path)
    return {"version": version, "path": path, "bytes": size, "sha256": digest, "ids_path": ids_path,
            "ids_bytes": len(ids_bytes), "ids_sha256": hashlib.sha256(ids_bytes).hexdigest(),
            "ntotal": built.ntotal}


def load(loc: Location, record: dict[str, Any]) -> tuple[Any, pa.ChunkedArray]:
    """Read an index and its id map, refusing either if its sha256 differs from ``record``'s."""
    import faiss

    ids_bytes = loc.read_bytes(record["ids_path"])
    _check(hashlib.sha256(ids_bytes).hexdigest(), record["ids_sha256"], loc.display(record["ids_path"]))
    ids = pq.read_table(pa.BufferReader(ids_bytes)).column(S.ID)
    if loc.fs.type_name == "local":
        local = loc.path(record["path"])
        _check(_file_sha256(local)[0], record["sha256"], loc.display(record["path"]))
        index = faiss.read_index(local)
    else:
        data = loc.read_bytes(record["path"])
        _check(hashlib.sha256(data).hexdigest(), record["sha256"], loc.display(record["path"]))
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.ntotal != len(ids):
        raise ChecksumError(f"{loc.display(record['path'])}: {index.ntotal} vectors but {len(ids)} ids")
    return index, ids


def _check(actual: str, expected: str, where: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"{where}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}... (corrupt or "
            "replaced); not loading it. Rebuild with `reembed index`."
        )


def _file_sha256(path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Searching


class Searcher:
    """Search an output's FAISS index by text (embedded with the job's model on the CPU) or by vectors.

    >>> s = Searcher("out/")                       # doctest: +SKIP
    >>> s.search("how do cats sleep", k=5)          # doctest: +SKIP
    [[('doc-17', 0.82), ...]]
    """

    def __init__(self, output_uri: str, version: int | None = None):
        from reembed.indexes import build as stage
        from reembed.manifest import Manifest

        self.loc = Location.from_uri(output_uri)
        manifest = Manifest.load(self.loc)
        if manifest is None:
            raise StorageError(f"{output_uri}: no manifest.json here (not a reembed output)")
        self.record = stage.faiss_record(manifest, version)
        self.model = manifest.model
        self.index, self.ids = load(self.loc, self.record)
        self._embedder = None

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest documents (id, cosine score) of each query text, best first."""
        texts = [queries] if isinstance(queries, str) else list(queries)
        return self.search_vectors(self._embed(texts), k)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        xq = _normalized(np.atleast_2d(vectors))
        if xq.shape[1] != self.index.d:
            raise ValueError(f"query vectors have dimension {xq.shape[1]}, the index has {self.index.d}")
        D, I = self.index.search(xq, k)
        out = []
        for drow, irow in zip(D, I):
            keep = irow >= 0
            ids = self.ids.take(pa.array(irow[keep])).to_pylist()
            out.append(list(zip(ids, (float(d) for d in drow[keep]))))
        return out

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from reembed.embed import Embedder, query_backend

            m = self.model
            # A hub model is pinned to the revision the job used; a local folder has no revisions.
            local = os.path.isdir(os.path.expanduser(m["name"]))
            revision = None if local or m.get("revision") in (None, "unknown") else m["revision"]
            self._embedder = Embedder({"name": m["name"], "revision": revision, "device": "cpu", "dtype": "float32",
                                       "max_seq_length": m.get("max_seq_length"), "backend": query_backend(m)})
            if self._embedder.dim != self.index.d:
                raise ValueError(f"model {m['name']} gives {self._embedder.dim}-d vectors, the index holds {self.index.d}-d")
        vectors, _ = self._embedder.embed(texts)
        return vectors
