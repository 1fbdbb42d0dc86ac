"""The model: loading it (hub name through the local Hugging Face cache, or a folder), choosing device,
dtype and backend, and what defines its embedding space (:func:`describe_model`, :func:`fingerprint`).

Every failure a user can cause here (a missing folder, a name that is neither a folder nor cached, a
pickle checkpoint, an impossible setting) is a :class:`ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

from reembed.embed import onnx
from reembed.errors import ModelLoadError

log = logging.getLogger(__name__)

# torch: eager PyTorch (SDPA). onnx / onnx-int8: the transformer in ONNX Runtime, float32 or dynamic int8
# (CPU only, see reembed.embed.onnx). auto: torch on GPU; on CPU onnx where onnxruntime is installed.
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ModelLoadError(f"model.device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but torch sees no CUDA device on this node")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is float16 on GPU (BERT-family encoders stay well inside its range, and it keeps more
    mantissa bits than bfloat16) and float32 on CPU (exact; ask for ``bfloat16`` explicitly on CPUs with
    AVX512-BF16 or AMX, see :func:`cpu_supports_bf16`)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
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


HUB_PROBE_S = 3.0  # how long the early check waits for the model hub before calling it unreachable


def check_available(name: str, revision: str | None = None) -> str:
    """Fail in a second or two, before Ray starts or anything loads, when the model's files cannot be had:
    a folder that does not exist, or a hub name that is not in the local Hugging Face cache while the hub
    is off (``HF_HUB_OFFLINE``) or does not answer within :data:`HUB_PROBE_S`. Returns where the model
    comes from: ``folder``, ``cache`` or ``hub`` (not cached, to be downloaded)."""
    local = Path(name).expanduser()
    if _looks_like_path(name) or local.exists():
        if not local.exists():
            raise ModelLoadError(f"{name}: no such model folder; fix the path, or give a hub name "
                                 "(org/name) that is in the local Hugging Face cache")
        return "folder"
    if _cached_file(name, revision) is not None:
        return "cache"
    if _hub_offline():
        raise _not_cached(name, "HF_HUB_OFFLINE is set")
    unreachable = _hub_unreachable()
    if unreachable:
        raise _not_cached(name, f"the hub did not answer: {unreachable}")
    log.info("%s: not in the local Hugging Face cache; downloading it from the hub", name)
    return "hub"


def load_model(name: str, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
               max_seq_length: int | None = None):
    """Load a sentence-transformers model by hub name (through the local Hugging Face cache) or path.

    Attention runs through PyTorch's fused ``scaled_dot_product_attention`` (SDPA) where the architecture
    supports it. ``trust_remote_code`` stays off: a model that needs custom code is refused.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
    offline = _hub_offline()

    def build(model_kwargs: dict[str, Any]):
        return SentenceTransformer(
            name, device=device, revision=revision, trust_remote_code=False,
            local_files_only=offline, model_kwargs=model_kwargs,
        )

    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"{name}: no such model folder; fix the path, or give a hub name "
                             "(org/name) that is in the local Hugging Face cache")
    try:
        try:
            model = build(kwargs)
        except ValueError as e:
            # transformers says "sdpa" or "scaled_dot_product_attention" (e.g. MPNet, all-mpnet-base-v2)
            if not any(w in str(e).lower() for w in ("sdpa", "scaled_dot_product_attention", "attention implementation")):
                raise
            log.info("%s: no SDPA attention for this architecture; using its default attention", name)
            model = build({k: v for k, v in kwargs.items() if k != "attn_implementation"})
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise _load_failure(name, e) from e
    except Exception as e:
        if not _unreadable_weights(e):  # anything else (out of memory, a bug) keeps its own traceback
            raise
        raise _load_failure(name, e) from e
    if max_seq_length is not None:
        limit = position_limit(model)
        if max_seq_length < 1 or (limit is not None and max_seq_length > limit):
            raise ModelLoadError(f"{name}: model.max_seq_length {max_seq_length} is outside what this "
                                 f"{architecture(model)} model can take (1..{limit} tokens); set it within that range")
        model.max_seq_length = max_seq_length
    model.eval()
    return model


def resolve_backend(backend: str, device: str, dtype: str, compile: bool = False) -> str:
    """``auto`` is ONNX Runtime for float32 on CPU where onnxruntime is installed, else torch (and torch
    whenever ``torch.compile`` is asked for). ONNX backends run on CPU only, and in float32 (onnx-int8
    quantizes the float32 export itself)."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "auto":
        cpu_fp32 = device == "cpu" and dtype == "float32" and not compile
        return "onnx" if cpu_fp32 and onnx.available() is None else "torch"
    if backend != "torch":
        if compile:
            raise ModelLoadError(f"model.compile (torch.compile) applies to the torch backend, not {backend!r}")
        if device != "cpu":
            raise ModelLoadError(f"backend {backend!r} runs on CPU only; use backend 'torch' (or auto) on {device}")
        if dtype != "float32":
            raise ModelLoadError(f"backend {backend!r} runs float32 models (int8 is its own backend, onnx-int8); "
                                 f"got dtype {dtype!r}")
        missing = onnx.available(backend)
        if missing:
            raise ModelLoadError(f"backend {backend!r} needs packages that are not installed: {missing}")
    return backend


INT8_SPACE = "int8-w7"  # the int8 recipe of embed.onnx.quantize_int8 (7-bit weights, float down-projections)


def query_backend(model_info: dict[str, Any]) -> str:
    """The backend that embeds queries into an output's space: int8 outputs need the int8 model."""
    return "onnx-int8" if str(model_info.get("dtype", "")).startswith("int8") else "auto"


def space_dtype(dtype: str, backend: str | None) -> str:
    """The precision that defines the embedding space, for the manifest fingerprint: int8 weights make
    vectors measurably different from float ones (cosine ~0.99), so they must not be mixed in one output;
    the int8 recipe is part of the name, so an output quantized by an earlier recipe ("int8") is never
    resumed with this one."""
    return INT8_SPACE if backend == "onnx-int8" else dtype


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


def architecture(model) -> str:
    """The transformer's architecture as Hugging Face names it (``bert``, ``mpnet``, ...), for messages."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    return str(getattr(config, "model_type", None) or type(model[0]).__name__)


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


def default_prompt(model, name: str) -> str:
    """The prompt plain ``encode`` prepends by default (``default_prompt_name``), or ''."""
    prompt_name = getattr(model, "default_prompt_name", None)
    prompt = (getattr(model, "prompts", None) or {}).get(prompt_name) if prompt_name else None
    if not prompt:
        return ""
    if any(getattr(m, "include_prompt", True) is False for m in model):
        raise ModelLoadError(f"{name}: pooling that excludes prompt tokens (include_prompt=false) is not supported")
    return prompt


def position_limit(model) -> int | None:
    """The most tokens a row can have: the learned position table's size, less the ids RoBERTa-style
    models (RoBERTa, XLM-R, MPNet, ...) reserve below the padding index. None without a position table
    (rotary positions, e.g. ModernBERT)."""
    auto = getattr(model[0], "auto_model", None)
    config = getattr(auto, "config", None)
    size = getattr(config, "max_position_embeddings", None)
    if auto is None or not size or getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return None
    if not any("position_embeddings" in n for n, _ in auto.named_parameters()):
        return None
    embeddings = getattr(auto, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return int(size) - (int(padding_idx) + 1 if padding_idx is not None else 0)


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


def _cached_file(name: str, revision: str | None) -> str | None:
    """The cached ``modules.json`` or ``config.json`` of hub model ``name`` (also as ``sentence-transformers/
    name``, as sentence-transformers resolves a bare name), or None; reads the cache only."""
    from huggingface_hub import try_to_load_from_cache

    for repo in (name, f"sentence-transformers/{name}"):
        for probe in ("modules.json", "config.json"):
            try:
                hit = try_to_load_from_cache(repo, probe, revision=revision)
            except ValueError:  # not a valid repo id
                hit = None
            if isinstance(hit, str):
                return hit
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _hub_unreachable() -> str | None:
    """Why the model hub cannot be reached within :data:`HUB_PROBE_S` (DNS, refused, timeout), or None.
    Any HTTP answer counts as reachable; proxies from the environment are used, as the download would."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_PROBE_S).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{constants.ENDPOINT}: {getattr(e, 'reason', e)}"
    return None


def _not_cached(name: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{name}: model not found in the local Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and {why}. Fix: on a machine with internet run "
        f"`huggingface-cli download {name}` and copy the cache (or set HF_HOME to a shared cache), or pass "
        "--model /path/to/a/saved/model")


def _pooling_mode(module) -> str | None:
    cfg = getattr(module, "get_config_dict", lambda: {})()
    for k, v in cfg.items():
        if k.startswith("pooling_mode_") and v is True:
            return k.removeprefix("pooling_mode_").removesuffix("_tokens")
    return cfg.get("pooling_mode")


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator (or ~, ., a drive) is a path."""
    return name.startswith(("/", "~", "./", "../", ".\\")) or name.count("/") > 1 or "\\" in name or name in (".", "..")


def _load_failure(name: str, e: BaseException) -> ModelLoadError:
    """One line for a model that cannot be loaded: the folder or the file, the cause, the fix."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours parts of its messages
    cause = f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0]}"
    local = Path(name).expanduser()
    if _unreadable_weights(e) and type(e).__name__ != "SafetensorError":
        where = _weights_files(local if local.is_dir() else None) or name
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\.\s|\n|$)", str(e))
        if found:  # torch's message is a page long; this is the line that says what it refused
            cause = f"{type(e).__name__}: {found.group(1)}"
        return ModelLoadError(
            f"{where}: cannot read these pickle (PyTorch .bin) weights safely ({cause[:200]}). Fix: convert the "
            "checkpoint to safetensors on a machine where you trust it (load it there, then "
            "save_pretrained(..., safe_serialization=True)); reembed never unpickles weights with "
            "weights_only=False, as an untrusted pickle can run code (a damaged file: copy the model again)")
    if type(e).__name__ == "SafetensorError":
        where = _weights_files(local if local.is_dir() else None) or name
        return ModelLoadError(f"{where}: the safetensors weights are corrupt or truncated ({cause[:200]}); "
                              "copy the model again")
    if local.exists():
        return ModelLoadError(f"{name}: cannot load a sentence-transformers model from this folder ({cause[:300]}); "
                              "it needs config.json, the weights and the tokenizer files (as save() writes them)")
    return ModelLoadError(
        f"{name}: model weights not found in the local Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub is unreachable or disabled. "
        f"Fix: on a machine with internet run `huggingface-cli download {name}` and copy the cache "
        "(or set HF_HOME to a shared cache), or pass --model /path/to/a/saved/model. "
        f"({cause})")


def _unreadable_weights(e: BaseException) -> bool:
    """A weights file torch or safetensors cannot read (refused pickle, damaged file)."""
    if type(e).__name__ == "SafetensorError":  # safetensors' own error, not importable by a stable name
        return True
    if isinstance(e, pickle.UnpicklingError) or "weights only load failed" in str(e).lower():
        return True
    return isinstance(e, (RuntimeError, EOFError)) and any(
        w in str(e) for w in ("PytorchStreamReader", "pickle", "Ran out of input"))


def _weights_files(folder: Path | None) -> str:
    if folder is None:
        return ""
    found = sorted(p for pattern in ("*.bin", "*.safetensors", "*.pt", "*.pth") for p in folder.rglob(pattern))
    return ", ".join(str(p) for p in found[:3])
