"""The Prefect flow ``refresh``: one period from raw frames to a (maybe) promoted model.

    validate (ingest?) → publish shard → done already? → load lineage → train → evaluate
        → compatibility matrix → decide (gate) → select memory → save memory → register
        → promote? → log

Every read or write of the object store or the registry happens inside a task that retries
with backoff (:data:`IO_RETRIES`); computation does not retry (a logic error would only fail
again). Tasks take and return typed values. Rerunning a finished period returns the existing
version without training; a second refresh of the same period while one runs fails fast. The
machine-learning work is ``cssl_core.period``, shared with the DVC stages and the benchmark;
the registry is a :class:`~pipelines.registry.ModelRegistry`.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cssl_core import period as core
from cssl_core.config import ConfigError, Params, PeriodChain, is_period_name, load_params
from cssl_core.data import storage
from cssl_core.data.shard import Shard, ShardError
from cssl_core.data.storage import open_store, redact
from cssl_core.evaluation.compatibility import (
    CompatibilityMatrix,
    CompatVerdict,
    compat_verdict,
    plot_compatibility_matrix,
    restrict_row,
)
from cssl_core.evaluation.intervals import (
    REPORTED_CONFIDENCE,
    Interval,
    average_accuracy_interval,
)
from cssl_core.evaluation.metrics import AccuracyMatrix, MissingAccuracy
from cssl_core.evaluation.outcomes import (
    METRICS,
    FrameOutcomes,
    Metric,
    PeriodScores,
    outcomes_table,
)
from cssl_core.learn.models import Embedder
from cssl_core.learn.trainer import StepLog, TrainResult
from cssl_core.memory.replay import ReplayError, ReplayMemory
from pipelines import progress, stopping
from pipelines.backfill import backfill_if_needed
from pipelines.gate import GateDecision, decide
from pipelines.registry import (
    MetricPoint,
    RegistryError,
    VersionInfo,
    VersionTags,
    lineage_rows,
    open_registry,
    period_chain,
    with_row,
)
from pipelines.settings import state_dir, tracking_uri

IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "cache_policy": NO_CACHE,
}
COMPUTE: dict[str, Any] = {"cache_policy": NO_CACHE}
LATEST = "latest"
AUTO = "auto"
_logger = logging.getLogger(__name__)


class RefreshBusy(RuntimeError):
    """Another refresh of the same period is running."""


class TrainingStopped(RuntimeError):
    """Training stopped early because the command was asked to stop (SIGTERM/SIGINT)."""


# -- what passes between the tasks ---------------------------------------------------------


@dataclass(frozen=True)
class LineageState:
    """What period t continues from, read from the store and the registry.

    ``chain`` is period t's place in the stream (its previous period, its history);
    ``memory`` is memory(t-1); ``published`` is memory(t) when an earlier refresh of this
    period already published it; ``matrix`` holds the lineage's rows of the periods before t
    (gate metric), ``low`` and ``high`` their logged 95% interval bounds (NaN where a run
    logged none).
    """

    chain: PeriodChain
    champion: VersionInfo | None
    parent: Embedder | None
    memory: ReplayMemory
    published: ReplayMemory | None
    shards: list[Shard]  # every period's shard so far, from the store; period t's last
    matrix: AccuracyMatrix
    low: AccuracyMatrix
    high: AccuracyMatrix

    @property
    def history(self) -> list[Shard]:
        return self.shards[:-1]


@dataclass(frozen=True)
class Trained:
    model: Embedder
    result: TrainResult
    memory: ReplayMemory  # memory(t) selected by this candidate (used when it is promoted)
    seconds: float  # the task's wall time (loading frames and selecting memory included)


@dataclass(frozen=True)
class Scores:
    """Accuracies (with per-frame outcomes) on every period so far: the candidate's, the
    champion's (the same eval frames; empty with no champion), and on period t the blind
    baselines: a randomly initialised model and the majority class."""

    candidate: dict[str, PeriodScores]
    champion: dict[str, PeriodScores]
    baseline: dict[str, PeriodScores]
    majority: dict[str, PeriodScores]
    seconds: float

    def tables(self) -> dict[str, dict[str, PeriodScores]]:
        """Every model's scores by the prefix its metrics are logged under."""
        return {
            "": self.candidate,
            "champion_": self.champion,
            "random_": self.baseline,
            "majority_": self.majority,
        }

    def outcomes(self) -> dict[str, dict[str, FrameOutcomes]]:
        """Per-frame outcomes by model name (``candidate``, ``champion``, ``random``,
        ``majority``): the run artifact ``eval/outcomes.parquet``."""
        names = {"": "candidate", "champion_": "champion", "random_": "random"}
        names["majority_"] = "majority"
        return {
            names[prefix]: {p: s.frames for p, s in table.items() if s.frames is not None}
            for prefix, table in self.tables().items()
        }


@dataclass(frozen=True)
class Compat:
    """Retrieval compatibility of the models a refresh involves
    (:mod:`cssl_core.evaluation.compatibility`).

    ``matrix`` is ``M[q][g]`` (top-1 and mAP@10) over :data:`CANDIDATE`, :data:`CHAMPION`
    and, when the live index was embedded by another version, :data:`INDEX`, plus the
    query-only row :data:`CANDIDATE_ADAPTER` (the candidate's queries through its adapter,
    comparable with the champion only) when the candidate has one; None when there is
    only the candidate. ``lineage`` lists the models oldest first, ``versions`` their registry
    versions (the candidate's is not known yet), ``verdict`` the candidate against the
    champion, ``average_compatibility`` CL2R's AC over ``lineage`` (None under two models).
    """

    matrix: CompatibilityMatrix | None
    lineage: tuple[str, ...]
    versions: dict[str, int]
    verdict: CompatVerdict | None
    average_compatibility: float | None
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        """The ``cssl.compat`` tag: ``direct``, ``adapter``, ``none``, or empty without a
        champion."""
        return self.verdict.kind if self.verdict is not None else ""


CANDIDATE, CHAMPION, INDEX = "candidate", "champion", "index"
CANDIDATE_ADAPTER = "candidate_adapter"
COMPAT_K = 10


@dataclass(frozen=True)
class Decision:
    """The gate's verdict and the lineage numbers it was taken on."""

    gate: GateDecision
    row: dict[str, float]
    champion_row: dict[str, float]
    matrix: AccuracyMatrix  # the lineage with the candidate's row for period t
    forgetting: float
    average_accuracy: float

    @property
    def promote(self) -> bool:
        return self.gate.promote


@dataclass
class RefreshSummary:
    """What one refresh did; printed by the CLI and returned by the flow."""

    period: str
    version: int
    promoted: bool
    skipped: bool = False
    champion_version: int | None = None
    reasons: list[str] = field(default_factory=list)
    row: dict[str, float] = field(default_factory=dict)
    champion_row: dict[str, float] = field(default_factory=dict)
    forgetting: float = 0.0
    average_accuracy: float = 0.0
    resumed_from: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    compat: str = ""  # cssl.compat: direct | adapter | none against the champion ("": none)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- I/O tasks (retried) -----------------------------------------------------------------


@task(**IO_RETRIES)
def publish_shard(store_uri: str, shard: Shard) -> bool:
    """Copy the shard into the store (no-op when the store holds the same one)."""
    return core.publish_shard(open_store(store_uri), shard)


@task(**IO_RETRIES)
def find_completed(registry_uri: str, shard: Shard, params: Params) -> RefreshSummary | None:
    """The summary of the finished version already made from this shard and config, if any."""
    registry = open_registry(registry_uri)
    done = registry.find_completed(shard.period, shard.fingerprint, params.config_hash())
    if done is None:
        return None
    champion = registry.champion()
    return RefreshSummary(
        shard.period,
        done.version,
        promoted=champion is not None and champion.version == done.version,
        skipped=True,
        champion_version=champion.version if champion else None,
        reasons=["already refreshed: same shard and config"],
    )


@task(**IO_RETRIES)
def resolve_chain(registry_uri: str, params: Params, period: str) -> PeriodChain:
    """Period t's place in the stream (:func:`pipelines.registry.period_chain`): declared in
    params.yaml, or continuing the stream the registry has refreshed."""
    return period_chain(params, open_registry(registry_uri), period)


@task(**IO_RETRIES)
def load_lineage(registry_uri: str, params: Params, chain: PeriodChain) -> LineageState:
    """@champion and its weights, memory(t-1) (and memory(t) if published), every shard of
    the chain so far and the lineage's accuracy rows."""
    registry = open_registry(registry_uri)
    store = open_store(params.store.root)
    period = chain.period
    cache = state_dir() / "cache" / "shards"
    shards = [core.stored_shard(store, p, cache) for p in chain.periods]
    champion = registry.champion()
    parent = registry.load_embedder(champion.version) if champion is not None else None
    previous = chain.previous
    if not previous:
        memory = ReplayMemory.empty(params.replay.capacity)
    elif ReplayMemory.exists(store, previous):
        memory = ReplayMemory.load(store, previous)
    else:
        raise ShardError(f"no replay memory for the previous period {previous!r}; refresh it first")
    published = ReplayMemory.load(store, period) if ReplayMemory.exists(store, period) else None
    metric = params.gate.metric
    matrix, low, high = (
        with_row(registry.lineage_matrix(chain.periods, name), period, {})
        for name in (metric, f"{metric}_low", f"{metric}_high")
    )
    return LineageState(chain, champion, parent, memory, published, shards, matrix, low, high)


@task(**IO_RETRIES)
def load_index_model(registry_uri: str, champion: int | None) -> tuple[int, Embedder] | None:
    """The model version the live embedding index (``CSSL_HOME/index``) was embedded with,
    and its weights, when there is an index and its version is not the champion's. An index
    that cannot be read is reported and left out of the matrix (it does not decide the gate:
    the champion does)."""
    from pipelines.index import EmbeddingIndex, EmbeddingIndexError, default_index_uri

    uri = default_index_uri()
    if not Path(uri).is_dir():
        return None
    try:
        live = EmbeddingIndex(uri).pointer().live
    except EmbeddingIndexError as exc:
        get_run_logger().warning(f"the embedding index at {uri} is unreadable ({exc})")
        return None
    if live is None or live.model_version == champion:
        return None
    try:
        model = open_registry(registry_uri).load_embedder(live.model_version)
    except RegistryError as exc:
        get_run_logger().warning(f"the index's version {live.model_version}: {exc}")
        return None
    return live.model_version, model


@task(**IO_RETRIES)
def start_run(registry_uri: str, name: str) -> str:
    return open_registry(registry_uri).start_run(name)


@task(**IO_RETRIES)
def end_run(registry_uri: str, run_id: str, failed: bool) -> None:
    open_registry(registry_uri).end_run(run_id, "FAILED" if failed else "FINISHED")


@task(**IO_RETRIES)
def save_memory(store_uri: str, memory: ReplayMemory) -> dict[str, Any]:
    """Publish memory(t) (a no-op when the same version is already there)."""
    return memory.save(open_store(store_uri))


@task(**IO_RETRIES)
def register_candidate(
    registry_uri: str, run_id: str, model: Embedder, lineage: VersionTags
) -> VersionInfo:
    """Tag the run with the lineage and register the model as a version (@challenger)."""
    registry = open_registry(registry_uri)
    registry.set_run_tags(run_id, lineage.as_tags())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model.save(Path(tmp) / "embedder")
        return registry.register(run_id, model_dir, lineage, model.num_features)


@task(**IO_RETRIES)
def promote(registry_uri: str, version: int) -> None:
    open_registry(registry_uri).promote(version)


def reported_interval(scores: PeriodScores, metric: Metric, params: Params) -> Interval | None:
    """The 95% cluster-bootstrap interval of one logged accuracy (None without outcomes)."""
    if scores.frames is None:
        return None
    return scores.frames.interval(
        metric,
        confidence=REPORTED_CONFIDENCE,
        n_resamples=params.gate.bootstrap_samples,
        seed=params.gate.bootstrap_seed,
    )


def _with_bounds(name: str, iv: Interval | None, step: int = 0) -> list[MetricPoint]:
    """``name`` and, when the interval is defined, ``<name>_low`` / ``<name>_high``; a name
    ``a/b`` gets ``a_low/b`` (``knn/p01`` -> ``knn_low/p01``)."""
    if iv is None:
        return []
    head, sep, tail = name.partition("/")
    points = [MetricPoint(name, iv.estimate, step)]
    if iv.defined:
        points += [
            MetricPoint(f"{head}_low{sep}{tail}", iv.low, step),
            MetricPoint(f"{head}_high{sep}{tail}", iv.high, step),
        ]
    return points


def score_points(params: Params, scores: Scores) -> list[MetricPoint]:
    """Every accuracy of every model with its 95% interval (``knn/p01``, ``knn_low/p01``,
    ``knn_high/p01``, ``champion_knn/p01``, ..., ``random_*``, ``majority_*``), and the
    candidate's average accuracy per metric with its (stratified) interval."""
    points: list[MetricPoint] = []
    for prefix, table in scores.tables().items():
        for p, s in table.items():
            for m in METRICS:
                iv = reported_interval(s, m, params)
                points += _with_bounds(f"{prefix}{m}/{p}", iv) or [
                    MetricPoint(f"{prefix}{m}/{p}", float(getattr(s, m)))
                ]
    frames = _frames(scores.candidate)
    for m in METRICS:
        if frames and len(frames) == len(scores.candidate):
            avg = average_accuracy_interval(
                [(o.correct(m), o.clusters) for o in frames.values()],
                confidence=REPORTED_CONFIDENCE,
                n_resamples=params.gate.bootstrap_samples,
                seed=params.gate.bootstrap_seed,
            )
            points += _with_bounds(f"average_{m}", avg)
    return points


def compat_points(compat: Compat) -> list[MetricPoint]:
    """The compatibility matrix as metrics: ``compat_top1/<query>__<gallery>`` and
    ``compat_map10/<query>__<gallery>`` for every comparable cell (models ``candidate``,
    ``champion``, ``index``, ``candidate_adapter``), ``compat/average_compatibility`` (CL2R's
    AC over the models, oldest first), ``compat/direct`` and ``compat/via_adapter`` (1.0 when
    the candidate is compatible with the champion that way) and ``time/compatibility``."""
    points = [MetricPoint("time/compatibility", compat.seconds)]
    matrix = compat.matrix
    if matrix is None:
        return points
    for q in matrix.query_models:
        for g in matrix.gallery_models:
            cell = matrix.entry(q, g)
            if cell.comparable:
                points.append(MetricPoint(f"compat_top1/{q}__{g}", cell.top1))
                points.append(MetricPoint(f"compat_map{matrix.k}/{q}__{g}", cell.map_at_k))
    if compat.average_compatibility is not None:
        points.append(MetricPoint("compat/average_compatibility", compat.average_compatibility))
    if compat.verdict is not None:
        v = compat.verdict
        via = v.adapter is not None and not math.isnan(v.adapter) and v.adapter >= v.own
        points.append(MetricPoint("compat/direct", float(v.kind == "direct")))
        points.append(MetricPoint("compat/via_adapter", float(via)))
    return points


def gate_points(
    decision: Decision, scores: Scores, period: str, params: Params
) -> list[MetricPoint]:
    """The gate's tested differences (``gate/diff/p01`` with ``_low``/``_high`` at the
    gate's corrected level), its forgetting bounds, and the next-period accuracy: the
    champion's accuracy on the new period before training on it, with its 95% interval."""
    points: list[MetricPoint] = []
    for p, diff in decision.gate.differences.items():
        points += _with_bounds(f"gate/diff/{p}", diff)
    if decision.gate.forgetting is not None and decision.gate.forgetting.defined:
        points += [
            MetricPoint("forgetting_low", decision.gate.forgetting.low),
            MetricPoint("forgetting_high", decision.gate.forgetting.high),
        ]
    if period in scores.champion:
        served = reported_interval(scores.champion[period], params.gate.metric, params)
        points += _with_bounds("next_period_accuracy", served)
    return points


@task(**IO_RETRIES)
def log_run(
    registry_uri: str,
    run_id: str,
    params: Params,
    trained: Trained,
    scores: Scores,
    decision: Decision,
    summary: RefreshSummary,
    state: LineageState,
    compat: Compat | None = None,
) -> None:
    """Parameters, training curves, every score with its 95% interval, the gate's
    differences, the summary numbers, the compatibility matrix (:func:`compat_points`); as
    artifacts the accuracy matrix (with intervals), its plots (error bars), the gate's
    verdict, the per-frame outcomes of every model (``eval/outcomes.parquet``, so intervals
    can be recomputed later) and the compatibility matrix (``eval/compatibility.json``,
    ``.md``, ``.png``)."""
    import pyarrow.parquet as pq

    from cssl_core.evaluation.plots import plot_accuracy_curves, plot_accuracy_matrix

    registry = open_registry(registry_uri)
    registry.log_params(run_id, _flatten(params.model_dump(mode="json")))
    points = [
        MetricPoint(f"train/{name}", float(getattr(h, name)), h.step)
        for h in trained.result.history
        for name in ("loss", "ssl", "distill", "lr", "compat")
    ]
    points += score_points(params, scores)
    points += gate_points(decision, scores, summary.period, params)
    if compat is not None:
        points += compat_points(compat)
    totals = {
        "forgetting": decision.forgetting,
        "average_accuracy": decision.average_accuracy,
        "promoted": float(decision.promote),
        "train_images_per_second": trained.result.images_per_second,
        **{f"time/{k}": v for k, v in summary.timings.items()},
    }
    points += [MetricPoint(k, float(v)) for k, v in totals.items()]
    registry.log_metrics(run_id, points)
    metric = params.gate.metric
    bounds = {pt.key: pt.value for pt in points if pt.key.startswith(f"{metric}_")}
    low, high = (
        with_row(
            matrix,
            summary.period,
            {
                p: bounds[f"{metric}_{side}/{p}"]
                for p in decision.row
                if f"{metric}_{side}/{p}" in bounds
            },
        )
        for matrix, side in ((state.low, "low"), (state.high, "high"))
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        matrix = decision.matrix
        (out / "accuracy_matrix.json").write_text(json.dumps(matrix.to_dict(), indent=2))
        (out / "accuracy_matrix.md").write_text(matrix.to_markdown(low=low, high=high) + "\n")
        gate = {
            "promote": decision.promote,
            "reasons": decision.gate.reasons,
            "differences": {p: iv.to_dict() for p, iv in decision.gate.differences.items()},
            "forgetting": (
                decision.gate.forgetting.to_dict() if decision.gate.forgetting else None
            ),
        }
        (out / "gate.json").write_text(json.dumps(gate, indent=2))
        pq.write_table(outcomes_table(scores.outcomes()), out / "outcomes.parquet")
        plot_accuracy_matrix(matrix, out / "accuracy_matrix.png", low=low, high=high)
        plot_accuracy_curves(matrix, out / "accuracy_curves.png", low=low, high=high)
        if compat is not None and compat.matrix is not None:
            record = {
                "matrix": compat.matrix.to_dict(),
                "lineage": list(compat.lineage),
                "versions": compat.versions,
                "verdict": compat.verdict.to_dict() if compat.verdict else None,
                "average_compatibility": compat.average_compatibility,
            }
            (out / "compatibility.json").write_text(json.dumps(record, indent=2))
            (out / "compatibility.md").write_text(compat.matrix.to_markdown())
            plot_compatibility_matrix(compat.matrix, out / "compatibility.png")
        registry.log_artifacts(run_id, out, "eval")


# -- compute tasks (not retried) ---------------------------------------------------------


@task(**COMPUTE)
def ingest_source(source: str, chain: PeriodChain, params: Params) -> str:
    """Ingest raw frames of ``chain.period`` into a local shard; returns its path.

    ``source`` is a local path (video, image folder, Parquet), an ``s3://`` prefix, or
    ``simulate`` (the built-in stream, ``params.simulate``, at the period's index in the
    chain). In an image folder the first sub-folder names the frame's category (frames
    directly in the folder are unlabelled): evaluation needs labelled frames.
    """
    from cssl_core.data.ingest import ingest

    out = state_dir() / "incoming"
    period = chain.period
    if source == "simulate":
        from cssl_core.data.simulate import simulate_period

        simulate_period(
            out,
            period,
            chain.index,
            max(len(params.periods), chain.index + 1),
            params.simulate,
            rows_per_group=params.ingest.rows_per_group,
        )
        return str(out / period)
    local = source
    if source.startswith("s3://"):
        local = str(download_prefix(source))
    report = ingest([local], period, out, params.ingest, labels_from_dirs=True)
    for line in report.summary_lines():
        get_run_logger().info(line)
    return str(report.path)


@task(**IO_RETRIES)
def download_prefix(uri: str) -> Path:
    """Every object under an ``s3://`` prefix, into a new local folder."""
    return storage.download_prefix(uri, tempfile.mkdtemp(prefix="cssl-source-"))


@task(**COMPUTE)
def validate(shard_path: str, params: Params, period: str) -> Shard:
    """The shard at ``shard_path``, clean (every frame decodes) and of ``period``."""
    from cssl_core.data.validate import validate_shard

    report = validate_shard(Path(shard_path), params.ingest, repair=False)
    if not report.clean:
        problems = "; ".join(report.problems[:3]) or str(report.issues)
        raise ShardError(
            f"shard {shard_path} is not clean ({problems}); run `cssl validate {shard_path}` "
            "to quarantine bad frames"
        )
    shard = Shard.open(shard_path)
    if shard.period != period:
        raise ShardError(f"shard {shard_path} holds period {shard.period!r}, not {period!r}")
    return shard


@task(**COMPUTE)
def train(params: Params, period: str, shard: Shard, state: LineageState) -> Trained:
    """Period t's candidate from @champion, memory(t-1) and shard(t) (``cssl_core.period``).

    Checkpoints go to ``$CSSL_HOME/checkpoints/<period>``, so a rerun after a crash or a stop
    resumes. A stop request (SIGTERM/SIGINT through :mod:`pipelines.stopping`) ends the
    training after the current step with :class:`TrainingStopped`.
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    inputs = core.PeriodInputs(
        params=params,
        period=period,
        shard=shard,
        memory=state.memory,
        parent=state.parent,
        history=tuple(state.history),
        checkpoint_dir=state_dir() / "checkpoints" / period,
        chain=state.chain,
    )
    steps = inputs.steps
    every = max(1, steps // 10)

    def on_step(log: StepLog, images_per_s: float) -> None:
        done = log.step + 1
        progress.report(progress.TrainStep(period, done, steps, log.loss, images_per_s))
        if done % every == 0 or done == steps:
            logger.info(
                f"{period} train step {done}/{steps} loss {log.loss:.3f} "
                f"(ssl {log.ssl:.3f}, distill {log.distill:.3f}) {images_per_s:.0f} img/s"
            )

    with stopping.graceful_training():
        try:
            out = core.run_period(inputs, on_step=on_step, should_stop=stopping.stop_requested)
        except core.TrainingInterrupted as exc:
            raise TrainingStopped(
                f"training of {period} stopped on request ({exc}); rerun the same command to "
                "resume from the checkpoint it wrote"
            ) from None
    if stopping.stop_requested():  # the request came with the last step: stop before evaluating
        raise TrainingStopped(f"{period}: stopped on request after its last training step")
    if out.train.resumed_from:
        logger.info(f"{period}: resumed from step {out.train.resumed_from}")
    return Trained(out.model, out.train, out.memory, time.perf_counter() - t0)


@task(**COMPUTE)
def evaluate(params: Params, model: Embedder, state: LineageState) -> Scores:
    """The candidate and the champion on every period's eval split so far (the same frames,
    so the gate can pair them); on the new one the blind baselines: a randomly initialised
    model (the FWT baseline) and the majority class."""
    t0 = time.perf_counter()
    sets = core.eval_sets_for(state.shards, params)
    new = {state.shards[-1].period: sets[state.shards[-1].period]}
    candidate = core.evaluate_model(model, sets, params)
    champion = core.evaluate_model(state.parent, sets, params) if state.parent else {}
    baseline = core.evaluate_model(core.new_model(params), new, params)
    majority = core.majority_baseline(new, params)
    return Scores(candidate, champion, baseline, majority, time.perf_counter() - t0)


def retrieval_frames(
    sets: dict[str, core.EvalSet], cap: int, seed: int
) -> tuple[list[bytes], list[str | None], list[bytes], list[str | None]]:
    """``(query images, labels, gallery images, labels)`` for the compatibility matrix:
    queries are labelled eval frames and the gallery labelled train (reference) frames of
    every period so far, at most ``cap`` of each per period (a seeded uniform sample, in the
    eval set's order)."""
    import numpy as np

    q_img: list[bytes] = []
    q_lab: list[str | None] = []
    g_img: list[bytes] = []
    g_lab: list[str | None] = []
    rng = np.random.default_rng(seed)
    for es in sets.values():
        for images, labels, out_img, out_lab in (
            (es.test_images, es.test_labels, q_img, q_lab),
            (es.train_images, es.train_labels, g_img, g_lab),
        ):
            keep = [k for k, y in enumerate(labels) if y is not None]
            if len(keep) > cap:
                keep = sorted(rng.choice(keep, size=cap, replace=False).tolist())
            out_img += [images[k] for k in keep]
            out_lab += [labels[k] for k in keep]
    return q_img, q_lab, g_img, g_lab


@task(**COMPUTE)
def compatibility(
    params: Params,
    model: Embedder,
    state: LineageState,
    index_model: tuple[int, Embedder] | None,
) -> Compat:
    """The compatibility matrix of the candidate, the champion and the live index's version
    (when it is another), on eval-frame queries and a train-frame gallery of every period so
    far (at most ``compat.matrix_frames`` of each per period, so a refresh stays quick);
    with the candidate's adapter, its
    queries mapped into the champion's space as an extra row."""
    from cssl_core.evaluation.evaluate import extract_features

    t0 = time.perf_counter()
    models: dict[str, Embedder] = {}
    versions: dict[str, int] = {}
    if index_model is not None:
        versions[INDEX], models[INDEX] = index_model
    if state.parent is not None and state.champion is not None:
        versions[CHAMPION], models[CHAMPION] = state.champion.version, state.parent
    models[CANDIDATE] = model
    lineage = tuple(models)
    if len(models) < 2:
        return Compat(None, lineage, versions, None, None, time.perf_counter() - t0)
    sets = core.eval_sets_for(state.shards, params)
    q_img, q_lab, g_img, g_lab = retrieval_frames(
        sets, params.compat.matrix_frames, params.train.seed
    )
    size = params.model.input_size
    queries = {name: extract_features(m, q_img, size) for name, m in models.items()}
    gallery = {name: extract_features(m, g_img, size) for name, m in models.items()}
    parent = state.parent
    adapter_row = None
    if (
        parent is not None
        and model.adapter is not None
        and model.adapter_parent == parent.state_fingerprint()
    ):
        adapter_row = CANDIDATE_ADAPTER
        queries[adapter_row] = model.to_parent_space(queries[CANDIDATE]).detach()
    matrix = CompatibilityMatrix.compute(queries, gallery, q_lab, g_lab, k=COMPAT_K)
    if adapter_row is not None:
        matrix = restrict_row(
            matrix, adapter_row, [CHAMPION], "the adapter maps into the champion's space only"
        )
    verdict = compat_verdict(matrix, CANDIDATE, CHAMPION, adapter_row) if parent else None
    average = matrix.average_compatibility(lineage)
    return Compat(matrix, lineage, versions, verdict, average, time.perf_counter() - t0)


@task(**COMPUTE)
def decide_promotion(
    params: Params, period: str, scores: Scores, state: LineageState, compat: Compat | None = None
) -> Decision:
    """The paired gate on the candidate's and the champion's per-frame outcomes, with the
    lineage's best earlier accuracies (as logged) for forgetting and the candidate's
    compatibility with the champion. Best earlier accuracies that cannot be read are NaN, so
    the gate fails closed on them."""
    metric = params.gate.metric
    row = core.accuracy_row(scores.candidate, metric)
    champion_row = core.accuracy_row(scores.champion, metric)
    matrix = with_row(state.matrix, period, row)
    lineage = lineage_rows(matrix)
    try:
        forgetting = lineage.forgetting(period)
        best = lineage.best_earlier(period)
    except (MissingAccuracy, KeyError):
        forgetting = float("nan")
        best = {p: float("nan") for p in lineage.periods if p != period}
    average = sum(row.values()) / len(row) if row else float("nan")
    gate = decide(
        _frames(scores.candidate),
        _frames(scores.champion) if state.parent is not None else None,
        period,
        best,
        params.gate,
        compat.verdict if compat is not None else None,
    )
    verdict = "passes the gate" if gate.promote else "is rejected"
    get_run_logger().info(f"{period}: the candidate {verdict}: " + "; ".join(gate.reasons))
    return Decision(gate, row, champion_row, matrix, forgetting, average)


def _frames(scores: dict[str, PeriodScores]) -> dict[str, FrameOutcomes]:
    """The per-frame outcomes of every period that has them (a period without is left out,
    so the gate names it as missing)."""
    return {p: s.frames for p, s in scores.items() if s.frames is not None}


@task(**COMPUTE)
def select_memory(
    params: Params, period: str, shard: Shard, state: LineageState, trained: Trained, promote: bool
) -> ReplayMemory:
    """memory(t) = select(memory(t-1) ∪ shard(t)), chosen by the model the lineage continues
    from after period t: the candidate when it is promoted, else the champion it was trained
    from (a freshly initialised model before the first promotion).

    Why re-select rather than carry memory(t-1) forward: period t's frames are real data of
    the stream that the next period should replay (its model, the champion, never trained on
    them), and a rejected candidate must not choose them (``diverse`` and ``hard`` selection
    depend on the model that scores the frames). With ``reservoir`` and ``balanced`` the
    choice does not depend on the model, so both rules give the same memory.

    Memory versions are immutable: when an earlier refresh of period t already published
    memory(t) (chosen by the lineage's model then), it is kept, so a rerun is idempotent; it
    must have been selected with the configured ``replay.selection`` and ``capacity``.
    """
    if state.published is not None:
        kept = state.published
        if not core.memory_matches(params, kept):
            cfg = params.replay
            raise ReplayError(
                f"the replay memory of {period} was selected with {kept.selection} and capacity "
                f"{kept.capacity} (or by an older cssl), but the config asks for {cfg.selection} "
                f"and {cfg.capacity}; published memory versions never change: refresh into a "
                "new store.root"
            )
        return kept
    if promote:
        return trained.memory
    keeper = state.parent or core.new_model(params)
    return core.next_memory(params, state.memory, shard, keeper, period)


# -- helpers -----------------------------------------------------------------------------


def resolve_period(
    params: Params,
    period: str | None,
    shard: str | None = None,
    source: str | None = None,
    now: datetime | None = None,
) -> str:
    """The period a run refreshes (unless a period is literally called ``latest``/``auto``):

    - ``latest`` (what the monthly schedule passes): the last period of params.yaml;
    - ``auto``: the UTC calendar period of ``now`` (``calendar.periods_every``: ``2026-12``);
    - any other name, declared in params.yaml or not (an undeclared one continues the
      lineage, :func:`resolve_chain`);
    - no name: the period of the given ``shard`` (its manifest), else where the ``source``'s
      frames landed: its last path component (``s3://raw/2026-12/`` -> ``2026-12``).
    """
    if period == LATEST and not params.is_declared(LATEST):
        return params.period_names[-1]
    if period == AUTO and not params.is_declared(AUTO):
        return params.calendar.period_at(now or datetime.now(UTC))
    if period:
        if not is_period_name(period):
            raise ConfigError(f"{period!r} is not a period name (letters, digits, . _ -)")
        return period
    if shard:
        return Shard.open(shard).period
    if source and source != "simulate":
        name = source.rstrip("/").rsplit("/", 1)[-1]
        if is_period_name(name):
            return name
        raise ConfigError(
            f"cannot name the period after {source!r} (its last path component {name!r} is "
            "not a period name): give --period NAME or --period auto"
        )
    raise ConfigError(
        "name the period: --period NAME (or auto: the calendar), or give the --shard or "
        "--source it comes from"
    )


def source_of(params: Params, period: str, shard: str | None, source: str | None) -> str:
    """Where a refresh's frames come from, as the lineage records it (``source`` tag): the raw
    source ingested (a local path made absolute), the shard given, or the period's declared
    source (``Params.period_source``)."""
    given = source or shard
    if given is None:
        return params.period_source(period)
    if given == "simulate" or "://" in given:
        return given
    return str(Path(given).resolve())


@contextmanager
def period_lock(period: str) -> Iterator[None]:
    """Fail fast when another refresh of the same period holds the lock on this machine."""
    locks = state_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{period}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RefreshBusy(
            f"another refresh of period {period!r} is running (lock {lock.lock_file}); "
            "wait for it to finish"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def tracked_run(registry_uri: str, name: str) -> Iterator[str]:
    """A registry run that ends FINISHED, or FAILED when the body raises."""
    run_id = start_run(registry_uri, name)
    try:
        yield run_id
    except BaseException:
        try:
            end_run.with_options(retries=1, retry_delay_seconds=1)(registry_uri, run_id, True)
        except Exception as exc:  # noqa: BLE001 - the tracking server may be the fault itself
            # Keep the error that stopped the run; a run left RUNNING is never registered.
            _logger.warning(
                "could not mark run %s FAILED: %s",
                run_id,
                redact(f"{exc.__class__.__name__}: {exc}"),
            )
        raise
    end_run(registry_uri, run_id, False)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "periods":
            flat.update(_flatten(v, f"{key}."))
        else:
            flat[key] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return flat


def version_tags(
    params: Params,
    shard: Shard,
    state: LineageState,
    trained: Trained,
    decision: Decision,
    memory: ReplayMemory,
    source: str = "",
    compat: Compat | None = None,
) -> VersionTags:
    """What the new version was made from, and the gate's verdict on it."""
    return VersionTags(
        period=shard.period,
        shard_fingerprint=shard.fingerprint,
        config_hash=params.config_hash(),
        parent_version=state.champion.version if state.champion else None,
        memory_manifest=f"{params.store.root}/memory/{shard.period}/manifest.json",
        memory_fingerprint=memory.fingerprint,
        git_commit=git_commit(),
        strategy=params.train.strategy,
        weights_sha256=trained.model.state_fingerprint(),
        gate="pass" if decision.promote else "reject",
        previous_period=state.chain.previous,
        source=source,
        compat=compat.kind if compat is not None else "",  # type: ignore[arg-type]
    )


def summarize(
    version: VersionInfo,
    state: LineageState,
    trained: Trained,
    scores: Scores,
    decision: Decision,
    total_seconds: float,
) -> RefreshSummary:
    return RefreshSummary(
        version.period,
        version.version,
        decision.promote,
        champion_version=state.champion.version if state.champion else None,
        reasons=decision.gate.reasons,
        row=decision.row,
        champion_row=decision.champion_row,
        forgetting=decision.forgetting,
        average_accuracy=decision.average_accuracy,
        resumed_from=trained.result.resumed_from,
        compat=version.lineage.compat,
        timings={
            "total": total_seconds,
            "train": trained.seconds,
            "evaluate": scores.seconds,
            "orchestration": total_seconds - trained.seconds - scores.seconds,
        },
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- the flow ----------------------------------------------------------------------------


@flow(name="refresh", log_prints=True)
def refresh(
    period: str | None = None,
    shard: str | None = None,
    source: str | None = None,
    params_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Refresh the embedding for one period (see the module docstring).

    ``period`` is a period of params.yaml, ``latest`` (the last one there), ``auto`` (the
    calendar period now), any other name (a period not in params.yaml continues the
    lineage), or None (named after the shard or the source, :func:`resolve_period`). The
    frames come from ``shard`` (a validated shard directory) or ``source`` (raw frames to
    ingest); with neither, from the period's source (``Params.period_source``: its
    ``source:`` in params.yaml or the ``ingest.source`` template, ``simulate`` for the
    built-in stream).
    """
    t_start = time.perf_counter()
    params = load_params(params_path, overrides or [])
    if shard and source:
        raise ValueError("give either --shard or --source, not both")
    period = resolve_period(params, period, shard, source)
    registry, store = tracking_uri(), params.store.root
    with period_lock(period):
        chain = resolve_chain(registry, params, period)
        origin = source_of(params, period, shard, source)
        path = shard or ingest_source(source or params.period_source(period), chain, params)
        new_shard = validate(path, params, period)
        publish_shard(store, new_shard)
        done = find_completed(registry, new_shard, params)
        if done is not None:
            get_run_logger().info(f"{period} already refreshed as version {done.version}")
            return done.as_dict()
        state = load_lineage(registry, params, chain)
        with tracked_run(registry, f"refresh-{period}") as run_id:
            trained = train(params, period, new_shard, state)
            scores = evaluate(params, trained.model, state)
            index_model = load_index_model(
                registry, state.champion.version if state.champion else None
            )
            compat = compatibility(params, trained.model, state, index_model)
            decision = decide_promotion(params, period, scores, state, compat)
            memory = select_memory(params, period, new_shard, state, trained, decision.promote)
            save_memory(store, memory)
            tags = version_tags(params, new_shard, state, trained, decision, memory, origin, compat)
            version = register_candidate(registry, run_id, trained.model, tags)
            if decision.promote:
                promote(registry, version.version)
            summary = summarize(
                version, state, trained, scores, decision, time.perf_counter() - t_start
            )
            log_run(registry, run_id, params, trained, scores, decision, summary, state, compat)
    if decision.promote:  # re-embed the index when the new champion breaks it (index.*)
        backfill_if_needed(registry, params.index.uri, version.version, params)
    return summary.as_dict()
