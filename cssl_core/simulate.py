"""A Twitch-like stream of Atari play: the built-in data source of ``cssl simulate``.

Each period shows a handful of games whose popularity drifts: a few "evergreen" games stay in
every period while trending games rise, peak and fade as a window slides over a seeded order
of the pool (:func:`game_schedule`). Every game is played by several streamers; each streamer
is one ``stream_id`` and keeps the same face and colours in every period.

A frame is real emulator output (``ale_py``, ROMs bundled with the package) composed like a
stream: the 160x210 game screen, a facecam from scikit-image's bundled LFW face crops in the
bottom-right corner of the game and a chat sidebar of coloured "word" bars that scrolls as new
messages arrive. The canvas is resized to ``size`` x ``size`` and JPEG-encoded.

Play. Actions are random with persistence (each action is held for a geometric number of
captured frames, as a person holds a direction). A captured frame is taken every
``frame_skip`` emulator frames. A game over resets the game, and every (re)start first plays
an unrecorded warm-up so title screens are not recorded over and over.

Split. Each game's frames in a period are cut into clips of at most :data:`SEGMENT_FRAMES`
consecutive captured frames, and whole clips are labelled ``"eval"`` or ``"train"``:
``round(eval_fraction * n)`` of a game's ``n`` frames are eval. Clips are separated by
unrecorded play (:data:`GAP_EMULATOR_FRAMES`), so no eval frame is the immediate neighbour of
a train frame; hashing each frame into a split (``ShardWriter``'s default) would put
near-identical neighbours on both sides and leak the eval set into training.

Determinism. Every random draw comes from a generator seeded by ``(seed, period index, game,
streamer, purpose)``, so period ``i`` depends only on the seed, ``i`` and the schedule, and a
DVC stage can produce one period alone. The schedule of period ``i`` does not depend on how
many periods are requested, so appending periods never changes the earlier ones.

Timestamps are synthetic: period ``i`` covers ``[EPOCH + i * PERIOD_LENGTH, EPOCH + (i + 1) *
PERIOD_LENGTH)``; each clip starts at a random time in it and its frames are
``frame_skip / 60`` seconds apart (the Atari runs at 60 frames per second). Rows are yielded
grouped by stream (game, then streamer), with time increasing within a stream.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from ale_py import ALEInterface, LoggerMode, roms
from PIL import Image

from cssl_core.config import SimulateConfig
from cssl_core.images import encode_jpeg
from cssl_core.shard import Frame, ShardWriter

# Visually distinct games (colour scheme and layout) that load in ~0.1 s and play with random
# actions without getting stuck on a menu.
GAME_POOL: tuple[str, ...] = (
    "pong",
    "breakout",
    "space_invaders",
    "ms_pacman",
    "seaquest",
    "freeway",
    "enduro",
    "boxing",
    "riverraid",
    "skiing",
    "qbert",
    "kangaroo",
)
STREAMERS_PER_GAME = 3
SEGMENT_FRAMES = 25
"""Longest clip of consecutive captured frames; a clip is all train or all eval."""
WARMUP_EMULATOR_FRAMES = (150, 450)
"""Unrecorded play after each (re)start of a game, drawn uniformly from this range."""
GAP_EMULATOR_FRAMES = (30, 120)
"""Unrecorded play between two clips of the same streamer."""
ACTION_CHANGE_PROBABILITY = 0.35
"""Chance per captured frame that the player picks a new random action."""
TRENDING_STEP_PROBABILITIES = (0.7, 0.3)
"""Chance that the trending window advances by 1 or 2 games from one period to the next."""
EVERGREEN_WEIGHT = 1.0
"""Popularity of an evergreen game, relative to a trending game at its peak (1.0)."""
POPULARITY_JITTER = 0.25
"""Standard deviation of the log-normal noise on each game's popularity in each period."""

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
PERIOD_LENGTH = timedelta(days=30)
ATARI_FPS = 60

SCREEN_HEIGHT, SCREEN_WIDTH = 210, 160
CHAT_WIDTH = 50
"""Width of the chat sidebar; 160 + 50 makes a square 210 x 210 canvas."""
CHAT_LINE_HEIGHT = 9
CHAT_MESSAGE_PROBABILITY = 0.7
"""Chance per captured frame that a new chat message scrolls in."""
CAM_SIZE = 52
"""Side of the facecam box on the 210-pixel canvas (about a quarter of the game's width)."""
CAM_MARGIN = 4

_CHAT_BACKGROUND = np.array([24, 22, 32], dtype=np.uint8)
_CHAT_TEXT = np.array([200, 200, 205], dtype=np.uint8)
_NAME_COLOURS = np.array(
    [
        [255, 69, 0],
        [30, 144, 255],
        [154, 205, 50],
        [255, 105, 180],
        [218, 165, 32],
        [138, 43, 226],
        [0, 206, 209],
        [255, 127, 80],
    ],
    dtype=np.uint8,
)

# Purposes of the random streams. Each purpose always takes the same number of keys, so no two
# streams share a seed (NumPy's SeedSequence ignores trailing zeros: [1, 2] == [1, 2, 0]).
_ORDER, _POPULARITY, _PLAN, _EMULATOR, _PLAY, _OVERLAY, _STYLE, _FACES = range(8)


def _rng(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """An independent generator for ``(seed, purpose, *keys)``; negative seeds are allowed."""
    return np.random.default_rng([abs(seed), int(seed < 0), purpose, *keys])


def _game_key(game: str) -> int:
    """A stable integer for a game name, used in seed keys."""
    return zlib.crc32(game.encode())


def _evergreen_count(games_per_period: int) -> int:
    """How many games stay in every period: a third of the slots, at least one (if 2+ slots)."""
    return max(1, games_per_period // 3) if games_per_period >= 2 else 0


def game_schedule(cfg: SimulateConfig, num_periods: int) -> list[dict[str, float]]:
    """The share of each game in each period (game -> share; the shares of a period sum to 1).

    The pool is put in a seeded order. The first ``_evergreen_count`` games are evergreen
    (present in every period); the other ``games_per_period - evergreen`` slots are a window
    that slides over the remaining games, advancing by 1 or 2 games per period and wrapping
    around the pool. A trending game enters at the newest end of the window, rises, peaks and
    fades out at the oldest end; its popularity over the window is the hump
    ``sin(pi * (k + 1) / (r + 1))`` for window position ``k`` of ``r``. Every popularity gets
    log-normal noise per period. Period ``t`` depends only on ``cfg`` and ``t``.
    """
    if num_periods < 1:
        raise ValueError(f"num_periods must be at least 1, got {num_periods}")
    slots = cfg.games_per_period
    if slots > len(GAME_POOL):
        raise ValueError(
            f"simulate.games_per_period={slots} exceeds the pool of {len(GAME_POOL)} games; "
            f"set it to at most {len(GAME_POOL)}"
        )
    order = [GAME_POOL[i] for i in _rng(cfg.seed, _ORDER).permutation(len(GAME_POOL))]
    n_evergreen = _evergreen_count(slots)
    evergreen, trending = order[:n_evergreen], order[n_evergreen:]
    width = slots - n_evergreen
    offset = 0
    schedule: list[dict[str, float]] = []
    for t in range(num_periods):
        rng = _rng(cfg.seed, _POPULARITY, t)
        step = 1 + int(rng.choice(len(TRENDING_STEP_PROBABILITIES), p=TRENDING_STEP_PROBABILITIES))
        if t > 0:
            offset += step if width >= 2 else 1
        weights = {game: EVERGREEN_WEIGHT for game in evergreen}
        for k in range(width):
            weights[trending[(offset + k) % len(trending)]] = math.sin(
                math.pi * (k + 1) / (width + 1)
            )
        noise = rng.lognormal(0.0, POPULARITY_JITTER, size=len(GAME_POOL))
        noisy = {g: w * noise[GAME_POOL.index(g)] for g, w in weights.items()}
        total = sum(noisy.values())
        schedule.append({g: float(noisy[g] / total) for g in GAME_POOL if g in noisy})
    return schedule


def frame_counts(shares: dict[str, float], total: int) -> dict[str, int]:
    """Split ``total`` frames by ``shares`` with the largest-remainder method (sums exactly)."""
    raw = {g: s * total for g, s in shares.items()}
    counts = {g: int(math.floor(v)) for g, v in raw.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(raw, key=lambda g: (-(raw[g] - counts[g]), g))
    for g in by_remainder[:left]:
        counts[g] += 1
    return counts


@dataclass(frozen=True)
class Clip:
    """A run of consecutive captured frames of one streamer, all in one split."""

    streamer: int
    frames: int
    split: str


def plan_clips(count: int, eval_fraction: float, rng: np.random.Generator) -> list[Clip]:
    """Cut one game's ``count`` frames into train and eval clips and deal them to streamers.

    Exactly ``floor(eval_fraction * count + 0.5)`` frames are eval. Each split is cut into
    near-equal clips of at most :data:`SEGMENT_FRAMES`; the clips are shuffled and each goes
    to a streamer drawn with per-period popularity weights (Dirichlet(2, ..., 2)).
    """
    n_eval = int(math.floor(eval_fraction * count + 0.5))
    clips: list[tuple[int, str]] = []
    for split, n in (("eval", n_eval), ("train", count - n_eval)):
        if n > 0:
            pieces = math.ceil(n / SEGMENT_FRAMES)
            clips += [(int(len(c)), split) for c in np.array_split(np.arange(n), pieces)]
    order = rng.permutation(len(clips))
    popularity = rng.dirichlet(np.full(STREAMERS_PER_GAME, 2.0))
    streamers = rng.choice(STREAMERS_PER_GAME, size=len(clips), p=popularity)
    return [Clip(int(s), clips[i][0], clips[i][1]) for i, s in zip(order, streamers, strict=True)]


class _Player:
    """One game in the emulator, played with random persistent actions."""

    def __init__(self, game: str, seed: int, frame_skip: int) -> None:
        self.frame_skip = frame_skip
        ALEInterface.setLoggerMode(LoggerMode.Error)
        self.ale = ALEInterface()
        self.ale.setInt("random_seed", seed % (2**31))
        self.ale.setFloat("repeat_action_probability", 0.0)
        self.ale.loadROM(roms.get_rom_path(game))
        self.actions = self.ale.getMinimalActionSet()
        self.rng = np.random.default_rng(seed)
        self.action = self.actions[0]

    def session(self, rng: np.random.Generator) -> None:
        """Start a streamer's session: reset the game and play the unrecorded warm-up."""
        self.rng = rng
        self._restart()

    def _restart(self) -> None:
        self.ale.reset_game()
        self.advance(int(self.rng.integers(*WARMUP_EMULATOR_FRAMES, endpoint=True)))

    def advance(self, emulator_frames: int) -> None:
        """Play ``emulator_frames`` frames, picking new actions as a person would."""
        for i in range(emulator_frames):
            if i % self.frame_skip == 0 and self.rng.random() < ACTION_CHANGE_PROBABILITY:
                self.action = self.actions[self.rng.integers(len(self.actions))]
            self.ale.act(self.action)
            if self.ale.game_over():
                self._restart()
                return

    def capture(self) -> np.ndarray:
        """Play ``frame_skip`` frames (new action with some probability) and grab the screen."""
        if self.rng.random() < ACTION_CHANGE_PROBABILITY:
            self.action = self.actions[self.rng.integers(len(self.actions))]
        for _ in range(self.frame_skip):
            self.ale.act(self.action)
            if self.ale.game_over():
                self._restart()
                break
        return self.ale.getScreenRGB()


@functools.cache
def _faces() -> np.ndarray:
    """The 100 face crops of scikit-image's bundled LFW subset, 25 x 25 greyscale in [0, 1]."""
    from skimage.data import lfw_subset

    return lfw_subset()[:100]


@dataclass(frozen=True)
class StreamerStyle:
    """What makes a streamer recognisable: face, webcam tint, border and chat colours."""

    face: int
    tint: tuple[float, float, float]
    border: tuple[int, int, int]


def streamer_style(seed: int, game: str, streamer: int) -> StreamerStyle:
    """The same streamer looks the same in every period: the style depends on no period."""
    faces = _rng(seed, _FACES).permutation(len(_faces()))
    slot = GAME_POOL.index(game) * STREAMERS_PER_GAME + streamer
    rng = _rng(seed, _STYLE, _game_key(game), streamer)
    tint = (1.0, float(rng.uniform(0.75, 0.95)), float(rng.uniform(0.6, 0.85)))
    red, green, blue = (int(c) for c in _NAME_COLOURS[rng.integers(len(_NAME_COLOURS))])
    return StreamerStyle(face=int(faces[slot]), tint=tint, border=(red, green, blue))


class _Overlay:
    """The facecam and chat of one streamer's session; both change from frame to frame."""

    def __init__(self, style: StreamerStyle, cfg: SimulateConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.rng = rng
        self.border = np.array(style.border, dtype=np.uint8)
        # The face is enlarged a little past the box so each frame can show it shifted by a
        # few pixels (a person moving in front of the webcam).
        inner = CAM_SIZE - 4
        face = Image.fromarray((_faces()[style.face] * 255).astype(np.uint8))
        face_big = np.asarray(face.resize((inner + 6, inner + 6), Image.BILINEAR), np.float32)
        self.face = face_big[..., None] * np.array(style.tint, dtype=np.float32)
        self.inner = inner
        self.chat = np.empty((SCREEN_HEIGHT, CHAT_WIDTH, 3), dtype=np.uint8)
        self.chat[:] = _CHAT_BACKGROUND
        for _ in range(SCREEN_HEIGHT // CHAT_LINE_HEIGHT):
            self._new_message()

    def _new_message(self) -> None:
        """Scroll the chat up one line and write a message: a coloured name, then words."""
        h = CHAT_LINE_HEIGHT
        self.chat[:-h] = self.chat[h:]
        line = self.chat[-h:]
        line[:] = _CHAT_BACKGROUND
        bar = slice(2, 6)
        x = 2
        name = int(self.rng.integers(6, 14))
        line[bar, x : x + name] = _NAME_COLOURS[self.rng.integers(len(_NAME_COLOURS))]
        x += name + 3
        for _ in range(int(self.rng.integers(1, 5))):
            word = int(self.rng.integers(3, 10))
            if x + word > CHAT_WIDTH - 2:
                break
            line[bar, x : x + word] = _CHAT_TEXT
            x += word + 2

    def compose(self, screen: np.ndarray) -> np.ndarray:
        """Lay out one canvas: game (+ facecam) on the left, chat on the right."""
        width = SCREEN_WIDTH + (CHAT_WIDTH if self.cfg.chat else 0)
        canvas = np.empty((SCREEN_HEIGHT, width, 3), dtype=np.uint8)
        canvas[:, :SCREEN_WIDTH] = screen
        if self.cfg.facecam:
            y0 = SCREEN_HEIGHT - CAM_SIZE - CAM_MARGIN
            x0 = SCREEN_WIDTH - CAM_SIZE - CAM_MARGIN
            canvas[y0 : y0 + CAM_SIZE, x0 : x0 + CAM_SIZE] = self.border
            dy, dx = (int(v) for v in self.rng.integers(0, 7, size=2))
            gain = float(self.rng.uniform(0.9, 1.1))
            face = self.face[dy : dy + self.inner, dx : dx + self.inner] * gain
            canvas[y0 + 2 : y0 + 2 + self.inner, x0 + 2 : x0 + 2 + self.inner] = np.clip(
                face, 0, 255
            ).astype(np.uint8)
        if self.cfg.chat:
            if self.rng.random() < CHAT_MESSAGE_PROBABILITY:
                self._new_message()
            canvas[:, SCREEN_WIDTH:] = self.chat
        return canvas


def _period_start(index: int) -> datetime:
    return EPOCH + index * PERIOD_LENGTH


def simulate_period_frames(cfg: SimulateConfig, num_periods: int, index: int) -> Iterator[Frame]:
    """Yield the ``cfg.frames_per_period`` frames of period ``index`` (0-based).

    Frames carry ``category`` (the game), ``source`` (``"ale:<game>"``), ``stream_id``
    (``"<game>-s<k>"``), a synthetic UTC ``ts`` inside the period and an explicit ``split``
    (whole clips are eval; see the module docstring).
    """
    if not 0 <= index < num_periods:
        raise ValueError(f"period index {index} is outside 0..{num_periods - 1}")
    shares = game_schedule(cfg, num_periods)[index]
    counts = frame_counts(shares, cfg.frames_per_period)
    start = _period_start(index)
    period_ms = int(PERIOD_LENGTH.total_seconds() * 1000)
    frame_ms = cfg.frame_skip * 1000 / ATARI_FPS
    plan_rng = _rng(cfg.seed, _PLAN, index)
    for game, count in counts.items():
        if count == 0:
            continue
        gkey = _game_key(game)
        clips = plan_clips(count, cfg.eval_fraction, plan_rng)
        ale_seed = int(_rng(cfg.seed, _EMULATOR, index, gkey).integers(2**31))
        player = _Player(game, ale_seed, cfg.frame_skip)
        for streamer in range(STREAMERS_PER_GAME):
            mine = [c for c in clips if c.streamer == streamer]
            if not mine:
                continue
            play_rng = _rng(cfg.seed, _PLAY, index, gkey, streamer)
            overlay_rng = _rng(cfg.seed, _OVERLAY, index, gkey, streamer)
            overlay = _Overlay(streamer_style(cfg.seed, game, streamer), cfg, overlay_rng)
            player.session(play_rng)
            longest = max(c.frames for c in mine) * frame_ms
            starts = np.sort(play_rng.uniform(0, period_ms - longest, size=len(mine)))
            stream_id = f"{game}-s{streamer}"
            for n, (clip, clip_start) in enumerate(zip(mine, starts, strict=True)):
                if n:
                    player.advance(int(play_rng.integers(*GAP_EMULATOR_FRAMES, endpoint=True)))
                for j in range(clip.frames):
                    canvas = overlay.compose(player.capture())
                    img = Image.fromarray(canvas).resize((cfg.size, cfg.size), Image.BILINEAR)
                    yield Frame(
                        image=encode_jpeg(img),
                        stream_id=stream_id,
                        ts=start + timedelta(milliseconds=round(clip_start + j * frame_ms)),
                        source=f"ale:{game}",
                        category=game,
                        split=clip.split,
                    )


def simulate_period(
    out: Path,
    period: str,
    index: int,
    num_periods: int,
    cfg: SimulateConfig,
    rows_per_group: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Simulate period ``index`` and publish it as the shard ``out/<period>``.

    Returns the manifest from :meth:`ShardWriter.commit`. ``progress(n)`` is called with the
    number of frames just added (in batches, so a progress bar costs nothing measurable).
    """
    pending = 0
    with ShardWriter(
        out, period, eval_fraction=cfg.eval_fraction, rows_per_group=rows_per_group
    ) as writer:
        for frame in simulate_period_frames(cfg, num_periods, index):
            writer.add(frame)
            pending += 1
            if progress is not None and pending >= 50:
                progress(pending)
                pending = 0
        manifest = writer.commit()
    if progress is not None and pending:
        progress(pending)
    return manifest
