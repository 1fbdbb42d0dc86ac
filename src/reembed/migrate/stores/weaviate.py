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
``--swap`` points a collection alias (Weaviate >= 1.32; the pinned weaviate-client 4.16 has ``client.alias``) at the
new collection in one call: the alias is ``?alias=NAME``, else the URI's collection name, which must then be an
alias already or free (an alias cannot take a collection's name). ``--rollback`` points it back at the highest
earlier ``<Collection>_v<N>``. Before 1.32 there is no swap: the app points at the versioned collection. Tested
against a stand-in (tests/weaviate_standin.py: the REST and gRPC calls the client makes, written from Weaviate's
API docs and the client's own protobuf definitions, aliases included), not against Weaviate itself.
"""

from __future__ import annotations

import os
import re
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
        """Point the alias the app queries (``?alias=``, default the collection name of the URI) at ``name``: one
        call (``PUT /v1/aliases/<alias>``, or a create when there is no alias yet), so the app's name is never
        absent. An alias cannot take a collection's name: an app querying its collection ``Docs`` itself is
        refused, with what to do instead."""
        alias = cls.alias_name(src)
        client = _connect(src)
        try:
            _need_aliases(client, src, name)
            current = client.alias.get(alias_name=alias)
            if current is None and client.collections.exists(alias):
                raise MigrationError(
                    f"{src.shown}: {alias!r} is a collection, and a Weaviate alias cannot take a collection's name; "
                    f"make the app query an alias: add &alias=NAME to --to (a new alias NAME -> {name!r} is created; "
                    f"point the app at NAME once), or query {name!r} directly")
            if current is not None and current.collection == name:
                return cls._swapped(client, alias, name, [], f"the alias {alias!r} already points at {name!r}")
            if current is None:
                client.alias.create(alias_name=alias, target_collection=name)
            else:
                client.alias.update(alias_name=alias, new_target_collection=name)
            got = client.alias.get(alias_name=alias)
            if got is None or got.collection != name:
                raise MigrationError(f"{src.shown}: the alias {alias!r} does not point at {name!r} after the swap "
                                     f"({got.collection if got else 'no alias'}); run it again")
            was = f"(was {current.collection!r})" if current is not None else "(created)"
            return cls._swapped(client, alias, name, [[alias, name]],
                                f"Weaviate alias {alias!r} -> {name!r} {was}, in one call: the name was never absent")
        finally:
            client.close()

    @classmethod
    def rollback(cls, src: StoreURI) -> dict[str, Any]:
        """Point the alias back at the highest ``<Collection>_v<N>`` below the one it points at now."""
        alias, base = cls.alias_name(src), cls.base_name(src)
        client = _connect(src)
        try:
            _need_aliases(client, src)
            current = client.alias.get(alias_name=alias)
            if current is None:
                raise MigrationError(f"{src.shown}: no Weaviate alias {alias!r} to roll back (reembed never swapped it)")
            now_at = _version(base, current.collection)
            names = list(client.collections.list_all(simple=True))
            older = sorted(v for v in (_version(base, n) for n in names) if v is not None and
                           (now_at is None or v < now_at))
        finally:
            client.close()
        if not older:
            raise MigrationError(f"{src.shown}: the alias {alias!r} points at {current.collection!r} and no earlier "
                                 f"{base}_v<N> exists to roll back to")
        return cls.swap(src, f"{base}_v{older[-1]}")

    @staticmethod
    def alias_name(src: StoreURI) -> str:
        return src.option("alias") or WeaviateStore.base_name(src)

    @staticmethod
    def _swapped(client, alias: str, name: str, moves: list, note: str) -> dict[str, Any]:
        desc = client.collections.export_config(name).description or ""
        model = re.match(r"reembed v\d+: (.*) \(\d+-d", desc)
        return {"renames": moves, "window_seconds": 0.0, "collection": alias,
                "model": model.group(1) if model else None, "note": note}


def _need_aliases(client, src: StoreURI, name: str | None = None) -> None:
    version = client.get_meta().get("version", "0")
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (1, 32):
        raise MigrationError(f"{src.shown}: this Weaviate is {version}; collection aliases need Weaviate >= 1.32: "
                             f"upgrade it, or point the app at {repr(name) + ' instead of --swap' if name else 'its old collection'}")


def _version(base: str, name: str) -> int | None:
    m = re.fullmatch(re.escape(base) + r"_v(\d+)", name)
    return int(m.group(1)) if m else None


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
