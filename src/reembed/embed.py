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

import hashlib
import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from reembed import schema as S
from reembed.errors import ModelLoadError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# Defaults when no tuned profile exists (padded tokens per forward pass).
# CPU: small batches keep activations in cache (all-MiniLM-L6-v2 on 2 cores, 2026-11-25: 1024-2048 tokens
# ~45 docs/s, 8192 ~37, 16384 ~35; see bench/RESULTS.md). GPU: enough rows to fill an H100.
DEFAULT_BATCH_TOKENS = {"cuda": 131_072, "cpu": 2_048}
CRASH_ONCE_ENV = "REEMBED_CRASH_ONCE"
# torch: eager PyTorch (SDPA). onnx / onnx-int8: the transformer in ONNX Runtime, float32 or dynamic int8
# (CPU only, see onnx_backend). auto: torch on GPU; on CPU onnx where onnxruntime is installed.
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


# ---------------------------------------------------------------------------------------------------
# Model loading and identity


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but torch sees no CUDA device on this node")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is float16 on GPU (BERT-family encoders stay well inside its range, and it keeps more
    mantissa bits than bfloat16) and float32 on CPU (exact; ask for ``bfloat16`` explicitly on CPUs with
    AVX512-BF16 or AMX, see :func:`cpu_supports_bf16`)."""
    if dtype != "auto":
        return dtype
    return "float16" if device == "cuda" else "float32"


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_model(name: str, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
               max_seq_length: int | None = None):
    """Load a sentence-transformers model by hub name (through the local Hugging Face cache) or path.

    Attention runs through PyTorch's fused ``scaled_dot_product_attention`` (SDPA) where the architecture
    supports it. ``trust_remote_code`` stays off: a model that needs custom code is refused.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")

    def build(model_kwargs: dict[str, Any]):
        return SentenceTransformer(
            name, device=device, revision=revision, trust_remote_code=False,
            local_files_only=offline, model_kwargs=model_kwargs,
        )

    try:
        try:
            model = build(kwargs)
        except ValueError as e:
            # transformers says "sdpa" or "scaled_dot_product_attention" (e.g. MPNet, all-mpnet-base-v2)
            if not any(w in str(e).lower() for w in ("sdpa", "scaled_dot_product_attention", "attention implementation")):
                raise
            log.info("%s: no SDPA attention for this architecture; using its default attention", name)
            model = build({k: v for k, v in kwargs.items() if k != "attn_implementation"})
    except (OSError, ValueError) as e:
        local = Path(name).expanduser()
        if local.exists():
            raise ModelLoadError(f"{name}: cannot load a sentence-transformers model from this folder ({e})") from e
        raise ModelLoadError(
            f"{name}: model weights not found in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub is unreachable or disabled. "
            f"Fix: on a machine with internet run `huggingface-cli download {name}` and copy the cache "
            "(or set HF_HOME to a shared cache), or pass --model /path/to/a/saved/model. "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


def resolve_backend(backend: str, device: str, dtype: str, compile: bool = False) -> str:
    """``auto`` is ONNX Runtime for float32 on CPU where onnxruntime is installed, else torch (and torch
    whenever ``torch.compile`` is asked for). ONNX backends run on CPU only, and in float32 (onnx-int8
    quantizes the float32 export itself)."""
    from reembed import onnx_backend

    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "auto":
        cpu_fp32 = device == "cpu" and dtype == "float32" and not compile
        return "onnx" if cpu_fp32 and onnx_backend.available() is None else "torch"
    if backend != "torch":
        if compile:
            raise ModelLoadError(f"model.compile (torch.compile) applies to the torch backend, not {backend!r}")
        if device != "cpu":
            raise ModelLoadError(f"backend {backend!r} runs on CPU only; use backend 'torch' (or auto) on {device}")
        if dtype != "float32":
            raise ModelLoadError(f"backend {backend!r} runs float32 models (int8 is its own backend, onnx-int8); "
                                 f"got dtype {dtype!r}")
        missing = onnx_backend.available(backend)
        if missing:
            raise ModelLoadError(f"backend {backend!r} needs packages that are not installed: {missing}")
    return backend


def query_backend(model_info: dict[str, Any]) -> str:
    """The backend that embeds queries into an output's space: int8 outputs need the int8 model."""
    return "onnx-int8" if model_info.get("dtype") == "int8" else "auto"


def space_dtype(dtype: str, backend: str | None) -> str:
    """The precision that defines the embedding space, for the manifest fingerprint: int8 weights make
    vectors measurably different from float ones (cosine ~0.99), so they must not be mixed in one output."""
    return "int8" if backend == "onnx-int8" else dtype


def describe_model(model, name: str, dtype: str, revision: str | None = None) -> dict[str, Any]:
    """What defines the embedding space: recorded in the manifest and hashed into its fingerprint."""
    normalize = any(type(m).__name__ == "Normalize" for m in model)
    pooling = next((getattr(m, "pooling_mode", None) or _pooling_mode(m) for m in model if type(m).__name__ == "Pooling"), None)
    info = {
        "name": name,
        "revision": revision or model_revision(model, name),
        "dimension": int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else model.get_sentence_embedding_dimension()),
        "normalize": normalize,
        "pooling": pooling,
        "dtype": dtype,
        "max_seq_length": int(model.max_seq_length),
    }
    info["fingerprint"] = fingerprint(info)
    return info


def fingerprint(info: dict[str, Any]) -> str:
    keys = ("name", "revision", "dimension", "normalize", "pooling", "dtype", "max_seq_length")
    blob = json.dumps({k: info.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_revision(model, name: str) -> str:
    """The hub commit for a cached hub model; for a local folder, a hash of its files."""
    folder = _model_folder(model, name)
    if folder is None:
        return "unknown"
    parts = folder.parts
    if "snapshots" in parts:  # <cache>/models--org--name/snapshots/<commit>/
        return parts[parts.index("snapshots") + 1]
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        h.update(str(p.relative_to(folder)).encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if size <= 16 << 20:
                h.update(f.read())
            else:  # weights: head and tail are enough to tell two checkpoints apart
                h.update(f.read(4 << 20))
                f.seek(-(4 << 20), os.SEEK_END)
                h.update(f.read())
    return "sha256:" + h.hexdigest()[:16]


def _model_folder(model, name: str) -> Path | None:
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    from huggingface_hub import try_to_load_from_cache

    for probe in ("modules.json", "config.json"):
        for repo in (name, f"sentence-transformers/{name}"):
            try:
                hit = try_to_load_from_cache(repo, probe)
            except ValueError:  # not a valid repo id
                hit = None
            if isinstance(hit, str):
                return Path(hit).parent
    return None


def _pooling_mode(module) -> str | None:
    cfg = getattr(module, "get_config_dict", lambda: {})()
    for k, v in cfg.items():
        if k.startswith("pooling_mode_") and v is True:
            return k.removeprefix("pooling_mode_").removesuffix("_tokens")
    return cfg.get("pooling_mode")


# ---------------------------------------------------------------------------------------------------
# Token-budget batching


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
        import queue
        import subprocess
        import sys

        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
        self.size = size
        self._procs = []
        self._idle: queue.Queue = queue.Queue()
        for _ in range(size):
            proc = subprocess.Popen([sys.executable, "-c", "from reembed.embed import _worker_main; _worker_main()"],
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
    import pickle

    data = pickle.dumps(obj, protocol=5)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _recv(stream):
    import pickle

    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("tokenizer process closed its pipe")
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("tokenizer process closed its pipe")
    return pickle.loads(data)


def _worker_main() -> None:
    """The tokenizer process: first message (tokenizer JSON, settings), then texts in, Tokens out."""
    import sys

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


# ---------------------------------------------------------------------------------------------------
# The Embedder


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
        BERT-family layers (default on GPU unless compiled); checked against the plain forward at start."""
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
        self._prompt = _default_prompt(self.model, self.name)
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
        self._onnx = None  # onnx_backend.OnnxTransformer when an ONNX backend runs the transformer
        if self.backend != "torch":
            self._use_onnx(requested, model.get("revision"), torch_threads)
        if self.backend == "torch":
            self._speed_up(compile, self.device == "cuda" if fuse is None else fuse)
        self._crash_once = crash_once
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
        import torch

        prep = self.prepare(["a short text", "a longer text, with quite a few more words in it than the first"])
        with torch.inference_mode():
            ref = self._forward(prep.feats[0], False).float()

        def keep(what: str) -> bool:
            try:
                with torch.inference_mode():
                    got = self._forward(prep.feats[0], False).float()
                    cos = torch.nn.functional.cosine_similarity(got, ref).min()
                    err = (got - ref).abs().max() / ref.abs().max()
                    ok = bool(torch.isfinite(got).all()) and float(cos) > 0.999 and float(err) < 2e-2
            except Exception as e:  # any failure of an optional fast path: fall back, never fail the job
                log.warning("%s: %s failed its check (%s: %s); not used", self.name, what, type(e).__name__, e)
                return False
            if not ok:
                log.warning("%s: %s changed the output beyond fp16 tolerance; not used", self.name, what)
            return ok

        first = self.model[0]
        cfg = getattr(getattr(first, "auto_model", None), "config", None)
        if (type(first).__name__ == "Transformer" and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and not getattr(cfg, "is_decoder", False)):
            self._split = True
            self._split = keep("the sync-free attention mask")
        if compile:
            # dynamic: one graph for every (rows, length) shape instead of a recompile per batch shape.
            first.auto_model.compile(dynamic=True)
            self.compiled = keep("torch.compile")
            if not self.compiled:
                first.auto_model._compiled_call_impl = None
        elif fuse:
            patched = _fuse_residual_layernorm(first.auto_model) if cfg is not None else []
            self.fused = len(patched)
            if patched and not keep("the fused residual + LayerNorm"):
                for mod in patched:
                    del mod.forward  # back to the class's own forward
                self.fused = 0

    def _use_onnx(self, requested: str, revision: str | None, threads: int | None) -> None:
        """Run the transformer in ONNX Runtime, checked against the torch forward pass on a padded batch.
        Asked for explicitly, a failure is an error; under ``auto`` it falls back to torch (logged)."""
        import torch

        from reembed import onnx_backend

        try:
            runner = onnx_backend.OnnxTransformer(self.model, self.name, revision or model_revision(self.model, self.name),
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
                    raise onnx_backend.OnnxUnavailable(
                        f"{self.name}: the {self.backend} export fails on a new shape ({type(e).__name__}: {e})") from e
                finally:
                    self._onnx = None
            cos = float(torch.nn.functional.cosine_similarity(got, ref).min())
            floor = 0.95 if self.backend == "onnx-int8" else 0.99999
            if not (bool(torch.isfinite(got).all()) and cos >= floor):
                raise onnx_backend.OnnxUnavailable(
                    f"{self.name}: the {self.backend} export disagrees with the torch model (cosine {cos:.6f} < {floor})")
        except onnx_backend.OnnxUnavailable as e:
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
            # transformers asks the device whether a 2D mask has padding (a sync on every forward pass,
            # which keeps the host from queueing ahead). We know: no mask when the batch has no padding
            # (SDPA can then use its flash kernel), else the ready 4D boolean mask, used as is.
            mask = feats["attention_mask"]
            inner = {k: v for k, v in feats.items() if k != "attention_mask"}
            if not full:
                inner["attention_mask"] = mask[:, None, None, :].bool()
            out = self.model[0](inner)
            out["attention_mask"] = mask  # pooling wants the 2D mask
            for module in list(self.model)[1:]:
                out = module(out)
            emb = out["sentence_embedding"]
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
        reasons = table.column(S.REASON)
        live = np.flatnonzero(reasons.is_null().to_numpy(zero_copy_only=False))
        texts = table.column(S.TEXT).take(pa.array(live)).to_pylist() if len(live) else []
        vectors, truncated, tokens, device_s = self.embed_detailed(texts)
        if self._crash_once and _claim(self._crash_once):
            log.warning("fault injection: exiting this actor mid-batch (%s)", self._crash_once)
            os._exit(1)
        n = table.num_rows
        full = np.zeros((n, self.dim), dtype=np.float32)
        full[live] = vectors
        flags = np.zeros(n, dtype=bool)
        flags[live] = truncated
        tok = np.zeros(n, dtype=np.int32)
        tok[live] = tokens
        dev = np.zeros(n, dtype=np.float32)
        dev[live] = device_s
        table = table.drop_columns([S.TEXT])
        table = table.append_column(S.EMBEDDING, S.embedding_array(full))
        table = table.append_column(S.TRUNCATED, pa.array(flags))
        table = table.append_column("_tokens", pa.array(tok))
        return table.append_column("_device_s", pa.array(dev))


def _flags(prep: Prepared) -> list[bool]:
    return prep.full if prep.full is not None else [False] * len(prep.feats)


_RESIDUAL_NORM_MODULES = {"BertSelfOutput", "BertOutput", "RobertaSelfOutput", "RobertaOutput", "XLMRobertaSelfOutput",
                          "XLMRobertaOutput", "ElectraSelfOutput", "ElectraOutput"}


def _fuse_residual_layernorm(model) -> list:
    """Replace ``LayerNorm(dropout(dense(x)) + residual)`` in BERT-family layers by the dense projection
    and one fused add + LayerNorm kernel (inference only: dropout is the identity in eval mode). Eager
    PyTorch runs the add and the LayerNorm as two passes over the activations, and its LayerNorm kernel
    reaches well under the memory bandwidth; together they were ~17% of BGE-large's forward time on an
    H100. Returns the patched modules."""
    import types

    import torch

    patched = []
    for mod in model.modules():
        if (type(mod).__name__ in _RESIDUAL_NORM_MODULES and isinstance(getattr(mod, "LayerNorm", None), torch.nn.LayerNorm)
                and isinstance(getattr(mod, "dense", None), torch.nn.Linear)):
            mod.forward = types.MethodType(_residual_forward, mod)
            patched.append(mod)
    return patched


def _residual_forward(self, hidden_states, input_tensor):
    import torch

    x = self.dense(hidden_states)
    shape = x.shape
    x, r = x.reshape(-1, shape[-1]), input_tensor.reshape(-1, shape[-1])
    torch._dynamo.maybe_mark_dynamic(x, 0)  # one kernel for any number of rows; the width stays fixed
    torch._dynamo.maybe_mark_dynamic(r, 0)
    return _add_layer_norm()(x, r, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps).reshape(shape)


_ADD_LN = None


def _add_layer_norm():
    global _ADD_LN
    if _ADD_LN is None:
        import torch

        def add_layer_norm(x, residual, weight, bias, eps: float):
            return torch.nn.functional.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)

        _ADD_LN = torch.compile(add_layer_norm)
    return _ADD_LN


def _default_prompt(model, name: str) -> str:
    """The prompt plain ``encode`` prepends by default (``default_prompt_name``), or ''."""
    prompt_name = getattr(model, "default_prompt_name", None)
    prompt = (getattr(model, "prompts", None) or {}).get(prompt_name) if prompt_name else None
    if not prompt:
        return ""
    if any(getattr(m, "include_prompt", True) is False for m in model):
        raise ModelLoadError(f"{name}: pooling that excludes prompt tokens (include_prompt=false) is not supported")
    return prompt


def _claim(path: str) -> bool:
    """True exactly once across processes: whoever creates ``path`` first."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True
