"""Every user mistake in ``reembed export`` / ``reembed query`` is one line on stderr and exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reembed.cli import main


@pytest.fixture()
def stores(tmp_path):
    import chromadb
    import faiss
    import numpy as np
    from qdrant_client import QdrantClient

    chromadb.PersistentClient(path=str(tmp_path / "chroma")).get_or_create_collection("docs", embedding_function=None)
    QdrantClient(path=str(tmp_path / "qdrant")).close()  # an embedded store with no collection
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    return tmp_path


def one_line_error(capsys, argv: list[str], expect: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("reembed: error: ") and expect in err, err
    return err


@pytest.mark.parametrize("source, expect", [
    ("milvus://host:19530/docs", "unknown store scheme 'milvus'"),
    ("chroma://{tmp}/chroma?collection=nope", "no Chroma collection 'nope' (collections: docs)"),
    ("qdrant://{tmp}/qdrant?collection=docs", "no Qdrant collection 'docs' (collections: none)"),
    ("faiss://{tmp}/index.faiss?docstore=missing.parquet", "no docstore file at"),
    ("faiss://{tmp}/absent.faiss?docstore=index.faiss", "no FAISS index file at"),
    ("faiss://{tmp}/index.faiss?docstore=../../etc/passwd", "outside the index's folder"),
    ("qdrant://db:6333?collection=docs&api_key=abc", "secrets never go in a URI"),
    ("chroma://{tmp}/chroma", "name the collection"),
])
def test_export_mistakes(stores, capsys, source, expect):
    one_line_error(capsys, ["export", "--from", source.format(tmp=stores), "--to", str(stores / "out")], expect)


def test_query_mistakes(stores, capsys):
    new = ["--new", str(stores / "nothing-here")]
    one_line_error(capsys, ["query", "x", "--old", "milvus://h/docs", *new], "unknown store scheme 'milvus'")
    one_line_error(capsys, ["query", "x", "--old", f"chroma://{stores}/chroma?collection=gone", *new],
                   "no Chroma collection 'gone'")
    one_line_error(capsys, ["query", "x", "--old", f"chroma://{stores}/chroma?collection=docs", *new],
                   "not a store URI, a reembed output or an export folder")
    one_line_error(capsys, ["query", "x", "--old", f"chroma://{stores}/chroma?collection=docs", "--new",
                            f"chroma://{stores}/chroma?collection=docs", "--weights", "1"], "--weights '1'")


def test_the_real_command_prints_one_line(stores):
    """Through the installed entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "reembed", "export", "--from", f"qdrant://{stores}/qdrant?collection=x",
                           "--to", str(stores / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"reembed: error: qdrant://{stores}/qdrant?collection=x: no Qdrant "
                                                "collection 'x' (collections: none)"]


@pytest.mark.parametrize("argv", [["query", "x", "--old", "a", "--new", "b", "-k", "0"],
                                  ["query", "x", "--old", "a", "--new", "b", "--depth", "-3"],
                                  ["export", "--from", "chroma:///x?collection=d", "--to", "o", "--page-size", "0"]])
def test_counts_below_one_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err
