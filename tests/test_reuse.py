"""Incremental re-embedding (reembed.reuse): `reembed run --reuse OUT1` embeds only new and changed rows,
carries the others' vectors forward bit for bit, lists the gone ids, and copies identical texts of a block."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_jsonl, write_parquet
from reembed import pipeline, reuse
from reembed import schema as S
from reembed.config import load_config
from reembed.errors import OutputRefused
from reembed.manifest import Manifest
from reembed.storage import Location

pytestmark = pytest.mark.ray


def cfg_for(inp, out, model, *extra):
    return load_config(None, [f"input.uri={inp}", f"output.uri={out}", f"model.name={model}", "plan.shard_rows=50",
                              "model.backend=torch", *extra])


def vectors(out) -> dict[str, bytes]:
    """id -> the raw float32 bytes of its vector, over the committed shards."""
    m = Manifest.load(Location.from_uri(str(out)))
    found = {}
    for rec in m.committed.values():
        t = pq.read_table(out / rec["path"], columns=[S.ID, S.EMBEDDING])
        for i, v in zip(t.column(S.ID).to_pylist(), S.embedding_matrix(t.column(S.EMBEDDING))):
            found[i] = v.tobytes()
    return found


def corpus(n: int = 200) -> list[dict]:
    docs = make_docs(n)
    for d in docs:  # make_docs repeats a text every 80 documents; these tests want distinct texts
        d["text"] = f"{d['text']} {d['id']}"
    return docs


def changed_corpus(docs: list[dict]) -> tuple[list[dict], set[str], set[str], set[str]]:
    """10% of the texts changed, 5% of the documents deleted, 5% added: (docs, changed, deleted, added ids)."""
    n = len(docs)
    rng = np.random.default_rng(7)
    picks = rng.permutation(n)
    changed = {docs[i]["id"] for i in picks[: n // 10]}
    deleted = {docs[i]["id"] for i in picks[n // 10: n // 10 + n // 20]}
    new = []
    for d in docs:
        if d["id"] in deleted:
            continue
        new.append({**d, "text": d["text"] + " and then it changed"} if d["id"] in changed else dict(d))
    added = [{**d, "text": f"{d['text']} {d['id']}"} for d in make_docs(n // 20, prefix="new", start=1000)]
    return new + added, changed, deleted, {d["id"] for d in added}


def test_reuse_embeds_only_changed_and_added_rows(tmp_path, tiny_model, ray_local):
    docs = corpus()
    write_parquet(tmp_path / "v1" / "docs.parquet", docs)
    out1, out2, full = tmp_path / "out1", tmp_path / "out2", tmp_path / "full"
    first = pipeline.run(cfg_for(tmp_path / "v1", out1, tiny_model))
    assert first["complete"] and first["rows_embedded"] == len(docs) and first["rows_reused"] == 0

    new, changed, deleted, added = changed_corpus(docs)
    write_parquet(tmp_path / "v2" / "a.parquet", new[:120])
    write_jsonl(tmp_path / "v2" / "b.jsonl", new[120:])
    s = pipeline.run(cfg_for(tmp_path / "v2", out2, tiny_model, f"plan.reuse={out1}"))
    assert s["complete"] and s["embedded"] == len(new)
    assert s["rows_embedded"] == len(changed) + len(added) == 30  # exactly the changed and added rows
    assert s["rows_reused"] == len(docs) - len(changed) - len(deleted) == 170
    assert s["rows_deduplicated"] == 0
    assert s["gone"] == len(deleted) and s["run"]["rows_embedded"] == 30

    old, got = vectors(out1), vectors(out2)
    kept = {d["id"] for d in docs} - changed - deleted
    assert all(got[i] == old[i] for i in kept)  # carried forward bit for bit
    assert all(got[i] != old[i] for i in changed)

    ref = pipeline.run(cfg_for(tmp_path / "v2", full, tiny_model))
    assert ref["rows_embedded"] == len(new)
    want = vectors(full)
    assert set(want) == set(got)
    a = np.stack([np.frombuffer(got[i], np.float32) for i in sorted(want)])
    b = np.stack([np.frombuffer(want[i], np.float32) for i in sorted(want)])
    np.testing.assert_allclose(a, b, atol=1e-5)

    m = Manifest.load(Location.from_uri(str(out2)))
    gone = set(pa.concat_arrays(list(reuse.gone_ids(m.loc, m.plan))).to_pylist())
    assert gone == deleted

    again = pipeline.run(cfg_for(tmp_path / "v2", out2, tiny_model, f"plan.reuse={out1}"))  # resume: nothing to do
    assert again["rows_reused"] == 170 and again["rows_embedded"] == 30 and again["complete"]
