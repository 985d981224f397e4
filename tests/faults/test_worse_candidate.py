"""Fault 7: a deliberately worse candidate must not reach @champion.

p01 is refreshed normally (version 1 becomes @champion). Then p02 arrives corrupted: every
frame's pixels are randomly permuted (the shard is otherwise valid and passes validation),
and the refresh fine-tunes on it without distillation or replay, for many steps at a high
(but finite) learning rate. The
candidate is measurably worse on the earlier period, the gate rejects it with its reasons,
the version is registered as ``gate=reject`` (@challenger), and @champion stays version 1.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import new_lineage
from PIL import Image

from cssl_core.config import IngestConfig
from cssl_core.data.images import frame_id
from cssl_core.data.shard import MANIFEST, Shard
from cssl_core.data.validate import validate_shard

pytestmark = pytest.mark.usefixtures("prefect_harness")

# The gate of params.yaml (the tiny test params relax it so other tests are deterministic).
PRODUCTION_GATE = [
    "gate.avg_accuracy_tolerance=0.01",
    "gate.new_period_tolerance=0.0",
    "gate.max_forgetting=0.1",
]


def shuffled_pixels_shard(src: Path, dest: Path, seed: int = 0) -> Shard:
    """A copy of the shard at ``src`` with every image's pixels randomly permuted."""
    rng = np.random.default_rng(seed)
    shutil.copytree(src, dest)
    (dest / MANIFEST).unlink()
    for part in Shard.open(src).part_paths():
        table = pq.read_table(dest / part.name)
        images, ids = [], []
        for data in table.column("image").to_pylist():
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            flat = pixels.reshape(-1, 3)
            noise = flat[rng.permutation(len(flat))].reshape(pixels.shape)
            buf = io.BytesIO()
            Image.fromarray(noise).save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue())
            ids.append(frame_id(buf.getvalue()))
        for name, values in (("image", pa.array(images, pa.binary())), ("frame_id", pa.array(ids))):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), values)
        pq.write_table(table, dest / part.name)
    assert validate_shard(dest, IngestConfig()).repaired  # a valid shard again, new manifest
    return Shard.open(dest)


@pytest.mark.slow
def test_a_candidate_trained_on_shuffled_pixels_is_rejected_and_the_champion_stays(
    tmp_path: Path, tiny_params_file: Path, sim_shards: Path, monkeypatch: pytest.MonkeyPatch
):
    from pipelines.mlflow_registry import MlflowRegistry
    from pipelines.refresh import refresh

    state = new_lineage(tmp_path / "state", tiny_params_file)
    state.use(monkeypatch)

    def run(period: str, shard: Path, *extra: str) -> dict:
        return refresh(
            period,
            shard=str(shard),
            params_path=str(tiny_params_file),
            overrides=[*state.overrides, *PRODUCTION_GATE, *extra],
        )

    # A champion worth protecting: at the tiny default of 3 steps p01's model is still at
    # chance level on the kNN probe, and nothing can be worse than chance.
    first = run("p01", sim_shards / "p01", "train.steps=30")
    assert first["promoted"] and first["version"] == 1
    bad = shuffled_pixels_shard(sim_shards / "p02", tmp_path / "bad" / "p02")
    assert bad.num_rows == Shard.open(sim_shards / "p02").num_rows
    summary = run("p02", bad.path, "train.strategy=finetune", "train.steps=30", "train.lr=1.0")
    registry = MlflowRegistry()
    # The candidate is worse where it matters: on the period the champion already served.
    assert summary["row"]["p01"] < summary["champion_row"]["p01"], summary
    assert summary["promoted"] is False and summary["skipped"] is False, summary["reasons"]
    failed = [r for r in summary["reasons"] if r.startswith("FAIL")]
    assert any(r.startswith(("FAIL forgetting", "FAIL average accuracy")) for r in failed), failed
    rejected = registry.get(summary["version"])
    assert (rejected.version, rejected.period, rejected.tags["gate"]) == (2, "p02", "reject")
    assert rejected.tags["parent_version"] == "1"
    assert registry.champion().version == 1
    assert registry.alias("challenger").version == 2
