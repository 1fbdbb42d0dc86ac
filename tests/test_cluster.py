"""cluster/: job submission on a real Ray head with token authentication, a worker node lost while shards
are being embedded on a real multi-node cluster, and the KubeRay / `ray up` configs checked against
their schemas and against what the job asks for."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster_fixtures import REPO, committed_records, run_node_loss, start_head
from conftest import make_docs, write_parquet, write_resume_corpus
from reembed import pipeline
from reembed.config import load_config
from reembed.manifest import Manifest
from reembed.storage import Location

CLUSTER = REPO / "cluster"
SECRET_ENV = re.compile(r"(^|_)(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIALS?)(_|$)|API_?KEY|ACCESS_KEY|PRIVATE_KEY", re.I)
# An AWS access key id, a long hex string (a Ray token is 32 hex bytes), a PEM private key.
SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\b[0-9a-f]{40,}\b|BEGIN [A-Z ]*PRIVATE KEY")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def committed(out: Path) -> dict:
    return committed_records(out)


def ledger(out: Path) -> tuple[Counter, Counter]:
    """(ids in committed shards, ids in dead letters) of an output, read back from its files."""
    m = Manifest.load(Location.from_uri(str(out)))
    embedded, dead = Counter(), Counter()
    for rec in m.committed.values():
        embedded.update(pq.read_table(out / rec["path"], columns=["id"]).column("id").to_pylist())
        if rec.get("dead_letter_path"):
            dead.update(pq.read_table(out / rec["dead_letter_path"], columns=["id"]).column("id").to_pylist())
    return embedded, dead


# ---------------------------------------------------------------------------------------------------
# A worker node lost while shards are being embedded (first: the module's Ray head is not up yet)


@pytest.mark.ray
@pytest.mark.slow
def test_worker_node_lost_mid_run_keeps_the_ledger_exact(tiny_model, tmp_path):
    """A head with no CPUs and two 3-CPU worker nodes; the job runs against it; once shards are being
    committed, the worker node hosting an Embedder actor is killed (SIGKILL, no drain) while writer tasks
    are writing. Ray restarts the actor on the surviving node; shards whose blocks or writer were lost are
    embedded again; every input id ends up in exactly one committed shard, and every shard was written by
    a task on a worker node, never on the driver's (the head's) node."""
    docs = make_docs(2400)
    write_parquet(tmp_path / "in" / "docs.parquet", docs, row_group_size=200)
    out = tmp_path / "out"
    report = run_node_loss(tmp_path / "in", out, tiny_model, [
        "--shard-rows", "40", "--set", "model.batch_tokens=256",
        "--set", "compute.cpus_per_actor=1", "--set", "compute.min_actors=2", "--set", "compute.max_actors=2",
    ])
    log = report.pop("log")
    driver_log = (tmp_path / "driver.log").read_text() if (tmp_path / "driver.log").exists() else ""
    assert report["error"] is None, f"{report}\n{log}\n{driver_log[-6000:]}"
    assert report["victim_had_embedder"]
    assert report["embedder_restarts"] >= 1, "the lost node's Embedder actor was never restarted"
    assert 1 <= len(report["before"]) < report["planned"], report
    assert report["rc"] == 0, driver_log[-6000:]

    m = Manifest.load(Location.from_uri(str(out)))
    # make_docs repeats its texts: the repeats in other shards are written by copy shards after the plan's 60
    assert m.is_complete() and len(m.committed) == m.shard_count and report["planned"] == m.plan["shards"] == 60
    # Shards committed after the node died were embedded too (the loss happened mid-run).
    assert len(m.committed) > len(report["after_removal"])
    embedded, dead = ledger(out)
    assert embedded == Counter(d["id"] for d in docs), "an id is missing or committed twice"
    assert not dead
    assert sum(rec["rows"] for rec in m.committed.values()) == len(docs)
    # Workers wrote the shards: each record names its writer, on a worker node, never the driver's.
    writers = Counter(rec["writer"]["node"] for rec in m.committed.values())
    assert report["head"] not in writers and set(writers) <= set(report["workers"]), (writers, report)
    assert all(rec["writer"]["host_pid"] for rec in m.committed.values())
    # No stray shard file beside the committed ones, nothing left half-written.
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == sorted(
        Path(rec["path"]).name for rec in m.committed.values())
    assert not list(out.glob("shards/_tmp/*"))


# ---------------------------------------------------------------------------------------------------
# Job submission: `ray start --head` on 127.0.0.1, token auth on, jobs submitted with a working_dir


@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=2)
    yield h
    h.stop()


def job_runtime_env() -> dict:
    """cluster/runtime_env.yaml as `ray job submit` run from the repository root would send it, minus
    `pip`: a fresh virtualenv per job would need a package index and minutes, and this environment
    already holds exactly those pins (test_images_and_pins_match_pyproject checks them)."""
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env.pop("pip")
    env["working_dir"] = str(REPO)
    env["py_modules"] = [str(REPO / p) for p in env["py_modules"]]
    return env


def wait_for(client, job_id: str, statuses: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in statuses:
            return status
        if status in TERMINAL:
            break
        time.sleep(0.5)
    pytest.fail(f"job {job_id} is {status}, expected {statuses}; log:\n{client.get_job_logs(job_id)[-4000:]}")


@pytest.mark.ray
def test_job_server_refuses_requests_without_the_token(head):
    import requests

    url = f"{head.dashboard_url}/api/jobs/"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=10).status_code == 403
    assert requests.get(url, headers=head.headers(), timeout=10).status_code == 200


@pytest.mark.ray
def test_failing_job_is_reported_failed_with_its_error(head, tiny_model, tmp_path):
    """The documented command line: `ray job submit ... --runtime-env cluster/runtime_env.yaml -- python
    jobs/reembed.py ...`, authenticated through RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH. A missing input
    fails the job; `ray job submit` exits non-zero and the error is in the job's log."""
    env_file = tmp_path / "runtime_env.yaml"
    shipped = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    shipped.pop("pip")  # see job_runtime_env
    env_file.write_text(yaml.safe_dump(shipped))
    missing = tmp_path / "no-such-docs"
    job_id = "reembed-missing-input"
    cli = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard_url,
           "--submission-id", job_id, "--runtime-env", str(env_file), "--",
           "python", "jobs/reembed.py", "--input", str(missing), "--output", str(tmp_path / "out"),
           "--model", str(tiny_model)]
    proc = subprocess.run(cli, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout[-3000:]
    client = head.client()
    assert str(client.get_job_status(job_id).value) == "FAILED"
    logs = client.get_job_logs(job_id)
    assert f"reembed: error: {missing}: input not found" in logs
    assert "exit code 1" in client.get_job_info(job_id).message
    assert f"{missing}: input not found" in proc.stdout  # `ray job submit` tails the log
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_stopped_job_resumes_when_resubmitted(head, tiny_model, tmp_path):
    """A job stopped mid-run (a preempted driver, a `ray job stop`) and submitted again resumes: shards
    committed by the first run are kept as they are, the rest are embedded, and the ledger is exact."""
    docs = write_resume_corpus(tmp_path / "in")
    out = tmp_path / "out"
    entrypoint = (f"python jobs/reembed.py --input {tmp_path / 'in'} --output {out} --model {tiny_model} "
                  "--shard-rows 50 --set model.batch_tokens=512")
    client = head.client()
    runtime_env = job_runtime_env()

    first_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id="reembed-first")
    deadline = time.monotonic() + 180
    while not committed(out):
        assert time.monotonic() < deadline, client.get_job_logs(first_id)[-4000:]
        assert str(client.get_job_status(first_id).value) not in TERMINAL, client.get_job_logs(first_id)[-4000:]
        time.sleep(0.1)
    client.stop_job(first_id)
    wait_for(client, first_id, {"STOPPED"}, timeout=60)
    first = committed(out)
    total = Manifest.load(Location.from_uri(str(out))).shard_count  # 30, and copy shards of repeated texts
    assert 1 <= len(first) < total, f"expected a partial run, got {len(first)} of {total} shards committed"

    second_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id="reembed-second")
    wait_for(client, second_id, {"SUCCEEDED"}, timeout=240)
    logs = client.get_job_logs(second_id)
    assert f"{len(first)} of {total} shards committed, {total - len(first)} pending" in logs
    assert "input 1500 = embedded 1500 + dead-lettered 0" in logs
    assert "status:      complete" in logs
    final = committed(out)
    assert len(final) == total
    for k, rec in first.items():
        assert final[k] == rec, f"shard {k} was recomputed"
    embedded, dead = ledger(out)
    assert embedded == Counter(d["id"] for d in docs) and not dead

    # What the cluster stored for the job carries no secret: not the token, no credential variables.
    for job_id in (first_id, second_id):
        info = client.get_job_info(job_id)
        stored = json.dumps(info.runtime_env)
        assert head.token not in stored and head.token not in client.get_job_logs(job_id)
        assert not [k for k in (info.runtime_env or {}).get("env_vars", {}) if SECRET_ENV.search(k)]


def test_runtime_env_carries_no_secrets():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= {"working_dir", "py_modules", "excludes", "pip", "env_vars"}
    assert not [k for k in env.get("env_vars", {}) if SECRET_ENV.search(k)]
    assert not SECRET_VALUE.search(json.dumps(env))
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts it as it is


# ---------------------------------------------------------------------------------------------------
# KubeRay manifests and the `ray up` YAML: schemas, operator rules, and the job's resource asks


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def strict(schema: dict) -> dict:
    """A copy of a CRD schema that refuses unknown keys wherever it lists properties and does not
    preserve unknown fields: `kubectl apply`'s default (strict server-side field validation)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


def crd_errors(doc: dict) -> list[str]:
    import jsonschema

    name = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[doc["kind"]]
    schema = strict(json.loads((CLUSTER / "schemas" / f"ray.io_{name}.v1.json").read_text()))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def cpu_quantity(q) -> float:
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def kuberay_problems(doc: dict) -> list[str]:
    """The KubeRay v1.7.0 operator's own checks (ray-operator/controllers/ray/utils/validation.go) that a
    schema cannot express, for the features these manifests use."""
    problems = []
    kind, name = doc["kind"], doc["metadata"]["name"]
    limit = 53 if kind == "RayCluster" else 47
    if len(name) > limit or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"{kind} name {name!r} is not a DNS-1035 label of at most {limit} characters")
    spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
    if kind == "RayJob" and "clusterSelector" not in doc["spec"] and "rayClusterSpec" not in doc["spec"]:
        problems.append("one of rayClusterSpec or clusterSelector must be set")
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    if len({g for g, _ in groups}) != len(groups):
        problems.append("worker group names repeat")
    for group, g in groups:
        if not g["template"]["spec"].get("containers"):
            problems.append(f"{group}: no container")
        start = g.get("rayStartParams", {})
        if any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            problems.append(f"{group}: resources in both rayStartParams and resources")
        if "labels" in start:
            problems.append(f"{group}: rayStartParams['labels'] is not supported")
        if spec.get("autoscalerOptions", {}).get("version") == "v2" and g["template"]["spec"].get("restartPolicy") not in (None, "Never"):
            problems.append(f"{group}: restartPolicy must be Never or unset with autoscaler v2")
        if group != "head" and g.get("minReplicas", 0) > g.get("maxReplicas", 2**31 - 1):
            problems.append(f"{group}: minReplicas > maxReplicas")
    if spec.get("authOptions", {}).get("mode", "token") == "token" and "authOptions" in spec:
        version = tuple(int(x) for x in spec.get("rayVersion", "0").split("."))
        if version < (2, 52, 0):
            problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return problems


def test_kuberay_manifests_validate_against_the_crd_schemas():
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        doc = load_yaml(name)
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_errors(doc) == [], name
        assert kuberay_problems(doc) == [], name


def test_schema_validation_catches_mistakes():
    """The validation can fail: a misspelt field, a wrong type, a bad quantity, an operator rule."""
    good = load_yaml("kuberay/raycluster.yaml")
    typo = copy.deepcopy(good)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    assert any("maxReplica" in e for e in crd_errors(typo))
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert crd_errors(wrong_type)
    bad_quantity = copy.deepcopy(good)
    bad_quantity["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "7 cores"
    assert crd_errors(bad_quantity)
    bad_mode = copy.deepcopy(good)
    bad_mode["spec"]["authOptions"]["mode"] = "password"
    assert crd_errors(bad_mode)
    inverted = copy.deepcopy(good)
    inverted["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    assert kuberay_problems(inverted)
    old_ray = copy.deepcopy(good)
    old_ray["spec"]["rayVersion"] = "2.51.0"
    assert kuberay_problems(old_ray)


def test_rayjob_runs_the_same_cluster_as_the_raycluster():
    cluster = load_yaml("kuberay/raycluster.yaml")
    job = load_yaml("kuberay/rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "/home/ray/reembed/jobs/reembed.py"]
    assert entry[entry.index("--config") + 1] == "/home/ray/reembed/cluster/job.yaml"
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert not [k for k in runtime_env.get("env_vars", {}) if SECRET_ENV.search(k)]


def job_compute():
    cfg = load_config(CLUSTER / "job.yaml")
    assert cfg.model.device == "cuda", "the head has no GPU and the GPU group starts at zero: device must be cuda"
    return cfg


def capacity_problems(what: str, cpus: float, gpus: float, max_nodes: int, cfg) -> list[str]:
    """Does a GPU node type hold the Embedder actors the job asks for, and does the pool fill it?"""
    c = cfg.compute
    if gpus < c.gpus_per_actor or c.gpus_per_actor <= 0:
        return [f"{what}: {gpus} GPU per node, the job asks {c.gpus_per_actor} per actor"]
    actors_per_node = int(gpus // c.gpus_per_actor)
    problems = []
    if actors_per_node * c.cpus_per_actor + c.read_cpus > cpus:
        problems.append(f"{what}: {actors_per_node} actor(s) x {c.cpus_per_actor} CPU + a read task do not fit {cpus} CPUs")
    if max_nodes * actors_per_node != c.max_actors:
        problems.append(f"{what}: {max_nodes} nodes hold {max_nodes * actors_per_node} actors, compute.max_actors is {c.max_actors}")
    if not 1 <= c.min_actors <= c.max_actors:
        problems.append(f"{what}: min_actors {c.min_actors} outside 1..{c.max_actors}")
    return problems


def test_kuberay_gpu_group_matches_what_the_job_asks_for():
    cfg = job_compute()
    spec = load_yaml("kuberay/raycluster.yaml")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), "the head must be CPU-only"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_groups = [g for g in groups.values() if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) == 1
    gpu = gpu_groups[0]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0, "the GPU group scales from zero"
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["requests"] == limits
    assert capacity_problems("kuberay gpu", cpu_quantity(limits["cpu"]), float(limits["nvidia.com/gpu"]),
                             gpu["maxReplicas"], cfg) == []
    cpu_groups = [g for g in groups.values() if g is not gpu]
    assert cpu_groups and all(g["minReplicas"] == 0 for g in cpu_groups)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"

    # What the job itself plans for this cluster, at rest (no GPU yet) and fully scaled.
    gpus, cpus = float(limits["nvidia.com/gpu"]), cpu_quantity(limits["cpu"])
    for scale in (0, gpu["maxReplicas"]):
        pool = pipeline.plan_pool(cfg, {"CPU": 4.0 + scale * cpus, "GPU": scale * gpus})
        assert pool["device"] == "cuda" and pool["num_gpus"] == cfg.compute.gpus_per_actor
        assert pool["max"] == gpu["maxReplicas"] * int(gpus // cfg.compute.gpus_per_actor)
        assert pool["num_cpus"] == cfg.compute.cpus_per_actor


def test_ray_up_yaml_validates_and_matches_what_the_job_asks_for():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg_yaml = load_yaml("ray-up-aws.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg_yaml, schema)
    validate_config(prepare_config(copy.deepcopy(cfg_yaml)))  # what `ray up` itself runs

    cfg = job_compute()
    types = cfg_yaml["available_node_types"]
    head = types[cfg_yaml["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must be CPU-only and schedule nothing"
    gpu_types = [t for n, t in types.items() if t["resources"].get("GPU")]
    assert len(gpu_types) == 1
    gpu = gpu_types[0]
    assert gpu["min_workers"] == 0
    assert capacity_problems("ray up gpu", gpu["resources"]["CPU"], gpu["resources"]["GPU"], gpu["max_workers"], cfg) == []
    cpu_types = [t for n, t in types.items() if t is not head and not t["resources"].get("GPU")]
    assert cpu_types and all(t["min_workers"] == 0 for t in cpu_types)
    assert cfg_yaml["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    # Token authentication on every node, with the token mounted from the submitting machine.
    assert "--env RAY_AUTH_MODE=token" in cfg_yaml["docker"]["run_options"]
    assert "~/.ray/auth_token" in cfg_yaml["file_mounts"]


def test_images_and_pins_match_pyproject():
    import ray

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(_pin(d) for d in project["dependencies"])
    ray_version = pins["ray"]
    assert ray_version == ray.__version__

    requirements = dict(_pin(line) for line in (CLUSTER / "requirements.txt").read_text().splitlines()
                        if line.strip() and not line.startswith("#"))
    assert requirements == pins
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert dict(_pin(p) for p in runtime_env["pip"]["packages"]) == {k: v for k, v in pins.items() if k != "ray"}

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{ray_version}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
    assert "cluster/requirements.txt" in dockerfile

    spec = load_yaml("kuberay/raycluster.yaml")["spec"]
    assert spec["rayVersion"] == ray_version
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert images == {f"registry.example.com/reembed:{project['version']}"}

    docker = load_yaml("ray-up-aws.yaml")["docker"]
    for image in [docker["image"], docker["head_image"]] + [t.get("docker", {}).get("worker_image")
                                                           for t in load_yaml("ray-up-aws.yaml")["available_node_types"].values()]:
        if image:
            assert image.startswith(f"rayproject/ray:{ray_version}-py{sys.version_info.major}{sys.version_info.minor}"), image


def secret_problems(text: str, name: str) -> list[str]:
    """Secrets in a config file: a key-like string, a Kubernetes Secret, a credential variable set to a
    literal value (references such as valueFrom are fine: the value then lives elsewhere)."""
    problems = [f"{name}: a key-like string"] if SECRET_VALUE.search(text) else []
    for doc in (yaml.safe_load_all(text) if name.endswith((".yaml", ".yml")) else []):
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            problems.append(f"{name}: a Secret object")
        problems += [f"{name}: {var} has a literal value" for var, value in _env_vars(doc) if SECRET_ENV.search(var) and value]
    return problems


def test_no_secrets_in_cluster_configs():
    files = [p for p in sorted(CLUSTER.rglob("*")) if p.suffix in (".yaml", ".yml", ".txt") or p.name == "Dockerfile"]
    assert len(files) >= 8
    for path in files:
        assert secret_problems(path.read_text(), path.name) == []
    # The check can fail: a key in a pod's env, in a runtime_env, in a RayJob's runtimeEnvYAML.
    planted = (CLUSTER / "kuberay" / "raycluster.yaml").read_text().replace(
        "          - name: ray-head\n", "          - name: ray-head\n            env: [{name: AWS_SECRET_ACCESS_KEY, value: x}]\n")
    assert secret_problems(planted, "raycluster.yaml")
    assert secret_problems("env_vars: {QDRANT_API_KEY: x}\n", "runtime_env.yaml")
    assert secret_problems("spec: {runtimeEnvYAML: 'env_vars: {HF_TOKEN: x}'}\n", "rayjob.yaml")

    # The pods' credentials come from their service account (IRSA / workload identity).
    sa = load_yaml("kuberay/serviceaccount.yaml")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    spec = load_yaml("kuberay/raycluster.yaml")["spec"]
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert g["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def _pin(requirement: str) -> tuple[str, str]:
    name, version = requirement.strip().split("==")
    return re.sub(r"\[.*\]", "", name).lower().replace("_", "-"), version


def _env_vars(node):
    """(name, literal value) of every environment variable set anywhere in a config document."""
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            for e in node["env"]:
                yield e.get("name", ""), e.get("value")
        if isinstance(node.get("env_vars"), dict):
            yield from node["env_vars"].items()
        if isinstance(node.get("runtimeEnvYAML"), str):
            yield from _env_vars(yaml.safe_load(node["runtimeEnvYAML"]))
        for v in node.values():
            yield from _env_vars(v)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, str) and v.startswith("--env "):
                name, _, value = v[len("--env "):].partition("=")
                yield name, value
            else:
                yield from _env_vars(v)


def test_get_takes_a_reembed_error_out_of_rays_wrapper(ray_local):
    """The one place that unwraps Ray's RayTaskError (scan's tasks, repair's checks and the run use it): a
    ReembedError raised in a task comes out as its own class with its one line; anything else stays Ray's."""
    from reembed import cluster
    from reembed.errors import InputError

    def _raise_input_error(path: str) -> None:  # defined here so Ray pickles it by value
        raise InputError(f"{path}: row 3: no 'text' column; name it with --set input.text_column=...")

    def _raise_value_error() -> None:
        raise ValueError("not a user's mistake")

    def _length(text: str) -> int:
        return len(text)

    ray = ray_local
    with pytest.raises(InputError) as got:
        cluster.get([ray.remote(_raise_input_error).remote("docs/a.parquet")])
    assert type(got.value) is InputError
    assert str(got.value) == "docs/a.parquet: row 3: no 'text' column; name it with --set input.text_column=..."
    with pytest.raises(ray.exceptions.RayTaskError):
        cluster.get(ray.remote(_raise_value_error).remote())
    assert cluster.get([ray.remote(_length).remote("abc")]) == [3]


def test_surface_finds_the_error_under_chained_wrappers():
    from reembed import cluster
    from reembed.errors import InputError

    inner = InputError("in.jsonl: line 7: not JSON; fix the line or set input.on_bad_row=dead_letter\n\x1b[31mTraceback...")
    try:
        try:
            raise inner
        except InputError as e:
            raise RuntimeError("Ray Data: operator failed after 1/1 attempts") from e
    except RuntimeError as outer:
        found = cluster.surface(outer)
    assert isinstance(found, InputError)
    assert str(found) == "in.jsonl: line 7: not JSON; fix the line or set input.on_bad_row=dead_letter"
    plain = ValueError("x")
    assert cluster.surface(plain) is plain
