"""Qdrant: versioned collections, uuid5 point ids, payloads, counts, alias swap / rollback and refusals,
retry policy. Runs on embedded Qdrant, and also against a server when QDRANT_URL is set."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import numpy as np
import pytest

from index_fixtures import clustered, closed_port, fast_tmp, qdrant_target, recording_server, tables  # noqa: F401
from reembed.indexes import qdrant as Q

pytest.importorskip("qdrant_client")
# The client probes a server's version when it connects; the tests that point it at nothing expect that to fail.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version")

DIM = 16


@pytest.fixture
def client(qdrant_target):
    target, prefix = qdrant_target
    c = Q.connect(target)
    yield c, prefix
    c.close()


def _meta(rows: int, fingerprint: str = "fp-1", dim: int = DIM) -> dict:
    return {"model": "synthetic-model", "dimension": dim, "fingerprint": fingerprint, "rows": rows, "state": "loading"}


def _load(c, name: str, vectors: np.ndarray, fingerprint: str = "fp-1", ready: bool = True, prefix: str = "d") -> None:
    """A collection holding ``vectors`` as finished by the index stage."""
    Q.create_collection(c, name, vectors.shape[1], _meta(len(vectors), fingerprint, vectors.shape[1]))
    Q.upload(c, name, tables(vectors, 50, prefix=prefix), batch_size=32, passthrough=["text", "lang"])
    Q.end_bulk(c, name)
    if ready:
        Q.set_metadata(c, name, {Q.META: {**_meta(len(vectors), fingerprint, vectors.shape[1]), "state": "ready"}})


def test_points_have_uuid5_ids_vectors_and_passthrough_payload(client):
    c, prefix = client
    name = Q.versioned(prefix, 1)
    x = clustered(120, DIM, seed=1)
    Q.create_collection(c, name, DIM, _meta(120))
    assert Q.upload(c, name, tables(x, 50), batch_size=32, passthrough=["text", "lang"]) == 120
    assert Q.count(c, name) == 120
    pid = str(uuid.uuid5(Q.NAMESPACE, "d42"))
    assert Q.point_id("d42") == pid
    [p] = c.retrieve(name, ids=[pid], with_vectors=True, with_payload=True)
    assert p.payload == {"id": "d42", "text": "text of d42", "lang": "en"}
    assert np.allclose(p.vector, x[42], atol=1e-5)  # cosine: stored normalized, and x already is
    assert Q.dimension(c, name) == DIM
    assert Q.metadata(c, name)[Q.META]["fingerprint"] == "fp-1"


def test_uploading_again_overwrites_instead_of_duplicating(client):
    c, prefix = client
    name = Q.versioned(prefix, 1)
    x = clustered(100, DIM, seed=2)
    Q.create_collection(c, name, DIM, _meta(100))
    Q.upload(c, name, tables(x[:60], 30), batch_size=16)
    Q.upload(c, name, tables(x, 30), batch_size=16)  # the first 60 again, then the rest
    assert Q.count(c, name) == 100


def test_versions_take_the_next_free_number_and_list_model_dimension_points_aliases(client):
    c, prefix = client
    assert Q.next_version(c, prefix) == 1
    _load(c, Q.versioned(prefix, 1), clustered(60, DIM, seed=3))
    _load(c, Q.versioned(prefix, 3), clustered(80, DIM, seed=4))
    assert Q.next_version(c, prefix) == 4
    assert Q.next_version(c, prefix + "-other") == 1
    Q.swap(c, prefix, Q.versioned(prefix, 3), rows=80, dim=DIM)
    listed = {v["collection"]: v for v in Q.versions(c) if v["collection"].startswith(prefix)}
    v3 = listed[Q.versioned(prefix, 3)]
    assert (v3["model"], v3["dimension"], v3["points"], v3["state"], v3["aliases"]) == ("synthetic-model", DIM, 80, "ready", [prefix])
    assert listed[Q.versioned(prefix, 1)]["aliases"] == []


def test_swap_and_rollback_move_the_alias_atomically_and_keep_the_old_collection(client):
    c, prefix = client
    alias, v1, v2, v3 = prefix, Q.versioned(prefix, 1), Q.versioned(prefix, 2), Q.versioned(prefix, 3)
    _load(c, v1, clustered(70, DIM, seed=5))
    _load(c, v2, clustered(90, DIM, seed=6))
    _load(c, v3, clustered(40, DIM, seed=7))

    first = Q.swap(c, alias, v1, rows=70, dim=DIM)
    assert first == {"alias": alias, "from": None, "to": v1, "changed": True, "points": 70, "dimension": DIM}
    assert Q.swap(c, alias, v2, rows=90, dim=DIM)["from"] == v1
    assert Q.aliases(c)[alias] == v2
    # Queries through the alias now reach v2; v1 is kept.
    assert c.count(alias, exact=True).count == 90 and Q.count(c, v1) == 70
    assert Q.swap(c, alias, v2, rows=90, dim=DIM)["changed"] is False
    Q.swap(c, alias, v3, rows=40, dim=DIM)

    # Rollback walks back through the swaps: v3 -> v2 -> v1, then there is nothing before v1.
    assert Q.rollback(c, alias)["to"] == v2
    assert Q.rollback(c, alias)["to"] == v1
    assert Q.aliases(c)[alias] == v1
    with pytest.raises(Q.SwapRefused, match="no earlier collection"):
        Q.rollback(c, alias)
    assert Q.aliases(c)[alias] == v1
    with pytest.raises(Q.SwapRefused, match="does not exist"):
        Q.rollback(c, prefix + "-nope")


def test_swap_refusals_leave_the_alias_where_it_was(client):
    c, prefix = client
    alias, good, other = prefix, Q.versioned(prefix, 1), Q.versioned(prefix, 2)
    _load(c, good, clustered(50, DIM, seed=8))
    Q.swap(c, alias, good, rows=50, dim=DIM)

    _load(c, other, clustered(60, DIM, seed=9))
    wide = Q.versioned(prefix, 3)
    _load(c, wide, clustered(60, DIM * 2, seed=10))
    loading = Q.versioned(prefix, 4)
    _load(c, loading, clustered(60, DIM, seed=11), ready=False)
    foreign = Q.versioned(prefix, 5)
    _load(c, foreign, clustered(60, DIM, seed=12), fingerprint="fp-other")

    refusals = [
        (dict(to=other, rows=61, dim=DIM), "holds 60 points, the manifest committed 61"),
        (dict(to=wide, rows=60, dim=DIM), f"dimension {DIM * 2}"),
        (dict(to=loading, rows=60, dim=DIM), "loading did not finish"),
        (dict(to=foreign, rows=60, dim=DIM, fingerprint="fp-1"), "fingerprint"),
        (dict(to=Q.versioned(prefix, 9), rows=60, dim=DIM), "no collection"),
        (dict(to=alias, rows=60, dim=DIM), "no collection"),  # an alias is not a collection to swap to
    ]
    for kwargs, message in refusals:
        with pytest.raises(Q.SwapRefused, match=message):
            Q.swap(c, alias, **kwargs)
        assert Q.aliases(c)[alias] == good
        assert c.count(alias, exact=True).count == 50
    # An alias may not take the name of a collection.
    with pytest.raises(Q.SwapRefused, match="is a collection"):
        Q.swap(c, good, other, rows=60, dim=DIM)


def test_rollback_refuses_a_collection_that_lost_points(client):
    c, prefix = client
    alias, v1, v2 = prefix, Q.versioned(prefix, 1), Q.versioned(prefix, 2)
    _load(c, v1, clustered(30, DIM, seed=13))
    _load(c, v2, clustered(30, DIM, seed=14), prefix="e")
    Q.swap(c, alias, v1, rows=30, dim=DIM)
    Q.swap(c, alias, v2, rows=30, dim=DIM)
    from qdrant_client import models

    c.delete(v1, points_selector=models.PointIdsList(points=[Q.point_id("d0")]), wait=True)
    with pytest.raises(Q.SwapRefused, match="holds 29 points"):
        Q.rollback(c, alias)
    assert Q.aliases(c)[alias] == v2


# -- embedded specifics, targets, retries -------------------------------------------------------------


def test_embedded_qdrant_allows_one_process_and_says_so(fast_tmp):
    import subprocess
    import sys

    other = [sys.executable, "-c", f"from reembed.indexes import qdrant as Q; Q.connect({str(fast_tmp / 'q')!r})"]
    first = Q.connect(str(fast_tmp / "q"))
    try:
        Q.connect(str(fast_tmp / "q")).close()  # the same process shares its one client
        busy = subprocess.run(other, capture_output=True, text=True)
        assert busy.returncode == 1 and "one process at a time" in busy.stderr
    finally:
        first.close()
    assert subprocess.run(other, capture_output=True).returncode == 0  # free again once closed


def test_targets_are_described_without_credentials(monkeypatch):
    monkeypatch.setenv(Q.API_KEY_ENV, "sekret-key-123")
    assert Q.describe("https://user:pw@qdrant.example.com:6333/base?api_key=x") == "https://qdrant.example.com:6333/base"
    assert Q.is_server("http://127.0.0.1:6333") and not Q.is_server("/data/qdrant")
    with recording_server() as (url, seen):
        c = Q.connect(url)  # a server the user named: the key from the environment goes along
        try:
            Q.collections(c)
        finally:
            c.close()
    assert {h.get("api-key") for path, h in seen if path != "/"} == {"sekret-key-123"}


def test_a_target_read_from_a_file_never_gets_the_key(monkeypatch):
    monkeypatch.setenv(Q.API_KEY_ENV, "sekret-key-123")
    with recording_server("127.0.0.2") as (url, seen):
        c = Q.connect(url, named_by_user=False)
        try:
            assert Q.collections(c) == []
        finally:
            c.close()
    assert seen and not any("api-key" in h for _, h in seen)


def test_a_key_over_plain_http_to_another_host_is_refused(monkeypatch):
    monkeypatch.setenv(Q.API_KEY_ENV, "sekret-key-123")
    monkeypatch.delenv(Q.ALLOW_HTTP_ENV, raising=False)
    for url in ("http://10.11.12.13:6333", "http://qdrant.example.com"):
        with pytest.raises(Q.QdrantError, match=f"refusing to send {Q.API_KEY_ENV} over plain http.*{Q.ALLOW_HTTP_ENV}=1"):
            Q.connect(url)  # refused before any connection: no network needed
    # loopback is this machine; https is fine; no key, nothing to protect (these fail only at the probe)
    for url in (f"http://127.0.0.1:{closed_port()}", f"http://localhost:{closed_port()}",
                f"https://127.0.0.1:{closed_port()}"):
        with pytest.raises(Q.QdrantError, match="cannot reach"):
            Q.connect(url)
    monkeypatch.delenv(Q.API_KEY_ENV)
    with pytest.raises(Q.QdrantError, match="cannot reach"):
        Q.connect("http://127.0.0.3:1")


def test_nothing_listening_fails_at_once_in_one_line():
    url = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(Q.QdrantError) as e:
        Q.connect(url)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "connection refused" in msg and "--qdrant" in msg


def _http_error(status: int, headers: dict | None = None):
    import httpx
    from qdrant_client.http.exceptions import UnexpectedResponse

    return UnexpectedResponse(status, "x", b"{}", httpx.Headers(headers or {}))


def test_retries_only_429_5xx_and_unreachable():
    from qdrant_client.http.exceptions import ResponseHandlingException

    assert Q.is_retryable(_http_error(429)) and Q.is_retryable(_http_error(503)) and Q.is_retryable(_http_error(500))
    assert not Q.is_retryable(_http_error(400)) and not Q.is_retryable(_http_error(404))
    assert not Q.is_retryable(_http_error(409))
    assert Q.is_retryable(ResponseHandlingException(ConnectionRefusedError()))
    assert not Q.is_retryable(ValueError("bad vector size"))

    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _http_error(503)
        return "ok"

    assert Q.call_with_retry(flaky, what="t", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.9 / 2

    calls.clear()

    def bad_request():
        calls.append(1)
        raise _http_error(400)

    with pytest.raises(Exception, match="400"):
        Q.call_with_retry(bad_request, what="t", sleep=sleeps.append)
    assert len(calls) == 1  # never retried

    sleeps.clear()

    def throttled():
        if not sleeps:
            raise _http_error(429, {"retry-after": "7"})
        return 1

    Q.call_with_retry(throttled, what="t", sleep=sleeps.append)
    assert sleeps == [7.0]  # the server's Retry-After wins over a shorter backoff


def test_a_failing_server_is_retried_then_reported_in_one_line():
    with recording_server(status=503) as (url, seen):
        c = Q.connect(url, timeout=2)
        sleeps = []
        try:
            with pytest.raises(Q.QdrantError, match=r"Qdrant list failed after 3 attempts: HTTP 503") as e:
                Q.call_with_retry(lambda: c.get_collections(), what="list", attempts=3, sleep=sleeps.append)
        finally:
            c.close()
    assert len(sleeps) == 2 and "\n" not in str(e.value)
    assert [p for p, _ in seen].count("/collections") == 3


def test_grpc_is_used_only_when_the_server_answers_it():
    """No gRPC port beside the REST port, or one that does not speak gRPC: the client talks HTTP."""
    import socket
    import threading

    assert Q.grpc_port("http://qdrant.example:6333") == 6334 and Q.grpc_port("https://q.example") == 6334
    with _rest_and_next_port(socket.socket) as (url, seen, lsn):
        assert Q.grpc_port(url) == int(url.rsplit(":", 1)[1]) + 1
        c = Q.connect(url, grpc=True)  # nothing listens on port + 1 yet
        try:
            assert not Q.uses_grpc(c) and Q.collections(c) == []
        finally:
            c.close()
        lsn.listen()  # now something accepts and hangs up there
        stop = threading.Event()

        def hang_up():
            lsn.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = lsn.accept()
                    conn.close()
                except OSError:
                    pass

        t = threading.Thread(target=hang_up, daemon=True)
        t.start()
        try:
            c = Q.connect(url, grpc=True, timeout=5)
            try:
                assert not Q.uses_grpc(c) and Q.collections(c) == []
            finally:
                c.close()
        finally:
            stop.set()
            t.join()


def test_a_port_that_answers_qdrant_grpc_is_used():
    """Qdrant's own gRPC service definitions (shipped with qdrant-client) served on port + 1, answering the
    collection listing: the client picks gRPC, and its listing goes over it."""
    from concurrent import futures

    import grpc
    from qdrant_client.grpc import collections_pb2, collections_service_pb2_grpc

    calls = []

    class Collections(collections_service_pb2_grpc.CollectionsServicer):
        def List(self, request, context):  # noqa: N802 (the service's name)
            calls.append("List")
            return collections_pb2.ListCollectionsResponse(collections=[], time=0.0)

    def grpc_server(port: int):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        collections_service_pb2_grpc.add_CollectionsServicer_to_server(Collections(), server)
        if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
            raise OSError(f"port {port} is taken")
        return server

    with _rest_and_next_port(grpc_server) as (url, seen, server):
        server.start()
        try:
            c = Q.connect(url, grpc=True, timeout=5)
            try:
                assert Q.uses_grpc(c)
                http_calls = len(seen)
                assert Q.collections(c) == [] and len(calls) == 2  # the check, then this listing
                assert len(seen) == http_calls  # nothing of it over HTTP
            finally:
                c.close()
        finally:
            server.stop(0)


@contextmanager
def _rest_and_next_port(make):
    """A recording REST server whose port + 1 is held by ``make(port)`` (a socket bound there, or a server),
    trying a few servers: the port after an ephemeral one is often some client's."""
    import socket

    for _ in range(20):
        with recording_server() as (url, seen):
            port = Q.grpc_port(url)
            try:
                if make is socket.socket:
                    held = socket.socket()
                    held.bind(("127.0.0.1", port))
                else:
                    held = make(port)
            except OSError:
                continue
            try:
                yield url, seen, held
            finally:
                if make is socket.socket:
                    held.close()
            return
    pytest.skip("no free port after 20 test servers' ports")


@pytest.mark.skipif(not __import__("os").environ.get("QDRANT_URL"), reason="QDRANT_URL not set (no Qdrant server here)")
def test_a_server_offering_grpc_is_loaded_over_it():
    import os

    c = Q.connect(os.environ["QDRANT_URL"], grpc=True)
    try:
        name = f"reembed-test-{uuid.uuid4().hex[:8]}"
        Q.create_collection(c, name, DIM, _meta(100))
        try:
            assert Q.upload(c, name, tables(clustered(100, DIM), 50), batch_size=32) == 100
            assert Q.count(c, name) == 100
        finally:
            c.delete_collection(name)
    finally:
        c.close()
