"""Turning texts into vectors with a sentence-transformers model, fast, in the order the flow runs:

* :mod:`~reembed.embed.model` - load the model, choose device, dtype and backend, and say what defines
  its embedding space (:func:`describe_model`, :func:`fingerprint`);
* :mod:`~reembed.embed.tokenize` - whole-block tokenization and the tokenizer processes;
* :mod:`~reembed.embed.embedder` - the :class:`Embedder` (token-budget batches, the device loop, the
  Ray Data UDF) and :func:`check_backend`, the driver's check before any actor starts;
* :mod:`~reembed.embed.fastpaths` - the GPU-only fast paths of the torch backend;
* :mod:`~reembed.embed.onnx` - the transformer in ONNX Runtime (float32 and int8) on CPU.

The names other modules import stay importable from ``reembed.embed``.
"""

from reembed.embed import onnx
from reembed.embed.embedder import DEFAULT_BATCH_TOKENS, Embedder, EmbedStats, Prepared, check_backend, token_budget_batches
from reembed.embed.model import (BACKENDS, cpu_supports_bf16, describe_model, fingerprint, load_model, model_revision,
                                 query_backend, resolve_backend, resolve_device, resolve_dtype, space_dtype)
from reembed.embed.tokenize import BlockTokenizer, Tokens
from reembed.errors import ModelLoadError, OnnxUnavailable
from reembed.testing import CRASH_ONCE_ENV  # the pipeline passes it to the Embedder (a test hook)

__all__ = [
    "BACKENDS", "CRASH_ONCE_ENV", "DEFAULT_BATCH_TOKENS", "BlockTokenizer", "EmbedStats", "Embedder", "ModelLoadError",
    "OnnxUnavailable", "Prepared", "Tokens", "check_backend", "cpu_supports_bf16", "describe_model", "fingerprint",
    "load_model", "model_revision", "onnx", "query_backend", "resolve_backend", "resolve_device", "resolve_dtype",
    "space_dtype", "token_budget_batches",
]
