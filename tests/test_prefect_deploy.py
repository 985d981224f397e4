"""The ``refresh-local`` deployment of infra/prefect.yaml on a real Prefect server and worker.

A ``prefect server start`` process (SQLite in a temporary PREFECT_HOME), a process work pool,
``prefect deploy --prefect-file infra/prefect.yaml --name refresh-local`` from the repository
root, a run triggered with ``prefect deployment run`` and a ``prefect worker start --run-once``
process that executes it in a subprocess. The flow run must complete and leave its version in
the MLflow registry the worker's environment points at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, REPO, stop_process, wait_for_http
from s3_server import free_port

from cssl_core.data.shard import Shard
from pipelines.mlflow_registry import MlflowRegistry

pytestmark = pytest.mark.server

POOL = "local-pool"  # the work pool infra/prefect.yaml names for refresh-local


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server process; yields the environment that points the CLI at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
    }
    log = home / "server.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_http(f"{env['PREFECT_API_URL']}/health", process, log, timeout=180)
        yield env
    finally:
        stop_process(process)


def _prefect(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(BIN / "prefect"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}" + (done.stderr[-3000:])
    )
    return done.stdout + done.stderr


def test_deployment_runs_refresh_on_a_worker(
    prefect_server: dict[str, str], tmp_path: Path, sim_shards: Path, tiny_params_file: Path
):
    state = tmp_path / "state"
    env = {
        **prefect_server,
        "CSSL_HOME": str(state / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
    }
    _prefect(env, "work-pool", "create", POOL, "--type", "process")
    written = [REPO / "prefect.yaml", REPO / ".prefect", REPO / ".prefectignore"]
    existed = {p for p in written if p.exists()}
    _prefect(
        env,
        "--no-prompt",
        "deploy",
        "--prefect-file",
        "infra/prefect.yaml",
        "--name",
        "refresh-local",
    )
    assert {p for p in written if p.exists()} == existed, "deploy wrote into the checkout"

    parameters = {
        "period": "p01",
        "shard": str(sim_shards / "p01"),
        "params_path": str(tiny_params_file),
        "overrides": [f"store.root={state / 'store'}"],
    }
    out = _prefect(
        env, "deployment", "run", "refresh/refresh-local", "--params", json.dumps(parameters)
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    run_id = match.group(1)

    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    logs = worker.stdout[-4000:] + worker.stderr[-4000:]
    assert worker.returncode == 0, logs

    inspect = json.loads(_prefect(env, "flow-run", "inspect", run_id, "--output", "json"))
    assert inspect["state"]["type"] == "COMPLETED", logs
    assert inspect["parameters"] == parameters

    registry = MlflowRegistry(env["MLFLOW_TRACKING_URI"])
    (version,) = registry.versions()
    assert (version.version, version.period) == (1, "p01")
    assert version.tags["shard_fingerprint"] == Shard.open(sim_shards / "p01").fingerprint
    assert registry.champion() is not None and registry.champion().version == 1
    assert (state / "store" / "memory" / "p01" / "manifest.json").is_file()


def test_watch_starts_a_run_of_the_refresh_deployment(
    prefect_server: dict[str, str], tmp_path: Path, sim_shards: Path, tiny_params_file: Path
):
    """``cssl watch`` against the server: with no @champion it decides to refresh and, since
    the server has ``refresh/refresh-local``, starts a run of it without waiting (recording
    the flow-run id); a process worker then runs that refresh, which registers version 1."""
    state = tmp_path / "state"
    env = {
        **prefect_server,
        "CSSL_HOME": str(state / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
    }
    _prefect(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    _prefect(
        env,
        "--no-prompt",
        "deploy",
        "--prefect-file",
        "infra/prefect.yaml",
        "--name",
        "refresh-local",
    )
    overrides = [f"store.root={state / 'store'}", "watch.refresh_deployment=refresh-local"]
    watched = subprocess.run(
        [
            str(BIN / "cssl"),
            "watch",
            "--shard",
            str(sim_shards / "p01"),
            "--params",
            str(tiny_params_file),
            *(f"--set={o}" for o in overrides),
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert watched.returncode == 0, watched.stdout[-3000:] + watched.stderr[-3000:]
    record = json.loads(watched.stdout[watched.stdout.index("{") :])
    assert (record["action"], record["triggers"]) == ("refresh", ["no_champion"])
    started = record["refresh"]
    assert (started["mode"], started["deployment"]) == ("deployment", "refresh/refresh-local")
    registry = MlflowRegistry(env["MLFLOW_TRACKING_URI"])
    assert registry.versions() == []  # watch did not wait for the refresh
    decision = registry.run(record["run_id"])
    assert decision.tags["cssl.refresh.flow_run_id"] == started["flow_run_id"]

    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    logs = worker.stdout[-4000:] + worker.stderr[-4000:]
    assert worker.returncode == 0, logs
    inspect = json.loads(
        _prefect(env, "flow-run", "inspect", started["flow_run_id"], "--output", "json")
    )
    assert inspect["state"]["type"] == "COMPLETED", logs
    assert inspect["parameters"] == {
        "period": "p01",
        "shard": str(sim_shards / "p01"),
        "params_path": str(tiny_params_file),
        "overrides": overrides,
    }
    (version,) = registry.versions()
    assert (version.version, version.period) == (1, "p01")
    assert registry.champion().version == 1
