"""One period's training job: its typed inputs and how it trains in this process.

:class:`PeriodInputs` is everything that determines period ``t``'s model: the params, the
period, its shard, the earlier shards, the parent model (``t - 1``'s, or None for the first
period), the replay memory ``t - 1`` and where checkpoints go. The drivers build it
(:mod:`cssl_core.period`); the torchrun launcher writes it to a job directory and reads it
back on every rank (:mod:`cssl_core.learn.launch`); :func:`train_in_process` trains it here.

Dependencies point one way: ``period -> launch -> job`` and ``period -> job``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from cssl_core.config import Params, PeriodChain
from cssl_core.data.shard import Shard
from cssl_core.learn.distributed import DistEnv, resolve_device
from cssl_core.learn.models import Embedder
from cssl_core.learn.strategy import StrategySpec, strategy_spec
from cssl_core.learn.trainer import ContinualTrainer, FrameSource, StepLog, TrainResult
from cssl_core.memory.replay import ReplayMemory
from cssl_core.runtime import torch_threads

OnStep = Callable[[StepLog, float], None]
ShouldStop = Callable[[], bool]


def new_model(params: Params, categories: Sequence[str] = ()) -> Embedder:
    """A freshly initialised embedder; the same seed gives the same weights."""
    torch.manual_seed(params.train.seed)
    return Embedder(params.model, categories)


@dataclass(frozen=True, kw_only=True, eq=False)
class PeriodInputs:
    """The inputs of one period's training (and of its replay-memory update).

    ``memory`` is the replay memory after the previous period
    (``ReplayMemory.empty(capacity)`` for the first); ``parent`` is the model the period
    continues from (None for the first period); ``history`` is the earlier periods' shards
    in stream order (read only by a strategy that trains on the history, ``joint``);
    ``checkpoint_dir`` holds resumable training state (None: no checkpoints).

    ``chain`` places the period in the stream (its previous period and its index). None
    means the chain declared in ``params.periods`` (an undeclared period is then an error);
    a period that is not declared there is given its chain from the lineage that ran
    (``pipelines.refresh``).
    """

    params: Params
    period: str
    shard: Shard
    memory: ReplayMemory
    parent: Embedder | None = None
    history: tuple[Shard, ...] = ()
    checkpoint_dir: Path | None = None
    chain: PeriodChain | None = None

    def __post_init__(self) -> None:
        if self.chain is None:  # a clear error for an unknown period
            object.__setattr__(self, "chain", self.params.chain(self.period))
        elif self.chain.period != self.period:
            raise ValueError(
                f"the chain {list(self.chain.periods)} does not end at {self.period!r}"
            )
        if self.shard.period != self.period:
            raise ValueError(
                f"shard {self.shard.path} holds period {self.shard.period!r}, not {self.period!r}"
            )
        object.__setattr__(self, "history", tuple(self.history))
        previous = self.place.previous
        if self.memory.period is not None and self.memory.period != previous:
            raise ValueError(
                f"period {self.period!r} continues from {previous or 'nothing'!r}, but the "
                f"replay memory given is the one of {self.memory.period!r}"
            )

    @property
    def place(self) -> PeriodChain:
        """The period's place in the stream: ``chain``, resolved in ``__post_init__``."""
        if self.chain is None:  # pragma: no cover - __post_init__ always sets it
            raise ValueError("PeriodInputs without a chain")
        return self.chain

    @property
    def index(self) -> int:
        """Position of the period in its chain (0 for the first)."""
        return self.place.index

    @property
    def strategy(self) -> StrategySpec:
        """What this period does: ``train.strategy``'s spec, for a period with or without a
        parent (:meth:`StrategySpec.for_period`)."""
        return strategy_spec(self.params.train.strategy).for_period(self.parent is not None)

    @property
    def steps(self) -> int:
        """Training steps of this period (``joint`` retrains on t periods: t times)."""
        return strategy_spec(self.params.train.strategy).steps_for(
            self.index, self.params.train.steps
        )

    @property
    def run_key(self) -> str:
        """Identifies these inputs, so a checkpoint is resumed only by the same run."""
        parts = [
            self.params.config_hash(),
            self.period,
            self.shard.fingerprint,
            self.parent.state_fingerprint() if self.parent is not None else "scratch",
            self.memory.fingerprint if len(self.memory) else "empty",
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    def train_table(self) -> pa.Table:
        """The frames this period trains on: its shard's train split, preceded by the earlier
        periods' for a strategy that trains on the history."""
        table = self.shard.read(split="train")
        if self.strategy.trains_on_history and self.history:
            table = pa.concat_tables([s.read(split="train") for s in self.history] + [table])
        return table


def _categories(table: pa.Table) -> list[str]:
    return sorted({c for c in table.column("category").to_pylist() if c is not None})


def train_in_process(
    inputs: PeriodInputs,
    *,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    device: torch.device | None = None,
    env: DistEnv = DistEnv(),
) -> tuple[Embedder, TrainResult]:
    """Train ``inputs``' period in this process, as rank ``env.rank`` of ``env.world_size``
    (a torchrun worker passes its place in the job; a plain call is rank 0 of 1).

    A from-scratch strategy (and the first period) starts from the seed's fresh model; the
    others fine-tune a copy of the parent (which is left untouched), distilling toward a
    frozen copy of it and mixing in the replay memory when the strategy says so. Raises
    :class:`~cssl_core.learn.trainer.TrainingInterrupted` when ``should_stop`` fires.

    Compatibility with the parent (``compat``, whenever there is a parent): ``align`` adds
    the alignment term against a frozen copy of the parent (whatever the strategy);
    ``adapter`` fits the query-side map into the parent's features after training, on the
    period's train frames and the replay memory (:func:`cssl_core.learn.compat.fit_adapter`).
    A model never inherits its parent's adapter (that one maps into the grandparent's space).
    """
    params, cfg = inputs.params, inputs.params.train
    device = device or resolve_device(cfg.device, env)
    spec = inputs.strategy
    train_table = inputs.train_table()
    categories = _categories(train_table) if cfg.classifier else []
    teacher = None
    replay: FrameSource | None = None
    compat = params.compat
    if spec.from_scratch or inputs.parent is None:
        model = new_model(params, categories)
        if inputs.parent is not None and compat.mode == "align":
            teacher = inputs.parent.frozen_copy()
    else:
        model = copy.deepcopy(inputs.parent).train().requires_grad_(True)
        model.set_adapter(None, None)
        if cfg.classifier:
            model.expand_classes(categories)
        if spec.uses_distill or compat.mode == "align":
            teacher = inputs.parent.frozen_copy()
        if spec.uses_replay and len(inputs.memory):
            replay = FrameSource.from_table(
                inputs.memory.table, params.model.input_size, device=device
            )
    trainer = ContinualTrainer(
        cfg,
        params.augment,
        model,
        teacher=teacher,
        device=device,
        checkpoint_dir=inputs.checkpoint_dir,
        run_key=inputs.run_key,
        rank=env.rank,
        world_size=env.world_size,
        on_step=on_step,
        strategy=spec,
        compat=compat,
    )
    frames = FrameSource.from_table(train_table, params.model.input_size, device=device)
    with torch_threads(cfg.num_threads if device.type == "cpu" else None):
        result = trainer.fit(frames, replay, steps=inputs.steps, should_stop=should_stop)
        if compat.mode == "adapter" and inputs.parent is not None:
            from cssl_core.learn.compat import fit_adapter

            parent = inputs.parent.frozen_copy().to(device)
            tables = [inputs.shard.read(split="train"), inputs.memory.table]
            fit_adapter(model, parent, tables, compat, seed=cfg.seed, device=device)
    return model, result
