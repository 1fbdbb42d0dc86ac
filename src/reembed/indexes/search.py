"""Searching an output: the one query path (text -> vector), the one exact kNN, and the ANN adapters.

``reembed search``, the validation gate's ANN-recall figure and ``reembed query`` all embed a query the
same way (:func:`text_embedder` with the output's model, revision, sequence length and backend, on the
CPU) and search the same FAISS file through the same id map (:class:`Searcher`), so the recall the gate
reports is the recall ``search`` gives.

Exact search (:func:`exact_knn`, from :mod:`reembed.indexes.exact`) streams ``(ids, vectors)`` blocks and
keeps a running top-k, so memory holds one block and the heap, never the corpus. The FAISS build tunes its
search setting with the same heap and the same :func:`recall` as the gate.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from reembed import schema as S
from reembed.embed import Embedder, query_backend
from reembed.errors import ManifestError, UsageError, ValidationError
from reembed.indexes import faiss as faiss_index
from reembed.indexes.build import faiss_record, shard_tables
from reembed.indexes.exact import DEPTH, TIE, Batches, KnnHeap, exact_knn, normalize, recall  # noqa: F401 (re-exported)
from reembed.manifest import Manifest
from reembed.storage import Location

log = logging.getLogger(__name__)

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def search(output: str | Location, queries: str | Sequence[str], k: int = 10, version: int | None = None,
           model: str | None = None) -> list[list[tuple[str, float]]]:
    """The ``k`` nearest documents (id, cosine) of each query text in the output's FAISS index, best first:
    what ``reembed search`` prints. Opens the index each call; hold a :class:`Searcher` to search often."""
    return Searcher(output, version=version, model=model).search([queries] if isinstance(queries, str) else queries, k)


class Searcher:
    """Text or vector search over an output's FAISS index (the newest finished build, or ``version``).

    >>> s = Searcher("out/")                                  # doctest: +SKIP
    >>> s.search(["how do cats sleep"], k=5)[0][0]              # doctest: +SKIP
    ('doc-17', 0.82)
    """

    def __init__(self, output: str | Location, version: int | None = None, model: str | None = None,
                 device: str = "cpu"):
        self.loc = output if isinstance(output, Location) else Location.from_uri(output)
        manifest = Manifest.load(self.loc)
        if manifest is None:
            raise ManifestError(f"{self.loc.display('manifest.json')}: not found; not a reembed output")
        self.manifest = manifest
        self.record = faiss_record(manifest, version)
        self.index, self.ids = faiss_index.read_index(self.loc, self.record)
        self.model_name = model
        self.device = device

    def search(self, queries: Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest documents (id, cosine) of each query text, best first: what ``reembed search``
        prints and what the validation gate measures."""
        return self.search_vectors(self.embed(queries), k)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return query_embedder(self.manifest.model, self.model_name, self.device, expect_dim=self.index.d)(list(texts))

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        check_k(k)
        xq = normalize(np.atleast_2d(vectors))
        if xq.shape[1] != self.index.d:
            raise ValidationError(f"query vectors have dimension {xq.shape[1]}, the index {self.record['path']} "
                                  f"holds {self.index.d}-d ones")
        D, I = self.index.search(xq, k)
        out = []
        for drow, irow in zip(D, I):
            keep = irow >= 0
            ids = self.ids.take(irow[keep])  # reads only the id map's row groups holding these rows
            out.append(list(zip(ids, (float(d) for d in drow[keep]))))
        return out

    def as_search(self) -> Search:
        """This index as a :data:`Search` callable (vectors in, (scores, ids) out)."""
        return lambda queries, k: _as_arrays(self.search_vectors(queries, k), k)

    def lookup(self, ids: Sequence[str], column: str) -> dict[str, Any]:
        """``column`` (a passthrough column such as ``text``) of the documents ``ids``, read from the shards."""
        want, found = set(ids), {}
        if column not in self.manifest.plan.get("passthrough", []):
            have = ", ".join(self.manifest.plan.get("passthrough", [])) or "none"
            raise UsageError(f"--show {column}: not a passthrough column of {self.loc.uri} (passthrough: {have})")
        for table in shard_tables(self.loc, self.manifest, [S.ID, column]):
            for i, v in zip(table.column(S.ID).to_pylist(), table.column(column).to_pylist()):
                if i in want:
                    found[i] = v
            if len(found) == len(want):
                break
        return found


def check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UsageError(f"-k {k}: the number of results must be a whole number >= 1")


# ---------------------------------------------------------------------------------------------------
# The query path


_EMBEDDERS: dict[tuple, Any] = {}


def query_embedder(model_info: dict[str, Any], model: str | None = None, device: str = "cpu",
                   expect_dim: int | None = None) -> Callable[[list[str]], np.ndarray]:
    """``texts -> vectors`` in an output's space: its model (or ``model``, the same one stored elsewhere),
    pinned to the recorded hub revision, its max_seq_length, and the backend its dtype needs."""
    name = model or model_info["name"]
    local = os.path.isdir(os.path.expanduser(str(name)))
    rev = model_info.get("revision")
    revision = None if model or local or rev in (None, "unknown") or str(rev).startswith("sha256:") else rev
    return text_embedder(name, model_info.get("max_seq_length"), device, expect_dim=expect_dim,
                         backend=query_backend(model_info), revision=revision)


def text_embedder(name: str, max_seq_length: int | None, device: str, expect_dim: int | None = None,
                  backend: str = "auto", revision: str | None = None) -> Callable[[list[str]], np.ndarray]:
    """A cached ``texts -> vectors`` function for a model (one load per process); onnx-int8 runs on CPU."""
    if backend == "onnx-int8":
        device = "cpu"
    key = (str(name), max_seq_length, device, backend, revision)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder({"name": str(name), "device": device, "max_seq_length": max_seq_length,
                                    "backend": backend, "revision": revision})
    emb = _EMBEDDERS[key]
    if expect_dim is not None and emb.dim != expect_dim:
        raise ValidationError(f"model {name} gives {emb.dim}-d vectors but the output holds {expect_dim}-d ones; "
                              "pass the output's own model with --model")
    return lambda texts: emb.embed(list(texts))[0]


# ---------------------------------------------------------------------------------------------------
# ANN adapters: plain callables ``search(queries (n, d) float32, k) -> (scores, ids)``


def faiss_searcher(index: Any, ids: Sequence[str], nprobe: int | None = None, ef_search: int | None = None) -> Search:
    """A :data:`Search` over a FAISS index (an object, or a path / URI read with
    :func:`reembed.indexes.faiss.read_index_file`); ``ids[label]`` is the document id of label ``label``.
    Queries are L2-normalized first, so an inner-product index over normalized vectors ranks by cosine."""
    import faiss

    if isinstance(index, (str, Path)):
        index = faiss_index.read_index_file(str(index))
    ids_arr = np.asarray(list(ids), dtype=object)
    if nprobe is not None or ef_search is not None:
        params = faiss.ParameterSpace()
        if nprobe is not None:
            params.set_index_parameter(index, "nprobe", nprobe)
        if ef_search is not None:
            params.set_index_parameter(index, "efSearch", ef_search)

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, labels = index.search(normalize(queries), k)
        out = np.full(labels.shape, None, dtype=object)
        ok = (labels >= 0) & (labels < len(ids_arr))
        out[ok] = ids_arr[labels[ok]]
        return scores, out

    return search


def qdrant_searcher(client: Any, collection: str, id_field: str | None = "id", vector: str | None = None,
                    hnsw_ef: int | None = None) -> Search:
    """A :data:`Search` over a Qdrant collection; document ids come from payload ``id_field`` (falling
    back to the point id when a point has no such field)."""
    from qdrant_client import models

    from reembed.indexes import qdrant as Q

    params = Q.search_params(client, collection)  # a quantized collection: rescored with the originals
    if hnsw_ef:
        params = models.SearchParams(hnsw_ef=hnsw_ef, quantization=params.quantization if params else None)
    fields = [id_field] if id_field else False

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        requests = [models.QueryRequest(query=q.tolist(), limit=k, with_payload=fields, using=vector, params=params)
                    for q in np.asarray(queries, dtype=np.float32)]
        results = client.query_batch_points(collection, requests=requests)
        scores = np.full((len(requests), k), -np.inf, dtype=np.float32)
        ids = np.full((len(requests), k), None, dtype=object)
        for i, res in enumerate(results):
            for j, p in enumerate(res.points[:k]):
                payload = p.payload or {}
                ids[i, j] = str(payload[id_field]) if id_field and id_field in payload else str(p.id)
                scores[i, j] = p.score
        return scores, ids

    return search


def _as_arrays(hits: list[list[tuple[str, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.full((len(hits), k), -np.inf, dtype=np.float32)
    ids = np.full((len(hits), k), None, dtype=object)
    for row, h in enumerate(hits):
        for j, (i, s) in enumerate(h[:k]):
            ids[row, j], scores[row, j] = i, s
    return scores, ids
