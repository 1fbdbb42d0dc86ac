"""Plan and read an input folder on the driver, without Ray: the plan -> read half of the job, so the
input tests can check every row's id and reason directly."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from reembed.config import InputConfig
from reembed.plan import make_plan
from reembed.read import read_shard


def plan_and_read(uri: str | Path, shard_rows: int = 4, **input_settings) -> tuple[dict, pa.Table]:
    """``(plan, documents)``: every planned row as the read stage hands it to the Embedder."""
    cfg = InputConfig(uri=str(uri), **input_settings)
    plan, dups = make_plan(cfg, shard_rows)
    by_file: dict[int, set[int]] = {}
    for f, r in zip(dups.column("file").to_pylist(), dups.column("row").to_pylist()):
        by_file.setdefault(f, set()).add(r)
    tables = [read_shard(plan, shard, by_file) for shard in plan["shards"]]
    docs = pa.concat_tables(tables) if tables else None
    return plan, docs


def outcome(docs: pa.Table) -> list[tuple[str | None, str | None]]:
    """``(id, reason)`` per row in plan order; reason None means the row is embedded."""
    return list(zip(docs.column("id").to_pylist(), docs.column("_reason").to_pylist()))
