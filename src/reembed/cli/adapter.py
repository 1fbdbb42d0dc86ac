"""``reembed adapter fit|show``: the drift adapter that lets the new model query the old store."""

from __future__ import annotations

import argparse
import json

from reembed.cli.run import add_storage_config, location


def register(subparsers) -> None:
    from reembed.adapter import DEFAULT_SAMPLE, KINDS

    a = subparsers.add_parser(
        "adapter", help="fit / show the drift adapter (new-model queries -> old store) from an output's paired vectors",
        description="A small map from the new model's space into the old one, fitted on the same documents' old and "
                    "new vectors, so a query embedded once with the new model also searches the old store while the "
                    "re-embedding runs (Drift-Adapter, EMNLP 2025).")
    sub = a.add_subparsers(dest="adapter_command", required=True, metavar="{fit,show}")
    f = sub.add_parser("fit", help="fit procrustes, low-rank, MLP and listwise adapters, judge them on held-out "
                       "pairs, save the best")
    f.add_argument("output", metavar="OUTPUT_URI", help="the new output (a partial run is enough)")
    f.add_argument("--old", metavar="URI", help="the old side: an export folder (id + old_embedding) or a store URI; "
                   "default: the shards' old_embedding column")
    f.add_argument("--old-model", metavar="NAME_OR_PATH", help="the old store's model: names the adapter's old side, "
                   "and embeds --queries for it")
    f.add_argument("--queries", metavar="FILE", help='labelled queries, JSON Lines {"query": ..., "relevant": [ids]}; '
                   "default: judged by neighbour overlap with the new model")
    f.add_argument("--query-log", metavar="FILE", help="query texts (one a line, or JSON Lines with a \"text\" field), "
                   "embedded by both models (needs --old-model): query-like pairs added to the fit, and the "
                   "listwise kind's training queries")
    f.add_argument("--kinds", default=",".join(KINDS), help=f"adapter kinds to fit (default {','.join(KINDS)})")
    f.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help=f"paired documents to use (default {DEFAULT_SAMPLE}; "
                   "a fifth are held out to judge)")
    f.add_argument("--rank", type=int, default=128, help="rank of the low-rank affine adapter (default 128)")
    f.add_argument("--seed", type=int, default=0, help="seed of the sample and the split (default 0)")
    f.add_argument("--no-save", action="store_true", help="fit and report, save nothing")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_config(f)
    f.set_defaults(func=cmd_fit)
    s = sub.add_parser("show", help="the adapter saved with an output: kind, models, figures")
    s.add_argument("output", metavar="OUTPUT_URI", help="the output the adapter was saved with")
    s.add_argument("--version", type=int, help="an adapter version (default: the latest)")
    s.add_argument("--json", action="store_true", help="print as JSON")
    add_storage_config(s)
    s.set_defaults(func=cmd_show)


def cmd_fit(args: argparse.Namespace) -> int:
    from reembed.adapter import fit_output

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    report = fit_output(location(args, args.output), old=args.old, old_model=args.old_model, queries=args.queries,
                        kinds=kinds, sample=args.sample, rank=args.rank, seed=args.seed, save=not args.no_save,
                        query_log=args.query_log)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    logged = f", {report['query_pairs']} query-log pairs" if report.get("query_pairs") else ""
    print(f"{report['pairs']} pairs ({report['train']} to fit, {report['held_out']} held out{logged}); "
          f"judged by {report['kinds'][report['chosen']]['basis']}")
    print(f"{'kind':<11} {'recall@10':>9} {'new':>6} {'old':>6} {'recovery':>9} {'cos':>6} {'fit s':>7} {'us/query':>9}")
    for kind, fig in report["kinds"].items():
        r = fig["recall"]
        mark = "  <- saved" if kind == report["chosen"] and "version" in report else (
            "  <- best" if kind == report["chosen"] else "")
        print(f"{kind:<11} {r['adapter']:>9.3f} {r['new']:>6.3f} {r['old']:>6.3f} "
              f"{_pct(fig['recovery']):>9} "
              f"{fig['mean_cosine_to_old']:>6.3f} {fig['fit_seconds']:>7.2f} {fig['us_per_query']:>9.1f}{mark}")
    if "version" in report:
        print(f"adapter v{report['version']} ({report['chosen']}) saved with {report['output']}; "
              f"`reembed query --adapter` uses it")
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def cmd_show(args: argparse.Namespace) -> int:
    from reembed.adapter import load_adapter

    a = load_adapter(location(args, args.output), args.version)
    info = {"version": a.version, "kind": a.kind, "new_model": a.new_model, "old_model": a.old_model,
            "figures": a.figures}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        r = a.figures.get("recall", {})
        print(f"adapter v{a.version}: {a.kind}, {a.new_model.get('name')} -> {a.old_model.get('name') or a.old_model.get('source')}"
              f"; recall@10 {r.get('adapter')} (new {r.get('new')}, old {r.get('old')}), recovery {a.figures.get('recovery')}")
    return 0
