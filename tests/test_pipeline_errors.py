"""What a user sees when a run cannot go on: one line on stderr (exit 1), never a traceback, for an output
that is a file, a broken or tampered manifest, a full disk (and the resume after it), an error raised
inside a Ray task, and a Ray node that does not start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster_fixtures import committed_records
from conftest import make_docs, write_jsonl, write_parquet
from reembed import pipeline
from reembed.cli import main
from reembed.config import load_config
from reembed.manifest import Manifest
from reembed.storage import Location


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``reembed -q run ARGS`` in this process: its exit code and its one-line error."""
    rc = main(["-q", "run", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\x1b[" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("reembed: error: ")]
    assert len(errors) == 1, err
    return rc, errors[0]


def args_for(inp: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["--input", str(inp), "--output", str(out), "--model", str(model), *extra]


def plan_only(inp: Path, out: Path, model: Path, *overrides: str) -> Manifest:
    """Plan an output and save its manifest, as a run does before it starts Ray."""
    cfg = load_config(None, [f"input.uri={inp}", f"output.uri={out}", f"model.name={model}", *overrides])
    return pipeline.open_output(cfg, Location.from_uri(str(out)), pipeline.inspect_model(cfg))


def test_an_output_that_is_a_file_is_one_line(tmp_path, tiny_model, capsys, ray_local):
    write_parquet(tmp_path / "in" / "a.parquet", make_docs(5))
    target = tmp_path / "emb.parquet"
    target.write_bytes(b"someone's file")
    rc, line = run_cli(capsys, *args_for(tmp_path / "in", target, tiny_model))
    assert rc == 1 and f"{target}: is a file; the output must be a folder" in line and "--output" in line
    assert target.read_bytes() == b"someone's file"
    # A path under a file fails as cleanly, when the plan's first file is written.
    rc, line = run_cli(capsys, *args_for(tmp_path / "in", target / "sub", tiny_model))
    assert rc == 1 and str(target) in line


@pytest.mark.parametrize("content, words", [
    ("[]", "expected a JSON object, found list"),
    ('{"format": 1, "generation"', "not valid JSON"),
    ('{"format": 1, "generation": 0, "model": {}}', "key 'fingerprint' is missing"),
])
def test_a_broken_manifest_is_one_line_and_left_as_it_is(tmp_path, tiny_model, capsys, content, words):
    write_parquet(tmp_path / "in" / "a.parquet", make_docs(5))
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    rc, line = run_cli(capsys, *args_for(tmp_path / "in", out, tiny_model))
    assert rc == 1 and "manifest.json" in line and words in line and "--fresh" in line
    assert (out / "manifest.json").read_text() == content


def test_a_tampered_duplicates_file_stops_the_resume(tmp_path, tiny_model, capsys, ray_local):
    docs = make_docs(20)
    write_parquet(tmp_path / "in" / "a.parquet", docs + docs[:3])  # three duplicate ids
    out = tmp_path / "out"
    m = plan_only(tmp_path / "in", out, tiny_model)
    assert m.data["duplicates"]["rows"] == 3
    (part,) = [rec["path"] for rec in m.plan["store"]["duplicates"]]
    write_parquet(out / part, [{"file": 0, "row": 1, "id": "d1"}])  # would dead-letter a good row
    rc, line = run_cli(capsys, *args_for(tmp_path / "in", out, tiny_model))
    assert rc == 1 and "duplicates/part-0000.parquet: sha256" in line
    assert "does not match plan.store.duplicates[0].sha256" in line
    assert not (out / "shards").exists()


def test_temporary_files_of_killed_saves_are_cleaned_at_the_start(tmp_path, tiny_model, ray_local):
    write_parquet(tmp_path / "in" / "a.parquet", make_docs(30))
    out = tmp_path / "out"
    plan_only(tmp_path / "in", out, tiny_model, "plan.shard_rows=10")
    # What a SIGKILL during saves leaves: a manifest temp, an empty _tmp/ folder. (The plan's files are
    # written before the manifest names them: a killed planning is re-planned from an empty plan/.)
    (out / "manifest.json.tmp-0123456789ab").write_text('{"half": ')
    (out / "shards" / "_tmp").mkdir(parents=True)
    s = pipeline.run(load_config(None, [f"input.uri={tmp_path / 'in'}", f"output.uri={out}",
                                        f"model.name={tiny_model}", "plan.shard_rows=10"]))
    assert s["complete"] and s["embedded"] == 30
    assert sorted(p.name for p in out.iterdir()) == [".manifest.lock", "_live.json", "_log", "manifest.json", "plan",
                                                      "shards"]
    # (no texts/: 30 distinct texts, so plan.dedup_texts=auto planned no copy pass and removed its counts)
    assert sorted(p.name for p in (out / "plan").iterdir()) == ["duplicates", "files.parquet", "segments"]
    # Planning created the output (epoch 1), the run claimed it (epoch 2) and wrote its files under that epoch.
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"part-0000{i}.e0002.parquet" for i in range(3)]


def test_an_input_error_inside_a_read_task_is_one_line(tmp_path, tiny_model, ray_local, capsys):
    docs = make_docs(40)
    write_parquet(tmp_path / "in" / "a.parquet", docs[:20])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[20:])
    out = tmp_path / "out"
    plan_only(tmp_path / "in", out, tiny_model, "plan.shard_rows=10")
    # The file changed after the plan at the same size and mtime (a rewrite within the filesystem's
    # timestamp granularity): the resume check cannot see it, the read task must. Two lines become one.
    b = tmp_path / "in" / "b.jsonl"
    st = b.stat()
    data = b.read_bytes()
    b.write_bytes(data.replace(b"\n", b" ", 1))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, line = run_cli(capsys, *args_for(tmp_path / "in", out, tiny_model, "--shard-rows", "10"))
    assert rc == 1 and "b.jsonl" in line and "the file changed since the plan was made" in line
    assert "RayTaskError" not in line and "ray" not in line.lower().replace("array", "")

    # The library raises the task's own error too, without Ray's wrapper.
    from reembed.plan import InputError

    cfg = load_config(None, [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", f"model.name={tiny_model}",
                             "plan.shard_rows=10"])
    with pytest.raises(InputError) as e:
        pipeline.run(cfg)
    assert type(e.value) is InputError and "\n" not in str(e.value)


@pytest.mark.slow  # 47 s: in `make test-slow` (CI runs both)
def test_a_full_disk_is_one_line_and_the_resume_completes_exactly(tmp_path, tiny_model, ray_local, capsys, small_disk):
    disk, resize = small_disk
    docs = make_docs(1200)
    write_parquet(tmp_path / "in" / "a.parquet", docs)
    out = disk / "out"
    args = args_for(tmp_path / "in", out, tiny_model, "--shard-rows", "100", "--passthrough", "text")
    rc, line = run_cli(capsys, *args)
    assert rc == 1 and "no space left on the device" in line and "rerun the same command to resume" in line
    first = Manifest.load(Location.from_uri(str(out)))
    assert 0 < len(first.committed) < 12, "the disk should fill up part way"

    resize("8m")
    assert main(["-q", "run", *args]) == 0
    m = Manifest.load(Location.from_uri(str(out)))
    assert m.is_complete() and all(m.committed[s] == rec for s, rec in first.committed.items())
    ids = Counter()
    for rec in m.committed.values():
        ids.update(pq.read_table(out / rec["path"], columns=["id"]).column("id").to_pylist())
    assert ids == Counter(d["id"] for d in docs)
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        Path(rec["path"]).name for rec in m.committed.values())
    assert not list(out.glob("manifest.json.tmp-*"))


@pytest.mark.slow
def test_a_ray_node_that_does_not_start_is_one_line(tmp_path, tiny_model):
    """Ray's own testing knob delays the node's registration with the GCS past Ray's 30 s start limit: the
    timeout an overloaded machine meets, for real."""
    write_parquet(tmp_path / "in" / "a.parquet", make_docs(5))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_testing_asio_delay_us"] = "NodeInfoGcsService.grpc_server.RegisterNode=45000000:45000000"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "reembed", "-q", "run",
                           *args_for(tmp_path / "in", tmp_path / "out", tiny_model)],
                          env=env, capture_output=True, text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("reembed: error: ")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "did not start within its 30 s limit" in errors[0]
    assert "--address" in errors[0] and "ray stop" in errors[0]
    assert not (tmp_path / "out" / "manifest.json").exists()  # Ray starts before planning: nothing planned
