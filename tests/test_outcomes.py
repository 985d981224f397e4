"""Per-frame outcomes: validation, pairing, the Parquet round trip, the majority baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cssl_core.evaluation.outcomes import (
    FrameOutcomes,
    FramesDiffer,
    PeriodScores,
    majority_class,
    majority_outcomes,
)


def outcomes(knn: list[bool], ids: list[str] | None = None) -> FrameOutcomes:
    n = len(knn)
    ids = ids or [f"f{k}" for k in range(n)]
    return FrameOutcomes(
        tuple(ids),
        tuple(f"s{k % 3}" for k in range(n)),
        tuple("pong" if k % 2 else "qbert" for k in range(n)),
        np.array(knn),
        np.array([not v for v in knn]),
    )


def test_outcomes_are_checked_and_read_only():
    o = outcomes([True, False, True, True])
    assert o.accuracy("knn") == 0.75 and o.accuracy("linear") == 0.25 and o.n_clusters == 3
    with pytest.raises(ValueError):
        o.knn[0] = False
    with pytest.raises(ValueError, match="metric must be one of knn, linear"):
        o.correct("top5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame ids repeat"):
        outcomes([True, False], ids=["a", "a"])
    with pytest.raises(ValueError, match="bool array of 2"):
        FrameOutcomes(("a", "b"), ("s", "s"), ("x", "y"), np.array([1, 0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="at least one eval frame"):
        FrameOutcomes((), (), (), np.array([], bool), np.array([], bool))


def test_pairing_needs_the_same_frames():
    a = outcomes([True, False, True, True])
    b = outcomes([True, True, True, False])
    assert a.difference(b, "knn", n_resamples=50).estimate == 0.0
    other = outcomes([True, False, True, True], ids=["f0", "f1", "f2", "zz"])
    with pytest.raises(FramesDiffer, match="different eval frames .4 vs 4; 1 and 1 not shared"):
        a.difference(other, "knn")


def test_parquet_round_trip(tmp_path: Path):
    o = outcomes([True, False, False, True, True])
    pq.write_table(o.to_table(), tmp_path / "p01.parquet")
    back = FrameOutcomes.from_table(pq.read_table(tmp_path / "p01.parquet"))
    assert back.frame_ids == o.frame_ids and back.clusters == o.clusters
    assert back.labels == o.labels
    assert np.array_equal(back.knn, o.knn) and np.array_equal(back.linear, o.linear)
    with pytest.raises(ValueError, match="lacks column.*linear"):
        FrameOutcomes.from_table(o.to_table().drop_columns(["linear"]))


def test_scores_compare_by_accuracy_and_bootstrap_their_frames():
    o = outcomes([True, False, True, True, False, True])
    assert PeriodScores(0.5, 0.5, o) == PeriodScores(0.5, 0.5)
    iv = PeriodScores(o.accuracy("knn"), o.accuracy("linear"), o).interval("knn", n_resamples=50)
    assert iv.estimate == pytest.approx(4 / 6) and iv.n_clusters == 3
    with pytest.raises(ValueError, match="no per-frame outcomes"):
        PeriodScores(0.5, 0.5).interval("knn")


def test_majority_class_and_its_outcomes():
    assert majority_class(["pong", None, "qbert", "pong", None]) == "pong"
    assert majority_class(["qbert", "pong"]) == "pong"  # a tie goes to the first name
    with pytest.raises(ValueError, match="no labelled reference"):
        majority_class([None, None])
    o = majority_outcomes(["pong", "pong", "qbert"], ["qbert", "pong", "pong"], ["a", "b", "c"],
                          ["s1", "s2", "s2"])  # fmt: skip
    assert o.knn.tolist() == [False, True, True] and o.linear.tolist() == o.knn.tolist()
