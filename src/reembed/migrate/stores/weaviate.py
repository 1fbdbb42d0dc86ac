"""Weaviate: ``weaviate://host:8080/Collection[?grpc_port=50051&secure=true]`` or
``weaviate+cloud://cluster.weaviate.cloud/Collection`` (official v4 client ``weaviate-client``, imported
only here; ``WEAVIATE_API_KEY`` from the environment). Exported with the v4 cursor iterator; ids are object
uuids unless ``id_field`` names a property; ``vector`` picks a named vector. Not run against a live server
here; the cursor is tested with a stand-in.

As a publish target (:mod:`reembed.migrate.sinks`): the vectors go into a new collection ``<Collection>_v<N>``
(self-provided vectors, HNSW with cosine distance for a normalized model, else squared L2). Ids that are
UUIDs (what ``export`` reads from Weaviate) are kept as object uuids; any other id becomes a uuid5 of it and is
kept in the property ``id_field`` (default ``doc_id``), from which ``export ?id_field=doc_id`` reads it back.
Metadata keys Weaviate reserves (``id``, ``_id``, ``_additional``, ``vector``) are stored as ``meta_<key>``.
Collection aliases need weaviate-client >= 4.17 and Weaviate >= 1.32; with the pinned client there is no swap:
the app points at the versioned collection. Tested against a stand-in (tests/weaviate_standin.py: the REST and
gRPC calls the client makes, written from Weaviate's API and the client's own protobuf definitions), not
against Weaviate itself.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from typing import Any, Iterator

from reembed.errors import ExportError, MigrationError
from reembed.migrate.stores.base import TEXT, Batch, Store, StoreURI, as_text, matrix, page_size_checked, take_id


_RESERVED_PROPS = ("id", "_id", "_additional", "vector")
DOC_ID = "doc_id"


class WeaviateStore(Store):
    kind = "weaviate"
    writable = True  # insert_many with the objects' uuids (an upsert in Weaviate's batch import)

    def __init__(self, handle, client=None, text_field: str = TEXT, id_field: str | None = None,
                 vector: str | None = None, **common: Any):
        """``handle``: a v4 ``Collection``; ``client`` (closed by :meth:`close`) when this store opened it."""
        super().__init__(**common)
        self.handle, self.client = handle, client
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

    # -- publish target (reembed.migrate.sinks) ----------------------------------------------------

    @staticmethod
    def base_name(src: StoreURI) -> str:
        name = src.path.strip("/")
        if not src.host or not name or "/" in name:
            raise MigrationError(f"{src.shown}: expected weaviate://host:port/Collection")
        return name

    @staticmethod
    def concurrent(src: StoreURI) -> bool:
        return True

    @classmethod
    def taken_names(cls, src: StoreURI) -> list[str]:
        """The server's collection names."""
        cls.base_name(src)
        client = _connect(src)
        try:
            return list(client.collections.list_all(simple=True))
        finally:
            client.close()

    @classmethod
    def open_target(cls, src: StoreURI, name: str, *, dim: int, normalized: bool, about: dict[str, Any]) -> "WeaviateStore":
        from weaviate.classes.config import Configure, VectorDistances

        client = _connect(src)
        try:
            if not client.collections.exists(name):
                distance = VectorDistances.COSINE if normalized else VectorDistances.L2_SQUARED
                client.collections.create(
                    name, description=f"reembed v{about['version']}: {about.get('model')} ({dim}-d, {about.get('fingerprint')})",
                    vector_config=Configure.Vectors.self_provided(vector_index_config=Configure.VectorIndex.hnsw(
                        distance_metric=distance)))
            collection = client.collections.use(name) if hasattr(client.collections, "use") else client.collections.get(name)
        except BaseException:
            client.close()
            raise
        store = cls(collection, client, text_field=src.option("text_field", TEXT), id_field=src.option("id_field", DOC_ID),
                    uri=src.uri, collection=name, name="target")
        store._dim = dim
        return store

    @property
    def dim(self) -> int:
        if getattr(self, "_dim", None) is None:
            raise MigrationError(f"{self.where}: querying Weaviate is not supported here (export it with `reembed export`)")
        return self._dim

    def _upsert(self, ids, texts, vectors, metadata) -> None:
        from weaviate.classes.data import DataObject

        objects = []
        for doc_id, text, vec, meta in zip(ids, texts, vectors, metadata):
            props = {(f"meta_{k}" if k in _RESERVED_PROPS else k): v for k, v in meta.items() if v is not None}
            if text is not None:
                props[self.text_field] = text
            object_id = _as_uuid(doc_id)
            if object_id is None:
                object_id = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"reembed:{doc_id}"))
                props[self.id_field or DOC_ID] = doc_id
            objects.append(DataObject(properties=props, uuid=object_id, vector=vec.tolist()))
        result = self.handle.data.insert_many(objects)
        if result.has_errors:
            n, err = next(iter(result.errors.items()))
            raise MigrationError(f"{self.where}: Weaviate refused {len(result.errors)} of {len(objects)} objects (first: "
                                 f"{ids[n]!r}: {getattr(err, 'message', err)})")

    def count(self) -> int:
        return int(self.handle.aggregate.over_all(total_count=True).total_count)

    @classmethod
    def swap(cls, src: StoreURI, name: str) -> dict[str, Any]:
        raise MigrationError(f"{src.shown}: collection aliases need weaviate-client >= 4.17 and Weaviate >= 1.32; point "
                             f"the app at {name!r} instead of --swap")

    @classmethod
    def rollback(cls, src: StoreURI) -> dict[str, Any]:
        raise MigrationError(f"{src.shown}: reembed never swapped a Weaviate collection; point the app back at its "
                             "old collection")


def _as_uuid(value: str) -> str | None:
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        return None


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
