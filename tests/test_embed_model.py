"""Loading a model: every mistake a user can make is one ModelLoadError line naming the folder or file,
the cause and the fix (the hub-cache resolution itself is tests/test_model_loading.py)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reembed.embed import ModelLoadError, load_model
from reembed.embed.model import architecture, position_limit


def weights_as_pickle(src: Path, dst: Path, extra=None, corrupt: bool = False) -> Path:
    """A copy of ``src`` whose weights are ``pytorch_model.bin`` (torch.save pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    if corrupt:
        (dst / "pytorch_model.bin").write_bytes(os.urandom(4096))
    else:
        torch.save({**state, **(extra or {})}, dst / "pytorch_model.bin")
    return dst


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    return msg


def test_pickle_weights_with_code_are_refused_with_file_cause_and_fix(tiny_model, tmp_path):
    folder = weights_as_pickle(tiny_model, tmp_path / "pickled", extra={"args": argparse.Namespace(a=1)})
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder))
    msg = one_line(e)
    assert str(folder / "pytorch_model.bin") in msg and "argparse.Namespace" in msg
    assert "safetensors" in msg and "weights_only=False" in msg


def test_corrupt_pickle_and_corrupt_safetensors_are_one_line(tiny_model, tmp_path):
    folder = weights_as_pickle(tiny_model, tmp_path / "corrupt-bin", corrupt=True)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder))
    assert str(folder / "pytorch_model.bin") in one_line(e)
    broken = tmp_path / "corrupt-st"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(broken))
    msg = one_line(e)
    assert str(broken / "model.safetensors") in msg and "corrupt" in msg


def test_plain_pickle_weights_still_load(tiny_model, tmp_path):
    """A pickle of tensors only is what torch's weights_only loader accepts: no reason to refuse it."""
    import numpy as np

    folder = weights_as_pickle(tiny_model, tmp_path / "plain-bin")
    texts = ["a short text", "the cat and the dog"]
    np.testing.assert_allclose(load_model(str(folder)).encode(texts), load_model(str(tiny_model)).encode(texts),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["/no/such/model/folder", "./no-such-model", "~/no-such-model"])
def test_missing_folder_says_no_such_folder(name):
    with pytest.raises(ModelLoadError) as e:
        load_model(name)
    msg = one_line(e)
    assert msg.startswith(f"{name}: no such model folder")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "empty"))
    msg = one_line(e)
    assert "cannot load a sentence-transformers model from this folder" in msg and "config.json" in msg


def test_uncached_hub_name_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("acme/never-downloaded")
    assert "not found in the local Hugging Face cache" in one_line(e)


def test_max_seq_length_beyond_the_position_table_is_refused(tiny_model, tmp_path):
    from reembed.testing import tiny_encoder

    assert position_limit(load_model(str(tiny_model))) == 128
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tiny_model), max_seq_length=1000)
    assert "model.max_seq_length 1000" in one_line(e) and "1..128" in str(e.value)
    with pytest.raises(ModelLoadError, match="max_seq_length 0"):
        load_model(str(tiny_model), max_seq_length=0)
    assert load_model(str(tiny_model), max_seq_length=64).max_seq_length == 64
    # RoBERTa-style positions start after the padding index (0 here): 130 slots hold 129 tokens
    roberta = load_model(str(tiny_encoder(tmp_path / "roberta", "roberta")))
    assert architecture(roberta) == "roberta" and position_limit(roberta) == 129
    assert load_model(str(tmp_path / "roberta"), max_seq_length=129).encode(["word " * 300]).shape == (1, 32)
    with pytest.raises(ModelLoadError, match="1..129"):
        load_model(str(tmp_path / "roberta"), max_seq_length=130)


def test_cli_run_on_pickle_weights_is_one_line_exit_1(tiny_model, tmp_path):
    """Through the CLI, as a user meets it: the driver loads the model before Ray starts."""
    from conftest import make_docs, write_parquet

    write_parquet(tmp_path / "in" / "docs.parquet", make_docs(10))
    folder = weights_as_pickle(tiny_model, tmp_path / "pickled", extra={"args": argparse.Namespace(a=1)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "reembed", "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
         "--model", str(folder)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("reembed:")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and "pytorch_model.bin" in lines[0] and "safetensors" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_unknown_device_and_dtype_are_one_line(tiny_model):
    from reembed.embed import Embedder, resolve_device, resolve_dtype

    with pytest.raises(ModelLoadError, match="model.device 'mps' is not one of auto, cpu, cuda"):
        resolve_device("mps")
    with pytest.raises(ModelLoadError, match="model.dtype 'int4' is not one of"):
        resolve_dtype("int4", "cpu")
    with pytest.raises(ModelLoadError, match="model.dtype 'fp16'"):
        Embedder({"name": str(tiny_model), "device": "cpu", "dtype": "fp16"})
