"""Compatibility matrix and backfill ordering: hand-computed cases on tiny vectors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cssl_core.evaluation.backfill_order import (
    backfill_curve,
    density_uncertainty,
    priority_order,
    random_order,
)
from cssl_core.evaluation.compatibility import (
    CompatibilityMatrix,
    instance_top1,
    plot_compatibility_matrix,
    retrieval_quality,
)

S = 1 / math.sqrt(2)
# Gallery: g0 (1,0) a, g1 (0,1) b, g2 (1,1)/sqrt2 a, g3 (-1,0) b.
GALLERY = np.array([[1, 0], [0, 1], [S, S], [-1, 0]], dtype=np.float32)
GALLERY_LABELS = ["a", "b", "a", "b"]
# q0 ranks g0 g2 g1 g3 (rel 1 1 0 0); q1 ranks g1 g2 g0 g3 (rel 0 1 1 0); q2 ranks g1 g2 then
# the tie g0 = g3 = 0 in gallery order (rel 1 0 0 1); q3 is unlabelled; q4's category "c" has
# no gallery item.
QUERIES = np.array([[1, 0.1], [0.1, 1], [0, 1], [1, 1], [1, -1]], dtype=np.float32)
QUERY_LABELS = ["a", "a", "b", None, "c"]


def test_retrieval_quality_hand_computed():
    q = retrieval_quality(QUERIES, GALLERY, QUERY_LABELS, GALLERY_LABELS, k=10)
    assert q.queries == 4  # the unlabelled query is skipped
    assert q.top1 == pytest.approx(2 / 4)
    # AP@10: q0 (1/1 + 2/2)/2 = 1; q1 (1/2 + 2/3)/2 = 7/12; q2 (1/1 + 2/4)/2 = 3/4; q4 0.
    assert q.map_at_k == pytest.approx((1 + 7 / 12 + 3 / 4 + 0) / 4)


def test_map_at_k_normaliser_and_cutoff():
    # AP@2 divides by min(2, R_q) = 2: q0 (1 + 1)/2; q1 (1/2)/2; q2 (1)/2; q4 0.
    q = retrieval_quality(QUERIES, GALLERY, QUERY_LABELS, GALLERY_LABELS, k=2)
    assert q.map_at_k == pytest.approx((1 + 0.25 + 0.5 + 0) / 4)
    # k larger than the gallery ranks the whole gallery: same as k=10.
    big = retrieval_quality(QUERIES, GALLERY, QUERY_LABELS, GALLERY_LABELS, k=100)
    assert big.map_at_k == pytest.approx((1 + 7 / 12 + 3 / 4) / 4)


def test_ties_keep_gallery_order():
    # q2 = (0, 1): g0 and g3 both score 0. Gallery order puts g0 (a, not relevant) first, so
    # AP@3 sees rel 1 0 0 -> 1/2; the other order would give (1 + 2/3)/2.
    q = retrieval_quality(QUERIES[2:3], GALLERY, ["b"], GALLERY_LABELS, k=3)
    assert q.map_at_k == pytest.approx(0.5)


def test_unlabelled_gallery_items_are_never_relevant():
    gallery = np.array([[1, 0], [0, 1]], dtype=np.float32)
    q = retrieval_quality(np.array([[1, 0]]), gallery, ["a"], [None, "a"], k=10)
    assert q.top1 == 0.0  # the nearest item has no category
    assert q.map_at_k == pytest.approx(0.5)  # the relevant item sits at rank 2, R_q = 1
    with pytest.raises(ValueError, match="no query has a category"):
        retrieval_quality(np.array([[1, 0]]), gallery, [None], [None, "a"])


def test_integer_codes_and_dimension_mismatch():
    codes = retrieval_quality(QUERIES, GALLERY, np.array([0, 0, 1, -1, 2]), np.array([0, 1, 0, 1]))
    strings = retrieval_quality(QUERIES, GALLERY, QUERY_LABELS, GALLERY_LABELS)
    assert codes == strings
    with pytest.raises(ValueError, match="different spaces"):
        retrieval_quality(np.ones((2, 3)), GALLERY, ["a", "b"], GALLERY_LABELS)


# Two queries and two gallery items, labels a, b. Model A maps both to the axes one way,
# model B the other way round, so each model retrieves perfectly in its own space and every
# B query's nearest A item is the wrong one.
A_Q = np.array([[1, 0.2], [0.2, 1]])
A_G = np.array([[1, 0], [0, 1]])
B_Q = A_Q[:, ::-1].copy()
B_G = A_G[:, ::-1].copy()
LABELS = ["a", "b"]


def _matrix() -> CompatibilityMatrix:
    c_q, c_g = np.eye(3)[:2] + 0.1, np.eye(3)[:2]
    return CompatibilityMatrix.compute(
        {"A": A_Q, "A2": 2 * A_Q, "B": B_Q, "C": c_q},
        {"A": A_G, "A2": 2 * A_G, "B": B_G, "C": c_g},
        LABELS,
        LABELS,
        k=10,
    )


def test_instance_top1_hand_computed():
    old = GALLERY  # four frames as the old model embeds them
    assert instance_top1(old, old * 3.0) == 1.0  # the same space (scale does not matter)
    # A rotation by 90 degrees: frame 0 (1,0) lands on (0,1), frame 1's old embedding, and so
    # on; only frame 2 ((1,1) -> (-1,1)) and frame 3 ((-1,0) -> (0,-1)) are checked by hand:
    rotated = old @ np.array([[0, 1], [-1, 0]], dtype=np.float32)
    # frame 0: cos to own (1,0) = 0, to g1 (0,1) = 1 -> missed; frame 1 (0,1) -> (-1,0): own
    # 0, g3 = 1 -> missed; frame 2 -> (-S,S): own 0, g1 = S -> missed; frame 3 -> (0,-1): own
    # 0, every other <= 0 (g0 0, g1 -1, g2 -S) -> found (a tie with g0 counts as found).
    assert instance_top1(rotated, old) == pytest.approx(0.25)
    # Categories survive what instances do not: frames 0 and 2 (both "a") swapped.
    swapped = old[[2, 1, 0, 3]]
    assert instance_top1(swapped, old) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same frames in the same space"):
        instance_top1(old[:3], old)


def test_matrix_cells_and_not_comparable_pairs():
    m = _matrix()
    assert m.value("A", "A") == 1.0 and m.value("B", "B") == 1.0
    assert m.value("B", "A") == 0.0 and m.value("A", "B") == 0.0
    # Each query's only relevant item is at rank 2: AP = 1/2.
    assert m.value("B", "A", "map") == pytest.approx(0.5)
    assert m.value("A2", "A") == 1.0  # a rescaled model retrieves the same (cosine)
    cell = m.entry("C", "A")
    assert math.isnan(cell.top1) and not cell.comparable
    assert "D=3" in cell.reason and "D=2" in cell.reason
    assert m.entry("C", "C").comparable and m.value("C", "C") == 1.0


def test_cl2r_criteria():
    m = _matrix()
    assert m.is_compatible("A2", "A")  # equal to M[A][A]: compatible under >=
    assert not m.is_compatible("B", "A")
    assert not m.is_compatible("C", "A")  # not comparable is not compatible
    # Pairs (A2, A) yes, (B, A) no, (B, A2) no.
    assert m.average_compatibility(["A", "A2", "B"]) == pytest.approx(1 / 3)
    # AM over [A, B]: M[A][A] = 1, M[B][A] = 0, M[B][B] = 1.
    assert m.average_multimodel_accuracy(["A", "B"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least two models"):
        m.average_compatibility(["A"])


def test_matrix_round_trip_markdown_and_plot(tmp_path):
    m = _matrix()
    again = CompatibilityMatrix.from_dict(json.loads(json.dumps(m.to_dict())))
    np.testing.assert_array_equal(again.values("top1"), m.values("top1"))
    np.testing.assert_array_equal(again.values("map"), m.values("map"))
    assert again.entry("C", "B").reason == m.entry("C", "B").reason
    md = m.to_markdown()
    assert "| B | 0.000 / 0.500 |" in md and "n/a" in md and "n/a M[A][C]:" in md
    path = plot_compatibility_matrix(m, tmp_path / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="without a reason"):
        CompatibilityMatrix(["A"], ["A"], [[None]], [[None]], k=10)


def test_density_uncertainty_hand_computed():
    ref = np.array([[1, 0], [0, 1], [S, S]])
    x = np.array([[1, 0], [-1, 0]])
    # Row 0 is reference 0 itself: its neighbours are (1,1)/sqrt2 (cos S) then (0,1) (cos 0).
    u1 = density_uncertainty(x, ref, k=1, exclude=[0, -1])
    assert u1 == pytest.approx([1 - S, 1.0], abs=1e-6)
    u2 = density_uncertainty(x, ref, k=2, exclude=[0, -1])
    assert u2 == pytest.approx([1 - S / 2, 1 - (0 - S) / 2], abs=1e-6)


def test_priority_and_random_orders():
    assert priority_order([0.1, 0.5, 0.5, 0.2]).tolist() == [1, 2, 3, 0]
    r = random_order(50, seed=3)
    assert sorted(r.tolist()) == list(range(50))
    assert r.tolist() == random_order(50, seed=3).tolist()
    assert r.tolist() != random_order(50, seed=4).tolist()


def test_backfill_curve_hand_computed():
    # One query (a); gallery row 0 is a, row 1 is b. Old space: the query scores row 0 at 0
    # and row 1 at 0.8 (wrong first). New space: row 0 at 1, row 1 at 0.6 (right first).
    q_new = q_old = np.array([[1.0, 0.0]])
    g_old = np.array([[0.0, 1.0], [0.8, 0.6]])
    g_new = np.array([[1.0, 0.0], [0.6, 0.8]])
    args = (q_new, q_old, g_new, g_old, ["a"], ["a", "b"], (0.0, 0.5, 1.0))
    good = backfill_curve([0, 1], *args)
    bad = backfill_curve([1, 0], *args)
    assert good.top1 == (0.0, 1.0, 1.0)  # row 0 new (score 1) beats row 1 old (0.8)
    assert bad.top1 == (0.0, 0.0, 1.0)  # row 1 new (0.6) beats row 0 old (0)
    assert good.map_at_k == (0.5, 1.0, 1.0)
    assert good.area("top1") == pytest.approx(0.75) and bad.area("top1") == pytest.approx(0.25)
    assert good.fraction_to_reach(0.95, "top1") == 0.5
    assert bad.fraction_to_reach(0.95, "top1") == 1.0
    with pytest.raises(ValueError, match="permutation"):
        backfill_curve([0, 0], *args)
