"""The lineage read back from a registry (issue 12, fix 5), on an in-memory ModelRegistry.

Only versions that passed the gate are the lineage: a period whose candidates were all
rejected has no row, and the lineage's metrics (forgetting, BWT) leave it out. The registry here
is a plain in-memory subclass of the interface, which is also what swapping the registry looks
like: the lineage logic comes with the interface.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from cssl_core.evaluation.metrics import AccuracyMatrix
from pipelines.registry import (
    EmbeddingPredictor,
    GateVerdict,
    MetricPoint,
    ModelRegistry,
    Rollback,
    RunRecord,
    RunStatus,
    VersionInfo,
    VersionTags,
    lineage_rows,
    with_row,
)

PERIODS = ["p01", "p02", "p03", "p04"]


class InMemoryRegistry(ModelRegistry):
    """Runs and versions in dicts; enough of the interface for the lineage."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, float]] = {}
        self._versions: list[VersionInfo] = []

    @property
    def uri(self) -> str:
        return "memory://"

    def start_run(self, name: str, experiment: str | None = None) -> str:
        run_id = f"run-{len(self.runs)}"
        self.runs[run_id] = {}
        return run_id

    def end_run(self, run_id: str, status: RunStatus) -> None:
        pass

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, run_id: str, metrics: Sequence[MetricPoint]) -> None:
        self.runs[run_id].update({m.key: m.value for m in metrics})

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        pass

    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        pass

    def run(self, run_id: str) -> RunRecord:
        return RunRecord(run_id, "FINISHED", dict(self.runs[run_id]), {}, {})

    def search_runs(
        self, experiment: str | None = None, tags: Mapping[str, str] | None = None, limit: int = 1
    ) -> list[RunRecord]:
        raise NotImplementedError

    def register(
        self, run_id: str, model_dir: Path, lineage: VersionTags, embedding_dim: int
    ) -> VersionInfo:
        info = VersionInfo(len(self._versions) + 1, run_id, lineage, tags=lineage.as_tags())
        self._versions.append(info)
        return info

    def versions(self) -> list[VersionInfo]:
        return list(self._versions)

    def get(self, version: int) -> VersionInfo:
        return self._versions[version - 1]

    def alias(self, name: str) -> VersionInfo | None:
        raise NotImplementedError

    def promote(self, version: int) -> None:
        raise NotImplementedError

    def rollback(self) -> Rollback:
        raise NotImplementedError

    def download_embedder(self, version: int, dest: Path | None = None) -> Path:
        raise NotImplementedError

    def resolve(self, model_ref: str) -> VersionInfo | None:
        raise NotImplementedError

    def load_predictor(self, model_ref: str) -> EmbeddingPredictor:
        raise NotImplementedError

    # -- a refresh as the flow logs it ---------------------------------------------------
    def refresh(
        self,
        period: str,
        row: Mapping[str, float],
        champion_row: Mapping[str, float],
        gate: GateVerdict,
        parent: int | None,
    ) -> int:
        run_id = self.start_run(f"refresh-{period}")
        points = [MetricPoint(f"knn/{p}", v) for p, v in row.items()]
        points += [MetricPoint(f"champion_knn/{p}", v) for p, v in champion_row.items()]
        self.log_metrics(run_id, points)
        tags = VersionTags(period, f"shard-{period}", "cfg", parent_version=parent, gate=gate)
        return self.register(run_id, Path("."), tags, 8).version


@pytest.fixture
def registry() -> InMemoryRegistry:
    """p01 and p02 promoted; p03's only candidate rejected (it forgot p01 badly); p04
    promoted from p02's version (the champion at the time)."""
    reg = InMemoryRegistry()
    v1 = reg.refresh("p01", {"p01": 0.80}, {}, "pass", None)
    v2 = reg.refresh("p02", {"p01": 0.78, "p02": 0.70}, {"p01": 0.80, "p02": 0.40}, "pass", v1)
    champ = {"p01": 0.78, "p02": 0.70, "p03": 0.45}
    reg.refresh("p03", {"p01": 0.10, "p02": 0.20, "p03": 0.90}, champ, "reject", v2)
    champ = {"p01": 0.78, "p02": 0.70, "p03": 0.45, "p04": 0.50}
    reg.refresh("p04", {"p01": 0.76, "p02": 0.72, "p03": 0.60, "p04": 0.65}, champ, "pass", v2)
    return reg


def test_a_rejected_period_has_no_row(registry: InMemoryRegistry):
    matrix = registry.lineage_matrix(PERIODS, "knn")
    assert set(registry.lineage()) == {"p01", "p02", "p04"}
    assert all(math.isnan(v) for v in matrix.row("p03").values())
    assert matrix.get("p01", "p01") == 0.80
    assert matrix.get("p04", "p03") == 0.60
    # R[i][next]: the champion's accuracy on the next lineage period, before it trained on it.
    assert matrix.get("p01", "p02") == 0.40
    assert matrix.get("p02", "p04") == 0.50  # p04 was trained from p02's version
    assert math.isnan(matrix.get("p02", "p03"))  # p03's run is no lineage run


def test_forgetting_ignores_the_rejected_candidate(registry: InMemoryRegistry):
    """Today's lineage took the rejected p03 row (p01 at 0.10) into forgetting, so p04 looked
    as if it had recovered from a collapse that never reached production."""
    matrix = lineage_rows(registry.lineage_matrix(PERIODS, "knn"))
    assert matrix.periods == ("p01", "p02", "p04")
    # f_p01 = max(0.80, 0.78) - 0.76 = 0.04; f_p02 = 0.70 - 0.72 = -0.02
    assert matrix.forgetting() == pytest.approx((0.04 - 0.02) / 2)
    assert matrix.bwt() == pytest.approx(((0.76 - 0.80) + (0.72 - 0.70)) / 2)


def test_with_no_passing_version_the_period_stays_rowless():
    reg = InMemoryRegistry()
    reg.refresh("p01", {"p01": 0.5}, {}, "reject", None)
    matrix = reg.lineage_matrix(PERIODS[:1], "knn")
    assert np.isnan(matrix.values).all()
    assert reg.lineage() == {}


def test_the_newest_passing_version_of_a_period_is_its_row():
    reg = InMemoryRegistry()
    reg.refresh("p01", {"p01": 0.5}, {}, "pass", None)
    reg.refresh("p01", {"p01": 0.6}, {}, "pass", None)
    reg.refresh("p01", {"p01": 0.9}, {}, "reject", None)
    assert reg.lineage()["p01"].version == 2
    assert reg.lineage_matrix(["p01"], "knn").get("p01", "p01") == 0.6


def test_with_row_replaces_one_row_and_leaves_the_input_alone():
    base = AccuracyMatrix(["a", "b"], [[0.5, 0.1], [0.4, 0.6]])
    new = with_row(base, "b", {"a": 0.3})
    assert new.row("b")["a"] == 0.3 and math.isnan(new.row("b")["b"])
    assert base.get("b", "b") == 0.6
    assert np.isnan(with_row(base, "a", {}).values[0]).all()
