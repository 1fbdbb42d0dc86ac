"""Tokenizing whole blocks: unpadded, truncated encoding, block-wide token counts, collation into padded
tensors, and the tokenizer processes a GPU actor runs beside itself.

The worker processes talk a small protocol over their stdin/stdout: 8 bytes of little-endian length,
then a pickle. The first message is ``(tokenizer JSON, max_length, pad_id, pad_type_id, with_type_ids)``;
after it every message is a list of texts, answered by ``("ok", Tokens)`` or ``("error", "why")``.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    """A block tokenized without padding: every row's token ids back to back, then one pad sentinel."""

    ids: np.ndarray  # int64 (total + 1,)
    type_ids: np.ndarray | None  # int64 (total + 1,), for models that take token_type_ids
    starts: np.ndarray  # int64 (n,): where each row starts in ids
    lengths: np.ndarray  # int64 (n,): tokens per row, special tokens included
    truncated: np.ndarray  # bool (n,): the row had more than max_length tokens


class BlockTokenizer:
    """The model's tokenizer, set up once for unpadded, truncated encoding of whole blocks.

    With a fast tokenizer it uses its own copy of the Rust tokenizer with truncation fixed at
    ``max_length``: encoding never changes its settings, so threads can share it, and a row was cut
    exactly when the encoding has overflowing pieces (one pass, no second tokenization to tell).

    ``workers`` > 0 tokenizes in that many separate processes: turning a block's encodings into
    Python objects holds the GIL for a good part of a second, and a GPU process whose launching
    thread waits for the GIL lets the GPU run dry.
    """

    def __init__(self, hf_tokenizer, max_length: int, workers: int = 0):
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0
        self.pad_type_id = int(getattr(hf_tokenizer, "pad_token_type_id", 0) or 0)
        self.left_pad = getattr(hf_tokenizer, "padding_side", "right") == "left"
        self.with_type_ids = "token_type_ids" in getattr(hf_tokenizer, "model_input_names", ())
        self._fast = None
        self._pool = None
        self._lock = threading.Lock()  # the slow path changes the shared tokenizer's settings per call
        backend = getattr(hf_tokenizer, "backend_tokenizer", None) if getattr(hf_tokenizer, "is_fast", False) else None
        if backend is not None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(backend.to_str())
            tok.no_padding()
            tok.enable_truncation(self.max_length, stride=0, strategy="longest_first",
                                  direction=getattr(hf_tokenizer, "truncation_side", "right"))
            self._fast = tok
            if workers > 0:
                init = (tok.to_str(), self.max_length, self.pad_id, self.pad_type_id, self.with_type_ids)
                self._pool = _WorkerPool(workers, init)

    @property
    def workers(self) -> int:
        return self._pool.size if self._pool is not None else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def encode(self, texts: Sequence[str]) -> Tokens:
        if self._pool is not None:
            try:
                return self._pool.encode(list(texts))
            except (OSError, EOFError, RuntimeError) as e:
                log.warning("tokenizer process failed (%s); tokenizing in-process from now on", e)
                self.close()
        if self._fast is not None:
            return _encode_fast(self._fast, texts, self.max_length, self.pad_id, self.pad_type_id, self.with_type_ids)
        n = len(texts)
        L = self.max_length
        with self._lock:
            enc = self.hf(list(texts), padding=False, truncation="longest_first", max_length=L,
                          return_attention_mask=False)
            ids_rows = enc["input_ids"]
            type_rows = enc.get("token_type_ids") if self.with_type_ids else None
            lengths = np.fromiter((len(x) for x in ids_rows), dtype=np.int64, count=n)
            truncated = np.zeros(n, dtype=bool)
            at_limit = np.flatnonzero(lengths >= L)
            if len(at_limit):  # exactly L tokens, or cut to L? Tokenize those with one more slot to tell.
                longer = self.hf([texts[i] for i in at_limit], padding=False, truncation="longest_first",
                                 max_length=L + 1, return_attention_mask=False)["input_ids"]
                truncated[at_limit] = [len(x) > L for x in longer]
        return _tokens(ids_rows, type_rows, lengths, truncated, self.pad_id, self.pad_type_id)

    def collate(self, tok: Tokens, idx: np.ndarray, pin: bool = False) -> dict[str, Any]:
        """Padded tensors (input_ids, attention_mask, token_type_ids) for the rows ``idx`` of a block."""
        lens = tok.lengths[idx]
        width = max(1, int(lens.max()))
        cols = np.arange(width, dtype=np.int64)
        if self.left_pad:
            shift = (width - lens)[:, None]
            valid = cols[None, :] >= shift
            src = tok.starts[idx][:, None] + cols[None, :] - shift
        else:
            valid = cols[None, :] < lens[:, None]
            src = tok.starts[idx][:, None] + cols[None, :]
        src = np.where(valid, src, len(tok.ids) - 1)  # padding positions read the sentinel
        feats = {"input_ids": _take(tok.ids, src, pin), "attention_mask": _as_tensor(valid.astype(np.int64), pin)}
        if tok.type_ids is not None:
            feats["token_type_ids"] = _take(tok.type_ids, src, pin)
        return feats


def _encode_fast(tok, texts: Sequence[str], max_length: int, pad_id: int, pad_type_id: int,
                 with_type_ids: bool) -> Tokens:
    n = len(texts)
    encs = tok.encode_batch(list(texts), add_special_tokens=True)
    lengths = np.fromiter((len(e) for e in encs), dtype=np.int64, count=n)
    ids_rows = [e.ids for e in encs]
    type_rows = [e.type_ids for e in encs] if with_type_ids else None
    truncated = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(lengths >= max_length):
        truncated[i] = len(encs[i].overflowing) > 0
    return _tokens(ids_rows, type_rows, lengths, truncated, pad_id, pad_type_id)


def _tokens(ids_rows, type_rows, lengths: np.ndarray, truncated: np.ndarray, pad_id: int, pad_type_id: int) -> Tokens:
    total = int(lengths.sum())
    ids = _flat(ids_rows, total, pad_id)
    type_ids = _flat(type_rows, total, pad_type_id) if type_rows is not None else None
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return Tokens(ids, type_ids, starts, lengths, truncated)


class _WorkerPool:
    """Tokenizer processes, each a plain ``python -c`` child talking pickles over its stdin/stdout (not
    multiprocessing: its spawn mode re-imports the caller's main module, its fork mode copies CUDA
    state and torch's threads). A child exits when its parent's end of the pipe closes."""

    def __init__(self, size: int, init: tuple):
        pkg_root = str(Path(__file__).resolve().parents[2])  # the folder holding reembed/
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
        self.size = size
        self._procs = []
        self._idle: queue.Queue = queue.Queue()
        for _ in range(size):
            proc = subprocess.Popen([sys.executable, "-c", "from reembed.embed.tokenize import worker_main; worker_main()"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            _send(proc.stdin, init)
            self._procs.append(proc)
            self._idle.put(proc)

    def encode(self, texts: list[str]) -> Tokens:
        proc = self._idle.get()
        try:
            _send(proc.stdin, texts)
            status, value = _recv(proc.stdout)
        finally:
            self._idle.put(proc)
        if status != "ok":
            raise RuntimeError(f"tokenizer process: {value}")
        return value

    def close(self) -> None:
        for proc in self._procs:
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, ValueError):
                pass
            except Exception:  # subprocess.TimeoutExpired: it will see EOF and exit; do not block on it
                proc.kill()
        self._procs = []


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("tokenizer process closed its pipe")
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("tokenizer process closed its pipe")
    return pickle.loads(data)


def worker_main() -> None:
    """The tokenizer process: first message (tokenizer JSON, settings), then texts in, Tokens out."""
    from tokenizers import Tokenizer

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        tokenizer_json, max_length, pad_id, pad_type_id, with_type_ids = _recv(inp)
        tok = Tokenizer.from_str(tokenizer_json)
        while True:
            texts = _recv(inp)
            try:
                reply = ("ok", _encode_fast(tok, texts, max_length, pad_id, pad_type_id, with_type_ids))
            except Exception as e:  # report it to the parent, which falls back to tokenizing itself
                reply = ("error", f"{type(e).__name__}: {e}")
            _send(out, reply)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return


def _flat(rows: Sequence[Sequence[int]], total: int, sentinel: int) -> np.ndarray:
    out = np.empty(total + 1, dtype=np.int64)
    out[:total] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)
    out[total] = sentinel
    return out


def _take(flat: np.ndarray, src: np.ndarray, pin: bool):
    import torch

    t = torch.empty(src.shape, dtype=torch.int64, pin_memory=pin)
    np.take(flat, src, out=t.numpy())
    return t


def _as_tensor(a: np.ndarray, pin: bool):
    import torch

    t = torch.from_numpy(a)
    return t.pin_memory() if pin else t

