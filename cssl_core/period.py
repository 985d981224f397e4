"""One period of continual refresh as plain functions: the one code path for two drivers.

The Prefect flow (``pipelines/refresh.py``) and the DVC stages (``cssl train`` /
``cssl evaluate``) both call these, so a period reproduced with ``dvc repro`` runs exactly
the code the scheduled refresh ran.

    shard(t) ──publish──▶ store/shards/t            (eval sets of later periods come from here)
    parent(t-1) + shard(t) + memory(t-1) ──train_period──▶ model(t)
    memory(t-1) ∪ shard(t) ──next_memory──▶ memory(t)
    model(t) × eval sets 1..t ──evaluate_model──▶ accuracy row R[t][·]
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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
)
from cssl_core.learn.distributed import DistEnv, resolve_device
from cssl_core.learn.models import Embedder
from cssl_core.learn.scoring import embed_table, ssl_loss_per_frame
from cssl_core.learn.trainer import (
    USES_DISTILL,
    ContinualTrainer,
    FrameSource,
    StepLog,
    TrainResult,
    steps_for,
)
from cssl_core.memory.replay import ReplayMemory

SHARDS_PREFIX = "shards"


# -- models ------------------------------------------------------------------------------


def new_model(params: Params, categories: Sequence[str] = ()) -> Embedder:
    """A freshly initialised embedder; the same seed gives the same weights."""
    torch.manual_seed(params.train.seed)
    return Embedder(params.model, categories)


def run_key(
    params: Params, period: str, shard: Shard, parent: Embedder | None, memory: ReplayMemory
) -> str:
    """Identifies one period's training inputs, so a checkpoint is resumed only by its run."""
    parts = [
        params.config_hash(),
        period,
        shard.fingerprint,
        parent.state_fingerprint() if parent is not None else "scratch",
        memory.fingerprint if len(memory) else "empty",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


# -- training ----------------------------------------------------------------------------


def train_period(
    params: Params,
    period: str,
    shard: Shard,
    parent: Embedder | None,
    memory: ReplayMemory,
    *,
    history: Sequence[Shard] = (),
    checkpoint_dir: Path | None = None,
    on_step: Callable[[StepLog, float], None] | None = None,
    device: torch.device | None = None,
) -> tuple[Embedder, TrainResult]:
    """Train the model of ``period`` from its parent (the current champion).

    ``joint`` ignores the parent and memory and trains from scratch on the train splits of
    ``history`` (all earlier shards) plus this shard, for t times the steps: the upper bound
    and the cost baseline. The first period (no parent) is plain SimCLR for every strategy.

    With more than one process in ``params.distributed`` the training runs under torchrun
    (:func:`cssl_core.learn.launch.train_period_torchrun`, data-parallel, same result as one
    process on the same global batches); otherwise in this process.
    """
    if params.distributed.launches_processes:
        from cssl_core.learn.launch import train_period_torchrun

        return train_period_torchrun(
            params,
            period,
            shard,
            parent,
            memory,
            history=history,
            checkpoint_dir=checkpoint_dir,
            on_step=on_step,
        )
    return train_period_local(
        params,
        period,
        shard,
        parent,
        memory,
        history=history,
        checkpoint_dir=checkpoint_dir,
        on_step=on_step,
        device=device,
    )


def train_period_local(
    params: Params,
    period: str,
    shard: Shard,
    parent: Embedder | None,
    memory: ReplayMemory,
    *,
    history: Sequence[Shard] = (),
    checkpoint_dir: Path | None = None,
    on_step: Callable[[StepLog, float], None] | None = None,
    device: torch.device | None = None,
    env: DistEnv = DistEnv(),
) -> tuple[Embedder, TrainResult]:
    """:func:`train_period` in this process, as rank ``env.rank`` of ``env.world_size``
    (a torchrun worker passes its place in the job; a plain call is rank 0 of 1)."""
    cfg = params.train
    device = device or resolve_device(cfg.device, env)
    index = params.period_index(period)
    train_table = shard.read(split="train")
    if cfg.strategy == "joint" and history:
        train_table = pa.concat_tables([s.read(split="train") for s in history] + [train_table])
    categories = _categories(train_table) if cfg.classifier else []
    teacher = None
    replay: FrameSource | None = None
    if cfg.strategy == "joint" or parent is None:
        model = new_model(params, categories)
    else:
        model = copy.deepcopy(parent).train().requires_grad_(True)
        if cfg.classifier:
            model.expand_classes(categories)
        if cfg.strategy in USES_DISTILL:
            teacher = parent.frozen_copy()
        if len(memory):
            replay = FrameSource.from_table(memory.table, params.model.input_size, device=device)
    effective = cfg
    if parent is None and cfg.strategy in USES_DISTILL:
        effective = cfg.model_copy(update={"strategy": "finetune"})
    trainer = ContinualTrainer(
        effective,
        params.augment,
        model,
        teacher=teacher,
        device=device,
        checkpoint_dir=checkpoint_dir,
        run_key=run_key(params, period, shard, parent, memory),
        rank=env.rank,
        world_size=env.world_size,
        on_step=on_step,
    )
    frames = FrameSource.from_table(train_table, params.model.input_size, device=device)
    result = trainer.fit(frames, replay, steps=steps_for(cfg.strategy, cfg.steps, index))
    return model, result


def _categories(table: pa.Table) -> list[str]:
    return sorted({c for c in table.column("category").to_pylist() if c is not None})


def next_memory(
    params: Params, memory: ReplayMemory, shard: Shard, model: Embedder, period: str
) -> ReplayMemory:
    """``memory(t) = select(memory(t-1) ∪ shard(t))`` with the configured strategy."""
    cfg = params.replay

    def score(table: pa.Table):  # noqa: ANN202 - numpy array
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
    """kNN and linear-probe accuracy of ``model`` on every given period."""
    return evaluate_periods(
        model, eval_sets, params.eval, params.model.input_size, seed=params.train.seed
    )


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
