"""Job settings: frozen dataclasses, one per stage, and a YAML loader that refuses what it doesn't know.

A YAML file carries the same settings as the command line::

    input:  {uri: s3://corpus/docs/, id_column: doc_id, passthrough: [text, lang]}
    output: {uri: s3://corpus/embeddings/bge-large/}
    model:  {name: BAAI/bge-large-en-v1.5, dtype: bfloat16}
    compute: {max_actors: 8}

Unknown keys and wrong types raise :class:`ConfigError` naming the key and the file. Secrets (AWS keys,
Qdrant API keys) are never settings: they come from the environment or the standard credential chains.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from reembed.errors import ConfigError  # noqa: F401 (re-exported)

DEFAULT_MODEL = "BAAI/bge-large-en-v1.5"

_SECRET_HINTS = ("secret", "password", "api_key", "apikey", "token", "access_key")


@dataclass(frozen=True)
class InputConfig:
    uri: str = ""
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    id_column: str = "id"
    text_column: str = "text"
    # Extra input columns copied into every output shard (e.g. ["text", "lang"]).
    passthrough: tuple[str, ...] = ()
    # Files under a folder URI that are read; a glob in the URI itself works too.
    pattern: str = "*"


@dataclass(frozen=True)
class OutputConfig:
    uri: str = ""
    # Start over on an existing output instead of resuming (deletes its shards and manifest).
    fresh: bool = False
    # The shards' vector values: float32 (lossless, the default) or float16 (half the bytes; recall cost in
    # `reembed validate --quantization`). Recorded in the manifest; a resume may not change it.
    dtype: Literal["float32", "float16"] = "float32"


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL
    revision: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: float16 on GPU (bfloat16 where supported), float32 on CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # auto: torch on GPU; on CPU the transformer in ONNX Runtime (float32, same vectors, ~1.5x faster) where
    # onnxruntime is installed. onnx-int8: dynamic int8 on CPU (~2.2x, cosine ~0.99 to float32; its own fingerprint).
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    # None keeps the model's own setting (512 for BGE-large, 256 for all-MiniLM-L6-v2).
    max_seq_length: Optional[int] = None
    # None keeps the model's own setting (BGE and MiniLM ship a Normalize module).
    normalize: Optional[bool] = None
    # Padded tokens per forward pass; None picks a tuned profile or a device default.
    batch_tokens: Optional[int] = None
    # Upper bound on rows per forward pass, whatever the token budget allows.
    max_batch_rows: int = 1024
    compile: bool = False


@dataclass(frozen=True)
class PlanConfig:
    # Rows per output shard: the unit of commit and resume.
    shard_rows: int = 10_000
    # Duplicate-id detection across the corpus: "hash" (hash-partitioned, the first occurrence in plan
    # order wins, later ones are dead-lettered) or "none" for inputs whose ids are known to be unique
    # (no id is read at planning; the manifest records that it was off).
    dedup: Literal["hash", "none"] = "hash"
    # Identical texts across the whole corpus are embedded once and the vector written for every id that
    # carries the text (reembed.texts: planned by text hash; rows whose first occurrence is in another shard
    # are written by copy shards after the regular ones). false: only a block's identical texts are. auto:
    # planned, then the copy pass is kept only where it costs less than the embedding it saves (reembed.texts.decide).
    dedup_texts: Literal[True, False, "auto"] = "auto"
    # An earlier output of the same model (`reembed run --reuse OUT1`): rows whose id and text are unchanged
    # there take its vectors instead of being embedded (reembed.reuse); planned once, with the plan.
    reuse: Optional[str] = None


@dataclass(frozen=True)
class ComputeConfig:
    # Ray cluster address; None uses RAY_ADDRESS or starts a local Ray.
    ray_address: Optional[str] = None
    # Embedder actor pool, autoscaled between min and max. max None: one per GPU in the cluster,
    # or on CPU-only clusters as many as leave a CPU for the read tasks.
    min_actors: int = 1
    max_actors: Optional[int] = None
    gpus_per_actor: float = 1.0
    # CPUs reserved per Embedder actor; None: 1 on GPU, on CPU all but one CPU of a node.
    cpus_per_actor: Optional[float] = None
    # Blocks queued per actor so the device never waits for the next one.
    batches_in_flight: int = 2
    read_cpus: float = 0.25


@dataclass(frozen=True)
class StorageConfig:
    # S3-compatible endpoint (MinIO, Ceph, R2), e.g. http://minio.internal:9000. None: AWS_ENDPOINT_URL_S3,
    # AWS_ENDPOINT_URL or the AWS profile's endpoint_url, else AWS itself. Credentials never go here.
    endpoint_url: Optional[str] = None
    # None: AWS_REGION, AWS_DEFAULT_REGION or the profile, else the bucket's own region.
    region: Optional[str] = None
    # Attempts per S3 request on throttling, 5xx and dropped connections (backoff between); other 4xx fail at once.
    max_attempts: int = 8


@dataclass(frozen=True)
class IndexConfig:
    # Build the indexes at the end of `reembed run` (`reembed index` builds them whatever this says).
    enabled: bool = False
    # sq8 (8-bit scalar codes) and pq (product-quantizer codes) are lossy by choice: see validate --quantization.
    faiss: Literal["auto", "flat", "ivf", "hnsw", "sq8", "pq", "none"] = "auto"
    # FAISS memory budget: auto picks the index type from it, ivf switches to PQ codes above it.
    faiss_memory: str = "16G"
    recall_target: float = 0.95
    # "embedded" (OUTPUT/indexes/qdrant), a folder, an http(s):// server URL, or "none".
    qdrant: str = "embedded"
    collection: str = "documents"
    # Qdrant's in-RAM vectors: none (lossless, the default), int8 (scalar, quantile 0.99, searched with
    # rescoring) or binary (1 bit per dimension; for 1024-d and wider models), originals kept for rescoring.
    qdrant_quantization: Literal["none", "int8", "binary"] = "none"
    batch_size: int = 256
    upload_workers: int = 4  # against a server; embedded Qdrant takes a single writer


@dataclass(frozen=True)
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    on_bad_file: Literal["fail", "skip"] = "fail"



def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Build a :class:`JobConfig` from an optional YAML file and ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from e
        try:
            loaded = _load_yaml(text, str(path))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    cfg = build(JobConfig, data, source=source, prefix="")
    for item in overrides:
        cfg = apply_override(cfg, item)
    return cfg


# A job.yaml is a few dozen keys. YAML aliases let a few hundred bytes stand for billions of nodes (the
# "billion laughs"); PyYAML shares the aliased objects, but anything that walks or prints the value expands
# them. Refuse a document whose expanded size is past this many nodes, before constructing anything.
MAX_YAML_NODES = 10_000


def _load_yaml(text: str, source: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            size = _expanded_size(node, {})
            if size > MAX_YAML_NODES:
                raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values through its "
                                  "aliases (&anchor / *alias); a job config needs no such nesting: write the values out")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (memoised: linear in the document)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a recursive alias counts once instead of looping
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        memo[key] = min(memo[key], MAX_YAML_NODES + 1)
    return memo[key]


def _show(value: Any) -> str:
    """A value echoed in an error message: bounded, whatever the user wrote."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 60, 60, 4, 4, 2
    return r.repr(value)


def apply_override(cfg: JobConfig, item: str) -> JobConfig:
    """Apply one ``section.key=value`` override (value parsed as YAML: ``8``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.dtype=bfloat16")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = _load_yaml(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return replace_path(cfg, parts, value, source=f"--set {item}")


def replace_path(obj: Any, parts: list[str], value: Any, source: str) -> Any:
    """Return a copy of the dataclass ``obj`` with the nested field at ``parts`` set to ``value``."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = parts[0]
    if name not in fields:
        raise ConfigError(f"{source}: unknown key {name!r} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(type(obj))
    if len(parts) == 1:
        new = _coerce(hints[name], value, key=".".join(parts), source=source)
    else:
        child = getattr(obj, name)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{source}: {name!r} is a value, not a section")
        new = replace_path(child, parts[1:], value, source)
    return dataclasses.replace(obj, **{name: new})


def build(cls: type, data: Any, source: str, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = ""
            if any(s in str(key).lower() for s in _SECRET_HINTS):
                hint = " (secrets never go in config files: use the environment or the credential chain)"
            raise ConfigError(
                f"{source}: unknown key {full!r}{hint}; known keys in {where}: {', '.join(sorted(names))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value if value is not None else {}, source, f"{full}.")
        else:
            kwargs[key] = _coerce(tp, value, key=full, source=source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {key} must be a list of strings, got {_show(value)}")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(f"{source}: {key} must be >= 0, got {value}")
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(f"{source}: {key} must be >= 0, got {value}")
            return float(value)
        raise ConfigError(f"{source}: {key} must be a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} must be a string, got {_show(value)}")
    raise ConfigError(f"{source}: {key}: unsupported setting type {tp}")  # pragma: no cover


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that need the whole config."""
    if not cfg.input.uri:
        raise ConfigError("input.uri is required (--input)")
    if not cfg.output.uri:
        raise ConfigError("output.uri is required (--output)")
    if cfg.plan.shard_rows < 1:
        raise ConfigError(f"plan.shard_rows must be >= 1, got {cfg.plan.shard_rows}")
    if cfg.storage.max_attempts < 1:
        raise ConfigError(f"storage.max_attempts must be >= 1, got {cfg.storage.max_attempts}")
    if cfg.compute.min_actors < 1:
        raise ConfigError(f"compute.min_actors must be >= 1, got {cfg.compute.min_actors}")
    if cfg.compute.max_actors is not None and cfg.compute.max_actors < cfg.compute.min_actors:
        raise ConfigError(
            f"compute.max_actors ({cfg.compute.max_actors}) is below compute.min_actors ({cfg.compute.min_actors})"
        )
    if cfg.model.max_seq_length is not None and cfg.model.max_seq_length < 2:
        raise ConfigError(f"model.max_seq_length must be >= 2, got {cfg.model.max_seq_length}")
    if cfg.input.id_column == cfg.input.text_column:
        raise ConfigError("input.id_column and input.text_column must differ")
