"""`reembed migrate` end to end, as a user runs it: the README's commands on a LangChain app, a LlamaIndex
app whose labels first name the wrong ids (the gate stops it, the rerun continues), and a migration killed
at every stage that ends as an uninterrupted one. Each run is a real `reembed` process (its own Ray), so
these are slow; the fast checks of the same parts are in test_migrate_apps.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app_fixtures import (COLLECTION, build_langchain_app, build_llamaindex_app, langchain_answers,
                          llamaindex_answers)
from migrate_fixtures import QUERIES, proj  # noqa: F401 (fixture)
from reembed.config import ConfigError
from reembed.migrate.flow import MigrateSettings, load_migrate_config, migrate

README = Path(__file__).parent.parent / "README.md"
SECTION = "## Migrating a LangChain or LlamaIndex app"


def _reembed_bin(tmp_path: Path) -> Path:
    """A `reembed` executable on PATH that runs this checkout's package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "reembed"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m reembed \"$@\"\n")
    exe.chmod(0o755)
    return bin_dir


RAY_START_FAILED = "Ray's local node did not start"


def _run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run in its own session; whatever it leaves behind (a killed driver's local Ray) is killed after it.
    On a machine so loaded that Ray's local node misses its start-up limit, the run is tried again (up to
    three times): that is the machine, not the migration (which resumes from its record anyway)."""
    for _ in range(3):
        done = _run_once(cmd, env, cwd)
        if RAY_START_FAILED not in (done.stderr or ""):
            return done
    return done


def _run_once(cmd: list[str], env: dict[str, str] | None, cwd: Path | None) -> subprocess.CompletedProcess:
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=1500)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _versions(app: Path) -> list[tuple]:
    from reembed.indexes import qdrant as Q

    client = Q.connect(str(app))
    try:
        return [(v["collection"], Path(v["model"] or "-").name, v["dimension"], v["points"], v["state"],
                 tuple(v["aliases"])) for v in Q.versions(client)]
    finally:
        client.close()


def _blocks(text: str) -> list[str]:
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_migration_of_a_langchain_app(tmp_path, minilm, proj):
    app = tmp_path / "app"
    ids = build_langchain_app(app, minilm)
    before = langchain_answers(app, minilm, ids)
    (tmp_path / "labelled.jsonl").write_bytes(QUERIES.read_bytes())  # labels name the app's doc ids
    env = {**os.environ, "PATH": f"{_reembed_bin(tmp_path)}:{os.environ['PATH']}", "APP_QDRANT": str(app),
           "NEW_MODEL": str(proj), "OLD_MODEL": str(minilm), "WORK": str(tmp_path / "work")}
    migrate_block, rollback_block = _blocks(README.read_text())

    done = _run(["bash", "-euo", "pipefail", "-c", migrate_block], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the app must now embed its queries with " + str(proj) in done.stdout
    assert re.search(r"adopt +done .*did not exist for [0-9.]+ ms", done.stdout)
    assert _versions(app) == [("documents-v0", "model", 384, 60, "ready", ()),
                              ("documents-v1", proj.name, 1024, 60, "ready", ("documents",))]
    after = langchain_answers(app, proj, ids)
    assert after["top"][0] == before["top"][0] and after["filtered"] == ["astro"] * 5 and after["by_id"] == before["by_id"]
    report = json.loads((tmp_path / "work" / "output" / "validation" / "report.json").read_text())
    assert report["gates"]["ab"]["status"] == "pass" and "unknown_relevant" not in report["gates"]["ab"]

    back = _run(["bash", "-euo", "pipefail", "-c", rollback_block], env=env, cwd=tmp_path)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "the app must now embed its queries with " + str(minilm) in back.stdout
    assert langchain_answers(app, minilm, ids) == before


@pytest.mark.slow
def test_a_llamaindex_app_whose_labels_name_its_own_ids(tmp_path, minilm, proj):
    """Labels naming the app's source_id: without --label-id-field the gate cannot measure and stops the
    migration before the app's collection is touched; the rerun with it continues from validate."""
    app = tmp_path / "app"
    ids = build_llamaindex_app(app, minilm)
    before = llamaindex_answers(app, minilm, ids)
    cmd = [sys.executable, "-m", "reembed", "migrate", "--from", f"qdrant://{app}?collection={COLLECTION}",
           "--model", str(proj), "--old-model", str(minilm), "--workdir", str(tmp_path / "work"),
           "--queries", str(QUERIES)]
    failed = _run(cmd)
    assert failed.returncode == 1 and "cannot measure" in failed.stderr and "--label-id-field" in failed.stderr
    assert len(failed.stderr.strip().splitlines()[-1]) < 2000 and "Traceback" not in failed.stderr
    assert [v[0] for v in _versions(app)] == ["documents", "documents-v1"]  # untouched; the new one built
    assert llamaindex_answers(app, minilm, ids) == before

    done = _run(cmd + ["--label-id-field", "source_id"])
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "work" / "migrate.json").read_text())
    assert [state["stages"][s]["status"] for s in ("export", "run", "index", "validate", "adopt", "swap")] == ["done"] * 6
    after = llamaindex_answers(app, proj, ids)
    assert after["top"][0][1] == "cook-0" and after["filtered"] == ["astro"] * 5 and after["by_id"] == before["by_id"]


KILL_POINTS = ["export", "run", "index", "validate", "adopt-copied", "adopt-window", "adopt", "swap"]


@pytest.mark.slow
def test_migrate_killed_at_every_stage_ends_as_an_uninterrupted_run(tmp_path, minilm, proj):
    """One migration, SIGKILLed once at each stage (after its work, before its record; and inside adopt's
    window), each time rerun with the same command: it ends in the state an uninterrupted run ends in."""
    app = tmp_path / "app"
    ids = build_langchain_app(app, minilm)
    before = langchain_answers(app, minilm, ids)
    cmd = [sys.executable, "-m", "reembed", "migrate", "--from", f"qdrant://{app}?collection={COLLECTION}",
           "--model", str(proj), "--old-model", str(minilm), "--workdir", str(tmp_path / "work"),
           "--queries", str(QUERIES), "--label-id-field", "metadata.doc_id", "--no-ray"]
    for point in KILL_POINTS:
        killed = _run(cmd, env={**os.environ, "REEMBED_MIGRATE_KILL_AT": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
    done = _run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]

    assert _versions(app) == [("documents-v0", "model", 384, 60, "ready", ()),
                              ("documents-v1", proj.name, 1024, 60, "ready", ("documents",))]
    state = json.loads((tmp_path / "work" / "migrate.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in ("export", "run", "index", "validate", "adopt", "swap"))
    from reembed.manifest import Manifest
    from reembed.storage import Location

    manifest = Manifest.load(Location.from_uri(str(tmp_path / "work" / "output")))
    assert sum(r["rows"] for r in manifest.committed.values()) == 60 and manifest.is_complete()
    after = langchain_answers(app, proj, ids)
    assert after["top"][0] == before["top"][0] and after["filtered"] == ["astro"] * 5 and after["by_id"] == before["by_id"]


# ---------------------------------------------------------------------------------------------------
# Fast: settings


def test_migrate_config_refuses_unknown_keys_and_wrong_types(tmp_path):
    cfg = tmp_path / "migrate.yaml"
    cfg.write_text("migrate:\n  from: qdrant:///x?collection=d\n  model: m\n  swapp: true\n")
    with pytest.raises(ConfigError, match="unknown key migrate.swapp"):
        load_migrate_config(str(cfg))
    cfg.write_text("migrate:\n  sample: many\n")
    with pytest.raises(ConfigError, match="migrate.sample must be int"):
        load_migrate_config(str(cfg))
    cfg.write_text("migrate:\n  from: qdrant:///x?collection=d\n  model: m\n  workdir: /w\n  swap: false\n"
                   "plan:\n  shard_rows: 7\n")
    settings, job = load_migrate_config(str(cfg), ["compute.max_actors=1"])
    assert settings.source == "qdrant:///x?collection=d" and settings.swap is False
    assert job.plan.shard_rows == 7 and job.compute.max_actors == 1


def test_migrate_refuses_before_doing_anything(tmp_path):
    with pytest.raises(ConfigError, match="--model is required"):
        migrate(MigrateSettings(source="qdrant:///x?collection=d", workdir=str(tmp_path)))
    with pytest.raises(ConfigError, match="takes the app's Qdrant collection"):
        migrate(MigrateSettings(source=f"chroma://{tmp_path}?collection=d", model="m", workdir=str(tmp_path)))
    (tmp_path / "migrate.json").write_text(json.dumps({"format": 1, "from": "qdrant:///other?collection=d",
                                                       "model": "m", "stages": {}}))
    from reembed.errors import MigrationError

    with pytest.raises(MigrationError, match="holds the migration of qdrant:///other"):
        migrate(MigrateSettings(source=f"qdrant://{tmp_path}?collection=d", model="m", workdir=str(tmp_path)))
