"""Real local Ray clusters for tests/test_cluster.py, each with its own temp dir, free loopback ports and
token authentication on.

* :func:`start_head` - ``ray start --head --block`` in a child process: what ``ray job submit`` talks to.
* :func:`run_node_loss` - runs this file as a child process that builds a ``ray.cluster_utils.Cluster``
  (a head and two worker nodes), starts the re-embedding job against it, kills one worker node while
  shards are being embedded and reports what happened. A child process keeps the cluster's Ray state
  (auth mode, token cache, global worker) out of the pytest process, whose session-wide local Ray
  (conftest ``ray_local``) must not be disturbed.

Nothing here uses the default ``/tmp/ray`` or ``~/.ray/auth_token``: other Ray users share this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def committed_records(out) -> dict[str, dict]:
    """``{"00042": record}`` of every shard committed at ``out`` (a folder or a URI), read from the commit
    log as it stands now (safe while a job is writing); empty before anything is committed."""
    from reembed.commits import read_state
    from reembed.storage import Location

    try:
        return {f"{shard:05d}": rec for shard, rec in read_state(Location.from_uri(str(out))).iter_records()}
    except FileNotFoundError:
        return {}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held open together, then released)."""
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]


def private_temp_dir(prefix: str) -> Path:
    """A short private directory under /tmp: Ray's unix socket paths must stay under 107 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def auth_env(token_path: Path) -> dict[str, str]:
    """What a Ray process needs to join or call a token-authenticated cluster (never the token itself)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def write_token(path: Path) -> str:
    token = secrets.token_hex(32)
    path.write_text(token)
    path.chmod(0o600)
    return token


def ray_env(root: Path, token_path: Path) -> dict[str, str]:
    """The environment for every Ray process of a test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(auth_env(token_path))
    env.update({
        # Ray's default for anything not given an explicit --temp-dir: keep it private too.
        "RAY_TMPDIR": str(root),
        "RAY_USAGE_STATS_ENABLED": "0",
        # On Linux Ray swaps 127.0.0.1 (in --node-ip-address, or in the address a driver connects to) for
        # the machine's routable address unless this is 0; test clusters live on loopback only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # `python` in a job's entrypoint is this interpreter, as it is the image's python on a real node.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


@dataclass
class Head:
    """A running single-node Ray head started with ``ray start --head --block``."""

    proc: subprocess.Popen
    root: Path
    gcs_address: str
    dashboard_url: str
    token_path: Path
    env: dict[str, str]
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return self.token_path.read_text()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, headers: dict[str, str] | None = None):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers() if headers is None else headers)

    def stop(self) -> None:
        stop_process_group(self.proc, grace=10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_head(num_cpus: int = 2, object_store_mb: int = 300, timeout: float = 120) -> Head:
    """Start a Ray head on 127.0.0.1 with token auth, its own temp dir and free ports; wait for the
    job server to answer."""
    root = private_temp_dir("reembed-head-")
    token_path = root / "auth_token"
    write_token(token_path)
    names = ["gcs", "dashboard", "agent_http", "agent_grpc", "runtime_env_agent", "metrics", "node_manager",
             "object_manager", "client_server"]
    ports = dict(zip(names, free_ports(len(names))))
    env = ray_env(root, token_path)
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}", f"--metrics-export-port={ports['metrics']}",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        f"--ray-client-server-port={ports['client_server']}", "--min-worker-port=0", "--max-worker-port=0",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={object_store_mb * 1024 * 1024}",
        f"--temp-dir={root / 'ray'}",
    ]
    log_path = root / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(proc, root, f"127.0.0.1:{ports['gcs']}", f"http://127.0.0.1:{ports['dashboard']}", token_path,
                env, log_path, ports)
    try:
        _wait_for_job_server(head, timeout)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_for_job_server(head: Head, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.proc.returncode}:\n{head.log_path.read_text()[-4000:]}")
        try:
            r = requests.get(f"{head.dashboard_url}/api/jobs/", headers=head.headers(), timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray job server did not answer within {timeout} s:\n{head.log_path.read_text()[-4000:]}")


def stop_process_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process we started (it stops its own children in order), then SIGKILL whatever is
    left in its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---------------------------------------------------------------------------------------------------
# Node loss: a head and two worker nodes in a child process


def run_node_loss(input_dir: Path, output_dir: Path, model: Path, job_args: list[str], timeout: float = 240) -> dict:
    """Run :func:`_node_loss_main` in a child process and return its JSON report."""
    root = private_temp_dir("reembed-nodes-")
    token_path = root / "auth_token"
    write_token(token_path)
    env = ray_env(root, token_path)
    # Workers import the package from this checkout, as the driver (jobs/reembed.py) does.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    spec = {"root": str(root), "input": str(input_dir), "output": str(output_dir), "model": str(model),
            "job_args": job_args, "timeout": timeout}
    report_path = root / "report.json"
    log_path = output_dir.parent / "node-loss.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, "node-loss", json.dumps(spec), str(report_path)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_process_group(proc, grace=20)
    try:
        report = json.loads(report_path.read_text())
    except (FileNotFoundError, ValueError):
        report = {"error": "no report"}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["log"] = log_path.read_text()[-8000:]
    return report


def _node_loss_main(spec: dict, report_path: str) -> None:
    """Child process: Cluster(head with no CPUs, two 3-CPU workers) -> job driver -> kill a worker node
    that hosts an Embedder actor once shards are being committed -> wait for the driver."""
    from ray.cluster_utils import Cluster

    root = Path(spec["root"])
    out = Path(spec["output"])
    report: dict = {"error": None}
    fast_failure_detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                              "health_check_initial_delay_ms": 0}
    cluster = Cluster(initialize_head=True, head_node_args={
        # Like the KubeRay head: no CPUs, so every read task and Embedder actor lands on a worker node.
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "temp_dir": str(root / "ray"),
        "include_dashboard": False, "object_store_memory": 200 * 1024 * 1024,
        "_system_config": fast_failure_detection,
    })
    driver = None
    try:
        workers = [cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1", object_store_memory=200 * 1024 * 1024)
                   for _ in range(2)]
        cluster.wait_for_nodes()
        # The driver attaches to the head's raylet: the head is the driver's node.
        report["head"] = cluster.head_node.node_id
        report["workers"] = [w.node_id for w in workers]
        args = [sys.executable, str(REPO / "jobs" / "reembed.py"), "--input", spec["input"], "--output", spec["output"],
                "--model", spec["model"], "--address", cluster.address, *spec["job_args"]]
        with open(out.parent / "driver.log", "wb") as driver_log:
            driver = subprocess.Popen(args, stdout=driver_log, stderr=subprocess.STDOUT, cwd=str(REPO))
        deadline = time.monotonic() + spec["timeout"]
        total = None
        while time.monotonic() < deadline:
            committed = _committed(out)
            if total is None:
                total = _planned(out)
            if driver.poll() is not None:
                report["error"] = f"the job ended (rc {driver.returncode}) before a node could be removed"
                break
            if committed and total and len(committed) < total:
                break
            time.sleep(0.05)
        else:
            report["error"] = "no shard was committed in time"
        if report["error"] is None:
            victim = _node_with_embedder(cluster, workers)
            report["before"] = sorted(_committed(out))
            report["planned"] = total
            report["victim"] = victim.node_id
            report["victim_had_embedder"] = victim in _nodes_with_embedders(cluster, workers)
            cluster.remove_node(victim, allow_graceful=False)
            report["after_removal"] = sorted(_committed(out))
            report["rc"] = driver.wait(timeout=max(1.0, deadline - time.monotonic()))
            report["embedder_restarts"] = max((a["NumRestarts"] for a in cluster.global_state.actor_table(None).values()
                                               if "Embedder" in a.get("ActorClassName", "")), default=0)
    except Exception as e:  # the report carries the failure to the test, which prints it
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        Path(report_path).write_text(json.dumps(report))
        cluster.shutdown()


def _committed(out: Path) -> dict:
    return committed_records(out)


def _planned(out: Path) -> int | None:
    try:
        return int(json.loads((out / "manifest.json").read_text())["plan"]["shards"])  # the plan's shard count
    except (FileNotFoundError, ValueError, KeyError):
        return None


def _nodes_with_embedders(cluster, workers) -> list:
    """Worker nodes that host an alive Embedder actor right now (from the GCS actor table)."""
    table = cluster.global_state.actor_table(None)
    hosts = {a["Address"]["NodeID"] for a in table.values() if a.get("State") == "ALIVE"
             and "Embedder" in a.get("ActorClassName", "")}
    return [w for w in workers if w.node_id in hosts]


def _node_with_embedder(cluster, workers, wait: float = 30.0):
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        hosts = _nodes_with_embedders(cluster, workers)
        if hosts:
            return hosts[0]
        time.sleep(0.1)
    actors = [(a.get("ActorClassName"), a.get("State"), a["Address"]["NodeID"][:8])
              for a in cluster.global_state.actor_table(None).values()]
    raise RuntimeError(f"no worker node ({[w.node_id[:8] for w in workers]}) hosts an Embedder actor: {actors}")


if __name__ == "__main__":
    if sys.argv[1] == "node-loss":
        _node_loss_main(json.loads(sys.argv[2]), sys.argv[3])
