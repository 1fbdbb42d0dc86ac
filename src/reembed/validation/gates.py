"""The gates on data (no files): each returns ``{"status", "message", ...numbers}``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from reembed.indexes.exact import normalize, recall
from reembed.indexes.search import Search
from reembed.validation.queries import LabelledQuery, Pair

PASS, FAIL, INFO, SKIPPED = "pass", "fail", "info", "skipped"


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
    # The storage options' table (float16, FAISS SQ8 / PQ, Qdrant int8 / binary): bytes per vector and recall@10
    # against float32 exact search. Also on whenever the output stores or indexes its vectors quantized.
    quantization: bool = False


NORM_EDGES = np.linspace(0.0, 2.0, 41)  # the integrity gate's histogram of vector norms (above 2: the last bin)


def check_vectors(ids: Sequence[str], matrix: np.ndarray, dim: int, normalized: bool, tol: float) -> dict[str, Any]:
    """Counts of bad vectors in one block, with up to five example ids per problem; the finite non-zero
    vectors' norms as mergeable figures too (``norm_sum``, ``norm_count``, ``norm_hist`` over
    :data:`NORM_EDGES`), so blocks checked in different tasks add up to the figures of the whole."""
    out: dict[str, Any] = {"rows": len(ids)}
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        got = matrix.shape[1] if matrix.ndim == 2 else matrix.shape
        return {**out, "bad_dimension": len(ids), "dimension_seen": got}
    # One pass over the block (einsum: no temporary the size of the block); a NaN/inf shows in the norm, and
    # only those rows (or rows whose squares overflow float32) are looked at again.
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    finite = np.isfinite(norms)
    odd = np.flatnonzero(~finite)
    if len(odd):
        sub = matrix[odd].astype(np.float64)
        finite[odd] = np.isfinite(sub).all(axis=1)
        norms[odd] = np.linalg.norm(np.where(np.isfinite(sub), sub, 0.0), axis=1)
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
    out["norm_sum"] = float(ok.astype(np.float64).sum())
    out["norm_count"] = int(len(ok))
    out["norm_hist"] = np.histogram(np.minimum(ok, NORM_EDGES[-1]), NORM_EDGES)[0]
    return out


def sanity_pairs(embed: Callable[[list[str]], np.ndarray], pairs: Sequence[Pair], paraphrase_min: float,
                 unrelated_max: float) -> dict[str, Any]:
    """Cosine of each pair under ``embed``; paraphrases must reach their threshold, unrelated pairs stay under."""
    if not pairs:
        return {"status": SKIPPED, "message": "no sanity pairs (built-in set off and no --pairs file)"}
    texts = list(dict.fromkeys([p.a for p in pairs] + [p.b for p in pairs]))
    vec = dict(zip(texts, normalize(embed(texts))))
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


def ann_recall(search: Search, queries: np.ndarray, exact: tuple[np.ndarray, np.ndarray], k: int) -> float:
    """Mean recall@k of ``search`` against ``exact`` = (ids, scores) of exact search, deeper than k so ties
    count (see :func:`reembed.indexes.exact.recall`)."""
    _, got = search(np.asarray(queries, dtype=np.float32), k)
    got = np.array([[None if h is None else str(h) for h in row] for row in got], dtype=object).reshape(len(got), -1)
    per = recall(got, exact[0], exact[1], k)
    return float(per.mean()) if len(per) else float("nan")


def ann_gate(searchers: Mapping[str, Search], queries: np.ndarray, exact: tuple[np.ndarray, np.ndarray], k: int,
             min_recall: float, measured: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``searchers`` measured on ``queries`` against ``exact`` (ids, scores); ``measured``: figures taken
    elsewhere (the output's own index through ``reembed search``), ``{"recall", "queries", ...}`` each."""
    measured = dict(measured or {})
    if not searchers and not measured:
        return {"status": SKIPPED, "message": "no ANN index given (build one with `reembed index`)"}
    if searchers and not len(queries) and not measured:
        return {"status": SKIPPED, "message": "no documents to sample"}
    recalls = {name: m["recall"] for name, m in measured.items()}
    if len(queries):
        recalls.update({name: round(ann_recall(fn, queries, exact, k), 4) for name, fn in searchers.items()})
    low = {n: r for n, r in recalls.items() if not r >= min_recall}
    parts = [f"{n} recall@{k}={r}" + (f" ({measured[n]['queries']} text queries via {measured[n]['via']})"
                                      if n in measured else f" ({len(queries)} queries)") for n, r in recalls.items()]
    return {"status": FAIL if low else PASS, "message": ", ".join(parts) + f"; minimum {min_recall}",
            "recall": recalls, "k": k, "queries": len(queries), "measured": measured}


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


def _fmt_metrics(m: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in m.items())


def label_coverage(gate: dict[str, Any], unknown: Sequence[str], labelled_ids: int, output_ids: Sequence[str],
                   fields: Sequence[str], max_missing: float = 0.5) -> dict[str, Any]:
    """The A/B gate fails when it cannot measure: when more than ``max_missing`` of the labelled ids are not
    in the output (recall 0.000 vs 0.000 measures nothing), saying which ids the labels should name."""
    if not unknown or not labelled_ids:
        return gate
    gate = {**gate, "unknown_relevant": len(unknown)}
    share = len(unknown) / labelled_ids
    gate["message"] += f"; {len(unknown)} of {labelled_ids} labelled ids are not in the output (e.g. {', '.join(unknown[:3])})"
    if share > max_missing and gate.get("status") != SKIPPED:
        example = f" (e.g. {', '.join(list(output_ids)[:2])})" if len(output_ids) else ""
        where = (f"; if they name the app's own document ids, pass --label-id-field with the field holding them "
                 f"(e.g. metadata.doc_id; this output's columns: {', '.join(fields) or 'none passed through'})")
        if "_point_id" in fields:
            where += ", or --label-id-field point_id for the store's point ids"
        gate.update(status=FAIL, message=f"cannot measure: {share:.0%} of the labelled ids are not in the output; "
                    f"labels must name the output's ids{example}{where}. " + gate["message"])
    return gate
