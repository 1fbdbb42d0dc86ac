"""A status that knows a live run (``reembed.live``): the heartbeat a run keeps in ``OUTPUT/_live.json``,
RUNNING / SUCCEEDED / FAILED / INTERRUPTED as ``status`` shows them, a second run refused on a live output,
``--take-over`` fencing the first run, ``status --follow``; on a local disk and on S3."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_parquet
from reembed import live, pipeline
from reembed.cli import main
from reembed.config import load_config
from reembed.errors import ConfigError, ConcurrentWriteError, LiveRunError
from reembed.manifest import Manifest
from reembed.storage import Location
from s3_fixtures import moto_server, new_bucket, s3_env, s3_user  # noqa: F401 (fixtures)

SRC = str(Path(__file__).resolve().parents[1] / "src")
BEAT = 0.2  # seconds between heartbeats in these tests (the lease is three beats)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, last: list | None = None):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            err = getattr(proc, "err_path", None)
            tail = Path(err).read_text()[-3000:] if err and Path(err).exists() else ""
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}: {tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; last seen: {last[0]!r}" if last else ""))
        time.sleep(0.05)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("reembed: error: ")]
    assert len(errors) == 1, err
    return errors[0]


# -- the record and its states, without Ray -------------------------------------------------------------


def test_a_held_output_refuses_a_second_run_in_one_line_and_take_over_fences_the_first(tmp_path):
    out = Location.from_uri(str(tmp_path / "out"))
    first = live.Heartbeat.acquire(out, beat_s=BEAT)
    try:
        first.phase("embedding", rows_total=100, shards_total=10)
        for _ in range(3):
            first.committed(10)
            time.sleep(0.05)
        time.sleep(3 * BEAT)
        got = pipeline_state(out, complete=False)
        assert got["state"] == live.RUNNING and got["live"]["pid"] == os.getpid()
        assert got["live"]["host"] == socket.gethostname() and got["live"]["rows_done"] == 30
        assert got["live"]["rows_per_second"] > 0 and got["live"]["eta_seconds"] > 0

        with pytest.raises(LiveRunError) as e:
            live.Heartbeat.acquire(out, beat_s=BEAT)
        line = str(e.value)
        assert "\n" not in line and "a run is live on this output" in line
        assert f"host {socket.gethostname()} pid {os.getpid()}" in line and "last beat" in line
        assert "--take-over" in line and "--follow" in line and "run the same command" not in line
        assert isinstance(e.value, ConcurrentWriteError)  # "another job is on this output", as a fenced commit

        second = live.Heartbeat.acquire(out, take_over=True, beat_s=BEAT)
        with pytest.raises(ConcurrentWriteError, match="another run took this output over .*stops before claiming"):
            first.check()  # what a run taken over while it planned meets before it claims the output
        assert first.taken_over["run_id"] == second.record["run_id"]
        first.finish(live.FAILED, "fenced")  # never overwrites the record the second run holds
        assert live.read(out)["run_id"] == second.record["run_id"]
        assert pipeline_state(out, complete=False)["state"] == live.RUNNING
        second.finish(live.SUCCEEDED)
        assert pipeline_state(out, complete=True)["state"] == live.SUCCEEDED
    finally:
        first.finish(live.FAILED)


def pipeline_state(out: Location, complete: bool) -> dict:
    return live.describe(out, complete)


def test_how_a_run_ended_is_its_state(tmp_path):
    out = Location.from_uri(str(tmp_path / "out"))
    with pytest.raises(RuntimeError):
        with live.Heartbeat.acquire(out, beat_s=BEAT):
            raise RuntimeError("the disk said no\nsecond line")
    got = live.describe(out, complete=False)
    assert got["state"] == live.FAILED and got["live"]["error"] == "the disk said no second line"
    assert got["live"]["eta_seconds"] is None and got["live"]["finished_at"]

    with pytest.raises(KeyboardInterrupt):
        with live.Heartbeat.acquire(out, beat_s=BEAT):  # a final record never blocks the next run
            raise KeyboardInterrupt
    assert live.describe(out, complete=False)["state"] == live.INTERRUPTED

    with live.Heartbeat.acquire(out, beat_s=BEAT):
        pass
    assert live.describe(out, complete=True)["state"] == live.SUCCEEDED
    # A record that cannot be read is ignored (with a warning), as if there were none: it never blocks a run.
    (tmp_path / "out" / live.LIVE).write_text('{"half": ')
    assert live.read(out) is None
    live.Heartbeat.acquire(out, beat_s=BEAT).finish(live.SUCCEEDED)
    # An output without a record: complete is SUCCEEDED, anything else INTERRUPTED (nothing holds it).
    (tmp_path / "out" / live.LIVE).unlink()
    assert live.state(None, complete=True) == live.SUCCEEDED and live.state(None, complete=False) == live.INTERRUPTED


def test_a_lease_from_another_host_expires_after_three_beats(tmp_path):
    out = Location.from_uri(str(tmp_path / "out"))
    beat = live.Heartbeat.acquire(out, beat_s=BEAT)
    beat.finish(live.SUCCEEDED)
    elsewhere = {**live.read(out), "host": "gpu-head-7", "final": False, "state": "running", "pid": 1}
    now = live._unix(elsewhere["last_beat"])
    assert live.state(elsewhere, False, now=now + 2.9 * BEAT) == live.RUNNING
    assert live.state(elsewhere, False, now=now + 3.1 * BEAT) == live.INTERRUPTED

    # A fresh record of another host refuses a run; once its lease expired, a run takes the output.
    (tmp_path / "out" / live.LIVE).write_text(json.dumps({**elsewhere, "last_beat": live._iso(time.time())}))
    with pytest.raises(LiveRunError, match="host gpu-head-7 pid 1"):
        live.Heartbeat.acquire(out, beat_s=BEAT)
    time.sleep(3.5 * BEAT)
    taker = live.Heartbeat.acquire(out, beat_s=BEAT)
    taker.finish(live.SUCCEEDED)
    assert live.read(out)["run_id"] == taker.record["run_id"]


def test_a_killed_holder_is_interrupted_at_once_here_and_after_its_lease_elsewhere(tmp_path):
    """A real process holds the output and is SIGKILLed: on its own host its death is seen at once (its pid is
    gone); from another host only its lease says so, three beats after its last one."""
    out = tmp_path / "out"
    script = ("import sys, time; from reembed import live; from reembed.storage import Location; "
              "live.Heartbeat.acquire(Location.from_uri(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": SRC, live.HEARTBEAT_ENV: str(BEAT)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        status = pipeline.status(str(out))  # before any manifest: the run is still planning
        assert status["state"] == live.RUNNING and status["live"]["pid"] == proc.pid and not status["planned"]
        rc = main(["run", "--input", str(tmp_path), "--output", str(out)])
        assert rc == 3  # refused
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    record = live.read(Location.from_uri(str(out)))
    assert not record["final"] and pipeline.status(str(out))["state"] == live.INTERRUPTED
    seen_from_elsewhere = {**record, "host": "another-host"}
    last = live._unix(record["last_beat"])
    assert live.state(seen_from_elsewhere, False, now=last + BEAT) == live.RUNNING
    assert live.state(seen_from_elsewhere, False, now=last + 3 * BEAT + 0.01) == live.INTERRUPTED


def test_the_record_stays_the_same_size_however_many_shards_commit(tmp_path):
    out = Location.from_uri(str(tmp_path / "out"))
    beat = live.Heartbeat.acquire(out, beat_s=60)
    beat.phase("embedding", rows_total=10**9, shards_total=10**5)
    sizes = []
    for n in range(20_000):
        beat.committed(10_000)
        if n in (10, 19_999):
            beat.phase("embedding")
            sizes.append(out.size(live.LIVE))
    beat.finish(live.SUCCEEDED)
    assert sizes[1] - sizes[0] < 16 and sizes[1] < 1200, sizes


def test_a_bad_heartbeat_setting_is_one_line(monkeypatch):
    monkeypatch.setenv(live.HEARTBEAT_ENV, "soon")
    with pytest.raises(ConfigError, match="REEMBED_HEARTBEAT_S='soon'"):
        live.beat_interval()
    monkeypatch.setenv(live.HEARTBEAT_ENV, "0.5")
    assert live.beat_interval() == 0.5


@pytest.mark.s3
def test_on_s3_a_run_holds_refuses_and_is_taken_over_by_conditional_writes(s3_env):
    out = Location.from_uri(f"s3://{new_bucket(s3_env)}/emb")
    out.write_bytes(b'{"half": ', live.LIVE)  # a record that cannot be read never blocks a run
    first = live.Heartbeat.acquire(out, beat_s=BEAT)
    try:
        first.phase("embedding", rows_total=50, shards_total=5)
        first.committed(10)
        first.committed(10)
        time.sleep(2 * BEAT)
        got = live.describe(out, complete=False)
        assert got["state"] == live.RUNNING and got["live"]["rows_done"] == 20
        with pytest.raises(LiveRunError, match="a run is live on this output"):
            live.Heartbeat.acquire(out, beat_s=BEAT)
        second = live.Heartbeat.acquire(out, take_over=True, beat_s=BEAT)
        wait_for(lambda: first.taken_over, 5, "the first run to lose its If-Match")
        first.finish(live.FAILED, "fenced")
        assert live.read(out)["run_id"] == second.record["run_id"]
        second.finish(live.SUCCEEDED)
        assert live.describe(out, complete=True)["state"] == live.SUCCEEDED
    finally:
        first.finish(live.FAILED)


# -- a live run through the pipeline ----------------------------------------------------------------------


def gated_commits(gate: Path, free: int = 2):
    """``pipeline._commit`` held at a gate: after ``free`` commits each commit waits while the file ``gate``
    exists, so a run stays live (beating, with commits and a rate) for as long as a test needs. The driver's
    commit loop waits; the heartbeat, a thread of its own, goes on."""
    real = pipeline._commit
    done = [0]

    def commit(*args, **kw):
        while done[0] >= free and gate.exists():
            time.sleep(0.02)
        real(*args, **kw)
        done[0] += 1

    return commit


def test_a_live_run_is_running_with_a_rate_refuses_a_second_run_and_is_followed_to_its_end(
        tmp_path, tiny_model, ray_local, monkeypatch, capsys):
    monkeypatch.setenv(live.HEARTBEAT_ENV, str(BEAT))
    gate = tmp_path / "gate"
    gate.touch()
    monkeypatch.setattr(pipeline, "_commit", gated_commits(gate))
    docs = make_docs(80)
    write_parquet(tmp_path / "in" / "a.parquet", docs)
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in"), "--output", str(out), "--model", str(tiny_model), "--shard-rows", "10"]
    cfg = load_config(None, [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", f"model.name={tiny_model}",
                             "plan.shard_rows=10"])
    result: dict = {}

    def job():
        try:
            result["summary"] = pipeline.run(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            result["error"] = e

    thread = threading.Thread(target=job)
    thread.start()
    try:
        def watched():
            assert "error" not in result and "summary" not in result, f"the run ended before it was seen: {result}"
            return _running_with_rate(out)

        status = wait_for(watched, 300, "a RUNNING status with a rate", last=_last_seen)
        assert status["live"]["phase"] == "embedding" and status["live"]["rows_total"] == 80
        assert status["live"]["rows_done"] == 20 and status["live"]["shards_done"] == 2 and status["committed"] == 2
        assert status["live"]["eta_seconds"] > 0 and status["live"]["last_commit_at"]
        assert status["live"]["pid"] == os.getpid() and status["live"]["epoch"] == 2

        capsys.readouterr()
        assert main(["status", str(out)]) == 0
        text = capsys.readouterr().out
        assert "state:       RUNNING (embedding)" in text and "rows/s" in text and "ETA" in text
        assert f"host {socket.gethostname()} pid {os.getpid()}" in text and "last commit:" in text
        assert "run the same command" not in text  # following that advice would fence the live run

        t0 = time.monotonic()
        assert main(["run", *argv]) == 3  # refused
        line = one_error_line(capsys.readouterr().err)
        assert "a run is live on this output" in line and f"pid {os.getpid()}" in line and "--take-over" in line
        assert time.monotonic() - t0 < 10, "refused before loading the model or starting anything"

        threading.Timer(1.0, gate.unlink).start()  # --follow sees the run live, then to its end
        assert main(["status", str(out), "--follow", "--interval", "0.2"]) == 0
        followed = capsys.readouterr().out.splitlines()
        assert followed[0].startswith("RUNNING  embedding  shards 2/8  rows 20/80  "), followed[0]
        assert "state:       SUCCEEDED" in followed and "status:      complete" in followed
    finally:
        gate.unlink(missing_ok=True)
        thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["summary"]["complete"]
    ids = Counter()
    for rec in Manifest.load(Location.from_uri(str(out))).committed.values():
        ids.update(pq.read_table(out / rec["path"], columns=["id"]).column("id").to_pylist())
    assert ids == Counter(d["id"] for d in docs)
    final = pipeline.status(str(out))
    assert final["state"] == live.SUCCEEDED and final["live"]["rows_done"] == 80 and final["live"]["shards_done"] == 8


_last_seen: list = [None]


def _running_with_rate(out: Path) -> dict | None:
    try:
        s = pipeline.status(str(out))
    except Exception as e:  # noqa: BLE001 - not planned yet
        _last_seen[0] = e
        return None
    _last_seen[0] = s
    lv = s.get("live") or {}
    return s if s["state"] == live.RUNNING and lv.get("rows_per_second") and lv.get("eta_seconds") else None


# -- real runs in subprocesses: take over, SIGKILL, resume ------------------------------------------------

DRIVER = textwrap.dedent("""
    # A reembed run whose commits are held at a gate after the first two (see gated_commits).
    import os, sys, time
    from reembed import pipeline
    from reembed.cli import main

    gate, argv = sys.argv[1], sys.argv[2:]
    real, done = pipeline._commit, [0]

    def commit(*args, **kw):
        while done[0] >= 2 and os.path.exists(gate):
            time.sleep(0.02)
        real(*args, **kw)
        done[0] += 1

    pipeline._commit = commit
    sys.exit(main(argv))
""")


@pytest.mark.slow
def test_take_over_fences_the_live_run_and_a_killed_run_is_interrupted_then_resumed(tmp_path, tiny_model):
    """Real runs of ``reembed run`` in their own processes, each with its own local Ray: job a is live (its
    commits held at a gate after two); a plain second run is refused; job b takes over (--take-over) and
    commits; a, released, is fenced at its next commit; b is SIGKILLed while held: INTERRUPTED; a plain
    rerun resumes, exact."""
    docs = make_docs(600)
    write_parquet(tmp_path / "in" / "a.parquet", docs)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=SRC, PYTHONUNBUFFERED="1", **{live.HEARTBEAT_ENV: "0.5"})
    (tmp_path / "driver.py").write_text(DRIVER)
    gates = {j: tmp_path / f"gate-{j}" for j in "ab"}
    for g in gates.values():
        g.touch()
    plain_run = [sys.executable, "-m", "reembed", "run", "--input", str(tmp_path / "in"), "--output", str(out),
                 "--model", str(tiny_model), "--shard-rows", "20"]

    def start(j: str, take_over: bool) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(gates[j]), *plain_run[3:],
                                 *(["--take-over"] if take_over else [])], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / f"{j}.err", "w"), start_new_session=True)
        proc.err_path = tmp_path / f"{j}.err"
        return proc

    def status() -> dict:
        proc = subprocess.run([sys.executable, "-m", "reembed", "status", str(out), "--json"], env=env,
                              capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout) if proc.returncode == 0 else {}

    def live_of(s: dict) -> dict:
        return s.get("live") or {}

    procs = {}
    try:
        procs["a"] = start("a", False)
        first = wait_for(lambda: (s := status()).get("state") == "RUNNING" and live_of(s).get("rows_per_second")
                         and s, 600, "job a RUNNING with a rate", procs["a"])
        assert live_of(first)["pid"] == procs["a"].pid and live_of(first)["host"] == socket.gethostname()

        # A second plain run is refused at once, in one line naming the live run.
        refused = subprocess.run(plain_run, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 3  # refused
        line = one_error_line(refused.stderr)
        assert "a run is live on this output" in line and f"pid {procs['a'].pid}" in line and "--take-over" in line

        # --take-over: job b holds the output and commits shards of its own.
        procs["b"] = start("b", True)
        taken = wait_for(lambda: (s := status()).get("state") == "RUNNING" and live_of(s).get("pid") == procs["b"].pid
                         and live_of(s).get("shards_done", 0) >= 2 and s, 600, "job b committing", procs["b"])
        assert live_of(taken)["epoch"] > live_of(first)["epoch"]
        # Job a, released, is fenced at its next commit: one line, exit 3, and b's record is left alone.
        gates["a"].unlink()
        assert procs["a"].wait(timeout=300) == 3  # fenced: refused
        assert "another job has taken over this output" in one_error_line((tmp_path / "a.err").read_text())
        assert live_of(status())["pid"] == procs["b"].pid

        # SIGKILL b (held at its gate): the record still looks live, but status sees the run is gone.
        os.killpg(procs["b"].pid, signal.SIGKILL)
        procs["b"].wait()
        killed = status()
        assert killed["state"] == "INTERRUPTED" and not killed["complete"] and live_of(killed)["pid"] == procs["b"].pid
        text = subprocess.run([sys.executable, "-m", "reembed", "status", str(out)], env=env, capture_output=True,
                              text=True, timeout=120).stdout
        assert "state:       INTERRUPTED" in text and "run the same command again to resume" in text
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # A plain rerun resumes (nothing holds the output: no --take-over needed) and ends exact.
    rerun = subprocess.run(plain_run, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ids = Counter()
    for rec in Manifest.load(Location.from_uri(str(out))).committed.values():
        ids.update(pq.read_table(out / rec["path"], columns=["id"]).column("id").to_pylist())
    assert ids == Counter(d["id"] for d in docs)
    assert status()["state"] == "SUCCEEDED"


def test_a_run_that_cannot_write_its_end_on_a_full_disk_leaves_no_live_record(small_disk):
    """The final record needs space; when the disk is full the ended run takes its record away instead, so the
    rerun that `reembed` advises is not refused as a second live run (the same process reruns it here)."""
    from reembed.storage import Location

    disk, _ = small_disk
    out = Location.from_uri(str(disk / "out"))
    beat = live.Heartbeat.acquire(out, beat_s=60)
    assert live.read(out)["state"] == "running"
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk for real, unbuffered
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    beat.finish("FAILED", "no space left on the device")
    assert live.read(out) is None
    live.refuse_if_live(out)  # no live run: nothing to refuse
