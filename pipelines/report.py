"""``cssl report``: the accuracy matrix, metrics and lineage, read back from the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from cssl_core.config import Params
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


@dataclass(frozen=True)
class Summary:
    """Continual-learning metrics of the lineage (periods with a promoted version)."""

    average_accuracy: float | None
    forgetting: float | None
    bwt: float | None
    fwt: float | None


@dataclass(frozen=True)
class Report:
    model: str
    registry: str
    champion: int | None
    versions: list[VersionRow]
    matrices: dict[str, AccuracyMatrix]  # metric -> R over the refreshed periods
    summary: dict[str, Summary]  # metric -> summary

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``cssl report --json``)."""
        return {
            "model": self.model,
            "tracking_uri": self.registry,
            "champion": self.champion,
            "versions": [asdict(v) for v in self.versions],
            "matrices": {m: matrix.to_dict() for m, matrix in self.matrices.items()},
            "summary": {m: asdict(s) for m, s in self.summary.items()},
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
            )
        )
    lineage = registry.lineage()
    runs = {p: registry.run(v.run_id).metrics for p, v in lineage.items()}
    matrices: dict[str, AccuracyMatrix] = {}
    summary: dict[str, Summary] = {}
    for metric in METRICS:
        if not periods:
            matrices[metric] = AccuracyMatrix(["-"])
            summary[metric] = Summary(None, None, None, None)
            continue
        matrix = registry.lineage_matrix(periods, metric)
        matrices[metric] = matrix
        kept = lineage_rows(matrix)
        baseline = {
            p: m[f"random_{metric}/{p}"] for p, m in runs.items() if f"random_{metric}/{p}" in m
        }
        summary[metric] = Summary(
            average_accuracy=_safe(kept.average_accuracy),
            forgetting=_safe(kept.forgetting),
            bwt=_safe(kept.bwt),
            fwt=_safe(partial(kept.fwt, baseline)),
        )
    return Report(
        model=MODEL_NAME,
        registry=registry.uri,
        champion=champion.version if champion else None,
        versions=rows,
        matrices=matrices,
        summary=summary,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: Report) -> list[str]:
    if not report.versions:
        return [f"no versions of {report.model} yet in {report.registry}"]
    lines = [
        f"{report.model} in {report.registry}; @champion = version {report.champion}",
        "",
        "| version | period | gate | parent | aliases | avg acc | forgetting |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.versions:
        parent = "-" if r.parent_version is None else str(r.parent_version)
        lines.append(
            f"| {r.version} | {r.period} | {r.gate} | {parent} | "
            f"{', '.join(r.aliases) or '-'} | {_fmt(r.average_accuracy)} | {_fmt(r.forgetting)} |"
        )
    for metric in METRICS:
        s = report.summary[metric]
        matrix = report.matrices[metric]
        lines += [
            "",
            f"R[i][j] ({metric} accuracy on period j's eval split after period i):",
            matrix.to_markdown(),
        ]
        rowless = [p for p in matrix.periods if p not in lineage_rows(matrix).periods]
        if rowless:
            lines.append(
                f"no row for {', '.join(rowless)}: no version passed the gate (the lineage "
                "continued from the champion; these periods are left out of the metrics)"
            )
        lines.append(
            f"average accuracy {_fmt(s.average_accuracy)}, forgetting "
            f"{_fmt(s.forgetting)}, BWT {_fmt(s.bwt)}, FWT {_fmt(s.fwt)}"
        )
    return lines
