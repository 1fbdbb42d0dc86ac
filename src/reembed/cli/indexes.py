"""``reembed index | versions | swap | rollback | search``: the index stage's subcommands. They parse and call
the library; a :class:`ReembedError` they meet is printed by :func:`reembed.cli.main` as one line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from reembed.cli.run import add_storage_config, location
from reembed.storage import Location
from reembed.config import load_config, replace_path
from reembed.indexes import build as stage
from reembed.indexes import qdrant as Q
from reembed.indexes.search import Searcher
from reembed.indexes.swap import open_manifest, qdrant_target, rollback, swap, target_of

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
_KEY_HELP = ("The API key is read from QDRANT_API_KEY and sent only to a server you name (--qdrant, QDRANT_URL or "
             "index.qdrant), never to one read from a manifest, and never over plain http to a host other than "
             "this machine unless REEMBED_QDRANT_ALLOW_HTTP=1.")


def register(sub) -> None:
    p = sub.add_parser(
        "index", help="build the FAISS index and a Qdrant collection from an output's shards, in parallel",
        description="Build a FAISS index (OUTPUT/indexes/faiss/index-vN.faiss) and a versioned Qdrant collection "
                    "(<collection>-vN) from the committed shards, in parallel as Ray tasks (a Qdrant server is loaded "
                    "by --workers tasks at once). Rerunning resumes a killed build (the Qdrant shards already "
                    "loaded are skipped) and leaves a finished one untouched. An embedded Qdrant above "
                    f"{Q.EMBEDDED_MAX_POINTS:,} points first says how long its load will take. " + _KEY_HELP,
    )
    p.add_argument("output", metavar="OUTPUT_URI", help="the job's output folder or URI")
    p.add_argument("--faiss", choices=["auto", "flat", "ivf", "hnsw", "sq8", "pq", "none"],
                   help="FAISS index type (default auto: picked from corpus size and --faiss-memory, lossless where "
                        "it fits); sq8 (8-bit codes, 1/4 of float32) and pq (PQ codes, 1/16 or less) are lossy by "
                        "choice (`reembed validate --quantization` measures them); none skips it")
    p.add_argument("--faiss-memory", metavar="SIZE", help="FAISS memory budget, e.g. 16G (default 16G)")
    p.add_argument("--recall-target", type=float, help="recall@10 the search setting is tuned to (default 0.95)")
    p.add_argument("--qdrant", metavar="URL_OR_PATH", help="Qdrant server URL (http[s]://...), a folder for an "
                   "embedded Qdrant, or none (default: embedded, under OUTPUT/indexes/qdrant)")
    p.add_argument("--collection", help="collection name; versions are NAME-v1, NAME-v2, ... (default documents)")
    p.add_argument("--quantization", choices=["none", "int8", "binary"],
                   help="Qdrant's in-RAM vectors (default none): int8 scalar codes (quantile 0.99) or binary (1 bit a "
                        "dimension, for 1024-d and wider models); searches rescore with the originals (oversampling 2); "
                        "embedded Qdrant records it but searches exactly")
    p.add_argument("--batch-size", type=int, help="points per Qdrant upsert (default 256)")
    p.add_argument("--workers", type=int, help="Qdrant writers loading a server in parallel, as Ray tasks over "
                   "disjoint shards, gRPC when the server offers it (default 4); an embedded Qdrant takes one writer")
    p.add_argument("--config", metavar="job.yaml", help="YAML job file; its index and storage sections are used")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a setting, e.g. --set index.faiss=hnsw (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-ray", action="store_true", help="run both builds on threads of this process instead of Ray tasks")
    p.add_argument("--verify", action="store_true", help="hash every file of the finished FAISS build whole "
                   "before calling it up to date (default: size, mtime and the first and last MiB)")
    p.add_argument("--prune-from", metavar="COLLECTION", help="instead of building: delete from this existing "
                   "collection (or alias) in the --qdrant target the ids OUTPUT's `reembed run --reuse` found gone "
                   "from the input (plan/gone/), so a collection of the earlier output matches the new input; "
                   "Ray tasks over the gone parts delete them from a server, one Ray actor from an embedded folder "
                   "(--no-ray: this process)")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.set_defaults(func=cmd_index)

    v = sub.add_parser("versions", help="Qdrant collections with model, dimension, points and aliases; FAISS versions",
                       description="List the collections of a Qdrant target (model, dimension, point count, state, "
                                   "aliases pointing at each) and, with --output, the FAISS index versions.")
    _target_args(v)
    v.add_argument("--json", action="store_true", help="print the versions as JSON")
    v.set_defaults(func=cmd_versions)

    s = sub.add_parser("swap", help="point an alias at another collection in one atomic call",
                       description="Move ALIAS to collection TO in one atomic call, keeping the old collection. "
                                   "Refused unless TO finished loading, holds exactly the manifest's row count and "
                                   "has the query model's dimension, and unless the output's latest `reembed validate` "
                                   "report passed (--force skips that gate).")
    _target_args(s)
    s.add_argument("--alias", required=True, help="the name the app queries (a Qdrant alias)")
    s.add_argument("--to", required=True, metavar="COLLECTION", help="the versioned collection the alias moves to")
    s.add_argument("--dimension", type=int, help="dimension of the model the alias's users query with "
                   "(default: the output's model)")
    s.add_argument("--force", action="store_true", help="swap even without a passing validation report")
    s.add_argument("--json", action="store_true", help="print the move (from, to, query model) as JSON")
    s.set_defaults(func=cmd_swap)

    r = sub.add_parser("rollback", help="point an alias back at the collection it left in the last swap")
    _target_args(r)
    r.add_argument("--alias", required=True, help="the alias to move back to the collection it left")
    r.add_argument("--json", action="store_true", help="print the move (from, to, query model) as JSON")
    r.set_defaults(func=cmd_rollback)

    q = sub.add_parser("search", help="search an output's FAISS index with a text query",
                       description="Embed the query with the job's model (on the CPU, the query path the "
                                   "validation gate measures) and search the output's FAISS index; each hit is shown with "
                                   "its text (or another passthrough column, --show).")
    q.add_argument("output", metavar="OUTPUT_URI", help="the output whose FAISS index is searched")
    q.add_argument("query", nargs="+", help="query text (one query per argument)")
    q.add_argument("-k", type=_positive_int, default=10, help="results per query (default 10)")
    q.add_argument("--version", type=int, help="FAISS index version (default: the newest)")
    q.add_argument("--show", metavar="COLUMN", help="passthrough column printed with each hit (default text, when "
                   "the job passed it through); --show none prints ids only")
    q.add_argument("--model", metavar="NAME_OR_PATH", help="the output's model, if not at the manifest's name on this machine")
    q.add_argument("--json", action="store_true", help="print the hits as JSON")
    add_storage_config(q)
    q.set_defaults(func=cmd_search)


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qdrant", metavar="URL_OR_PATH", help="Qdrant server URL, embedded Qdrant folder or store URI "
                   "(qdrant:///path, qdrant://host:6333) (default: the one recorded in --output's manifest, else "
                   "QDRANT_URL). " + _KEY_HELP)
    p.add_argument("--output", metavar="OUTPUT_URI", help="the job's output (its manifest gives the expected "
                   "row count, the model and the Qdrant target)")
    add_storage_config(p)


# ---------------------------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from reembed.indexes.swap import collection_of, qdrant_target

    collection = args.collection or collection_of(args.qdrant)  # qdrant://...?collection=NAME names it too
    flags = {"faiss": args.faiss, "faiss_memory": args.faiss_memory, "recall_target": args.recall_target,
             "qdrant": qdrant_target(args.qdrant), "collection": collection, "batch_size": args.batch_size,
             "upload_workers": args.workers, "qdrant_quantization": args.quantization}
    for key, value in flags.items():
        if value is not None:
            flag = "quantization" if key == "qdrant_quantization" else key.replace("_", "-")
            cfg = replace_path(cfg, ["index", key], value, source=f"--{flag}")
    output = Location.from_uri(args.output, cfg.storage)
    if getattr(args, "prune_from", None):
        from reembed import reuse

        from reembed.errors import UsageError

        target = stage.qdrant_target(output, cfg.index)
        if not target:
            raise UsageError("--prune-from needs a Qdrant target: give --qdrant URL_OR_FOLDER")
        done = reuse.prune(output, target, args.prune_from, cfg.index.batch_size, use_ray=not args.no_ray,
                           ray_address=args.address or cfg.compute.ray_address, workers=cfg.index.upload_workers)
        print(json.dumps(done, indent=1) if args.json else
              f"pruned:  {done['deleted']} of {done['gone']} gone ids deleted from {done['collection']} at "
              f"{done['target']} ({done['count']} points now)")
        return EXIT_OK
    return _print_index(stage.build_indexes(output, cfg.index, ray_address=args.address or cfg.compute.ray_address,
                                            use_ray=not args.no_ray, verify=args.verify), args.json)


def _print_index(results: dict[str, Any], as_json: bool) -> int:
    warning = (results.get("faiss") or {}).get("params", {}).get("recall_warning")
    if warning:  # a published index below its recall target is said out loud, JSON or not
        print(f"WARNING: {warning}", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=1, default=str))
        return EXIT_OK
    if "faiss" in results:
        f = results["faiss"]
        p = f.get("params", {})
        print(f"faiss:   {f['path']} (v{f['version']}, {p.get('factory')}, {f['ntotal']} vectors, {f['bytes']} bytes, "
              f"search {p.get('search') or 'exact'}, recall@10 {p.get('recall_at_10')}, sha256 {f['sha256'][:16]})")
    if "qdrant" in results:
        q = results["qdrant"]
        how = f", {q['writers']} writer{'s' if q['writers'] != 1 else ''} over {q['transport']}" if q.get("writers") else ""
        print(f"qdrant:  {q['collection']} at {q['target']} ({q['count']} points{how})")
    return EXIT_OK


def cmd_versions(args: argparse.Namespace) -> int:
    def run() -> int:
        out: dict[str, Any] = {}
        manifest = open_manifest(location(args, args.output)) if args.output else None
        if manifest is not None:
            st = stage.state_of(manifest)
            out["faiss"] = [r for r in [*st.get("faiss_history", []), st.get("faiss")] if r]
        target, named = target_of(qdrant_target(args.qdrant), manifest, required=manifest is None)
        if target:
            client = Q.connect(target, named_by_user=named)
            try:
                out["qdrant"] = {"target": Q.describe(target), "collections": Q.versions(client)}
            finally:
                client.close()
        if args.json:
            print(json.dumps(out, indent=1, default=str))
            return EXIT_OK
        for r in out.get("faiss", []):
            p = r.get("params") or r.get("plan") or {}
            print(f"faiss v{r.get('version', '?')}: {r.get('status')} {p.get('factory')} {r.get('ntotal', '')} vectors "
                  f"{r.get('path', '')}")
        if "qdrant" in out:
            print(f"qdrant {out['qdrant']['target']}:")
            rows = [["collection", "model", "dim", "points", "quantization", "state", "aliases"]]
            for c in out["qdrant"]["collections"]:
                rows.append([c["collection"], str(c["model"] or "-"), str(c["dimension"]), str(c["points"]),
                             str(c.get("quantization") or "none"), str(c["state"] or "-"), ", ".join(c["aliases"]) or "-"])
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        return EXIT_OK

    return run()


def cmd_swap(args: argparse.Namespace) -> int:
    def run() -> int:
        _print_move(swap(args.alias, args.to, qdrant=args.qdrant, output=location(args, args.output), dimension=args.dimension,
                         force=args.force), args.json)
        return EXIT_OK

    return run()


def cmd_rollback(args: argparse.Namespace) -> int:
    def run() -> int:
        _print_move(rollback(args.alias, qdrant=args.qdrant, output=location(args, args.output)), args.json)
        return EXIT_OK

    return run()


def cmd_search(args: argparse.Namespace) -> int:
    def run() -> int:
        searcher = Searcher(location(args, args.output), version=args.version, model=args.model)
        hits = searcher.search(args.query, k=args.k)
        column = args.show or ("text" if "text" in searcher.manifest.plan.get("passthrough", []) else "none")
        shown = {} if column == "none" else searcher.lookup([i for h in hits for i, _ in h], column)
        if args.json:
            print(json.dumps([{"query": q, "hits": [{"id": i, "score": s, **({column: shown.get(i)} if shown else {})}
                                                    for i, s in h]} for q, h in zip(args.query, hits)], indent=1))
            return EXIT_OK
        for q, h in zip(args.query, hits):
            if len(args.query) > 1:
                print(f"# {q}")
            for rank, (doc, score) in enumerate(h, 1):
                extra = shown.get(doc)
                print(f"{rank:>3}. {score:.4f}  {doc}" + (f"  {_snippet(extra)}" if extra is not None else ""))
        return EXIT_OK

    return run()


# ---------------------------------------------------------------------------------------------------


def _print_move(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        if not result["changed"]:
            print(f"alias {result['alias']} already points at {result['to']}; nothing changed")
        else:
            print(f"alias {result['alias']}: {result['from'] or '(new)'} -> {result['to']}")
        print(query_model_line(result))


def query_model_line(result: dict[str, Any]) -> str:
    """What the alias's users must embed queries with now, as the collection records it."""
    dim = f" ({result['dimension']}-d)" if result.get("dimension") else ""
    if not result.get("model"):
        return (f"query model: {result['to']} records no model; query it with the model its vectors were made "
                f"with{dim}")
    rev = f" @ {result['revision']}" if result.get("revision") and result["revision"] != "unknown" else ""
    return f"query model: the app must now embed its queries with {result['model']}{rev}{dim}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _snippet(value: Any, width: int = 100) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[:width - 3] + "..."
