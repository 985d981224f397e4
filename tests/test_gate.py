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


# -- the gate fails closed (issue 12, fix 4) ------------------------------------------------


def test_a_candidate_missing_an_old_period_fails():
    """The candidate was not evaluated on p01, which the champion has: it cannot pass on
    the periods it happens to have, however good."""
    d = decide({"p02": 0.9, "p03": 0.9}, {"p01": 0.6, "p02": 0.5, "p03": 0.5}, "p03", 0.0, CFG)
    assert not d.promote
    assert "FAIL complete: candidate has no accuracy on p01" in d.failed


def test_a_missing_new_period_is_named_not_called_finite():
    d = decide({"p01": 0.9}, None, "p02", 0.0, CFG)
    assert not d.promote
    assert d.failed == ["FAIL complete: candidate has no accuracy on p02"]
    assert not any("all metrics" in r and "missing" in r for r in d.reasons)
    d = decide({"p01": 0.9}, {"p01": 0.5, "p02": 0.5}, "p02", 0.0, CFG)
    assert not d.promote and d.failed[0] == "FAIL complete: candidate has no accuracy on p02"


def test_a_champion_without_the_new_period_cannot_be_compared():
    d = decide({"p01": 0.9, "p02": 0.9}, {"p01": 0.5}, "p02", 0.0, CFG)
    assert not d.promote
    assert d.failed == ["FAIL complete: champion has no accuracy on the new period p02"]


def test_the_finite_check_says_what_is_not_finite():
    d = decide({"p01": 0.5, "p02": math.inf}, {"p01": 0.4, "p02": 0.4}, "p02", math.nan, CFG)
    assert not d.promote
    (finite,) = [r for r in d.failed if r.startswith("FAIL finite")]
    assert finite == "FAIL finite: not finite: candidate p02=inf, forgetting=nan"


def test_non_finite_thresholds_are_a_configuration_error():
    import pytest

    from cssl_core.config import ConfigError, load_params

    for key in ("max_forgetting", "new_period_tolerance", "avg_accuracy_tolerance"):
        for value in ("inf", "nan"):
            with pytest.raises(ConfigError, match=f"gate.{key}"):
                load_params(None, [f"gate.{key}={value}"])


def test_an_infinite_threshold_that_slipped_through_fails_closed():
    loose = GateConfig.model_construct(
        metric="knn", avg_accuracy_tolerance=0.01, new_period_tolerance=math.inf, max_forgetting=0.1
    )
    # Equal averages, far worse on the new period: only the infinite tolerance lets it by.
    d = decide({"p01": 0.9, "p02": 0.3}, {"p01": 0.5, "p02": 0.7}, "p02", 0.0, loose)
    assert not d.promote
    assert "gate.new_period_tolerance=inf" in " ".join(d.failed)
