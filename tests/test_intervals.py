"""The cluster bootstrap: exact cases enumerated by hand, and the properties it must have."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from cssl_core.evaluation.intervals import (
    Interval,
    accuracy_bootstrap,
    accuracy_interval,
    average_accuracy_interval,
    cluster_totals,
    forgetting_interval,
    paired_difference_bootstrap,
    paired_difference_interval,
)

MANY = 20_000  # resamples where a test compares with an exact bootstrap distribution


def frames_of(clusters: dict[str, tuple[int, int]]) -> tuple[np.ndarray, list[str]]:
    """``{cluster: (hits, frames)}`` -> per-frame correctness and cluster ids."""
    correct: list[bool] = []
    ids: list[str] = []
    for name, (hits, n) in clusters.items():
        correct += [True] * hits + [False] * (n - hits)
        ids += [name] * n
    return np.array(correct), ids


def exact_percentiles(
    clusters: dict[str, tuple[int, int]], confidence: float
) -> tuple[float, float, float]:
    """The exact bootstrap distribution by enumerating every ordered draw of C clusters out of
    C (each of the C**C draws equally likely), its two percentile bounds, and the smallest
    distance from either cut to a jump of the CDF (how safe a Monte Carlo comparison is)."""
    totals = list(clusters.values())
    c = len(totals)
    values = sorted(
        sum(totals[k][0] for k in draw) / sum(totals[k][1] for k in draw)
        for draw in itertools.product(range(c), repeat=c)
    )
    atoms = sorted(set(values))
    cdf = np.cumsum([values.count(a) / len(values) for a in atoms])
    alpha = (1 - confidence) / 2

    def quantile(q: float) -> float:
        return atoms[int(np.searchsorted(cdf, q))]

    margin = float(min(min(abs(cdf - alpha)), min(abs(cdf - (1 - alpha)))))
    return quantile(alpha), quantile(1 - alpha), margin


# -- hand-computed cases -------------------------------------------------------------------


def test_two_clusters_by_hand():
    """A streamer with 1 frame, right; one with 3 frames, all wrong: accuracy 1/4.

    The 4 equally likely draws of two clusters: AA -> 1/1 = 1, AB and BA -> 1/4, BB -> 0/6 = 0.
    So P(0) = 1/4, P(1/4) = 1/2, P(1) = 1/4: the 90% interval (5th and 95th percentiles) is
    [0, 1] and the 40% interval (30th, 70th) is [1/4, 1/4]. The frame bootstrap of the same
    four frames is the Binomial(4, 1/4)/4 distribution instead: P(0) = 0.316, so its 30th
    percentile is 0, not 1/4 -- resampling frames is a different (and here wrong) model.
    """
    correct, ids = frames_of({"A": (1, 1), "B": (0, 3)})
    wide = accuracy_interval(correct, ids, confidence=0.9, n_resamples=MANY)
    assert (wide.estimate, wide.low, wide.high) == (0.25, 0.0, 1.0)
    assert (wide.n_clusters, wide.n_frames, wide.confidence) == (2, 4, 0.9)
    narrow = accuracy_interval(correct, ids, confidence=0.4, n_resamples=MANY)
    assert (narrow.low, narrow.high) == (0.25, 0.25)
    per_frame = accuracy_interval(correct, ["a", "b", "c", "d"], confidence=0.4, n_resamples=MANY)
    assert (per_frame.low, per_frame.high) == (0.0, 0.25)


@pytest.mark.parametrize(
    "clusters",
    [
        {"a": (3, 4), "b": (0, 2), "c": (5, 5), "d": (1, 3)},
        {"a": (12, 20), "b": (2, 8), "c": (9, 10), "d": (0, 5)},
    ],
)
def test_percentile_interval_matches_the_enumerated_bootstrap_distribution(clusters):
    low, high, margin = exact_percentiles(clusters, 0.95)
    assert margin > 0.004  # the cuts are far enough from a jump for 20,000 resamples
    correct, ids = frames_of(clusters)
    got = accuracy_interval(correct, ids, n_resamples=MANY)
    hits = sum(h for h, _ in clusters.values())
    frames = sum(n for _, n in clusters.values())
    assert got.estimate == hits / frames
    assert (got.low, got.high) == (low, high)


# -- properties ------------------------------------------------------------------------------


def test_one_cluster_per_frame_is_the_frame_bootstrap():
    rng = np.random.default_rng(1)
    correct = rng.random(400) < 0.75
    ids = [f"f{k:04d}" for k in range(400)]  # sorted ids: cluster k is frame k
    got = accuracy_interval(correct, ids, n_resamples=4000, seed=7)
    frame = stats.bootstrap(
        (correct.astype(float),),
        np.mean,
        n_resamples=4000,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(7),
    ).confidence_interval
    assert got.low == pytest.approx(frame.low, abs=1e-12)
    assert got.high == pytest.approx(frame.high, abs=1e-12)
    # and close to the normal approximation p +- 1.96 sqrt(p (1 - p) / n)
    p = correct.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / 400)
    assert got.low == pytest.approx(p - half, abs=0.006)
    assert got.high == pytest.approx(p + half, abs=0.006)


def test_fewer_clusters_of_alike_frames_give_wider_intervals():
    """240 frames, 2/3 right; each of 6 coarse clusters is all right or all wrong. Cutting
    them into 24 or 240 clusters claims more independent evidence than there is."""
    correct = np.repeat([True, True, True, True, False, False], 40)
    widths = []
    for size in (40, 10, 1):
        ids = [f"c{k // size:03d}" for k in range(240)]
        iv = accuracy_interval(correct, ids, n_resamples=4000)
        assert iv.estimate == pytest.approx(2 / 3)
        widths.append(iv.high - iv.low)
    assert widths[0] > widths[1] > widths[2] > 0


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(2)
    correct = rng.random(300) < 0.6
    ids = [f"s{k % 12}" for k in range(300)]
    iv = paired_difference_interval(correct, correct, ids, n_resamples=500)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0)
    assert iv.signed() == "+0.000 [+0.000, +0.000]"


def test_paired_difference_is_antisymmetric_and_narrower_than_either_accuracy():
    """Both models find the same streamers hard (they share the cluster effect) and b is
    a little worse: pairing cancels what they share."""
    rng = np.random.default_rng(3)
    ids = [f"s{k % 16:02d}" for k in range(800)]
    hardness = rng.uniform(0.2, 0.95, 16)
    p = np.array([hardness[int(i[1:])] for i in ids])
    u = rng.random(800)
    a, b = u < p, u < p - 0.05
    ab = paired_difference_interval(a, b, ids, n_resamples=2000, seed=4)
    ba = paired_difference_interval(b, a, ids, n_resamples=2000, seed=4)
    assert ab.estimate == pytest.approx(-ba.estimate)
    assert (ab.low, ab.high) == pytest.approx((-ba.high, -ba.low))
    assert ab.estimate == pytest.approx(a.mean() - b.mean())
    width = ab.high - ab.low
    for single in (a, b):
        acc = accuracy_interval(single, ids, n_resamples=2000, seed=4)
        assert width < (acc.high - acc.low) / 2
    assert ab.low > 0  # b never gets a frame right that a missed


def test_a_single_cluster_gives_no_interval_rather_than_a_certain_one():
    iv = accuracy_interval(np.array([True, False, True]), ["only"] * 3, n_resamples=100)
    assert iv.estimate == pytest.approx(2 / 3)
    assert math.isnan(iv.low) and math.isnan(iv.high) and not iv.defined
    assert str(iv) == "0.667 (no interval: 1 cluster)"
    assert Interval.from_dict(iv.to_dict()).to_dict() == iv.to_dict()


def test_seeded_and_rounded_for_display():
    correct, ids = frames_of({"a": (30, 40), "b": (20, 40), "c": (35, 40), "d": (10, 40)})
    one = accuracy_interval(correct, ids, n_resamples=300, seed=5)
    assert accuracy_interval(correct, ids, n_resamples=300, seed=5) == one
    iv = Interval(0.742, 0.721, 0.763, 0.95, 8, 400)
    assert str(iv) == "0.742 ±0.021"
    assert iv.bounds() == "[0.721, 0.763]"
    assert str(Interval(0.742, 0.730, 0.770, 0.95, 8, 400)) == "0.742 ±0.028"  # covers both
    assert Interval(0.012, -0.008, 0.031, 0.95, 8, 400).signed() == "+0.012 [-0.008, +0.031]"
    assert Interval.from_dict(iv.to_dict()) == iv


def test_average_of_one_set_is_its_accuracy_and_forgetting_mirrors_it():
    rng = np.random.default_rng(6)
    sets = []
    for n, p in ((200, 0.8), (120, 0.5), (160, 0.65)):
        sets.append((rng.random(n) < p, [f"s{k % 10}" for k in range(n)]))
    single = average_accuracy_interval(sets[:1], n_resamples=500, seed=1)
    assert single == accuracy_interval(*sets[0], n_resamples=500, seed=1)

    avg = average_accuracy_interval(sets, n_resamples=500, seed=1)
    assert avg.estimate == pytest.approx(np.mean([c.mean() for c, _ in sets]))
    assert (avg.n_clusters, avg.n_frames) == (30, 480)
    best = [0.9, 0.7, 0.7]
    f = forgetting_interval(sets, best, n_resamples=500, seed=1)
    # F = mean(b) - mean(a): the interval is the average-accuracy interval mirrored
    assert f.estimate == pytest.approx(np.mean(best) - avg.estimate)
    assert (f.low, f.high) == pytest.approx((np.mean(best) - avg.high, np.mean(best) - avg.low))
    assert forgetting_interval([], []) == Interval(0.0, 0.0, 0.0, 0.95, 0, 0)
    with pytest.raises(ValueError, match="2 best earlier"):
        forgetting_interval(sets, best[:2])


def test_averaging_strata_narrows_the_interval():
    rng = np.random.default_rng(8)
    sets = [(rng.random(200) < 0.7, [f"s{k % 10}" for k in range(200)]) for _ in range(4)]
    one = accuracy_interval(*sets[0], n_resamples=2000)
    avg = average_accuracy_interval(sets, n_resamples=2000)
    assert avg.high - avg.low < one.high - one.low


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="non-empty"):
        cluster_totals([], np.array([], dtype=bool))
    with pytest.raises(ValueError, match="one entry per eval frame"):
        accuracy_interval(np.array([True, False]), ["a"])
    with pytest.raises(ValueError, match="must be bool"):
        accuracy_interval(np.array([1, 0]), ["a", "b"])
    with pytest.raises(ValueError, match="confidence"):
        accuracy_interval(np.array([True, False]), ["a", "b"], confidence=95)


def test_one_draw_serves_every_confidence_and_gives_p_values():
    rng = np.random.default_rng(9)
    ids = [f"s{k % 10}" for k in range(300)]
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.6
    boot = paired_difference_bootstrap(a, b, ids, n_resamples=1000, seed=3)
    for confidence in (0.9, 0.95, 0.99):
        assert boot.interval(confidence) == paired_difference_interval(
            a, b, ids, confidence=confidence, n_resamples=1000, seed=3
        )
    wide, narrow = boot.interval(0.99), boot.interval(0.9)
    assert wide.low < narrow.low < narrow.high < wide.high
    # the lower bound of the (1 - 2p) interval sits where a share p of replicates lies below
    p = boot.share_at_or_below(narrow.low)
    assert p == pytest.approx(0.05, abs=0.002)
    assert boot.share_at_or_below(-1.0) == 0.0 and boot.share_at_or_below(1.0) == 1.0
    lonely = accuracy_bootstrap(np.array([True, True]), ["x", "x"])
    assert lonely.replicates is None and math.isnan(lonely.share_at_or_below(0.5))
