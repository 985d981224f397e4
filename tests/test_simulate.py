"""The Atari stream simulator: schedule drift, determinism, composition, splits and shards."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cssl_core.config import SimulateConfig
from cssl_core.images import decode_image, frame_id
from cssl_core.shard import Frame, Shard
from cssl_core.simulate import (
    EPOCH,
    GAME_POOL,
    PERIOD_LENGTH,
    SEGMENT_FRAMES,
    STREAMERS_PER_GAME,
    frame_counts,
    game_schedule,
    plan_clips,
    simulate_period,
    simulate_period_frames,
    streamer_style,
)

NUM_PERIODS = 4
SMALL = SimulateConfig(frames_per_period=40, size=48, seed=3)


def _total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(g, 0.0) - q.get(g, 0.0)) for g in set(p) | set(q))


def _distribution(frames: list[Frame]) -> dict[str, float]:
    counts = Counter(f.category for f in frames)
    return {str(g): n / len(frames) for g, n in counts.items()}


@pytest.fixture(scope="module")
def periods() -> list[list[Frame]]:
    return [list(simulate_period_frames(SMALL, NUM_PERIODS, i)) for i in range(NUM_PERIODS)]


def test_schedule_drifts_with_some_games_persisting() -> None:
    cfg = SimulateConfig()
    schedule = game_schedule(cfg, NUM_PERIODS)
    assert len(schedule) == NUM_PERIODS
    for shares in schedule:
        assert len(shares) == cfg.games_per_period
        assert set(shares) <= set(GAME_POOL)
        assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-12)
        assert all(s > 0 for s in shares.values())
    first, last = schedule[0], schedule[-1]
    assert _total_variation(first, last) > 0.5
    assert set(first) - set(last), "some game must fade out"
    assert set(last) - set(first), "some game must appear"
    persistent = set.intersection(*(set(s) for s in schedule))
    assert len(persistent) >= 1
    # The mix changes every period, not only between the first and the last.
    assert all(schedule[t] != schedule[t + 1] for t in range(NUM_PERIODS - 1))


def test_schedule_of_a_period_ignores_later_periods_and_follows_the_seed() -> None:
    cfg = SimulateConfig()
    assert game_schedule(cfg, 7)[:NUM_PERIODS] == game_schedule(cfg, NUM_PERIODS)
    assert game_schedule(cfg, NUM_PERIODS) == game_schedule(SimulateConfig(), NUM_PERIODS)
    assert game_schedule(cfg, NUM_PERIODS) != game_schedule(SimulateConfig(seed=1), NUM_PERIODS)
    negative = game_schedule(SimulateConfig(seed=-1), NUM_PERIODS)
    assert negative != game_schedule(SimulateConfig(seed=1), NUM_PERIODS)


def test_schedule_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="games_per_period=13 exceeds the pool of 12"):
        game_schedule(SimulateConfig(games_per_period=13), 2)
    with pytest.raises(ValueError, match="num_periods must be at least 1"):
        game_schedule(SimulateConfig(), 0)
    with pytest.raises(ValueError, match="period index 4 is outside 0..3"):
        next(simulate_period_frames(SMALL, 4, 4))


def test_frame_counts_use_largest_remainder() -> None:
    # raw 3.5, 2.1, 1.4 -> floors 3, 2, 1; the one frame left goes to the largest remainder.
    assert frame_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}
    assert frame_counts({"a": 0.5, "b": 0.5}, 1) == {"a": 1, "b": 0}


def test_plan_clips_cuts_exact_eval_share_into_short_clips() -> None:
    clips = plan_clips(103, 0.2, np.random.default_rng(0))
    eval_frames = [c.frames for c in clips if c.split == "eval"]
    train_frames = [c.frames for c in clips if c.split == "train"]
    assert sum(eval_frames) == 21  # floor(0.2 * 103 + 0.5)
    assert sorted(eval_frames) == [21]
    assert sorted(train_frames) == [20, 20, 21, 21]
    assert all(0 <= c.streamer < STREAMERS_PER_GAME for c in clips)
    assert max(c.frames for c in plan_clips(1000, 0.1, np.random.default_rng(1))) == SEGMENT_FRAMES


def test_streamers_have_distinct_faces_that_do_not_depend_on_the_period() -> None:
    styles = [streamer_style(0, g, k) for g in GAME_POOL for k in range(STREAMERS_PER_GAME)]
    assert len({s.face for s in styles}) == len(GAME_POOL) * STREAMERS_PER_GAME
    assert all(0 <= s.face < 100 for s in styles)  # the first 100 LFW crops are the faces
    assert streamer_style(0, "pong", 1) == streamer_style(0, "pong", 1)


def test_frames_follow_the_schedule_and_drift(periods: list[list[Frame]]) -> None:
    schedule = game_schedule(SMALL, NUM_PERIODS)
    for shares, frames in zip(schedule, periods, strict=True):
        assert len(frames) == SMALL.frames_per_period
        expected = {g: n for g, n in frame_counts(shares, SMALL.frames_per_period).items() if n}
        assert dict(Counter(f.category for f in frames)) == expected
    first, last = _distribution(periods[0]), _distribution(periods[-1])
    assert _total_variation(first, last) > 0.5
    assert set(first) - set(last)
    assert set.intersection(*(set(_distribution(p)) for p in periods))


def test_frames_decode_at_size_with_consistent_metadata(periods: list[list[Frame]]) -> None:
    for index, frames in enumerate(periods):
        start = EPOCH + index * PERIOD_LENGTH
        by_stream: dict[str, list[Frame]] = {}
        for f in frames:
            img = decode_image(f.image)
            assert img.size == (SMALL.size, SMALL.size) and img.mode == "RGB"
            assert f.image[:3] == b"\xff\xd8\xff"
            assert f.source == f"ale:{f.category}"
            assert re.fullmatch(rf"{f.category}-s[0-{STREAMERS_PER_GAME - 1}]", f.stream_id)
            assert f.ts.tzinfo is not None and start <= f.ts < start + PERIOD_LENGTH
            by_stream.setdefault(f.stream_id, []).append(f)
        for stream in by_stream.values():
            stamps = [f.ts for f in stream]
            assert stamps == sorted(stamps)
        # Consecutive captured frames differ (frame skipping, moving overlays).
        ids = [frame_id(f.image) for f in frames]
        assert len(set(ids)) == len(ids)


def test_eval_split_is_the_configured_fraction_of_each_game(periods: list[list[Frame]]) -> None:
    total_eval = 0
    for frames in periods:
        assert {f.split for f in frames} == {"train", "eval"}
        per_game = Counter(f.category for f in frames)
        eval_per_game = Counter(f.category for f in frames if f.split == "eval")
        for game, n in per_game.items():
            assert eval_per_game[game] == math.floor(SMALL.eval_fraction * n + 0.5)
        assert all(f.category in GAME_POOL for f in frames if f.split == "eval")
        total_eval += sum(eval_per_game.values())
    fraction = total_eval / (NUM_PERIODS * SMALL.frames_per_period)
    assert abs(fraction - SMALL.eval_fraction) <= 0.05


def test_same_seed_same_frames_any_order_other_seed_differs(periods: list[list[Frame]]) -> None:
    def key(frames: list[Frame]) -> list[tuple[str, str, str, str | None, str | None]]:
        return [
            (frame_id(f.image), f.stream_id, f.ts.isoformat(), f.split, f.category) for f in frames
        ]

    # Period 2 alone, in a fresh generator, equals period 2 made after periods 0 and 1.
    alone = list(simulate_period_frames(SMALL, NUM_PERIODS, 2))
    assert key(alone) == key(periods[2])
    other = list(simulate_period_frames(SMALL.model_copy(update={"seed": 4}), NUM_PERIODS, 2))
    assert not {frame_id(f.image) for f in other} & {frame_id(f.image) for f in alone}


def test_facecam_and_chat_change_pixels() -> None:
    base = SimulateConfig(frames_per_period=12, size=64, seed=5, facecam=False, chat=False)

    def images(**overlays: bool) -> list[np.ndarray]:
        cfg = base.model_copy(update=overlays)
        return [
            np.asarray(decode_image(f.image), np.int16) for f in simulate_period_frames(cfg, 2, 0)
        ]

    plain, cam, chat = images(), images(facecam=True), images(chat=True)
    assert len(plain) == len(cam) == len(chat) == 12
    for p, c in zip(plain, cam, strict=True):
        # The game is the same play (overlays draw from their own random stream). The facecam
        # covers output rows >= 46, i.e. JPEG 16-row MCUs from row 32 on; libjpeg's chroma
        # upsampling blends into row 31, so rows 0-29 stay bit-identical. Inside the cam the
        # pixels differ a lot.
        assert np.array_equal(p[:30], c[:30])
        assert np.abs(p[50:62, 50:62] - c[50:62, 50:62]).mean() > 10
    strip = slice(64 * 160 // 210 + 2, 64)  # the chat sidebar's columns
    for p, c in zip(plain, chat, strict=True):
        assert np.abs(p[:, strip] - c[:, strip]).mean() > 10
    # The chat scrolls: its sidebar is not frozen across a stream's frames.
    sidebars = {chat[i][:, strip].tobytes() for i in range(len(chat))}
    assert len(sidebars) > 1


def test_simulate_period_writes_an_openable_shard(tmp_path: Path) -> None:
    cfg = SimulateConfig(frames_per_period=30, size=32, seed=7)
    seen: list[int] = []
    manifest = simulate_period(tmp_path, "p02", 1, 3, cfg, rows_per_group=16, progress=seen.append)
    shard = Shard.open(tmp_path / "p02")
    assert shard.num_rows == 30 and manifest["num_rows"] == 30
    assert sum(seen) == 30
    assert manifest["duplicates_dropped"] == 0 and manifest["quarantined"] == {}
    expected = {g: n for g, n in frame_counts(game_schedule(cfg, 3)[1], 30).items() if n}
    assert manifest["categories"] == expected
    table = shard.read(columns=["period", "split", "width", "height", "source"])
    assert set(table.column("period").to_pylist()) == {"p02"}
    assert set(table.column("width").to_pylist()) == {32} == set(table.column("height").to_pylist())
    n_eval = sum(math.floor(cfg.eval_fraction * n + 0.5) for n in expected.values())
    assert manifest["splits"] == {"eval": n_eval, "train": 30 - n_eval}
    assert table.column("split").to_pylist().count("eval") == n_eval
    # A rerun produces the same bytes: same fingerprint, same manifest.
    again = simulate_period(tmp_path, "p02", 1, 3, cfg)
    assert again["fingerprint"] == manifest["fingerprint"]
