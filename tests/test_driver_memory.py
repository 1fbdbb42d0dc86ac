"""The driver's memory does not depend on the corpus size (issue 12): the real plan + job path on a local
Ray (planning tasks, read tasks, the actor pool with reembed.testing.NullEmbedder, writer tasks, the commit
log), run at N and 8N documents in the same number of shards, with the driver's Python heap traced.

Everything that is per document (ids, offsets, vectors, duplicate rows) lives in tasks and in Parquet; the
driver holds per-file and per-shard records only. So with the shard count fixed, 8x the documents must
not move the driver's peak: a plan kept as a Python list of ids in the driver (8 bytes of pointer and
~55 bytes of str per id) would add ~5 MB at 8N = 80,000 documents, several times the whole peak here.
The first run of a process is a warm-up (it imports Ray Data and starts its actors: ~75 MB), not measured.
"""

from __future__ import annotations

import logging
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reembed import pipeline
from reembed.config import load_config
from reembed.testing import NullEmbedder

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.ray, pytest.mark.slow]  # three real runs: ~40 s on an idle 2-core machine

SHARDS = 8
FILES = 4
N = 10_000
WORDS = "the cat dog bird river city music data vector search model token cluster gpu art science".split()


def test_driver_peak_heap_does_not_grow_with_the_corpus(tmp_path, ray_local):
    run_traced(tmp_path, 800)  # warm-up: first-use imports and Ray Data's set-up are not the corpus's
    small = run_traced(tmp_path, N)
    large = run_traced(tmp_path, 8 * N)
    log.info("driver heap peak: %s -> %s", small, large)
    # Measured 2026-11-30: ~1.5 MB at both sizes; 80,000 ids held as a Python list would add ~5 MB.
    assert large["peak"] < 1.5 * small["peak"] + 1_000_000, (small, large)


def run_traced(tmp_path: Path, docs: int) -> dict[str, int]:
    """Plan and run ``docs`` documents in :data:`SHARDS` shards from :data:`FILES` Parquet files; the
    peak of the driver's traced Python heap over the whole ``pipeline.run``."""
    inp, out = tmp_path / f"in-{docs}", tmp_path / f"out-{docs}"
    write_corpus(inp, docs)
    cfg = load_config(None, [f"input.uri={inp}", f"output.uri={out}", "model.name=null-8",
                             f"plan.shard_rows={docs // SHARDS}", "compute.min_actors=1", "compute.max_actors=1",
                             "compute.cpus_per_actor=1"])
    tracemalloc.start()
    try:
        summary = pipeline.run(cfg, embedder=NullEmbedder)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["complete"] and summary["embedded"] == docs and summary["shards"] == SHARDS, summary
    return {"docs": docs, "peak": peak, "after": current}


def write_corpus(folder: Path, docs: int) -> None:
    rng = random.Random(docs)
    folder.mkdir()
    for f in range(FILES):
        lo, hi = f * docs // FILES, (f + 1) * docs // FILES
        texts = [" ".join(rng.choices(WORDS, k=8)) + f" {i}" for i in range(lo, hi)]  # distinct: no copy shards
        pq.write_table(pa.table({"id": [f"doc-{i:08d}" for i in range(lo, hi)], "text": texts}),
                       folder / f"part-{f}.parquet")
