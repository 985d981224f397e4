"""``pipelines.registry`` against a real ``mlflow server`` process whose artifacts go to S3
(a moto server process): versions and lineage tags, finished-version rules, aliases, promote
and rollback, weights round trip, and the models-from-code pyfunc flavour.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PARAMS

from cssl_core.config import ModelConfig
from cssl_core.evaluation.evaluate import extract_features
from cssl_core.learn.models import Embedder
from pipelines.mlflow_registry import STATUS, MlflowRegistry, serving_signature
from pipelines.registry import RegistryError, Rollback, VersionTags
from pipelines.settings import MODEL_NAME

pytestmark = pytest.mark.server

TINY_MODEL = ModelConfig(**TINY_PARAMS["model"])


@pytest.fixture(scope="module")
def registry(mlflow_server, tmp_path_factory) -> MlflowRegistry:
    """A registry on the server, emptied of ``stream-embedding`` (the server is shared)."""
    from mlflow.exceptions import MlflowException

    reg = MlflowRegistry(mlflow_server.uri)
    try:
        reg.client.delete_registered_model(MODEL_NAME)
    except MlflowException:
        pass
    return reg


@pytest.fixture(autouse=True)
def _env(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("CSSL_HOME", str(tmp_path / "home"))
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)


def _tags(period: str, seed: int) -> VersionTags:
    return VersionTags(
        period=period,
        shard_fingerprint=f"shard-{period}",
        config_hash="cfg-a",
        parent_version=None if seed == 0 else seed,
        memory_manifest=f"s3://store/memory/{period}/manifest.json",
        git_commit="abc",
        strategy=f"seed-{seed}",
        gate="pass",
        compat=("", "adapter", "none")[seed % 3],
    )


@pytest.fixture(scope="module")
def versions(registry: MlflowRegistry, tmp_path_factory) -> list[tuple[int, Embedder]]:
    """Three registered versions (p01..p03) of differently seeded tiny embedders."""
    made = []
    for seed, period in enumerate(["p01", "p02", "p03"]):
        torch.manual_seed(seed)
        model = Embedder(TINY_MODEL).eval()
        directory = model.save(tmp_path_factory.mktemp(f"model-{period}"))
        run_id = registry.start_run(f"test-{period}")
        info = registry.register(run_id, directory, _tags(period, seed), model.num_features)
        registry.end_run(run_id, "FINISHED")
        made.append((info.version, model))
    return made


def test_an_empty_registry(registry: MlflowRegistry):
    assert registry.versions() == []
    assert registry.champion() is None
    assert registry.alias("challenger") is None
    assert registry.find_completed("p01", "x", "y") is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.get(7)


def test_register_tags_lineage_and_moves_challenger(registry: MlflowRegistry, versions):
    assert [v for v, _ in versions] == [1, 2, 3]
    listed = registry.versions()
    assert [v.version for v in listed] == [1, 2, 3]
    assert [v.period for v in listed] == ["p01", "p02", "p03"]
    for seed, info in enumerate(listed):
        assert info.lineage == _tags(info.period, seed)
        assert info.tags == {**_tags(info.period, seed).as_tags(), STATUS: "complete"}
        assert info.run_id
    assert registry.alias("challenger").version == 3
    assert registry.get(2).period == "p02"
    # How each version can search its champion's index, under the tag key other tools read.
    assert [v.tags["cssl.compat"] for v in listed] == ["", "adapter", "none"]
    assert [v.lineage.compat for v in listed] == ["", "adapter", "none"]


def test_find_completed_matches_period_shard_and_config(registry: MlflowRegistry, versions):
    assert registry.find_completed("p02", "shard-p02", "cfg-a").version == 2
    assert registry.find_completed("p02", "shard-p02", "cfg-b") is None
    assert registry.find_completed("p02", "shard-p01", "cfg-a") is None
    assert registry.find_completed("p04", "shard-p02", "cfg-a") is None


def test_a_half_registered_version_is_never_a_finished_one(registry: MlflowRegistry, versions):
    """A version whose registration died before ``cssl.status=complete`` is invisible."""
    v1 = registry.get(1)
    mv = registry.client.create_model_version(
        MODEL_NAME,
        f"runs:/{v1.run_id}/model",
        run_id=v1.run_id,
        tags={**_tags("p04", 9).as_tags(), STATUS: "registering"},
    )
    assert int(mv.version) == 4
    assert [v.version for v in registry.versions()] == [1, 2, 3]
    assert registry.find_completed("p04", "shard-p04", "cfg-a") is None
    with pytest.raises(RegistryError, match="version 4 is not a finished version"):
        registry.get(4)
    with pytest.raises(RegistryError, match="not a finished version"):
        registry.promote(4)


def test_promote_and_rollback_walk_the_champion_history(registry: MlflowRegistry, versions):
    registry.promote(1)
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    registry.promote(2)
    registry.promote(3)
    assert registry.champion().version == 3
    assert "champion" in registry.get(3).aliases
    assert registry.rollback() == Rollback(3, 2)
    assert registry.champion().version == 2
    # Promoting a version again moves it to the end of the history (it appears once).
    registry.promote(3)
    registry.promote(1)  # history: 2, 3, 1
    assert registry.rollback() == Rollback(1, 3)
    assert registry.rollback() == Rollback(3, 2)
    assert registry.champion().version == 2
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    assert registry.champion().version == 2
    with pytest.raises(RegistryError, match="has no version 99"):
        registry.promote(99)


def test_download_embedder_returns_the_same_weights(
    registry: MlflowRegistry, versions, mlflow_server
):
    import boto3
    from s3_server import aws_test_environment

    for version, model in versions:
        loaded = Embedder.load(registry.download_embedder(version))
        assert loaded.state_fingerprint() == model.state_fingerprint()
    # The weights went through the server's artifact proxy into the S3 bucket.
    aws = aws_test_environment(mlflow_server.s3_endpoint, mlflow_server.log.parent)
    s3 = boto3.client(
        "s3",
        endpoint_url=mlflow_server.s3_endpoint,
        region_name=aws["AWS_DEFAULT_REGION"],
        aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
    )
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=mlflow_server.bucket)
        for o in page.get("Contents", [])
    ]
    assert sum(k.endswith("/model.safetensors") for k in keys) >= len(versions)


def test_pyfunc_champion_predicts_normalised_embeddings(
    registry: MlflowRegistry, versions, cifar_jpegs: list[bytes]
):
    registry.promote(2)
    images = cifar_jpegs[:10]
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    emb = served.predict(pd.DataFrame({"image": images}))
    model = versions[1][1]
    assert isinstance(emb, np.ndarray)
    assert emb.dtype == np.float32 and emb.shape == (len(images), model.num_features)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    want = F.normalize(extract_features(model, images, TINY_MODEL.input_size), dim=1).numpy()
    assert np.allclose(emb, want, atol=1e-5)
    other = F.normalize(extract_features(versions[0][1], images, TINY_MODEL.input_size), dim=1)
    assert not np.allclose(emb, other.numpy(), atol=1e-3)  # it really is version 2
    predictor = registry.load_predictor("champion")
    assert np.array_equal(predictor.predict(images), emb)
    assert registry.resolve("champion").version == 2
    assert registry.resolve(f"models:/{MODEL_NAME}/3").version == 3
    assert registry.resolve("models:/another-model@champion") is None


def test_a_version_logs_its_serving_signature_without_warnings(
    registry: MlflowRegistry, versions, tmp_path, recwarn, caplog
):
    """Frames in (an ``image`` column of bytes), float32 (N, D) out; MLflow has nothing to
    warn about (it used to print "Failed to infer model signature" at every registration)."""
    import logging

    torch.manual_seed(5)
    model = Embedder(TINY_MODEL).eval()
    run_id = registry.start_run("test-signature")
    with caplog.at_level(logging.WARNING):
        info = registry.register(
            run_id, model.save(tmp_path / "m"), _tags("p09", 5), model.num_features
        )
    registry.end_run(run_id, "FINISHED")
    logged = mlflow.models.get_model_info(f"models:/{MODEL_NAME}/{info.version}")
    assert logged.signature == serving_signature(model.num_features)
    assert logged.signature.inputs.input_names() == ["image"]
    mlflow_warnings = [str(w.message) for w in recwarn if "mlflow" in w.filename]
    assert mlflow_warnings == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("mlflow")] == []
