"""The Embedder against plain ``SentenceTransformer.encode``, and the token-budget batcher's invariants."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from reembed import schema as S
from reembed.embed import (BlockTokenizer, Embedder, ModelLoadError, cpu_supports_bf16, onnx, query_backend, resolve_backend,
                           space_dtype, token_budget_batches)
from reembed.testing import TINY_ARCHITECTURES, tiny_encoder

WORDS = ("the cat dog bird river city music data vector search model token cluster gpu art science "
         "antidisestablishmentarianism naïve café 42 , . ! ?").split()


def mixed_texts(n: int, seed: int, longest: int = 400) -> list[str]:
    """Texts from 1 word to far past any max_seq_length, in random order, some duplicated."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 5, 17, 60, 150, longest], size=n)
    texts = [" ".join(rng.choice(WORDS, size=k)) for k in sizes]
    texts[n // 2] = texts[0]
    return texts


def encode(model_path, texts, batch_size=16):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_path), device="cpu").encode(texts, batch_size=batch_size)


def full_token_counts(tokenizer, texts) -> np.ndarray:
    return np.array([len(tokenizer(t, truncation=False)["input_ids"]) for t in texts])


# -- output equals plain encode ----------------------------------------------------------------------


@pytest.mark.parametrize("budget,backend", [(256, "torch"), (4096, "torch"), (256, "onnx"), (4096, "auto")])
def test_embed_equals_plain_encode_on_mixed_lengths(minilm, budget, backend):
    texts = mixed_texts(120, seed=budget)
    emb = Embedder({"name": str(minilm), "device": "cpu", "backend": backend}, batch_tokens=budget)
    assert emb.backend == ("torch" if backend == "torch" else "onnx")  # auto on CPU: ONNX Runtime
    # under ONNX Runtime the torch copy of the transformer's weights is freed
    assert all(p.is_meta for p in emb.model[0].auto_model.parameters()) == (emb.backend == "onnx")
    vectors, truncated = emb.embed(texts)
    ref = encode(minilm, texts)
    assert vectors.shape == ref.shape == (120, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, ref, atol=2e-5, rtol=0)  # same rows, same order, fp32 rounding only
    assert (truncated == (full_token_counts(emb.tokenizer, texts) > emb.max_seq_length)).all()
    assert truncated.any() and not truncated.all()
    assert emb.stats.rows == 120 and emb.stats.tokens <= emb.stats.padded_tokens


def test_embed_stream_and_tokenizer_process_equal_encode(tiny_model):
    texts = mixed_texts(150, seed=3)
    ref = encode(tiny_model, texts)
    emb = Embedder({"name": str(tiny_model), "device": "cpu"}, batch_tokens=512, tokenize_workers=1)
    try:
        assert emb.block_tokenizer.workers == 1
        blocks = [texts[:40], texts[40:41], texts[41:]]
        got = [v for v, _ in emb.embed_stream(blocks)]
        assert [len(v) for v in got] == [40, 1, 109]
        np.testing.assert_allclose(np.concatenate(got), ref, atol=2e-6, rtol=0)
        in_process = BlockTokenizer(emb.tokenizer, emb.max_seq_length).encode(texts)
        remote = emb.block_tokenizer.encode(texts)
        for field in ("ids", "type_ids", "starts", "lengths", "truncated"):
            np.testing.assert_array_equal(getattr(remote, field), getattr(in_process, field))
    finally:
        emb.close()


def test_sync_free_masks_and_fused_layernorm_equal_encode(minilm):
    """The GPU fast paths (a ready 4D mask or none, fused residual + LayerNorm) also run on CPU: same output."""
    texts = mixed_texts(60, seed=7)
    emb = Embedder({"name": str(minilm), "device": "cpu", "backend": "torch"}, batch_tokens=2048, fuse=True)
    assert emb._split and emb.fused == 12  # 6 layers x (attention output, feed-forward output)
    np.testing.assert_allclose(emb.embed(texts)[0], encode(minilm, texts), atol=2e-5, rtol=0)
    fixed = [" ".join(["data"] * 20)] * 8 + [" ".join(["river"] * 20)] * 8  # equal lengths: no mask at all
    prep = emb.prepare(fixed)
    assert all(prep.full)
    np.testing.assert_allclose(emb.run(prep)[0], encode(minilm, fixed), atol=2e-5, rtol=0)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without AVX512-BF16/AMX")
def test_cpu_bfloat16_close_to_float32(minilm):
    texts = mixed_texts(40, seed=11)
    emb = Embedder({"name": str(minilm), "device": "cpu", "dtype": "bfloat16"}, batch_tokens=2048)
    assert emb.dtype == "bfloat16"
    got, ref = emb.embed(texts)[0], encode(minilm, texts)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_ray_udf_keeps_every_row_in_place(tiny_model):
    texts = mixed_texts(30, seed=5)
    reasons = [None] * 30
    reasons[3], reasons[17] = S.EMPTY_TEXT, S.NULL_TEXT
    table = pa.table({S.ID: [f"d{i}" for i in range(30)], S.TEXT: [None if r else t for t, r in zip(texts, reasons)],
                      S.REASON: pa.array(reasons, pa.string()), S.POS: np.arange(30)})
    emb = Embedder({"name": str(tiny_model), "device": "cpu"}, batch_tokens=300)
    out = emb(table)
    assert out.column(S.ID).to_pylist() == [f"d{i}" for i in range(30)]
    vectors = S.embedding_matrix(out.column(S.EMBEDDING))
    live = [i for i in range(30) if reasons[i] is None]
    np.testing.assert_allclose(vectors[live], encode(tiny_model, [texts[i] for i in live]), atol=2e-6, rtol=0)
    assert not vectors[[3, 17]].any() and out.column("_tokens").to_numpy()[[3, 17]].tolist() == [0, 0]
    # A text repeated in the block is embedded once: its copies cost no device time (and no tokens).
    copied = out.column(S.COPIED).to_numpy(zero_copy_only=False)
    firsts = [i for i in live if not copied[i]]
    assert len(firsts) == len({texts[i] for i in live}) and copied.sum() == len(live) - len(firsts)
    assert out.column("_device_s").to_numpy()[firsts].min() > 0
    assert not out.column("_device_s").to_numpy()[copied].any()


def test_backend_settings_that_cannot_work_are_clear_errors(tiny_model):
    with pytest.raises(ModelLoadError, match="unknown backend 'tensorrt'"):
        Embedder({"name": str(tiny_model), "device": "cpu", "backend": "tensorrt"})
    with pytest.raises(ModelLoadError, match="backend 'onnx' runs on CPU only"):
        resolve_backend("onnx", "cuda", "float16")
    with pytest.raises(ModelLoadError, match="backend 'onnx-int8' runs float32 models"):
        Embedder({"name": str(tiny_model), "device": "cpu", "dtype": "bfloat16", "backend": "onnx-int8"})
    assert resolve_backend("auto", "cuda", "float16") == "torch"
    assert resolve_backend("auto", "cpu", "bfloat16") == "torch"  # ONNX Runtime runs the float32 export
    assert resolve_backend("auto", "cpu", "float32", compile=True) == "torch"  # torch.compile is torch's
    with pytest.raises(ModelLoadError, match="applies to the torch backend, not 'onnx'"):
        resolve_backend("onnx", "cpu", "float32", compile=True)


# -- the ONNX Runtime backends -------------------------------------------------------------------------


def test_onnx_int8_close_to_float32_and_has_its_own_fingerprint_dtype(minilm):
    texts = mixed_texts(80, seed=13)
    emb = Embedder({"name": str(minilm), "device": "cpu", "backend": "onnx-int8"}, batch_tokens=2048)
    assert emb.backend == "onnx-int8" and emb.attention == "onnxruntime"
    assert emb._onnx.path.name == onnx.VARIANTS["onnx-int8"] == "model_qint8.r2.onnx"
    got, ref = emb.embed(texts)[0], encode(minilm, texts)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.97 and cos.mean() > 0.985  # int8 weights: close, but measurably not the same vectors
    assert np.abs(got - ref).max() > 1e-3
    assert space_dtype("auto", "onnx-int8") == "int8-w7" and space_dtype("auto", "onnx") == "auto"
    assert query_backend({"dtype": "int8-w7"}) == query_backend({"dtype": "int8"}) == "onnx-int8"
    assert query_backend({"dtype": "float32"}) == "auto"


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_encoder_architectures_equal_encode_on_both_backends(architecture, tmp_path):
    """What the export must handle besides BERT: no token types (DistilBERT), position ids from the padding
    (RoBERTa, XLM-R), relative attention bias without SDPA (MPNet), factorized embeddings (ELECTRA), local
    attention and rotary positions (ModernBERT)."""
    path = tiny_encoder(tmp_path / architecture, architecture)
    texts = mixed_texts(50, seed=23)
    ref = encode(path, texts)
    for backend in ("torch", "auto"):
        emb = Embedder({"name": str(path), "device": "cpu", "backend": backend}, batch_tokens=700)
        assert emb.backend == ("torch" if backend == "torch" else "onnx")
        np.testing.assert_allclose(emb.embed(texts)[0], ref, atol=2e-6, rtol=0)


def test_onnx_export_is_cached_and_keyed_by_model_contents(tiny_model, tmp_path, monkeypatch, caplog):
    import logging
    import shutil

    from reembed.testing import tiny_bert

    monkeypatch.setenv("REEMBED_CACHE_DIR", str(tmp_path / "cache"))
    texts = mixed_texts(40, seed=17)
    with caplog.at_level(logging.INFO, logger="reembed.embed.onnx"):
        first = Embedder({"name": str(tiny_model), "device": "cpu", "backend": "onnx"}, batch_tokens=512)
        path = first._onnx.path
        stamp = path.stat().st_mtime_ns
        second = Embedder({"name": str(tiny_model), "device": "cpu", "backend": "onnx"}, batch_tokens=512)
    assert second._onnx.path == path and path.stat().st_mtime_ns == stamp
    assert sum("exported to ONNX" in r.getMessage() for r in caplog.records) == 1
    assert path.is_relative_to(tmp_path / "cache" / "onnx") and not list(path.parent.glob(".*.tmp"))
    np.testing.assert_allclose(second.embed(texts)[0], encode(tiny_model, texts), atol=2e-6, rtol=0)

    # Other weights under the same folder name: another key, another export, its own vectors.
    other = tmp_path / "m" / tiny_model.name
    tiny_bert(other, seed=1)
    third = Embedder({"name": str(other), "device": "cpu", "backend": "onnx"}, batch_tokens=512)
    assert third._onnx.path != path
    np.testing.assert_allclose(third.embed(texts)[0], encode(other, texts), atol=2e-6, rtol=0)
    shutil.rmtree(tmp_path / "m")


def test_failed_export_is_remembered_and_explained(tiny_model, tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.setenv("REEMBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx, "MAX_EXPORT_BYTES", 1024)  # the tiny model stands in for a > 2 GiB one
    with pytest.raises(ModelLoadError, match="too large for a single-file ONNX export"):
        Embedder({"name": str(tiny_model), "device": "cpu", "backend": "onnx"})
    [marker] = (tmp_path / "cache" / "onnx").glob("*/export-failed.txt")
    assert not list(marker.parent.glob("*.onnx"))  # nothing half-written is left to be picked up
    monkeypatch.setattr(onnx, "MAX_EXPORT_BYTES", 2 << 30)
    with caplog.at_level(logging.WARNING, logger="reembed.embed"):
        emb = Embedder({"name": str(tiny_model), "device": "cpu"})  # auto: falls back at once, says where
    assert emb.backend == "torch"
    assert any("too large" in r.getMessage() and "delete it to try again" in r.getMessage() for r in caplog.records)
    marker.unlink()
    assert Embedder({"name": str(tiny_model), "device": "cpu"}).backend == "onnx"


def test_onnx_unusable_falls_back_under_auto_and_fails_when_asked_for(tiny_model, tmp_path, monkeypatch, caplog):
    import logging

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("REEMBED_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="reembed.embed"):
        emb = Embedder({"name": str(tiny_model), "device": "cpu"}, batch_tokens=512)
    assert emb.backend == "torch" and emb._onnx is None
    assert any("running the torch backend instead" in r.getMessage() and str(blocker) in r.getMessage()
               for r in caplog.records)
    texts = mixed_texts(20, seed=19)
    np.testing.assert_allclose(emb.embed(texts)[0], encode(tiny_model, texts), atol=2e-6, rtol=0)
    with pytest.raises(ModelLoadError, match="cannot create the ONNX cache folder .*REEMBED_CACHE_DIR"):
        Embedder({"name": str(tiny_model), "device": "cpu", "backend": "onnx"})


# -- the token-budget batcher ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_batcher_never_exceeds_budget_and_keeps_every_row_once_in_order(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 600, size=int(rng.integers(1, 3000)))
    budget, max_rows = int(rng.choice([512, 4096, 65536])), int(rng.choice([7, 64, 1024]))
    batches = token_budget_batches(lengths, budget, max_rows)
    order = np.concatenate(batches)
    # every row exactly once, longest first, ties in input order
    assert sorted(order.tolist()) == list(range(len(lengths)))
    np.testing.assert_array_equal(order, np.argsort(-lengths, kind="stable"))
    for b in batches:
        padded = len(b) * int(lengths[b].max())
        assert int(lengths[b[0]]) == int(lengths[b].max())  # the first row sets the padded width
        assert len(b) <= max_rows
        assert padded <= budget or len(b) == 1  # a single row longer than the budget goes alone
    # and nothing is cut smaller than it must be: each batch but the last is full (by rows or by budget)
    for b, nxt in zip(batches, batches[1:]):
        assert len(b) == max_rows or (len(b) + 1) * int(lengths[b[0]]) > budget


def test_batcher_edge_cases():
    assert token_budget_batches([], 100) == []
    assert [b.tolist() for b in token_budget_batches([500], 100)] == [[0]]
    assert [b.tolist() for b in token_budget_batches([3, 3, 3, 3], 6)] == [[0, 1], [2, 3]]
