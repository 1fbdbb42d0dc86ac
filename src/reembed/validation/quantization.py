"""What storing the vectors smaller costs in recall: one row per option, measured on the output's own vectors.

    reembed validate OUTPUT --quantization

Each option is a codec applied to every committed shard inside the validation's one pass over the shards (the
shard tasks of :mod:`.integrity`), never to a copy of the corpus in one process:

=====================  ===================================  ============================================
option                 bytes per vector (``d`` dimensions)  how its recall@10 is measured
=====================  ===================================  ============================================
float32 (exact)        4d                                   the reference: exact cosine top-10
float16 shards         2d                                   exact search of the float16-rounded vectors
FAISS SQ8              d (faiss ``sa_code_size``)           faiss's trained SQ8 codec: search of its
                                                            decoded vectors, which is what
                                                            ``IndexScalarQuantizer`` does
FAISS PQ{m}x{b}        m*b/8                                the same with faiss's trained PQ codec
                                                            (``IndexPQ``)
Qdrant int8 + rescore  16 * ceil(d / 16) + 4 in RAM         Qdrant's own engine (Qdrant Edge) scores the
                       (+ the originals on disk)            int8 codes; the top ``2 * 10`` by its scores
                                                            rescored with the originals
Qdrant int8            the same                             the top 10 by Qdrant's scores of the codes
Qdrant binary          16 * ceil(d / 128) in RAM            one bit a dimension (in 128-bit words),
(rescored or not)      (+ the originals on disk)            scored by Qdrant Edge, rescored or not
=====================  ===================================  ============================================

**The Qdrant rows come from Qdrant's engine** when ``qdrant-edge-py`` (Qdrant's Rust engine in-process) is
importable: each shard task puts each shard's vectors into a Qdrant Edge shard of that quantization in a local
temporary folder (removed after the shard), has the optimizer build the quantized segment (indexing threshold
1 KB, HNSW ``m=0``: no graph, so the search is a full scan of the quantized vectors and the figure is the
quantization's loss alone, as for the FAISS rows; an HNSW graph's own loss is what the ann_recall gate
measures), and searches it with ``quantization: ignore=false, rescore=false``: Qdrant's own scores of the codes.
The shards' candidates merge by those scores; the rescored rows then rescore the top ``2 * 10`` with the float32
vectors, which is what Qdrant does (``rescore=true, oversampling=2``, as :func:`reembed.indexes.qdrant.search_params`
asks a server) in a collection holding the whole output in one segment (the tests check it against Qdrant Edge's
own rescoring). Qdrant rescores per segment, so a collection of many small segments rescores more candidates and
recalls more (bench/RESULTS.md measures how much); one segment is the conservative figure, and the one a table
of this output's options can give whatever its shards. Binary codes score the same in any segment; int8 bounds
are per shard here, as per segment in Qdrant. A shard of under 1 KB of vectors is searched exactly, as Qdrant
searches a segment under its indexing threshold. Embedded Qdrant (qdrant-client's local mode) would not do: it
stores the quantization setting and searches exactly. Without ``qdrant-edge-py`` the rows are the numpy
emulation of Qdrant's scheme (int8 codes between the 0.99-quantile bounds of the training sample, one sign bit a
dimension, scored in numpy, then the same merge), each row's ``how`` saying which.

The FAISS codecs are trained once, on a uniform sample of the output's vectors (:data:`TRAIN` at most; all of
them for a smaller output), and travel to the shard tasks as faiss's serialized bytes. The queries are the
validation's own (sampled documents, labelled and text queries); a sampled document is left out of its own
results. Each task keeps, per option, the top candidates of its shards by the option's scores, in shard and
row order for ties (Qdrant's order within a shard), with their exact scores; the driver merges them by key as
every other top-k of the validation, so the table is the same for any number of tasks.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from reembed.errors import ValidationError
from reembed.indexes.exact import normalize
from reembed.indexes.qdrant import INT8_QUANTILE, OVERSAMPLING  # what reembed builds and asks a quantized collection

log = logging.getLogger(__name__)

K = 10  # the table's recall@K
TRAIN = 10_000  # vectors the FAISS codecs are trained on, at most (PQ's 8-bit k-means wants 39 x 256)
EDGE_PACKAGE = "qdrant-edge-py"  # Qdrant's engine in-process: the Qdrant rows' measurement when installed
EDGE_INDEXING_KB = 1  # the Edge optimizer's indexing threshold: a segment of 1 KB of vectors or more is quantized
EDGE_BATCH = 2_048  # points one Edge upsert carries (as Python floats: kept small)


@dataclass(frozen=True)
class Codec:
    """One row of the table: how the option scores a query against stored vectors, and what a vector costs."""

    option: str  # float32 | float16 | faiss_sq8 | faiss_pq | qdrant_int8[_no_rescore] | qdrant_binary[_no_rescore]
    label: str
    bytes_per_vector: int
    rescore: bool = False  # candidates by the codes, re-ranked by the float32 vectors (Qdrant)
    faiss_codec: bytes = b""  # a trained faiss index, serialized (its sa_encode / sa_decode are the codec)
    qdrant: str = ""  # Qdrant's quantization of the row: "int8" | "binary"
    engine: str = ""  # Qdrant rows: the qdrant-edge-py version that scores them ("" for the numpy emulation)
    keep: bool = False  # engine: the next codec searches the same Edge shard, so it stays open after this one
    bounds: tuple[float, float] = (0.0, 0.0)  # emulated int8: the quantile bounds
    how: str = ""
    stored: bool = False  # the shards already hold the vectors this way: nothing more is lost

    def scores(self, q: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The option's scores of unit queries ``q`` against unit vectors ``x`` (float32, one row each), by
        numpy (every option but the Qdrant rows that Qdrant Edge searches)."""
        return q @ self.decode(x).T if self.qdrant != "binary" else _signs(q) @ _signs(x).T

    def decode(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the option stores it, decoded back to float32 (binary has no decoding: see :meth:`scores`)."""
        if self.stored:
            return x
        if self.option == "float16":
            return x.astype(np.float16).astype(np.float32)
        if self.faiss_codec:
            index = _faiss_codec(self.faiss_codec)
            return index.sa_decode(index.sa_encode(np.ascontiguousarray(x, np.float32)))
        if self.qdrant == "int8":
            lo, hi = self.bounds
            codes = np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0)
            return (lo + codes * ((hi - lo) / 255.0)).astype(np.float32)
        return x

    def depth(self, k: int) -> int:
        """Candidates a shard keeps per query: k (or the rescoring's candidates), plus one for the query's own
        document."""
        return (math.ceil(OVERSAMPLING * k) if self.rescore else k) + 1

    def top(self, shard: int, ids: list, matrix: np.ndarray, queries: np.ndarray, depth: int, key_span: int):
        """One shard's candidates: (the option's scores, ids, merge keys, exact scores), ``depth`` per query,
        best first, ties in row order (Qdrant's order for the Qdrant Edge rows; the merge keys follow it)."""
        x = normalize(matrix)
        if self.engine:
            s, order = _edge_search(self, shard, x, queries, depth)
        else:
            s = self.scores(queries, x)
            order = _top_stable(s, depth)
            s = np.take_along_axis(s, order, axis=1)
        found = np.asarray(list(ids) + [None], dtype=object)[order]  # row -1 (none found): None
        exact = np.where(order >= 0, np.einsum("qd,qkd->qk", queries, x[np.maximum(order, 0)]), -np.inf) \
            if order.size else np.zeros(order.shape, np.float32)  # the candidates' own dot products only
        keys = shard * key_span + np.broadcast_to(np.arange(order.shape[1]), order.shape)
        return s.astype(np.float32), found, keys.astype(np.int64), exact.astype(np.float32)


def codecs(train: np.ndarray, dim: int, stored_dtype: str = "float32", engine: bool | None = None) -> list[Codec]:
    """The table's options, the FAISS ones trained on ``train`` (unit vectors, one row each). ``engine``: the
    Qdrant rows by Qdrant Edge (True: refuse without it), by the numpy emulation (False), or by Qdrant Edge
    when it is installed (None)."""
    import faiss

    from reembed.indexes.faiss import pq_shape

    train = normalize(train)
    sq8 = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq8.train(train)
    m, bits = pq_shape(dim, len(train))
    pq = faiss.IndexPQ(dim, m, bits, faiss.METRIC_INNER_PRODUCT)
    pq.do_polysemous_training = False
    pq.train(train)
    stored16 = stored_dtype == "float16"
    return [
        Codec("float32", "float32, exact" + (" (the stored float16 vectors: no float32 kept)" if stored16 else ""),
              (2 if stored16 else 4) * dim, how="the reference: exact cosine search"),
        Codec("float16", "float16 shards" + (" (stored)" if stored16 else ""), 2 * dim, stored=stored16,
              how="the stored float16 vectors: the reference itself" if stored16 else
              "exact search of the float16-rounded vectors"),
        Codec("faiss_sq8", "FAISS SQ8", int(sq8.sa_code_size()), faiss_codec=_serialize(sq8),
              how=f"faiss SQ8 codec trained on {len(train):,} vectors (IndexScalarQuantizer)"),
        Codec("faiss_pq", f"FAISS PQ{m}x{bits}", int(pq.sa_code_size()), faiss_codec=_serialize(pq),
              how=f"faiss PQ{m}x{bits} codec trained on {len(train):,} vectors (IndexPQ)"),
        *qdrant_codecs(train, dim, engine),
    ]


def qdrant_codecs(train: np.ndarray, dim: int, engine: bool | None = None) -> list[Codec]:
    """The Qdrant rows: int8 and binary, each rescored and not, searched by Qdrant Edge where it is installed
    (see :func:`codecs` for ``engine``), else emulated with int8 bounds from ``train``."""
    version = edge_version() if engine is not False else ""
    if engine and not version:
        raise ValidationError(f"{EDGE_PACKAGE} is not installed, so the Qdrant rows cannot be measured by Qdrant's "
                              f"engine; pip install {EDGE_PACKAGE}==0.9.0 (or let them be emulated)")
    if not version:
        log.info("quantization: %s is not installed; the Qdrant rows are emulated in numpy", EDGE_PACKAGE)
    qs = (1.0 - INT8_QUANTILE) / 2
    lo, hi = (float(v) for v in np.quantile(train.ravel(), [qs, 1.0 - qs])) if len(train) else (-1.0, 1.0)
    scheme = {"int8": f"int8 codes between the {INT8_QUANTILE} quantile bounds",
              "binary": "1 sign bit a dimension"}
    out = []
    for kind in ("int8", "binary"):
        for rescore in (True, False):
            then = (f"its top {math.ceil(OVERSAMPLING * K)} over the whole output rescored with the float32 "
                    "originals (on disk), as Qdrant does in one segment" if rescore else "ranked by those scores")
            how = (f"Qdrant Edge {version} engine: {scheme[kind]} scored by Qdrant (full scan), {then}"
                   if version else f"emulated in numpy ({EDGE_PACKAGE} not used): {scheme[kind]}, {then}")
            out.append(Codec(f"qdrant_{kind}" + ("" if rescore else "_no_rescore"),
                             f"Qdrant {kind} " + ("+ rescore" if rescore else "(no rescore)"),
                             qdrant_bytes(kind, dim), rescore=rescore, qdrant=kind, engine=version, keep=rescore,
                             bounds=(lo, hi) if kind == "int8" else (0.0, 0.0), how=how))
    return out


def qdrant_bytes(kind: str, dim: int) -> int:
    """Bytes a vector's codes take in Qdrant's RAM (the originals stay on disk): int8, one byte a dimension
    padded to 16 plus a float32 correction; binary, one bit a dimension in 128-bit words (Qdrant Edge 0.9.0's
    quantized storage, checked against its files by the tests)."""
    return 16 * math.ceil(dim / 16) + 4 if kind == "int8" else 16 * math.ceil(dim / 128)


def edge_version() -> str:
    """The installed qdrant-edge-py's version, or "" when it cannot be imported."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import qdrant_edge  # noqa: F401

        return version(EDGE_PACKAGE)
    except (ImportError, PackageNotFoundError):
        return ""


def table(codec_list: Sequence[Codec], tops: Sequence[tuple], exclude: Sequence[Any], k: int) -> dict[str, Any]:
    """The report's ``quantization`` section from the merged candidates of every codec (``tops[i]`` for
    ``codec_list[i]``; the first codec is the float32 reference). ``exclude``: per query, the id of the
    document that is the query (None for text queries)."""
    ref = results(codec_list[0], tops[0], exclude, k)
    rows = []
    for codec, top in zip(codec_list, tops):
        got = results(codec, top, exclude, k)
        per = [len(set(a) & set(b)) / len(b) for a, b in zip(got, ref) if b]
        rows.append({"option": codec.option, "label": codec.label, "bytes_per_vector": codec.bytes_per_vector,
                     "compression": round(codec_list[0].bytes_per_vector / codec.bytes_per_vector, 2),
                     "recall_at_10": round(float(np.mean(per)), 4) if per else None, "rescore": codec.rescore,
                     "how": codec.how})
    engines = {c.engine for c in codec_list if c.qdrant}
    qdrant = (f"the Qdrant rows scored by Qdrant's engine (Qdrant Edge {', '.join(sorted(engines))}), rescored as "
              "in one segment" if engines - {""} else "the Qdrant rows emulate its scheme (qdrant-edge-py not "
              "installed; embedded Qdrant searches exactly)")
    return {"k": k, "queries": len(exclude), "reference": codec_list[0].label, "options": rows,
            "note": f"recall@10 against float32 exact search on the same queries; {qdrant}"}


def results(codec: Codec, top: tuple, exclude: Sequence[Any], k: int) -> list[list[Any]]:
    """Per query, the ``k`` ids the option returns: its candidates without the query's own document, re-ranked
    by exact score when it rescores."""
    scores, ids, _, exact = top
    out = []
    for row in range(len(ids)):
        cand = [(i, float(e)) for i, e in zip(ids[row], exact[row]) if i is not None and i != exclude[row]]
        if codec.rescore:
            cand = sorted(cand[:math.ceil(OVERSAMPLING * k)], key=lambda c: -c[1])
        out.append([i for i, _ in cand[:k]])
    return out


def empty_top(n: int, depth: int):
    return (np.full((n, depth), -np.inf, np.float32), np.full((n, depth), None, object),
            np.full((n, depth), np.iinfo(np.int64).max, np.int64), np.full((n, depth), -np.inf, np.float32))


# ---------------------------------------------------------------------------------------------------


def _edge_search(codec: Codec, shard: int, x: np.ndarray, queries: np.ndarray, depth: int):
    """(Qdrant's scores of the codes, the rows they score (-1: none)) of ``queries`` against one shard's unit
    vectors ``x``, ``depth`` per query in Qdrant's order, from a Qdrant Edge shard of ``codec.qdrant``
    quantization. Never rescored here: Qdrant rescores per segment, and these candidates are rescored once
    merged over the whole output (:func:`results`)."""
    import qdrant_edge as qe

    if not len(x) or not len(queries):
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    edge = _EDGE.open(codec.qdrant, shard, x)
    try:
        params = qe.SearchParams(quantization=qe.QuantizationSearchParams(ignore=False, rescore=False))
        hits = edge.query_batch(qe.QueryBatchRequest([qe.QueryRequest(limit=depth, query=qe.Query.Nearest(q),
                                                                      params=params) for q in queries.tolist()]))
    finally:
        if not codec.keep:
            _EDGE.close()
    width = min(depth, len(x))
    scores = np.full((len(queries), width), -np.inf, np.float32)
    rows = np.full((len(queries), width), -1, np.int64)
    for r, found in enumerate(hits):
        for c, p in enumerate(found[:width]):
            scores[r, c], rows[r, c] = p.score, p.id
    return scores, rows


class _EdgeShards:
    """The one Qdrant Edge shard a process holds: one shard's vectors under one quantization, in a local
    temporary folder, reused by the next codec of the same quantization and removed when another is opened,
    on :meth:`close`, or at exit."""

    def __init__(self):
        self.key: tuple | None = None
        self.edge = None
        self.folder: str | None = None

    def open(self, kind: str, shard: int, x: np.ndarray):
        key = (kind, shard, x.shape, hashlib.blake2b(np.ascontiguousarray(x).data, digest_size=16).hexdigest())
        if key != self.key:
            self.close()
            self.folder = tempfile.mkdtemp(prefix="reembed-qdrant-edge-")
            self.edge = _build_edge(kind, x, self.folder, shard)
            self.key = key
        return self.edge

    def close(self) -> None:
        if self.edge is not None:
            self.edge.close()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.key = self.edge = self.folder = None


_EDGE = _EdgeShards()
atexit.register(_EDGE.close)


def _build_edge(kind: str, x: np.ndarray, folder: str, shard: int):
    """A Qdrant Edge shard at ``folder`` holding ``x`` (point id = row) with ``kind`` quantization, as reembed
    configures a collection (:func:`reembed.indexes.qdrant.quantization_config`), its quantized segment built
    by the optimizer. No HNSW graph (``m=0``): searches are full scans of the quantized vectors."""
    import qdrant_edge as qe

    quantization = (qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=INT8_QUANTILE, always_ram=True)
                    if kind == "int8" else qe.BinaryQuantizationConfig(always_ram=True))
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=x.shape[1], distance=qe.Distance.Cosine, quantization_config=quantization),
        hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=1),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=EDGE_INDEXING_KB, default_segment_number=1),
        max_search_threads=1, wal_enabled=False)
    edge = qe.EdgeShard.create(folder, config)
    for lo in range(0, len(x), EDGE_BATCH):
        part = x[lo:lo + EDGE_BATCH].tolist()
        edge.update(qe.UpdateOperation.upsert_points([qe.Point(lo + i, v) for i, v in enumerate(part)]))
    edge.optimize()
    indexed = edge.info().indexed_vectors_count
    if x.nbytes >= EDGE_INDEXING_KB * 1024 and indexed < len(x):
        edge.close()
        raise ValidationError(f"shard {shard}: Qdrant Edge quantized {indexed} of its {len(x)} vectors, so its "
                              f"Qdrant {kind} rows would be exact figures; install {EDGE_PACKAGE}==0.9.0, the "
                              "version this measurement is built for")
    return edge


def _signs(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, 1.0, -1.0).astype(np.float32)


def _top_stable(s: np.ndarray, depth: int) -> np.ndarray:
    """Per row, the columns of the ``depth`` highest scores, best first, ties in column order."""
    n = s.shape[1]
    if n <= depth:
        return np.argsort(-s, axis=1, kind="stable")
    kth = -np.partition(-s, depth - 1, axis=1)[:, depth - 1]
    out = np.empty((s.shape[0], depth), np.int64)
    for r in range(s.shape[0]):
        cand = np.flatnonzero(s[r] >= kth[r])
        out[r] = cand[np.argsort(-s[r, cand], kind="stable")[:depth]]
    return out


def _serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


_CODECS: dict[int, Any] = {}


def _faiss_codec(blob: bytes):
    """The faiss index behind ``blob``, deserialized once per process."""
    import faiss

    key = hash(blob)
    if key not in _CODECS:
        _CODECS[key] = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    return _CODECS[key]
