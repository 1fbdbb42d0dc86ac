"""``reembed cost``: price recorded runs side by side."""

from __future__ import annotations

import argparse
import json

from reembed.cli.run import add_storage_config, storage_settings
from reembed.cost import format_table, load_prices, price_runs, write_report


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
    p.add_argument("--report", default="reembed-cost.html", metavar="PATH", help="HTML report (default reembed-cost.html)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_storage_config(p)
    p.set_defaults(func=cmd_cost)


def cmd_cost(args: argparse.Namespace) -> int:
    prices = load_prices(args.prices)
    rows = price_runs(args.outputs, prices, storage_settings(args))
    if args.report:
        write_report(rows, prices, args.report)
    if args.json:
        print(json.dumps({"prices": prices, "runs": rows}, indent=1))
    else:
        print(format_table(rows, prices))
        if args.report:
            print(f"report: {args.report}")
    return 0
