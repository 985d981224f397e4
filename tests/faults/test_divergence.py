"""Fault 5: the loss becomes NaN in the middle of a refresh.

The session lineage (p01..p03 refreshed, a champion serving) is refreshed again for p03 with
a changed config (so it is real work, not "already refreshed"), and the training loss is
poisoned at its second step. The refresh must stop with a one-line error, register and
promote nothing, write no replay memory, and leave @champion and @challenger where they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Lineage

from cssl_core.data.storage import LocalStore
from cssl_core.learn.trainer import ContinualTrainer, TrainingDiverged
from cssl_core.memory.replay import list_versions
from pipelines.refresh import refresh

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_refresh_and_the_champion_keeps_serving(
    bad: float, lineage: Lineage, sim_shards: Path, monkeypatch: pytest.MonkeyPatch
):
    from pipelines.mlflow_registry import MlflowRegistry

    lineage.use(monkeypatch)
    registry = MlflowRegistry()
    versions = [(v.version, v.tags["cssl.status"]) for v in registry.versions()]
    champion, challenger = registry.champion(), registry.alias("challenger")
    assert champion is not None and challenger is not None
    store = LocalStore(lineage.store)
    memories = list_versions(store)
    manifests = {
        p: (Path(lineage.store) / "memory" / p / "manifest.json").read_bytes() for p in memories
    }
    failed_before = _failed_runs(registry)

    real = ContinualTrainer.loss_terms
    calls: list[int] = []

    def poisoned(self: ContinualTrainer, v1: torch.Tensor, v2: torch.Tensor, labels: list):
        total, terms = real(self, v1, v2, labels)
        calls.append(1)
        return (total * bad if len(calls) == 2 else total), terms

    monkeypatch.setattr(ContinualTrainer, "loss_terms", poisoned)
    with pytest.raises(TrainingDiverged) as diverged:  # the CLI prints it as its one line
        refresh(
            "p03",
            shard=str(sim_shards / "p03"),
            params_path=str(lineage.params_file),
            overrides=[*lineage.overrides, "train.steps=4"],
        )
    message = str(diverged.value)
    assert len(calls) == 2  # stopped at the poisoned step
    assert "\n" not in message and message.startswith(f"loss became {bad} at step 1 "), message
    assert "nothing was promoted" in message

    assert [(v.version, v.tags["cssl.status"]) for v in registry.versions()] == versions
    assert registry.champion().version == champion.version
    assert registry.alias("challenger").version == challenger.version
    assert list_versions(store) == memories
    for p, data in manifests.items():
        assert (Path(lineage.store) / "memory" / p / "manifest.json").read_bytes() == data
    assert _failed_runs(registry) == failed_before + 1  # the attempt is on record, as FAILED


def _failed_runs(registry) -> int:
    runs = registry.client.search_runs(
        [registry.experiment_id()], filter_string="attributes.status = 'FAILED'"
    )
    return len(runs)
