"""``cssl report``: the accuracy matrix, metrics and lineage, read back from the registry.

Every accuracy is shown with its 95% cluster-bootstrap interval as the refresh logged it
(``0.742 ±0.021``: the larger distance from the value to a bound). Beside the matrix: the
next-period accuracy (what production served on each period before its refresh landed) and
the blind baselines of each period (an untrained model and the majority class), so a reader
sees what the embedding adds.

Compatibility: each version's ``cssl.compat`` tag (``direct``, ``adapter``, ``none``), the
newest refresh's compatibility matrix (retrieval top-1 / mAP@10 of every query model against
every gallery model, rebuilt from its ``compat_*`` metrics) and the lineage's average
compatibility: CL2R's AC over the lineage's consecutive pairs (each promoted version against
the champion it replaced, as its refresh measured them on the same frames); a pair of versions
further apart was never measured on the same frames, so it is not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from math import isnan
from typing import Any

from cssl_core.config import Params
from cssl_core.evaluation.compatibility import CompatibilityMatrix
from cssl_core.evaluation.metrics import AccuracyMatrix, MissingAccuracy
from pipelines.registry import ModelRegistry, lineage_rows, open_registry
from pipelines.settings import MODEL_NAME

METRICS = ("knn", "linear")


@dataclass(frozen=True)
class VersionRow:
    version: int
    period: str
    aliases: list[str]
    gate: str
    parent_version: int | None
    strategy: str
    shard_fingerprint: str
    config_hash: str
    git_commit: str
    average_accuracy: float | None
    forgetting: float | None
    compat: str = ""


@dataclass(frozen=True)
class CompatPair:
    """A promoted version against the champion it replaced, as its refresh measured them
    (retrieval top-1): ``direct`` = M[new][old], ``own`` = M[old][old], ``adapter`` =
    M[new via adapter][old] (None without an adapter)."""

    version: int
    parent_version: int
    direct: float
    own: float
    adapter: float | None = None

    @property
    def compatible(self) -> bool:
        return self.direct >= self.own

    @property
    def compatible_via_adapter(self) -> bool:
        return self.compatible or (self.adapter is not None and self.adapter >= self.own)


@dataclass(frozen=True)
class Compatibility:
    """The newest refresh's matrix (``version``'s run) and the lineage's consecutive pairs;
    ``average`` / ``average_via_adapter``: the share of pairs compatible (CL2R's AC over
    consecutive pairs), None without a pair."""

    version: int | None
    matrix: CompatibilityMatrix | None
    pairs: list[CompatPair]

    @property
    def average(self) -> float | None:
        return sum(p.compatible for p in self.pairs) / len(self.pairs) if self.pairs else None

    @property
    def average_via_adapter(self) -> float | None:
        if not self.pairs:
            return None
        return sum(p.compatible_via_adapter for p in self.pairs) / len(self.pairs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "matrix": self.matrix.to_dict() if self.matrix is not None else None,
            "pairs": [asdict(p) for p in self.pairs],
            "average_compatibility": self.average,
            "average_compatibility_via_adapter": self.average_via_adapter,
        }


COMPAT_ORDER = ("index", "champion", "candidate", "candidate_adapter")


def matrix_from_metrics(metrics: Mapping[str, float]) -> CompatibilityMatrix | None:
    """The compatibility matrix a refresh logged as ``compat_top1/<q>__<g>`` and
    ``compat_map<k>/<q>__<g>`` metrics (None when it logged none); cells it did not log are
    not comparable."""
    top1: dict[tuple[str, str], float] = {}
    maps: dict[tuple[str, str], float] = {}
    k = 10
    for key, value in metrics.items():
        head, _, cell = key.partition("/")
        q, sep, g = cell.partition("__")
        if not sep:
            continue
        if head == "compat_top1":
            top1[(q, g)] = value
        elif head.startswith("compat_map") and head[len("compat_map") :].isdigit():
            maps[(q, g)] = value
            k = int(head[len("compat_map") :])
    if not top1:
        return None

    def ordered(names: set[str]) -> list[str]:
        return sorted(names, key=lambda n: (COMPAT_ORDER + (n,)).index(n))

    rows = ordered({q for q, _ in top1})
    cols = ordered({g for _, g in top1})
    reasons = {
        (q, g): "the adapter maps queries into the champion's space only"
        if q.endswith("_adapter")
        else "not logged"
        for q in rows
        for g in cols
        if (q, g) not in top1
    }
    grid_top1 = [[top1.get((q, g)) for g in cols] for q in rows]
    grid_map = [[maps.get((q, g)) if (q, g) in top1 else None for g in cols] for q in rows]
    return CompatibilityMatrix(rows, cols, grid_top1, grid_map, k, reasons)


def _compatibility(registry: ModelRegistry, versions: list[Any]) -> Compatibility:
    newest, matrix = None, None
    for v in reversed(versions):
        matrix = matrix_from_metrics(registry.run(v.run_id).metrics)
        if matrix is not None:
            newest = v.version
            break
    pairs = []
    for v in registry.lineage().values():
        parent = v.lineage.parent_version
        m = registry.run(v.run_id).metrics
        direct = m.get("compat_top1/candidate__champion")
        own = m.get("compat_top1/champion__champion")
        if parent is None or direct is None or own is None:
            continue
        pairs.append(
            CompatPair(
                v.version, parent, direct, own, m.get("compat_top1/candidate_adapter__champion")
            )
        )
    return Compatibility(newest, matrix, sorted(pairs, key=lambda p: p.version))


@dataclass(frozen=True)
class Bounds:
    """A logged value and its 95% interval bounds (None where a run logged none)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def __str__(self) -> str:
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} ±{max(self.value - self.low, self.high - self.value):.3f}"


@dataclass(frozen=True)
class Summary:
    """Continual-learning metrics of the lineage (periods with a promoted version).

    ``average_interval`` is the logged interval of the last lineage version's average
    accuracy, when that average is over exactly the lineage's periods; ``next_period`` the
    accuracy on each period before its refresh (``R[t-1][t]``) with its interval, and
    ``average_next_period`` their mean (no interval: the periods' runs are separate).
    """

    average_accuracy: float | None
    forgetting: float | None
    bwt: float | None
    fwt: float | None
    average_interval: Bounds | None = None
    next_period: dict[str, Bounds] | None = None
    average_next_period: float | None = None


@dataclass(frozen=True)
class Baselines:
    """One period's blind baselines, each with its interval, beside the lineage's model of
    that period (``R[p][p]``)."""

    period: str
    random_knn: Bounds
    random_linear: Bounds
    majority: Bounds
    model_knn: Bounds
    model_linear: Bounds


@dataclass(frozen=True)
class Report:
    model: str
    registry: str
    champion: int | None
    versions: list[VersionRow]
    matrices: dict[str, AccuracyMatrix]  # metric -> R over the refreshed periods
    summary: dict[str, Summary]  # metric -> summary
    lows: dict[str, AccuracyMatrix] = field(default_factory=dict)  # metric -> 95% low bounds
    highs: dict[str, AccuracyMatrix] = field(default_factory=dict)  # metric -> 95% high bounds
    baselines: list[Baselines] = field(default_factory=list)
    compatibility: Compatibility | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``cssl report --json``)."""
        return {
            "model": self.model,
            "tracking_uri": self.registry,
            "champion": self.champion,
            "versions": [asdict(v) for v in self.versions],
            "matrices": {m: matrix.to_dict() for m, matrix in self.matrices.items()},
            "intervals": {
                m: {"low": self.lows[m].to_dict(), "high": self.highs[m].to_dict()}
                for m in self.lows
            },
            "summary": {m: asdict(s) for m, s in self.summary.items()},
            "baselines": [asdict(b) for b in self.baselines],
            "compatibility": self.compatibility.as_dict() if self.compatibility else None,
        }


def _safe(fn: Callable[[], float]) -> float | None:
    try:
        return float(fn())
    except (MissingAccuracy, ValueError, ZeroDivisionError):
        return None


def build_report(params: Params, registry: ModelRegistry | None = None) -> Report:
    registry = registry or open_registry()
    versions = registry.versions()
    champion = registry.champion()
    periods = registry.stream_periods()  # declared or not, in the order they were refreshed
    rows = []
    for v in versions:
        metrics = registry.run(v.run_id).metrics
        t = v.lineage
        rows.append(
            VersionRow(
                version=v.version,
                period=v.period,
                aliases=list(v.aliases),
                gate=t.gate,
                parent_version=t.parent_version,
                strategy=t.strategy,
                shard_fingerprint=t.shard_fingerprint[:12],
                config_hash=t.config_hash,
                git_commit=t.git_commit[:10],
                average_accuracy=metrics.get("average_accuracy"),
                forgetting=metrics.get("forgetting"),
                compat=t.compat,
            )
        )
    lineage = registry.lineage()
    runs = {p: registry.run(v.run_id).metrics for p, v in lineage.items()}
    matrices: dict[str, AccuracyMatrix] = {}
    lows: dict[str, AccuracyMatrix] = {}
    highs: dict[str, AccuracyMatrix] = {}
    summary: dict[str, Summary] = {}
    for metric in METRICS:
        if not periods:
            matrices[metric] = AccuracyMatrix(["-"])
            summary[metric] = Summary(None, None, None, None)
            continue
        matrix = registry.lineage_matrix(periods, metric)
        matrices[metric] = matrix
        lows[metric] = registry.lineage_matrix(periods, f"{metric}_low")
        highs[metric] = registry.lineage_matrix(periods, f"{metric}_high")
        kept = lineage_rows(matrix)
        baseline = {
            p: m[f"random_{metric}/{p}"] for p, m in runs.items() if f"random_{metric}/{p}" in m
        }
        summary[metric] = Summary(
            average_accuracy=_safe(kept.average_accuracy),
            forgetting=_safe(kept.forgetting),
            bwt=_safe(kept.bwt),
            fwt=_safe(partial(kept.fwt, baseline)),
            average_interval=_average_interval(kept, runs, metric),
            next_period=_next_period(kept, lows[metric], highs[metric]),
            average_next_period=_safe(kept.average_next_period_accuracy),
        )
    return Report(
        model=MODEL_NAME,
        registry=registry.uri,
        champion=champion.version if champion else None,
        versions=rows,
        matrices=matrices,
        summary=summary,
        lows=lows,
        highs=highs,
        baselines=[_baselines(p, runs[p]) for p in periods if p in runs],
        compatibility=_compatibility(registry, versions),
    )


def _logged(metrics: Mapping[str, float], name: str) -> Bounds:
    """``name`` (``a/b``) with its logged ``a_low/b`` and ``a_high/b``."""
    head, sep, tail = name.partition("/")
    return Bounds(
        metrics.get(name),
        metrics.get(f"{head}_low{sep}{tail}"),
        metrics.get(f"{head}_high{sep}{tail}"),
    )


def _average_interval(
    kept: AccuracyMatrix, runs: Mapping[str, Mapping[str, float]], metric: str
) -> Bounds | None:
    """The last lineage run's logged average and its interval, if it averages exactly the
    lineage's periods (a period without a lineage row would make it another average)."""
    if not kept.periods or kept.periods[-1] not in runs:
        return None
    logged = _logged(runs[kept.periods[-1]], f"average_{metric}")
    value = _safe(kept.average_accuracy)
    if logged.value is None or value is None or abs(logged.value - value) > 1e-9:
        return None
    return logged


def _next_period(
    kept: AccuracyMatrix, low: AccuracyMatrix, high: AccuracyMatrix
) -> dict[str, Bounds] | None:
    """``R[t-1][t]`` of each lineage period after the first, with its interval."""
    try:
        served = kept.next_period_accuracy()
    except MissingAccuracy:
        return None
    out = {}
    for k, (p, value) in enumerate(served.items(), start=1):
        before = kept.periods[k - 1]
        lo, hi = low.get(before, p), high.get(before, p)
        out[p] = Bounds(value, None if isnan(lo) else lo, None if isnan(hi) else hi)
    return out


def _baselines(period: str, metrics: Mapping[str, float]) -> Baselines:
    return Baselines(
        period=period,
        random_knn=_logged(metrics, f"random_knn/{period}"),
        random_linear=_logged(metrics, f"random_linear/{period}"),
        majority=_logged(metrics, f"majority_knn/{period}"),
        model_knn=_logged(metrics, f"knn/{period}"),
        model_linear=_logged(metrics, f"linear/{period}"),
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: Report) -> list[str]:
    if not report.versions:
        return [f"no versions of {report.model} yet in {report.registry}"]
    lines = [
        f"{report.model} in {report.registry}; @champion = version {report.champion}",
        "",
        "| version | period | gate | parent | compat | aliases | avg acc | forgetting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.versions:
        parent = "-" if r.parent_version is None else str(r.parent_version)
        lines.append(
            f"| {r.version} | {r.period} | {r.gate} | {parent} | {r.compat or '-'} | "
            f"{', '.join(r.aliases) or '-'} | {_fmt(r.average_accuracy)} | {_fmt(r.forgetting)} |"
        )
    for metric in METRICS:
        s = report.summary[metric]
        matrix = report.matrices[metric]
        lines += [
            "",
            f"R[i][j] ({metric} accuracy on period j's eval split after period i, "
            "± its 95% interval):",
            matrix.to_markdown(low=report.lows.get(metric), high=report.highs.get(metric)),
        ]
        rowless = [p for p in matrix.periods if p not in lineage_rows(matrix).periods]
        if rowless:
            lines.append(
                f"no row for {', '.join(rowless)}: no version passed the gate (the lineage "
                "continued from the champion; these periods are left out of the metrics)"
            )
        average = s.average_interval or Bounds(s.average_accuracy)
        lines.append(
            f"average accuracy {average}, forgetting {_fmt(s.forgetting)}, BWT {_fmt(s.bwt)}, "
            f"FWT {_fmt(s.fwt)}, next-period accuracy {_fmt(s.average_next_period)}"
        )
        if s.next_period:
            served = ", ".join(f"{p} {b}" for p, b in s.next_period.items())
            lines.append(f"next-period accuracy (the model served before each refresh): {served}")
    if report.baselines:
        lines += [
            "",
            "Blind baselines on each period's eval split (what the embedding adds):",
            "| period | model knn | model linear | untrained knn | untrained linear | majority |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for b in report.baselines:
            lines.append(
                f"| {b.period} | {b.model_knn} | {b.model_linear} | {b.random_knn} | "
                f"{b.random_linear} | {b.majority} |"
            )
    lines += format_compatibility(report.compatibility)
    return lines


def format_compatibility(compat: Compatibility | None) -> list[str]:
    """The compatibility section of the report (empty when no refresh measured any)."""
    if compat is None or (compat.matrix is None and not compat.pairs):
        return []
    lines = [
        "",
        "Compatibility (retrieval top-1 / mAP@k; eval-frame queries, train-frame gallery):",
    ]
    if compat.matrix is not None:
        lines += [
            f"newest matrix (version {compat.version}'s refresh; rows embed the queries, "
            "columns the gallery):",
            compat.matrix.to_markdown(),
        ]
    if compat.pairs:
        lines.append(
            "| version | replaced | M[new][old] | M[old][old] | via adapter | compatible |"
        )
        lines.append("|---|---|---:|---:|---:|---|")
        for p in compat.pairs:
            kind = "direct" if p.compatible else "adapter" if p.compatible_via_adapter else "no"
            via = "-" if p.adapter is None else f"{p.adapter:.3f}"
            lines.append(
                f"| {p.version} | {p.parent_version} | {p.direct:.3f} | {p.own:.3f} | {via} | "
                f"{kind} |"
            )
        lines.append(
            f"average compatibility of the lineage (CL2R, consecutive pairs): "
            f"{_fmt(compat.average)} direct, {_fmt(compat.average_via_adapter)} with adapters"
        )
    return lines
