"""Faults 2 and 3: the object store (S3) and the MLflow tracking server go away.

The S3 API is a moto server process; a :class:`faultkit.FaultProxy` in front of it drops
every connection or answers 503 on command, so the outage hits whatever the client is doing.
The MLflow tracking server is a real ``mlflow server`` process (artifacts proxied to S3
through the same kind of proxy) that the tests kill -9 and start again on the same port.

Each test checks what survived: the previous replay-memory versions byte for byte, the
registry's finished versions and aliases, and that a rerun after the outage completes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import PERIODS, new_lineage
from faultkit import FaultProxy, MlflowProcess
from s3_server import DUMMY_SECRET_KEY, aws_test_environment

from cssl_core.data.shard import Shard
from cssl_core.data.storage import S3Store, StoreError, open_store
from cssl_core.memory.replay import ReplayMemory, list_versions, manifest_key

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]

MLFLOW_QUICK = {  # fail in seconds, not minutes, once the tracking server is gone
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


@pytest.fixture
def proxy(moto_server: Any) -> Iterator[FaultProxy]:
    p = FaultProxy(moto_server.endpoint)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def bucket(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket; every AWS client of the test process talks to it through ``proxy``."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_test_environment(proxy.endpoint, tmp_path).items():
        monkeypatch.setenv(name, value)
    name = f"cssl-faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=proxy.endpoint).create_bucket(Bucket=name)
    return name


def _memory_chain(sim_shards: Path, capacity: int = 32) -> list[ReplayMemory]:
    """Replay memory versions p01..p03 (reservoir selection: no model needed)."""
    chain, memory = [], ReplayMemory.empty(capacity)
    for p in PERIODS:
        memory = memory.update(
            Shard.open(sim_shards / p).read(split="train"), p, "reservoir", capacity, seed=0
        )
        chain.append(memory)
    return chain


def _one_line_without_secrets(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip(), text
    assert DUMMY_SECRET_KEY not in text
    return text


# -- S3 outage during a replay-memory update --------------------------------------------------


def test_replay_memory_update_rides_out_an_s3_outage_or_fails_leaving_old_versions_intact(
    bucket: str, proxy: FaultProxy, sim_shards: Path, monkeypatch: pytest.MonkeyPatch
):
    from pipelines.refresh import save_memory

    uri = f"s3://{bucket}/cssl"
    store = open_store(uri)
    m1, m2, m3 = _memory_chain(sim_shards)
    m1.save(store)
    before = {"p01": store.get_bytes(manifest_key("p01"))}

    # 1. Every connection dropped while the save starts; the store is back 4 s later, well
    #    inside the task's retry window (botocore retries, then Prefect's): the save completes.
    proxy.set_mode("drop")
    proxy.up_after(4.0)
    save_memory(uri, m2)
    assert proxy.refused > 0, "the outage was never hit"
    assert ReplayMemory.load(store, "p02").fingerprint == m2.fingerprint
    before["p02"] = store.get_bytes(manifest_key("p02"))

    # 2. The store starts answering 503 once the part of p03 is written and stays down
    #    past the (shortened) retry window: the update fails with one clear line, and p03 stays
    #    invisible (parts without a manifest), while p01 and p02 are untouched.
    real_put = S3Store.put_bytes
    puts: list[str] = []

    def put_then_outage(self: S3Store, key: str, data: bytes) -> None:
        real_put(self, key, data)
        puts.append(key)
        if key.startswith("memory/p03/part-"):
            proxy.set_mode("503")

    monkeypatch.setattr(S3Store, "put_bytes", put_then_outage)
    refused = proxy.refused
    with pytest.raises(StoreError) as failed:
        save_memory.with_options(retries=1, retry_delay_seconds=1)(uri, m3)
    message = _one_line_without_secrets(failed.value)
    assert message.startswith(f"{uri}/memory/p03") is False  # names the operation first
    assert "memory/p03/" in message, message
    assert proxy.refused > refused
    assert any(k.startswith("memory/p03/part-") for k in puts)
    assert not any(k == manifest_key("p03") for k in puts)
    monkeypatch.setattr(S3Store, "put_bytes", real_put)
    proxy.set_mode("up")
    assert list_versions(store) == ["p01", "p02"]
    assert not ReplayMemory.exists(store, "p03")
    for p, manifest in before.items():
        assert store.get_bytes(manifest_key(p)) == manifest
    assert [ReplayMemory.load(store, p).fingerprint for p in ("p01", "p02")] == [
        m1.fingerprint,
        m2.fingerprint,
    ]

    # 3. The rerun after the outage publishes p03 (and clears the invisible leftovers).
    save_memory(uri, m3)
    assert list_versions(store) == PERIODS
    assert ReplayMemory.load(store, "p03").fingerprint == m3.fingerprint


# -- outages inside a whole refresh (S3 store, MLflow server with artifacts on S3) ------------


@pytest.fixture
def server(bucket: str, proxy: FaultProxy, tmp_path: Path) -> Iterator[MlflowProcess]:
    """A tracking server whose artifact store is S3 behind ``proxy``."""
    artifacts = f"{bucket}-mlflow"
    boto3.client("s3", endpoint_url=proxy.endpoint).create_bucket(Bucket=artifacts)
    process = MlflowProcess(tmp_path / "mlflow-server", artifacts, proxy.endpoint)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _state(tmp_path: Path, params_file: Path, bucket: str, server: MlflowProcess, monkeypatch):
    state = new_lineage(
        tmp_path / "state", params_file, store=f"s3://{bucket}/cssl", tracking_uri=server.uri
    )
    state.use(monkeypatch)
    for name, value in MLFLOW_QUICK.items():
        monkeypatch.setenv(name, value)
    return state


def _refresh(state, sim_shards: Path, period: str) -> dict[str, Any]:
    from pipelines.refresh import refresh

    return refresh(
        period,
        shard=str(sim_shards / period),
        params_path=str(state.params_file),
        overrides=state.overrides,
    )


def _hook(monkeypatch, name: str, before=None, after=None, **options: Any) -> None:
    """Wrap the flow's task ``name`` (optionally with shorter retries) with an injection."""
    import pipelines.refresh as flow_module

    real = getattr(flow_module, name)
    task = real.with_options(**options) if options else real

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
        result = task(*args, **kwargs)
        if after is not None:
            after()
        return result

    monkeypatch.setattr(flow_module, name, hooked)


def _aliases(registry) -> tuple[int | None, int | None]:
    champion, challenger = registry.champion(), registry.alias("challenger")
    return (
        champion.version if champion else None,
        challenger.version if challenger else None,
    )


def _run_statuses(registry, period: str) -> list[str]:
    runs = registry.client.search_runs(
        [registry.experiment_id()], filter_string=f"attributes.run_name = 'refresh-{period}'"
    )
    return sorted(r.info.status for r in runs)


@pytest.mark.slow
def test_s3_outages_during_memory_update_and_artifact_upload_in_a_refresh(
    bucket: str,
    proxy: FaultProxy,
    server: MlflowProcess,
    tmp_path: Path,
    tiny_params_file: Path,
    sim_shards: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    from pipelines.mlflow_registry import MlflowRegistry

    state = _state(tmp_path, tiny_params_file, bucket, server, monkeypatch)
    store = open_store(state.store)

    # p01: the artifact store (S3 behind the tracking server) drops every connection as the
    # model upload starts and is back 4 s later: the registration retries and completes.
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    real_upload = HttpArtifactRepository.log_artifact
    started: list[str] = []

    def upload_into_outage(self, local_file, artifact_path=None):  # noqa: ANN001
        if not started:
            started.append(str(local_file))
            proxy.set_mode("drop")
            proxy.up_after(4.0)
        return real_upload(self, local_file, artifact_path)

    with monkeypatch.context() as m:
        m.setattr(HttpArtifactRepository, "log_artifact", upload_into_outage)
        first = _refresh(state, sim_shards, "p01")
    assert started, "the model was never uploaded through the tracking server"
    assert proxy.refused > 0, "the artifact upload never met the outage"
    registry = MlflowRegistry()
    assert [v.version for v in registry.versions()] == [1] and first["version"] == 1
    assert _aliases(registry) == (1, 1)
    from cssl_core.learn.models import Embedder

    v1 = registry.get(1)
    assert (
        Embedder.load(registry.download_embedder(1)).state_fingerprint()
        == (v1.tags["weights_sha256"])
    )
    p01_manifest = store.get_bytes(manifest_key("p01"))

    # p02, attempt 1: S3 answers 503 from the moment the new memory is selected and stays
    # down past the retry window: the refresh fails cleanly, p01's memory is untouched, the
    # new version is not registered and nothing is promoted.
    with monkeypatch.context() as m:
        _hook(m, "select_memory", after=lambda: proxy.set_mode("503"))
        _hook(m, "save_memory", retries=1, retry_delay_seconds=1)
        with pytest.raises(StoreError) as failed:
            _refresh(state, sim_shards, "p02")
    _one_line_without_secrets(failed.value)
    proxy.set_mode("up")
    assert list_versions(store) == ["p01"]
    assert store.get_bytes(manifest_key("p01")) == p01_manifest
    assert [v.version for v in registry.versions()] == [1]
    assert _aliases(registry) == (1, 1)

    # p02, attempt 2: the artifact store drops every connection during the model upload and
    # stays down: registration fails, no finished version, no alias moves.
    with monkeypatch.context() as m:
        _hook(
            m,
            "register_candidate",
            before=lambda: proxy.set_mode("drop"),
            retries=1,
            retry_delay_seconds=1,
        )
        with pytest.raises(Exception) as failed:  # noqa: B017 - MlflowException or OSError
            _refresh(state, sim_shards, "p02")
    assert DUMMY_SECRET_KEY not in str(failed.value)
    proxy.set_mode("up")
    assert [v.version for v in registry.versions()] == [1]
    assert _aliases(registry) == (1, 1)
    assert (
        registry.find_completed(
            "p02", Shard.open(sim_shards / "p02").fingerprint, v1.tags["config_hash"]
        )
        is None
    )
    assert _run_statuses(registry, "p02") == ["FAILED", "FAILED"]
    assert store.get_bytes(manifest_key("p01")) == p01_manifest

    # p02, attempt 3 (everything up): completes, with the memory version the tags name.
    second = _refresh(state, sim_shards, "p02")
    assert second["skipped"] is False
    versions = registry.versions()
    assert [(v.version, v.period) for v in versions] == [(1, "p01"), (2, "p02")]
    v2 = registry.get(2)
    assert ReplayMemory.load(store, "p02").fingerprint == v2.tags["memory_fingerprint"]
    assert list_versions(store) == ["p01", "p02"]
    assert store.get_bytes(manifest_key("p01")) == p01_manifest
    assert _aliases(registry) == (2 if second["promoted"] else 1, 2)


@pytest.mark.slow
def test_tracking_server_down_at_registration_moves_no_alias_and_the_rerun_completes(
    bucket: str,
    server: MlflowProcess,
    tmp_path: Path,
    tiny_params_file: Path,
    sim_shards: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    from mlflow.tracking import MlflowClient

    from pipelines.mlflow_registry import STATUS, MlflowRegistry
    from pipelines.registry import RegistryError
    from pipelines.settings import MODEL_NAME

    state = _state(tmp_path, tiny_params_file, bucket, server, monkeypatch)
    assert _refresh(state, sim_shards, "p01")["version"] == 1
    registry = MlflowRegistry()
    assert _aliases(registry) == (1, 1)

    # p02: the server dies (kill -9) between creating the version and marking it complete.
    real_tag = MlflowClient.set_model_version_tag

    def die_first(self, name, version, key, value):  # noqa: ANN001
        if key == STATUS and server.process is not None and server.process.poll() is None:
            server.kill()
        return real_tag(self, name, version, key, value)

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "set_model_version_tag", die_first)
        _hook(m, "register_candidate", retries=1, retry_delay_seconds=1)
        with pytest.raises(Exception) as failed:  # noqa: B017 - MlflowException
            _refresh(state, sim_shards, "p02")
    assert server.kills == 1
    message = str(failed.value)
    assert "set_terminated" not in message and DUMMY_SECRET_KEY not in message
    server.start()  # back, same port, same database
    half = [
        mv
        for mv in registry.client.search_model_versions(f"name='{MODEL_NAME}'")
        if mv.tags.get("period") == "p02"
    ]
    assert [mv.tags.get(STATUS) for mv in half] == ["registering"]  # the half version
    with pytest.raises(RegistryError, match="is not a finished version"):
        registry.get(int(half[0].version))
    with pytest.raises(RegistryError):
        registry.promote(int(half[0].version))
    assert [v.version for v in registry.versions()] == [1]
    assert _aliases(registry) == (1, 1)
    assert "FINISHED" not in _run_statuses(registry, "p02")

    # The rerun is not fooled by the half version: it registers and completes a new one.
    second = _refresh(state, sim_shards, "p02")
    assert second["skipped"] is False and second["version"] == int(half[0].version) + 1
    assert [v.period for v in registry.versions()] == ["p01", "p02"]
    assert _aliases(registry) == (second["version"] if second["promoted"] else 1, second["version"])
    assert _refresh(state, sim_shards, "p02")["skipped"] is True  # and now it is finished

    # p03: the server is down before registration starts; nothing moves; the rerun completes.
    aliases = _aliases(registry)
    with monkeypatch.context() as m:
        _hook(m, "register_candidate", before=server.kill, retries=1, retry_delay_seconds=1)
        with pytest.raises(Exception):  # noqa: B017 - MlflowException / connection error
            _refresh(state, sim_shards, "p03")
    server.start()
    assert [v.period for v in registry.versions()] == ["p01", "p02"]
    assert _aliases(registry) == aliases
    third = _refresh(state, sim_shards, "p03")
    assert [v.period for v in registry.versions()] == ["p01", "p02", "p03"]
    assert registry.get(third["version"]).tags[STATUS] == "complete"
