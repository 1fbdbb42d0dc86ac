"""``reembed cost OUTPUT [OUTPUT ...] [--prices prices.yaml]``: what each run cost and what it bought.

Every run of a job records in its output's manifest the device type and count, the CPUs of the cluster,
the wall time, the busy device-seconds, and the documents and real tokens it embedded. This module
prices those runs side by side, GPU and CPU alike:

* cost of a run = hours held x devices x price per device-hour (GPU runs), or hours held x CPUs x price
  per CPU-hour (CPU runs). You pay for the wall time the devices are held, busy or not.
* $ per 1M documents, $ per 1M real tokens, documents/s per device (per GPU, or per CPU for CPU runs),
  and device utilisation (busy device-seconds over held device-seconds; GPU runs).
* interrupted attempts (killed, crashed, fenced: an epoch of the commit log that recorded no run) cost
  money too. Each is a row of its own, priced from its claim to its last commit (a lower bound: the time
  it ran after its last commit is not recorded) on the device of the output's recorded runs, and said so.

The default price table names its date and source; ``--prices`` overrides any part of it::

    as_of: 2026-11-01
    source: our AWS contract
    devices: {H100: 2.10, L4: 0.45}     # USD per device-hour, keyed by Ray's accelerator type
    cpu: 0.02                           # USD per logical CPU-hour
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence
from reembed.errors import PriceError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# Modal's published per-second list prices, converted to hours (GPU prices are per GPU; CPU is billed per
# physical core, which is two of Ray's logical CPUs). Read from modal.com/pricing as quoted by
# https://techbytes.app/posts/serverless-gpu-pricing-matrix-modal-replicate-lambda-2026/ (verified there
# 2026-05-07: H100 $3.9492/h, A100 80GB $2.4984/h, L40S $1.9512/h, L4 $0.7992/h, T4 $0.5904/h) and
# https://www.beam.cloud/blog/modal-pricing-explained (verified there 2026-06-27: CPU $0.0000131 per
# physical core-second), https://blaxel.ai/blog/modal-pricing-alternatives-guide (B200 $6.25/h).
DEFAULT_PRICES: dict[str, Any] = {
    "as_of": "2026-06-27",
    "source": "Modal list prices (modal.com/pricing), per-second billing, as quoted by techbytes.app "
              "(2026-05-07), beam.cloud (2026-06-27) and blaxel.ai",
    "currency": "USD",
    "devices": {"H100": 3.9492, "A100-80GB": 2.4984, "A100": 2.4984, "L40S": 1.9512, "L4": 0.7992, "T4": 0.5904,
                "B200": 6.25},
    "cpu": round(0.0000131 * 3600 / 2, 5),  # $0.02358 per logical CPU-hour
}


def load_prices(path: str | Path | None = None) -> dict[str, Any]:
    """The default price table, with a YAML file's values laid over it (``devices`` merged by key)."""
    prices = json.loads(json.dumps(DEFAULT_PRICES))
    if path is None:
        return prices
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise PriceError(f"{path}: cannot read price file ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise PriceError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PriceError(f"{path}: expected a mapping with keys as_of, source, currency, devices, cpu")
    unknown = set(data) - set(DEFAULT_PRICES)
    if unknown:
        raise PriceError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULT_PRICES)}")
    devices = data.pop("devices", None) or {}
    if not isinstance(devices, dict):
        raise PriceError(f"{path}: devices must map accelerator types to USD per device-hour")
    for key, value in {**devices, **({"cpu": data["cpu"]} if "cpu" in data else {})}.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise PriceError(f"{path}: price for {key!r} must be a number >= 0 (USD per hour), got {value!r}")
    prices["devices"].update({str(k): float(v) for k, v in devices.items()})
    prices.update(data)
    if "as_of" in data or "source" in data or devices:
        prices["source"] = str(data.get("source", f"{path} over the defaults"))
    return prices


def price_runs(outputs: Sequence[str], prices: dict[str, Any], settings: Any = None) -> list[dict[str, Any]]:
    """One priced row per recorded run of each output (a resumed job has several); ``settings`` are the
    outputs' storage settings (``storage.Settings``)."""
    from reembed import storage
    from reembed.commits import attempts
    from reembed.manifest import Manifest

    rows = []
    labels = _labels(outputs)
    for uri, label in zip(outputs, labels):
        loc = storage.Location.from_uri(uri, settings)
        m = Manifest.load(loc)
        if m is None:
            raise PriceError(f"{uri}: no manifest.json here (not a reembed output)")
        runs = [r for r in m.data.get("runs", []) if r.get("rows")]
        lost = [a for a in attempts(loc) if not a["run"] and a["shards"]]
        if not runs and not lost:
            raise PriceError(f"{uri}: no recorded run with embedded rows")
        n = len(runs) + len(lost)
        for i, run in enumerate(runs):
            name = label if n == 1 else f"{label} #{i + 1}"
            rows.append(price_run(run, prices, name, model=m.model.get("name")))
        for a in lost:
            rows.append(price_interrupted(a, runs[-1] if runs else None, prices, f"{label} epoch {a['epoch']}",
                                          model=m.model.get("name")))
    return rows


def adapter_savings(outputs: Sequence[str], prices: dict[str, Any], settings: Any = None) -> list[dict[str, Any]]:
    """For each output with a saved drift adapter (``adapters/vNNNN.json``): what serving through it saves per
    1M queries. Without it a query is embedded twice (old model for the old store, new model for the new one);
    through it once, by the new model, plus the adapter's matrix product. The saved embedding is priced at the
    output's last recorded run: device-seconds held per document embedded (wall x devices / documents) x the
    price per device-second, i.e. that run's $ per 1M documents; a document stands for a query (queries are
    shorter, so this is an upper bound), and the new model's cost stands for the old one's (not measured here)."""
    from reembed import storage
    from reembed.adapter import saved_figures
    from reembed.manifest import Manifest

    out = []
    for uri, label in zip(outputs, _labels(outputs)):
        loc = storage.Location.from_uri(uri, settings)
        figures = saved_figures(loc)
        m = Manifest.load(loc)
        if figures is None or figures.get("error") or m is None:
            continue
        runs = [r for r in m.data.get("runs", []) if r.get("rows") and r.get("wall_seconds")]
        row: dict[str, Any] = {"output": label, "adapter": f"v{figures['version']} ({figures['kind']})",
                               "recovery": figures.get("recovery"), "queries": 1_000_000}
        if not runs:
            out.append({**row, "usd_saved_per_1m_queries": None,
                        "source": "no recorded run with embedded rows: nothing measured to price an embedding by"})
            continue
        priced = price_run(runs[-1], prices, f"{label} #{len(runs)}", model=m.model.get("name"))
        held_per_doc = priced["wall_seconds"] * priced["count"] / priced["docs"]
        saved = priced["usd_per_1m_docs"]
        us = figures.get("us_per_query")
        adapter_usd = (us or 0.0) * 1e-6 * float(prices["cpu"]) / 3600.0 * 1e6  # one CPU, per 1M queries
        out.append({**row, "embeddings_per_query": {"without": 2, "with": 1},
                    "seconds_per_embedding": round(held_per_doc, 6), "device": priced["device"],
                    "usd_per_device_hour": priced["usd_per_device_hour"], "usd_saved_per_1m_queries": saved,
                    "adapter_us_per_query": us, "adapter_usd_per_1m_queries": adapter_usd,
                    "net_usd_saved_per_1m_queries": saved - adapter_usd,
                    "source": f"run {priced['run']}: {priced['docs']} documents in {priced['wall_seconds']} s on "
                              f"{priced['count']} x {priced['device']} = {held_per_doc:.6f} device-seconds held per "
                              f"embedding, at {priced['usd_per_device_hour']} {prices['currency']}/device-hour "
                              f"({prices['source']}); the new model's cost standing for the old model's, a document "
                              "for a query (an upper bound); the adapter's own product priced at one CPU"})
    return out


def format_savings(rows: list[dict[str, Any]], prices: dict[str, Any]) -> str:
    """The adapter savings as lines under the runs' table."""
    lines = []
    for r in rows:
        if r["usd_saved_per_1m_queries"] is None:
            lines.append(f"adapter {r['output']} {r['adapter']}: {r['source']}")
            continue
        recovery = "-" if r["recovery"] is None else f"{100 * r['recovery']:.1f}%"
        lines.append(f"adapter {r['output']} {r['adapter']}: serving through it embeds each query once instead of "
                     f"twice: saves {prices['currency']} {r['usd_saved_per_1m_queries']:.4f} per 1M queries "
                     f"(net of the adapter: {r['net_usd_saved_per_1m_queries']:.4f}); recovery {recovery}")
        lines.append(f"  from {r['source']}")
    return "\n".join(lines)


def price_interrupted(attempt: dict[str, Any], like: dict[str, Any] | None, prices: dict[str, Any], label: str,
                      model: str | None = None) -> dict[str, Any]:
    """Price an attempt that recorded no run (see :func:`reembed.commits.attempts`): from its claim to its
    last commit, on the device of ``like`` (a recorded run of the same output); unpriced without one."""
    import datetime as dt

    def ts(s: str | None) -> float | None:
        return dt.datetime.fromisoformat(s).timestamp() if s else None

    start, end = ts(attempt["claimed_at"]), ts(attempt["last_at"])
    wall = max(0.0, end - start) if start is not None and end is not None else 0.0
    run = {"wall_seconds": wall, "rows": attempt["rows"], "tokens": attempt["tokens"],
           "device_seconds": attempt["device_seconds"]}
    if like is None:
        row = price_run({**run, "device": "cpu", "cpus": 1}, prices, label, model)
        row.update(device="unknown", count=0, usd_per_device_hour=None, cost_usd=None, usd_per_1m_docs=None,
                   usd_per_1m_tokens=None, docs_per_s_per_device=None, saved_usd=None)
        row["note"] = "no run recorded (interrupted, or still running); no recorded run says which device it held: not priced"
    else:
        keep = ("device", "accelerator", "device_count", "cpus", "backend", "dtype")
        row = price_run({**run, **{k: like[k] for k in keep if k in like}}, prices, label, model)
        row["note"] = "no run recorded (interrupted, or still running); priced from its claim to its last commit (a lower bound) on the recorded runs' device"
    row["interrupted"] = True
    return row


def price_run(run: dict[str, Any], prices: dict[str, Any], label: str, model: str | None = None) -> dict[str, Any]:
    """Price one manifest run record (see the module docstring for the arithmetic)."""
    device = run.get("device", "cpu")
    wall = float(run.get("wall_seconds") or 0.0)
    rows, tokens = int(run.get("rows") or 0), int(run.get("tokens") or 0)
    busy = float(run.get("device_seconds") or 0.0)
    if device == "cuda":
        kind = run.get("accelerator")
        count = int(run.get("device_count") or 1)
        rate = _device_price(prices, kind)
        if rate is None:
            raise PriceError(
                f"{label}: no price for GPU type {kind!r} (known: {', '.join(sorted(prices['devices']))}); "
                "add it under devices: in a --prices file")
        unit = f"{kind} GPU"
        utilisation = busy / (wall * count) if wall and count else None
    else:
        count = int(run.get("cpus") or 0)
        if not count:
            count = int(run.get("device_count") or 1)
            log.warning("%s: the run did not record its CPUs; pricing %d CPU(s), one per Embedder actor", label, count)
        rate = float(prices["cpu"])
        unit = "CPU"
        utilisation = None  # busy time on CPU runs is the Embedder's compute time, not a device's
    cost = wall / 3600.0 * count * rate
    saved = savings(run, count, rate)
    return {**saved, 
        "run": label, "model": model, "device": unit, "backend": run.get("backend"),
        "precision": _precision(run.get("dtype"), run.get("backend")), "interrupted": False, "note": "",
        "count": count, "usd_per_device_hour": rate,
        "wall_seconds": round(wall, 3), "device_seconds": round(busy, 3),
        "utilisation": None if utilisation is None else round(utilisation, 4),
        "docs": rows, "tokens": tokens, "cost_usd": cost,
        "usd_per_1m_docs": cost / rows * 1e6 if rows else None,
        "usd_per_1m_tokens": cost / tokens * 1e6 if tokens else None,
        "docs_per_s_per_device": rows / wall / count if wall and count else None,
        "docs_per_s": rows / wall if wall else None,
    }


def savings(run: dict[str, Any], count: int, rate: float) -> dict[str, Any]:
    """What an incremental run did not spend: the rows it did not embed (reused from the ``--reuse`` output,
    or copied from an identical text) x the seconds it measured per embedded row (its embedding stage's wall
    time over the rows the model embedded) x ``count`` devices x ``rate`` per device-hour. None where the
    run embedded nothing to measure by."""
    reused, copied = int(run.get("rows_reused") or 0), int(run.get("rows_deduplicated") or 0)
    embedded = int(run.get("rows_embedded", int(run.get("rows") or 0) - reused - copied) or 0)
    per_row = float(run.get("embed_seconds") or run.get("wall_seconds") or 0.0) / embedded if embedded else None
    seconds = (reused + copied) * per_row if per_row is not None else None
    return {"rows_embedded": embedded, "rows_reused": reused, "rows_deduplicated": copied,
            "saved_seconds": None if seconds is None else round(seconds, 3),
            "saved_usd": None if seconds is None else seconds / 3600.0 * count * rate}


def _device_price(prices: dict[str, Any], kind: str | None) -> float | None:
    if not kind:
        return None
    table = {k.lower(): v for k, v in prices["devices"].items()}
    for key in (kind.lower(), kind.lower().split("-")[0]):
        if key in table:
            return float(table[key])
    return None


def _labels(outputs: Sequence[str]) -> list[str]:
    names = [o.rstrip("/").rsplit("/", 1)[-1] or o for o in outputs]
    return [n if names.count(n) == 1 else o for n, o in zip(names, outputs)]


# ---------------------------------------------------------------------------------------------------
# Output



def format_table(rows: list[dict[str, Any]], prices: dict[str, Any]) -> str:
    head = (f"{'run':<24} {'model':<20} {'device':<10} {'backend':<9} {'precision':<9} {'n':>3} {'wall s':>9} "
            f"{'util':>6} {'docs':>10} {'docs/s/dev':>11} {'cost $':>10} {'$/1M docs':>10} {'$/1M tokens':>12}")
    lines = [head]
    for r in rows:
        mark = " *" if r.get("interrupted") else ""
        lines.append(
            f"{r['run'][:24]:<24} {_short(r.get('model'))[:20]:<20} {r['device'][:10]:<10} {(r.get('backend') or '-')[:9]:<9} "
            f"{(r.get('precision') or '-')[:9]:<9} {r['count']:>3} {r['wall_seconds']:>9.1f} "
            f"{_pct(r['utilisation']):>6} {r['docs']:>10} {_f(r['docs_per_s_per_device'], 1):>11} "
            f"{_f(r['cost_usd'], 4):>10} {_f(r['usd_per_1m_docs'], 3):>10} {_f(r['usd_per_1m_tokens'], 4):>12}{mark}")
    for r in rows:
        if r.get("rows_reused") or r.get("rows_deduplicated"):
            lines.append(f"{r['run']}: {r['rows_embedded']} rows embedded, {r['rows_reused']} reused and "
                         f"{r['rows_deduplicated']} copied from identical texts: saved ~{_f(r['saved_seconds'], 1)} "
                         f"embedding s, ${_f(r['saved_usd'], 4)} (at the run's measured seconds per embedded row)")
    lost = [r for r in rows if r.get("interrupted")]
    if lost:
        priced = sum(r["cost_usd"] for r in lost if r["cost_usd"] is not None)
        lines.append(f"* {len(lost)} interrupted attempt(s), ${priced:.4f} priced: from each one's claim to its last "
                     "commit (a lower bound), on the device of the recorded runs")
    lines.append(f"prices: {prices['currency']} as of {prices['as_of']}, {prices['source']}")
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], prices: dict[str, Any], path: str | Path,
                 savings: Sequence[dict[str, Any]] = ()) -> Path:
    from reembed import report

    table_rows = [{  # a dozen narrow columns: the page holds them at laptop width (tested in Chromium)
        "run": r["run"] + (" (interrupted)" if r.get("interrupted") else ""), "model": _short(r.get("model")),
        "devices": f"{r['count']} x {r['device']}", "backend": r.get("backend") or "-",
        "precision": r.get("precision") or "-", "wall s": r["wall_seconds"],
        "util %": None if r["utilisation"] is None else round(100 * r["utilisation"], 1),
        "docs": r["docs"], "docs/s per device": _round(r["docs_per_s_per_device"], 2),
        "cost $": _round(r["cost_usd"], 6), "$ / 1M docs": _round(r["usd_per_1m_docs"], 4),
        "$ / 1M tokens": _round(r["usd_per_1m_tokens"], 5),
    } for r in rows]
    price_rows = [{"device": k, f"{prices['currency']} per device-hour": v} for k, v in sorted(prices["devices"].items())]
    price_rows.append({"device": "CPU (logical)", f"{prices['currency']} per device-hour": prices["cpu"]})

    def bars(key: str) -> dict[str, float]:
        return {r["run"]: r[key] for r in rows if r[key] is not None}

    page = report.page("Re-embedding cost", [
        report.section("$ per 1M documents", report.bar_chart(bars("usd_per_1m_docs"), unit=" $")),
        report.section("$ per 1M real tokens", report.bar_chart(bars("usd_per_1m_tokens"), unit=" $")),
        report.section("Documents/s per device (per GPU; per CPU for CPU runs)",
                       report.bar_chart(bars("docs_per_s_per_device"))),
        report.section("Runs", report.table(table_rows),
                       report.paragraph("Cost = wall hours x devices x price per device-hour (CPU runs: x the "
                                        "cluster's logical CPUs x price per CPU-hour). Busy device-seconds, tokens "
                                        "and the price used are in `reembed cost --json`."),
                       *[report.paragraph(f"{r['run']}: {r['note']}") for r in rows if r.get("note")],
                       *[report.paragraph(f"{r['run']}: {r['rows_embedded']} rows embedded, {r['rows_reused']} reused, "
                                          f"{r['rows_deduplicated']} copied from identical texts; saved about "
                                          f"{_f(r['saved_seconds'], 1)} embedding seconds, ${_f(r['saved_usd'], 4)}")
                         for r in rows if r.get("rows_reused") or r.get("rows_deduplicated")]),
        *([report.section("Serving through the drift adapter: saved per 1M queries",
                          report.paragraph(format_savings(list(savings), prices)),
                          report.bar_chart({r["output"]: r["usd_saved_per_1m_queries"] for r in savings
                                            if r["usd_saved_per_1m_queries"] is not None}, unit=" $"))]
          if savings else []),
        report.section("Prices", report.paragraph(f"{prices['currency']}, as of {prices['as_of']}; source: "
                                                  f"{prices['source']}"), report.table(price_rows)),
    ])
    return report.write(path, page)


def _precision(dtype: str | None, backend: str | None) -> str | None:
    """What the vectors were computed in: ``int8-w7`` for the int8 backend (whose recorded dtype is the
    float32 of its inputs), else the run's dtype."""
    if backend == "onnx-int8":
        from reembed.embed.model import INT8_SPACE

        return INT8_SPACE
    return dtype


def _short(model: str | None) -> str:
    """A model's name without the folders in front of a local path."""
    return "-" if not model else model.rstrip("/").rsplit("/", 1)[-1]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _f(v, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _round(v, digits: int):
    return None if v is None else round(v, digits)


# ---------------------------------------------------------------------------------------------------
# CLI
