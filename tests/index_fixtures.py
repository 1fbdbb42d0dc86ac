"""Synthetic outputs for the index tests: seeded clustered vectors written as committed shards in the
manifest format, without running the embedding job."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
import io
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reembed import schema as S
from reembed.manifest import Manifest, shard_name
from reembed.storage import Location

LANGS = ("en", "fr", "de")


def clustered(n: int, dim: int, clusters: int = 40, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors drawn around ``clusters`` random centres (faiss-style synthetic data)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tables(vectors: np.ndarray, rows: int, prefix: str = "d", dtype: str = "float32") -> list[pa.Table]:
    """Shard-shaped tables (id, embedding, text, lang) of ``rows`` rows each; ``dtype`` the vectors' value type."""
    out = []
    for lo in range(0, len(vectors), rows):
        hi = min(lo + rows, len(vectors))
        ids = [f"{prefix}{i}" for i in range(lo, hi)]
        out.append(pa.table({
            S.ID: pa.array(ids, pa.string()),
            S.EMBEDDING: S.embedding_array(vectors[lo:hi]).cast(S.embedding_type(vectors.shape[1], dtype)),
            S.TRUNCATED: pa.array([False] * (hi - lo)),
            "text": pa.array([f"text of {i}" for i in ids]),
            "lang": pa.array([LANGS[i % 3] for i in range(lo, hi)]),
        }))
    return out


def write_output(folder: Path, vectors: np.ndarray, shard_rows: int, model_name: str = "synthetic-model",
                 dtype: str = "float32") -> str:
    """A complete output at ``folder``: committed shards of ``vectors`` (stored as ``dtype``, the output.dtype
    setting) and a manifest; returns its path."""
    loc = Location.from_uri(str(folder))
    parts = tables(vectors, shard_rows, dtype=dtype)
    dim = vectors.shape[1]
    model = {"name": model_name, "revision": "r1", "dimension": dim, "normalize": True, "pooling": "cls",
             "dtype": "float32", "max_seq_length": 128,
             "fingerprint": hashlib.sha256(f"{model_name}/{dim}".encode()).hexdigest()[:16]}
    plan = {"input_uri": "synthetic", "id_column": "id", "text_column": "text", "passthrough": ["text", "lang"],
            "shard_rows": shard_rows, "rows": len(vectors), S.VECTOR_DTYPE: dtype,
            "shards": [{"shard": i, "rows": t.num_rows, "segments": []} for i, t in enumerate(parts)]}
    m = Manifest.create(loc, model, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    for i, t in enumerate(parts):
        buf = io.BytesIO()
        pq.write_table(t, buf)
        data = buf.getvalue()
        loc.write_bytes(data, "shards", shard_name(i))
        m.commit_shard(i, {"path": f"shards/{shard_name(i)}", "rows": t.num_rows, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest(), "truncated": 0, "tokens": 0,
                           "device_seconds": 0.0, "dead_letters": 0, "reasons": {}})
    return str(folder)


def qdrant_targets() -> list:
    """Embedded Qdrant always; a server too when QDRANT_URL is set (API key from QDRANT_API_KEY)."""
    return ["embedded", pytest.param("server", marks=pytest.mark.skipif(
        not os.environ.get("QDRANT_URL"), reason="QDRANT_URL not set (no Qdrant server here)"))]


@pytest.fixture(params=qdrant_targets())
def qdrant_target(request, fast_tmp):
    """(target, collection-name prefix): a fresh embedded folder, or a server with a unique name prefix whose
    collections and aliases are removed afterwards."""
    if request.param == "embedded":
        yield str(fast_tmp / "qdrant"), "docs"
        return
    from qdrant_client import QdrantClient

    url = os.environ["QDRANT_URL"]
    prefix = f"reembed-test-{uuid.uuid4().hex[:8]}"
    yield url, prefix
    client = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None)
    try:
        for a in client.get_aliases().aliases:
            if a.alias_name.startswith(prefix):
                from qdrant_client import models

                client.update_collection_aliases(change_aliases_operations=[
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=a.alias_name))])
        for c in client.get_collections().collections:
            if c.name.startswith(prefix):
                client.delete_collection(c.name)
    finally:
        client.close()


@pytest.fixture
def fast_tmp(tmp_path):
    """A scratch folder on tmpfs when there is one: embedded Qdrant commits (and fsyncs) every point, which
    is slow on a busy disk and free in memory. Falls back to tmp_path."""
    import shutil
    import tempfile

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="reembed-idx-", dir="/dev/shm"))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


@contextmanager
def recording_server(host: str = "127.0.0.1", status: int = 200):
    """A tiny HTTP listener on ``host`` that records every request's path and headers and answers like an
    empty Qdrant (version, no collections, no aliases), or with ``status`` for the collection list.
    Yields (url, requests) where requests is a list of (path, {header: value})."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, dict[str, str]]] = []
    answers = {"/": {"title": "qdrant - vector search engine", "version": _client_version()},
               "/collections": {"result": {"collections": []}, "status": "ok", "time": 0.0},
               "/aliases": {"result": {"aliases": []}, "status": "ok", "time": 0.0}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            seen.append((path, {k.lower(): v for k, v in self.headers.items()}))
            code = status if path == "/collections" else 200 if path in answers else 404
            body = json.dumps(answers.get(path, {"status": {"error": "not found"}}) if code == 200
                              else {"status": {"error": f"HTTP {code}"}}).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_version() -> str:
    from importlib.metadata import version

    return version("qdrant-client")


@pytest.fixture(autouse=True)
def cli_logging_reset():
    """``reembed.cli.main`` points the root logger at the sys.stderr of its call, which pytest closes after
    the test; drop that handler afterwards so a later test's logging does not write to a closed stream."""
    import logging

    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)


# The FAISS tests' corpus: N seeded clustered DIM-d vectors, and fresh queries from the same clusters.
CORPUS_N, CORPUS_DIM = 6000, 32


@pytest.fixture(scope="module")
def corpus():
    """Seeded clustered corpus and fresh queries drawn from the same clusters (not in the corpus)."""
    x = clustered(CORPUS_N + 300, CORPUS_DIM, clusters=40, seed=7)
    return x[:CORPUS_N], x[CORPUS_N:]
