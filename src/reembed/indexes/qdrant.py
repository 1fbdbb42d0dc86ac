"""Qdrant: versioned collections ``<name>-v<N>`` loaded in bulk mode, and atomic alias swap / rollback.

A target is either a server URL (``http://`` or ``https://``; TLS follows the scheme; the API key comes
from the ``QDRANT_API_KEY`` environment variable only, never from a config file, and is never logged or
recorded) or a folder holding an embedded Qdrant (``QdrantClient(path=...)``). Embedded Qdrant takes a
file lock: one process at a time may open a folder, so it is loaded by a single writer.

Every collection carries collection metadata (Qdrant >= 1.16) under ``"reembed"``: model name,
revision, dimension, fingerprint, the output it was built from, the expected point count and a ``state``
(``loading`` until the count is verified, then ``ready``). Point ids are uuid5 of the document ids, so
re-uploading a shard overwrites its points instead of duplicating them; the document id itself is kept in
the payload under ``"id"``, beside the passthrough columns.

Loading follows Qdrant's bulk-upload guide: the collection is created with HNSW indexing deferred
(``hnsw_config.m = 0``, ``optimizers_config.indexing_threshold = 0``), the points are upserted in batches
(``wait=False`` except for each shard's last batch), then indexing is switched back on.

An alias swap deletes and re-creates the alias in one ``update_collection_aliases`` call, which Qdrant
applies atomically, so readers of the alias see the old collection or the new one and never nothing. The
collection an alias left is remembered in the new collection's metadata (``reembed_previous:<alias>``),
which is what ``rollback`` goes back to.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import uuid
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa

from reembed import schema as S
from reembed.errors import QdrantError, SwapRefused  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

API_KEY_ENV = "QDRANT_API_KEY"
ALLOW_HTTP_ENV = "REEMBED_QDRANT_ALLOW_HTTP"
DEFAULT_PORT = 6333  # qdrant-client's REST port when the URL names none
META = "reembed"
PAYLOAD_ID = "id"
# Columns an export of an app's collection carries so the new collection keeps its payloads and point ids.
PAYLOAD_COLUMN = "_payload"
POINT_ID_COLUMN = "_point_id"
# Fixed namespace: the same document id maps to the same point id in every collection and every run.
NAMESPACE = uuid.UUID("5b0f8a39-3c53-4d6c-9a57-0c4be3d0e1a7")
# Above this many points an embedded target is slow (qdrant-client's local mode, for tests and small data:
# ~90 points/s at 1024-d measured, bench/RESULTS.md): the load says how long it will take and how to use a server.
EMBEDDED_MAX_POINTS = 100_000
# Qdrant's defaults, restored when a bulk load ends.
HNSW_M = 16
INDEXING_THRESHOLD = 10_000

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# Targets


def is_server(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def describe(target: str) -> str:
    """The target for logs and the manifest: a URL without credentials or query, or an absolute path."""
    if is_server(target):
        parts = urlsplit(target)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return os.path.abspath(os.path.expanduser(target))


def connect(target: str, timeout: int = 60, *, named_by_user: bool = True, grpc: bool = False):
    """A client for a server URL or an embedded Qdrant folder: the one place a Qdrant client is made.

    The API key (``QDRANT_API_KEY``) goes only to a server the user named (a flag, ``QDRANT_URL``, their own
    config): ``named_by_user=False``, for a target read from a manifest or from collection metadata,
    connects without it. A key is never sent over plain http to a host other than loopback unless
    ``REEMBED_QDRANT_ALLOW_HTTP=1`` (refused before any connection). A server is probed with one short TCP
    connect first, so a URL where nothing listens is one :class:`QdrantError` at once, not minutes of
    retries; the load's own calls keep retrying transient errors (:func:`call_with_retry`).

    ``grpc``: talk gRPC when the server offers it (on :func:`grpc_port`, Qdrant's REST port + 1: 6334 beside
    6333), which costs the client less per point than JSON; otherwise, or if the port does not answer
    gRPC, HTTP as usual. Embedded Qdrant has no transport and ignores it.
    """
    from qdrant_client import QdrantClient

    if is_server(target):
        key = (os.environ.get(API_KEY_ENV) or None) if named_by_user else None
        if key:
            _refuse_plain_http(target)
        _probe(target)
        if grpc:
            client = _grpc_client(target, key, timeout)
            if client is not None:
                return client
        return QdrantClient(url=target, api_key=key, timeout=timeout)
    path = describe(target)
    with _EMBEDDED_LOCK:
        shared = _EMBEDDED.get(path)
        if shared is None:
            try:
                shared = _EMBEDDED[path] = _SharedEmbedded(QdrantClient(path=path), path)
            except RuntimeError as e:
                if "already accessed" in str(e):
                    raise QdrantError(
                        f"{path}: this embedded Qdrant is open in another process (an index build still running, or "
                        "the app itself?). Embedded Qdrant allows one process at a time; stop it or wait for it, or "
                        "use a Qdrant server."
                    ) from e
                raise
        shared.users += 1
        return _Handle(shared)


class _SharedEmbedded:
    """One ``QdrantClient(path=...)`` per folder and process (embedded Qdrant locks its folder, so a second
    open in the same process would fail): the old store and the new collection of one folder share it."""

    def __init__(self, client, path: str):
        self.client = client
        self.path = path
        self.users = 0


class _Handle:
    """What :func:`connect` returns for an embedded folder: the shared client, whose ``close`` closes the
    folder only when its last user closes it (so another process, an index build, can open it next)."""

    def __init__(self, shared: _SharedEmbedded):
        self._shared = shared
        self._closed = False

    def __getattr__(self, name: str):
        return getattr(self._shared.client, name)

    def close(self, **kwargs: Any) -> None:
        with _EMBEDDED_LOCK:
            if self._closed:
                return
            self._closed = True
            self._shared.users -= 1
            if self._shared.users == 0:
                _EMBEDDED.pop(self._shared.path, None)
                self._shared.client.close(**kwargs)


_EMBEDDED: dict[str, _SharedEmbedded] = {}
_EMBEDDED_LOCK = threading.RLock()


def grpc_port(target: str) -> int:
    """Where a server's gRPC API is: Qdrant serves it on the port after the REST port (6334 beside 6333)."""
    return (urlsplit(target).port or DEFAULT_PORT) + 1


def uses_grpc(client) -> bool:
    """Whether ``client`` talks gRPC (False for HTTP and for embedded Qdrant)."""
    return bool(client.init_options.get("prefer_grpc"))


def _grpc_client(target: str, key: str | None, timeout: int):
    """A gRPC client if the server answers gRPC on :func:`grpc_port` (one listing as the check), else None."""
    from qdrant_client import QdrantClient

    port = grpc_port(target)
    try:
        _probe(target, port=port, seconds=1.0)
    except QdrantError:
        log.info("Qdrant %s: no gRPC port at %d; loading over HTTP", describe(target), port)
        return None
    client = QdrantClient(url=target, api_key=key, timeout=timeout, prefer_grpc=True, grpc_port=port)
    try:
        client.get_collections()
    except Exception as e:  # noqa: BLE001 - whatever listens there does not answer gRPC: fall back, once
        client.close()
        log.info("Qdrant %s: port %d does not answer gRPC (%s); loading over HTTP", describe(target), port, _short(e))
        return None
    log.info("Qdrant %s: loading over gRPC (port %d)", describe(target), port)
    return client


def _refuse_plain_http(target: str) -> None:
    parts = urlsplit(target)
    if parts.scheme != "http" or _is_loopback(parts.hostname or ""):
        return
    if os.environ.get(ALLOW_HTTP_ENV, "").strip().lower() in ("1", "true", "yes"):
        log.warning("Qdrant %s: sending %s over plain http (%s=1)", describe(target), API_KEY_ENV, ALLOW_HTTP_ENV)
        return
    raise QdrantError(f"{describe(target)}: refusing to send {API_KEY_ENV} over plain http to a host other than "
                      f"this machine; use https://, or set {ALLOW_HTTP_ENV}=1 to allow it on a trusted network")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(target: str, seconds: float = 3.0, port: int | None = None) -> None:
    """One TCP connect to the server's REST port (or ``port``): refused, unknown host or no answer -> QdrantError."""
    import socket

    parts = urlsplit(target)
    host = parts.hostname or ""
    port = port or parts.port or DEFAULT_PORT
    try:
        with socket.create_connection((host, port), timeout=seconds):
            return
    except OSError as e:
        why = ("connection refused" if isinstance(e, ConnectionRefusedError)
               else "unknown host" if isinstance(e, socket.gaierror)
               else f"no answer in {seconds:g} s" if isinstance(e, TimeoutError) else type(e).__name__)
        raise QdrantError(f"{describe(target)}: cannot reach a Qdrant server at {host}:{port} ({why}); start "
                          "Qdrant there, or give the right URL with --qdrant (or QDRANT_URL)") from e


def point_id(doc_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, doc_id))


def versioned(name: str, version: int) -> str:
    return f"{name}-v{version}"


def version_of(name: str, collection: str) -> int | None:
    m = re.fullmatch(re.escape(name) + r"-v(\d+)", collection)
    return int(m.group(1)) if m else None


def collections(client) -> list[str]:
    return sorted(c.name for c in call_with_retry(client.get_collections, what="list collections").collections)


def next_version(client, name: str) -> int:
    """The next free N for ``<name>-v<N>``."""
    found = [v for v in (version_of(name, c) for c in collections(client)) if v is not None]
    return max(found, default=0) + 1


# ---------------------------------------------------------------------------------------------------
# Loading


def create_collection(client, collection: str, dim: int, meta: dict[str, Any], quantization: str = "none") -> None:
    """Create ``collection`` (cosine, ``dim``) in bulk mode, with ``meta`` stored as its metadata and the
    in-RAM vectors quantized as ``quantization`` says (:func:`quantization_config`)."""
    from qdrant_client import models

    client.create_collection(
        collection,
        vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
        hnsw_config=models.HnswConfigDiff(m=0),
        optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0),
        quantization_config=quantization_config(quantization),
        metadata={META: meta},
    )


QUANTIZATIONS = ("none", "int8", "binary")
BINARY_MIN_DIM = 1024  # Qdrant recommends binary quantization for models this wide and wider
OVERSAMPLING = 2.0  # candidates fetched by the quantized vectors per result, then rescored with the originals
INT8_QUANTILE = 0.99


def quantization_config(kind: str):
    """Qdrant's quantization for ``index.qdrant_quantization``: None (lossless), scalar int8 (bounds at the
    0.99 quantile, codes kept in RAM) or binary (one bit a dimension, in RAM); the original vectors stay on
    disk for rescoring either way. Local mode (embedded Qdrant) stores the setting and searches exactly."""
    from qdrant_client import models

    if kind == "int8":
        return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=INT8_QUANTILE, always_ram=True))
    if kind == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    if kind != "none":
        raise ValueError(f"Qdrant quantization must be one of {', '.join(QUANTIZATIONS)}, got {kind!r}")
    return None


def search_params(client, collection: str):
    """The search parameters reembed's query paths send to ``collection``: for a quantized collection on a
    server, rescoring with the original vectors over ``OVERSAMPLING`` times the candidates; else None (an
    unquantized collection needs none, and embedded Qdrant searches exactly whatever it is sent)."""
    from qdrant_client import models

    kind = (metadata(client, collection).get(META) or {}).get("quantization") or "none"
    if kind == "none" or is_embedded(client):
        return None
    return models.SearchParams(quantization=models.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING))


def is_embedded(client) -> bool:
    """Whether ``client`` is an embedded (local mode) Qdrant: a folder, no server."""
    return bool(client.init_options.get("path") or client.init_options.get("location") == ":memory:")


def upload(client, collection: str, tables: Iterable[pa.Table], batch_size: int = 256,
           passthrough: Iterable[str] = ()) -> int:
    """Upsert every row of ``tables`` (``id``, ``embedding`` and the ``passthrough`` columns) as points.

    Batches go out with ``wait=False`` so the server pipelines them; the last one waits, which (updates
    being applied in order) means every point of these tables is stored when this returns.
    """
    from qdrant_client import models

    cols = list(passthrough)
    rows = 0
    pending = None
    for table in tables:
        x = S.embedding_matrix(table.column(S.EMBEDDING))
        ids = table.column(S.ID).to_pylist()
        point_ids, payloads = points_of(table, ids, cols)
        for lo in range(0, len(ids), batch_size):
            hi = min(lo + batch_size, len(ids))
            if pending is not None:
                _upsert(client, collection, pending, wait=False)
            pending = models.Batch(ids=point_ids[lo:hi], vectors=x[lo:hi].tolist(), payloads=payloads[lo:hi])
            rows += hi - lo
    if pending is not None:
        _upsert(client, collection, pending, wait=True)
    return rows


def points_of(table: pa.Table, ids: list[str], passthrough: list[str]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The point ids and payloads of a table's rows.

    Rows exported from an app's collection (:mod:`reembed.migrate.export`) carry the point's payload as
    the app stored it (``_payload``, JSON) and its point id (``_point_id``): both are written back exactly,
    so LangChain's ``page_content``/``metadata``, LlamaIndex's ``_node_content`` and any hand-made payload
    read the same and ``get_by_ids`` finds the same ids. Other rows: ``point_id(id)`` and the document id
    beside the passthrough columns.
    """
    cols = [c for c in passthrough if c not in (PAYLOAD_COLUMN, POINT_ID_COLUMN)]
    names = set(table.column_names)
    if POINT_ID_COLUMN in passthrough and POINT_ID_COLUMN in names:
        pids = [stored_point_id(p) if p is not None else point_id(i)
                for p, i in zip(table.column(POINT_ID_COLUMN).to_pylist(), ids)]
    else:
        pids = [point_id(i) for i in ids]
    if PAYLOAD_COLUMN in passthrough and PAYLOAD_COLUMN in names:
        import json

        payloads = [json.loads(p) if p is not None else {PAYLOAD_ID: i}
                    for p, i in zip(table.column(PAYLOAD_COLUMN).to_pylist(), ids)]
    else:
        extra = table.select(cols).to_pylist() if cols else [{} for _ in ids]
        payloads = [{PAYLOAD_ID: i, **p} for i, p in zip(ids, extra)]
    return pids, payloads


def stored_point_id(value: Any) -> int | str:
    """A point id as exported (a string): an unsigned integer id stays an integer, a uuid stays a uuid."""
    text = str(value)
    return int(text) if text.isdigit() else text


def _upsert(client, collection: str, batch, wait: bool) -> None:
    call_with_retry(lambda: client.upsert(collection, points=batch, wait=wait), what=f"upsert into {collection}")


def end_bulk(client, collection: str, hnsw_m: int = HNSW_M, indexing_threshold: int = INDEXING_THRESHOLD) -> None:
    """Switch HNSW indexing back on after a bulk load (embedded Qdrant does not index and ignores this)."""
    from qdrant_client import models

    call_with_retry(lambda: client.update_collection(
        collection, hnsw_config=models.HnswConfigDiff(m=hnsw_m),
        optimizers_config=models.OptimizersConfigDiff(indexing_threshold=indexing_threshold),
    ), what=f"restore indexing on {collection}")


def count(client, collection: str) -> int:
    return call_with_retry(lambda: client.count(collection, exact=True), what=f"count {collection}").count


def metadata(client, collection: str) -> dict[str, Any]:
    info = call_with_retry(lambda: client.get_collection(collection), what=f"read {collection}")
    return dict(info.config.metadata or {})


def set_metadata(client, collection: str, values: dict[str, Any]) -> None:
    """Merge ``values`` into the collection's metadata (top-level keys are replaced)."""
    call_with_retry(lambda: client.update_collection(collection, metadata=values), what=f"update {collection}")


def dimension(client, collection: str) -> int | None:
    info = call_with_retry(lambda: client.get_collection(collection), what=f"read {collection}")
    vectors = info.config.params.vectors
    if vectors is None:
        return None
    if isinstance(vectors, dict):  # named vectors: only a single one has an unambiguous dimension
        return next(iter(vectors.values())).size if len(vectors) == 1 else None
    return vectors.size


# ---------------------------------------------------------------------------------------------------
# Versions, swap, rollback


def aliases(client) -> dict[str, str]:
    """alias -> collection."""
    resp = call_with_retry(client.get_aliases, what="list aliases")
    return {a.alias_name: a.collection_name for a in resp.aliases}


def versions(client) -> list[dict[str, Any]]:
    """Every collection with its model, dimension, point count, state and the aliases pointing at it."""
    where = aliases(client)
    out = []
    for name in collections(client):
        meta = metadata(client, name).get(META) or {}
        out.append({
            "collection": name,
            "model": meta.get("model"),
            "dimension": dimension(client, name),
            "points": count(client, name),
            "fingerprint": meta.get("fingerprint"),
            "state": meta.get("state"),
            "quantization": meta.get("quantization") or "none",
            "expected_points": meta.get("rows"),
            "created_at": meta.get("created_at"),
            "aliases": sorted(a for a, c in where.items() if c == name),
        })
    return out


def swap(client, alias: str, to: str, rows: int, dim: int, fingerprint: str | None = None) -> dict[str, Any]:
    """Point ``alias`` at collection ``to`` in one atomic call, keeping the collection it pointed at.

    Refused (nothing changed) unless ``to`` exists, finished loading, holds exactly ``rows`` points (the
    manifest's count) and has vectors of ``dim`` (the dimension of the model the alias's users query
    with), and, when both are known, was built with the model of ``fingerprint``.
    """
    names = set(collections(client))
    if to not in names:
        raise SwapRefused(f"no collection {to!r} here (collections: {', '.join(sorted(names)) or 'none'})")
    if alias in names:
        raise SwapRefused(f"{alias!r} is a collection, not an alias; Qdrant aliases cannot shadow a collection")
    meta = metadata(client, to).get(META) or {}
    if meta.get("state") != "ready":
        raise SwapRefused(f"{to}: loading did not finish (state {meta.get('state')!r}); rerun `reembed index`")
    got_dim = dimension(client, to)
    if got_dim != dim:
        raise SwapRefused(f"{to}: vectors have dimension {got_dim}, but the alias's queries are {dim}-d")
    if fingerprint and meta.get("fingerprint") and meta["fingerprint"] != fingerprint:
        raise SwapRefused(f"{to}: built with model fingerprint {meta['fingerprint']}, the output has {fingerprint}")
    got = count(client, to)
    if got != rows:
        raise SwapRefused(f"{to}: holds {got} points, the manifest committed {rows}")
    current = aliases(client).get(alias)
    if current == to:
        return {"alias": alias, "from": current, "to": to, "changed": False, "points": got, "dimension": got_dim}
    # Remember where the alias came from before moving it: a crash in between leaves only a harmless note.
    set_metadata(client, to, {f"{META}_previous:{alias}": current})
    _move_alias(client, alias, current, to)
    return {"alias": alias, "from": current, "to": to, "changed": True, "points": got, "dimension": got_dim}


def rollback(client, alias: str) -> dict[str, Any]:
    """Point ``alias`` back at the collection it pointed at before the last swap."""
    current = aliases(client).get(alias)
    if current is None:
        raise SwapRefused(f"alias {alias!r} does not exist; nothing to roll back")
    previous = metadata(client, current).get(f"{META}_previous:{alias}")
    if not previous:
        raise SwapRefused(f"{current}: no earlier collection recorded for alias {alias!r}; nothing to roll back to")
    if previous not in set(collections(client)):
        raise SwapRefused(f"alias {alias!r} came from {previous!r}, which no longer exists")
    meta = metadata(client, previous).get(META) or {}
    if meta.get("rows") is not None:
        got = count(client, previous)
        if got != meta["rows"]:
            raise SwapRefused(f"{previous}: holds {got} points, {meta['rows']} when it was built")
    _move_alias(client, alias, current, previous)
    return {"alias": alias, "from": current, "to": previous, "changed": True}


def _move_alias(client, alias: str, current: str | None, to: str) -> None:
    from qdrant_client import models

    ops: list[Any] = []
    if current is not None:
        ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
    ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=to, alias_name=alias)))
    client.update_collection_aliases(change_aliases_operations=ops)
    now = aliases(client).get(alias)
    if now != to:
        raise QdrantError(f"alias {alias!r} points at {now!r} after the swap, expected {to!r}")
    log.info("alias %s: %s -> %s", alias, current, to)


# ---------------------------------------------------------------------------------------------------
# Retries at the I/O edge


def is_retryable(exc: BaseException) -> bool:
    """429, 5xx, and a server that cannot be reached or timed out; never another 4xx."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and (exc.status_code == 429 or exc.status_code >= 500)
    if isinstance(exc, ResponseHandlingException):  # transport failures (connect, read timeout) wrapped by the client
        return True
    try:
        import httpx

        if isinstance(exc, httpx.TransportError):
            return True
    except ImportError:  # pragma: no cover
        pass
    code = getattr(exc, "code", None)  # grpc.RpcError
    if callable(code):
        try:
            return code().name in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
        except Exception:  # noqa: BLE001 - not a grpc error after all
            return False
    return False


def call_with_retry(fn: Callable[[], T], what: str, attempts: int = 8, base: float = 0.5, cap: float = 30.0,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried with exponential backoff and jitter while it fails with a retryable error."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if not is_retryable(e) or attempt == attempts:
                if _is_qdrant_error(e):  # one line for the user; the cause stays chained for -v
                    tried = f" after {attempt} attempts" if attempt > 1 else ""
                    raise QdrantError(f"Qdrant {what} failed{tried}: {_short(e)}") from e
                raise
            delay = min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            delay = max(delay, _retry_after(e))
            log.warning("Qdrant %s failed (%s); retry %d/%d in %.1f s", what, _short(e), attempt, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _is_qdrant_error(e: BaseException) -> bool:
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(e, (UnexpectedResponse, ResponseHandlingException)):
        return True
    if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):  # grpc.RpcError
        return True
    try:
        import httpx

        return isinstance(e, httpx.TransportError)
    except ImportError:  # pragma: no cover
        return False


def _retry_after(e: BaseException) -> float:
    headers = getattr(e, "headers", None)
    try:
        return min(60.0, float(headers.get("retry-after"))) if headers is not None and headers.get("retry-after") else 0.0
    except (TypeError, ValueError):
        return 0.0


def _short(e: BaseException) -> str:
    if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):  # grpc.RpcError
        try:
            return f"gRPC {e.code().name}: {e.details()}"
        except Exception:  # noqa: BLE001 - not a grpc error after all
            pass
    status = getattr(e, "status_code", None)
    if status:
        body = getattr(e, "content", b"") or b""
        body = " ".join(body.decode(errors="replace").split())[:200] if isinstance(body, bytes) else str(body)[:200]
        return f"HTTP {status}" + (f" {body}" if body and body != "{}" else "")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
