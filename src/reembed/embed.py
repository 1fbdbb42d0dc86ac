"""The Embedder: loads a sentence-transformers model once and turns texts into vectors, fast.

Texts are tokenized once, sorted by token length across the whole incoming block, and cut into batches
by a *token budget* (padded tokens per forward pass) rather than a row count, so padding stays small and
every forward pass does about the same work. Results come back in the input order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from reembed import schema as S

log = logging.getLogger(__name__)

# Defaults when no tuned profile exists (padded tokens per forward pass).
DEFAULT_BATCH_TOKENS = {"cuda": 65_536, "cpu": 8_192}
CRASH_ONCE_ENV = "REEMBED_CRASH_ONCE"


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says why and how to fix it."""


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
    """``auto`` is float16 on GPU and float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "float16" if device == "cuda" else "float32"


def load_model(name: str, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
               max_seq_length: int | None = None):
    """Load a sentence-transformers model by hub name (through the local Hugging Face cache) or path.

    ``trust_remote_code`` stays off: a model that needs custom code is refused by transformers.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device == "cuda":
        kwargs["attn_implementation"] = "sdpa"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        model = SentenceTransformer(
            name, device=device, revision=revision, trust_remote_code=False,
            local_files_only=offline, model_kwargs=kwargs,
        )
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


# ---------------------------------------------------------------------------------------------------
# The Embedder


@dataclass
class EmbedStats:
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens
    padded_tokens: int = 0
    device_seconds: float = 0.0


class Embedder:
    """Loads the model once; ``embed(texts)`` for Python callers, ``__call__(table)`` for Ray Data.

    Thread-safe: tokenization runs outside a lock so the next block can be tokenized while the device
    works on the current one (Ray actors with ``max_concurrent_calls_per_actor`` > 1).
    """

    def __init__(self, model: dict[str, Any], batch_tokens: int | None = None, max_batch_rows: int = 1024,
                 torch_threads: int | None = None, compile: bool = False, crash_once: str | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = resolve_device(model.get("device", "auto"))
        self.dtype = resolve_dtype(model.get("dtype", "auto"), self.device)
        self.model = load_model(model["name"], model.get("revision"), self.device, self.dtype, model.get("max_seq_length"))
        if model.get("normalize") is not None:
            has_norm = any(type(m).__name__ == "Normalize" for m in self.model)
            self._extra_normalize = bool(model["normalize"]) and not has_norm
            if has_norm and not model["normalize"]:
                raise ModelLoadError(f"{model['name']}: normalize=false, but the model itself normalizes")
        else:
            self._extra_normalize = False
        if compile and self.device == "cuda":
            self.model.compile()
        self.tokenizer = self.model.tokenizer
        self.max_seq_length = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else self.model.get_sentence_embedding_dimension())
        self.batch_tokens = batch_tokens or DEFAULT_BATCH_TOKENS[self.device]
        self.max_batch_rows = max_batch_rows
        self._crash_once = crash_once
        self._lock = threading.Lock()
        self.stats = EmbedStats()

    # -- tokenization ------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[dict[str, list], np.ndarray, np.ndarray]:
        """Tokenize without padding. Returns (encodings, lengths, truncated flags)."""
        L = self.max_seq_length
        enc = self.tokenizer(list(texts), padding=False, truncation="longest_first", max_length=L,
                             return_attention_mask=False)
        lengths = np.fromiter((len(x) for x in enc["input_ids"]), dtype=np.int64, count=len(texts))
        truncated = np.zeros(len(texts), dtype=bool)
        at_limit = np.flatnonzero(lengths >= L)
        if len(at_limit):  # exactly L tokens, or cut to L? Tokenize those few with one more slot to tell.
            longer = self.tokenizer([texts[i] for i in at_limit], padding=False, truncation="longest_first",
                                    max_length=L + 1, return_attention_mask=False)["input_ids"]
            truncated[at_limit] = [len(x) > L for x in longer]
        return dict(enc), lengths, truncated

    def _collate(self, enc: dict[str, list], idx: np.ndarray) -> dict[str, Any]:
        import torch

        batch = {k: [v[i] for i in idx] for k, v in enc.items()}
        feats = self.tokenizer.pad(batch, padding=True, return_tensors="pt", return_attention_mask=True)
        feats = {k: (t.pin_memory() if self.device == "cuda" else t) for k, t in feats.items() if isinstance(t, torch.Tensor)}
        return feats

    # -- embedding ---------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embed ``texts`` in order. Returns (float32 matrix (n, dim), truncated flags)."""
        vectors, truncated, _, _ = self.embed_detailed(texts)
        return vectors, truncated

    def embed_detailed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`embed`, plus per-row real token counts and per-row shares of device time."""
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, bool), np.zeros(0, np.int32), np.zeros(0, np.float32)
        enc, lengths, truncated = self.tokenize(texts)
        batches = token_budget_batches(lengths, self.batch_tokens, self.max_batch_rows)
        out = np.empty((n, self.dim), dtype=np.float32)
        device_s = np.zeros(n, dtype=np.float32)
        with self._lock:
            t0 = time.perf_counter()
            results = list(self._forward_all(enc, batches))
            # One device sync per block: copy back after every batch has been queued.
            for idx, emb in results:
                out[idx] = emb.float().cpu().numpy()
            busy = time.perf_counter() - t0
        padded = sum(len(b) * int(lengths[b[0]]) for b in batches)
        # Each row's share of the block's device time, by its padded tokens.
        for b in batches:
            device_s[b] = busy * (len(b) * int(lengths[b[0]]) / padded) / len(b)
        self.stats.rows += n
        self.stats.tokens += int(lengths.sum())
        self.stats.padded_tokens += padded
        self.stats.device_seconds += busy
        return out, truncated, lengths.astype(np.int32), device_s

    def _forward_all(self, enc: dict[str, list], batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, Any]]:
        import torch

        # Collate batch i+1 on a helper thread while the device runs batch i.
        from concurrent.futures import ThreadPoolExecutor

        with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as pool:
            nxt = pool.submit(self._collate, enc, batches[0])
            for i, idx in enumerate(batches):
                feats = nxt.result()
                if i + 1 < len(batches):
                    nxt = pool.submit(self._collate, enc, batches[i + 1])
                feats = {k: t.to(self.model.device, non_blocking=True) for k, t in feats.items()}
                emb = self.model(feats)["sentence_embedding"]
                if self._extra_normalize:
                    emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
                yield idx, emb

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


def _claim(path: str) -> bool:
    """True exactly once across processes: whoever creates ``path`` first."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True
