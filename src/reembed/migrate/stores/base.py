"""What every store shares: the parsed URI, a page of documents, and the small base class.

A store URI names a server (``host[:port]``) or a local ``path``, plus options in the query string.
Secrets never go in a URI: each client takes its key from the environment (``CHROMA_API_KEY``,
``QDRANT_API_KEY``, ``PINECONE_API_KEY``, ``WEAVIATE_API_KEY``), and only for a URI the caller passed in:
nothing here connects to an address read from a file (an export summary, a manifest, a docstore).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from reembed.errors import ExportError, MigrationError

TEXT = "text"
OLD_EMBEDDING = "old_embedding"
SCHEMES = {"chroma": "chroma", "qdrant": "qdrant", "qdrants": "qdrant", "faiss": "faiss",
           "pinecone": "pinecone", "weaviate": "weaviate", "weaviate+cloud": "weaviate"}
ENV_KEYS = {"chroma": "CHROMA_API_KEY", "qdrant": "QDRANT_API_KEY", "pinecone": "PINECONE_API_KEY",
            "weaviate": "WEAVIATE_API_KEY"}
_SECRET_PARAMS = ("api_key", "apikey", "key", "token", "password", "secret")

Result = list[tuple[str, float, "str | None"]]  # (id, score - higher is better, text or None), best first


@dataclass(frozen=True)
class StoreURI:
    """A store URI split once: kind (from the scheme), server ``host[:port]`` or local ``path``, options."""

    uri: str
    kind: str
    scheme: str
    host: str
    path: str
    options: dict[str, str] = field(default_factory=dict)

    def option(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    @property
    def shown(self) -> str:
        """The URI for messages and summaries: without user info."""
        return redact(self.uri)


@dataclass
class Batch:
    """One page of documents read from a store."""

    ids: list[str]
    texts: list[str | None]
    metadata: list[dict[str, Any]]
    vectors: np.ndarray  # (n, dim) float32
    # Where the store has them: each document's own point id and its payload exactly as the app stored it,
    # so the new collection can be written with the same ids and layout (see reembed.indexes.qdrant.points_of).
    point_ids: list[Any] | None = None
    payloads: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def is_store_uri(uri: str) -> bool:
    return urlsplit(str(uri)).scheme in SCHEMES


def parse_uri(uri: str) -> StoreURI:
    """Split a store URI, refusing unknown schemes and secrets in the query string."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ExportError(f"{redact(uri)}: unknown store scheme {parts.scheme!r}; expected one of "
                          f"{', '.join(sorted(SCHEMES))}://")
    kind = SCHEMES[parts.scheme]
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    for key in options:
        if key.lower() in _SECRET_PARAMS:
            raise ExportError(f"{redact(uri)}: secrets never go in a URI (parameter {key!r}); "
                              f"set {ENV_KEYS.get(kind, 'the environment')} instead")
    return StoreURI(uri=uri, kind=kind, scheme=parts.scheme, host=parts.netloc, path=parts.path, options=options)


class Store:
    """A vector store: read page by page (export), searched with its own model, written where it allows.

    Subclasses open themselves with ``from_uri`` and implement what their store can do: ``batches``
    (export), ``_search`` (query), ``_upsert`` (dual write, with ``writable = True``).
    """

    kind = "store"
    writable = False

    def __init__(self, *, uri: str = "", collection: str = "", name: str = "store", model: str | None = None,
                 device: str = "auto"):
        self.uri = uri
        self.collection = collection
        self.name = name
        self.model = model
        self.device = device
        self.backend = "auto"  # a reembed output embedded in int8 sets onnx-int8 (see ExactStore.from_output)

    @classmethod
    def from_uri(cls, src: StoreURI, **common: Any) -> "Store":  # pragma: no cover - every store overrides it
        raise NotImplementedError

    # -- export ----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What is known about the vectors before reading them: ``metric`` and whether they are ``lossy``."""
        return {"metric": None, "lossy": False}

    def batches(self, page_size: int = 1000) -> Iterator[Batch]:
        raise ExportError(f"{self.where}: exporting a {self.kind} store is not supported")

    # -- query -----------------------------------------------------------------------------------

    @property
    def dim(self) -> int:  # pragma: no cover - every searchable store overrides it
        raise MigrationError(f"{self.where}: querying {self.kind} is not supported here (export it with "
                             "`reembed export`, then query the export folder)")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``texts`` embedded with this store's own model (the one its vectors were made with)."""
        if not self.model:
            raise MigrationError(f"store {self.name!r} ({self.kind}): no model to embed queries with; pass its model "
                                 f"(--{self.name}-model NAME_OR_PATH)")
        from reembed.indexes.search import text_embedder

        return text_embedder(self.model, None, self.device, expect_dim=self.dim, backend=self.backend)(list(texts))

    def search(self, vectors: np.ndarray, k: int) -> list[Result]:
        """Top-``k`` per query vector, best first; scores are higher-is-better in this store's own scale."""
        vectors = self._checked(vectors, "queries")
        if k < 1:
            raise MigrationError(f"k must be >= 1, got {k}")
        return self._search(vectors, k)

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        raise MigrationError(f"{self.where}: querying {self.kind} is not supported here (export it with "
                             "`reembed export`, then query the export folder)")

    # -- write -----------------------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray,
               metadata: Sequence[Mapping[str, Any]]) -> None:
        """Insert or replace documents by id (writing the same ids twice leaves one copy of each)."""
        if not self.writable:
            raise self.read_only_error()
        self._upsert([str(i) for i in ids], list(texts), self._checked(vectors, "document vectors"),
                     [dict(m or {}) for m in metadata])

    def _upsert(self, ids: list[str], texts: list[str], vectors: np.ndarray, metadata: list[dict[str, Any]]) -> None:
        raise self.read_only_error()  # pragma: no cover - writable stores override it

    def read_only_error(self) -> MigrationError:
        return MigrationError(f"store {self.name!r} ({self.kind}) is read-only here (reembed outputs, exports and FAISS "
                              "files are rebuilt by `reembed run` / the index stage); dual-write into a chroma:// or "
                              "qdrant:// store")

    def close(self) -> None:
        pass

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return redact(self.uri) if self.uri else f"store {self.name!r}"

    def _checked(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.dim:
            raise MigrationError(f"store {self.name!r} ({self.where}) holds {self.dim}-d vectors; got {vectors.shape[1]}-d "
                                 f"{what} (was the right model given?)")
        return vectors


# ---------------------------------------------------------------------------------------------------
# Helpers for the stores


def matrix(rows: Any, ids: Sequence[str], where: str) -> np.ndarray:
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


def take_id(fields: dict[str, Any], id_field: str | None, default: Any, where: str, required: bool = True) -> str:
    """The document id: ``fields[id_field]`` (removed from ``fields``), else ``default`` (the store's own
    id) when no ``id_field`` is asked for or it is not ``required``."""
    if id_field is None:
        return str(default)
    value = fields.pop(id_field, None)
    if value is None:
        if required:
            raise ExportError(f"{where}: no {id_field!r} field to take the document id from")
        return str(default)
    return str(value)


def as_text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def redact(uri: str) -> str:
    """The URI without user info (``user:pass@``), for logs and summaries."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def page_size_checked(page_size: int) -> int:
    if page_size < 1:
        raise ExportError(f"page size must be >= 1, got {page_size}")
    return page_size

