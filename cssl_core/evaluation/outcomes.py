"""What one model got right on one period's eval set, frame by frame (no torch).

:func:`cssl_core.evaluation.evaluate.evaluate_periods` returns, per period, the accuracies
(:class:`PeriodScores`) and the per-frame outcomes behind them (:class:`FrameOutcomes`): which
eval frames each classifier got right, each frame's id and its cluster id (the unit of
independence the bootstrap resamples). The frames are the period's labelled eval frames in
``frame_id`` order, the same for every model, so two models' outcomes on one period pair
frame by frame: that is what the paired gate and every interval are computed from, and what
the refresh stores as a Parquet artifact so a later report can recompute intervals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import pyarrow as pa

from cssl_core.evaluation.intervals import (
    DEFAULT_RESAMPLES,
    Bootstrap,
    Interval,
    Method,
    accuracy_interval,
    paired_difference_bootstrap,
)

Metric = Literal["knn", "linear"]
METRICS: tuple[str, ...] = get_args(Metric)

OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("cluster", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("knn", pa.bool_(), nullable=False),
        pa.field("linear", pa.bool_(), nullable=False),
    ]
)
"""One row per eval frame: its id, cluster, category, and whether each classifier was right."""


class FramesDiffer(ValueError):
    """Two outcomes to be paired were scored on different eval frames."""


def _frozen_bool(values: np.ndarray | Sequence[bool], name: str, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype != np.bool_ or arr.shape != (n,):
        raise ValueError(f"{name} must be a bool array of {n} entries, got {arr.dtype} {arr.shape}")
    arr = arr.copy()
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class FrameOutcomes:
    """Per-eval-frame results of one model on one period (frames in ``frame_id`` order).

    ``knn[k]`` / ``linear[k]``: whether that classifier got frame ``k`` right; ``labels[k]``
    its category; ``clusters[k]`` its cluster id (by default its ``stream_id``, see
    :class:`cssl_core.config.EvalConfig`). Arrays are read-only.
    """

    frame_ids: tuple[str, ...]
    clusters: tuple[str, ...]
    labels: tuple[str, ...]
    knn: np.ndarray
    linear: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.frame_ids)
        if n == 0:
            raise ValueError("frame outcomes need at least one eval frame")
        if len(self.clusters) != n or len(self.labels) != n:
            raise ValueError(
                f"{n} frame ids but {len(self.clusters)} clusters and {len(self.labels)} labels"
            )
        if len(set(self.frame_ids)) != n:
            raise ValueError("frame ids repeat: each eval frame must appear once")
        object.__setattr__(self, "frame_ids", tuple(str(f) for f in self.frame_ids))
        object.__setattr__(self, "clusters", tuple(str(c) for c in self.clusters))
        object.__setattr__(self, "labels", tuple(str(c) for c in self.labels))
        object.__setattr__(self, "knn", _frozen_bool(self.knn, "knn", n))
        object.__setattr__(self, "linear", _frozen_bool(self.linear, "linear", n))

    def __len__(self) -> int:
        return len(self.frame_ids)

    def correct(self, metric: Metric) -> np.ndarray:
        """The bool correctness array of ``metric`` (``knn`` or ``linear``)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        arr: np.ndarray = getattr(self, metric)
        return arr

    def accuracy(self, metric: Metric) -> float:
        return float(self.correct(metric).mean())

    @property
    def n_clusters(self) -> int:
        return len(set(self.clusters))

    def interval(
        self,
        metric: Metric,
        *,
        confidence: float = 0.95,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = 0,
        method: Method = "percentile",
    ) -> Interval:
        """The accuracy of ``metric`` with its cluster-bootstrap interval."""
        return accuracy_interval(
            self.correct(metric),
            self.clusters,
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
            method=method,
        )

    def check_paired(self, other: FrameOutcomes, what: str = "the two models") -> None:
        """Raise :class:`FramesDiffer` unless ``other`` covers the same frames, in the same
        order, with the same clusters."""
        if self.frame_ids != other.frame_ids:
            only_a = len(set(self.frame_ids) - set(other.frame_ids))
            only_b = len(set(other.frame_ids) - set(self.frame_ids))
            raise FramesDiffer(
                f"{what} were scored on different eval frames ({len(self)} vs {len(other)}; "
                f"{only_a} and {only_b} not shared); evaluate both on the same eval sets"
            )
        if self.clusters != other.clusters:
            raise FramesDiffer(
                f"{what} give the same frames different cluster ids; use one eval.cluster"
            )

    def paired_bootstrap(
        self,
        other: FrameOutcomes,
        metric: Metric,
        *,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = 0,
        method: Method = "percentile",
    ) -> Bootstrap:
        """This model's accuracy minus ``other``'s on the same frames, and the paired
        cluster-bootstrap replicates (:func:`.intervals.paired_difference_bootstrap`)."""
        self.check_paired(other)
        return paired_difference_bootstrap(
            self.correct(metric),
            other.correct(metric),
            self.clusters,
            n_resamples=n_resamples,
            seed=seed,
            method=method,
        )

    def difference(
        self,
        other: FrameOutcomes,
        metric: Metric,
        *,
        confidence: float = 0.95,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = 0,
        method: Method = "percentile",
    ) -> Interval:
        """This model's accuracy minus ``other``'s on the same frames with its paired
        ``confidence`` interval."""
        boot = self.paired_bootstrap(
            other, metric, n_resamples=n_resamples, seed=seed, method=method
        )
        return boot.interval(confidence)

    # -- storage (the refresh's Parquet artifact) -----------------------------------------
    def to_table(self) -> pa.Table:
        """One row per eval frame, :data:`OUTCOME_SCHEMA`."""
        return pa.table(
            {
                "frame_id": list(self.frame_ids),
                "cluster": list(self.clusters),
                "label": list(self.labels),
                "knn": self.knn,
                "linear": self.linear,
            },
            schema=OUTCOME_SCHEMA,
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> FrameOutcomes:
        """Inverse of :meth:`to_table`; a table missing a column is a one-line error."""
        missing = [name for name in OUTCOME_SCHEMA.names if name not in table.column_names]
        if missing:
            raise ValueError(f"frame outcome table lacks column(s) {', '.join(missing)}")
        return cls(
            tuple(table.column("frame_id").to_pylist()),
            tuple(table.column("cluster").to_pylist()),
            tuple(table.column("label").to_pylist()),
            np.asarray(table.column("knn").to_pylist(), dtype=bool),
            np.asarray(table.column("linear").to_pylist(), dtype=bool),
        )


@dataclass(frozen=True)
class PeriodScores:
    """Accuracies on one period's eval set from the same features, and the per-frame
    outcomes behind them (``frames``; ``None`` only where scores were built by hand).

    Equality compares the accuracies only."""

    knn: float
    linear: float
    frames: FrameOutcomes | None = field(default=None, compare=False, repr=False)

    def interval(
        self,
        metric: Metric,
        *,
        confidence: float = 0.95,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = 0,
        method: Method = "percentile",
    ) -> Interval:
        """The accuracy of ``metric`` with its cluster-bootstrap interval."""
        if self.frames is None:
            raise ValueError("these scores carry no per-frame outcomes to bootstrap")
        return self.frames.interval(
            metric, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method
        )


def majority_class(reference_labels: Sequence[str | None]) -> str:
    """The most frequent category of the labelled reference frames (ties: the first in
    sorted order, so the choice does not depend on frame order)."""
    counts = Counter(label for label in reference_labels if label is not None)
    if not counts:
        raise ValueError("no labelled reference frame to take the majority class from")
    top = max(counts.values())
    return min(label for label, n in counts.items() if n == top)


def majority_outcomes(
    reference_labels: Sequence[str | None],
    eval_labels: Sequence[str],
    frame_ids: Sequence[str],
    clusters: Sequence[str],
) -> FrameOutcomes:
    """The blind majority-class baseline: every eval frame is predicted to be
    :func:`majority_class` of the reference frames. Both classifiers' columns hold the same
    outcome, so the baseline pairs and reports like a model."""
    guess = majority_class(reference_labels)
    hit = np.array([label == guess for label in eval_labels], dtype=bool)
    return FrameOutcomes(tuple(frame_ids), tuple(clusters), tuple(eval_labels), hit, hit)
