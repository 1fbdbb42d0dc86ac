"""Migrating from an old vector store: export it as reembed input, query old and new together, write to both.

* :mod:`reembed.migrate.stores` - one small class per store (Chroma, Qdrant, FAISS, Pinecone, Weaviate,
  and the exact in-memory store over a reembed output or an export folder), opened by :func:`open_store`;
* :mod:`reembed.migrate.export` - :func:`export` into Parquet parts in reembed's input format;
* :mod:`reembed.migrate.dual` - :func:`dual_query`, :func:`dual_write`, :func:`fuse`;
* :mod:`reembed.migrate.adopt` - :func:`adopt`: the app's collection name becomes an alias reembed can swap;
* :mod:`reembed.migrate.flow` - :func:`migrate`: export -> run -> index -> validate -> adopt -> swap, resumable;
"""

from reembed.errors import DualWriteError, ExportError, MigrationError
from reembed.migrate.adopt import adopt
from reembed.migrate.dual import FUSIONS, RRF_K, Hit, dual_query, dual_write, fuse
from reembed.migrate.export import PartWriter, export
from reembed.migrate.flow import MigrateSettings, migrate
from reembed.migrate.stores import (Batch, ChromaStore, ExactStore, FaissStore, PineconeStore, QdrantStore, Store,
                                    WeaviateStore, is_store_uri, open_store, parse_uri)

__all__ = ["export", "adopt", "migrate", "MigrateSettings", "dual_query", "dual_write", "open_store", "fuse", "Hit", "Store", "ChromaStore", "QdrantStore",
           "FaissStore", "PineconeStore", "WeaviateStore", "ExactStore", "Batch", "PartWriter", "is_store_uri",
           "parse_uri", "FUSIONS", "RRF_K", "ExportError", "MigrationError", "DualWriteError"]
