"""Chroma: ``chroma:///path?collection=docs`` (persistent folder) or ``chroma://host:8000?collection=docs``
(HTTP server, ``&ssl=true``, ``&tenant=``, ``&database=``; ``CHROMA_API_KEY`` if set). Exported with paged
``get``, searched with ``query``, written with ``upsert``.

As a publish target (:mod:`reembed.migrate.sinks`): the vectors go into ``<collection>_v<N>``, created with the
``space`` of the URI (``&space=cosine|l2|ip``), else the app collection's, else cosine for a normalized model.
Chroma has no aliases; its equivalent is a rename (``Collection.modify(name=...)`` keeps the data): :meth:`swap`
renames the app's collection to its backup name and the new one to the app's name, :meth:`rollback` back."""

from __future__ import annotations

import os
import re
import time
from typing import Any, Iterator

import numpy as np

from reembed.errors import ExportError, MigrationError
from reembed.migrate.stores.base import Batch, Result, Store, StoreURI, matrix, page_size_checked

# Collection metadata a published collection carries (Chroma metadata values are scalars).
META_VERSION, META_MODEL, META_FINGERPRINT, META_DIMENSION = ("reembed_version", "reembed_model",
                                                             "reembed_fingerprint", "reembed_dimension")


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


    # -- publish target (reembed.migrate.sinks) ----------------------------------------------------

    @staticmethod
    def base_name(src: StoreURI) -> str:
        name = src.option("collection", "")
        if not name:
            raise MigrationError(f"{src.shown}: name the app's collection, e.g. ?collection=docs")
        return name

    @staticmethod
    def concurrent(src: StoreURI) -> bool:
        """A server takes parallel writers; a persistent folder is written by this process alone."""
        return bool(src.host)

    @classmethod
    def taken_names(cls, src: StoreURI) -> list[str]:
        """Every collection name, plus ``<base>_v<N>`` for the version the app's collection records."""
        base = cls.base_name(src)
        client = _target_client(src)
        names = _names(client)
        return names + ([f"{base}_v{_version_of(client, base)}"] if base in names else [])

    @classmethod
    def open_target(cls, src: StoreURI, name: str, *, dim: int, normalized: bool, about: dict[str, Any]) -> "ChromaStore":
        """The versioned collection ``name`` (created if missing), ready for ``upsert``."""
        client = _target_client(src)
        base = cls.base_name(src)
        space = src.option("space")
        if space is None and base in _names(client):
            app = client.get_collection(base, embedding_function=None)
            space = (app.metadata or {}).get("hnsw:space") or _configured_space(app)
        space = space or ("cosine" if normalized else "l2")
        if space not in ("cosine", "l2", "ip"):
            raise MigrationError(f"{src.shown}: space {space!r} is not a Chroma space; use cosine, l2 or ip")
        meta = {"hnsw:space": space, META_VERSION: int(about["version"]), META_MODEL: str(about.get("model") or ""),
                META_FINGERPRINT: str(about.get("fingerprint") or ""), META_DIMENSION: int(dim)}
        try:
            col = client.get_or_create_collection(name, metadata=meta, embedding_function=None)
        except Exception as e:  # chromadb's errors differ by version (a bad name, a server refusing)
            raise MigrationError(f"{src.shown}: cannot create Chroma collection {name!r} ({type(e).__name__}: "
                                 f"{_first_line(e)})") from e
        store = cls(col, uri=src.uri, name="target")
        got = col.get(limit=1, include=["embeddings"]).get("embeddings")
        if got is not None and len(got) and len(got[0]) != dim:
            raise MigrationError(f"{src.shown}: collection {name!r} already holds {len(got[0])}-d vectors, the output "
                                 f"{dim}-d; delete it or publish from the output it was made from")
        store._dim = dim
        return store

    def count(self) -> int:
        return int(self.handle.count())

    @staticmethod
    def written_elsewhere(src: StoreURI) -> None:
        """Forget this process's view of a local folder that another process (publish's writer) has written:
        chromadb keeps one system per folder per process, whose HNSW readers do not see another process's
        writes (a read then fails or misses documents). The next client reads the folder as it is on disk."""
        if not src.host:
            from chromadb.api.client import SharedSystemClient

            SharedSystemClient.clear_system_cache()

    @classmethod
    def swap(cls, src: StoreURI, name: str) -> dict[str, Any]:
        """Make ``name`` the app's collection: app ``docs`` -> ``docs_v<its version, 0 if not reembed's>``,
        then ``name`` -> ``docs``. Returns the renames and the window during which no ``docs`` existed."""
        base = cls.base_name(src)
        client = _target_client(src)
        names = _names(client)
        if name not in names:
            if base in names and name == f"{base}_v{_version_of(client, base)}":  # swapped in already
                return {"renames": [], "window_seconds": 0.0, "collection": base, "model": _model_of(client, base),
                        "note": f"{name!r} is already the app's collection {base!r}"}
            raise MigrationError(f"{src.shown}: no collection {name!r} to swap in (collections: {', '.join(names) or 'none'})")
        renames: list[list[str]] = []
        gone = None
        if base in names:
            backup = f"{base}_v{_version_of(client, base)}"
            if backup in names:
                raise MigrationError(f"{src.shown}: cannot move {base!r} aside: {backup!r} already exists; rename or "
                                     "delete one of them first")
            client.get_collection(base, embedding_function=None).modify(name=backup)
            gone = time.monotonic()
            renames.append([base, backup])
        client.get_collection(name, embedding_function=None).modify(name=base)
        window = time.monotonic() - gone if gone is not None else 0.0
        renames.append([name, base])
        return {"renames": renames, "window_seconds": round(window, 6), "collection": base,
                "model": _model_of(client, base), "note": f"Chroma has no aliases: the app's name {base!r} "
                f"was absent for {window * 1000:.1f} ms between the two renames"}

    @classmethod
    def rollback(cls, src: StoreURI) -> dict[str, Any]:
        """Undo :meth:`swap`: the app's ``docs`` (version v) goes back to ``docs_v<v>``, and the highest
        ``docs_v<k>`` below v (``docs_v0``: the collection from before reembed) becomes ``docs`` again."""
        base = cls.base_name(src)
        client = _target_client(src)
        names = _names(client)
        if base not in names:
            raise MigrationError(f"{src.shown}: no collection {base!r} to roll back")
        current = _version_of(client, base)
        older = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(re.escape(base) + r"_v(\d+)", n))
                       and int(m.group(1)) < current)
        if not older:
            raise MigrationError(f"{src.shown}: {base!r} is version {current} and no earlier {base}_v<N> exists to "
                                 "roll back to")
        return cls.swap(src, f"{base}_v{older[-1]}")


def _target_client(src: StoreURI):
    if not src.host and src.path not in ("", "/"):
        os.makedirs(src.path, exist_ok=True)  # a new persistent folder for a publish
    return _client(src)


def _names(client) -> list[str]:
    return [getattr(c, "name", c) for c in client.list_collections()]


def _model_of(client, name: str) -> str | None:
    return (client.get_collection(name, embedding_function=None).metadata or {}).get(META_MODEL)


def _version_of(client, name: str) -> int:
    """The reembed version a collection records; 0 for one reembed did not make."""
    meta = client.get_collection(name, embedding_function=None).metadata or {}
    try:
        return int(meta.get(META_VERSION, 0))
    except (TypeError, ValueError):
        return 0


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
