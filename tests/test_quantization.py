"""Storage quantization and its measured cost: float16 shards (``output.dtype``), FAISS SQ8 / PQ as explicit
index kinds, Qdrant int8 / binary quantization, and the storage options' table of ``reembed validate``, whose
every recall is checked against an independent computation here on the same queries. Also the drift adapter's
figures in the validation report and ``reembed cost``."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import embedded_rows, make_docs, write_parquet
from index_fixtures import clustered, write_output
from reembed import schema as S
from reembed import validation as V
from reembed.config import IndexConfig, load_config
from reembed.manifest import Manifest
from reembed.storage import Location
from reembed.validation import quantization as Qz

DIM = 32
ROWS = 3000
SAMPLE = 120


# ---------------------------------------------------------------------------------------------------
# Defaults stay lossless


def test_defaults_are_lossless(tmp_path, tiny_model):
    from reembed.indexes.faiss import plan_index

    cfg = load_config()
    assert cfg.output.dtype == "float32" and cfg.index.faiss == "auto" and cfg.index.qdrant_quantization == "none"
    for rows in (500, 5_000, 200_000, 5_000_000):  # auto never picks SQ8 / PQ codes of its own without need
        plan = plan_index(rows, 1024, "auto", "1T")
        assert "SQ" not in plan.factory and "PQ" not in plan.factory, plan
    out = write_output(tmp_path / "out", clustered(400, DIM), 100, model_name=str(tiny_model))
    report = V.validate(out, settings=V.Settings(sample=20, builtin_pairs=False), workers=0)
    assert "quantization" not in report and "adapter" not in report  # nothing quantized, nothing asked


# ---------------------------------------------------------------------------------------------------
# float16 shards


def test_the_writer_stores_float16_when_the_schema_says_so(tmp_path):
    from reembed.write import read_shard_table, write_shard

    loc = Location.from_uri(str(tmp_path))
    rows = embedded_rows(3, 9, dim=8)
    schema = S.shard_schema(8, pa.schema([pa.field("lang", pa.string())]), "float16")
    rec = write_shard(loc, 3, rows, schema)
    table = read_shard_table(loc, rec)
    assert table.schema.field(S.EMBEDDING).type == pa.list_(pa.float16(), 8)  # still a FixedSizeList
    want = S.embedding_matrix(rows.column(S.EMBEDDING)).astype(np.float16)
    got = S.embedding_matrix(table.column(S.EMBEDDING))
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32))  # round to nearest, upcast
    assert rec["bytes"] < write_shard(Location.from_uri(str(tmp_path / "f32")), 3, rows,
                                      S.shard_schema(8, pa.schema([pa.field("lang", pa.string())])))["bytes"]


def test_float16_output_is_read_by_faiss_search_repair_and_validate(tmp_path, tiny_model):
    from reembed import pipeline
    from reembed.errors import OutputRefused
    from reembed.indexes.build import run_faiss
    from reembed.indexes.search import Searcher
    from reembed.repair import config_from_manifest, repair

    x = clustered(600, DIM, seed=7)
    loc = Location.from_uri(write_output(tmp_path / "out", x, 200, model_name=str(tiny_model), dtype="float16"))
    m = Manifest.load(loc)
    assert repair(loc, check_only=True, workers=0)["damaged"] == []
    assert config_from_manifest(m).output.dtype == "float16"  # a repair re-embeds as float16 too
    assert run_faiss(loc, IndexConfig(faiss="flat", qdrant="none"))["ntotal"] == 600
    hits = Searcher(loc).search_vectors(x[:5], k=1)
    assert [h[0][0] for h in hits] == [f"d{i}" for i in range(5)]
    report = V.validate(loc, settings=V.Settings(sample=40, builtin_pairs=False), workers=0)
    assert report["gates"]["integrity"]["status"] == "pass", report["gates"]["integrity"]["message"]
    rows = {o["option"]: o for o in report["quantization"]["options"]}  # there without being asked
    assert rows["float32"]["bytes_per_vector"] == 2 * DIM and "stored float16" in rows["float32"]["label"]
    assert rows["float16"]["recall_at_10"] == 1.0 and rows["float16"]["label"] == "float16 shards (stored)"
    # A resume that asks for float32 is refused in one line (model and input settings otherwise the same).
    cfg = load_config(None, ["input.uri=synthetic", f"output.uri={loc.root}", "input.passthrough=[text, lang]",
                             "plan.shard_rows=200"])
    with pytest.raises(OutputRefused, match="hold float16 vectors and this job asks for output.dtype=float32"):
        pipeline.check_resume(m, cfg, m.model)


@pytest.fixture(scope="module")
def half_run(tiny_model, ray_local, tmp_path_factory):
    """A real job with ``output.dtype: float16``: 80 documents, CPU, the local Ray."""
    from reembed import pipeline

    root = tmp_path_factory.mktemp("half")
    docs = write_parquet(root / "docs" / "a.parquet", make_docs(80))
    out = root / "out"
    settings = [f"input.uri={docs.parent}", f"output.uri={out}", f"model.name={tiny_model}", "plan.shard_rows=30",
                "output.dtype=float16"]
    pipeline.run(load_config(None, settings))
    return {"out": str(out), "docs": make_docs(80), "settings": settings}


@pytest.mark.ray
@pytest.mark.slow
def test_float16_run_writes_half_shards_that_every_reader_takes(half_run, tiny_model):
    from reembed import pipeline
    from reembed.errors import OutputRefused
    from reembed.indexes.build import run_faiss
    from reembed.indexes.search import Searcher, text_embedder
    from reembed.repair import repair

    loc = Location.from_uri(half_run["out"])
    m = Manifest.load(loc)
    assert m.plan[S.VECTOR_DTYPE] == "float16" and m.is_complete()
    tables = [pa.parquet.read_table(loc.path(rec["path"])) for _, rec in sorted(m.committed.items())]
    assert all(t.schema.field(S.EMBEDDING).type == pa.list_(pa.float16(), DIM) for t in tables)
    got = np.vstack([S.embedding_matrix(t.column(S.EMBEDDING)) for t in tables])
    want = text_embedder(str(tiny_model), None, "cpu")([d["text"] for d in half_run["docs"]])
    assert np.abs(got - want).max() < 2e-3  # float16 of the same vectors

    # A resume asking for float32 is refused in one line, before anything runs.
    with pytest.raises(OutputRefused, match="float16 vectors.*output.dtype=float32.*one dtype"):
        pipeline.run(load_config(None, [s for s in half_run["settings"] if "dtype" not in s]))

    # Readers: repair's checks, FAISS, search, validate (integrity and the table, on of its own for float16).
    assert repair(loc, check_only=True, workers=0)["damaged"] == []
    from reembed.repair import config_from_manifest
    assert config_from_manifest(m).output.dtype == "float16"  # a repair re-embeds as float16 too
    rec = run_faiss(loc, IndexConfig(faiss="flat", qdrant="none"))
    assert rec["ntotal"] == 80
    hits = Searcher(loc).search_vectors(got[:3], k=1)
    assert [h[0][0] for h in hits] == [d["id"] for d in half_run["docs"][:3]]
    report = V.validate(loc, settings=V.Settings(sample=30, builtin_pairs=False), workers=0)
    assert report["gates"]["integrity"]["status"] == "pass", report["gates"]["integrity"]["message"]
    rows = {o["option"]: o for o in report["quantization"]["options"]}
    assert rows["float32"]["bytes_per_vector"] == 2 * DIM and "stored float16" in rows["float32"]["label"]
    assert rows["float16"]["recall_at_10"] == 1.0


# ---------------------------------------------------------------------------------------------------
# The storage options' table against an independent computation

SHARD_ROWS = 500
QDRANT_ROWS = ("qdrant_int8", "qdrant_int8_no_rescore", "qdrant_binary", "qdrant_binary_no_rescore")


@pytest.fixture(scope="module")
def table_output(tmp_path_factory, tiny_model):
    vectors = clustered(ROWS, DIM, clusters=30, spread=0.5, seed=4)
    out = write_output(tmp_path_factory.mktemp("table") / "out", vectors, SHARD_ROWS, model_name=str(tiny_model))
    edge_folders = set(Path(tempfile.gettempdir()).glob("reembed-qdrant-edge-*"))
    report = V.validate(out, settings=V.Settings(sample=SAMPLE, builtin_pairs=False, quantization=True), workers=0)
    # Each shard's Qdrant Edge shards are removed once searched: none is left behind.
    assert set(Path(tempfile.gettempdir()).glob("reembed-qdrant-edge-*")) <= edge_folders
    return vectors, report


def _reference(x: np.ndarray):
    """validate's sampled positions (seed 0), their exact top-10 without themselves, and a recall function."""
    positions = np.sort(np.random.default_rng(0).choice(ROWS, SAMPLE, replace=False))
    exact = x[positions] @ x.T
    ref = [r[:10] for r in _without_self(_topk(exact, 11), positions)]

    def recall(found: list[list[int]]) -> float:
        return float(np.mean([len(set(f[:10]) & set(r)) / 10 for f, r in zip(found, ref)]))

    return positions, exact, recall


def _topk(scores: np.ndarray, depth: int) -> np.ndarray:  # best first, ties by position
    return np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :depth]


def _without_self(order, positions) -> list[list[int]]:
    return [[int(i) for i in row if i != p] for row, p in zip(order, positions)]


@pytest.fixture(scope="module")
def numpy_recalls(table_output) -> dict[str, float]:
    return _numpy_recalls(table_output[0])


def _numpy_recalls(x: np.ndarray) -> dict[str, float]:
    """Every option's recall@10 computed here in numpy / faiss, the Qdrant rows by its scheme in numpy."""
    import faiss

    positions, exact, recall = _reference(x)
    q = x[positions]

    def rescored(scores: np.ndarray) -> list[list[int]]:
        cands = [c[:20] for c in _without_self(_topk(scores, 21), positions)]
        return [sorted(c, key=lambda i, r=r: -exact[r, i])[:10] for r, c in enumerate(cands)]

    x16 = x.astype(np.float16).astype(np.float32)
    out = {"float32": 1.0, "float16": recall(_without_self(_topk(q @ x16.T, 11), positions))}
    for option, index in (("faiss_sq8", faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit,
                                                                   faiss.METRIC_INNER_PRODUCT)),
                          ("faiss_pq", faiss.IndexPQ(DIM, 8, 6, faiss.METRIC_INNER_PRODUCT))):
        if option == "faiss_pq":
            index.do_polysemous_training = False
        index.train(x)  # the whole output is at most Qz.TRAIN vectors: trained on all of them
        index.add(x)
        _, found = index.search(q, 11)  # faiss's own search over its codes, not a decoded copy
        out[option] = recall(_without_self(found, positions))
    lo, hi = np.quantile(x.ravel(), [0.005, 0.995])
    x8 = lo + np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255) * (hi - lo) / 255
    signs = lambda m: np.where(m > 0, 1.0, -1.0)  # noqa: E731
    out["qdrant_int8"], out["qdrant_int8_no_rescore"] = recall(rescored(q @ x8.T)), recall(_without_self(_topk(q @ x8.T, 11), positions))
    b = signs(q) @ signs(x).T
    out["qdrant_binary"], out["qdrant_binary_no_rescore"] = recall(rescored(b)), recall(_without_self(_topk(b, 11), positions))
    return out


def _edge_recalls(x: np.ndarray) -> dict[str, float]:
    """The Qdrant rows' recall@10 from Qdrant Edge searched directly here. Without rescoring: one Edge shard of
    each quantization per 500-row shard of the output, 11 results a query by Qdrant's scores of the codes, merged
    by score. Rescored: Qdrant's own rescoring (``rescore=true, oversampling=2``, 10 results, the query's own
    document filtered out) in one Edge shard holding the whole output, i.e. one segment, the collection the
    table's rescored rows stand for."""
    import qdrant_edge as qe

    positions, _, recall = _reference(x)
    configs = {"int8": qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True),
               "binary": qe.BinaryQuantizationConfig(always_ram=True)}

    def search(kind: str, lo: int, hi: int, rescore: bool) -> list[list[tuple[float, int]]]:
        """11 results a query (its own document among them) or, rescored, 10 without it (a filter), so that
        Qdrant rescores 2 x 10 candidates as for a query that is not in the collection."""
        with tempfile.TemporaryDirectory() as folder:
            shard = qe.EdgeShard.create(folder, qe.EdgeConfig(
                vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine, quantization_config=configs[kind]),
                hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=1),
                optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1)))
            shard.update(qe.UpdateOperation.upsert_points([qe.Point(lo + i, v) for i, v in enumerate(x[lo:hi].tolist())]))
            shard.optimize()
            assert shard.info().indexed_vectors_count == hi - lo  # the quantized segment is built
            params = qe.SearchParams(quantization=qe.QuantizationSearchParams(
                ignore=False, rescore=rescore, oversampling=2.0 if rescore else None))
            found = shard.query_batch(qe.QueryBatchRequest([qe.QueryRequest(
                limit=10 if rescore else 11, query=qe.Query.Nearest(v), params=params,
                filter=qe.Filter(must_not=[qe.HasIdCondition({int(p)})]) if rescore else None)
                for v, p in zip(x[positions].tolist(), positions)]))
            shard.close()
        return [[(h.score, h.id) for h in hits] for hits in found]

    def top10(per_query: list[list[tuple[float, int]]]) -> list[list[int]]:
        return [[i for _, i in sorted(h, key=lambda t: -t[0]) if i != p][:10] for h, p in zip(per_query, positions)]

    out = {}
    for kind in configs:
        merged: list[list[tuple[float, int]]] = [[] for _ in positions]
        for lo in range(0, ROWS, SHARD_ROWS):
            for mine, got in zip(merged, search(kind, lo, lo + SHARD_ROWS, rescore=False)):
                mine += got
        out[f"qdrant_{kind}_no_rescore"] = recall(top10(merged))
        out[f"qdrant_{kind}"] = recall(top10(search(kind, 0, ROWS, rescore=True)))
    return out


def test_every_option_recall_matches_an_independent_computation(table_output, numpy_recalls):
    x, report = table_output
    q_table = report["quantization"]
    rows = {o["option"]: o for o in q_table["options"]}
    assert q_table["queries"] == SAMPLE and q_table["k"] == 10

    independent = {**numpy_recalls, **_edge_recalls(x)}  # the Qdrant rows: Qdrant Edge searched here
    assert set(rows) == set(independent)
    for option, value in independent.items():
        assert rows[option]["recall_at_10"] == pytest.approx(value, abs=0.01), (option, rows[option], value)
    for option in QDRANT_ROWS:
        assert rows[option]["how"].startswith(f"Qdrant Edge {Qz.edge_version()} engine"), rows[option]
    assert "Qdrant Edge 0.9.0" in q_table["note"]
    # Exact bytes per vector: 4d, 2d, d, PQ8x6 = 6 bytes; Qdrant int8 d codes + a float32, binary one 128-bit word.
    assert {o: r["bytes_per_vector"] for o, r in rows.items()} == {
        "float32": 4 * DIM, "float16": 2 * DIM, "faiss_sq8": DIM, "faiss_pq": 6, "qdrant_int8": DIM + 4,
        "qdrant_int8_no_rescore": DIM + 4, "qdrant_binary": 16, "qdrant_binary_no_rescore": 16}
    assert rows["faiss_pq"]["label"] == "FAISS PQ8x6"
    # The options lose what they should: float16 nothing to speak of, binary codes alone the most, rescoring helps
    recall = {o: r["recall_at_10"] for o, r in rows.items()}
    assert recall["float16"] >= 0.98 and recall["qdrant_binary_no_rescore"] == min(recall.values())
    assert recall["qdrant_binary_no_rescore"] < recall["qdrant_binary"] and recall["qdrant_int8_no_rescore"] <= recall["qdrant_int8"]


def test_the_emulated_qdrant_rows_match_their_numpy_scheme(table_output, numpy_recalls):
    """Without qdrant-edge-py the Qdrant rows are the numpy emulation: the codecs over the output's shards and
    merged as the shard tasks do, each recall within 0.01 of the scheme computed here."""
    from reembed.validation import integrity as I

    x, _ = table_output
    positions, _, _ = _reference(x)
    codecs = Qz.codecs(x, DIM, engine=False)
    qdrant = [c for c in codecs if c.qdrant]
    assert [c.option for c in qdrant] == list(QDRANT_ROWS) and not any(c.engine for c in qdrant)
    assert all(c.how.startswith("emulated in numpy") for c in qdrant)
    ids = [f"d{i}" for i in range(ROWS)]
    q = x[positions]
    tops = []
    for c in (codecs[0], *qdrant):
        depth = c.depth(10)
        parts = [c.top(s, ids[lo:lo + SHARD_ROWS], x[lo:lo + SHARD_ROWS], q, depth, I.KEY_SPAN)
                 for s, lo in enumerate(range(0, ROWS, SHARD_ROWS))]
        merged = parts[0]
        for part in parts[1:]:
            merged = I._merge_top(merged, part, depth)
        tops.append(merged)
    table = Qz.table([codecs[0], *qdrant], tops, [ids[p] for p in positions], 10)
    assert "emulate" in table["note"]
    want = numpy_recalls
    for row in table["options"][1:]:
        assert row["recall_at_10"] == pytest.approx(want[row["option"]], abs=0.01), (row, want[row["option"]])


def test_without_qdrant_edge_the_qdrant_rows_are_emulated(monkeypatch):
    """qdrant-edge-py not importable (a None in sys.modules makes its import fail, as when it is not installed):
    the rows fall back to the emulation and say so; asking for the engine is refused in one line."""
    import sys

    from reembed.errors import ValidationError

    x = clustered(300, DIM, seed=12)
    assert all(c.engine == "0.9.0" for c in Qz.codecs(x, DIM) if c.qdrant)  # installed here: the engine by default
    monkeypatch.setitem(sys.modules, "qdrant_edge", None)
    assert Qz.edge_version() == ""
    rows = [c for c in Qz.codecs(x, DIM) if c.qdrant]
    assert len(rows) == 4 and all(not c.engine and c.how.startswith("emulated in numpy") for c in rows)
    with pytest.raises(ValidationError, match="qdrant-edge-py is not installed.*pip install qdrant-edge-py==0.9.0"):
        Qz.codecs(x, DIM, engine=True)


def test_the_qdrant_rows_are_searched_quantized_by_qdrant_edge():
    """The engine's quantized path is the one measured: Qdrant's int8 scores are not the exact dot products and
    its binary scores count agreeing bits; a query built so that its codes mislead ranks a worse vector first
    unless rescored."""
    from reembed.validation import integrity as I

    x = clustered(1_000, DIM, seed=11)
    codecs = {c.option: c for c in Qz.codecs(x, DIM, engine=True)}
    q = Qz.normalize(x[:40] + 0.05)
    ids = [f"d{i}" for i in range(1_000)]
    for option in QDRANT_ROWS:
        c = codecs[option]
        assert c.engine == Qz.edge_version() == "0.9.0" and c.depth(10) == (21 if c.rescore else 11)
        scores, found, _, exact = c.top(0, ids, x, q, c.depth(10), I.KEY_SPAN)
        assert found.shape == (40, c.depth(10)) and (found != None).all()  # noqa: E711
        gap = np.abs(scores - exact).max()  # Qdrant's scores of the codes, rescored or not (that comes after)
        if c.qdrant == "int8":
            assert 1e-4 < gap < 0.05, (option, gap)  # int8 codes: close to, not equal to, the dot products
        else:
            assert np.array_equal(scores, np.rint(scores)) and scores.max() <= DIM, option  # bit agreements
    # A query whose binary codes mislead: one vector agrees with it in every sign but points elsewhere, the
    # nearest one differs in one small component's sign. By the codes the former comes first; rescored, the latter.
    query = np.abs(np.random.default_rng(3).standard_normal(DIM)).astype(np.float32) + 0.1
    query[5] = 0.02
    nearest, agreeing = query.copy(), np.ones(DIM, np.float32)
    nearest[5] = -0.02
    others = np.random.default_rng(4).standard_normal((200, DIM)).astype(np.float32)
    data = Qz.normalize(np.vstack([others, agreeing, nearest]))
    ids = [f"d{i}" for i in range(len(data))]
    q1 = Qz.normalize(query[None])
    assert (q1 @ data.T).argmax() == 201 and np.sign(data[200]).tolist() == np.sign(q1[0]).tolist()
    for option, first in (("qdrant_binary_no_rescore", "d200"), ("qdrant_binary", "d201")):
        c = codecs[option]
        assert Qz.results(c, c.top(0, ids, data, q1, c.depth(10), I.KEY_SPAN), [None], 10)[0][0] == first, option


@pytest.mark.parametrize("dim", [32, 33, 200, 384])
def test_qdrant_bytes_per_vector_are_what_qdrant_edge_stores(tmp_path, dim):
    """The table's Qdrant bytes per vector against the size of the quantized storage Qdrant Edge writes."""
    x = Qz.normalize(np.random.default_rng(dim).standard_normal((300, dim)).astype(np.float32))
    for kind in ("int8", "binary"):
        folder = tmp_path / kind
        edge = Qz._build_edge(kind, x, str(folder), 0)
        edge.flush()
        edge.close()
        sizes = [f.stat().st_size for f in folder.rglob("quantized.data")]
        assert sizes and max(sizes) == 300 * Qz.qdrant_bytes(kind, dim), (kind, dim, sizes)
    assert Qz.qdrant_bytes("int8", 384) == 388 and Qz.qdrant_bytes("binary", 384) == 48


def test_the_table_is_in_the_html_and_the_cli_lines(table_output, tmp_path):
    from reembed.validation.report import render_html

    _, report = table_output
    html = render_html(report)
    assert "Storage options" in html and "FAISS SQ8" in html and "Qdrant binary + rescore" in html and "<svg" in html
    assert "Qdrant Edge 0.9.0 engine" in html
    lines = V.report_lines(report)
    assert lines[0].startswith("storage options: recall@10") and any("FAISS PQ8x6" in line for line in lines)
    assert sum("[Qdrant Edge 0.9.0 engine]" in line for line in lines) == 4


def test_top_k_of_a_codec_merges_exactly_whatever_the_split(tiny_model):
    """Binary codes tie massively: the emulation's shard-level candidates keep row order, so two splits agree.
    (Qdrant Edge breaks ties in its own order within a shard, as a collection does within a segment; the shards
    are the output's, so its table too is the same for any number of tasks.)"""
    from reembed.validation import integrity as I

    x = clustered(900, DIM, seed=2)
    codec = Qz.codecs(x[:300], DIM, engine=False)[-1]
    assert codec.option == "qdrant_binary_no_rescore" and not codec.engine
    q = x[:7]
    depth = codec.depth(10)
    ids = [f"d{i}" for i in range(900)]
    one = codec.top(0, ids, x, q, depth, I.KEY_SPAN)
    parts = [codec.top(s, ids[lo:lo + 300], x[lo:lo + 300], q, depth, I.KEY_SPAN) for s, lo in enumerate(range(0, 900, 300))]
    merged = I._merge_top(I._merge_top(parts[2], parts[0], depth), parts[1], depth)
    assert (merged[1] == one[1]).all() and np.allclose(merged[3], one[3])


# ---------------------------------------------------------------------------------------------------
# FAISS SQ8 / PQ as explicit kinds


def test_faiss_sq8_and_pq_are_explicit_kinds(tmp_path, tiny_model):
    from reembed.indexes.build import run_faiss
    from reembed.indexes.faiss import plan_index
    from reembed.indexes.search import Searcher

    assert plan_index(50_000, 384, "sq8").factory == "SQ8"
    assert plan_index(50_000, 384, "pq").factory == "PQ96x8" and plan_index(50_000, 384, "pq").estimated_bytes == 50_000 * 96
    assert plan_index(2_000, 32, "pq").factory == "PQ16x4"
    x = clustered(2_000, DIM, seed=5)
    out = write_output(tmp_path / "out", x, 500, model_name=str(tiny_model))
    loc = Location.from_uri(out)
    for kind, factory in (("sq8", "SQ8"), ("pq", "PQ16x4")):
        rec = run_faiss(loc, IndexConfig(faiss=kind, qdrant="none"))
        assert rec["params"]["factory"] == factory and rec["ntotal"] == 2_000 and rec["params"]["search"] == {}
        hits = Searcher(loc).search_vectors(x[:20], k=1)
        assert sum(h[0][0] == f"d{i}" for i, h in enumerate(hits)) >= (19 if kind == "sq8" else 12)
    # An output indexed with codes carries the table in its validation report without being asked.
    assert V.quantized_storage(Manifest.load(loc), V.Settings())


# ---------------------------------------------------------------------------------------------------
# Qdrant


def test_qdrant_quantization_is_configured_and_recorded(tmp_path, tiny_model):
    from qdrant_client import models

    from reembed.indexes import qdrant as Q
    from reembed.indexes.build import run_qdrant

    assert Q.quantization_config("none") is None
    int8 = Q.quantization_config("int8")
    assert int8.scalar.type == models.ScalarType.INT8 and int8.scalar.quantile == 0.99 and int8.scalar.always_ram
    assert isinstance(Q.quantization_config("binary"), models.BinaryQuantization)
    out = write_output(tmp_path / "out", clustered(300, DIM, seed=6), 100, model_name=str(tiny_model))
    target = str(tmp_path / "qdrant")
    rec = run_qdrant(out, IndexConfig(faiss="none", qdrant=target, qdrant_quantization="int8"), target)
    assert rec["quantization"] == "int8" and rec["count"] == 300
    client = Q.connect(target)
    try:
        [version] = Q.versions(client)
        assert version["quantization"] == "int8"
        assert Q.is_embedded(client) and Q.search_params(client, rec["collection"]) is None  # local mode: exact
    finally:
        client.close()
    # Another quantization is another build, not "up to date".
    rec2 = run_qdrant(out, IndexConfig(faiss="none", qdrant=target, qdrant_quantization="binary"), target)
    assert rec2["collection"] != rec["collection"] and rec2["quantization"] == "binary"
    assert V.quantized_storage(Manifest.load(Location.from_uri(out)), V.Settings())


# ---------------------------------------------------------------------------------------------------
# The drift adapter's figures in the validation report and the cost report


def test_adapter_figures_in_validate_and_cost(tmp_path, tiny_model, capsys):
    """A real fit on the shards' own old_embedding column; the run record is hand-made as a CPU job writes it
    (the Ray run of the cost tests is not repeated here)."""
    from migrate_fixtures import model_info, write_output as write_paired
    from reembed import adapter as A
    from reembed.cli import main

    x = clustered(400, DIM, seed=8)
    rot = np.linalg.qr(np.random.default_rng(1).standard_normal((DIM, 24)))[0]  # an old 24-d space
    old = (x @ rot + 0.01 * np.random.default_rng(2).standard_normal((400, 24))).astype(np.float32)
    loc = write_paired(tmp_path / "out", [f"d{i}" for i in range(400)], x, model_info(tiny_model, DIM, max_seq_length=128), shard_rows=100,
                       columns={"old_embedding": S.embedding_array(old)})
    m = Manifest.load(loc)
    m.record_run({"device": "cpu", "cpus": 2, "device_count": 1, "wall_seconds": 40.0, "device_seconds": 30.0,
                  "rows": 400, "tokens": 12_000, "backend": "onnx", "dtype": "float32"})
    fit = A.fit_output(loc, old_model="old-model", kinds=("procrustes",), sample=400)

    report = V.validate(loc, settings=V.Settings(sample=20, builtin_pairs=False), workers=0)
    a = report["adapter"]
    assert a["version"] == fit["version"] and a["kind"] == "procrustes" and a["recovery"] > 0.5
    assert a["recall"] == fit["kinds"]["procrustes"]["recall"] and a["recovery"] == fit["kinds"]["procrustes"]["recovery"]
    assert f"recovery {100 * a['recovery']:.1f}%" in V.report_lines(report)[-1]
    assert "Drift adapter" in V.render_html(report)

    assert main(["cost", str(loc.root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [saving] = data["adapter"]
    [run] = data["runs"]
    assert saving["usd_saved_per_1m_queries"] == pytest.approx(40.0 / 3600 * 2 * data["prices"]["cpu"] / 400 * 1e6)
    assert saving["usd_saved_per_1m_queries"] == pytest.approx(run["usd_per_1m_docs"])
    assert saving["seconds_per_embedding"] == pytest.approx(40.0 * 2 / 400)
    assert saving["embeddings_per_query"] == {"without": 2, "with": 1} and "device-seconds held per embedding" in saving["source"]
    assert math.isclose(saving["net_usd_saved_per_1m_queries"],
                        saving["usd_saved_per_1m_queries"] - saving["adapter_usd_per_1m_queries"])
