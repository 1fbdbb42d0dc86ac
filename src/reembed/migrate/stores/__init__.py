"""The vector stores a migration reads from and writes to: one small class per store.

=========================================================  ===============================================
``chroma:///path?collection=docs``                         Chroma persistent folder (export, query, write)
``chroma://host:8000?collection=docs[&ssl=true]``          Chroma HTTP server; ``CHROMA_API_KEY`` if set
``qdrant:///path?collection=docs``                         Qdrant embedded storage folder (export, query, write)
``qdrant://host:6333?collection=docs`` / ``qdrants://``    Qdrant server (http / https); ``QDRANT_API_KEY``
``faiss:///path/index.faiss?docstore=docs.parquet``        FAISS index file + docstore (export, query)
``pinecone://INDEX?namespace=ns[&host=URL]``               Pinecone (export); ``PINECONE_API_KEY``
``weaviate://host:8080/Collection[?grpc_port=50051]``      Weaviate v4 (export)
``weaviate+cloud://cluster.weaviate.cloud/Collection``     Weaviate Cloud (export); ``WEAVIATE_API_KEY``
any other URI or path                                      a reembed output or an export folder (exact query)
=========================================================  ===============================================

Common options: ``text_field`` (payload / metadata / property holding the text, default ``text``),
``id_field`` (take the document id from that field), ``vector`` (which named vector).
"""

from __future__ import annotations

from typing import Any

from reembed.migrate.stores.base import Batch, Result, Store, StoreURI, is_store_uri, parse_uri
from reembed.migrate.stores.chroma import ChromaStore
from reembed.migrate.stores.exact import ExactStore
from reembed.migrate.stores.faiss import FaissStore
from reembed.migrate.stores.pinecone import PineconeStore
from reembed.migrate.stores.qdrant import QdrantStore
from reembed.migrate.stores.weaviate import WeaviateStore

__all__ = ["open_store", "parse_uri", "is_store_uri", "Store", "StoreURI", "Batch", "Result", "ChromaStore",
           "QdrantStore", "FaissStore", "PineconeStore", "WeaviateStore", "ExactStore"]

# Where a reembed output or an export folder can live (anything else with a scheme is a mistyped store URI).
STORAGE_SCHEMES = ("", "file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
STORES: dict[str, type[Store]] = {"chroma": ChromaStore, "qdrant": QdrantStore, "faiss": FaissStore,
                                  "pinecone": PineconeStore, "weaviate": WeaviateStore}


def open_store(uri: Any, model: str | None = None, name: str = "store", device: str = "auto") -> Store:
    """Open the store at ``uri`` (a store URI, or a reembed output / export folder as a URI or
    :class:`~reembed.storage.Location`). ``model`` embeds queries and dual writes for it (a reembed output
    defaults to its manifest's); ``name`` is how fused results and messages refer to it."""
    from reembed.storage import Location

    from urllib.parse import urlsplit

    common = {"name": name, "model": model, "device": device}
    if isinstance(uri, str) and (is_store_uri(uri) or urlsplit(uri).scheme not in STORAGE_SCHEMES):
        src = parse_uri(uri)  # refuses an unknown scheme
        return STORES[src.kind].from_uri(src, **common)
    from reembed.manifest import Manifest

    loc = uri if isinstance(uri, Location) else Location.from_uri(str(uri))
    manifest = Manifest.load(loc)
    if manifest is not None:
        return ExactStore.from_output(loc, manifest, **common)
    return ExactStore.from_export(loc, **common)
