"""``dvc repro`` of the project's dvc.yaml in a temporary git repository, on tiny params.

The DVC stages and the Prefect flow call the same ``cssl_core.period`` functions, so a period
reproduced with DVC must have the very weights (and accuracies) the flow registered for the
same shards and params: the session ``lineage`` is the flow's run on TINY_PARAMS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, TINY_PARAMS, Lineage

from cssl_core.data.shard import Shard
from cssl_core.data.storage import LocalStore
from cssl_core.learn.models import Embedder
from cssl_core.memory.replay import ReplayMemory
from pipelines.mlflow_registry import MlflowRegistry


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dvc_repo(
    tmp_path_factory: pytest.TempPathFactory, tiny_params_file: Path
) -> tuple[Path, dict[str, str]]:
    """A git + DVC repository with the project's dvc.yaml and a tiny params.yaml, after
    ``dvc repro evaluate@p02`` (ingest p01, p02 -> train p01, p02 -> evaluate p02)."""
    repo = tmp_path_factory.mktemp("dvc-repo")
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(tiny_params_file, repo / "params.yaml")  # the file the flow's runs read
    for placeholder in ("data/models/.model", "data/memory/.memory"):
        shutil.copytree(REPO / placeholder, repo / placeholder)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env["CSSL_HOME"] = str(repo / ".cssl")
    _run(["git", "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "repro", "evaluate@p02"], repo, env)
    return repo, env


def test_repro_makes_models_memory_and_metrics(dvc_repo, sim_shards: Path):
    repo, _ = dvc_repo
    data = repo / "data"
    for period in ("p01", "p02"):
        shard = Shard.open(data / "shards" / period)
        # `cssl ingest` with ingest.source=simulate makes exactly the session's shards.
        assert shard.fingerprint == Shard.open(sim_shards / period).fingerprint
        assert (data / "models" / f"{period}.model" / "model.safetensors").is_file()
        memory = ReplayMemory.load(LocalStore(data / "memory" / f"{period}.memory"), period)
        assert memory.period == period and 0 < len(memory) <= TINY_PARAMS["replay"]["capacity"]
    assert not (data / "models" / "p03.model").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    # evaluate@<period> depends on the whole data/shards folder, so every ingest stage runs.
    assert set(lock["stages"]) == {
        "ingest@p01",
        "ingest@p02",
        "ingest@p03",
        "train@p01",
        "train@p02",
        "evaluate@p02",
    }
    metrics = json.loads((data / "metrics" / "p02.json").read_text())
    assert set(metrics["scores"]) == {"p01", "p02"}


def test_repro_matches_the_prefect_flow(dvc_repo, lineage: Lineage):
    """Same shards, same params: DVC's p01 and p02 weights are bit-identical to the versions
    the flow registered, and evaluate@p02 gives the accuracies the flow logged for p02."""
    repo, _ = dvc_repo
    for period in ("p01", "p02"):
        model = Embedder.load(repo / "data" / "models" / f"{period}.model")
        assert model.state_fingerprint() == lineage.weights[period], period
    p02 = json.loads((repo / "data" / "metrics" / "p02.json").read_text())
    assert p02["weights_sha256"] == lineage.weights["p02"]
    registry = MlflowRegistry(lineage.tracking_uri)
    version = next(v for v in registry.versions() if v.period == "p02" and v.version <= 3)
    logged = registry.run(version.run_id).metrics
    for q, scores in p02["scores"].items():
        assert scores["knn"] == logged[f"knn/{q}"]
        assert scores["linear"] == logged[f"linear/{q}"]


def test_a_second_repro_does_nothing(dvc_repo):
    repo, env = dvc_repo
    before = (repo / "dvc.lock").read_bytes()
    done = _run([str(BIN / "dvc"), "repro", "evaluate@p02"], repo, env)
    assert "Data and pipelines are up to date" in done.stdout + done.stderr
    assert (repo / "dvc.lock").read_bytes() == before
