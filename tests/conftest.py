"""Shared fixtures: real CIFAR-10 JPEGs (``$CSSL_CIFAR10``, ``../shared/data`` or the per-user
cache, downloaded once), a small ingest config, and the pipeline fixtures (tiny params,
simulated shards, Prefect harness, MLflow server, a lineage)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from benchmarks.datasets import DatasetError, default_cifar10_source, ensure_cifar10
from cssl_core.config import IngestConfig, SimulateConfig
from cssl_core.runtime import environment  # noqa: F401  (tests import it from here)

CIFAR_PARQUET = default_cifar10_source()  # $CSSL_CIFAR10, ../shared/data, or the user's cache


def pytest_configure(config: pytest.Config) -> None:
    """Find the real-image data the suite reads (downloading it into the per-user cache on a
    fresh machine), or stop at once with one line saying what to set."""
    try:
        found = ensure_cifar10()
    except DatasetError as exc:
        raise pytest.UsageError(f"the tests read real CIFAR-10 JPEGs: {exc}") from None
    if not found.is_file():
        raise pytest.UsageError(
            f"the tests read real CIFAR-10 JPEGs from one Parquet file, but {found} is not a "
            "file: set CSSL_CIFAR10 to a cifar10-jpeg.parquet"
        )


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Each test leaves torch's thread count as it found it: the session lineage trains in
    this process, and bit-identical reproduction (DVC vs the flow) needs the same count."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cifar_jpegs() -> list[bytes]:
    """The first 64 CIFAR-10 rows as JPEG bytes (real natural images, 32x32, distinct)."""
    reader = pq.ParquetFile(CIFAR_PARQUET)
    batch = next(reader.iter_batches(64, columns=["image"]))
    images = batch.column("image").to_pylist()
    assert len(set(images)) == len(images), "fixture expects distinct images"
    return images


@pytest.fixture
def ingest_cfg() -> IngestConfig:
    """Defaults with small row groups, so a few dozen frames already span several groups."""
    return IngestConfig(rows_per_group=16, rows_per_part=64)


# -- pipeline fixtures: tiny settings, simulated shards, Prefect, MLflow, S3 ---------------
#
# The pipeline tests (test_registry, test_refresh, test_dvc, test_prefect_deploy, test_cli) run
# the real flow, registry, servers and DVC on settings small enough for a 2-core CPU: a
# resnet10t at 32 px, 3 training steps, 80 simulated frames per period.

pytest_plugins = ["s3_server"]  # moto_server (session), s3_endpoint, s3_bucket

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"

TINY_PARAMS: dict[str, Any] = {
    "periods": {"p01": {"previous": ""}, "p02": {"previous": "p01"}, "p03": {"previous": "p02"}},
    # eval_fraction 0.2: these tiny shards keep 64 train frames (the default 0.6 sizes an eval
    # split for +-0.03 intervals, which no test here needs).
    "simulate": {"frames_per_period": 80, "size": 32, "eval_fraction": 0.2},
    "model": {
        "backbone": "resnet10t",
        "input_size": 32,
        "projector_hidden": 64,
        "projector_dim": 32,
        "predictor_hidden": 64,
    },
    "train": {"steps": 3, "batch_size": 16, "warmup_steps": 1, "precision": "fp32"},
    "eval": {"probe_epochs": 5, "max_train_frames": 64},
    "replay": {"capacity": 32},
    # A 3-step model on 80 frames scores within noise of its parent, so a strict gate would
    # pass or reject it by chance. The lineage tests are about orchestration: every tiny
    # candidate passes; tests that need a rejection set strict thresholds themselves, and
    # the gate's rule has its own tests (test_gate.py).
    "gate": {"margin": 1.0, "max_forgetting": 1.0, "bootstrap_samples": 200},
}
PERIODS = list(TINY_PARAMS["periods"])


def tiny_override_list(tree: dict[str, Any] = TINY_PARAMS) -> list[str]:
    """TINY_PARAMS as ``section.key=value`` overrides (for ``--set`` and ``overrides=``)."""
    out = []
    for section, values in tree.items():
        if section == "periods":
            out.append(f"periods={json.dumps(values)}")
        else:
            out += [f"{section}.{k}={json.dumps(v)}" for k, v in values.items()]
    return out


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return tiny_override_list()


@pytest.fixture(scope="session")
def tiny_params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete params.yaml: TINY_PARAMS plus the defaults of cssl_core.config for every
    other key (DVC needs each section a stage names to be in the file)."""
    from cssl_core.config import params_from_dict

    path = tmp_path_factory.mktemp("params") / "params.yaml"
    tree = params_from_dict(TINY_PARAMS).model_dump(mode="json")
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def sim_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards p01..p03 of the simulated stream, exactly as ``cssl ingest`` makes them from
    TINY_PARAMS (``ingest.source: simulate``): root/<period>/."""
    from cssl_core.data.simulate import simulate_period

    root = tmp_path_factory.mktemp("shards")
    cfg = SimulateConfig(**TINY_PARAMS["simulate"])
    for index, period in enumerate(PERIODS):
        simulate_period(root, period, index, len(PERIODS), cfg)
    return root


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API (SQLite) for every flow run of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@dataclass
class Lineage:
    """A pipeline state (CSSL_HOME, MLflow tracking URI, store root) and what ran in it."""

    home: Path
    tracking_uri: str
    store: str
    params_file: Path
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)  # period -> weights_sha256 tag

    @property
    def env(self) -> dict[str, str]:
        return {"CSSL_HOME": str(self.home), "MLFLOW_TRACKING_URI": self.tracking_uri}

    @property
    def overrides(self) -> list[str]:
        return [f"store.root={self.store}"]

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)


def new_lineage(
    root: Path, params_file: Path, store: str | None = None, tracking_uri: str | None = None
) -> Lineage:
    root.mkdir(parents=True, exist_ok=True)
    return Lineage(
        home=root / "home",
        tracking_uri=tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
        store=store or str(root / "store"),
        params_file=params_file,
    )


@pytest.fixture(scope="session")
def lineage(
    prefect_harness: None,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_params_file: Path,
    sim_shards: Path,
) -> Lineage:
    """The refresh flow run over p01..p03 once per session (SQLite MLflow, local store).

    ``summaries`` and ``weights`` are recorded right after the runs; tests that change the
    registry afterwards (rollback, a rejected candidate) must not rely on the order of tests.
    """
    from pipelines.mlflow_registry import MlflowRegistry
    from pipelines.refresh import refresh

    state = new_lineage(tmp_path_factory.mktemp("lineage"), tiny_params_file)
    with environment(**state.env):
        for period in PERIODS:
            state.summaries[period] = refresh(
                period,
                shard=str(sim_shards / period),
                params_path=str(tiny_params_file),
                overrides=state.overrides,
            )
        registry = MlflowRegistry()
        for v in registry.versions():
            state.weights[v.period] = v.tags["weights_sha256"]
    return state


@dataclass
class MlflowServer:
    uri: str
    bucket: str
    s3_endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="session")
def mlflow_server(
    moto_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` (SQLite backend) whose artifacts go to ``s3://<bucket>`` on the
    moto server, proxied by the tracking server (clients need no S3 credentials)."""
    import boto3
    from s3_server import aws_test_environment, free_port

    tmp = tmp_path_factory.mktemp("mlflow-server")
    aws = aws_test_environment(moto_server.endpoint, tmp)
    bucket = "mlflow-artifacts"
    boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint,
        region_name=aws["AWS_DEFAULT_REGION"],
        aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=bucket)
    port = free_port()
    log = tmp / "server.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{tmp / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{bucket}/artifacts",
            ],
            env={**os.environ, **aws},
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", bucket, moto_server.endpoint, process, log)
    try:
        wait_for_http(f"{server.uri}/health", process, log, timeout=180)
        yield server
    finally:
        stop_process(process)


def wait_for_http(url: str, process: subprocess.Popen[Any], log: Path, timeout: float) -> None:
    """Wait until ``url`` answers 200, or fail with the tail of the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    stop_process(process)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; log:\n{tail}")


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Terminate a process we started (kill it after 15 s)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
