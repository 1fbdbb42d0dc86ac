"""Pinecone: ``pinecone://INDEX?namespace=ns[&host=URL]`` (official client ``pinecone`` >= 5, imported only
here; ``PINECONE_API_KEY`` from the environment). Exported by listing ids page by page and fetching their
vectors; the text comes from metadata ``text_field`` (default ``text``), the document id from metadata
``id_field`` if given. Not run against a live index here (no server); the paging is tested with a stand-in.

As a publish target (:mod:`reembed.migrate.sinks`): the vectors go into namespace ``<namespace>_v<N>``
(``default_v<N>`` for the default namespace) of an index that already exists with the output's dimension
(creating a serverless index is a billing and region decision left to the user). Pinecone has no aliases:
the app switches to the new namespace (a per-query parameter), so there is no swap. Stats are eventually
consistent, so the final count is polled for up to ``settle_seconds``. Tested against a stand-in HTTP server
written from Pinecone's REST reference (tests/pinecone_standin.py), not against Pinecone itself.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterator

from reembed.errors import ExportError, MigrationError
from reembed.migrate.stores.base import TEXT, Batch, Store, StoreURI, as_text, matrix, page_size_checked, take_id

log = logging.getLogger(__name__)


class PineconeStore(Store):
    kind = "pinecone"
    writable = True  # upserts into a namespace (publish, dual write)

    settle_seconds = 60.0

    def __init__(self, index, namespace: str = "", text_field: str = TEXT, id_field: str | None = None,
                 fetch_size: int = 100, **common: Any):
        """``index``: a ``pinecone.Index``; ``fetch_size`` ids per fetch (they travel in the query string)."""
        super().__init__(**common)
        self.handle, self.namespace = index, namespace
        self.text_field, self.id_field, self.fetch_size = text_field, id_field, fetch_size
        self._dim: int | None = None

    @classmethod
    def from_uri(cls, src: StoreURI, **common: Any) -> "PineconeStore":
        name = src.host or src.path.strip("/")
        if not name:
            raise ExportError(f"{src.shown}: name the index, e.g. pinecone://my-index?namespace=ns")
        try:
            from pinecone import Pinecone
        except ImportError as e:
            raise ExportError("reading Pinecone needs the official client: pip install pinecone") from e
        key = os.environ.get("PINECONE_API_KEY")
        if not key:
            raise ExportError(f"{src.shown}: set PINECONE_API_KEY in the environment")
        kwargs = {"host": src.option("control_host")} if src.option("control_host") else {}
        index = Pinecone(api_key=key, **kwargs).Index(name=name, host=src.option("host") or "")
        return cls(index, src.option("namespace", ""), text_field=src.option("text_field", TEXT),
                   id_field=src.option("id_field"), uri=src.uri, collection=name, **common)

    def batches(self, page_size: int = 1000) -> Iterator[Batch]:
        """List every id of the (serverless) namespace page by page, then fetch their vectors."""
        page_size = page_size_checked(page_size)
        for page in self.handle.list(namespace=self.namespace, limit=min(page_size, 100)):
            # pinecone >= 8 yields ListResponse pages (.vectors of items with .id); 5-7 yield lists of ids.
            page_ids = [v.id for v in page.vectors] if hasattr(page, "vectors") else [str(v) for v in page]
            for start in range(0, len(page_ids), self.fetch_size):
                batch = self._fetch(page_ids[start:start + self.fetch_size])
                if batch is not None:
                    yield batch

    def _fetch(self, chunk: list[str]) -> Batch | None:
        found = self.handle.fetch(ids=chunk, namespace=self.namespace).vectors
        missing = [i for i in chunk if i not in found]
        if missing:
            log.warning("pinecone: %d listed ids vanished before fetch (first: %s)", len(missing), missing[0])
        ids, texts, metas, rows = [], [], [], []
        for vid in chunk:
            if vid not in found:
                continue
            vec = found[vid]
            meta = dict(getattr(vec, "metadata", None) or {})
            ids.append(take_id(meta, self.id_field, vid, f"pinecone vector {vid}"))
            texts.append(as_text(meta.pop(self.text_field, None)))
            metas.append(meta)
            rows.append(list(vec.values))
        return Batch(ids=ids, texts=texts, metadata=metas, vectors=matrix(rows, ids, "pinecone")) if ids else None

    # -- publish target (reembed.migrate.sinks) ----------------------------------------------------

    @staticmethod
    def base_name(src: StoreURI) -> str:
        return src.option("namespace") or "default"

    @staticmethod
    def concurrent(src: StoreURI) -> bool:
        return True

    @classmethod
    def taken_names(cls, src: StoreURI) -> list[str]:
        """The index's namespaces."""
        with cls.from_uri(src) as store:
            return list(store.handle.describe_index_stats().namespaces or {})

    def close(self) -> None:
        close = getattr(self.handle, "close", None)  # the data-plane client's connection pool (pinecone >= 8)
        if callable(close):
            close()

    @classmethod
    def open_target(cls, src: StoreURI, name: str, *, dim: int, normalized: bool, about: dict[str, Any]) -> "PineconeStore":
        store = cls.from_uri(src, name="target")
        store.namespace = name
        index_dim = store.handle.describe_index_stats().dimension
        if index_dim is not None and int(index_dim) != dim:
            raise MigrationError(f"{src.shown}: index {store.collection!r} holds {index_dim}-d vectors, the output "
                                 f"{dim}-d; create an index of dimension {dim} (metric "
                                 f"{'cosine' if normalized else 'euclidean'}) and publish into pinecone://NEW_INDEX")
        store._dim = dim
        return store

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.handle.describe_index_stats().dimension)
        return self._dim

    def _upsert(self, ids, texts, vectors, metadata) -> None:
        items = []
        for i, text, vec, meta in zip(ids, texts, vectors, metadata):
            meta = {k: v for k, v in meta.items() if v is not None}
            if text is not None:
                meta[self.text_field] = text
            item = {"id": i, "values": vec.tolist()}
            if meta:
                item["metadata"] = meta
            items.append(item)
        self.handle.upsert(vectors=items, namespace=self.namespace)

    def count(self) -> int:
        """Vectors in this namespace, once the index's stats stop changing (they lag writes)."""
        deadline = time.monotonic() + self.settle_seconds
        last = None
        while True:
            summary = (self.handle.describe_index_stats().namespaces or {}).get(self.namespace)
            got = int(getattr(summary, "vector_count", 0) or 0) if summary is not None else 0
            if got == last or time.monotonic() > deadline:
                return got
            last = got
            time.sleep(0.5)

    @classmethod
    def swap(cls, src: StoreURI, name: str) -> dict[str, Any]:
        raise MigrationError(f"{src.shown}: Pinecone has no aliases; point the app at namespace {name!r} (a query "
                             "parameter) instead of --swap")

    @classmethod
    def rollback(cls, src: StoreURI) -> dict[str, Any]:
        raise MigrationError(f"{src.shown}: Pinecone has no aliases and reembed never swapped it; point the app back "
                             "at its old namespace")
