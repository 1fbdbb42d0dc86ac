"""What a person reads: Ray's console output off at the default verbosity, reembed's own progress and
per-phase timings, a missing model refused before Ray starts, ``run --dry-run``, exit codes (1 failed,
2 usage, 3 refused), byte counts, and the demo's next steps run exactly as printed."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_docs, write_jsonl, write_parquet
from reembed import cli, errors
from reembed.phases import Phases, Progress

SRC = Path(__file__).resolve().parents[1] / "src"

# A line Ray (not reembed) printed: its log format, its progress blocks, its C++ core worker, a worker's
# forwarded output, a notice, or terminal control codes and progress-bar frames.
RAY_LINE = re.compile(
    r"\t(DEBUG|INFO|WARNING|ERROR) \w+\.py:\d+ -- |^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]|"
    r"core_worker|logging_progress|streaming_executor|Running Dataset|Token authentication|RAY_AUTH_MODE|"
    r"^\((\S+ )?pid=\d+|Loading weights|Writing model shards|\x1b\[|\r"
)
FORWARDED = re.compile(r"^\((?:\S+ )?pid=(\d+)(?:, ip=[\d.]+)?\)")


def without_crash_reports(lines: list[str]) -> list[str]:
    """``lines`` less the forwarded output of a Ray worker process that crashed (a fatal signal dump): a
    crash stays visible at every verbosity on purpose, and is not the chatter this module keeps off."""
    crashed = {m.group(1) for line in lines if (m := FORWARDED.match(line))
               and re.search(r"Fatal Python error|SIGABRT|SIGSEGV", line)}
    return [line for line in lines if not ((m := FORWARDED.match(line)) and m.group(1) in crashed)]


@pytest.fixture
def ray_tmp():
    """A Ray temp folder of the test's own, short enough for Ray's socket paths (107 bytes)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield folder / "ray"
    shutil.rmtree(folder, ignore_errors=True)


def env_for(ray_tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(ray_tmp)}
    env.update(extra)
    return env


def reembed(*argv: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    # stdout and stderr are pipes: not a terminal, as in CI or a log file.
    return subprocess.run([sys.executable, "-m", "reembed", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def small_corpus(folder: Path) -> Path:
    docs = make_docs(240)
    docs[7]["id"] = docs[3]["id"]  # one duplicate id
    write_parquet(folder / "a.parquet", docs[:160])
    write_jsonl(folder / "b.jsonl", docs[160:])
    return folder


# ---------------------------------------------------------------------------------------------------
# A real run's console: reembed's lines only


@pytest.mark.slow
@pytest.mark.ray
def test_a_real_run_prints_no_ray_lines_and_ends_with_the_phase_table(tiny_model, tmp_path, ray_tmp):
    data = small_corpus(tmp_path / "in")
    proc = reembed("run", "--input", str(data), "--output", str(tmp_path / "out"), "--model", str(tiny_model),
                   "--shard-rows", "100", env=env_for(ray_tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stderr = without_crash_reports(proc.stderr.splitlines())
    ray_lines = [line for line in stderr + proc.stdout.splitlines() if RAY_LINE.search(line)]
    assert ray_lines == [], "\n".join(ray_lines[:20])
    # Every stderr line is one of reembed's log lines.
    assert all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) reembed\.", line) for line in stderr), proc.stderr
    for said in ("checking the model", "starting Ray", "planning", "starting the Embedder actors", "embed: 239 rows"):
        assert said in proc.stderr
    assert "committed shard" not in proc.stderr  # one summary line per stage, not one per shard
    table = proc.stdout[proc.stdout.index("phase "):].splitlines()
    phases = {row.split()[0]: row for row in table[1:]}
    assert {"model", "ray", "plan", "actor", "embed", "total"} <= set(phases), table
    assert phases["total"].split()[-1] == "100%"
    assert re.search(r"tokens: .* [\d.]+ KiB of shards", proc.stdout)


# ---------------------------------------------------------------------------------------------------
# Ray's console output: the switches


def test_the_stderr_filter_drops_only_ray_s_harmless_line_and_passes_frames_at_once(tmp_path):
    """The filter on file descriptor 2, in a process of its own: Ray's C++ line goes, everything else
    (a partial progress frame, a line that only looks similar, Python's stderr) comes through in order."""
    harmless = ("[2026-11-30 08:32:37,021 E 4203 4203] core_worker.cc:2465: Actor with class name: "
                "'MapWorker(MapBatches(Embedder))' and ID: '63cf' has constructor arguments in the object store "
                "and max_restarts > 0. If the arguments ...")
    other = "[2026-11-30 08:32:37,021 E 4203 4203] core_worker.cc:99: Something else went wrong"
    script = f"""
import os, sys, time
from reembed import cluster
cluster._StderrFilter.install(cluster.HARMLESS_RAY_LINES)
os.write(2, b"frame 1/3\\r")
time.sleep(1.0)
sys.stderr.write("python line\\n"); sys.stderr.flush()
os.write(2, {harmless!r}.encode()[:40])
os.write(2, {harmless!r}.encode()[40:] + b"\\n")
os.write(2, {other!r}.encode() + b"\\n")
os.write(2, b"last words")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env_for(tmp_path / "ray"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode() == f"frame 1/3\rpython line\n{other}\nlast words"


def test_ray_data_stays_quiet_unless_verbose():
    from ray.data import DataContext

    from reembed import cluster

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, dict(cluster._console))
    try:
        cluster.configure_console(0)
        assert cluster.ray_data_console() == logging.WARNING
        assert ctx.enable_progress_bars is False and ctx.enable_operator_progress_bars is False
        notice = logging.LogRecord("ray.data", logging.WARNING, "x.py", 1, "Progress bars disabled. To enable, ...",
                                   None, None)
        assert cluster.harmless_ray_data_record(notice)
        cluster.configure_console(1)  # -v: Ray as Ray makes it
        assert cluster.ray_data_console() == logging.INFO
        assert ctx.enable_progress_bars is True and not cluster.harmless_ray_data_record(notice)
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, console = saved
        cluster._console.update(console)


def test_verbosity_reaches_the_console_settings_from_anywhere_on_the_line(monkeypatch, capsys):
    from reembed import cluster
    from reembed.cli import run as cli_run

    seen = []
    monkeypatch.setattr(cli_run, "cmd_status", lambda args: seen.append(dict(cluster._console)) or 0)
    saved = dict(cluster._console)
    try:
        for argv, verbose in ((["status", "x"], False), (["-v", "status", "x"], True), (["status", "x", "-v"], True),
                              (["status", "-q", "x"], False)):
            assert cli.main(argv) == 0
            assert seen[-1]["ray_verbose"] is verbose, argv
    finally:
        cluster._console.update(saved)


# ---------------------------------------------------------------------------------------------------
# Phases and reembed's own progress


def test_phases_nest_without_counting_twice():
    clock = iter([0.0, 1.0, 4.0, 10.0])  # plan starts, ray starts, ray ends, plan ends
    phases = Phases(clock=lambda: next(clock))
    with phases.phase("plan"):
        with phases.phase("ray start"):
            pass
    phases.add("embed", 5.0)
    rows = {p["phase"]: p for p in phases.as_list()}
    assert rows["ray start"]["seconds"] == 3.0 and rows["plan"]["seconds"] == 7.0 and rows["embed"]["seconds"] == 5.0
    assert [p["phase"] for p in phases.as_list()] == ["plan", "ray start", "embed"]
    assert abs(sum(p["share"] for p in phases.as_list()) - 1.0) < 1e-3
    table = cli.phase_table(phases.as_list()).splitlines()
    assert table[0].split() == ["phase", "seconds", "share"]
    assert table[-1].split() == ["total", "15.0", "100%"]
    assert table[1].split() == ["plan", "7.0", "47%"]


def test_progress_off_a_terminal_is_a_log_line_now_and_then(caplog):
    clock = iter([0.0, 20.0, 40.0, 50.0])
    with caplog.at_level(logging.INFO, logger="reembed"):
        bar = Progress(1000, "embedded", clock=lambda: next(clock))  # stderr is not a terminal under pytest
        assert bar.bar is None
        bar.update(100)  # t=20: the first rows (after the actors started), too soon for a line
        bar.update(300)  # t=40: a line; 300 docs in the 20 s since the first rows
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "reembed.phases"]
    assert lines == ["embedded: 400/1000 docs (40%), 15.0 docs/s, about 40 s left"]


def test_byte_counts_read_like_ls_h():
    assert [cli.human_bytes(n) for n in (0, 512, 1536, 92306, 5 * 2**30, None)] == \
        ["0 B", "512 B", "1.5 KiB", "90.1 KiB", "5.0 GiB", "-"]


# ---------------------------------------------------------------------------------------------------
# A missing model: refused in a second or two, before Ray starts


def test_a_missing_default_model_fails_before_ray_starts(tmp_path, ray_tmp):
    data = small_corpus(tmp_path / "in")
    env = env_for(ray_tmp, HF_HOME=str(tmp_path / "empty-hf-home"))
    env.pop("HF_HUB_CACHE", None)
    proc = reembed("run", "--input", str(data), "--output", str(tmp_path / "out"), env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [line for line in proc.stderr.splitlines() if line.strip()]
    err = [line for line in proc.stderr.splitlines() if line.startswith("reembed: error: ")]
    assert len(err) == 1, proc.stderr
    assert re.match(r"reembed: error: BAAI/bge-large-en-v1\.5: model not found in the local Hugging Face cache "
                    r"\(.*empty-hf-home\) and HF_HUB_OFFLINE is set\. Fix: .*huggingface-cli download", err[0])
    assert not ray_tmp.exists()  # no Ray session was created
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_model_hub_that_does_not_answer_is_named_at_once(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    from reembed.embed.model import check_available
    from reembed.errors import ModelLoadError

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=rf"org/not-cached: model not found .* the hub did not answer: "
                                             rf"http://127.0.0.1:{port}"):
        check_available("org/not-cached")
    with pytest.raises(ModelLoadError, match="no such model folder"):
        check_available(str(tmp_path / "no-such-model"))


def test_a_cached_hub_model_and_a_folder_pass_the_early_check_offline(monkeypatch, tmp_path, tiny_model):
    from huggingface_hub import constants

    from reembed.embed.model import check_available
    from test_model_loading import _fake_hub_cache

    _fake_hub_cache(tmp_path, "acme/tiny-embedder", tiny_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert check_available("acme/tiny-embedder") == "cache"
    assert check_available(str(tiny_model)) == "folder"


# ---------------------------------------------------------------------------------------------------
# run --dry-run


@pytest.mark.ray
def test_dry_run_lists_the_plan_and_estimates_from_a_sample_writing_nothing(tiny_model, tmp_path, ray_local, capsys):
    data = small_corpus(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["run", "--dry-run", "--input", str(data), "--output", str(out), "--model", str(tiny_model),
            "--shard-rows", "100"]
    assert cli.main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert not out.exists()  # nothing written to the output
    assert (r["files"], r["rows"], r["duplicate_ids"], r["shards"], r["pending_rows"]) == (2, 240, 1, 3, 240)
    assert [f["rows"] for f in r["files_listed"]] == [160, 80] and r["files_listed"][0]["dup_rows"] == 1
    assert r["model"]["dimension"] == 32 and r["model"]["name"] == str(tiny_model)
    e = r["estimate"]
    assert e["basis"] == "sample" and e["sample_rows"] == 64 and e["device_here"] == "cpu"
    assert e["docs_per_s"] > 0 and e["seconds"] == pytest.approx(240 / e["docs_per_s"], abs=0.051)
    assert e["cost_usd"] > 0 and "CPU" in e["priced_as"]
    assert {p["phase"] for p in r["phases"]} >= {"model check", "plan", "estimate"}

    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert f"dry run:     nothing written to {out}" in text
    assert "2 file(s)" in text and "240 rows, 1 duplicate ids" in text and "a.parquet  parquet" in text
    assert re.search(r"estimate:    \d+ s of embedding at [\d.]+ docs/s, about \$[\d.e-]+ \(\d+ x CPU", text)
    assert not out.exists()


@pytest.mark.ray
def test_dry_run_takes_a_matching_tuned_profile(tiny_model, tmp_path, ray_local, monkeypatch):
    from reembed import dryrun, tune
    from reembed.config import load_config

    monkeypatch.setenv(tune.TUNE_DIR_ENV, str(tmp_path / "tuning"))
    data = small_corpus(tmp_path / "in")
    cfg = load_config(None, [f"input.uri={data}", f"output.uri={tmp_path / 'out'}", f"model.name={tiny_model}",
                             "plan.shard_rows=100", "model.max_seq_length=64", "model.backend=torch"])
    tune.save_profile({"format": tune.FORMAT, "model": str(tiny_model), "device": "cpu", "accelerator": "cpu",
                       "backend": "torch", "max_seq_length": 64, "model_max_seq_length": 128, "dtype": "float32",
                       "batch_tokens": 2048, "chosen": {"budget": 2048, "docs_per_s": 40.0}})
    r = dryrun.dry_run(cfg)
    e = r["estimate"]
    assert e["basis"] == "profile" and e["docs_per_s_per_device"] == 40.0
    assert e["docs_per_s"] == 40.0 * r["pool"]["max"] and e["seconds"] == pytest.approx(240 / e["docs_per_s"], abs=0.1)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Exit codes and the one error prefix


@pytest.mark.parametrize("error, code", [
    (errors.InputError("a.parquet: no column 'text'"), 1),
    (errors.ConfigError("job.yaml: unknown key 'x'"), 2),
    (errors.SwapRefused("documents-v2: 12 points, the output committed 20; --force to swap anyway"), 3),
    (errors.ConcurrentWriteError("out/manifest.json: changed by another job"), 3),
    (errors.VersionConflict("s3://b/out/manifest.json: changed since read"), 3),
    (errors.ObjectExistsError("s3://b/out/_log/000000000001.json: exists"), 3),
    (errors.OutputRefused("out/manifest.json: fingerprint mismatch ...; --fresh to discard it"), 3),
])
def test_failed_usage_and_refused_have_their_own_exit_codes(error, code, monkeypatch, capsys):
    from reembed.cli import run as cli_run

    def fail(args):
        raise error

    monkeypatch.setattr(cli_run, "cmd_status", fail)
    assert cli.main(["status", "x"]) == code
    assert capsys.readouterr().err == f"reembed: error: {error}\n"


def test_argparse_mistakes_share_the_error_prefix(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["run", "--shard-rows", "many"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: reembed run") and err[-1].startswith("reembed: error: argument --shard-rows")
    assert err[-1].endswith("(see `reembed run --help`)")


def test_export_says_where_it_wrote_and_what_to_run_next(tmp_path, capsys):
    import chromadb
    import numpy as np

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    col = client.create_collection("docs")
    vectors = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    col.add(ids=[f"d{i}" for i in range(30)], documents=[f"text {i}" for i in range(30)], embeddings=vectors)
    target = tmp_path / "old export"
    assert cli.main(["export", "--from", f"chroma://{tmp_path}/chroma?collection=docs", "--to", str(target)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("exported 30 documents (8-d")
    size = sum(f.stat().st_size for f in target.glob("part-*.parquet"))
    assert out[1] == f"written to:  {target} ({cli.human_bytes(size)} of Parquet parts, summary in _export.json)"
    assert re.match(rf"next:        \S*reembed run --input {re.escape(shlex.quote(str(target)))} --output NEW_OUTPUT "
                    r"--passthrough text,old_embedding ", out[2]), out[2]


# ---------------------------------------------------------------------------------------------------
# The demo's next steps, run exactly as printed


@pytest.mark.slow
@pytest.mark.ray
def test_the_demo_s_next_steps_work_exactly_as_printed(tmp_path, ray_tmp):
    from reembed.demo import NEXT_STEPS, PROMPT

    env = env_for(ray_tmp)
    demo = subprocess.run([sys.executable, "-m", "reembed.demo", "--docs", "300"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    lines = demo.stdout.splitlines()
    steps = [line.strip()[len(PROMPT):] for line in lines[lines.index(NEXT_STEPS) + 1:] if line.strip().startswith(PROMPT)]
    assert len(steps) == 3 and "status demo-output" in steps[0], demo.stdout
    assert "phase " in demo.stdout and "embed" in demo.stdout  # the timing table
    for step in steps:
        proc = subprocess.run(step, shell=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, (step, proc.stdout, proc.stderr[-3000:])
        assert shlex.split(step)[0] != "reembed" or proc.stdout  # something printed
    assert "the rocket reached orbit" in proc.stdout or "1." in proc.stdout


# ---------------------------------------------------------------------------------------------------
# status: what a stored vector is and costs


@pytest.mark.parametrize("dtype, per_vector", [("float16", 2 * 48), ("float32", 4 * 48), (None, 4 * 48)])
def test_status_shows_the_vector_dtype_and_bytes_per_vector(tmp_path, capsys, dtype, per_vector):
    from reembed.manifest import Manifest
    from reembed.storage import Location

    model = {"name": "m", "revision": "r", "dimension": 48, "normalize": True, "pooling": "mean", "dtype": "float32",
             "max_seq_length": 64, "fingerprint": "f" * 16}
    plan = {"shards": 2, "rows": 10, **({"vector_dtype": dtype} if dtype else {})}  # None: before output.dtype
    Manifest.create(Location.from_uri(str(tmp_path / "out")), model, plan, {"rows": 0, "mode": "hash"})
    assert cli.main(["status", str(tmp_path / "out"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["vector_dtype"], s["bytes_per_vector"]) == (dtype or "float32", per_vector)
    assert cli.main(["status", str(tmp_path / "out")]) == 0
    assert f"vectors:     {dtype or 'float32'}, 48-d: {per_vector} bytes per vector" in capsys.readouterr().out
