"""``decide_watch``: when the watch flow starts a refresh (a pure function, no flow)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cssl_core.config import WatchConfig
from pipelines.triggers import decide_watch, human

CFG = WatchConfig(max_age=timedelta(days=90), cooldown=timedelta(days=7))
DAY = timedelta(days=1)


def _decide(**kw):
    base = {
        "drifted": False,
        "drift_summary": "no drift: not significant (p=0.4)",
        "champion_version": 3,
        "champion_age": 10 * DAY,
        "since_last_refresh": 10 * DAY,
    }
    return decide_watch(CFG, **{**base, **kw})


def test_no_shift_and_a_young_champion_skip():
    d = _decide()
    assert (d.refresh, d.triggers, d.held_by_cooldown) == (False, (), False)
    assert d.action == "skip"
    assert d.summary == "skip: no drift, and @champion is within its maximum age"
    assert d.reasons == (
        "drift check: no drift: not significant (p=0.4)",
        "@champion (version 3) was registered 10.0 d ago: within watch.max_age 90d",
        "the last refresh started 10.0 d ago: longer than watch.cooldown 7d",
    )


def test_drift_refreshes():
    d = _decide(drifted=True, drift_summary="DRIFT: significant and large enough")
    assert (d.refresh, d.triggers, d.summary) == (True, ("drift",), "refresh (drift)")
    assert d.reasons[0] == "drift check: DRIFT: significant and large enough"


def test_an_old_champion_refreshes_without_drift():
    d = _decide(champion_age=91 * DAY, since_last_refresh=91 * DAY)
    assert (d.refresh, d.triggers) == (True, ("max_age",))
    assert "registered 91.0 d ago: older than watch.max_age 90d" in d.reasons[1]
    assert _decide(champion_age=90 * DAY).refresh is False  # "older than", not "as old as"


def test_drift_and_age_are_both_named():
    d = _decide(drifted=True, champion_age=100 * DAY, since_last_refresh=100 * DAY)
    assert d.triggers == ("drift", "max_age") and d.summary == "refresh (drift, max age)"


def test_the_cooldown_holds_drift_and_age():
    for kw in ({"drifted": True}, {"champion_age": 91 * DAY}):
        d = _decide(since_last_refresh=2 * DAY, **kw)
        assert (d.refresh, d.held_by_cooldown) == (False, True)
        assert d.summary.startswith("skip: cooldown (")
        assert d.reasons[-1] == "the last refresh started 2.0 d ago: within watch.cooldown 7d"


def test_force_refreshes_inside_the_cooldown():
    d = _decide(force=True, since_last_refresh=timedelta(minutes=5))
    assert (d.refresh, d.triggers, d.held_by_cooldown) == (True, ("force",), False)
    assert d.reasons[0] == "forced by the user (the cooldown does not apply)"


def test_no_champion_refreshes_without_a_drift_check():
    d = decide_watch(CFG, drifted=None, since_last_refresh=None)
    assert (d.refresh, d.triggers) == (True, ("no_champion",))
    assert d.reasons[-1] == "no refresh has started before"


def test_unknown_registration_time_is_said_and_does_not_trigger():
    d = _decide(champion_age=None)
    assert d.refresh is False
    assert d.reasons[1] == "@champion (version 3): registration time unknown"


def test_a_flapping_signal_starts_at_most_one_refresh_per_cooldown():
    """Drift found every other day for 30 days: a refresh starts on day 0, then only once
    the cooldown (7 days) has passed since the last one started -- never back to back."""
    started: list[int] = []
    for day in range(30):
        since = None if not started else (day - started[-1]) * DAY
        age = (day - started[-1]) * DAY if started else 10 * DAY
        d = _decide(drifted=day % 2 == 0, champion_age=age, since_last_refresh=since)
        if d.refresh:
            started.append(day)
        elif day % 2 == 0 and started and day - started[-1] < 7:
            assert d.held_by_cooldown
    assert started == [0, 8, 16, 24]
    assert all(b - a >= 7 for a, b in zip(started, started[1:], strict=False))


def test_a_zero_cooldown_never_holds():
    cfg = WatchConfig(cooldown=timedelta(0))
    d = decide_watch(
        cfg, drifted=True, champion_version=1, champion_age=DAY, since_last_refresh=timedelta(0)
    )
    assert d.refresh and not d.held_by_cooldown


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(seconds=45), "45 s"),
        (timedelta(minutes=12), "12 min"),
        (timedelta(hours=5), "5.0 h"),
        (timedelta(days=3, hours=5), "3.2 d"),
    ],
)
def test_human_durations(delta: timedelta, text: str):
    assert human(delta) == text
