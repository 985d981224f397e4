"""A Twitch-like stream of Atari play: the built-in data source of ``cssl simulate``.

Each period shows a handful of games whose popularity drifts: a few "evergreen" games stay in
every period while trending games rise, peak and fade as a window slides over a seeded order
of the pool (:func:`game_schedule`, ``simulate.schedule: drifting``, the default). A list of
regimes instead gives known truth for drift detection: static stretches with the same mix,
sudden switches to new games and gradual take-overs (:func:`regime_schedule`). The train split
of every game is played by :data:`STREAMERS_PER_GAME` streamers; each is one ``stream_id`` and
keeps the same look in every period. The eval split is played by streamers seen once.

Look. A frame is real emulator output (``ale_py``, ROMs bundled with the package) composed
like a stream on a :data:`CANVAS` x :data:`CANVAS` canvas, then resized to ``size`` x ``size``
and JPEG-encoded. Streamers show the same game in very different ways
(:func:`streamer_style`, fixed per streamer): the game view is zoomed into part of the game
screen, stretched to its own aspect and drawn at 60-100% of the canvas height at its own
place; the capture is colour graded (hue rotation, saturation, brightness, contrast, channel
gains: one affine colour matrix, :func:`colour_grade_matrix`); the rest of the canvas is a
gradient background, optionally with stripes and a frame around the game; a facecam (one of
scikit-image's bundled LFW face crops, tinted, moving a little from frame to frame) sits at a
corner of the game or of the canvas (every streamer has one: its small per-frame motion also
keeps two frames of a paused game from being byte-identical duplicates); a chat sidebar of
coloured "word" bars in the streamer's theme scrolls on the left or right, or there is none.
So a game cannot be told by layout or palette alone: the game's own content (sprites,
playfield, motion) is what its streamers share.

Play. Actions are random with persistence (each action is held for a geometric number of
captured frames, as a person holds a direction). A captured frame is taken every
``frame_skip`` emulator frames. A game over resets the game, and every (re)start first plays
an unrecorded warm-up so title screens are not recorded over and over.

Split. Evaluation must measure recognising a game on streamers the model never saw, and
must be able to tell two models apart. Each game's frames in a period are
``round(eval_fraction * n)`` eval frames and the rest train frames (:func:`plan_clips`). Train
frames are cut into clips of at most :data:`SEGMENT_FRAMES` consecutive captured frames, dealt
to the game's :data:`STREAMERS_PER_GAME` train streamers. Eval frames are cut into clips of
``eval_clip_frames`` frames, and **every eval clip is played by its own held-out streamer**
(:func:`eval_streamer_style`: a look drawn like a train streamer's, with a face no train
streamer shows, keyed by period, game and clip), so no eval look ever appears in a train split
and eval clips are independent units: the clip (its ``stream_id``) is the cluster of a
bootstrap interval, and the number of eval clips, not of eval frames, sets its width
(docs/benchmarks.md, "Sizing an eval split"). Clips of a streamer are separated by unrecorded
play (:data:`GAP_EMULATOR_FRAMES`), and so are consecutive eval clips of a game.

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

import colorsys
import functools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from ale_py import ALEInterface, LoggerMode, roms
from PIL import Image

from cssl_core.config import SimulateConfig
from cssl_core.data.images import encode_jpeg
from cssl_core.data.shard import Frame, ShardWriter

# Games that load in ~0.1 s and play with random actions without getting stuck on a menu.
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
STREAMERS_PER_GAME = 6
"""Train streamers per game; 12 games x 6 streamers show 72 of the 100 faces available."""
TRAIN_FACES = len(GAME_POOL) * STREAMERS_PER_GAME
"""Faces of the seeded face order that train streamers show; eval streamers show the others."""
SEGMENT_FRAMES = 25
"""Longest train clip of consecutive captured frames (an eval clip has ``eval_clip_frames``)."""
STREAMER_POPULARITY_CONCENTRATION = 2.0
"""Dirichlet concentration of how a period's clips are dealt to a split's streamers."""
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
CANVAS = 224
"""Side of the square canvas a frame is composed on before it is resized to ``size``."""

# Streamer styles: the ranges each streamer's look is drawn from (uniform unless noted).
VIEW_HEIGHT = (0.6, 1.0)
"""Height of the game view as a fraction of the canvas."""
VIEW_ASPECT = (0.75, 1.4)
"""Width / height of the game view (stretched or squeezed; capped by the free width)."""
ZOOM = (1.0, 1.45)
"""Zoom into the game screen: the view shows ``1 / zoom`` of its width and of its height."""
HUE_ROTATION = 0.3
"""Largest hue rotation of the colour grade, in turns (either direction)."""
SATURATION = (0.45, 1.5)
BRIGHTNESS = (0.7, 1.25)
CONTRAST = (0.65, 1.3)
CHANNEL_GAIN = (0.85, 1.15)
CHAT_PROBABILITY = 0.8
"""Chance that a streamer shows a chat sidebar."""
CHAT_WIDTH = (0.16, 0.3)
"""Width of the chat sidebar as a fraction of the canvas."""
CHAT_LINE_HEIGHT = 9
CHAT_MESSAGE_PROBABILITY = 0.7
"""Chance per captured frame that a new chat message scrolls in."""
CAM_SIZE = (0.18, 0.36)
"""Side of the facecam box as a fraction of the canvas."""
FRAME_PROBABILITY = 0.5
"""Chance that a streamer draws a frame around the game view."""
FRAME_WIDTH = (2, 7)
STRIPES_PROBABILITY = 0.35
"""Chance that a streamer's background has diagonal stripes."""

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
_LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R 601 luma weights: the grey that saturation changes keep."""

# Purposes of the random streams. Each purpose always takes the same number of keys, so no two
# streams share a seed (NumPy's SeedSequence ignores trailing zeros: [1, 2] == [1, 2, 0]).
_ORDER, _POPULARITY, _PLAN, _EMULATOR, _PLAY, _OVERLAY, _STYLE, _FACES, _EVAL_STYLE = range(9)


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

    With ``cfg.schedule`` a list of regimes this is :func:`regime_schedule`. Otherwise
    (``drifting``) the pool is put in a seeded order. The first ``_evergreen_count`` games are
    evergreen (present in every period); the other ``games_per_period - evergreen`` slots are
    a window that slides over the remaining games, advancing by 1 or 2 games per period and
    wrapping around the pool. A trending game enters at the newest end of the window, rises,
    peaks and fades out at the oldest end; its popularity over the window is the hump
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
    if not isinstance(cfg.schedule, str):
        return regime_schedule(cfg, num_periods)
    order = _pool_order(cfg.seed)
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


def _pool_order(seed: int) -> list[str]:
    """The game pool in the seed's order (both kinds of schedule take games from it)."""
    return [GAME_POOL[i] for i in _rng(seed, _ORDER).permutation(len(GAME_POOL))]


def regime_schedule(cfg: SimulateConfig, num_periods: int) -> list[dict[str, float]]:
    r"""The game shares of ``num_periods`` periods of a stream made of ``cfg.schedule`` regimes.

    The stream starts from the first ``games_per_period`` games of the seeded pool order, in
    equal shares. Regimes follow one another, each for its ``periods`` periods:

    - ``static``: the mix ``m`` stays exactly the same (no popularity noise);
    - ``sudden`` and ``gradual``: ``games`` new games (the next games of the seeded order that
      are not in the mix, wrapping around the pool) take a share ``s_k`` of the frames in the
      regime's ``k``-th period (``k = 1..K``), equally among them, while the games of the mix
      ``m`` the regime started from keep the rest in their proportions:

      .. math:: m_k(g) = (1 - s_k)\, m(g) + s_k\, \mathbb{1}[g \in \text{new}] / |\text{new}|

      with ``s_k = share`` (sudden) or ``s_k = share * k / K`` (gradual). A game whose share
      reaches 0 leaves the mix.

    There is no randomness beyond the pool order, so period ``t`` depends only on ``cfg`` and
    ``t``. Requesting more periods than the regimes cover is an error (add a regime).
    """
    regimes = cfg.schedule
    if isinstance(regimes, str):
        raise ValueError(f"simulate.schedule is {regimes!r}, not a list of regimes")
    covered = sum(r.periods for r in regimes)
    if num_periods > covered:
        raise ValueError(
            f"simulate.schedule covers {covered} periods but {num_periods} were requested; "
            "add a regime (e.g. {kind: static, periods: N}) to cover them"
        )
    order = _pool_order(cfg.seed)
    slots = cfg.games_per_period
    mix = {g: 1.0 / slots for g in order[:slots]}
    cursor = slots
    schedule: list[dict[str, float]] = []
    for number, regime in enumerate(regimes, start=1):
        if len(schedule) >= num_periods:
            break
        if regime.kind == "static":
            schedule += [dict(mix) for _ in range(regime.periods)]
            continue
        wanted = regime.games or slots
        free = [order[(cursor + i) % len(order)] for i in range(len(order))]
        new = [g for g in free if g not in mix][:wanted]
        if len(new) < wanted:
            raise ValueError(
                f"simulate.schedule regime {number} ({regime.kind}) needs {wanted} games not "
                f"in the mix, but only {len(new)} of the pool's {len(GAME_POOL)} are left; "
                "lower its games or raise the share of an earlier regime"
            )
        cursor = (order.index(new[-1]) + 1) % len(order)
        share = 1.0 if regime.share is None else regime.share
        base = mix
        for k in range(1, regime.periods + 1):
            s = share if regime.kind == "sudden" else share * k / regime.periods
            mix = _blend(base, new, s)
            schedule.append(mix)
    return schedule[:num_periods]


def _blend(base: dict[str, float], new: Sequence[str], share: float) -> dict[str, float]:
    """``(1 - share) * base`` plus ``share`` split equally over ``new``; in pool order."""
    mixed = {g: (1.0 - share) * w for g, w in base.items()}
    for g in new:
        mixed[g] = mixed.get(g, 0.0) + share / len(new)
    return {g: mixed[g] for g in GAME_POOL if mixed.get(g, 0.0) > 0.0}


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
    """A run of consecutive captured frames of one streamer, all in one split.

    ``streamer`` is a train streamer (``0..STREAMERS_PER_GAME - 1``) for a train clip and the
    clip's own number among the game's eval clips of the period for an eval clip (each eval
    clip has its own held-out streamer, :func:`eval_streamer_style`).
    """

    streamer: int
    frames: int
    split: str


def plan_clips(
    count: int,
    eval_fraction: float,
    rng: np.random.Generator,
    eval_clip_frames: int = 1,
    num_streamers: int = STREAMERS_PER_GAME,
) -> list[Clip]:
    """Cut one game's ``count`` frames into train and eval clips.

    Exactly ``floor(eval_fraction * count + 0.5)`` frames are eval, cut into clips of
    ``eval_clip_frames`` (the last one shorter when it does not divide), numbered ``0, 1, ...``
    in order: each is its own held-out streamer. The train frames are cut into near-equal
    clips of at most :data:`SEGMENT_FRAMES`, each dealt to one of ``num_streamers`` train
    streamers drawn with per-period popularity weights (Dirichlet with
    :data:`STREAMER_POPULARITY_CONCENTRATION`). Eval clips come first, then the train clips in
    a shuffled order.
    """
    if eval_clip_frames < 1 or num_streamers < 1:
        raise ValueError(
            f"eval_clip_frames={eval_clip_frames} and num_streamers={num_streamers} must be >= 1"
        )
    n_eval = int(math.floor(eval_fraction * count + 0.5))
    clips = [
        Clip(k, min(eval_clip_frames, n_eval - start), "eval")
        for k, start in enumerate(range(0, n_eval, eval_clip_frames))
    ]
    n_train = count - n_eval
    popularity = rng.dirichlet(np.full(num_streamers, STREAMER_POPULARITY_CONCENTRATION))
    if n_train:
        chunks = np.array_split(np.arange(n_train), math.ceil(n_train / SEGMENT_FRAMES))
        owners = rng.choice(num_streamers, size=len(chunks), p=popularity)
        train = [Clip(int(s), len(c), "train") for s, c in zip(owners, chunks, strict=True)]
        clips += [train[i] for i in rng.permutation(len(train))]
    return clips


class _Player:
    """One game in the emulator, played with random persistent actions."""

    def __init__(self, game: str, seed: int, frame_skip: int) -> None:
        self.game = game
        self.frame_skip = frame_skip
        ALEInterface.setLoggerMode(LoggerMode.Error)
        self.ale = ALEInterface()
        self.ale.setInt("random_seed", seed % (2**31))
        self.ale.setFloat("repeat_action_probability", 0.0)
        rom = roms.get_rom_path(game)
        if rom is None:
            raise ValueError(f"ale-py ships no ROM for the game {game!r}")
        self.ale.loadROM(rom)
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


# -- streamer styles ---------------------------------------------------------------------
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in pixels: left ``x``, top ``y``, width ``w``, height ``h``."""

    x: int
    y: int
    w: int
    h: int

    @property
    def rows(self) -> slice:
        return slice(self.y, self.y + self.h)

    @property
    def cols(self) -> slice:
        return slice(self.x, self.x + self.w)


def colour_grade_matrix(
    hue: float,
    saturation: float,
    brightness: float,
    contrast: float,
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[float, ...]:
    """A colour grade as one affine map of RGB, in PIL's 12-number ``convert`` layout.

    Applied to a pixel ``x`` (0-255) in this order: rotate the hue by ``hue`` turns about
    the grey axis (Rodrigues' rotation about ``(1, 1, 1) / sqrt(3)``: greys stay put and a
    third of a turn maps red to green); mix with the luma grey ``l = 0.299 r + 0.587 g +
    0.114 b``: ``s x + (1 - s) l``; stretch the contrast about mid-grey: ``c (x - 128) +
    128``; scale by ``brightness`` and then by the per-channel ``gains`` (a tint). Returns
    ``(a_rr, a_rg, a_rb, o_r, a_gr, ..., o_b)``: output channel ``k`` is
    ``sum_j a_kj x_j + o_k`` (PIL clips to 0-255).
    """
    angle = 2.0 * math.pi * hue
    cos, sin = math.cos(angle), math.sin(angle)
    axis = np.ones(3) / math.sqrt(3.0)
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    rotate = cos * np.eye(3) + sin * cross + (1.0 - cos) * np.outer(axis, axis)
    saturate = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), _LUMA)
    scale = np.diag(gains) * brightness
    linear = scale @ (contrast * saturate @ rotate)
    offset = scale @ np.full(3, 128.0 * (1.0 - contrast))
    return tuple(float(v) for v in np.column_stack([linear, offset]).reshape(-1))


@dataclass(frozen=True)
class StreamerStyle:
    """What a streamer's frames look like, fixed for the streamer across periods.

    Boxes are on the :data:`CANVAS` x :data:`CANVAS` canvas except ``zoom`` (on the 160 x 210
    game screen: the part of it the view shows). ``chat`` is ``None`` when the streamer shows
    no chat; ``frame_width`` 0 means no frame around the game view.
    """

    face: int
    zoom: Box
    view: Box
    grade: tuple[float, ...]
    background: tuple[Colour, Colour]
    stripes: bool
    frame_width: int
    accent: Colour
    cam: Box
    cam_tint: tuple[float, float, float]
    chat: Box | None
    chat_background: Colour
    chat_text: Colour


def _hsv(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> Colour:
    h, s, v = rng.uniform(), rng.uniform(*sat), rng.uniform(*val)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (round(255 * r), round(255 * g), round(255 * b))


def _cam_box(rng: np.random.Generator, view: Box) -> Box:
    """A facecam at a corner of the game view (inside it) or of the canvas."""
    side = round(rng.uniform(*CAM_SIZE) * CANVAS)
    margin = int(rng.integers(0, 9))
    host = view if rng.random() < 0.5 else Box(0, 0, CANVAS, CANVAS)
    right, bottom = bool(rng.integers(2)), bool(rng.integers(2))
    x = host.x + host.w - side - margin if right else host.x + margin
    y = host.y + host.h - side - margin if bottom else host.y + margin
    x, y = min(max(x, 0), CANVAS - side), min(max(y, 0), CANVAS - side)
    return Box(x, y, side, side)


def _face_order(seed: int) -> np.ndarray:
    """The seed's order of the face crops: train streamers show the first
    :data:`TRAIN_FACES`, eval streamers the rest."""
    return _rng(seed, _FACES).permutation(len(_faces()))


def streamer_style(seed: int, game: str, streamer: int) -> StreamerStyle:
    """Draw a train streamer's look; it depends on ``(seed, game, streamer)`` and on no period.

    The layout is drawn the same way whether or not ``simulate.chat`` / ``simulate.facecam``
    are on (they only decide what is drawn), so switching an overlay off keeps the game view.
    """
    if not 0 <= streamer < STREAMERS_PER_GAME:
        raise ValueError(f"streamer must be in 0..{STREAMERS_PER_GAME - 1}, got {streamer}")
    slot = GAME_POOL.index(game) * STREAMERS_PER_GAME + streamer
    face = int(_face_order(seed)[slot])
    return _draw_style(_rng(seed, _STYLE, _game_key(game), streamer), face)


def eval_streamer_style(seed: int, game: str, period_index: int, clip: int) -> StreamerStyle:
    """The look of the held-out streamer who plays eval clip ``clip`` of ``game`` in period
    ``period_index``: drawn from the same ranges as a train streamer's, showing one of the
    faces no train streamer shows, and never used for anything else."""
    if clip < 0 or period_index < 0:
        raise ValueError(f"period_index and clip must be >= 0, got {period_index}, {clip}")
    rng = _rng(seed, _EVAL_STYLE, _game_key(game), period_index, clip)
    unused = _face_order(seed)[TRAIN_FACES:]
    face = int(unused[rng.integers(len(unused))])
    return _draw_style(rng, face)


def _draw_style(rng: np.random.Generator, face: int) -> StreamerStyle:
    """A streamer's look from ``rng`` (layout, grade, backdrop, facecam, chat) with ``face``."""
    # Chat sidebar: a side and a width, or none; the game view lives in the rest.
    chat: Box | None = None
    free = Box(0, 0, CANVAS, CANVAS)
    if rng.random() < CHAT_PROBABILITY:
        width = round(rng.uniform(*CHAT_WIDTH) * CANVAS)
        left = bool(rng.integers(2))
        chat = Box(0 if left else CANVAS - width, 0, width, CANVAS)
        free = Box(width if left else 0, 0, CANVAS - width, CANVAS)
    height = round(rng.uniform(*VIEW_HEIGHT) * CANVAS)
    width = min(free.w, round(height * rng.uniform(*VIEW_ASPECT)))
    view = Box(
        free.x + int(rng.integers(0, free.w - width, endpoint=True)),
        int(rng.integers(0, CANVAS - height, endpoint=True)),
        width,
        height,
    )
    zoom = rng.uniform(*ZOOM)
    zw, zh = round(SCREEN_WIDTH / zoom), round(SCREEN_HEIGHT / zoom)
    zoom_box = Box(
        int(rng.integers(0, SCREEN_WIDTH - zw, endpoint=True)),
        int(rng.integers(0, SCREEN_HEIGHT - zh, endpoint=True)),
        zw,
        zh,
    )
    grade = colour_grade_matrix(
        hue=float(rng.uniform(-HUE_ROTATION, HUE_ROTATION)),
        saturation=float(rng.uniform(*SATURATION)),
        brightness=float(rng.uniform(*BRIGHTNESS)),
        contrast=float(rng.uniform(*CONTRAST)),
        gains=(
            float(rng.uniform(*CHANNEL_GAIN)),
            float(rng.uniform(*CHANNEL_GAIN)),
            float(rng.uniform(*CHANNEL_GAIN)),
        ),
    )
    background = (_hsv(rng, (0.2, 0.9), (0.1, 0.8)), _hsv(rng, (0.2, 0.9), (0.1, 0.8)))
    stripes = bool(rng.random() < STRIPES_PROBABILITY)
    frame_width = (
        int(rng.integers(*FRAME_WIDTH, endpoint=True)) if rng.random() < FRAME_PROBABILITY else 0
    )
    accent = _hsv(rng, (0.5, 1.0), (0.6, 1.0))
    cam = _cam_box(rng, view)
    cam_tint = (1.0, float(rng.uniform(0.75, 0.95)), float(rng.uniform(0.6, 0.85)))
    dark_chat = rng.random() < 0.7
    chat_background = _hsv(rng, (0.0, 0.4), (0.05, 0.2) if dark_chat else (0.8, 0.97))
    chat_text = _hsv(rng, (0.0, 0.15), (0.75, 0.95) if dark_chat else (0.1, 0.3))
    return StreamerStyle(
        face=face,
        zoom=zoom_box,
        view=view,
        grade=grade,
        background=background,
        stripes=stripes,
        frame_width=frame_width,
        accent=accent,
        cam=cam,
        cam_tint=cam_tint,
        chat=chat,
        chat_background=chat_background,
        chat_text=chat_text,
    )


def _backdrop(style: StreamerStyle) -> np.ndarray:
    """The static part of a streamer's canvas: gradient, stripes and the game view's frame."""
    top, bottom = (np.array(c, dtype=np.float32) for c in style.background)
    ramp = np.linspace(0.0, 1.0, CANVAS, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top + (bottom - top) * ramp, (CANVAS, CANVAS, 3)).copy()
    if style.stripes:
        yy, xx = np.mgrid[:CANVAS, :CANVAS]
        canvas[(xx + yy) % 24 < 8] *= 0.75
    canvas = canvas.astype(np.uint8)
    if style.frame_width:
        v, f = style.view, style.frame_width
        y0, x0 = max(v.y - f, 0), max(v.x - f, 0)
        canvas[y0 : v.y + v.h + f, x0 : v.x + v.w + f] = style.accent
    return canvas


class _Chat:
    """A scrolling chat sidebar: lines of a coloured name bar followed by word bars."""

    def __init__(self, box: Box, style: StreamerStyle, rng: np.random.Generator) -> None:
        self.box = box
        self.background = np.array(style.chat_background, dtype=np.uint8)
        self.text = np.array(style.chat_text, dtype=np.uint8)
        self.rng = rng
        self.pixels = np.empty((box.h, box.w, 3), dtype=np.uint8)
        self.pixels[:] = self.background
        for _ in range(box.h // CHAT_LINE_HEIGHT):
            self.new_message()

    def new_message(self) -> None:
        """Scroll up one line and write a message: a coloured name, then words."""
        h, width = CHAT_LINE_HEIGHT, self.box.w
        self.pixels[:-h] = self.pixels[h:]
        line = self.pixels[-h:]
        line[:] = self.background
        bar = slice(2, 6)
        x = 2
        name = int(self.rng.integers(6, 14))
        line[bar, x : x + name] = _NAME_COLOURS[self.rng.integers(len(_NAME_COLOURS))]
        x += name + 3
        for _ in range(int(self.rng.integers(1, 5))):
            word = int(self.rng.integers(3, 10))
            if x + word > width - 2:
                break
            line[bar, x : x + word] = self.text
            x += word + 2


class _Overlay:
    """Composes one streamer's canvases; facecam and chat change from frame to frame."""

    def __init__(self, style: StreamerStyle, cfg: SimulateConfig, rng: np.random.Generator):
        self.style = style
        self.cfg = cfg
        self.rng = rng
        self.backdrop = _backdrop(style)
        z = style.zoom
        self.zoom = (z.x, z.y, z.x + z.w, z.y + z.h)
        # The face is enlarged a little past the box so each frame can show it shifted by a
        # few pixels (a person moving in front of the webcam).
        self.inner = style.cam.w - 4
        face = Image.fromarray((_faces()[style.face] * 255).astype(np.uint8))
        big = face.resize((self.inner + 6, self.inner + 6), Image.Resampling.BILINEAR)
        tint = np.array(style.cam_tint, dtype=np.float32)
        self.face = np.asarray(big, np.float32)[..., None] * tint
        self.chat = None if style.chat is None else _Chat(style.chat, style, rng)

    def compose(self, screen: np.ndarray) -> np.ndarray:
        """Lay out one canvas: backdrop, graded game view, then chat and facecam on top."""
        style = self.style
        canvas = self.backdrop.copy()
        view = Image.fromarray(screen).resize(
            (style.view.w, style.view.h), Image.Resampling.BILINEAR, box=self.zoom
        )
        canvas[style.view.rows, style.view.cols] = np.asarray(view.convert("RGB", style.grade))
        chat = self.chat
        if chat is not None and self.cfg.chat:
            if self.rng.random() < CHAT_MESSAGE_PROBABILITY:
                chat.new_message()
            canvas[chat.box.rows, chat.box.cols] = chat.pixels
        cam = style.cam
        if self.cfg.facecam:
            canvas[cam.rows, cam.cols] = style.accent
            dy, dx = (int(v) for v in self.rng.integers(0, 7, size=2))
            gain = float(self.rng.uniform(0.9, 1.1))
            face = self.face[dy : dy + self.inner, dx : dx + self.inner] * gain
            canvas[cam.y + 2 : cam.y + 2 + self.inner, cam.x + 2 : cam.x + 2 + self.inner] = (
                np.clip(face, 0, 255).astype(np.uint8)
            )
        return canvas


def _period_start(index: int) -> datetime:
    return EPOCH + index * PERIOD_LENGTH


def _clip_frames(
    cfg: SimulateConfig,
    player: _Player,
    overlay: _Overlay,
    clip: Clip,
    stream_id: str,
    period_start: datetime,
    offset_ms: float,
) -> Iterator[Frame]:
    """The frames of one clip: captured from ``player``, composed by ``overlay``, JPEG-coded;
    the clip starts ``offset_ms`` into the period."""
    frame_ms = cfg.frame_skip * 1000 / ATARI_FPS
    for j in range(clip.frames):
        canvas = overlay.compose(player.capture())
        img = Image.fromarray(canvas).resize((cfg.size, cfg.size), Image.Resampling.BILINEAR)
        yield Frame(
            image=encode_jpeg(img),
            stream_id=stream_id,
            ts=period_start + timedelta(milliseconds=round(offset_ms + j * frame_ms)),
            source=f"ale:{player.game}",
            category=player.game,
            split=clip.split,
        )


def simulate_period_frames(cfg: SimulateConfig, num_periods: int, index: int) -> Iterator[Frame]:
    """Yield the ``cfg.frames_per_period`` frames of period ``index`` (0-based).

    Frames carry ``category`` (the game), ``source`` (``"ale:<game>"``), ``stream_id``, a
    synthetic UTC ``ts`` inside the period and an explicit ``split``. A train frame's stream
    is its train streamer, ``"<game>-s<k>"``; an eval frame's is its clip's own held-out
    streamer, ``"<game>-e<period>.<clip>"`` (see the module docstring).
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
        clips = plan_clips(count, cfg.eval_fraction, plan_rng, cfg.eval_clip_frames)
        ale_seed = int(_rng(cfg.seed, _EMULATOR, index, gkey).integers(2**31))
        player = _Player(game, ale_seed, cfg.frame_skip)

        for streamer in range(STREAMERS_PER_GAME):
            mine = [c for c in clips if c.split == "train" and c.streamer == streamer]
            if not mine:
                continue
            play_rng = _rng(cfg.seed, _PLAY, index, gkey, streamer)
            overlay_rng = _rng(cfg.seed, _OVERLAY, index, gkey, streamer)
            overlay = _Overlay(streamer_style(cfg.seed, game, streamer), cfg, overlay_rng)
            player.session(play_rng)
            longest = max(c.frames for c in mine) * frame_ms
            starts = np.sort(play_rng.uniform(0, period_ms - longest, size=len(mine)))
            for n, (clip, clip_start) in enumerate(zip(mine, starts, strict=True)):
                if n:
                    player.advance(int(play_rng.integers(*GAP_EMULATOR_FRAMES, endpoint=True)))
                stream_id = f"{game}-s{streamer}"
                yield from _clip_frames(cfg, player, overlay, clip, stream_id, start, clip_start)
        # The eval clips: one play session of the game, each clip shown by its own streamer.
        evals = [c for c in clips if c.split == "eval"]
        if evals:
            play_rng = _rng(cfg.seed, _PLAY, index, gkey, STREAMERS_PER_GAME)
            player.session(play_rng)
        for clip in evals:
            if clip.streamer:
                player.advance(int(play_rng.integers(*GAP_EMULATOR_FRAMES, endpoint=True)))
            style = eval_streamer_style(cfg.seed, game, index, clip.streamer)
            # Overlay motion keys after the train streamers' (0..STREAMERS_PER_GAME - 1).
            rng = _rng(cfg.seed, _OVERLAY, index, gkey, STREAMERS_PER_GAME + clip.streamer)
            clip_start = float(play_rng.uniform(0, period_ms - clip.frames * frame_ms))
            stream_id = f"{game}-e{index}.{clip.streamer}"
            overlay = _Overlay(style, cfg, rng)
            yield from _clip_frames(cfg, player, overlay, clip, stream_id, start, clip_start)


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
