"""Exact search and recall: the one exact kNN (after faiss ``contrib/exhaustive_search.py``'s
``knn_ground_truth(xq, db_iterator, k)``), used by the FAISS build's tuning, the validation gate and
``reembed.indexes.search``. Numpy only, so every layer above can use it.

Recall counts a returned id as right when it is one of the exact top-k *or* one of the exact neighbours tied
with the k-th (within ``TIE``): with duplicate documents, which of several equal vectors comes back is
arbitrary, and a plain top-k count would call a perfect answer wrong (or, tuned on it, a wrong one right).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from reembed.errors import ValidationError

TIE = 1e-4  # cosine scores this close to the exact k-th one count as ties
DEPTH = 4  # exact results are kept this many times deeper than k, so ties at the k-th place are seen
Batches = Iterable[tuple[Sequence[Any], np.ndarray]]


class KnnHeap:
    """The running exact top-``k`` (cosine) of fixed queries over blocks of ``(ids, vectors)`` added one at a
    time; ids are whatever the caller uses (document ids, index positions)."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q = normalize(np.asarray(queries, dtype=np.float32))
        self.k = k
        self.scores = np.full((len(self.q), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(self.q), k), None, dtype=object)

    def add(self, ids: Sequence[Any], block: np.ndarray) -> None:
        if not len(ids) or not len(self.q):
            return
        if np.shape(block)[1] != self.q.shape[1]:
            raise ValidationError(f"queries are {self.q.shape[1]}-d but the searched vectors {np.shape(block)[1]}-d "
                                  f"(first id {ids[0]!r}); was the right model given?")
        ids = np.asarray(ids, dtype=object) if not isinstance(ids, np.ndarray) else ids.astype(object)
        s = self.q @ normalize(block).T
        kk = min(self.k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([self.scores, np.take_along_axis(s, top, axis=1)], axis=1)
        cand_i = np.concatenate([self.ids, ids[top]], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :self.k]
        self.scores = np.take_along_axis(cand_s, order, axis=1)
        self.ids = np.take_along_axis(cand_i, order, axis=1)


def exact_knn(queries: np.ndarray, batches: Batches, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours of ``queries`` over a stream of ``(ids, vectors)`` blocks.

    Returns (scores (n, k) float32, ids (n, k) object; ``None`` / -inf where the corpus has fewer than k).
    """
    heap = KnnHeap(queries, k)
    for ids, block in batches:
        heap.add(ids, block)
    return heap.scores, heap.ids


def recall(found_ids: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray, k: int,
           exclude: Sequence[Any] | None = None) -> np.ndarray:
    """Per-query recall@k of an ANN answer against the exact one, by ids only (a searcher's own scores are
    never trusted: a shuffled id map returns right scores for wrong documents).

    A returned id counts when it is among the exact neighbours that score at least the exact k-th score
    (within ``TIE``), so with duplicate documents any of the tied copies is right. Pass exact results
    deeper than ``k`` (see ``DEPTH``) for the ties to be seen; ties beyond that depth count as misses,
    which errs on the safe side. ``exclude``: one id per query left out of both lists (a document used as
    its own query). Queries with no exact neighbour count as 1.
    """
    out = np.ones(len(found_ids))
    for row in range(len(found_ids)):
        skip = exclude[row] if exclude is not None else None
        want = [(i, s) for i, s in zip(exact_ids[row], exact_scores[row]) if i is not None and i != skip
                and np.isfinite(s)]
        if not want:
            continue
        need = min(k, len(want))
        kth = want[need - 1][1]
        right = {i for i, s in want if s >= kth - TIE}
        have = [i for i in found_ids[row] if i is not None and i != skip
                and not (isinstance(i, (int, np.integer)) and i < 0)][:k]
        out[row] = min(1.0, sum(1 for i in have if i in right) / need)
    return out


def normalize(m: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy with rows scaled to unit norm; NaN/inf read as 0 (the integrity gate
    reports them) and zero rows stay zero."""
    m = np.array(m, dtype=np.float32, order="C", copy=True)
    if m.ndim != 2 or not len(m):
        return m
    if not np.isfinite(m).all():
        m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    n = np.linalg.norm(m, axis=1, keepdims=True)
    np.divide(m, n, out=m, where=n > 0)
    return m
