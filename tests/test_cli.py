"""The command line as a user meets it: one line per mistake, -v/-q anywhere, --version, a closed pipe, a
hostile YAML file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from reembed import cli
from reembed.errors import ConfigError, InputError, ReembedError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def reembed(*argv: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reembed", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**_env(), **kw.pop("env", {})}, **kw)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": SRC}


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
model:
  name: *g
"""


def test_yaml_alias_bomb_is_refused_at_once_in_one_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 500
    t0 = time.monotonic()
    proc = reembed("run", "--config", str(path), "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                   timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reembed: error: ") and "aliases" in lines[0]
    assert len(lines[0]) < 400


def test_a_large_wrong_value_is_echoed_bounded(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  name: [" + ", ".join(["x" * 100] * 500) + "]\n")
    with pytest.raises(ConfigError) as e:
        from reembed.config import load_config

        load_config(path)
    assert "model.name must be a string" in str(e.value) and len(str(e.value)) < 400


def test_version_and_verbosity_anywhere(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("reembed ")
    args = cli.build_parser().parse_args(["status", "x", "-vv"])
    assert args.verbose == 2 and args.quiet == 0
    args = cli.build_parser().parse_args(["-v", "status", "x", "-q"])
    assert args.verbose == 1 and args.quiet == 1
    args = cli.build_parser().parse_args(["status", "x"])
    assert args.verbose == 0 and args.quiet == 0


def test_every_reembed_error_is_one_line_and_exit_code(capsys, monkeypatch):
    from reembed.cli import run as cli_run

    def fail(args):
        raise InputError("a.parquet: no column 'text' (set --text-column)\nsecond line")

    monkeypatch.setattr(cli_run, "cmd_status", fail)
    assert cli.main(["status", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reembed: error: a.parquet: no column 'text' (set --text-column) second line"]
    assert cli.main(["status", "x", "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err  # details with -v


def test_error_wrapped_by_ray_is_unwrapped_and_stripped_of_colour():
    class RayTaskError(Exception):  # the shape of ray.exceptions.RayTaskError: the task's error as .cause
        def __init__(self, cause):
            super().__init__("\x1b[36mray::ReadShard()\x1b[39m\n  File ...\n" + str(cause))
            self.cause = cause

    inner = InputError("\x1b[31mb.jsonl:3: not valid JSON\x1b[0m")
    wrapped = RuntimeError("Failed to execute")
    wrapped.__cause__ = RayTaskError(inner)
    err = cli.user_error(wrapped)
    assert err is inner and cli.one_line(err) == "b.jsonl:3: not valid JSON"
    assert cli.user_error(RuntimeError("a bug")) is None
    assert isinstance(cli.user_error(FileNotFoundError(2, "No such file", "x.yaml")), FileNotFoundError)


def test_all_errors_share_one_base():
    import inspect

    import reembed.errors as E

    classes = [c for _, c in inspect.getmembers(E, inspect.isclass) if c.__module__ == E.__name__]
    assert len(classes) > 10 and all(issubclass(c, ReembedError) for c in classes)
    assert ConfigError.exit_code == 2 and InputError.exit_code == 1


def test_status_into_a_closed_pipe_is_quiet(tmp_path):
    from conftest import make_docs  # noqa: F401 (the conftest is importable: tests run from the repo)
    from reembed.manifest import Manifest
    from reembed.storage import Location

    out = tmp_path / "out"
    model = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "dtype": "float32",
             "max_seq_length": 8, "fingerprint": "f" * 16}
    plan = {"input_uri": str(tmp_path), "rows": 0, "files": [], "bad_files": [], "passthrough": [],
            "shards": [{"shard": i, "rows": 0, "segments": []} for i in range(5000)]}
    Manifest.create(Location.from_uri(str(out)), model, plan, {"path": "plan/duplicates.parquet", "rows": 0,
                                                                "sha256": "0" * 64})
    proc = subprocess.run(f"{sys.executable} -m reembed status {out} --json | head -c 10", shell=True,
                          capture_output=True, text=True, timeout=60, env=_env())
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stdout) == 10


def test_public_api_names_resolve_and_are_not_shadowed():
    import importlib

    import reembed

    for name in reembed.__all__:
        assert getattr(reembed, name) is not None, name
    for name in ("validate", "search", "swap", "rollback", "run", "status", "export"):
        assert callable(getattr(reembed, name)), name
    # importing the modules behind the API does not replace the functions with modules
    for module in ("reembed.validation", "reembed.indexes.search", "reembed.indexes.swap", "reembed.migrate"):
        importlib.import_module(module)
    assert callable(reembed.validate) and callable(reembed.search)
