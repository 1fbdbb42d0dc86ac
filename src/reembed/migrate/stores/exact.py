"""Vectors held in memory and searched exactly by cosine (:func:`reembed.indexes.exact.exact_knn`): a reembed
output (its committed shards, queried with the model its manifest names) or an export folder (its
``old_embedding`` column, queried with the model the caller names)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from reembed import schema as S
from reembed.errors import MigrationError
from reembed.migrate.stores.base import OLD_EMBEDDING, TEXT, Result, Store


class ExactStore(Store):
    kind = "exact"

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, texts: Sequence[str | None] | None = None, **common: Any):
        from reembed.indexes.exact import normalize as _normalize

        super().__init__(**common)
        self.ids = [str(i) for i in ids]
        self.vectors = _normalize(vectors)  # once here, so each search normalizes only the queries
        self.texts: dict[str, str | None] = {}
        for i, t in zip(self.ids, texts if texts is not None else []):
            self.texts.setdefault(i, t)

    @classmethod
    def from_output(cls, loc, manifest, **common: Any) -> "ExactStore":
        """Every committed shard of a reembed output; the model defaults to the manifest's."""
        from reembed.embed import query_backend
        from reembed.write import read_shard_table

        ids, blocks, texts = [], [], []
        for _, rec in manifest.refs().records(loc):  # streamed from the commit log, in shard order
            table = read_shard_table(loc, rec)
            ids.extend(table.column(S.ID).to_pylist())
            blocks.append(S.embedding_matrix(table.column(S.EMBEDDING)))
            texts.extend(table.column(TEXT).to_pylist() if TEXT in table.column_names else [None] * table.num_rows)
        if not ids:
            raise MigrationError(f"{loc.display()}: no committed shards to search")
        common["model"] = common.get("model") or manifest.model["name"]
        store = cls(ids, np.vstack(blocks), texts, uri=loc.uri, **common)
        store.backend = query_backend(manifest.model)
        return store

    @classmethod
    def from_export(cls, loc, **common: Any) -> "ExactStore":
        """The parts of an export folder (see :func:`reembed.migrate.parts.read_parts`)."""
        from reembed.migrate.parts import read_parts

        ids, blocks, texts = [], [], []
        for where, table in read_parts(loc):
            if S.ID not in table.column_names or OLD_EMBEDDING not in table.column_names:
                raise MigrationError(f"{where}: needs columns {S.ID} and {OLD_EMBEDDING} (has "
                                     f"{', '.join(table.column_names)}); not an export folder")
            ids.extend(str(x) for x in table.column(S.ID).to_pylist())
            blocks.append(S.embedding_matrix(table.column(OLD_EMBEDDING)))
            texts.extend(table.column(TEXT).to_pylist() if TEXT in table.column_names else [None] * table.num_rows)
        if not ids:
            raise MigrationError(f"{loc.display()}: not a store URI, a reembed output or an export folder "
                                 "(no manifest.json, _export.json or Parquet parts here)")
        return cls(ids, np.vstack(blocks), texts, uri=loc.uri, **common)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        from reembed.indexes.exact import exact_knn

        scores, ids = exact_knn(vectors, [(self.ids, self.vectors)], k)
        return [[(i, float(s), self.texts.get(i)) for s, i in zip(srow, irow) if i is not None]
                for srow, irow in zip(scores, ids)]
