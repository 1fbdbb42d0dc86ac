"""Gradual migration: query the old and the new store together, and write new documents to both.

    reembed query "how do I reset my password" --old "chroma:///data/chroma?collection=docs" \\
        --old-model sentence-transformers/all-MiniLM-L6-v2 --new s3://bucket/embeddings/bge-large/

The query is embedded once per store, with *that store's* model, and each store is searched in its own
space. Cosine values from two models are not on one scale (BGE's unrelated pairs score where MiniLM's
paraphrases do), so raw scores are never compared across stores. The two ranked lists are merged by

* ``rrf`` - reciprocal rank fusion: ``sum_s w_s / (rrf_k + rank_s(d))`` (ranks only, no scores), or
* ``weighted`` - each store's scores min-max normalized over its own result list to [0, 1], then
  ``sum_s w_s * norm_s(d)``; a store that did not return ``d`` contributes 0.

A document both stores return therefore outranks one that only one store returns at a similar rank.
:func:`dual_write` embeds documents that arrive during the migration with both models and upserts them
into both stores, so neither falls behind.

Stores (:func:`open_store`): a reembed output (exact search over its shards, model from its manifest),
an export folder (exact search over ``old_embedding``), ``chroma://`` and ``qdrant://`` collections
(searchable and writable), and ``faiss://`` index files (searchable). The module also registers the
``reembed export``, ``reembed validate`` and ``reembed query`` commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from reembed.errors import DualWriteError, MigrationError  # noqa: F401 (re-exported)

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


Result = list[tuple[str, float, str | None]]  # (id, score - higher is better, text or None)


# ---------------------------------------------------------------------------------------------------
# Stores


class Store:
    """A searchable store with its own embedding model. Subclasses implement ``_search`` and maybe ``upsert``."""

    kind = "store"
    writable = False

    def __init__(self, name: str, model: str | None, dim: int, device: str = "auto"):
        self.name = name
        self.model = model
        self.dim = dim
        self.device = device
        self.backend = "auto"  # a reembed output embedded in int8 sets onnx-int8 (see _exact_from_output)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not self.model:
            raise MigrationError(f"store {self.name!r} ({self.kind}): no model to embed queries with; pass its model "
                                 f"(--{self.name}-model NAME_OR_PATH)")
        from reembed.validate import text_embedder

        return text_embedder(self.model, None, self.device, expect_dim=self.dim, backend=self.backend)(list(texts))

    def search(self, vectors: np.ndarray, k: int) -> list[Result]:
        """Top-``k`` per query vector, best first; scores are higher-is-better in this store's own scale."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.dim:
            raise MigrationError(f"store {self.name!r} holds {self.dim}-d vectors; got {vectors.shape[1]}-d queries")
        return self._search(vectors, k)

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:  # pragma: no cover - abstract
        raise NotImplementedError

    def upsert(self, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray,
               metadata: Sequence[Mapping[str, Any]]) -> None:
        raise self.read_only_error()

    def read_only_error(self) -> MigrationError:
        return MigrationError(f"store {self.name!r} ({self.kind}) is read-only here: {self.kind} files are rebuilt by "
                              "`reembed run` / the index stage, not written to; dual-write into a chroma:// or qdrant:// store")

    def close(self) -> None:
        pass


class ExactStore(Store):
    """Vectors held in memory, searched exactly by cosine: a reembed output or an export folder."""

    kind = "exact"

    def __init__(self, name: str, model: str | None, ids: Sequence[str], vectors: np.ndarray,
                 texts: Sequence[str | None] | None = None, device: str = "auto"):
        from reembed.validate import _normalize

        super().__init__(name, model, vectors.shape[1], device)
        self.ids = np.asarray(list(ids), dtype=object)
        self.vectors = _normalize(vectors)
        self.texts = list(texts) if texts is not None else None

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        from reembed.validate import _normalize

        s = _normalize(vectors) @ self.vectors.T
        k = min(k, s.shape[1])
        out = []
        for row in s:
            top = np.argsort(-row, kind="stable")[:k]
            out.append([(str(self.ids[j]), float(row[j]), self.texts[j] if self.texts else None) for j in top])
        return out


class ChromaStore(Store):
    kind = "chroma"
    writable = True

    def __init__(self, name: str, model: str | None, collection, dim: int, device: str = "auto"):
        super().__init__(name, model, dim, device)
        self.collection = collection

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        res = self.collection.query(query_embeddings=vectors, n_results=k, include=["distances", "documents"])
        docs = res.get("documents") or [[None] * len(r) for r in res["ids"]]
        # Chroma returns distances (l2, cosine or ip space): smaller is better, so the score is -distance.
        return [[(str(i), -float(d), t) for i, d, t in zip(ids, dists, texts)]
                for ids, dists, texts in zip(res["ids"], res["distances"], docs)]

    def upsert(self, ids, texts, vectors, metadata) -> None:
        metas = [dict(m) if m else None for m in metadata]
        self.collection.upsert(ids=list(ids), embeddings=np.asarray(vectors, np.float32), documents=list(texts),
                               metadatas=metas if any(metas) else None)


class QdrantStore(Store):
    kind = "qdrant"
    writable = True

    def __init__(self, name: str, model: str | None, client, collection: str, dim: int, vector: str | None,
                 higher_is_better: bool, id_field: str = ID_FIELD, text_field: str = TEXT_FIELD, device: str = "auto"):
        super().__init__(name, model, dim, device)
        self.client, self.collection, self.vector = client, collection, vector
        self.sign = 1.0 if higher_is_better else -1.0
        self.id_field, self.text_field = id_field, text_field

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        from qdrant_client import models

        reqs = [models.QueryRequest(query=v.tolist(), limit=k, using=self.vector,
                                    with_payload=[self.id_field, self.text_field]) for v in vectors]
        out = []
        for res in self.client.query_batch_points(self.collection, requests=reqs):
            out.append([(str((p.payload or {}).get(self.id_field, p.id)), self.sign * float(p.score),
                         (p.payload or {}).get(self.text_field)) for p in res.points])
        return out

    def upsert(self, ids, texts, vectors, metadata) -> None:
        from qdrant_client import models

        points = []
        for i, t, v, m in zip(ids, texts, np.asarray(vectors, np.float32), metadata):
            vec = {self.vector: v.tolist()} if self.vector else v.tolist()
            points.append(models.PointStruct(id=point_id(i), vector=vec,
                                             payload={**dict(m or {}), self.id_field: i, self.text_field: t}))
        self.client.upsert(self.collection, points=points, wait=True)

    def close(self) -> None:
        self.client.close()


class FaissStore(Store):
    kind = "faiss"

    def __init__(self, name: str, model: str | None, index, ids: Mapping[int, str], texts: Mapping[int, str | None],
                 device: str = "auto"):
        """``ids`` / ``texts``: by FAISS label (the position, or what ``add_with_ids`` was given)."""
        super().__init__(name, model, int(index.d), device)
        self.index = index
        self.ids = ids
        self.texts = texts
        self.sign = -1.0 if int(index.metric_type) == 1 else 1.0  # METRIC_L2 returns distances

    def _search(self, vectors: np.ndarray, k: int) -> list[Result]:
        from reembed.validate import _normalize

        q = np.ascontiguousarray(_normalize(vectors) if self.sign > 0 else vectors, dtype=np.float32)
        scores, labels = self.index.search(q, k)
        out = []
        for srow, lrow in zip(scores, labels):
            out.append([(self.ids[int(lb)], self.sign * float(s), self.texts.get(int(lb)))
                        for s, lb in zip(srow, lrow) if int(lb) in self.ids])
        return out


def open_store(uri: str, model: str | None = None, name: str = "store", device: str = "auto") -> Store:
    """Open a store for querying (and writing, where it can be written): see the module docstring."""
    from reembed import exporters
    from reembed.manifest import Manifest
    from reembed.storage import Location

    if exporters.is_store_uri(uri):
        src = exporters.parse_source(uri)
        if src.kind == "chroma":
            col = exporters.open_chroma(src)
            dim = _chroma_dim(col, uri)
            return ChromaStore(name, model, col, dim, device)
        if src.kind == "qdrant":
            client = exporters.open_qdrant(src)
            params = client.get_collection(src.name).config.params.vectors
            vector = src.option("vector")
            if isinstance(params, dict):
                vector = vector or (next(iter(params)) if len(params) == 1 else None)
                if vector not in params:
                    client.close()
                    raise MigrationError(f"{uri}: choose a named vector with ?vector= (has {', '.join(params)})")
                params = params[vector]
            higher = params.distance.value.lower() in ("cosine", "dot")
            return QdrantStore(name, model, client, src.name, int(params.size), vector, higher,
                               id_field=src.option("id_field", ID_FIELD), text_field=src.option("text_field", TEXT_FIELD),
                               device=device)
        if src.kind == "faiss":
            index = exporters.read_faiss_index(src.path)
            doc = exporters.read_docstore(exporters.docstore_path(src))
            ids, texts = _faiss_docs(doc, src)
            return FaissStore(name, model, index, ids, texts, device)
        raise MigrationError(f"{uri}: querying {src.kind} is not supported here (export it with `reembed export`, "
                             "then query the export folder)")
    loc = Location.from_uri(uri)
    manifest = Manifest.load(loc)
    if manifest is not None:
        return _exact_from_output(loc, manifest, name, model, device)
    return _exact_from_export(uri, name, model, device)


def point_id(doc_id: str) -> int | str:
    """A Qdrant point id for a document id: the integer itself, the UUID itself, else a stable uuid5."""
    s = str(doc_id)
    if s.isdigit():
        return int(s)
    try:
        return str(uuid.UUID(s))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"reembed:{s}"))


# ---------------------------------------------------------------------------------------------------
# Query and write both


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


def dual_query(text: str, old: Store, new: Store, k: int = 10, method: str = "rrf",
               weights: Mapping[str, float] | None = None, depth: int | None = None, rrf_k: int = RRF_K) -> list[Hit]:
    """Search both stores for ``text``, each with its own model, and return the fused top ``k``.

    ``depth`` results are taken from each store before fusion (default ``max(2k, 20)``), so a document
    ranked just below ``k`` in both stores can still rise above one ranked high in a single store.
    """
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


# ---------------------------------------------------------------------------------------------------
# Commands: reembed export | validate | query


def register(subparsers) -> None:
    e = subparsers.add_parser(
        "export", help="back up the old vector store as reembed input (id, text, metadata, old_embedding)",
        description="Export every document of an old vector store (Chroma, Qdrant, FAISS + docstore, Pinecone, "
                    "Weaviate) into Parquet parts in reembed's input format: the backup and the next job's input.")
    e.add_argument("--from", dest="source", required=True, metavar="URI",
                   help="chroma:///path?collection=NAME, chroma://host:port?collection=NAME, qdrant:///path?collection=NAME, "
                        "qdrant://host:6333?collection=NAME, faiss:///index.faiss?docstore=docs.parquet, "
                        "pinecone://INDEX?namespace=NS, weaviate://host:8080/Collection; options text_field=, id_field=, "
                        "vector=. Keys come from CHROMA_API_KEY / QDRANT_API_KEY / PINECONE_API_KEY / WEAVIATE_API_KEY")
    e.add_argument("--to", dest="target", required=True, metavar="OUTPUT_URI", help="folder or URI (s3://...) for the parts")
    e.add_argument("--page-size", type=int, default=1000, help="documents per request to the store (default 1000)")
    e.add_argument("--part-rows", type=int, default=100_000, help="rows per Parquet part (default 100000)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in the same place")
    e.add_argument("--json", action="store_true", help="print the export summary as JSON")
    e.set_defaults(func=cmd_export)

    v = subparsers.add_parser(
        "validate", help="gate the new embeddings: integrity, sanity pairs, ANN recall, old vs new A/B",
        description="Validate an output before swapping it in. Writes OUTPUT/validation/report.json and report.html; "
                    "exits 1 when a gate fails.")
    v.add_argument("output", metavar="OUTPUT_URI")
    v.add_argument("--queries", metavar="FILE", help='labelled queries, JSON Lines {"query": ..., "relevant": [ids]}')
    v.add_argument("--pairs", metavar="FILE", help='extra sanity pairs, JSON Lines {"a", "b", "label": paraphrase|unrelated}')
    v.add_argument("--old", metavar="URI", help="the old store (store URI, export folder or reembed output); default: "
                   "the shards' old_embedding column when the job passed it through")
    v.add_argument("--old-model", metavar="NAME_OR_PATH", help="the old store's model (embeds labelled queries for the A/B)")
    v.add_argument("--model", metavar="NAME_OR_PATH", help="the output's model, if not at the manifest's name on this machine")
    v.add_argument("--faiss", metavar="INDEX_URI", help="a built FAISS index to measure ANN recall on")
    v.add_argument("--faiss-ids", metavar="URI", help="document ids in FAISS label order (Parquet id column, .npy, or lines)")
    v.add_argument("--qdrant", metavar="URI", help="a built Qdrant collection, e.g. qdrant:///path?collection=docs")
    v.add_argument("-k", type=int, default=10, help="k for recall@k and overlap@k (default 10)")
    v.add_argument("--sample", type=int, default=200, help="documents sampled as queries (default 200)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--norm-tol", type=float, default=1e-3)
    v.add_argument("--paraphrase-min", type=float, default=0.55)
    v.add_argument("--unrelated-max", type=float, default=0.45)
    v.add_argument("--no-builtin-pairs", action="store_true", help="judge sanity only by --pairs (a domain model)")
    v.add_argument("--min-ann-recall", type=float, default=0.90)
    v.add_argument("--min-overlap", type=float, default=None, help="gate old/new neighbour overlap (default: report only)")
    v.add_argument("--ab-tolerance", type=float, default=0.02, help="how far new may fall below old on recall@k / nDCG@10")
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_validate)

    q = subparsers.add_parser(
        "query", help="search the old and the new store together (each with its own model) and fuse the results",
        description="Dual-store query for a gradual migration: embeds the text with each store's model, searches "
                    "both, and merges with reciprocal rank fusion or weighted per-store normalized scores.")
    q.add_argument("text")
    q.add_argument("--old", required=True, metavar="URI", help="old store (chroma://, qdrant://, faiss://, export folder or output)")
    q.add_argument("--new", required=True, metavar="URI", help="new store (a reembed output, or chroma:// / qdrant:// / faiss://)")
    q.add_argument("--old-model", metavar="NAME_OR_PATH", help="the old store's model (default: its manifest's, if any)")
    q.add_argument("--new-model", metavar="NAME_OR_PATH", help="the new store's model (default: its manifest's, if any)")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--depth", type=int, help="results taken from each store before fusion (default max(2k, 20))")
    q.add_argument("--fusion", choices=FUSIONS, default="rrf")
    q.add_argument("--weights", metavar="OLD,NEW", default="1,1", help="store weights (default 1,1)")
    q.add_argument("--rrf-k", type=int, default=RRF_K)
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_query)


def cmd_export(args: argparse.Namespace) -> int:
    from reembed import exporters

    return _guard(lambda: _print_export(exporters.export(args.source, args.target, args.page_size, args.part_rows,
                                                         args.overwrite), args.json))


def cmd_validate(args: argparse.Namespace) -> int:
    from reembed import validate as V

    def run() -> int:
        settings = V.Settings(k=args.k, sample=args.sample, seed=args.seed, norm_tol=args.norm_tol,
                              paraphrase_min=args.paraphrase_min, unrelated_max=args.unrelated_max,
                              min_ann_recall=args.min_ann_recall, min_overlap=args.min_overlap,
                              ab_tolerance=args.ab_tolerance, device=args.device,
                              builtin_pairs=not args.no_builtin_pairs)
        searchers, closers = _searchers(args)
        try:
            report = V.validate(args.output, queries=args.queries, old=args.old, old_model=args.old_model,
                                model=args.model, pairs=args.pairs, searchers=searchers, settings=settings)
        finally:
            for close in closers:
                close()
        if args.json:
            print(json.dumps(report, indent=1, default=V._json_default))
        else:
            for name, gate in report["gates"].items():
                print(f"{name:13s} {gate['status'].upper():7s} {gate.get('message', '')}")
            from reembed.storage import Location

            loc = Location.from_uri(args.output)
            print(f"{'PASSED' if report['passed'] else 'FAILED'}: report at {loc.display(V.REPORT_HTML)}")
        return 0 if report["passed"] else 1

    return _guard(run)


def cmd_query(args: argparse.Namespace) -> int:
    def run() -> int:
        try:
            w_old, w_new = (float(x) for x in args.weights.split(","))
        except ValueError:
            raise MigrationError(f"--weights {args.weights!r}: expected two numbers OLD,NEW, e.g. 0.3,0.7") from None
        old = open_store(args.old, args.old_model, "old", args.device)
        new = open_store(args.new, args.new_model, "new", args.device)
        try:
            hits = dual_query(args.text, old, new, k=args.k, method=args.fusion, weights={"old": w_old, "new": w_new},
                              depth=args.depth, rrf_k=args.rrf_k)
        finally:
            old.close()
            new.close()
        if args.json:
            print(json.dumps([h.__dict__ for h in hits], indent=1))
        else:
            for n, h in enumerate(hits, 1):
                where = " ".join(f"{s}#{r}" for s, r in sorted(h.ranks.items()))
                snippet = f"  {h.text[:70]}" if h.text else ""
                print(f"{n:3d}. {h.score:.4f}  {h.id}  [{where}]{snippet}")
        return 0

    return _guard(run)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _searchers(args: argparse.Namespace) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    from reembed import exporters
    from reembed import validate as V

    searchers: dict[str, Any] = {}
    closers: list[Callable[[], None]] = []
    if args.faiss:
        if not args.faiss_ids:
            raise MigrationError("--faiss needs --faiss-ids (the document id of each FAISS label, in order)")
        searchers["faiss"] = V.faiss_searcher(V.read_faiss(args.faiss), V.read_ids(args.faiss_ids))
    elif getattr(args, "output", None):
        # The output's own FAISS index from `reembed index`, sha256-checked before it is read.
        from reembed.indexes import faiss as faiss_index
        from reembed.manifest import Manifest
        from reembed.storage import Location

        loc = Location.from_uri(args.output)
        m = Manifest.load(loc)
        rec = ((m.data.get("stages") or {}).get("index") or {}).get("faiss") if m else None
        if rec and rec.get("status") == "done":
            index, ids = faiss_index.load(loc, rec)
            searchers["faiss"] = V.faiss_searcher(index, ids.to_pylist())
    if args.qdrant:
        src = exporters.parse_source(args.qdrant)
        if src.kind != "qdrant":
            raise MigrationError(f"--qdrant {args.qdrant}: expected a qdrant:// URI")
        client = exporters.open_qdrant(src)
        closers.append(client.close)
        searchers["qdrant"] = V.qdrant_searcher(client, src.name, id_field=src.option("id_field", ID_FIELD),
                                                vector=src.option("vector"))
    return searchers, closers


def _guard(fn: Callable[[], int]) -> int:
    """Our own errors are one clear line on stderr and exit 1."""
    from reembed.exporters import ExportError
    from reembed.validate import ValidationError

    try:
        return fn()
    except (MigrationError, ExportError, ValidationError) as e:
        print(f"reembed: error: {e}", file=sys.stderr)
        return 1


def _print_export(summary: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"exported {summary['rows']} documents ({summary['dimension']}-d, metric {summary['metric']}) from "
              f"{summary['source']} into {len(summary['parts'])} part(s) in {summary['seconds']} s"
              + (f"; {summary['text_missing']} without text" if summary["text_missing"] else ""))
    return 0


def _chroma_dim(col, uri: str) -> int:
    got = col.get(limit=1, include=["embeddings"])
    emb = got.get("embeddings")
    if emb is None or len(emb) == 0:
        dim = getattr(col, "dimension", None)
        if dim:
            return int(dim)
        raise MigrationError(f"{uri}: empty collection; cannot tell its vector dimension")
    return len(emb[0])


def _faiss_docs(doc, src) -> tuple[dict[int, str], dict[int, str | None]]:
    """Document ids and texts by FAISS label: the docstore's ``position`` column, else its row order."""
    id_col, text_col = src.option("id_field", ID_FIELD), src.option("text_field", TEXT_FIELD)
    if id_col not in doc.column_names:
        raise MigrationError(f"{src.uri}: the docstore has no {id_col!r} column")
    ids = [str(x) for x in doc.column(id_col).to_pylist()]
    texts = doc.column(text_col).to_pylist() if text_col in doc.column_names else [None] * len(ids)
    labels = [int(p) for p in doc.column("position").to_pylist()] if "position" in doc.column_names else range(len(ids))
    return dict(zip(labels, ids)), dict(zip(labels, texts))


def _exact_from_output(loc, manifest, name: str, model: str | None, device: str) -> ExactStore:
    from reembed import schema as S
    from reembed.write import read_shard_table

    ids, blocks, texts = [], [], []
    for _, rec in sorted(manifest.committed.items()):
        table = read_shard_table(loc, rec)
        ids.extend(table.column(S.ID).to_pylist())
        blocks.append(S.embedding_matrix(table.column(S.EMBEDDING)))
        texts.extend(table.column(TEXT_FIELD).to_pylist() if TEXT_FIELD in table.column_names else [None] * table.num_rows)
    if not ids:
        raise MigrationError(f"{loc.display()}: no committed shards to search")
    from reembed.embed import query_backend

    store = ExactStore(name, model or manifest.model["name"], ids, np.vstack(blocks), texts, device)
    store.backend = query_backend(manifest.model)
    return store


def _exact_from_export(uri: str, name: str, model: str | None, device: str) -> ExactStore:
    import pyarrow.parquet as pq

    from reembed import schema as S
    from reembed.exporters import OLD_EMBEDDING
    from reembed.storage import StorageError, list_inputs

    try:
        loc, files = list_inputs(uri, "*.parquet")
    except StorageError as e:
        raise MigrationError(f"{uri}: not a store URI, a reembed output or an export folder ({e})") from e
    ids, blocks, texts = [], [], []
    for info in files:
        with loc.fs.open_input_file(info.path) as f:
            table = pq.read_table(f)
        if OLD_EMBEDDING not in table.column_names:
            raise MigrationError(f"{info.path}: no {OLD_EMBEDDING} column; not an export folder")
        ids.extend(str(x) for x in table.column(S.ID).to_pylist())
        blocks.append(S.embedding_matrix(table.column(OLD_EMBEDDING)))
        texts.extend(table.column(TEXT_FIELD).to_pylist() if TEXT_FIELD in table.column_names else [None] * table.num_rows)
    return ExactStore(name, model, ids, np.vstack(blocks), texts, device)
