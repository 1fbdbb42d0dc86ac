"""ONNX Runtime for the CPU path: the model's transformer exported once, cached, and run by onnxruntime.

On CPU, onnxruntime runs a BERT-family encoder about 1.5x faster than eager PyTorch at the same float32
precision (all-MiniLM-L6-v2 on 2 cores, bench/RESULTS.md), and its dynamic int8 quantization takes that to
about 2x at a small, measured cost in accuracy (cosine ~0.99 to the float32 vectors; see
:func:`quantize_int8` for the recipe and why it is not ONNX Runtime's default).
sentence-transformers' own ``backend="onnx"`` does the same through ``optimum``; this module needs only
``onnxruntime`` (and ``onnx`` for int8), so it works wherever those wheels install.

Only the transformer (token ids -> token embeddings) runs in ONNX Runtime; pooling, Dense and Normalize
stay the model's own sentence-transformers modules, so the output is computed exactly as ``encode``
computes it. Exports live under ``$REEMBED_CACHE_DIR/onnx`` (default ``~/.cache/reembed/onnx``), keyed
by the model's revision and the torch version, and are published atomically, so concurrent actors on
one node share one export.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from reembed.errors import OnnxUnavailable

log = logging.getLogger(__name__)

INT8_RECIPE = 2  # in the int8 file's name: a new recipe never reuses a file quantized by an old one
VARIANTS = {"onnx": "model.onnx", "onnx-int8": f"model_qint8.r{INT8_RECIPE}.onnx"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXPORT_VERSION = 1  # bump when the export recipe changes, so old cached files are not reused
# protobuf's hard limit on one ONNX file; the export keeps weights inside the file.
MAX_EXPORT_BYTES = 2 << 30
FAILED = "export-failed.txt"  # why the export of this model failed, so later starts fall back at once


def cache_dir() -> Path:
    root = os.environ.get("REEMBED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "reembed")
    return Path(root) / "onnx"


def available(variant: str = "onnx") -> str | None:
    """None when the packages for ``variant`` import, else what is missing."""
    need = ["onnxruntime"] + (["onnx"] if variant == "onnx-int8" else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"pip install {' '.join(missing)}" if missing else None


class OnnxTransformer:
    """The model's first module (a sentence-transformers ``Transformer``) run by ONNX Runtime.

    ``__call__(feats)`` takes the collated CPU tensors (input_ids, attention_mask, token_type_ids) and
    returns the token embeddings as a float32 torch tensor, ready for the model's pooling modules.
    """

    def __init__(self, st_model, name: str, revision: str, variant: str = "onnx", threads: int | None = None):
        if variant not in VARIANTS:
            raise OnnxUnavailable(f"unknown ONNX variant {variant!r} (one of {', '.join(VARIANTS)})")
        missing = available(variant)
        if missing:
            raise OnnxUnavailable(f"backend {variant!r} needs packages that are not installed ({missing})")
        first = st_model[0]
        check_exportable(first, name)
        import onnxruntime as ort
        import torch

        self.variant = variant
        self.output_name = getattr(first, "module_output_name", None) or "token_embeddings"
        self.path = ensure_export(first.auto_model, name, revision, variant)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.threads = opts.intra_op_num_threads

    def __call__(self, feats: dict[str, Any]):
        import torch

        ids = feats["input_ids"].numpy()
        # A tokenizer without token_type_ids: the model's own default, all zeros (segment A).
        feed = {k: feats[k].numpy() if k in feats else np.zeros_like(ids) for k in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0])


def check_exportable(first, name: str) -> None:
    """Refuse what the export recipe does not cover (the torch backend runs those)."""
    model = getattr(first, "auto_model", None)
    if type(first).__name__ != "Transformer" or model is None:
        raise OnnxUnavailable(f"{name}: the first module is {type(first).__name__}, not a Hugging Face transformer")
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "is_decoder", False):
        raise OnnxUnavailable(f"{name}: only encoder models are exported ({type(model).__name__})")
    if getattr(cfg, "output_hidden_states", False):
        raise OnnxUnavailable(f"{name}: the model pools over hidden states of all layers")
    method = getattr(first, "method_output_name", None)
    if method not in (None, ["last_hidden_state"], ("last_hidden_state",)):
        raise OnnxUnavailable(f"{name}: the model's output is {method!r}, not the last hidden state")


def ensure_export(model, name: str, revision: str, variant: str) -> Path:
    """The cached ONNX file for this model and variant, exported (and quantized) first if missing."""
    import torch

    key = hashlib.sha256(f"{name}|{revision}|{torch.__version__}|{EXPORT_VERSION}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/"))[-60:].lstrip("._-")  # never a hidden folder
    folder = cache_dir() / f"{slug}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxUnavailable(f"cannot create the ONNX cache folder {folder} ({e}); set REEMBED_CACHE_DIR "
                              "to a writable folder") from e
    fp32 = folder / VARIANTS["onnx"]
    failed = folder / FAILED
    if not fp32.exists() and failed.exists():  # do not spend minutes on a known failure at every start
        raise OnnxUnavailable(f"{failed.read_text().strip()} (remembered in {failed}; delete it to try again)")
    if not fp32.exists():
        t0 = time.perf_counter()
        try:
            _publish(fp32, lambda tmp: export(model, tmp))
        except OnnxUnavailable as e:
            why = f"{name}: {e}\n"
            _publish(failed, lambda tmp: tmp.write_text(why))
            raise
        log.info("%s: exported to ONNX in %.1f s (%s, %.0f MB)", name, time.perf_counter() - t0, fp32,
                 fp32.stat().st_size / 1e6)
    if variant == "onnx":
        return fp32
    target = folder / VARIANTS[variant]
    if not target.exists():
        t0 = time.perf_counter()
        _publish(target, lambda tmp: quantize_int8(fp32, tmp))
        log.info("%s: quantized to int8 in %.1f s (%s, %.0f MB)", name, time.perf_counter() - t0, target,
                 target.stat().st_size / 1e6)
    return target


def export(model, path: Path) -> None:
    """Export ``model`` (token ids -> last hidden state) with dynamic batch and sequence axes."""
    import torch

    names = [n for n in INPUTS if n == "input_ids" or n in _forward_params(model)]
    if "attention_mask" not in names:
        raise OnnxUnavailable(f"{type(model).__name__} takes no attention_mask")

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args)), return_dict=True)[0]

    rows, width = 2, 16  # a padded example; the axes are dynamic, the mask path is the padded one
    token = min(1000, int(getattr(model.config, "vocab_size", 1001)) - 1)
    ids = torch.full((rows, width), token, dtype=torch.long)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[1, width // 2:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    args = tuple(example[n] for n in names)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python bools; the check below is what counts
            torch.onnx.export(
                Wrapped(model), args, str(path), dynamo=False, opset_version=17,
                input_names=list(names), output_names=["token_embeddings"],
                dynamic_axes={n: {0: "rows", 1: "tokens"} for n in [*names, "token_embeddings"]},
            )
    except Exception as e:  # the tracer's failures have no common base class; report, the caller falls back
        raise OnnxUnavailable(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    if path.stat().st_size >= MAX_EXPORT_BYTES:
        raise OnnxUnavailable(f"{type(model).__name__} is too large for a single-file ONNX export (2 GiB limit)")


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization: weights int8 per output channel, activations uint8 per tensor, quantized
    on the fly. Two choices differ from ONNX Runtime's defaults, each measured on all-mpnet-base-v2 (whose
    vectors the defaults collapse to cosine ~0.06) and all-MiniLM-L6-v2 (cosine 0.97 -> 0.99):

    * ``reduce_range``: 7-bit weights. On CPUs without VNNI (AVX2 only) the uint8 x int8 kernels add
      pairs of products in int16 (``vpmaddubsw``), which saturates once 255 x |w| x 2 passes 32767; with
      8-bit weights that wrecks MPNet's attention projections. 7-bit weights never saturate, and every
      CPU then computes the same int8 vectors.
    * the feed-forward down-projections (weight ``[intermediate, hidden]``) stay float32: their input,
      the GELU output, is long-tailed, so one uint8 scale per tensor loses most of it (all-mpnet-base-v2
      keeps cosine ~0.89 even with exact int8 arithmetic while they are quantized, ~0.99 without).
    """
    from onnx import load as load_onnx  # the ONNX package, not this module
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_onnx(str(src), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    down = [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2 and shapes[n.input[1]][0] > shapes[n.input[1]][1]]
    del model
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizer logs skipped nodes and advice on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         nodes_to_exclude=down)
    finally:
        root.setLevel(level)


def _publish(target: Path, write) -> None:
    """Write under a temporary name in the same folder, then rename: readers see a whole file or none."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)
