"""``reembed cost``: price recorded runs side by side."""

from __future__ import annotations

import argparse
import json

from reembed.cli.run import add_storage_config, storage_settings
from reembed.cost import adapter_savings, format_savings, format_table, load_prices, price_runs, write_report

DEFAULT_REPORT = "reembed-cost.html"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cost", help="price recorded runs side by side: $ per 1M docs and tokens, docs/s per device",
        description="Price every recorded run of the given outputs (GPU and CPU alike) from the device type and "
                    "count, wall time, documents and tokens in their manifests. Prints a table and writes an HTML "
                    "report with bar charts.",
    )
    p.add_argument("outputs", nargs="+", metavar="OUTPUT_URI", help="job output folders or URIs")
    p.add_argument("--prices", metavar="prices.yaml", help="override the default price table (as_of, source, "
                   "currency, devices: {TYPE: USD per hour}, cpu: USD per CPU-hour)")
    p.add_argument("--report", metavar="PATH", help=f"HTML report (default {DEFAULT_REPORT}; with --json, none unless "
                   "given)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (and write no report unless --report)")
    add_storage_config(p)
    p.set_defaults(func=cmd_cost)


def cmd_cost(args: argparse.Namespace) -> int:
    prices = load_prices(args.prices)
    rows = price_runs(args.outputs, prices, storage_settings(args))
    savings = adapter_savings(args.outputs, prices, storage_settings(args))
    report = args.report or (None if args.json else DEFAULT_REPORT)
    if report:
        write_report(rows, prices, report, savings)
    if args.json:
        print(json.dumps({"prices": prices, "runs": rows, "adapter": savings, "report": report}, indent=1))
    else:
        print(format_table(rows, prices))
        if savings:
            print(format_savings(savings, prices))
        if report:
            print(f"report: {report}")
    return 0
