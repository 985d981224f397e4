"""Credentials never leak: a refresh (and a failing one) run with dummy secrets in the
environment, then every place the pipeline writes to is scanned for them.

Scanned: the processes' stdout and stderr (Prefect and MLflow logs, the one-line error),
every MLflow run's params, tags and metric names, every run artifact and the registered
model's files, the tracking server's database, every object in the S3 store and every file
under CSSL_HOME (checkpoints, caches, locks).
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from faultkit import MlflowProcess, cli_env, cssl_command, files_under, tiny_cli_args
from s3_server import DUMMY_SECRET_KEY, aws_test_environment

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzSESSION-token-secret-7f3a9c2e",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password-secret-51d2b8",
    "PREFECT_API_KEY": "pnu_prefect-key-secret-0c1e44",
}


def _leaks(data: bytes | str) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return [name for name, value in SECRETS.items() if value.encode() in raw]


def test_the_scan_finds_a_planted_secret(tmp_path: Path):
    planted = tmp_path / "x" / "y.bin"
    planted.parent.mkdir()
    planted.write_bytes(b"\x00prefix " + SECRETS["MLFLOW_TRACKING_PASSWORD"].encode() + b"\xff")
    assert [_leaks(p.read_bytes()) for p in files_under(tmp_path)] == [["MLFLOW_TRACKING_PASSWORD"]]


@pytest.mark.slow
def test_no_secret_in_logs_mlflow_artifacts_store_or_errors(
    moto_server: Any, tmp_path: Path, tiny_params_file: Path, sim_shards: Path
):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from pipelines.settings import MODEL_NAME

    aws = aws_test_environment(moto_server.endpoint, tmp_path)
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint,
        region_name=aws["AWS_REGION"],
        aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = f"cssl-secrets-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=f"{bucket}-mlflow")
    server = MlflowProcess(tmp_path / "server", f"{bucket}-mlflow", moto_server.endpoint)
    server.start()
    try:
        home = tmp_path / "home"
        env = cli_env(home, server.uri, **{**aws, **SECRETS})
        base = ["--params", str(tiny_params_file)]
        ok = subprocess.run(
            cssl_command(
                "refresh",
                "--period",
                "p01",
                "--shard",
                str(sim_shards / "p01"),
                *base,
                *tiny_cli_args(f"store.root=s3://{bucket}/cssl"),
            ),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ok.returncode == 0, ok.stderr[-3000:]
        bad = subprocess.run(  # a store that does not exist: a one-line error
            cssl_command(
                "refresh",
                "--period",
                "p01",
                "--shard",
                str(sim_shards / "p01"),
                *base,
                *tiny_cli_args(f"store.root=s3://{bucket}-missing/cssl"),
            ),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert bad.returncode == 1
        error = bad.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and f"{bucket}-missing" in error, error

        found: dict[str, list[str]] = {}

        def scan(where: str, data: bytes | str) -> None:
            if leaks := _leaks(data):
                found[where] = leaks

        for name, proc in (("ok", ok), ("failed", bad)):
            scan(f"{name} stdout", proc.stdout)
            scan(f"{name} stderr", proc.stderr)

        client = MlflowClient(server.uri, registry_uri=server.uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs, "the refresh logged no MLflow run"
        for run in runs:
            scan(f"run {run.info.run_id} params", repr(sorted(run.data.params.items())))
            scan(f"run {run.info.run_id} tags", repr(sorted(run.data.tags.items())))
            scan(f"run {run.info.run_id} metrics", repr(sorted(run.data.metrics)))
            dest = tmp_path / "artifacts" / run.info.run_id
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, dst_path=str(dest), tracking_uri=server.uri
            )
            for path in files_under(dest):
                scan(str(path), path.read_bytes())
        model = client.get_registered_model(MODEL_NAME)
        scan("registered model tags", repr(model.tags))
        versions = client.search_model_versions(f"name='{MODEL_NAME}'")
        assert [int(v.version) for v in versions] == [1]
        scan("version tags", repr(versions[0].tags))
        model_dir = tmp_path / "model"
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(MODEL_NAME, "1"),
            dst_path=str(model_dir),
            tracking_uri=server.uri,
        )
        scanned = list(files_under(model_dir, home, server.root / "mlflow.db"))
        assert any(p.suffix == ".safetensors" for p in scanned)
        for path in scanned:
            scan(str(path), path.read_bytes())
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.startswith("cssl/memory/p01/") for k in keys)
        for key in keys:
            scan(f"s3://{bucket}/{key}", s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert found == {}, f"secrets leaked: {found}"
    finally:
        server.stop()
