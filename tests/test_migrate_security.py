"""Untrusted files: a docstore named by a URI and the part paths listed in an export's ``_export.json`` must
stay inside their folder, and an address read from a file is never contacted (so no key can follow it)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reembed import migrate as M

N, DIM = 12, 8


def faiss_source(folder: Path) -> str:
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    vectors = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    faiss.write_index(index, str(folder / "index.faiss"))
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(N)], "text": [f"text {i}" for i in range(N)]}),
                   folder / "docs.parquet")
    return f"faiss://{folder}/index.faiss?docstore=docs.parquet"


def test_docstore_must_lie_beside_the_index(tmp_path):
    faiss_source(tmp_path / "idx")
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(N)]}), tmp_path / "other" / "docs.parquet")
    index = f"faiss://{tmp_path}/idx/index.faiss"
    for docstore in ("../other/docs.parquet", f"{tmp_path}/other/docs.parquet", "/etc/passwd"):
        with pytest.raises(M.ExportError, match="outside the index's folder"):
            M.open_store(f"{index}?docstore={docstore}")
    os.symlink(tmp_path / "other" / "docs.parquet", tmp_path / "idx" / "link.parquet")  # a link leading out
    with pytest.raises(M.ExportError, match="outside the index's folder"):
        M.open_store(f"{index}?docstore=link.parquet")
    assert M.open_store(f"{index}?docstore={tmp_path}/idx/docs.parquet").dim == DIM  # absolute, inside: fine


def exported(tmp_path: Path) -> Path:
    out = tmp_path / "export"
    M.export(faiss_source(tmp_path / "idx"), str(out), part_rows=5)
    return out


def edit_summary(out: Path, change) -> None:
    meta = json.loads((out / "_export.json").read_text())
    change(meta)
    (out / "_export.json").write_text(json.dumps(meta))


def test_an_export_folder_is_read_through_its_summary(tmp_path):
    out = exported(tmp_path)
    store = M.open_store(str(out), name="old")
    assert store.kind == "exact" and sorted(store.ids) == sorted(f"d{i}" for i in range(N))
    # A part the summary does not list is not read; a listed part whose bytes changed is refused.
    pq.write_table(pq.read_table(out / "part-00000.parquet"), out / "part-00099.parquet")
    assert len(M.open_store(str(out)).ids) == N
    table = pq.read_table(out / "part-00001.parquet")
    pq.write_table(table.slice(0, 2), out / "part-00001.parquet")
    with pytest.raises(M.ExportError, match=r"part-00001.parquet: sha256 does not match _export.json"):
        M.open_store(str(out))


@pytest.mark.parametrize("hostile", ["../outside/part-00000.parquet", "/tmp/part-00000.parquet", "a/../../x.parquet",
                                     "s3://bucket/part.parquet", "", None])
def test_a_part_path_leading_out_of_the_export_is_refused(tmp_path, hostile):
    out = exported(tmp_path)
    (tmp_path / "outside").mkdir()
    data = (out / "part-00000.parquet").read_bytes()
    (tmp_path / "outside" / "part-00000.parquet").write_bytes(data)

    def point_out(meta):
        meta["parts"][0]["path"] = hostile
        meta["parts"][0]["sha256"] = hashlib.sha256(data).hexdigest()

    edit_summary(out, point_out)
    with pytest.raises(M.ExportError, match="points outside .*refusing to read it"):
        M.open_store(str(out))


def test_a_linked_part_leading_out_is_refused(tmp_path):
    out = exported(tmp_path)
    (tmp_path / "outside").mkdir()
    (out / "part-00000.parquet").rename(tmp_path / "outside" / "p.parquet")
    os.symlink(tmp_path / "outside" / "p.parquet", out / "part-00000.parquet")
    with pytest.raises(M.ExportError, match="(points|leads) outside"):
        M.open_store(str(out))


def test_the_source_recorded_in_an_export_is_never_contacted(tmp_path, monkeypatch):
    """``_export.json`` names the store it came from; opening the export must not connect there (a key
    from the environment would follow the connection)."""
    monkeypatch.setenv("QDRANT_API_KEY", "secret-key")
    out = exported(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        edit_summary(out, lambda m: m.update(source=f"qdrant://127.0.0.1:{port}?collection=docs", kind="qdrant"))
        store = M.open_store(str(out), name="old")
        store.search(store.vectors[:1], 3)
        with pytest.raises(socket.timeout):
            listener.accept()
