"""``cssl bench watch``'s pure parts: the two policies' replay over injected work (fake models,
drift checks and eval outcomes, so it runs in milliseconds), the summary and its goals."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from benchmarks.watch import (
    REPLAY_SCHEDULE,
    Check,
    Refreshed,
    Work,
    markdown,
    replay,
    replay_params,
    summarize,
    truth,
)
from cssl_core.config import Params, WatchConfig
from cssl_core.evaluation.outcomes import FrameOutcomes

NAMES = ["p01", "p02", "p03", "p04", "p05", "p06"]
MIX = {"p01": "A", "p02": "A", "p03": "A", "p04": "B", "p05": "B", "p06": "B"}
KINDS = ["static", "static", "static", "sudden", "static", "static"]
START, MONTH = datetime(2026, 1, 1, tzinfo=UTC), timedelta(days=30)
STREAMS = [f"s{k}" for k in range(20) for _ in range(5)]  # 20 eval streams of 5 frames


class FakeWork:
    """A model is the tuple of periods it was refreshed on; it knows a period's mix when the
    last one had it. Drift = the mixes differ. Every call is logged."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def refresh(self, chain: list[str], parent: object, memory: object) -> Refreshed:
        self.calls.append(("refresh", *chain))
        return Refreshed(tuple(chain), f"memory {chain[-1]}", 30.0, 10.0)

    def drift(self, model: tuple[str, ...], period: str, reference: str) -> Check:
        assert reference == model[-1]  # the reference is the champion's period
        drifted = MIX[period] != MIX[reference]
        return Check(drifted, 0.1 if drifted else 0.01, 0.001 if drifted else 0.5, "x", 1.0)

    def outcomes(self, model: tuple[str, ...], period: str) -> FrameOutcomes:
        rng = np.random.default_rng(zlib.crc32(f"{model}{period}".encode()))
        p = 0.8 if MIX[model[-1]] == MIX[period] else 0.4
        correct = rng.random(len(STREAMS)) < p
        ids = tuple(f"{period}-{k}" for k in range(len(STREAMS)))
        return FrameOutcomes(ids, tuple(STREAMS), ("g",) * len(STREAMS), correct, correct)

    def work(self) -> Work:
        return Work(self.refresh, self.drift, self.outcomes, "empty memory")


def _replay(cfg: WatchConfig = WatchConfig()):
    fake = FakeWork()
    return replay(NAMES, KINDS, cfg, fake.work(), start=START, length=MONTH), fake


def test_always_refreshes_every_period_and_watch_only_the_shift():
    run, fake = _replay()
    always, watch = run.states["always"], run.states["watch"]
    assert always.chain == NAMES and always.refreshes == 6
    assert watch.chain == ["p01", "p04"]
    assert [r["refreshed"] for r in watch.rows] == [False, False, True, False, False]
    assert watch.rows[2]["triggers"] == ["drift"] and watch.rows[2]["summary"] == "refresh (drift)"
    # p01 is refreshed once for both; each later refresh continues its own policy's chain.
    assert fake.calls[0] == ("refresh", "p01")
    assert ("refresh", "p01", "p04") in fake.calls
    assert ("refresh", "p01", "p02", "p03", "p04") in fake.calls
    assert len(run.drift_seconds) == 5 and len(run.refresh_costs) == 1 + 5 + 1


def test_next_period_accuracy_is_the_champion_before_its_refresh():
    run, _ = _replay()
    served = [r["champion_period"] for r in run.states["watch"].rows]
    assert served == ["p01", "p01", "p01", "p04", "p04"]
    assert [r["champion_period"] for r in run.states["always"].rows] == NAMES[:-1]


def test_max_age_refreshes_a_static_stretch():
    run, _ = _replay(WatchConfig(max_age=timedelta(days=45)))
    watch = run.states["watch"]
    assert watch.chain == ["p01", "p03", "p04", "p06"]
    assert watch.rows[1]["triggers"] == ["max_age"]


def test_summary_counts_intervals_costs_and_goals():
    run, _ = _replay()
    results = summarize(run, KINDS, bootstrap=300, seed=0)
    assert results["refreshes"] == {"always": 6, "watch": 2}
    assert results["fewer_refreshes"] == pytest.approx(1 - 2 / 6)
    acc = results["next_period_accuracy"]
    for name in ("always", "watch"):
        mean = acc[name]["mean"]
        assert mean["low"] <= mean["estimate"] <= mean["high"]
        assert mean["n_clusters"] == 5 * 20  # each period's streams are a stratum
        assert set(acc[name]["periods"]) == set(NAMES[1:])
    # p02: both serve the p01 model, so the paired difference is exactly zero.
    p02 = results["difference_watch_minus_always"]["p02"]
    assert p02["estimate"] == p02["low"] == p02["high"] == 0.0
    cost = results["cost"]
    assert (cost["drift_check_median_s"], cost["refresh_median_s"]) == (1.0, 40.0)
    assert cost["ratio"] == pytest.approx(0.025)
    goals = results["goals"]
    assert goals["fewer_refreshes_30pct"] and goals["drift_check_at_most_5pct"]
    within = acc["always"]["mean"]["low"] <= acc["watch"]["mean"]["estimate"]
    assert goals["accuracy_within_always_interval"] == (
        within and acc["watch"]["mean"]["estimate"] <= acc["always"]["mean"]["high"]
    )
    text = markdown(results)
    assert "| always | 6 | p01, p02, p03, p04, p05, p06 |" in text
    assert "67% fewer refreshes with watch" in text
    assert "| p04 | sudden | p03 |" in text and "refresh (drift)" in text


def test_the_replay_stream_has_static_stretches_and_shifts():
    params = replay_params(Params(), frames_per_period=300)
    assert len(params.period_names) == sum(r.get("periods", 1) for r in REPLAY_SCHEDULE) >= 8
    assert params.simulate.frames_per_period == 300
    kinds = truth(params)
    assert kinds[:5] == ["static"] * 4 + ["sudden"]
    assert kinds[-3:] == ["gradual 1/3", "gradual 2/3", "gradual 3/3"]
