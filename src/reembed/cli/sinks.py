"""``reembed publish``: write an output's new vectors into the app's store (Chroma, Pinecone, Weaviate) under a
versioned name, optionally swapping it in (Chroma: by renaming; no aliases there), or roll the swap back.

The store URI comes from ``--to`` only, so a key from the environment goes only to a server the user named.
"""

from __future__ import annotations

import argparse
import json

from reembed.cli.run import add_storage_config, location
from reembed.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "publish", help="write an output's vectors into a Chroma / Pinecone / Weaviate store under a versioned name",
        description="Write every committed shard of OUTPUT into the store at --to, under a versioned name beside "
                    "the app's (Chroma collection docs_v2, Pinecone namespace docs_v2, Weaviate collection Docs_v2), "
                    "with the export's ids, text and metadata. Resumable: rerun the same command. --swap makes the "
                    "new Chroma collection the app's (renames; Chroma has no aliases); --rollback undoes it.")
    p.add_argument("output", nargs="?", metavar="OUTPUT_URI", help="the reembed output (not needed with --rollback)")
    p.add_argument("--to", dest="target", required=True, metavar="STORE_URI",
                   help="chroma:///path?collection=NAME, chroma://host:port?collection=NAME, "
                        "pinecone://INDEX?namespace=NS, weaviate://host:8080/Collection; options text_field=, space= "
                        "(Chroma). Keys come from CHROMA_API_KEY / PINECONE_API_KEY / WEAVIATE_API_KEY")
    p.add_argument("--batch-size", type=_positive, default=256, help="documents per upsert request (default 256)")
    p.add_argument("--workers", type=_positive, default=4, help="Ray tasks writing shards at once into a server "
                   "(default 4; a local Chroma folder has one writer, a Ray actor on this node)")
    p.add_argument("--no-ray", action="store_true", help="write from this process instead of Ray tasks (small outputs)")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--swap", action="store_true", help="then make the new collection the app's (Chroma: rename)")
    p.add_argument("--rollback", action="store_true", help="undo the last --swap on --to, and nothing else")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_config(p)
    p.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    from reembed.migrate.sinks import publish, rollback

    if args.rollback:
        if args.output or args.swap:
            raise UsageError("publish --rollback takes only --to STORE_URI (no OUTPUT_URI, no --swap)")
        summary = rollback(args.target)
        print(json.dumps(summary, indent=1) if args.json else _swap_line(summary, "rolled back"))
        return 0
    if not args.output:
        raise UsageError("publish needs OUTPUT_URI (the reembed output to publish) and --to STORE_URI")
    summary = publish(location(args, args.output), args.target, batch_size=args.batch_size, workers=args.workers,
                      swap=args.swap, use_ray=not args.no_ray, ray_address=args.address)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    resumed = f", {summary['shards_resumed']} shards already there" if summary["shards_resumed"] else ""
    print(f"published {summary['count']} documents ({summary['dimension']}-d, {summary['model']}) into "
          f"{summary['uri']} as {summary['collection']} in {summary['seconds']} s{resumed}")
    if "swap" in summary:
        print(_swap_line(summary["swap"], "swapped"))
    return 0


def _swap_line(swap: dict, verb: str) -> str:
    moves = ", ".join(f"{a} -> {b}" for a, b in swap["renames"])
    return (f"{verb}: {moves}; the app's {swap['collection']!r} now holds {swap.get('model') or 'the old store'}'s "
            f"vectors: query it with that model ({swap['note']})")


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
