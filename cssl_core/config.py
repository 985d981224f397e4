"""One typed configuration, loaded from ``params.yaml`` (DVC's convention).

Every section is a frozen pydantic model with ``extra="forbid"``: a misspelt key is an error
that names the key, not a silently ignored setting. Derived values (for example the period
before a given one) are computed by functions, never written back into the config.

Overrides come as dotted ``key=value`` strings (``train.steps=50``) and are merged into the
YAML before validation, so the logged config is exactly the one that ran.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cssl_core.learn.strategy import STRATEGY_NAMES, strategy_spec

DEFAULT_PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


PERIOD_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def is_period_name(name: str) -> bool:
    """Whether ``name`` can name a period (:data:`PERIOD_NAME`: a path component, a tag)."""
    return re.match(PERIOD_NAME, name) is not None


@dataclass(frozen=True)
class PeriodChain:
    """A period and the periods the stream went through before it, oldest first.

    ``periods[-1]`` is the period; the one before it is its ``previous`` (whose replay memory
    it continues from) and its position is its ``index`` (what a strategy that retrains on the
    history, and the simulator, need). For a period declared in ``params.yaml`` the chain is
    the declared one (:meth:`Params.chain`); for a period that is not, the orchestration layer
    builds it from the periods the registry has refreshed (``pipelines.registry``), so a new
    period needs no edit of ``params.yaml``.
    """

    periods: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.periods:
            raise ConfigError("a period chain needs at least the period itself")
        bad = [p for p in self.periods if not is_period_name(p)]
        if bad:
            raise ConfigError(f"period name {bad[0]!r} must match {PERIOD_NAME}")
        if len(set(self.periods)) != len(self.periods):
            raise ConfigError(f"a period appears twice in the chain {list(self.periods)}")

    @property
    def period(self) -> str:
        return self.periods[-1]

    @property
    def previous(self) -> str:
        """The period before this one ("" for the first of the stream)."""
        return self.periods[-2] if len(self.periods) > 1 else ""

    @property
    def index(self) -> int:
        """Position in the stream (0 for the first period)."""
        return len(self.periods) - 1

    @property
    def history(self) -> tuple[str, ...]:
        """The periods before this one, oldest first."""
        return self.periods[:-1]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def _parse_duration(value: Any) -> Any:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` as a timedelta; anything else goes on to
    pydantic (a number of seconds, ISO 8601 ``P90D``, ``HH:MM:SS``)."""
    if isinstance(value, str):
        if match := _DURATION.match(value):
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
        if not value.strip().startswith(("P", "-P")) and ":" not in value:
            raise PydanticCustomError(
                "duration",
                "'{value}' is not a duration: use e.g. 90d, 12h, 30m or 45s",
                {"value": value},
            )
    return value


def format_duration(value: timedelta) -> str:
    """The shortest exact ``<n><unit>`` form (``90d``, ``36h``, ``0s``)."""
    seconds = value.total_seconds()
    if seconds == 0:
        return "0s"
    for unit, size in _UNITS.items():
        if unit != "w" and seconds % size == 0:  # 7d reads better than 1w
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _non_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise PydanticCustomError("negative_duration", "a duration cannot be negative")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_parse_duration),
    AfterValidator(_non_negative),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?[smhdw]$", "examples": ["90d"]}),
]
"""A length of time: ``90d``, ``12h``, ``30m``, ``45s``, ``2w`` (or seconds, or ISO 8601)."""


class Period(_Section):
    """One period of the stream: the period it continues from (empty for the first), and
    optionally where its raw frames are (overrides ``ingest.source`` for this period)."""

    previous: str = ""
    source: str | None = None


class Regime(_Section):
    """A stretch of the simulated stream (one entry of ``simulate.schedule``).

    ``static``: the game mix stays exactly as it is for ``periods`` periods. ``sudden``: in
    the regime's first period ``games`` new games take ``share`` of the frames, and the mix
    then holds. ``gradual``: the new games' share rises in equal steps to ``share`` over the
    regime's ``periods`` periods. The old games keep the rest in their old proportions
    (``share`` 1, the default, replaces them). ``games`` defaults to
    ``simulate.games_per_period``. A static regime takes neither.
    """

    kind: Literal["static", "sudden", "gradual"]
    periods: int = Field(1, ge=1)
    share: float | None = Field(
        None, gt=0, le=1, description="share of frames from the new games; default 1"
    )
    games: int | None = Field(None, ge=1, description="new games; default games_per_period")

    @model_validator(mode="after")
    def _static_moves_nothing(self) -> Regime:
        if self.kind == "static" and (self.share is not None or self.games is not None):
            raise ValueError("a static regime keeps the mix; remove its share/games")
        return self


Schedule = Annotated[
    Annotated[tuple[Regime, ...], Tag("regimes")] | Annotated[Literal["drifting"], Tag("drifting")],
    Discriminator(lambda v: "drifting" if isinstance(v, str) else "regimes"),
]
"""``simulate.schedule``: the word ``drifting`` or a list of :class:`Regime`."""


class SimulateConfig(_Section):
    """The Atari stream simulator (``cssl simulate``)."""

    frames_per_period: int = Field(2000, ge=1)
    size: int = Field(32, ge=16, le=1024)
    seed: int = 0
    eval_fraction: float = Field(
        0.6,
        ge=0.0,
        lt=1.0,
        description="share of each game's frames that are eval frames (held-out streamers)",
    )
    eval_clip_frames: int = Field(
        1,
        ge=1,
        description="frames per eval clip; every eval clip is shown by its own held-out "
        "streamer, so the number of clips sets how precisely a period's accuracy is known",
    )
    games_per_period: int = Field(4, ge=1)
    frame_skip: int = Field(8, ge=1)
    facecam: bool = True
    chat: bool = True
    schedule: Schedule = Field(
        "drifting",
        description="'drifting' (games rise and fade every period) or a list of regimes "
        "(static / sudden / gradual stretches, for testing drift triggers against known truth)",
    )

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_word(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "drifting":
            raise ValueError(
                f"{value!r} is not a schedule: use 'drifting' or a list of regimes such as "
                "[{kind: static, periods: 3}, {kind: sudden}]"
            )
        return value

    @model_validator(mode="after")
    def _schedule_not_empty(self) -> SimulateConfig:
        if not isinstance(self.schedule, str) and not self.schedule:
            raise ValueError("schedule needs at least one regime, or 'drifting'")
        return self


class IngestConfig(_Section):
    """Turning raw frames (video, image folders, Parquet) into a validated shard."""

    source: str = Field(
        "simulate",
        description="'simulate' or a path template with {period}, e.g. /mnt/raw/{period}",
    )
    fps: float = Field(1.0, gt=0)
    dedup_max_distance: int = Field(
        4, ge=0, le=64, description="skip a frame within this perceptual-hash distance"
    )
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    size: int | None = Field(None, ge=16, description="resize so the shorter side is this")
    jpeg_quality: int = Field(90, ge=50, le=100)
    rows_per_group: int = Field(1024, ge=16)
    max_group_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description="a row group is written once its encoded images reach this many bytes "
        "(or rows_per_group rows): what bounds ingest's memory on full-resolution video",
    )
    rows_per_part: int = Field(65536, ge=16)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)


class ModelConfig(_Section):
    """The embedding model: a timm backbone plus SimCLR heads."""

    backbone: str = "resnet18"
    input_size: int = Field(32, ge=16, le=1024, description="frames are resized to this")
    small_input_stem: bool = Field(
        False,
        description="3x3 stride-1 stem without max-pool (CIFAR-style, for 32 px images); "
        "13x the compute of the standard stem at 64 px",
    )
    projector_hidden: int = Field(512, ge=8)
    projector_dim: int = Field(128, ge=8)
    predictor_hidden: int = Field(512, ge=8)


class AugmentConfig(_Section):
    """The SimCLR two-view augmentation."""

    crop_scale_min: float = Field(0.2, gt=0, le=1)
    color_jitter: float = Field(0.4, ge=0)
    hue: float = Field(
        0.5,
        ge=0,
        le=0.5,
        description="largest hue rotation of the colour jitter, in turns (0.5: any hue; "
        "SimCLR's is 0.1): streamers colour-grade their capture, so a game's colours are "
        "not part of what identifies it",
    )
    color_jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)


def _known_strategy(name: str) -> str:
    try:
        strategy_spec(name)
    except ValueError as exc:  # one line naming the choices, without pydantic's prefix
        raise PydanticCustomError("unknown_strategy", str(exc)) from None
    return name


Strategy = Annotated[
    str,
    AfterValidator(_known_strategy),
    WithJsonSchema({"type": "string", "enum": list(STRATEGY_NAMES)}),
]
"""A name of :data:`cssl_core.learn.strategy.STRATEGIES` (the one list of strategies)."""
DistillLoss = Literal["predictor", "nt_xent", "feature"]
"""A name of :data:`cssl_core.learn.distill.DISTILL_TERMS` (a test keeps the two equal)."""


class TrainConfig(_Section):
    """One period of continual training."""

    strategy: Strategy = "distill+replay"
    steps: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = Field(0.3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_steps: int = Field(5, ge=0)
    temperature: float = Field(0.2, gt=0)
    distill_loss: DistillLoss = "predictor"
    distill_weight: float = Field(1.0, ge=0)
    distill_temperature: float = Field(0.2, gt=0)
    distill_rows: Literal["all", "replay"] = Field(
        "all",
        description="rows of the batch the distillation term covers: 'all', or only the "
        "replayed frames (the frozen model runs on those alone: a cheaper step; a strategy "
        "without replay distils on all rows)",
    )
    replay_ratio: float = Field(0.5, ge=0, lt=1)
    classifier: bool = Field(False, description="Kaizen-style continual classifier on labels")
    classifier_weight: float = Field(1.0, ge=0)
    classifier_temperature: float = Field(
        2.0, gt=0, description="temperature of Kaizen's distillation of the old classifier"
    )
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    checkpoint_every: int = Field(50, ge=1)
    num_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: this rank's GPU when torch sees one, else the CPU"
    )
    compile: bool = Field(False, description="torch.compile the training forward (GPU runs)")
    seed: int = 0

    @field_validator("channels_last", mode="before")
    @classmethod
    def _on_off_as_yaml_booleans(cls, value: Any) -> Any:
        """YAML reads ``on``/``off`` (``--set train.channels_last=off``) as booleans."""
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class CompatConfig(_Section):
    """Backward-compatible training: how a period's model stays usable against the index its
    parent embedded (``cssl_core.learn``; measured by ``cssl bench compat``).

    The index stores the L2-normalised backbone features (``Embedder.features``, what ``cssl
    embed``, the MLflow model and evaluation return), so compatibility is asked of them:

    - ``none``: no constraint;
    - ``adapter``: the backbone trains exactly as with ``none``; after training, a linear
      query-side map ``A: new -> parent`` features is fitted in closed form (ridge toward the
      identity, :func:`cssl_core.learn.compat.fit_adapter`) on the period's train frames and
      the replay memory, and saved with the model, so a new query can search an index
      embedded by the parent without re-embedding it;
    - ``align``: a BCT-style alignment term (:func:`cssl_core.learn.losses.compat_align`,
      weight ``weight``, temperature ``temperature``) pulls the new backbone features
      toward the frozen parent's features of the same views during training, so the new
      features themselves search the old index.
    """

    mode: Literal["none", "adapter", "align"] = Field(
        "adapter",
        description="adapter (the default: it never changes the model's own embedding and "
        "raised compatibility in `cssl bench compat`), align, or none",
    )
    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="align: loss weight")
    temperature: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="align: InfoNCE temperature"
    )
    adapter_frames: int = Field(
        2000, ge=16, description="adapter: most frames of the period and of the memory each"
    )
    adapter_ridge: float = Field(
        0.1,
        gt=0,
        allow_inf_nan=False,
        description="adapter: ridge strength toward the identity, relative to the mean "
        "eigenvalue of the features' Gram matrix",
    )
    matrix_frames: int = Field(
        300,
        ge=1,
        description="the refresh's compatibility matrix: most query (eval) and most gallery "
        "(train) frames per period",
    )


class ReplayConfig(_Section):
    """The replay memory of past frames."""

    capacity: int = Field(2000, ge=1)
    selection: Literal["reservoir", "balanced", "diverse", "hard"] = "reservoir"
    candidate_pool: int = Field(
        4096, ge=1, description="frames scored per period by diverse/hard (bounds the cost)"
    )


class EvalConfig(_Section):
    """Evaluation on backbone features of each period's eval split."""

    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    probe_epochs: int = Field(50, ge=1)
    probe_lr: float = Field(0.1, gt=0)
    max_train_frames: int = Field(800, ge=1, description="labelled train frames per period")
    cluster: Literal["stream", "frame"] = Field(
        "stream",
        description="unit of independence the bootstrap resamples: 'stream' (the shard's "
        "stream_id: frames of one streamer or video share its look, so they are not "
        "independent draws) or 'frame' (only for eval sets of independent images, such as a "
        "photo dataset ingested as one stream)",
    )


class GateConfig(_Section):
    """The paired promotion gate (``pipelines/gate.py``): candidate and champion are scored on
    the same eval frames and the gate tests the paired difference of their accuracies on
    every period, with a cluster-bootstrap interval.

    Promote only when, on every earlier period, the lower bound of the difference is above
    ``-margin`` (non-inferior); on the new period it is above ``0`` (``new_period: better``)
    or ``-margin`` (``non_inferior``); the upper bound of the candidate's forgetting is at
    most ``max_forgetting``; and every input is there and finite. Each bound is that of the
    two-sided ``confidence`` interval, i.e. a one-sided test at level ``(1 - confidence) / 2``,
    adjusted across the periods tested by ``correction``. Every number is finite: an
    infinite margin would let any candidate by.
    """

    metric: Literal["knn", "linear"] = "knn"
    margin: float = Field(
        0.08,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="non-inferiority margin: the largest accuracy drop against the champion "
        "on a period that still counts as no worse",
    )
    new_period: Literal["better", "non_inferior"] = Field(
        "non_inferior",
        description="on the new period the candidate must be better (lower bound > 0) or "
        "only non-inferior (lower bound > -margin)",
    )
    max_forgetting: float = Field(
        0.10,
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="largest upper bound of the candidate's forgetting (negative: it must "
        "be better than the lineage's best on earlier periods by this)",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, allow_inf_nan=False, description="two-sided interval level"
    )
    correction: Literal["none", "bonferroni", "holm"] = Field(
        "none",
        description="multiplicity correction across the periods tested: every test must "
        "pass to promote (an intersection-union test), so 'none' already bounds the chance of "
        "promoting a candidate worse by the margin on a period; the corrections lower it "
        "further at the price of rejecting more equivalent candidates",
    )
    bootstrap_samples: int = Field(2000, ge=100, description="bootstrap replicates per test")
    bootstrap_seed: int = 0
    compatibility: Literal["required", "allow_break"] = Field(
        "allow_break",
        description="required: promote only a candidate compatible with the champion it "
        "replaces (M[new, old] >= M[old, old], directly or through its adapter); "
        "allow_break: an incompatible candidate is promoted when its gain on the new period "
        "is at least break_min_gain (the index is then backfilled)",
    )
    break_min_gain: float | None = Field(
        None,
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="allow_break: smallest lower bound of the candidate's paired gain over "
        "the champion on the new period (gate metric, at gate.confidence) that justifies "
        "breaking compatibility; null: any gain (the other checks still apply)",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in ("avg_accuracy_tolerance", "new_period_tolerance") if k in data]
            if old:
                raise ValueError(
                    f"gate.{old[0]} was replaced by the paired gate's gate.margin (the "
                    "non-inferiority margin per period) and gate.new_period (better | "
                    "non_inferior); remove it"
                )
        return data


class DriftConfig(_Section):
    """The drift check: do a new shard's frames come from the reference's distribution?

    A sample of ``sample_size`` frames from each side is embedded with the serving model and
    compared by a kernel two-sample test (MMD with a permutation p-value that relabels whole
    stream segments of ``segment_seconds``, the unit of independence). Drift needs both
    ``p < alpha`` and an effect (MMD², in kernel units) of at least ``min_effect``, so a large
    sample does not flag a difference too small to matter.
    """

    sample_size: int = Field(200, ge=20, description="frames drawn from each side")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the test")
    min_effect: float = Field(
        0.02, ge=0, description="smallest MMD² (unbiased, Gaussian kernel) that counts as drift"
    )
    permutations: int = Field(1000, ge=99, description="permutations for the p-value")
    segment_seconds: float = Field(
        60.0,
        ge=0,
        description="frames of one stream within this many seconds are one unit of the "
        "permutation test (near-duplicates); 0 counts every frame as independent",
    )
    seed: int = Field(0, description="sampling and permutation seed")
    reference: Literal["champion", "previous", "memory"] = Field(
        "champion",
        description="what new frames are compared with: the shard of the period @champion was "
        "trained on (a gradual shift adds up until it is found), the previous period's shard, "
        "or the replay memory",
    )


class WatchConfig(_Section):
    """When the ``watch`` flow starts a refresh of a new shard.

    A refresh starts when the drift check finds drift (``drift:``), or when ``@champion`` was
    registered more than ``max_age`` ago, or when the user forces it; but never within
    ``cooldown`` of the last refresh that started (unless forced), so a flapping signal cannot
    start refreshes back to back.
    """

    max_age: Duration = Field(
        timedelta(days=90), description="refresh when @champion is older than this, drift or not"
    )
    cooldown: Duration = Field(
        timedelta(days=7),
        description="no refresh starts within this long after the last one started (unless forced)",
    )
    refresh_deployment: str = Field(
        "refresh-gpu",
        min_length=1,
        description="the deployment of the refresh flow that watch starts when a Prefect server "
        "has it (refresh/<name>); without one, watch runs the refresh in its own process",
    )


CalendarUnit = Literal["month", "week", "day"]


def calendar_period(moment: datetime, every: CalendarUnit) -> str:
    """The name of the calendar period (UTC) ``moment`` falls in: ``2026-12`` (month),
    ``2026-W49`` (ISO week) or ``2026-12-07`` (day). A naive ``moment`` is taken as UTC."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if every == "month":
        return f"{utc.year:04d}-{utc.month:02d}"
    if every == "week":
        year, week, _ = utc.isocalendar()
        return f"{year:04d}-W{week:02d}"
    return utc.strftime("%Y-%m-%d")


class CalendarConfig(_Section):
    """Names of periods that are not declared in ``periods``: ``cssl refresh --period auto``
    (and ``watch`` with no period) names the period from the UTC calendar."""

    periods_every: CalendarUnit = Field(
        "month", description="month (2026-12), week (2026-W49) or day (2026-12-07), UTC"
    )

    def period_at(self, moment: datetime) -> str:
        return calendar_period(moment, self.periods_every)


class DistributedConfig(_Section):
    """Data-parallel training under torchrun (DDP). Only the train step runs in these
    processes; the rest of a refresh stays in one process. One process on one node (the
    default) trains in-process, without torchrun."""

    nproc_per_node: int = Field(1, ge=1, description="training processes per node (GPUs)")
    nnodes: int = Field(1, ge=1, description="nodes; more than 1 needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(
        None, description="HOST:PORT of the c10d rendezvous (multi-node); none: --standalone"
    )
    rdzv_id: str = Field("cssl", description="job id shared by every node's torchrun")
    max_restarts: int = Field(1, ge=0, description="elastic restarts; each resumes a checkpoint")

    @model_validator(mode="after")
    def _endpoint_for_nodes(self) -> DistributedConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (HOST:PORT of the rendezvous)")
        return self

    @property
    def launches_processes(self) -> bool:
        """True when training must run under torchrun (more than one process in the job)."""
        return self.nproc_per_node * self.nnodes > 1


class IndexConfig(_Section):
    """The embedding index (``cssl index``, ``search``, ``backfill``; ``pipelines/index.py``)."""

    uri: str | None = Field(
        None, description="a directory or s3://bucket/prefix; none: CSSL_HOME/index"
    )
    backfill_on_promotion: bool = Field(
        False,
        description="the refresh flow backfills the index when it promotes a version that is "
        "not compatible with the index's live version (registry tag cssl.compat)",
    )
    workers: int = Field(1, ge=1, description="backfill: Dask worker processes (1: in-process)")
    dask_address: str | None = Field(
        None, description="backfill on this Dask scheduler (tcp://host:8786) instead"
    )


class StoreConfig(_Section):
    """Where shards, replay memory and checkpoints live: a directory or ``s3://bucket/prefix``."""

    root: str = ".cssl/store"


class Params(_Section):
    """Everything in ``params.yaml``."""

    periods: dict[str, Period] = Field(
        default_factory=lambda: {
            "p01": Period(),
            "p02": Period(previous="p01"),
            "p03": Period(previous="p02"),
            "p04": Period(previous="p03"),
        },
        min_length=1,
    )
    simulate: SimulateConfig = SimulateConfig()
    ingest: IngestConfig = IngestConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    replay: ReplayConfig = ReplayConfig()
    compat: CompatConfig = CompatConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    store: StoreConfig = StoreConfig()
    distributed: DistributedConfig = DistributedConfig()
    drift: DriftConfig = DriftConfig()
    watch: WatchConfig = WatchConfig()
    calendar: CalendarConfig = CalendarConfig()
    index: IndexConfig = IndexConfig()

    @model_validator(mode="after")
    def _periods_chain(self) -> Params:
        names = list(self.periods)
        for i, (name, p) in enumerate(self.periods.items()):
            if not re.match(PERIOD_NAME, name):
                raise ValueError(f"period name {name!r} must match {PERIOD_NAME}")
            expected = names[i - 1] if i else ""
            if p.previous != expected:
                raise ValueError(
                    f"period {name!r} names previous={p.previous!r}, expected {expected!r}"
                )
        return self

    @property
    def period_names(self) -> list[str]:
        return list(self.periods)

    def is_declared(self, name: str) -> bool:
        return name in self.periods

    def period_index(self, name: str) -> int:
        """Position of a period in the chain; a clear error for an unknown name."""
        if name not in self.periods:
            known = ", ".join(self.periods)
            raise ConfigError(f"unknown period {name!r}; params.yaml lists: {known}")
        return list(self.periods).index(name)

    def chain(self, name: str) -> PeriodChain:
        """The declared chain up to period ``name`` (a clear error for an undeclared name)."""
        return PeriodChain(tuple(self.period_names[: self.period_index(name) + 1]))

    def period_source(self, name: str) -> str:
        """Where a period's raw frames come from: its own ``source`` or ``ingest.source``."""
        own = self.periods[name].source if name in self.periods else None
        return (own or self.ingest.source).format(period=name)

    def config_hash(self) -> str:
        """A short stable hash of the config (for lineage tags and checkpoint run keys).

        ``distributed`` is left out: how many processes train a period places the work, it
        does not change the model (a DDP step equals the single-process step on the same
        global batch), so a period may resume on a different number of processes. ``drift``
        is left out too: it decides whether to refresh, not what a refresh produces, so
        tuning it does not make finished periods look unfinished; so are ``watch`` (when to
        refresh) and ``calendar`` (what an undeclared period is called). ``periods`` is left
        out because declaring a period names it, it does not change what any period trains
        on (a period's frames are its shard's fingerprint, its parent and memory the lineage's):
        appending the periods that ran to params.yaml (``cssl lineage export --write``) must
        not make every finished period look unfinished. ``index`` (where the embedding index
        lives, when it is backfilled) does not change a model either.
        """
        exclude = {"distributed", "drift", "watch", "calendar", "periods", "index"}
        dump = self.model_dump(mode="json", exclude=exclude)
        blob = json.dumps(dump, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Merge ``key.sub=value`` overrides (values parsed as YAML) into a plain dict."""
    merged = json.loads(json.dumps(tree))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(merged, key.strip(), yaml.safe_load(raw))
    return merged


def params_from_dict(tree: dict[str, Any], source: str = "params") -> Params:
    """Validate a plain dict into :class:`Params`, with a one-line error on failure."""
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ConfigError(f"{source}: {where}: {first['msg']}") from None


def load_params(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Params:
    """Load ``params.yaml`` (or the embedded defaults when it does not exist) plus overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is None and Path(DEFAULT_PARAMS_FILE).is_file():
        path = DEFAULT_PARAMS_FILE
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree, source = loaded, str(path)
    return params_from_dict(apply_overrides(tree, overrides), source)


def json_schema() -> dict[str, Any]:
    """The JSON schema of ``params.yaml`` (``cssl config --schema``)."""
    return Params.model_json_schema()
