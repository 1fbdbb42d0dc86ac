"""Export (back up) the old vector store in reembed's input format: the backup *is* the job's input.

    reembed export --from "chroma:///data/chroma?collection=docs" --to s3://bucket/backup/docs/

writes ``part-00000.parquet``, ``part-00001.parquet``, ... with the columns ``id`` (string), ``text``
(string, null where the store kept none), one column per metadata key, and ``old_embedding``
(``fixed_size_list<float32>[dim]``), plus ``_export.json`` (source, rows, dimension, metric, parts with
sha256). ``reembed run --input`` that folder reads the parts and skips the ``_``-prefixed summary.

Sources (a URI each; secrets come from the environment, never from the URI):

=========================================================  ===============================================
``chroma:///path?collection=docs``                         Chroma persistent folder (paged ``get``)
``chroma://host:8000?collection=docs[&ssl=true]``          Chroma HTTP server; ``CHROMA_API_KEY`` if set
``qdrant:///path?collection=docs``                         Qdrant embedded (local) storage folder
``qdrant://host:6333?collection=docs`` / ``qdrants://``    Qdrant server (http / https); ``QDRANT_API_KEY``
``faiss:///path/index.faiss?docstore=docs.parquet``        FAISS index file + docstore (Parquet or JSONL)
``pinecone://INDEX?namespace=ns[&host=URL]``               Pinecone (list ids, fetch); ``PINECONE_API_KEY``
``weaviate://host:8080/Collection[?grpc_port=50051]``      Weaviate v4 client (cursor iterator)
``weaviate+cloud://cluster.weaviate.cloud/Collection``     Weaviate Cloud; ``WEAVIATE_API_KEY``
=========================================================  ===============================================

Common options: ``text_field`` (payload / metadata / property holding the text, default ``text``),
``id_field`` (take the document id from that field instead of the store's own id), ``vector`` (which
named vector, where a store has several). FAISS docstore rows describe index positions in order, or
carry a ``position`` column with the FAISS label (what ``add_with_ids`` was given).

Chroma, Qdrant (embedded) and FAISS are exercised for real by the tests. Pinecone and Weaviate are
written against their official clients (``pinecone`` >= 5, ``weaviate-client`` >= 4) but no server of
either was available when this was written, so those two paths have not been run against a live store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.manifest import now
from reembed.storage import Location, StorageError
from reembed.errors import ExportError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

OLD_EMBEDDING = "old_embedding"
TEXT = "text"
EXPORT_META = "_export.json"
KINDS = ("chroma", "qdrant", "faiss", "pinecone", "weaviate")
SCHEMES = {"chroma": "chroma", "qdrant": "qdrant", "qdrants": "qdrant", "faiss": "faiss",
           "pinecone": "pinecone", "weaviate": "weaviate", "weaviate+cloud": "weaviate"}
_RESERVED = (S.ID, TEXT, OLD_EMBEDDING)
_SECRET_PARAMS = ("api_key", "apikey", "key", "token", "password", "secret")
_ENV_KEYS = {"chroma": "CHROMA_API_KEY", "qdrant": "QDRANT_API_KEY", "pinecone": "PINECONE_API_KEY",
             "weaviate": "WEAVIATE_API_KEY"}


@dataclass
class Batch:
    """One page of documents read from a store."""

    ids: list[str]
    texts: list[str | None]
    metadata: list[dict[str, Any]]
    vectors: np.ndarray  # (n, dim) float32

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Source:
    """A parsed source URI: a server (``host[:port]``) or a local ``path``, and a collection / index name."""

    kind: str
    uri: str
    scheme: str
    host: str
    path: str
    name: str  # collection / index name ('' for FAISS)
    options: dict[str, str] = field(default_factory=dict)

    def option(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)


# ---------------------------------------------------------------------------------------------------
# Public API


def is_store_uri(uri: str) -> bool:
    return urlsplit(uri).scheme in SCHEMES


def parse_source(uri: str) -> Source:
    """Parse a store URI (see the module docstring), refusing secrets and unknown schemes."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ExportError(f"{uri}: unknown store scheme {scheme!r}; expected one of "
                          f"{', '.join(sorted(SCHEMES))}://")
    kind = SCHEMES[scheme]
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    for key in options:
        if key.lower() in _SECRET_PARAMS:
            env = _ENV_KEYS.get(kind, "the environment")
            raise ExportError(f"{_redact(uri)}: secrets never go in a URI (parameter {key!r}); set {env} instead")
    host = parts.netloc
    path = parts.path
    if kind in ("chroma", "qdrant"):
        name = options.pop("collection", "")
        if not name:
            raise ExportError(f"{uri}: name the collection, e.g. {scheme}://{host}{path or '/path'}?collection=docs")
        if host and path not in ("", "/"):
            raise ExportError(f"{uri}: a server URI has no path ({scheme}://host:port?collection=...); "
                              f"for a local folder use {scheme}:///abs/path")
        if not host and path in ("", "/"):
            raise ExportError(f"{uri}: give a server (host:port) or a local folder ({scheme}:///abs/path)")
        path = "" if host else path
    elif kind == "faiss":
        if host:
            raise ExportError(f"{uri}: FAISS indexes are local files: faiss:///abs/path/index.faiss?docstore=...")
        name = ""
        if not options.get("docstore"):
            raise ExportError(f"{uri}: a FAISS index holds only vectors; add ?docstore=FILE (Parquet or JSONL "
                              "with id, text and optionally position) to map positions to documents")
    elif kind == "pinecone":
        name, host, path = host or path.strip("/"), "", ""
        if not name:
            raise ExportError(f"{uri}: name the index, e.g. pinecone://my-index?namespace=ns")
    else:  # weaviate
        name, path = path.strip("/"), ""
        if not host or not name or "/" in name:
            raise ExportError(f"{uri}: expected weaviate://host:port/Collection (or weaviate+cloud://cluster/Collection)")
    return Source(kind=kind, uri=uri, scheme=scheme, host=host, path=path, name=name, options=options)


def iter_batches(uri: str | Source, page_size: int = 1000) -> Iterator[Batch]:
    """Read every document of a store, one page at a time, with its text, metadata and vector."""
    src = uri if isinstance(uri, Source) else parse_source(uri)
    if page_size < 1:
        raise ExportError(f"page size must be >= 1, got {page_size}")
    if src.kind == "chroma":
        collection = open_chroma(src)
        yield from chroma_batches(collection, page_size)
    elif src.kind == "qdrant":
        client = open_qdrant(src)
        try:
            yield from qdrant_batches(client, src.name, page_size, text_field=src.option("text_field", TEXT),
                                      id_field=src.option("id_field"), vector=src.option("vector"))
        finally:
            client.close()
    elif src.kind == "faiss":
        index = read_faiss_index(src.path)
        docstore = read_docstore(docstore_path(src))
        yield from faiss_batches(index, docstore, page_size, id_column=src.option("id_field", S.ID),
                                 text_column=src.option("text_field", TEXT))
    elif src.kind == "pinecone":
        index = open_pinecone(src)
        yield from pinecone_batches(index, src.option("namespace", ""), page_size,
                                    text_field=src.option("text_field", TEXT), id_field=src.option("id_field"))
    else:
        client = open_weaviate(src)
        try:
            collection = client.collections.use(src.name) if hasattr(client.collections, "use") else client.collections.get(src.name)
            yield from weaviate_batches(collection, page_size, text_field=src.option("text_field", TEXT),
                                        id_field=src.option("id_field"), vector=src.option("vector"))
        finally:
            client.close()


def export(uri: str, to_uri: str, page_size: int = 1000, part_rows: int = 100_000, overwrite: bool = False) -> dict[str, Any]:
    """Export the store at ``uri`` into ``to_uri`` (any storage URI); returns the ``_export.json`` summary."""
    src = parse_source(uri)
    out = Location.from_uri(to_uri)
    _prepare_target(out, overwrite)
    t0 = time.monotonic()
    writer = PartWriter(out, part_rows)
    if src.kind == "faiss":  # read a (possibly large) index file once, not once to describe and once to read
        index = read_faiss_index(src.path)
        info = {"metric": _faiss_metric(index), "lossy": _faiss_is_lossy(index)}
        batches = faiss_batches(index, read_docstore(docstore_path(src)), page_size,
                                id_column=src.option("id_field", S.ID), text_column=src.option("text_field", TEXT))
    else:
        info = describe_source(src)
        batches = iter_batches(src, page_size)
    missing_text = 0
    for batch in batches:
        missing_text += sum(t is None for t in batch.texts)
        writer.add(batch)
    parts = writer.close()
    out.delete_dir("_tmp")  # publish's staging folder, empty once every part is in place
    rows = sum(p["rows"] for p in parts)
    secs = time.monotonic() - t0
    summary = {
        "format": 1,
        "source": _redact(uri),
        "kind": src.kind,
        "collection": src.name,
        **info,
        "dimension": writer.dim,
        "rows": rows,
        "text_missing": missing_text,
        "columns": writer.schema.names if writer.schema is not None else [],
        "parts": parts,
        "exported_at": now(),
        "seconds": round(secs, 3),
    }
    out.write_bytes(json.dumps(summary, indent=1).encode(), EXPORT_META)
    size = sum(p["bytes"] for p in parts)
    log.info("export: %d rows, %d bytes, %.1f s, %.1f rows/s (%s -> %s, %d parts, %d without text)",
             rows, size, secs, rows / secs if secs else 0.0, summary["source"], out.display(), len(parts), missing_text)
    if missing_text:
        log.warning("%d documents have no text in the store; `reembed run` will dead-letter them (null_text)", missing_text)
    return summary


def describe_source(src: Source) -> dict[str, Any]:
    """What is known about the store's vectors before reading them (metric, lossy reconstruction)."""
    info: dict[str, Any] = {"metric": None, "lossy": False}
    if src.kind == "chroma":
        col = open_chroma(src)
        meta = col.metadata or {}
        info["metric"] = meta.get("hnsw:space") or _chroma_space(col) or "l2"
    elif src.kind == "faiss":
        index = read_faiss_index(src.path)
        info.update(metric=_faiss_metric(index), lossy=_faiss_is_lossy(index))
    elif src.kind == "qdrant":
        client = open_qdrant(src)
        try:
            params = client.get_collection(src.name).config.params.vectors
            if isinstance(params, dict):
                name = src.option("vector") or (next(iter(params)) if len(params) == 1 else None)
                params = params.get(name) if name else None
            info["metric"] = str(params.distance.value).lower() if params is not None else None
        finally:
            client.close()
    return info


# ---------------------------------------------------------------------------------------------------
# Chroma


def open_chroma(src: Source):
    """A Chroma collection, opened without an embedding function (Chroma would otherwise fetch a model)."""
    try:
        import chromadb
    except ImportError as e:
        raise ExportError("reading Chroma needs the chromadb package: pip install chromadb==1.5.9") from e
    if src.host:
        host, _, port = src.host.partition(":")
        headers = {}
        if os.environ.get("CHROMA_API_KEY"):
            headers["x-chroma-token"] = os.environ["CHROMA_API_KEY"]
        kwargs: dict[str, Any] = {}
        for key in ("tenant", "database"):
            if src.option(key):
                kwargs[key] = src.option(key)
        client = chromadb.HttpClient(host=host, port=int(port or 8000), ssl=src.option("ssl", "false") == "true",
                                     headers=headers or None, **kwargs)
    else:
        if not os.path.isdir(src.path):
            raise ExportError(f"{src.uri}: no Chroma folder at {src.path}")
        client = chromadb.PersistentClient(path=src.path)
    try:
        return client.get_collection(src.name, embedding_function=None)
    except Exception as e:  # chromadb raises NotFoundError / ValueError / InvalidCollectionException by version
        names = [getattr(c, "name", c) for c in client.list_collections()]
        raise ExportError(f"{src.uri}: no Chroma collection {src.name!r} (collections: {', '.join(names) or 'none'}) "
                          f"({type(e).__name__})") from e


def chroma_batches(collection, page_size: int) -> Iterator[Batch]:
    """Page through a Chroma collection with ``get(limit, offset)``; checks the total against ``count()``."""
    expected = collection.count()
    offset = seen = 0
    while True:
        page = collection.get(limit=page_size, offset=offset, include=["embeddings", "documents", "metadatas"])
        ids = list(page["ids"])
        if not ids:
            break
        vectors = _matrix(page["embeddings"], ids, f"chroma collection {collection.name}")
        metas = page.get("metadatas") or [None] * len(ids)
        docs = page.get("documents") or [None] * len(ids)
        yield Batch(ids=[str(i) for i in ids], texts=list(docs), metadata=[dict(m or {}) for m in metas], vectors=vectors)
        seen += len(ids)
        offset += len(ids)
        if len(ids) < page_size:
            break
    if seen != expected:
        raise ExportError(f"chroma collection {collection.name}: read {seen} documents but count() is {expected}; "
                          "the collection changed during the export - stop writers and export again")


def _chroma_space(col) -> str | None:
    cfg = getattr(col, "configuration", None) or getattr(col, "configuration_json", None) or {}
    hnsw = cfg.get("hnsw") if isinstance(cfg, dict) else None
    return (hnsw or {}).get("space") if isinstance(hnsw, dict) else None


# ---------------------------------------------------------------------------------------------------
# Qdrant


def open_qdrant(src: Source):
    from qdrant_client import QdrantClient

    if src.host:
        https = src.scheme == "qdrants"
        host, _, port = src.host.partition(":")
        client = QdrantClient(url=f"{'https' if https else 'http'}://{host}", port=int(port or 6333),
                              api_key=os.environ.get("QDRANT_API_KEY") or None, https=https)
    else:
        if not os.path.isdir(src.path):
            raise ExportError(f"{src.uri}: no Qdrant storage folder at {src.path}")
        client = QdrantClient(path=src.path)
    if not client.collection_exists(src.name):
        names = [c.name for c in client.get_collections().collections]
        client.close()
        raise ExportError(f"{src.uri}: no Qdrant collection {src.name!r} (collections: {', '.join(names) or 'none'})")
    return client


def qdrant_batches(client, collection: str, page_size: int, text_field: str = TEXT, id_field: str | None = None,
                   vector: str | None = None) -> Iterator[Batch]:
    """Scroll a Qdrant collection; the text comes from payload ``text_field``, the rest of the payload is
    metadata. Ids are the point ids (as strings) unless ``id_field`` names a payload field."""
    params = client.get_collection(collection).config.params.vectors
    with_vectors: Any = True
    if isinstance(params, dict):
        if vector is None:
            if len(params) != 1:
                raise ExportError(f"qdrant collection {collection}: several named vectors ({', '.join(params)}); "
                                  "choose one with ?vector=NAME")
            vector = next(iter(params))
        elif vector not in params:
            raise ExportError(f"qdrant collection {collection}: no vector named {vector!r} (has {', '.join(params)})")
        with_vectors = [vector]
    offset = None
    while True:
        points, offset = client.scroll(collection, limit=page_size, offset=offset, with_payload=True,
                                       with_vectors=with_vectors)
        if points:
            ids, texts, metas, rows = [], [], [], []
            for p in points:
                payload = dict(p.payload or {})
                ids.append(_field_id(payload, id_field, p.id, f"qdrant point {p.id}"))
                texts.append(_text(payload.pop(text_field, None)))
                metas.append(payload)
                v = p.vector
                if isinstance(v, dict):
                    v = v.get(vector) if vector else None
                rows.append(v)
            yield Batch(ids=ids, texts=texts, metadata=metas, vectors=_matrix(rows, ids, f"qdrant collection {collection}"))
        if offset is None:
            break


# ---------------------------------------------------------------------------------------------------
# FAISS


def read_faiss_index(path: str):
    import faiss

    if not os.path.isfile(path):
        raise ExportError(f"{path}: no FAISS index file here")
    try:
        return faiss.read_index(path)
    except RuntimeError as e:
        raise ExportError(f"{path}: not a FAISS index faiss can read ({str(e).splitlines()[0]})") from e


def read_docstore(path: str) -> pa.Table:
    """A docstore file: Parquet, or JSON Lines (one object per line)."""
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no docstore file here")
    if path.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        from reembed.storage import json_lines

        with open(path, "rb") as f:
            rows = [obj for _, obj in json_lines(f.read(), path, ExportError)]
        return pa.Table.from_pylist(rows)
    return pq.read_table(path)


def faiss_batches(index, docstore: pa.Table, page_size: int, id_column: str = S.ID, text_column: str = TEXT,
                  position_column: str = "position") -> Iterator[Batch]:
    """Reconstruct every vector of a FAISS index and join it to its document.

    Docstore row ``i`` describes the ``i``-th vector added, unless the docstore has a ``position`` column,
    which then holds the FAISS label (the id given to ``add_with_ids``, or the position for plain indexes).
    """
    import faiss

    n = int(index.ntotal)
    for col in (id_column,):
        if col not in docstore.column_names:
            raise ExportError(f"docstore has no {col!r} column (columns: {', '.join(docstore.column_names)})")
    labels, inner = faiss_labels(index)
    if position_column in docstore.column_names:
        pos = np.asarray(docstore.column(position_column).to_numpy(zero_copy_only=False), dtype=np.int64)
        row_of = {int(p): r for r, p in enumerate(pos)}
        if len(row_of) != len(pos):
            raise ExportError(f"docstore column {position_column!r} has repeated values")
        try:
            rows = np.fromiter((row_of[int(lb)] for lb in labels), dtype=np.int64, count=n)
        except KeyError as e:
            raise ExportError(f"FAISS label {e.args[0]} has no docstore row (column {position_column!r})") from None
    else:
        if docstore.num_rows != n:
            raise ExportError(f"docstore has {docstore.num_rows} rows and the index {n} vectors; without a "
                              f"{position_column!r} column row i must describe vector i")
        rows = np.arange(n, dtype=np.int64)
    if _faiss_is_lossy(index):
        log.warning("FAISS index %s stores compressed vectors: exported old embeddings are approximations",
                    type(inner).__name__)
    ivf = faiss.try_extract_index_ivf(inner) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is not None:
        ivf.make_direct_map()
    meta_cols = [c for c in docstore.column_names if c not in (id_column, text_column, position_column)]
    ids_all = docstore.column(id_column)
    texts_all = docstore.column(text_column) if text_column in docstore.column_names else None
    for start in range(0, n, page_size):
        stop = min(n, start + page_size)
        vectors = inner.reconstruct_n(start, stop - start)
        take = pa.array(rows[start:stop])
        ids = [None if v is None else str(v) for v in ids_all.take(take).to_pylist()]
        bad = [start + i for i, v in enumerate(ids) if v is None]
        if bad:
            raise ExportError(f"docstore row for FAISS position {bad[0]} has a null {id_column!r}")
        texts = texts_all.take(take).to_pylist() if texts_all is not None else [None] * len(ids)
        metas = docstore.select(meta_cols).take(take).to_pylist() if meta_cols else [{} for _ in ids]
        yield Batch(ids=ids, texts=[_text(t) for t in texts], metadata=metas,
                    vectors=np.ascontiguousarray(vectors, dtype=np.float32))


def faiss_labels(index):
    """(labels of the stored vectors in position order, the index that stores them)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64), faiss.downcast_index(index.index)
    return np.arange(index.ntotal, dtype=np.int64), index


def _faiss_metric(index) -> str:
    return {0: "inner_product", 1: "l2"}.get(int(index.metric_type), f"faiss metric {int(index.metric_type)}")


def _faiss_is_lossy(index) -> bool:
    import faiss

    _, inner = faiss_labels(index)
    name = type(inner).__name__
    if isinstance(inner, faiss.IndexHNSW):
        name = type(faiss.downcast_index(inner.storage)).__name__
    return any(tag in name for tag in ("PQ", "SQ", "ScalarQuantizer", "LSH", "RaBitQ", "Residual"))


def docstore_path(src: Source) -> str:
    path = src.options["docstore"]
    if path.startswith("file://"):
        path = path[len("file://"):]
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(src.path), path)


# ---------------------------------------------------------------------------------------------------
# Pinecone (official client; not run here: no server)


def open_pinecone(src: Source):
    try:
        from pinecone import Pinecone
    except ImportError as e:
        raise ExportError("reading Pinecone needs the official client: pip install pinecone") from e
    key = os.environ.get("PINECONE_API_KEY")
    if not key:
        raise ExportError(f"{src.uri}: set PINECONE_API_KEY in the environment")
    kwargs = {"host": src.option("control_host")} if src.option("control_host") else {}
    pc = Pinecone(api_key=key, **kwargs)
    return pc.Index(name=src.name, host=src.option("host") or "")


def pinecone_batches(index, namespace: str, page_size: int, text_field: str = TEXT, id_field: str | None = None,
                     fetch_size: int = 100) -> Iterator[Batch]:
    """List every id of a (serverless) Pinecone namespace page by page, then fetch the vectors in batches of
    ``fetch_size`` (ids travel in the query string). Text comes from metadata ``text_field``."""
    for page in index.list(namespace=namespace, limit=min(page_size, 100)):
        # pinecone >= 8 yields ListResponse pages (.vectors of items with .id); 5-7 yield lists of ids.
        page_ids = [v.id for v in page.vectors] if hasattr(page, "vectors") else [str(v) for v in page]
        for start in range(0, len(page_ids), fetch_size):
            chunk = page_ids[start:start + fetch_size]
            found = index.fetch(ids=chunk, namespace=namespace).vectors
            missing = [i for i in chunk if i not in found]
            if missing:
                log.warning("pinecone: %d listed ids vanished before fetch (first: %s)", len(missing), missing[0])
            ids, texts, metas, rows = [], [], [], []
            for vid in chunk:
                if vid not in found:
                    continue
                vec = found[vid]
                meta = dict(getattr(vec, "metadata", None) or {})
                ids.append(_field_id(meta, id_field, vid, f"pinecone vector {vid}"))
                texts.append(_text(meta.pop(text_field, None)))
                metas.append(meta)
                rows.append(list(vec.values))
            if ids:
                yield Batch(ids=ids, texts=texts, metadata=metas, vectors=_matrix(rows, ids, "pinecone"))


# ---------------------------------------------------------------------------------------------------
# Weaviate (official v4 client; not run here: no server)


def open_weaviate(src: Source):
    try:
        import weaviate
        from weaviate.classes.init import Auth
    except ImportError as e:
        raise ExportError("reading Weaviate needs the official v4 client: pip install weaviate-client") from e
    key = os.environ.get("WEAVIATE_API_KEY")
    auth = Auth.api_key(key) if key else None
    if src.scheme == "weaviate+cloud":
        if not key:
            raise ExportError(f"{src.uri}: set WEAVIATE_API_KEY in the environment")
        return weaviate.connect_to_weaviate_cloud(cluster_url=src.host, auth_credentials=auth)
    host, _, port = src.host.partition(":")
    secure = src.option("secure", "false") == "true"
    return weaviate.connect_to_custom(
        http_host=host, http_port=int(port or 8080), http_secure=secure,
        grpc_host=src.option("grpc_host", host), grpc_port=int(src.option("grpc_port", "50051")), grpc_secure=secure,
        auth_credentials=auth,
    )


def weaviate_batches(collection, page_size: int, text_field: str = TEXT, id_field: str | None = None,
                     vector: str | None = None) -> Iterator[Batch]:
    """Walk a Weaviate collection with the v4 cursor iterator (``collection.iterator``); ids are object
    uuids unless ``id_field`` names a property. ``vector`` picks a named vector (default: the only one)."""
    ids, texts, metas, rows = [], [], [], []
    for obj in collection.iterator(include_vector=True, cache_size=page_size):
        props = dict(obj.properties or {})
        v = obj.vector
        if isinstance(v, dict):  # v4 returns {name: values}; the unnamed vector is "default"
            if vector is None:
                if len(v) != 1:
                    raise ExportError(f"weaviate object {obj.uuid}: several named vectors ({', '.join(v)}); "
                                      "choose one with ?vector=NAME")
                v = next(iter(v.values()))
            else:
                v = v.get(vector)
        ids.append(_field_id(props, id_field, obj.uuid, f"weaviate object {obj.uuid}"))
        texts.append(_text(props.pop(text_field, None)))
        metas.append(props)
        rows.append(v)
        if len(ids) == page_size:
            yield Batch(ids=ids, texts=texts, metadata=metas, vectors=_matrix(rows, ids, "weaviate"))
            ids, texts, metas, rows = [], [], [], []
    if ids:
        yield Batch(ids=ids, texts=texts, metadata=metas, vectors=_matrix(rows, ids, "weaviate"))


# ---------------------------------------------------------------------------------------------------
# Writing parts


class PartWriter:
    """Buffers batches into Parquet parts of ``part_rows`` rows, published atomically.

    Metadata keys become columns. A key that first appears in a later part, or a column whose type widens
    (int -> float, anything mixed -> string), makes :meth:`close` rewrite the earlier parts to the final
    schema, so every part of an export has the same columns and types.
    """

    def __init__(self, loc: Location, part_rows: int = 100_000):
        if part_rows < 1:
            raise ExportError(f"rows per part must be >= 1, got {part_rows}")
        self.loc = loc
        self.part_rows = part_rows
        self.dim: int | None = None
        self.schema: pa.Schema | None = None
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._parts: list[dict[str, Any]] = []
        self._seen: set[str] = set()

    def add(self, batch: Batch) -> None:
        if not len(batch):
            return
        dim = batch.vectors.shape[1]
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise ExportError(f"document {batch.ids[0]!r} has a {dim}-d vector, earlier ones {self.dim}-d")
        dupes = [i for i in batch.ids if i in self._seen]
        if dupes:
            log.warning("export: %d repeated ids (first %r); `reembed run` dead-letters the repeats", len(dupes), dupes[0])
        self._seen.update(batch.ids)
        table = batch_table(batch)
        while table.num_rows:
            room = self.part_rows - self._buffered
            head, table = table.slice(0, room), table.slice(room)
            self._buffer.append(head)
            self._buffered += head.num_rows
            if self._buffered == self.part_rows:
                self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._buffered:
            self._flush()
        for part in self._parts:
            if part.pop("_schema") != self.schema:
                table = pq.read_table(pa.BufferReader(self.loc.read_bytes(part["path"])))
                self._publish(conform(table, self.schema), part)
        return self._parts

    def _flush(self) -> None:
        schema = self.schema or self._buffer[0].schema
        for t in self._buffer:
            schema = unify(schema, t.schema)
        self.schema = schema
        table = pa.concat_tables([conform(t, schema) for t in self._buffer])
        self._buffer, self._buffered = [], 0
        part = {"path": f"part-{len(self._parts):05d}.parquet"}
        self._publish(table, part)
        self._parts.append(part)

    def _publish(self, table: pa.Table, part: dict[str, Any]) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        rows = table.num_rows

        def verify(fs, path: str) -> None:
            with fs.open_input_file(path) as f:
                got = pq.ParquetFile(f).metadata.num_rows
            if got != rows:
                raise StorageError(f"{self.loc.display(part['path'])}: written file has {got} rows, expected {rows}")

        self.loc.publish(data, part["path"], verify=verify)
        part.update(rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), _schema=table.schema)


def batch_table(batch: Batch) -> pa.Table:
    """A batch as an Arrow table: id, text, metadata columns (sorted by name), old_embedding."""
    keys = sorted({k for m in batch.metadata for k in m})
    columns: dict[str, pa.Array] = {S.ID: pa.array(batch.ids, pa.string()), TEXT: pa.array(batch.texts, pa.string())}
    for key in keys:
        name = f"meta_{key}" if key in _RESERVED else key
        columns[name] = metadata_column([m.get(key) for m in batch.metadata])
    columns[OLD_EMBEDDING] = S.embedding_array(batch.vectors)
    return pa.table(columns)


def metadata_column(values: Sequence[Any]) -> pa.Array:
    """Scalars keep their type; nested values become JSON strings; a column of mixed types becomes strings."""
    values = [json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def unify(a: pa.Schema, b: pa.Schema) -> pa.Schema:
    """The schema both ``a`` and ``b`` conform to: union of columns, widened types, strings when types clash;
    id and text first, old_embedding last."""
    fields: dict[str, pa.Field] = {f.name: f for f in a}
    for f in b:
        if f.name not in fields:
            fields[f.name] = f
        elif fields[f.name].type != f.type:
            if f.name == OLD_EMBEDDING:
                raise ExportError(f"old_embedding type changed from {fields[f.name].type} to {f.type}")
            try:
                fields[f.name] = pa.unify_schemas([pa.schema([fields[f.name]]), pa.schema([f])],
                                                  promote_options="permissive").field(f.name)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                fields[f.name] = pa.field(f.name, pa.string())
    meta = sorted(n for n in fields if n not in _RESERVED)
    return pa.schema([fields[S.ID], fields[TEXT], *[fields[n] for n in meta], fields[OLD_EMBEDDING]])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones null, others cast."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _prepare_target(out: Location, overwrite: bool) -> None:
    existing = [i.path for i in out.list() if os.path.basename(i.path).startswith("part-") or i.path.endswith(EXPORT_META)]
    if not existing:
        return
    if not overwrite:
        raise ExportError(f"{out.display()}: already holds an export ({len(existing)} files); pass --overwrite to "
                          "replace it, or export somewhere else")
    for path in existing:
        out.fs.delete_file(path)


def _matrix(rows: Any, ids: Sequence[str], where: str) -> np.ndarray:
    """Rows of vectors as a float32 (n, dim) matrix; names the first document without a usable vector."""
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return np.ascontiguousarray(rows, dtype=np.float32)
    if rows is None:
        raise ExportError(f"{where}: the store returned no vectors (document {ids[0]!r})")
    dims = set()
    for i, r in zip(ids, rows):
        if r is None or (hasattr(r, "__len__") and len(r) == 0):
            raise ExportError(f"{where}: document {i!r} has no vector")
        if len(r) and isinstance(r[0], (list, tuple, np.ndarray)):
            raise ExportError(f"{where}: document {i!r} has a multi-vector; only single vectors can be exported")
        dims.add(len(r))
    if len(dims) > 1:
        raise ExportError(f"{where}: vectors of different sizes ({sorted(dims)}) in one page (first id {ids[0]!r})")
    return np.asarray(rows, dtype=np.float32).reshape(len(ids), -1)


def _field_id(fields: dict[str, Any], id_field: str | None, default: Any, where: str) -> str:
    if id_field is None:
        return str(default)
    value = fields.pop(id_field, None)
    if value is None:
        raise ExportError(f"{where}: no {id_field!r} field to take the document id from")
    return str(value)


def _text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def _redact(uri: str) -> str:
    """The URI without user info (``user:pass@``), for logs and summaries."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
