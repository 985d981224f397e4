"""``cssl drift`` and the watch flow's drift check: what is compared, with which model, and
where the answer is recorded.

The statistics are :mod:`cssl_core.evaluation.drift` (MMD² over stream segments, a permutation
p-value, a verdict that needs significance and a minimum effect). This module picks the inputs
through the registry interface and the store:

- the **new** frames: a shard (a directory) or a period's shard in the store;
- the **reference** (``drift.reference``, or ``--reference`` naming a shard directory or a
  period of the store): ``champion``, the shard of the period ``@champion`` was trained on
  (the default: a gradual shift adds up until it is found); ``previous``, the shard of the
  period before the new one in the stream (:func:`pipelines.registry.period_chain`);
  ``memory``, the replay memory ``@champion``'s period kept;
- the **model** that embeds both: ``@champion``, or ``--model`` (a version number, an alias,
  a ``models:/`` URI, or an embedder directory such as a DVC stage's ``data/models/P.model``).

Every check is logged as a run of its own experiment, :data:`DRIFT_EXPERIMENT`: the drift
settings as parameters, the statistic, p-value and effect as metrics, what was compared as
tags, and the whole result as ``drift.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cssl_core.config import Params, PeriodChain, is_period_name
from cssl_core.data.shard import MANIFEST, Shard
from cssl_core.evaluation.drift import DriftError, DriftResult, Frames
from pipelines.registry import MetricPoint, ModelRegistry, VersionInfo, period_chain

if TYPE_CHECKING:
    from cssl_core.data.storage import ObjectStore
    from cssl_core.learn.models import Embedder

DRIFT_EXPERIMENT = "cssl-drift"
TOP_MOVED = 5
"""Categories listed under the summary line (largest share moved first)."""


@dataclass(frozen=True)
class Reference:
    """What new frames are compared with: the frames and how to name them."""

    frames: Frames
    label: str  # e.g. "shard of p03 (the period @champion was trained on)"
    kind: str  # champion | previous | memory | shard | period


@dataclass(frozen=True)
class DriftModel:
    """The model that embeds both sides, and how to name it."""

    model: Embedder
    label: str
    version: int | None


@dataclass(frozen=True)
class DriftReport:
    """One drift check: the verdict and what it compared (``result`` is the statistics)."""

    period: str
    new: str
    reference: str
    reference_kind: str
    model: str
    model_version: int | None
    result: DriftResult
    seconds: float
    run_id: str = ""

    @property
    def drifted(self) -> bool:
        return self.result.drifted

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["result"] = self.result.to_dict()
        out["drifted"] = self.drifted
        return out

    def lines(self) -> list[str]:
        """The summary line, then the categories whose share moved most."""
        r = self.result
        lines = [
            f"{self.period}: {r.summary()}",
            f"    new: {self.new}",
            f"    reference: {self.reference}",
            f"    model: {self.model}; {self.seconds:.1f} s",
        ]
        moved = [s for s in r.category_shifts if s.difference != 0][:TOP_MOVED]
        if moved:
            lines.append("    categories whose share moved most (reference -> new):")
            lines += [
                f"      {s.category}: {s.reference_share:.0%} -> {s.new_share:.0%} "
                f"({s.difference:+.0%})"
                for s in moved
            ]
        return lines


# -- what is compared ---------------------------------------------------------------------


def _shard_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def stored_shard(store: ObjectStore, period: str) -> Shard:
    """Period ``period``'s shard in the store (downloaded to the state folder's cache)."""
    from cssl_core import period as core
    from pipelines.settings import state_dir

    return core.stored_shard(store, period, state_dir() / "cache" / "shards")


def new_frames(params: Params, store: ObjectStore, period: str | None, shard: str | None) -> Shard:
    """The frames to check: the shard directory ``shard``, else ``period``'s shard in the
    store (a shard that is not there yet must be given as a directory)."""
    if shard is not None:
        path = Path(shard)
        if not _shard_dir(path):
            raise DriftError(f"{shard} is not a shard directory (no {MANIFEST})")
        found = Shard.open(path)
        if period is not None and found.period != period:
            raise DriftError(f"shard {shard} holds period {found.period!r}, not {period!r}")
        return found
    if period is None:
        raise DriftError("say which frames to check: --shard DIR or --period P")
    from cssl_core.data.shard import ShardError

    try:
        return stored_shard(store, period)
    except ShardError:
        raise DriftError(
            f"the store has no shard of {period!r} (it has not been refreshed): give its "
            "frames with --shard DIR"
        ) from None


def reference_frames(
    params: Params,
    registry: ModelRegistry,
    store: ObjectStore,
    chain: PeriodChain,
    champion: VersionInfo | None,
    reference: str | None = None,
) -> Reference:
    """The reference the new period ``chain.period`` is compared with.

    ``reference`` (``--reference``) names a shard directory or a period whose shard is in the
    store; without it, ``params.drift.reference`` decides (see the module docstring).
    """
    if reference is not None:
        path = Path(reference)
        if _shard_dir(path):
            found = Shard.open(path)
            return Reference(found, f"shard {path} ({found.period})", "shard")
        if path.is_dir():
            raise DriftError(
                f"--reference {reference}: a directory but not a shard (no {MANIFEST})"
            )
        if not is_period_name(reference):
            raise DriftError(f"--reference {reference!r} is neither a shard directory nor a period")
        return Reference(
            _stored(store, reference), f"shard of {reference} (from the store)", "period"
        )
    kind = params.drift.reference
    if kind == "previous":
        if not chain.previous:
            raise DriftError(
                f"{chain.period} is the first period of its stream: there is no previous "
                "period to compare with (give --reference)"
            )
        frames = _stored(store, chain.previous)
        return Reference(frames, f"shard of {chain.previous} (the previous period)", kind)
    if champion is None:
        raise DriftError(
            f"drift.reference is {kind!r} but there is no @champion yet: refresh a first "
            "period, or give --reference"
        )
    if kind == "memory":
        from cssl_core.memory.replay import ReplayMemory

        if not ReplayMemory.exists(store, champion.period):
            raise DriftError(f"the store has no replay memory of {champion.period!r}")
        memory = ReplayMemory.load(store, champion.period)
        label = f"replay memory of {champion.period} (@champion's, {len(memory)} frames)"
        return Reference(memory.table, label, kind)
    frames = _stored(store, champion.period)
    label = (
        f"shard of {champion.period} (the period @champion, version {champion.version}, "
        "was trained on)"
    )
    return Reference(frames, label, kind)


def _stored(store: ObjectStore, period: str) -> Shard:
    from cssl_core.data.shard import ShardError

    try:
        return stored_shard(store, period)
    except ShardError:
        raise DriftError(f"the store has no shard of {period!r} to compare with") from None


def drift_model(registry: ModelRegistry, model: str | None = None) -> DriftModel:
    """The model that embeds both sides: ``@champion`` by default; ``model`` is a version
    number, an alias, a ``models:/`` URI, or an embedder directory."""
    from cssl_core.learn.models import CONFIG_FILE, Embedder

    if model is not None and (Path(model) / CONFIG_FILE).is_file():
        return DriftModel(Embedder.load(model), f"embedder {model}", None)
    version = registry.resolve(model) if model is not None else registry.champion()
    if version is None:
        what = f"model {model!r}" if model is not None else "@champion"
        raise DriftError(
            f"the registry at {registry.uri} has no {what} to embed the frames with: refresh a "
            "period first, or give --model"
        )
    aliases = f" (@{', @'.join(version.aliases)})" if version.aliases else ""
    label = f"version {version.version}{aliases}, trained on {version.period}"
    return DriftModel(registry.load_embedder(version.version), label, version.version)


def check(
    params: Params, model: DriftModel, new: Shard, reference: Reference, period: str | None = None
) -> DriftReport:
    """Run :func:`cssl_core.evaluation.drift.drift_check` (timed) on the chosen inputs."""
    from cssl_core.evaluation.drift import drift_check
    from cssl_core.learn.distributed import DistEnv, resolve_device

    t0 = time.perf_counter()
    device = resolve_device(params.train.device, DistEnv())
    result = drift_check(model.model, new, reference.frames, params.drift, device=device)
    return DriftReport(
        period=period or new.period,
        new=f"shard {new.path} ({new.period}, {new.num_rows} frames)",
        reference=reference.label,
        reference_kind=reference.kind,
        model=model.label,
        model_version=model.version,
        result=result,
        seconds=time.perf_counter() - t0,
    )


# -- where it is recorded -----------------------------------------------------------------


def log_drift(registry: ModelRegistry, params: Params, report: DriftReport) -> str:
    """Record one check as a finished run of :data:`DRIFT_EXPERIMENT`; returns its id."""
    r = report.result
    run_id = registry.start_run(f"drift-{report.period}", DRIFT_EXPERIMENT)
    registry.log_params(
        run_id, {f"drift.{k}": str(v) for k, v in params.drift.model_dump(mode="json").items()}
    )
    metrics = {
        "mmd2": r.mmd2,
        "p_value": r.p_value,
        "drifted": float(r.drifted),
        "new_frames": float(r.new_frames),
        "reference_frames": float(r.reference_frames),
        "new_units": float(r.new_units),
        "reference_units": float(r.reference_units),
        "seconds": report.seconds,
    }
    if r.total_variation is not None:
        metrics["category_tv"] = r.total_variation
    registry.log_metrics(run_id, [MetricPoint(k, float(v)) for k, v in metrics.items()])
    registry.set_run_tags(
        run_id,
        {
            "cssl.period": report.period,
            "cssl.new": report.new,
            "cssl.reference": report.reference,
            "cssl.reference_kind": report.reference_kind,
            "cssl.model": report.model,
            "cssl.model_version": "" if report.model_version is None else str(report.model_version),
            "cssl.drifted": str(r.drifted).lower(),
            "cssl.summary": r.summary()[:5000],
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "drift.json").write_text(json.dumps(report.to_dict(), indent=2))
        registry.log_artifacts(run_id, Path(tmp), "drift")
    registry.end_run(run_id, "FINISHED")
    return run_id


def run_drift(
    params: Params,
    registry: ModelRegistry,
    *,
    period: str | None = None,
    shard: str | None = None,
    reference: str | None = None,
    model: str | None = None,
    log: bool = True,
) -> DriftReport:
    """``cssl drift``: pick the inputs, check, and (``log``) record the check in MLflow."""
    from cssl_core.data.storage import open_store

    store = open_store(params.store.root)
    new = new_frames(params, store, period, shard)
    chain = period_chain(params, registry, period or new.period)
    ref = reference_frames(params, registry, store, chain, registry.champion(), reference)
    report = check(params, drift_model(registry, model), new, ref, chain.period)
    if log:
        report = replace(report, run_id=log_drift(registry, params, report))
    return report
