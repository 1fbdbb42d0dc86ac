"""A resume notices changed input (issue 12): a planned file modified (even at the same size) or removed
is refused naming it; files added since the plan are reported, and not embedded by the resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from cluster_fixtures import committed_records

from conftest import make_docs, write_jsonl
from reembed import plan_store
from reembed.config import InputConfig
from reembed.errors import InputError
from reembed.plan import PLAN_DIR, check_input, make_plan
from reembed.storage import Location


def planned(inp: Path, out: Path) -> tuple[dict, object]:
    plan = make_plan(InputConfig(uri=str(inp)), 4, Location.from_uri(str(out)).child(PLAN_DIR))
    return plan, plan_store.read_files(Location.from_uri(str(out)).child(PLAN_DIR))


def reorder_lines(path: Path) -> None:
    """Rewrite ``path`` with its lines reversed: the same bytes, the same size, other rows."""
    st = path.stat()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(reversed(lines)))
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as a rewrite a second later would


def test_a_file_modified_at_the_same_size_is_refused_naming_it(tmp_path):
    inp = tmp_path / "in"
    write_jsonl(inp / "a.jsonl", make_docs(5))
    write_jsonl(inp / "b.jsonl", make_docs(5, prefix="b"))
    plan, files = planned(inp, tmp_path / "out")
    check_input(plan, files, Location.from_uri(str(inp)))  # unchanged: fine
    reorder_lines(inp / "b.jsonl")
    with pytest.raises(InputError) as e:
        check_input(plan, files, Location.from_uri(str(inp)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{inp / 'b.jsonl'}: modified since the plan was made") and "--fresh" in msg


def test_a_file_grown_or_removed_is_refused_naming_it(tmp_path):
    inp = tmp_path / "in"
    write_jsonl(inp / "a.jsonl", make_docs(5))
    write_jsonl(inp / "b.jsonl", make_docs(5, prefix="b"))
    plan, files = planned(inp, tmp_path / "out")
    with open(inp / "a.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "text": "more"}) + "\n")
    with pytest.raises(InputError, match=r"a\.jsonl: modified since the plan was made \(size \d+ -> \d+\)"):
        check_input(plan, files, Location.from_uri(str(inp)))
    os.remove(inp / "a.jsonl")
    with pytest.raises(InputError, match=r"a\.jsonl: removed from the input since the plan was made"):
        check_input(plan, files, Location.from_uri(str(inp)))


def test_added_files_are_a_warning_with_their_count_and_names(tmp_path, caplog):
    inp = tmp_path / "in"
    write_jsonl(inp / "b.jsonl", make_docs(5))
    plan, files = planned(inp, tmp_path / "out")
    for name in ("a.jsonl", "c.jsonl", "d/e.jsonl", "f.jsonl"):
        write_jsonl(inp / name, make_docs(2, prefix=name[0]))
    with caplog.at_level(logging.WARNING, logger="reembed.plan"):
        check_input(plan, files, Location.from_uri(str(inp)))
    (line,) = [r.getMessage() for r in caplog.records if "added" in r.getMessage()]
    assert "4 file(s) were added since the plan was made and are NOT embedded by this resume" in line
    assert str(inp / "a.jsonl") in line and str(inp / "c.jsonl") in line and "..." in line


def test_a_skipped_bad_file_is_not_reported_as_added(tmp_path, caplog):
    inp = tmp_path / "in"
    write_jsonl(inp / "a.jsonl", make_docs(3))
    (inp / "b.parquet").write_bytes(b"PAR1 not parquet")
    plan = make_plan(InputConfig(uri=str(inp)), 4, Location.from_uri(str(tmp_path / "out")).child(PLAN_DIR),
                     on_bad_file="skip")
    files = plan_store.read_files(Location.from_uri(str(tmp_path / "out")).child(PLAN_DIR))
    with caplog.at_level(logging.WARNING, logger="reembed.plan"):
        check_input(plan, files, Location.from_uri(str(inp)))
    assert "added" not in caplog.text and plan["bad_file_count"] == 1


@pytest.mark.ray
def test_a_resume_after_the_input_changed_is_refused_and_fresh_replans(tmp_path, tiny_model, ray_local, caplog):
    from reembed import pipeline
    from reembed.config import load_config
    from reembed.manifest import Manifest

    inp, out = tmp_path / "in", tmp_path / "out"
    write_jsonl(inp / "a.jsonl", make_docs(6))
    write_jsonl(inp / "b.jsonl", make_docs(6, prefix="b"))
    args = [f"input.uri={inp}", f"output.uri={out}", f"model.name={tiny_model}", "plan.shard_rows=4",
            "compute.max_actors=1", "compute.cpus_per_actor=0.5", "plan.dedup_texts=true"]  # auto: too few to copy
    assert pipeline.run(load_config(None, args))["complete"]
    # a resume of a finished output with one more file: reported, nothing embedded
    write_jsonl(inp / "c.jsonl", make_docs(2, prefix="c"))
    with caplog.at_level(logging.WARNING, logger="reembed.plan"):
        again = pipeline.run(load_config(None, args))
    assert again["embedded"] == 12 and "1 file(s) were added since the plan was made" in caplog.text
    assert "c.jsonl" in caplog.text
    # a planned file rewritten with its lines reordered: refused, naming it, before anything runs
    before = committed_records(out)
    reorder_lines(inp / "a.jsonl")
    with pytest.raises(InputError, match=r"a\.jsonl: modified since the plan was made.*--fresh"):
        pipeline.run(load_config(None, args))
    # 3 shards and 2 copy shards: b.jsonl's texts repeat a.jsonl's (make_docs), written once embedded (reembed.texts)
    assert len(before) == 5 and committed_records(out) == before
    # --fresh re-plans: every file, the new one included
    summary = pipeline.run(load_config(None, [*args, "output.fresh=true"]))
    assert summary["complete"] and summary["embedded"] == 14
    assert Manifest.load(Location.from_uri(str(out))).plan["files"] == 3
