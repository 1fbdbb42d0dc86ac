"""Plan and read an input folder on the driver, without Ray: the plan -> read half of the job, so the
input tests can check every row's id and reason directly."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from reembed.config import InputConfig
from reembed.plan import PLAN_DIR, input_location, make_plan
from reembed.read import read_shards
from reembed.storage import Location


def plan_and_read(uri: str | Path, shard_rows: int = 4, out: str | Path | None = None, dedup: str = "hash",
                  **input_settings) -> tuple[dict, pa.Table]:
    """``(plan, documents)``: every planned row as the read stage hands it to the Embedder. The plan is
    written under ``out/plan`` (default: a folder beside a local input, or a temporary one)."""
    cfg = InputConfig(uri=str(uri), **input_settings)
    out = Location.from_uri(str(out) if out else _out_for(str(uri)))
    plan = make_plan(cfg, shard_rows, out.child(PLAN_DIR), dedup=dedup)
    tables = list(read_shards(plan, out.child(PLAN_DIR), range(plan["shards"]), input_location(plan)))
    docs = pa.concat_tables(tables) if tables else None
    return plan, docs


def outcome(docs: pa.Table) -> list[tuple[str | None, str | None]]:
    """``(id, reason)`` per row in plan order; reason None means the row is embedded."""
    return list(zip(docs.column("id").to_pylist(), docs.column("_reason").to_pylist()))


def _out_for(uri: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="reembed-plan-")
