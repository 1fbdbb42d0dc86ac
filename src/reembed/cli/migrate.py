"""The ``reembed export``, ``reembed validate`` and ``reembed query`` subcommands: parse, then call the library.

Every mistake a user can make here surfaces as one line on stderr (exit 1); ``-v`` shows the traceback.
Qdrant and other store URIs come from these flags only, so a key from the environment goes only to a
server the user named.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Callable

from reembed.cli.run import add_storage_config, location
from reembed.errors import MigrationError, UsageError
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
    e.add_argument("--output", dest="target", metavar="OUTPUT_URI", help="folder or URI (s3://...) for the parts")
    e.add_argument("--to", dest="target", help=argparse.SUPPRESS)  # the earlier spelling
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
    v.add_argument("output", metavar="OUTPUT_URI", nargs="?", help="the output to validate (or --output)")
    v.add_argument("--output", dest="output_flag", metavar="OUTPUT_URI", help=argparse.SUPPRESS)
    v.add_argument("--queries", metavar="FILE", help='labelled queries, JSON Lines {"query": ..., "relevant": [ids]}')
    v.add_argument("--label-id-field", metavar="FIELD", help="the labels name the app's own ids in this field of each "
                   "document (e.g. metadata.doc_id, or point_id for the store's point ids), not the output's ids")
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
    v.add_argument("--seed", type=int, default=0, help="seed of the sampled documents (default 0)")
    v.add_argument("--norm-tol", type=float, default=1e-3, help="how far from 1 a normalized vector's norm may be "
                   "(default 0.001)")
    v.add_argument("--paraphrase-min", type=float, default=0.55, help="cosine a paraphrase pair must reach "
                   "(default 0.55)")
    v.add_argument("--unrelated-max", type=float, default=0.45, help="cosine an unrelated pair must stay under "
                   "(default 0.45)")
    v.add_argument("--no-builtin-pairs", action="store_true", help="judge sanity only by --pairs (a domain model)")
    v.add_argument("--min-ann-recall", type=float, default=0.90, help="recall@k the built index must reach against "
                   "exact search (default 0.90)")
    v.add_argument("--min-overlap", type=float, default=None, help="gate old/new neighbour overlap (default: report only)")
    v.add_argument("--ab-tolerance", type=float, default=0.02, help="how far new may fall below old on recall@k / nDCG@10")
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where queries and pairs are embedded (default auto)")
    v.add_argument("--quantization", action="store_true",
                   help="add the storage options' table: bytes per vector and recall@10 against float32 exact search "
                        "for float16 shards, FAISS SQ8 and PQ, Qdrant int8 and binary (with rescoring), measured in "
                        "the same pass over the shards (always there when the output is stored or indexed quantized)")
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
    q.add_argument("text", help="the query text")
    q.add_argument("--old", required=True, metavar="URI", help="old store (chroma://, qdrant://, faiss://, export folder or output)")
    q.add_argument("--new", "--output", dest="new", required=True, metavar="URI",
                   help="new store (a reembed output, or chroma:// / qdrant:// / faiss://)")
    q.add_argument("--old-model", metavar="NAME_OR_PATH", help="the old store's model (default: its manifest's, if any)")
    q.add_argument("--new-model", metavar="NAME_OR_PATH", help="the new store's model (default: its manifest's, if any)")
    q.add_argument("-k", type=_positive, default=10, help="results to return (default 10)")
    q.add_argument("--depth", type=_positive, help="results taken from each store before fusion (default max(2k, 20))")
    q.add_argument("--fusion", choices=FUSIONS, default="rrf", help="how the two stores' lists are merged: rrf "
                   "(ranks only, default) or weighted (per-store normalized scores)")
    q.add_argument("--weights", metavar="OLD,NEW", default="1,1", help="store weights (default 1,1)")
    q.add_argument("--rrf-k", type=_positive, default=RRF_K, help=f"the k of reciprocal rank fusion (default {RRF_K})")
    q.add_argument("--adapter", nargs="?", const=0, type=int, metavar="VERSION",
                   help="embed the query once, with the new model, and search the old store through the new "
                        "output's drift adapter (`reembed adapter fit`; default its latest version)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the query is embedded (default auto)")
    q.add_argument("--json", action="store_true", help="print the fused hits as JSON")
    add_storage_config(q)
    q.set_defaults(func=cmd_query)

    a = subparsers.add_parser(
        "adopt", help="turn the app's Qdrant collection into an alias reembed can swap (copy, check, alias)",
        description="Copy the collection the app queries by name into NAME-v0, check that sample queries answer the "
                    "same, then replace the name with an alias to the copy (the name is missing for a measured "
                    "moment in between). After that `reembed swap` and `rollback` move the app's name.")
    a.add_argument("--store", "--from", dest="store", required=True, metavar="URI",
                   help="the app's collection, qdrant:///path?collection=NAME or qdrant://host:6333?collection=NAME")
    a.add_argument("--model", metavar="NAME_OR_PATH", help="the model the app queries with (recorded on the copy, "
                   "so swap, rollback and versions can name it)")
    a.add_argument("--sample", type=_positive, default=32, help="stored vectors used as check queries (default 32)")
    a.add_argument("--workers", type=int, default=4, help="Ray tasks copying a server's collection at once "
                   "(default 4; an embedded folder is copied by one task)")
    a.add_argument("--no-ray", action="store_true", help="copy in this process instead of Ray tasks")
    a.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    a.add_argument("--json", action="store_true", help="print the adoption record as JSON")
    a.set_defaults(func=cmd_adopt)

    m = subparsers.add_parser(
        "migrate", help="the whole migration of an app's store, resumable: export, run, index, validate, adopt, swap",
        description="Migrate an app's Qdrant collection to a new model as one resumable job: export it (payloads and "
                    "point ids kept), re-embed, build the new collection beside it, validate, adopt the app's "
                    "collection name as an alias, and swap. Rerunning continues where it stopped; it stops before "
                    "the app's collection is touched when the validation gate fails.")
    m.add_argument("--from", dest="source", metavar="URI", help="the app's store: qdrant:///path?collection=NAME or "
                   "qdrant://host:6333?collection=NAME (config migrate.from)")
    m.add_argument("--model", metavar="NAME_OR_PATH", help="the new model (config migrate.model)")
    m.add_argument("--old-model", metavar="NAME_OR_PATH", help="the model the app queries with now: the A/B's old side, "
                   "recorded on the adopted collection (config migrate.old_model)")
    m.add_argument("--workdir", metavar="URI", help="where the export, the output and migrate.json go (config "
                   "migrate.workdir)")
    m.add_argument("--queries", metavar="FILE", help="labelled queries for the A/B gate (config migrate.queries)")
    m.add_argument("--label-id-field", metavar="FIELD", help="the labels name the app's ids in this field "
                   "(e.g. metadata.doc_id, point_id)")
    m.add_argument("--swap", dest="swap", action="store_true", default=None, help="swap the app's name to the new "
                   "collection at the end (default)")
    m.add_argument("--no-swap", dest="swap", action="store_false", help="stop before the swap; print its command")
    m.add_argument("--point-ids", choices=["keep", "derive"], help="keep the app's point ids in the new collection "
                   "(default), or derive them from the document ids (uuid5, reembed's scheme) for an app that maps "
                   "ids itself; with ?id_field= on --from the document id comes from that payload field")
    m.add_argument("--config", metavar="migrate.yaml", help="a job config plus a migrate: section")
    m.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a job setting, e.g. --set plan.shard_rows=5000 (repeatable)")
    m.add_argument("--no-ray", action="store_true", help="build the indexes on threads of this process")
    m.add_argument("--json", action="store_true", help="print migrate.json at the end")
    m.set_defaults(func=cmd_migrate)


def cmd_export(args: argparse.Namespace) -> int:
    from reembed.migrate.export import export

    if not args.target:
        raise UsageError("export: --output OUTPUT_URI is required (where the parts go)")
    target = location(args, args.target)
    summary = export(args.source, target, args.page_size, args.part_rows, args.overwrite)
    return _print_export(summary, args.json, target.display())


def cmd_validate(args: argparse.Namespace) -> int:
    from reembed import validation as V

    args.output = args.output or args.output_flag
    if not args.output:
        raise UsageError("validate: name the output (OUTPUT_URI or --output)")

    def run() -> int:
        logging.getLogger("reembed.validation").info(
            "validating %s: integrity of every shard, sanity pairs, ANN recall, old vs new (a minute or two)",
            args.output)
        settings = V.Settings(k=args.k, sample=args.sample, seed=args.seed, norm_tol=args.norm_tol,
                              paraphrase_min=args.paraphrase_min, unrelated_max=args.unrelated_max,
                              min_ann_recall=args.min_ann_recall, min_overlap=args.min_overlap,
                              ab_tolerance=args.ab_tolerance, device=args.device,
                              builtin_pairs=not args.no_builtin_pairs, quantization=args.quantization)
        searchers, closers = _searchers(args)
        try:
            queries = args.queries
            if queries and args.label_id_field:
                from reembed.validation.queries import load_queries, relabel

                queries = relabel(load_queries(queries), location(args, args.output), args.label_id_field,
                                   workers=args.workers, ray_address=args.address)
            report = V.validate(location(args, args.output), queries=queries, old=args.old, old_model=args.old_model,
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
            for line in V.report_lines(report):
                print(line)
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
        adapter = _adapter(args) if args.adapter is not None else None
        with open_store(_store_or_location(args, args.old), args.old_model, "old", args.device) as old, \
                open_store(_store_or_location(args, args.new), args.new_model, "new", args.device) as new:
            if adapter is not None:
                from reembed.adapter import adapted_query

                hits = adapted_query(args.text, adapter, new, old, k=args.k, method=args.fusion,
                                     depth=args.depth, weights={"old": w_old, "new": w_new}, rrf_k=args.rrf_k)
            else:
                hits = dual_query(args.text, old, new, k=args.k, method=args.fusion,
                                  weights={"old": w_old, "new": w_new}, depth=args.depth, rrf_k=args.rrf_k)
        if args.json:
            print(json.dumps([h.__dict__ for h in hits], indent=1))
        else:
            for n, h in enumerate(hits, 1):
                where = " ".join(f"{s}#{r}" for s, r in sorted(h.ranks.items()))
                snippet = f"  {h.text[:70]}" if h.text else ""
                print(f"{n:3d}. {h.score:.4f}  {h.id}  [{where}]{snippet}")
        return 0

    return run()


def _adapter(args: argparse.Namespace):
    """The new output's drift adapter, checked against the output's model and the old model (when named)."""
    from reembed.adapter import load_adapter, old_fingerprint
    from reembed.manifest import Manifest

    loc = location(args, args.new)
    adapter = load_adapter(loc, args.adapter or None)
    manifest = Manifest.load(loc)
    old_fp = old_fingerprint(args.old_model, adapter.old_model.get("dimension")) if args.old_model else None
    adapter.check(manifest.model.get("fingerprint") if manifest else None, old_fp)
    return adapter


def cmd_adopt(args: argparse.Namespace) -> int:
    from reembed.migrate.adopt import adopt

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    result = adopt(args.store, model=args.model, sample=args.sample, use_ray=not args.no_ray, workers=args.workers,
                   ray_address=args.address)
    if args.json:
        print(json.dumps(result, indent=1))
    elif not result["changed"]:
        print(f"{result['alias']} is already an alias -> {result['collection']}; nothing changed")
    else:
        print(f"adopted: {result['alias']} is now an alias -> {result['collection']} ({result['points']} points, "
              f"query model {result.get('model') or 'not recorded (pass --model)'})")
        print(f"window: {result['window']}")
        if result.get("queries_checked"):
            print(f"checked: {result['queries_checked']} sample queries answer the same before and after")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import dataclasses

    from reembed.migrate.flow import load_migrate_config, migrate

    settings, job = load_migrate_config(args.config, args.overrides)
    flags = {"source": args.source, "model": args.model, "old_model": args.old_model, "workdir": args.workdir,
             "queries": args.queries, "label_id_field": args.label_id_field, "swap": args.swap,
             "point_ids": args.point_ids}
    settings = dataclasses.replace(settings, **{k: v for k, v in flags.items() if v is not None},
                                   **({"use_ray": False} if args.no_ray else {}))
    state = migrate(settings, job, progress=None if args.json else _print_stage)
    if args.json:
        print(json.dumps(state, indent=1, default=str))
    return 0


def _print_stage(stage: str, rec: dict[str, Any]) -> None:
    from reembed.cli.indexes import query_model_line

    r = rec["result"]
    line = {
        "export": lambda: f"{r['rows']} documents ({r.get('dimension')}-d, layout "
                          f"{(r.get('layout') or {}).get('kind')}) -> {r['to']}",
        "run": lambda: f"embedded -> {r['output']}",
        "index": lambda: f"{r['collection']} ({r['points']} points) at {r['target']}",
        "validate": lambda: "passed: " + ", ".join(f"{n}={g['status']}" for n, g in r["gates"].items()),
        "adopt": lambda: (f"{r['alias']} is now an alias -> {r['collection']}; {r['window']}" if r.get("changed")
                          else f"{r['alias']} already an alias -> {r['collection']}"),
        "swap": lambda: (f"not swapped (--no-swap); to swap: {r['command']}" if r.get("skipped")
                         else f"alias {r['alias']}: {r['from']} -> {r['to']}; {query_model_line(r)}"),
    }[stage]()
    print(f"{stage:9s} {rec['status']:7s} {line} ({rec['seconds']} s)", flush=True)


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


def _print_export(summary: dict[str, Any], as_json: bool, target: str) -> int:
    import shlex

    from reembed.cli import command_prefix, human_bytes

    if as_json:
        print(json.dumps(summary, indent=1))
        return 0
    size = sum(p.get("bytes", 0) for p in summary["parts"])
    print(f"exported {summary['rows']} documents ({summary['dimension']}-d, metric {summary['metric']}) from "
          f"{summary['source']} into {len(summary['parts'])} part(s) in {summary['seconds']} s"
          + (f"; {summary['text_missing']} without text" if summary["text_missing"] else ""))
    print(f"written to:  {target} ({human_bytes(size)} of Parquet parts, summary in _export.json)")
    keep = ",".join(c for c in ("text", "old_embedding") if c in summary.get("columns", []))
    print(f"next:        {command_prefix()} run --input {shlex.quote(target)} --output NEW_OUTPUT"
          + (f" --passthrough {keep}" if keep else "")
          + "   (re-embed it; keeping old_embedding lets `reembed validate` compare old and new)")
    return 0
