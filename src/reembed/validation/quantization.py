"""What storing the vectors smaller costs in recall: one row per option, measured on the output's own vectors.

    reembed validate OUTPUT --quantization

Each option is a codec applied to every committed shard inside the validation's one pass over the shards (the
shard tasks of :mod:`.integrity`), never to a copy of the corpus in one process:

=================  =====================================  ===============================================
option             bytes per vector (``d`` dimensions)    how its recall@10 is measured
=================  =====================================  ===============================================
float32 (exact)    4d                                     the reference: exact cosine top-10
float16 shards     2d                                     exact search of the float16-rounded vectors
FAISS SQ8          d (faiss ``sa_code_size``)             faiss's trained SQ8 codec: search of its decoded
                                                          vectors, which is what ``IndexScalarQuantizer`` does
FAISS PQ{m}x{b}    m*b/8                                  the same with faiss's trained PQ codec (``IndexPQ``)
Qdrant int8        d in RAM (+ the originals on disk)     Qdrant's scheme emulated: int8 codes between the
                                                          0.99-quantile bounds, top ``2 * 10`` candidates by
                                                          them, rescored with the float32 vectors
Qdrant binary      ceil(d / 8) in RAM (+ originals)       one sign bit a dimension, top ``2 * 10`` by
                                                          agreeing bits, rescored with the float32 vectors
=================  =====================================  ===============================================

The Qdrant rows are emulated, not searched in Qdrant: embedded Qdrant (qdrant-client's local mode) stores the
quantization setting and searches exactly, so it cannot measure it; against a server the collection's own
figures may differ slightly (Qdrant keeps per-vector corrections this emulation leaves out).

The FAISS codecs are trained once, on a uniform sample of the output's vectors (:data:`TRAIN` at most; all of
them for a smaller output), and travel to the shard tasks as faiss's serialized bytes. The queries are the
validation's own (sampled documents, labelled and text queries); a sampled document is left out of its own
results. Each task keeps, per option, the top candidates of its shards by the option's scores, in shard and
row order for ties, with their exact scores; the driver merges them by key as every other top-k of the
validation, so the table is the same for any number of tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from reembed.indexes.exact import normalize

K = 10  # the table's recall@K
TRAIN = 10_000  # vectors the FAISS codecs are trained on, at most (PQ's 8-bit k-means wants 39 x 256)
OVERSAMPLING = 2.0  # Qdrant's rescoring: candidates fetched per result (index.qdrant: QuantizationSearchParams)
INT8_QUANTILE = 0.99


@dataclass(frozen=True)
class Codec:
    """One row of the table: how the option scores a query against stored vectors, and what a vector costs."""

    option: str  # "float32" | "float16" | "faiss_sq8" | "faiss_pq" | "qdrant_int8" | "qdrant_binary"
    label: str
    bytes_per_vector: int
    rescore: bool = False  # candidates by the codes, re-ranked by the float32 vectors (Qdrant)
    faiss_codec: bytes = b""  # a trained faiss index, serialized (its sa_encode / sa_decode are the codec)
    bounds: tuple[float, float] = (0.0, 0.0)  # int8: the quantile bounds
    how: str = ""
    stored: bool = False  # the shards already hold the vectors this way: nothing more is lost

    def scores(self, q: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The option's scores of unit queries ``q`` against unit vectors ``x`` (float32, one row each)."""
        return q @ self.decode(x).T if self.option != "qdrant_binary" else _signs(q) @ _signs(x).T

    def decode(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the option stores it, decoded back to float32 (binary has no decoding: see :meth:`scores`)."""
        if self.stored:
            return x
        if self.option == "float16":
            return x.astype(np.float16).astype(np.float32)
        if self.faiss_codec:
            index = _faiss_codec(self.faiss_codec)
            return index.sa_decode(index.sa_encode(np.ascontiguousarray(x, np.float32)))
        if self.option == "qdrant_int8":
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
        best first, ties in row order (the merge keys follow it)."""
        x = normalize(matrix)
        s = self.scores(queries, x)
        order = _top_stable(s, depth)
        exact = np.take_along_axis(queries @ x.T, order, axis=1) if len(order) else np.zeros(order.shape, np.float32)
        found = np.asarray(ids, dtype=object)[order] if len(ids) else np.full(order.shape, None, object)
        keys = shard * key_span + np.broadcast_to(np.arange(order.shape[1]), order.shape)
        return (np.take_along_axis(s, order, axis=1).astype(np.float32), found, keys.astype(np.int64),
                exact.astype(np.float32))


def codecs(train: np.ndarray, dim: int, stored_dtype: str = "float32") -> list[Codec]:
    """The table's options, the FAISS ones trained on ``train`` (unit vectors, one row each)."""
    import faiss

    from reembed.indexes.faiss import pq_shape

    train = normalize(train)
    sq8 = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq8.train(train)
    m, bits = pq_shape(dim, len(train))
    pq = faiss.IndexPQ(dim, m, bits, faiss.METRIC_INNER_PRODUCT)
    pq.do_polysemous_training = False
    pq.train(train)
    qs = (1.0 - INT8_QUANTILE) / 2
    lo, hi = (float(v) for v in np.quantile(train.ravel(), [qs, 1.0 - qs])) if len(train) else (-1.0, 1.0)
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
        Codec("qdrant_int8", "Qdrant int8 + rescore", dim, rescore=True, bounds=(lo, hi),
              how=f"emulated: int8 between the {INT8_QUANTILE} quantile bounds, {OVERSAMPLING:g}x candidates "
                  "rescored with float32 (originals on disk)"),
        Codec("qdrant_binary", "Qdrant binary + rescore", math.ceil(dim / 8), rescore=True,
              how=f"emulated: 1 sign bit a dimension, {OVERSAMPLING:g}x candidates rescored with float32 "
                  "(originals on disk)"),
    ]


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
    return {"k": k, "queries": len(exclude), "reference": codec_list[0].label, "options": rows,
            "note": "recall@10 against float32 exact search on the same queries; the Qdrant rows emulate its scheme "
                    "(embedded Qdrant searches exactly)"}


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
