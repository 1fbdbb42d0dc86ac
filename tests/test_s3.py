"""S3 input and output against a real S3 server (moto's, on 127.0.0.1, with IAM authentication on):
commit protocol, conditional manifest writes, retries, preflight errors, secrets, and whole jobs that are
killed, resumed, faulted and raced."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster_fixtures import committed_records
from conftest import make_docs
from s3_fixtures import (FaultProxy, aws_env, fault_proxy, free_port, moto_server,  # noqa: F401 (fixtures)
                         new_bucket, s3_env, s3_user, scrubbed_environ)
from reembed import cli, pipeline, storage
from reembed.config import load_config
from reembed.manifest import ConcurrentWriteError, Manifest
from reembed.schema import embedding_matrix
from reembed.write import read_shard_table

pytestmark = pytest.mark.s3

SRC = str(Path(__file__).resolve().parents[1] / "src")
# The resumed run goes through this driver so the test can see the runtime_env Ray recorded for the job.
DRIVER = """
import json, sys
import ray
from reembed.cli import main
rc = main(sys.argv[2:])
if ray.is_initialized():
    job = ray._private.worker.global_worker.core_worker.get_job_config()
    with open(sys.argv[1], "w") as f:
        json.dump({"runtime_env": ray.get_runtime_context().runtime_env,
                   "serialized": job.runtime_env_info.serialized_runtime_env}, f)
sys.exit(rc)
"""


# -- helpers ------------------------------------------------------------------------------------------


def put_corpus(server, bucket: str, prefix: str, docs: list[dict]) -> None:
    """Two Parquet files (several row groups) and one JSON Lines file under ``prefix``."""
    s3 = server.client("s3")
    a, b, c = docs[: len(docs) // 2], docs[len(docs) // 2: 3 * len(docs) // 4], docs[3 * len(docs) // 4:]
    for name, part in (("a.parquet", a), ("b.parquet", b)):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), buf, row_group_size=40)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=buf.getvalue())
    s3.put_object(Bucket=bucket, Key=f"{prefix}/c.jsonl", Body="".join(json.dumps(d) + "\n" for d in c).encode())


def corpus(n: int) -> list[dict]:
    docs = make_docs(n)
    for d in docs[7::53]:
        d["text"] = "   "  # dead-lettered as empty_text
    return docs


def put_many(server, bucket: str, prefix: str, n: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    s3 = server.client("s3")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"{prefix}/{i:05d}.jsonl" if prefix == "docs"
                                              else f"{prefix}/{i:05d}", Body=b"{}\n"), range(n)))


def keys(server, bucket: str, prefix: str) -> list[str]:
    out = []
    for page in server.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def stored_manifest(server, bucket: str, prefix: str) -> dict:
    """manifest.json as stored, with ``shards`` = the records committed in the commit log as it stands."""
    try:
        body = server.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    except Exception:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    data["shards"] = committed_records(f"s3://{bucket}/{prefix}")
    return data


def s3_ledger(out_uri: str) -> tuple[Counter, Counter]:
    """(ids in committed shards, ids in committed dead letters), every shard sha256-checked."""
    loc = storage.Location.from_uri(out_uri)
    m = Manifest.load(loc)
    embedded, dead = Counter(), Counter()
    for rec in m.committed.values():
        embedded.update(read_shard_table(loc, rec, columns=["id"], verify=True).column("id").to_pylist())
        if rec.get("dead_letter_path"):
            data = loc.read_bytes(rec["dead_letter_path"])
            assert hashlib.sha256(data).hexdigest() == rec["dead_letter_sha256"]
            dead.update(pq.read_table(pa.BufferReader(data)).column("id").to_pylist())
    return embedded, dead


def s3_vectors(out_uri: str) -> dict[str, np.ndarray]:
    loc = storage.Location.from_uri(out_uri)
    vecs = {}
    for rec in Manifest.load(loc).committed.values():
        t = read_shard_table(loc, rec, columns=["id", "embedding"])
        vecs.update(zip(t.column("id").to_pylist(), embedding_matrix(t.column("embedding"))))
    return vecs


def committed_keys(manifest: dict, prefix: str) -> list[str]:
    out = []
    for rec in manifest["shards"].values():
        out.append(f"{prefix}/{rec['path']}")
        if rec.get("dead_letter_path"):
            out.append(f"{prefix}/{rec['dead_letter_path']}")
    return sorted(out)


def assert_ledger_exact(out_uri: str, docs: list[dict]) -> None:
    embedded, dead = s3_ledger(out_uri)
    blank = {d["id"] for d in docs if not d["text"].strip()}
    assert embedded == Counter(d["id"] for d in docs if d["id"] not in blank)
    assert dead == Counter(blank)


def job_env(creds, endpoint: str, ray_tmp: str) -> dict[str, str]:
    env = {**scrubbed_environ(), **aws_env(creds, endpoint), "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    return env


def run_args(inp: str, out: str, model: Path) -> list[str]:
    return ["run", "--input", inp, "--output", out, "--model", str(model), "--shard-rows", "50",
            "--set", "model.batch_tokens=256", "--max-actors", "1"]


def kill_leftovers(marker: str) -> None:
    """SIGKILL any process of ours still running from a private Ray temp dir (by pid)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def files_containing(folder: str, needles: list[str]) -> list[str]:
    hits = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            try:
                data = Path(path).read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n[:4]}..." for n in needles if n.encode() in data]
    return hits


@pytest.fixture
def ray_tmp():
    # Short, private: Ray's unix sockets live under it, and its log folder is scanned for secrets.
    folder = tempfile.mkdtemp(prefix="rs3-", dir="/tmp")
    yield folder
    kill_leftovers(folder)
    subprocess.run(["rm", "-rf", folder], check=False)


def wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# -- storage: endpoint, listing, publish, conditional writes, retries ----------------------------------


def test_endpoint_region_and_listing_follow_the_standard_chain(s3_env, monkeypatch, tmp_path):
    server = s3_env
    bucket = new_bucket(server)
    s3 = server.client("s3")
    for i in range(30):
        s3.put_object(Bucket=bucket, Key=f"docs/part-{i:05d}.jsonl", Body=b"{}\n")
    s3.put_object(Bucket=bucket, Key="docs/_SUCCESS", Body=b"")
    dead = f"http://127.0.0.1:{free_port()}"

    # AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL (which points nowhere), as in boto3.
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    loc, files = storage.list_inputs(f"s3://{bucket}/docs/", "*.jsonl")
    assert len(files) == 30 and files[0].path == f"{bucket}/docs/part-00000.jsonl" and files[0].size == 3

    # The config key wins over both; the region comes from storage.region, else AWS_REGION.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    with pytest.raises(storage.StorageError, match="cannot connect to the S3 endpoint set by AWS_ENDPOINT_URL_S3"):
        storage.preflight(f"s3://{bucket}/docs", f"s3://{bucket}/out")
    settings = storage.Settings.of(load_config(None, [f"storage.endpoint_url={server.endpoint}",
                                                      "storage.region=eu-west-3"]).storage)
    storage.preflight(f"s3://{bucket}/docs", f"s3://{bucket}/out", settings)
    assert storage.s3._s3(bucket, settings).region == "eu-west-3"
    assert storage.s3._s3(bucket, settings).endpoint_source == "storage.endpoint_url"
    # The settings travel on the Location (into pickled tasks too), not in a process-wide global.
    loc = pickle.loads(pickle.dumps(storage.Location.from_uri(f"s3://{bucket}/docs", settings)))
    assert loc.settings == settings and len(loc.list()) == 31
    with pytest.raises(storage.StorageError, match="cannot connect"):
        storage.Location.from_uri(f"s3://{bucket}/docs").list()

    # A profile's endpoint_url is honoured when no variable names one, and ignored on request.
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var)
    (tmp_path / "config").write_text(f"[default]\nregion = ap-south-1\nendpoint_url = {server.endpoint}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    assert len(storage.Location.from_uri(f"s3://{bucket}/docs").list()) == 31
    assert storage.s3._s3(bucket, storage.Settings()).region == "ap-south-1"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.s3._s3(bucket, storage.Settings()).endpoint_source is None


def test_listing_pages_and_retries_throttled_pages(s3_env, fault_proxy, monkeypatch):
    server = s3_env
    bucket = new_bucket(server)
    put_many(server, bucket, "p", 120)
    monkeypatch.setattr(storage.s3, "_LIST_PAGE", 50)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    fault_proxy.add("GET", r"list-type=2", times=2, status=503, code="SlowDown")
    files = storage.Location.from_uri(f"s3://{bucket}/p").list(recursive=True)
    assert [f.path for f in files] == [f"{bucket}/p/{i:05d}" for i in range(120)]
    # three pages, plus the two throttled attempts
    assert fault_proxy.count("GET", "list-type=2") == 5 and fault_proxy.count("GET", "list-type=2", injected=True) == 2


@pytest.mark.slow
def test_listing_ten_thousand_objects_is_fast(s3_env, fault_proxy, monkeypatch):
    server = s3_env
    bucket = new_bucket(server)
    put_many(server, bucket, "docs", 10_050)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    t0 = time.monotonic()
    _, files = storage.list_inputs(f"s3://{bucket}/docs", "*.jsonl")
    secs = time.monotonic() - t0
    assert len(files) == 10_050 and fault_proxy.count("GET", "list-type=2") == 11 + 1  # + the folder check
    assert secs < 30, f"listing 10,050 objects took {secs:.1f} s"


def test_writes_retry_throttling_and_5xx_but_never_other_4xx(s3_env, fault_proxy, monkeypatch):
    bucket = new_bucket(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    loc = storage.Location.from_uri(f"s3://{bucket}/out")
    fault_proxy.add("PUT", r"/out/a$", times=2, status=503, code="SlowDown")
    fault_proxy.add("PUT", r"/out/a$", times=1, status=500, code="InternalError")
    loc.write_bytes(b"payload", "a")
    assert fault_proxy.count("PUT", r"/out/a$") == 4 and loc.read_bytes("a") == b"payload"

    fault_proxy.add("PUT", r"/out/b$", times=1, status=429, code="TooManyRequests")
    loc.write_bytes(b"b", "b")
    assert fault_proxy.count("PUT", r"/out/b$") == 2

    # 4xx other than throttling: one request, then a clear error
    fault_proxy.add("PUT", r"/out/c$", times=5, status=403, code="AccessDenied")
    with pytest.raises(storage.StorageError, match=r"s3://.*/out/c: access denied to write .*s3:PutObject"):
        loc.write_bytes(b"c", "c")
    assert fault_proxy.count("PUT", r"/out/c$") == 1
    fault_proxy.add("PUT", r"/out/d$", times=5, status=400, code="InvalidRequest")
    with pytest.raises(storage.StorageError, match="write failed: InvalidRequest"):
        loc.write_bytes(b"d", "d")
    assert fault_proxy.count("PUT", r"/out/d$") == 1

    # retries run out after storage.max_attempts
    loc = storage.Location.from_uri(f"s3://{bucket}/out", load_config(None, ["storage.max_attempts=3"]).storage)
    fault_proxy.add("PUT", r"/out/e$", times=10, status=503, code="SlowDown")
    with pytest.raises(storage.StorageError, match="s3://.*/out/e: write failed: SlowDown"):
        loc.write_bytes(b"e", "e")
    assert fault_proxy.count("PUT", r"/out/e$") == 3


def test_pyarrow_reads_retry_5xx_but_not_403(s3_env, fault_proxy, monkeypatch):
    bucket = new_bucket(s3_env)
    s3_env.client("s3").put_object(Bucket=bucket, Key="docs/a.parquet", Body=b"x" * 100_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    loc = storage.Location.from_uri(f"s3://{bucket}/docs")
    fault_proxy.add("GET", r"/docs/a\.parquet", times=2, status=503, code="SlowDown")
    assert len(loc.read_bytes("a.parquet")) == 100_000
    assert fault_proxy.count("GET", r"/docs/a\.parquet") == 3
    fault_proxy.clear()
    fault_proxy.add("GET", r"/docs/a\.parquet", times=2, status=403, code="AccessDenied")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        loc.read_bytes("a.parquet")
    assert fault_proxy.count("GET", r"/docs/a\.parquet") == 1


def test_conditional_write_whose_answer_was_lost_is_not_a_conflict(s3_env, fault_proxy, monkeypatch):
    bucket = new_bucket(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    loc = storage.Location.from_uri(f"s3://{bucket}/out")
    # The PUT reaches S3, but its answer is a 500: the retry meets its own write (412) and must accept it.
    fault_proxy.add("PUT", r"/out/m$", times=1, status=500, code="InternalError", after_forward=True)
    v1 = loc.write_if(b"one", "m", version=None)
    fault_proxy.add("PUT", r"/out/m$", times=1, status=503, code="SlowDown", after_forward=True)
    v2 = loc.write_if(b"two", "m", version=v1)
    assert loc.read_versioned("m") == (b"two", v2)
    assert fault_proxy.count("PUT", r"/out/m$") == 4
    # ... while someone else's write is a conflict, and overwrites nothing
    with pytest.raises(storage.VersionConflict, match="changed since it was read"):
        loc.write_if(b"three", "m", version=v1)
    assert loc.read_versioned("m") == (b"two", v2)


def test_manifest_on_s3_lets_only_one_job_commit(s3_env):
    bucket = new_bucket(s3_env)
    loc = storage.Location.from_uri(f"s3://{bucket}/out")
    plan = {"shards": [{"shard": i, "rows": 1, "segments": []} for i in range(3)], "rows": 3}
    model = {"name": "m", "fingerprint": "f"}
    a = Manifest.create(loc, model, plan, {})
    with pytest.raises(ConcurrentWriteError, match=r"manifest.json: created by another job"):
        Manifest.create(loc, {"name": "other", "fingerprint": "g"}, plan, {})
    assert Manifest.load(loc).model["name"] == "m"

    b = Manifest.load(loc)
    a.commit_shard(0, {"path": "shards/part-00000.parquet", "rows": 1, "dead_letters": 0})
    b.claim()
    with pytest.raises(ConcurrentWriteError, match="another job has taken over this output"):
        a.commit_shard(1, {"path": "shards/part-00001.parquet", "rows": 1, "dead_letters": 0})
    assert 1 not in a.committed  # the failed commit is not kept in memory either
    assert sorted(Manifest.load(loc).committed) == [0]
    with pytest.raises(ConcurrentWriteError, match="changed by another job since this job read it"):
        a.set_stage("index", {})  # manifest.json saves are fenced by the claim's save too

    # A claim fences every job that read the manifest before it, and removes uncommitted leftovers.
    loc.write_bytes(b"partial", "shards", "part-00002.parquet")
    loc.write_bytes(b"tmp", "shards", "_tmp", "part-00002.parquet.abc")
    c = Manifest.load(loc)
    assert c.claim("shards", "dead_letter") == 2
    assert loc.list("shards", recursive=True) == []
    with pytest.raises(ConcurrentWriteError):
        a.commit_shard(2, {"path": "shards/part-00002.parquet", "rows": 1, "dead_letters": 0})
    with pytest.raises(ConcurrentWriteError, match="another job has taken over"):
        a.check_current()
    c.check_current()
    c.commit_shard(2, {"path": "shards/part-00002.parquet", "rows": 1, "dead_letters": 0})
    assert sorted(Manifest.load(loc).committed) == [0, 2]


def test_publish_verifies_and_a_truncated_object_is_never_committed(s3_env):
    from reembed.write import _verifier

    bucket = new_bucket(s3_env)
    loc = storage.Location.from_uri(f"s3://{bucket}/out")
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [str(i) for i in range(100)]}), buf)
    data = buf.getvalue()
    loc.publish(data, "shards", "part-00000.parquet", verify=_verifier(100, "part 0"), exclusive=True)
    assert loc.read_bytes("shards", "part-00000.parquet") == data
    # an exclusive publish never replaces an object that is there (committed, or another job's) ...
    with pytest.raises(storage.ObjectExistsError, match="part-00000.parquet: an object already exists"):
        loc.publish(b"other", "shards", "part-00000.parquet", exclusive=True)
    assert loc.read_bytes("shards", "part-00000.parquet") == data
    # ... a plain one does (the exporter rewrites a part whose schema widened)
    loc.publish(data, "export", "part-00000.parquet")
    loc.publish(data + b"", "export", "part-00000.parquet", verify=_verifier(100, "export part 0"))
    # a truncated write fails verification and is removed, so nothing is left to be taken for a shard
    with pytest.raises(storage.StorageError, match="part 1: written file has"):
        loc.publish(data, "shards", "part-00001.parquet", verify=_verifier(99, "part 1"), exclusive=True)
    with pytest.raises(storage.StorageError, match="part 1: written file is not readable Parquet"):
        loc.publish(data[: len(data) // 2], "shards", "part-00001.parquet", verify=_verifier(100, "part 1"),
                    exclusive=True)
    assert [i.path.rsplit("/", 1)[-1] for i in loc.list("shards")] == ["part-00000.parquet"]
    loc.write_bytes(b"x", "shards", "_tmp", "part-00003.parquet.abc")
    loc.delete_dir("shards")  # what --fresh does, in batches of 1,000
    assert loc.list("shards", recursive=True) == [] and not loc.exists("shards", "part-00000.parquet")


def test_no_secret_in_pickled_filesystem_or_read_tasks(s3_env, s3_user):
    from ray import cloudpickle

    from reembed.read import ShardDatasource

    bucket = new_bucket(s3_env)
    fs, _ = storage.resolve(f"s3://{bucket}/docs")
    secrets = [s3_user.access_key_id.encode(), s3_user.secret_access_key.encode()]
    blob = pickle.dumps(fs)
    assert not any(s in blob for s in secrets)
    from reembed.config import InputConfig
    from reembed.plan import make_plan

    s3_env.client("s3").put_object(Bucket=bucket, Key="docs/a.jsonl", Body=b'{"id": 1, "text": "x"}\n')
    settings = load_config(None, ["storage.region=us-east-1"]).storage
    source = storage.Location.from_uri(f"s3://{bucket}/docs", settings)
    out = storage.Location.from_uri(f"s3://{bucket}/out", settings)
    plan = make_plan(InputConfig(uri=f"s3://{bucket}/docs"), 1, out.child("plan"), source=source)
    tasks = ShardDatasource(plan, out, [0], source=source).get_read_tasks(1)
    blob = cloudpickle.dumps(tasks)
    assert not any(s in blob for s in secrets) and b"us-east-1" in blob


# -- preflight: one-line errors before any model is loaded ---------------------------------------------


def test_preflight_errors_name_the_uri_and_the_cause(s3_env, monkeypatch, capsys):
    server = s3_env
    bucket = new_bucket(server)
    server.client("s3").put_object(Bucket=bucket, Key="docs/a.jsonl", Body=b'{"id": 1, "text": "x"}\n')
    docs, out = f"s3://{bucket}/docs", f"s3://{bucket}/out"

    def run_error(inp: str, outp: str) -> str:
        # A model that does not exist: had the job got past preflight it would fail on the model instead.
        cfg = load_config(None, [f"input.uri={inp}", f"output.uri={outp}", "model.name=/nonexistent/model"])
        with pytest.raises(storage.StorageError) as e:
            pipeline.run(cfg)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert run_error(f"s3://nosuch-{bucket}/docs", out) == (
        f"s3://nosuch-{bucket}/docs: bucket 'nosuch-{bucket}' does not exist on the S3 endpoint set by "
        "AWS_ENDPOINT_URL_S3 (check the bucket name and the endpoint)")
    assert run_error(docs, f"s3://nosuch-{bucket}/out").startswith(f"s3://nosuch-{bucket}/out: bucket ")
    assert run_error(f"s3://{bucket}/Docs", out) == (
        f"s3://{bucket}/Docs: no object or prefix 'Docs' in bucket '{bucket}' (check the path; S3 keys are case-sensitive)")

    # an IAM user without S3 permissions; one allowed to read but not to write the output
    nobody = server.user(f"nobody-{bucket}", None)
    reader = server.user(f"reader-{bucket}", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}]})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", nobody.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", nobody.secret_access_key)
    assert run_error(docs, out) == (
        f"{docs}: access denied to list (the credentials in use lack s3:ListBucket here: check the IAM and bucket policies)")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader.secret_access_key)
    assert run_error(docs, out) == (
        f"{out}: access denied to write (the credentials in use lack s3:PutObject here: check the IAM and bucket policies)")

    # wrong credentials: an unknown key id, a wrong secret, none at all
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    assert run_error(docs, out) == (
        f"{docs}: the S3 endpoint set by AWS_ENDPOINT_URL_S3 does not recognise the access key id (wrong or deleted "
        "credentials: check AWS_ACCESS_KEY_ID / AWS_PROFILE)")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert run_error(docs, out) == (
        f"{docs}: the secret access key does not match the access key id (wrong credentials: check "
        "AWS_SECRET_ACCESS_KEY / AWS_PROFILE)")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert run_error(docs, out).startswith(f"{docs}: no usable AWS credentials found (set AWS_ACCESS_KEY_ID")

    # a bad endpoint: nothing listening there
    for k, v in aws_env(server.admin, f"http://127.0.0.1:{free_port()}").items():
        monkeypatch.setenv(k, v)
    assert run_error(docs, out) == (
        f"{docs}: cannot connect to the S3 endpoint set by AWS_ENDPOINT_URL_S3 (check the URL and that the server "
        "is running and reachable)")

    # the CLI prints the same line, once, and exits 1
    capsys.readouterr()
    rc = cli.main(["run", "--input", docs, "--output", out, "--model", "/nonexistent/model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith(f"reembed: error: {docs}: cannot connect to the S3 endpoint")


# -- whole jobs -----------------------------------------------------------------------------------------


@pytest.mark.slow  # 80 s: in `make test-slow` (CI runs both)
def test_run_killed_then_resumed_through_faults_keeps_ledger_exact_and_secrets_private(
        s3_env, s3_user, fault_proxy, tiny_model, ray_tmp, tmp_path):
    server = s3_env
    bucket = new_bucket(server)
    docs = corpus(600)
    put_corpus(server, bucket, "docs", docs)
    inp, out = f"s3://{bucket}/docs/", f"s3://{bucket}/emb/v1"
    env = job_env(s3_user, fault_proxy.endpoint, ray_tmp)
    logs = {name: open(tmp_path / name, "w+") for name in ("run1.out", "run1.err", "run2.out", "run2.err")}

    # Run 1, killed with SIGKILL after two commits (each commit-log write is slowed down to make room).
    fault_proxy.add("PUT", r"/emb/v1/_log/0", times=10**6, status=0, delay=0.4)
    proc = subprocess.Popen([sys.executable, "-m", "reembed", *run_args(inp, out, tiny_model)], env=env,
                            stdout=logs["run1.out"], stderr=logs["run1.err"], start_new_session=True)
    try:
        wait_for(lambda: len(stored_manifest(server, bucket, "emb/v1").get("shards", {})) >= 2, 180,
                 "two committed shards", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_leftovers(ray_tmp)
    fault_proxy.wait_idle()  # a commit the proxy was delaying still lands after the kill
    first = stored_manifest(server, bucket, "emb/v1")
    regular = first["plan"]["shards"]
    total = regular + int((first["plan"].get("texts") or {}).get("copies", 0))  # copy shards of repeated texts
    assert regular == 12 and 2 <= len(first["shards"]) < total, f"{len(first['shards'])} of {total} committed"

    # What a crash can leave: a truncated shard object and a stray temporary one, neither committed.
    pending = next(i for i in range(regular) if f"{i:05d}" not in first["shards"])
    s3 = server.client("s3")
    some = next(iter(first["shards"].values()))
    whole = s3.get_object(Bucket=bucket, Key=f"emb/v1/{some['path']}")["Body"].read()
    s3.put_object(Bucket=bucket, Key=f"emb/v1/shards/part-{pending:05d}.parquet", Body=whole[: len(whole) // 2])
    s3.put_object(Bucket=bucket, Key=f"emb/v1/shards/_tmp/part-{pending:05d}.parquet.0a1b2c", Body=b"x")
    rc = cli.main(["status", out])
    assert rc == 0 and Manifest.load(storage.Location.from_uri(out)).pending()
    assert pending in Manifest.load(storage.Location.from_uri(out)).pending()

    # Run 2 resumes through throttling and 5xx on writes (the claim's manifest save included), a commit
    # whose answer is lost, and 5xx on reads of the input in the Ray workers.
    fault_proxy.clear()
    fault_proxy.add("PUT", r"/emb/v1/shards/part-", times=3, status=503, code="SlowDown")
    fault_proxy.add("PUT", r"/emb/v1/dead_letter/part-", times=1, status=500, code="InternalError")
    fault_proxy.add("PUT", r"/emb/v1/manifest\.json", times=2, status=500, code="InternalError")
    fault_proxy.add("PUT", r"/emb/v1/_log/0", skip=1, times=1, status=503, code="SlowDown", after_forward=True)
    fault_proxy.add("GET", r"/docs/a\.parquet", times=2, status=503, code="SlowDown")
    dump = tmp_path / "runtime_env.json"
    rerun = subprocess.run([sys.executable, "-c", DRIVER, str(dump), *run_args(inp, out, tiny_model)], env=env,
                           stdout=logs["run2.out"], stderr=logs["run2.err"], timeout=300)
    outputs = {}
    for name, fh in logs.items():
        fh.seek(0)
        outputs[name] = fh.read()
        fh.close()
    assert rerun.returncode == 0, outputs["run2.err"][-3000:]
    assert f"input 600 = embedded {600 - 12} + dead-lettered 12" in outputs["run2.out"]
    for f in fault_proxy.faults:
        assert f.hits == f.times, f"fault {f.method} {f.pattern.pattern} injected {f.hits} of {f.times} times"

    final = stored_manifest(server, bucket, "emb/v1")
    assert len(final["shards"]) == total
    for k, rec in first["shards"].items():
        assert final["shards"][k] == rec, "a committed shard was recomputed"
    assert_ledger_exact(out, docs)
    # the vectors that went through S3 are the model's own
    from sentence_transformers import SentenceTransformer

    live = [d for d in docs if d["text"].strip()]
    ref = SentenceTransformer(str(tiny_model), device="cpu").encode([d["text"] for d in live], batch_size=16)
    got = s3_vectors(out)
    for d, r in zip(live, ref):
        np.testing.assert_allclose(got[d["id"]], r, atol=1e-5)
    # no duplicates, no truncated or temporary leftovers: exactly the committed objects remain
    assert sorted(keys(server, bucket, "emb/v1/shards/") + keys(server, bucket, "emb/v1/dead_letter/")) == \
        committed_keys(final, "emb/v1")

    # Secrets: nowhere in the output, the logs, Ray's session folder or the job's runtime_env.
    secrets = [s3_user.access_key_id, s3_user.secret_access_key]
    endpoint = fault_proxy.endpoint.removeprefix("http://")
    for name, text in outputs.items():
        assert not any(s in text for s in secrets), f"a secret in {name}"
    assert os.listdir(os.path.join(ray_tmp, "ray")), "Ray did not use the private temp dir"
    assert files_containing(ray_tmp, secrets) == []
    manifest_text = json.dumps(final)
    assert not any(s in manifest_text for s in [*secrets, endpoint])
    recorded = json.loads(dump.read_text())
    assert not any(s in json.dumps(recorded) for s in [*secrets, endpoint, "AWS_"]), recorded


@pytest.mark.slow  # 80 s: in `make test-slow` (CI runs both)
def test_two_jobs_on_one_output_commit_each_shard_exactly_once(s3_env, s3_user, tiny_model, tmp_path):
    server = s3_env
    bucket = new_bucket(server)
    docs = corpus(400)
    put_corpus(server, bucket, "docs", docs)
    inp, out = f"s3://{bucket}/docs/", f"s3://{bucket}/emb"
    proxies = {j: FaultProxy(server.endpoint, keep_bodies=r"/emb/_log/0") for j in "ab"}
    tmps = {j: tempfile.mkdtemp(prefix=f"rs3{j}-", dir="/tmp") for j in "ab"}
    released = threading.Event()
    # Job a's second shard write stalls (a's other writers go on): job b starts, claims the output and
    # works; then a's write goes through, late, and a tries to commit it.
    held = proxies["a"].add("PUT", r"/emb/shards/part-", skip=1, times=1, status=0, hold=released)
    procs, err = {}, {}
    try:
        for j in "ab":
            err[j] = open(tmp_path / f"{j}.err", "w+")
        procs["a"] = subprocess.Popen(
            [sys.executable, "-m", "reembed", *run_args(inp, out, tiny_model)], env=job_env(s3_user, proxies["a"].endpoint, tmps["a"]),
            stdout=subprocess.DEVNULL, stderr=err["a"], start_new_session=True)
        wait_for(lambda: held.hits == 1, 180, "job a's second shard write", procs["a"])
        procs["b"] = subprocess.Popen(  # a is live: b must take the output over (a plain run is refused)
            [sys.executable, "-m", "reembed", *run_args(inp, out, tiny_model), "--take-over"], env=job_env(s3_user, proxies["b"].endpoint, tmps["b"]),
            stdout=subprocess.DEVNULL, stderr=err["b"], start_new_session=True)
        wait_for(lambda: proxies["b"].successes("PUT", r"/emb/manifest\.json"), 180, "job b's claim", procs["b"])
        released.set()
        rc = {j: procs[j].wait(timeout=300) for j in "ab"}
        text = {}
        for j in "ab":
            err[j].seek(0)
            text[j] = err[j].read()
    finally:
        released.set()
        for j, p in procs.items():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for j in "ab":
            kill_leftovers(tmps[j])
            subprocess.run(["rm", "-rf", tmps[j]], check=False)
            proxies[j].stop()
            if j in err:
                err[j].close()

    assert rc["b"] == 0, text["b"][-3000:]
    errors = [line for line in text["a"].splitlines() if line.startswith("reembed: error:")]
    assert rc["a"] == 3 and len(errors) == 1 and "another job" in errors[0], text["a"][-3000:]  # fenced: refused
    final = stored_manifest(server, bucket, "emb")
    copies = (final["plan"].get("texts") or {}).get("copies", 0)  # corpus() repeats texts: copy shards (reembed.texts)
    assert len(final["shards"]) == final["plan"]["shards"] + copies and final["plan"]["shards"] == 8
    assert_ledger_exact(out, docs)
    assert sorted(keys(server, bucket, "emb/shards/") + keys(server, bucket, "emb/dead_letter/")) == committed_keys(final, "emb")

    # Every commit-log entry that landed, from either job: each shard committed once, by one job.
    entries = [json.loads(s.body) for j in "ab" for s in proxies[j].successes("PUT", r"/emb/_log/0")]
    commits = [e for e in entries if e["kind"] == "commit"]
    assert Counter(e["shard"] for e in commits) == Counter(range(8 + copies)), "a shard was committed twice or never"
    assert {f"{e['shard']:05d}": e["record"] for e in commits} == final["shards"]
    # a's writers run side by side, so a commits every shard but the held one before b claims, or some
    # of them; b commits the rest, the held one included.
    by_epoch = Counter(e["epoch"] for e in commits)
    assert len(by_epoch) == 2 and min(by_epoch.values()) >= 1, by_epoch
    b_epoch = max(by_epoch)
    # b never met a's late object (it is named by a's epoch); a, fenced, removed it itself
    assert proxies["b"].count("PUT", r"/emb/shards/part-") == by_epoch[b_epoch]
    assert proxies["a"].count("DELETE", r"/emb/shards/part-") >= 1


# -- secrets at the highest verbosity -------------------------------------------------------------------


def test_debug_logs_carry_no_credentials(s3_env, s3_user, tmp_path):
    """`-vv` turns on DEBUG: botocore would log request headers (the access key id in Authorization, the
    x-amz-security-token). Every line of every output, at -vv, must be free of the credentials."""
    server = s3_env
    bucket = new_bucket(server)
    token = "SENTINEL-SESSION-TOKEN-" + "z" * 40
    env = {**scrubbed_environ(), **aws_env(s3_user, server.endpoint), "PYTHONPATH": SRC}
    cases = {
        # a session token moto does not know: S3 refuses, but the request (and its headers) went out
        "token": ({**env, "AWS_SESSION_TOKEN": token}, ["-vv", "status", f"s3://{bucket}/out"]),
        # valid keys, through preflight (list, probe put and delete), then a model that does not exist
        "keys": (env, ["run", "-vv", "--input", f"s3://{bucket}/docs", "--output", f"s3://{bucket}/out",
                       "--model", str(tmp_path / "no-model")]),
    }
    server.client("s3").put_object(Bucket=bucket, Key="docs/a.jsonl", Body=b'{"id": 1, "text": "x"}\n')
    secrets = [s3_user.access_key_id, s3_user.secret_access_key, token]
    for name, (case_env, argv) in cases.items():
        proc = subprocess.run([sys.executable, "-m", "reembed", *argv], env=case_env, capture_output=True,
                              text=True, timeout=120)
        text = proc.stdout + proc.stderr
        assert "DEBUG" in text, f"{name}: -vv logged nothing at DEBUG:\n{text[-2000:]}"
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{name}: a credential in the -vv output"
        assert proc.returncode == 1 and "reembed: error: " in proc.stderr


# -- settings travel: every command follows the endpoint named only in job.yaml ----------------------------


def test_every_command_follows_the_endpoint_in_job_yaml(s3_env, s3_user, tiny_model, ray_tmp, tmp_path,
                                                        monkeypatch, capsys):
    """The environment's endpoint points at a closed port; only job.yaml's storage.endpoint_url leads to the
    S3 server. Every command that touches the output (run in Ray's workers too, index, search, validate,
    status, versions, swap, rollback, cost, export, query) must reach it through its --config."""
    server = s3_env
    bucket = new_bucket(server)
    put_corpus(server, bucket, "docs", corpus(100))
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"storage:\n  endpoint_url: {server.endpoint}\n  max_attempts: 2\n")
    inp, out = f"s3://{bucket}/docs/", f"s3://{bucket}/emb"
    conf = ["--config", str(cfg)]

    env = {**job_env(s3_user, dead, ray_tmp)}
    proc = subprocess.run([sys.executable, "-m", "reembed", *run_args(inp, out, tiny_model), *conf], env=env,
                          capture_output=True, text=True, timeout=300)
    kill_leftovers(ray_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "input 100 = embedded" in proc.stdout

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    # without the config, the same command goes to the environment's (dead) endpoint and says so
    assert cli.main(["status", out]) == 1
    assert "cannot connect to the S3 endpoint set by AWS_ENDPOINT_URL_S3" in capsys.readouterr().err
    q = str(tmp_path / "qdrant")
    steps = [
        ["status", out, *conf],
        ["index", out, "--no-ray", "--faiss", "flat", "--qdrant", q, "--collection", "docs", *conf],
        ["search", out, "cat dog", "-k", "3", *conf],
        ["versions", "--output", out, "--qdrant", q, *conf],
        ["swap", "--output", out, "--qdrant", q, "--alias", "live", "--to", "docs-v1", "--force", *conf],
        ["cost", out, "--report", str(tmp_path / "cost.html"), *conf],
        ["export", "--from", f"qdrant://{q}?collection=docs-v1", "--to", f"s3://{bucket}/backup", *conf],
        ["query", "cat dog", "--old", out, "--new", out, "-k", "3", *conf],
    ]
    for argv in steps:
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 0 and "reembed: error" not in err, (argv[0], err[-2000:])
    # rollback read the manifest from S3 and reached the alias: there is just nothing before docs-v1
    assert cli.main(["rollback", "--output", out, "--qdrant", q, "--alias", "live", *conf]) == 3  # refused
    assert "no earlier collection recorded for alias 'live'" in capsys.readouterr().err
    # validate's shard tasks run on Ray workers, which take credentials from their own environment (a node's
    # role): run it as the job ran, in a process whose Ray starts with them, the endpoint still only in job.yaml.
    proc = subprocess.run([sys.executable, "-m", "reembed", "validate", out, "--no-builtin-pairs", "--sample", "20",
                           *conf], env=env, capture_output=True, text=True, timeout=300)
    kill_leftovers(ray_tmp)
    assert proc.returncode in (0, 1) and "reembed: error" not in proc.stderr, proc.stderr[-2000:]
    stored = keys(server, bucket, "")
    assert any(k.startswith("emb/indexes/faiss/") for k in stored)
    assert "emb/validation/report.json" in stored or any("report.json" in k for k in stored)
    assert any(k.startswith("backup/") for k in stored)
