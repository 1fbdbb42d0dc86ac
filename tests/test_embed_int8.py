"""``--backend onnx-int8``: right for every tiny architecture, or refused on the driver in one line.

The int8 recipe (:func:`reembed.embed.onnx.quantize_int8`) keeps the feed-forward down-projections in
float32 and uses 7-bit weights; ONNX Runtime's defaults collapsed all-mpnet-base-v2 to cosine 0.06.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reembed.embed import Embedder, ModelLoadError, check_backend, onnx
from reembed.testing import TINY_ARCHITECTURES, tiny_bert, tiny_encoder

from test_embed import encode, mixed_texts

ARCHITECTURES = ("bert", *TINY_ARCHITECTURES)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def tiny(folder: Path, architecture: str) -> Path:
    return tiny_bert(folder, pooling="mean") if architecture == "bert" else tiny_encoder(folder, architecture)


def int8_hostile(folder: Path) -> Path:
    """A tiny MPNet whose float32 output is ordinary but which no per-channel int8 can represent: hidden
    channel 0 is exactly 0 after every LayerNorm, and every projection that reads the hidden states
    carries a weight of 1000 on it. The float model never sees those weights (0 x 1000); int8 gives each
    output channel's whole range to them and rounds the real weights to 0. (Real checkpoints grow such
    outlier weights too; this one makes it certain.)"""
    import torch
    from sentence_transformers import SentenceTransformer

    tiny_encoder(folder, "mpnet")
    model = SentenceTransformer(str(folder), device="cpu")
    with torch.no_grad():
        for name, mod in model[0].auto_model.named_modules():
            last = name.split(".")[-1]
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight[0] = 0.0
                mod.bias[0] = 0.0
            elif isinstance(mod, torch.nn.Linear):
                if last in ("q", "k", "v") or name.endswith("intermediate.dense"):
                    mod.weight[:, 0] = 1000.0
                if last in ("v", "o") or name.endswith("output.dense"):
                    mod.weight *= 10.0  # the layers, not the residual stream, make the output
    model.save(str(folder))
    return folder


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_int8_matches_float_for_every_tiny_architecture(architecture, tmp_path):
    path = tiny(tmp_path / architecture, architecture)
    texts = mixed_texts(40, seed=29)
    emb = Embedder({"name": str(path), "device": "cpu", "backend": "onnx-int8"}, batch_tokens=700)
    assert emb.backend == "onnx-int8" and emb._onnx.path.name == onnx.VARIANTS["onnx-int8"]
    got, ref = emb.embed(texts)[0], encode(path, texts)
    assert cosines(got, ref).min() > 0.99, architecture


def test_int8_recipe_keeps_down_projections_float_and_weights_7_bit(tmp_path):
    """What the recipe quantizes, read back from the int8 file: every projection but the feed-forward
    down-projections, with weights within 7 bits (no int16 saturation on CPUs without VNNI)."""
    import onnx as onnx_proto
    from onnx import numpy_helper

    emb = Embedder({"name": str(tiny(tmp_path / "mpnet", "mpnet")), "device": "cpu", "backend": "onnx-int8"})
    model = onnx_proto.load(str(emb._onnx.path))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("MatMulInteger") == 2 * 5  # 2 layers x (q, k, v, o, intermediate)
    float_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(float_matmuls) == 2 and all(weights[n.input[1]].shape == (64, 32) for n in float_matmuls)
    int8 = [w for w in weights.values() if w.dtype == np.int8 and w.ndim == 2]
    assert int8 and max(int(np.abs(w.astype(np.int32)).max()) for w in int8) <= 64  # 255 x 64 x 2 < 32767


def test_int8_hostile_model_is_refused_by_the_driver_check_in_one_line(tmp_path):
    path = int8_hostile(tmp_path / "hostile")
    model = {"name": str(path), "backend": "onnx-int8"}
    with pytest.raises(ModelLoadError) as e:
        check_backend(model, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "(mpnet)" in msg and "use --backend onnx (float32)" in msg
    assert "cosine" in msg
    # the float ONNX backend is right for it, and the check says so by returning it
    assert check_backend({**model, "backend": "onnx"}, "cpu") == "onnx"
    texts = mixed_texts(20, seed=31)
    got = Embedder({**model, "device": "cpu", "backend": "onnx"}).embed(texts)[0]
    np.testing.assert_allclose(got, encode(path, texts), atol=2e-6, rtol=0)


def test_check_backend_refuses_impossible_settings_without_loading_anything(tmp_path):
    missing = str(tmp_path / "never-loaded")  # nothing is loaded: a missing folder does not matter here
    with pytest.raises(ModelLoadError, match="backend 'onnx-int8' runs on CPU only"):
        check_backend({"name": missing, "backend": "onnx-int8"}, "cuda")
    with pytest.raises(ModelLoadError, match="unknown backend 'tensorrt'"):
        check_backend({"name": missing, "backend": "tensorrt"}, "cpu")
    with pytest.raises(ModelLoadError, match="applies to the torch backend"):
        check_backend({"name": missing, "backend": "onnx"}, "cpu", compile=True)
    assert check_backend({"name": missing, "backend": "auto"}, "cuda") == "torch"
    assert check_backend({"name": missing}, "cpu") == "onnx"  # auto on CPU; an actor falls back itself


def test_cli_run_int8_on_hostile_mpnet_is_one_line_exit_1(tmp_path):
    from conftest import make_docs, write_parquet

    write_parquet(tmp_path / "in" / "docs.parquet", make_docs(20))
    path = int8_hostile(tmp_path / "hostile-mpnet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "reembed", "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
         "--model", str(path), "--backend", "onnx-int8"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("reembed:")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and "use --backend onnx (float32)" in lines[0] and str(path) in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "SystemException" not in proc.stderr
    assert not (tmp_path / "out" / "shards").exists()
