"""The deployment files in infra/ agree with each other and with the code they deploy.

No cluster is needed: the Kubernetes manifests are checked as data (every object complete,
selectors matching pod labels, every Secret reference resolvable), the GPU work-pool template is
rendered the way a Prefect worker renders it, and the names that tie the files together (work
pools, service URLs, image paths) are compared across files. One ``server`` test runs the real
``prefect deploy`` against a temporary Prefect server.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.utilities.templating import apply_values

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
PREFECT_BIN = Path(sys.executable).with_name("prefect")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[dict[str, Any]]:
    """Every object of the stack (the files kustomization.yaml lists, plus the Secret templates)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [K8S / name for name in kustomization["resources"]] + [K8S / "secrets.yaml"]
    return [doc for f in files for doc in _docs(f)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [m for m in _manifests() if m["kind"] == kind]


def _deployment(name: str) -> dict[str, Any]:
    config = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    (found,) = [d for d in config["deployments"] if d["name"] == name]
    return found


def _job_template() -> dict[str, Any]:
    return json.loads((INFRA / "gpu-job-template.json").read_text())


def _workloads() -> list[dict[str, Any]]:
    return [m for m in _manifests() if m["kind"] in ("Deployment", "StatefulSet", "Job")]


def _containers() -> list[dict[str, Any]]:
    return [c for w in _workloads() for c in w["spec"]["template"]["spec"]["containers"]]


# -- Kubernetes manifests -------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_secret_templates():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secrets.yaml"}


def test_every_manifest_is_a_complete_object_with_a_unique_name():
    seen = set()
    for m in _manifests():
        assert m.get("apiVersion") and m.get("kind") and m["metadata"].get("name"), m
        key = (m["kind"], m["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
    expected = {
        ("StatefulSet", "postgres"),
        ("Deployment", "minio"),
        ("Deployment", "prefect-server"),
        ("Deployment", "mlflow"),
        ("Deployment", "prefect-worker"),
        ("Role", "prefect-worker"),
        ("RoleBinding", "prefect-worker"),
        ("Secret", "cssl-runtime"),
    }
    assert expected <= seen


def test_workload_selectors_match_their_pod_labels():
    for w in _workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        selector = w["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= labels.items(), w["metadata"]["name"]


def test_every_service_reaches_a_named_container_port():
    for svc in _by_kind("Service"):
        selector = svc["spec"]["selector"]
        pods = [
            w
            for w in _workloads()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"service {svc['metadata']['name']} selects {len(pods)} workloads"
        ports = {
            p["name"]
            for c in pods[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)


def test_secret_references_resolve_and_templates_hold_no_credentials():
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _by_kind("Secret")}
    for values in secrets.values():
        assert all(v.startswith("REPLACE-") for v in values.values()), values
    for c in _containers():
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]], (c["name"], ref)
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, c["name"]
    runtime = _job_template()["variables"]["properties"]["runtime_secret"]["default"]
    assert set(secrets[runtime]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_worker_may_create_jobs_and_read_pods_in_its_namespace():
    (role,) = _by_kind("Role")
    verbs = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {"create", "delete", "watch"} <= verbs[("batch", "jobs")]
    assert {"get", "watch"} <= verbs[("", "pods")]
    assert {"get"} <= verbs[("", "pods/log")]
    (binding,) = _by_kind("RoleBinding")
    (worker,) = [w for w in _by_kind("Deployment") if w["metadata"]["name"] == "prefect-worker"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert (
        binding["subjects"][0]["name"] == worker["spec"]["template"]["spec"]["serviceAccountName"]
    )


# -- the GPU work pool ----------------------------------------------------------------------


def test_job_template_declares_every_variable_it_uses():
    template = _job_template()
    used = set(re.findall(r"{{\s*([\w]+)\s*}}", json.dumps(template["job_configuration"])))
    assert used == set(template["variables"]["properties"])


def test_gpu_deployment_renders_a_job_that_requests_a_gpu_on_a_gpu_node():
    """Render the pool's job template with refresh-gpu's job variables as a worker does:
    schema defaults, overlaid by the deployment's values, substituted into job_configuration."""
    template = _job_template()
    defaults = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if spec.get("default") is not None
    }
    job_variables = _deployment("refresh-gpu")["work_pool"]["job_variables"]
    values = {**defaults, **job_variables, "image": "cssl-worker:test"}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert container["image"] == "cssl-worker:test"
    assert container["envFrom"] == [{"secretRef": {"name": "cssl-runtime"}}]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/dev/shm", "/tmp", job_variables["env"]["CSSL_HOME"]}
    assert job["metadata"]["namespace"] == "cssl"
    assert pod["serviceAccountName"] == "cssl-flow-run"
    assert any(m["metadata"]["name"] == "cssl-flow-run" for m in _by_kind("ServiceAccount"))


def test_gpu_deployment_env_points_at_services_of_the_stack():
    env = _deployment("refresh-gpu")["work_pool"]["job_variables"]["env"]
    ports = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in _by_kind("Service")
    }
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        host, port = re.fullmatch(r"http://([a-z0-9-]+)[.\w-]*:(\d+)", env[key]).groups()
        assert int(port) in ports[host], (key, env[key])


# -- prefect.yaml, image and worker agree ---------------------------------------------------


def _flow_parameters(entrypoint: str) -> list[str]:
    """The parameters of the @flow function an entrypoint names (read from the source)."""
    path, function = entrypoint.split(":")
    tree = ast.parse((REPO / path).read_text())
    flows = {
        node.name: node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any("flow" in ast.unparse(d) for d in node.decorator_list)
    }
    assert function in flows, f"{path} has no @flow function {function!r}"
    return [a.arg for a in flows[function].args.args]


@pytest.mark.parametrize(
    ("name", "entrypoint"),
    [
        ("refresh-gpu", "pipelines/refresh.py:refresh"),
        ("refresh-local", "pipelines/refresh.py:refresh"),
        ("watch-local", "pipelines/watch.py:watch"),
    ],
)
def test_deployments_target_flows_of_the_repository(name: str, entrypoint: str):
    deployment = _deployment(name)
    assert deployment["entrypoint"] == entrypoint
    parameters = _flow_parameters(entrypoint)
    for schedule in deployment.get("schedules", []):
        assert set(schedule.get("parameters", {})) <= set(parameters)
    assert set(deployment["parameters"]) <= set(parameters)


def test_watch_runs_daily_and_on_every_published_shard(monkeypatch: pytest.MonkeyPatch):
    """The daily schedule checks the calendar period; the event trigger fires on the event
    `cssl ingest` emits (pipelines/events.py) and passes the period and shard it carries."""
    from cssl_core.config import load_params
    from pipelines import events

    watch = _deployment("watch-local")
    (daily,) = watch["schedules"]
    assert (daily["cron"], daily["timezone"], daily["parameters"]) == (
        "0 4 * * *",
        "UTC",
        {"period": "auto"},
    )
    # The refresh it starts is a deployment of this file, of the refresh flow, in its pool.
    params = load_params(REPO / "params.yaml", watch["parameters"]["overrides"])
    target = _deployment(params.watch.refresh_deployment)
    assert target["entrypoint"] == "pipelines/refresh.py:refresh"
    assert target["work_pool"]["name"] == watch["work_pool"]["name"] == "local-pool"

    sent: list[dict[str, Any]] = []
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(
        "prefect.events.emit_event", lambda event, **kw: sent.append(kw | {"event": event})
    )
    manifest = {"fingerprint": "abc", "num_rows": 10}
    assert events.emit_shard_published("2026-12", "/data/shards/2026-12", manifest)
    (event,) = sent
    (trigger,) = watch["triggers"]
    assert trigger["type"] == "event" and trigger["enabled"] is True
    assert trigger["expect"] == [event["event"]] == [events.SHARD_PUBLISHED]
    pattern = trigger["match"]["prefect.resource.id"]
    assert pattern.endswith("*") and event["resource"]["prefect.resource.id"].startswith(
        pattern[:-1]
    )
    rendered = {
        key: re.sub(
            r"\{\{ event\.payload\.(\w+) \}\}", lambda m: str(event["payload"][m.group(1)]), value
        )
        for key, value in trigger["parameters"].items()
    }
    assert rendered == {"period": "2026-12", "shard": "/data/shards/2026-12"}
    assert set(rendered) <= set(_flow_parameters(watch["entrypoint"]))


def test_schedules_and_pools():
    gpu, local = _deployment("refresh-gpu"), _deployment("refresh-local")
    (monthly,) = gpu["schedules"]
    assert (monthly["cron"], monthly["timezone"]) == ("0 3 1 * *", "UTC")
    assert monthly["parameters"] == {"period": "latest"}
    assert "store.root=s3://cssl/store" in gpu["parameters"]["overrides"]
    assert "schedules" not in local
    assert (gpu["work_pool"]["name"], local["work_pool"]["name"]) == ("gpu-pool", "local-pool")
    (pull,) = local["pull"]
    step_id = local["build"][0]["prefect.deployments.steps.run_shell_script"]["id"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == (
        "{{ " + step_id + ".stdout }}"
    )


def test_image_worker_and_deployment_use_the_same_paths_and_pool():
    dockerfile = (INFRA / "worker.Dockerfile").read_text()
    (workdir,) = re.findall(r"^WORKDIR (\S+)", dockerfile, re.M)
    (pull,) = _deployment("refresh-gpu")["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
    home = re.search(r"CSSL_HOME=(\S+)", dockerfile).group(1)
    assert _deployment("refresh-gpu")["work_pool"]["job_variables"]["env"]["CSSL_HOME"] == home
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    assert cmd[cmd.index("--pool") + 1] == "gpu-pool"
    (worker,) = [w for w in _by_kind("Deployment") if w["metadata"]["name"] == "prefect-worker"]
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--pool=gpu-pool" in args and "--type=kubernetes" in args


def test_gpu_deploy_stops_without_an_image():
    """refresh-gpu's first build step is a shell line (run with shell=True by Prefect) that
    prints CSSL_IMAGE, or fails the deploy with a message naming it when it is unset."""
    (step,) = _deployment("refresh-gpu")["build"]
    spec = step["prefect.deployments.steps.run_shell_script"]
    assert spec["shell"] is True and spec["id"] == "image"
    env = {k: v for k, v in os.environ.items() if k != "CSSL_IMAGE"}
    refused = subprocess.run(["sh", "-c", spec["script"]], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "set CSSL_IMAGE" in refused.stderr
    env["CSSL_IMAGE"] = "registry.test/cssl-worker:abc"
    done = subprocess.run(["sh", "-c", spec["script"]], env=env, capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "registry.test/cssl-worker:abc")
    assert _deployment("refresh-gpu")["work_pool"]["job_variables"]["image"] == "{{ image.stdout }}"


# -- the real `prefect deploy` --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A Prefect server process on a free port with its own PREFECT_HOME (SQLite)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(PREFECT_BIN), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _prefect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PREFECT_BIN), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.server
def test_prefect_deploy_accepts_every_deployment(prefect_server: dict[str, str]):
    """`prefect deploy --all --prefect-file infra/prefect.yaml` from the repository root, as
    infra/README.md says, creates every deployment as written, watch-local's event trigger as
    an automation (about 45 s: server start, and
    the flow module is imported once per deployment)."""
    env = prefect_server
    gpu_pool = ["work-pool", "create", "gpu-pool", "--type", "kubernetes", "--overwrite"]
    template = ["--base-job-template", str(INFRA / "gpu-job-template.json")]
    for args in (gpu_pool + template, ["work-pool", "create", "local-pool", "--type", "process"]):
        done = _prefect(env, *args)
        assert done.returncode == 0, done.stdout + done.stderr

    deploy = ["--no-prompt", "deploy", "--all", "--prefect-file", str(INFRA / "prefect.yaml")]
    done = _prefect({**env, "CSSL_IMAGE": "registry.test/cssl-worker:abc"}, *deploy)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    script = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as client:
        out = {}
        for name in ("refresh-gpu", "refresh-local"):
            d = await client.read_deployment_by_name(f"refresh/{name}")
            out[name] = {
                "pool": d.work_pool_name, "parameters": d.parameters, "pull": d.pull_steps,
                "job_variables": d.job_variables,
                "schedules": [[s.schedule.cron, s.schedule.timezone, s.parameters]
                              for s in d.schedules],
                "required": d.parameter_openapi_schema.get("required"),
            }
        w = await client.read_deployment_by_name("watch/watch-local")
        out["watch-local"] = {
            "pool": w.work_pool_name, "parameters": w.parameters,
            "schedules": [[s.schedule.cron, s.schedule.timezone, s.parameters]
                          for s in w.schedules],
            "automations": [
                {"expect": sorted(a.trigger.expect), "posture": str(a.trigger.posture.value),
                 "actions": [[x.type, str(x.deployment_id), x.parameters] for x in a.actions]}
                for a in await client.read_automations() if a.enabled
            ],
            "id": str(w.id),
        }
        print(json.dumps(out))
asyncio.run(main())
"""
    read = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert read.returncode == 0, read.stderr
    got = json.loads(read.stdout.strip().splitlines()[-1])
    gpu, local = got["refresh-gpu"], got["refresh-local"]
    assert gpu["pool"] == "gpu-pool" and local["pool"] == "local-pool"
    assert gpu["schedules"] == [["0 3 1 * *", "UTC", {"period": "latest"}]]
    assert local["schedules"] == []
    assert gpu["job_variables"]["image"] == "registry.test/cssl-worker:abc"
    assert gpu["job_variables"]["gpu_count"] == 1
    assert gpu["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/cssl"}}
    ]
    assert local["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]
    # No parameter is required: a run without a period names it from its shard or source.
    assert gpu["required"] is None and local["required"] is None
    watch = got["watch-local"]
    assert watch["pool"] == "local-pool"
    assert watch["schedules"] == [["0 4 * * *", "UTC", {"period": "auto"}]]
    assert watch["parameters"]["overrides"] == ["watch.refresh_deployment=refresh-local"]
    (automation,) = watch["automations"]  # the trigger became an automation of the server
    assert (automation["expect"], automation["posture"]) == (["cssl.shard.published"], "Reactive")
    (action,) = automation["actions"]
    assert action == [
        "run-deployment",
        watch["id"],
        {"period": "{{ event.payload.period }}", "shard": "{{ event.payload.path }}"},
    ]


@pytest.mark.server
def test_a_published_shard_event_starts_a_watch_run(prefect_server: dict[str, str]):
    """The event `cssl ingest` emits (pipelines/events.py), sent to a real server where
    watch-local is deployed: its automation creates a run of watch-local whose parameters are
    the period and the shard path of the event (no worker here: the run stays scheduled)."""
    env = prefect_server
    done = _prefect(env, "work-pool", "create", "local-pool", "--type", "process", "--overwrite")
    assert done.returncode == 0, done.stdout + done.stderr
    deploy = ["--no-prompt", "deploy", "--name", "watch-local"]
    done = _prefect(env, *deploy, "--prefect-file", str(INFRA / "prefect.yaml"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    emit = (
        "from pipelines.events import emit_shard_published\n"
        "assert emit_shard_published('2026-12', '/data/shards/2026-12', {'num_rows': 3})\n"
    )
    sent = subprocess.run(
        [sys.executable, "-c", emit], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert sent.returncode == 0, sent.stderr
    script = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    d = client.read_deployment_by_name("watch/watch-local")
    runs = client.read_flow_runs()
    print(json.dumps([r.parameters for r in runs if r.deployment_id == d.id]))
"""
    deadline = time.monotonic() + 120
    while True:
        read = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert read.returncode == 0, read.stderr
        # The daily schedule's runs (period auto) are there too; the event's carries a shard.
        runs = [p for p in json.loads(read.stdout.strip().splitlines()[-1]) if "shard" in p]
        if runs or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert len(runs) == 1, "no watch-local run with the event's shard within 120 s"
    (parameters,) = runs
    assert parameters["period"] == "2026-12" and parameters["shard"] == "/data/shards/2026-12"
    assert parameters["overrides"] == ["watch.refresh_deployment=refresh-local"]
