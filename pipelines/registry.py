"""The model registry behind one small interface: runs, versions, lineage tags and aliases.

The flow, ``cssl report``, ``cssl embed`` and the CLI talk to a :class:`ModelRegistry` and
nothing else, and get typed records back (:class:`VersionInfo`, :class:`RunRecord`,
:class:`Rollback`), never a backend's own objects. :func:`open_registry` is the one place that
picks the implementation (MLflow, :mod:`pipelines.mlflow_registry`): another registry is a new
subclass plus one line there.

Rules every implementation keeps:

- One registered version per refreshed period. A version counts as finished only once the
  registry marks it complete, which happens last, so a run that died half way through
  registration is never mistaken for a finished one (:meth:`ModelRegistry.versions` lists
  finished versions only).
- Aliases ``@champion`` (serving) and ``@challenger`` (last candidate); promotions are
  remembered so :meth:`ModelRegistry.rollback` goes back to the previous champion.

The lineage (:meth:`ModelRegistry.lineage_matrix`) is derived from those records in this module
for every implementation: only versions that passed the gate are the lineage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cssl_core.config import Params, PeriodChain
from cssl_core.evaluation.metrics import AccuracyMatrix

if TYPE_CHECKING:
    from cssl_core.learn.models import Embedder

GateVerdict = Literal["pass", "reject", ""]
CompatTag = Literal["direct", "adapter", "none", ""]
COMPAT_TAG = "cssl.compat"
"""The registry tag saying how a version can search the index of the champion it replaced."""
RunStatus = Literal["FINISHED", "FAILED"]
CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(RuntimeError):
    """A registry operation that the user asked for cannot be done (one-line message)."""


@dataclass(frozen=True)
class VersionTags:
    """The lineage a registered version carries: what it was made from, and the gate's verdict.

    ``parent_version`` is the champion it was trained from (None for the first period);
    ``memory_manifest``/``memory_fingerprint`` name the replay memory version kept for its
    period (the lineage's, see :mod:`pipelines.refresh`). ``previous_period`` is the period
    it continued from (whose replay memory it replayed; empty for the first) and ``source``
    where its frames came from (the raw source it ingested, or the shard it was given): with
    them the chain that ran can be written out for DVC (``cssl lineage export``).

    ``compat`` (tag ``cssl.compat``, :data:`COMPAT_TAG`) says how this version can search an
    index the champion it was compared with (``parent_version``) embedded: ``direct`` (its
    own embedding, ``M[new][old] >= M[old][old]``), ``adapter`` (only through its query-side
    adapter), ``none`` (re-embed the index: backfill); empty with no champion (first period).
    """

    period: str
    shard_fingerprint: str
    config_hash: str
    parent_version: int | None = None
    memory_manifest: str = ""
    memory_fingerprint: str = ""
    git_commit: str = ""
    strategy: str = ""
    weights_sha256: str = ""
    gate: GateVerdict = ""
    previous_period: str = ""
    source: str = ""
    compat: CompatTag = ""

    def as_tags(self) -> dict[str, str]:
        """Flat string tags (``parent_version`` empty when there is none; ``compat`` under
        the key ``cssl.compat``)."""
        tags = {f.name: getattr(self, f.name) for f in fields(self)}
        tags["parent_version"] = "" if self.parent_version is None else str(self.parent_version)
        tags[COMPAT_TAG] = tags.pop("compat")
        return {k: str(v) for k, v in tags.items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> VersionTags:
        """Read the lineage back from flat tags (missing tags are empty)."""
        parent = tags.get("parent_version", "")
        verdict = tags.get("gate", "")
        gate: GateVerdict = "pass" if verdict == "pass" else "reject" if verdict == "reject" else ""
        found = tags.get(COMPAT_TAG, "")
        compat: CompatTag = found if found in ("direct", "adapter", "none") else ""  # type: ignore[assignment]
        return cls(
            period=tags.get("period", ""),
            shard_fingerprint=tags.get("shard_fingerprint", ""),
            config_hash=tags.get("config_hash", ""),
            parent_version=int(parent) if parent.isdigit() else None,
            memory_manifest=tags.get("memory_manifest", ""),
            memory_fingerprint=tags.get("memory_fingerprint", ""),
            git_commit=tags.get("git_commit", ""),
            strategy=tags.get("strategy", ""),
            weights_sha256=tags.get("weights_sha256", ""),
            gate=gate,
            previous_period=tags.get("previous_period", ""),
            source=tags.get("source", ""),
            compat=compat,
        )


@dataclass(frozen=True)
class VersionInfo:
    """One finished registered version: its number, lineage tags, aliases, and when it was
    registered (``created``, seconds since the epoch; None when the registry does not say)."""

    version: int
    run_id: str
    lineage: VersionTags
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)  # every tag (lineage and registry's)
    created: float | None = None

    @property
    def period(self) -> str:
        return self.lineage.period

    @property
    def passed_gate(self) -> bool:
        return self.lineage.gate == "pass"


@dataclass(frozen=True)
class RunRecord:
    """A tracked run as logged: final metric values, parameters and tags, its name and when
    it started (seconds since the epoch; None when the registry does not say)."""

    run_id: str
    status: str
    metrics: Mapping[str, float]
    params: Mapping[str, str]
    tags: Mapping[str, str]
    name: str = ""
    start_time: float | None = None


@dataclass(frozen=True)
class MetricPoint:
    """One metric value at a step (training curves log one point per step)."""

    key: str
    value: float
    step: int = 0


@dataclass(frozen=True)
class Rollback:
    """What ``rollback`` did: ``@champion`` moved from one version to another."""

    from_version: int
    to_version: int


class EmbeddingPredictor(ABC):
    """A registered version loaded the way serving loads it: encoded frames in, embeddings out."""

    @abstractmethod
    def predict(self, images: Sequence[bytes]) -> np.ndarray:
        """L2-normalised embeddings ``(N, D)`` float32 of ``N`` encoded frames (JPEG/PNG)."""


class ModelRegistry(ABC):
    """Runs, registered versions, aliases and model files of the ``stream-embedding`` model."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where the registry lives (for messages and for reopening it in another task)."""

    # -- runs ----------------------------------------------------------------------------
    @abstractmethod
    def start_run(self, name: str, experiment: str | None = None) -> str:
        """Open a run (by default in the refreshes' experiment; ``experiment`` names another,
        created on first use, e.g. the drift checks' and the watch decisions'); returns its
        id."""

    @abstractmethod
    def end_run(self, run_id: str, status: RunStatus) -> None:
        """Close a run as FINISHED or FAILED."""

    @abstractmethod
    def log_params(self, run_id: str, params: Mapping[str, str]) -> None: ...

    @abstractmethod
    def log_metrics(self, run_id: str, metrics: Sequence[MetricPoint]) -> None: ...

    @abstractmethod
    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        """Upload every file of ``local_dir`` under ``artifact_path`` of the run."""

    @abstractmethod
    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...

    @abstractmethod
    def run(self, run_id: str) -> RunRecord: ...

    @abstractmethod
    def search_runs(
        self, experiment: str | None = None, tags: Mapping[str, str] | None = None, limit: int = 1
    ) -> list[RunRecord]:
        """The newest ``limit`` runs of ``experiment`` (default: the refreshes') whose tags
        include ``tags``, newest first (by start time); empty when there are none."""

    # -- versions ------------------------------------------------------------------------
    @abstractmethod
    def register(
        self, run_id: str, model_dir: Path, lineage: VersionTags, embedding_dim: int
    ) -> VersionInfo:
        """Store the embedder in ``model_dir`` (safetensors + config) as a new version of the
        run, with its lineage tags and a serving signature (frames in, ``embedding_dim``
        floats out); mark it complete last and point ``@challenger`` at it."""

    @abstractmethod
    def versions(self) -> list[VersionInfo]:
        """All finished versions, oldest first."""

    @abstractmethod
    def get(self, version: int) -> VersionInfo:
        """A finished version (:class:`RegistryError` when there is none by that number)."""

    def find_completed(
        self, period: str, shard_fingerprint: str, config_hash: str
    ) -> VersionInfo | None:
        """The finished version already made from exactly these inputs, if any."""
        for v in self.versions():
            t = v.lineage
            if (t.period, t.shard_fingerprint, t.config_hash) == (
                period,
                shard_fingerprint,
                config_hash,
            ):
                return v
        return None

    # -- aliases -------------------------------------------------------------------------
    @abstractmethod
    def alias(self, name: str) -> VersionInfo | None: ...

    def champion(self) -> VersionInfo | None:
        return self.alias(CHAMPION)

    @abstractmethod
    def promote(self, version: int) -> None:
        """Point ``@champion`` at a finished ``version`` and remember it for rollback."""

    @abstractmethod
    def rollback(self) -> Rollback:
        """Move ``@champion`` back to the previous champion."""

    # -- model files ---------------------------------------------------------------------
    @abstractmethod
    def download_embedder(self, version: int, dest: Path | None = None) -> Path:
        """The version's embedder directory (safetensors + config.json; nothing pickled)."""

    def load_embedder(self, version: int) -> Embedder:
        from cssl_core.learn.models import Embedder

        return Embedder.load(self.download_embedder(version))

    @abstractmethod
    def resolve(self, model_ref: str) -> VersionInfo | None:
        """The version a model reference names (``champion``, ``3``, or the backend's own URI
        form such as ``models:/stream-embedding@champion``); None when it names none."""

    @abstractmethod
    def load_predictor(self, model_ref: str) -> EmbeddingPredictor:
        """The model a reference names, loaded as serving loads it."""

    # -- lineage -------------------------------------------------------------------------
    def lineage(self) -> dict[str, VersionInfo]:
        """Period -> the version the lineage continued from: the newest version of that
        period that passed the gate. A period none of whose versions passed has no entry:
        rejected candidates are never the lineage (the lineage continued from the champion)."""
        kept: dict[str, VersionInfo] = {}
        for v in self.versions():  # oldest first: a newer passing version replaces an older
            if v.passed_gate:
                kept[v.period] = v
        return kept

    def stream_periods(self) -> list[str]:
        """Every period this registry has a finished version of, in the order they were first
        refreshed: the stream so far, rejected periods included (their eval sets count, and
        their replay memory is the next period's)."""
        periods: list[str] = []
        for v in self.versions():
            if v.period and v.period not in periods:
                periods.append(v.period)
        return periods

    def lineage_matrix(self, periods: Sequence[str], metric: str) -> AccuracyMatrix:
        """R[i][j] over ``periods`` (stream order), read back from the lineage's runs.

        Row i is the accuracy on every period so far of the lineage's version of period i
        (:meth:`lineage`); a period with no promoted version has no row (NaN). The entry
        just above each row, R[i][k] for the next lineage period k, is the accuracy on k of
        the model before it trained on k (its run logged the champion's scores) when that
        champion was version i.
        """
        kept = {p: v for p, v in self.lineage().items() if p in periods}
        matrix = AccuracyMatrix(list(periods))
        rows = [p for p in periods if p in kept]
        for i, p in enumerate(rows):
            metrics = self.run(kept[p].run_id).metrics
            for q in periods:
                if f"{metric}/{q}" in metrics:
                    matrix.set(p, q, metrics[f"{metric}/{q}"])
            if i + 1 < len(rows):
                nxt = kept[rows[i + 1]]
                later = self.run(nxt.run_id).metrics
                key = f"champion_{metric}/{nxt.period}"
                if nxt.lineage.parent_version == kept[p].version and key in later:
                    matrix.set(p, nxt.period, later[key])
        return matrix


def period_chain(params: Params, registry: ModelRegistry, period: str) -> PeriodChain:
    """Period ``period``'s place in the stream.

    A period declared in params.yaml has its declared chain, as always. Any other period
    continues the stream that ran: the periods the registry has refreshed, in the order they
    were first refreshed (:meth:`ModelRegistry.stream_periods`), then ``period`` (a period
    refreshed before keeps its place). Its previous period is the last one refreshed before
    it (whose replay memory it continues from, as a declared period continues from the one
    declared before it), its parent model is ``@champion``, and its index (what ``joint`` and
    the simulator need) is its position in that stream, so a new period needs no edit of
    params.yaml. The chain that ran is in the versions' ``previous_period`` tags.
    """
    if params.is_declared(period):
        return params.chain(period)
    ran = registry.stream_periods()
    if period in ran:
        return PeriodChain(tuple(ran[: ran.index(period) + 1]))
    return PeriodChain((*ran, period))


def lineage_rows(matrix: AccuracyMatrix) -> AccuracyMatrix:
    """The square part of ``matrix`` over the periods that have a row (the lineage's periods).

    Forgetting, BWT and FWT are defined on a full lineage; a period none of whose versions
    passed the gate has no row and no model that ever learned it, so it is left out of them
    (its eval set still counts in each row's accuracies and in the gate's averages).
    """
    values = matrix.values
    keep = [k for k in range(len(matrix.periods)) if not np.isnan(values[k]).all()]
    if not keep:
        return matrix
    return AccuracyMatrix([matrix.periods[k] for k in keep], values[np.ix_(keep, keep)])


def with_row(matrix: AccuracyMatrix, period: str, row: Mapping[str, float]) -> AccuracyMatrix:
    """A copy of ``matrix`` whose row ``period`` is ``row`` (the candidate being decided on;
    an empty ``row`` clears it)."""
    values = matrix.values
    k = matrix.index(period)
    values[k] = np.nan
    for q, value in row.items():
        values[k, matrix.index(q)] = value
    return AccuracyMatrix(list(matrix.periods), values)


def open_registry(uri: str | None = None) -> ModelRegistry:
    """The registry the pipeline uses: MLflow at ``uri`` (default: ``MLFLOW_TRACKING_URI``,
    else SQLite in the state folder, see :mod:`pipelines.settings`)."""
    from pipelines.mlflow_registry import MlflowRegistry

    return MlflowRegistry(uri)
