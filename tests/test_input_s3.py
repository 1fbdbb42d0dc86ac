"""Input on S3: the listing rules of local folders, and read tasks that carry the input's Location (its
endpoint and region) to the worker, with no process-wide storage settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_docs
from input_fixtures import outcome, plan_and_read
from reembed import storage
from reembed.config import InputConfig
from reembed.plan import make_plan
from s3_fixtures import aws_env, moto_server, new_bucket, s3_env, s3_user, scrubbed_environ  # noqa: F401 (fixtures)

pytestmark = pytest.mark.s3

SRC = str(Path(__file__).resolve().parents[1] / "src")
RUN_TASKS = """
import json, sys
from ray import cloudpickle
tasks = cloudpickle.loads(open(sys.argv[1], "rb").read())
ids = [i for t in tasks for block in t() for i in block.column("id").to_pylist()]
print(json.dumps(ids))
"""


def jsonl_body(docs: list[dict]) -> bytes:
    return "".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs).encode()


@pytest.mark.s3
def test_s3_prefixes_follow_the_same_rules(s3_env, tmp_path):
    server = s3_env
    bucket = new_bucket(server)
    s3 = server.client("s3")
    body = jsonl_body(make_docs(2))
    for key in ("data[2024]/a.jsonl", "data[2024]/sub/b.jsonl", "data[2024]/.ipynb_checkpoints/a.jsonl",
                "data[2024]/_temporary/0/b.jsonl", "data[2024]/_SUCCESS", "data2/c.jsonl"):
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    loc, files = storage.list_inputs(f"s3://{bucket}/data[2024]")
    assert [f.path for f in files] == [f"{bucket}/data[2024]/a.jsonl", f"{bucket}/data[2024]/sub/b.jsonl"]
    _, files = storage.list_inputs(f"s3://{bucket}/data[2024]/*.jsonl")
    assert [f.path for f in files] == [f"{bucket}/data[2024]/a.jsonl", f"{bucket}/data[2024]/sub/b.jsonl"]
    # Plan and read on S3: the read tasks open files through the plan's input Location.
    plan, read = plan_and_read(f"s3://{bucket}/data[2024]", shard_rows=3)
    assert plan["input_root"] == f"s3://{bucket}/data[2024]" and plan["duplicate_rows"] == 2
    assert [r for _, r in outcome(read)] == [None, None, "duplicate_id", "duplicate_id"]



def test_read_tasks_carry_the_endpoint_to_a_worker_that_has_none(s3_env, s3_user, tmp_path):
    from ray import cloudpickle

    from reembed.read import ShardDatasource

    server = s3_env
    bucket = new_bucket(server)
    docs = make_docs(5)
    server.client("s3").put_object(Bucket=bucket, Key="docs/a.jsonl", Body=jsonl_body(docs))
    out = storage.Location.from_uri(f"s3://{bucket}/out")  # the plan lives on S3 too
    plan = make_plan(InputConfig(uri=f"s3://{bucket}/docs"), 2, out.child("plan"))
    tasks = ShardDatasource(plan, out, [0, 1, 2]).get_read_tasks(1)
    (tmp_path / "tasks.pkl").write_bytes(cloudpickle.dumps(tasks))

    # The worker has credentials but no endpoint variable: only the pickled Location knows the server.
    env = {**scrubbed_environ(), **aws_env(s3_user, server.endpoint), "PYTHONPATH": SRC}
    del env["AWS_ENDPOINT_URL_S3"]
    (tmp_path / "run.py").write_text(RUN_TASKS)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "tasks.pkl")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [d["id"] for d in docs]


def test_a_resume_check_on_s3_notices_an_object_rewritten_at_the_same_size(s3_env, tmp_path):
    from reembed import plan_store
    from reembed.errors import InputError
    from reembed.plan import check_input

    server = s3_env
    bucket = new_bucket(server)
    s3 = server.client("s3")
    docs = make_docs(4)
    body = jsonl_body(docs)
    s3.put_object(Bucket=bucket, Key="docs/a.jsonl", Body=body)
    s3.put_object(Bucket=bucket, Key="docs/b.jsonl", Body=body)
    out = storage.Location.from_uri(f"s3://{bucket}/out")
    plan = make_plan(InputConfig(uri=f"s3://{bucket}/docs"), 3, out.child("plan"))
    files = plan_store.read_files(out.child("plan"))
    source = storage.Location.from_uri(f"s3://{bucket}/docs")
    check_input(plan, files, source)  # unchanged: the listing's mtimes and the ETags agree with the plan
    lines = body.splitlines(keepends=True)
    s3.put_object(Bucket=bucket, Key="docs/b.jsonl", Body=b"".join(reversed(lines)))  # same size, same second
    with pytest.raises(InputError, match=rf"s3://{bucket}/docs/b\.jsonl: modified since the plan was made"):
        check_input(plan, files, source)
