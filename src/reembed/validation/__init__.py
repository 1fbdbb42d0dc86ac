"""The validation gate: is the new embedding output fit to replace the old store?

    reembed validate OUTPUT_URI [--queries queries.jsonl] [--old URI --old-model NAME] [--workers N]

writes ``OUTPUT/validation/report.json`` and ``report.html`` and exits non-zero when a gate fails.
Gates, each ``pass``, ``fail``, ``info`` (reported, not gated) or ``skipped`` (not enough inputs):

* **integrity** - every committed shard: sha256 against its commit (damaged shards named), row count, vector
  dimension, no NaN/inf, no zero vectors, unit norm within ``norm_tol`` for normalizing models, no id
  repeated inside a shard (unless the plan ran with ``dedup: none``); norms' min/mean/max and histogram;
* **sanity_pairs** - paraphrase pairs must score at least ``paraphrase_min`` with the new model and
  unrelated pairs at most ``unrelated_max`` (a built-in set plus ``--pairs FILE``);
* **ann_recall** - recall@k of the output's own FAISS index measured the way ``reembed search`` answers:
  text queries (labelled queries, the sanity-pair sentences, and a few words cut from sampled documents)
  embedded by the same query path and searched through :class:`reembed.indexes.search.Searcher`, the same index
  file and id map, against exact search of the same vectors; other ANN searchers (``searchers=``, e.g. a
  Qdrant collection) on those query vectors and on sampled documents; at least ``min_ann_recall``;
* **overlap** - old vs new: mean overlap@k of each sampled document's k nearest neighbours in the old
  and the new space (different models legitimately disagree, so this is ``info`` unless ``min_overlap``);
* **ab** - labelled queries (``{"query": ..., "relevant": [ids] | {id: grade}}`` per line): recall@k and
  nDCG@10 of exact search in the old and the new space side by side; the new model must not fall more
  than ``ab_tolerance`` below the old one on either metric.

Beside the gates (reported, never gated): with ``--quantization`` (or whenever the output stores float16 vectors
or is indexed with SQ8 / PQ codes or a quantized Qdrant collection), the storage options' bytes per vector and
recall@10 against float32 exact search (:mod:`.quantization`); and when the output has a saved drift adapter,
its recovery figures from the fit record.

**A Ray job.** The shards are read by Ray tasks (``workers`` at once, default every CPU Ray has; 0 runs
them in this process), never by the driver: first the few shards holding the sampled documents (their
vectors and texts become queries), then every committed shard once, in one pass that checks its file and
dead-letter file against the sha256 of its commit, computes the integrity figures, and searches it exactly
for every query (cosine: vectors normalized before the dot product), in the new space and, when the shards
carry ``old_embedding``, in the old one. Each task returns small mergeable figures (counts, sums, min/max, a
norm histogram, the damaged shards, keyed top-k lists: see :mod:`.integrity`), so the report is the same for
any number of workers and no vector of the corpus reaches the driver. Damaged shards (missing, wrong sha256,
unreadable) are named in the integrity gate and the HTML report and fail the gate; ``reembed repair``
re-embeds exactly those. ``reembed swap`` calls :func:`check_validation`, which refuses a missing, failed or
stale report.

The package: :mod:`.gates` (the gates on data), :mod:`.integrity` (the shard tasks, their merge, the old
store), :mod:`.queries` (pairs and labelled queries), :mod:`.report` (HTML). Search adapters and the
exact kNN live in :mod:`reembed.indexes.search` and :mod:`reembed.indexes.exact`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from reembed import schema as S
from reembed.errors import ManifestError, ValidationError
from reembed.indexes.build import faiss_record, state_of
from reembed.indexes.exact import DEPTH
from reembed.indexes.faiss import read_ids_file as read_ids, read_index_file as read_faiss  # noqa: F401 (re-exported)
from reembed.manifest import Manifest, now
from reembed.indexes.search import (Searcher, exact_knn, faiss_searcher, normalize as _normalize, qdrant_searcher,  # noqa: F401
                            query_embedder, recall, text_embedder)
from reembed.storage import Location
from reembed.validation.gates import (FAIL, INFO, PASS, SKIPPED, Search, Settings, ab_gate, ann_gate,  # noqa: F401
                                    ann_recall, label_coverage, check_vectors, ndcg_at_k, neighbour_overlap, overlap_gate,
                                    recall_at_k, retrieval_metrics, sanity_pairs)
from reembed.repair import map_shards
from reembed.validation.integrity import (OLD_EMBEDDING, SampleJob, ScanJob, Search as ShardSearch,  # noqa: F401
                                        _lookup_vectors, _old_manifest_model, _stack, committed, committed_rows,
                                        integrity_gate, old_side, sample_batch, scan_shards)
from reembed.validation.queries import (PARAPHRASES, UNRELATED, LabelledQuery, Pair, builtin_pairs,  # noqa: F401
                                      load_pairs, load_queries)
from reembed.adapter import saved_figures
from reembed.validation import quantization
from reembed.validation.report import _json_default, adapter_line, render_html  # noqa: F401

log = logging.getLogger(__name__)

REPORT_JSON = "validation/report.json"
REPORT_HTML = "validation/report.html"
TEXT_COLUMN = "text"  # the passthrough column the gate cuts text queries from
QUERY_WORDS = (2, 5)  # a query cut from a sampled document: this many consecutive words (min, max)

# ---------------------------------------------------------------------------------------------------
# The whole gate


def validate(output: str | Location, *, queries: str | Sequence[LabelledQuery] | None = None,
             old: str | None = None, old_model: str | None = None, model: str | None = None,
             pairs: str | Sequence[Pair] | None = None, searchers: Mapping[str, Search] | None = None,
             settings: Settings = Settings(), write: bool = True, workers: int | None = None,
             ray_address: str | None = None) -> dict[str, Any]:
    """Run every gate on the output at ``output`` and return the report (also written under
    ``OUTPUT/validation/`` unless ``write`` is false).

    ``model`` overrides the manifest's model name (the same model, stored elsewhere on this machine).
    ``old`` is an old store URI (``chroma://...``, see :mod:`reembed.migrate.stores`), an export folder
    (``id`` + ``old_embedding`` Parquet), or another reembed output; without it the shards' own
    ``old_embedding`` column is used when the job passed it through. ``old_model`` embeds the labelled
    queries for the old side of the A/B comparison. ``workers``: shard tasks at once (None: every CPU Ray
    has, on the cluster at ``ray_address`` / ``RAY_ADDRESS`` or a local Ray; 0: in this process, without
    Ray); the report is the same whatever their number.
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
    tasks = {"workers": workers, "ray_address": ray_address}

    shards, rows = committed_rows(manifest)
    total = int(rows.sum())
    n_sample = min(settings.sample, total)
    positions = np.sort(np.random.default_rng(settings.seed).choice(total, n_sample, replace=False)) if n_sample else np.zeros(0, np.int64)

    # The sampled documents first (only the shards holding them are read): their vectors are queries of the
    # exact search, and their texts give the text queries.
    text_column = TEXT_COLUMN if TEXT_COLUMN in manifest.plan.get("passthrough", []) else None
    sample = _sample(loc, manifest, shards, rows, positions, SampleJob(dim, OLD_EMBEDDING if old is None else None,
                                                                       text_column), tasks)
    has_old_column, sample_ids, sample_new, sample_old, sample_texts = sample
    n_sample = len(sample_ids)

    # Queries go through the query path `reembed search` uses (model, revision, backend; on the CPU unless
    # --device says otherwise), so the sanity pairs and the ANN figure judge what users will get.
    device = "cpu" if settings.device == "auto" else settings.device
    searcher = _own_index(loc, manifest, model, device)  # its files are checked before any model loads
    embed_new = query_embedder(manifest.model, model, device, expect_dim=dim)
    sanity = sanity_pairs(embed_new, all_pairs, settings.paraphrase_min, settings.unrelated_max)
    texts = gate_queries(labelled, all_pairs or builtin_pairs(), sample_texts, settings.seed) if searcher else []
    kq = max(settings.k + 1, 10)
    kx = DEPTH * kq  # exact results deep enough to see ties at the k-th place
    q_new = embed_new([q.query for q in labelled]) if labelled else np.zeros((0, dim), np.float32)
    q_text = searcher.embed(texts) if texts else np.zeros((0, dim), np.float32)
    queries_new = np.vstack([sample_new, q_new, q_text]).astype(np.float32)

    # The old side's queries, when the shards carry the old vectors: searched in the same pass.
    own_old = has_old_column and old is None
    old_model = old_model or (_old_manifest_model(old, loc.settings) if old else None)
    old_q = _old_queries(sample_old, labelled, old_model, settings) if own_old else None

    # One pass over every committed shard, in parallel tasks: integrity, sha256, exact search in the new space
    # for sampled documents, labelled queries and the gate's text queries (and in the old space), together.
    searches = [ShardSearch(S.EMBEDDING, queries_new, kx, dim)]
    if old_q is not None and len(old_q[2]):
        searches.append(ShardSearch(OLD_EMBEDDING, old_q[2], kq))
    # The storage options' table: each option's candidates found in the same pass, by its codec.
    codecs = _storage_codecs(loc, manifest, shards, rows, settings, tasks) if len(queries_new) and \
        quantized_storage(manifest, settings) else []
    first_codec = len(searches)
    searches += [ShardSearch(S.EMBEDDING, _normalize(queries_new), c.depth(quantization.K), dim, codec=c) for c in codecs]
    relevant = frozenset(r for q in labelled for r in q.relevant)
    job = ScanJob(dim=dim, normalized=normalized, norm_tol=settings.norm_tol, searches=tuple(searches), watch=relevant,
                  unique_ids=(manifest.plan.get("dedup") or "hash") != "none")
    scan = scan_shards(loc, manifest.refs(), job, total=len(shards), **tasks)
    integrity = integrity_gate(scan, dim, normalized)
    pending = manifest.pending()
    if pending:
        integrity["problems"].insert(0, f"{len(pending)} of {manifest.shard_count} planned shards are not committed "
                                        "yet; finish `reembed run` first")
        integrity.update(status=FAIL, message="; ".join(integrity["problems"][:5]), pending=len(pending))
    damaged = manifest.state().damaged
    if damaged:
        integrity["problems"].insert(0, f"{len(damaged)} shards were found damaged and are not re-embedded yet; "
                                        f"run `reembed repair {loc.uri}`")
        integrity.update(status=FAIL, message="; ".join(integrity["problems"][:5]), retracted=sorted(damaged))
    gates: dict[str, dict[str, Any]] = {"integrity": integrity, "sanity_pairs": sanity}

    exact_s, exact_new = scan.top(0, job) if len(queries_new) else (np.zeros((0, kx), np.float32), np.zeros((0, kx), object))
    n_lab = len(q_new)
    exact_sample_new, exact_labelled_new = exact_new[:n_sample, :kq], exact_new[n_sample:n_sample + n_lab, :kq]
    text_exact = (exact_new[n_sample + n_lab:], exact_s[n_sample + n_lab:])

    own = {}
    if searcher is not None:
        own["faiss"] = _search_recall(searcher, texts, text_exact, settings.k)
    others = {("faiss (given)" if name == "faiss" and own else name): fn for name, fn in (searchers or {}).items()}
    vec_queries = np.vstack([sample_new, q_text]).astype(np.float32)
    vec_exact = (np.vstack([exact_new[:n_sample], text_exact[0]]), np.vstack([exact_s[:n_sample], text_exact[1]]))
    gates["ann_recall"] = ann_gate(others, vec_queries, vec_exact, settings.k, settings.min_ann_recall, measured=own)

    # Old side: the same sampled documents and the labelled queries, searched in the old space.
    old_src = old or (f"{loc.display()} (the shards' {OLD_EMBEDDING} column)" if has_old_column else None)
    if old is None and not has_old_column:
        gates["overlap"] = {"status": SKIPPED, "message": "no old store: pass --old URI (or pass old_embedding through the job)"}
        exact_labelled_old = None
    else:
        if own_old:
            found, _, queries_old, q_old = old_q
            exact_old = scan.top(1, job)[1] if len(queries_old) else np.zeros((0, kq), object)
        else:
            side = old_side(old, loc, **tasks)
            found, _, queries_old, q_old = _old_queries(side.lookup(sample_ids), labelled, old_model, settings)
            exact_old = side.knn(queries_old, kq) if len(queries_old) else np.zeros((0, kq), object)
        gates["overlap"] = overlap_gate([sample_ids[i] for i in found], exact_sample_new[found], exact_old[:len(found)],
                                        settings.k, settings.min_overlap, missing=len(sample_ids) - len(found))
        exact_labelled_old = exact_old[len(found):] if q_old is not None else None
    gates["ab"] = ab_gate(labelled, exact_labelled_new, exact_labelled_old, settings.k, settings.ab_tolerance,
                          have_old=old is not None or has_old_column)
    unknown = sorted(relevant - scan.seen)
    gates["ab"] = label_coverage(gates["ab"], unknown, len(relevant), sample_ids, manifest.plan.get("passthrough", []))
    gates = {name: gates[name] for name in ("integrity", "sanity_pairs", "ann_recall", "overlap", "ab")}
    storage = None
    if codecs:
        exclude = list(sample_ids) + [None] * (len(queries_new) - n_sample)
        storage = quantization.table(codecs, [scan.merged(first_codec + i, job) for i in range(len(codecs))],
                                     exclude, quantization.K)

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
        **({"quantization": storage} if storage else {}),
        **({"adapter": adapter} if (adapter := saved_figures(loc)) else {}),
        "passed": all(g["status"] != FAIL for g in gates.values()),
        "seconds": round(time.monotonic() - t0, 3),
    }
    if write:
        loc.write_bytes(json.dumps(report, indent=1, default=_json_default).encode(), REPORT_JSON)
        loc.write_bytes(render_html(report).encode(), REPORT_HTML)
    failed = [n for n, g in gates.items() if g["status"] == FAIL]
    log.info("validate: %d rows, %d shards, %.1f s, %.1f rows/s; %s", total, len(shards), report["seconds"],
             total / report["seconds"] if report["seconds"] else 0.0,
             "passed" if report["passed"] else f"FAILED ({', '.join(failed)})")
    return report


def _sample(loc: Location, manifest: Manifest, shards: np.ndarray, rows: np.ndarray, positions: np.ndarray,
            job: SampleJob, tasks: dict[str, Any]):
    """The sampled rows (positions over the committed rows in shard order), read by Ray tasks from only the
    shards that hold them (and the first shard, whose columns say whether the shards carry old vectors).
    Returns (has the old column, ids, new vectors, old vectors (a list, None where missing) or None, texts)."""
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    owner = np.searchsorted(starts, positions, side="right") - 1
    want = {int(shards[i]): positions[owner == i] - starts[i] for i in np.unique(owner)}
    first = int(shards[0]) if len(shards) else None
    if first is not None:
        want.setdefault(first, np.zeros(0, np.int64))
    # Only the sampled shards' numbers and seqs go to the tasks, which read their records from the commit log.
    items = manifest.refs().select(sorted(want))
    got = sorted((row for part in map_shards(sample_batch, loc, items, job, want, total=len(items), **tasks)
                  for row in part), key=lambda row: row["shard"])
    has_old = bool(got) and got[0]["columns"] is not None and OLD_EMBEDDING in got[0]["columns"]
    ids, new, old, texts = [], [], [], []
    for row in got:
        ids.extend(row["ids"])
        if row["new"] is not None:
            new.append(row["new"])
            old.extend(list(row["old"]) if row["old"] is not None else [None] * len(row["ids"]))
        texts.extend(row["texts"])
    return has_old, ids, _stack(new, job.dim), (old if has_old and job.old_column else None), texts


def quantized_storage(manifest: Manifest, settings: Settings) -> bool:
    """Whether the report carries the storage options' table: asked for, or the output stores float16 vectors,
    has a FAISS index of SQ8 / PQ codes, or a quantized Qdrant collection."""
    stage = state_of(manifest)
    factory = str(((stage.get("faiss") or {}).get("params") or {}).get("factory") or "")
    return (settings.quantization or S.vector_dtype(manifest.plan) == "float16" or "SQ" in factory or "PQ" in factory
            or ((stage.get("qdrant") or {}).get("quantization") or "none") != "none")


def _storage_codecs(loc: Location, manifest: Manifest, shards: np.ndarray, rows: np.ndarray, settings: Settings,
                    tasks: dict[str, Any]) -> list:
    """The table's codecs, the FAISS ones trained on a uniform sample of the output's vectors (every vector of
    an output of at most ``quantization.TRAIN``), read by the same shard tasks as the sampled documents."""
    total, dim = int(rows.sum()), int(manifest.model["dimension"])
    if total <= quantization.TRAIN:
        picks = np.arange(total, dtype=np.int64)
    else:
        picks = np.sort(np.random.default_rng(settings.seed + 1).choice(total, quantization.TRAIN, replace=False))
    train = _sample(loc, manifest, shards, rows, picks, SampleJob(dim), tasks)[2]
    return quantization.codecs(train, dim, S.vector_dtype(manifest.plan))


def _old_queries(sample_old: list | None, labelled: Sequence[LabelledQuery], old_model: str | None, settings: Settings):
    """(indexes of the sampled documents the old side holds, their old vectors, the old side's queries: those
    vectors then the labelled queries embedded by ``old_model`` (None without one), the latter or None)."""
    sample_old = sample_old or []
    found = [i for i, v in enumerate(sample_old) if v is not None]
    old_docs = _stack([sample_old[i] for i in found])
    q_old = None
    if labelled and old_model:
        q_old = text_embedder(old_model, None, settings.device)([q.query for q in labelled])
        if len(old_docs) and q_old.shape[1] != old_docs.shape[1]:
            raise ValidationError(f"old model {old_model} gives {q_old.shape[1]}-d vectors but the old store holds "
                                  f"{old_docs.shape[1]}-d ones; pass the old store's own model as --old-model")
    parts = [m for m in (old_docs, q_old) if m is not None and len(m)]
    queries_old = np.vstack(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    return found, old_docs, queries_old, q_old


def gate_queries(labelled: Sequence[LabelledQuery], pairs: Sequence[Pair], sample_texts: Sequence[str | None],
                 seed: int = 0) -> list[str]:
    """The ANN gate's text queries: the labelled queries, the sanity-pair sentences, and from each sampled
    document with text a few consecutive words (short queries unlike any whole document, as users type)."""
    rng = np.random.default_rng(seed + 7)
    out = [q.query for q in labelled] + [t for p in pairs for t in (p.a, p.b)]
    for text in sample_texts:
        words = str(text or "").split()
        if len(words) >= QUERY_WORDS[0]:
            n = int(rng.integers(QUERY_WORDS[0], min(QUERY_WORDS[1], len(words)) + 1))
            start = int(rng.integers(0, len(words) - n + 1))
            out.append(" ".join(words[start:start + n]))
    return list(dict.fromkeys(out))


def _own_index(loc: Location, manifest: Manifest, model: str | None, device: str) -> Searcher | None:
    """The output's own newest FAISS index as ``reembed search`` opens it, or None when none was built."""
    stage = state_of(manifest)
    if not any(r and r.get("status") == "done" for r in [stage.get("faiss"), *stage.get("faiss_history", [])]):
        return None
    faiss_record(manifest)  # raises for a record that names no finished build
    return Searcher(loc, model=model, device=device)


def _search_recall(searcher: Searcher, texts: list[str], exact: tuple[np.ndarray, np.ndarray], k: int) -> dict[str, Any]:
    """Recall@k of ``searcher.search(texts)`` - the very call ``reembed search`` makes - against exact search."""
    hits = searcher.search(texts, k)
    found_ids = np.full((len(hits), k), None, dtype=object)
    for row, h in enumerate(hits):
        for j, (i, _) in enumerate(h[:k]):
            found_ids[row, j] = i
    per = recall(found_ids, exact[0], exact[1], k)
    return {"recall": round(float(per.mean()), 4) if len(per) else float("nan"), "queries": len(texts),
            "index": searcher.record["path"], "via": "reembed search (text queries)"}


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report's figures beside the gates, as the CLI prints them: the storage options' table and the saved
    drift adapter's recovery."""
    lines = []
    q = report.get("quantization")
    if q:
        lines.append(f"storage options: recall@{q['k']} against {q['reference']} on {q['queries']} queries")
        for row in q["options"]:
            lines.append(f"  {row['label']:<28} {row['bytes_per_vector']:>6} B/vector  {row['compression']:>6}x  "
                         f"recall@{q['k']} {row['recall_at_10']}"
                         + (f"  [{row['how'].split(':')[0]}]" if row["option"].startswith("qdrant") else ""))
    a = report.get("adapter")
    if a:
        lines.append(adapter_line(a))
    return lines


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
    """One hash of the committed shards: changes whenever any shard is added, replaced or retracted. From
    the commit log's arrays (:meth:`Manifest.committed_digest`): no record is read, at any number of shards."""
    return manifest.committed_digest()[:16]
