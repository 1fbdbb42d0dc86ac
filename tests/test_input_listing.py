"""Which files are input: hidden and underscore folders are not (as in Spark, Hive and pyarrow), and an
existing path is a path even when its name has glob characters."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from conftest import make_docs, write_jsonl, write_parquet
from input_fixtures import outcome, plan_and_read
from reembed import storage
from reembed.errors import StorageError


def names(root: Path, files) -> list[str]:
    return [os.path.relpath(f.path, root) for f in files]


def test_hidden_and_underscore_folders_are_not_input_and_the_log_says_so(tmp_path, caplog):
    inp = tmp_path / "in"
    docs = make_docs(6)
    write_jsonl(inp / "part-0.jsonl", docs[:3])
    write_parquet(inp / "sub" / "part-1.parquet", docs[3:])
    # A stale notebook checkpoint of part-0 (it sorts first), a half-written Spark attempt, a git folder.
    write_jsonl(inp / ".ipynb_checkpoints" / "part-0-checkpoint.jsonl", [{**d, "text": "stale"} for d in docs[:3]])
    write_parquet(inp / "_temporary" / "0" / "part-1.parquet", docs[3:])
    write_jsonl(inp / "sub" / ".git" / "objects.jsonl", docs[:1])
    (inp / "_SUCCESS").write_text("")
    (inp / ".hidden.jsonl").write_text("")

    with caplog.at_level(logging.INFO, logger="reembed.storage"):
        loc, files = storage.list_inputs(str(inp))
    assert names(inp, files) == ["part-0.jsonl", "sub/part-1.parquet"]
    lines = [r.getMessage() for r in caplog.records if "hidden or underscore" in r.getMessage()]
    assert len(lines) == 1 and "5 file(s)" in lines[0] and ".hidden.jsonl" in lines[0] and " ..." in lines[0]

    # End to end through plan and read: the real rows are embedded, none is a duplicate of the stale copy.
    plan, read = plan_and_read(inp, shard_rows=4)
    assert outcome(read) == [(d["id"], None) for d in docs] and plan["duplicate_rows"] == 0
    assert "stale" not in read.column("_text").to_pylist()


def test_the_input_root_itself_may_be_hidden_or_underscored(tmp_path):
    inp = tmp_path / "_staging" / ".data"
    write_jsonl(inp / "a.jsonl", make_docs(2))
    write_jsonl(inp / "_tmp" / "b.jsonl", make_docs(2))
    _, files = storage.list_inputs(str(inp))
    assert names(inp, files) == ["a.jsonl"]


def test_a_file_named_directly_or_by_a_pattern_that_asks_for_it_is_read(tmp_path):
    write_jsonl(tmp_path / "_part.jsonl", make_docs(2))
    write_jsonl(tmp_path / ".cache" / "_part.jsonl", make_docs(2))
    _, files = storage.list_inputs(str(tmp_path / "_part.jsonl"))
    assert names(tmp_path, files) == ["_part.jsonl"]
    _, files = storage.list_inputs(str(tmp_path / "_*.jsonl"))
    assert names(tmp_path, files) == ["_part.jsonl"]  # still not the one under .cache/


def test_only_hidden_files_is_an_error_that_says_so(tmp_path):
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "a.jsonl", make_docs(1))
    with pytest.raises(StorageError, match=r"no input files match '\*' outside hidden or underscore paths \(1 inside"):
        storage.list_inputs(str(tmp_path))


def test_an_existing_folder_with_glob_characters_is_a_folder(tmp_path):
    inp = tmp_path / "data[2024]"
    write_jsonl(inp / "a.jsonl", make_docs(3))
    write_jsonl(tmp_path / "data2" / "b.jsonl", make_docs(1, start=10))  # what the glob [2024] would match
    loc, files = storage.list_inputs(str(inp))
    assert loc.root == str(inp) and names(inp, files) == ["a.jsonl"]
    plan, read = plan_and_read(inp, shard_rows=10)
    assert [i for i, _ in outcome(read)] == ["d0", "d1", "d2"] and plan["input_root"] == str(inp)
    # An existing file with glob characters is that file too.
    write_jsonl(tmp_path / "x" / "file?.jsonl", make_docs(1))
    _, files = storage.list_inputs(str(tmp_path / "x" / "file?.jsonl"))
    assert names(tmp_path, files) == ["x/file?.jsonl"]


def test_a_glob_that_names_nothing_that_exists_is_still_a_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(1))
    write_parquet(tmp_path / "deep" / "b.parquet", make_docs(1))
    write_parquet(tmp_path / "_tmp" / "c.parquet", make_docs(1))
    loc, files = storage.list_inputs(str(tmp_path / "*.parquet"))
    assert loc.root == str(tmp_path) and names(tmp_path, files) == ["deep/b.parquet"]
    with pytest.raises(StorageError, match=r"no input files match '\*\.csv'"):
        storage.list_inputs(str(tmp_path / "*.csv"))
    with pytest.raises(StorageError, match="input not found"):
        storage.list_inputs(str(tmp_path / "missing" / "*.parquet"))
    with pytest.raises(StorageError, match="input not found"):
        storage.list_inputs(str(tmp_path / "missing"))


def test_a_location_is_listed_on_its_own_filesystem_glob_or_not(tmp_path):
    write_jsonl(tmp_path / "docs" / "a.jsonl", make_docs(1))
    write_jsonl(tmp_path / "docs" / "b.txt", make_docs(1))
    given = storage.Location.from_uri(str(tmp_path / "docs" / "*.jsonl"))
    loc, files = storage.list_inputs(given)
    assert loc.fs is given.fs and loc.root == str(tmp_path / "docs") and loc.uri == str(tmp_path / "docs")
    assert names(tmp_path, files) == ["docs/a.jsonl"]
    folder = storage.Location.from_uri(str(tmp_path / "docs"))
    loc, files = storage.list_inputs(folder, "*.txt")
    assert loc == folder and names(tmp_path, files) == ["docs/b.txt"]
