"""The validation gate: is the new embedding output fit to replace the old store?

    reembed validate OUTPUT_URI [--queries queries.jsonl] [--old URI --old-model NAME]

writes ``OUTPUT/validation/report.json`` and ``report.html`` and exits non-zero when a gate fails.
Gates, each ``pass``, ``fail``, ``info`` (reported, not gated) or ``skipped`` (not enough inputs):

* **integrity** - every committed shard, streamed: sha256 against the manifest, row count, vector
  dimension, no NaN/inf, no zero vectors, unit norm within ``norm_tol`` for normalizing models;
* **sanity_pairs** - paraphrase pairs must score at least ``paraphrase_min`` with the new model and
  unrelated pairs at most ``unrelated_max`` (a built-in set plus ``--pairs FILE``);
* **ann_recall** - recall@k of each built ANN index (FAISS, Qdrant) against exact search, on sampled
  documents used as queries; at least ``min_ann_recall``;
* **overlap** - old vs new: mean overlap@k of each sampled document's k nearest neighbours in the old
  and the new space (different models legitimately disagree, so this is ``info`` unless ``min_overlap``);
* **ab** - labelled queries (``{"query": ..., "relevant": [ids] | {id: grade}}`` per line): recall@k and
  nDCG@10 of exact search in the old and the new space side by side; the new model must not fall more
  than ``ab_tolerance`` below the old one on either metric.

Exact search is cosine (vectors normalized before the dot product) and streams the shards, so memory
holds one shard and the running top-k, never the corpus. ``reembed swap`` calls
:func:`check_validation`, which refuses a missing, failed or stale report.

ANN indexes plug in as plain callables ``search(queries: (n, d) float32, k) -> (scores, ids)`` with
``ids`` an (n, k) array of document ids (strings; ``None`` where fewer than k came back):
:func:`faiss_searcher` and :func:`qdrant_searcher` build them from a FAISS index (+ its position -> id
list) and a Qdrant collection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from reembed import schema as S
from reembed.manifest import Manifest, now
from reembed.storage import Location, StorageError
from reembed.errors import ValidationError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

REPORT_JSON = "validation/report.json"
REPORT_HTML = "validation/report.html"
OLD_EMBEDDING = "old_embedding"
PASS, FAIL, INFO, SKIPPED = "pass", "fail", "info", "skipped"

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
Batches = Iterable[tuple[Sequence[str], np.ndarray]]

# Pairs whose meaning every sentence embedding model should get right. all-MiniLM-L6-v2 scores the
# paraphrases 0.7-0.97 and the unrelated pairs -0.07-0.11.
PARAPHRASES = [
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The cat is sleeping on the sofa.", "A cat is asleep on the couch."),
    ("The meeting has been moved to Friday.", "The meeting was rescheduled for Friday."),
    ("Where is the nearest train station?", "How do I get to the closest railway station?"),
    ("The price of petrol went up again this week.", "Gas prices rose once more this week."),
    ("She bought a new laptop for work.", "She purchased a new notebook computer for her job."),
    ("The film was boring and far too long.", "The movie was dull and much too long."),
    ("Turn off the lights when you leave the room.", "Switch the lights off when you go out of the room."),
    ("The company reported record profits this year.", "This year the company announced record profits."),
    ("Drink plenty of water when it is hot outside.", "Stay hydrated in hot weather by drinking lots of water."),
    ("The children played football in the park.", "The kids were playing soccer in the park."),
    ("How long does it take to boil an egg?", "How many minutes should an egg be boiled?"),
]
UNRELATED = [
    ("How do I reset my password?", "Penguins live in the southern hemisphere."),
    ("The cat is sleeping on the sofa.", "Interest rates rose by half a percent."),
    ("The meeting has been moved to Friday.", "Volcanoes erupt when magma reaches the surface."),
    ("Where is the nearest train station?", "Photosynthesis converts light into chemical energy."),
    ("The price of petrol went up again this week.", "She plays the violin in a string quartet."),
    ("She bought a new laptop for work.", "The recipe needs two cups of flour."),
    ("The film was boring and far too long.", "Mount Everest is the highest mountain on Earth."),
    ("Turn off the lights when you leave the room.", "The treaty was signed in 1648."),
    ("The company reported record profits this year.", "Frogs lay their eggs in ponds."),
    ("Drink plenty of water when it is hot outside.", "The compiler reported a syntax error."),
    ("The children played football in the park.", "Quantum computers use qubits."),
    ("How long does it take to boil an egg?", "The museum is closed on Mondays."),
]


@dataclass(frozen=True)
class Settings:
    k: int = 10
    sample: int = 200  # documents sampled as queries for ANN recall and neighbour overlap
    seed: int = 0
    norm_tol: float = 1e-3
    paraphrase_min: float = 0.55
    unrelated_max: float = 0.45
    min_ann_recall: float = 0.90
    min_overlap: float | None = None
    ab_tolerance: float = 0.02
    device: str = "auto"
    builtin_pairs: bool = True  # off for a domain model judged by its own --pairs file only


@dataclass
class Pair:
    a: str
    b: str
    label: str  # "paraphrase" | "unrelated"
    threshold: float | None = None
    source: str = "built-in"


@dataclass
class LabelledQuery:
    query: str
    relevant: dict[str, float]  # id -> graded relevance (> 0)


# ---------------------------------------------------------------------------------------------------
# The whole gate


def validate(output: str | Location, *, queries: str | Sequence[LabelledQuery] | None = None,
             old: str | None = None, old_model: str | None = None, model: str | None = None,
             pairs: str | Sequence[Pair] | None = None, searchers: Mapping[str, Search] | None = None,
             settings: Settings = Settings(), write: bool = True) -> dict[str, Any]:
    """Run every gate on the output at ``output`` and return the report (also written under
    ``OUTPUT/validation/`` unless ``write`` is false).

    ``model`` overrides the manifest's model name (the same model, stored elsewhere on this machine).
    ``old`` is an old store URI (``chroma://...``, see :mod:`reembed.exporters`), an export folder
    (``id`` + ``old_embedding`` Parquet), or another reembed output; without it the shards' own
    ``old_embedding`` column is used when the job passed it through. ``old_model`` embeds the labelled
    queries for the old side of the A/B comparison.
    """
    t0 = time.monotonic()
    loc = output if isinstance(output, Location) else Location.from_uri(output)
    manifest = Manifest.load(loc)
    if manifest is None:
        raise ValidationError(f"{loc.display('manifest.json')}: no manifest here; validate a reembed output")
    labelled = load_queries(queries) if isinstance(queries, str) else list(queries or [])
    all_pairs = (builtin_pairs() if settings.builtin_pairs else []) + (
        load_pairs(pairs) if isinstance(pairs, str) else list(pairs or []))
    new_model = model or manifest.model["name"]
    dim = int(manifest.model["dimension"])
    normalized = bool(manifest.model.get("normalize"))

    records = sorted(manifest.committed.items())
    total = sum(r["rows"] for _, r in records)
    n_sample = min(settings.sample, total)
    positions = np.sort(np.random.default_rng(settings.seed).choice(total, n_sample, replace=False)) if n_sample else np.zeros(0, np.int64)

    # Pass 1 over the shards: integrity, and the sampled documents' vectors.
    has_old_column = _shards_have(loc, records, OLD_EMBEDDING)
    relevant = {r for q in labelled for r in q.relevant}
    integrity, sample_ids, sample_new, sample_old, seen_relevant = _integrity_pass(
        loc, records, dim, normalized, settings, positions, want_old=has_old_column and old is None, watch=relevant)
    pending = manifest.pending()
    if pending:
        integrity["problems"].insert(0, f"{len(pending)} of {len(manifest.plan['shards'])} planned shards are not committed "
                                        "yet; finish `reembed run` first")
        integrity.update(status=FAIL, message="; ".join(integrity["problems"][:5]), pending=len(pending))
    gates: dict[str, dict[str, Any]] = {"integrity": integrity}

    from reembed.embed import query_backend

    embed_new = text_embedder(new_model, manifest.model.get("max_seq_length"), settings.device, expect_dim=dim,
                              backend=query_backend(manifest.model))
    gates["sanity_pairs"] = sanity_pairs(embed_new, all_pairs, settings.paraphrase_min, settings.unrelated_max)

    # Pass 2: exact search in the new space for sampled documents and labelled queries together.
    kq = max(settings.k + 1, 10)
    q_new = embed_new([q.query for q in labelled]) if labelled else np.zeros((0, dim), np.float32)
    queries_new = np.vstack([sample_new, q_new]) if len(q_new) else sample_new
    _, exact_new = exact_knn(queries_new, _shard_batches(loc, records, S.EMBEDDING, dim), kq) if len(queries_new) else (None, np.zeros((0, kq), object))
    exact_sample_new, exact_labelled_new = exact_new[:n_sample], exact_new[n_sample:]

    gates["ann_recall"] = ann_gate(searchers or {}, sample_new, exact_sample_new, settings.k, settings.min_ann_recall)

    # Old side: the same sampled documents and the labelled queries, searched in the old space.
    old_stream = _old_source(old, loc, records) if old or has_old_column else None
    old_src = old or (f"{loc.display()} (the shards' {OLD_EMBEDDING} column)" if has_old_column else None)
    old_model = old_model or (_old_manifest_model(old) if old else None)
    if old_stream is None:
        gates["overlap"] = {"status": SKIPPED, "message": "no old store: pass --old URI (or pass old_embedding through the job)"}
        exact_labelled_old = None
    else:
        gates["overlap"], exact_labelled_old = _old_side(old_stream, old_model, sample_ids, sample_old, exact_sample_new,
                                                         labelled, kq, settings)
    gates["ab"] = ab_gate(labelled, exact_labelled_new, exact_labelled_old, settings.k, settings.ab_tolerance,
                          have_old=old_stream is not None)
    unknown = sorted({r for q in labelled for r in q.relevant} - seen_relevant)
    if unknown:
        gates["ab"]["unknown_relevant"] = len(unknown)
        gates["ab"]["message"] += f"; {len(unknown)} labelled ids are not in the output (e.g. {', '.join(unknown[:3])})"

    report = {
        "format": 1,
        "created_at": now(),
        "output": loc.uri,
        "model": {k: manifest.model.get(k) for k in ("name", "dimension", "normalize", "fingerprint")},
        "validated_with_model": new_model,
        "fingerprint": manifest.model["fingerprint"],
        "shards_digest": shards_digest(manifest),
        "rows": total,
        "old": {"source": old_src, "model": old_model},
        "settings": dataclasses.asdict(settings),
        "gates": gates,
        "passed": all(g["status"] != FAIL for g in gates.values()),
        "seconds": round(time.monotonic() - t0, 3),
    }
    if write:
        loc.write_bytes(json.dumps(report, indent=1, default=_json_default).encode(), REPORT_JSON)
        loc.write_bytes(render_html(report).encode(), REPORT_HTML)
    failed = [n for n, g in gates.items() if g["status"] == FAIL]
    log.info("validate: %d rows, %d shards, %.1f s, %.1f rows/s; %s", total, len(records), report["seconds"],
             total / report["seconds"] if report["seconds"] else 0.0,
             "passed" if report["passed"] else f"FAILED ({', '.join(failed)})")
    return report


def _old_side(old_stream, old_model: str | None, sample_ids: list[str], sample_old, exact_sample_new: np.ndarray,
              labelled: Sequence[LabelledQuery], kq: int, settings: Settings) -> tuple[dict[str, Any], np.ndarray | None]:
    """The overlap gate and the labelled queries' old-space rankings (None without an old model)."""
    if sample_old is None:
        sample_old = _lookup_vectors(old_stream(), sample_ids)
    found = [i for i, v in enumerate(sample_old) if v is not None]
    old_docs = _stack([sample_old[i] for i in found])
    q_old = None
    if labelled and old_model:
        q_old = text_embedder(old_model, None, settings.device)([q.query for q in labelled])
        if len(old_docs) and q_old.shape[1] != old_docs.shape[1]:
            raise ValidationError(f"old model {old_model} gives {q_old.shape[1]}-d vectors but the old store holds "
                                  f"{old_docs.shape[1]}-d ones; pass the old store's own model as --old-model")
    queries_old = [m for m in (old_docs, q_old) if m is not None and len(m)]
    exact_old = exact_knn(np.vstack(queries_old), old_stream(), kq)[1] if queries_old else np.zeros((0, kq), object)
    gate = overlap_gate([sample_ids[i] for i in found], exact_sample_new[found], exact_old[:len(found)],
                        settings.k, settings.min_overlap, missing=len(sample_ids) - len(found))
    return gate, (exact_old[len(found):] if q_old is not None else None)


def check_validation(output_loc: str | Location) -> tuple[bool, str]:
    """May this output be swapped in? ``(True, why)`` only for a passing report made on the output as it is
    now (same model fingerprint, same committed shards); otherwise ``(False, what to do)``."""
    loc = output_loc if isinstance(output_loc, Location) else Location.from_uri(output_loc)
    where = loc.display(REPORT_JSON)
    if not loc.exists(REPORT_JSON):
        return False, f"{where}: no validation report; run `reembed validate {loc.uri}` first (or swap --force)"
    try:
        report = json.loads(loc.read_bytes(REPORT_JSON))
        gates, passed = report["gates"], report["passed"]
    except (ValueError, KeyError, TypeError) as e:
        return False, f"{where}: unreadable validation report ({e}); run `reembed validate {loc.uri}` again"
    if not passed:
        failed = "; ".join(f"{n}: {g.get('message', '')}" for n, g in gates.items() if g.get("status") == FAIL)
        return False, f"{where}: validation FAILED on {report.get('created_at')} ({failed}); fix and validate again, or swap --force"
    manifest = Manifest.load(loc)
    if manifest is None:
        return False, f"{loc.display('manifest.json')}: no manifest; not a reembed output"
    if report.get("fingerprint") != manifest.model["fingerprint"] or report.get("shards_digest") != shards_digest(manifest):
        return False, (f"{where}: stale: the output changed since it was validated on {report.get('created_at')} "
                       f"(model or committed shards differ); run `reembed validate {loc.uri}` again")
    results = ", ".join(f"{n}={g['status']}" for n, g in gates.items())
    return True, f"validation passed on {report.get('created_at')} ({results})"


def shards_digest(manifest: Manifest) -> str:
    """One hash of every committed shard's sha256: changes whenever any shard is added or replaced."""
    h = hashlib.sha256()
    for shard, rec in sorted(manifest.committed.items()):
        h.update(f"{shard}:{rec['sha256']};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Gates on data (no files): each returns {"status", "message", ...numbers}


def check_vectors(ids: Sequence[str], matrix: np.ndarray, dim: int, normalized: bool, tol: float) -> dict[str, Any]:
    """Counts of bad vectors in one block, with up to five example ids per problem."""
    out: dict[str, Any] = {"rows": len(ids)}
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        got = matrix.shape[1] if matrix.ndim == 2 else matrix.shape
        return {**out, "bad_dimension": len(ids), "dimension_seen": got}
    finite = np.isfinite(matrix).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(matrix), matrix, 0.0), axis=1)
    zero = finite & (norms < 1e-12)
    bad_norm = finite & ~zero & (np.abs(norms - 1.0) > tol) if normalized else np.zeros(len(ids), bool)
    for name, mask in (("non_finite", ~finite), ("zero", zero), ("bad_norm", bad_norm)):
        out[name] = int(mask.sum())
        if out[name]:
            out[f"{name}_ids"] = [str(ids[i]) for i in np.flatnonzero(mask)[:5]]
    ok = norms[finite & ~zero]
    out["norm_min"] = float(ok.min()) if len(ok) else None
    out["norm_max"] = float(ok.max()) if len(ok) else None
    out["norm_mean"] = float(ok.mean()) if len(ok) else None
    return out


def sanity_pairs(embed: Callable[[list[str]], np.ndarray], pairs: Sequence[Pair], paraphrase_min: float,
                 unrelated_max: float) -> dict[str, Any]:
    """Cosine of each pair under ``embed``; paraphrases must reach their threshold, unrelated pairs stay under."""
    if not pairs:
        return {"status": SKIPPED, "message": "no sanity pairs (built-in set off and no --pairs file)"}
    texts = list(dict.fromkeys([p.a for p in pairs] + [p.b for p in pairs]))
    vec = dict(zip(texts, _normalize(embed(texts))))
    cos = np.array([float(vec[p.a] @ vec[p.b]) for p in pairs])
    rows, failed = [], []
    for p, c in zip(pairs, cos):
        limit = p.threshold if p.threshold is not None else (paraphrase_min if p.label == "paraphrase" else unrelated_max)
        ok = bool(c >= limit) if p.label == "paraphrase" else bool(c <= limit)
        rows.append({"a": p.a, "b": p.b, "label": p.label, "cosine": round(float(c), 4), "threshold": limit,
                     "passed": ok, "source": p.source})
        if not ok:
            failed.append(rows[-1])
    para = [r["cosine"] for r in rows if r["label"] == "paraphrase"]
    unrel = [r["cosine"] for r in rows if r["label"] == "unrelated"]
    msg = (f"{len(rows) - len(failed)}/{len(rows)} pairs on the right side of their threshold "
           f"(paraphrases min {min(para, default=float('nan')):.3f} >= {paraphrase_min}, "
           f"unrelated max {max(unrel, default=float('nan')):.3f} <= {unrelated_max})")
    if failed:
        f = failed[0]
        msg += f"; e.g. {f['label']} {f['a']!r} / {f['b']!r} scored {f['cosine']}"
    return {"status": FAIL if failed else PASS, "message": msg, "failed": len(failed), "pairs": rows}


def exact_knn(queries: np.ndarray, batches: Batches, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours of ``queries`` over a stream of ``(ids, vectors)`` blocks.

    Returns (scores (n, k) float32, ids (n, k) object; ``None`` / -inf where the corpus has fewer than k).
    """
    q = _normalize(np.asarray(queries, dtype=np.float32))
    n = len(q)
    best_s = np.full((n, k), -np.inf, dtype=np.float32)
    best_i = np.full((n, k), None, dtype=object)
    for ids, block in batches:
        if not len(ids):
            continue
        if n and np.shape(block)[1] != q.shape[1]:
            raise ValidationError(f"queries are {q.shape[1]}-d but the searched vectors {np.shape(block)[1]}-d "
                                  f"(first id {ids[0]!r}); was the right model given?")
        ids = np.asarray(ids, dtype=object)
        s = q @ _normalize(block).T
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, ids[top]], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_i = np.take_along_axis(cand_i, order, axis=1)
    return best_s, best_i


def ann_recall(search: Search, queries: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |ANN top-k ∩ exact top-k| / |exact top-k|."""
    _, got = search(np.asarray(queries, dtype=np.float32), k)
    hits = []
    for want, have in zip(exact_ids, got):
        want = {w for w in list(want)[:k] if w is not None}
        if want:
            hits.append(len(want & {str(h) for h in list(have)[:k] if h is not None}) / len(want))
    return float(np.mean(hits)) if hits else float("nan")


def ann_gate(searchers: Mapping[str, Search], queries: np.ndarray, exact_ids: np.ndarray, k: int,
             min_recall: float) -> dict[str, Any]:
    if not searchers:
        return {"status": SKIPPED, "message": "no ANN index given (build one with the index stage)"}
    if not len(queries):
        return {"status": SKIPPED, "message": "no documents to sample"}
    recalls = {name: round(ann_recall(fn, queries, exact_ids, k), 4) for name, fn in searchers.items()}
    low = {n: r for n, r in recalls.items() if not r >= min_recall}
    msg = ", ".join(f"{n} recall@{k}={r}" for n, r in recalls.items()) + f" (minimum {min_recall}, {len(queries)} queries)"
    return {"status": FAIL if low else PASS, "message": msg, "recall": recalls, "k": k, "queries": len(queries)}


def neighbour_overlap(ids: Sequence[str], new_ids: np.ndarray, old_ids: np.ndarray, k: int) -> np.ndarray:
    """Per query document: |new top-k ∩ old top-k| / k, the document itself left out of both lists."""
    out = np.zeros(len(ids), dtype=np.float64)
    for i, self_id in enumerate(ids):
        a = [x for x in new_ids[i] if x is not None and x != self_id][:k]
        b = [x for x in old_ids[i] if x is not None and x != self_id][:k]
        out[i] = len(set(a) & set(b)) / k if k else 0.0
    return out


def overlap_gate(ids: Sequence[str], new_ids: np.ndarray, old_ids: np.ndarray, k: int, min_overlap: float | None,
                 missing: int = 0) -> dict[str, Any]:
    if not len(ids):
        return {"status": SKIPPED, "message": "none of the sampled documents is in the old store"}
    per = neighbour_overlap(ids, new_ids, old_ids, k)
    mean = float(per.mean())
    hist = np.histogram(per, bins=np.linspace(0, 1, 11))[0].tolist()
    msg = f"mean overlap@{k} of old and new neighbours {mean:.3f} over {len(ids)} sampled documents"
    if missing:
        msg += f" ({missing} sampled documents not in the old store)"
    status = INFO
    if min_overlap is not None:
        status = PASS if mean >= min_overlap else FAIL
        msg += f" (minimum {min_overlap})"
    return {"status": status, "message": msg, "mean": round(mean, 4), "k": k, "queries": len(ids),
            "histogram": hist, "missing_in_old": missing}


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    rel = {d for d, g in relevant.items() if g > 0}
    return len(rel & set(list(ranked)[:k])) / len(rel) if rel else 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int = 10) -> float:
    """nDCG@k with gains 2^grade - 1 (binary labels: 1 for a relevant document)."""
    dcg = sum((2 ** relevant.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(list(ranked)[:k]) if d is not None)
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def retrieval_metrics(labelled: Sequence[LabelledQuery], ranked: np.ndarray, k: int) -> dict[str, float]:
    """Mean recall@k and nDCG@10 of ranked id lists against the labels."""
    rec = [recall_at_k(r, q.relevant, k) for q, r in zip(labelled, ranked)]
    nd = [ndcg_at_k(r, q.relevant, 10) for q, r in zip(labelled, ranked)]
    return {f"recall@{k}": round(float(np.mean(rec)), 4), "ndcg@10": round(float(np.mean(nd)), 4)}


def ab_gate(labelled: Sequence[LabelledQuery], new_ranked: np.ndarray, old_ranked: np.ndarray | None, k: int,
            tolerance: float, have_old: bool = False) -> dict[str, Any]:
    if not labelled:
        return {"status": SKIPPED, "message": "no labelled queries (--queries FILE)"}
    new = retrieval_metrics(labelled, new_ranked, k)
    out: dict[str, Any] = {"queries": len(labelled), "k": k, "new": new}
    per_query = [{"query": q.query, "new_recall": round(recall_at_k(r, q.relevant, k), 4),
                  "new_ndcg@10": round(ndcg_at_k(r, q.relevant, 10), 4)} for q, r in zip(labelled, new_ranked)]
    if old_ranked is None:
        why = "no old store (--old)" if not have_old else "no old model to embed the queries (--old-model)"
        return {**out, "status": INFO, "per_query": per_query,
                "message": f"new: {_fmt_metrics(new)} on {len(labelled)} queries; old side skipped: {why}"}
    old = retrieval_metrics(labelled, old_ranked, k)
    for row, q, r in zip(per_query, labelled, old_ranked):
        row.update(old_recall=round(recall_at_k(r, q.relevant, k), 4), **{"old_ndcg@10": round(ndcg_at_k(r, q.relevant, 10), 4)})
    worse = [m for m in new if new[m] < old[m] - tolerance]
    msg = f"new {_fmt_metrics(new)} vs old {_fmt_metrics(old)} on {len(labelled)} queries"
    if worse:
        msg += f"; new is worse than old by more than {tolerance} on {', '.join(worse)}"
    return {**out, "old": old, "status": FAIL if worse else PASS, "message": msg, "per_query": per_query}


# ---------------------------------------------------------------------------------------------------
# ANN index adapters


def faiss_searcher(index: Any, ids: Sequence[str], nprobe: int | None = None, ef_search: int | None = None) -> Search:
    """A :data:`Search` over a FAISS index (an object, or a path / URI read with ``faiss.read_index``);
    ``ids[label]`` is the document id of FAISS label ``label``. Queries are L2-normalized first, so an
    inner-product index over normalized vectors ranks by cosine."""
    import faiss

    if isinstance(index, (str, Path)):
        index = read_faiss(str(index))
    ids_arr = np.asarray(list(ids), dtype=object)
    if nprobe is not None or ef_search is not None:
        params = faiss.ParameterSpace()
        if nprobe is not None:
            params.set_index_parameter(index, "nprobe", nprobe)
        if ef_search is not None:
            params.set_index_parameter(index, "efSearch", ef_search)

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, labels = index.search(_normalize(np.ascontiguousarray(queries, dtype=np.float32)), k)
        out = np.full(labels.shape, None, dtype=object)
        ok = (labels >= 0) & (labels < len(ids_arr))
        out[ok] = ids_arr[labels[ok]]
        return scores, out

    return search


def read_faiss(uri: str):
    """A FAISS index from a local path or any storage URI (read into memory, then deserialized)."""
    import faiss

    if "://" not in uri:
        return faiss.read_index(uri)
    loc = Location.from_uri(uri)
    return faiss.deserialize_index(np.frombuffer(loc.read_bytes(), dtype=np.uint8))


def read_ids(uri: str, column: str = S.ID) -> list[str]:
    """Document ids in index-position order from a Parquet file (column ``id``), a .npy array, or a text /
    JSON Lines file (one id, or one object with ``id``, per line)."""
    import pyarrow.parquet as pq

    loc = Location.from_uri(uri)
    data = loc.read_bytes()
    if uri.endswith(".parquet"):
        return [str(x) for x in pq.read_table(pa.BufferReader(data), columns=[column]).column(column).to_pylist()]
    if uri.endswith(".npy"):
        import io

        return [str(x) for x in np.load(io.BytesIO(data), allow_pickle=False)]
    out = []
    for line in data.decode().splitlines():
        if line.strip():
            out.append(str(json.loads(line)[column]) if line.lstrip().startswith("{") else line.strip())
    return out


def qdrant_searcher(client: Any, collection: str, id_field: str | None = "id", vector: str | None = None,
                    hnsw_ef: int | None = None) -> Search:
    """A :data:`Search` over a Qdrant collection; document ids come from payload ``id_field`` (falling
    back to the point id when a point has no such field)."""
    from qdrant_client import models

    params = models.SearchParams(hnsw_ef=hnsw_ef) if hnsw_ef else None
    fields = [id_field] if id_field else False

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        requests = [models.QueryRequest(query=q.tolist(), limit=k, with_payload=fields, using=vector, params=params)
                    for q in np.asarray(queries, dtype=np.float32)]
        results = client.query_batch_points(collection, requests=requests)
        scores = np.full((len(requests), k), -np.inf, dtype=np.float32)
        ids = np.full((len(requests), k), None, dtype=object)
        for i, res in enumerate(results):
            for j, p in enumerate(res.points[:k]):
                payload = p.payload or {}
                ids[i, j] = str(payload[id_field]) if id_field and id_field in payload else str(p.id)
                scores[i, j] = p.score
        return scores, ids

    return search


# ---------------------------------------------------------------------------------------------------
# Input files


def builtin_pairs() -> list[Pair]:
    return ([Pair(a, b, "paraphrase") for a, b in PARAPHRASES] + [Pair(a, b, "unrelated") for a, b in UNRELATED])


def load_pairs(path: str) -> list[Pair]:
    """JSON Lines: ``{"a": ..., "b": ..., "label": "paraphrase"|"unrelated", "threshold": optional}``."""
    out = []
    for n, obj in _jsonl(path):
        a, b, label = obj.get("a"), obj.get("b"), obj.get("label")
        if not isinstance(a, str) or not isinstance(b, str) or label not in ("paraphrase", "unrelated"):
            raise ValidationError(f"{path}:{n}: expected {{\"a\": text, \"b\": text, \"label\": \"paraphrase\"|\"unrelated\"}}")
        th = obj.get("threshold")
        if th is not None and not isinstance(th, (int, float)):
            raise ValidationError(f"{path}:{n}: threshold must be a number, got {th!r}")
        out.append(Pair(a, b, label, None if th is None else float(th), source=f"{Path(path).name}:{n}"))
    return out


def load_queries(path: str) -> list[LabelledQuery]:
    """JSON Lines: ``{"query": text, "relevant": [id, ...]}`` or ``{"query": ..., "relevant": {id: grade}}``."""
    out = []
    for n, obj in _jsonl(path):
        q, rel = obj.get("query"), obj.get("relevant")
        if not isinstance(q, str) or not q.strip():
            raise ValidationError(f"{path}:{n}: \"query\" must be a non-empty string")
        if isinstance(rel, list) and rel and all(isinstance(r, (str, int)) for r in rel):
            grades = {str(r): 1.0 for r in rel}
        elif isinstance(rel, dict) and rel and all(isinstance(g, (int, float)) for g in rel.values()):
            grades = {str(r): float(g) for r, g in rel.items()}
        else:
            raise ValidationError(f"{path}:{n}: \"relevant\" must be a non-empty list of ids or an {{id: grade}} object")
        out.append(LabelledQuery(q, grades))
    if not out:
        raise ValidationError(f"{path}: no queries")
    return out


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    from reembed.storage import json_lines

    try:
        data = Location.from_uri(path).read_bytes()
    except FileNotFoundError as e:
        raise ValidationError(f"{path}: no such file") from e
    return json_lines(data, path, ValidationError)


# ---------------------------------------------------------------------------------------------------
# Streaming the shards and the old store


def _integrity_pass(loc: Location, records: list[tuple[int, dict]], dim: int, normalized: bool, settings: Settings,
                    positions: np.ndarray, want_old: bool, watch: set[str] = frozenset()):
    """Stream every shard once: the integrity gate, the sampled rows' vectors (new, and old when the shards
    carry them), and which of the ``watch`` ids (labelled relevant documents) the output holds."""
    from reembed.write import read_shard_table

    problems: list[str] = []
    per_shard = []
    totals = {"rows": 0, "non_finite": 0, "zero": 0, "bad_norm": 0, "bad_dimension": 0, "row_mismatch": 0, "corrupt": 0}
    sample_ids: list[str] = []
    sample_new, sample_old = [], []
    seen: set[str] = set()
    start = 0
    cols = [S.ID, S.EMBEDDING] + ([OLD_EMBEDDING] if want_old else [])
    for shard, rec in records:
        name = loc.display(rec["path"])
        try:
            table = read_shard_table(loc, rec, columns=cols, verify=True)
        except (OSError, pa.ArrowException, StorageError) as e:  # StorageError: sha256 mismatch
            problems.append(str(e) if isinstance(e, StorageError) else f"{name}: unreadable ({e})")
            totals["corrupt"] += 1
            start += rec["rows"]
            continue
        ids = table.column(S.ID).to_pylist()
        if watch:
            seen.update(watch.intersection(ids))
        emb = table.column(S.EMBEDDING)
        if table.num_rows != rec["rows"]:
            problems.append(f"{name}: {table.num_rows} rows, the manifest says {rec['rows']}")
            totals["row_mismatch"] += 1
        if not pa.types.is_fixed_size_list(emb.type):
            stats = {"rows": len(ids), "bad_dimension": len(ids), "dimension_seen": str(emb.type)}
            matrix = None
        elif emb.null_count:
            stats = {"rows": len(ids), "non_finite": emb.null_count}
            matrix = None
        else:
            matrix = S.embedding_matrix(emb)
            stats = check_vectors(ids, matrix, dim, normalized, settings.norm_tol)
            if stats.get("bad_dimension"):
                matrix = None
        for key in ("non_finite", "zero", "bad_norm", "bad_dimension"):
            v = stats.get(key, 0)
            totals[key] += v
            if v:
                what = {"non_finite": "NaN/inf or null vectors", "zero": "zero vectors",
                        "bad_norm": f"vectors whose norm is not 1 +- {settings.norm_tol}",
                        "bad_dimension": f"vectors of dimension {stats.get('dimension_seen')} instead of {dim}"}[key]
                eg = stats.get(f"{key}_ids")
                problems.append(f"{name}: {v} {what}" + (f" (ids {', '.join(eg)})" if eg else ""))
        totals["rows"] += len(ids)
        per_shard.append({"shard": shard, "rows": len(ids), **{k: stats.get(k) for k in ("norm_min", "norm_mean", "norm_max")}})
        # Sampled rows of this shard.
        here = positions[(positions >= start) & (positions < start + rec["rows"])] - start
        if matrix is not None and len(here):
            here = here[here < len(ids)]
            sample_ids.extend(ids[i] for i in here)
            sample_new.append(matrix[here])
            if want_old:
                sample_old.append(S.embedding_matrix(table.column(OLD_EMBEDDING))[here])
        start += rec["rows"]
    status = FAIL if problems else PASS
    msg = (f"{totals['rows']} vectors in {len(records)} shards: dimension {dim}, finite"
           + (", unit norm" if normalized else "") + " - all good") if not problems else "; ".join(problems[:5]) + (
        f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    gate = {"status": status, "message": msg, **totals, "shards": len(records), "problems": problems,
            "per_shard": per_shard, "normalized": normalized, "dimension": dim}
    new = _stack(sample_new, dim)
    old = list(_stack(sample_old)) if want_old else None
    return gate, sample_ids, new, old, seen


def _shard_batches(loc: Location, records: list[tuple[int, dict]], column: str,
                   dim: int | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, vectors) per shard; shards the integrity gate fails (unreadable, wrong type or dimension) are skipped."""
    from reembed.write import read_shard_table

    for _, rec in records:
        try:
            table = read_shard_table(loc, rec, columns=[S.ID, column])
        except (OSError, pa.ArrowException):
            continue
        emb = table.column(column)
        if not pa.types.is_fixed_size_list(emb.type) or emb.null_count or (dim and emb.type.list_size != dim):
            continue
        yield table.column(S.ID).to_pylist(), S.embedding_matrix(emb)


def _shards_have(loc: Location, records: list[tuple[int, dict]], column: str) -> bool:
    import pyarrow.parquet as pq

    if not records:
        return False
    try:
        with loc.fs.open_input_file(loc.path(records[0][1]["path"])) as f:
            return column in pq.ParquetFile(f).schema_arrow.names
    except (OSError, pa.ArrowException):
        return False


def _old_source(old: str | None, loc: Location, records: list[tuple[int, dict]]) -> Callable[[], Iterator[tuple[list[str], np.ndarray]]]:
    """A re-iterable stream of (ids, old vectors)."""
    if old is None:
        return lambda: _shard_batches(loc, records, OLD_EMBEDDING)
    from reembed import exporters

    if exporters.is_store_uri(old):
        src = exporters.parse_source(old)
        return lambda: ((b.ids, b.vectors) for b in exporters.iter_batches(src))
    old_loc = Location.from_uri(old)
    other = Manifest.load(old_loc)
    if other is not None:
        recs = sorted(other.committed.items())
        return lambda: _shard_batches(old_loc, recs, S.EMBEDDING)
    return lambda: _parquet_batches(old)


def _parquet_batches(uri: str) -> Iterator[tuple[list[str], np.ndarray]]:
    import pyarrow.parquet as pq

    from reembed.storage import list_inputs

    loc, files = list_inputs(uri, "*.parquet")
    for info in files:
        with loc.fs.open_input_file(info.path) as f:
            pf = pq.ParquetFile(f)
            if S.ID not in pf.schema_arrow.names or OLD_EMBEDDING not in pf.schema_arrow.names:
                raise ValidationError(f"{info.path}: an old-store export needs columns id and {OLD_EMBEDDING} "
                                      f"(has {', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(columns=[S.ID, OLD_EMBEDDING], batch_size=65_536):
                yield [str(x) for x in batch.column(0).to_pylist()], S.embedding_matrix(batch.column(1))


def _lookup_vectors(batches: Iterable[tuple[Sequence[str], np.ndarray]], ids: Sequence[str]) -> list[np.ndarray | None]:
    """The vectors of ``ids`` found in a stream (``None`` for ids it does not hold)."""
    want = {i: n for n, i in enumerate(ids)}
    out: list[np.ndarray | None] = [None] * len(ids)
    for block_ids, block in batches:
        for j, i in enumerate(block_ids):
            n = want.get(str(i))
            if n is not None:
                out[n] = np.array(block[j], dtype=np.float32)
    return out


def _old_manifest_model(old: str) -> str | None:
    from reembed import exporters

    if exporters.is_store_uri(old):
        return None
    m = Manifest.load(Location.from_uri(old))
    return m.model["name"] if m is not None else None


# ---------------------------------------------------------------------------------------------------
# Models

_EMBEDDERS: dict[tuple, Any] = {}


def text_embedder(name: str, max_seq_length: int | None, device: str, expect_dim: int | None = None,
                  backend: str = "auto") -> Callable[[list[str]], np.ndarray]:
    """A cached ``texts -> vectors`` function for a model (one load per process). ``backend`` onnx-int8
    (for outputs embedded in int8, see :func:`reembed.embed.query_backend`) runs on CPU."""
    from reembed.embed import Embedder

    if backend == "onnx-int8":
        device = "cpu"
    key = (str(name), max_seq_length, device, backend)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder({"name": str(name), "device": device, "max_seq_length": max_seq_length,
                                    "backend": backend})
    emb = _EMBEDDERS[key]
    if expect_dim is not None and emb.dim != expect_dim:
        raise ValidationError(f"model {name} gives {emb.dim}-d vectors but the output holds {expect_dim}-d ones; "
                              "pass the output's own model with --model")
    return lambda texts: emb.embed(list(texts))[0]


# ---------------------------------------------------------------------------------------------------
# HTML


def render_html(r: dict[str, Any]) -> str:
    from reembed import report as R

    g = r["gates"]
    verdict = "PASSED" if r["passed"] else "FAILED"
    summary = R.table([{"gate": n, "result": gate["status"], "message": gate.get("message", "")} for n, gate in g.items()],
                      ["gate", "result", "message"])
    sections = [
        R.paragraph(f"{verdict}: {r['output']} - model {r['model']['name']} ({r['model']['dimension']}-d, fingerprint "
                    f"{r['fingerprint']}), {r['rows']} rows, validated {r['created_at']}", "pass" if r["passed"] else "fail"),
        R.section("Gates", summary),
    ]
    integ = g["integrity"]
    norms = [s for s in integ.get("per_shard", []) if s.get("norm_mean") is not None]
    sections.append(R.section(
        "Integrity", R.paragraph(integ["message"]),
        R.table([{k: integ.get(k) for k in ("rows", "shards", "non_finite", "zero", "bad_norm", "bad_dimension", "row_mismatch", "corrupt")}]),
        R.line_chart({"min norm": [(s["shard"], s["norm_min"]) for s in norms],
                      "mean norm": [(s["shard"], s["norm_mean"]) for s in norms],
                      "max norm": [(s["shard"], s["norm_max"]) for s in norms]}, x_label="shard", y_label="vector norm")
        if norms else R.paragraph("(no readable shards)")))
    sp = g["sanity_pairs"]
    if sp.get("pairs"):
        bars = {f"{'P' if p['label'] == 'paraphrase' else 'U'}{i}: {p['a'][:22]}": max(p["cosine"], 0.0) for i, p in enumerate(sp["pairs"])}
        sections.append(R.section("Sanity pairs", R.paragraph(sp["message"]), R.bar_chart(bars),
                                  R.table(sp["pairs"], ["label", "a", "b", "cosine", "threshold", "passed", "source"])))
    ann = g["ann_recall"]
    sections.append(R.section(f"ANN recall@{ann.get('k', '')}", R.paragraph(ann["message"]),
                              R.bar_chart(ann["recall"]) if ann.get("recall") else ""))
    ov = g["overlap"]
    parts = [R.paragraph(ov["message"])]
    if ov.get("histogram"):
        parts.append(R.bar_chart({f"{i / 10:.1f}-{(i + 1) / 10:.1f}": float(c) for i, c in enumerate(ov["histogram"])}, unit=" docs"))
    sections.append(R.section("Old vs new neighbour overlap", *parts))
    ab = g["ab"]
    parts = [R.paragraph(ab["message"])]
    if ab.get("new"):
        bars = {f"new {m}": v for m, v in ab["new"].items()}
        if ab.get("old"):
            bars = {x: y for m in ab["new"] for x, y in ((f"old {m}", ab["old"][m]), (f"new {m}", ab["new"][m]))}
        parts.append(R.bar_chart(bars))
        parts.append(R.table(ab["per_query"]))
    sections.append(R.section("Labelled queries: old vs new", *parts))
    return R.page(f"reembed validation: {verdict}", sections)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _normalize(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; NaN/inf read as 0 (the integrity gate reports them) and zero rows stay zero."""
    m = np.asarray(m, dtype=np.float32)
    if m.ndim != 2 or not len(m):
        return m
    if not np.isfinite(m).all():
        m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(n > 0, n, 1.0)


def _stack(parts: list[np.ndarray], dim: int | None = None) -> np.ndarray:
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return np.zeros((0, dim or 0), np.float32)
    return np.vstack([np.atleast_2d(p) for p in parts]).astype(np.float32)


def _fmt_metrics(m: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in m.items())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
