"""simulate.schedule: static stretches, sudden and gradual shifts (known truth for drift tests),
and today's drifting schedule kept exactly as it was."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import yaml

from cssl_core.config import ConfigError, Regime, SimulateConfig, load_params, params_from_dict
from cssl_core.data.simulate import (
    GAME_POOL,
    frame_counts,
    game_schedule,
    regime_schedule,
    simulate_period_frames,
)


def regimes(*items: dict) -> SimulateConfig:
    return SimulateConfig.model_validate({"schedule": list(items)})


def test_default_schedule_is_the_drifting_one_unchanged() -> None:
    # The default before regimes existed, pinned to the value (period 0 and 3 of seed 0).
    assert SimulateConfig().schedule == "drifting"
    schedule = game_schedule(SimulateConfig(), 4)
    expected_0 = {
        "space_invaders": 0.20576981911243178,
        "seaquest": 0.1766992756213237,
        "boxing": 0.30503653138743064,
        "skiing": 0.312494373878814,
    }
    expected_3 = {
        "pong": 0.1348650000458198,
        "ms_pacman": 0.21346510376677427,
        "skiing": 0.3300613058753565,
        "kangaroo": 0.32160859031204936,
    }
    for got, want in ((schedule[0], expected_0), (schedule[3], expected_3)):
        assert list(got) == list(want)
        assert all(math.isclose(got[g], want[g], rel_tol=1e-12) for g in want)


def test_static_stretch_keeps_identical_shares() -> None:
    cfg = regimes({"kind": "static", "periods": 3})
    schedule = game_schedule(cfg, 3)
    assert schedule[0] == schedule[1] == schedule[2]
    assert len(schedule[0]) == cfg.games_per_period
    assert all(math.isclose(s, 1 / cfg.games_per_period) for s in schedule[0].values())


def test_static_periods_have_identical_frame_counts_but_different_frames() -> None:
    cfg = regimes({"kind": "static", "periods": 2}).model_copy(
        update={"frames_per_period": 24, "size": 16}
    )
    first, second = (list(simulate_period_frames(cfg, 2, t)) for t in (0, 1))
    assert Counter(f.category for f in first) == Counter(f.category for f in second)
    assert {f.image for f in first}.isdisjoint({f.image for f in second})


def test_sudden_shift_replaces_the_game_set() -> None:
    cfg = regimes({"kind": "static", "periods": 2}, {"kind": "sudden", "periods": 2})
    before, after, held = game_schedule(cfg, 4)[1:]
    assert set(before).isdisjoint(after)
    assert len(after) == cfg.games_per_period and after == held
    assert math.isclose(sum(after.values()), 1.0)


def test_partial_sudden_shift_moves_exactly_its_share() -> None:
    cfg = regimes({"kind": "static"}, {"kind": "sudden", "share": 0.3, "games": 2})
    before, after = game_schedule(cfg, 2)
    new = set(after) - set(before)
    assert len(new) == 2
    assert math.isclose(sum(after[g] for g in new), 0.3)
    for g in before:  # the old games keep their proportions
        assert math.isclose(after[g], 0.7 * before[g])


def test_gradual_shift_raises_the_new_games_share_in_equal_steps() -> None:
    cfg = regimes({"kind": "static"}, {"kind": "gradual", "periods": 4, "share": 0.8})
    schedule = game_schedule(cfg, 5)
    start = set(schedule[0])
    new_share = [sum(s for g, s in mix.items() if g not in start) for mix in schedule]
    assert [round(x, 12) for x in new_share] == [0.0, 0.2, 0.4, 0.6, 0.8]
    # One set of new games throughout; the end equals a sudden shift of the same share.
    assert len({frozenset(set(mix) - start) for mix in schedule[1:]}) == 1
    sudden = regimes({"kind": "static"}, {"kind": "sudden", "share": 0.8})
    assert game_schedule(sudden, 2)[1] == schedule[-1]


def test_frames_follow_a_shifted_schedule() -> None:
    cfg = regimes({"kind": "static"}, {"kind": "sudden", "share": 0.5, "games": 1}).model_copy(
        update={"frames_per_period": 40, "size": 16}
    )
    shares = game_schedule(cfg, 2)[1]
    frames = list(simulate_period_frames(cfg, 2, 1))
    expected = {g: n for g, n in frame_counts(shares, 40).items() if n}
    assert dict(Counter(f.category for f in frames)) == expected
    assert max(expected.values()) == 20  # the one new game has half the frames


def test_a_period_depends_only_on_the_config_and_its_index() -> None:
    cfg = regimes(
        {"kind": "static", "periods": 2},
        {"kind": "gradual", "periods": 3, "share": 0.5},
        {"kind": "sudden"},
    )
    full = regime_schedule(cfg, 6)
    assert regime_schedule(cfg, 3) == full[:3]
    # Other seeds pick other games, in the same pattern.
    other = regime_schedule(cfg.model_copy(update={"seed": 1}), 6)
    assert [len(m) for m in other] == [len(m) for m in full] and other != full


def test_new_games_come_from_the_pool_and_wrap_around() -> None:
    cfg = regimes(*[{"kind": "sudden"} for _ in range(5)])
    schedule = game_schedule(cfg, 5)
    for before, after in zip(schedule, schedule[1:], strict=False):
        assert set(before).isdisjoint(after) and set(after) <= set(GAME_POOL)
    assert schedule[0] == game_schedule(cfg, 5)[3]  # 12 games in sets of 4: period of 3


def test_impossible_schedules_fail_with_one_clear_line() -> None:
    with pytest.raises(ValueError, match="covers 2 periods but 3 were requested; add a regime"):
        game_schedule(regimes({"kind": "static", "periods": 2}), 3)
    # Partial shifts keep the old games: 4 + 4 + 4 fill the pool of 12, a fourth set cannot.
    grows = regimes(*[{"kind": "sudden", "share": 0.5} for _ in range(3)])
    with pytest.raises(ValueError, match=r"regime 3 \(sudden\) needs 4 games not in the mix"):
        game_schedule(grows, 3)
    with pytest.raises(
        ConfigError, match=r"simulate\.schedule\.regimes\.0: .*static regime keeps the mix"
    ):
        load_params(None, ["simulate.schedule=[{kind: static, share: 0.5}]"])
    with pytest.raises(ConfigError, match="schedule needs at least one regime"):
        load_params(None, ["simulate.schedule=[]"])
    with pytest.raises(ConfigError, match="'sometimes' is not a schedule: use 'drifting' or"):
        load_params(None, ["simulate.schedule=sometimes"])


def test_schedule_survives_a_yaml_round_trip() -> None:
    # A dumped config (DVC's params file, MLflow params) must load back to the same config.
    params = load_params(
        None,
        ["simulate.schedule=[{kind: static, periods: 2}, {kind: gradual, periods: 3, share: 0.5}]"],
    )
    assert params.simulate.schedule == (
        Regime(kind="static", periods=2),
        Regime(kind="gradual", periods=3, share=0.5),
    )
    dumped = yaml.safe_load(yaml.safe_dump(params.model_dump(mode="json")))
    assert params_from_dict(dumped) == params
