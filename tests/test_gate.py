"""The promotion gate on plain numbers: every threshold decides on its own."""

import math

from cssl_core.config import GateConfig
from pipelines.gate import decide

CFG = GateConfig(avg_accuracy_tolerance=0.01, new_period_tolerance=0.0, max_forgetting=0.10)


def test_first_period_promotes_a_finite_candidate():
    d = decide({"p01": 0.5}, None, "p01", 0.0, CFG)
    assert d.promote and d.failed == []


def test_better_candidate_promotes():
    d = decide({"p01": 0.6, "p02": 0.7}, {"p01": 0.6, "p02": 0.5}, "p02", 0.02, CFG)
    assert d.promote, d.reasons


def test_average_within_tolerance_passes_and_beyond_fails():
    champ = {"p01": 0.70, "p02": 0.60}  # avg 0.65
    ok = decide({"p01": 0.68, "p02": 0.61}, champ, "p02", 0.02, CFG)  # avg 0.645 >= 0.64
    assert ok.promote, ok.reasons
    bad = decide({"p01": 0.64, "p02": 0.61}, champ, "p02", 0.02, CFG)  # avg 0.625 < 0.64
    assert not bad.promote
    assert [r.split(":")[0] for r in bad.failed] == ["FAIL average accuracy"]


def test_worse_on_new_period_fails():
    d = decide({"p01": 0.9, "p02": 0.59}, {"p01": 0.6, "p02": 0.6}, "p02", 0.0, CFG)
    assert not d.promote
    assert d.failed == ["FAIL accuracy on p02: candidate 0.590 vs champion 0.600"]


def test_too_much_forgetting_fails():
    d = decide({"p01": 0.9, "p02": 0.9}, {"p01": 0.5, "p02": 0.5}, "p02", 0.11, CFG)
    assert not d.promote
    assert d.failed == ["FAIL forgetting: 0.110 > max 0.100"]


def test_nan_never_promotes():
    d = decide({"p01": math.nan}, None, "p01", 0.0, CFG)
    assert not d.promote
    d = decide({"p01": 0.5, "p02": 0.5}, {"p01": 0.1, "p02": 0.1}, "p02", math.nan, CFG)
    assert not d.promote
