"""Gradual migration: query the old and the new store together, and write new documents to both.

The query is embedded once per store, with *that store's* model, and each store is searched in its own
space. Cosine values from two models are not on one scale (BGE's unrelated pairs score where MiniLM's
paraphrases do), so raw scores are never compared across stores. The two ranked lists are merged by

* ``rrf`` - reciprocal rank fusion: ``sum_s w_s / (rrf_k + rank_s(d))`` (ranks only, no scores), or
* ``weighted`` - each store's scores min-max normalized over its own result list to [0, 1], then
  ``sum_s w_s * norm_s(d)``; a store that did not return ``d`` contributes 0.

A document both stores return therefore outranks one that only one store returns at a similar rank.
:func:`dual_write` embeds documents that arrive during the migration with both models and upserts them
into both stores, so neither falls behind.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from reembed.errors import DualWriteError, MigrationError
from reembed.migrate.stores import Result, Store

log = logging.getLogger(__name__)

FUSIONS = ("rrf", "weighted")
RRF_K = 60
ID_FIELD = "id"
TEXT_FIELD = "text"


@dataclass
class Hit:
    id: str
    score: float  # the fused score (comparable only within one fused list)
    ranks: dict[str, int] = field(default_factory=dict)  # store -> 1-based rank in that store's list
    scores: dict[str, float] = field(default_factory=dict)  # store -> that store's own score (not comparable)
    text: str | None = None


def dual_query(text: str, old: Store, new: Store, k: int = 10, method: str = "rrf",
               weights: Mapping[str, float] | None = None, depth: int | None = None, rrf_k: int = RRF_K) -> list[Hit]:
    """Search both stores for ``text``, each with its own model, and return the fused top ``k``.

    ``depth`` results are taken from each store before fusion (default ``max(2k, 20)``), so a document
    ranked just below ``k`` in both stores can still rise above one ranked high in a single store.
    """
    if k < 1:
        raise MigrationError(f"k must be >= 1, got {k}")
    depth = depth or max(2 * k, 20)
    results = {}
    for store in (old, new):
        vec = store.embed([text])
        results[store.name] = store.search(vec, depth)[0]
    return fuse(results, method, weights, rrf_k)[:k]


def dual_write(docs: Iterable[Mapping[str, Any]], old: Store, new: Store) -> dict[str, Any]:
    """Embed ``docs`` (``{"id", "text", **metadata}``) with each store's own model and upsert them into
    both. Both embeddings are computed before anything is written, so a model failure writes nothing."""
    t0 = time.monotonic()
    for store in (old, new):
        if not store.writable:
            raise store.read_only_error()
    docs = list(docs)
    for n, d in enumerate(docs):
        if not isinstance(d.get(ID_FIELD), (str, int)) or not isinstance(d.get(TEXT_FIELD), str) or not d[TEXT_FIELD].strip():
            raise MigrationError(f"document {n}: needs a string or integer 'id' and a non-empty 'text'")
    if not docs:
        return {"rows": 0, "stores": [old.name, new.name], "seconds": 0.0}
    ids = [str(d[ID_FIELD]) for d in docs]
    texts = [d[TEXT_FIELD] for d in docs]
    meta = [{k: v for k, v in d.items() if k not in (ID_FIELD, TEXT_FIELD)} for d in docs]
    v_old, v_new = old.embed(texts), new.embed(texts)
    old.upsert(ids, texts, v_old, meta)
    try:
        new.upsert(ids, texts, v_new, meta)
    except Exception as e:
        raise DualWriteError(f"{len(ids)} documents were written to {old.name!r} but not to {new.name!r} "
                             f"({type(e).__name__}: {e}); upserts are idempotent, so retry the same call") from e
    secs = time.monotonic() - t0
    log.info("dual-write: %d rows, %.1f s, %.1f rows/s (%s + %s)", len(ids), secs, len(ids) / secs if secs else 0.0,
             old.name, new.name)
    return {"rows": len(ids), "stores": [old.name, new.name], "seconds": round(secs, 3)}


def fuse(results: Mapping[str, Result | Sequence[tuple[str, float]]], method: str = "rrf",
         weights: Mapping[str, float] | None = None, rrf_k: int = RRF_K) -> list[Hit]:
    """Merge per-store ranked lists (best first) into one, by rank (``rrf``) or by per-store min-max
    normalized scores (``weighted``). Raw scores of different stores are never compared."""
    if method not in FUSIONS:
        raise MigrationError(f"unknown fusion {method!r}; use one of {', '.join(FUSIONS)}")
    weights = dict(weights or {})
    hits: dict[str, Hit] = {}
    for store, result in results.items():
        w = float(weights.get(store, 1.0))
        rows = [(r[0], float(r[1]), r[2] if len(r) > 2 else None) for r in result]
        if not rows:
            continue
        scores = np.array([s for _, s, _ in rows])
        lo, hi = float(scores.min()), float(scores.max())
        for rank, (doc, score, text) in enumerate(rows, 1):
            hit = hits.setdefault(doc, Hit(doc, 0.0))
            if store in hit.ranks:  # a store listing a document twice: keep its best rank
                continue
            hit.ranks[store] = rank
            hit.scores[store] = score
            hit.text = hit.text or text
            if method == "rrf":
                hit.score += w / (rrf_k + rank)
            else:
                hit.score += w * ((score - lo) / (hi - lo) if hi > lo else 1.0)
    return sorted(hits.values(), key=lambda h: (-h.score, min(h.ranks.values()), h.id))
