"""``reembed repair``: check every committed shard against its sha256 and re-embed exactly the damaged ones."""

from __future__ import annotations

import argparse
import json
from typing import Any

from reembed.cli.run import EXIT_FAIL, EXIT_OK


def register(sub) -> None:
    r = sub.add_parser(
        "repair", help="find committed shards that are missing or corrupt and re-embed exactly those",
        description="Check every committed shard's file (and dead-letter file) against the sha256 its commit "
                    "recorded, in parallel Ray tasks; retract the damaged ones in the commit log (`reembed status` "
                    "then says damaged) and re-embed them with the normal resume. Without --config the job's "
                    "settings are read from the manifest.")
    r.add_argument("output", metavar="OUTPUT_URI", help="the job's output folder or URI")
    r.add_argument("--config", metavar="job.yaml", help="the job's YAML config (input, model, compute, storage); "
                   "default: the settings the manifest recorded")
    r.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one setting of --config, e.g. --set compute.max_actors=4 (repeatable)")
    r.add_argument("--check-only", action="store_true", help="check and retract, but do not re-embed")
    r.add_argument("--workers", type=_workers, default=None, metavar="N",
                   help="check tasks at once (default: every CPU Ray has; 0: in this process, without Ray)")
    r.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=cmd_repair)


def cmd_repair(args: argparse.Namespace) -> int:
    from reembed.config import load_config, replace_path
    from reembed.repair import repair
    from reembed.storage import Location, Settings

    cfg = None
    if args.config or args.overrides:
        cfg = load_config(args.config, args.overrides)
        cfg = replace_path(cfg, ["output", "uri"], args.output, source="repair OUTPUT_URI")
        if args.address:
            cfg = replace_path(cfg, ["compute", "ray_address"], args.address, source="--address")
    loc = Location.from_uri(args.output, Settings.of(cfg.storage) if cfg is not None else Settings())
    summary = repair(loc, cfg, check_only=args.check_only, workers=args.workers, ray_address=args.address)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_repair(summary, args.check_only))
    return EXIT_OK if summary["complete"] or (args.check_only and not summary["retracted"]) else EXIT_FAIL


def format_repair(s: dict[str, Any], check_only: bool) -> str:
    lines = [f"output:      {s['output']}",
             f"checked:     {s['checked']} committed shards against their sha256"]
    if s["retracted"]:
        lines.append(f"damaged:     {s['retracted']} shard(s), retracted from the commit log:")
        lines += [f"  {d['shard']:05d} {d['reason']:10s} {d['message']}" for d in s["damaged"]]
        if s["retracted"] > len(s["damaged"]):
            lines.append(f"  ... and {s['retracted'] - len(s['damaged'])} more")
    else:
        lines.append("damaged:     none found")
    if s["earlier_damaged"]:
        lines.append(f"earlier:     {len(s['earlier_damaged'])} shard(s) found damaged by an earlier check")
    run = s.get("run")
    if run is not None:
        lines.append(f"re-embedded: {run['run']['shards_committed']} shard(s); input {run['input_rows']} = embedded "
                     f"{run['embedded']} + dead-lettered {run['dead_lettered']}")
    if s["complete"]:
        lines.append("status:      complete")
    elif check_only and s["still_damaged"]:
        lines.append(f"status:      damaged: run `reembed repair {s['output']}` without --check-only to re-embed them")
    else:
        lines.append("status:      incomplete: run `reembed repair` (or the job's run command) again to resume")
    return "\n".join(lines)


def _workers(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n
