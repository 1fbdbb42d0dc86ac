"""Fixtures for the publish sinks: a synthetic committed output with text and metadata, a real Chroma HTTP
server (``chroma run``) on 127.0.0.1, and the CLI with the ``publish`` command registered."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from migrate_fixtures import model_info, write_output

N_DOCS, SHARD_ROWS, DIM = 60, 25, 16


def synthetic_output(path: Path, n: int = N_DOCS, dim: int = DIM, seed: int = 0):
    """A committed output of ``n`` random unit vectors in shards of 25, passing through text and metadata (one
    column renamed by export, ``meta_id``, and one with nulls)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"doc-{i:03d}" for i in range(n)]
    columns = {"text": [f"text of document {i}" for i in range(n)],
               "pos": ["n" if i % 3 else "v" for i in range(n)],
               "rank": list(range(n)),
               "meta_id": [f"app-{i}" for i in range(n)],
               "note": [None if i % 2 else f"note {i}" for i in range(n)]}
    loc = write_output(path, ids, vectors, model_info("test/new-model", dim), shard_rows=SHARD_ROWS, columns=columns)
    return loc, ids, vectors, columns


def expected_metadata(columns: dict, i: int) -> dict:
    meta = {"pos": columns["pos"][i], "rank": columns["rank"][i], "id": columns["meta_id"][i]}
    if columns["note"][i] is not None:
        meta["note"] = columns["note"][i]
    return meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """A real Chroma server (``chroma run``, shipped with chromadb) on 127.0.0.1; yields ``host:port``."""
    exe = shutil.which("chroma", path=os.path.dirname(sys.executable)) or shutil.which("chroma")
    if exe is None:
        pytest.skip("the chroma server command (chromadb) is not installed")
    port = free_port()
    folder = tmp_path_factory.mktemp("chroma-server")
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([exe, "run", "--path", str(folder / "data"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chroma run did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def cli(monkeypatch):
    """``reembed`` as the user runs it (the publish command is registered like every other)."""
    from reembed import cli as C

    assert "reembed.cli.sinks" in C.COMMAND_MODULES
    return C.main
