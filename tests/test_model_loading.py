"""Model names resolve through the Hugging Face cache exactly as for any sentence-transformers user."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from reembed import embed


def _fake_hub_cache(root, repo: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out ``folder`` as the hub cache does: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = root / "hub" / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    shutil.copytree(folder, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return commit


def test_hub_name_resolves_through_cache_offline(tmp_path, tiny_model):
    # A fresh process, as for a user: the hub library reads HF_HOME when it is imported.
    commit = _fake_hub_cache(tmp_path, "acme/tiny-embedder", tiny_model)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = ("import json; from reembed import embed; m = embed.load_model('acme/tiny-embedder'); "
            "print(json.dumps(embed.describe_model(m, 'acme/tiny-embedder', 'auto')))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["revision"] == commit
    assert info["dimension"] == 32 and info["pooling"] == "cls" and info["normalize"] is True


def test_missing_weights_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(embed.ModelLoadError) as e:
        embed.load_model("BAAI/bge-large-en-v1.5")
    msg = str(e.value)
    assert "BAAI/bge-large-en-v1.5" in msg and "not found in the local Hugging Face cache" in msg
    assert "huggingface-cli download" in msg and "--model /path" in msg


def test_minilm_identity(minilm):
    model = embed.load_model(str(minilm))
    info = embed.describe_model(model, str(minilm), "auto")
    assert info["dimension"] == 384 and info["max_seq_length"] == 256 and info["pooling"] == "mean"
    assert info["normalize"] is True and info["revision"].startswith("sha256:")
    # A different setting is a different fingerprint.
    assert embed.fingerprint({**info, "max_seq_length": 128}) != info["fingerprint"]
