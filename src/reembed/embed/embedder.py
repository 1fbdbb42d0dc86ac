"""The Embedder: loads a sentence-transformers model once and turns texts into vectors, fast.

A block of texts goes through two stages:

* **prepare** (CPU, no lock): tokenize the whole block once with the model's own fast tokenizer, sort
  rows by token length across the block, cut them into batches by a *token budget* (padded tokens per
  forward pass, not a row count), and collate every batch into padded (pinned) tensors. Padding stays
  small and every forward pass does about the same work.
* **run** (device, under a lock): copy each batch to the device, run the forward passes back to back
  (fp16/bf16, SDPA attention, optionally ``torch.compile``), gather the vectors on the device and copy
  them back once, then put the rows back in input order.

Two blocks can be in flight at once: while one runs, the next one is prepared (Ray Data calls the actor
from two threads; :meth:`Embedder.embed_stream` does the same with a helper thread), so the device
never waits for the tokenizer. On GPU the tokenizer runs in its own process (its Python objects would
otherwise hold the GIL the launching thread needs), the attention mask is handed to SDPA ready-made
(transformers would otherwise sync with the device on every forward pass to see whether there is
padding), and BERT-family layers get a fused residual-add + LayerNorm kernel; each fast path is checked
against the plain forward pass when the model loads. The output equals ``SentenceTransformer.encode`` of
the same texts, in the same order, within the precision of the dtype.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from reembed import schema as S
from reembed import testing
from reembed.embed import fastpaths, onnx
from reembed.embed.model import (architecture, cpu_supports_bf16, default_prompt, load_model, model_revision,
                                 resolve_backend, resolve_device, resolve_dtype)
from reembed.embed.tokenize import BlockTokenizer, Tokens
from reembed.errors import ModelLoadError, OnnxUnavailable

log = logging.getLogger(__name__)

# Defaults when no tuned profile exists (padded tokens per forward pass).
# CPU: small batches keep activations in cache (all-MiniLM-L6-v2 on 2 cores, 2026-11-25: 1024-2048 tokens
# ~45 docs/s, 8192 ~37, 16384 ~35; see bench/RESULTS.md). GPU: enough rows to fill an H100.
DEFAULT_BATCH_TOKENS = {"cuda": 131_072, "cpu": 2_048}
# The least cosine (per row of the check batch) an int8 model may have to the float model. Dynamic int8
# keeps about 0.99 on BERT-family encoders (all-MiniLM-L6-v2, all-mpnet-base-v2: see onnx.quantize_int8);
# a model far below that is broken by the quantization, not merely rounded.
INT8_MIN_COSINE = 0.95



@dataclass
class EmbedStats:
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens
    padded_tokens: int = 0
    batches: int = 0
    device_seconds: float = 0.0
    prepare_seconds: float = 0.0

    @property
    def padding_share(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclass
class Prepared:
    """A block ready for the device: its batches collated on the host, in device order."""

    n: int
    lengths: np.ndarray
    truncated: np.ndarray
    batches: list[np.ndarray]
    feats: list[dict[str, Any]] = field(repr=False)
    order: np.ndarray = field(repr=False)  # row of each output vector, batch after batch
    padded: int = 0
    seconds: float = 0.0
    full: list[bool] | None = None  # per batch: no padding (no attention mask needed)


class Embedder:
    """Loads the model once; ``embed(texts)`` for Python callers, ``__call__(table)`` for Ray Data,
    ``embed_stream(blocks)`` to pipeline many blocks from one thread.

    Thread-safe: :meth:`prepare` (tokenize, batch, collate) runs without a lock, so one block is
    prepared while another runs on the device; :meth:`run` holds the device lock only while it queues
    work, so the next block's batches queue right behind the current ones.
    """

    def __init__(self, model: dict[str, Any], batch_tokens: int | None = None, max_batch_rows: int = 1024,
                 torch_threads: int | None = None, compile: bool = False, crash_once: str | None = None,
                 tokenize_workers: int | None = None, fuse: bool | None = None):
        """``model``: name, device, dtype, revision, max_seq_length, normalize, backend. ``compile``:
        ``torch.compile`` the transformer (dynamic shapes). ``tokenize_workers``: tokenizer processes
        (default 1 on GPU, 0 = in-process on CPU). ``fuse``: fused residual-add + LayerNorm kernels in
        BERT-family layers (default on GPU unless compiled); checked against the plain forward at start.
        ``crash_once``: TEST HOOK ONLY, see :func:`reembed.testing.crash_once` (the pipeline passes
        ``$REEMBED_CRASH_ONCE``; None in any real run)."""
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.name = model["name"]
        self.device = resolve_device(model.get("device", "auto"))
        self.dtype = resolve_dtype(model.get("dtype", "auto"), self.device)
        requested = model.get("backend") or "auto"
        self.backend = resolve_backend(requested, self.device, self.dtype, compile)
        if self.device == "cpu" and self.dtype == "bfloat16" and not cpu_supports_bf16():
            log.warning("bfloat16 on a CPU without AVX512-BF16/AMX runs emulated and is usually slower than float32")
        self.model = load_model(self.name, model.get("revision"), self.device, self.dtype, model.get("max_seq_length"))
        if model.get("normalize") is not None:
            has_norm = any(type(m).__name__ == "Normalize" for m in self.model)
            self._extra_normalize = bool(model["normalize"]) and not has_norm
            if has_norm and not model["normalize"]:
                raise ModelLoadError(f"{self.name}: normalize=false, but the model itself normalizes")
        else:
            self._extra_normalize = False
        self._prompt = default_prompt(self.model, self.name)
        self.tokenizer = self.model.tokenizer
        self.max_seq_length = int(self.model.max_seq_length)
        if tokenize_workers is None:
            tokenize_workers = 1 if self.device == "cuda" else 0
        self.block_tokenizer = BlockTokenizer(self.tokenizer, self.max_seq_length, tokenize_workers)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else self.model.get_sentence_embedding_dimension())
        self.batch_tokens = int(batch_tokens or DEFAULT_BATCH_TOKENS[self.device])
        self.max_batch_rows = max_batch_rows
        self._device = torch.device(self.device)
        self._split = False  # run the transformer with a mask SDPA can take without a device sync
        self.fused = 0  # layers with the fused residual + LayerNorm
        self.compiled = False
        self._onnx = None  # onnx.OnnxTransformer when an ONNX backend runs the transformer
        if self.backend != "torch":
            self._use_onnx(requested, model.get("revision"), torch_threads)
        if self.backend == "torch":
            self._speed_up(compile, self.device == "cuda" if fuse is None else fuse)
        self._crash_once = crash_once  # test hook, None in real runs
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = EmbedStats()
        log.info(
            "Embedder: %s on %s, %s, %s attention%s%s%s, backend %s, batch budget %d tokens (at most %d rows), "
            "max_seq_length %d, %d tokenizer process(es)", self.name, self.device, self.dtype, self.attention,
            ", sync-free masks" if self._split else "", f", {self.fused} fused add+LayerNorm" if self.fused else "",
            ", compiled" if self.compiled else "", self.backend, self.batch_tokens, self.max_batch_rows,
            self.max_seq_length, self.block_tokenizer.workers,
        )

    def close(self) -> None:
        """Stop the tokenizer processes (also done at interpreter exit)."""
        self.block_tokenizer.close()

    def _speed_up(self, compile: bool, fuse: bool) -> None:
        """Switch on the GPU fast paths one at a time, each checked against the plain forward pass on a
        padded test batch; a path that errs or changes the output is left off (and logged)."""
        prep = self.prepare(["a short text", "a longer text, with quite a few more words in it than the first"])
        check = fastpaths.Check(lambda: self._forward(prep.feats[0], False), self.name)
        first = self.model[0]
        if fastpaths.takes_ready_mask(first):
            self._split = True
            self._split = check.keep("the sync-free attention mask")
        if compile:
            fastpaths.compile_transformer(first)
            self.compiled = check.keep("torch.compile")
            if not self.compiled:
                fastpaths.uncompile_transformer(first)
        elif fuse:
            patched = fastpaths.fuse_residual_layernorm(first)
            self.fused = len(patched)
            if patched and not check.keep("the fused residual + LayerNorm"):
                fastpaths.unfuse(patched)
                self.fused = 0

    def _use_onnx(self, requested: str, revision: str | None, threads: int | None) -> None:
        """Run the transformer in ONNX Runtime, checked against the torch forward pass on a padded batch.
        Asked for explicitly, a failure is an error; under ``auto`` it falls back to torch (logged)."""
        import torch

        try:
            runner = onnx.OnnxTransformer(self.model, self.name, revision or model_revision(self.model, self.name),
                                          self.backend, threads)
            # Three rows of three lengths: neither the export's batch size (2) nor its width (16) is reused,
            # so a shape the tracer froze into the graph shows up here, not in the first real batch.
            prep = self.prepare(["a short text", "a longer text, with quite a few more words in it than the first",
                                 "and a third text, of a length between the other two"])
            with torch.inference_mode():
                ref = torch.cat([self._forward(f, False).float() for f in prep.feats])
                self._onnx = runner
                try:
                    got = torch.cat([self._forward(f, False).float() for f in prep.feats])
                except Exception as e:  # onnxruntime's errors share no base class; the export is unusable
                    raise OnnxUnavailable(
                        f"{self.name}: the {self.backend} export fails on a new shape ({type(e).__name__}: {e})") from e
                finally:
                    self._onnx = None
            cos = float(torch.nn.functional.cosine_similarity(got, ref).min())
            floor = INT8_MIN_COSINE if self.backend == "onnx-int8" else 0.99999
            if not (bool(torch.isfinite(got).all()) and cos >= floor):
                raise OnnxUnavailable(
                    f"{self.name} ({architecture(self.model)}): the {self.backend} model disagrees with the torch "
                    f"model (cosine {cos:.6f} < {floor} on the check batch); use --backend "
                    f"{'onnx (float32)' if self.backend == 'onnx-int8' else 'torch'} for this model")
        except OnnxUnavailable as e:
            if requested != "auto":
                raise ModelLoadError(str(e)) from e
            log.warning("%s; running the torch backend instead", e)
            self.backend = "torch"
            return
        self._onnx = runner
        # ONNX Runtime holds its own copy of the weights: free torch's (the pooling modules stay).
        self.model[0].auto_model.to("meta")
        log.info("%s: %s backend (ONNX Runtime, %d threads, %s), cosine to torch %.6f on the check batch",
                 self.name, self.backend, runner.threads, runner.path, cos)

    @property
    def attention(self) -> str:
        if self._onnx is not None:
            return "onnxruntime"
        config = getattr(getattr(self.model[0], "auto_model", None), "config", None)
        return str(getattr(config, "_attn_implementation", None) or "default")

    # -- stage 1: tokenize, batch, collate (CPU, no lock) --------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Tokenize without padding (the model's default prompt, if any, prepended)."""
        if self._prompt:
            texts = [self._prompt + t for t in texts]
        return self.block_tokenizer.encode(texts)

    def prepare(self, texts: Sequence[str], batch_tokens: int | None = None) -> Prepared:
        """Tokenize a block, cut it into token-budget batches and collate them on the host."""
        t0 = time.perf_counter()
        n = len(texts)
        if n == 0:
            return Prepared(0, np.zeros(0, np.int64), np.zeros(0, bool), [], [], np.zeros(0, np.int64))
        tok = self.tokenize(texts)
        batches = token_budget_batches(tok.lengths, batch_tokens or self.batch_tokens, self.max_batch_rows)
        pin = self.device == "cuda"
        feats = [self.block_tokenizer.collate(tok, b, pin) for b in batches]
        padded = sum(len(b) * int(tok.lengths[b[0]]) for b in batches)
        full = [int(tok.lengths[b[-1]]) == int(tok.lengths[b[0]]) for b in batches]  # longest first
        return Prepared(n, tok.lengths, tok.truncated, batches, feats, np.concatenate(batches), padded,
                        time.perf_counter() - t0, full)

    # -- stage 2: forward passes (device, under the lock) -------------------------------------------

    def run(self, prep: Prepared) -> tuple[np.ndarray, float]:
        """Embed a prepared block. Returns (float32 vectors in input order, busy device seconds)."""
        import torch

        out = np.empty((prep.n, self.dim), dtype=np.float32)
        if prep.n == 0:
            return out, 0.0
        if self.device == "cuda":
            with self._lock, torch.inference_mode():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                vecs = torch.cat([self._forward(f, full) for f, full in zip(prep.feats, _flags(prep))]).float()
                host = torch.empty(vecs.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(vecs, non_blocking=True)  # one copy back per block
                end.record()
            # Wait outside the lock: the next block's batches are already queued behind this one.
            end.synchronize()
            busy = start.elapsed_time(end) / 1000.0
            out[prep.order] = host.numpy()
        else:
            with self._lock, torch.inference_mode():
                t0 = time.perf_counter()
                out[prep.order] = torch.cat([self._forward(f, full) for f, full in zip(prep.feats, _flags(prep))]).float().numpy()
                busy = time.perf_counter() - t0
        return out, busy

    def _forward(self, feats: dict[str, Any], full: bool):
        import torch

        if self._onnx is not None:
            out = {self._onnx.output_name: self._onnx(feats), "attention_mask": feats["attention_mask"]}
            for module in list(self.model)[1:]:  # pooling, Dense, Normalize: the model's own modules
                out = module(out)
            emb = out["sentence_embedding"]
            if self._extra_normalize:
                emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
            return emb
        feats = {k: t.to(self._device, non_blocking=True) for k, t in feats.items()}
        if self._split:
            emb = fastpaths.forward_sync_free(self.model, feats, full)
        else:
            emb = self.model(feats)["sentence_embedding"]
        if self._extra_normalize:
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
        return emb

    # -- public entry points ------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embed ``texts`` in order. Returns (float32 matrix (n, dim), truncated flags)."""
        vectors, truncated, _, _ = self.embed_detailed(texts)
        return vectors, truncated

    def embed_detailed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`embed`, plus per-row real token counts and per-row shares of device time."""
        prep = self.prepare(texts)
        vectors, busy = self.run(prep)
        return vectors, prep.truncated, prep.lengths.astype(np.int32), self._account(prep, busy)

    def embed_stream(self, blocks: Iterable[Sequence[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Embed blocks one after another, preparing the next block on a helper thread while the device
        works on the current one. Yields (vectors, truncated flags) per block, in order."""
        it = iter(blocks)
        first = next(it, None)
        if first is None:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reembed-prepare") as pool:
            fut = pool.submit(self.prepare, first)
            while fut is not None:
                prep = fut.result()
                nxt = next(it, None)
                fut = pool.submit(self.prepare, nxt) if nxt is not None else None
                vectors, busy = self.run(prep)
                self._account(prep, busy)
                yield vectors, prep.truncated

    def _account(self, prep: Prepared, busy: float) -> np.ndarray:
        """Update the stats; return each row's share of the block's device time, by padded tokens."""
        device_s = np.zeros(prep.n, dtype=np.float32)
        if prep.n:
            for b in prep.batches:
                device_s[b] = busy * int(prep.lengths[b[0]]) / prep.padded
        with self._stats_lock:
            self.stats.rows += prep.n
            self.stats.tokens += int(prep.lengths.sum())
            self.stats.padded_tokens += prep.padded
            self.stats.batches += len(prep.batches)
            self.stats.device_seconds += busy
            self.stats.prepare_seconds += prep.seconds
        return device_s

    # -- Ray Data UDF ------------------------------------------------------------------------------

    def __call__(self, table: pa.Table) -> pa.Table:
        todo = table.column(S.REASON).is_null().to_numpy(zero_copy_only=False)
        if S.REUSED in table.column_names:  # carried forward from the --reuse output: the writer fills them
            todo &= ~table.column(S.REUSED).to_numpy(zero_copy_only=False).astype(bool)
        if S.MOVED in table.column_names:  # identical texts (reembed.texts): the writers copy their leaders' vectors
            todo &= ~table.column(S.MOVED).to_numpy(zero_copy_only=False).astype(bool)
            todo &= table.column(S.LEADER_POS).to_numpy() < 0
        live = np.flatnonzero(todo)
        texts = table.column(S.TEXT).take(pa.array(live)).to_pylist() if len(live) else []
        unique, first, inverse = unique_texts(texts)  # identical texts of the block are embedded once
        vectors, truncated, tokens, device_s = self.embed_detailed(unique)
        if self._crash_once:  # test hook: the crash tests kill this actor mid-batch, once
            testing.crash_once(self._crash_once)
        n = table.num_rows
        full = np.zeros((n, self.dim), dtype=np.float32)
        full[live] = vectors[inverse]
        flags = np.zeros(n, dtype=bool)
        flags[live] = truncated[inverse]
        tok = np.zeros(n, dtype=np.int32)
        tok[live[first]] = tokens  # the copies cost no tokens and no device time
        dev = np.zeros(n, dtype=np.float32)
        dev[live[first]] = device_s
        copied = np.zeros(n, dtype=bool)
        copied[live] = True
        copied[live[first]] = False
        table = table.drop_columns([S.TEXT])
        table = table.append_column(S.COPIED, pa.array(copied))
        table = table.append_column(S.EMBEDDING, S.embedding_array(full))
        table = table.append_column(S.TRUNCATED, pa.array(flags))
        table = table.append_column("_tokens", pa.array(tok))
        return table.append_column("_device_s", pa.array(dev))


def check_backend(model: dict[str, Any], device: str = "auto", compile: bool = False) -> str:
    """The backend Embedder actors will run ``model`` with (the Embedder's model dict) on ``device``,
    checked in this process before any actor starts, so a refusal is one line and not a failed actor pool.

    Settings that cannot work (an unknown backend, ONNX on GPU or in bfloat16, onnxruntime missing) are
    refused at once, without loading anything. An ONNX backend asked for by name (``onnx``, ``onnx-int8``)
    is also built here on the CPU, exactly as an actor builds it: the model is loaded, exported (cached
    under ``$REEMBED_CACHE_DIR``, where the actors on this node find it) and compared with the torch model
    on the check batch; a model the backend does not suit (int8 that drifts from the float model, an
    export that fails) raises :class:`ModelLoadError`. Under ``auto`` nothing is loaded: an actor whose
    export fails falls back to torch by itself.
    """
    requested = model.get("backend") or "auto"
    if device == "auto":
        device = resolve_device(device)
    backend = resolve_backend(requested, device, resolve_dtype(model.get("dtype", "auto"), device), compile)
    if backend != "torch" and requested != "auto":
        Embedder({**model, "device": "cpu", "dtype": "float32", "backend": backend}).close()
    return backend


def _flags(prep: Prepared) -> list[bool]:
    return prep.full if prep.full is not None else [False] * len(prep.feats)



def unique_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(unique, first, inverse)``: the distinct texts in order of first appearance, the index of each one's
    first row, and for every row the index of its text in ``unique`` (``texts[i] == unique[inverse[i]]``)."""
    index: dict[str, int] = {}
    first: list[int] = []
    inverse = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        j = index.setdefault(t, len(first))
        if j == len(first):
            first.append(i)
        inverse[i] = j
    return [texts[i] for i in first], np.asarray(first, dtype=np.int64), inverse


def token_budget_batches(lengths: Sequence[int] | np.ndarray, budget: int, max_rows: int = 1024) -> list[np.ndarray]:
    """Split row indices into batches whose padded size (rows x longest row) stays within ``budget``.

    Rows are taken longest first, so each batch's first row sets its padded length. A single row longer
    than the budget gets a batch of its own. Every index appears exactly once.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    i, n = 0, len(order)
    while i < n:
        longest = max(1, int(lengths[order[i]]))
        rows = max(1, min(max_rows, budget // longest, n - i))
        batches.append(order[i:i + rows])
        i += rows
    return batches

