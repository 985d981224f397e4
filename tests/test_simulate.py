"""The Atari stream simulator: schedule drift, determinism, styles, held-out streamers, shards."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cssl_core.config import SimulateConfig
from cssl_core.data.images import decode_image, frame_id
from cssl_core.data.shard import Frame, Shard
from cssl_core.data.simulate import (
    CANVAS,
    EPOCH,
    GAME_POOL,
    PERIOD_LENGTH,
    SEGMENT_FRAMES,
    STREAMERS_PER_GAME,
    Box,
    colour_grade_matrix,
    eval_streamer_style,
    frame_counts,
    game_schedule,
    plan_clips,
    simulate_period,
    simulate_period_frames,
    streamer_style,
)

NUM_PERIODS = 4
SMALL = SimulateConfig(frames_per_period=60, size=48, seed=3, eval_clip_frames=2)


def _total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(g, 0.0) - q.get(g, 0.0)) for g in set(p) | set(q))


def _distribution(frames: list[Frame]) -> dict[str, float]:
    counts = Counter(f.category for f in frames)
    return {str(g): n / len(frames) for g, n in counts.items()}


def _streamer(frame: Frame) -> int:
    """The train streamer of a train frame."""
    return int(frame.stream_id.rsplit("-s", 1)[1])


def _eval_clip(frame: Frame) -> tuple[int, int]:
    """``(period index, clip)`` of an eval frame's held-out streamer."""
    period, clip = frame.stream_id.rsplit("-e", 1)[1].split(".")
    return int(period), int(clip)


@pytest.fixture(scope="module")
def periods() -> list[list[Frame]]:
    return [list(simulate_period_frames(SMALL, NUM_PERIODS, i)) for i in range(NUM_PERIODS)]


# -- schedule ----------------------------------------------------------------------------
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


# -- held-out streamers ------------------------------------------------------------------
def test_plan_clips_cuts_eval_frames_into_own_streamer_clips() -> None:
    clips = plan_clips(103, 0.2, np.random.default_rng(0), eval_clip_frames=4)
    eval_clips = [c for c in clips if c.split == "eval"]
    train_clips = [c for c in clips if c.split == "train"]
    assert sum(c.frames for c in eval_clips) == 21  # floor(0.2 * 103 + 0.5)
    assert [c.frames for c in eval_clips] == [4, 4, 4, 4, 4, 1]
    assert [c.streamer for c in eval_clips] == list(range(6))  # one held-out streamer each
    assert sorted(c.frames for c in train_clips) == [20, 20, 21, 21]
    assert {c.streamer for c in train_clips} <= set(range(STREAMERS_PER_GAME))
    many = plan_clips(5000, 0.2, np.random.default_rng(1))
    assert max(c.frames for c in many if c.split == "train") == SEGMENT_FRAMES
    assert {c.streamer for c in many if c.split == "train"} == set(range(STREAMERS_PER_GAME))
    assert [c.frames for c in many if c.split == "eval"] == [1] * 1000
    assert plan_clips(10, 0.0, np.random.default_rng(0))[0].split == "train"
    with pytest.raises(ValueError, match="eval_clip_frames=0 and num_streamers=6 must be >= 1"):
        plan_clips(10, 0.2, np.random.default_rng(0), eval_clip_frames=0)


def test_eval_streamers_show_faces_and_looks_no_train_streamer_shows() -> None:
    train = [streamer_style(0, g, k) for g in GAME_POOL for k in range(STREAMERS_PER_GAME)]
    held_out = [eval_streamer_style(0, g, p, c) for g in GAME_POOL for p in (0, 3) for c in (0, 9)]
    assert not {s.face for s in held_out} & {s.face for s in train}
    assert all(0 <= s.face < 100 for s in held_out)
    looks = {(s.view, s.zoom, s.grade) for s in train}
    assert len({(s.view, s.zoom, s.grade) for s in held_out} - looks) == len(held_out)
    assert eval_streamer_style(0, "pong", 2, 5) == eval_streamer_style(0, "pong", 2, 5)
    assert eval_streamer_style(0, "pong", 2, 5) != eval_streamer_style(1, "pong", 2, 5)
    with pytest.raises(ValueError, match="must be >= 0"):
        eval_streamer_style(0, "pong", 0, -1)


def test_eval_streams_never_appear_in_any_train_split(periods: list[list[Frame]]) -> None:
    seen_eval: set[str] = set()
    seen_train: set[str] = set()
    for index, frames in enumerate(periods):
        for f in frames:
            assert f.category is not None
            if f.split == "eval":
                assert _eval_clip(f)[0] == index
                seen_eval.add(f.stream_id)
            else:
                assert 0 <= _streamer(f) < STREAMERS_PER_GAME
                seen_train.add(f.stream_id)
    assert seen_eval and seen_train and not seen_eval & seen_train


def test_eval_split_is_the_configured_fraction_and_clip_length(periods: list[list[Frame]]) -> None:
    total_eval = 0
    for frames in periods:
        assert {f.split for f in frames} == {"train", "eval"}
        per_game = Counter(f.category for f in frames)
        eval_per_game = Counter(f.category for f in frames if f.split == "eval")
        for game, n in per_game.items():
            assert eval_per_game[game] == math.floor(SMALL.eval_fraction * n + 0.5)
        total_eval += sum(eval_per_game.values())
        # Each eval stream is one clip of eval_clip_frames (the game's last may be shorter).
        clip_sizes = Counter(f.stream_id for f in frames if f.split == "eval")
        assert set(clip_sizes.values()) <= {1, SMALL.eval_clip_frames}
    fraction = total_eval / (NUM_PERIODS * SMALL.frames_per_period)
    assert abs(fraction - SMALL.eval_fraction) <= 0.05


# -- styles ------------------------------------------------------------------------------
def test_colour_grade_matrix_is_exact_in_limiting_cases() -> None:
    def apply(m: tuple[float, ...], rgb: tuple[float, float, float]) -> np.ndarray:
        a = np.array(m).reshape(3, 4)
        return a[:, :3] @ np.array(rgb) + a[:, 3]

    identity = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    np.testing.assert_allclose(colour_grade_matrix(0.0, 1.0, 1.0, 1.0), identity, atol=1e-12)
    # A third of a turn about the grey axis maps red to green and green to blue.
    third = colour_grade_matrix(1 / 3, 1.0, 1.0, 1.0)
    np.testing.assert_allclose(apply(third, (255, 0, 0)), (0, 255, 0), atol=1e-9)
    np.testing.assert_allclose(apply(third, (0, 255, 0)), (0, 0, 255), atol=1e-9)
    # Greys are fixed by any hue rotation; saturation 0 maps a colour to its luma grey.
    np.testing.assert_allclose(
        apply(colour_grade_matrix(0.137, 1.0, 1.0, 1.0), (90, 90, 90)), (90, 90, 90), atol=1e-9
    )
    np.testing.assert_allclose(
        apply(colour_grade_matrix(0.0, 0.0, 1.0, 1.0), (200, 100, 0)), [118.5] * 3, atol=1e-9
    )
    # Contrast 0.5 about 128, then brightness 0.8, then gains (1, 0.5, 2) on a grey of 28.
    graded = apply(colour_grade_matrix(0.0, 1.0, 0.8, 0.5, (1.0, 0.5, 2.0)), (28, 28, 28))
    np.testing.assert_allclose(graded, (62.4, 31.2, 124.8), atol=1e-9)
    # PIL applies the same map.
    pixel = Image.new("RGB", (1, 1), (255, 0, 0)).convert("RGB", third)
    assert pixel.getpixel((0, 0)) == (0, 255, 0)


def test_streamer_styles_vary_a_lot_and_do_not_depend_on_the_period() -> None:
    styles = [streamer_style(0, g, k) for g in GAME_POOL for k in range(STREAMERS_PER_GAME)]
    assert len({s.face for s in styles}) == len(GAME_POOL) * STREAMERS_PER_GAME
    assert all(0 <= s.face < 100 for s in styles)  # the first 100 LFW crops are the faces
    assert streamer_style(0, "pong", 1) == streamer_style(0, "pong", 1)
    assert streamer_style(0, "pong", 1) != streamer_style(1, "pong", 1)
    with pytest.raises(ValueError, match="streamer must be in 0..5, got 6"):
        streamer_style(0, "pong", STREAMERS_PER_GAME)

    def inside(box: Box, outer: Box) -> bool:
        return (
            outer.x <= box.x
            and box.x + box.w <= outer.x + outer.w
            and outer.y <= box.y
            and box.y + box.h <= outer.y + outer.h
        )

    canvas = Box(0, 0, CANVAS, CANVAS)
    for s in styles:
        assert inside(s.view, canvas) and inside(s.zoom, Box(0, 0, 160, 210))
        assert inside(s.cam, canvas)
        if s.chat is not None:  # the game view never hides under the chat sidebar
            assert inside(s.chat, canvas) and s.chat.h == CANVAS
            assert s.view.x >= s.chat.x + s.chat.w or s.view.x + s.view.w <= s.chat.x
    heights = [s.view.h / CANVAS for s in styles]
    assert min(heights) < 0.65 and max(heights) > 0.95
    assert len({(s.view.x, s.view.y) for s in styles}) > 0.9 * len(styles)
    assert len({s.grade for s in styles}) == len(styles)
    assert {s.chat is None for s in styles} == {True, False}
    assert len({(s.cam.x, s.cam.y, s.cam.w) for s in styles}) > 0.9 * len(styles)
    assert {s.chat.x == 0 for s in styles if s.chat is not None} == {True, False}
    assert {s.frame_width > 0 for s in styles} == {True, False}
    # The six train streamers of a game each have their own layout, grade and backdrop.
    for g in range(len(GAME_POOL)):
        mine = styles[g * STREAMERS_PER_GAME : (g + 1) * STREAMERS_PER_GAME]
        assert len({(s.view, s.zoom, s.background) for s in mine}) == STREAMERS_PER_GAME


def test_streamers_of_a_game_look_different() -> None:
    # Two streamers of the same game: their average frames differ a lot, far more than two
    # halves of one streamer's frames.
    cfg = SimulateConfig(
        frames_per_period=400, size=32, seed=0, games_per_period=1, eval_fraction=0.2
    )
    frames = list(simulate_period_frames(cfg, 1, 0))
    by_stream: dict[str, list[np.ndarray]] = {}
    for f in frames:
        by_stream.setdefault(f.stream_id, []).append(np.asarray(decode_image(f.image), float))
    means = {s: np.mean(v, axis=0) for s, v in by_stream.items() if len(v) >= 20}
    assert len(means) >= 5
    names = sorted(means)
    between = [
        np.abs(means[a] - means[b]).mean() for i, a in enumerate(names) for b in names[i + 1 :]
    ]
    within = [
        np.abs(np.mean(v[: len(v) // 2], 0) - np.mean(v[len(v) // 2 :], 0)).mean()
        for v in by_stream.values()
        if len(v) >= 20
    ]
    assert min(between) > 2 * max(within)
    assert np.median(between) > 25


# -- frames ------------------------------------------------------------------------------
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
            pattern = rf"{f.category}-(s[0-{STREAMERS_PER_GAME - 1}]|e{index}\.\d+)"
            assert re.fullmatch(pattern, f.stream_id)
            assert (f.split == "eval") == ("-e" in f.stream_id)
            assert f.ts.tzinfo is not None and start <= f.ts < start + PERIOD_LENGTH
            by_stream.setdefault(f.stream_id, []).append(f)
        for stream in by_stream.values():
            stamps = [f.ts for f in stream]
            assert stamps == sorted(stamps)
        # Consecutive captured frames differ (frame skipping, moving overlays).
        ids = [frame_id(f.image) for f in frames]
        assert len(set(ids)) == len(ids)


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


def _output_mask(box: Box, size: int, pad: int) -> np.ndarray:
    """Output pixels that a canvas box can touch after resizing and JPEG coding.

    The box is mapped to output pixels and padded by ``pad``; then every 16 x 16 JPEG MCU it
    touches is included, padded by 2 more pixels for libjpeg's chroma upsampling.
    """
    scale = size / CANVAS
    y0, y1 = math.floor(box.y * scale) - pad, math.ceil((box.y + box.h) * scale) + pad
    x0, x1 = math.floor(box.x * scale) - pad, math.ceil((box.x + box.w) * scale) + pad
    y0, x0 = max(0, y0) // 16 * 16 - 2, max(0, x0) // 16 * 16 - 2
    y1, x1 = -(-y1 // 16) * 16 + 2, -(-x1 // 16) * 16 + 2
    mask = np.zeros((size, size), dtype=bool)
    mask[max(0, y0) : y1, max(0, x0) : x1] = True
    return mask


def test_facecam_and_chat_change_only_their_own_pixels() -> None:
    base = SimulateConfig(frames_per_period=40, size=64, seed=5, facecam=False, chat=False)

    def frames(**overlays: bool) -> list[tuple[Frame, np.ndarray]]:
        cfg = base.model_copy(update=overlays)
        return [
            (f, np.asarray(decode_image(f.image), np.int16))
            for f in simulate_period_frames(cfg, 2, 0)
        ]

    plain, cam, chat = frames(), frames(facecam=True), frames(chat=True)
    assert len(plain) == len(cam) == len(chat) == 40
    checked_cam = checked_chat = 0
    for (f, p), (_, c), (_, t) in zip(plain, cam, chat, strict=True):
        assert f.category is not None
        style = (
            streamer_style(base.seed, f.category, _streamer(f))
            if f.split == "train"
            else eval_streamer_style(base.seed, f.category, *_eval_clip(f))
        )
        # The game is the same play (overlays draw from their own random stream): away from
        # an overlay, the pixels are bit-identical; inside it they differ a lot.
        for overlay, image in ((style.cam, c), (style.chat, t)):
            if overlay is None:
                assert np.array_equal(p, image)
                continue
            near = _output_mask(overlay, 64, pad=2)
            assert np.array_equal(p[~near], image[~near])
            scale = 64 / CANVAS
            inner = (
                slice(math.ceil(overlay.y * scale) + 2, int((overlay.y + overlay.h) * scale) - 2),
                slice(math.ceil(overlay.x * scale) + 2, int((overlay.x + overlay.w) * scale) - 2),
            )
            assert np.abs(p[inner] - image[inner]).mean() > 10
        checked_cam += 1
        checked_chat += style.chat is not None
    assert checked_cam >= 10 and checked_chat >= 10
    # The chat scrolls: a sidebar is not frozen across a stream's frames.
    f0 = chat[0][0]
    sidebar = streamer_style(base.seed, str(f0.category), _streamer(f0)).chat
    assert sidebar is not None
    cols = slice(math.ceil(sidebar.x * 64 / CANVAS) + 1, int((sidebar.x + sidebar.w) * 64 / CANVAS))
    same_stream = [t for f, t in chat if f.stream_id == f0.stream_id]
    assert len({t[:, cols].tobytes() for t in same_stream}) > 1


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
    table = shard.read(columns=["period", "split", "width", "height", "source", "stream_id"])
    assert set(table.column("period").to_pylist()) == {"p02"}
    assert set(table.column("width").to_pylist()) == {32} == set(table.column("height").to_pylist())
    n_eval = sum(math.floor(cfg.eval_fraction * n + 0.5) for n in expected.values())
    assert manifest["splits"] == {"eval": n_eval, "train": 30 - n_eval}
    assert table.column("split").to_pylist().count("eval") == n_eval
    # The split survives the shard: eval rows come from held-out streamers of period 2.
    for split, stream in zip(
        table.column("split").to_pylist(), table.column("stream_id").to_pylist(), strict=True
    ):
        assert (split == "eval") == bool(re.fullmatch(r".+-e1\.\d+", stream))
    # A rerun produces the same bytes: same fingerprint, same manifest.
    again = simulate_period(tmp_path, "p02", 1, 3, cfg)
    assert again["fingerprint"] == manifest["fingerprint"]
