"""Chroma: ``chroma:///path?collection=docs`` (persistent folder) or ``chroma://host:8000?collection=docs``
(HTTP server, ``&ssl=true``, ``&tenant=``, ``&database=``; ``CHROMA_API_KEY`` if set). Exported with paged
``get``, searched with ``query``, written with ``upsert``."""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from reembed.errors import ExportError, MigrationError
from reembed.migrate.stores.base import Batch, Result, Store, StoreURI, matrix, page_size_checked


class ChromaStore(Store):
    kind = "chroma"
    writable = True

    def __init__(self, collection, **common: Any):
        """``collection``: an open chromadb Collection (opened without an embedding function)."""
        super().__init__(collection=collection.name, **common)
        self.handle = collection
        self._dim: int | None = None

    @classmethod
    def from_uri(cls, src: StoreURI, **common: Any) -> "ChromaStore":
        name = src.option("collection", "")
        if not name:
            raise ExportError(f"{src.shown}: name the collection, e.g. chroma://{src.host}{src.path or '/path'}?collection=docs")
        if src.host and src.path not in ("", "/"):
            raise ExportError(f"{src.shown}: a server URI has no path (chroma://host:port?collection=...); "
                              "for a local folder use chroma:///abs/path")
        if not src.host and src.path in ("", "/"):
            raise ExportError(f"{src.shown}: give a server (host:port) or a local folder (chroma:///abs/path)")
        client = _client(src)
        try:
            # Without embedding_function=None, Chroma would fetch its default model.
            collection = client.get_collection(name, embedding_function=None)
        except Exception as e:  # chromadb raises NotFoundError / ValueError / InvalidCollectionException by version
            names = [getattr(c, "name", c) for c in client.list_collections()]
            raise ExportError(f"{src.shown}: no Chroma collection {name!r} (collections: {', '.join(names) or 'none'}) "
                              f"({type(e).__name__})") from e
        return cls(collection, uri=src.uri, **common)

    def describe(self) -> dict[str, Any]:
        meta = self.handle.metadata or {}
        return {"metric": meta.get("hnsw:space") or _configured_space(self.handle) or "l2", "lossy": False}

    def batches(self, page_size: int = 1000) -> Iterator[Batch]:
        """Page through the collection with ``get(limit, offset)``; checks the total against ``count()``."""
        page_size = page_size_checked(page_size)
        col = self.handle
        expected = col.count()
        offset = seen = 0
        while True:
            page = col.get(limit=page_size, offset=offset, include=["embeddings", "documents", "metadatas"])
            ids = list(page["ids"])
            if not ids:
                break
            vectors = matrix(page["embeddings"], ids, f"chroma collection {col.name}")
            metas = page.get("metadatas") or [None] * len(ids)
            docs = page.get("documents") or [None] * len(ids)
            yield Batch(ids=[str(i) for i in ids], texts=list(docs), metadata=[dict(m or {}) for m in metas],
                        vectors=vectors)
            seen += len(ids)
            offset += len(ids)
            if len(ids) < page_size:
                break
        if seen != expected:
            raise ExportError(f"chroma collection {col.name}: read {seen} documents but count() is {expected}; "
                              "the collection changed during the export - stop writers and export again")

    @property
    def dim(self) -> int:
        if self._dim is None:
            got = self.handle.get(limit=1, include=["embeddings"]).get("embeddings")
            if got is not None and len(got):
                self._dim = len(got[0])
            elif getattr(self.handle, "dimension", None):
                self._dim = int(self.handle.dimension)
            else:
                raise MigrationError(f"{self.where}: empty collection; cannot tell its vector dimension")
        return self._dim

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        try:
            res = self.handle.query(query_embeddings=vectors, n_results=k, include=["distances", "documents"])
        except Exception as e:  # chromadb's errors differ by version; all mean this query cannot run here
            raise MigrationError(f"{self.where}: Chroma query failed ({type(e).__name__}: {_first_line(e)})") from e
        docs = res.get("documents") or [[None] * len(r) for r in res["ids"]]
        # Chroma returns distances (l2, cosine or ip space): smaller is better, so the score is -distance.
        return [[(str(i), -float(d), t) for i, d, t in zip(ids, dists, texts)]
                for ids, dists, texts in zip(res["ids"], res["distances"], docs)]

    def _upsert(self, ids, texts, vectors, metadata) -> None:
        metas = [m or None for m in metadata]
        try:
            self.handle.upsert(ids=ids, embeddings=vectors, documents=texts, metadatas=metas if any(metas) else None)
        except Exception as e:  # chromadb's errors differ by version (bad metadata types, a deleted collection)
            raise MigrationError(f"{self.where}: Chroma upsert of {len(ids)} documents failed "
                                 f"({type(e).__name__}: {_first_line(e)})") from e


def _client(src: StoreURI):
    try:
        import chromadb
    except ImportError as e:
        raise ExportError("reading Chroma needs the chromadb package: pip install chromadb==1.5.9") from e
    if src.host:
        host, _, port = src.host.rpartition("@")[2].partition(":")
        headers = {"x-chroma-token": os.environ["CHROMA_API_KEY"]} if os.environ.get("CHROMA_API_KEY") else None
        kwargs = {key: src.option(key) for key in ("tenant", "database") if src.option(key)}
        try:
            return chromadb.HttpClient(host=host, port=int(port or 8000), ssl=src.option("ssl", "false") == "true",
                                       headers=headers, **kwargs)
        except ValueError as e:  # chromadb checks the server (and tenant / database) when the client is made
            raise ExportError(f"{src.shown}: cannot reach the Chroma server ({_first_line(e)})") from e
    if not os.path.isdir(src.path):
        raise ExportError(f"{src.shown}: no Chroma folder at {src.path}")
    return chromadb.PersistentClient(path=src.path)


def _configured_space(col) -> str | None:
    cfg = getattr(col, "configuration", None) or getattr(col, "configuration_json", None) or {}
    hnsw = cfg.get("hnsw") if isinstance(cfg, dict) else None
    return (hnsw or {}).get("space") if isinstance(hnsw, dict) else None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""
