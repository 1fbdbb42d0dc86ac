"""index / versions / swap / rollback / search through ``reembed.cli.main``: every user mistake is one line
(exit 1, or 2 for usage), never a traceback; a manifest's word is never trusted with a path outside the
output or with the Qdrant API key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from index_fixtures import cli_logging_reset, closed_port, clustered, recording_server, write_output  # noqa: F401
from reembed import cli
from reembed import validation as V
from reembed.config import IndexConfig
from reembed.indexes import build as stage
from reembed.indexes import qdrant as Q
from reembed.errors import ManifestError
from reembed.manifest import Manifest
from reembed.storage import Location

pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version")


@pytest.fixture
def out(tmp_path) -> str:
    return write_output(tmp_path / "out", clustered(300, 8, seed=2), shard_rows=100)


@pytest.fixture(autouse=True)
def no_qdrant_env(monkeypatch):
    for name in (Q.API_KEY_ENV, "QDRANT_URL", Q.ALLOW_HTTP_ENV):
        monkeypatch.delenv(name, raising=False)


def _edit(out: str, change) -> None:
    m = Manifest.load(Location.from_uri(out))
    change(m.data)
    m.save()


def _edit_records(out: str, change) -> None:
    """Rewrite the committed shard records in the output's commit log as a hostile hand would:
    ``change({"00001": record, ...})`` edits them in place."""
    entries = {}
    for path in sorted((Path(out) / "_log").glob("*.json")):
        entry = json.loads(path.read_text())
        if entry.get("kind") == "commit":
            entries[path] = entry
    assert entries, "no commit entries to edit"
    records = {f"{e['shard']:05d}": e["record"] for e in entries.values()}
    change(records)
    for path, entry in entries.items():
        path.write_text(json.dumps(entry))


def _one_line(capsys, code: int, got: int, *words: str) -> str:
    """The exit code, and exactly one ``reembed:`` line on stderr (log records aside), with no traceback."""
    err = capsys.readouterr().err
    assert got == code, err
    lines = [line for line in err.splitlines() if line.startswith("reembed:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# index


def test_index_of_an_output_with_no_embedded_rows_is_one_line(out, capsys):
    def all_dead(records):
        for rec in records.values():
            rec.update(rows=0, dead_letters=100, reasons={"empty_text": 100})
    _edit_records(out, all_dead)
    _one_line(capsys, 1, cli.main(["index", out, "--qdrant", "none", "--no-ray"]),
              "nothing to index", "0 embedded rows", "300 dead-lettered", "empty_text=300")


def test_index_mistakes_are_one_line(out, tmp_path, capsys):
    _one_line(capsys, 1, cli.main(["index", str(tmp_path / "missing"), "--no-ray"]), "manifest.json")
    _one_line(capsys, 2, cli.main(["index", out, "--faiss", "none", "--qdrant", "none", "--no-ray"]), "nothing to build")
    _one_line(capsys, 2, cli.main(["index", out, "--batch-size", "0", "--no-ray"]), "index.batch_size")
    _one_line(capsys, 1, cli.main(["index", out, "--faiss", "none", "--qdrant", f"http://127.0.0.1:{closed_port()}",
                                   "--no-ray"]), "connection refused", "127.0.0.1")


@pytest.mark.parametrize("path", ["../../../../../../etc/passwd", "/etc/passwd", "shards/../../outside.parquet"])
def test_index_refuses_a_shard_path_outside_the_output(out, tmp_path, capsys, path):
    (tmp_path / "outside.parquet").write_bytes(b"not yours")
    _edit_records(out, lambda records: records["00001"].update(path=path))
    err = _one_line(capsys, 1, cli.main(["index", out, "--qdrant", "none", "--no-ray"]))
    assert ("outside the output" in err or "not a path inside the output" in err) and "sha256" not in err


@pytest.mark.parametrize("path", ["../../../../../../etc/passwd", "/etc/passwd"])
def test_validate_refuses_a_shard_path_outside_the_output(out, path):
    _edit_records(out, lambda records: records["00000"].update(path=path))
    with pytest.raises(ManifestError, match="outside the output|not a path inside the output") as e:
        V.validate(out, settings=V.Settings(sample=10, builtin_pairs=False), write=False)
    assert "sha256" not in str(e.value)


def test_a_shard_whose_bytes_changed_is_refused(out, capsys):
    shard = Path(out) / Manifest.load(Location.from_uri(out)).committed[0]["path"]
    shard.write_bytes(shard.read_bytes() + b"\0")
    _one_line(capsys, 1, cli.main(["index", out, "--qdrant", "none", "--no-ray"]), "sha256")


@pytest.mark.parametrize("field,path", [("path", "../elsewhere.faiss"), ("path", "/etc/passwd"),
                                        ("ids_path", "../../ids.parquet")])
def test_faiss_files_named_outside_the_output_are_refused(out, capsys, field, path):
    stage.build_indexes(out, IndexConfig(qdrant="none", faiss="flat"), use_ray=False)
    _edit(out, lambda d: d["stages"]["index"]["faiss"].update({field: path}))
    err = _one_line(capsys, 1, cli.main(["search", out, "anything"]))
    assert "not a path inside the output" in err or "outside the output" in err
    with pytest.raises(Exception, match="outside the output|not a path inside the output"):
        V.validate(out, settings=V.Settings(sample=10, builtin_pairs=False), write=False)


def test_a_replaced_id_map_is_refused_by_its_sha256(out, capsys):
    rec = stage.build_indexes(out, IndexConfig(qdrant="none", faiss="flat"), use_ray=False)["faiss"]
    ids = Path(out) / rec["ids_path"]
    ids.write_bytes(ids.read_bytes()[::-1])
    _one_line(capsys, 1, cli.main(["search", out, "anything"]), "sha256", rec["ids_path"])
    assert hashlib.sha256(ids.read_bytes()).hexdigest() != rec["ids_sha256"]


# ---------------------------------------------------------------------------------------------------
# versions / swap / rollback


def test_a_qdrant_target_from_the_manifest_never_gets_the_api_key(out, capsys, monkeypatch):
    monkeypatch.setenv(Q.API_KEY_ENV, "sekret-key-123")
    with recording_server("127.0.0.2") as (url, seen):
        _edit(out, lambda d: d.setdefault("stages", {}).setdefault("index", {}).update(
            qdrant={"status": "done", "target": url, "name": "documents", "collection": "documents-v1"}))
        assert cli.main(["versions", "--output", out, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["qdrant"]["target"] == url
        assert cli.main(["rollback", "--output", out, "--alias", "documents"]) == 3  # refused
        assert "does not exist" in capsys.readouterr().err
        assert seen and not any("api-key" in h for _, h in seen)
        # The same server named by the user (QDRANT_URL, or --qdrant) gets it.
        seen.clear()
        monkeypatch.setenv("QDRANT_URL", url)
        assert cli.main(["versions", "--output", out]) == 0
        assert _keys(seen) == {"sekret-key-123"}
        seen.clear()
        monkeypatch.delenv("QDRANT_URL")
        assert cli.main(["versions", "--qdrant", url]) == 0
        assert _keys(seen) == {"sekret-key-123"}
    capsys.readouterr()


def _keys(seen) -> set:
    """The api-key values the server saw on API calls (the client's version probe never carries one)."""
    return {h.get("api-key") for path, h in seen if path != "/"}


def test_a_key_over_plain_http_to_another_host_is_refused_in_one_line(out, capsys, monkeypatch):
    monkeypatch.setenv(Q.API_KEY_ENV, "sekret-key-123")
    _one_line(capsys, 1, cli.main(["versions", "--qdrant", "http://10.11.12.13:6333"]), Q.ALLOW_HTTP_ENV, "https://")


@pytest.mark.parametrize("argv,code,words", [
    (["versions"], 2, ["--qdrant URL_OR_PATH is required"]),
    (["swap", "--alias", "a", "--to", "b"], 2, ["--qdrant URL_OR_PATH is required"]),
    (["rollback", "--alias", "a"], 2, ["--qdrant URL_OR_PATH is required"]),
    (["versions", "--qdrant", "http://127.0.0.1:{port}"], 1, ["connection refused"]),
    (["swap", "--qdrant", "http://127.0.0.1:{port}", "--alias", "a", "--to", "b"], 1, ["connection refused"]),
    (["rollback", "--qdrant", "http://127.0.0.1:{port}", "--alias", "a"], 1, ["connection refused"]),
    (["versions", "--output", "{missing}"], 1, ["no manifest.json"]),
])
def test_target_mistakes_are_one_line(tmp_path, capsys, argv, code, words):
    port = closed_port()
    argv = [a.format(port=port, missing=tmp_path / "missing") for a in argv]
    _one_line(capsys, code, cli.main(argv), *words)


def test_swap_and_rollback_refusals_on_embedded_qdrant_are_one_line(out, tmp_path, capsys):
    target = str(tmp_path / "q")
    stage.build_indexes(out, IndexConfig(qdrant=target, faiss="none"), use_ray=False)
    _one_line(capsys, 3, cli.main(["swap", "--qdrant", target, "--alias", "docs", "--to", "nope", "--output", out,
                                   "--force"]), "no collection 'nope'")
    _one_line(capsys, 3, cli.main(["swap", "--qdrant", target, "--alias", "docs", "--to", "documents-v1"]),
              "validation gate")
    _one_line(capsys, 3, cli.main(["rollback", "--qdrant", target, "--alias", "docs"]), "does not exist")


def test_a_remote_output_recorded_in_the_store_is_not_followed(out, tmp_path, capsys):
    target = str(tmp_path / "q")
    stage.build_indexes(out, IndexConfig(qdrant=target, faiss="none"), use_ray=False)
    client = Q.connect(target)
    try:
        meta = Q.metadata(client, "documents-v1")[Q.META]
        Q.set_metadata(client, "documents-v1", {Q.META: {**meta, "output": "s3://someone-elses-bucket/emb"}})
    finally:
        client.close()
    _one_line(capsys, 3, cli.main(["swap", "--qdrant", target, "--alias", "docs", "--to", "documents-v1"]),
              "not followed", "--output")


def test_verbose_shows_the_traceback_after_the_line(tmp_path, capsys):
    assert cli.main(["-v", "search", str(tmp_path / "missing"), "cat"]) == 1
    err = capsys.readouterr().err
    assert err.index("reembed: error:") < err.index("Traceback")
