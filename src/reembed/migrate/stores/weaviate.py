"""Weaviate: ``weaviate://host:8080/Collection[?grpc_port=50051&secure=true]`` or
``weaviate+cloud://cluster.weaviate.cloud/Collection`` (official v4 client ``weaviate-client``, imported
only here; ``WEAVIATE_API_KEY`` from the environment). Exported with the v4 cursor iterator; ids are object
uuids unless ``id_field`` names a property; ``vector`` picks a named vector. Not run against a live server
here; the cursor is tested with a stand-in.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from reembed.errors import ExportError
from reembed.migrate.stores.base import TEXT, Batch, Store, StoreURI, as_text, matrix, page_size_checked, take_id


class WeaviateStore(Store):
    kind = "weaviate"

    def __init__(self, collection, client=None, text_field: str = TEXT, id_field: str | None = None,
                 vector: str | None = None, **common: Any):
        """``collection``: a v4 ``Collection``; ``client`` (closed by :meth:`close`) when this store opened it."""
        super().__init__(**common)
        self.handle, self.client = collection, client
        self.text_field, self.id_field, self.vector = text_field, id_field, vector

    @classmethod
    def from_uri(cls, src: StoreURI, **common: Any) -> "WeaviateStore":
        name = src.path.strip("/")
        if not src.host or not name or "/" in name:
            raise ExportError(f"{src.shown}: expected weaviate://host:port/Collection (or weaviate+cloud://cluster/Collection)")
        client = _connect(src)
        try:
            collection = client.collections.use(name) if hasattr(client.collections, "use") else client.collections.get(name)
        except BaseException:
            client.close()
            raise
        return cls(collection, client, text_field=src.option("text_field", TEXT), id_field=src.option("id_field"),
                   vector=src.option("vector"), uri=src.uri, collection=name, **common)

    def batches(self, page_size: int = 1000) -> Iterator[Batch]:
        page_size = page_size_checked(page_size)
        ids, texts, metas, rows = [], [], [], []
        for obj in self.handle.iterator(include_vector=True, cache_size=page_size):
            props = dict(obj.properties or {})
            v = obj.vector
            if isinstance(v, dict):  # v4 returns {name: values}; the unnamed vector is "default"
                if self.vector is None:
                    if len(v) != 1:
                        raise ExportError(f"weaviate object {obj.uuid}: several named vectors ({', '.join(v)}); "
                                          "choose one with ?vector=NAME")
                    v = next(iter(v.values()))
                else:
                    v = v.get(self.vector)
            ids.append(take_id(props, self.id_field, obj.uuid, f"weaviate object {obj.uuid}"))
            texts.append(as_text(props.pop(self.text_field, None)))
            metas.append(props)
            rows.append(v)
            if len(ids) == page_size:
                yield Batch(ids=ids, texts=texts, metadata=metas, vectors=matrix(rows, ids, "weaviate"))
                ids, texts, metas, rows = [], [], [], []
        if ids:
            yield Batch(ids=ids, texts=texts, metadata=metas, vectors=matrix(rows, ids, "weaviate"))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _connect(src: StoreURI):
    try:
        import weaviate
        from weaviate.classes.init import Auth
    except ImportError as e:
        raise ExportError("reading Weaviate needs the official v4 client: pip install weaviate-client") from e
    key = os.environ.get("WEAVIATE_API_KEY")
    auth = Auth.api_key(key) if key else None
    if src.scheme == "weaviate+cloud":
        if not key:
            raise ExportError(f"{src.shown}: set WEAVIATE_API_KEY in the environment")
        return weaviate.connect_to_weaviate_cloud(cluster_url=src.host, auth_credentials=auth)
    host, _, port = src.host.partition(":")
    secure = src.option("secure", "false") == "true"
    return weaviate.connect_to_custom(
        http_host=host, http_port=int(port or 8080), http_secure=secure,
        grpc_host=src.option("grpc_host", host), grpc_port=int(src.option("grpc_port", "50051")), grpc_secure=secure,
        auth_credentials=auth,
    )
