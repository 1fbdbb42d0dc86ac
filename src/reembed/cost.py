"""What a run really cost, from the run itself: ``reembed cost OUTPUT [OUTPUT ...] [--prices prices.yaml]``.

Every run records in the manifest its device type and count, wall time, busy device-seconds, documents
and real tokens. A cloud bills the devices for as long as the job holds them, so the bill is
``wall hours x devices x price per device-hour``; busy device-seconds show how much of that the
model actually used. GPU and CPU runs are compared on the same footing: $ per 1M documents, $ per 1M
real tokens, and documents per second per device.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# On-demand list prices per device-hour. Override with --prices (a YAML file of the same shape).
DEFAULT_PRICES: dict[str, Any] = {
    "date": "2026-11-25",
    "source": "AWS EC2 On-Demand list prices, us-east-1, divided per device: p5.48xlarge (8x H100) "
              "$98.32/h, p4d.24xlarge (8x A100 40GB) $32.77/h, g6e.xlarge (1x L40S) $1.861/h, "
              "g5.xlarge (1x A10G) $1.006/h, m7i.16xlarge (64 vCPU) $3.2256/h. Check current prices "
              "for your region and discounts, and pass them with --prices.",
    "per_hour": {
        "H100": 12.29,
        "A100": 4.10,
        "L40S": 1.861,
        "A10G": 1.006,
        "gpu": 12.29,  # an unnamed GPU is priced as an H100
        "cpu": 0.0504,  # per vCPU
    },
}


class CostError(ValueError):
    """A price is missing or an output has no recorded run."""


@dataclass(frozen=True)
class RunCost:
    output: str
    device: str  # "cuda" or "cpu"
    accelerator: str | None
    devices: float  # GPUs, or vCPUs for a CPU run
    wall_seconds: float
    device_seconds: float
    docs: int
    tokens: int
    price_per_device_hour: float

    @property
    def dollars(self) -> float:
        return self.wall_seconds / 3600.0 * self.devices * self.price_per_device_hour

    @property
    def per_million_docs(self) -> float | None:
        return self.dollars / self.docs * 1e6 if self.docs else None

    @property
    def per_million_tokens(self) -> float | None:
        return self.dollars / self.tokens * 1e6 if self.tokens else None

    @property
    def docs_per_second_per_device(self) -> float | None:
        return self.docs / (self.wall_seconds * self.devices) if self.wall_seconds and self.devices else None

    @property
    def busy_share(self) -> float | None:
        """Busy device-seconds over held device-seconds (GPU runs; a CPU run's devices are vCPUs)."""
        held = self.wall_seconds * self.devices
        return self.device_seconds / held if held and self.device == "cuda" else None

    def row(self) -> dict[str, Any]:
        label = self.accelerator or ("GPU" if self.device == "cuda" else "CPU")
        return {
            "output": self.output, "device": label, "devices": self.devices, "docs": self.docs,
            "tokens": self.tokens, "wall_s": round(self.wall_seconds, 2), "busy_device_s": round(self.device_seconds, 2),
            "busy_share": _r(self.busy_share), "$/device-h": self.price_per_device_hour, "$": round(self.dollars, 6),
            "$/1M docs": _r(self.per_million_docs), "$/1M tokens": _r(self.per_million_tokens),
            "docs/s/device": _r(self.docs_per_second_per_device),
        }


def load_prices(path: str | None) -> dict[str, Any]:
    if path is None:
        return DEFAULT_PRICES
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("per_hour"), dict):
        raise CostError(f"{path}: expected a mapping with 'per_hour: {{H100: 12.29, cpu: 0.05, ...}}' "
                        "(and optionally 'date' and 'source')")
    for k, v in data["per_hour"].items():
        if not isinstance(v, (int, float)) or v < 0:
            raise CostError(f"{path}: per_hour.{k} must be a non-negative number, got {v!r}")
    return {"date": data.get("date", "unknown"), "source": data.get("source", str(path)),
            "per_hour": {**DEFAULT_PRICES["per_hour"], **data["per_hour"]}}


def run_cost(output: str, manifest_data: dict[str, Any], prices: dict[str, Any]) -> RunCost:
    """Add up every recorded run of one output (a resumed job is several runs) and price it."""
    runs = [r for r in manifest_data.get("runs", []) if r.get("rows") is not None and r.get("device")]
    if not runs:
        raise CostError(f"{output}: no recorded run in its manifest (run `reembed run` first)")
    kinds = {(r["device"], r.get("accelerator")) for r in runs}
    if len(kinds) > 1:
        log.warning("%s: runs on different devices %s; priced as the last one", output, sorted(map(str, kinds)))
    last = runs[-1]
    device, accelerator = last["device"], last.get("accelerator")
    devices = float(last.get("vcpus") or last.get("device_count") or 1) if device == "cpu" else float(last.get("device_count") or 1)
    key = "cpu" if device == "cpu" else (accelerator if accelerator in prices["per_hour"] else "gpu")
    if key not in prices["per_hour"]:
        raise CostError(f"{output}: no price for {key!r} in the price table")
    return RunCost(
        output=output, device=device, accelerator=accelerator if device == "cuda" else None, devices=devices,
        wall_seconds=sum(r.get("wall_seconds", 0.0) for r in runs),
        device_seconds=sum(r.get("device_seconds", 0.0) for r in runs),
        docs=sum(r.get("rows", 0) for r in runs), tokens=sum(r.get("tokens", 0) for r in runs),
        price_per_device_hour=float(prices["per_hour"][key]),
    )


def report_html(costs: list[RunCost], prices: dict[str, Any]) -> str:
    from reembed import report

    rows = [c.row() for c in costs]
    label = lambda c: f"{c.output} ({c.row()['device']} x{c.devices:g})"  # noqa: E731
    per_doc = {label(c): c.per_million_docs for c in costs if c.per_million_docs is not None}
    speed = {label(c): c.docs_per_second_per_device for c in costs if c.docs_per_second_per_device is not None}
    return report.page("reembed cost report", [
        report.section("$ per 1M documents", report.bar_chart(per_doc, unit=" $")),
        report.section("documents per second per device", report.bar_chart(speed)),
        report.section("runs", report.table(rows)),
        report.section("prices", report.paragraph(f"{prices['date']}: {prices['source']}"),
                       report.table([{"device": k, "$ per device-hour": v} for k, v in prices["per_hour"].items()])),
    ])


def register(sub: Any) -> None:
    c = sub.add_parser("cost", help="what runs cost on GPU vs CPU: $ per 1M docs and tokens, docs/s per device",
                       description="Put the recorded runs of one or more outputs side by side, priced per "
                                   "device-hour (wall time x devices held), with bar charts in an HTML report.")
    c.add_argument("outputs", nargs="+", metavar="OUTPUT_URI")
    c.add_argument("--prices", metavar="prices.yaml", help="price table overriding the default "
                   "(per_hour: {H100: ..., cpu: <per vCPU>}, date, source)")
    c.add_argument("--html", metavar="report.html", default="cost-report.html", help="where the HTML report goes")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    c.set_defaults(func=cmd_cost)


def cmd_cost(args: argparse.Namespace) -> int:
    from reembed import report, storage
    from reembed.manifest import Manifest

    prices = load_prices(args.prices)
    costs = []
    for out in args.outputs:
        m = Manifest.load(storage.Location.from_uri(out))
        if m is None:
            raise CostError(f"{out}: no manifest.json here")
        costs.append(run_cost(out, m.data, prices))
    report.write(args.html, report_html(costs, prices))
    rows = [c.row() for c in costs]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        cols = ["output", "device", "devices", "docs", "wall_s", "busy_share", "$", "$/1M docs", "$/1M tokens", "docs/s/device"]
        print("  ".join(cols))
        for r in rows:
            print("  ".join(str(r[c]) for c in cols))
        print(f"prices: {prices['date']}, {prices['source'][:80]}...  report: {args.html}", file=sys.stderr)
    return 0


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 6)
