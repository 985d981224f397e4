"""Safety: keys read from manifests never leave the store, and nothing is unpickled.

A replay-memory manifest and a shard manifest are tampered with in the object store (the
local directory store and S3): part keys with ``..``, absolute paths and backslashes. Loading
must stop with a one-line error before any byte is read from or written outside the store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PERIODS

from cssl_core import period as core
from cssl_core.data.shard import Shard, ShardError
from cssl_core.data.storage import LocalStore, StoreError, open_store
from cssl_core.memory.replay import ReplayError, ReplayMemory, manifest_key

EVIL_KEYS = ["../../../outside.parquet", "/etc/passwd", "..\\..\\outside.parquet", ".hidden"]


def _published(store, sim_shards: Path) -> None:
    memory = ReplayMemory.empty(16).update(
        Shard.open(sim_shards / PERIODS[0]).read(split="train"), "p01", "reservoir", 16, seed=0
    )
    memory.save(store)
    core.publish_shard(store, Shard.open(sim_shards / "p01"))


def _tamper(store, key: str, field: str, value: str) -> None:
    manifest = json.loads(store.get_bytes(key))
    manifest["parts"][0][field] = value
    store.put_bytes(key, json.dumps(manifest).encode())


def _check(store, sim_shards: Path, tmp_path: Path) -> None:
    _published(store, sim_shards)
    for evil in EVIL_KEYS:
        _tamper(store, manifest_key("p01"), "key", evil)
        with pytest.raises((ReplayError, StoreError)) as failed:
            ReplayMemory.load(store, "p01")
        assert "\n" not in str(failed.value)
        _tamper(store, "shards/p01/manifest.json", "file", evil)
        cache = tmp_path / "cache"
        with pytest.raises((ShardError, StoreError)) as failed:
            core.stored_shard(store, "p01", cache)
        assert "\n" not in str(failed.value)
        outside = [p for p in tmp_path.rglob("*outside*")] + [Path("/outside.parquet")]
        assert not any(p.exists() for p in outside), outside


def test_tampered_manifests_in_a_local_store(tmp_path: Path, sim_shards: Path):
    _check(LocalStore(tmp_path / "store" / "deep"), sim_shards, tmp_path)


@pytest.mark.server
def test_tampered_manifests_in_s3(s3_bucket: str, tmp_path: Path, sim_shards: Path):
    _check(open_store(f"s3://{s3_bucket}/cssl"), sim_shards, tmp_path)


def test_nothing_in_the_product_unpickles():
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*root.glob("cssl_core/**/*.py"), *root.glob("pipelines/*.py")]:
        text = path.read_text(encoding="utf-8")
        for needle in ("import pickle", "pickle.load", "torch.load(", "cloudpickle", "joblib.load"):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
    assert offenders == []
