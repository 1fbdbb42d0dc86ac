"""FAISS: ``faiss:///path/index.faiss?docstore=docs.parquet`` - an index file and a docstore (Parquet or
JSON Lines) naming the document of each vector. Docstore rows describe index positions in order, or carry
a ``position`` column with the FAISS label (what ``add_with_ids`` was given). Options ``id_field`` (default
``id``) and ``text_field`` (default ``text``) name its columns.

The docstore must lie in the index's folder (a relative path resolves there): a URI can come from a
config file, and it must not make reembed read files elsewhere. Exported by reconstructing every vector,
searched with ``index.search``; never written (the index stage rebuilds FAISS files).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from reembed import schema as S
from reembed.errors import ExportError
from reembed.migrate.stores.base import TEXT, Batch, Result, Store, StoreURI, as_text, page_size_checked

log = logging.getLogger(__name__)

POSITION = "position"


class FaissStore(Store):
    kind = "faiss"

    def __init__(self, index, docstore: pa.Table, id_field: str = S.ID, text_field: str = TEXT, **common: Any):
        super().__init__(**common)
        for col in (id_field,):
            if col not in docstore.column_names:
                raise ExportError(f"{self.where}: docstore has no {col!r} column (columns: {', '.join(docstore.column_names)})")
        self.index = index
        self.docstore = docstore
        self.id_field, self.text_field = id_field, text_field
        self.labels, self.inner = _labels(index)
        self.rows = self._docstore_rows()  # docstore row of each index position
        self.sign = -1.0 if int(index.metric_type) == 1 else 1.0  # METRIC_L2 returns distances
        self._row_of_label: dict[int, int] | None = None

    @classmethod
    def from_uri(cls, src: StoreURI, **common: Any) -> "FaissStore":
        if src.host:
            raise ExportError(f"{src.shown}: FAISS indexes are local files: faiss:///abs/path/index.faiss?docstore=...")
        if not src.option("docstore"):
            raise ExportError(f"{src.shown}: a FAISS index holds only vectors; add ?docstore=FILE (Parquet or JSONL "
                              "with id, text and optionally position) to map positions to documents")
        docstore_file = docstore_path(src)
        if not os.path.isfile(src.path):
            raise ExportError(f"{src.shown}: no FAISS index file at {src.path}")
        docstore = read_docstore(docstore_file, src)
        index = read_index(src.path)
        return cls(index, docstore, id_field=src.option("id_field", S.ID), text_field=src.option("text_field", TEXT),
                   uri=src.uri, **common)

    def describe(self) -> dict[str, Any]:
        metric = {0: "inner_product", 1: "l2"}.get(int(self.index.metric_type), f"faiss metric {int(self.index.metric_type)}")
        return {"metric": metric, "lossy": self.lossy}

    @property
    def lossy(self) -> bool:
        import faiss

        inner = self.inner
        name = type(inner).__name__
        if isinstance(inner, faiss.IndexHNSW):
            name = type(faiss.downcast_index(inner.storage)).__name__
        return any(tag in name for tag in ("PQ", "SQ", "ScalarQuantizer", "LSH", "RaBitQ", "Residual"))

    def batches(self, page_size: int = 1000) -> Iterator[Batch]:
        """Reconstruct every vector, in index order, and join it to its docstore row."""
        import faiss

        page_size = page_size_checked(page_size)
        if self.lossy:
            log.warning("FAISS index %s stores compressed vectors: exported old embeddings are approximations",
                        type(self.inner).__name__)
        ivf = faiss.try_extract_index_ivf(self.inner) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            ivf.make_direct_map()
        doc = self.docstore
        meta_cols = [c for c in doc.column_names if c not in (self.id_field, self.text_field, POSITION)]
        ids_all = doc.column(self.id_field)
        texts_all = doc.column(self.text_field) if self.text_field in doc.column_names else None
        n = int(self.index.ntotal)
        for start in range(0, n, page_size):
            stop = min(n, start + page_size)
            vectors = self.inner.reconstruct_n(start, stop - start)
            take = pa.array(self.rows[start:stop])
            ids = [None if v is None else str(v) for v in ids_all.take(take).to_pylist()]
            bad = [start + i for i, v in enumerate(ids) if v is None]
            if bad:
                raise ExportError(f"{self.where}: docstore row for FAISS position {bad[0]} has a null {self.id_field!r}")
            texts = texts_all.take(take).to_pylist() if texts_all is not None else [None] * len(ids)
            metas = doc.select(meta_cols).take(take).to_pylist() if meta_cols else [{} for _ in ids]
            yield Batch(ids=ids, texts=[as_text(t) for t in texts], metadata=metas,
                        vectors=np.ascontiguousarray(vectors, dtype=np.float32))

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        from reembed.indexes.exact import normalize as _normalize

        if self._row_of_label is None:
            self._row_of_label = {int(lb): int(r) for lb, r in zip(self.labels, self.rows)}
        q = np.ascontiguousarray(_normalize(vectors) if self.sign > 0 else vectors, dtype=np.float32)
        scores, labels = self.index.search(q, k)
        ids = self.docstore.column(self.id_field)
        texts = self.docstore.column(self.text_field) if self.text_field in self.docstore.column_names else None
        out = []
        for srow, lrow in zip(scores, labels):
            hits = []
            for s, lb in zip(srow, lrow):
                row = self._row_of_label.get(int(lb))
                if row is not None:
                    hits.append((str(ids[row].as_py()), self.sign * float(s), as_text(texts[row].as_py()) if texts else None))
            out.append(hits)
        return out

    def _docstore_rows(self) -> np.ndarray:
        n = int(self.index.ntotal)
        doc = self.docstore
        if POSITION in doc.column_names:
            pos = np.asarray(doc.column(POSITION).to_numpy(zero_copy_only=False), dtype=np.int64)
            row_of = {int(p): r for r, p in enumerate(pos)}
            if len(row_of) != len(pos):
                raise ExportError(f"{self.where}: docstore column {POSITION!r} has repeated values")
            try:
                return np.fromiter((row_of[int(lb)] for lb in self.labels), dtype=np.int64, count=n)
            except KeyError as e:
                raise ExportError(f"{self.where}: FAISS label {e.args[0]} has no docstore row (column {POSITION!r})") from None
        if doc.num_rows != n:
            raise ExportError(f"{self.where}: docstore has {doc.num_rows} rows and the index {n} vectors; without a "
                              f"{POSITION!r} column row i must describe vector i")
        return np.arange(n, dtype=np.int64)


def read_index(path: str):
    """A user-supplied FAISS index file, through the package's one FAISS reader."""
    from reembed.indexes.faiss import read_index_file as read_faiss

    if not os.path.isfile(path):
        raise ExportError(f"{path}: no FAISS index file here")
    try:
        return read_faiss(path)
    except RuntimeError as e:
        raise ExportError(f"{path}: not a FAISS index faiss can read ({str(e).splitlines()[0]})") from e


def docstore_path(src: StoreURI) -> str:
    """The docstore's path, which must resolve (links followed) inside the index file's folder."""
    path = src.options["docstore"]
    if path.startswith("file://"):
        path = path[len("file://"):]
    folder = os.path.dirname(os.path.realpath(src.path))
    resolved = os.path.realpath(os.path.join(folder, path))
    if os.path.commonpath([folder, resolved]) != folder:
        raise ExportError(f"{src.shown}: docstore {path!r} resolves to {resolved}, outside the index's folder {folder}; "
                          "keep the docstore beside the index file")
    return resolved


def read_docstore(path: str, src: StoreURI | None = None) -> pa.Table:
    """A docstore file: Parquet, or JSON Lines (one object per line)."""
    import pyarrow.parquet as pq

    where = src.shown if src is not None else path
    if not os.path.isfile(path):
        raise ExportError(f"{where}: no docstore file at {path}")
    if path.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        from reembed.storage import json_lines

        with open(path, "rb") as f:
            return pa.Table.from_pylist([obj for _, obj in json_lines(f.read(), path, ExportError)])
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ExportError(f"{path}: not a Parquet docstore ({str(e).splitlines()[0]}); use Parquet or .jsonl") from e


def _labels(index):
    """(the FAISS label of each stored vector in position order, the index that stores the vectors)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64), faiss.downcast_index(index.index)
    return np.arange(index.ntotal, dtype=np.int64), index
