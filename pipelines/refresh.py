"""The Prefect flow ``refresh``: one period from raw frames to a (maybe) promoted model.

    ingest? → validate → publish shard → load @champion → train → update replay memory
            → evaluate on every period so far → register @challenger → gate → @champion?

Tasks that talk to the network (object store, MLflow) retry with backoff; computation does
not retry (a logic error would only fail again). Rerunning a finished period returns the
existing version without training; a second refresh of the same period while one runs fails
fast. All the machine-learning work is ``cssl_core.period``, shared with the DVC stages.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cssl_core import period as core
from cssl_core.config import Params, load_params
from cssl_core.data.shard import Shard, ShardError
from cssl_core.data.storage import open_store, redact
from cssl_core.evaluation.metrics import AccuracyMatrix
from cssl_core.learn.models import Embedder
from cssl_core.memory.replay import ReplayMemory
from pipelines.gate import GateDecision, decide
from pipelines.registry import Registry, VersionInfo
from pipelines.settings import state_dir

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "cache_policy": NO_CACHE}
COMPUTE = {"cache_policy": NO_CACHE}
LATEST = "latest"


class RefreshBusy(RuntimeError):
    """Another refresh of the same period is running."""


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
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- I/O tasks (retried) -----------------------------------------------------------------


@task(**IO_RETRIES)
def publish_shard(store_uri: str, shard_path: str) -> bool:
    return core.publish_shard(open_store(store_uri), Shard.open(shard_path))


@task(**IO_RETRIES)
def load_shards(store_uri: str, periods: list[str]) -> list[Shard]:
    store = open_store(store_uri)
    cache = state_dir() / "cache" / "shards"
    return [core.stored_shard(store, p, cache) for p in periods]


@task(**IO_RETRIES)
def load_champion(tracking_uri: str) -> tuple[VersionInfo | None, Embedder | None]:
    registry = Registry(tracking_uri)
    champion = registry.champion()
    if champion is None:
        return None, None
    return champion, Embedder.load(registry.download_embedder(champion.version))


@task(**IO_RETRIES)
def load_memory(store_uri: str, period: str, capacity: int) -> ReplayMemory:
    if not period:
        return ReplayMemory.empty(capacity)
    store = open_store(store_uri)
    if not ReplayMemory.exists(store, period):
        raise ShardError(f"no replay memory for the previous period {period!r}; refresh it first")
    return ReplayMemory.load(store, period)


@task(**IO_RETRIES)
def save_memory(store_uri: str, memory: ReplayMemory, period: str) -> dict[str, Any]:
    return memory.save(open_store(store_uri), period)


@task(**IO_RETRIES)
def register_candidate(
    tracking_uri: str, run_id: str, model_dir: str, tags: dict[str, str]
) -> VersionInfo:
    registry = Registry(tracking_uri)
    return registry.register(registry.log_model(run_id, Path(model_dir)), run_id, tags)


@task(**IO_RETRIES)
def promote(tracking_uri: str, version: int) -> None:
    Registry(tracking_uri).promote(version)


# -- compute tasks (not retried) ---------------------------------------------------------


@task(**COMPUTE)
def ingest_source(source: str, period: str, params: Params) -> str:
    """Ingest raw frames into a local shard; returns its path.

    ``source`` is a local path (video, image folder, Parquet), an ``s3://`` prefix, or
    ``simulate`` (the built-in stream, ``params.simulate``). In an image folder the first
    sub-folder names the frame's category (frames directly in the folder are unlabelled):
    evaluation needs labelled frames.
    """
    from cssl_core.data.ingest import ingest

    out = state_dir() / "incoming"
    if source == "simulate":
        from cssl_core.data.simulate import simulate_period

        simulate_period(
            out,
            period,
            params.period_index(period),
            len(params.periods),
            params.simulate,
            rows_per_group=params.ingest.rows_per_group,
        )
        return str(out / period)
    local = source
    if source.startswith("s3://"):
        local = str(_download_prefix(source))
    report = ingest([local], period, out, params.ingest, labels_from_dirs=True)
    for line in report.summary_lines():
        get_run_logger().info(line)
    return str(report.path)


def _download_prefix(uri: str) -> Path:
    store = open_store(uri)
    dest = Path(tempfile.mkdtemp(prefix="cssl-source-"))
    keys = store.list("")
    if not keys:
        raise ShardError(f"{uri}: no objects under this prefix")
    for key in keys:
        store.get_file(key, dest / key)
    return dest


@task(**COMPUTE)
def validate(shard_path: str, params: Params) -> Shard:
    from cssl_core.data.validate import validate_shard

    report = validate_shard(Path(shard_path), params.ingest, repair=False)
    if not report.clean:
        problems = "; ".join(report.problems[:3]) or str(report.issues)
        raise ShardError(
            f"shard {shard_path} is not clean ({problems}); run `cssl validate {shard_path}` "
            "to quarantine bad frames"
        )
    return Shard.open(shard_path)


@task(**COMPUTE)
def train(
    params: Params,
    period: str,
    shard: Shard,
    parent: Embedder | None,
    memory: ReplayMemory,
    history: list[Shard],
) -> tuple[Embedder, dict[str, Any], ReplayMemory]:
    """Model(t) and memory(t) of the period (``cssl_core.period.run_period``; nothing saved)."""
    logger = get_run_logger()
    inputs = core.PeriodInputs(
        params=params,
        period=period,
        shard=shard,
        memory=memory,
        parent=parent,
        history=tuple(history),
        checkpoint_dir=state_dir() / "checkpoints" / period,
    )
    steps = inputs.steps
    every = max(1, steps // 10)

    def on_step(log: Any, images_per_s: float) -> None:
        if (log.step + 1) % every == 0 or log.step + 1 == steps:
            logger.info(
                f"{period} train step {log.step + 1}/{steps} loss {log.loss:.3f} "
                f"(ssl {log.ssl:.3f}, distill {log.distill:.3f}) "
                f"{images_per_s:.0f} img/s"
            )

    out = core.run_period(inputs, on_step=on_step)
    result = out.train
    info = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "wall_seconds": result.wall_seconds,
        "images_per_second": result.images_per_second,
        "history": [asdict(h) for h in result.history],
    }
    return out.model, info, out.memory


@task(**COMPUTE)
def evaluate(model: Embedder, shards: list[Shard], params: Params) -> dict[str, dict[str, float]]:
    scores = core.evaluate_model(model, core.eval_sets_for(shards, params), params)
    return {p: {"knn": s.knn, "linear": s.linear} for p, s in scores.items()}


# -- helpers -----------------------------------------------------------------------------


def resolve_period(params: Params, period: str) -> str:
    """The period a run refreshes: ``latest`` (what the monthly schedule passes) names the
    last period of params.yaml, unless a period is literally called that."""
    if period == LATEST and LATEST not in params.periods:
        return params.period_names[-1]
    params.period_index(period)  # a clear error for an unknown name
    return period


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
def tracked_run(registry: Registry, name: str) -> Iterator[str]:
    """An MLflow run that ends FINISHED, or FAILED when the body raises."""
    run = registry.client.create_run(registry.experiment_id(), run_name=name)
    try:
        yield run.info.run_id
    except BaseException:
        try:
            registry.client.set_terminated(run.info.run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - the tracking server may be the fault itself
            # Keep the error that stopped the run; a run left RUNNING is never registered.
            logging.getLogger(__name__).warning(
                "could not mark MLflow run %s FAILED: %s",
                run.info.run_id,
                redact(f"{exc.__class__.__name__}: {exc}"),
            )
        raise
    registry.client.set_terminated(run.info.run_id, "FINISHED")


def lineage_matrix(
    registry: Registry, periods: list[str], metric: str, candidate: dict[str, float] | None = None
) -> AccuracyMatrix:
    """R[i][j] from the registry: row i is the newest promoted version of period i (the
    newest finished version when none of that period passed the gate), so a rejected
    candidate never stands in for the model the lineage continued from.

    ``candidate`` replaces the row of the last period (the version being decided on).
    R[i-1][i] (the model before period i arrived, evaluated on it) fills the superdiagonal.
    """
    latest: dict[str, VersionInfo] = {}
    for v in registry.versions():  # oldest first
        held = latest.get(v.period)
        if held is None or v.tags.get("gate") == "pass" or held.tags.get("gate") != "pass":
            latest[v.period] = v
    matrix = AccuracyMatrix(periods)
    for i, p in enumerate(periods):
        if candidate is not None and i == len(periods) - 1:
            row = candidate
            before = {}
        elif p in latest:
            metrics = registry.run_data(latest[p].run_id)["metrics"]
            row = {q: metrics[f"{metric}/{q}"] for q in periods if f"{metric}/{q}" in metrics}
            nxt = periods[i + 1] if i + 1 < len(periods) else None
            before = {}
            if nxt and nxt in latest:
                key = f"champion_{metric}/{nxt}"
                later = registry.run_data(latest[nxt].run_id)["metrics"]
                if key in later:
                    before = {nxt: later[key]}
        else:
            continue
        for q, value in {**row, **before}.items():
            matrix.set(p, q, value)
    return matrix


def _log_run(
    run_id: str,
    registry: Registry,
    params: Params,
    train_info: dict[str, Any],
    scores: dict[str, dict[str, float]],
    champion_scores: dict[str, dict[str, float]],
    baseline: dict[str, dict[str, float]],
    matrix: AccuracyMatrix,
    decision: GateDecision | None,
    extra: dict[str, float],
) -> None:
    from mlflow.entities import Metric, Param

    from cssl_core.evaluation.plots import plot_accuracy_curves, plot_accuracy_matrix

    client = registry.client
    now = int(time.time() * 1000)
    flat = _flatten(params.model_dump(mode="json"))
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])
    metrics = [
        Metric(f"train/{k}", float(h[k]), now, h["step"])
        for h in train_info["history"]
        for k in ("loss", "ssl", "distill", "lr")
    ]
    for name, table in (("", scores), ("champion_", champion_scores), ("random_", baseline)):
        for p, s in table.items():
            metrics += [Metric(f"{name}{m}/{p}", float(v), now, 0) for m, v in s.items()]
    metrics += [Metric(k, float(v), now, 0) for k, v in extra.items()]
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i : i + 900])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "accuracy_matrix.json").write_text(json.dumps(matrix.to_dict(), indent=2))
        (out / "accuracy_matrix.md").write_text(matrix.to_markdown() + "\n")
        if decision is not None:
            (out / "gate.json").write_text(
                json.dumps({"promote": decision.promote, "reasons": decision.reasons}, indent=2)
            )
        plot_accuracy_matrix(matrix, out / "accuracy_matrix.png")
        plot_accuracy_curves(matrix, out / "accuracy_curves.png")
        client.log_artifacts(run_id, str(out), artifact_path="eval")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "periods":
            flat.update(_flatten(v, f"{key}."))
        else:
            flat[key] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return flat


# -- the flow ----------------------------------------------------------------------------


@flow(name="refresh", log_prints=True)
def refresh(
    period: str,
    shard: str | None = None,
    source: str | None = None,
    params_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Refresh the embedding for one period (see the module docstring).

    ``period`` may be ``latest`` (the last period of params.yaml). The frames come from
    ``shard`` (a validated shard directory) or ``source`` (raw frames to ingest); with
    neither, from the period's declared source (``Params.period_source``: its ``source:``
    in params.yaml or the ``ingest.source`` template, ``simulate`` for the built-in stream).
    """
    t_start = time.perf_counter()
    params = load_params(params_path, overrides or [])
    period = resolve_period(params, period)
    index = params.period_index(period)
    chain = params.period_names[: index + 1]
    previous = params.periods[period].previous
    store_uri = params.store.root
    registry = Registry()
    logger = get_run_logger()
    if shard and source:
        raise ValueError("give either --shard or --source, not both")
    with period_lock(period):
        shard_path = shard or ingest_source(source or params.period_source(period), period, params)
        new_shard = validate(shard_path, params)
        if new_shard.period != period:
            raise ShardError(
                f"shard {shard_path} holds period {new_shard.period!r}, not {period!r}"
            )
        publish_shard(store_uri, str(new_shard.path))
        done = registry.find_completed(period, new_shard.fingerprint, params.config_hash())
        if done is not None:
            champion = registry.champion()
            logger.info(f"{period} already refreshed as version {done.version}; nothing to do")
            promoted = champion is not None and champion.version == done.version
            return RefreshSummary(
                period,
                done.version,
                promoted=promoted,
                skipped=True,
                champion_version=champion.version if champion else None,
                reasons=["already refreshed: same shard and config"],
            ).as_dict()

        shards = load_shards(store_uri, chain)
        history = shards[:-1]
        champion, parent = load_champion(registry.uri)
        memory = load_memory(store_uri, previous, params.replay.capacity)

        with tracked_run(registry, f"refresh-{period}") as run_id:
            t0 = time.perf_counter()
            model, train_info, new_memory = train(
                params, period, new_shard, parent, memory, history
            )
            t_train = time.perf_counter() - t0

            store = open_store(store_uri)
            if ReplayMemory.exists(store, period):
                new_memory = ReplayMemory.load(store, period)
            else:
                save_memory(store_uri, new_memory, period)

            t0 = time.perf_counter()
            scores = evaluate(model, shards, params)
            champion_scores = evaluate(parent, shards, params) if parent is not None else {}
            baseline = evaluate(core.new_model(params), shards[-1:], params)
            t_eval = time.perf_counter() - t0

            metric = params.gate.metric
            row = {p: s[metric] for p, s in scores.items()}
            champ_row = {p: s[metric] for p, s in champion_scores.items()}
            matrix = lineage_matrix(registry, chain, metric, candidate=row)
            forgetting = matrix.forgetting()
            decision = decide(row, champ_row or None, period, forgetting, params.gate)

            with tempfile.TemporaryDirectory() as tmp:
                model_dir = Path(tmp) / "embedder"
                model.save(model_dir)
                tags = {
                    "period": period,
                    "shard_fingerprint": new_shard.fingerprint,
                    "parent_version": str(champion.version) if champion else "",
                    "memory_manifest": f"{store_uri}/memory/{period}/manifest.json",
                    "memory_fingerprint": new_memory.fingerprint,
                    "config_hash": params.config_hash(),
                    "git_commit": _git_commit(),
                    "strategy": params.train.strategy,
                    "weights_sha256": model.state_fingerprint(),
                    "gate": "pass" if decision.promote else "reject",
                }
                for key, value in tags.items():
                    registry.client.set_tag(run_id, key, value)
                version = register_candidate(registry.uri, run_id, str(model_dir), tags)

            summary = RefreshSummary(
                period,
                version.version,
                decision.promote,
                champion_version=champion.version if champion else None,
                reasons=decision.reasons,
                row=row,
                champion_row=champ_row,
                forgetting=forgetting,
                average_accuracy=matrix.average_accuracy(),
            )
            if decision.promote:
                promote(registry.uri, version.version)
                logger.info(f"{period}: version {version.version} promoted to @champion")
            else:
                logger.warning(
                    f"{period}: version {version.version} rejected: " + "; ".join(decision.failed)
                )
            t_total = time.perf_counter() - t_start
            summary.timings = {
                "total": t_total,
                "train": t_train,
                "evaluate": t_eval,
                "orchestration": t_total - t_train - t_eval,
            }
            _log_run(
                run_id,
                registry,
                params,
                train_info,
                scores,
                champion_scores,
                baseline,
                matrix,
                decision,
                {
                    "forgetting": forgetting,
                    "average_accuracy": summary.average_accuracy,
                    "promoted": float(decision.promote),
                    "train_images_per_second": train_info["images_per_second"],
                    **{f"time/{k}": v for k, v in summary.timings.items()},
                },
            )
            return summary.as_dict()


def _git_commit() -> str:
    import subprocess

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
