"""``cssl report``: the accuracy matrix, metrics and lineage, read back from MLflow."""

from __future__ import annotations

from typing import Any

from cssl_core.config import Params
from cssl_core.evaluation.metrics import AccuracyMatrix, MissingAccuracy
from pipelines.refresh import lineage_matrix
from pipelines.registry import Registry


def _safe(fn: Any) -> float | None:
    try:
        return float(fn())
    except (MissingAccuracy, ValueError, ZeroDivisionError):
        return None


def build_report(params: Params, registry: Registry | None = None) -> dict[str, Any]:
    registry = registry or Registry()
    versions = registry.versions()
    champion = registry.champion()
    refreshed = {v.period for v in versions}
    periods = [p for p in params.period_names if p in refreshed]
    rows = []
    for v in versions:
        metrics = registry.run_data(v.run_id)["metrics"]
        rows.append(
            {
                "version": v.version,
                "period": v.period,
                "aliases": list(v.aliases),
                "gate": v.tags.get("gate", ""),
                "parent_version": v.tags.get("parent_version", ""),
                "strategy": v.tags.get("strategy", ""),
                "shard_fingerprint": v.tags.get("shard_fingerprint", "")[:12],
                "config_hash": v.tags.get("config_hash", ""),
                "git_commit": v.tags.get("git_commit", "")[:10],
                "average_accuracy": metrics.get("average_accuracy"),
                "forgetting": metrics.get("forgetting"),
            }
        )
    matrices: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for metric in ("knn", "linear"):
        matrix = lineage_matrix(registry, periods, metric) if periods else AccuracyMatrix(["-"])
        matrices[metric] = matrix.to_dict()
        baseline = {}
        for v in versions:
            m = registry.run_data(v.run_id)["metrics"]
            if f"random_{metric}/{v.period}" in m:
                baseline[v.period] = m[f"random_{metric}/{v.period}"]
        summary[metric] = {
            "average_accuracy": _safe(matrix.average_accuracy) if periods else None,
            "forgetting": _safe(matrix.forgetting) if periods else None,
            "bwt": _safe(matrix.bwt) if periods else None,
            "fwt": _safe(lambda m=matrix, b=baseline: m.fwt(b)) if periods else None,
        }
    return {
        "model": "stream-embedding",
        "tracking_uri": registry.uri,
        "champion": champion.version if champion else None,
        "versions": rows,
        "matrices": matrices,
        "summary": summary,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: dict[str, Any]) -> list[str]:
    if not report["versions"]:
        return [f"no versions of {report['model']} yet in {report['tracking_uri']}"]
    lines = [
        f"{report['model']} in {report['tracking_uri']}; @champion = version {report['champion']}",
        "",
        "| version | period | gate | parent | aliases | avg acc | forgetting |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["versions"]:
        lines.append(
            f"| {r['version']} | {r['period']} | {r['gate']} | "
            f"{r['parent_version'] or '-'} | {', '.join(r['aliases']) or '-'} | "
            f"{_fmt(r['average_accuracy'])} | {_fmt(r['forgetting'])} |"
        )
    for metric in ("knn", "linear"):
        matrix = AccuracyMatrix.from_dict(report["matrices"][metric])
        s = report["summary"][metric]
        lines += [
            "",
            f"R[i][j] ({metric} accuracy on period j's eval split after period i):",
            matrix.to_markdown(),
            f"average accuracy {_fmt(s['average_accuracy'])}, forgetting "
            f"{_fmt(s['forgetting'])}, BWT {_fmt(s['bwt'])}, FWT {_fmt(s['fwt'])}",
        ]
    return lines
