"""reembed: re-embed a document corpus with a new embedding model on Ray.

The public API, in the order of the flow (each name is imported on first use, so ``import reembed`` stays
instant and needs neither torch nor Ray)::

    cfg = reembed.load_config("job.yaml", ["model.name=BAAI/bge-large-en-v1.5"])
    summary = reembed.run(cfg)                       # plan -> read -> embed -> write -> commit
    reembed.status("s3://bucket/emb/v2")             # progress of an output, from its manifest
    reembed.build_indexes("s3://bucket/emb/v2", cfg.index)   # FAISS and Qdrant, in parallel
    reembed.search("s3://bucket/emb/v2", ["interest rates"], k=10)
    reembed.validate("s3://bucket/emb/v2", queries="queries.jsonl")
    reembed.swap("documents", "documents-v2", qdrant="http://qdrant:6333", output="s3://bucket/emb/v2")
    reembed.rollback("documents", qdrant="http://qdrant:6333")
    reembed.export("qdrant://localhost:6333?collection=documents", "s3://bucket/old")
    reembed.dual_query(text, old_store, new_store); reembed.dual_write(docs, old_store, new_store)

Every error meant for a user is a :class:`ReembedError`.
"""

from __future__ import annotations

import importlib
from typing import Any

from reembed.errors import ReembedError

__version__ = "0.1.0"

# name -> "module:attribute", resolved on first access (PEP 562). No top-level module shares a name with
# an API function (an imported submodule would replace the function as the package's attribute).
_API = {
    "load_config": "reembed.config:load_config",
    "run": "reembed.pipeline:run",
    "status": "reembed.pipeline:status",
    "build_indexes": "reembed.indexes.build:build_indexes",
    "search": "reembed.indexes.search:search",
    "validate": "reembed.validation:validate",
    "swap": "reembed.indexes.swap:swap",
    "rollback": "reembed.indexes.swap:rollback",
    "export": "reembed.migrate:export",
    "dual_query": "reembed.migrate:dual_query",
    "dual_write": "reembed.migrate:dual_write",
}

__all__ = [*_API, "ReembedError", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'reembed' has no attribute {name!r}")
    module, attr = _API[name].split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
