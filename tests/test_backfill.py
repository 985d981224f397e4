"""Backfill under faults and on a Dask cluster: kill -9 mid-way then rerun (every frame exactly
once, all on the new version, searchable while interrupted), and the Prefect flow on two local
Dask workers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_PARAMS

from cssl_core.config import ModelConfig
from cssl_core.data.shard import Shard
from cssl_core.learn.models import Embedder
from pipelines.index import EmbeddingIndex
from pipelines.index_build import build_index, embed_images, iter_shard_frames

DRIVER = Path(__file__).with_name("backfill_driver.py")
PERIODS = ("p01", "p02", "p03")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    cfg = ModelConfig(**TINY_PARAMS["model"])
    root = tmp_path_factory.mktemp("models")
    for seed in (1, 2):
        torch.manual_seed(seed)
        Embedder(cfg).save(root / f"v{seed}")
    return root


@pytest.fixture
def built_index(tmp_path, monkeypatch, sim_shards, tiny_models):
    """240 simulated frames indexed with version 1."""
    monkeypatch.setenv("CSSL_HOME", str(tmp_path / "home"))
    shards = [sim_shards / p for p in PERIODS]
    build_index(shards, tiny_models / "v1", 1, tmp_path / "index")
    return tmp_path / "index", shards


def _all_frame_ids(shards: list[Path]) -> list[str]:
    return sorted(
        f for s in shards for f in Shard.open(s).read(["frame_id"])["frame_id"].to_pylist()
    )


def _assert_backfilled(index: EmbeddingIndex, shards: list[Path], model_dir: Path) -> None:
    status = index.status()
    assert status.backfill is None and status.live_version == 2
    assert status.rows_per_version == {2: 240}
    table = index._open(status.live_table).search().select(["frame_id"]).to_arrow()
    assert sorted(table["frame_id"].to_pylist()) == _all_frame_ids(shards)  # each exactly once
    meta, images = next(iter_shard_frames(Shard.open(shards[1]), 5))
    expected = embed_images(Embedder.load(model_dir), images)
    for i, fid in enumerate(meta["frame_id"].to_pylist()):
        np.testing.assert_allclose(index.stored_vectors(fid).vector, expected[i], atol=1e-5)


def test_kill_9_mid_backfill_then_rerun(built_index, tiny_models, tmp_path):
    index_dir, shards = built_index
    seed = int(os.environ.get("CSSL_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)  # CSSL_FAULT_SEED=<seed> replays the kill point
    kill_after = rng.randint(2, 5)  # of 8 chunks
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(DRIVER),
        str(index_dir),
        str(tiny_models / "v2"),
        "2",
        "32",
        "0.4",
        *map(str, shards),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
            if line.startswith("committed") and int(line.split()[2]) >= kill_after:
                time.sleep(rng.uniform(0.0, 0.6))  # in the pause or inside the next chunk
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: " + "".join(lines)

    index = EmbeddingIndex(index_dir)
    progress = index.status().backfill
    assert progress is not None, f"seed {seed}"
    assert kill_after <= progress.chunks_done < progress.chunks, f"seed {seed}"
    assert index.pointer().live.model_version == 1  # not switched
    per_version = index.status().rows_per_version
    assert sum(per_version.values()) == 240 and per_version[2] == progress.rows_done

    # Searching the interrupted index: new rows in the new space, the others in the old one.
    done_fid = index._open(progress.table).search().where("model_version = 2").limit(1)
    done_fid = done_fid.select(["frame_id"]).to_arrow()["frame_id"][0].as_py()
    vecs = index.stored_vectors(done_fid)
    hits = index.search(vecs.vector, k=240, old_query=vecs.old_vector)
    assert len({h.frame_id for h in hits}) == len(hits) == 240
    assert {h.space for h in hits} == {1, 2}
    assert sum(h.space == 2 for h in hits) == progress.rows_done
    best = [h.frame_id for h in hits if h.score >= hits[0].score - 1e-6]
    assert done_fid in best and hits[0].score == pytest.approx(1.0, abs=1e-5)

    rerun = subprocess.run(
        cmd[:6] + ["0", *cmd[7:]], env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = [ln for ln in rerun.stdout.splitlines() if ln.startswith("report")][0].split()
    assert int(report[1]) == progress.chunks - progress.chunks_done  # committed chunks skipped
    assert report[2] == "True"
    _assert_backfilled(index, shards, tiny_models / "v2")


@pytest.mark.server
def test_backfill_flow_on_two_dask_workers(prefect_harness, built_index, tiny_models, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from pipelines.backfill import DASK_SPAWN_ENVIRON, run_distributed_backfill

    # Dask starts worker processes; they reach the session's Prefect API through the
    # environment instead of each starting a temporary server of its own.
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    index_dir, shards = built_index
    environ = {k: os.environ.get(k) for k in DASK_SPAWN_ENVIRON}
    report = run_distributed_backfill(
        index_dir, shards, tiny_models / "v2", 2, workers=2, chunk_size=32, waves=4
    )
    # The local cluster's worker settings (OMP_NUM_THREADS=1, ...) do not stay behind in this
    # process: a later torchrun or DVC subprocess must train on the usual threads.
    assert {k: os.environ.get(k) for k in DASK_SPAWN_ENVIRON} == environ
    assert report.switched and report.chunks_run == report.chunks == 8
    pids = {w.split(":")[-1] for w in report.workers}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two worker processes embedded
    _assert_backfilled(EmbeddingIndex(index_dir), shards, tiny_models / "v2")
