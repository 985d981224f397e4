"""The DVC stages ``train@<period>`` and ``evaluate@<period>``: files in, files out.

They run the same ``cssl_core.period.run_period`` as the Prefect flow and the benchmark,
without MLflow or a server, so ``dvc repro train@p03`` reproduces period p03's model from its
inputs:

    data/shards/<period>/                  the period's shard (stage ingest@<period>)
    data/models/<period>.model/            model.safetensors + config.json
    data/memory/<period>.memory/           the replay memory version of <period>
    data/metrics/<period>.json             accuracy on every period so far

The first period has no parent: its ``previous`` is empty, so its parent paths are
``data/models/.model`` and ``data/memory/.memory``, committed placeholders that DVC can hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cssl_core import period as core
from cssl_core.config import Params
from cssl_core.data.shard import Shard
from cssl_core.data.storage import LocalStore, atomic_write_json
from cssl_core.evaluation.intervals import REPORTED_CONFIDENCE
from cssl_core.evaluation.outcomes import METRICS
from cssl_core.learn.job import OnStep, ShouldStop
from cssl_core.learn.models import Embedder
from cssl_core.memory.replay import ReplayMemory


def model_dir(models: Path, period: str) -> Path:
    return models / f"{period}.model"


def memory_root(memory: Path, period: str) -> Path:
    return memory / f"{period}.memory"


def train_stage(
    params: Params,
    period: str,
    shards: Path,
    models: Path,
    memory: Path,
    *,
    checkpoint_dir: Path | None = None,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
) -> dict[str, Any]:
    """``train@<period>``: :func:`cssl_core.period.run_period` on the files of the previous
    period, then the model and replay memory of this period into the stage's outputs (a
    stale memory there, made with other settings, is replaced: DVC owns the directory)."""
    index = params.period_index(period)
    previous = params.periods[period].previous
    chain = params.period_names[: index + 1]
    inputs = core.PeriodInputs(
        params=params,
        period=period,
        shard=Shard.open(shards / period),
        memory=(
            ReplayMemory.load(LocalStore(memory_root(memory, previous)), previous)
            if previous
            else ReplayMemory.empty(params.replay.capacity)
        ),
        parent=Embedder.load(model_dir(models, previous)) if previous else None,
        history=tuple(Shard.open(shards / p) for p in chain[:-1]),
        checkpoint_dir=checkpoint_dir,
    )
    result = core.run_period(inputs, on_step=on_step, should_stop=should_stop)
    result.memory.save(LocalStore(memory_root(memory, period)), period, replace=True)
    out = result.model.save(model_dir(models, period))
    return {
        "period": period,
        "model_dir": str(out),
        "weights_sha256": result.model.state_fingerprint(),
        "steps": result.train.steps,
        "images_per_second": result.train.images_per_second,
    }


def evaluate_stage(
    params: Params, period: str, shards: Path, models: Path, out: Path
) -> dict[str, Any]:
    chain = params.period_names[: params.period_index(period) + 1]
    model = Embedder.load(model_dir(models, period))
    scores = core.evaluate_model(
        model, core.eval_sets_for([Shard.open(shards / p) for p in chain], params), params
    )
    result = {
        "period": period,
        "weights_sha256": model.state_fingerprint(),
        "scores": {p: {"knn": s.knn, "linear": s.linear} for p, s in scores.items()},
        "intervals": {
            p: {
                m: s.interval(
                    m,
                    confidence=REPORTED_CONFIDENCE,
                    n_resamples=params.gate.bootstrap_samples,
                    seed=params.gate.bootstrap_seed,
                ).to_dict()
                for m in METRICS
            }
            for p, s in scores.items()
        },
    }
    atomic_write_json(out / f"{period}.json", result, sort_keys=True)
    return result
