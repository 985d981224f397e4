"""The Prefect flow ``watch``: refresh when the stream changes, not when the calendar says so.

    name the period → its frames (a shard, or raw frames ingested) → drift check against the
        reference under @champion → decide → record → start the refresh (or not)

A refresh starts only when (:func:`pipelines.triggers.decide_watch`, a pure function):

- the drift check finds drift (``p < drift.alpha`` and MMD² ``>= drift.min_effect``), or
- ``@champion`` was registered longer ago than ``watch.max_age``, or
- there is no ``@champion`` yet (the first period has nothing to compare with), or
- the user forces it;

and, unless forced, not within ``watch.cooldown`` of the last refresh that started (a
refresh run of the registry, or a refresh a watch started and may still be queued), so a
flapping signal cannot start refreshes back to back.

Every decision, refresh or skip, is recorded with its reasons: a run of the MLflow experiment
:data:`WATCH_EXPERIMENT` (tags ``cssl.action``, ``cssl.triggers``, ``cssl.period``; metrics of
the drift check and the ages; the whole decision as ``watch/decision.json``), the drift check
in ``cssl-drift`` (:mod:`pipelines.drift`), and the Prefect log.

Where the refresh runs: when the Prefect API this flow runs against has the deployment
``refresh/<watch.refresh_deployment>`` (a team server), watch starts a run of it with
``run_deployment(..., timeout=0)`` (it does not wait) and records the flow-run id; otherwise
(the embedded default, no deployment), it runs ``refresh`` in its own process as a subflow
and records the version it made.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task

from cssl_core.config import ConfigError, Params, PeriodChain, format_duration, load_params
from cssl_core.data.shard import Shard
from cssl_core.data.storage import open_store
from pipelines.drift import DriftReport, check, drift_model, log_drift, reference_frames
from pipelines.refresh import (
    COMPUTE,
    IO_RETRIES,
    ingest_source,
    refresh,
    resolve_chain,
    resolve_period,
    validate,
)
from pipelines.registry import MetricPoint, VersionInfo, open_registry
from pipelines.settings import EXPERIMENT, tracking_uri
from pipelines.triggers import decide_watch

WATCH_EXPERIMENT = "cssl-watch"
ACTION_TAG = "cssl.action"
REFRESH_FLOW = "refresh"

# -- what passes between the tasks --------------------------------------------------------


@dataclass(frozen=True)
class WatchState:
    """What the decision is taken on, read from the registry at ``now``."""

    chain: PeriodChain
    champion: VersionInfo | None
    last_refresh_start: float | None  # seconds since the epoch
    last_refresh_run: str  # which run started it (for the record)
    now: float

    def champion_age(self) -> timedelta | None:
        if self.champion is None or self.champion.created is None:
            return None
        return timedelta(seconds=max(0.0, self.now - self.champion.created))

    def since_last_refresh(self) -> timedelta | None:
        if self.last_refresh_start is None:
            return None
        return timedelta(seconds=max(0.0, self.now - self.last_refresh_start))


@dataclass
class WatchRecord:
    """One watch decision as recorded (``decision.json``, ``cssl watch --json``)."""

    period: str
    shard: str
    source: str
    decided_at: str
    action: str
    summary: str
    triggers: list[str]
    reasons: list[str]
    champion_version: int | None
    champion_age_s: float | None
    since_last_refresh_s: float | None
    last_refresh_run: str
    max_age: str
    cooldown: str
    drift: dict[str, Any] | None = None
    refresh: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- tasks --------------------------------------------------------------------------------


@task(**IO_RETRIES)
def watch_state(registry_uri: str, params: Params, period: str) -> WatchState:
    """The chain, ``@champion``, and the last refresh that started: the newest run of the
    refreshes' experiment or the newest watch decision that started one, whichever is later."""
    registry = open_registry(registry_uri)
    chain = resolve_chain.fn(registry_uri, params, period)
    if params.is_declared(period):
        ran = set(registry.stream_periods())
        missing = [p for p in chain.history if p not in ran]
        if missing:
            raise ConfigError(
                f"{period} is declared in params.yaml after {', '.join(missing)}, which never "
                "ran: a declared chain refreshes every one of its periods. Watch periods that "
                "params.yaml does not declare: each continues the lineage, and a skipped one is "
                "simply not part of it"
            )
    starts: list[tuple[float, str]] = []
    for experiment, tags in ((EXPERIMENT, None), (WATCH_EXPERIMENT, {ACTION_TAG: "refresh"})):
        for run in registry.search_runs(experiment, tags, limit=1):
            if run.start_time is not None:
                starts.append((run.start_time, f"{experiment} run {run.name or run.run_id}"))
    last = max(starts, default=None)
    return WatchState(
        chain,
        registry.champion(),
        last[0] if last else None,
        last[1] if last else "",
        time.time(),
    )


@task(**COMPUTE)
def check_drift(registry_uri: str, params: Params, state: WatchState, shard: Shard) -> DriftReport:
    """The drift check of the new shard against ``drift.reference`` under ``@champion``."""
    registry = open_registry(registry_uri)
    store = open_store(params.store.root)
    reference = reference_frames(params, registry, store, state.chain, state.champion)
    return check(params, drift_model(registry), shard, reference, state.chain.period)


@task(**IO_RETRIES)
def record_drift(registry_uri: str, params: Params, report: DriftReport) -> str:
    return log_drift(open_registry(registry_uri), params, report)


@task(**IO_RETRIES)
def record_decision(registry_uri: str, params: Params, record: WatchRecord) -> str:
    """Open the decision's run in :data:`WATCH_EXPERIMENT` with its tags, metrics and
    ``decision.json``; it stays open until :func:`finish_record` (the refresh it starts is
    added then). Recorded before any refresh starts, so the next watch sees it (cooldown)."""
    registry = open_registry(registry_uri)
    run_id = registry.start_run(f"watch-{record.period}", WATCH_EXPERIMENT)
    registry.log_params(
        run_id,
        {
            "watch.max_age": record.max_age,
            "watch.cooldown": record.cooldown,
            "watch.refresh_deployment": params.watch.refresh_deployment,
            "drift.reference": params.drift.reference,
        },
    )
    registry.set_run_tags(
        run_id,
        {
            ACTION_TAG: record.action,
            "cssl.triggers": ",".join(record.triggers),
            "cssl.period": record.period,
            "cssl.summary": record.summary,
            "cssl.champion_version": str(record.champion_version or ""),
        },
    )
    metrics = {"refresh": float(record.action == "refresh")}
    if record.champion_age_s is not None:
        metrics["champion_age_hours"] = record.champion_age_s / 3600
    if record.since_last_refresh_s is not None:
        metrics["since_last_refresh_hours"] = record.since_last_refresh_s / 3600
    if record.drift is not None:
        metrics |= {
            "mmd2": record.drift["result"]["mmd2"],
            "p_value": record.drift["result"]["p_value"],
            "drifted": float(record.drift["drifted"]),
        }
    registry.log_metrics(run_id, [MetricPoint(k, float(v)) for k, v in metrics.items()])
    _log_decision(registry_uri, run_id, {**record.as_dict(), "run_id": run_id})
    return run_id


@task(**IO_RETRIES)
def finish_record(registry_uri: str, run_id: str, record: WatchRecord, failed: bool) -> None:
    """Add what the refresh did (or that it failed) to the decision's run and close it."""
    registry = open_registry(registry_uri)
    refresh_tags = {
        f"cssl.refresh.{k}": str(v) for k, v in record.refresh.items() if k != "summary"
    }
    registry.set_run_tags(run_id, refresh_tags)
    _log_decision(registry_uri, run_id, record.as_dict())
    registry.end_run(run_id, "FAILED" if failed else "FINISHED")


def _log_decision(registry_uri: str, run_id: str, payload: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "decision.json").write_text(json.dumps(payload, indent=2, default=str))
        open_registry(registry_uri).log_artifacts(run_id, Path(tmp), "watch")


@task(**IO_RETRIES)
def start_refresh_deployment(deployment: str, parameters: dict[str, Any]) -> str | None:
    """Start a run of ``refresh/<deployment>`` without waiting; its flow-run id, or None when
    the Prefect API has no such deployment (embedded mode)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"{REFRESH_FLOW}/{deployment}"
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None
    # Called from synchronous code, run_deployment returns the FlowRun (not a coroutine).
    run = cast(FlowRun, run_deployment(name, parameters=parameters, timeout=0))
    return str(run.id)


# -- the flow -----------------------------------------------------------------------------


@flow(name="watch", log_prints=True)
def watch(
    period: str | None = None,
    shard: str | None = None,
    source: str | None = None,
    force: bool = False,
    params_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Check a new period's frames for drift and start a refresh only when it is worth it
    (see the module docstring); returns the decision as recorded.

    ``period``, ``shard`` and ``source`` name the period and its frames as for ``refresh``
    (``auto``: the calendar period now; no shard or source: the period's own source). The
    refresh it starts gets the same period, frames, ``params_path`` and ``overrides``.
    """
    logger = get_run_logger()
    params = load_params(params_path, overrides or [])
    if shard and source:
        raise ValueError("give either --shard or --source, not both")
    period = resolve_period(params, period, shard, source)
    registry = tracking_uri()
    state = watch_state(registry, params, period)
    path = shard or ingest_source(source or params.period_source(period), state.chain, params)
    new_shard = validate(path, params, period)
    drift: DriftReport | None = None
    if state.champion is not None:
        drift = check_drift(registry, params, state, new_shard)
        drift = replace(drift, run_id=record_drift(registry, params, drift))
    age, since = state.champion_age(), state.since_last_refresh()
    decision = decide_watch(
        params.watch,
        drifted=drift.drifted if drift else None,
        drift_summary=drift.result.summary() if drift else "",
        champion_version=state.champion.version if state.champion else None,
        champion_age=age,
        since_last_refresh=since,
        force=force,
    )
    record = WatchRecord(
        period=period,
        shard=str(new_shard.path),
        source=source or ("" if shard else params.period_source(period)),
        decided_at=datetime.fromtimestamp(state.now, UTC).isoformat(),
        action=decision.action,
        summary=decision.summary,
        triggers=list(decision.triggers),
        reasons=list(decision.reasons),
        champion_version=state.champion.version if state.champion else None,
        champion_age_s=age.total_seconds() if age is not None else None,
        since_last_refresh_s=since.total_seconds() if since is not None else None,
        last_refresh_run=state.last_refresh_run,
        max_age=format_duration(params.watch.max_age),
        cooldown=format_duration(params.watch.cooldown),
        drift=drift.to_dict() if drift else None,
    )
    logger.info(f"{period}: {decision.summary}")
    for reason in decision.reasons:
        logger.info(f"    {reason}")
    run_id = record_decision(registry, params, record)
    record.run_id = run_id
    failed = True
    try:
        if decision.refresh:
            record.refresh = _start_refresh(params, period, shard, source, params_path, overrides)
        failed = False
    finally:
        finish_record(registry, run_id, record, failed)
    return record.as_dict()


def _start_refresh(
    params: Params,
    period: str,
    shard: str | None,
    source: str | None,
    params_path: str | None,
    overrides: list[str] | None,
) -> dict[str, Any]:
    """Start the deployment of ``refresh`` when the Prefect API has it, else run ``refresh``
    here as a subflow; what was started, for the record. Either way the refresh gets the
    period and the frames as the watch got them (a source is ingested again, the same way,
    so the lineage records the raw source, not a staging copy)."""
    logger = get_run_logger()
    parameters: dict[str, Any] = {"period": period}
    if shard or source:
        parameters["shard" if shard else "source"] = shard or source
    if params_path is not None:
        parameters["params_path"] = params_path
    if overrides is not None:
        parameters["overrides"] = list(overrides)
    deployment = params.watch.refresh_deployment
    flow_run_id = start_refresh_deployment(deployment, parameters)
    if flow_run_id is not None:
        logger.info(f"{period}: started flow run {flow_run_id} of {REFRESH_FLOW}/{deployment}")
        return {
            "mode": "deployment",
            "deployment": f"{REFRESH_FLOW}/{deployment}",
            "flow_run_id": flow_run_id,
        }
    logger.info(f"{period}: no deployment {REFRESH_FLOW}/{deployment}: refreshing in this process")
    summary = refresh(**parameters)
    return {
        "mode": "in-process",
        "version": summary["version"],
        "promoted": summary["promoted"],
        "skipped": summary["skipped"],
        "summary": summary,
    }
