"""AccuracyMatrix metrics against small accuracy matrices computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cssl_core.evaluation.metrics import AccuracyMatrix, MissingAccuracy

PERIODS = ["p1", "p2", "p3"]

# R[i][j]: rows = trained through, columns = eval set.
#          p1    p2    p3
# p1    [ 0.8,  0.1,  0.2 ]
# p2    [ 0.9,  0.7,  0.3 ]   <- p1 peaks AFTER its own period (0.9 > diagonal 0.8)
# p3    [ 0.6,  0.5,  0.9 ]
FULL = [
    [0.8, 0.1, 0.2],
    [0.9, 0.7, 0.3],
    [0.6, 0.5, 0.9],
]


def full() -> AccuracyMatrix:
    return AccuracyMatrix(PERIODS, FULL)


def test_average_accuracy_by_hand() -> None:
    R = full()
    # ACC_3 = (0.6 + 0.5 + 0.9) / 3 = 2.0 / 3
    assert R.average_accuracy() == pytest.approx(2.0 / 3, abs=1e-12)
    # ACC_2 = (0.9 + 0.7) / 2 = 0.8 ; ACC_1 = 0.8
    assert R.average_accuracy("p2") == pytest.approx(0.8, abs=1e-12)
    assert R.average_accuracy(0) == pytest.approx(0.8, abs=1e-12)


def test_forgetting_uses_best_earlier_accuracy_bwt_uses_diagonal() -> None:
    R = full()
    # f_p1 = max(R[p1][p1]=0.8, R[p2][p1]=0.9) - R[p3][p1] = 0.9 - 0.6 = 0.3
    # f_p2 = max(R[p2][p2]=0.7)                - R[p3][p2] = 0.7 - 0.5 = 0.2
    per = R.per_period_forgetting()
    assert list(per) == ["p1", "p2"]
    assert per["p1"] == pytest.approx(0.3, abs=1e-12)
    assert per["p2"] == pytest.approx(0.2, abs=1e-12)
    # F_3 = (0.3 + 0.2) / 2 = 0.25
    assert R.forgetting() == pytest.approx(0.25, abs=1e-12)
    # BWT_3 = ((0.6 - 0.8) + (0.5 - 0.7)) / 2 = -0.2  (not -0.25: BWT reads the diagonal)
    assert R.bwt() == pytest.approx(-0.2, abs=1e-12)


def test_best_earlier_and_next_period_accuracy_by_hand() -> None:
    R = full()
    # b_p1 = max(R[p1][p1], R[p2][p1]) = max(0.8, 0.9) = 0.9 ; b_p2 = R[p2][p2] = 0.7
    assert R.best_earlier() == pytest.approx({"p1": 0.9, "p2": 0.7}, abs=1e-12)
    assert R.best_earlier("p2") == pytest.approx({"p1": 0.8}, abs=1e-12)
    assert R.best_earlier("p1") == {}
    # N_p2 = R[p1][p2] = 0.1 ; N_p3 = R[p2][p3] = 0.3 ; average (0.1 + 0.3) / 2 = 0.2
    assert R.next_period_accuracy() == pytest.approx({"p2": 0.1, "p3": 0.3}, abs=1e-12)
    assert R.average_next_period_accuracy() == pytest.approx(0.2, abs=1e-12)
    assert R.average_next_period_accuracy("p2") == pytest.approx(0.1, abs=1e-12)
    # FWT is the average next-period accuracy above the blind baseline
    baseline = [0.0, 0.05, 0.15]
    assert R.fwt(baseline) == pytest.approx(0.2 - 0.1, abs=1e-12)
    with pytest.raises(MissingAccuracy, match="at least two periods"):
        R.average_next_period_accuracy("p1")
    gap = AccuracyMatrix(PERIODS, [[0.8, None, None], [0.9, 0.7, 0.3], [0.6, 0.5, 0.9]])
    with pytest.raises(MissingAccuracy, match=r"next_period_accuracy needs R\[p1\]\[p2\]"):
        gap.next_period_accuracy()


def test_negative_forgetting_and_positive_bwt_when_an_old_period_improves() -> None:
    R = full()
    # After p2: f_p1 = R[p1][p1] - R[p2][p1] = 0.8 - 0.9 = -0.1 ; BWT_2 = 0.9 - 0.8 = +0.1
    assert R.forgetting("p2") == pytest.approx(-0.1, abs=1e-12)
    assert R.bwt("p2") == pytest.approx(0.1, abs=1e-12)


def test_fwt_by_hand_with_sequence_and_mapping_baselines() -> None:
    R = full()
    baseline = [0.1, 0.2, 0.25]
    # FWT_3 = ((R[p1][p2] - b2) + (R[p2][p3] - b3)) / 2 = ((0.1 - 0.2) + (0.3 - 0.25)) / 2
    #       = (-0.1 + 0.05) / 2 = -0.025
    assert R.fwt(baseline) == pytest.approx(-0.025, abs=1e-12)
    # b_1 is never read, so a mapping may leave it out.
    assert R.fwt({"p2": 0.2, "p3": 0.25}) == pytest.approx(-0.025, abs=1e-12)
    # FWT_2 = R[p1][p2] - b2 = 0.1 - 0.2 = -0.1
    assert R.fwt(baseline, "p2") == pytest.approx(-0.1, abs=1e-12)
    with pytest.raises(ValueError, match="one per period"):
        R.fwt([0.1, 0.2])
    with pytest.raises(MissingAccuracy, match="p3"):
        R.fwt({"p2": 0.2})


def test_fwt_refuses_a_nan_or_non_finite_baseline_it_reads() -> None:
    R = full()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(MissingAccuracy, match=r"fwt: baseline for period 'p3' is"):
            R.fwt([0.1, 0.2, bad])
        with pytest.raises(MissingAccuracy, match=r"fwt: baseline for period 'p2' is"):
            R.fwt({"p2": bad, "p3": 0.25})
    # b_1 is never read: NaN there is fine (that is how a mapping's missing b_1 is filled).
    assert R.fwt([float("nan"), 0.2, 0.25]) == pytest.approx(-0.025, abs=1e-12)


def test_first_period_has_no_forgetting_or_transfer() -> None:
    R = AccuracyMatrix(PERIODS)
    R.set("p1", "p1", 0.7)
    assert R.average_accuracy() == pytest.approx(0.7, abs=1e-12)
    assert R.per_period_forgetting() == {}
    assert R.forgetting() == 0.0
    assert R.bwt() == 0.0
    assert R.fwt([0.1, 0.1, 0.1]) == 0.0
    assert R.summary() == {"average_accuracy": 0.7, "forgetting": 0.0, "bwt": 0.0}


def test_default_row_is_the_last_evaluated_one() -> None:
    R = AccuracyMatrix(PERIODS)
    R.set("p1", "p1", 0.5)
    R.set("p2", "p1", 0.25)
    R.set("p2", "p2", 0.75)
    assert R.last_trained() == 1
    # ACC_2 = (0.25 + 0.75) / 2 = 0.5 ; F_2 = 0.5 - 0.25 = 0.25
    assert R.average_accuracy() == pytest.approx(0.5, abs=1e-12)
    assert R.forgetting() == pytest.approx(0.25, abs=1e-12)
    with pytest.raises(MissingAccuracy, match=r"R\[p3\]\[p1\]"):
        R.average_accuracy("p3")


def test_missing_entries_raise_only_where_a_metric_reads_them() -> None:
    values = [row[:] for row in FULL]
    values[1][0] = None  # R[p2][p1] missing
    for i in range(3):  # upper triangle missing
        for j in range(i + 1, 3):
            values[i][j] = None
    R = AccuracyMatrix(PERIODS, values)
    assert math.isnan(R.get("p2", "p1"))
    # ACC_3 and BWT_3 do not read R[p2][p1]:
    assert R.average_accuracy() == pytest.approx(2.0 / 3, abs=1e-12)
    assert R.bwt() == pytest.approx(-0.2, abs=1e-12)
    # forgetting takes the max over l in [p1, p2] of R[l][p1], so it needs R[p2][p1]:
    with pytest.raises(MissingAccuracy, match=r"forgetting needs R\[p2\]\[p1\]"):
        R.forgetting()
    # FWT needs the entries just above the diagonal:
    with pytest.raises(MissingAccuracy, match=r"R\[p1\]\[p2\], R\[p2\]\[p3\]"):
        R.fwt([0.0, 0.0, 0.0])
    with pytest.raises(MissingAccuracy, match="empty"):
        AccuracyMatrix(PERIODS).average_accuracy()


def test_set_get_row_and_index_checks() -> None:
    R = AccuracyMatrix(PERIODS)
    R.set(2, "p1", 1.0)
    assert R.get("p3", 0) == 1.0
    row = R.row("p3")
    assert list(row) == PERIODS
    assert row["p1"] == 1.0 and math.isnan(row["p2"]) and math.isnan(row["p3"])
    assert R.periods == ("p1", "p2", "p3")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.set("p1", "p1", 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.set("p1", "p1", float("nan"))
    with pytest.raises(KeyError, match="unknown period 'p9'"):
        R.set("p9", "p1", 0.5)
    with pytest.raises(IndexError):
        R.get(3, 0)
    with pytest.raises(ValueError, match="repeat"):
        AccuracyMatrix(["a", "a"])
    with pytest.raises(ValueError, match="3x3"):
        AccuracyMatrix(PERIODS, [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="fractions"):
        AccuracyMatrix(["a"], [[80.0]])


def test_values_is_a_copy() -> None:
    R = full()
    v = R.values
    v[0, 0] = 0.0
    assert R.get("p1", "p1") == 0.8


def test_dict_round_trip_through_strict_json() -> None:
    R = AccuracyMatrix(PERIODS, [[0.8, None, None], [0.9, 0.7, None], [0.6, 0.5, 0.9]])
    data = R.to_dict()
    assert data["R"][0] == [0.8, None, None]
    text = json.dumps(data, allow_nan=False)  # JSON-safe: no NaN tokens
    back = AccuracyMatrix.from_dict(json.loads(text))
    assert back.periods == R.periods
    np.testing.assert_array_equal(back.values, R.values)  # NaN == NaN here
    assert back.summary() == R.summary()
    with pytest.raises(ValueError, match="lacks key"):
        AccuracyMatrix.from_dict({"periods": PERIODS})


def test_markdown_table() -> None:
    R = AccuracyMatrix(["a", "b"], [[0.5, None], [0.25, 1.0]])
    assert R.to_markdown() == (
        "| trained through \\ eval on | a | b |\n"
        "|---|---:|---:|\n"
        "| a | 0.500 |  |\n"
        "| b | 0.250 | 1.000 |\n"
    )


# -- plots (cssl_core.evaluation.plots draws an AccuracyMatrix) ---------------------------------
def test_plots_write_valid_png_files_atomically(tmp_path: Path) -> None:
    from cssl_core.evaluation.plots import plot_accuracy_curves, plot_accuracy_matrix

    R = AccuracyMatrix(PERIODS, [[0.8, None, None], [0.9, 0.7, 0.3], [0.6, 0.5, 0.9]])
    out = tmp_path / "figs" / "nested"
    heat = plot_accuracy_matrix(R, out / "matrix.png", title="kNN accuracy")
    curves = plot_accuracy_curves(R, out / "curves.png")
    for path in (heat, curves):
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.width > 200 and img.height > 200
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "matrix.png"]  # no temp files
    # Overwriting replaces the file in place.
    before = heat.stat().st_ino
    plot_accuracy_matrix(full(), heat, title="again")
    assert heat.stat().st_ino != before
    with Image.open(heat) as img:
        assert img.format == "PNG"


def test_plots_handle_a_single_filled_row(tmp_path: Path) -> None:
    from cssl_core.evaluation.plots import plot_accuracy_curves, plot_accuracy_matrix

    R = AccuracyMatrix(["only"])
    R.set("only", "only", 0.5)
    for path in (
        plot_accuracy_matrix(R, tmp_path / "m.png"),
        plot_accuracy_curves(R, tmp_path / "c.png"),
    ):
        with Image.open(path) as img:
            assert img.format == "PNG"
