"""The ``reembed export``, ``reembed validate`` and ``reembed query`` subcommands: parse, then call the library.

Every mistake a user can make here surfaces as one line on stderr (exit 1); ``-v`` shows the traceback.
Qdrant and other store URIs come from these flags only, so a key from the environment goes only to a
server the user named.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from reembed.cli.run import add_storage_config, location
from reembed.errors import MigrationError
from reembed.migrate.dual import FUSIONS, RRF_K, dual_query
from reembed.migrate.stores import open_store


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
    e.add_argument("--page-size", type=_positive, default=1000, help="documents per request to the store (default 1000)")
    e.add_argument("--part-rows", type=_positive, default=100_000, help="rows per Parquet part (default 100000)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in the same place")
    e.add_argument("--json", action="store_true", help="print the export summary as JSON")
    add_storage_config(e)
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
    v.add_argument("-k", type=_positive, default=10, help="k for recall@k and overlap@k (default 10)")
    v.add_argument("--sample", type=_positive, default=200, help="documents sampled as queries (default 200)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--norm-tol", type=float, default=1e-3)
    v.add_argument("--paraphrase-min", type=float, default=0.55)
    v.add_argument("--unrelated-max", type=float, default=0.45)
    v.add_argument("--no-builtin-pairs", action="store_true", help="judge sanity only by --pairs (a domain model)")
    v.add_argument("--min-ann-recall", type=float, default=0.90)
    v.add_argument("--min-overlap", type=float, default=None, help="gate old/new neighbour overlap (default: report only)")
    v.add_argument("--ab-tolerance", type=float, default=0.02, help="how far new may fall below old on recall@k / nDCG@10")
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    v.add_argument("--workers", type=_workers, default=None, metavar="N", help="shard tasks at once (default: "
                   "every CPU Ray has; 0: in this process, without Ray); the report is the same for any N")
    v.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_config(v)
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
    q.add_argument("-k", type=_positive, default=10)
    q.add_argument("--depth", type=_positive, help="results taken from each store before fusion (default max(2k, 20))")
    q.add_argument("--fusion", choices=FUSIONS, default="rrf")
    q.add_argument("--weights", metavar="OLD,NEW", default="1,1", help="store weights (default 1,1)")
    q.add_argument("--rrf-k", type=_positive, default=RRF_K)
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    q.add_argument("--json", action="store_true")
    add_storage_config(q)
    q.set_defaults(func=cmd_query)


def cmd_export(args: argparse.Namespace) -> int:
    from reembed.migrate.export import export

    summary = export(args.source, location(args, args.target), args.page_size, args.part_rows, args.overwrite)
    return _print_export(summary, args.json)


def cmd_validate(args: argparse.Namespace) -> int:
    from reembed import validation as V

    def run() -> int:
        settings = V.Settings(k=args.k, sample=args.sample, seed=args.seed, norm_tol=args.norm_tol,
                              paraphrase_min=args.paraphrase_min, unrelated_max=args.unrelated_max,
                              min_ann_recall=args.min_ann_recall, min_overlap=args.min_overlap,
                              ab_tolerance=args.ab_tolerance, device=args.device,
                              builtin_pairs=not args.no_builtin_pairs)
        searchers, closers = _searchers(args)
        try:
            report = V.validate(location(args, args.output), queries=args.queries, old=args.old, old_model=args.old_model,
                                model=args.model, pairs=args.pairs, searchers=searchers, settings=settings,
                                workers=args.workers, ray_address=args.address)
        finally:
            for close in closers:
                close()
        if args.json:
            print(json.dumps(report, indent=1, default=V._json_default))
        else:
            for name, gate in report["gates"].items():
                print(f"{name:13s} {gate['status'].upper():7s} {gate.get('message', '')}")
            loc = location(args, args.output)
            print(f"{'PASSED' if report['passed'] else 'FAILED'}: report at {loc.display(V.REPORT_HTML)}")
        return 0 if report["passed"] else 1

    return run()


def cmd_query(args: argparse.Namespace) -> int:
    def run() -> int:
        try:
            w_old, w_new = (float(x) for x in args.weights.split(","))
        except ValueError:
            raise MigrationError(f"--weights {args.weights!r}: expected two numbers OLD,NEW, e.g. 0.3,0.7") from None
        with open_store(_store_or_location(args, args.old), args.old_model, "old", args.device) as old, \
                open_store(_store_or_location(args, args.new), args.new_model, "new", args.device) as new:
            hits = dual_query(args.text, old, new, k=args.k, method=args.fusion, weights={"old": w_old, "new": w_new},
                              depth=args.depth, rrf_k=args.rrf_k)
        if args.json:
            print(json.dumps([h.__dict__ for h in hits], indent=1))
        else:
            for n, h in enumerate(hits, 1):
                where = " ".join(f"{s}#{r}" for s, r in sorted(h.ranks.items()))
                snippet = f"  {h.text[:70]}" if h.text else ""
                print(f"{n:3d}. {h.score:.4f}  {h.id}  [{where}]{snippet}")
        return 0

    return run()


# ---------------------------------------------------------------------------------------------------
# Helpers


def _searchers(args: argparse.Namespace) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    """Searchers the user named (--faiss, --qdrant); the output's own index is measured by validate itself,
    through the same path as `reembed search`."""
    from reembed.indexes.faiss import read_ids_file, read_index_file
    from reembed.indexes.search import faiss_searcher, qdrant_searcher
    from reembed.migrate.stores import QdrantStore, parse_uri

    searchers: dict[str, Any] = {}
    closers: list[Callable[[], None]] = []
    if args.faiss:
        if not args.faiss_ids:
            raise MigrationError("--faiss needs --faiss-ids (the document id of each FAISS label, in order)")
        searchers["faiss"] = faiss_searcher(read_index_file(args.faiss), read_ids_file(args.faiss_ids))
    if args.qdrant:
        from reembed.indexes.qdrant import PAYLOAD_ID

        src = parse_uri(args.qdrant)
        if src.kind != "qdrant":
            raise MigrationError(f"--qdrant {args.qdrant}: expected a qdrant:// URI")
        store = QdrantStore.from_uri(src, name="qdrant")
        closers.append(store.close)
        searchers["qdrant"] = qdrant_searcher(store.client, store.collection, id_field=store.id_field or PAYLOAD_ID,
                                              vector=store.vector)
    return searchers, closers


FILESYSTEM_SCHEMES = ("", "file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs")


def _store_or_location(args: argparse.Namespace, uri: str):
    """A store URI (or an unknown scheme, for open_store to name) as given; a path or a filesystem URI
    (s3://, gs://, ...) opened with --config's storage settings."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return location(args, uri) if scheme in FILESYSTEM_SCHEMES else uri


def _positive(value: str) -> int:
    """An argparse type: a whole number >= 1 (argparse turns the ValueError into a usage error, exit 2)."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _workers(value: str) -> int:
    """An argparse type: a whole number >= 0."""
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _print_export(summary: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"exported {summary['rows']} documents ({summary['dimension']}-d, metric {summary['metric']}) from "
              f"{summary['source']} into {len(summary['parts'])} part(s) in {summary['seconds']} s"
              + (f"; {summary['text_missing']} without text" if summary["text_missing"] else ""))
    return 0
