r"""Confidence intervals of accuracies by the cluster bootstrap (pure functions, no models).

An eval set's frames are not independent: consecutive frames of one clip look alike, and every
frame of one streamer shares its layout, facecam, chat and colour grade, so a model that keys
on a streamer's style is right or wrong on all of that streamer's frames together. Resampling
single frames would then count one streamer's few hundred frames as that many independent
draws and give intervals far too narrow. The bootstrap here resamples *clusters* (the unit of
independence; :class:`cssl_core.evaluation.outcomes.FrameOutcomes` carries one cluster id per
frame, the shard's ``stream_id`` by default) with replacement, keeping every frame of a drawn
cluster (Davison & Hinkley 1997, "Bootstrap Methods and their Application", Sec. 3.8; Field &
Welsh 2007, "Bootstrapping clustered data", JRSS B 69(3)).

With clusters ``c = 1..C`` of ``n_c`` frames of which ``h_c`` are correct, the accuracy is the
ratio estimator

.. math:: \hat a = \frac{\sum_c h_c}{\sum_c n_c}

and one bootstrap replicate draws ``C`` cluster indices ``c^*_1..c^*_C`` uniformly with
replacement and computes ``\hat a^* = \sum_k h_{c^*_k} / \sum_k n_{c^*_k}``. With one frame
per cluster this is the ordinary frame bootstrap. ``scipy.stats.bootstrap`` draws the
replicates (vectorised, seeded) over the cluster *indices*, and the statistic looks the
per-cluster totals up, so paired quantities (two models on the same frames) use the same
draw for both and a difference of a model with itself is exactly zero in every replicate.

Quantities over several periods (average accuracy, forgetting) resample each period's clusters
on their own: a period's eval set is a stratum. A cluster id that recurs in several periods'
eval sets (the simulator's held-out streamers do) is resampled independently in each, which
ignores any correlation between periods and can make those intervals somewhat narrow; the
per-period intervals the gate tests are not affected.

The default interval is the percentile interval: it stays defined with few clusters and with
a degenerate bootstrap distribution (every cluster perfect), where BCa's acceleration is
undefined. Fewer than two clusters in a stratum give no interval: its bounds are NaN (never a
zero-width interval that looks certain), and the gate fails closed on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Method = Literal["percentile", "basic", "BCa"]
DEFAULT_RESAMPLES = 2000
MAX_DRAWN = 2_000_000
"""Cluster indices drawn per vectorised batch (bounds memory: 16 MB of int64 per batch)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided bootstrap confidence interval ``[low, high]``.

    ``str()`` shows it symmetrically, ``0.742 ±0.021``, where the half-width is the larger of
    the two distances from the estimate to a bound (so the shown range covers the exact one);
    :meth:`bounds` and :meth:`signed` show the exact bounds. NaN bounds mean no interval
    could be computed (fewer than two clusters).
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_clusters: int
    n_frames: int

    @property
    def defined(self) -> bool:
        """Whether the estimate and both bounds are finite numbers."""
        return all(math.isfinite(v) for v in (self.estimate, self.low, self.high))

    @property
    def half_width(self) -> float:
        """The larger distance from the estimate to a bound (NaN when undefined)."""
        return max(self.estimate - self.low, self.high - self.estimate)

    def bounds(self, digits: int = 3, sign: bool = False) -> str:
        """``[low, high]``, e.g. ``[0.721, 0.763]`` (``sign``: ``[-0.008, +0.031]``)."""
        spec = f"{'+' if sign else ''}.{digits}f"
        return f"[{self.low:{spec}}, {self.high:{spec}}]"

    def signed(self, digits: int = 3) -> str:
        """A difference with its exact bounds: ``+0.012 [-0.008, +0.031]``."""
        return f"{self.estimate:+.{digits}f} {self.bounds(digits, sign=True)}"

    def shifted(self, offset: float, negate: bool = False) -> Interval:
        """The interval of ``offset + x`` (or ``offset - x``) for this interval's ``x``.

        Exact for the percentile and basic intervals (their bounds are quantiles of the
        replicates, and a monotone map of the replicates maps the quantiles)."""
        if negate:
            return Interval(
                offset - self.estimate,
                offset - self.high,
                offset - self.low,
                self.confidence,
                self.n_clusters,
                self.n_frames,
            )
        return Interval(
            offset + self.estimate,
            offset + self.low,
            offset + self.high,
            self.confidence,
            self.n_clusters,
            self.n_frames,
        )

    def __str__(self) -> str:
        if not self.defined:
            return f"{self.estimate:.3f} (no interval: {self.n_clusters} cluster)"
        return f"{self.estimate:.3f} ±{self.half_width:.3f}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN bounds become ``None``)."""
        return {
            "estimate": _json_float(self.estimate),
            "low": _json_float(self.low),
            "high": _json_float(self.high),
            "confidence": self.confidence,
            "n_clusters": self.n_clusters,
            "n_frames": self.n_frames,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interval:
        """Inverse of :meth:`to_dict`."""

        def num(key: str) -> float:
            value = data[key]
            return math.nan if value is None else float(value)

        return cls(
            num("estimate"),
            num("low"),
            num("high"),
            float(data["confidence"]),
            int(data["n_clusters"]),
            int(data["n_frames"]),
        )


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class ClusterTotals:
    """Per-cluster frame counts and hit counts of one eval set (one stratum).

    ``ids[c]`` is cluster ``c``'s id (sorted), ``frames[c]`` its number of frames and
    ``hits[k, c]`` the number of them classifier ``k`` got right.
    """

    ids: np.ndarray
    frames: np.ndarray
    hits: np.ndarray

    @property
    def n_clusters(self) -> int:
        return int(self.ids.size)

    @property
    def n_frames(self) -> int:
        return int(self.frames.sum())


def cluster_totals(clusters: Sequence[Any] | np.ndarray, *correct: np.ndarray) -> ClusterTotals:
    """Sum each correctness array (bool, one entry per frame) within each cluster.

    Every array must have one entry per frame of ``clusters``; a frame without a cluster id
    or an empty eval set is an error.
    """
    ids_in = np.asarray(clusters)
    if ids_in.ndim != 1 or ids_in.size == 0:
        raise ValueError(f"clusters must be a non-empty 1-d array, got shape {ids_in.shape}")
    if not correct:
        raise ValueError("cluster_totals needs at least one correctness array")
    rows = []
    for k, arr in enumerate(correct):
        a = np.asarray(arr)
        if a.shape != ids_in.shape:
            raise ValueError(
                f"correctness array {k} has shape {a.shape}, clusters {ids_in.shape}: one "
                "entry per eval frame"
            )
        if a.dtype != np.bool_:
            raise ValueError(f"correctness array {k} must be bool, got {a.dtype}")
        rows.append(a)
    ids, inverse = np.unique(ids_in, return_inverse=True)
    frames = np.bincount(inverse, minlength=ids.size).astype(np.float64)
    hits = np.stack([np.bincount(inverse, weights=a, minlength=ids.size) for a in rows])
    return ClusterTotals(ids, frames, hits)


@dataclass(frozen=True, eq=False)
class Bootstrap:
    """A statistic's estimate and its bootstrap replicates: intervals at any confidence (and
    one-sided bootstrap p-values) from one seeded draw, without resampling again.

    ``replicates`` is ``None`` when a stratum has fewer than two clusters (no interval)."""

    estimate: float
    replicates: np.ndarray | None
    n_clusters: int
    n_frames: int
    method: Method
    _rerun: Any = field(default=None, repr=False)

    def interval(self, confidence: float = 0.95) -> Interval:
        """The two-sided ``confidence`` interval from these replicates."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if self.replicates is None:
            low = high = math.nan
        else:
            low, high = self._rerun(confidence)
        return Interval(self.estimate, low, high, confidence, self.n_clusters, self.n_frames)

    def share_at_or_below(self, threshold: float) -> float:
        """The share of replicates at or below ``threshold``: the one-sided bootstrap p-value
        of "the statistic is at most ``threshold``" against "it is above" (NaN without
        replicates). A percentile interval at confidence ``1 - 2 p`` has its lower bound at
        about ``threshold``."""
        if self.replicates is None:
            return math.nan
        return float(np.mean(self.replicates <= threshold))


def _bootstrap(
    strata: Sequence[ClusterTotals],
    statistic: Any,
    estimate: float,
    n_resamples: int,
    seed: int,
    method: Method,
) -> Bootstrap:
    """``scipy.stats.bootstrap`` over each stratum's cluster indices; ``statistic`` takes one
    resampled index array per stratum (last axis: the draw) and returns the replicate."""
    from scipy import stats

    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n_clusters = sum(s.n_clusters for s in strata)
    n_frames = sum(s.n_frames for s in strata)
    if any(s.n_clusters < 2 for s in strata):
        return Bootstrap(estimate, None, n_clusters, n_frames, method)
    samples = tuple(np.arange(s.n_clusters) for s in strata)
    batch = max(1, MAX_DRAWN // n_clusters)
    common = {"batch": batch, "vectorized": True, "method": method}
    result = stats.bootstrap(
        samples, statistic, n_resamples=n_resamples, rng=np.random.default_rng(seed), **common
    )

    def rerun(confidence: float) -> tuple[float, float]:
        ci = stats.bootstrap(
            samples,
            statistic,
            n_resamples=0,
            bootstrap_result=result,
            confidence_level=confidence,
            **common,
        ).confidence_interval
        return float(ci.low), float(ci.high)

    return Bootstrap(
        estimate, np.asarray(result.bootstrap_distribution), n_clusters, n_frames, method, rerun
    )


def accuracy_bootstrap(
    correct: np.ndarray,
    clusters: Sequence[Any] | np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: Method = "percentile",
) -> Bootstrap:
    """Accuracy ``sum_c h_c / sum_c n_c`` and its cluster-bootstrap replicates.

    ``correct[k]`` says whether frame ``k`` was classified right and ``clusters[k]`` is its
    cluster id. Seeded: the same inputs give the same replicates.
    """
    totals = cluster_totals(clusters, correct)
    hits, frames = totals.hits[0], totals.frames

    def ratio(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return hits[idx].sum(axis=axis) / frames[idx].sum(axis=axis)

    estimate = float(hits.sum() / frames.sum())
    return _bootstrap([totals], ratio, estimate, n_resamples, seed, method)


def accuracy_interval(
    correct: np.ndarray,
    clusters: Sequence[Any] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: Method = "percentile",
) -> Interval:
    """Accuracy with its ``confidence`` cluster-bootstrap interval
    (:func:`accuracy_bootstrap`)."""
    _check_confidence(confidence)
    boot = accuracy_bootstrap(correct, clusters, n_resamples=n_resamples, seed=seed, method=method)
    return boot.interval(confidence)


def paired_difference_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    clusters: Sequence[Any] | np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: Method = "percentile",
) -> Bootstrap:
    r"""Accuracy of ``a`` minus accuracy of ``b`` on the *same* frames, and its replicates.

    .. math:: \hat\Delta = \frac{\sum_c h^a_c - \sum_c h^b_c}{\sum_c n_c}

    Each replicate draws the clusters once and scores both models on that draw, so what the
    two models share (which streamers happen to be hard) cancels: the interval is much
    narrower than one built from two independent accuracy intervals. ``correct_a[k]`` and
    ``correct_b[k]`` must refer to the same frame ``k``.
    """
    totals = cluster_totals(clusters, correct_a, correct_b)
    diff, frames = totals.hits[0] - totals.hits[1], totals.frames

    def delta(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return diff[idx].sum(axis=axis) / frames[idx].sum(axis=axis)

    estimate = float(diff.sum() / frames.sum())
    return _bootstrap([totals], delta, estimate, n_resamples, seed, method)


def paired_difference_interval(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    clusters: Sequence[Any] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: Method = "percentile",
) -> Interval:
    """``acc(a) - acc(b)`` on the same frames with its ``confidence`` paired interval
    (:func:`paired_difference_bootstrap`)."""
    _check_confidence(confidence)
    boot = paired_difference_bootstrap(
        correct_a, correct_b, clusters, n_resamples=n_resamples, seed=seed, method=method
    )
    return boot.interval(confidence)


def average_accuracy_interval(
    samples: Sequence[tuple[np.ndarray, Sequence[Any] | np.ndarray]],
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: Method = "percentile",
) -> Interval:
    r"""The mean of several eval sets' accuracies, with its stratified cluster-bootstrap
    interval.

    .. math:: \bar a = \frac{1}{T} \sum_{j=1}^{T} \hat a_j

    ``samples[j]`` is ``(correct, clusters)`` of eval set ``j``; each replicate resamples every
    eval set's clusters on their own (one stratum per eval set) and averages the replicate
    accuracies. Used for the average accuracy ``ACC_T`` of a row of R and the average
    next-period accuracy. ``n_clusters``/``n_frames`` of the result are totals over the sets.
    """
    _check_confidence(confidence)
    if not samples:
        raise ValueError("average_accuracy_interval needs at least one eval set")
    strata = [cluster_totals(clusters, correct) for correct, clusters in samples]

    def mean_ratio(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        accs = [
            s.hits[0][i].sum(axis=axis) / s.frames[i].sum(axis=axis)
            for s, i in zip(strata, idx, strict=True)
        ]
        return np.mean(accs, axis=0)

    estimate = float(np.mean([s.hits[0].sum() / s.frames.sum() for s in strata]))
    boot = _bootstrap(strata, mean_ratio, estimate, n_resamples, seed, method)
    return boot.interval(confidence)


def forgetting_interval(
    samples: Sequence[tuple[np.ndarray, Sequence[Any] | np.ndarray]],
    best: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: Method = "percentile",
) -> Interval:
    r"""Chaudhry et al. 2018's average forgetting of a model, with its interval.

    .. math:: F = \frac{1}{T-1} \sum_{j=1}^{T-1} \left(b_j - \hat a_j\right)
              = \bar b - \frac{1}{T-1} \sum_{j=1}^{T-1} \hat a_j

    ``samples[j]`` is ``(correct, clusters)`` of the model on earlier period ``j`` and
    ``best[j]`` is ``b_j = max_{l<T} R_{l,j}``, the lineage's best earlier accuracy on it.
    The ``b_j`` are taken *as logged*, as constants: only the model's own accuracies are
    resampled (the earlier models' per-frame results may no longer exist, and their own noise
    would only widen the interval). So the interval is
    ``mean(b) - [average accuracy interval]`` (exact for the percentile and basic intervals),
    and its upper bound is what the gate checks.
    """
    _check_confidence(confidence)
    if len(samples) != len(best):
        raise ValueError(f"{len(samples)} eval sets but {len(best)} best earlier accuracies")
    if not samples:
        return Interval(0.0, 0.0, 0.0, confidence, 0, 0)
    acc = average_accuracy_interval(
        samples, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method
    )
    return acc.shifted(float(np.mean(best)), negate=True)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
