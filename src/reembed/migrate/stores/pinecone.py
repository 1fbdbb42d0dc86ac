"""Pinecone: ``pinecone://INDEX?namespace=ns[&host=URL]`` (official client ``pinecone`` >= 5, imported only
here; ``PINECONE_API_KEY`` from the environment). Exported by listing ids page by page and fetching their
vectors; the text comes from metadata ``text_field`` (default ``text``), the document id from metadata
``id_field`` if given. Not run against a live index here (no server); the paging is tested with a stand-in.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

from reembed.errors import ExportError
from reembed.migrate.stores.base import TEXT, Batch, Store, StoreURI, as_text, matrix, page_size_checked, take_id

log = logging.getLogger(__name__)


class PineconeStore(Store):
    kind = "pinecone"

    def __init__(self, index, namespace: str = "", text_field: str = TEXT, id_field: str | None = None,
                 fetch_size: int = 100, **common: Any):
        """``index``: a ``pinecone.Index``; ``fetch_size`` ids per fetch (they travel in the query string)."""
        super().__init__(**common)
        self.handle, self.namespace = index, namespace
        self.text_field, self.id_field, self.fetch_size = text_field, id_field, fetch_size

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
