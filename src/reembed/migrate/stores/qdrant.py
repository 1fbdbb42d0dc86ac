"""Qdrant: ``qdrant:///path?collection=docs`` (embedded storage folder), ``qdrant://host:6333?collection=docs``
(http) or ``qdrants://host:6333?collection=docs`` (https). Options ``id_field`` (payload field holding the
document id, default ``id`` as the index stage writes it, falling back to the point id), ``text_field``
(default ``text``) and ``vector`` (a named vector).

The client comes from :func:`reembed.indexes.qdrant.connect` and point ids from
:func:`reembed.indexes.qdrant.point_id`, exactly as the index stage writes them, so a dual write of a
document the index stage loaded replaces its point instead of adding a second one. ``QDRANT_API_KEY``
goes only to the server of the URI the caller passed in.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from typing import Any, Iterator

import numpy as np

from reembed.errors import ExportError, MigrationError
from reembed.indexes import qdrant as Q
from reembed.migrate.stores.base import (TEXT, Batch, Result, Store, StoreURI, as_text, matrix, page_size_checked,
                                         take_id)

DEFAULT_PORT = 6333
# LangChain's QdrantVectorStore (content_payload_key / metadata_payload_key defaults) and LlamaIndex's.
LANGCHAIN_TEXT, LANGCHAIN_METADATA = "page_content", "metadata"
LLAMAINDEX_NODE = "_node_content"


class QdrantStore(Store):
    kind = "qdrant"
    writable = True

    def __init__(self, client, collection: str, vector: str | None = None, id_field: str | None = None,
                 text_field: str | None = None, **common: Any):
        """``id_field`` None: ids from payload ``id`` where a point has it, else the point id; a name: that
        payload field, which every point must have. ``text_field`` None: found from the payload layout
        (LangChain ``page_content``, LlamaIndex ``_node_content``, else ``text``)."""
        super().__init__(collection=collection, **common)
        self.client = client
        self.id_field = id_field
        self.text_field = text_field or TEXT
        self.layout: dict[str, Any] = {"kind": "payload" if text_field else None, "text_field": self.text_field}
        params = Q.call_with_retry(lambda: client.get_collection(collection), what=f"read {collection}").config.params.vectors
        if isinstance(params, dict):
            if vector is None:
                if len(params) != 1:
                    raise ExportError(f"qdrant collection {collection}: several named vectors ({', '.join(params)}); "
                                      "choose one with ?vector=NAME")
                vector = next(iter(params))
            elif vector not in params:
                raise ExportError(f"qdrant collection {collection}: no vector named {vector!r} (has {', '.join(params)})")
            params = params[vector]
        elif vector is not None:
            raise ExportError(f"qdrant collection {collection}: has one unnamed vector; drop ?vector={vector}")
        self.vector = vector
        self.metric = str(params.distance.value).lower()
        self._dim = int(params.size)
        self.sign = 1.0 if self.metric in ("cosine", "dot") else -1.0  # euclid / manhattan return distances

    @classmethod
    def from_uri(cls, src: StoreURI, **common: Any) -> "QdrantStore":
        name = src.option("collection", "")
        if not name:
            raise ExportError(f"{src.shown}: name the collection, e.g. {src.scheme}://{src.host}{src.path or '/path'}"
                              "?collection=docs")
        client = Q.connect(target_of_uri(src))
        try:
            if not client.collection_exists(name):
                names = Q.collections(client)
                raise ExportError(f"{src.shown}: no Qdrant collection {name!r} (collections: {', '.join(names) or 'none'})")
            return cls(client, name, vector=src.option("vector"), id_field=src.option("id_field"),
                       text_field=src.option("text_field"), uri=src.uri, **common)
        except BaseException:
            client.close()
            raise

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "lossy": False}

    def detect_layout(self) -> dict[str, Any]:
        """The payload layout of the collection, from its first point (unless ``text_field`` was given):
        ``langchain`` (``page_content`` + nested ``metadata``), ``llamaindex`` (``_node_content`` JSON holding
        the text, flat metadata beside), ``reembed`` (document id in ``id``), or ``payload`` (any other)."""
        if self.layout["kind"] is None:
            points, _ = Q.call_with_retry(lambda: self.client.scroll(self.collection, limit=1, with_payload=True,
                                                                     with_vectors=False), what=f"scroll {self.collection}")
            self.layout = layout_of(points[0].payload or {} if points else {})
            self.text_field = self.layout["text_field"]
        return self.layout

    def batches(self, page_size: int = 1000) -> Iterator[Batch]:
        """Scroll the collection; the text comes from payload ``text_field``, the rest of the payload is metadata."""
        page_size = page_size_checked(page_size)
        layout = self.detect_layout()
        with_vectors: Any = [self.vector] if self.vector else True
        offset = None
        while True:
            points, offset = Q.call_with_retry(
                lambda: self.client.scroll(self.collection, limit=page_size, offset=offset, with_payload=True,
                                           with_vectors=with_vectors), what=f"scroll {self.collection}")
            if points:
                ids, texts, metas, rows, payloads = [], [], [], [], []
                for p in points:
                    payloads.append(p.payload or {})
                    payload = dict(p.payload or {})
                    text, meta = split_payload(payload, layout)
                    ids.append(self._doc_id(meta, p.id) if layout["kind"] in ("reembed", "payload") else
                               take_id(meta, self.id_field, p.id, f"qdrant point {p.id}"))
                    texts.append(text)
                    metas.append(meta)
                    v = p.vector
                    rows.append(v.get(self.vector) if isinstance(v, dict) else v)
                yield Batch(ids=ids, texts=texts, metadata=metas,
                            vectors=matrix(rows, ids, f"qdrant collection {self.collection}"),
                            point_ids=[str(p.id) for p in points], payloads=payloads)
            if offset is None:
                break

    @property
    def dim(self) -> int:
        return self._dim

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        from qdrant_client import models

        layout = self.detect_layout()
        id_field = self.id_field or Q.PAYLOAD_ID
        text_key = self.text_field.split(".", 1)[0]  # LlamaIndex: the text is inside _node_content
        if not hasattr(self, "_params"):  # read once: a quantized collection is searched with rescoring
            self._params = Q.search_params(self.client, self.collection)
        params = self._params
        reqs = [models.QueryRequest(query=v.tolist(), limit=k, using=self.vector, with_payload=[id_field, text_key],
                                    params=params) for v in vectors]
        results = Q.call_with_retry(lambda: self.client.query_batch_points(self.collection, requests=reqs),
                                    what=f"query {self.collection}")
        return [[(str((p.payload or {}).get(id_field, p.id)), self.sign * float(p.score),
                  split_payload(dict(p.payload or {}), layout)[0]) for p in res.points] for res in results]

    def _upsert(self, ids, texts, vectors, metadata) -> None:
        """Points in the collection's own layout (:meth:`detect_layout`), so the app reads a dual-written document
        as one of its own: LangChain's ``page_content`` + ``metadata``, LlamaIndex's ``_node_content`` node, else
        the metadata flat beside the text and the document id as the index stage stores them. Point ids: an
        app's ids (LangChain, LlamaIndex) are point ids already, so a UUID or unsigned integer id is kept as it
        is and any other id becomes :func:`~reembed.indexes.qdrant.point_id`; in reembed's layout always the
        latter. Either way the same document gets the same point in both stores, and writing it again replaces it."""
        from qdrant_client import models

        layout = self.detect_layout() if self._has_points() else {"kind": "reembed"}
        id_field = self.id_field or Q.PAYLOAD_ID
        points = []
        for i, t, v, m in zip(ids, texts, vectors, metadata):
            if layout["kind"] in ("langchain", "llamaindex"):
                pid = app_point_id(i)
                payload = app_payload(layout, str(pid), t, m)
            else:
                pid, payload = Q.point_id(i), {**m, id_field: i, self.text_field: t}
            points.append(models.PointStruct(id=pid, vector={self.vector: v.tolist()} if self.vector else v.tolist(),
                                             payload=payload))
        try:
            Q.call_with_retry(lambda: self.client.upsert(self.collection, points=points, wait=True),
                              what=f"upsert into {self.collection}")
        except (ValueError, RuntimeError) as e:  # embedded Qdrant: the collection is gone, a wrong vector size
            raise MigrationError(f"{self.where}: Qdrant upsert of {len(ids)} documents failed ({e})") from e

    def close(self) -> None:
        self.client.close()

    def _has_points(self) -> bool:
        if self.layout["kind"] is not None:
            return True
        points, _ = Q.call_with_retry(lambda: self.client.scroll(self.collection, limit=1, with_payload=False,
                                                                 with_vectors=False), what=f"scroll {self.collection}")
        return bool(points)

    def _doc_id(self, payload: dict[str, Any], point_id: Any) -> str:
        if self.id_field:
            return take_id(payload, self.id_field, point_id, f"qdrant point {point_id}")
        return take_id(payload, Q.PAYLOAD_ID, point_id, f"qdrant point {point_id}", required=False)


def layout_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The layout a payload follows (see :meth:`QdrantStore.detect_layout`) and where its text is."""
    keys = set(payload)
    if isinstance(payload.get(LANGCHAIN_TEXT), str) and keys <= {LANGCHAIN_TEXT, LANGCHAIN_METADATA}:
        return {"kind": "langchain", "text_field": LANGCHAIN_TEXT, "metadata_field": LANGCHAIN_METADATA}
    if isinstance(payload.get(LLAMAINDEX_NODE), str) and "_node_type" in keys:
        return {"kind": "llamaindex", "text_field": f"{LLAMAINDEX_NODE}.text"}
    if Q.PAYLOAD_ID in keys:
        return {"kind": "reembed", "text_field": TEXT}
    return {"kind": "payload", "text_field": TEXT}


def app_point_id(doc_id: str) -> int | str:
    """The point id of an app's document: its id when Qdrant takes it as one (a UUID, an unsigned integer, as
    LangChain's and LlamaIndex's ids are), else :func:`~reembed.indexes.qdrant.point_id` of it."""
    text = str(doc_id)
    if text.isdigit() and int(text) < 2**64:
        return int(text)
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return Q.point_id(text)


def app_payload(layout: dict[str, Any], node_id: str, text: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """One document's payload as the app's own library writes it (LangChain's ``QdrantVectorStore``, LlamaIndex's
    ``node_to_metadata_dict`` for a ``TextNode`` without a source document)."""
    if layout["kind"] == "langchain":
        return {LANGCHAIN_TEXT: text, layout.get("metadata_field", LANGCHAIN_METADATA): dict(meta)}
    node = {"id_": node_id, "embedding": None, "metadata": dict(meta), "excluded_embed_metadata_keys": [],
            "excluded_llm_metadata_keys": [], "relationships": {}, "metadata_template": "{key}: {value}",
            "metadata_separator": "\n", "text": text or "", "mimetype": "text/plain", "start_char_idx": None,
            "end_char_idx": None, "text_template": "{metadata_str}\n\n{content}", "class_name": "TextNode"}
    return {**meta, LLAMAINDEX_NODE: json.dumps(node, ensure_ascii=False), "_node_type": "TextNode",
            "document_id": "None", "doc_id": "None", "ref_doc_id": "None"}


def split_payload(payload: dict[str, Any], layout: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(text, metadata) of one point's payload under ``layout``; ``payload`` (a copy) is consumed."""
    kind = layout["kind"]
    if kind == "langchain":
        return as_text(payload.pop(LANGCHAIN_TEXT, None)), payload
    if kind == "llamaindex":
        raw = payload.pop(LLAMAINDEX_NODE, None)
        payload.pop("_node_type", None)
        try:
            node = json.loads(raw) if isinstance(raw, str) else {}
        except ValueError:
            node = {}
        return as_text(node.get("text") if isinstance(node, dict) else None), payload
    return as_text(payload.pop(layout["text_field"], None)), payload


def target_of_uri(src: StoreURI) -> str:
    """The target :func:`reembed.indexes.qdrant.connect` takes: a server URL or an existing local folder."""
    if src.host:
        if src.path not in ("", "/"):
            raise ExportError(f"{src.shown}: a server URI has no path ({src.scheme}://host:port?collection=...); "
                              f"for a local folder use {src.scheme}:///abs/path")
        host = src.host.rpartition("@")[2]
        if ":" not in host.rpartition("]")[2]:
            host = f"{host}:{DEFAULT_PORT}"
        return f"{'https' if src.scheme == 'qdrants' else 'http'}://{host}"
    if src.path in ("", "/"):
        raise ExportError(f"{src.shown}: give a server (host:port) or a local folder ({src.scheme}:///abs/path)")
    if not os.path.isdir(src.path):  # QdrantClient(path=) would create an empty store here
        raise ExportError(f"{src.shown}: no Qdrant storage folder at {src.path}")
    return src.path
