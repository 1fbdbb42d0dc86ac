"""Whole-block tokenization, direct: unpadded ids, truncation flags, collation, the worker protocol."""

from __future__ import annotations

import io

import numpy as np
import pytest

from reembed.embed import BlockTokenizer, Tokens
from reembed.embed.tokenize import _recv, _send

from test_embed import mixed_texts


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.mark.parametrize("max_length", [8, 128])
def test_block_ids_equal_the_tokenizer_row_by_row(hf_tokenizer, max_length):
    texts = mixed_texts(60, seed=41)
    tok = BlockTokenizer(hf_tokenizer, max_length).encode(texts)
    assert len(tok.ids) == int(tok.lengths.sum()) + 1 and tok.ids[-1] == hf_tokenizer.pad_token_id  # the sentinel
    for i, text in enumerate(texts):
        want = hf_tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        row = tok.ids[tok.starts[i]:tok.starts[i] + tok.lengths[i]].tolist()
        assert row == want
        full = len(hf_tokenizer(text, truncation=False)["input_ids"])
        assert bool(tok.truncated[i]) == (full > max_length)
    assert tok.truncated.any() and not tok.truncated.all()


def test_slow_path_equals_fast_path(hf_tokenizer):
    """Without a Rust tokenizer the block goes through the tokenizer's own __call__: same Tokens."""
    texts = mixed_texts(40, seed=43) + ["x " * 126, "x " * 127]  # exactly at and one past the limit
    fast = BlockTokenizer(hf_tokenizer, 128)
    slow = BlockTokenizer(hf_tokenizer, 128)
    slow._fast = None
    a, b = fast.encode(texts), slow.encode(texts)
    for field in ("ids", "type_ids", "starts", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.lengths[-2] == a.lengths[-1] == 128 and not a.truncated[-2] and a.truncated[-1]


@pytest.mark.parametrize("left", [False, True])
def test_collate_pads_with_the_sentinel_on_the_tokenizer_side(hf_tokenizer, left):
    texts = ["the cat", "a longer text about the river and the city", "dog"]
    bt = BlockTokenizer(hf_tokenizer, 128)
    bt.left_pad = left
    tok = bt.encode(texts)
    idx = np.array([1, 0, 2])
    feats = bt.collate(tok, idx)
    width = int(tok.lengths.max())
    assert feats["input_ids"].shape == feats["attention_mask"].shape == (3, width)
    for r, i in enumerate(idx):
        n = int(tok.lengths[i])
        row, mask = feats["input_ids"][r].numpy(), feats["attention_mask"][r].numpy()
        real = slice(width - n, width) if left else slice(0, n)
        pad = slice(0, width - n) if left else slice(n, width)
        assert row[real].tolist() == tok.ids[tok.starts[i]:tok.starts[i] + n].tolist()
        assert (row[pad] == hf_tokenizer.pad_token_id).all() and mask[real].all() and not mask[pad].any()
    assert ("token_type_ids" in feats) == bt.with_type_ids


def test_empty_block_and_worker_protocol_roundtrip(hf_tokenizer):
    tok = BlockTokenizer(hf_tokenizer, 16).encode([])
    assert tok.lengths.shape == (0,) and tok.ids.tolist() == [hf_tokenizer.pad_token_id]
    buf = io.BytesIO()
    _send(buf, ("ok", tok))
    _send(buf, ["two", "texts"])
    buf.seek(0)
    status, back = _recv(buf)
    assert status == "ok" and isinstance(back, Tokens) and back.ids.tolist() == tok.ids.tolist()
    assert _recv(buf) == ["two", "texts"]
    with pytest.raises(EOFError):
        _recv(buf)


def test_worker_process_failure_falls_back_in_process(hf_tokenizer):
    texts = mixed_texts(20, seed=47)
    bt = BlockTokenizer(hf_tokenizer, 64, workers=1)
    try:
        assert bt.workers == 1
        want = BlockTokenizer(hf_tokenizer, 64).encode(texts)
        bt._pool._procs[0].kill()  # the tokenizer process dies for real
        bt._pool._procs[0].wait()
        got = bt.encode(texts)
        assert bt.workers == 0  # closed, tokenizing in-process from now on
        np.testing.assert_array_equal(got.ids, want.ids)
    finally:
        bt.close()
