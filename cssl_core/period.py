"""One period of continual refresh, and the loop over periods: the one code path of every
driver.

The Prefect flow (``pipelines/refresh.py``), the DVC stages (``cssl train`` / ``cssl
evaluate``, :mod:`pipelines.dvc_stages`) and ``cssl bench continual``
(:mod:`benchmarks.continual`) all train a period with :func:`run_period` (the benchmark
through :func:`run_stream`, the same function in a loop), so a period reproduced with
``dvc repro`` or measured by the benchmark runs exactly the code the scheduled refresh ran::

    shard(t) ──publish──▶ store/shards/t            (eval sets of later periods come from here)
    PeriodInputs(params, t, shard(t), memory(t-1), parent(t-1), history)
        ──run_period──▶ PeriodResult(model(t), train result, memory(t))
                        memory(t) = select(memory(t-1) ∪ shard(t)), never saved here
    model(t) × eval sets 1..t ──evaluate_model──▶ accuracy row R[t][·]

What the strategy means for a period (replay? distillation? from scratch?) is decided by
:mod:`cssl_core.learn.strategy` only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cssl_core.config import Params
from cssl_core.data.shard import MANIFEST, Shard, ShardError
from cssl_core.data.storage import LocalStore, ObjectStore
from cssl_core.evaluation.evaluate import (
    EvalSet,
    PeriodScores,
    eval_set_from_shard,
    evaluate_periods,
    majority_scores,
)
from cssl_core.learn.job import OnStep, PeriodInputs, ShouldStop, new_model, train_in_process
from cssl_core.learn.launch import train_torchrun
from cssl_core.learn.models import Embedder
from cssl_core.learn.scoring import embed_table, ssl_loss_per_frame
from cssl_core.learn.trainer import TrainingInterrupted, TrainResult
from cssl_core.memory import replay
from cssl_core.memory.replay import ReplayMemory

SHARDS_PREFIX = "shards"

__all__ = [  # the drivers' API; PeriodInputs, new_model and TrainingInterrupted re-exported
    "SHARDS_PREFIX",
    "PeriodInputs",
    "PeriodResult",
    "TrainingInterrupted",
    "accuracy_row",
    "eval_sets_for",
    "evaluate_model",
    "majority_baseline",
    "memory_matches",
    "new_model",
    "next_memory",
    "publish_shard",
    "run_period",
    "run_stream",
    "scoring_config",
    "selection_config",
    "shard_prefix",
    "stored_shard",
    "train_period",
]


# -- one period ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodResult:
    """What one period produced: ``model`` (on the CPU), the training ``train`` result, and
    ``memory``, the replay memory after this period (not saved: see :func:`run_period`)."""

    model: Embedder
    train: TrainResult
    memory: ReplayMemory


def train_period(
    inputs: PeriodInputs,
    *,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    device: torch.device | None = None,
) -> tuple[Embedder, TrainResult]:
    """Train the model of ``inputs.period`` (no memory update): under torchrun when
    ``params.distributed`` asks for more than one process (data-parallel, the same result
    as one process on the same global batches; ``device`` is then each rank's own), else in
    this process on ``device`` (default: ``train.device``)."""
    if inputs.params.distributed.launches_processes:
        return train_torchrun(inputs, on_step=on_step, should_stop=should_stop)
    return train_in_process(inputs, on_step=on_step, should_stop=should_stop, device=device)


def run_period(
    inputs: PeriodInputs,
    *,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    device: torch.device | None = None,
) -> PeriodResult:
    """Period ``t``: train model(t) from ``inputs`` (:func:`train_period`), then select
    memory(t) from memory(t-1) ∪ shard(t) with model(t) (:func:`next_memory`), whatever the
    strategy (a strategy without replay still leaves the memory a later one may use).

    ``on_step(log, images_per_second)`` is called after every training step. When
    ``should_stop()`` says yes after a step, the step is checkpointed (with
    ``inputs.checkpoint_dir``) and :class:`TrainingInterrupted` is raised; a rerun with the
    same inputs resumes there and ends bit-identical to an uninterrupted run.

    Nothing is written except checkpoints: the caller saves model(t) and memory(t) where
    its lineage lives (the flow only for the version it promotes or keeps as the lineage,
    the DVC stage into its outputs, the benchmark nowhere). The model is returned on the
    CPU, where evaluation and the memory update run.
    """
    model, result = train_period(inputs, on_step=on_step, should_stop=should_stop, device=device)
    model = model.to("cpu")
    memory = next_memory(inputs.params, inputs.memory, inputs.shard, model, inputs.period)
    return PeriodResult(model, result, memory)


def run_stream(
    params: Params,
    shards: Sequence[Shard],
    *,
    first: PeriodResult | None = None,
    checkpoint_root: Path | None = None,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    device: torch.device | None = None,
) -> Iterator[PeriodResult]:
    """The periods of ``shards`` in stream order, each continuing from the one before
    (parent = the previous model, memory = the previous memory, history = the earlier
    shards): :func:`run_period` in a loop, yielding each period's result as it is done.

    ``shards`` must be ``params.periods`` from the first on. ``first``, when given, is the
    result of the first period computed earlier (period 1 does not depend on the strategy,
    so a benchmark shares it); it is yielded as is. ``checkpoint_root / <period>`` holds each
    period's checkpoints (None: no checkpoints).
    """
    names = [s.period for s in shards]
    if names != params.period_names[: len(names)]:
        raise ValueError(
            f"run_stream needs the periods of params.yaml from the first on, got {names}"
        )
    memory = ReplayMemory.empty(params.replay.capacity)
    parent: Embedder | None = None
    for t, shard in enumerate(shards):
        if t == 0 and first is not None:
            result = first
        else:
            inputs = PeriodInputs(
                params=params,
                period=shard.period,
                shard=shard,
                memory=memory,
                parent=parent,
                history=tuple(shards[:t]),
                checkpoint_dir=checkpoint_root / shard.period if checkpoint_root else None,
            )
            result = run_period(inputs, on_step=on_step, should_stop=should_stop, device=device)
        yield result
        parent, memory = result.model, result.memory


# -- the replay memory -----------------------------------------------------------------------


def scoring_config(params: Params) -> dict[str, Any]:
    """What ``hard`` selection's per-frame score depends on besides the model (recorded in
    the memory's ``selection_config``)."""
    return {
        "temperature": params.train.temperature,
        "augment": params.augment.model_dump(mode="json"),
        "input_size": params.model.input_size,
    }


def selection_config(params: Params) -> dict[str, Any]:
    """The ``selection_config`` a memory made with ``params`` records
    (:func:`cssl_core.memory.replay.selection_config`)."""
    cfg = params.replay
    scoring = scoring_config(params) if cfg.selection == "hard" else None
    return replay.selection_config(
        cfg.selection, cfg.capacity, params.train.seed, cfg.candidate_pool, scoring
    )


def memory_matches(params: Params, memory: ReplayMemory) -> bool:
    """Whether ``memory`` was selected with the replay settings ``params`` ask for; False for
    a memory whose manifest predates the record (rebuild it)."""
    return memory.made_with(selection_config(params))


def next_memory(
    params: Params, memory: ReplayMemory, shard: Shard, model: Embedder, period: str
) -> ReplayMemory:
    """``memory(t) = select(memory(t-1) ∪ shard(t))`` with the configured selection; the
    manifest records :func:`selection_config` and, for ``diverse``/``hard``, the selecting
    model's fingerprint. Nothing is saved."""
    cfg = params.replay
    pooled = cfg.selection in replay.POOL_SELECTIONS

    def score(table: pa.Table) -> np.ndarray:
        return ssl_loss_per_frame(
            model, params.augment, table, params.train.temperature, seed=params.train.seed
        )

    return memory.update(
        shard.read(split="train"),
        period,
        cfg.selection,
        cfg.capacity,
        params.train.seed,
        embed_fn=lambda table: embed_table(model, table),
        score_fn=score,
        candidate_pool=cfg.candidate_pool,
        scoring=scoring_config(params) if cfg.selection == "hard" else None,
        selected_by=model.state_fingerprint() if pooled else None,
    )


# -- evaluation --------------------------------------------------------------------------


def eval_sets_for(shards: Sequence[Shard], params: Params) -> dict[str, EvalSet]:
    """Each period's labelled reference (train) frames and eval split."""
    return {
        s.period: eval_set_from_shard(s, params.eval.max_train_frames, seed=params.train.seed)
        for s in shards
    }


def evaluate_model(
    model: Embedder, eval_sets: Mapping[str, EvalSet], params: Params
) -> dict[str, PeriodScores]:
    """kNN and linear-probe accuracy of ``model`` on every given period, with the per-frame
    outcomes behind them (``PeriodScores.frames``: the same frames for every model)."""
    return evaluate_periods(
        model, eval_sets, params.eval, params.model.input_size, seed=params.train.seed
    )


def majority_baseline(eval_sets: Mapping[str, EvalSet], params: Params) -> dict[str, PeriodScores]:
    """The blind majority-class baseline on every given period (the most frequent category
    of its reference frames, scored on its eval frames), with per-frame outcomes that pair
    with any model's."""
    return {p: majority_scores(es, params.eval.cluster) for p, es in eval_sets.items()}


def accuracy_row(scores: Mapping[str, PeriodScores], metric: str) -> dict[str, float]:
    return {p: float(getattr(s, metric)) for p, s in scores.items()}


# -- shards in the store -----------------------------------------------------------------


def shard_prefix(period: str) -> str:
    return f"{SHARDS_PREFIX}/{period}"


def publish_shard(store: ObjectStore, shard: Shard) -> bool:
    """Copy a shard into ``store/shards/<period>/`` (parts first, manifest last).

    Returns False when the store already holds the same shard (same fingerprint).
    """
    key = f"{shard_prefix(shard.period)}/{MANIFEST}"
    if store.exists(key):
        existing = json.loads(store.get_bytes(key))
        if existing.get("fingerprint") == shard.fingerprint:
            return False
    for part in shard.part_paths():
        store.put_file(f"{shard_prefix(shard.period)}/{part.name}", part)
    store.put_bytes(key, (shard.path / MANIFEST).read_bytes())
    return True


def stored_shard(store: ObjectStore, period: str, cache_dir: Path | None = None) -> Shard:
    """Open ``store/shards/<period>`` (downloaded to ``cache_dir`` for a remote store)."""
    key = f"{shard_prefix(period)}/{MANIFEST}"
    if not store.exists(key):
        raise ShardError(f"the store has no shard for period {period!r}; refresh it first")
    if isinstance(store, LocalStore):
        return Shard.open(store.root / shard_prefix(period))
    manifest = json.loads(store.get_bytes(key))
    cache = cache_dir or Path(tempfile.mkdtemp(prefix="cssl-shards-"))
    local = cache / period
    cached = local / MANIFEST
    if not (
        cached.is_file()
        and json.loads(cached.read_text())["fingerprint"] == manifest["fingerprint"]
    ):
        local.mkdir(parents=True, exist_ok=True)
        for part in manifest["parts"]:
            store.get_file(f"{shard_prefix(period)}/{part['file']}", local / part["file"])
        store.get_file(key, cached)
    return Shard.open(local)
